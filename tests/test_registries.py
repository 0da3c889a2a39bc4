"""Each configurable choice is one registry beside its implementation, and config validation accepts exactly its
names: a wrong value is rejected with the registry's list, every entry is accepted, and a new entry works with no
edit anywhere else (flops, the MLP and validation ask the registry's properties)."""
import re

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from configs import default
from jaxformer import decoding, flops
from jaxformer.config import ConfigError, validate
from jaxformer.model import attention, build_model, layers, positions, transformer
from jaxformer.model.config import ModelConfig
from jaxformer.training import optimizer

REGISTRIES = [  # (config key, the registry validation must follow)
    ('model.arch', transformer.ARCHS),
    ('model.position', positions.POSITIONS),
    ('model.norm', layers.NORMS),
    ('model.norm_position', transformer.NORM_POSITIONS),
    ('model.mlp', layers.MLPS),
    ('model.dtype', layers.DTYPES),
    ('model.param_dtype', layers.DTYPES),
    ('model.attention_impl', attention.IMPLEMENTATIONS),
    ('model.remat', transformer.REMATS),
    ('train.optimizer', optimizer.OPTIMIZERS),
    ('train.schedule', optimizer.SCHEDULES),
    ('decode.method', decoding.METHODS),
]


def _config(key, value):
  config = default.get_config()
  section, name = key.split('.')
  config[section][name] = value
  return config


@pytest.mark.parametrize('key,registry', REGISTRIES, ids=[k for k, _ in REGISTRIES])
def test_validation_accepts_exactly_the_registry(key, registry):
  names = tuple(registry)
  assert names and len(set(names)) == len(names)
  for name in names:
    validate(_config(key, name))
  expected = f"{key}='zzzz' is not a valid choice; use one of: {', '.join(names)}."
  with pytest.raises(ConfigError, match=re.escape(expected)):
    validate(_config(key, 'zzzz'))


def test_a_registered_gated_mlp_is_counted_and_built(monkeypatch):
  """A new gated MLP needs one registry entry: validation accepts it, the MLP grows wi_gate, flops count it."""
  monkeypatch.setitem(layers.MLPS, 'fake_glu', layers.MLPKind(jax.nn.relu, gated=True))
  monkeypatch.setitem(layers.MLPS, 'fake_plain', layers.MLPKind(jax.nn.relu, gated=False))
  config = default.get_config()
  config.model.update(vocab_size=11, d_model=16, d_ff=24, num_layers=2, num_heads=2)
  counts = {}
  for mlp in ('fake_plain', 'fake_glu'):
    config.model.mlp = mlp
    validate(config)
    cfg = ModelConfig.from_config(config.model)
    counts[mlp] = flops.flops_per_token(cfg, 8)
    model = nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0)))
    block = model.decoder.blocks.layers if model.decoder.scanned else model.decoder.blocks[0]  # either layout
    assert (block.mlp.wi_gate is not None) == (mlp == 'fake_glu')
  # 6 FLOPs per weight per token for the extra [d_model, d_ff] gate matrix in every layer
  assert counts['fake_glu'] - counts['fake_plain'] == pytest.approx(6 * 2 * 16 * 24)


def test_a_registered_schedule_is_used(monkeypatch):
  monkeypatch.setitem(optimizer.SCHEDULES, 'half', lambda step, lr, min_lr, t, warmup: jnp.asarray(lr / 2))
  config = default.get_config()
  config.train.update(schedule='half', warmup_steps=0, learning_rate=0.5)
  validate(config)
  assert float(optimizer.make_schedule(config.train)(10)) == pytest.approx(0.25)
