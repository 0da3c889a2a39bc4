"""train.steps_per_call: k optimizer steps per jitted call (lax.scan over k stacked batches) == k single steps."""
import os
import tempfile

import jax
import numpy as np
import pytest
from flax import nnx

from jaxformer import sharding as shd
from jaxformer.config import ConfigError, validate
from jaxformer.training import checkpoint, step
from jaxformer.training import state as state_lib
from jaxformer.apps.train import run
from jaxformer.training.writers import read_metrics
from tests.test_sharding import lm_batch, setup_for, small_config
from tests.test_train import tiny

jax.config.update('jax_compilation_cache_dir', os.path.join(tempfile.gettempdir(), 'jaxformer_test_xla_cache'))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)

K = 4


def test_multi_step_equals_single_steps():
  """Per-step metrics and final params of one 4-step call == 4 calls of the single step (dropout on)."""
  cfg = small_config(data=1, fsdp=1, tensor=1)
  cfg.model.dropout = 0.1
  batches = [lm_batch(batch_size=8, seed=s) for s in range(K)]
  setup, state1 = setup_for(cfg)
  _, state4 = setup_for(cfg)
  one = step.make_train_step(cfg, setup)
  many = step.make_train_step(cfg, setup, steps_per_call=K)
  singles = []
  for b in batches:
    state1, m = one(state1, shd.shard_batch(b, setup.mesh, setup.rules))
    singles.append(jax.device_get(m))
  stacked = {key: np.stack([b[key] for b in batches]) for key in batches[0]}
  state4, m4 = many(state4, shd.shard_batch(stacked, setup.mesh, setup.rules, stacked=True))
  m4 = jax.device_get(m4)
  assert int(state4['step']) == int(state1['step']) == K
  for key in ('loss', 'objective', 'accuracy', 'tokens', 'grad_norm', 'learning_rate'):
    assert m4[key].shape == (K,)
    np.testing.assert_allclose(m4[key], [m[key] for m in singles], rtol=1e-6, atol=1e-6, err_msg=key)
  for a, b in zip(jax.tree.leaves(state4['params']), jax.tree.leaves(state1['params'])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
  raw = lambda x: np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x)
  for a, b in zip(jax.tree.leaves(state4['rngs']), jax.tree.leaves(state1['rngs'])):
    np.testing.assert_array_equal(raw(a), raw(b))  # the dropout stream advanced the same


def config(k, num_steps=14):
  # 14 = 3 chunks of 4 + a 2-step tail of single steps; dropout on (the rng stream must advance identically)
  c = tiny('gpt_tiny', num_steps=num_steps, log_every=4, eval_every=1000, eval_steps=1, warmup_steps=2,
           steps_per_call=k)
  c.checkpoint.every_steps = 8
  c.model.dropout = 0.1
  return c


def train_rows(workdir):
  return {r['step']: r for r in read_metrics(workdir) if 'train_loss' in r}


def final_params(workdir, cfg):
  model, saved = state_lib.restore_model(workdir, cfg, shd.make_mesh(cfg))
  return saved, [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('spc_reference'))
  run(config(1), workdir)
  return workdir


def test_run_matches_single_steps_and_resumes_exactly(reference, tmp_path):
  ref_rows = train_rows(reference)
  ref_step, ref_params = final_params(reference, config(1))
  assert ref_step == 14

  # uninterrupted k=4 run: same logged losses (means over the same steps) and final params
  full = str(tmp_path / 'full')
  result = run(config(K), full)
  assert result['step'] == 14 and not result['stopped_early']
  rows = train_rows(full)
  assert sorted(rows) == sorted(ref_rows) == [4, 8, 12, 14]
  for s in rows:
    np.testing.assert_allclose(rows[s]['train_loss'], ref_rows[s]['train_loss'], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(rows[s]['grad_norm'], ref_rows[s]['grad_norm'], rtol=1e-5, atol=1e-6)
    assert rows[s]['tokens_per_sec'] is None or rows[s]['tokens_per_sec'] > 0
  assert checkpoint.latest_step(full) == 14
  saved, params = final_params(full, config(K))
  assert saved == 14
  for a, b in zip(params, ref_params):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)

  # interrupted off a chunk boundary (stop_after_steps=6: one chunk, then 2 single steps), resumed with k=4
  # (single steps 7-8 to realign, a chunk 9-12, single tail 13-14): the saved data position matches step 6 exactly
  resumed = str(tmp_path / 'resumed')
  first = run(config(K), resumed, stop_after_steps=6)
  assert first['step'] == 6 and first['stopped_early']
  assert checkpoint.latest_step(resumed) == 6
  run(config(K), resumed)
  rows = train_rows(resumed)
  for s in (12, 14):  # windows entirely after the resume
    np.testing.assert_allclose(rows[s]['train_loss'], ref_rows[s]['train_loss'], rtol=1e-6, atol=1e-6)
  saved, params = final_params(resumed, config(K))
  assert saved == 14
  for a, b in zip(params, ref_params):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_config_validation():
  c = config(K)
  validate(c)
  c.train.log_every = 5
  with pytest.raises(ConfigError, match=r'train\.log_every=5 must be a multiple of train\.steps_per_call=4'):
    validate(c)
  c = config(K)
  c.checkpoint.every_steps = 10
  c.train.eval_every = 250
  with pytest.raises(ConfigError, match=r'train\.eval_every=250, checkpoint\.every_steps=10 must be a multiple'):
    validate(c)
  c = config(0)
  with pytest.raises(ConfigError, match=r'train\.steps_per_call=0 must be a positive integer'):
    validate(c)
