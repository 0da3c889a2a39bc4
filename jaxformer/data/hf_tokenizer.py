"""`data.tokenizer=hf:<dir>`: a Hugging Face directory's tokenizer.json through the `tokenizers` library (Rust).

It tokenizes as `transformers.AutoTokenizer.from_pretrained(dir)` does (checked against ids transformers produced,
tests/fixtures/hf): tokenizer.json holds the normalizer, pre-tokenizer, model and post-processor; tokenizer_config.json
(and special_tokens_map.json) name the special tokens, and an explicit add_bos_token / add_eos_token there rebuilds
the post-processor as transformers does.

The special ids are the tokenizer's own, not jaxformer's 0-4: GPT-2 has eos = bos = <|endoftext|> and no pad;
BERT has no bos/eos, so [CLS] / [SEP] stand in; T5 has pad 0 and eos 1 and no bos; a missing token is -1.
`encode` adds no special tokens (the Tokenizer contract); `encode_with_specials` adds exactly what transformers
adds by default (`prefix_ids` + ids + `suffix_ids`: nothing for GPT-2, [CLS] .. [SEP] for BERT, .. </s> for T5,
<s> .. for Llama). The row builders use the same framing (Tokenizer.document / source / target: GPT-2's empty
framing gets <|endoftext|> after each document; T5's decoder starts from config.json's decoder_start_token_id),
and since id 0 is a real token in many vocabularies, unscored targets are -1 (unscored_target).
data.tokenizer_extra adds tokens through the library's own add_tokens, the call transformers' `add_tokens` makes
(ids checked on the fixtures: tests/fixtures/hf/added_tokens.json).
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Iterable, Sequence

import numpy as np
import tokenizers

from jaxformer.data import chat
from jaxformer.data.tokenizers import DataError, Tokenizer

PREFIX = 'hf:'
FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json')
CACHE_SUBDIR = 'hf'  # <workdir>/tokenizer/hf/: the copy a run keeps (its tokenizer.json is jaxformer's own metadata)
NONE = -1  # the id of a special token the tokenizer does not have
_CLEANUP = ((' .', '.'), (' ?', '?'), (' !', '!'), (' ,', ','), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
            (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))  # transformers' clean_up_tokenization


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2's byte-level alphabet: byte -> the printable character its token strings use for it."""
  keep = [*range(ord('!'), ord('~') + 1), *range(ord('\xa1'), ord('\xac') + 1), *range(ord('\xae'), 256)]
  chars, extra = {}, 0
  for b in range(256):
    if b in keep:
      chars[b] = chr(b)
    else:
      chars[b] = chr(256 + extra)
      extra += 1
  return chars


def _read_json(path: str) -> dict[str, Any]:
  if not os.path.isfile(path):
    return {}
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def _content(token: Any) -> str | None:
  """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict {'content': ...}."""
  return token.get('content') if isinstance(token, dict) else token


class HFTokenizer(Tokenizer):
  """The tokenizer of a Hugging Face checkpoint directory (tokenizer.json required)."""

  kind = 'hf'
  pretrained = True
  unscored_target = NONE  # id 0 is a real token in many vocabularies (GPT-2 '!', Llama <unk>)

  def __init__(self, directory: str):
    path = os.path.join(directory, 'tokenizer.json')
    if not os.path.isdir(directory):
      raise DataError(f'data.tokenizer=hf:{directory}: no such directory.')
    if not os.path.isfile(path):
      found = [f for f in ('vocab.txt', 'vocab.json', 'spiece.model', 'tokenizer.model') if
               os.path.isfile(os.path.join(directory, f))]
      hint = (f' (it has {", ".join(found)}: save it once with transformers\' fast tokenizer, which writes '
              'tokenizer.json)' if found else '')
      raise DataError(f'data.tokenizer=hf:{directory}: the directory has no tokenizer.json{hint}.')
    self.directory = directory
    self._tok = tokenizers.Tokenizer.from_file(path)
    self._tok.no_padding()
    self._tok.no_truncation()
    tok_config = {**_read_json(os.path.join(directory, 'special_tokens_map.json')),
                  **_read_json(os.path.join(directory, 'tokenizer_config.json'))}
    self._special_strings = {f'{name}_token': _content(tok_config.get(f'{name}_token'))
                             for name in ('bos', 'eos', 'unk', 'sep', 'pad', 'cls', 'mask')}
    self._special = {name[:-len('_token')]: self._id(token) for name, token in self._special_strings.items()}
    if 'add_bos_token' in tok_config or 'add_eos_token' in tok_config:  # transformers then rebuilds the post-processor
      self._template(bool(tok_config.get('add_bos_token')), bool(tok_config.get('add_eos_token')),
                     _content(tok_config.get('bos_token')), _content(tok_config.get('eos_token')))
    self._cleanup = (bool(tok_config.get('clean_up_tokenization_spaces', False))
                     and type(self._tok.model).__name__ != 'BPE')  # transformers 5 never cleans up BPE output
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    s = self._special
    self.pad_id, self.unk_id, self.mask_id = s['pad'], s['unk'], s['mask']
    self.bos_id = s['bos'] if s['bos'] != NONE else s['cls']
    self.eos_id = s['eos'] if s['eos'] != NONE else s['sep']
    self.prefix_ids, self.suffix_ids = self._framing()
    # transformers starts a decoder from config.json's decoder_start_token_id (T5: its pad id 0)
    start = _read_json(os.path.join(directory, 'config.json')).get('decoder_start_token_id')
    self.decoder_start_id = int(start) if isinstance(start, int) else (self.pad_id if self.pad_id != NONE
                                                                       else self.bos_id)
    self._added_special = frozenset(i for i, t in self._tok.get_added_tokens_decoder().items() if t.special)

  def _id(self, token: str | None) -> int:
    if token is None:
      return NONE
    i = self._tok.token_to_id(token)
    return NONE if i is None else int(i)

  def _template(self, add_bos: bool, add_eos: bool, bos: str | None, eos: str | None) -> None:
    """transformers' update_post_processor: '<bos>:0 $A:0 <eos>:0' with the flags given."""
    add_bos, add_eos = add_bos and bos is not None, add_eos and eos is not None
    single = ' '.join(([f'{bos}:0'] if add_bos else []) + ['$A:0'] + ([f'{eos}:0'] if add_eos else []))
    pair = single + ' ' + ' '.join(([f'{bos}:1'] if add_bos else []) + ['$B:1'] + ([f'{eos}:1'] if add_eos else []))
    special = [(t, self._id(t)) for t, on in ((bos, add_bos), (eos, add_eos)) if on]
    self._tok.post_processor = tokenizers.processors.TemplateProcessing(single=single, pair=pair,
                                                                        special_tokens=special)

  def _framing(self) -> tuple[list[int], list[int]]:
    """The ids the post-processor puts before and after a text's own ids."""
    probe = 'a b'
    plain = self._tok.encode(probe, add_special_tokens=False).ids
    full = self._tok.encode(probe).ids
    for start in range(len(full) - len(plain) + 1):
      if full[start:start + len(plain)] == plain:
        return full[:start], full[start + len(plain):]
    raise DataError(f'{self.directory}/tokenizer.json: its post-processor changes the text\'s own ids; jaxformer '
                    'cannot tell which ids it adds.')

  @classmethod
  def from_spec(cls, spec: str) -> HFTokenizer:
    """'hf:<dir>' (the data.tokenizer value) -> the tokenizer."""
    return cls(os.path.expanduser(spec[len(PREFIX):] if spec.startswith(PREFIX) else spec))

  # ------------------------------------------------------------------------------------------- Tokenizer API
  def encode_array(self, text: str) -> np.ndarray:
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    return [np.asarray(e.ids, np.int32) for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

  def encode_offsets(self, text: str) -> tuple[np.ndarray, np.ndarray]:
    """The fast tokenizer's own character offsets (transformers' return_offsets_mapping)."""
    enc = self._tok.encode(text, add_special_tokens=False)
    return np.asarray(enc.ids, np.int32), np.asarray(enc.offsets, np.int32).reshape(-1, 2)

  def encode_words(self, words: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """transformers' tokenizer(words, is_split_into_words=True): ids and their word_ids (-1 for none)."""
    if not words:
      return np.zeros(0, np.int32), np.zeros(0, np.int32)
    enc = self._tok.encode(list(words), is_pretokenized=True, add_special_tokens=False)
    return (np.asarray(enc.ids, np.int32),
            np.asarray([-1 if w is None else w for w in enc.word_ids], np.int32))

  # Framing (see Tokenizer.document): sources and targets framed as transformers frames any text.
  def source(self, ids: Sequence[int], max_len: int | None = None) -> np.ndarray:
    return self._join(self.prefix_ids, self._cut(ids, max_len, len(self.prefix_ids) + len(self.suffix_ids)),
                      self.suffix_ids)

  def target(self, ids: Sequence[int]) -> np.ndarray:
    return self._join([self.decoder_start_id], self.prefix_ids, ids, self.suffix_ids)

  def sentinel_ids(self, n: int) -> list[int]:
    """T5's own sentinels <extra_id_0> .. <extra_id_{n-1}>, looked up by name (their ids are the checkpoint's: the
    real T5 vocabulary counts down from 32099, others count up), so span corruption continues T5's pretraining."""
    ids = [self._id(f'<extra_id_{k}>') for k in range(n)]
    have = ids.index(NONE) if NONE in ids else n
    if have < n:
      raise DataError(f'span corruption needs {n} sentinel tokens (<extra_id_0> ...) but data.tokenizer=hf:'
                      f'{self.directory} has {have}; use fewer spans per row (a shorter data.src_seq_len, a lower '
                      'data.noise_density or a longer data.mean_noise_span_length), or data.objective=prefix_lm.')
    return ids

  @property
  def special_ids(self) -> frozenset[int]:
    return frozenset(i for i in self._special.values() if i != NONE) | self._added_special | self.framing_ids

  @property
  def special_token_strings(self) -> dict[str, str]:
    """transformers' special_tokens_map: the named special tokens the tokenizer has (what a chat template sees)."""
    return {name: token for name, token in self._special_strings.items() if token is not None}

  @property
  def chat_template(self) -> str | None:
    """The directory's chat template (chat_template.jinja, else tokenizer_config.json's), or None."""
    return chat.tokenizer_template(self.directory)

  def encode_with_offsets(self, text: str, cuts: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
    """(ids, character offsets) of the whole text as transformers tokenizes a rendered chat (no special tokens
    added; added tokens in the text are found); `cuts` are not needed: the offsets locate every token."""
    del cuts
    encoding = self._tok.encode(text, add_special_tokens=False)
    return np.asarray(encoding.ids, np.int32), np.asarray(encoding.offsets, np.int64).reshape(-1, 2)

  # data.tokenizer_extra: Hugging Face's own added tokens (transformers' add_tokens is the `tokenizers` call made
  # here): matched in the normalized text before pre-tokenization, each one id; tokenizer.json saves them.
  requested_tokens: tuple[str, ...] = ()  # every token asked for (those the vocabulary had are matched whole too)

  def has_token(self, token: str) -> bool:
    return self._tok.token_to_id(token) is not None

  def extend(self, tokens: Sequence[str]) -> list[str]:
    """As `tokenizer.add_tokens(tokens)`: every token becomes an added token (split off before the model runs);
    those the vocabulary lacks get ids from vocab_size on. Returns the new ones."""
    tokens = [t for t in dict.fromkeys(tokens) if t and t not in self.requested_tokens]
    new = [t for t in tokens if not self.has_token(t)]
    if tokens:
      self._tok.add_tokens(tokens)
      self.requested_tokens = (*self.requested_tokens, *tokens)
      self.extra_tokens = (*self.extra_tokens, *new)
      self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
      self.__dict__.pop('token_bytes', None)
      self.__dict__.pop('token_chars', None)
    return new

  @property
  def saved_tokens(self) -> list[str]:
    return list(self.requested_tokens)

  def encode_with_specials(self, text: str) -> list[int]:
    """Exactly `AutoTokenizer.from_pretrained(dir)(text)['input_ids']`."""
    return self._tok.encode(text).ids

  def decode(self, ids: Iterable[int]) -> str:
    """Stops at eos; special tokens are dropped (transformers' decode(..., skip_special_tokens=True))."""
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    if self.eos_id != NONE and self.eos_id in ids:
      ids = ids[:ids.index(self.eos_id)]
    return self._decode([i for i in ids if 0 <= i < self.vocab_size])

  def _decode(self, ids: list[int]) -> str:
    text = self._tok.decode(ids, skip_special_tokens=True)
    if self._cleanup:
      for old, new in _CLEANUP:
        text = text.replace(old, new)
    return text

  def token_utf8(self) -> list[bytes]:
    """The UTF-8 bytes each id contributes to decoded text (b'' for special tokens): the denominators of bits per
    byte / char. Byte-level BPE (GPT-2, Qwen2, Llama 3) is exact: each token string maps back to its bytes, also
    for a piece holding part of a character. sentencepiece-style vocabularies (T5, Llama 2): '\u2581' is a space and
    a byte-fallback piece <0xNN> that byte. WordPiece (BERT): '##x' is x, any other piece a space + the piece
    (but . ? ! , when decode's clean-up glues them on).
    The last two count the space decode drops before the first word: one byte per example too many (as for
    jaxformer's own sentencepiece tokenizer)."""
    decoder = self._tok.decoder
    byte_level = type(decoder).__name__ == 'ByteLevel'
    wordpiece = type(decoder).__name__ == 'WordPiece'
    cleanup = self._cleanup or bool(getattr(decoder, 'cleanup', False))
    to_byte = {c: b for b, c in _bytes_to_unicode().items()}
    special = self.special_ids
    out = []
    for i in range(self.vocab_size):
      piece = self._tok.id_to_token(i)
      if piece is None or i in special:
        out.append(b'')
      elif byte_level:
        out.append(bytes(to_byte[c] for c in piece) if all(c in to_byte for c in piece) else piece.encode('utf-8'))
      elif len(piece) == 6 and piece.startswith('<0x') and piece.endswith('>'):
        out.append(bytes([int(piece[3:5], 16)]))
      elif wordpiece:  # decode joins words with spaces, then its clean-up takes them off before . ? ! ,
        glued = piece.startswith('##') or (cleanup and piece in ('.', '?', '!', ','))
        out.append((piece[2:] if piece.startswith('##') else piece if glued else ' ' + piece).encode('utf-8'))
      else:
        out.append(piece.replace('\u2581', ' ').encode('utf-8'))
    return out

  def save_files(self, directory: str) -> None:
    """Copies the Hugging Face files (tokenizer.json, tokenizer_config.json, ...) into `directory`; with added
    tokens (data.tokenizer_extra) tokenizer.json holds them too, as transformers' save_pretrained writes them."""
    os.makedirs(directory, exist_ok=True)
    for name in FILES:
      src, dst = os.path.join(self.directory, name), os.path.join(directory, name)
      if os.path.isfile(src) and os.path.abspath(src) != os.path.abspath(dst):
        shutil.copyfile(src, dst)
    if self.requested_tokens:  # the grown vocabulary: the original tokenizer.json plus the added tokens
      grown = tokenizers.Tokenizer.from_file(os.path.join(self.directory, 'tokenizer.json'))
      grown.add_tokens(list(self.requested_tokens))
      grown.save(os.path.join(directory, 'tokenizer.json'))

  def save(self, directory: str) -> None:
    """Into a run's tokenizer cache (<workdir>/tokenizer): the files go to its hf/ subdirectory."""
    self.save_files(os.path.join(directory, CACHE_SUBDIR))

  @classmethod
  def load(cls, directory: str) -> HFTokenizer:
    return cls(os.path.join(directory, CACHE_SUBDIR))

  def __repr__(self) -> str:
    return f'HFTokenizer({self.directory!r}, vocab_size={self.vocab_size})'
