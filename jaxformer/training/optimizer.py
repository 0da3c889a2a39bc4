"""The Optax optimizer from config.train: schedule, clipping, weight-decay mask, AdamW / Adafactor / SGD.

Gradient accumulation is not done here (no optax.MultiSteps): the train step scans over the micro-batches and
applies one update with the exact big-batch gradient, which costs one dispatch per optimizer step instead of k.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax


# train.schedule: the learning rate after warmup. Each gets (step, lr, min_lr, t, warmup) with step the float
# update count and t the fraction of the post-warmup steps done, in [0, 1].
Decay = Callable[[jax.Array, float, float, jax.Array, int], jax.Array]
SCHEDULES: dict[str, Decay] = {
    'cosine': lambda step, lr, min_lr, t, warmup: min_lr + (lr - min_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * t)),
    'linear': lambda step, lr, min_lr, t, warmup: lr + (min_lr - lr) * t,
    'constant': lambda step, lr, min_lr, t, warmup: jnp.asarray(lr, jnp.float32),
    'rsqrt': lambda step, lr, min_lr, t, warmup: lr * jax.lax.rsqrt(jnp.maximum(step + 1.0, max(warmup, 1))
                                                                    / max(warmup, 1)),
}


def make_schedule(train) -> Callable[[jax.Array], jax.Array]:
  """Linear warmup to train.learning_rate over warmup_steps, then cosine / linear / constant / rsqrt.

  `count` is the number of updates already applied, so the first step uses lr/warmup (never 0). cosine and
  linear decay to train.min_learning_rate at train.num_steps; rsqrt is lr * sqrt(warmup / step) after warmup.
  """
  lr, min_lr = float(train.learning_rate), float(train.min_learning_rate)
  warmup, total = int(train.warmup_steps), int(train.num_steps)
  if train.schedule not in SCHEDULES:
    raise ValueError(f'train.schedule={train.schedule!r} is not one of {", ".join(SCHEDULES)}.')
  decay = SCHEDULES[train.schedule]

  def schedule(count):
    step = jnp.asarray(count, jnp.float32)
    warm = lr * jnp.minimum(1.0, (step + 1.0) / max(warmup, 1))
    t = jnp.clip((step - warmup) / max(total - warmup, 1), 0.0, 1.0)
    decayed = decay(step, lr, min_lr, t, warmup)
    return jnp.where(step < warmup, warm, decayed) if warmup else decayed

  return schedule


def _path_parts(path) -> list[str]:
  parts = []
  for k in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)).lower())
        break
  return parts


def decay_mask_fn(exclude: str | Sequence[str]) -> Callable[[Any], Any]:
  """Tree of bools (True = decay) over a params tree: a parameter is excluded when any part of its path contains
  one of the `exclude` words (case-insensitive), e.g. 'norm,bias,embed' spares every *norm* module, all biases and
  the token / position embeddings."""
  if isinstance(exclude, str):
    exclude = [w.strip().lower() for w in exclude.split(',') if w.strip()]
  words = tuple(w.lower() for w in exclude)

  def mask(params):
    def one(path, _):
      return not any(w in part for part in _path_parts(path) for w in words)
    return jax.tree_util.tree_map_with_path(one, params)

  return mask


def _adamw(train, schedule, mask, wd: float) -> list[optax.GradientTransformation]:
  return [optax.adamw(schedule, b1=train.b1, b2=train.b2, eps=train.eps, weight_decay=wd, mask=mask)]


def _adafactor(train, schedule, mask, wd: float) -> list[optax.GradientTransformation]:
  """optax.adafactor's pieces in AdamW's order: factored second moments (the memory saving), update clipping at
  RMS 1, optional momentum (b1 > 0), then weight decay *before* the learning rate, so decay is lr * wd * param as in
  AdamW (optax.adafactor adds it after the learning rate, an absolute rate). No parameter-scaled steps:
  train.learning_rate is the same absolute step size for every optimizer."""
  parts = [optax.scale_by_factored_rms(), optax.clip_by_block_rms(1.0)]
  if train.b1 > 0:
    parts.append(optax.ema(train.b1, debias=False))
  if wd:
    parts.append(optax.add_decayed_weights(wd, mask=mask))
  parts.append(optax.scale_by_learning_rate(schedule))
  return parts


def _sgd(train, schedule, mask, wd: float) -> list[optax.GradientTransformation]:
  parts = [optax.add_decayed_weights(wd, mask=mask)] if wd else []
  parts.append(optax.sgd(schedule, momentum=train.b1 if train.b1 > 0 else None))
  return parts


# train.optimizer: (train config, schedule, weight-decay mask, weight decay) -> the update transforms after clipping.
OPTIMIZERS: dict[str, Callable[..., list[optax.GradientTransformation]]] = {
    'adamw': _adamw, 'adafactor': _adafactor, 'sgd': _sgd}


def make_optimizer(train) -> tuple[optax.GradientTransformation, Callable[[jax.Array], jax.Array]]:
  """(tx, schedule). Clipping by global norm comes first, so it sees the raw (accumulated) gradient."""
  if train.optimizer not in OPTIMIZERS:
    raise ValueError(f'train.optimizer={train.optimizer!r} is not one of {", ".join(OPTIMIZERS)}.')
  schedule = make_schedule(train)
  mask = decay_mask_fn(train.weight_decay_exclude)
  parts = []
  if train.grad_clip_norm and train.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(float(train.grad_clip_norm)))
  parts += OPTIMIZERS[train.optimizer](train, schedule, mask, float(train.weight_decay))
  return optax.chain(*parts), schedule
