"""Gemma's pieces (model.embed_scale, model.norm=rms_plus_one, model.mlp=geglu) and the gemma Hugging Face family.
The fixture's logits and greedy tokens against transformers', and its export round trip, are test_hf.py's
parametrized tests; here: each piece against its formula, that the fixture needs them, and the family's errors."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxformer import hf
from jaxformer.config import ConfigError
from jaxformer.model import build_model, layers, reference_attention
from jaxformer.model.attention import SegmentMask, chunked_attention, with_window
from jaxformer.model.config import ModelConfig
from test_attention import qkv
from test_hf import FIXTURES, expected, random_model, tiny_section


@nnx.jit
def forward(model, tokens):
  return model(tokens)


def test_rms_plus_one_multiplies_by_one_plus_the_scale():
  cfg = ModelConfig.from_config(tiny_section(norm='rms_plus_one'))
  norm = layers.RMSNormPlusOne(cfg, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 3, 32))
  np.testing.assert_allclose(norm(x), layers.RMSNorm(cfg, rngs=nnx.Rngs(0))(x), atol=1e-6)  # scale starts at 0
  norm.scale[...] = jnp.full((32,), 0.5)
  rms = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + cfg.norm_eps)
  np.testing.assert_allclose(norm(x), rms * 1.5, atol=1e-6)


def test_embed_scale_is_rounded_to_the_compute_dtype():
  """transformers multiplies by torch.tensor(sqrt(hidden_size), dtype=hidden.dtype): sqrt(32) in bfloat16 is 5.65625."""
  model = build_model(tiny_section(embed_scale=True, dtype='bfloat16'), rngs=nnx.Rngs(0))
  tokens = jnp.asarray([[3, 4]])
  want = model.embed(tokens) * jnp.bfloat16(5.65625)
  np.testing.assert_array_equal(np.asarray(model.embed_tokens(tokens), np.float32), np.asarray(want, np.float32))


def test_gemma_settings_elsewhere_are_one_line():
  """A Llama-like model with Gemma's embedding scale has no family: one line naming the key."""
  section = tiny_section(embed_scale=True)
  with pytest.raises(ConfigError, match='model.embed_scale=True') as e:
    hf.save(random_model(section), section, '/nonexistent-never-written')
  assert '\n' not in str(e.value)


def test_unsupported_gemma_activation_is_one_line(tmp_path):
  for f in (FIXTURES / 'gemma').iterdir():
    (tmp_path / f.name).write_bytes(f.read_bytes())
  config = json.loads((tmp_path / 'config.json').read_text())
  (tmp_path / 'config.json').write_text(json.dumps({**config, 'hidden_act': 'relu'}))
  with pytest.raises(ConfigError, match="gemma hidden_act='relu' has no jaxformer counterpart") as e:
    hf.model_section(str(tmp_path))
  assert '\n' not in str(e.value)


# ------------------------------------------------------------------------------------------------ Gemma 2
def test_chunked_softcap_matches_reference_forward_and_gradients():
  """Soft-capping inside the chunked kernel (its backward through the tanh), with a window and segments."""
  segments = jnp.asarray([[1] * 6 + [2] * 5, [1] * 9 + [0] * 2])
  mask = with_window(SegmentMask(segments, segments, True), 4)
  q, k, v = qkv(t=11, s=11)
  q = q * 3  # logits well past the cap

  def loss(fn):
    return jax.jit(jax.value_and_grad(lambda q, k, v: (fn(q, k, v) ** 2).sum(), argnums=(0, 1, 2)))(q, k, v)

  got = loss(lambda q, k, v: chunked_attention(q, k, v, mask, block_q=4, block_kv=3, softcap=2.0))
  want = loss(lambda q, k, v: reference_attention(q, k, v, mask.dense(), softcap=2.0))
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, atol=2e-5, rtol=1e-4)
  uncapped = reference_attention(q, k, v, mask.dense())
  assert np.abs(np.asarray(uncapped) - np.asarray(reference_attention(q, k, v, mask.dense(), softcap=2.0))).max() > 1e-2


def test_gemma2_imports_its_settings():
  section = hf.model_section(str(FIXTURES / 'gemma2'))
  assert (section.norm_position, section.attention_scale, section.attention_softcap, section.logit_softcap,
          section.sliding_window, section.sliding_window_pattern) == ('sandwich', 24 ** -0.5, 3.0, 5.0, 4, 'LG')


def test_gemma2_chunked_attention_equals_transformers():
  """attention_impl=chunked: soft-capping and the window in the kernel give transformers' logits too."""
  override = hf.model_section(str(FIXTURES / 'gemma2'))
  override.attention_impl = 'chunked'
  _, model = hf.load(str(FIXTURES / 'gemma2'), override)
  e = expected('gemma2')
  want = np.asarray(e['logits'], np.float32)
  got = np.asarray(forward(model, jnp.asarray(e['input_ids'])))[..., :want.shape[-1]]
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)


def test_the_fixture_needs_attention_softcapping():
  """The fixture's attention logits reach the cap: without it, transformers' logits are missed."""
  override = hf.model_section(str(FIXTURES / 'gemma2'))
  override.attention_softcap = 0.0
  _, model = hf.load(str(FIXTURES / 'gemma2'), override)
  e = expected('gemma2')
  want = np.asarray(e['logits'], np.float32)
  got = np.asarray(forward(model, jnp.asarray(e['input_ids'])))[..., :want.shape[-1]]
  assert np.abs(got - want).max() > 1e-3


@pytest.mark.parametrize('key,value,message', [
    ('attention_softcap', -1.0, 'model.attention_softcap=-1.0 must be a number > 0'),
    ('logit_softcap', -2.0, 'model.logit_softcap=-2.0 must be a number > 0'),
])
def test_bad_softcaps_are_one_line(key, value, message):
  from jaxformer.model.config import validate_model  # pylint: disable=g-import-not-at-top
  with pytest.raises(ConfigError) as e:
    validate_model(tiny_section(**{key: value}))
  assert message in str(e.value) and '\n' not in str(e.value)
