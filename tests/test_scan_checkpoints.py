"""Checkpoints move between the two model.scan_layers layouts: a training run resumes in the other layout exactly
(params, Adam's mu / nu and the per-layer dropout streams converted), restore_model / eval.py, checkpoint.init_from
and PEFT runs read a workdir written in the other layout, and resolve treats the flag as a layout, not a model."""
import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from jaxformer.apps import evaluate as evaluation
from jaxformer import sharding as shd
from jaxformer.model import layout_convert
from jaxformer.training import checkpoint as ckpt_lib
from jaxformer.training import step as step_lib, state as state_lib
from jaxformer.apps.train import run
from jaxformer.training.writers import read_metrics
from jaxformer.errors import WorkdirError
from tests.test_train import tiny

N = 3  # steps before and after the layout changes


def config(scanned: bool, **train):
  """Two 32-wide layers (a layout needs more than one layer to mean anything), dropout on: the per-layer rng
  streams must be converted too for the losses to continue exactly."""
  c = tiny('gpt_tiny', num_steps=2 * N, log_every=1, eval_every=1000, eval_steps=1, warmup_steps=2, **train)
  c.model.update(num_layers=2, dropout=0.1, scan_layers=scanned)
  return c


def losses(workdir, steps):
  rows = {r['step']: r['train_loss'] for r in read_metrics(str(workdir)) if 'train_loss' in r}
  return np.array([rows[s] for s in steps])


def params(model) -> dict:
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def unrolled(tree: dict) -> dict:
  return layout_convert.to_layout(tree, scanned=False)


def assert_same_params(a: dict, b: dict, **tol):
  """Equal parameters whatever the layouts of a and b."""
  a, b = unrolled(a), layout_convert._match_keys(unrolled(b), unrolled(a))
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(y), np.asarray(x), **tol), a, b)


@pytest.fixture(scope='module')
def references(tmp_path_factory):
  """{scanned: an uninterrupted 2N-step run in that layout}."""
  out = {}
  for scanned in (False, True):
    out[scanned] = tmp_path_factory.mktemp(f'reference_scanned{int(scanned)}')
    run(config(scanned), str(out[scanned]))
  return out


@pytest.fixture(scope='module')
def flipped(references, tmp_path_factory):
  """{first layout: a run of N steps in it, resumed for N more with the other layout}: its checkpoint N has the
  first layout, 2N the other."""
  out = {}
  for scanned in (False, True):
    out[scanned] = tmp_path_factory.mktemp(f'flipped_from_scanned{int(scanned)}')
    run(config(scanned), str(out[scanned]), stop_after_steps=N)
    run(config(not scanned), str(out[scanned]))  # resolve accepts it: a layout, not another model
  return out


@pytest.mark.parametrize('from_scanned', [False, True])
def test_resume_in_the_other_layout_continues_exactly(references, flipped, from_scanned):
  steps = range(N + 1, 2 * N + 1)
  np.testing.assert_allclose(losses(flipped[from_scanned], steps), losses(references[from_scanned], steps),
                             rtol=2e-5, atol=2e-5)
  workdir = str(flipped[from_scanned])
  assert ckpt_lib.saved_layout(workdir, N) is from_scanned and ckpt_lib.saved_layout(workdir, 2 * N) is (
      not from_scanned)
  # the optimizer state came along too: the resumed run's final parameters are the uninterrupted run's
  c = config(from_scanned)
  mesh = shd.make_mesh(c)
  model, _ = state_lib.restore_model(workdir, c, mesh)  # step 2N, written in the other layout
  ref, _ = state_lib.restore_model(str(references[from_scanned]), c, mesh)
  assert layout_convert.is_scanned(params(model)) is from_scanned
  assert_same_params(params(ref), params(model), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('from_scanned', [False, True])
def test_restore_model_and_eval_read_the_other_layout(flipped, from_scanned):
  """restore_model converts into the requested layout (same logits), and eval.py's --config.model.scan_layers
  override is accepted and gives the same loss."""
  workdir = str(flipped[from_scanned])
  mesh = shd.make_mesh(config(False))
  native, _ = state_lib.restore_model(workdir, config(from_scanned), mesh, step=N)
  other, _ = state_lib.restore_model(workdir, config(not from_scanned), mesh, step=N)
  assert layout_convert.is_scanned(params(other)) is (not from_scanned)
  assert_same_params(params(native), params(other), rtol=0, atol=0)
  tokens = np.arange(1, 17, dtype=np.int32).reshape(2, 8) % 20 + 1
  np.testing.assert_allclose(other(tokens), native(tokens), atol=2e-5)

  request = config(from_scanned)  # the newest checkpoint (2N) has the other layout; ask for the first one
  as_saved = evaluation.restore(request, workdir)
  converted = evaluation.restore(request, workdir, overrides=['model.scan_layers'])
  assert bool(as_saved.config.model.scan_layers) is (not from_scanned)
  assert bool(converted.config.model.scan_layers) is from_scanned
  assert layout_convert.is_scanned(params(converted.model)) is from_scanned
  a, b = evaluation.score_split(as_saved, 'validation')[0], evaluation.score_split(converted, 'validation')[0]
  assert b['loss'] == pytest.approx(a['loss'], rel=1e-5)


@pytest.mark.parametrize('from_scanned', [False, True])
def test_init_from_a_workdir_of_the_other_layout(references, from_scanned):
  base = str(references[from_scanned])
  c = config(not from_scanned)
  c.checkpoint.init_from = base
  c.model.vocab_size = ckpt_lib.saved_config(base)['model']['vocab_size']
  mesh = shd.make_mesh(c)
  _, target, _ = state_lib.abstract_model(c, mesh)
  loaded = state_lib.init_from_params(c, target)
  assert layout_convert.is_scanned(nnx.to_pure_dict(loaded)) is (not from_scanned)
  leaf = jax.tree.leaves(loaded)[0]
  assert leaf.sharding == jax.tree.leaves(target)[0].sharding
  saved, _ = state_lib.restore_model(base, config(from_scanned), mesh)
  assert_same_params(params(saved), nnx.to_pure_dict(loaded), rtol=0, atol=0)


def test_peft_run_resumes_in_the_other_layout(references, tmp_path):
  """A LoRA run (its checkpoints hold only the LoRA factors inside the blocks) on an unrolled base, started
  scanned and resumed unrolled, continues as the uninterrupted scanned run."""
  def lora(scanned):
    c = config(scanned)
    c.peft.update(method='lora', targets='attention', rank=4)
    c.checkpoint.init_from = str(references[False])
    c.train.learning_rate = 3e-2
    return c
  straight, flipped_run = tmp_path / 'straight', tmp_path / 'flipped'
  run(lora(True), str(straight))
  run(lora(True), str(flipped_run), stop_after_steps=N)
  run(lora(False), str(flipped_run))
  steps = range(N + 1, 2 * N + 1)
  np.testing.assert_allclose(losses(flipped_run, steps), losses(straight, steps), rtol=2e-5, atol=2e-5)
  mesh = shd.make_mesh(lora(True))
  a, _ = state_lib.restore_model(str(straight), lora(True), mesh)
  b, _ = state_lib.restore_model(str(flipped_run), lora(True), mesh)  # written unrolled, read scanned
  lora_a = params(b)['decoder']['blocks']['layers']['attn']['lora']['query']['a']
  assert lora_a.shape[0] == 2 and np.abs(np.asarray(lora_a)).max() > 0
  assert_same_params(params(a), params(b), rtol=1e-4, atol=1e-5)


def test_a_seed_based_peft_run_keeps_its_layout(tmp_path):
  """The seed's initialisation differs per layout, so a PEFT run whose base is the seed cannot flip: one line."""
  from jaxformer import resolve
  c = config(False)
  c.peft.update(method='lora', targets='attention', rank=4)
  run(c, str(tmp_path), stop_after_steps=1)
  c.model.scan_layers = True
  with pytest.raises(WorkdirError, match="seed's initialisation.*model.scan_layers=False"):
    resolve.check_saved_run(ml_collections.ConfigDict(c.to_dict()), str(tmp_path))


def test_convert_tree_moves_a_whole_train_state_and_back():
  """params, optimizer state and typed rng keys: unrolled -> scanned -> unrolled is the identity."""
  c = config(False)
  c.model.vocab_size = 26
  mesh = shd.make_mesh(c)
  from jaxformer.training import optimizer
  tx, schedule = optimizer.make_optimizer(c.train)
  setup = state_lib.make_setup(c, mesh, tx, schedule)
  state = state_lib.initial_state(c, setup)
  other = state_lib.in_layout(c, True)
  scanned_abstract = state_lib.make_setup(other, mesh, tx, schedule).abstract_state
  scanned = ckpt_lib.convert_restored(state, scanned_abstract)
  assert layout_convert.tree_is_scanned(scanned) is True
  mu = scanned['opt_state'][1][0].mu['decoder']['blocks']['layers']['attn']['query'][...]
  assert mu.shape[0] == 2
  back = ckpt_lib.convert_restored(scanned, setup.abstract_state)
  as_data = lambda t: jax.tree.map(lambda x: jax.random.key_data(x) if ckpt_lib._is_key(x) else x, t)  # noqa: E731
  jax.tree.map(np.testing.assert_array_equal, as_data(back), as_data(state))
