"""TEMPORARY (replaced by the align-losses branch): minimal versions for the lead's integration."""
from __future__ import annotations

import jax
import jax.numpy as jnp

DPO_LOSSES = ('sigmoid', 'ipo', 'hinge')


def token_logps(logits, targets):
  logits = logits.astype(jnp.float32)
  ids = jnp.maximum(targets, 0).astype(jnp.int32)
  return jnp.take_along_axis(jax.nn.log_softmax(logits, -1), ids[..., None], axis=-1)[..., 0]


def sequence_logps(logits, targets, weights):
  return jnp.sum(token_logps(logits, targets) * weights, -1), jnp.sum(weights, -1)


def dpo_losses(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_tokens, rejected_tokens, *,
               beta, loss_type):
  c, r = chosen_logps - ref_chosen_logps, rejected_logps - ref_rejected_logps
  d = c - r
  if loss_type == 'sigmoid':
    losses = -jax.nn.log_sigmoid(beta * d)
  elif loss_type == 'hinge':
    losses = jax.nn.relu(1 - beta * d)
  else:
    losses = (c / jnp.maximum(chosen_tokens, 1) - r / jnp.maximum(rejected_tokens, 1) - 1 / (2 * beta)) ** 2
  return losses, beta * c, beta * r


def simpo_losses(chosen_logps, rejected_logps, chosen_tokens, rejected_tokens, *, beta, gamma):
  c = chosen_logps / jnp.maximum(chosen_tokens, 1)
  r = rejected_logps / jnp.maximum(rejected_tokens, 1)
  return -jax.nn.log_sigmoid(beta * (c - r) - gamma), beta * c, beta * r


def reward_losses(chosen_rewards, rejected_rewards, margin=None, *, center_coef=0.0):
  d = chosen_rewards - rejected_rewards - (0.0 if margin is None else margin)
  return -jax.nn.log_sigmoid(d) + center_coef * (chosen_rewards + rejected_rewards) ** 2


def group_advantages(rewards, num_generations, *, method, scale=True):
  g = rewards.reshape(-1, num_generations)
  if method == 'rloo':
    adv = g - (g.sum(1, keepdims=True) - g) / (num_generations - 1)
  else:
    adv = g - g.mean(1, keepdims=True)
    if scale:
      adv = adv / (g.std(1, keepdims=True, ddof=1) + 1e-4)
  return adv.reshape(-1)


def kl_per_token(logps, ref_logps):
  d = ref_logps - logps
  return jnp.exp(d) - d - 1


def clipped_policy_loss(logps, old_logps, ref_logps, advantages, mask, *, clip_eps, kl_coef):
  ratio = jnp.exp(logps - old_logps)
  a = advantages[:, None]
  per_token = -jnp.minimum(ratio * a, jnp.clip(ratio, 1 - clip_eps, 1 + clip_eps) * a)
  kl = kl_per_token(logps, ref_logps)
  if kl_coef:
    per_token = per_token + kl_coef * kl
  n = jnp.maximum(mask.sum(), 1.0)
  clipped = ((ratio < 1 - clip_eps) & (a < 0)) | ((ratio > 1 + clip_eps) & (a > 0))
  return (per_token * mask).sum() / n, {'kl': (kl * mask).sum() / n, 'clip_fraction': (clipped * mask).sum() / n,
                                        'ratio_mean': (ratio * mask).sum() / n}


def gae(rewards, values, mask, *, gamma, lam):
  T = rewards.shape[1]
  last = jnp.zeros(rewards.shape[0])
  adv = []
  for t in reversed(range(T)):
    nxt = values[:, t + 1] * mask[:, t + 1] if t + 1 < T else 0.0
    delta = rewards[:, t] + gamma * nxt - values[:, t]
    last = (delta + gamma * lam * last * (mask[:, t + 1] if t + 1 < T else 0.0)) * mask[:, t]
    adv.append(last)
  adv = jnp.stack(adv[::-1], 1)
  returns = adv + values
  n = jnp.maximum(mask.sum(), 1.0)
  mean = (adv * mask).sum() / n
  var = (((adv - mean) ** 2) * mask).sum() / n
  return (adv - mean) * jax.lax.rsqrt(var + 1e-8) * mask, returns


def ppo_losses(logps, old_logps, advantages, values, old_values, returns, mask, *, clip_eps, value_clip):
  n = jnp.maximum(mask.sum(), 1.0)
  vclip = jnp.clip(values, old_values - value_clip, old_values + value_clip)
  vf = 0.5 * ((jnp.maximum((values - returns) ** 2, (vclip - returns) ** 2)) * mask).sum() / n
  ratio = jnp.exp(logps - old_logps)
  pg = (jnp.maximum(-advantages * ratio, -advantages * jnp.clip(ratio, 1 - clip_eps, 1 + clip_eps)) * mask).sum() / n
  clipped = (jnp.abs(ratio - 1) > clip_eps)
  return pg, vf, {'clip_fraction': (clipped * mask).sum() / n,
                  'vf_clip_fraction': (((vclip - returns) ** 2 > (values - returns) ** 2) * mask).sum() / n}
