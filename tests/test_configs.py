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


@pytest.mark.parametrize('key,value,expected', [
    ('head_dim', 0, r'model.head_dim=0 must be a positive integer'),
    ('attention_scale', 0.0, r'model.attention_scale=0.0 must be > 0, or -1'),
    ('pad_id', -2, r'model.pad_id=-2 must be a token id >= 0, or -1 for no padding token'),
    ('type_vocab_size', -1, r'model.type_vocab_size=-1 must be a non-negative integer'),
    ('relative_num_buckets', 2, r'model.relative_num_buckets=2 must be an integer >= 4'),
    ('relative_max_distance', 8, r'model.relative_max_distance=8 must be an integer > relative_num_buckets / 2 = 16'),
])
def test_hf_feature_values_are_checked(key, value, expected):
  from jaxformer.model import validate_model
  with pytest.raises(ConfigError, match=expected):
    validate_model(tiny_config(position='relative', **{key: value}))


def test_head_dim_lifts_the_divisibility_rule_and_saved_configs_without_new_keys_load():
  from configs import default
  from jaxformer.config import ModelConfig, validate
  assert ModelConfig.from_config(tiny_config(num_heads=3, num_kv_heads=1, head_dim=8)).head_dim == 8
  config = default.get_config()  # a config saved before the Hugging Face features: their keys are missing
  for key in ('head_dim', 'attention_scale', 'qkv_bias', 'pad_id', 'type_vocab_size', 'embed_norm', 'output_bias',
              'output_scale', 'relative_num_buckets', 'relative_max_distance'):
    del config.model[key]
  del config.decode['eos_id'], config.decode['start_id']
  from jaxformer import settings  # saved configs are read through the one upgrade path
  config = settings.upgrade_saved(config.to_dict())
  validate(config)
  cfg = ModelConfig.from_config(config.model)
  assert (cfg.head_dim, cfg.pad_id, cfg.attention_scale, cfg.output_scale) == (32, 0, -1.0, 1.0)
