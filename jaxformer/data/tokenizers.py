"""Tokenizers: char, byte and sentencepiece, with the shared special ids and a cache in the workdir.

Ids 0 pad, 1 bos, 2 eos, 3 unk, 4 mask are reserved by every tokenizer; real symbols start at 5.

  char           vocabulary = the characters of the TRAINING split (plus '\\n' and ' '), sorted; any other character
                 becomes <unk> (id 3). `unknown_characters` reports the rate per split once at start-up, and
                 fails then, never mid-run, when it exceeds data.max_unk_fraction (off by default).
  byte           the UTF-8 bytes (+5): covers everything, vocab_size 261.
  sentencepiece  unigram or BPE (data.spm_model_type) trained on the training split with data.vocab_size,
                 data.spm_character_coverage (1.0: every character of the split gets a piece; below, the rarest
                 fall back to UTF-8 byte pieces) and byte_fallback, identity normalisation and no whitespace
                 folding, so decode(encode(text)) == text for any Unicode text (Chinese included). A vocab_size larger than the
                 data supports is an error naming data.vocab_size and the largest size that works.

The tokenizer is cached in <workdir>/tokenizer/ (tokenizer.json + chars.json or spm.model) and reused by resume
and eval, so ids never change for a workdir. A run that starts from another jaxformer run's parameters
(checkpoint.init_from=<workdir>) inherits that run's cached tokenizer instead of building one from its own data
(`inherit`), so its ids are the ones the pretrained embeddings were trained on; characters the base never saw
become <unk> (reported at start-up as above).

data.tokenizer_extra=FILE (one token per line) grows any of them, hf: included, as Hugging Face's
`tokenizer.add_tokens` does: each token not already in the vocabulary gets the next id after the last one (char:
characters; byte: whole characters or strings; sentencepiece: user-defined pieces; hf: added tokens), and text is
split around them first (leftmost match, longest token first), the rest tokenised as before. The list is kept in
<workdir>/tokenizer/extra_tokens.json (`extend_from_workdir`), so eval, resume and export rebuild the same ids; a
run that starts from a base (checkpoint.init_from) grows the base's embeddings and output layer for them
(training/state.py).
"""
from __future__ import annotations

import functools
import json
import logging
import os
import re
import shutil
import tempfile
from typing import Any, Iterable, Sequence

import numpy as np

from jaxformer.errors import DataError
from jaxformer.data.objectives import sentinels_needed
from jaxformer.data.sources import (ChatPreference, ChatPrompt, Conversation, Preference, Prompt, Source, SpanExample,
                                    Tagged, get_source)
from jaxformer.special_tokens import BOS_ID, EOS_ID, MASK_ID, NUM_SPECIAL, PAD_ID, UNK_ID

UNK_SAMPLE_EXAMPLES = 20000  # examples of a split (evenly strided) the unknown-character rate is measured on
MAX_TOKENIZER_EXAMPLES = 1_000_000  # examples of the training split read to build a vocabulary (evenly strided)
_SPM_MAX_SENTENCE_BYTES = 16384
TOKENIZER_DIR = 'tokenizer'
EXTRA_TOKENS_FILE = 'extra_tokens.json'  # in the tokenizer cache: the added tokens, in id order


class Tokenizer:
  """Shared interface. `encode` adds no bos/eos; `decode` drops pad/bos and stops at eos."""

  kind = ''
  pretrained = False  # True: named with its files (`<kind>:<dir>`) and loaded from them, never trained on the data
  inherited_from = ''  # the checkpoint.init_from workdir whose cached tokenizer this is (`inherit`), if any
  pad_id, bos_id, eos_id, unk_id, mask_id = PAD_ID, BOS_ID, EOS_ID, UNK_ID, MASK_ID
  vocab_size: int

  # How texts are framed as model sequences: the one rule every row builder, prompt and source uses (rows.py,
  # evaluation.py). A Hugging Face tokenizer (hf_tokenizer.py) overrides the attributes with its own.
  prefix_ids: list[int] = [BOS_ID]  # put before a text's ids (read-only)
  suffix_ids: list[int] = [EOS_ID]  # put after them (read-only)
  decoder_start_id = BOS_ID  # an encoder_decoder target sequence starts with it (decode.start_id=-1 takes it)
  # The target value of a position that is not scored (padding, a prompt, an unmasked token). jaxformer's pad id
  # 0 is never a real target; a tokenizer whose id 0 is a real token (GPT-2's '!', Llama's <unk>) uses -1.
  unscored_target = PAD_ID

  @staticmethod
  def _join(*parts: Sequence[int]) -> np.ndarray:
    return np.concatenate([np.asarray(p, np.int32).reshape(-1) for p in parts]).astype(np.int32)

  def document(self, ids: Sequence[int], *, ends_in_eos: bool = False) -> np.ndarray:
    """A language-model document (decoder_only / encoder_only): prefix + ids + suffix; when the framing adds
    nothing (GPT-2), eos ends the document, as GPT-2 separates documents with <|endoftext|>. ends_in_eos (an
    instruction's response, so the model learns to stop): eos is appended when the suffix does not end in it
    (Llama's framing is <s> + ids)."""
    end = list(self.suffix_ids)
    if (ends_in_eos or not (self.prefix_ids or end)) and self.eos_id >= 0 and end[-1:] != [self.eos_id]:
      end.append(self.eos_id)
    return self._join(self.prefix_ids, ids, end)

  def source(self, ids: Sequence[int], max_len: int | None = None) -> np.ndarray:
    """An encoder input: ids + suffix (jaxformer's encoders read no BOS), the ids cut so it fits max_len."""
    return self._join(self._cut(ids, max_len, len(self.suffix_ids)), self.suffix_ids)

  def target(self, ids: Sequence[int]) -> np.ndarray:
    """An encoder_decoder target sequence: decoder_start + ids + suffix (decoder tokens = [:-1], targets = [1:])."""
    return self._join([self.decoder_start_id], ids, self.suffix_ids)

  def prompt(self, ids: Sequence[int]) -> list[int]:
    """A decoder_only prompt: a document's beginning (prefix + ids); for an empty text without prefix, bos (else
    eos: what separates documents)."""
    out = [*self.prefix_ids, *(int(i) for i in ids)]
    return out or [self.bos_id if self.bos_id >= 0 else self.eos_id]

  @property
  def framing_ids(self) -> frozenset[int]:
    """Ids that frame text rather than being text (pad, bos, eos, prefix, suffix): never masked by MLM."""
    return frozenset(i for i in (self.pad_id, self.bos_id, self.eos_id, *self.prefix_ids, *self.suffix_ids)
                     if i >= 0)

  @property
  def special_ids(self) -> frozenset[int]:
    """Every special id (never drawn as MLM's random replacement): jaxformer's reserved 0-4."""
    return frozenset(range(NUM_SPECIAL))

  @property
  def special_token_strings(self) -> dict[str, str]:
    """The special tokens as a chat template names them (bos_token, eos_token, ...): jaxformer's reserved ids
    written <s>, </s>, <pad>, <unk>, <mask> (encode_with_offsets maps these strings back to the ids)."""
    return {'bos_token': '<s>', 'eos_token': '</s>', 'unk_token': '<unk>', 'pad_token': '<pad>',
            'mask_token': '<mask>'}

  def encode_with_offsets(self, text: str, cuts: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
    """(ids, [n, 2] character offsets) of a text that may hold special-token strings (special_token_strings: each
    becomes its id); the text is also cut at the character positions `cuts` (chat templates: where assistant
    messages start and end), so no token crosses one. A token's offsets are those of the piece it came from."""
    ids_of = {s: getattr(self, name[:-len('_token')] + '_id') for name, s in self.special_token_strings.items()}
    pattern = '|'.join(re.escape(s) for s in sorted(ids_of, key=len, reverse=True))
    bounds = sorted({0, len(text), *(int(c) for c in cuts if 0 < c < len(text))})
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    for start, end in zip(bounds[:-1], bounds[1:]):
      last = start
      for m in [*re.finditer(pattern, text[start:end]), None]:
        stop = start + (m.start() if m else end - start)
        if stop > last:
          piece = self.encode(text[last:stop])
          ids += piece
          offsets += [(last, stop)] * len(piece)
        if m:
          ids.append(int(ids_of[m.group()]))
          offsets.append((start + m.start(), start + m.end()))
          last = start + m.end()
    return np.asarray(ids, np.int32), np.asarray(offsets, np.int64).reshape(-1, 2)

  @staticmethod
  def _cut(ids: Sequence[int], max_len: int | None, extra: int) -> Sequence[int]:
    return ids if max_len is None else ids[:max(0, int(max_len) - extra)]

  def encode(self, text: str) -> list[int]:
    return self.encode_array(text).tolist()

  def encode_array(self, text: str) -> np.ndarray:
    raise NotImplementedError

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    """int32 arrays, one per text (the pipeline's fast path)."""
    return [self.encode_array(t) for t in texts]

  def encode_offsets(self, text: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids, int32 [n, 2] character offsets [start, end) of each id in `text`): what extractive QA maps predicted
    tokens back to text with. This default adds up the UTF-8 bytes of each id (token_utf8), so it needs ids that
    spell the text exactly (sentencepiece's dummy-prefix space is allowed); DataError otherwise."""
    ids = self.encode_array(text)
    table = self._utf8_table
    lengths = np.asarray([len(table[i]) for i in ids], np.int64)
    data = text.encode('utf-8')
    ends = np.cumsum(lengths)
    starts = ends - lengths
    extra = int(ends[-1]) - len(data) if len(ids) else 0
    if extra == 1 and table[ids[0]][:1] == b' ' and not text.startswith(' '):  # sentencepiece's dummy prefix
      starts, ends = np.maximum(starts - 1, 0), ends - 1
    elif extra != 0 or b''.join(table[i] for i in ids) != data:
      raise DataError(f'the {self.kind} tokenizer\'s ids do not spell out the text {text[:40]!r} (unknown '
                      'characters?), so their character offsets are unknown; use data.tokenizer=byte.')
    char_starts = np.cumsum([0] + [len(c.encode('utf-8')) for c in text])[:-1]  # byte offset of each character
    return ids, np.stack([np.searchsorted(char_starts, starts, side='right') - 1,
                          np.searchsorted(char_starts, ends, side='left')], axis=1).astype(np.int32)

  @functools.cached_property
  def _utf8_table(self) -> list[bytes]:
    return self.token_utf8()

  def encode_words(self, words: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(ids, int32 word index of each id, -1 for an id of no word) of pre-split words: token classification's
    alignment. The words are joined by single spaces and encoded as one text; an id belongs to the first word its
    characters overlap (a space-only id to none)."""
    text = ' '.join(words)
    ids, offsets = self.encode_offsets(text)
    lengths = np.asarray([len(w) for w in words], np.int64)
    word_starts = np.cumsum(np.concatenate([[0], lengths[:-1] + 1])) if len(words) else np.zeros(0, np.int64)
    word_ends = word_starts + lengths
    first = np.searchsorted(word_ends, offsets[:, 0], side='right') if len(words) else np.zeros(len(ids), np.int64)
    while True:  # skip empty words (they have no characters to overlap)
      empty = (first < len(words)) & (lengths[np.minimum(first, max(len(words) - 1, 0))] == 0)
      if not empty.any():
        break
      first = np.where(empty, first + 1, first)
    inside = (first < len(words)) & (offsets[:, 1] > offsets[:, 0])
    inside &= np.where(inside, word_starts[np.minimum(first, max(len(words) - 1, 0))] < offsets[:, 1], False)
    return ids, np.where(inside, first, -1).astype(np.int32)

  def decode(self, ids: Iterable[int]) -> str:
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    if EOS_ID in ids:
      ids = ids[:ids.index(EOS_ID)]
    ids = [i for i in ids if i not in (PAD_ID, BOS_ID)]
    if not self.num_sentinels:
      return self._decode(ids)
    # Sentinels render as T5 writes them; the runs of other ids between them decode as usual.
    first_sentinel, out, run = self.vocab_size - self.num_sentinels, [], []
    for i in ids + [-1]:
      if i >= first_sentinel or i == -1:
        out.append(self._decode(run) if run else '')
        run = []
        if i != -1:
          out.append(f'<extra_id_{self.vocab_size - 1 - i}>')
      else:
        run.append(i)
    return ''.join(out)

  # Span corruption (T5) replaces noise spans by sentinel ids taken from the END of the vocabulary:
  # <extra_id_0> = vocab_size - 1, <extra_id_1> = vocab_size - 2, ... reserve_sentinels(n) adds n such ids.
  num_sentinels = 0

  def reserve_sentinels(self, n: int) -> None:
    """Appends n sentinel ids to the vocabulary (once, right after the tokenizer is built or loaded)."""
    if self.num_sentinels:
      raise DataError(f'{self!r} already has {self.num_sentinels} sentinel ids.')
    self.vocab_size = self.vocab_size + int(n)
    self.num_sentinels = int(n)

  def sentinel_ids(self, n: int) -> list[int]:
    """The ids of <extra_id_0> .. <extra_id_{n-1}> (descending from vocab_size - 1)."""
    if n > self.num_sentinels:
      raise DataError(f'span corruption needs {n} sentinel ids but the tokenizer has {self.num_sentinels}; raise '
                      'data.num_sentinels (and use a new workdir: the vocabulary changes).')
    return [self.vocab_size - 1 - k for k in range(n)]

  def _decode(self, ids: list[int]) -> str:
    raise NotImplementedError

  # ------------------------------------------------------------------ added tokens (data.tokenizer_extra)
  extra_tokens: tuple[str, ...] = ()  # tokens added to the vocabulary, in id order after base_vocab_size
  _extra_pattern: re.Pattern | None = None

  @property
  def base_vocab_size(self) -> int:
    """The vocabulary before the added tokens (and before sentinel ids)."""
    return self.vocab_size - len(self.extra_tokens) - self.num_sentinels

  def has_token(self, token: str) -> bool:
    """Whether `token` already has an id of its own (add_tokens skips it then)."""
    return token in self.extra_tokens

  def extend(self, tokens: Sequence[str]) -> list[str]:
    """Adds the tokens the vocabulary lacks (in order, duplicates once) with ids from vocab_size on; returns them.

    Call it right after the tokenizer is built or loaded (before sentinels are reserved or tables read)."""
    if self.num_sentinels:
      raise DataError('data.tokenizer_extra cannot be combined with span corruption\'s sentinel ids at the end of a '
                      'jaxformer vocabulary; use data.objective=prefix_lm or split_middle.')
    new = [t for t in dict.fromkeys(tokens) if t and not self.has_token(t)]
    if new:
      self._add_tokens(new)
      self.extra_tokens = (*self.extra_tokens, *new)
      self.vocab_size += len(new)
      self.__dict__.pop('token_bytes', None)
      self.__dict__.pop('token_chars', None)
    return new

  @property
  def saved_tokens(self) -> list[str]:
    """What extra_tokens.json keeps: the list that extend() rebuilds this vocabulary from."""
    return list(self.extra_tokens)

  def _add_tokens(self, tokens: list[str]) -> None:
    """The generic way (byte): text is split around the added tokens, longest first (as Hugging Face's added
    vocabulary splits), the pieces between them tokenised by the base tokenizer."""
    every = sorted((*self.extra_tokens, *tokens), key=len, reverse=True)
    self._extra_pattern = re.compile('|'.join(re.escape(t) for t in every))

  def _encode_split(self, text: str, encode: Any) -> np.ndarray:
    """encode(text) with the added tokens matched first (the generic _add_tokens)."""
    if self._extra_pattern is None:
      return encode(text)
    first, parts, start = self.base_vocab_size, [], 0
    index = {t: first + i for i, t in enumerate(self.extra_tokens)}
    for match in self._extra_pattern.finditer(text):
      if match.start() > start:
        parts.append(encode(text[start:match.start()]))
      parts.append(np.asarray([index[match.group()]], np.int32))
      start = match.end()
    if start < len(text):
      parts.append(encode(text[start:]))
    return np.concatenate(parts).astype(np.int32) if parts else np.zeros((0,), np.int32)

  def _decode_split(self, ids: list[int], decode: Any) -> str:
    """decode(ids) for runs of base ids, the added tokens' own text between them (the generic _add_tokens)."""
    if not self.extra_tokens:
      return decode(ids)
    first, end, out, run = self.base_vocab_size, self.base_vocab_size + len(self.extra_tokens), [], []
    for i in ids:
      if first <= i < end:
        out.append(decode(run) if run else '')
        out.append(self.extra_tokens[i - first])
        run = []
      else:
        run.append(i)
    out.append(decode(run) if run else '')
    return ''.join(out)

  def save(self, directory: str) -> None:
    raise NotImplementedError

  def token_utf8(self) -> list[bytes]:
    """The UTF-8 bytes each id contributes to decoded text, one entry per id (b'' for the special ids).

    This default decodes each id on its own, which is exact only when ids decode independently (not for a piece
    holding part of a character, or whose leading space depends on its neighbours); the tokenizers here override
    it with exact tables."""
    return [self.decode([i]).encode('utf-8') for i in range(self.vocab_size)]

  @functools.cached_property
  def token_bytes(self) -> np.ndarray:
    """int32 [vocab_size]: UTF-8 bytes each id decodes to (0 for specials); the denominator of bits per byte."""
    return np.asarray([len(b) for b in self.token_utf8()], np.int32)

  @functools.cached_property
  def token_chars(self) -> np.ndarray:
    """int32 [vocab_size]: the bytes of each id that start a character (not 0b10xxxxxx continuation bytes).

    Summed over a token sequence whose text is valid UTF-8 this is exactly its number of Unicode characters, also
    when a character is split across byte tokens (byte tokenizer, sentencepiece byte fallback)."""
    return np.asarray([sum((c & 0xC0) != 0x80 for c in b) for b in self.token_utf8()], np.int32)

  def __repr__(self) -> str:
    return f'{type(self).__name__}(vocab_size={self.vocab_size})'


class CharTokenizer(Tokenizer):
  """One id per Unicode character seen in the training split; a code-point lookup table makes encode fast."""

  kind = 'char'
  UNK_TEXT = '\u2047'  # '⁇', as sentencepiece renders UNK
  MASK_TEXT = '<mask>'

  def __init__(self, chars: Sequence[str]):
    self.chars = list(chars)  # the vocabulary built from the data (saved); added characters come after them
    self.vocab_size = NUM_SPECIAL + len(self.chars)
    self._tables(self.chars)

  def _tables(self, chars: list[str]) -> None:
    top = max([ord(c) for c in chars] + [0]) + 1
    self._lut = np.full(top, UNK_ID, np.int32)
    for i, c in enumerate(chars):
      self._lut[ord(c)] = NUM_SPECIAL + i
    self._id_to_char = ['', '', '', self.UNK_TEXT, self.MASK_TEXT] + chars

  @classmethod
  def build(cls, texts: Iterable[str]) -> CharTokenizer:
    chars = {'\n', ' '}
    for t in texts:
      chars.update(t)
    return cls(sorted(chars))

  def encode_array(self, text: str) -> np.ndarray:
    cps = np.frombuffer(text.encode('utf-32-le'), np.uint32)
    inside = cps < len(self._lut)
    return np.where(inside, self._lut[np.where(inside, cps, 0)], UNK_ID).astype(np.int32)

  def encode_offsets(self, text: str) -> tuple[np.ndarray, np.ndarray]:
    """One id per character (an unseen one is <unk>), so id i covers character i."""
    ids = self.encode_array(text)
    cols = np.arange(len(ids), dtype=np.int32)
    return ids, np.stack([cols, cols + 1], axis=1)

  def _decode(self, ids: list[int]) -> str:
    n = len(self._id_to_char)
    return ''.join(self._id_to_char[i] if 0 <= i < n else self.UNK_TEXT for i in ids)

  def token_utf8(self) -> list[bytes]:
    """<unk> decodes to UNK_TEXT (one character, 3 bytes); pad/bos/eos/<mask> to nothing."""
    return [b'', b'', b'', self.UNK_TEXT.encode(), b''] + [c.encode('utf-8') for c in self._id_to_char[NUM_SPECIAL:]]

  def has_token(self, token: str) -> bool:
    return token in self._id_to_char[NUM_SPECIAL:]

  def _add_tokens(self, tokens: list[str]) -> None:
    """Added characters are appended to the character table (ids after the last one)."""
    long = [t for t in tokens if len(t) != 1]
    if long:
      raise DataError(f'data.tokenizer_extra: a char tokenizer\'s tokens are single characters, not {long[0]!r}; '
                      'list characters, or use data.tokenizer=byte (which takes whole strings).')
    self._tables(self.chars + list(self.extra_tokens) + tokens)

  def uncovered(self, texts: Iterable[str]) -> tuple[int, int, dict[str, int]]:
    """(unseen characters, all characters, counts of the unseen ones) over texts."""
    total, missing, counts = 0, 0, {}
    for t in texts:
      ids = self.encode_array(t)
      total += len(ids)
      bad = ids == UNK_ID
      if bad.any():
        missing += int(bad.sum())
        for c in np.asarray(list(t))[bad]:
          counts[c] = counts.get(c, 0) + 1
    return missing, total, counts

  def save(self, directory: str) -> None:
    _atomic_write(os.path.join(directory, 'chars.json'), json.dumps(self.chars, ensure_ascii=False).encode())

  @classmethod
  def load(cls, directory: str) -> CharTokenizer:
    with open(os.path.join(directory, 'chars.json'), encoding='utf-8') as f:
      return cls(json.load(f))


class ByteTokenizer(Tokenizer):
  """UTF-8 bytes shifted by 5. Covers any text; invalid byte sequences decode with U+FFFD."""

  kind = 'byte'

  def __init__(self):
    self.vocab_size = NUM_SPECIAL + 256

  def encode_array(self, text: str) -> np.ndarray:
    return self._encode_split(text, self._encode_bytes)

  @staticmethod
  def _encode_bytes(text: str) -> np.ndarray:
    return np.frombuffer(text.encode('utf-8'), np.uint8).astype(np.int32) + NUM_SPECIAL

  def _decode(self, ids: list[int]) -> str:
    return self._decode_split(ids, self._decode_bytes)

  @staticmethod
  def _decode_bytes(ids: list[int]) -> str:
    return bytes(i - NUM_SPECIAL for i in ids if NUM_SPECIAL <= i < NUM_SPECIAL + 256).decode('utf-8', 'replace')

  def has_token(self, token: str) -> bool:
    return len(token.encode('utf-8')) == 1 or token in self.extra_tokens

  def token_utf8(self) -> list[bytes]:
    return [b''] * NUM_SPECIAL + [bytes([b]) for b in range(256)] + [t.encode('utf-8') for t in self.extra_tokens]

  def save(self, directory: str) -> None:
    del directory

  @classmethod
  def load(cls, directory: str) -> ByteTokenizer:
    del directory
    return cls()


class SentencePieceTokenizer(Tokenizer):
  """A sentencepiece model whose ids 0-4 are pad/bos/eos/unk and the control symbol <mask>."""

  kind = 'sentencepiece'

  def __init__(self, model_proto: bytes):
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    self._proto = model_proto
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.vocab_size = self._sp.get_piece_size()
    ids = (self._sp.pad_id(), self._sp.bos_id(), self._sp.eos_id(), self._sp.unk_id(), self._sp.piece_to_id('<mask>'))
    if ids != (PAD_ID, BOS_ID, EOS_ID, UNK_ID, MASK_ID):
      raise DataError(f'the sentencepiece model has special ids {ids}, not (0, 1, 2, 3, 4); rebuild the tokenizer.')

  @classmethod
  def train(cls, texts: Iterable[str], vocab_size: int, model_type: str,
            character_coverage: float = 1.0) -> SentencePieceTokenizer:
    import io  # pylint: disable=g-import-not-at-top
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    if model_type not in ('unigram', 'bpe'):
      raise DataError(f'data.spm_model_type={model_type!r} is not valid; use unigram or bpe.')

    def sentences():
      for t in texts:
        for line in t.split('\n'):
          if line:
            yield line.encode('utf-8')[:_SPM_MAX_SENTENCE_BYTES].decode('utf-8', 'ignore')

    model = io.BytesIO()
    try:
      spm.SentencePieceTrainer.train(
          sentence_iterator=sentences(), model_writer=model, vocab_size=vocab_size, model_type=model_type,
          pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=UNK_ID, control_symbols=['<mask>'],
          character_coverage=character_coverage, byte_fallback=True, normalization_rule_name='identity',
          remove_extra_whitespaces=False, split_digits=True, max_sentence_length=_SPM_MAX_SENTENCE_BYTES,
          input_sentence_size=2_000_000, shuffle_input_sentence=True,
          num_threads=min(16, os.cpu_count() or 1), minloglevel=2)
    except RuntimeError as e:
      message = str(e)
      high = re.search(r'Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)', message)
      if high:
        raise DataError(
            f'data.vocab_size={vocab_size} is larger than the training data supports for sentencepiece '
            f'{model_type}; set data.vocab_size <= {high.group(2)}.') from None
      low = re.search(r'smaller than required_chars\. (\d+) vs (\d+)', message)
      if low:
        hint = (' or lower data.spm_character_coverage (e.g. 0.9995, SentencePiece\'s choice for Chinese / Japanese: '
                'the rarest characters then fall back to byte pieces)' if character_coverage >= 0.9995 else '')
        raise DataError(
            f'data.vocab_size={vocab_size} is too small for the training data\'s characters plus 256 byte pieces at '
            f'data.spm_character_coverage={character_coverage}; set data.vocab_size >= {int(low.group(2)) + 1}'
            f'{hint}.') from None
      raise DataError(f'sentencepiece training failed (data.vocab_size={vocab_size}): {message.splitlines()[0]}') from None
    return cls(model.getvalue())

  def has_token(self, token: str) -> bool:
    return self._sp.piece_to_id(token.replace(' ', '\u2581')) != UNK_ID

  def _add_tokens(self, tokens: list[str]) -> None:
    """User-defined pieces appended to the model (sentencepiece matches them in the text before segmenting and
    always keeps each whole); the saved spm.model stays the base's, the list is re-applied on load."""
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    from sentencepiece import sentencepiece_model_pb2  # pylint: disable=g-import-not-at-top
    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(self._sp.serialized_model_proto())
    for token in tokens:
      piece = model.pieces.add()
      piece.piece, piece.score = token.replace(' ', '\u2581'), 0.0
      piece.type = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
    self._sp = spm.SentencePieceProcessor(model_proto=model.SerializeToString())

  def encode_array(self, text: str) -> np.ndarray:
    return np.asarray(self._sp.encode(text), np.int32)

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    if not texts:
      return []
    return [np.asarray(x, np.int32) for x in self._sp.encode(list(texts))]

  def _decode(self, ids: list[int]) -> str:
    return self._sp.decode([i for i in ids if 0 <= i < self.vocab_size and i != MASK_ID])

  def token_utf8(self) -> list[bytes]:
    """A piece's text with '\u2581' as a space; a byte-fallback piece <0xNN> is that byte; control/unk pieces b''.

    sentencepiece's dummy prefix (the '\u2581' it puts before each encoded text, dropped again by decode) is
    counted, so byte/char sums exceed the decoded text by one per encoded example (under 0.1% for examples of a
    few thousand characters)."""
    out = []
    for i in range(self.vocab_size):
      piece = self._sp.id_to_piece(i)
      if self._sp.is_control(i) or self._sp.is_unknown(i):
        out.append(b'')
      elif self._sp.is_byte(i):
        out.append(bytes([int(piece[3:5], 16)]))
      else:
        out.append(piece.replace('\u2581', ' ').encode('utf-8'))
    return out

  def save(self, directory: str) -> None:
    _atomic_write(os.path.join(directory, 'spm.model'), self._proto)

  @classmethod
  def load(cls, directory: str) -> SentencePieceTokenizer:
    with open(os.path.join(directory, 'spm.model'), 'rb') as f:
      return cls(f.read())


TOKENIZERS: dict[str, type[Tokenizer]] = {
    'char': CharTokenizer,
    'byte': ByteTokenizer,
    'sentencepiece': SentencePieceTokenizer,
}


def _atomic_write(path: str, data: bytes) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix='.tmp-')
  with os.fdopen(fd, 'wb') as f:
    f.write(data)
  os.replace(tmp, path)


def training_texts(source: Source, split: str, limit: int = MAX_TOKENIZER_EXAMPLES) -> Iterable[str]:
  """The texts of `split` a vocabulary is built from: documents, both sides of pairs (a joint vocabulary), a
  preference's prompt and both responses, a prompt (not its other fields), tagged words joined by spaces, a
  question and its context."""
  data = source.split(split)
  n = len(data)
  indices = np.arange(n) if n <= limit else np.linspace(0, n - 1, limit).astype(np.int64)
  for start in range(0, len(indices), 4096):
    for example in data.read(indices[start:start + 4096]):
      if isinstance(example, Conversation):  # roles and contents: what the built-in `turns` template writes
        for message in json.loads(example.messages):
          yield message['role']
          yield message['content']
      elif isinstance(example, (ChatPreference, ChatPrompt)):
        for side in example[:3 if isinstance(example, ChatPreference) else 1]:
          for message in json.loads(side):
            yield message['role']
            yield message['content']
      elif isinstance(example, Prompt):
        yield example.prompt
      elif isinstance(example, Tagged):
        yield ' '.join(example.words)
      elif isinstance(example, SpanExample):
        yield example.context
        yield example.question
      elif isinstance(example, Preference):
        yield from example[:3]
      elif isinstance(example, tuple):
        yield example[0]
        yield example[1]
      else:
        yield example


def unknown_characters(config: Any, tokenizer: Tokenizer, source: Source, splits: Sequence[str]) -> str:
  """Char tokenizer: the share of each split's characters that become <unk>, as one line to log ('' otherwise).

  Raises DataError (one line) when a split's share exceeds data.max_unk_fraction (a value < 0 turns the check
  off). Call it once at start-up, before any step: an unseen character never stops a run midway. Splits the
  source lacks are skipped (their absence is reported where they are read).
  """
  if not isinstance(tokenizer, CharTokenizer):
    return ''
  limit = float(config.data.max_unk_fraction)
  parts = []
  for name in dict.fromkeys(str(s) for s in splits):
    try:
      texts = list(training_texts(source, name, UNK_SAMPLE_EXAMPLES))
    except DataError:
      continue
    missing, total, counts = tokenizer.uncovered(texts)
    fraction = missing / max(total, 1)
    top = ''.join(c for c, _ in sorted(counts.items(), key=lambda kv: -kv[1])[:10])
    parts.append(f'{name} {missing} of {total} ({100 * fraction:.3f}%' + (f', e.g. {top!r})' if top else ')'))
    if 0 <= limit < fraction:
      if tokenizer.inherited_from:
        raise DataError(
            f'{missing} of {total} characters ({100 * fraction:.3f}%) of split {name!r} are not in the char '
            f'vocabulary of checkpoint.init_from={tokenizer.inherited_from} (fine-tuning keeps the base model\'s '
            f'ids), above data.max_unk_fraction={limit:g}; raise data.max_unk_fraction, or pretrain the base with '
            'data.tokenizer=byte.')
      raise DataError(
          f'{missing} of {total} characters ({100 * fraction:.3f}%) of split {name!r} are not in the char vocabulary '
          f'of the training split, above data.max_unk_fraction={limit:g}; use data.tokenizer=byte or sentencepiece, '
          'or raise data.max_unk_fraction.')
  if not parts:
    return ''
  where = (f'the char vocabulary of checkpoint.init_from={tokenizer.inherited_from}' if tokenizer.inherited_from
           else 'the char vocabulary')
  return f'characters outside {where} (-> <unk>): ' + '; '.join(parts)


def tokenizer_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(os.path.expanduser(workdir)), TOKENIZER_DIR)


def load_tokenizer(directory: str) -> Tokenizer:
  """Loads a cached tokenizer from <workdir>/tokenizer."""
  with open(os.path.join(directory, 'tokenizer.json'), encoding='utf-8') as f:
    meta = json.load(f)
  kind = meta['kind']
  if kind in TOKENIZERS:
    tokenizer = TOKENIZERS[kind].load(directory)
    tokenizer.extend(_saved_extra(directory).get('tokens', []))
    if meta.get('num_sentinels'):
      tokenizer.reserve_sentinels(meta['num_sentinels'])
    tokenizer.inherited_from = meta.get('inherited_from', '')
    return tokenizer
  raise DataError(f'{directory}/tokenizer.json names an unknown tokenizer {kind!r}; delete the folder to rebuild.')


def read_token_file(path: str) -> list[str]:
  """data.tokenizer_extra's file: one token per line (the line without its line break; empty lines skipped)."""
  try:
    with open(os.path.expanduser(path), encoding='utf-8') as f:
      lines = f.read().split('\n')
  except (OSError, UnicodeDecodeError) as e:
    raise DataError(f'data.tokenizer_extra={path!r} cannot be read ({type(e).__name__}); give a UTF-8 text file with '
                    'one token per line.') from None
  tokens = [line.removesuffix('\r') for line in lines if line.removesuffix('\r')]
  if not tokens:
    raise DataError(f'data.tokenizer_extra={path!r} lists no token; give one token per line.')
  return tokens


def _saved_extra(directory: str) -> dict[str, Any]:
  path = os.path.join(directory, EXTRA_TOKENS_FILE)
  if not os.path.isfile(path):
    return {}
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def _known_without_adding(tokenizer: Tokenizer, tokens: Sequence[str]) -> set[str]:
  """Tokens extend() would leave alone: any the vocabulary has, except that a Hugging Face tokenizer registers
  even those as added tokens (so they are always split off whole), as add_tokens does."""
  return set() if tokenizer.kind == 'hf' else {t for t in tokens if tokenizer.has_token(t)}


def extend_from_workdir(tokenizer: Tokenizer, workdir: str, token_file: str = '') -> Tokenizer:
  """The run's added tokens on `tokenizer` (fresh from its files): those saved in the workdir's tokenizer cache
  (added by this run before, or inherited from checkpoint.init_from's run) and then the ones `token_file`
  (data.tokenizer_extra) lists that it still lacks, which are saved for eval / resume / export. A workdir that
  added tokens already keeps its vocabulary: a file with more is a one-line DataError (use a new workdir)."""
  directory = tokenizer_dir(workdir)
  saved = _saved_extra(directory)
  if saved.get('tokens') and not tokenizer.saved_tokens:
    tokenizer.extend(saved['tokens'])
  here = os.path.abspath(os.path.expanduser(workdir))
  if not token_file or (saved.get('added_by') == here and saved.get('file') == os.path.abspath(token_file)):
    return tokenizer  # nothing to add, or added from this file before (the file may have moved since)
  wanted = read_token_file(token_file)
  missing = [t for t in dict.fromkeys(wanted) if not tokenizer.has_token(t)]
  if not missing and set(wanted) <= set(tokenizer.saved_tokens) | _known_without_adding(tokenizer, wanted):
    return tokenizer
  if saved.get('added_by') == here:
    raise DataError(f'data.tokenizer_extra={token_file!r} differs from the token file this workdir grew its '
                    f'vocabulary from ({saved.get("file")}), and its checkpoints use that vocabulary; use a new '
                    '--workdir (with checkpoint.init_from=this one) to grow it again.')
  added = tokenizer.extend(wanted)
  record = {'tokens': tokenizer.saved_tokens, 'added_by': here, 'file': os.path.abspath(token_file)}
  _atomic_write(os.path.join(directory, EXTRA_TOKENS_FILE), json.dumps(record, ensure_ascii=False, indent=0).encode())
  logging.info('Added %d token(s) of %s to the %s tokenizer (vocab_size %d)', len(added), token_file,
               tokenizer.kind, tokenizer.vocab_size)
  return tokenizer


def inherit(base_workdir: str, workdir: str, config: Any) -> bool:
  """Copies the cached tokenizer of `base_workdir` (the run checkpoint.init_from names) into `workdir`, unless
  `workdir` has one already: a run starting from another run's parameters must keep its ids (a char or
  sentencepiece vocabulary built from the new data would number the symbols differently). Its tokenizer.json
  records `inherited_from`. Returns whether there was one to copy. One-line DataError when data.tokenizer names
  another kind than the base's, or a different number of sentinel ids is needed."""
  source_dir = tokenizer_dir(base_workdir)
  meta_path = os.path.join(source_dir, 'tokenizer.json')
  if not os.path.isfile(meta_path) or os.path.exists(os.path.join(tokenizer_dir(workdir), 'tokenizer.json')):
    return False
  with open(meta_path, encoding='utf-8') as f:
    meta = json.load(f)
  kind, name = str(config.data.tokenizer), f'checkpoint.init_from={base_workdir}'
  if meta.get('kind') != kind:
    raise DataError(f'{name} was trained with data.tokenizer={meta.get("kind")!r} but this run sets '
                    f'data.tokenizer={kind!r}, whose ids its embeddings never saw; drop the override (the run reuses '
                    f'the base\'s tokenizer).')
  if int(meta.get('num_sentinels', 0)) != sentinels_needed(config):
    raise DataError(f'{name} has a tokenizer with {meta.get("num_sentinels", 0)} sentinel ids but this config needs '
                    f'{sentinels_needed(config)} (data.objective={config.data.objective}); '
                    'fine-tune with the base run\'s data.objective.')
  target = tokenizer_dir(workdir)
  os.makedirs(os.path.dirname(target), exist_ok=True)
  staging = tempfile.mkdtemp(prefix='.tokenizer.', dir=os.path.dirname(target))
  for entry in os.listdir(source_dir):
    if entry != 'tokenizer.json' and os.path.isfile(os.path.join(source_dir, entry)):
      shutil.copy2(os.path.join(source_dir, entry), staging)
  meta['inherited_from'] = os.path.abspath(os.path.expanduser(base_workdir))
  with open(os.path.join(staging, 'tokenizer.json'), 'w', encoding='utf-8') as f:
    json.dump(meta, f, indent=1)
  try:
    os.rename(staging, target)  # atomic: another process either sees the whole folder or none
  except OSError:  # someone else put one there first (another host): theirs is the same copy
    shutil.rmtree(staging, ignore_errors=True)
  logging.info('Reusing the %s tokenizer of %s (vocab_size %s)', kind, base_workdir, meta.get('vocab_size'))
  return True


def unscored_target(config: Any) -> int:
  """The target value the pipeline writes where nothing is scored, for config.data.tokenizer (the loss reads it:
  training/step.py token_weights)."""
  name = str(config.data.tokenizer).partition(':')[0]
  return TOKENIZERS[name].unscored_target if name in TOKENIZERS else Tokenizer.unscored_target


def get_tokenizer(config: Any, workdir: str, *, source: Source | None = None) -> Tokenizer:
  """The workdir's cached tokenizer, or a new one built from the training split (and cached)."""
  kind = str(config.data.tokenizer)
  name, _, _ = kind.partition(':')
  if name not in TOKENIZERS:
    raise DataError(f'data.tokenizer={kind!r} is not valid; use {", ".join(TOKENIZERS)}.')
  if TOKENIZERS[name].pretrained:  # e.g. hf:<dir>: read from its own directory, never trained or cached here
    return extend_from_workdir(TOKENIZERS[name].from_spec(kind), workdir, str(config.data.tokenizer_extra))
  sentinels = sentinels_needed(config)
  if sentinels and str(config.data.tokenizer_extra):
    raise DataError('data.tokenizer_extra cannot be combined with data.objective=span_corruption on a jaxformer '
                    'tokenizer (its sentinel ids sit at the end of the vocabulary, where added tokens go); use '
                    'data.objective=prefix_lm or split_middle, or an hf: tokenizer (named sentinels).')
  directory = tokenizer_dir(workdir)
  meta_path = os.path.join(directory, 'tokenizer.json')
  if os.path.exists(meta_path):
    with open(meta_path, encoding='utf-8') as f:
      meta = json.load(f)
    if meta.get('kind') != kind:
      raise DataError(
          f'{directory} holds a cached {meta.get("kind")!r} tokenizer but data.tokenizer={kind!r}; use a new workdir '
          'or delete that folder.')
    if kind == 'sentencepiece' and (meta.get('requested_vocab_size') != config.data.vocab_size or
                                    meta.get('spm_model_type') != config.data.spm_model_type):
      logging.warning('Reusing the cached sentencepiece tokenizer in %s (vocab %s, %s) although the config asks for '
                      'vocab %s, %s.', directory, meta.get('requested_vocab_size'), meta.get('spm_model_type'),
                      config.data.vocab_size, config.data.spm_model_type)
    if int(meta.get('num_sentinels', 0)) != sentinels:
      raise DataError(
          f'{directory} holds a tokenizer with {meta.get("num_sentinels", 0)} sentinel ids but this config needs '
          f'{sentinels} (data.objective={config.data.objective}); use a new workdir.')
    return extend_from_workdir(load_tokenizer(directory), workdir, str(config.data.tokenizer_extra))

  if kind == 'byte':
    tokenizer: Tokenizer = ByteTokenizer()
  else:
    source = source or get_source(config, workdir)
    texts = training_texts(source, str(config.data.train_split))
    if kind == 'char':
      tokenizer = CharTokenizer.build(texts)
    else:
      tokenizer = SentencePieceTokenizer.train(texts, int(config.data.vocab_size), str(config.data.spm_model_type),
                                               float(config.data.spm_character_coverage))
  tokenizer.save(directory)
  extend_from_workdir(tokenizer, workdir, str(config.data.tokenizer_extra))
  if sentinels:
    tokenizer.reserve_sentinels(sentinels)
  meta = {'kind': kind, 'vocab_size': tokenizer.vocab_size, 'source': str(config.data.source),
          'train_split': str(config.data.train_split), 'requested_vocab_size': int(config.data.vocab_size),
          'spm_model_type': str(config.data.spm_model_type),
          'spm_character_coverage': float(config.data.spm_character_coverage)}
  if sentinels:
    meta['num_sentinels'] = sentinels
  _atomic_write(meta_path, json.dumps(meta, indent=1).encode())
  logging.info('Built %s tokenizer (vocab_size %d) in %s', kind, tokenizer.vocab_size, directory)
  return tokenizer
