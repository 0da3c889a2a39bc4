"""Mesh construction, logical-axis rules, and a sharded train step == the same step on one device."""
import math
import os
import tempfile

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from configs import gpt_tiny
from jaxformer import sharding as shd
from jaxformer.config import ConfigError
from jaxformer.training import optimizer, step
from jaxformer.training import state as state_lib

jax.config.update('jax_compilation_cache_dir', os.path.join(tempfile.gettempdir(), 'jaxformer_test_xla_cache'))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)

RULES = shd.rules_from_config(gpt_tiny.get_config())


def small_config(**mesh):
  config = gpt_tiny.get_config()
  # vocab 65 and a single kv head: dimensions tensor=2 cannot divide, which must stay replicated, not crash
  config.model.update(vocab_size=65, d_model=32, num_heads=4, num_kv_heads=1, d_ff=64, num_layers=1, max_len=16,
                      tie_embeddings=False)
  config.data.seq_len = 16
  config.train.update(batch_size=8, warmup_steps=0, learning_rate=1e-2)
  config.mesh.update(data=1, fsdp=1, tensor=1)
  config.mesh.update(**mesh)
  return config


def lm_batch(batch_size=8, seq_len=16, vocab=65, seed=0):
  """A packed decoder_only batch: two segments per row, padding at the end of some rows."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(5, vocab, size=(batch_size, seq_len + 1)).astype(np.int32)
  inputs, targets = tokens[:, :-1].copy(), tokens[:, 1:].copy()
  segment_ids = np.ones((batch_size, seq_len), np.int32)
  segment_ids[:, seq_len // 2:] = 2
  positions = np.concatenate([np.arange(seq_len // 2)] * 2).astype(np.int32)[None].repeat(batch_size, 0)
  targets[:, seq_len // 2 - 1] = 0  # no prediction across the segment boundary
  for r in range(0, batch_size, 3):  # some padded tails
    inputs[r, -3:] = targets[r, -3:] = segment_ids[r, -3:] = positions[r, -3:] = 0
  return {'tokens': inputs, 'targets': targets, 'segment_ids': segment_ids, 'positions': positions}


def setup_for(config):
  mesh = shd.make_mesh(config)
  tx, schedule = optimizer.make_optimizer(config.train)
  setup = state_lib.make_setup(config, mesh, tx, schedule)
  return setup, state_lib.initial_state(config, setup)


# --------------------------------------------------------------------------------------------------- mesh
def test_mesh_shapes():
  config = small_config(data=-1, fsdp=2, tensor=2)
  mesh = shd.make_mesh(config)
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 2, 'tensor': 2}
  assert mesh.axis_names == ('data', 'fsdp', 'tensor')
  mesh = shd.make_mesh(small_config(data=2, fsdp=1, tensor=1))  # fewer than 8: the first two devices
  assert mesh.devices.size == 2 and set(mesh.devices.flat) == set(jax.devices()[:2])
  with pytest.raises(ConfigError, match='mesh.data=-1'):
    shd.make_mesh(small_config(data=-1, fsdp=3))
  with pytest.raises(ConfigError, match='only 8 are available'):
    shd.make_mesh(small_config(data=4, fsdp=4))


def test_logical_to_spec_rules_and_fallback():
  mesh = shd.make_mesh(small_config(data=2, fsdp=2, tensor=2))
  assert shd.logical_to_spec(('embed', 'mlp'), (32, 64), mesh, RULES) == P('fsdp', 'tensor')
  assert shd.logical_to_spec(('embed', 'heads', 'kv'), (32, 4, 8), mesh, RULES) == P('fsdp', 'tensor', None)
  # not divisible by tensor=2: replicated over it rather than an error
  assert shd.logical_to_spec(('vocab', 'embed'), (65, 32), mesh, RULES) == P(None, 'fsdp')
  assert shd.logical_to_spec(('embed', 'kv_heads', 'kv'), (32, 1, 8), mesh, RULES) == P('fsdp', None, None)
  # a mesh axis is used once per array; multi-axis rules drop trailing axes until the size divides
  assert shd.logical_to_spec(('batch', 'embed'), (8, 32), mesh, RULES) == P(('data', 'fsdp'), None)
  assert shd.logical_to_spec(('batch', 'length'), (6, 16), mesh, RULES) == P('data', None)
  assert shd.logical_to_spec(None, (3, 4), mesh, RULES) == P()
  assert shd.batch_sharding(mesh, RULES).spec == P(('data', 'fsdp'), None)
  assert shd.batch_shards(mesh, RULES) == 4


def test_rules_from_config_rejects_unknown_axis():
  config = small_config()
  config.mesh.logical_axis_rules = (('embed', 'fsdpp'),)
  with pytest.raises(ConfigError, match="unknown mesh axis 'fsdpp'"):
    shd.rules_from_config(config)


# ------------------------------------------------------------------------------------- sharded == one device
def _expected_spec(names, shape, mesh_shape):
  """An independent, simple statement of the rules for arrays of <= one mesh axis per dim."""
  table = dict(RULES)
  out = []
  for name, size in zip(names, shape):
    axis = table.get(name)
    out.append(axis if axis is not None and size % mesh_shape[axis] == 0 else None)
  return P(*out)


def test_sharded_step_matches_single_device():
  batch = lm_batch()
  one_cfg = small_config()
  many_cfg = small_config(data=2, fsdp=2, tensor=2)
  one_setup, one_state = setup_for(one_cfg)
  many_setup, many_state = setup_for(many_cfg)

  # params really are sharded as the rules say, and the optimizer state follows them
  mesh_shape = dict(many_setup.mesh.shape)
  abstract = many_setup.abstract_state['params']
  flat_abs = jax.tree_util.tree_flatten_with_path(abstract, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
  flat_real = jax.tree.leaves(many_state['params'])
  flat_mu = jax.tree.leaves(many_state['opt_state'][1][0].mu)
  seen = set()
  for (path, var), real, mu in zip(flat_abs, flat_real, flat_mu):
    names = shd.variable_axes(var)
    assert names is not None, f'{jax.tree_util.keystr(path)} has no logical axis names'
    expected = _expected_spec(names, real.shape, mesh_shape)
    assert real.sharding.spec == expected, (jax.tree_util.keystr(path), real.sharding.spec, expected)
    assert mu.sharding.spec == expected
    shard = real.addressable_shards[0].data.shape
    want = tuple(d // (mesh_shape[a] if a else 1) for d, a in zip(real.shape, expected))
    assert shard == want, (jax.tree_util.keystr(path), shard, want)
    seen.update(a for a in expected if a)
  assert seen == {'fsdp', 'tensor'}  # both axes are used by some parameter

  # identical initial values (partitionable threefry), then identical steps
  for a, b in zip(jax.tree.leaves(one_state['params']), jax.tree.leaves(many_state['params'])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  one_step = step.make_train_step(one_cfg, one_setup)
  many_step = step.make_train_step(many_cfg, many_setup)
  for i in range(2):
    one_state, m1 = one_step(one_state, shd.shard_batch(batch, one_setup.mesh, one_setup.rules))
    many_state, m8 = many_step(many_state, shd.shard_batch(batch, many_setup.mesh, many_setup.rules))
    np.testing.assert_allclose(m1['loss'], m8['loss'], rtol=1e-6)
    np.testing.assert_allclose(m1['grad_norm'], m8['grad_norm'], rtol=1e-5)
  assert float(m1['loss']) > 0 and math.isfinite(float(m1['loss']))
  # Adam's first steps are ~lr * sign(g): a gradient that is ~0 up to float noise may move its weight by a
  # noticeable fraction of lr=1e-2 on either side, so the tolerance is 1% of one update; a sharding mistake is O(lr).
  for a, b in zip(jax.tree.leaves(one_state['params']), jax.tree.leaves(many_state['params'])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-4)
  mean_diff = np.mean([np.mean(np.abs(np.asarray(a) - np.asarray(b))) for a, b in
                       zip(jax.tree.leaves(one_state['params']), jax.tree.leaves(many_state['params']))])
  assert mean_diff < 1e-6
  # the step kept the shardings (out_shardings) rather than gathering anything
  for real, var in zip(jax.tree.leaves(many_state['params']), [v for _, v in flat_abs]):
    assert real.sharding.spec == _expected_spec(shd.variable_axes(var), real.shape, mesh_shape)


def test_describe_unsharded_names_replicated_dims():
  config = small_config(data=2, fsdp=2, tensor=2)
  mesh = shd.make_mesh(config)
  tx, schedule = optimizer.make_optimizer(config.train)
  setup = state_lib.make_setup(config, mesh, tx, schedule)
  notes = shd.describe_unsharded(setup.abstract_state['params'], mesh, setup.rules)
  assert any('vocab=65' in n for n in notes) and any('kv_heads=1' in n for n in notes)
