"""Gradient accumulation: k micro-batches in one step == one step on the k-times larger batch."""
import os
import tempfile

import jax
import numpy as np
import pytest

from jaxformer import sharding as shd
from jaxformer.training import step
from tests.test_sharding import lm_batch, setup_for, small_config

jax.config.update('jax_compilation_cache_dir', os.path.join(tempfile.gettempdir(), 'jaxformer_test_xla_cache'))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)


# The same config and mesh as test_sharding's sharded step, so its compiled k=1 program is reused (XLA cache).
@pytest.mark.parametrize('k,mesh', [(4, dict(data=2, fsdp=2, tensor=2))])
def test_grad_accumulation_equals_big_batch(k, mesh):
  batch = lm_batch(batch_size=8, seed=1)
  big_cfg = small_config(**mesh)
  acc_cfg = small_config(**mesh)
  acc_cfg.train.grad_accum_steps = k
  big_setup, big_state = setup_for(big_cfg)
  acc_setup, acc_state = setup_for(acc_cfg)
  big_state, m_big = step.make_train_step(big_cfg, big_setup)(
      big_state, shd.shard_batch(batch, big_setup.mesh, big_setup.rules))
  acc_state, m_acc = step.make_train_step(acc_cfg, acc_setup)(
      acc_state, shd.shard_batch(batch, acc_setup.mesh, acc_setup.rules))
  # the padded rows make micro-batches hold different token counts: only exact token weighting agrees
  np.testing.assert_allclose(m_acc['loss'], m_big['loss'], rtol=1e-6)
  np.testing.assert_allclose(m_acc['tokens'], m_big['tokens'])
  np.testing.assert_allclose(m_acc['grad_norm'], m_big['grad_norm'], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(acc_state['params']), jax.tree.leaves(big_state['params'])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-4)
  mean_diff = np.mean([np.mean(np.abs(np.asarray(a) - np.asarray(b))) for a, b in
                       zip(jax.tree.leaves(acc_state['params']), jax.tree.leaves(big_state['params']))])
  assert mean_diff < 1e-6


def test_micro_batches_partition_the_rows():
  x = np.arange(8 * 3).reshape(8, 3)
  micro = np.asarray(step.split_microbatches({'x': x}, 4)['x'])
  assert micro.shape == (4, 2, 3)
  rows = sorted(tuple(r) for r in micro.reshape(-1, 3))
  assert rows == sorted(tuple(r) for r in x)


def test_bf16_compute_keeps_f32_master_weights():
  batch = lm_batch(seed=2)
  f32_cfg, bf16_cfg = small_config(), small_config()
  bf16_cfg.model.dtype = 'bfloat16'
  results = []
  for cfg in (f32_cfg, bf16_cfg):
    setup, state = setup_for(cfg)
    state, metrics = step.make_train_step(cfg, setup)(state, shd.shard_batch(batch, setup.mesh, setup.rules))
    results.append((state, metrics))
  (s32, m32), (s16, m16) = results
  for tree in (s16['params'], s16['opt_state']):
    assert {x.dtype for x in jax.tree.leaves(tree) if x.ndim > 0} == {np.dtype('float32')}
  np.testing.assert_allclose(m16['loss'], m32['loss'], rtol=2e-2)
  assert float(m16['loss']) != float(m32['loss'])  # the compute really ran in bfloat16
  for a, b in zip(jax.tree.leaves(s16['params']), jax.tree.leaves(s32['params'])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2.5e-2)  # within ~2 Adam steps of lr 1e-2
