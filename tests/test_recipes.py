"""Every recipe in configs/ loads, validates and builds; short CI-sized runs of the real-data recipes.

The real-data recipes read `../shared/data/...` relative to the repository root, so the smoke runs chdir there
and use the `shared_data` fixture (a missing data folder fails in CI rather than skipping).
"""
import importlib
import pathlib

import jax
import numpy as np
import pytest
from flax import nnx

from jaxformer.apps import evaluate as evaluation
from jaxformer.config import validate
from jaxformer.model import build_model
from jaxformer.apps.train import run
from jaxformer.cli import load_config_file
from jaxformer.training.writers import read_metrics

REPO = pathlib.Path(__file__).resolve().parents[1]
RECIPE_FILES = sorted(p.stem for p in (REPO / 'configs').glob('*.py') if p.stem not in ('__init__', 'default'))


# Recipes whose argument is a path rather than a named variant: the committed Hugging Face fixtures.
PATH_ARGS = {'hf': [str(REPO / 'tests' / 'fixtures' / 'hf' / name) for name in ('gpt2', 'bert', 't5_v1_1', 'llama')]}


def _variants(stem):
  if stem in PATH_ARGS:
    return PATH_ARGS[stem]
  module = importlib.import_module(f'configs.{stem}')
  return list(getattr(module, 'VARIANTS', {None: None}))


ALL = [(stem, v) for stem in RECIPE_FILES for v in _variants(stem)]


def _id(stem, variant):
  if stem in PATH_ARGS:
    return f'{stem}:{pathlib.Path(variant).name}'
  return f'{stem}:{variant}' if variant else stem


def _load(stem, variant):
  path = str(REPO / 'configs' / f'{stem}.py')
  return load_config_file(f'{path}:{variant}' if variant else path)


@pytest.mark.parametrize('stem,variant', ALL, ids=[_id(s, v) for s, v in ALL])
def test_recipe_loads_validates_and_builds(stem, variant):
  config = _load(stem, variant)
  if config.checkpoint.init_from and not (REPO / config.checkpoint.init_from).exists():
    config.checkpoint.init_from = ''  # a variant that starts from another recipe's run (preferences_tiny's runs/pref_sft)
  validate(config)
  if not config.model.vocab_size:
    config.model.vocab_size = 256
  model = nnx.eval_shape(lambda: build_model(config.model, rngs=nnx.Rngs(0)))
  params = nnx.state(model, nnx.Param)
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)) > 0


PUBLISHED_SHAPES = ('gpt2_small', 'bert_base', 't5_small', 'transformer_base')


def test_published_shapes_scan_their_layers_and_the_small_recipes_do_not():
  """model.scan_layers: on for the published shapes (compile time flat in depth), the default (off) elsewhere:
  the small CPU recipes have 1-6 layers, where the unrolled stack is as fast."""
  from configs import default
  off = bool(default.get_config().model.scan_layers)  # False, unless the suite runs with scan_layers forced on
  for stem, variant in ALL:
    assert bool(_load(stem, variant).model.scan_layers) is (stem in PUBLISHED_SHAPES or off), _id(stem, variant)


def test_unknown_variant_is_one_clear_error():
  for stem in ('shakespeare_char', 'multi30k_en_de', 'multi30k_mlm'):
    with pytest.raises(ValueError, match='unknown .* variant'):
      _load(stem, 'tpu9000')


def _smoke(config, num_steps, **train):
  config.mesh.update(data=1, fsdp=1, tensor=1, distributed='off')
  config.data.prefetch = 1
  config.checkpoint.update(every_steps=1000, async_save=False)
  k = config.train.get('steps_per_call', 1)  # the recipe's own steps per call: log as often as it allows
  config.train.update(num_steps=num_steps, log_every=k, eval_every=1000 * k, eval_steps=2, **train)
  return config


def _check_falls(workdir, num_steps, margin):
  rows = read_metrics(str(workdir))
  train = [r for r in rows if 'train_loss' in r]
  evals = [r for r in rows if 'eval_loss' in r]
  first = np.mean([r['train_loss'] for r in train[:3]])
  last = np.mean([r['train_loss'] for r in train[-3:]])
  assert last < first - margin, (first, last)
  assert evals and evals[-1]['step'] == num_steps and np.isfinite(evals[-1]['eval_loss'])
  return evals[-1]


@pytest.fixture
def at_repo_root(shared_data, monkeypatch):
  monkeypatch.chdir(REPO)
  return shared_data


def test_shakespeare_char_cpu_smoke(at_repo_root, tmp_path):
  config = _smoke(_load('shakespeare_char', 'cpu'), 30, warmup_steps=5, learning_rate=3e-3)
  run(config, str(tmp_path))
  _check_falls(tmp_path, 30, 0.5)


def test_multi30k_en_de_cpu_smoke_with_bleu(at_repo_root, tmp_path):
  config = _smoke(_load('multi30k_en_de', 'cpu'), 30, warmup_steps=10)
  config.model.update(num_layers=1, num_decoder_layers=1)
  config.data.vocab_size = 500  # a small SentencePiece model trains quickly
  config.decode.update(beam_size=2, max_len=16, batch_size=8)
  run(config, str(tmp_path))
  _check_falls(tmp_path, 30, 0.5)
  config.train.eval_steps = 1
  result = evaluation.run(config, str(tmp_path), split='test')
  assert 'bleu' in result and result['bleu'] >= 0.0
  assert 'sacrebleu_signature' in result and result['direction']


def test_multi30k_mlm_smoke(at_repo_root, tmp_path):
  config = _smoke(_load('multi30k_mlm', 'cpu'), 30, warmup_steps=5, batch_size=16)
  config.data.seq_len = config.model.max_len = 64
  run(config, str(tmp_path))
  last = _check_falls(tmp_path, 30, 0.3)
  assert 0.0 <= last['eval_accuracy'] <= 1.0
