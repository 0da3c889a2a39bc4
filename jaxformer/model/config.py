"""The model section of the config: validation against the model's registries, the resolved ModelConfig, and
build_model (config -> model).

Every choice is checked against the registry that implements it (ARCHS, NORM_POSITIONS and REMATS (remat.py) in
transformer.py, POSITIONS and ROPE_SCALINGS in positions.py, NORMS, MLPS and DTYPES in layers.py, IMPLEMENTATIONS in
attention.py, and the head registry jaxformer/heads), so a new entry there is accepted here with no second list.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections
from flax import nnx

from jaxformer.errors import ConfigError, check_choice, check_fraction, check_positive
from jaxformer import heads
from jaxformer.model import attention, layers, moe, positions, transformer


# Model keys that choose how the model computes (activation dtype, attention kernel, what the backward pass
# recomputes), not which function it computes or how its parameters are stored: a resume or an evaluation may
# change them (e.g. a run moved to a GPU resumes with attention_impl=cudnn, or one short of memory with remat=full).
EXECUTION_KEYS = ('dtype', 'attention_impl', 'remat')


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The model section, every key given (configs/default.py has their one default and says what each means), with
  the -1 / '' placeholders resolved to the real value. Hashable, so jit can treat it as static."""
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
  head_dim: int  # -1 = d_model // num_heads
  attention_scale: float  # -1 = head_dim ** -0.5
  qkv_bias: bool
  qk_norm: str  # attention.QK_NORMS
  pad_id: int
  type_vocab_size: int
  embed_norm: bool
  output_bias: bool
  relative_num_buckets: int
  relative_max_distance: int
  output_scale: float
  scan_layers: bool
  head: str  # jaxformer/heads: HEADS
  num_classes: int
  pooling: str  # '' = the arch's default (heads.DEFAULT_POOLING)
  pooler: bool
  rope_scaling: str  # positions.ROPE_SCALINGS; the rope_* keys are its parameters (configs/default.py)
  rope_factor: float
  rope_original_max_len: int  # -1 = max_len
  rope_low_freq_factor: float
  rope_high_freq_factor: float
  rope_beta_fast: float
  rope_beta_slow: float
  rope_attention_factor: float  # -1 = computed from rope_factor (and the mscales)
  rope_mscale: float
  rope_mscale_all_dim: float
  rope_truncate: bool
  num_experts: int  # 0 = dense; the rest of the moe keys matter only when > 0 (model/moe.py)
  experts_per_token: int
  moe_every: int
  router: str  # moe.ROUTERS
  num_shared_experts: int
  moe_shared_gate: bool
  expert_d_ff: int  # 0 = d_ff
  capacity_factor: float
  moe_impl: str  # moe.IMPLEMENTATIONS
  sliding_window: int  # 0 = off
  embed_scale: bool  # token embeddings x sqrt(d_model) (Gemma)
  attention_softcap: float  # 0 = off
  logit_softcap: float  # 0 = off
  sliding_window_pattern: str  # L / G per layer, repeated (layer_windows)

  def __post_init__(self):
    resolved = {'num_kv_heads': self.num_heads, 'num_decoder_layers': self.num_layers,
                'head_dim': self.d_model // self.num_heads, 'rope_original_max_len': self.max_len}
    for name, value in resolved.items():
      if getattr(self, name) == -1:
        object.__setattr__(self, name, value)
    if not self.pooling:
      object.__setattr__(self, 'pooling', heads.DEFAULT_POOLING.get(self.arch, 'first'))

  def layer_windows(self, num_layers: int | None = None) -> tuple[int, ...]:
    """Each layer's attention window (0 = global): model.sliding_window where the repeated
    model.sliding_window_pattern says L. num_layers: the stack's depth (default num_layers)."""
    n = self.num_layers if num_layers is None else num_layers
    pattern = self.sliding_window_pattern
    return tuple(self.sliding_window if pattern[i % len(pattern)] == 'L' else 0 for i in range(n))

  @classmethod
  def from_config(cls, model: ml_collections.ConfigDict | ModelConfig) -> ModelConfig:
    if isinstance(model, ModelConfig):
      return model
    validate_model(model)
    return cls(**{f.name: model[f.name] for f in dataclasses.fields(cls)})


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
  check_choice('model.qk_norm', model.qk_norm, attention.QK_NORMS)
  check_choice('model.remat', model.remat, transformer.REMATS)
  for key in ('num_layers', 'num_heads', 'd_model', 'd_ff', 'max_len'):
    check_positive(f'model.{key}', model[key])
  if model.num_decoder_layers != -1:
    check_positive('model.num_decoder_layers', model.num_decoder_layers)
  check_positive('model.vocab_size', model.vocab_size, allow_zero=True)
  head_dim = model.head_dim
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
  scale = model.attention_scale
  if scale != -1 and not scale > 0:
    raise ConfigError(f'model.attention_scale={scale!r} must be > 0, or -1 for head_dim ** -0.5.')
  check_positive('model.type_vocab_size', model.type_vocab_size, allow_zero=True)
  if model.position == 'relative':
    buckets, distance = model.relative_num_buckets, model.relative_max_distance
    if not isinstance(buckets, int) or buckets < 4:
      raise ConfigError(f'model.relative_num_buckets={buckets!r} must be an integer >= 4 (T5: 32).')
    if not isinstance(distance, int) or distance <= buckets // 2:
      raise ConfigError(f'model.relative_max_distance={distance!r} must be an integer > relative_num_buckets / 2 '
                        f'= {buckets // 2} (T5: 128).')
  pad_id = model.pad_id
  if not isinstance(pad_id, int) or pad_id < -1:
    raise ConfigError(f'model.pad_id={pad_id!r} must be a token id >= 0, or -1 for no padding token.')
  _validate_sliding_window(model)
  for key in ('attention_softcap', 'logit_softcap'):
    cap = model[key]
    if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not cap >= 0:
      raise ConfigError(f'model.{key}={cap!r} must be a number > 0 (the tanh cap), or 0 for none.')
  check_fraction('model.dropout', model.dropout)
  check_fraction('model.attention_dropout', model.attention_dropout)
  _validate_moe(model)
  heads.validate(model)


def _validate_moe(model: ml_collections.ConfigDict) -> None:
  """The mixture-of-experts keys (model/moe.py); checked only when model.num_experts > 0, except its own sign."""
  check_positive('model.num_experts', model.num_experts, allow_zero=True)
  if not model.num_experts:
    return
  e, k = model.num_experts, model.experts_per_token
  check_positive('model.experts_per_token', k)
  if k > e:
    raise ConfigError(f'model.experts_per_token={k} exceeds model.num_experts={e}; route each token to at most '
                      f'num_experts experts (e.g. model.experts_per_token={min(2, e)}).')
  check_positive('model.moe_every', model.moe_every)
  check_choice('model.router', model.router, moe.ROUTERS)
  check_choice('model.moe_impl', model.moe_impl, moe.IMPLEMENTATIONS)
  check_positive('model.num_shared_experts', model.num_shared_experts, allow_zero=True)
  check_positive('model.expert_d_ff', model.expert_d_ff, allow_zero=True)
  cf = model.capacity_factor
  if isinstance(cf, bool) or not isinstance(cf, (int, float)) or cf < 0:
    raise ConfigError(f'model.capacity_factor={cf!r} must be a number >= 0 (0 = dropless; Switch: 1.25).')
  if model.moe_impl == 'capacity' and not cf > 0:
    raise ConfigError('model.moe_impl=capacity needs model.capacity_factor > 0 (e.g. 1.25: slots per expert = '
                      'capacity_factor * tokens * experts_per_token / num_experts).')
  if model.moe_impl != 'capacity' and cf > 0:
    raise ConfigError(f'model.capacity_factor={cf} drops tokens only with model.moe_impl=capacity; set '
                      f'model.moe_impl=capacity, or model.capacity_factor=0 for {model.moe_impl} (never drops).')
  if model.scan_layers and model.moe_every != 1:
    raise ConfigError(f'model.scan_layers=True scans one block body, so every layer must be alike: set '
                      f'model.moe_every=1 (now {model.moe_every}) or model.scan_layers=False.')


def _validate_rope_scaling(model: ml_collections.ConfigDict) -> None:
  kind = model.rope_scaling
  check_choice('model.rope_scaling', kind, positions.ROPE_SCALINGS)
  if kind == 'none':
    return
  if model.position != 'rope':
    raise ConfigError(f'model.rope_scaling={kind} scales RoPE, but model.position={model.position}; set '
                      'model.position=rope or model.rope_scaling=none.')
  factor = model.rope_factor
  if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor >= 1:
    raise ConfigError(f'model.rope_factor={factor!r} must be a number >= 1 (the context extension factor).')
  length = model.rope_original_max_len
  if length != -1:
    check_positive('model.rope_original_max_len', length)
  if kind == 'llama3':
    low, high = model.rope_low_freq_factor, model.rope_high_freq_factor
    if not 0 < low < high:
      raise ConfigError(f'model.rope_scaling=llama3 needs 0 < model.rope_low_freq_factor < '
                        f'model.rope_high_freq_factor, but they are {low!r} and {high!r} (Llama 3.1: 1 and 4).')
  if kind == 'yarn':
    fast, slow = model.rope_beta_fast, model.rope_beta_slow
    if not 0 < slow <= fast:
      raise ConfigError(f'model.rope_scaling=yarn needs 0 < model.rope_beta_slow <= model.rope_beta_fast, but '
                        f'they are {slow!r} and {fast!r} (YaRN: 1 and 32).')
    attention = model.rope_attention_factor
    if attention != -1 and not attention > 0:
      raise ConfigError(f'model.rope_attention_factor={attention!r} must be > 0, or -1 for the YaRN formula.')


def _validate_sliding_window(model: ml_collections.ConfigDict) -> None:
  """model.sliding_window / sliding_window_pattern: a window of causal self-attention (decoder_only), not with
  T5's relative position bias (its cached key positions assume the whole cache)."""
  window, pattern = model.sliding_window, model.sliding_window_pattern
  check_positive('model.sliding_window', window, allow_zero=True)
  if not isinstance(pattern, str) or not pattern or set(pattern) - {'L', 'G'}:
    raise ConfigError(f'model.sliding_window_pattern={pattern!r} must be a non-empty string of L (windowed layer) and '
                      'G (global layer), repeated over the layers, e.g. L (every layer) or LG (Gemma 2).')
  if window and model.arch != 'decoder_only':
    raise ConfigError(f'model.sliding_window={window} is supported for model.arch=decoder_only only (not '
                      f'{model.arch}); set model.sliding_window=0.')
  if window and model.position == 'relative':
    raise ConfigError(f'model.sliding_window={window} does not combine with model.position=relative; use rope, '
                      'learned or sinusoidal positions, or model.sliding_window=0.')


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
