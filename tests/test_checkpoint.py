"""Exact resume, restore onto another mesh, unreadable checkpoints, and restore_model for evaluation."""
import os
import shutil
import tempfile

import jax
import numpy as np
import pytest

from jaxformer import sharding as shd
from jaxformer.training import checkpoint
from jaxformer.training import state as state_lib
from jaxformer.apps.train import run
from jaxformer.training.writers import read_metrics
from tests.test_train import tiny

jax.config.update('jax_compilation_cache_dir', os.path.join(tempfile.gettempdir(), 'jaxformer_test_xla_cache'))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)

N = 4


def config(**mesh):
  # dropout on: resuming must also restore the dropout rng stream, not only params and data position
  c = tiny('gpt_tiny', num_steps=2 * N, log_every=1, eval_every=1000, eval_steps=1, warmup_steps=2)
  c.model.dropout = 0.1
  c.mesh.update(**mesh)
  return c


def losses(workdir, steps):
  rows = {r['step']: r['train_loss'] for r in read_metrics(workdir) if 'train_loss' in r}
  return np.array([rows[s] for s in steps])


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """An uninterrupted 2N-step run on one device."""
  workdir = str(tmp_path_factory.mktemp('reference'))
  run(config(), workdir)
  return workdir


def test_exact_resume(reference, tmp_path):
  workdir = str(tmp_path)
  first = run(config(), workdir, stop_after_steps=N)
  assert first['step'] == N and first['stopped_early']
  assert checkpoint.latest_step(workdir) == N
  run(config(), workdir)  # resumes at N
  steps = range(N + 1, 2 * N + 1)
  np.testing.assert_allclose(losses(workdir, steps), losses(reference, steps), rtol=1e-6, atol=1e-6)
  # the metric rows were not duplicated by the resume
  assert [r['step'] for r in read_metrics(workdir) if 'train_loss' in r] == list(range(1, 2 * N + 1))
  assert checkpoint.latest_step(workdir) == 2 * N

  # --- the newest checkpoint becomes unreadable: fall back to the previous one, keep it aside, retrain
  params_dir = os.path.join(workdir, 'checkpoints', str(2 * N), 'params')
  for name in os.listdir(params_dir):
    path = os.path.join(params_dir, name)
    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
  mesh = shd.make_mesh(config())
  model, step = state_lib.restore_model(workdir, config(), mesh)
  assert step == N  # skipped the unreadable one, moved nothing
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', str(2 * N)))
  run(config(), workdir)
  assert os.path.isdir(os.path.join(workdir, checkpoint.UNREADABLE_DIR, str(2 * N)))
  assert checkpoint.latest_step(workdir) == 2 * N
  np.testing.assert_allclose(losses(workdir, steps), losses(reference, steps), rtol=1e-6, atol=1e-6)

  # --- restore_model gives the trained parameters, sharded onto the mesh it is given
  mesh8 = shd.make_mesh(config(data=2, fsdp=2, tensor=2))
  model8, step8 = state_lib.restore_model(workdir, config(), mesh8)
  assert step8 == 2 * N
  from flax import nnx
  leaves = jax.tree.leaves(nnx.state(model8, nnx.Param))
  assert any(len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated for x in leaves)
  model1, _ = state_lib.restore_model(workdir, config(), mesh, step=2 * N)
  for a, b in zip(leaves, jax.tree.leaves(nnx.state(model1, nnx.Param))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_restore_onto_another_mesh(reference, tmp_path):
  """Saved with data=2, fsdp=2, tensor=2 (params split over fsdp and tensor); resumed on one device (the
  reference's mesh, whose programs are already compiled): the losses continue as in the reference."""
  workdir = str(tmp_path)
  run(config(data=2, fsdp=2, tensor=2), workdir, stop_after_steps=N)
  run(config(), workdir)
  steps = range(1, 2 * N + 1)
  np.testing.assert_allclose(losses(workdir, steps), losses(reference, steps), rtol=2e-5, atol=2e-5)


def test_no_readable_checkpoint_is_one_clear_error(reference, tmp_path):
  workdir = str(tmp_path / 'copy')
  shutil.copytree(reference, workdir)
  for step in os.listdir(os.path.join(workdir, 'checkpoints')):
    shutil.rmtree(os.path.join(workdir, 'checkpoints', step, 'opt_state'), ignore_errors=True)
  with pytest.raises(checkpoint.CheckpointError, match='could be restored'):
    run(config(), workdir)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == sorted(
      os.listdir(os.path.join(reference, 'checkpoints')))  # nothing moved or deleted


def test_exact_resume_with_random_windows(reference, tmp_path):
  """data.sampling=random_windows saves only the step as the data position; resuming still continues exactly."""
  def cfg():
    c = config()
    c.data.sampling = 'random_windows'
    return c
  ref, work = str(tmp_path / 'ref'), str(tmp_path / 'work')
  run(cfg(), ref)
  run(cfg(), work, stop_after_steps=N)
  run(cfg(), work)
  steps = range(N + 1, 2 * N + 1)
  np.testing.assert_allclose(losses(work, steps), losses(ref, steps), rtol=1e-6, atol=1e-6)
  # the option is not ignored: other batches than the streams run (the module's reference) saw
  assert not np.allclose(losses(ref, steps), losses(reference, steps), rtol=1e-3)


def test_resume_may_change_how_the_model_computes(reference, tmp_path, capsys):
  """model.remat and attention_impl (EXECUTION_KEYS) choose how the same function is computed: a resume with other
  values is allowed, says so, and continues the reference run's losses; param_dtype (how parameters are stored)
  is still refused."""
  from jaxformer.errors import WorkdirError
  workdir = str(tmp_path)
  run(config(), workdir, stop_after_steps=N)
  capsys.readouterr()
  changed = config()
  changed.model.update(remat='full', attention_impl='reference')
  run(changed, workdir)
  assert "note: resuming" in capsys.readouterr().out
  steps = range(N + 1, 2 * N + 1)
  np.testing.assert_allclose(losses(workdir, steps), losses(reference, steps), rtol=1e-5, atol=1e-5)
  stored = config()
  stored.train.num_steps = 3 * N
  stored.model.param_dtype = 'bfloat16'
  with pytest.raises(WorkdirError, match="model.param_dtype='float32' there, 'bfloat16' here"):
    run(stored, workdir)
