"""Bad model configs fail with one clear line naming the key (validate_model, via build_model)."""
import pytest
from flax import nnx

from jaxformer.config import ConfigError
from jaxformer.model import build_model
from test_model import tiny_config


@pytest.mark.parametrize('key,value,expected', [
    ('arch', 'decoder', "model.arch='decoder' is not a valid choice.*encoder_only, decoder_only, encoder_decoder"),
    ('position', 'alibi', 'model.position.*sinusoidal, rope, learned'),
    ('norm', 'batch', 'model.norm.*layer, rms'),
    ('norm_position', 'middle', 'model.norm_position.*pre, post'),
    ('mlp', 'reglu', 'model.mlp.*gelu, relu, swiglu'),
    ('dtype', 'float8', 'model.dtype.*float32, bfloat16, float16'),
    ('attention_impl', 'flash', 'model.attention_impl.*auto, xla, cudnn, reference'),
    ('remat', 'everything', 'model.remat.*none, dots, projections, block, full'),
])
def test_unknown_choice_lists_the_valid_ones(key, value, expected):
  with pytest.raises(ConfigError, match=expected):
    build_model(tiny_config(**{key: value}), rngs=nnx.Rngs(0))


def test_d_model_not_divisible_by_heads():
  with pytest.raises(ConfigError, match=r'model.d_model=16 is not divisible by model.num_heads=3'):
    build_model(tiny_config(num_heads=3), rngs=nnx.Rngs(0))


def test_heads_not_divisible_by_kv_heads():
  with pytest.raises(ConfigError, match=r'model.num_heads=4 is not divisible by model.num_kv_heads=3'):
    build_model(tiny_config(num_kv_heads=3), rngs=nnx.Rngs(0))


def test_rope_needs_even_head_dim():
  with pytest.raises(ConfigError, match='even head dimension'):
    build_model(tiny_config(position='rope', d_model=12, num_heads=4), rngs=nnx.Rngs(0))


def test_data_sampling_is_checked_before_training():
  from configs import default
  from jaxformer.config import validate
  config = default.get_config()
  config.data.sampling = 'random'
  with pytest.raises(ConfigError, match="data.sampling='random'.*did you mean 'random_windows'"):
    validate(config)
  config.data.sampling = 'random_windows'
  config.model.arch = 'encoder_decoder'
  with pytest.raises(ConfigError, match='random_windows.*encoder_decoder; use data.sampling=streams'):
    validate(config)
