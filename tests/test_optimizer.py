"""Schedules, the weight-decay mask and the three optimizers."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import default
from jaxformer.training import optimizer


def train_cfg(**kw):
  train = default.get_config().train
  train.update(learning_rate=1.0, min_learning_rate=0.1, warmup_steps=10, num_steps=110)
  train.update(**kw)
  return train


def test_warmup_then_cosine():
  s = optimizer.make_schedule(train_cfg(schedule='cosine'))
  assert float(s(0)) == pytest.approx(0.1)  # the first update already moves (lr / warmup, never 0)
  assert float(s(4)) == pytest.approx(0.5)
  assert float(s(10)) == pytest.approx(1.0)
  assert float(s(60)) == pytest.approx(0.1 + 0.9 * 0.5, rel=1e-5)  # half way down the cosine
  assert float(s(110)) == pytest.approx(0.1, rel=1e-5)
  assert float(s(500)) == pytest.approx(0.1, rel=1e-5)


def test_linear_constant_rsqrt():
  lin = optimizer.make_schedule(train_cfg(schedule='linear'))
  assert float(lin(60)) == pytest.approx(0.55, rel=1e-5) and float(lin(110)) == pytest.approx(0.1, rel=1e-5)
  const = optimizer.make_schedule(train_cfg(schedule='constant'))
  assert float(const(9)) == pytest.approx(1.0) and float(const(1000)) == pytest.approx(1.0)
  rsqrt = optimizer.make_schedule(train_cfg(schedule='rsqrt'))
  assert float(rsqrt(39)) == pytest.approx(math.sqrt(10 / 40), rel=1e-5)
  no_warmup = optimizer.make_schedule(train_cfg(schedule='cosine', warmup_steps=0))
  assert float(no_warmup(0)) == pytest.approx(1.0)


def test_weight_decay_mask_excludes_path_parts():
  params = {'embed': {'embedding': 1.0}, 'blocks': {'attn_norm': {'scale': 1.0}, 'mlp': {'wi': {'kernel': 1.0,
            'bias': 1.0}}}, 'pos_embed': 1.0}
  mask = optimizer.decay_mask_fn('norm,bias,embed')(params)
  assert mask == {'embed': {'embedding': False}, 'blocks': {'attn_norm': {'scale': False},
                  'mlp': {'wi': {'kernel': True, 'bias': False}}}, 'pos_embed': False}


@pytest.mark.parametrize('name', ['adamw', 'adafactor', 'sgd'])
def test_optimizers_minimise_and_decay_only_unmasked(name):
  cfg = train_cfg(optimizer=name, schedule='constant', warmup_steps=0, learning_rate=0.05, weight_decay=0.5,
                  grad_clip_norm=1.0)
  tx, _ = optimizer.make_optimizer(cfg)
  params = {'kernel': jnp.full((4, 4), 2.0), 'norm': jnp.full((4,), 2.0)}
  zero_grad = jax.tree.map(jnp.zeros_like, params)
  state = tx.init(params)
  # with zero gradients only weight decay acts: the kernel shrinks, the excluded 'norm' does not move
  updates, _ = tx.update(zero_grad, state, params)
  assert float(jnp.max(updates['kernel'])) < 0
  np.testing.assert_allclose(updates['norm'], 0.0)
  loss = lambda p: sum(jnp.sum((x - 1.0) ** 2) for x in jax.tree.leaves(p))
  start = float(loss(params))

  def body(_, carry):
    params, state = carry
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state

  params, _ = jax.jit(lambda p, s: jax.lax.fori_loop(0, 50, body, (p, s)))(params, state)
  assert float(loss(params)) < 0.5 * start


def test_clipping_bounds_the_update():
  cfg = train_cfg(optimizer='sgd', schedule='constant', warmup_steps=0, learning_rate=1.0, weight_decay=0.0,
                  grad_clip_norm=1.0, b1=0.0)
  tx, _ = optimizer.make_optimizer(cfg)
  params = {'w': jnp.zeros((3,))}
  updates, _ = tx.update({'w': jnp.array([30.0, 40.0, 0.0])}, tx.init(params), params)
  np.testing.assert_allclose(updates['w'], [-0.6, -0.8, 0.0], rtol=1e-6)
