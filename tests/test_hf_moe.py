"""Mixtral, Qwen2-MoE and OLMoE checkpoints in and out (jaxformer.hf, families.py), against numbers transformers
5.25 computed (tests/fixtures/hf/{mixtral,qwen2_moe,olmoe}, made by make_fixtures.py): logits, every MoE layer's
router logits (output_router_logits=True) and greedy tokens; the export round trip; model.qk_norm.

transformers loads what hf.save writes, with the same logits, checked by hand with tests/fixtures/hf/check_export.py
(make DIR moe / make DIR mixtral, then check; transformers 5.25.0; max |logits diff|): Mixtral-like 4.8e-6, Mixtral
with a window of 3 8.8e-6, Qwen2-MoE-like (q/k/v biases, MoE every 2nd layer, shared expert 2 wide, softmax_topk)
1.2e-5, OLMoE-like (qk_norm=projection, topk_softmax) 4.2e-6; fixtures re-saved: mixtral 6.0e-6, qwen2_moe 7.6e-6,
olmoe 2.9e-6.
"""
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxformer import decoding, hf
from jaxformer.errors import ConfigError
from jaxformer.hf import families, weights
from jaxformer.model import build_model
from tests.test_hf import ONE_DEVICE, random_model, tiny_section

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = REPO / 'tests' / 'fixtures' / 'hf'
MOE = ('mixtral', 'qwen2_moe', 'olmoe')


def expected(name: str) -> dict:
  with open(FIXTURES / name / 'expected.json', encoding='utf-8') as f:
    return json.load(f)


@pytest.fixture(scope='module')
def loaded():
  cache = {}

  def get(name):
    if name not in cache:
      cache[name] = hf.load(str(FIXTURES / name))
    return cache[name]
  return get


def test_sections_read_each_familys_settings(loaded):
  mixtral, qwen, olmoe = (loaded(n)[0] for n in MOE)
  assert (mixtral.num_experts, mixtral.experts_per_token, mixtral.router, mixtral.moe_every, mixtral.sliding_window,
          mixtral.qk_norm) == (4, 2, 'topk_softmax', 1, 0, 'none')
  assert (qwen.router, qwen.moe_every, qwen.num_shared_experts, qwen.moe_shared_gate, qwen.expert_d_ff, qwen.d_ff,
          qwen.qkv_bias) == ('topk_softmax', 2, 2, True, 24, 64, True)
  assert (olmoe.router, olmoe.qk_norm, olmoe.num_shared_experts) == ('softmax_topk', 'projection', 0)


@pytest.mark.parametrize('name', MOE)
def test_logits_and_router_logits_equal_transformers(name, loaded):
  """The output and each MoE layer's router logits ([MoE layers, B*T, E] in transformers' order: Qwen2-MoE's dense
  layers 0 and 2 have none)."""
  _, model = loaded(name)
  e = expected(name)
  logits, inter = model(jnp.asarray(e['input_ids']), return_intermediates=True)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(e['logits'], np.float32), atol=2e-5, rtol=1e-5)
  want = np.asarray(e['router_logits'], np.float32)
  got = np.asarray(inter['decoder']['router_logits'])
  assert got.shape[0] == want.shape[0] == 2 and got.shape[-1] == 4
  np.testing.assert_allclose(got.reshape(want.shape), want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize('name', MOE)
def test_greedy_decoding_equals_transformers_generate(name, loaded):
  _, model = loaded(name)
  e = expected(name)['generate']
  prompt, output = np.asarray(e['prompt']), np.asarray(e['output'])
  new = output[:, prompt.shape[1]:]
  got = decoding.greedy(model, prompt, max_new_tokens=new.shape[1], eos_id=2)
  np.testing.assert_array_equal(np.asarray(got), new)


@pytest.mark.parametrize('name', MOE)
def test_imported_fixture_saves_back_the_same_tensors(name, loaded, tmp_path):
  """Every tensor of the checkpoint, per expert as transformers 5.25 wrote it, comes back bit for bit; config.json
  reads back as the same model section."""
  section, model = loaded(name)
  assert hf.save(model, section, str(tmp_path)) == name
  original, saved = weights.read_dir(str(FIXTURES / name)), weights.read_dir(str(tmp_path))
  assert saved.keys() == original.keys()
  for key, value in saved.items():
    np.testing.assert_array_equal(value, original[key], err_msg=key)
  assert hf.model_section(str(tmp_path)).to_dict() == section.to_dict()


def test_fused_expert_layout_reads_the_same(loaded, tmp_path):
  """A file holding transformers' in-memory layout (mlp.experts.gate_up_proj [E, 2F, D], down_proj [E, D, F]), as
  other tools write it, gives the same parameters as the per-expert Hub layout."""
  fused = families.FAMILIES['olmoe'].from_disk(weights.read_dir(str(FIXTURES / 'olmoe')), None)
  assert fused['model.layers.1.mlp.experts.gate_up_proj'].shape == (4, 48, 32)
  assert not any('.experts.0.' in k for k in fused)
  for f in ('config.json',):
    (tmp_path / f).write_bytes((FIXTURES / 'olmoe' / f).read_bytes())
  weights.write_file(str(tmp_path / weights.WEIGHTS_NAME), fused)
  section = loaded('olmoe')[0]
  a, b = hf.load_params(str(FIXTURES / 'olmoe'), section), hf.load_params(str(tmp_path), section)
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize('overrides,model_type', [  # Mixtral- and OLMoE-like: check_export.py (module docstring)
    (dict(num_experts=4, num_layers=4, qkv_bias=True, moe_every=2, num_shared_experts=1, expert_d_ff=16,
          router='softmax_topk'), 'qwen2_moe'),
])
def test_jaxformer_moe_models_save_and_load_back(overrides, model_type, tmp_path):
  section = tiny_section(tie_embeddings=False, **overrides)
  model = random_model(section)
  assert hf.save(model, section, str(tmp_path)) == model_type
  before, after = hf.model_params(model), hf.load_params(str(tmp_path), section)  # same parameters: same function
  assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)
  read = hf.model_section(str(tmp_path))
  for key in overrides:
    assert read[key] == section[key], key


@pytest.mark.parametrize('overrides,message', [
    (dict(num_experts=4, router='softmax_topk'), 'closest family, mixtral, needs model.router'),
    (dict(num_experts=4, num_shared_experts=1, moe_shared_gate=False), r'mixtral, needs model.num_shared_experts=1 \(needs 0\)'),
    (dict(qk_norm='projection'), r"llama, needs model.qk_norm='projection' \(needs 'none'\)"),
    (dict(num_experts=4, qk_norm='head'), 'model.qk_norm'),
])
def test_moe_settings_no_family_has_are_one_line(overrides, message):
  section = tiny_section(**overrides)
  with pytest.raises(ConfigError, match=message) as e:
    hf.save(random_model(section), section, '/nonexistent-never-written')
  assert '\n' not in str(e.value)


@pytest.mark.parametrize('change,message', [
    ({'mlp_only_layers': [1]}, r'mlp_only_layers=\[1\] makes MoE layers \[3\]'),
    ({'shared_expert_intermediate_size': 30}, 'not a positive multiple of moe_intermediate_size=24'),
    ({'use_sliding_window': True}, 'use_sliding_window=true is not supported'),
    ({'hidden_act': 'gelu'}, "hidden_act='gelu' is not supported"),
])
def test_qwen2_moe_configs_without_counterpart_are_one_line(change, message, tmp_path):
  config = json.loads((FIXTURES / 'qwen2_moe' / 'config.json').read_text())
  (tmp_path / 'config.json').write_text(json.dumps({**config, **change}))
  with pytest.raises(ConfigError, match=message) as e:
    hf.model_section(str(tmp_path))
  assert '\n' not in str(e.value)


def test_missing_expert_is_one_line(tmp_path):
  tensors = dict(weights.read_dir(str(FIXTURES / 'qwen2_moe')))
  del tensors['model.layers.3.mlp.experts.2.up_proj.weight']
  (tmp_path / 'config.json').write_bytes((FIXTURES / 'qwen2_moe' / 'config.json').read_bytes())
  weights.write_file(str(tmp_path / weights.WEIGHTS_NAME), tensors)
  with pytest.raises(ConfigError, match='model.layers.3.: the experts') as e:
    hf.load(str(tmp_path))
  assert '\n' not in str(e.value)


# --------------------------------------------------------------------------------------------- model.qk_norm
@pytest.mark.parametrize('kind', ['projection', 'head'])
def test_qk_norm_normalises_queries_and_keys_before_rope(kind):
  """RMSNorm (model.norm, norm_eps) over each token's whole q / k projection, or over each head's vector with one
  [head_dim] scale; computed here with numpy from the projections."""
  section = tiny_section(qk_norm=kind, num_layers=1)
  model = random_model(section)
  attn = model.decoder.blocks[0].attn
  x = np.asarray(jax.random.normal(jax.random.key(3), (2, 5, 32)), np.float32)
  q = np.einsum('btd,dnh->btnh', x, np.asarray(attn.query[...]))
  k = np.einsum('btd,dnh->btnh', x, np.asarray(attn.key[...]))

  def rms(y, scale):
    if kind == 'projection':
      flat = y.reshape(*y.shape[:2], -1)
      out = flat / np.sqrt(np.mean(flat ** 2, -1, keepdims=True) + section.norm_eps) * scale
      return out.reshape(y.shape)
    return y / np.sqrt(np.mean(y ** 2, -1, keepdims=True) + section.norm_eps) * scale
  assert attn.q_norm.scale.shape == ((32,) if kind == 'projection' else (8,))
  assert attn.k_norm.scale.shape == ((16,) if kind == 'projection' else (8,))
  got_q = np.asarray(attn._normalise(attn._project(jnp.asarray(x), attn.query, None), 'q'))
  got_k, _ = attn.kv(jnp.asarray(x))
  np.testing.assert_allclose(got_q, rms(q, np.asarray(attn.q_norm.scale[...])), atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(got_k), rms(k, np.asarray(attn.k_norm.scale[...])), atol=1e-5, rtol=1e-5)


def test_qk_norm_bad_value_is_one_line():
  with pytest.raises(ConfigError, match='model.qk_norm') as e:
    build_model(tiny_section(qk_norm='layer'), rngs=nnx.Rngs(0))
  assert '\n' not in str(e.value)


# ------------------------------------------------------------------------------------ the CLI, end to end
def test_fine_tune_mixtral_then_export_round_trips(tmp_path, shared_data):
  """train.py --config=configs/hf.py:mixtral (checkpoint.init_from=hf:, its tokenizer) for 2 steps at a learning
  rate that moves no weight, then `python -m jaxformer.hf export`: the Hub layout back, every tensor equal."""
  fixture = FIXTURES / 'mixtral'
  run, out = tmp_path / 'run', tmp_path / 'hf'
  train = subprocess.run(
      [sys.executable, 'train.py', f'--config=configs/hf.py:{fixture}', f'--workdir={run}',
       '--config.train.num_steps=2', '--config.train.log_every=1', '--config.train.eval_every=2',
       '--config.train.eval_steps=1', '--config.checkpoint.every_steps=2', '--config.checkpoint.async_save=False',
       '--config.train.batch_size=4', '--config.data.seq_len=16', '--config.train.learning_rate=1e-30',
       f'--config.data.source=text:{shared_data / "tinyshakespeare" / "input.txt"}'],
      cwd=REPO, capture_output=True, text=True, timeout=600, env=ONE_DEVICE)
  assert train.returncode == 0, train.stderr[-3000:]
  rows = [json.loads(line) for line in (run / 'metrics.jsonl').read_text().splitlines()]
  assert any('train_expert_load/0' in row for row in rows)  # trained as a MoE model, router metrics logged
  assert any('eval_expert_load/0' in row and 'eval_moe_aux_loss' in row for row in rows)  # and evaluated
  export = subprocess.run([sys.executable, '-m', 'jaxformer.hf', 'export', f'--workdir={run}', f'--output={out}'],
                          cwd=REPO, capture_output=True, text=True, timeout=600, env=ONE_DEVICE)
  assert export.returncode == 0, export.stderr[-3000:]
  assert 'wrote mixtral checkpoint' in export.stdout
  original, exported = weights.read_dir(str(fixture)), weights.read_dir(str(out))
  assert exported.keys() == original.keys()
  assert all(np.array_equal(exported[k], original[k]) for k in original)
  assert json.loads((out / 'config.json').read_text())['architectures'] == ['MixtralForCausalLM']
