"""Built-in SYNTHETIC data, generated in-process (nothing is downloaded).

  builtin:lm        a seeded random word bigram language (see `SyntheticLanguage`); its exact entropy per document
                    is known (`builtin_lm_entropy`), so a model's loss can be compared with the best achievable one.
  builtin:numbers   numbers to English words ('3207' -> 'three thousand two hundred seven'), a deterministic
                    transduction (translation) task.
  builtin:passkey   passkey retrieval prompts (a number hidden in filler, asked for at the end) up to data.seq_len
                    characters, with their answers, and copy drills (sources/passkey.py).
  builtin:passkey_drills  short copy drills with passkey prompts among them: builtin:passkey's warm-up.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Iterable, Sequence

import numpy as np

from jaxformer.errors import DataError
from jaxformer.data.sources import passkey
from jaxformer.data.sources.base import Example, ListSplit, Source, Split


def _lm_source(spec: str, config: Any) -> Source:
  lang = synthetic_language()
  return Source(spec, 'text', {s: functools.partial(ListSplit, s, lang.split(s)) for s in lang.SPLITS},
                description='SYNTHETIC random word-bigram language (builtin:lm)')


def _numbers_source(spec: str, config: Any) -> Source:
  return Source(spec, 'pairs', {s: functools.partial(NumbersSplit, s) for s in NUMBER_SPLITS},
                description='SYNTHETIC numbers -> English words (builtin:numbers)')


# builtin:<name> -> (spec, config) -> Source; adding a built-in dataset is one function and one line here
DATASETS: dict[str, Any] = {'lm': _lm_source, 'numbers': _numbers_source, 'passkey': passkey.make_source,
                            'passkey_drills': passkey.make_warmup_source}


def make_source(spec: str, name: str, config: Any, data_dir: str) -> Source:
  """builtin:<one of DATASETS>; data_dir is not needed (the data is generated in-process)."""
  del data_dir
  if name not in DATASETS:
    raise DataError(f'data.source={spec!r}: unknown built-in dataset {name!r}; use '
                    + ', '.join(f'builtin:{n}' for n in DATASETS) + '.')
  return DATASETS[name](spec, config)


class SyntheticLanguage:
  """SYNTHETIC data. A seeded random word-level bigram language with exactly computable entropy.

  64 made-up words (consonant-vowel syllables). A document has L ~ Uniform{12..24} words (independent of the
  words); the first word is drawn from a Dirichlet-random initial distribution and each next word from one of 6
  random successors of the previous word (Dirichlet-random probabilities). Words are joined by single spaces, so
  the text determines the word sequence and the entropy of a document is H(L) + H(first) + sum of the expected
  transition entropies, computed exactly by propagating the word distribution. Splits are generated from separate
  random streams; validation/test documents that also occur in an earlier split are dropped, so splits never
  overlap. The language itself is fixed (its own seed), config.seed only changes the reading order.
  """

  SEED = 20240601
  NUM_WORDS = 64
  SUCCESSORS = 6
  MIN_WORDS, MAX_WORDS = 12, 24
  SPLITS = {'train': 20000, 'validation': 1000, 'test': 1000}

  def __init__(self):
    rng = np.random.default_rng(self.SEED)
    consonants, vowels = list('bdfgklmnprstvz'), list('aeiou')
    words: list[str] = []
    while len(words) < self.NUM_WORDS:
      n = int(rng.integers(1, 4))
      w = ''.join(consonants[rng.integers(len(consonants))] + vowels[rng.integers(len(vowels))] for _ in range(n))
      if w not in words:
        words.append(w)
    self.words = words
    w = self.NUM_WORDS
    self.initial = rng.dirichlet(np.ones(w))
    self.transition = np.zeros((w, w))
    for i in range(w):
      succ = rng.choice(w, size=self.SUCCESSORS, replace=False)
      self.transition[i, succ] = rng.dirichlet(np.ones(self.SUCCESSORS))
    self._splits: dict[str, list[str]] = {}

  def _generate(self, rng: np.random.Generator, n: int) -> list[str]:
    lengths = rng.integers(self.MIN_WORDS, self.MAX_WORDS + 1, size=n)
    ids = np.zeros((n, self.MAX_WORDS), np.int64)
    ids[:, 0] = rng.choice(self.NUM_WORDS, size=n, p=self.initial)
    cum = np.cumsum(self.transition, axis=1)
    cum[:, -1] = 1.0
    for t in range(1, self.MAX_WORDS):
      u = rng.random(n)
      ids[:, t] = (u[:, None] > cum[ids[:, t - 1]]).sum(axis=1)
    words = self.words
    return [' '.join(words[j] for j in row[:length]) for row, length in zip(ids, lengths)]

  def split(self, name: str) -> list[str]:
    if not self._splits:
      seen: set[str] = set()
      for k, (split, size) in enumerate(self.SPLITS.items()):
        docs = self._generate(np.random.default_rng([self.SEED, k + 1]), size)
        if split != 'train':
          docs = [d for d in docs if d not in seen]
        seen.update(docs)
        self._splits[split] = docs
    return self._splits[name]

  def entropy(self) -> dict[str, float]:
    """Exact entropy (nats) per document, and expected characters / words per document."""
    p = self.initial
    def h(q):
      q = q[q > 0]
      return float(-(q * np.log(q)).sum())
    row_h = np.array([h(r) for r in self.transition])
    lengths = np.arange(self.MIN_WORDS, self.MAX_WORDS + 1)
    h_doc = math.log(len(lengths)) + h(p)
    word_len = np.array([len(w) for w in self.words], np.float64)
    chars = float(p @ word_len)
    for t in range(1, self.MAX_WORDS):
      p_continue = float((lengths > t).mean())  # P(L > t): the document has a word at index t
      h_doc += p_continue * float(p @ row_h)
      p = p @ self.transition
      chars += p_continue * float(p @ word_len)
    mean_words = float(lengths.mean())
    chars += mean_words - 1  # spaces
    return {'nats_per_document': h_doc, 'chars_per_document': chars, 'words_per_document': mean_words,
            'nats_per_char_token': h_doc / (chars + 1)}  # +1: the EOS a decoder_only model also predicts


@functools.cache
def synthetic_language() -> SyntheticLanguage:
  return SyntheticLanguage()


def builtin_lm_entropy(tokenizer: Any = None, split: str = 'validation') -> float:
  """Best achievable decoder_only loss (nats per target token) on builtin:lm with unpacked documents.

  Per document the model predicts its tokens plus EOS, so this is H(document) / E[tokens + 1]. With a char
  tokenizer E[tokens] is the exact expected character count; otherwise it is measured on `split`.
  """
  lang = synthetic_language()
  info = lang.entropy()
  if tokenizer is None or getattr(tokenizer, 'kind', '') in ('char', 'byte'):
    return info['nats_per_char_token']
  docs = lang.split(split)
  mean_tokens = float(np.mean([len(tokenizer.encode(d)) for d in docs]))
  return info['nats_per_document'] / (mean_tokens + 1)


_ONES = ('zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen '
         'seventeen eighteen nineteen').split()
_TENS = ('', '', 'twenty', 'thirty', 'forty', 'fifty', 'sixty', 'seventy', 'eighty', 'ninety')
NUMBER_SPLITS = {'train': 50000, 'validation': 1000, 'test': 1000}
_NUMBERS_SEED = 20240602


def number_to_words(n: int) -> str:
  """English words for 0 <= n < 10**9, without 'and' or hyphens: 3207 -> 'three thousand two hundred seven'."""
  if n < 0 or n >= 10**9:
    raise ValueError(f'number_to_words supports 0 <= n < 10**9, got {n}')
  if n < 20:
    return _ONES[n]
  if n < 100:
    return _TENS[n // 10] + ('' if n % 10 == 0 else ' ' + _ONES[n % 10])
  for size, word in ((10**6, 'million'), (1000, 'thousand'), (100, 'hundred')):
    if n >= size:
      rest = n % size
      return number_to_words(n // size) + ' ' + word + ('' if rest == 0 else ' ' + number_to_words(rest))
  raise AssertionError(n)


def _characters(values: Iterable[int]) -> set[str]:
  """The characters of the (digits, words) pairs of `values`."""
  return set().union(*(str(v) + number_to_words(v) for v in map(int, values)))


@functools.cache
def _numbers() -> dict[str, np.ndarray]:
  """SYNTHETIC: distinct numbers below 10**6, digit counts 1..6 roughly equally likely; test, validation, train.

  A validation/test number whose pair has a character the training pairs lack (only 0: the 'z' of 'zero') is
  replaced by the next unused number, so a char vocabulary built on training covers every split; the training
  split is the plain draw.
  """
  rng = np.random.default_rng(_NUMBERS_SEED)
  total = sum(NUMBER_SPLITS.values())
  digits = rng.integers(1, 7, size=4 * total)
  low = np.where(digits == 1, 0, 10 ** (digits - 1))
  values = low + (rng.random(4 * total) * (10**digits - low)).astype(np.int64)
  _, first = np.unique(values, return_index=True)
  values = values[np.sort(first)]
  out, start = {}, 0
  for split in ('test', 'validation', 'train'):
    out[split] = values[start:start + NUMBER_SPLITS[split]].copy()
    start += NUMBER_SPLITS[split]
  train_chars = _characters(out['train'])
  spare = iter(values[total:])
  for split in ('test', 'validation'):
    for i, value in enumerate(out[split]):
      while not _characters([value]) <= train_chars:
        value = next(spare)
      out[split][i] = value
  return out


class NumbersSplit(Split):
  """SYNTHETIC: (digits, English words) pairs of one split of `_numbers()`."""

  def __init__(self, name: str):
    self.name = name
    self._values = _numbers()[name]

  def __len__(self) -> int:
    return len(self._values)

  def read(self, indices: Sequence[int]) -> list[Example]:
    return [(str(int(v)), number_to_words(int(v))) for v in self._values[np.asarray(indices, np.int64)]]

