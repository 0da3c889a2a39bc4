"""Reward functions for the addition task of benchmarks/preferences (pure Python, no jaxformer import).

A reward function is named on the command line as `module:function`, e.g.
  --config.align.reward_fn=benchmarks.preferences.rewards:exact_match
and called once per batch of generations as

  fn(prompts: list[str], completions: list[str], **rows) -> list[float]   (one reward per completion)

where `rows` holds every other field of the prompt rows (prompts_{split}.jsonl: `answer`) as a list aligned with
`prompts`. Extra fields a function does not use land in **rows, so one prompt file serves every reward here.
A completion is the generated text after the prompt, without the EOS; it is read up to its first newline and
stripped of surrounding whitespace (answer() below) before it is compared.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def answer(completion: str) -> str:
  """The part of a completion that is read as the answer: up to the first newline, stripped."""
  return completion.split('\n', 1)[0].strip()


def _number(text: str) -> int | None:
  text = answer(text)
  return int(text) if text.isascii() and text.isdigit() else None


def exact_match(prompts: Sequence[str], completions: Sequence[str], answer: Sequence[Any],
                **rows: Sequence[Any]) -> list[float]:
  """1.0 where the completion's answer equals the row's `answer` (as a string, stripped), else 0.0."""
  del rows
  _check(prompts, completions, answer)
  return [1.0 if _answer(c) == str(a).strip() else 0.0 for c, a in zip(completions, answer)]


def numeric_closeness(prompts: Sequence[str], completions: Sequence[str], answer: Sequence[Any],
                      **rows: Sequence[Any]) -> list[float]:
  """A graded reward: 1 - min(1, |prediction - answer| / 10) for a completion that is a non-negative integer
  (1.0 exact, 0.9 off by one, 0.0 off by 10 or more), 0.0 for one that is not a number."""
  del rows
  _check(prompts, completions, answer)
  out = []
  for c, a in zip(completions, answer):
    pred = _number(c)
    out.append(0.0 if pred is None else 1.0 - min(1.0, abs(pred - int(str(a).strip())) / 10.0))
  return out


_answer = answer  # the parameter `answer` of the reward functions shadows the function inside them


def _check(prompts: Sequence[str], completions: Sequence[str], answers: Sequence[Any]) -> None:
  if not len(prompts) == len(completions) == len(answers):
    raise ValueError(f'reward: {len(prompts)} prompts, {len(completions)} completions and {len(answers)} answers; '
                     'they must be aligned (one each per row).')
