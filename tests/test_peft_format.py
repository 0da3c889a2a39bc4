"""LoRA adapters in Hugging Face peft's format (jaxformer/hf/peft_format.py), and several adapters on one base.

Reference numbers: tests/fixtures/peft/make_reference.py made peft LoRA adapters with random nonzero A and B on the
tiny fixtures of tests/fixtures/hf (gpt2: fused c_attn + Conv1D; llama: all projections; llama_lora_qv: rslora
with rank_pattern / alpha_pattern; t5 v1.1: self + cross attention and the gated MLP) and the logits peft +
transformers give with them. That peft loads what jaxformer exports, with jaxformer's logits, was checked offline
by the same script's `check` mode on tests/fixtures/peft/make_exports.py's directories: the result is in
tests/fixtures/peft/check_result.txt. No torch here. Runtime: about 70 s of CPU (three CLI runs: train + export
--adapter, eval.py with two adapters) on 2 cores.
"""
import json
import os
import pathlib
import subprocess
import sys
import types

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxformer import decoding, hf
from jaxformer import peft as peft_lib
from jaxformer.config import ConfigError
from jaxformer.hf import peft_format, weights

REPO = pathlib.Path(__file__).resolve().parents[1]
PEFT_FIXTURES = REPO / 'tests' / 'fixtures' / 'peft'
HF_FIXTURES = REPO / 'tests' / 'fixtures' / 'hf'
ADAPTERS = ('gpt2_lora', 'llama_lora', 'llama_lora_qv', 't5_lora')
ENV = {**{k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}, 'JAX_PLATFORMS': 'cpu'}


def expected(name: str) -> dict:
  with open(PEFT_FIXTURES / name / 'expected.json', encoding='utf-8') as f:
    return json.load(f)


_BASES = {}


def base(name: str):
  """(model section, base model) of a tests/fixtures/hf directory, loaded once per session (never modified)."""
  if name not in _BASES:
    _BASES[name] = hf.load(str(HF_FIXTURES / name))
  return _BASES[name]


def with_lora(section, adapters: list, weights_: list[float]):
  """A fresh copy of the base with a LoRA holding `adapters` combined with `weights_` (peft_format.combine)."""
  model = nnx.clone(base_of(section))
  lora_keys = peft_format.lora_section(adapters)
  peft = types.SimpleNamespace(dropout=0.0, **lora_keys)
  peft_lib.attach(model, peft, nnx.Rngs(params=3, dropout=4))
  shapes = {k: v.shape for k, v in hf.model_params(model).items()}
  values = peft_format.combine(list(zip(adapters, weights_)), peft.alpha / peft.rank,
                               peft_format.lora_kernels(shapes), zeros_for_missing=True)
  flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  for path, variable in flat.items():
    key = '.'.join(map(str, path))
    if key in values:
      variable.set_value(jnp.asarray(values[key]))
  nnx.update(model, nnx.from_flat_state(flat))
  return model, peft


def base_of(section):
  return next(model for s, model in _BASES.values() if s is section)


def logits_of(model, e: dict) -> np.ndarray:
  ids = jnp.asarray(e['input_ids'])
  if 'decoder_input_ids' in e:
    return np.asarray(model(ids, jnp.asarray(e['decoder_input_ids'])))
  return np.asarray(model(ids))


def read(name: str) -> tuple:
  section, _ = base(expected(name)['base'])
  return section, peft_format.read(str(PEFT_FIXTURES / name), section)


# ------------------------------------------------------------------------------------------------- import
@pytest.mark.parametrize('name', ADAPTERS)
def test_imported_adapter_gives_peft_logits(name):
  """Base + the imported factors = what peft + transformers computed (the adapters move the logits by 6-10)."""
  e = expected(name)
  section, adapter = read(name)
  model, _ = with_lora(section, [adapter], [1.0])
  want = np.asarray(e['logits'], np.float32).reshape(e['logits_shape'])
  got = logits_of(model, e)[..., :want.shape[-1]]
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
  assert np.abs(logits_of(base_of(section), e)[..., :want.shape[-1]] - want).max() > 1.0  # the adapter matters


def test_gpt2_c_attn_shares_one_a_across_q_k_v():
  _, adapter = read('gpt2_lora')
  a = {k.rsplit('.', 1)[-1]: v[0] for k, v in adapter.factors.items() if k.startswith('decoder.blocks.0.attn.')}
  np.testing.assert_array_equal(a['query'], a['key'])
  np.testing.assert_array_equal(a['query'], a['value'])
  assert adapter.targets == ('query', 'key', 'value', 'out', 'wi', 'wo')


def test_rslora_and_rank_pattern_scales():
  """llama_lora_qv: r=2, alpha 4, use_rslora; v_proj has rank 3 and alpha 6 (rank_pattern / alpha_pattern)."""
  _, adapter = read('llama_lora_qv')
  q = adapter.factors['decoder.blocks.0.attn.query']
  v = adapter.factors['decoder.blocks.0.attn.value']
  assert q[0].shape[-1] == 2 and v[0].shape[-1] == 3
  assert q[2] == pytest.approx(4 / np.sqrt(2)) and v[2] == pytest.approx(6 / np.sqrt(3))
  assert peft_format.lora_section([adapter])['rank'] == 3


# ------------------------------------------------------------------------------------------------- export
def _params_of(section, adapter) -> tuple[dict, types.SimpleNamespace]:
  model, peft = with_lora(section, [adapter], [1.0])
  return hf.model_params(model), peft


@pytest.mark.parametrize('name', ['gpt2_lora', 'llama_lora', 't5_lora'])
def test_export_equals_the_imported_adapter_tensor_by_tensor(name, tmp_path):
  section, adapter = read(name)
  params, peft = _params_of(section, adapter)
  peft_format.write_lora(str(tmp_path), params, section, rank=peft.rank, alpha=peft.alpha)
  original = weights.read_file(str(PEFT_FIXTURES / name / peft_format.WEIGHTS_NAME))
  exported = weights.read_file(str(tmp_path / peft_format.WEIGHTS_NAME))
  assert sorted(exported) == sorted(original)
  for key, value in original.items():
    np.testing.assert_allclose(exported[key], value, atol=1e-7, err_msg=key)
  with open(PEFT_FIXTURES / name / peft_format.CONFIG_NAME) as f:
    want = json.load(f)
  with open(tmp_path / peft_format.CONFIG_NAME) as f:
    got = json.load(f)
  for key in ('peft_type', 'r', 'lora_alpha', 'use_rslora', 'fan_in_fan_out', 'bias', 'task_type'):
    assert got[key] == want[key], key
  assert sorted(got['target_modules']) == sorted(want['target_modules'])


def _deltas(adapter) -> dict[str, np.ndarray]:
  return {k: s * np.matmul(a.reshape(-1, a.shape[-1]), b.reshape(b.shape[0], -1))
          for k, (a, b, s) in adapter.factors.items()}


def test_gpt2_export_with_different_q_k_v_factors_is_the_exact_block_form(tmp_path):
  """After training, q, k and v have their own A: c_attn is written with rank 3r (A stacked, B block-diagonal)
  and rank_pattern / alpha_pattern keep its scaling alpha / r; reading it back gives the same updates."""
  section, adapter = read('gpt2_lora')
  params, peft = _params_of(section, adapter)
  rng = np.random.default_rng(0)
  for key in [k for k in params if '.lora.key.a' in k]:
    params[key] = rng.normal(size=params[key].shape).astype(np.float32)
  peft_format.write_lora(str(tmp_path), params, section, rank=peft.rank, alpha=peft.alpha)
  with open(tmp_path / peft_format.CONFIG_NAME) as f:
    config = json.load(f)
  assert config['rank_pattern'] == {'c_attn': 12} and config['alpha_pattern'] == {'c_attn': 24.0}
  back = peft_format.read(str(tmp_path), section)
  changed = {k: (params[peft_format.factor_paths(k)[0]], params[peft_format.factor_paths(k)[1]], peft.alpha / peft.rank)
             for k in adapter.factors}
  want = _deltas(types.SimpleNamespace(factors=changed))
  got = _deltas(back)
  assert sorted(got) == sorted(want)
  for key in want:
    np.testing.assert_allclose(got[key], want[key], atol=1e-5, err_msg=key)


def test_rank_pattern_adapter_exports_the_same_updates(tmp_path):
  section, adapter = read('llama_lora_qv')
  params, peft = _params_of(section, adapter)
  peft_format.write_lora(str(tmp_path), params, section, rank=peft.rank, alpha=peft.alpha)
  got, want = _deltas(peft_format.read(str(tmp_path), section)), _deltas(adapter)
  for key in want:
    np.testing.assert_allclose(got[key], want[key], atol=1e-5, err_msg=key)


# ------------------------------------------------------------------------------------------ bad adapters
def _adapter_dir(tmp_path, name='llama_lora', **changes) -> str:
  directory = tmp_path / 'adapter'
  directory.mkdir()
  with open(PEFT_FIXTURES / name / peft_format.CONFIG_NAME) as f:
    config = json.load(f)
  config.update(changes)
  with open(directory / peft_format.CONFIG_NAME, 'w') as f:
    json.dump(config, f)
  tensors = dict(weights.read_file(str(PEFT_FIXTURES / name / peft_format.WEIGHTS_NAME)))
  weights.write_file(str(directory / peft_format.WEIGHTS_NAME), tensors)
  return str(directory)


@pytest.mark.parametrize('changes,message', [
    (dict(peft_type='IA3'), "peft_type 'IA3' is not read; jaxformer reads LORA"),
    (dict(use_dora=True), 'DoRA'),
    (dict(modules_to_save=['lm_head']), 'modules_to_save'),
    (dict(bias='all'), "bias='all'"),
])
def test_unsupported_adapters_are_one_line(changes, message, tmp_path):
  section, _ = base('llama')
  with pytest.raises(ConfigError, match=message) as e:
    peft_format.read(_adapter_dir(tmp_path, **changes), section)
  assert '\n' not in str(e.value)


def test_adapter_of_another_base_is_one_line():
  section, _ = base('gpt2')
  with pytest.raises(ConfigError, match='not an attention or MLP projection of this gpt2 model'):
    peft_format.read(str(PEFT_FIXTURES / 'llama_lora'), section)


# -------------------------------------------------------------------------------------- several adapters
def _merged(section, deltas: dict[str, np.ndarray]):
  """The base with W + delta folded into the kernels (no LoRA modules): the reference for adapter choice."""
  model = nnx.clone(base_of(section))
  flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  for path, variable in flat.items():
    key = '.'.join(map(str, path))
    if key in deltas:
      w = np.asarray(variable.get_value())
      flat[path] = variable.replace(jnp.asarray(w + deltas[key].reshape(w.shape)))
  nnx.update(model, nnx.from_flat_state(flat))
  return model


def test_chosen_adapter_decodes_as_that_adapter_merged():
  """Two adapters on one llama base (rank 4 + 3 blocks): picking one (weights 1, 0) gives the greedy tokens and
  logits of the base with that adapter merged (peft.merge of the model), and picking the other differs."""
  (section, a), (_, b) = read('llama_lora'), read('llama_lora_qv')
  e = expected('llama_lora')
  prompt = np.asarray(e['input_ids'])[:, :3]
  outputs = {}
  for name, w in (('a', [1.0, 0.0]), ('b', [0.0, 1.0])):
    model, peft = with_lora(section, [a, b], w)
    merged = nnx.clone(base_of(section))
    nnx.update(merged, peft_lib.merge(model, peft))
    want = decoding.greedy(merged, prompt, max_new_tokens=6, eos_id=-1)
    got = decoding.greedy(model, prompt, max_new_tokens=6, eos_id=-1)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    np.testing.assert_allclose(logits_of(model, e), logits_of(merged, e), atol=1e-4)
    single = _merged(section, _deltas(a if name == 'a' else b))  # the adapter alone, merged in numpy
    np.testing.assert_allclose(logits_of(model, e), logits_of(single, e), atol=1e-4)
    outputs[name] = np.asarray(got)
  assert not np.array_equal(outputs['a'], outputs['b'])


def test_weighted_combination_is_the_weighted_sum_of_the_updates():
  """peft.adapter_weights a:0.7,b:-0.4 = base + 0.7 * s_a A_a B_a - 0.4 * s_b A_b B_b (not LoRA on averaged A, B)."""
  (section, a), (_, b) = read('llama_lora'), read('llama_lora_qv')
  e = expected('llama_lora')
  model, _ = with_lora(section, [a, b], [0.7, -0.4])
  da, db = _deltas(a), _deltas(b)
  deltas = {k: 0.7 * da.get(k, 0.0) - 0.4 * db.get(k, 0.0) for k in set(da) | set(db)}
  np.testing.assert_allclose(logits_of(model, e), logits_of(_merged(section, deltas), e), atol=1e-4)


def test_adapter_weights_and_names_are_checked():
  peft = types.SimpleNamespace(adapter='', adapters='a:x,b:y', adapter_weights='a:1,c:2', adapter_name='',
                               method='none')
  with pytest.raises(ConfigError, match="names 'c', which peft.adapters lacks"):
    peft_format.chosen_weights(peft, ('a', 'b'))
  peft.adapter_weights = ''
  assert peft_format.chosen_weights(peft, ('a', 'b')) == {'a': 1.0, 'b': 0.0}
  assert peft_format.chosen_weights(peft, ('a', 'b'), 'b') == {'a': 0.0, 'b': 1.0}
  with pytest.raises(ConfigError, match='is not name:dir'):
    peft_format.named_values('peft.adapters', 'a=x', 'dir')


# ----------------------------------------------------------------------------------- the command lines
def _cli(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600, env=ENV)


def _error_lines(out: subprocess.CompletedProcess) -> list[str]:
  return [line for line in out.stderr.splitlines() if line.strip() and not line.startswith('WARNING')]


def test_train_from_a_peft_adapter_then_export_it_back(tmp_path):
  """train.py --config.peft.adapter=DIR starts the LoRA from the adapter (rank, alpha, targets from its config);
  `python -m jaxformer.hf export --adapter` writes it back as peft's files (one step at lr 1e-9 changes nothing
  visible)."""
  text = tmp_path / 'text.txt'
  text.write_text('First Citizen:\nBefore we proceed any further, hear me speak.\n' * 20)
  workdir, out = tmp_path / 'run', tmp_path / 'adapter_out'
  llama = HF_FIXTURES / 'llama'
  run = _cli('train.py', f'--config=configs/hf.py:{llama}', f'--workdir={workdir}', f'--config.data.source=text:{text}',
             f'--config.peft.adapter={PEFT_FIXTURES / "llama_lora"}', '--config.train.learning_rate=1e-9',
             '--config.train.num_steps=1', '--config.train.batch_size=2', '--config.data.seq_len=16',
             '--config.train.eval_steps=1', '--config.checkpoint.async_save=False')
  assert run.returncode == 0, run.stderr[-2000:]
  assert "peft.rank=4, peft.alpha=8.0" in run.stdout
  export = _cli('-m', 'jaxformer.hf', 'export', f'--workdir={workdir}', f'--output={out}', '--adapter')
  assert export.returncode == 0, export.stderr[-2000:]
  assert 'wrote a peft LoRA adapter on 14 modules' in export.stdout
  original = weights.read_file(str(PEFT_FIXTURES / 'llama_lora' / peft_format.WEIGHTS_NAME))
  exported = weights.read_file(str(out / peft_format.WEIGHTS_NAME))
  assert sorted(exported) == sorted(original)
  for key, value in original.items():
    np.testing.assert_allclose(exported[key], value, atol=1e-6, err_msg=key)
  with open(out / peft_format.CONFIG_NAME) as f:
    config = json.load(f)
  assert (config['peft_type'], config['r'], config['lora_alpha'], config['task_type']) == ('LORA', 4, 8.0, 'CAUSAL_LM')
  assert config['base_model_name_or_path'] == str(llama)


def test_eval_generate_picks_an_adapter_per_prompt(tmp_path):
  """Two adapters on one base, loaded once; each .jsonl line's "adapter" picks one, a line without one gets
  peft.adapter_name's. (That a chosen adapter decodes as itself merged: test_chosen_adapter_decodes_as_...)"""
  rows = tmp_path / 'rows.jsonl'
  rows.write_text(''.join(json.dumps(r) + '\n' for r in (
      {'prompt': 'First Citizen:', 'adapter': 'a'}, {'prompt': 'First Citizen:', 'adapter': 'b'},
      {'prompt': 'First Citizen:'}, {'prompt': 'Before we', 'adapter': 'a'})))
  output = tmp_path / 'out.jsonl'
  run = _cli('eval.py', f'--config=configs/hf.py:{HF_FIXTURES / "llama"}', f'--workdir={tmp_path / "w"}',
             '--mode=generate', f'--input={rows}', f'--output={output}', '--config.decode.max_len=8',
             f'--config.peft.adapters=a:{PEFT_FIXTURES / "llama_lora"},b:{PEFT_FIXTURES / "llama_lora_qv"}',
             '--config.peft.adapter_name=b')
  assert run.returncode == 0, run.stderr[-2000:]
  got = [json.loads(line) for line in output.read_text().splitlines()]
  assert [g['adapter'] for g in got] == ['a', 'b', '', 'a']
  assert got[0]['output'] != got[1]['output']
  assert got[2]['output'] == got[1]['output']  # adapter_name=b


def test_adapter_for_another_base_is_one_line_at_start_up():
  from configs import hf as hf_recipe  # pylint: disable=import-outside-toplevel
  from jaxformer import resolve  # pylint: disable=import-outside-toplevel
  config = hf_recipe.get_config(str(HF_FIXTURES / 'llama'))
  config.peft.adapter = str(PEFT_FIXTURES / 'gpt2_lora')
  with pytest.raises(ConfigError, match='transformer.h.0.attn.c_attn, which is not an attention or MLP projection of '
                                        'this llama model') as e:
    resolve.checked_config(config)
  assert '\n' not in str(e.value)


@pytest.mark.parametrize('peft_section,model,message', [
    ({'method': 'prompt'}, {}, 'is a peft.method=prompt run'),
    ({'method': 'lora', 'train_extra': 'norm'}, {}, "peft.train_extra='norm'"),
    ({'method': 'lora'}, {'head': 'reward'}, 'model.head=reward'),
])
def test_export_adapter_refuses_what_a_lora_adapter_cannot_hold(peft_section, model, message, tmp_path):
  from jaxformer.apps import export  # pylint: disable=import-outside-toplevel
  (tmp_path / 'config.json').write_text(json.dumps({'peft': peft_section, 'model': model}))
  with pytest.raises(ConfigError, match=message) as e:
    export.export_adapter(str(tmp_path), str(tmp_path / 'out'))
  assert '\n' not in str(e.value)
