"""Rewards of texts: a trained reward model (a model.head=reward workdir: what eval.py --mode=reward, best-of-N
decoding (decode.reward_model) and the online align methods (align.reward_model) share) and the Python reward
functions of the online methods (align.reward_fn = module:function).

The reward model is restored by the eval app (evaluate.restore_reward_model: its own saved config and tokenizer,
the caller's mesh), so it may use another tokenizer than the policy: it scores TEXT, prompt + response framed as it
was trained (data.response_rows: BOS + prompt + response + EOS for jaxformer's tokenizers), its first data.seq_len
tokens.
"""
from __future__ import annotations

import functools
import importlib
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from jaxformer import data as data_lib
from jaxformer import sharding as shd
from jaxformer.errors import ConfigError, UserError
from jaxformer.training import step as step_lib


@functools.lru_cache(maxsize=4)
def _jitted_rewards(graphdef: Any):
  def rewards(params, rest, rows):
    return step_lib.merge_model(graphdef, params, rest)(**rows, deterministic=True)
  return jax.jit(rewards)


class RewardModel:
  """A restored model.head=reward run (evaluate.restore_reward_model); `score(prompts, responses)` -> one float32
  reward per pair of texts."""

  def __init__(self, restored: Any, batch_size: int = 32):
    self.restored = restored
    self.workdir, self.batch_size = restored.resolved.workdir, max(1, int(batch_size))
    self.graphdef, self.params, self.rest = step_lib.split_model(restored.model)

  def score(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
    """float32 [N]: the reward of each prompt + response (texts), in batches of `batch_size` rows."""
    r = self.restored
    rows = data_lib.response_rows(r.tokenizer, prompts, responses, int(r.config.data.seq_len))
    rows.pop('targets')
    fn = _jitted_rewards(self.graphdef)
    out = shd.map_batches(lambda batch: fn(self.params, self.rest, batch), rows, self.batch_size, r.mesh, r.rules)
    return np.zeros((0,), np.float32) if out is None else out.astype(np.float32)


class RewardFunctionError(UserError, ValueError):
  """align.reward_fn raised, or returned something that is not one number per completion."""


def load_reward_fn(spec: str) -> Callable[..., Sequence[float]]:
  """align.reward_fn = 'module:function' (importable from the working directory) -> the function."""
  module_name, _, name = spec.partition(':')
  if not module_name or not name:
    raise ConfigError(f'align.reward_fn={spec!r} must be module:function, e.g. '
                      'benchmarks.preferences.rewards:exact_match.')
  if os.getcwd() not in sys.path:
    sys.path.insert(0, os.getcwd())
  try:
    module = importlib.import_module(module_name)
  except Exception as e:  # noqa: BLE001 (any import failure is the user's module)
    raise ConfigError(f'align.reward_fn={spec}: cannot import {module_name} ({type(e).__name__}: {e}); check the '
                      'module path (relative to the working directory).') from None
  fn = getattr(module, name, None)
  if not callable(fn):
    raise ConfigError(f'align.reward_fn={spec}: {module_name} has no function {name!r}.')
  return fn


class Rewards:
  """The online methods' reward: align.reward_fn(prompts, completions, **fields) and/or the reward model
  (align.reward_model) scores, summed when both are set."""

  def __init__(self, reward_fn: str, model: RewardModel | None):
    self.fn_spec = str(reward_fn)
    self.fn = load_reward_fn(self.fn_spec) if self.fn_spec else None
    self.model = model

  def __call__(self, prompts: Sequence[str], completions: Sequence[str],
               fields: Sequence[Mapping[str, Any]]) -> np.ndarray:
    total = np.zeros((len(prompts),), np.float64)
    if self.fn is not None:
      total += self._call_fn(prompts, completions, fields)
    if self.model is not None:
      total += self.model.score(prompts, completions)
    return total.astype(np.float32)

  def _call_fn(self, prompts, completions, fields) -> np.ndarray:
    keys = sorted({k for f in fields for k in f})
    columns = {k: [f.get(k) for f in fields] for k in keys}
    try:
      out = self.fn(list(prompts), list(completions), **columns)
    except Exception as e:  # noqa: BLE001 (the user's function)
      raise RewardFunctionError(f'align.reward_fn={self.fn_spec} raised {type(e).__name__}: {e} (called with '
                                f'{len(prompts)} completions; first prompt {prompts[0]!r}); fix the function.'
                                ) from None
    try:
      values = list(out)
    except TypeError:
      raise RewardFunctionError(f'align.reward_fn={self.fn_spec} returned {type(out).__name__}, not a list of '
                                f'{len(prompts)} numbers (one per completion).') from None
    if len(values) != len(prompts):
      raise RewardFunctionError(f'align.reward_fn={self.fn_spec} returned {len(values)} values for {len(prompts)} '
                                'completions; return one number per completion.')
    for i, v in enumerate(values):
      if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)) or not math.isfinite(v):
        raise RewardFunctionError(f'align.reward_fn={self.fn_spec} returned {v!r} for row {i} (prompt {prompts[i]!r}, '
                                  f'completion {completions[i]!r}); each reward must be a finite number.')
    return np.asarray(values, np.float64)
