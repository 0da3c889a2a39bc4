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
from jaxformer.model import build_model, layers
from jaxformer.model.config import ModelConfig
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


def test_the_fixture_needs_the_embedding_scale():
  override = hf.model_section(str(FIXTURES / 'gemma'))
  assert (override.norm, override.mlp, override.embed_scale, override.head_dim) == ('rms_plus_one', 'geglu', True, 16)
  override.embed_scale = False
  _, model = hf.load(str(FIXTURES / 'gemma'), override)
  e = expected('gemma')
  want = np.asarray(e['logits'], np.float32)
  got = np.asarray(forward(model, jnp.asarray(e['input_ids'])))[..., :want.shape[-1]]
  assert np.abs(got - want).max() > 1e-2


def test_a_gemma_like_model_exports_as_gemma(tmp_path):
  section = tiny_section(norm='rms_plus_one', mlp='geglu', embed_scale=True, head_dim=16)
  model = random_model(section)
  assert hf.save(model, section, str(tmp_path)) == 'gemma'
  config = json.loads((tmp_path / 'config.json').read_text())
  assert (config['architectures'], config['hidden_act'], config['head_dim']) == (['GemmaForCausalLM'],
                                                                                 'gelu_pytorch_tanh', 16)
  loaded = hf.model_section(str(tmp_path))  # (the fixture's save -> load round trip is test_hf.py's)
  assert (loaded.norm, loaded.mlp, loaded.embed_scale, loaded.tie_embeddings) == ('rms_plus_one', 'geglu', True, True)


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
