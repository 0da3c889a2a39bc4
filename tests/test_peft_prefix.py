"""Prefix tuning (jaxformer/peft/prefix.py) against references that know nothing of it: a prefix equal to the keys /
values the base model caches for some tokens gives the base model's logits with those tokens in front (every
position kind, scanned or not); packed segments each see the prefix; KV-cache decoding equals the no-cache path with
every method (decoder_only and encoder_decoder); the reparameterisation MLP merges away; peft 0.21.2's adapters
(tests/fixtures/peft_prefix, made by make_fixtures.py there) give peft's logits."""
import functools
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from jaxformer import decoding, hf, peft, settings
from jaxformer import sharding as shd
from jaxformer.apps.train import run
from jaxformer.errors import ConfigError
from jaxformer.hf import peft_format, weights
from jaxformer.model import build_model
from jaxformer.peft import prefix as prefix_lib
from jaxformer.settings import decode_settings
from jaxformer.training import state as state_lib
from jaxformer.training.writers import read_metrics
from tests.test_model import VOCAB, tiny_config
from tests.test_train import tiny

P = 3  # prefix tokens
REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = REPO / 'tests' / 'fixtures'
ENV = {**{k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}, 'JAX_PLATFORMS': 'cpu'}


def _cli(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600, env=ENV)


def _one_error_line(out: subprocess.CompletedProcess) -> str:
  """The one stderr line of a failed CLI run (asserting it failed, in one line, without a traceback)."""
  assert out.returncode != 0
  lines = [line for line in out.stderr.splitlines() if line.strip() and not line.startswith('WARNING')]
  assert len(lines) == 1 and 'Traceback' not in out.stderr, out.stderr
  return lines[0]


def peft_section(n=P, projection=0):
  return settings.fill({'peft': {'method': 'prefix', 'num_prefix_tokens': n, 'prefix_projection': projection}}).peft


@functools.lru_cache(maxsize=None)
def _base(arch, position, overrides):
  return build_model(tiny_config(arch, position, **dict(overrides)), rngs=nnx.Rngs(params=0, dropout=1))


def models(arch='decoder_only', position='rope', *, projection=0, **overrides):
  """(base model, the same with a random prefix of P tokens in every self-attention layer)."""
  base = nnx.clone(_base(arch, position, tuple(sorted(overrides.items()))))
  prefixed = nnx.clone(base)
  peft.attach(prefixed, peft_section(projection=projection), nnx.Rngs(params=5))
  for stack in (getattr(prefixed, 'encoder', None), getattr(prefixed, 'decoder', None)):
    if stack is not None and stack.prefix.kv is not None:  # scaled up: the prefix must visibly matter
      stack.prefix.kv.set_value(stack.prefix.kv.get_value() * 5.0)
  return base, prefixed


@nnx.jit
def call(model, args, kwargs):
  return model(*args, **kwargs)


@functools.partial(nnx.jit, static_argnums=(2,))
def cached_keys_values(model, ids, num_layers):
  """The base model's per-layer cached keys/values of `ids` [1,P] -> [layers, 2, P, K, H] (keys already rotated)."""
  cache = model.init_cache(1, ids.shape[1])
  _, cache = model.decode_step(ids, cache)
  c = cache['self']
  if isinstance(c, dict):  # scanned: [B, layers, S, K, H]
    return jnp.stack([c['k'][0], c['v'][0]], 1)
  return jnp.stack([jnp.stack([layer['k'][0], layer['v'][0]]) for layer in c])


def rows(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).integers(5, VOCAB, size=shape), jnp.int32)


# ------------------------------------------------------------------------------------------------ numerics
@pytest.mark.parametrize('position,scan', [('rope', False), ('learned', True), ('relative', False)])
def test_prefix_of_cached_tokens_equals_those_tokens_in_front(position, scan):
  """The prefix is P cached slots in front: the tokens' positions start at P, RoPE is not re-applied to the prefix
  keys, T5's bias sees them at positions 0..P-1, and padding queries stay masked."""
  base, prefixed = models('decoder_only', position, scan_layers=scan)
  ids = rows(1, (1, P))
  prefixed.decoder.prefix.kv.set_value(cached_keys_values(base, ids, 2))
  x = rows(2, (2, 8))
  seg = jnp.ones((2, 8), jnp.int32).at[1, 6:].set(0)
  got = np.asarray(call(prefixed, (x,), dict(segment_ids=seg)))
  want = np.asarray(call(base, (jnp.concatenate([jnp.broadcast_to(ids, (2, P)), x], 1),),
                         dict(segment_ids=jnp.concatenate([jnp.ones((2, P), jnp.int32), seg], 1))))[:, P:]
  real = np.asarray(seg, bool)
  np.testing.assert_allclose(got[real], want[real], atol=2e-5)
  assert not np.allclose(got, np.asarray(call(base, (x,), dict(segment_ids=seg))), atol=1e-3)  # the prefix matters


@pytest.mark.parametrize('arch', ['decoder_only', 'encoder_only'])
def test_every_packed_segment_sees_the_prefix(arch):
  """A row packing two documents (segment ids 1, 2, positions restarting) gives each document's logits alone."""
  _, model = models(arch, 'rope')
  a, b = rows(3, (1, 5)), rows(4, (1, 3))
  packed = jnp.concatenate([a, b, jnp.zeros((1, 2), jnp.int32)], 1)
  seg = jnp.asarray([[1] * 5 + [2] * 3 + [0] * 2], jnp.int32)
  pos = jnp.asarray([list(range(5)) + list(range(3)) + [0, 0]], jnp.int32)
  got = np.asarray(call(model, (packed,), dict(segment_ids=seg, positions=pos)))
  np.testing.assert_allclose(got[0, :5], np.asarray(call(model, (a,), {}))[0], atol=2e-5)
  np.testing.assert_allclose(got[0, 5:8], np.asarray(call(model, (b,), {}))[0], atol=2e-5)


def test_decoder_prefix_decodes_with_every_method_as_without_cache():
  """Greedy with ragged prompts = recomputing without a cache at every step; the best beam's score = its
  log-probability under the uncached forward pass; top-1 sampling = greedy. (Scanned layers hand each layer its
  prefix slice the same way with or without a cache: the first test checks it against the reference.)"""
  prompt, lengths = np.asarray(rows(5, (2, 4))), np.array([4, 2], np.int32)
  _, model = models('decoder_only', 'rope')
  greedy = decoding.greedy(model, prompt, max_new_tokens=5, prompt_lengths=lengths, eos_id=-1)
  want = decoding.greedy_without_cache(model, prompt, max_new_tokens=5, prompt_lengths=lengths, eos_id=-1)
  np.testing.assert_array_equal(np.asarray(greedy), np.asarray(want))
  beam = decode_settings(method='beam', beam_size=3, length_penalty=0.0, max_len=5, eos_id=-1)
  beams, scores = decoding.beam_search(model, prompt[:, :3], settings=beam)
  # the best beam's score, recomputed without a cache (every token real: a generated 0 is no padding)
  seq = jnp.concatenate([jnp.asarray(prompt[:, :3]), beams[:, 0]], 1)
  log_probs = jax.nn.log_softmax(call(model, (seq,), dict(segment_ids=jnp.ones(seq.shape, jnp.int32)))[:, 2:-1], -1)
  want_scores = jnp.take_along_axis(log_probs, beams[:, 0][..., None], -1).sum((1, 2))
  np.testing.assert_allclose(np.asarray(scores[:, 0]), np.asarray(want_scores), rtol=1e-4, atol=1e-4)
  top1 = decode_settings(method='sample', temperature=1.0, top_k=1, max_len=5, eos_id=-1)
  np.testing.assert_array_equal(decoding.decode(model, top1, prompt[:, :3], rng=jax.random.key(0)),
                                decoding.greedy(model, prompt[:, :3], max_new_tokens=5, eos_id=-1))


def test_encoder_decoder_prefix_cache_equals_the_full_forward_pass():
  """Both stacks have prefixes (the decoder's cross-attention none): step-by-step decoding gives the forward pass's
  logits, and the encoder's prefix changes them."""
  _, model = models('encoder_decoder', 'relative')
  src, tgt = rows(6, (2, 5)), rows(7, (2, 6))
  full = np.asarray(call(model, (src, tgt), {}))
  step = nnx.jit(lambda m, t, c: m.decode_step(t, c))
  cache = nnx.jit(lambda m, s: m.init_cache(2, 6, src_tokens=s))(model, src)
  logits, cache = step(model, tgt[:, :3], cache)
  steps = [np.asarray(logits)]
  for i in range(3, 6):
    logits, cache = step(model, tgt[:, i:i + 1], cache)
    steps.append(np.asarray(logits))
  np.testing.assert_allclose(np.concatenate(steps, 1), full, atol=2e-5)
  no_encoder_prefix = nnx.clone(model)
  no_encoder_prefix.encoder.prefix.kv.set_value(jnp.zeros_like(model.encoder.prefix.kv.get_value()))
  assert not np.allclose(np.asarray(call(no_encoder_prefix, (src, tgt), {})), full, atol=1e-3)


def test_reparameterisation_mlp_merges_into_plain_prefixes():
  _, with_mlp = models('decoder_only', 'learned', projection=6)
  assert with_mlp.decoder.prefix.kv is None
  merged_state = prefix_lib.merge_projection(with_mlp)
  _, plain = models('decoder_only', 'learned')
  nnx.update(plain, merged_state)
  x = rows(8, (2, 7))
  np.testing.assert_allclose(np.asarray(call(plain, (x,), {})), np.asarray(call(with_mlp, (x,), {})), atol=1e-5)
  paths = lambda state: {path for path, _ in nnx.to_flat_state(state)}  # noqa: E731
  assert paths(merged_state) == paths(nnx.state(plain, nnx.Param))  # the MLP is gone, `kv` in its place


def test_exported_peft_adapter_is_the_merged_prefix(tmp_path):
  """write_prefix (export --adapter of a prefix run) stores the MLP's output as peft's prompt_embeddings:
  read back into a model without the MLP it gives the MLP model's logits (peft itself loads such an export with
  jaxformer's logits: tests/fixtures/peft_prefix/export_check.txt)."""
  _, with_mlp = models('decoder_only', 'learned', projection=6)
  config = peft_format.write_prefix(str(tmp_path), with_mlp, base_model='tiny')
  assert config['peft_type'] == 'PREFIX_TUNING' and config['num_virtual_tokens'] == P and not config['prefix_projection']
  _, plain = models('decoder_only', 'learned')
  peft_format.load_prefix(str(tmp_path), plain)
  x = rows(9, (2, 7))
  np.testing.assert_allclose(np.asarray(call(plain, (x,), {})), np.asarray(call(with_mlp, (x,), {})), atol=1e-5)
  np.testing.assert_array_equal(peft_format.prefix_to_peft(plain.decoder.prefix.kv.get_value()),
                                weights.read_file(str(tmp_path / 'adapter_model.safetensors'))['prompt_embeddings'])


# ------------------------------------------------------------------------------------------------ peft interop
@functools.lru_cache(maxsize=None)
def _hf(name):
  return hf.load(str(FIXTURES / 'hf' / name))


@pytest.mark.parametrize('case,base', [('gpt2', 'gpt2'), ('llama', 'llama'), ('llama_mlp', 'llama')])
def test_peft_prefix_adapter_gives_peft_logits(case, base):
  """peft 0.21.2 + transformers 5.25: the adapter's prompt_embeddings (converted by prefix_from_peft) give the PeftModel's
  logits; llama_mlp's PrefixEncoder weights, run by our MLP, give the same (so its layout is peft's)."""
  directory = FIXTURES / 'peft_prefix' / case
  e = json.loads((directory / 'expected.json').read_text())
  section, model = _hf(base)
  n = json.loads((directory / 'adapter_config.json').read_text())['num_virtual_tokens']
  model = nnx.clone(model)
  peft.attach(model, peft_section(n), nnx.Rngs(params=0))
  peft_format.load_prefix(str(directory), model)
  ids, mask = jnp.asarray(e['input_ids']), jnp.asarray(e['attention_mask'], jnp.int32)
  want, real = np.asarray(e['logits'], np.float32), np.asarray(mask, bool)
  got = np.asarray(call(model, (ids,), dict(segment_ids=mask)))[..., :want.shape[-1]]
  np.testing.assert_allclose(got[real], want[real], atol=2e-5, rtol=1e-5)
  if case.endswith('_mlp'):
    mlp = weights.read_file(str(directory / 'mlp.safetensors'))
    with_mlp = nnx.clone(_hf(base)[1])
    peft.attach(with_mlp, peft_section(n, projection=mlp['transform.0.bias'].shape[0]), nnx.Rngs(params=0))
    p = with_mlp.decoder.prefix
    for ours, theirs, transpose in [('embedding', 'embedding.weight', False), ('hidden', 'transform.0.weight', True),
                                    ('hidden_bias', 'transform.0.bias', False), ('out', 'transform.2.weight', True),
                                    ('out_bias', 'transform.2.bias', False)]:
      getattr(p, ours).set_value(jnp.asarray(mlp[theirs].T if transpose else mlp[theirs]))
    got = np.asarray(call(with_mlp, (ids,), dict(segment_ids=mask)))[..., :want.shape[-1]]
    np.testing.assert_allclose(got[real], want[real], atol=2e-5, rtol=1e-5)


def test_peft_adapter_of_another_shape_is_one_clear_error():
  _, model = models('decoder_only', 'rope')  # P = 3 prefix tokens; the adapter has 4
  with pytest.raises(ConfigError, match='num_virtual_tokens=4.*peft.num_prefix_tokens=4'):
    peft_format.load_prefix(str(FIXTURES / 'peft_prefix' / 'gpt2'), model)
  with pytest.raises(ConfigError, match='another model'):
    peft_format.prefix_from_peft(np.zeros((4, 96)), num_layers=2, kv_heads=4, head_dim=8)


# ------------------------------------------------------------------------------------------------ train.py runs
@pytest.fixture(scope='module')
def base_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('base')
  run(tiny('gpt_tiny', num_steps=4, eval_every=4), str(workdir))
  return workdir


def test_prefix_run_trains_only_the_prefix_mlp_and_resumes_exactly(base_run, tmp_path):
  """From checkpoint.init_from, with the reparameterisation MLP: the loss falls, the checkpoint holds only the MLP
  (+ its optimizer state), a stopped run resumes to the same numbers, and the base comes back bit for bit."""
  config = tiny('gpt_tiny', num_steps=12, log_every=4, eval_every=12, learning_rate=3e-2)
  config.data.seq_len = 24  # + 4 prefix positions within model.max_len=32
  config.seed = 7  # the base parameters must come from init_from, not from this run's initialisation
  config.peft.update(method='prefix', num_prefix_tokens=4, prefix_projection=16)
  config.checkpoint.init_from = str(base_run)
  straight, resumed = tmp_path / 'straight', tmp_path / 'resumed'
  run(config, str(straight))
  run(config, str(resumed), stop_after_steps=8)
  run(config, str(resumed))
  rows = lambda d: [(r['step'], r.get('train_loss')) for r in read_metrics(str(d)) if 'train_loss' in r]  # noqa: E731
  assert rows(straight)[-1] == rows(resumed)[-1] and rows(straight)[-1][0] == 12
  assert rows(straight)[-1][1] < rows(straight)[0][1]  # the loss falls

  saved = ocp.StandardCheckpointer().metadata(str(straight / 'checkpoints' / '12' / 'params')).item_metadata
  saved = getattr(saved, 'tree', saved)
  paths = {'/'.join(map(str, p)) for p, _ in jax.tree_util.tree_flatten_with_path(
      saved, is_leaf=lambda x: not isinstance(x, dict))[0]}
  assert paths and all(p.startswith("['decoder']/['prefix']") or p.startswith('decoder/prefix') for p in paths), paths

  first = read_metrics(str(straight))[0]
  e = 32  # kv_heads * head_dim of the one-layer, 32-wide base
  assert first['num_trainable_params'] == 4 * e + (e * 16 + 16) + (16 * 2 * e + 2 * e)
  base = ml_collections.ConfigDict(json.loads((base_run / 'config.json').read_text()))
  adapted_config = ml_collections.ConfigDict(json.loads((straight / 'config.json').read_text()))
  base_model, _ = state_lib.restore_model(str(base_run), base, shd.make_mesh(base))
  adapted, _ = state_lib.restore_model(str(straight), adapted_config, shd.make_mesh(adapted_config))
  for path, value in nnx.to_flat_state(nnx.state(base_model, nnx.Param)):
    np.testing.assert_array_equal(np.asarray(dict(nnx.to_flat_state(nnx.state(adapted, nnx.Param)))[path].get_value()),
                                  np.asarray(value.get_value()), err_msg=str(path))


@pytest.mark.parametrize('args,expected', [
    (['--config.peft.num_prefix_tokens=0'], 'peft.num_prefix_tokens'),
    (['--config.data.seq_len=30', '--config.model.max_len=32'], 'peft.num_prefix_tokens=10 exceeds model.max_len=32'),
])
def test_train_py_bad_prefix_value_is_one_line(args, expected, tmp_path):
  out = _cli('train.py', '--config=configs/gpt_tiny.py', f'--workdir={tmp_path}', '--config.peft.method=prefix',
             *args, '--config.model.num_layers=1', '--config.train.num_steps=2', '--config.mesh.data=1')
  line = _one_error_line(out)
  assert expected in line, line


# ------------------------------------------------------------------------------ peft.adapter=<prefix directory>
HF_FIXTURES = FIXTURES / 'hf'


@pytest.mark.parametrize('case,base', [('gpt2', 'gpt2'), ('llama_mlp', 'llama')])
def test_peft_adapter_key_loads_a_prefix_adapter_with_peft_logits(case, base, tmp_path):
  """config.peft.adapter=<a PREFIX_TUNING directory> on a Hugging Face base: resolve sets peft.method=prefix and the
  adapter's length, the run state puts its prefix in the model, whose logits are peft's (llama_mlp: saved from a
  model with the reparameterisation MLP, which peft stores computed)."""
  from configs import hf as hf_recipe  # pylint: disable=import-outside-toplevel
  from jaxformer.apps import evaluate  # pylint: disable=import-outside-toplevel
  directory = FIXTURES / 'peft_prefix' / case
  config = hf_recipe.get_config(str(HF_FIXTURES / base))
  config.peft.adapter = str(directory)
  config.data.seq_len = 16  # + the prefix within the fixture's max_len
  r = evaluate.restore(config, str(tmp_path / 'w'))
  n = json.loads((directory / 'adapter_config.json').read_text())['num_virtual_tokens']
  assert (r.config.peft.method, r.config.peft.num_prefix_tokens, r.config.peft.prefix_projection) == ('prefix', n, 0)
  e = json.loads((directory / 'expected.json').read_text())
  ids, mask = jnp.asarray(e['input_ids']), jnp.asarray(e['attention_mask'], jnp.int32)
  want, real = np.asarray(e['logits'], np.float32), np.asarray(mask, bool)
  got = np.asarray(call(r.model, (ids,), dict(segment_ids=mask)))[..., :want.shape[-1]]
  np.testing.assert_allclose(got[real], want[real], atol=2e-5, rtol=1e-5)


def test_train_from_a_peft_prefix_adapter_then_export_it_back(tmp_path):
  """train.py --config.peft.adapter=<prefix dir> trains the prefix on from the adapter (one step at lr 1e-9);
  export --adapter writes the same prompt_embeddings back."""
  text = tmp_path / 'text.txt'
  text.write_text('First Citizen:\nBefore we proceed any further, hear me speak.\n' * 20)
  workdir, out, adapter = tmp_path / 'run', tmp_path / 'adapter_out', FIXTURES / 'peft_prefix' / 'llama'
  run_ = _cli('train.py', f'--config=configs/hf.py:{HF_FIXTURES / "llama"}', f'--workdir={workdir}',
              f'--config.data.source=text:{text}', f'--config.peft.adapter={adapter}',
              '--config.train.learning_rate=1e-9', '--config.train.num_steps=1', '--config.train.batch_size=2',
              '--config.data.seq_len=16', '--config.train.eval_steps=1', '--config.checkpoint.async_save=False')
  assert run_.returncode == 0, run_.stderr[-2000:]
  assert "peft.method='prefix'" in run_.stdout, run_.stdout
  export = _cli('-m', 'jaxformer.hf', 'export', f'--workdir={workdir}', f'--output={out}', '--adapter')
  assert export.returncode == 0, export.stderr[-2000:]
  original = weights.read_file(str(adapter / 'adapter_model.safetensors'))['prompt_embeddings']
  exported = weights.read_file(str(out / 'adapter_model.safetensors'))['prompt_embeddings']
  np.testing.assert_allclose(exported, original, atol=1e-6)


@pytest.mark.parametrize('args,expected,base', [
    ([f'--config.peft.adapters=a:{FIXTURES / "peft_prefix" / "gpt2"},b:{FIXTURES / "peft" / "gpt2_lora"}'],
     "peft.adapters combines LoRA adapters, and 'a' is a prefix-tuning adapter; load it alone with peft.adapter=DIR",
     'gpt2'),
    ([f'--config.peft.adapter={FIXTURES / "peft_prefix" / "gpt2"}', '--config.peft.method=lora'],
     'peft.adapter(s) load prefix adapters, but peft.method=lora', 'gpt2'),
    ([f'--config.peft.adapter={FIXTURES / "peft_prefix" / "gpt2"}'], 'loads into a decoder_only model, and this '
     'base is encoder_decoder', 't5_v1_1'),
])
def test_eval_py_bad_prefix_adapter_is_one_line(args, expected, base, tmp_path):
  out = _cli('eval.py', f'--config=configs/hf.py:{HF_FIXTURES / base}', f'--workdir={tmp_path}',
             '--mode=generate', '--prompt=First', '--config.data.seq_len=16', *args)
  line = _one_error_line(out)
  assert expected in line, line


def test_eval_py_generates_with_a_prefix_adapter_up_to_the_positions_left(tmp_path):
  """The prefix takes the first P positions: a decode budget past model.max_len stops at max_len - P (was a
  traceback from init_cache), and the adapter changes what the base generates."""
  def generate(*args):
    out = _cli('eval.py', f'--config=configs/hf.py:{HF_FIXTURES / "gpt2"}', f'--workdir={tmp_path}',
               '--mode=generate', '--prompt=First', '--config.data.seq_len=16', '--config.decode.max_len=64', *args)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout
  with_prefix = generate(f'--config.peft.adapter={FIXTURES / "peft_prefix" / "gpt2"}')
  assert with_prefix != generate()
