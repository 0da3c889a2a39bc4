"""Passkey retrieval (Mohtashami & Jaggi 2023, "Landmark Attention"; used by position interpolation, YaRN, LongLoRA):
a number hidden at some depth of long repetitive filler, asked for at the end.

  There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. I will quiz you about
  the important information there. The grass is green. The sky is blue. ... The pass key is 71432. Remember it.
  71432 is the pass key. The grass is green. ... What is the pass key? The pass key is

`make_prompt` builds one prompt of an exact length (in tokens of any counting function: characters for the char
tokenizer, a tokenizer's ids otherwise) with the needle at a given depth; `answer_of` / `is_correct` score a
greedy completion as the literature does (the first run of digits equals the key). `make_source` is the
`builtin:passkey` training source: SYNTHETIC text documents, prompt + ' <key>.', prompt lengths uniform up to the
row length (data.seq_len), depths uniform, keys uniform 5-digit numbers, each example a pure function of its split
and index (random access, reproducible, nothing held in memory).

Every DRILL_EVERY-th training document is a copy drill instead (`copy_drill`: a random string repeated), as a
curriculum: retrieval needs induction (find the earlier "pass key is", copy what follows), and a prompt gives a
handful of copied characters among hundreds of filler ones a small model predicts without looking back, so from
scratch the copy never forms (a 2 x 128 decoder: the answer digits still at chance after 1,600 steps); in a drill
every character after the first run is copied from a few dozen positions back, and the induction forms in a few
hundred steps (benchmarks/RESULTS.md, "Long context"). Validation and test splits are prompts only.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Sequence

import numpy as np

from jaxformer.data.sources.base import Source, Split
from jaxformer.errors import DataError

INTRO = ('There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. '
         'I will quiz you about the important information there.')
FILLER = 'The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.'
QUESTION = 'What is the pass key? The pass key is'
SPLITS = {'train': 20000, 'validation': 500, 'test': 500}
SEED = 20261206
MIN_FILLER_CHARS = 16  # builtin:passkey's shortest filler: the needle's distance to the question varies from here up
KEY_DIGITS = 5

Count = Callable[[str], int]


def needle(key: str) -> str:
  return f'The pass key is {key}. Remember it. {key} is the pass key.'


def answer(key: str) -> str:
  """The response a prompt is trained to continue with (and the completion scored as right)."""
  return f' {key}.'


@dataclasses.dataclass(frozen=True)
class PasskeyPrompt:
  """One prompt: its text, the key, the depth asked for and where the needle really starts (character offset)."""
  text: str
  key: str
  depth: float
  needle_start: int


def _filler(num_chars: int) -> str:
  """The first num_chars characters of FILLER repeated with single spaces (the last sentence may be cut)."""
  unit = FILLER + ' '
  return (unit * (num_chars // len(unit) + 1))[:num_chars]


def _compose(filler_chars: int, depth: float, key: str) -> PasskeyPrompt:
  """INTRO, filler_chars of filler with the needle at the sentence boundary nearest depth * filler_chars, QUESTION."""
  garbage = _filler(filler_chars)
  bounds = [0] + [m.end() for m in re.finditer(r'\. ', garbage)] + [len(garbage)]
  cut = min(bounds, key=lambda b: (abs(b - depth * len(garbage)), b))
  before, after = garbage[:cut].rstrip(' '), garbage[cut:].rstrip(' ')
  head = ' '.join(p for p in (INTRO, before) if p) + ' '
  text = head + needle(key) + ' ' + ' '.join(p for p in (after, QUESTION) if p)
  return PasskeyPrompt(text, key, float(depth), len(head))


def make_prompt(length: int, depth: float, key: str, count: Count = len) -> PasskeyPrompt:
  """The longest prompt with count(text) <= length (count: characters by default; a tokenizer's id count for
  subword models) whose needle sits at `depth` (0 = right after the intro, 1 = right before the question) of the
  filler. Raises DataError when even no filler is too long."""
  if not 0.0 <= depth <= 1.0:
    raise DataError(f'passkey depth must be in [0, 1], got {depth}.')
  if count(_compose(0, depth, key).text) > length:
    raise DataError(f'a passkey prompt needs more than {length} tokens even without filler '
                    f'({count(_compose(0, depth, key).text)}); ask for a longer length.')
  lo, hi = 0, max(1, length)  # filler characters, bisected (count grows with them, by at most a few per character)
  while count(_compose(hi, depth, key).text) <= length:
    lo, hi = hi, hi * 2
  while hi - lo > 1:  # invariant: count(lo) <= length < count(hi)
    mid = (lo + hi) // 2
    if count(_compose(mid, depth, key).text) <= length:
      lo = mid
    else:
      hi = mid
  return _compose(lo, depth, key)


def random_key(rng: np.random.Generator, digits: int = KEY_DIGITS) -> str:
  return str(int(rng.integers(10 ** (digits - 1), 10 ** digits)))


def eval_prompts(length: int, num_prompts: int, seed: int, count: Count = len) -> list[PasskeyPrompt]:
  """num_prompts prompts of `length`: depths evenly spread over (0, 1) ((i + 0.5) / n), keys drawn from `seed`
  (the same keys and depths for every length and setting with one seed)."""
  rng = np.random.default_rng([SEED, int(seed)])
  keys = [random_key(rng) for _ in range(num_prompts)]
  return [make_prompt(length, (i + 0.5) / num_prompts, key, count) for i, key in enumerate(keys)]


def answer_of(completion: str) -> str:
  """The number a completion answers with: its first run of digits ('' when it has none)."""
  found = re.search(r'\d+', completion)
  return found.group() if found else ''


def is_correct(completion: str, key: str) -> bool:
  return answer_of(completion) == key


def accuracy(completions: Sequence[str], keys: Sequence[str]) -> float:
  """The share of completions whose first number is their key."""
  if len(completions) != len(keys) or not keys:
    raise ValueError(f'{len(completions)} completions for {len(keys)} keys')
  return sum(is_correct(c, k) for c, k in zip(completions, keys)) / len(keys)


# ----------------------------------------------------------------------------------- builtin:passkey (training)
DRILL_EVERY = 2  # every DRILL_EVERY-th training document is a copy drill
DRILL_ALPHABET = 'abcdefghiklmnoprstuvwy0123456789'  # characters of the prompts: no new vocabulary
WARMUP_PROMPT_EVERY = 10  # builtin:passkey_drills: every 10th document a prompt (its characters in the vocabulary)
WARMUP_PROMPT_CHARS = 503  # builtin:passkey_drills' prompts: as long as :passkey's at data.seq_len=512


def copy_drill(rng: np.random.Generator, max_chars: int, sizes: tuple[int, int] = (8, 48),
               max_repeats: int = 6) -> str:
  """A random string of sizes[0] to sizes[1] - 1 characters repeated 2 to max_repeats times (space-separated,
  within max_chars): every character after the first run is predictable only by looking back and copying."""
  size = int(rng.integers(*sizes))
  unit = ''.join(rng.choice(list(DRILL_ALPHABET), size))
  repeats = max(2, min(max_repeats, (max_chars + 1) // (size + 1)))
  return ' '.join([unit] * repeats)


def _prompt_document(rng: np.random.Generator, max_chars: int) -> str:
  """A training prompt + its answer: length uniform from the shortest prompt up to max_chars, depth uniform."""
  key = random_key(rng)
  shortest = len(_compose(MIN_FILLER_CHARS, 0.0, key).text)
  length = int(rng.integers(shortest, max(shortest, max_chars) + 1))
  return make_prompt(length, float(rng.random()), key).text + answer(key)


class PasskeySplit(Split):
  """SYNTHETIC: prompt + answer documents; example i is drawn from the seed [SEED, split, i]."""

  def __init__(self, name: str, index: int, size: int, max_chars: int):
    self.name, self._index, self._size, self._max_chars = name, index, size, max_chars

  def __len__(self) -> int:
    return self._size

  def example(self, i: int) -> str:
    rng = np.random.default_rng([SEED, self._index, int(i)])
    if self.name == 'train' and i % DRILL_EVERY == DRILL_EVERY - 1:
      return copy_drill(rng, self._max_chars)
    return _prompt_document(rng, self._max_chars)

  def read(self, indices: Sequence[int]) -> list[str]:
    return [self.example(int(i)) for i in indices]


def prompt_chars(seq_len: int) -> int:
  """The longest prompt of a builtin:passkey row of seq_len characters: BOS + prompt + answer + EOS."""
  return int(seq_len) - len(answer('0' * KEY_DIGITS)) - 2


def split_of(name: str, seq_len: int) -> PasskeySplit:
  """builtin:passkey's split `name` for rows of seq_len characters."""
  return PasskeySplit(name, list(SPLITS).index(name), SPLITS[name], prompt_chars(seq_len))


def make_source(spec: str, config: Any) -> Source:
  """builtin:passkey: prompts up to data.seq_len characters with their answer and the framing (BOS, EOS)."""
  max_chars = prompt_chars(config.data.seq_len)
  shortest = len(_compose(MIN_FILLER_CHARS, 0.0, '0' * KEY_DIGITS).text)
  if max_chars < shortest:
    raise DataError(f'data.source={spec}: data.seq_len={config.data.seq_len} is too short for a passkey prompt; '
                    f'use at least {shortest + len(answer("0" * KEY_DIGITS)) + 2}.')
  splits = {name: (lambda name=name: split_of(name, config.data.seq_len)) for name in SPLITS}
  return Source(spec, 'text', splits,
                description=f'SYNTHETIC passkey retrieval, prompts up to {max_chars} characters (builtin:passkey)')


# ------------------------------------------------------------------------------ builtin:passkey_drills (warm-up)
class WarmupSplit(PasskeySplit):
  """SYNTHETIC: short copy drills (6-23 characters, 4 times), every WARMUP_PROMPT_EVERY-th document a prompt."""

  def example(self, i: int) -> str:
    rng = np.random.default_rng([SEED, len(SPLITS) + self._index, int(i)])
    if i % WARMUP_PROMPT_EVERY == WARMUP_PROMPT_EVERY - 1:
      return _prompt_document(rng, self._max_chars)
    return copy_drill(rng, self._max_chars, sizes=(6, 24), max_repeats=4)


def make_warmup_source(spec: str, config: Any) -> Source:
  """builtin:passkey_drills: the induction warm-up before builtin:passkey (configs/long_context.py:passkey_warmup),
  for packed short rows (data.pack=True, data.sampling=random_windows): dense copying forms the look-back-and-copy
  heads in a few hundred steps at any data.seq_len; the prompts among the drills put every character of
  builtin:passkey in the char vocabulary the passkey run inherits (checkpoint.init_from)."""
  del config  # any row length: the documents do not depend on it
  splits = {name: (lambda name=name, k=k, n=n: WarmupSplit(name, k, n, WARMUP_PROMPT_CHARS))
            for k, (name, n) in enumerate(SPLITS.items())}
  return Source(spec, 'text', splits, description='SYNTHETIC copy drills with passkey prompts among them '
                '(builtin:passkey_drills, the warm-up of builtin:passkey)')
