"""The model section of the config: validation against the model's registries, the resolved ModelConfig, and
build_model (config -> model).

Every choice is checked against the registry that implements it (ARCHS, NORM_POSITIONS and REMATS (remat.py) in
transformer.py, POSITIONS and ROPE_SCALINGS in positions.py, NORMS, MLPS and DTYPES in layers.py, IMPLEMENTATIONS in
attention.py, HEADS and POOLINGS in heads.py), so a new entry there is accepted here with no second list to update.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections
from flax import nnx

from jaxformer.errors import ConfigError, check_choice, check_fraction, check_positive
from jaxformer.model import attention, heads, layers, positions, transformer


# Model keys that choose how the model computes (activation dtype, attention kernel, what the backward pass
# recomputes), not which function it computes or how its parameters are stored: a resume or an evaluation may
# change them (e.g. a run moved to a GPU resumes with attention_impl=cudnn, or one short of memory with remat=full).
EXECUTION_KEYS = ('dtype', 'attention_impl', 'remat')


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The model section with defaults resolved (-1 -> the real value). Hashable, so jit can treat it as static."""
  arch: str
  position: str
  norm: str
  norm_position: str
  mlp: str
  num_layers: int
  num_decoder_layers: int
  num_heads: int
  num_kv_heads: int
  d_model: int
  d_ff: int
  vocab_size: int
  max_len: int
  dropout: float
  attention_dropout: float
  use_bias: bool
  tie_embeddings: bool
  norm_eps: float
  rope_base: float
  dtype: str
  param_dtype: str
  attention_impl: str
  remat: str
  init_std: float
  # Keys added later have defaults, so configs saved before they existed still load (with the old behaviour).
  head_dim: int = -1  # per-head width; -1 = d_model // num_heads (T5 and some Llamas set it apart)
  attention_scale: float = -1.0  # query-key logit scale; -1 = head_dim ** -0.5, T5 uses 1.0 (no scaling)
  qkv_bias: bool = False  # biases on the query/key/value projections even when use_bias is off (Qwen2)
  pad_id: int = 0  # the padding token of default segment ids (and decoding's source); -1 = none (GPT-2, Llama)
  type_vocab_size: int = 0  # token-type (segment A/B) embeddings, BERT: 2; 0 = none
  embed_norm: bool = False  # a norm over the summed embeddings before the first block (BERT)
  output_bias: bool = False  # a bias [vocab] on the output logits (BERT's MLM decoder bias)
  relative_num_buckets: int = 32  # position=relative (T5): buckets of key - query distance per stack
  relative_max_distance: int = 128  # position=relative: distances beyond this share the last bucket
  output_scale: float = 1.0  # hidden states are multiplied by this before the output projection (T5 v1.0 tied:
                             # d_model ** -0.5)
  scan_layers: bool = False
  head: str = 'lm'  # model.head (heads.HEADS): lm = per-token logits | classification = [B, num_classes]
  num_classes: int = 0  # head=classification: the number of labels
  pooling: str = ''  # head=classification (heads.POOLINGS): first | mean | last; '' = first (encoder_only) /
                     # last (decoder_only)
  pooler: bool = False  # head=classification: BERT's pooler (dense + tanh) on the pooled vector
  # RoPE scaling (position=rope; positions.ROPE_SCALINGS), with transformers' rope_parameters in brackets.
  rope_scaling: str = 'none'  # none | linear | dynamic | llama3 | yarn  [rope_type]
  rope_factor: float = 1.0  # linear / dynamic / llama3 / yarn: the context extension factor  [factor]
  rope_original_max_len: int = -1  # the pre-training context length L; -1 = max_len (dynamic: L is where
                                   # scaling starts)  [original_max_position_embeddings; dynamic: max_position_...]
  rope_low_freq_factor: float = 1.0  # llama3: wavelengths above L / this are divided by factor  [low_freq_factor]
  rope_high_freq_factor: float = 4.0  # llama3: wavelengths below L / this are kept  [high_freq_factor]
  rope_beta_fast: float = 32.0  # yarn: dimensions turning more often than this within L are kept  [beta_fast]
  rope_beta_slow: float = 1.0  # yarn: dimensions turning less often than this are interpolated  [beta_slow]
  rope_attention_factor: float = -1.0  # yarn: cos / sin multiplier; -1 = computed from factor (and mscales)
  rope_mscale: float = 0.0  # yarn: with rope_mscale_all_dim, attention factor = mscale(factor, this) /
  rope_mscale_all_dim: float = 0.0  # mscale(factor, mscale_all_dim) (DeepSeek-style); 0 = unset
  rope_truncate: bool = True  # yarn: round the ramp's ends to whole dimensions  [truncate]

  def __post_init__(self):
    resolved = {'num_kv_heads': self.num_heads, 'num_decoder_layers': self.num_layers,
                'head_dim': self.d_model // self.num_heads, 'rope_original_max_len': self.max_len}
    for name, value in resolved.items():
      if getattr(self, name) == -1:
        object.__setattr__(self, name, value)
    if not self.pooling:
      object.__setattr__(self, 'pooling', heads.DEFAULT_POOLING.get(self.arch, 'first'))

  @classmethod
  def from_config(cls, model: ml_collections.ConfigDict | ModelConfig) -> ModelConfig:
    if isinstance(model, ModelConfig):
      return model
    validate_model(model)
    return cls(**{f.name: _get(model, f.name) for f in dataclasses.fields(cls)})


def _get(model: ml_collections.ConfigDict, key: str) -> Any:
  """model[key], or ModelConfig's default for a key the (older, saved) config does not have."""
  default = _DEFAULTS.get(key, dataclasses.MISSING)
  return model[key] if default is dataclasses.MISSING else model.get(key, default)


def validate_model(model: ml_collections.ConfigDict) -> None:
  """Checks the model section alone (build_model calls this)."""
  check_choice('model.arch', model.arch, transformer.ARCHS)
  check_choice('model.position', model.position, positions.POSITIONS)
  check_choice('model.norm', model.norm, layers.NORMS)
  check_choice('model.norm_position', model.norm_position, transformer.NORM_POSITIONS)
  check_choice('model.mlp', model.mlp, layers.MLPS)
  check_choice('model.dtype', model.dtype, layers.DTYPES)
  check_choice('model.param_dtype', model.param_dtype, layers.DTYPES)
  check_choice('model.attention_impl', model.attention_impl, attention.IMPLEMENTATIONS)
  check_choice('model.remat', model.remat, transformer.REMATS)
  for key in ('num_layers', 'num_heads', 'd_model', 'd_ff', 'max_len'):
    check_positive(f'model.{key}', model[key])
  if model.num_decoder_layers != -1:
    check_positive('model.num_decoder_layers', model.num_decoder_layers)
  check_positive('model.vocab_size', model.vocab_size, allow_zero=True)
  head_dim = _get(model, 'head_dim')
  if head_dim != -1:
    check_positive('model.head_dim', head_dim)
  elif model.d_model % model.num_heads:
    raise ConfigError(
        f'model.d_model={model.d_model} is not divisible by model.num_heads={model.num_heads}; '
        f'pick num_heads from the divisors of d_model (e.g. {_divisors_near(model.d_model, model.num_heads)}), '
        'or set model.head_dim.')
  kv = model.num_heads if model.num_kv_heads == -1 else model.num_kv_heads
  if not isinstance(kv, int) or kv <= 0:
    raise ConfigError(f'model.num_kv_heads={model.num_kv_heads!r} must be a positive integer, or -1 for num_heads.')
  if model.num_heads % kv:
    raise ConfigError(
        f'model.num_heads={model.num_heads} is not divisible by model.num_kv_heads={kv}; grouped-query attention '
        f'needs num_kv_heads to divide num_heads (e.g. {_divisors_near(model.num_heads, kv)}).')
  if model.position == 'rope' and head_dim != -1 and head_dim % 2:
    raise ConfigError(f'model.position=rope needs an even head dimension, but model.head_dim={head_dim}; '
                      'change model.head_dim.')
  if model.position == 'rope' and head_dim == -1 and (model.d_model // model.num_heads) % 2:
    raise ConfigError(
        f'model.position=rope needs an even head dimension, but d_model/num_heads = '
        f'{model.d_model}/{model.num_heads} = {model.d_model // model.num_heads}; change d_model or num_heads.')
  _validate_rope_scaling(model)
  scale = _get(model, 'attention_scale')
  if scale != -1 and not scale > 0:
    raise ConfigError(f'model.attention_scale={scale!r} must be > 0, or -1 for head_dim ** -0.5.')
  check_positive('model.type_vocab_size', _get(model, 'type_vocab_size'), allow_zero=True)
  if model.position == 'relative':
    buckets, distance = _get(model, 'relative_num_buckets'), _get(model, 'relative_max_distance')
    if not isinstance(buckets, int) or buckets < 4:
      raise ConfigError(f'model.relative_num_buckets={buckets!r} must be an integer >= 4 (T5: 32).')
    if not isinstance(distance, int) or distance <= buckets // 2:
      raise ConfigError(f'model.relative_max_distance={distance!r} must be an integer > relative_num_buckets / 2 '
                        f'= {buckets // 2} (T5: 128).')
  pad_id = _get(model, 'pad_id')
  if not isinstance(pad_id, int) or pad_id < -1:
    raise ConfigError(f'model.pad_id={pad_id!r} must be a token id >= 0, or -1 for no padding token.')
  check_fraction('model.dropout', model.dropout)
  check_fraction('model.attention_dropout', model.attention_dropout)
  _validate_head(model)


def _validate_rope_scaling(model: ml_collections.ConfigDict) -> None:
  kind = _get(model, 'rope_scaling')
  check_choice('model.rope_scaling', kind, positions.ROPE_SCALINGS)
  if kind == 'none':
    return
  if model.position != 'rope':
    raise ConfigError(f'model.rope_scaling={kind} scales RoPE, but model.position={model.position}; set '
                      'model.position=rope or model.rope_scaling=none.')
  factor = _get(model, 'rope_factor')
  if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor >= 1:
    raise ConfigError(f'model.rope_factor={factor!r} must be a number >= 1 (the context extension factor).')
  length = _get(model, 'rope_original_max_len')
  if length != -1:
    check_positive('model.rope_original_max_len', length)
  if kind == 'llama3':
    low, high = _get(model, 'rope_low_freq_factor'), _get(model, 'rope_high_freq_factor')
    if not 0 < low < high:
      raise ConfigError(f'model.rope_scaling=llama3 needs 0 < model.rope_low_freq_factor < '
                        f'model.rope_high_freq_factor, but they are {low!r} and {high!r} (Llama 3.1: 1 and 4).')
  if kind == 'yarn':
    fast, slow = _get(model, 'rope_beta_fast'), _get(model, 'rope_beta_slow')
    if not 0 < slow <= fast:
      raise ConfigError(f'model.rope_scaling=yarn needs 0 < model.rope_beta_slow <= model.rope_beta_fast, but '
                        f'they are {slow!r} and {fast!r} (YaRN: 1 and 32).')
    attention = _get(model, 'rope_attention_factor')
    if attention != -1 and not attention > 0:
      raise ConfigError(f'model.rope_attention_factor={attention!r} must be > 0, or -1 for the YaRN formula.')


def _validate_head(model: ml_collections.ConfigDict) -> None:
  head = _get(model, 'head')
  check_choice('model.head', head, heads.HEADS)
  pooling = _get(model, 'pooling')
  if pooling:
    check_choice('model.pooling', pooling, heads.POOLINGS)
  if head != 'classification':
    return
  if model.arch not in heads.CLASSIFICATION_ARCHS:
    raise ConfigError(f'model.head=classification is not supported for model.arch={model.arch}; use '
                      f'{" or ".join(heads.CLASSIFICATION_ARCHS)}.')
  num_classes = _get(model, 'num_classes')
  if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
    raise ConfigError(f'model.head=classification needs model.num_classes >= 2 (the number of labels), but it is '
                      f'{num_classes!r}; set --config.model.num_classes.')


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ModelConfig) if f.default is not dataclasses.MISSING}


def _divisors_near(n: int, target: int) -> int:
  divisors = [d for d in range(1, n + 1) if n % d == 0]
  return min(divisors, key=lambda d: abs(d - target))


def build_model(model_config: Any, *, rngs: nnx.Rngs) -> nnx.Module:
  """config.model (ConfigDict, validated here) or a ModelConfig -> the model. Rng streams: params, dropout."""
  cfg = ModelConfig.from_config(model_config)
  if cfg.vocab_size <= 0:
    raise ConfigError(f'model.vocab_size={cfg.vocab_size} must be set before building the model (0 means "take '
                      "the tokenizer's vocab_size\"; set config.model.vocab_size = tokenizer.vocab_size).")
  return transformer.ARCHS[cfg.arch](cfg, rngs=rngs)
