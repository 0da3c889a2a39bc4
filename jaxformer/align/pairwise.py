"""Objectives over preference pairs: a batch holds `chosen_*` and `rejected_*` rows (data.rows.PreferenceTask: the
same prompt, then the better / the worse response) and the model scores both sides in turn (two forward passes,
so each side keeps the batch's sharding).

  BradleyTerry   model.head=reward: -log sigmoid(r_chosen - r_rejected [- margin]) (+ reward centring)
  DPO            align.method=dpo: the policy's and the frozen reference's summed response log-probabilities
  SimPO          align.method=simpo: reference-free, length-normalised

Every objective returns float32 sums over the batch's real pairs (a pair counts when both sides have a scored
token: padding rows of an evaluation batch do not), so micro-batches, hosts and evaluation batches aggregate
exactly; `names` maps what a metrics row shows to the sum it divides by the number of pairs.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from jaxformer.align import losses

Batch = Mapping[str, jax.Array]
SIDES = ('chosen', 'rejected')
REFERENCE_KEYS = ('ref_chosen_logps', 'ref_rejected_logps')  # batch keys of the reference's log-probabilities


def side(batch: Batch, name: str) -> dict[str, jax.Array]:
  """One side's rows ('chosen' or 'rejected') under the model's argument names (and its `targets`)."""
  prefix = name + '_'
  return {k[len(prefix):]: v for k, v in batch.items() if k.startswith(prefix)}


def _call(model: Any, rows: Mapping[str, jax.Array], deterministic: bool) -> jax.Array:
  return model(**{k: v for k, v in rows.items() if k != 'targets'}, deterministic=deterministic)


def _scored(targets: jax.Array, unscored: int) -> jax.Array:
  return ((targets >= 0) & (targets != unscored)).astype(jnp.float32)


def response_logps(model: Any, batch: Batch, unscored: int, *, deterministic: bool) -> dict[str, jax.Array]:
  """Summed log-probabilities of each side's scored (response) tokens and their counts: {chosen_logps,
  chosen_tokens, rejected_logps, rejected_tokens}, each [B]."""
  out = {}
  for name in SIDES:
    rows = side(batch, name)
    logps, count = losses.sequence_logps(_call(model, rows, deterministic), rows['targets'],
                                         _scored(rows['targets'], unscored))
    out[f'{name}_logps'], out[f'{name}_tokens'] = logps, count
  return out


class PairObjective:
  """What the train step and the Evaluator ask of an objective over pairs."""
  name = ''
  unit = 'pairs'
  per_token = True  # rows are next-token rows with scored response targets (else whole framed sequences)
  needs_reference = False
  has_accuracy = True  # correct_sum counts pairs ranked right
  # metrics-row name -> the sum it divides by the number of pairs ('loss' and the pair count are always there)
  names: dict[str, str] = {}

  def flops_factor(self, config: Any) -> float:
    """A step's training FLOPs over one forward + backward of batch_size rows: both sides of each pair, plus the
    reference's two forward passes (a third of forward + backward each) when computed per step."""
    per_step_reference = self.needs_reference and not config.align.precompute_reference
    return 2.0 + (2.0 / 3.0 if per_step_reference else 0.0)

  def weights(self, batch: Batch, unscored: int) -> jax.Array:
    """1.0 for a real pair (both sides have a scored token), else 0.0 [B]."""
    return (jnp.any(_scored(side(batch, 'chosen')['targets'], unscored) > 0, axis=-1)
            & jnp.any(_scored(side(batch, 'rejected')['targets'], unscored) > 0, axis=-1)).astype(jnp.float32)

  def sums(self, model: Any, batch: Batch, config: Any, unscored: int, *,
           deterministic: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(objective sum over real pairs, metric sums: loss_sum, weight_sum (pairs), correct_sum and `names`' sums)."""
    raise NotImplementedError

  def _metrics(self, losses_: jax.Array, w: jax.Array, chosen: jax.Array, rejected: jax.Array,
               **extra: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    total = jnp.sum(losses_ * w)
    metrics = {'loss_sum': total, 'weight_sum': jnp.sum(w), 'correct_sum': jnp.sum((chosen > rejected) * w),
               'margin_sum': jnp.sum((chosen - rejected) * w), 'chosen_reward_sum': jnp.sum(chosen * w),
               'rejected_reward_sum': jnp.sum(rejected * w)}
    metrics.update({f'{k}_sum': jnp.sum(v * w) for k, v in extra.items()})
    return total, metrics

  def row(self, sums: Mapping[str, float]) -> dict[str, float]:
    """The per-pair means of a metrics row (without prefix): loss, then `names`."""
    n = max(float(sums['weight_sum']), 1e-9)
    return {'loss': float(sums['loss_sum']) / n, **{k: float(sums[s]) / n for k, s in self.names.items()}}

  def eval_row(self, acc: Any) -> dict[str, float]:
    return {f'eval_{k}': v for k, v in self.row(acc.sums()).items()} | {'eval_pairs': float(acc.weight_sum)}

  def results(self, acc: Any, arch: str) -> dict[str, Any]:
    del arch
    return {'num_pairs': int(round(acc.weight_sum)), **self.row(acc.sums())}


class BradleyTerry(PairObjective):
  """A reward model's loss on pairs (TRL RewardTrainer): -log sigmoid(r_c - r_r - margin) + c (r_c + r_r)^2."""
  name = 'bradley_terry'
  per_token = False
  names = {'accuracy': 'correct_sum', 'margin': 'margin_sum', 'rewards_chosen': 'chosen_reward_sum',
           'rewards_rejected': 'rejected_reward_sum'}

  def weights(self, batch, unscored):
    del unscored  # a reward row is real when it has a token
    return (jnp.any(side(batch, 'chosen')['segment_ids'] != 0, axis=-1)
            & jnp.any(side(batch, 'rejected')['segment_ids'] != 0, axis=-1)).astype(jnp.float32)

  def sums(self, model, batch, config, unscored, *, deterministic):
    chosen = _call(model, side(batch, 'chosen'), deterministic)
    rejected = _call(model, side(batch, 'rejected'), deterministic)
    margin = batch['margin'] if config.align.reward_margin and 'margin' in batch else None
    per_pair = losses.reward_losses(chosen, rejected, margin, center_coef=float(config.align.center_rewards))
    return self._metrics(per_pair, self.weights(batch, unscored), chosen, rejected)


class DPO(PairObjective):
  """align.method=dpo (TRL DPOTrainer): align.dpo_loss of beta * (log-ratio chosen - log-ratio rejected), the
  log-ratios against the frozen reference (`ref_*_logps` batch keys: the step adds them, or the data carries them
  precomputed). Rewards are beta * (log pi - log pi_ref) summed over the response."""
  name = 'dpo'
  needs_reference = True
  names = {'reward_accuracy': 'correct_sum', 'reward_margin': 'margin_sum', 'rewards_chosen': 'chosen_reward_sum',
           'rewards_rejected': 'rejected_reward_sum', 'logps_chosen': 'chosen_logps_sum',
           'logps_rejected': 'rejected_logps_sum'}

  def sums(self, model, batch, config, unscored, *, deterministic):
    lp = response_logps(model, batch, unscored, deterministic=deterministic)
    per_pair, chosen, rejected = losses.dpo_losses(
        lp['chosen_logps'], lp['rejected_logps'], batch['ref_chosen_logps'], batch['ref_rejected_logps'],
        lp['chosen_tokens'], lp['rejected_tokens'], beta=float(config.align.beta), loss_type=config.align.dpo_loss)
    return self._metrics(per_pair, self.weights(batch, unscored), chosen, rejected,
                         chosen_logps=lp['chosen_logps'], rejected_logps=lp['rejected_logps'])

  def reference_logps(self, reference: Any, batch: Batch, unscored: int) -> dict[str, jax.Array]:
    """The reference model's summed response log-probabilities, under REFERENCE_KEYS."""
    lp = response_logps(reference, batch, unscored, deterministic=True)
    return {'ref_chosen_logps': lp['chosen_logps'], 'ref_rejected_logps': lp['rejected_logps']}


class SimPO(PairObjective):
  """align.method=simpo (TRL CPOTrainer loss_type=simpo, cpo_alpha=0): -log sigmoid(beta (mean log p chosen - mean
  log p rejected) - gamma), no reference. Rewards are beta * the mean token log-probability."""
  name = 'simpo'
  names = DPO.names

  def sums(self, model, batch, config, unscored, *, deterministic):
    lp = response_logps(model, batch, unscored, deterministic=deterministic)
    per_pair, chosen, rejected = losses.simpo_losses(
        lp['chosen_logps'], lp['rejected_logps'], lp['chosen_tokens'], lp['rejected_tokens'],
        beta=float(config.align.beta), gamma=float(config.align.gamma))
    return self._metrics(per_pair, self.weights(batch, unscored), chosen, rejected,
                         chosen_logps=lp['chosen_logps'], rejected_logps=lp['rejected_logps'])
