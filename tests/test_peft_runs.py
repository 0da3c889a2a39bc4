"""PEFT runs end to end: a LoRA run adapts a finished base run (checkpoint.init_from), stores only what trains,
resumes exactly, and eval.py re-reads the base; bad peft values are one line from train.py."""
import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from flax import nnx

from jaxformer import peft
from jaxformer.training import state as state_lib
from jaxformer.apps import evaluate as evaluation
from jaxformer import sharding as shd
from jaxformer.training import checkpoint as ckpt_lib
from jaxformer.apps.train import run
from jaxformer.training.writers import read_metrics
from tests.test_train import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def base_config(**train):
  config = tiny('gpt_tiny', **train)
  config.model.update(d_model=128, d_ff=256, num_heads=4)  # big enough that checkpoint sizes mean something
  return config


@pytest.fixture(scope='module')
def base_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('base')
  run(base_config(num_steps=10, eval_every=10), str(workdir))
  return workdir


def lora_config(base, **train):
  config = base_config(num_steps=8, eval_every=8, **train)
  config.seed = 7  # another seed: the base parameters must come from init_from, not from the initialisation
  config.peft.update(method='lora', targets='attention', rank=4)
  config.checkpoint.init_from = str(base)
  return config


def dir_bytes(path):
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def params_of(workdir, config):
  config = ml_collections.ConfigDict(config)
  model, _ = state_lib.restore_model(str(workdir), config, shd.make_mesh(config))
  return {'/'.join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_lora_run_stores_only_what_trains_resumes_exactly_and_evaluates_on_its_base(base_run, tmp_path):
  straight, resumed = tmp_path / 'straight', tmp_path / 'resumed'
  config = lora_config(base_run)
  run(config, str(straight))
  run(config, str(resumed), stop_after_steps=4)
  run(config, str(resumed))

  # exact resume: the same rows after the resume point (the step-5 row averages steps 1-5 only when run straight)
  rows = lambda d: [(r['step'], r.get('train_loss'), r.get('eval_loss'))  # noqa: E731
                    for r in read_metrics(str(d)) if r['step'] > 5]
  assert rows(straight) == rows(resumed) and len(rows(straight)) == 2

  # the checkpoint holds the LoRA factors and their Adam moments only
  base_ckpt = os.path.join(ckpt_lib.checkpoint_dir(str(base_run)), '10')
  lora_ckpt = os.path.join(ckpt_lib.checkpoint_dir(str(straight)), '8')
  assert dir_bytes(lora_ckpt) < 0.25 * dir_bytes(base_ckpt), (dir_bytes(lora_ckpt), dir_bytes(base_ckpt))

  # restore re-reads the base: its parameters are the base run's, bit for bit; the LoRA factors moved
  saved = json.load(open(straight / 'config.json'))
  base_params = params_of(base_run, json.load(open(base_run / 'config.json')))
  adapted = params_of(straight, saved)
  for key, value in params_of(resumed, saved).items():
    np.testing.assert_array_equal(adapted[key], value, err_msg=key)
  for key, value in base_params.items():
    np.testing.assert_array_equal(adapted[key], value, err_msg=key)
  assert any(np.abs(v).max() > 0 for k, v in adapted.items() if k.endswith('/b'))
  first = read_metrics(str(straight))[0]  # the parameter counts, LoRA on q,k,v,out: rank x (in + out) each
  m = config.model
  h = m.d_model // m.num_heads
  kv = m.num_heads if m.num_kv_heads == -1 else m.num_kv_heads
  assert first['num_params'] == sum(v.size for v in adapted.values())
  assert first['num_trainable_params'] == config.peft.rank * (
      (m.d_model + m.num_heads * h) + 2 * (m.d_model + kv * h) + (m.num_heads * h + m.d_model))

  # eval.py's score equals the eval_loss training logged (same base + adapter)
  logged = [r for r in read_metrics(str(straight)) if 'eval_loss' in r][-1]
  results = evaluation.run(config, str(straight), bleu=False)
  assert results['loss'] == pytest.approx(logged['eval_loss'], rel=1e-6)

  # decoding reads the same base + adapter
  config.decode.update(method='greedy', max_len=4)
  generated = evaluation.run(config, str(straight), mode='generate', prompt='ab')
  assert len(generated['outputs']) == 1 and len(generated['outputs'][0]) > 0

  # merged export = plain base-model parameters
  model, _ = state_lib.restore_model(str(straight), ml_collections.ConfigDict(saved),
                                    shd.make_mesh(ml_collections.ConfigDict(saved)))
  merged = peft.merge(model, ml_collections.ConfigDict(saved).peft)
  assert set('/'.join(map(str, p)) for p, _ in nnx.to_flat_state(merged)) == set(base_params)


@pytest.mark.parametrize('arg,expected', [
    ('--config.peft.rank=0', 'peft.rank'),
    ('--config.peft.targets=attention,ffn', "unknown target 'ffn'"),
    ('--config.checkpoint.init_from=/nonexistent/run', 'checkpoint.init_from'),
])
def test_train_py_bad_peft_value_is_one_line(arg, expected, tmp_path):
  out = subprocess.run(
      [sys.executable, 'train.py', '--config=configs/gpt_tiny.py', f'--workdir={tmp_path}',
       '--config.peft.method=lora', arg, '--config.model.num_layers=1', '--config.train.num_steps=2',
       '--config.mesh.data=1'],
      cwd=REPO, capture_output=True, text=True, timeout=300,
      env={**{k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}, 'JAX_PLATFORMS': 'cpu'})
  assert out.returncode != 0
  lines = [line for line in out.stderr.splitlines() if line.strip() and not line.startswith('WARNING')]
  assert len(lines) == 1 and 'Traceback' not in out.stderr, out.stderr
  assert expected in lines[0], lines[0]
