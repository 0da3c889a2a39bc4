"""Prompts for the online align methods (align.method=grpo / rloo / ppo): a shuffled, endless, exactly resumable
sequence of a split's Prompt examples (jsonl: lines with a prompt and any other fields).

Prompt sets are small next to pre-training corpora, so the split is read once into memory; epoch e is the
permutation np.random.default_rng([seed, e]) of it, and the whole position is {'epoch', 'index'} (saved with every
checkpoint as the data state, so a resumed run samples the same prompts it would have without the stop).
"""
from __future__ import annotations

import json
from typing import Any

import numpy as np

from jaxformer.data.sources import ChatPrompt, Prompt, Source
from jaxformer.errors import DataError

FORMAT = 1


def _prompt_of(example: Prompt) -> str | list[dict]:
  """A prompt's text, or its messages (a conversational prompt: the caller renders them with the chat template)."""
  return json.loads(example.prompt) if isinstance(example, ChatPrompt) else example.prompt


class PromptIterator:
  """next(it) -> the next `batch` Prompt examples, each with its fields decoded (prompt, {field: value})."""

  def __init__(self, source: Source, split: str, batch: int, seed: int, *, shuffle: bool = True):
    data = source.split(split)
    self.examples: list[Prompt] = data.read(list(range(len(data))))
    if not self.examples:
      raise DataError(f'split {split!r} of data.source={source.spec!r} holds no prompt.')
    bad = [e for e in self.examples if not isinstance(e, Prompt)]
    if bad:
      raise DataError(f'align.method=grpo/rloo/ppo samples completions of prompts, and data.source={source.spec!r} '
                      f'gives {type(bad[0]).__name__} examples; use a jsonl: file of {{"prompt": ...}} lines.')
    self.batch, self.seed, self.shuffle = int(batch), int(seed), shuffle
    self.epoch, self.index = 0, 0
    self._order = self._permutation(0)

  def _permutation(self, epoch: int) -> np.ndarray:
    n = len(self.examples)
    return np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)

  def __iter__(self):
    return self

  def __next__(self) -> list[tuple[str, dict[str, Any]]]:
    out = []
    while len(out) < self.batch:
      if self.index >= len(self._order):
        self.epoch, self.index = self.epoch + 1, 0
        self._order = self._permutation(self.epoch)
      example = self.examples[int(self._order[self.index])]
      out.append((_prompt_of(example), json.loads(example.fields)))
      self.index += 1
    return out

  def all(self) -> list[tuple[str, dict[str, Any]]]:
    """Every prompt of the split, in file order (evaluation)."""
    return [(_prompt_of(e), json.loads(e.fields)) for e in self.examples]

  def get_state(self) -> dict[str, Any]:
    return {'format': FORMAT, 'kind': 'prompts', 'seed': self.seed, 'batch': self.batch,
            'num_examples': len(self.examples), 'epoch': self.epoch, 'index': self.index}

  def set_state(self, state: dict[str, Any]) -> None:
    if state.get('kind') != 'prompts':
      raise DataError('the checkpoint\'s data position is not a prompt position (the run was not an online align run); '
                      'start a new workdir.')
    now = self.get_state()
    for key in ('seed', 'batch', 'num_examples'):
      if int(state[key]) != now[key]:
        raise DataError(f'the checkpoint\'s prompt position was saved with another {key} ({state[key]}); resume with '
                        'the same seed, align.prompts_per_step and prompt file, or start a new workdir.')
    self.epoch, self.index = int(state['epoch']), int(state['index'])
    self._order = self._permutation(self.epoch)
