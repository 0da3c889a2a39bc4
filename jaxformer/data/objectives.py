"""How an encoder_decoder model reads a TEXT example: OBJECTIVES (data.objective) turn its tokens into a
(source, target) pair. Pair examples (translation, instructions) are used as they are.

  split_middle     source / target = the words before / after the middle word (the default; deterministic)
  prefix_lm        the example split at a uniformly random token: the tokens before -> source, after -> target
  span_corruption  T5's denoising objective (Raffel et al. 2020; t5.data.preprocessors.span_corruption): random
                   spans (data.noise_density of the tokens, mean length data.mean_noise_span_length) are each
                   replaced by one sentinel in the source; the target lists the sentinels, each followed by the
                   tokens it replaced. Sentinels are tokenizer.sentinel_ids(n): <extra_id_0> = the last id of
                   the vocabulary, <extra_id_1> the one before, ... (data.num_sentinels of them are reserved).

Random objectives draw from the generator the row builder passes per example (seeded from the seed and the
example's position in the training stream), so a resumed run corrupts every example exactly as before and each
epoch corrupts an example afresh. Both fit the budget (src_seq_len - 1 source tokens, seq_len - 1 target tokens):
prefix_lm keeps the tokens nearest the split point, span_corruption corrupts a random window of a long example.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from jaxformer.errors import DataError

Pair = tuple[np.ndarray, np.ndarray]


def split_at_middle_word(text: str) -> tuple[str, str]:
  """A text example as a (source, target) pair: split at the middle word."""
  words = text.split(' ')
  k = max(1, len(words) // 2) if len(words) > 1 else 0
  return ' '.join(words[:k]), ' '.join(words[k:])


class Objective:
  """Turns text examples into (source ids, target ids), both without EOS / BOS and within the budgets."""

  name = ''
  random = True  # whether pair() draws from its generator
  uses_sentinels = False

  def __init__(self, config: Any, tokenizer: Any, src_budget: int, tgt_budget: int):
    self.tokenizer = tokenizer
    self.src_budget, self.tgt_budget = src_budget, tgt_budget

  def tokenize(self, texts: Sequence[str]) -> list[Any]:
    """What is cached per example: its token ids (an objective that draws nothing may return the pair itself)."""
    return self.tokenizer.encode_batch(list(texts))

  def pair(self, tokens: Any, rng: np.random.Generator) -> Pair:
    raise NotImplementedError


def _window(tokens: np.ndarray, length: int, rng: np.random.Generator) -> np.ndarray:
  """A uniformly random window of `length` tokens (the whole sequence when it is not longer)."""
  if len(tokens) <= length:
    return tokens
  start = int(rng.integers(0, len(tokens) - length + 1))
  return tokens[start:start + length]


class SplitMiddle(Objective):
  """Deterministic: the words before / after the middle word (tokenized separately)."""

  name = 'split_middle'
  random = False

  def tokenize(self, texts):
    halves = [split_at_middle_word(t) for t in texts]
    return list(zip(self.tokenizer.encode_batch([h[0] for h in halves]),
                    self.tokenizer.encode_batch([h[1] for h in halves])))

  def pair(self, tokens, rng):
    del rng
    return tokens


class PrefixLM(Objective):
  """Split at a uniformly random token (never leaving a side empty when there are two tokens or more): up to
  src_budget tokens before it -> source, up to tgt_budget tokens from it -> target."""

  name = 'prefix_lm'

  def pair(self, tokens, rng):
    n = len(tokens)
    cut = int(rng.integers(1, n)) if n >= 2 else n
    return tokens[max(0, cut - self.src_budget):cut], tokens[cut:cut + self.tgt_budget]


def noise_span_counts(length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
  """(noise tokens, noise spans) of a sequence of `length` tokens, as T5 fixes them: round(length * density)
  noise tokens (at least 1, at most length - 1; length counts as 2 at least) in round(noise / mean span length)
  spans (at least 1; and here at most the noise and non-noise token counts, so every span is non-empty)."""
  length = max(length, 2)
  num_noise = min(max(int(np.round(length * noise_density)), 1), length - 1)
  num_spans = max(int(np.round(num_noise / mean_noise_span_length)), 1)
  return num_noise, min(num_spans, num_noise, length - num_noise)


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
  """Lengths of a uniformly random split of num_items items into num_segments non-empty consecutive segments."""
  cuts = np.sort(rng.choice(num_items - 1, num_segments - 1, replace=False)) + 1 if num_segments > 1 else []
  return np.diff(np.concatenate([[0], cuts, [num_items]])).astype(np.int64)


def random_spans_noise_mask(length: int, noise_density: float, mean_noise_span_length: float,
                            rng: np.random.Generator) -> np.ndarray:
  """T5's noise mask [length] bool: non-noise and noise spans alternate, starting with non-noise (so the sequence
  always ends in noise); with the counts of noise_span_counts, every such mask is equally likely."""
  num_noise, num_spans = noise_span_counts(length, noise_density, mean_noise_span_length)
  noise = _random_segmentation(num_noise, num_spans, rng)
  nonnoise = _random_segmentation(max(length, 2) - num_noise, num_spans, rng)
  spans = np.stack([nonnoise, noise], axis=1).reshape(-1)
  return np.repeat(np.tile([False, True], num_spans), spans)[:length]


def replace_spans_with_sentinels(tokens: np.ndarray, mask: np.ndarray, sentinels: np.ndarray) -> np.ndarray:
  """Each run of masked tokens -> one sentinel (the k-th run gets sentinels[k]); unmasked tokens are kept."""
  first = mask & ~np.concatenate([[False], mask[:-1]])
  out = np.where(first, sentinels[np.maximum(np.cumsum(first) - 1, 0)], tokens)
  return out[~mask | first].astype(np.int32)


class SpanCorruption(Objective):
  """T5 span corruption on a window of `raw_length` tokens: the longest whose corrupted source (+ EOS) fits
  src_seq_len and target (+ BOS / EOS) fits seq_len (t5's random_spans_helper, for our budgets)."""

  name = 'span_corruption'
  uses_sentinels = True

  def __init__(self, config, tokenizer, src_budget, tgt_budget):
    super().__init__(config, tokenizer, src_budget, tgt_budget)
    self.noise_density = float(config.data.noise_density)
    self.mean_span = float(config.data.mean_noise_span_length)
    if not 0 < self.noise_density < 1 or self.mean_span < 1:
      raise DataError(f'data.noise_density={self.noise_density} must be in (0, 1) and data.mean_noise_span_length='
                      f'{self.mean_span} at least 1.')
    self.raw_length = 0
    for length in range(2, src_budget + tgt_budget + 1):
      noise, spans = noise_span_counts(length, self.noise_density, self.mean_span)
      if length - noise + spans > src_budget or noise + spans > tgt_budget:
        break
      self.raw_length = length
    if self.raw_length < 2:
      raise DataError(f'data.src_seq_len={src_budget + 1} / data.seq_len={tgt_budget + 1} leave no room for span '
                      'corruption; raise them.')
    self.sentinels = np.asarray(tokenizer.sentinel_ids(
        noise_span_counts(self.raw_length, self.noise_density, self.mean_span)[1]), np.int32)

  def pair(self, tokens, rng):
    window = _window(tokens, self.raw_length, rng)
    mask = random_spans_noise_mask(len(window), self.noise_density, self.mean_span, rng)
    return (replace_spans_with_sentinels(window, mask, self.sentinels),
            replace_spans_with_sentinels(window, ~mask, self.sentinels))


OBJECTIVES: dict[str, type[Objective]] = {o.name: o for o in (SplitMiddle, PrefixLM, SpanCorruption)}


def objective_name(config: Any) -> str:
  name = str(config.data.objective)
  if name not in OBJECTIVES:
    raise DataError(f'data.objective={name!r} is not valid; use {", ".join(OBJECTIVES)}.')
  if name != 'split_middle' and str(config.model.arch) != 'encoder_decoder':
    raise DataError(f'data.objective={name} makes (source, target) pairs for model.arch=encoder_decoder; '
                    f'model.arch={config.model.arch} reads text as it is (leave data.objective=split_middle).')
  return name


def sentinels_needed(config: Any) -> int:
  """How many sentinel ids the tokenizer must reserve for this config (0 unless the objective uses them)."""
  return int(config.data.num_sentinels) if OBJECTIVES[objective_name(config)].uses_sentinels else 0
