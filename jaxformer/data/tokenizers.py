"""Tokenizers: char, byte and sentencepiece, with the shared special ids and a cache in the workdir.

Ids 0 pad, 1 bos, 2 eos, 3 unk, 4 mask are reserved by every tokenizer; real symbols start at 5.

  char           vocabulary = the characters of the TRAINING split (plus '\\n' and ' '), sorted; anything else is
                 UNK. Eval text with unseen characters: a few are tolerated (they become UNK, logged); if more
                 than MAX_UNK_FRACTION of a split's characters are unseen the eval iterator raises DataError
                 (use byte or sentencepiece for such data).
  byte           the UTF-8 bytes (+5): covers everything, vocab_size 261.
  sentencepiece  unigram or BPE (data.spm_model_type) trained on the training split with data.vocab_size,
                 character_coverage=1.0 and byte_fallback, identity normalisation and no whitespace folding, so
                 decode(encode(text)) == text for any Unicode text (Chinese included). A vocab_size larger than the
                 data supports is an error naming data.vocab_size and the largest size that works.

The tokenizer is cached in <workdir>/tokenizer/ (tokenizer.json + chars.json or spm.model) and reused by resume
and eval, so ids never change for a workdir.
"""
from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from typing import Any, Iterable, Sequence

import numpy as np

from jaxformer.data.sources import DataError, Source, get_source
from jaxformer.special_tokens import BOS_ID, EOS_ID, MASK_ID, NUM_SPECIAL, PAD_ID, UNK_ID

MAX_UNK_FRACTION = 1e-3
MAX_TOKENIZER_EXAMPLES = 1_000_000  # examples of the training split read to build a vocabulary (evenly strided)
_SPM_MAX_SENTENCE_BYTES = 16384
TOKENIZER_DIR = 'tokenizer'


class Tokenizer:
  """Shared interface. `encode` adds no bos/eos; `decode` drops pad/bos and stops at eos."""

  kind = ''
  pad_id, bos_id, eos_id, unk_id, mask_id = PAD_ID, BOS_ID, EOS_ID, UNK_ID, MASK_ID
  vocab_size: int

  def encode(self, text: str) -> list[int]:
    return self.encode_array(text).tolist()

  def encode_array(self, text: str) -> np.ndarray:
    raise NotImplementedError

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    """int32 arrays, one per text (the pipeline's fast path)."""
    return [self.encode_array(t) for t in texts]

  def decode(self, ids: Iterable[int]) -> str:
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    if EOS_ID in ids:
      ids = ids[:ids.index(EOS_ID)]
    return self._decode([i for i in ids if i not in (PAD_ID, BOS_ID)])

  def _decode(self, ids: list[int]) -> str:
    raise NotImplementedError

  def save(self, directory: str) -> None:
    raise NotImplementedError

  def __repr__(self) -> str:
    return f'{type(self).__name__}(vocab_size={self.vocab_size})'


class CharTokenizer(Tokenizer):
  """One id per Unicode character seen in the training split; a code-point lookup table makes encode fast."""

  kind = 'char'
  UNK_TEXT = '\u2047'  # '⁇', as sentencepiece renders UNK
  MASK_TEXT = '<mask>'

  def __init__(self, chars: Sequence[str]):
    self.chars = list(chars)
    self.vocab_size = NUM_SPECIAL + len(self.chars)
    top = max([ord(c) for c in self.chars] + [0]) + 1
    self._lut = np.full(top, UNK_ID, np.int32)
    for i, c in enumerate(self.chars):
      self._lut[ord(c)] = NUM_SPECIAL + i
    self._id_to_char = ['', '', '', self.UNK_TEXT, self.MASK_TEXT] + self.chars

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

  def _decode(self, ids: list[int]) -> str:
    n = len(self._id_to_char)
    return ''.join(self._id_to_char[i] if 0 <= i < n else self.UNK_TEXT for i in ids)

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
  vocab_size = NUM_SPECIAL + 256

  def encode_array(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode('utf-8'), np.uint8).astype(np.int32) + NUM_SPECIAL

  def _decode(self, ids: list[int]) -> str:
    return bytes(i - NUM_SPECIAL for i in ids if NUM_SPECIAL <= i < NUM_SPECIAL + 256).decode('utf-8', 'replace')

  def save(self, directory: str) -> None:
    del directory


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
  def train(cls, texts: Iterable[str], vocab_size: int, model_type: str) -> SentencePieceTokenizer:
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
          character_coverage=1.0, byte_fallback=True, normalization_rule_name='identity',
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
        raise DataError(
            f'data.vocab_size={vocab_size} is too small for the training data\'s characters plus 256 byte pieces; '
            f'set data.vocab_size >= {int(low.group(2)) + 1}.') from None
      raise DataError(f'sentencepiece training failed (data.vocab_size={vocab_size}): {message.splitlines()[0]}') from None
    return cls(model.getvalue())

  def encode_array(self, text: str) -> np.ndarray:
    return np.asarray(self._sp.encode(text), np.int32)

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    if not texts:
      return []
    return [np.asarray(x, np.int32) for x in self._sp.encode(list(texts))]

  def _decode(self, ids: list[int]) -> str:
    return self._sp.decode([i for i in ids if 0 <= i < self.vocab_size and i != MASK_ID])

  def save(self, directory: str) -> None:
    _atomic_write(os.path.join(directory, 'spm.model'), self._proto)

  @classmethod
  def load(cls, directory: str) -> SentencePieceTokenizer:
    with open(os.path.join(directory, 'spm.model'), 'rb') as f:
      return cls(f.read())


def _atomic_write(path: str, data: bytes) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix='.tmp-')
  with os.fdopen(fd, 'wb') as f:
    f.write(data)
  os.replace(tmp, path)


def training_texts(source: Source, split: str, limit: int = MAX_TOKENIZER_EXAMPLES) -> Iterable[str]:
  """The texts of `split` a vocabulary is built from: documents, or both sides of pairs (a joint vocabulary)."""
  data = source.split(split)
  n = len(data)
  indices = np.arange(n) if n <= limit else np.linspace(0, n - 1, limit).astype(np.int64)
  for start in range(0, len(indices), 4096):
    for example in data.read(indices[start:start + 4096]):
      if isinstance(example, tuple):
        yield example[0]
        yield example[1]
      else:
        yield example


def tokenizer_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(os.path.expanduser(workdir)), TOKENIZER_DIR)


def load_tokenizer(directory: str) -> Tokenizer:
  """Loads a cached tokenizer from <workdir>/tokenizer."""
  with open(os.path.join(directory, 'tokenizer.json'), encoding='utf-8') as f:
    meta = json.load(f)
  kind = meta['kind']
  if kind == 'char':
    return CharTokenizer.load(directory)
  if kind == 'byte':
    return ByteTokenizer()
  if kind == 'sentencepiece':
    return SentencePieceTokenizer.load(directory)
  raise DataError(f'{directory}/tokenizer.json names an unknown tokenizer {kind!r}; delete the folder to rebuild.')


def get_tokenizer(config: Any, workdir: str, *, source: Source | None = None) -> Tokenizer:
  """The workdir's cached tokenizer, or a new one built from the training split (and cached)."""
  kind = str(config.data.tokenizer)
  if kind.startswith('hf:'):
    from jaxformer.data.hf_tokenizer import HFTokenizer  # not at the top: it subclasses Tokenizer, defined here
    return HFTokenizer.from_spec(kind)
  if kind not in ('char', 'byte', 'sentencepiece'):
    raise DataError(f'data.tokenizer={kind!r} is not valid; use char, byte or sentencepiece.')
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
    return load_tokenizer(directory)

  if kind == 'byte':
    tokenizer: Tokenizer = ByteTokenizer()
  else:
    source = source or get_source(config, workdir)
    texts = training_texts(source, str(config.data.train_split))
    if kind == 'char':
      tokenizer = CharTokenizer.build(texts)
    else:
      tokenizer = SentencePieceTokenizer.train(texts, int(config.data.vocab_size), str(config.data.spm_model_type))
  tokenizer.save(directory)
  meta = {'kind': kind, 'vocab_size': tokenizer.vocab_size, 'source': str(config.data.source),
          'train_split': str(config.data.train_split), 'requested_vocab_size': int(config.data.vocab_size),
          'spm_model_type': str(config.data.spm_model_type)}
  _atomic_write(meta_path, json.dumps(meta, indent=1).encode())
  logging.info('Built %s tokenizer (vocab_size %d) in %s', kind, tokenizer.vocab_size, directory)
  return tokenizer
