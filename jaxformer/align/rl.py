"""The online methods' pieces (align.method=grpo / rloo / ppo; the loop is jaxformer/apps/align.py).

A rollout: each of align.prompts_per_step prompts gets align.num_generations sampled completions (the KV-cache
sampler, decoding.py); `rollout_rows` frames prompt + completion as next-token rows whose scored targets are the
completion's tokens (and its EOS when it stopped). Before the update, the loop adds the batch keys the update
reads: `old_logps` (the sampling policy's per-token log-probabilities), `ref_logps` (the frozen reference's) and
`advantages` [N] (losses.group_advantages of the rewards; RLOO / PPO fold the KL penalty into the reward first,
as TRL does).

`PolicyUpdate` (grpo), `RLOOUpdate` and `PPOUpdate` are the update's objective over that batch, in the same sums
form as every objective (the train step, its sharding, micro-batching and PEFT are training's own), each following
its TRL trainer's loss (losses.py says which).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxformer.align import losses, value
from jaxformer.align.pairwise import _scored

def completion_ids(tokens: np.ndarray, eos_id: int) -> list[list[int]]:
  """Each sampled row [M] cut after its first EOS (kept: the model learns to stop) -> token lists."""
  out = []
  for row in np.asarray(tokens).tolist():
    out.append(row[:row.index(eos_id) + 1] if eos_id in row else row)
  return out


def rollout_rows(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], seq_len: int,
                 unscored: int) -> dict[str, np.ndarray]:
  """Rows [N, seq_len] of prompt (BOS + prompt ids) + completion, whose scored targets are the completion's tokens.
  The row holds the whole sequence, its last token too (with no target): the position after the completion is
  where PPO's value of the finished sequence is read (TRL's sequence_lengths_p1). Longer ones keep their start."""
  n = len(prompts)
  rows = {k: np.zeros((n, seq_len), np.int32) for k in ('tokens', 'positions', 'segment_ids')}
  rows['targets'] = np.full((n, seq_len), unscored, np.int32)
  for i, (p, c) in enumerate(zip(prompts, completions)):
    seq = np.asarray(list(p) + list(c), np.int32)
    tokens = seq[:seq_len]
    m = len(tokens)
    targets = np.full(m, unscored, np.int32)
    targets[:len(seq) - 1] = seq[1:m + 1] if len(seq) > m else seq[1:]
    targets[:max(0, len(p) - 1)] = unscored
    rows['tokens'][i, :m], rows['targets'][i, :m] = tokens, targets
    rows['segment_ids'][i, :m], rows['positions'][i, :m] = 1, np.arange(m, dtype=np.int32)
  return rows


def response_columns(mask: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
  """([N, width] row positions of each row's response, from its first scored position on; [N, width] 1.0 where
  that position is inside the row): TRL lays PPO's per-token arrays out from the response's first token."""
  first = np.argmax(mask, axis=1)
  cols = first[:, None] + np.arange(width)[None, :]
  inside = (cols < mask.shape[1]).astype(np.float32)
  return np.minimum(cols, mask.shape[1] - 1), inside


def policy_token_logps(model: Any, rows: dict[str, jax.Array]) -> jax.Array:
  """The model's log-probabilities of the rows' scored targets [N, T] (0 elsewhere): the sampling policy's
  `old_logps` and the reference's `ref_logps` of a rollout."""
  logits = model(rows['tokens'], positions=rows['positions'], segment_ids=rows['segment_ids'], deterministic=True)
  return losses.token_logps(logits, rows['targets']) * (rows['targets'] >= 0)


def entropy(logits: jax.Array) -> jax.Array:
  """Per-position entropy of softmax(logits) [..., T] (float32)."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


class PolicyUpdate:
  """align.method=grpo (TRL GRPOTrainer's default loss, 'dapo'): the token-level clipped surrogate + align.kl_coef
  x the per-token KL estimate to the reference, averaged over every completion token of the batch; logs kl,
  clip_fraction and entropy per completion token."""
  name = 'policy'
  unit = 'completion tokens'
  per_token = True
  needs_reference = False
  has_accuracy = False
  names = {'kl': 'kl_sum', 'clip_fraction': 'clip_sum', 'entropy': 'entropy_sum'}

  def weights(self, batch, unscored):
    return _scored(batch['targets'], unscored)

  def _policy(self, model, batch, unscored, deterministic):
    logits = model(batch['tokens'], positions=batch['positions'], segment_ids=batch['segment_ids'],
                   deterministic=deterministic)
    return logits, losses.token_logps(logits, batch['targets']), _scored(batch['targets'], unscored)

  def sums(self, model, batch, config, unscored, *, deterministic):
    logits, logps, mask = self._policy(model, batch, unscored, deterministic)
    kl_coef = float(config.align.kl_coef)
    loss, m = losses.clipped_policy_loss(logps, batch['old_logps'], batch['ref_logps'], batch['advantages'], mask,
                                         clip_eps=float(config.align.clip_eps), kl_coef=kl_coef)
    n = jnp.sum(mask)
    total = loss * n  # the token-level mean times its count: sums add up across micro-batches
    return total, {'loss_sum': total, 'weight_sum': n, 'correct_sum': jnp.zeros((), jnp.float32),
                   'kl_sum': m['kl'] * n, 'clip_sum': m['clip_fraction'] * n,
                   'entropy_sum': jnp.sum(jax.lax.stop_gradient(entropy(logits)) * mask)}


class RLOOUpdate(PolicyUpdate):
  """align.method=rloo (TRL RLOOTrainer): a sequence-level clipped surrogate, averaged over the completions (the
  KL penalty is in the rewards, losses.rloo_rewards); logs kl (the k3 estimate per completion token, for comparing
  with the other methods), clip_fraction (of completions) and entropy."""
  unit = 'completions'

  def weights(self, batch, unscored):
    return jnp.any(_scored(batch['targets'], unscored) > 0, axis=-1).astype(jnp.float32)

  def sums(self, model, batch, config, unscored, *, deterministic):
    logits, logps, mask = self._policy(model, batch, unscored, deterministic)
    rows = jnp.any(mask > 0, axis=-1).astype(jnp.float32)
    loss, m = losses.rloo_policy_loss(logps, batch['old_logps'], batch['advantages'], mask,
                                      clip_eps=float(config.align.clip_eps))
    n = jnp.sum(rows)
    tokens = jnp.maximum(jnp.sum(mask, axis=-1), 1.0)
    kl = jnp.sum(losses.kl_per_token(jax.lax.stop_gradient(logps), batch['ref_logps']) * mask, axis=-1) / tokens
    ent = jnp.sum(jax.lax.stop_gradient(entropy(logits)) * mask, axis=-1) / tokens
    total = loss * rows.shape[0]  # rloo_policy_loss is the mean over the batch's rows (every row is a completion)
    return total, {'loss_sum': total, 'weight_sum': n, 'correct_sum': jnp.zeros((), jnp.float32),
                   'kl_sum': jnp.sum(kl * rows), 'clip_sum': m['clip_fraction'] * rows.shape[0],
                   'entropy_sum': jnp.sum(ent * rows)}


class PPOUpdate(PolicyUpdate):
  """align.method=ppo (TRL's PPOTrainer, the original RLHF recipe): per-token advantages from GAE over the value
  head's estimates (batch keys `advantages`, `returns`, `old_values`, `value_mask` [N, T]); the clipped surrogate +
  align.value_coef x the clipped value loss (over value_mask: the completion and the position after it)."""
  names = {'kl': 'kl_sum', 'clip_fraction': 'clip_sum', 'entropy': 'entropy_sum', 'value_loss': 'vf_sum',
           'vf_clip_fraction': 'vf_clip_sum'}

  def sums(self, model, batch, config, unscored, *, deterministic):
    logits, values = value.values(model, batch, deterministic=deterministic)
    mask = self.weights(batch, unscored)
    logps = losses.token_logps(logits, batch['targets'])
    a = config.align
    pg, vf, m = losses.ppo_losses(logps, batch['old_logps'], batch['advantages'], values, batch['old_values'],
                                  batch['returns'], mask, clip_eps=float(a.clip_eps), value_clip=float(a.value_clip),
                                  value_mask=batch['value_mask'])
    n = jnp.sum(mask)
    kl = losses.kl_per_token(jax.lax.stop_gradient(logps), batch['ref_logps'])
    total = (pg + float(a.value_coef) * vf) * n
    return total, {'loss_sum': total, 'weight_sum': n, 'correct_sum': jnp.zeros((), jnp.float32),
                   'kl_sum': jnp.sum(kl * mask), 'clip_sum': m['clip_fraction'] * n, 'vf_sum': vf * n,
                   'vf_clip_sum': m['vf_clip_fraction'] * n,
                   'entropy_sum': jnp.sum(jax.lax.stop_gradient(entropy(logits)) * mask)}
