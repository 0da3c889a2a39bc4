"""Pure loss functions of preference learning and RL fine-tuning, numerically matched to TRL.

Everything here is plain jax.numpy on float32 arrays: no modules, no state, no model. The training code computes the
log-probabilities (token_logps / sequence_logps on a model's logits) and hands them to these functions.

Conventions are TRL's (trl 1.16.0, the installed version the fixture was made with; PPO, which trl 1.16.0 no longer
ships, follows trl/experimental/ppo/ppo_trainer.py of TRL's main branch at 1.10.0.dev0, commit f2cd577):

  * Preference pairs: [B] arrays of log p(response | prompt) summed over the response tokens (EOS included, prompt
    excluded) and the response token counts, as DPOTrainer._compute_loss builds them.
  * GRPO / RLOO groups: rewards [P*G], the G completions of one prompt consecutive (TRL's repeat-interleaved layout).
  * Per-token RL arrays: [N, T] over the completion tokens, mask 1 on real tokens and 0 on padding.

Masked positions are selected away with jnp.where, so padding may hold any finite value (TRL fills it with 1.0, a
model produces whatever it produces) without changing a result.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

DPO_LOSSES = ('sigmoid', 'ipo', 'hinge')
ADVANTAGE_METHODS = ('grpo', 'rloo')
KL_ESTIMATORS = ('k1', 'k3')
STD_EPS = 1e-4  # TRL GRPO / RLOO: advantages / (std + 1e-4)
WHITEN_EPS = 1e-8  # TRL PPO masked_whiten: (x - mean) * rsqrt(var + 1e-8)


def _f32(x) -> jax.Array:
  return jnp.asarray(x, jnp.float32)


def _masked_sum(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
  return jnp.sum(jnp.where(mask != 0, x * mask, 0.0), axis=axis)


def _masked_mean(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
  """sum(x * mask) / sum(mask); an empty mask gives 0 (TRL divides by 0 there, or clamps the count at 1)."""
  mask = _f32(mask)
  return _masked_sum(_f32(x), mask, axis) / jnp.maximum(jnp.sum(mask, axis=axis), 1.0)


# ------------------------------------------------------------------------------------------------ log-probabilities
def token_logps(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """log p(target) per position: logits [..., T, V], targets [..., T] int -> [..., T] float32.

  A negative target (unscored: TRL's -100) gathers id 0, like TRL's `labels[labels == -100] = 0` before
  `selective_log_softmax`; its value is meaningless and must be weighted out (sequence_logps does).
  Targets are the next tokens: for a decoder, targets[t] = input_ids[t + 1] (TRL shifts labels by one the same way).
  """
  logp = jax.nn.log_softmax(_f32(logits), axis=-1)
  ids = jnp.maximum(targets, 0).astype(jnp.int32)
  return jnp.take_along_axis(logp, ids[..., None], axis=-1)[..., 0]


def sequence_logps(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(sum over T of token_logps * weights [...], token count sum(weights) [...]).

  With weights = the response mask this is DPOTrainer's summed log-probability of a response (and CPOTrainer's
  get_batch_logps with average_log_prob=False); sum / count is its average_log_prob=True (SimPO, IPO).
  """
  weights = _f32(weights)
  return _masked_sum(token_logps(logits, targets), weights, axis=-1), jnp.sum(weights, axis=-1)


# ------------------------------------------------------------------------------------------------ preference pairs
def dpo_losses(chosen_logps: jax.Array, rejected_logps: jax.Array, ref_chosen_logps: jax.Array,
               ref_rejected_logps: jax.Array, chosen_tokens: jax.Array, rejected_tokens: jax.Array, *, beta: float,
               loss_type: str) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per-pair DPO-family losses, as TRL's DPOTrainer._compute_loss with f_divergence_type='reverse_kl' (the default),
  no ld_alpha and no use_weighting.

  loss_type in DPO_LOSSES = ('sigmoid', 'ipo', 'hinge'); all inputs [B] (summed response log-probs and response token
  counts). With d = (chosen - ref_chosen) - (rejected - ref_rejected):
    sigmoid: -log sigmoid(beta * d)                           (DPO, TRL's default loss_type)
    hinge:   relu(1 - beta * d)                               (SLiC)
    ipo:     (dc / n_c - dr / n_r - 1 / (2 beta))**2            (IPO; TRL divides each log-ratio by its response length,
                                                               clamped at 1, so the token counts only matter here)
  TRL's loss is the mean over pairs of these. -> (losses [B], chosen_rewards [B], rejected_rewards [B]) with
  rewards = beta * (logp - ref_logp), as TRL's DPOTrainer logs them (rewards/chosen, rewards/rejected).
  """
  if loss_type not in DPO_LOSSES:
    raise ValueError(f'dpo loss_type must be one of {DPO_LOSSES}, got {loss_type!r}')
  chosen_logratios = _f32(chosen_logps) - _f32(ref_chosen_logps)
  rejected_logratios = _f32(rejected_logps) - _f32(ref_rejected_logps)
  delta = chosen_logratios - rejected_logratios
  if loss_type == 'sigmoid':
    losses = -jax.nn.log_sigmoid(beta * delta)
  elif loss_type == 'hinge':
    losses = jax.nn.relu(1.0 - beta * delta)
  else:  # ipo
    chosen_avg = chosen_logratios / jnp.maximum(_f32(chosen_tokens), 1.0)
    rejected_avg = rejected_logratios / jnp.maximum(_f32(rejected_tokens), 1.0)
    losses = (chosen_avg - rejected_avg - 1.0 / (2.0 * beta)) ** 2
  return losses, beta * chosen_logratios, beta * rejected_logratios


def simpo_losses(chosen_logps: jax.Array, rejected_logps: jax.Array, chosen_tokens: jax.Array,
                 rejected_tokens: jax.Array, *, beta: float, gamma: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """SimPO (TRL's CPOTrainer loss_type='simpo' with cpo_alpha=0, label_smoothing=0, alpha=0): length-normalised and
  reference-free. With the mean token log-probs m = logps / tokens (CPOTrainer.get_batch_logps(average_log_prob=True)):
  loss = -log sigmoid(beta * (m_chosen - m_rejected) - gamma), gamma being TRL's simpo_gamma (the margin; TRL writes
  it as beta * (m_c - m_r - gamma / beta)). Token counts are clamped at 1 (TRL divides an empty response by 0).

  -> (losses [B], chosen_rewards [B], rejected_rewards [B]) (rewards = beta * mean token logp, as TRL logs them).
  """
  chosen_avg = _f32(chosen_logps) / jnp.maximum(_f32(chosen_tokens), 1.0)
  rejected_avg = _f32(rejected_logps) / jnp.maximum(_f32(rejected_tokens), 1.0)
  losses = -jax.nn.log_sigmoid(beta * (chosen_avg - rejected_avg) - gamma)
  return losses, beta * chosen_avg, beta * rejected_avg


def reward_losses(chosen_rewards: jax.Array, rejected_rewards: jax.Array, margin: jax.Array | None = None, *,
                  center_coef: float = 0.0) -> jax.Array:
  """Bradley-Terry reward-model loss per pair: -log sigmoid(r_c - r_r - margin) + center_coef * (r_c + r_r)**2.

  The mean over pairs equals TRL RewardTrainer.compute_loss (with the dataset's optional `margin` column and
  center_rewards_coefficient = center_coef; the centring term pulls the rewards' mean to 0). -> [B]
  """
  chosen_rewards, rejected_rewards = _f32(chosen_rewards), _f32(rejected_rewards)
  diff = chosen_rewards - rejected_rewards
  if margin is not None:
    diff = diff - _f32(margin)
  losses = -jax.nn.log_sigmoid(diff)
  if center_coef:
    losses = losses + center_coef * (chosen_rewards + rejected_rewards) ** 2
  return losses


# ------------------------------------------------------------------------------------------------ GRPO / RLOO
def _unbiased_std(x: jax.Array, axis=None, keepdims: bool = False) -> jax.Array:
  """Bessel-corrected standard deviation (TRL's nanstd, without NaNs)."""
  n = x.size if axis is None else x.shape[axis]
  mean = jnp.mean(x, axis=axis, keepdims=True)
  var = jnp.sum((x - mean) ** 2, axis=axis, keepdims=keepdims) / max(n - 1, 1)
  return jnp.sqrt(var)


def group_advantages(rewards: jax.Array, num_generations: int, *, method: str,
                     scale: bool | None = None) -> jax.Array:
  """Advantages of G = num_generations completions per prompt from their scalar rewards [P*G] (G consecutive
  completions per prompt, TRL's layout). -> [P*G] float32.

  method 'grpo' (TRL GRPOTrainer, multi_objective_aggregation='sum_then_normalize'): r - group mean, divided by
    (group std + 1e-4) when scale (scale_rewards='group', TRL's default); the std is TRL's nanstd, i.e. UNBIASED
    (Bessel, divides by G - 1). scale=False is scale_rewards='none' (Dr. GRPO).
  method 'rloo' (TRL RLOOTrainer): r - mean of the other G - 1 rewards of the group. TRL's normalize_advantages
    defaults to False; scale=True mirrors normalize_advantages=True, which whitens over the whole batch (not per
    group): (a - mean(a)) / (unbiased std(a) + 1e-4). For RLOO with a KL penalty, fold the KL into the rewards first
    (rloo_rewards), as TRL does.
  scale None (the default) is TRL's default for the method: True for 'grpo', False for 'rloo'.
  With G == 1 every advantage is 0 (as TRL).
  """
  if method not in ADVANTAGE_METHODS:
    raise ValueError(f'advantage method must be one of {ADVANTAGE_METHODS}, got {method!r}')
  if scale is None:
    scale = method == 'grpo'
  rewards = _f32(rewards)
  if num_generations < 1 or rewards.shape[-1] % num_generations:
    raise ValueError(f'{rewards.shape[-1]} rewards do not split into groups of {num_generations}')
  if num_generations == 1:
    return jnp.zeros_like(rewards)
  grouped = rewards.reshape(-1, num_generations)
  if method == 'grpo':
    advantages = grouped - jnp.mean(grouped, axis=1, keepdims=True)
    if scale:
      advantages = advantages / (_unbiased_std(grouped, axis=1, keepdims=True) + STD_EPS)
    return advantages.reshape(rewards.shape)
  baselines = (jnp.sum(grouped, axis=1, keepdims=True) - grouped) / (num_generations - 1)
  advantages = (grouped - baselines).reshape(rewards.shape)
  if scale:
    advantages = (advantages - jnp.mean(advantages)) / (_unbiased_std(advantages) + STD_EPS)
  return advantages


def rloo_rewards(rewards: jax.Array, old_logps: jax.Array, ref_logps: jax.Array, mask: jax.Array, *,
                 beta: float) -> jax.Array:
  """RLOO's KL-penalised sequence rewards: rewards [N] - beta * sum over the mask of (old_logps - ref_logps) [N, T].

  TRL RLOOTrainer puts the KL into the reward (not into the loss, unlike GRPO), with the first-order estimator k1 =
  log pi_old - log pi_ref summed over the completion (it can be negative); group_advantages(method='rloo') then takes
  the leave-one-out baseline of these. TRL's default beta is 0.05. -> [N]
  """
  kl = _masked_sum(_f32(old_logps) - _f32(ref_logps), _f32(mask), axis=-1)
  return _f32(rewards) - beta * kl


def kl_per_token(logps: jax.Array, ref_logps: jax.Array) -> jax.Array:
  """Schulman's k3 estimator of KL(pi || pi_ref) per token: exp(ref - logp) - (ref - logp) - 1 (>= 0), as TRL GRPO."""
  log_ratio = _f32(ref_logps) - _f32(logps)
  return jnp.exp(log_ratio) - log_ratio - 1.0


def clipped_policy_loss(logps: jax.Array, old_logps: jax.Array, ref_logps: jax.Array | None, advantages: jax.Array,
                        mask: jax.Array, *, clip_eps: float, kl_coef: float, clip_eps_high: float | None = None,
                        kl_bias_correction: bool = True) -> tuple[jax.Array, dict[str, jax.Array]]:
  """TRL GRPOTrainer's default loss: loss_type='dapo', importance_sampling_level='token'.

  logps / old_logps / ref_logps / mask [N, T], advantages [N]. Per token, with ratio = exp(logps - old_logps):
    -min(ratio * A, clip(ratio, 1 - clip_eps, 1 + clip_eps_high) * A) + kl_coef * kl
  where kl is the k3 estimator (kl_per_token) times the ratio when kl_bias_correction (TRL's use_bias_correction_kl,
  default True since it is the unbiased reverse-KL gradient; the ratio is 1 on-policy). clip_eps_high defaults to
  clip_eps (TRL's epsilon_high). TRL's default beta (kl_coef) is 0.0, with no reference model at all: ref_logps may
  then be None (the 'kl' metric is then 0). 'dapo' sums the per-token losses over every mask token of the batch and
  divides by their number (TRL divides by the token count of the whole generation batch, num_items_in_batch; pass the
  whole generation batch here, or rescale, to get the same number under gradient accumulation).

  -> (loss scalar, metrics) with metrics 'kl' (mean over the mask of the KL term as it enters the loss: TRL's logged
  `kl`), 'clip_fraction' (share of mask tokens where the clip was active: ratio < 1 - eps with A < 0, or
  ratio > 1 + eps_high with A > 0; TRL's clip_ratio/region_mean), 'clip_low_fraction' / 'clip_high_fraction'
  (clip_ratio/low_mean, high_mean) and 'ratio_mean' (mean ratio over the mask).
  """
  eps_high = clip_eps if clip_eps_high is None else clip_eps_high
  logps, mask = _f32(logps), _f32(mask)
  adv = _f32(advantages)[:, None]
  ratio = jnp.exp(logps - _f32(old_logps))
  clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + eps_high)
  per_token = -jnp.minimum(ratio * adv, clipped * adv)
  if ref_logps is None:
    if kl_coef:
      raise ValueError('clipped_policy_loss: kl_coef != 0 needs ref_logps')
    kl = jnp.zeros_like(logps)
  else:
    kl = kl_per_token(logps, ref_logps)
    if kl_bias_correction:
      kl = kl * ratio
  if kl_coef:
    per_token = per_token + kl_coef * kl
  loss = _masked_mean(per_token, mask)
  low = (ratio < 1.0 - clip_eps) & (adv < 0)
  high = (ratio > 1.0 + eps_high) & (adv > 0)
  metrics = {
      'kl': _masked_mean(kl, mask),
      'clip_fraction': _masked_mean(low | high, mask),
      'clip_low_fraction': _masked_mean(low, mask),
      'clip_high_fraction': _masked_mean(high, mask),
      'ratio_mean': _masked_mean(ratio, mask),
  }
  return loss, metrics


def rloo_policy_loss(logps: jax.Array, old_logps: jax.Array, advantages: jax.Array, mask: jax.Array, *,
                     clip_eps: float, clip_eps_high: float | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """TRL RLOOTrainer's loss: a SEQUENCE-level clipped surrogate (a separate function because TRL's RLOO differs from
  GRPO's token-level one, and has no KL term: the KL is already in the rewards, see rloo_rewards).

  logps / old_logps / mask [N, T], advantages [N]. The sequence log-probs are summed over the mask, the ratio is
  exp(sum logps - sum old_logps) per sequence, and the loss is the mean over sequences of
  -min(ratio * A, clip(ratio, 1 - clip_eps, 1 + clip_eps_high) * A).
  -> (loss scalar, metrics 'clip_fraction' (share of sequences clipped, TRL's clip_ratio/region_mean),
  'clip_low_fraction', 'clip_high_fraction', 'ratio_mean' (mean sequence ratio)).
  """
  eps_high = clip_eps if clip_eps_high is None else clip_eps_high
  mask = _f32(mask)
  log_ratio = _masked_sum(_f32(logps), mask, axis=-1) - _masked_sum(_f32(old_logps), mask, axis=-1)
  adv = _f32(advantages)
  ratio = jnp.exp(log_ratio)
  clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + eps_high)
  loss = jnp.mean(-jnp.minimum(ratio * adv, clipped * adv))
  low = (ratio < 1.0 - clip_eps) & (adv < 0)
  high = (ratio > 1.0 + eps_high) & (adv > 0)
  metrics = {
      'clip_fraction': jnp.mean(_f32(low | high)),
      'clip_low_fraction': jnp.mean(_f32(low)),
      'clip_high_fraction': jnp.mean(_f32(high)),
      'ratio_mean': jnp.mean(ratio),
  }
  return loss, metrics


# ------------------------------------------------------------------------------------------------ PPO
def ppo_value_mask(mask: jax.Array) -> jax.Array:
  """The mask TRL's PPOTrainer uses for values (padding_mask_p1): the response mask plus the one position after it.

  TRL puts the score there (see ppo_rewards) and keeps the value predicted there, so the value loss covers it too.
  mask [N, T] is a right-padded response mask (1 on the first n tokens). -> [N, T] float32
  """
  mask = _f32(mask)
  length = jnp.sum(mask, axis=-1, keepdims=True)
  return (jnp.arange(mask.shape[-1]) <= length).astype(jnp.float32)


def ppo_rewards(scores: jax.Array, logps: jax.Array, ref_logps: jax.Array, mask: jax.Array, *, kl_coef: float,
                kl_estimator: str = 'k1') -> jax.Array:
  """Per-token PPO rewards as TRL's PPOTrainer builds them: -kl_coef * kl on every response token (0 on padding) plus
  the scalar score [N] at ONE position: the position right after the last response token (TRL's
  sequence_lengths_p1), or the last position when the response fills all T.

  That extra position is TRL's convention (with EOS kept in the response and a distinct pad token, the score sits on
  the first pad; with pad == eos, on the EOS): its value is kept and trained (ppo_value_mask), so the advantage of the
  last real token sees the score through gamma * V(next). kl per token: 'k1' = logp - ref_logp (TRL's default),
  'k3' = (r - 1) - log r with r = exp(ref_logp - logp). logps / ref_logps / mask [N, T] (right-padded). -> [N, T]
  """
  if kl_estimator not in KL_ESTIMATORS:
    raise ValueError(f'kl_estimator must be one of {KL_ESTIMATORS}, got {kl_estimator!r}')
  mask = _f32(mask)
  logr = _f32(ref_logps) - _f32(logps)
  kl = -logr if kl_estimator == 'k1' else jnp.expm1(logr) - logr
  rewards = jnp.where(mask != 0, -kl_coef * kl, 0.0)
  num_positions = mask.shape[-1]
  length = jnp.sum(mask, axis=-1).astype(jnp.int32)
  end = jnp.where(length < num_positions, length, length - 1)
  return rewards + jax.nn.one_hot(end, num_positions, dtype=jnp.float32) * _f32(scores)[:, None]


def _whiten(values: jax.Array, mask: jax.Array) -> jax.Array:
  """TRL masked_whiten (shift_mean=True): (x - masked mean) * rsqrt(unbiased masked var + 1e-8)."""
  count = jnp.sum(mask)
  mean = _masked_sum(values, mask) / jnp.maximum(count, 1.0)
  var = _masked_sum((values - mean) ** 2, mask) / jnp.maximum(count - 1.0, 1.0)
  return (values - mean) * jax.lax.rsqrt(var + WHITEN_EPS)


def gae(rewards: jax.Array, values: jax.Array, mask: jax.Array, *, gamma: float,
        lam: float) -> tuple[jax.Array, jax.Array]:
  """Generalised advantage estimation, as TRL's PPOTrainer (the original RLHF recipe; TRL's defaults gamma=1.0,
  lam=0.95): per-token rewards [N, T] (ppo_rewards: the score on one position minus the per-token KL penalty),
  values [N, T], mask [N, T] (the response tokens).

  Like TRL, the recursion runs over all T positions, delta_t = r_t + gamma * V_{t+1} - V_t (V_T = 0),
  A_t = delta_t + gamma * lam * A_{t+1}; so rewards must be 0 past the score and values 0 outside ppo_value_mask(mask)
  (TRL fills them so; ppo_rewards does the rewards). returns = A + values (before whitening, not masked); the
  advantages are then whitened over the mask (masked mean, unbiased masked variance, rsqrt(var + 1e-8), TRL's
  masked_whiten) and set to 0 outside it. -> (advantages [N, T], returns [N, T])
  """
  rewards, values, mask = _f32(rewards), _f32(values), _f32(mask)
  next_values = jnp.concatenate([values[:, 1:], jnp.zeros_like(values[:, :1])], axis=1)
  deltas = rewards + gamma * next_values - values

  def step(carry, delta):
    carry = delta + gamma * lam * carry
    return carry, carry

  _, advantages = jax.lax.scan(step, jnp.zeros_like(deltas[:, 0]), deltas.T, reverse=True)
  advantages = advantages.T
  returns = advantages + values
  advantages = jnp.where(mask != 0, _whiten(advantages, mask), 0.0)
  return advantages, returns


def ppo_losses(logps: jax.Array, old_logps: jax.Array, advantages: jax.Array, values: jax.Array,
               old_values: jax.Array, returns: jax.Array, mask: jax.Array, *, clip_eps: float, value_clip: float,
               value_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
  """TRL PPOTrainer's policy loss (clipped surrogate) and value loss (0.5 * clipped squared error); TRL's defaults
  cliprange=0.2, cliprange_value=0.2, and its total loss is pg_loss + vf_coef (0.1) * vf_loss.

  All inputs [N, T]. pg_loss = masked mean over `mask` of max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps));
  vf_loss = 0.5 * masked mean over `value_mask` of max((V - R)**2, (clip(V, V_old - c, V_old + c) - R)**2).
  value_mask defaults to mask; TRL uses ppo_value_mask(mask) (one more position) for the value loss.
  -> (pg_loss, vf_loss, metrics) with 'clip_fraction' (share of mask tokens where the clipped term was the larger,
  TRL's pg_clipfrac), 'vf_clip_fraction' (TRL's vf_clipfrac), 'ratio_mean' and 'approx_kl' (0.5 * mean of
  (logp - old_logp)**2); these two are means over the mask, where TRL averages over every position of the padded
  batch (its padding holds ratio 1), so they differ from TRL's logged ones when there is padding.
  """
  mask = _f32(mask)
  value_mask = mask if value_mask is None else _f32(value_mask)
  advantages, values, old_values, returns = _f32(advantages), _f32(values), _f32(old_values), _f32(returns)
  log_ratio = _f32(logps) - _f32(old_logps)
  ratio = jnp.exp(log_ratio)
  pg_losses = -advantages * ratio
  pg_losses_clipped = -advantages * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
  pg_loss = _masked_mean(jnp.maximum(pg_losses, pg_losses_clipped), mask)
  values_clipped = jnp.clip(values, old_values - value_clip, old_values + value_clip)
  vf_losses = (values - returns) ** 2
  vf_losses_clipped = (values_clipped - returns) ** 2
  vf_loss = 0.5 * _masked_mean(jnp.maximum(vf_losses, vf_losses_clipped), value_mask)
  metrics = {
      'clip_fraction': _masked_mean(pg_losses_clipped > pg_losses, mask),
      'vf_clip_fraction': _masked_mean(vf_losses_clipped > vf_losses, value_mask),
      'ratio_mean': _masked_mean(ratio, mask),
      'approx_kl': 0.5 * _masked_mean(log_ratio ** 2, mask),
  }
  return pg_loss, vf_loss, metrics
