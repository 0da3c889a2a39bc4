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
