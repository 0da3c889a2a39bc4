"""peft.quantize (QLoRA's quantised frozen base, jaxformer/peft/quantize.py): NF4 / double quantisation / int8 equal
bitsandbytes (numbers committed by tests/fixtures/quant/make_reference.py), the round-trip error stays within its
bound, the quantised arrays keep the kernel's axis names, a LoRA run on an nf4 base from checkpoint.init_from (train.py)
starts at the full-precision base's loss and learns, stores only the trainables, evaluates, decodes and exports, and
bad values are one line."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from jaxformer import peft
from jaxformer import sharding as shd
from jaxformer.apps import evaluate as evaluation
from jaxformer.apps.train import run
from jaxformer.config import ConfigError, validate
from jaxformer.peft import quantize
from jaxformer.training import checkpoint as ckpt_lib
from jaxformer.training import state as state_lib
from jaxformer.training.writers import read_metrics
from tests.test_train import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = os.path.join(REPO, 'tests', 'fixtures', 'quant', 'bnb_reference.npz')
ENV = {**{k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}, 'JAX_PLATFORMS': 'cpu'}


@pytest.fixture(scope='module')
def ref():
  return dict(np.load(REFERENCE))


def test_nf4_and_double_quantisation_equal_bitsandbytes(ref):
  np.testing.assert_array_equal(quantize.NF4_CODE, ref['nf4_code'])
  np.testing.assert_allclose(quantize.DYNAMIC_CODE, ref['dynamic_code'], rtol=0, atol=6e-8)
  x = jnp.asarray(ref['x'])
  plain = quantize.nf4_quantize(x, 64, double=False)
  np.testing.assert_array_equal(np.asarray(plain['codes']), ref['nf4_packed'])
  np.testing.assert_array_equal(np.asarray(plain['absmax']), ref['nf4_absmax'])
  np.testing.assert_array_equal(np.asarray(quantize.nf4_dequantize(plain, x.size, 64)), ref['nf4_dequant'])
  double = quantize.nf4_quantize(x, 64, 256)
  np.testing.assert_array_equal(np.asarray(double['codes']), ref['dq_packed'])
  np.testing.assert_array_equal(np.asarray(double['absmax_codes']), ref['dq_absmax_codes'])
  np.testing.assert_array_equal(np.asarray(double['absmax_scale']), ref['dq_absmax2'])
  np.testing.assert_array_equal(np.asarray(double['absmax_offset']), ref['dq_offset'])
  # the dequantised absmax differs from bitsandbytes' only through the dynamic map's last-bit entries
  np.testing.assert_allclose(np.asarray(quantize.nf4_dequantize(double, x.size, 64, 256)), ref['dq_dequant'],
                             rtol=0, atol=1e-8)


def test_int8_per_channel_equals_bitsandbytes_vectorwise(ref):
  q = quantize.int8_quantize(jnp.asarray(ref['w']).T)  # ours is [in, out]; bitsandbytes quantises torch's rows
  np.testing.assert_array_equal(np.asarray(q['codes']).T, ref['int8_codes'])
  np.testing.assert_array_equal(np.asarray(q['scale']), ref['int8_scale'])


def test_round_trip_error_within_bounds(ref):
  x = np.asarray(ref['x'])
  blocks = np.pad(x, (0, -x.size % 64)).reshape(-1, 64)
  absmax = np.repeat(np.abs(blocks).max(-1), 64)[:x.size]
  error = np.abs(np.asarray(quantize.nf4_dequantize(quantize.nf4_quantize(jnp.asarray(x)), x.size)) - x)
  half_gap = np.diff(quantize.NF4_CODE).max() / 2  # the nearest code is at most half the widest gap away
  stats_error = np.abs(ref['dq_dequant'] - ref['nf4_dequant']).max()  # what double quantisation adds
  assert (error <= half_gap * absmax + stats_error + 1e-7).all()
  assert error.mean() < 0.1 * np.abs(x).mean()  # and typically far less than the bound
  w = jnp.asarray(ref['w'])
  back = np.asarray(quantize.int8_dequantize(quantize.int8_quantize(w)))
  assert (np.abs(back - ref['w']) <= np.abs(ref['w']).max(0) / 254 + 1e-7).all()


@pytest.mark.parametrize('kind', ['nf4', 'int8'])
def test_quantized_kernel_keeps_axis_names_and_layers(kind):
  section = ml_collections.ConfigDict(dict(method='lora', quantize=kind, quantize_block=64, quantize_stats_block=256))
  w = jax.random.normal(jax.random.key(0), (2, 8, 2, 32), jnp.float32) * 0.02  # stacked: [layers, embed, heads, kv]
  kernel = quantize.QuantizedKernel(w, ('layers', 'embed', 'heads', 'kv'), 1, 2, section, jnp.float32)
  names = {n: tuple(getattr(kernel, n).get_metadata()['out_sharding']) for n in kernel.array_names}
  if kind == 'nf4':
    assert kernel.codes[...].shape == (2, 8, 32) and kernel.codes[...].dtype == jnp.uint8
    assert names == {'codes': ('layers', 'embed', None), 'absmax_codes': ('layers', 'embed', None),
                     'absmax_scale': ('layers', None), 'absmax_offset': ('layers',)}
  else:
    assert kernel.codes[...].shape == w.shape and kernel.codes[...].dtype == jnp.int8
    assert names == {'codes': ('layers', 'embed', 'heads', 'kv'), 'scale': ('layers', 'heads', 'kv')}
  # each layer quantised on its own: the stacked dequantisation equals the per-layer one
  one = quantize.QuantizedKernel(w[1], ('embed', 'heads', 'kv'), 1, 0, section, jnp.float32)
  np.testing.assert_array_equal(np.asarray(kernel.dequantize()[1]), np.asarray(one.dequantize()))
  x = jax.random.normal(jax.random.key(1), (5, 8))
  np.testing.assert_allclose(np.asarray(one.matmul(x, jnp.float32)),
                             np.asarray(jnp.einsum('bd,dnh->bnh', x, one.dequantize())), rtol=1e-5, atol=1e-6)
  bound = 0.14 if kind == 'nf4' else 1 / 254  # relative to the block's / channel's absmax
  assert np.abs(np.asarray(kernel.dequantize()) - np.asarray(w)).max() <= bound * float(jnp.abs(w).max())


# ------------------------------------------------------------------------------------------------ runs
@pytest.fixture(scope='module')
def base_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('base')
  run(tiny('gpt_tiny', num_steps=4, log_every=4), str(workdir))
  return workdir


CLI_TINY = {'model.num_layers': 1, 'model.d_model': 32, 'model.num_heads': 2, 'model.d_ff': 64, 'model.max_len': 32,
            'data.seq_len': 32, 'data.prefetch': 1, 'mesh.data': 1, 'checkpoint.every_steps': 1000,
            'checkpoint.async_save': False, 'train.batch_size': 8, 'train.num_steps': 3, 'train.warmup_steps': 5,
            'train.learning_rate': 1e-2, 'train.log_every': 1, 'train.eval_every': 3, 'train.eval_steps': 2}  # tiny()


def lora_config(base, **train):
  config = tiny('gpt_tiny', **{'num_steps': 3, 'log_every': 1, 'eval_every': 3, **train})
  config.seed = 7
  config.peft.update(method='lora', targets='all', rank=4)
  config.checkpoint.init_from = str(base)
  return config


def losses(workdir):
  return [r['train_loss'] for r in read_metrics(str(workdir)) if 'train_loss' in r]


def test_qlora_run_from_init_from_learns_stores_trainables_evaluates_and_exports(base_run, tmp_path):
  full = tmp_path / 'lora'  # LoRA on the full-precision base: its first step's loss is all the comparison needs
  run(lora_config(base_run, num_steps=1, eval_every=1000), str(full))
  nf4 = tmp_path / 'qlora'
  out = subprocess.run(
      [sys.executable, 'train.py', '--config=configs/gpt_tiny.py', f'--workdir={nf4}', '--config.seed=7',
       '--config.peft.method=lora', '--config.peft.targets=all', '--config.peft.rank=4',
       '--config.peft.quantize=nf4', f'--config.checkpoint.init_from={base_run}',
       *[f'--config.{k}={v}' for k, v in CLI_TINY.items()]],
      cwd=REPO, capture_output=True, text=True, timeout=300, env=ENV)
  assert out.returncode == 0, out.stderr[-3000:]
  ours, reference = losses(nf4), losses(full)
  # same adapter init (B = 0): step 1's loss is the base's, up to the NF4 rounding of its kernels
  assert ours[0] == pytest.approx(reference[0], rel=0.02) and ours[0] != reference[0]
  assert ours[-1] < ours[0]

  # the checkpoint holds the trainables only: no codes, the same files as the full-precision-base run's
  saved = ml_collections.ConfigDict(json.load(open(nf4 / 'config.json')))
  assert saved.peft.quantize == 'nf4'
  stored = os.listdir(os.path.join(ckpt_lib.checkpoint_dir(str(nf4)), '3', 'params'))
  assert sorted(stored) == sorted(os.listdir(os.path.join(ckpt_lib.checkpoint_dir(str(full)), '1', 'params')))
  model, _ = state_lib.restore_model(str(nf4), saved, shd.make_mesh(saved))
  kernels = [m for _, m in nnx.iter_modules(model) if isinstance(m, quantize.QuantizedKernel)]
  assert len(kernels) == 7  # query, key, value, out, wi, wo in the one layer ... and no float copy of them
  assert {k.kind for k in kernels} == {'nf4'}

  # eval re-quantises the base identically: its loss is the run's logged eval_loss; decoding runs
  logged = [r for r in read_metrics(str(nf4)) if 'eval_loss' in r][-1]
  assert evaluation.run(saved, str(nf4), bleu=False)['loss'] == pytest.approx(logged['eval_loss'], rel=1e-5)
  saved.decode.update(method='greedy', max_len=4)
  assert len(evaluation.run(saved, str(nf4), mode='generate', prompt='ab')['outputs'][0]) > 0

  # export: LoRA folded into the dequantised base (W_nf4 + alpha/r A B), the plain base tree in param_dtype
  base_model, _ = state_lib.restore_model(str(base_run), ml_collections.ConfigDict(
      json.load(open(base_run / 'config.json'))), shd.make_mesh(saved))
  base = dict(nnx.to_flat_state(nnx.state(base_model, nnx.Param)))
  frozen = peft.split(nnx.state(model, nnx.Param), saved.peft)[1]
  assert quantize.param_bytes(frozen) < 0.6 * quantize.param_bytes(nnx.from_flat_state(base))
  attn = [m for _, m in nnx.iter_modules(model) if isinstance(getattr(m, 'query', None), quantize.QuantizedKernel)][0]
  dequantized = np.asarray(attn.query.dequantize(jnp.float32))
  a, b = np.asarray(attn.lora['query'].a[...]), np.asarray(attn.lora['query'].b[...])
  expected = dequantized + saved.peft.alpha / saved.peft.rank * (a.reshape(-1, 4) @ b.reshape(4, -1)).reshape(
      dequantized.shape)
  merged = dict(nnx.to_flat_state(peft.merge(model, saved.peft)))
  assert set(merged) == set(base)
  assert all(merged[p].get_value().dtype == base[p].get_value().dtype for p in base)
  query = [p for p in base if p[-1] == 'query'][0]
  np.testing.assert_allclose(np.asarray(merged[query].get_value()), expected, rtol=1e-5, atol=1e-7)
  w = np.asarray(base[query].get_value())
  assert 0 < np.abs(dequantized - w).max() <= 0.14 * np.abs(w).max()  # the base's own NF4 rounding


def test_bad_quantize_values_are_config_errors(base_run):
  for values, expected in [(dict(quantize='int8', method='none'), 'peft.method=none'),
                           (dict(quantize_block=48), 'peft.quantize_block=48'),
                           (dict(quantize='nf4', method='lora'), 'checkpoint.init_from')]:
    config = lora_config(base_run if 'quantize_block' in values else '')
    config.peft.update(**{'quantize': 'nf4', **values})
    with pytest.raises(ConfigError, match=expected):
      validate(config)


def test_train_py_bad_quantize_is_one_line(tmp_path):
  args, expected = ['--config.peft.method=lora', '--config.peft.quantize=nf3'], 'peft.quantize'
  out = subprocess.run(
      [sys.executable, 'train.py', '--config=configs/gpt_tiny.py', f'--workdir={tmp_path}', *args,
       '--config.model.num_layers=1', '--config.train.num_steps=2', '--config.mesh.data=1'],
      cwd=REPO, capture_output=True, text=True, timeout=300, env=ENV)
  assert out.returncode != 0
  lines = [line for line in out.stderr.splitlines() if line.strip() and not line.startswith('WARNING')]
  assert len(lines) == 1 and 'Traceback' not in out.stderr, out.stderr
  assert expected in lines[0], lines[0]
