"""RoPE scaling (model.rope_scaling): the frequencies against the formulas, and the Hugging Face fixtures llama3
(Llama 3.1's rope_type), qwen2_yarn (YaRN) and llama_dynamic (dynamic NTK) against the logits and greedy generate
output transformers 5.25 computed for them (tests/fixtures/hf/make_fixtures.py). No torch here.

The frequency tests re-derive each kind in float64 from the published formulas (not from positions.py's code);
the fixtures check that the result is what transformers computes, in training-style forward passes and in KV-cache
decoding, and that config.json's rope_parameters survive export and re-import. That transformers reads the
exported scaling was checked by hand with tests/fixtures/hf/check_export.py (transformers 5.25, 40 positions, max
|logits diff|: jaxformer-built models with rope_scaling linear 2.0e-5, dynamic 1.8e-5, llama3 1.4e-5, yarn 2.3e-5,
yarn with mscale / mscale_all_dim / truncate=False 1.6e-5; fixtures re-saved: llama3 1.8e-5, qwen2_yarn 3.4e-5,
llama_dynamic 1.6e-5).
"""
import dataclasses
import json
import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs import default
from jaxformer import decoding, hf
from jaxformer import settings
from jaxformer.settings import decode_settings
from jaxformer.config import ConfigError
from jaxformer.model import build_model, positions
from jaxformer.model.config import ModelConfig, validate_model
from test_hf import FIXTURES, ONE_DEVICE, REPO, expected, logits_of

SCALED = ('llama3', 'qwen2_yarn', 'llama_dynamic')
# llama_dynamic's config.json has max_position_embeddings 16, where dynamic NTK starts; its expected.json runs to
# 24 (logits) and 20 (generate) positions, so jaxformer's model.max_len (the KV cache, decoding's budget) is raised.
OVERRIDES = {'llama_dynamic': {'max_len': 32}}
_LOADED = {}


def load(name: str) -> tuple[ml_collections.ConfigDict, object]:
  if name not in _LOADED:
    section = hf.model_section(str(FIXTURES / name))
    section.update(OVERRIDES.get(name, {}))
    _LOADED[name] = hf.load(str(FIXTURES / name), section)
  return _LOADED[name]


def cfg(head_dim: int = 16, **rope) -> ModelConfig:
  section = default.get_config().model
  section.update(position='rope', vocab_size=11, d_model=4 * head_dim, num_heads=4, max_len=64, **rope)
  return ModelConfig.from_config(section)


def frequencies(c: ModelConfig, max_position: int = 0) -> tuple[np.ndarray, float]:
  inv_freq, factor = positions.ROPE_SCALINGS[c.rope_scaling](c, jnp.arange(max_position + 1)[None])
  return np.asarray(inv_freq, np.float64), factor


def unscaled(head_dim: int, base: float = 10000.0) -> np.ndarray:
  return np.array([base ** (-2 * i / head_dim) for i in range(head_dim // 2)])


# ------------------------------------------------------------------------------------------------ frequencies
def test_registry_names_every_kind():
  assert list(positions.ROPE_SCALINGS) == ['none', 'linear', 'dynamic', 'llama3', 'yarn']


def test_none_is_plain_rope():
  inv_freq, factor = frequencies(cfg(head_dim=8, rope_base=500000.0))
  np.testing.assert_allclose(inv_freq, unscaled(8, 500000.0), rtol=1e-6)
  assert factor == 1.0


def test_linear_divides_every_frequency_by_the_factor():
  inv_freq, factor = frequencies(cfg(rope_scaling='linear', rope_factor=4.0))
  np.testing.assert_allclose(inv_freq, unscaled(16) / 4, rtol=1e-6)
  assert factor == 1.0


@pytest.mark.parametrize('max_position', [0, 31, 40, 100])
def test_dynamic_ntk_raises_the_base_past_the_original_length(max_position):
  """base' = base * (factor * s / L - (factor - 1)) ** (H / (H - 2)), s = longest position + 1, only when s > L."""
  c = cfg(rope_scaling='dynamic', rope_factor=2.0, rope_original_max_len=32)
  inv_freq, factor = frequencies(c, max_position)
  s = max(max_position + 1, 32)
  base = 10000.0 * (2.0 * s / 32 - 1.0) ** (16 / 14)
  np.testing.assert_allclose(inv_freq, unscaled(16, base), rtol=2e-6)
  assert factor == 1.0


def test_dynamic_takes_the_longest_position_of_the_whole_batch():
  c = cfg(rope_scaling='dynamic', rope_factor=2.0, rope_original_max_len=32)
  batch = jnp.array([[0, 1, 2], [70, 71, 72]])
  got = np.asarray(positions.ROPE_SCALINGS['dynamic'](c, batch)[0])
  np.testing.assert_array_equal(got, frequencies(c, 72)[0].astype(np.float32))


def test_llama3_keeps_blends_and_divides_by_wavelength():
  """Llama 3.1: wavelength 2 pi / f below L / high_freq_factor: kept; above L / low_freq_factor: f / factor;
  between: (1 - s) f / factor + s f with s = (L / wavelength - low) / (high - low). The llama3 fixture's settings
  (head_dim 16, L 32) put frequencies in all three bands."""
  factor, low, high, length = 8.0, 1.0, 4.0, 32
  inv_freq, attention = frequencies(cfg(rope_scaling='llama3', rope_factor=factor, rope_low_freq_factor=low,
                                        rope_high_freq_factor=high, rope_original_max_len=length))
  want, bands = [], []
  for f in unscaled(16):
    wavelength = 2 * math.pi / f
    if wavelength < length / high:
      want.append(f), bands.append('kept')
    elif wavelength > length / low:
      want.append(f / factor), bands.append('divided')
    else:
      s = (length / wavelength - low) / (high - low)
      want.append((1 - s) * f / factor + s * f), bands.append('blended')
  assert set(bands) == {'kept', 'blended', 'divided'}, bands
  np.testing.assert_allclose(inv_freq, want, rtol=2e-6)
  assert attention == 1.0


def _yarn_reference(head_dim, base, factor, length, beta_fast=32.0, beta_slow=1.0, truncate=True):
  """YaRN (Peng et al. 2023, as transformers): dimension d turns length * f_d / (2 pi) times within L; the
  dimensions turning more than beta_fast times keep f, fewer than beta_slow times get f / factor, a linear ramp in
  the dimension index between."""
  def dim_for(rotations):
    return head_dim * math.log(length / (rotations * 2 * math.pi)) / (2 * math.log(base))
  lo, hi = dim_for(beta_fast), dim_for(beta_slow)
  if truncate:
    lo, hi = math.floor(lo), math.ceil(hi)
  lo, hi = max(lo, 0), min(hi, head_dim - 1)
  hi = hi + 0.001 if lo == hi else hi
  out = []
  for i, f in enumerate(unscaled(head_dim, base)):
    interpolated = min(max((i - lo) / (hi - lo), 0.0), 1.0)  # 0 = keep f, 1 = f / factor
    out.append(f / factor * interpolated + f * (1 - interpolated))
  return np.array(out)


@pytest.mark.parametrize('head_dim,rope', [
    (8, dict(rope_factor=4.0, rope_original_max_len=16, rope_beta_slow=0.1)),  # the qwen2_yarn fixture: a ramp
    (64, dict(rope_factor=4.0, rope_original_max_len=4096)),  # YaRN's defaults, a longer context
    (16, dict(rope_factor=4.0, rope_original_max_len=256, rope_beta_fast=16.0, rope_truncate=False)),
])
def test_yarn_ramps_between_kept_and_interpolated_frequencies(head_dim, rope):
  inv_freq, attention = frequencies(cfg(head_dim=head_dim, rope_scaling='yarn', **rope))
  want = _yarn_reference(head_dim, 10000.0, rope['rope_factor'], rope['rope_original_max_len'],
                         rope.get('rope_beta_fast', 32.0), rope.get('rope_beta_slow', 1.0),
                         rope.get('rope_truncate', True))
  np.testing.assert_allclose(inv_freq, want, rtol=2e-6)
  assert attention == pytest.approx(0.1 * math.log(rope['rope_factor']) + 1)
  ratio = inv_freq / unscaled(head_dim)
  assert ratio[0] == pytest.approx(1) and ratio[-1] == pytest.approx(1 / rope['rope_factor'])


def test_yarn_attention_factor_given_or_from_the_mscales():
  base = dict(rope_scaling='yarn', rope_factor=40.0, rope_original_max_len=16)
  assert frequencies(cfg(**base, rope_attention_factor=0.5))[1] == 0.5
  mscale = lambda m: 0.1 * m * math.log(40.0) + 1
  assert frequencies(cfg(**base, rope_mscale=1.0, rope_mscale_all_dim=0.707))[1] == pytest.approx(
      mscale(1.0) / mscale(0.707))


def test_rotary_multiplies_cos_and_sin_by_the_attention_factor():
  c = cfg(head_dim=8, rope_scaling='yarn', rope_factor=4.0, rope_original_max_len=16)
  cos, sin = positions.Rope(c, rngs=None).rotary(jnp.arange(20)[None])
  np.testing.assert_allclose(np.asarray(cos) ** 2 + np.asarray(sin) ** 2, (0.1 * math.log(4) + 1) ** 2, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize('overrides,message', [
    ({'rope_scaling': 'yarm'}, "model.rope_scaling='yarm' is not a valid choice (did you mean 'yarn'?)"),
    ({'rope_scaling': 'linear', 'position': 'learned'}, 'model.rope_scaling=linear scales RoPE'),
    ({'rope_scaling': 'linear', 'rope_factor': 0.5}, 'model.rope_factor=0.5 must be a number >= 1'),
    ({'rope_scaling': 'llama3', 'rope_low_freq_factor': 4.0}, 'model.rope_low_freq_factor < model.rope_high'),
    ({'rope_scaling': 'yarn', 'rope_beta_slow': 64.0}, 'model.rope_beta_slow <= model.rope_beta_fast'),
    ({'rope_scaling': 'yarn', 'rope_original_max_len': 0}, 'model.rope_original_max_len=0 must be a positive'),
])
def test_bad_rope_scaling_settings_are_one_line(overrides, message):
  section = default.get_config().model
  section.update(position='rope', vocab_size=11)
  section.update(overrides)
  with pytest.raises(ConfigError) as e:
    validate_model(section)
  assert message in str(e.value) and '\n' not in str(e.value)


def test_train_py_misspelt_rope_scaling_is_one_line(tmp_path):
  out = subprocess.run([sys.executable, 'train.py', '--config=configs/gpt_tiny.py', f'--workdir={tmp_path}',
                        '--config.model.position=rope', '--config.model.rope_scaling=bogus'],
                       cwd=REPO, capture_output=True, text=True, timeout=120, env=ONE_DEVICE)
  lines = [line for line in out.stderr.splitlines() if line.strip()]
  assert out.returncode != 0 and len(lines) == 1 and 'Traceback' not in out.stderr, out.stderr
  assert lines[0].startswith("error: model.rope_scaling='bogus' is not a valid choice; use one of: none, linear, "
                             'dynamic, llama3, yarn.'), lines[0]


def test_saved_config_without_the_keys_loads_unscaled():
  """A model section saved before rope_scaling existed resolves to none (settings.upgrade_saved: configs/default.py's
  values, the behaviour of the versions without the keys)."""
  section = default.get_config().model
  section.update(position='rope', vocab_size=11)
  old = {k: v for k, v in section.items() if not k.startswith('rope_') or k == 'rope_base'}
  c = ModelConfig.from_config(settings.upgrade_saved({'model': old}).model)
  assert (c.rope_scaling, c.rope_factor, c.rope_original_max_len) == ('none', 1.0, c.max_len)


# --------------------------------------------------------------------------------------- Hugging Face: import
def test_fixtures_import_their_scaling():
  got = {name: {k: v for k, v in load(name)[0].items() if k.startswith('rope_')} for name in SCALED}
  assert {k: got['llama3'][k] for k in ('rope_scaling', 'rope_factor', 'rope_original_max_len',
                                        'rope_low_freq_factor', 'rope_high_freq_factor')} == {
      'rope_scaling': 'llama3', 'rope_factor': 8.0, 'rope_original_max_len': 32, 'rope_low_freq_factor': 1.0,
      'rope_high_freq_factor': 4.0}
  assert {k: got['qwen2_yarn'][k] for k in ('rope_scaling', 'rope_factor', 'rope_original_max_len', 'rope_beta_fast',
                                            'rope_beta_slow', 'rope_attention_factor', 'rope_truncate')} == {
      'rope_scaling': 'yarn', 'rope_factor': 4.0, 'rope_original_max_len': 16, 'rope_beta_fast': 32.0,
      'rope_beta_slow': 0.1, 'rope_attention_factor': -1.0, 'rope_truncate': True}
  assert {k: got['llama_dynamic'][k] for k in ('rope_scaling', 'rope_factor', 'rope_original_max_len')} == {
      'rope_scaling': 'dynamic', 'rope_factor': 2.0, 'rope_original_max_len': 16}


@pytest.mark.parametrize('name', SCALED)
def test_scaled_logits_equal_transformers(name):
  """Sequences past the original length (llama3: 40 > 32, yarn: 24 > 16, dynamic: 24 > 16)."""
  section, model = load(name)
  e = expected(name)
  want = np.asarray(e['logits'], np.float32)
  assert want.shape[1] > section.rope_original_max_len
  np.testing.assert_allclose(logits_of(model, section, e), want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize('name', SCALED)
def test_the_scaling_matters(name):
  """The same weights without the scaling are far from transformers' logits (so the test above tests it)."""
  section, model = load(name)
  plain = nnx.clone(model)
  rope = plain.decoder.positions
  rope.cfg = dataclasses.replace(rope.cfg, rope_scaling='none')
  e = expected(name)
  assert np.abs(logits_of(plain, section, e) - np.asarray(e['logits'], np.float32)).max() > 1e-2


@pytest.mark.parametrize('name', SCALED)
def test_kv_cache_decoding_equals_transformers_generate(name):
  """Greedy and one-beam search (no length penalty) through the KV cache. llama_dynamic's generate crosses its
  original length mid-way: later steps use a larger base while the cached keys keep theirs, as in transformers."""
  section, model = load(name)
  e = expected(name)['generate']
  prompt, output = np.asarray(e['prompt']), np.asarray(e['output'])
  new = output[:, prompt.shape[1]:]
  assert output.shape[1] > section.rope_original_max_len
  eos = hf.read_config(str(FIXTURES / name))['eos_token_id']
  np.testing.assert_array_equal(np.asarray(decoding.greedy(model, prompt, max_new_tokens=new.shape[1], eos_id=eos)),
                                new)
  settings = decode_settings(method='beam', beam_size=1, length_penalty=0.0, max_len=new.shape[1],
                                     eos_id=eos)
  beams, _ = decoding.beam_search(model, prompt, settings=settings)
  np.testing.assert_array_equal(np.asarray(beams)[:, 0], new)


def test_scan_layers_gives_the_same_logits():
  name = 'llama3'
  section, _ = load(name)
  scanned = ml_collections.ConfigDict({**section.to_dict(), 'scan_layers': True})
  _, model = hf.load(str(FIXTURES / name), scanned)
  e = expected(name)
  np.testing.assert_allclose(logits_of(model, scanned, e), np.asarray(e['logits'], np.float32), atol=2e-5, rtol=1e-5)


def _with_config(tmp_path, name, edit) -> str:
  """A copy of fixture `name` whose config.json is edit(config)."""
  for f in (FIXTURES / name).iterdir():
    (tmp_path / f.name).write_bytes(f.read_bytes())
  config = json.loads((FIXTURES / name / 'config.json').read_text())
  (tmp_path / 'config.json').write_text(json.dumps(edit(config)))
  return str(tmp_path)


@pytest.mark.parametrize('name', ['llama3', 'qwen2_yarn'])
def test_transformers_4_rope_scaling_reads_the_same(name, tmp_path):
  """transformers 4 wrote rope_scaling (the oldest with `type`) and a top-level rope_theta."""
  def to_v4(config):
    rope = dict(config.pop('rope_parameters'))
    theta = rope.pop('rope_theta')
    rope['type'] = rope.pop('rope_type')
    return {**config, 'rope_scaling': rope, 'rope_theta': theta}
  assert hf.model_section(_with_config(tmp_path, name, to_v4)) == hf.model_section(str(FIXTURES / name))


def test_unsupported_rope_type_is_one_line(tmp_path):
  directory = _with_config(tmp_path, 'llama3', lambda c: {**c, 'rope_parameters': {
      'rope_type': 'longrope', 'rope_theta': 1e4, 'short_factor': [1.0], 'long_factor': [2.0]}})
  with pytest.raises(ConfigError, match="rope_type='longrope' .* supported: default, linear, dynamic, llama3, "
                                        'yarn') as e:
    hf.model_section(directory)
  assert '\n' not in str(e.value)


def test_yarn_extends_max_len_to_factor_times_the_original(tmp_path):
  """Qwen2.5's YaRN recipe keeps max_position_embeddings at the original length; YaRN declares factor x that."""
  directory = _with_config(tmp_path, 'qwen2_yarn', lambda c: {**c, 'max_position_embeddings': 16})
  section = hf.model_section(directory)
  assert (section.max_len, section.rope_original_max_len) == (64, 16)


# --------------------------------------------------------------------------------------- Hugging Face: export
@pytest.mark.parametrize('name', SCALED)
def test_export_round_trips_the_scaling(name, tmp_path):
  section, model = load(name)
  hf.save(model, section, str(tmp_path))
  original = json.loads((FIXTURES / name / 'config.json').read_text())
  saved = json.loads((tmp_path / 'config.json').read_text())
  rope = saved['rope_parameters']
  assert {k: rope[k] for k in original['rope_parameters']} == original['rope_parameters']
  assert set(rope) - set(original['rope_parameters']) <= {'beta_fast', 'beta_slow'}  # yarn's defaults, explicit
  assert saved['max_position_embeddings'] == original['max_position_embeddings']  # dynamic: where it scales
  reread = hf.model_section(str(tmp_path))
  reread.update(OVERRIDES.get(name, {}))
  assert reread == section
  _, reloaded = hf.load(str(tmp_path), reread)
  e = expected(name)
  np.testing.assert_array_equal(logits_of(reloaded, reread, e), logits_of(model, section, e))


def test_model_built_with_scaling_exports_as_llama(tmp_path):
  """A jaxformer model trained with rope_scaling=linear saves as a Llama transformers reads the scaling of."""
  section = default.get_config().model
  section.update(position='rope', norm='rms', mlp='swiglu', use_bias=False, num_layers=1, num_heads=2, d_model=16,
                 d_ff=32, vocab_size=23, max_len=64, rope_scaling='linear', rope_factor=2.0)
  model = build_model(section, rngs=nnx.Rngs(params=0, dropout=1))
  assert hf.save(model, section, str(tmp_path)) == 'llama'
  saved = json.loads((tmp_path / 'config.json').read_text())
  assert saved['rope_parameters'] == {'rope_type': 'linear', 'rope_theta': 10000.0, 'factor': 2.0}
  assert hf.model_section(str(tmp_path)).rope_factor == 2.0


def test_a_registered_scaling_needs_no_other_edit(monkeypatch):
  """Adding a kind is one function plus one ROPE_SCALINGS entry: validation accepts it and Rope uses it."""
  monkeypatch.setitem(positions.ROPE_SCALINGS, 'halved', lambda c, p: (positions.rope_inv_freq(c.head_dim,
                                                                                               c.rope_base) / 2, 1.0))
  c = cfg(head_dim=8, rope_scaling='halved')
  cos, _ = positions.Rope(c, rngs=None).rotary(jnp.array([[2]]))
  np.testing.assert_allclose(np.asarray(cos)[0, 0, 0, :4], np.cos(unscaled(8)), rtol=1e-6)  # 2 * f / 2


@pytest.mark.parametrize('kind', list(positions.ROPE_SCALINGS))
def test_training_step_with_packed_positions_under_jit(kind):
  """Training sees the scaling too: a jitted loss + gradient over packed rows (positions restart at 0)."""
  section = default.get_config().model
  section.update(position='rope', norm='rms', mlp='swiglu', use_bias=False, num_layers=1, num_heads=2, d_model=16,
                 d_ff=32, vocab_size=23, max_len=16, rope_scaling=kind, rope_factor=2.0, rope_original_max_len=4)
  model = build_model(section, rngs=nnx.Rngs(params=0, dropout=1))
  tokens = jnp.arange(24).reshape(2, 12) % 23
  segments = jnp.array([[1] * 7 + [2] * 5, [1] * 12])
  packed = jnp.where(segments[:, :] == 2, jnp.arange(12) - 7, jnp.arange(12))

  @nnx.jit
  def loss_and_grad(model):
    def loss(model):
      logits = model(tokens, positions=packed, segment_ids=segments)
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], axis=-1))
    return nnx.value_and_grad(loss)(model)

  value, grads = loss_and_grad(model)
  assert np.isfinite(float(value))
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
  # The second packed sequence gives what it gives alone (not for dynamic, whose base follows the longest position
  # of the whole batch, as in transformers).
  if kind != 'dynamic':
    alone = model(tokens[:1, 7:])
    np.testing.assert_allclose(np.asarray(model(tokens, positions=packed, segment_ids=segments))[0, 7:],
                               np.asarray(alone)[0], atol=1e-5)
