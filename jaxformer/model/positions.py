"""Position encodings. Each is a module with three hooks, so a stack treats them alike:

  add(x, positions) -> the token embeddings x [B,T,D] with absolute positions added (or x unchanged);
  rotary(positions) -> (cos, sin) applied to queries and keys in self-attention, or None;
  bias(q_positions, k_positions, bidirectional=) -> float32 [B,N,T,S] added to self-attention logits, or None.

Positions come from the caller (packed rows restart at 0; decoding continues from the cache index), never from
the row index. Adding an encoding is one class plus one entry in POSITIONS.

RoPE scaling (model.rope_scaling, for contexts longer than pre-training's): ROPE_SCALINGS maps each kind to a
function of the model config giving the inverse frequencies and a factor on cos / sin, computed (in float32) as
transformers' modeling_rope_utils.py does for the same rope_type; adding a kind is one function plus one entry.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxformer import logical
from jaxformer.model import layers

Array = jax.Array


def sinusoidal(positions: Array, d_model: int, base: float = 10000.0) -> Array:
  """Vaswani et al.: PE[p, 2i] = sin(p / base^(2i/d)), PE[p, 2i+1] = cos(p / base^(2i/d)). float32 [..., d]."""
  inv_freq = 1.0 / base ** (np.arange(0, d_model, 2, dtype=np.float32) / d_model)  # [ceil(d/2)]
  angles = positions.astype(jnp.float32)[..., None] * inv_freq
  table = jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1).reshape(*angles.shape[:-1], -1)
  return table[..., :d_model]


def sinusoidal_table(max_len: int, d_model: int, base: float = 10000.0) -> Array:
  return sinusoidal(jnp.arange(max_len), d_model, base)


def rope_inv_freq(head_dim: int, base: float) -> np.ndarray:
  """Unscaled RoPE frequencies base^(-2i/H), i < H/2, float32 [H/2]."""
  return (1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)).astype(np.float32)


def rope(positions: Array, head_dim: int, base: float = 10000.0, *, inv_freq: Any = None,
         attention_factor: float = 1.0) -> tuple[Array, Array]:
  """cos, sin [B,T,1,H] (float32) for the rotate-half form: frequencies inv_freq (default base^(-2i/H), i < H/2)
  repeated twice, both scaled by attention_factor (YaRN's; 1 otherwise)."""
  inv_freq = rope_inv_freq(head_dim, base) if inv_freq is None else inv_freq
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B,T,H/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
  if attention_factor == 1.0:
    return jnp.cos(angles), jnp.sin(angles)
  return jnp.cos(angles) * attention_factor, jnp.sin(angles) * attention_factor


# ----------------------------------------------------------------------------------------------- RoPE scaling
# Each function: (cfg, positions [B,T]) -> (inverse frequencies [head_dim / 2], attention factor). cfg is the
# ModelConfig (head_dim, rope_base, rope_* keys resolved); only `dynamic` reads the positions (a traced array).
RopeScaling = Callable[[Any, Array], tuple[Any, float]]


def _no_scaling(cfg, positions: Array) -> tuple[np.ndarray, float]:
  return rope_inv_freq(cfg.head_dim, cfg.rope_base), 1.0


def _linear(cfg, positions: Array) -> tuple[np.ndarray, float]:
  """Position interpolation (kaiokendev; Chen et al. 2023): every frequency divided by rope_factor."""
  return (rope_inv_freq(cfg.head_dim, cfg.rope_base) / np.float32(cfg.rope_factor)).astype(np.float32), 1.0


def _dynamic(cfg, positions: Array) -> tuple[Array, float]:
  """Dynamic NTK (bloc97 / emozilla): for a call whose positions reach past L = rope_original_max_len, the base
  becomes base * (factor * s / L - (factor - 1)) ** (H / (H - 2)), s = max position + 1 (over the whole batch);
  unscaled up to L.

  transformers recomputes the frequencies in each forward pass from the largest position it is given, as here, so
  a forward pass and a generation (positions only grow; cached keys keep the frequencies they were written with)
  agree. Its one difference: its module remembers the largest length seen until a call shorter than L resets it, so
  a later call of length in (L, that maximum) reuses the larger base there; here every call stands alone.
  """
  dim, length, factor = cfg.head_dim, cfg.rope_original_max_len, cfg.rope_factor
  seq_len = jnp.maximum(jnp.max(positions).astype(jnp.int32) + 1, length)
  # float32 throughout, as transformers' tensor arithmetic.
  ratio = (jnp.float32(factor) * seq_len.astype(jnp.float32) / jnp.float32(length)) - jnp.float32(factor - 1)
  base = jnp.float32(cfg.rope_base) * ratio ** jnp.float32(dim / (dim - 2))
  return 1.0 / base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim), 1.0


def _llama3(cfg, positions: Array) -> tuple[np.ndarray, float]:
  """Llama 3.1: with L = rope_original_max_len, frequencies of wavelength above L / low_freq_factor are divided by
  rope_factor, those below L / high_freq_factor kept, and those between blended linearly in L / wavelength."""
  inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_base)
  factor, low, high = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
  length = cfg.rope_original_max_len
  wavelen = (2 * math.pi / inv_freq).astype(np.float32)
  scaled = np.where(wavelen > length / low, inv_freq / np.float32(factor), inv_freq).astype(np.float32)
  smooth = ((length / wavelen - low) / (high - low)).astype(np.float32)
  smoothed = ((1 - smooth) * scaled / np.float32(factor) + smooth * scaled).astype(np.float32)
  medium = ~(wavelen < length / high) & ~(wavelen > length / low)
  return np.where(medium, smoothed, scaled).astype(np.float32), 1.0


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
  """YaRN's attention temperature 0.1 * mscale * ln(scale) + 1 (1 for scale <= 1)."""
  return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(cfg, positions: Array) -> tuple[np.ndarray, float]:
  """YaRN (Peng et al. 2023): with L = rope_original_max_len, frequencies that turn more than beta_fast times
  within L are kept, fewer than beta_slow times divided by rope_factor, a linear ramp over the dimensions between;
  cos / sin are multiplied by the attention factor (rope_attention_factor, or -1 = 0.1 ln(factor) + 1, or with
  rope_mscale and rope_mscale_all_dim both set, mscale(factor, mscale) / mscale(factor, mscale_all_dim)).
  rope_truncate rounds the ramp's ends outwards to whole dimensions (transformers' default)."""
  dim, base, factor, length = cfg.head_dim, cfg.rope_base, cfg.rope_factor, cfg.rope_original_max_len
  attention = cfg.rope_attention_factor
  if attention == -1:
    if cfg.rope_mscale and cfg.rope_mscale_all_dim:
      attention = yarn_mscale(factor, cfg.rope_mscale) / yarn_mscale(factor, cfg.rope_mscale_all_dim)
    else:
      attention = yarn_mscale(factor)

  def correction_dim(rotations: float) -> float:  # the dimension whose frequency turns `rotations` times within L
    return dim * math.log(length / (rotations * 2 * math.pi)) / (2 * math.log(base))

  low, high = correction_dim(cfg.rope_beta_fast), correction_dim(cfg.rope_beta_slow)
  if cfg.rope_truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, dim - 1)
  if low == high:
    high += 0.001  # as transformers: no zero-width ramp
  pos_freqs = (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim)).astype(np.float32)
  extrapolation = (1.0 / pos_freqs).astype(np.float32)
  interpolation = (1.0 / (np.float32(factor) * pos_freqs)).astype(np.float32)
  ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
  keep = (1 - ramp).astype(np.float32)  # 1: the original frequency, 0: the interpolated one
  return (interpolation * (1 - keep) + extrapolation * keep).astype(np.float32), float(attention)


ROPE_SCALINGS: dict[str, RopeScaling] = {'none': _no_scaling, 'linear': _linear, 'dynamic': _dynamic,
                                         'llama3': _llama3, 'yarn': _yarn}


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
  """x [B,T,N,H] rotated: x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1]. Computed in float32."""
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x.astype(jnp.float32) * cos + rotated * sin).astype(x.dtype)


class Sinusoidal(nnx.Module):
  """Fixed sinusoidal absolute positions (no parameters)."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    self.d_model = cfg.d_model

  def add(self, x: Array, positions: Array) -> Array:
    # Vaswani et al. scale the embeddings by sqrt(d_model) so they are not swamped by the unit-size table.
    return x * (self.d_model ** 0.5) + sinusoidal(positions, self.d_model).astype(x.dtype)

  def rotary(self, positions: Array) -> tuple[Array, Array] | None:
    return None

  def bias(self, q_positions: Array, k_positions: Array, *, bidirectional: bool) -> Array | None:
    return None


class Learned(nnx.Module):
  """Learned absolute positions [max_len, embed] (GPT-2 / BERT)."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    self.embedding = layers.param(rngs, layers.normal(cfg.init_std), (cfg.max_len, cfg.d_model), (None, 'embed'),
                                  jnp.dtype(cfg.param_dtype))

  def add(self, x: Array, positions: Array) -> Array:
    # As the token embedding (layers.Embed): look up in the table gathered over its 'embed' (FSDP) shards, or
    # XLA replicates the [B,T,D] lookup and its gradient (involuntary full rematerialisation with fsdp > 1).
    table = logical.constrain(self.embedding[...], (None, None))
    return x + jnp.take(table, positions, axis=0).astype(x.dtype)

  def rotary(self, positions: Array) -> tuple[Array, Array] | None:
    return None

  def bias(self, q_positions: Array, k_positions: Array, *, bidirectional: bool) -> Array | None:
    return None


class Rope(nnx.Module):
  """Rotary position embedding (Su et al.), rotate-half form, on queries and keys of self-attention, with the
  frequencies of model.rope_scaling (ROPE_SCALINGS). Training, prefill and every decoding step come through
  rotary(positions), so all of them see the same scaling."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    self.cfg = cfg  # a frozen (hashable) ModelConfig: static data of the module

  def add(self, x: Array, positions: Array) -> Array:
    return x

  def rotary(self, positions: Array) -> tuple[Array, Array] | None:
    inv_freq, attention_factor = ROPE_SCALINGS[self.cfg.rope_scaling](self.cfg, positions)
    return rope(positions, self.cfg.head_dim, inv_freq=inv_freq, attention_factor=attention_factor)

  def bias(self, q_positions: Array, k_positions: Array, *, bidirectional: bool) -> Array | None:
    return None


def relative_bucket(relative: np.ndarray, *, bidirectional: bool, num_buckets: int, max_distance: int) -> np.ndarray:
  """T5's bucket of each relative position (key position - query position), integer array in, same shape out.

  Bidirectional (encoder): half the buckets for keys after the query. Causal (decoder): only keys at or before the
  query have buckets (later ones share bucket 0, and the mask removes them). Within a direction, distances below
  half its buckets get one bucket each; the rest are log-spaced up to max_distance, beyond which all share the
  last bucket. float32 as in the reference implementations, so the buckets agree with theirs exactly.
  """
  relative = np.asarray(relative, np.int64)
  buckets = np.zeros_like(relative)
  if bidirectional:
    num_buckets //= 2
    buckets += (relative > 0) * num_buckets
    distance = np.abs(relative)
  else:
    distance = -np.minimum(relative, 0)
  max_exact = num_buckets // 2
  f32 = np.float32
  log_ratio = (np.log(np.maximum(distance, max_exact).astype(f32) / f32(max_exact))
               / f32(np.log(max_distance / max_exact)))
  large = np.minimum(max_exact + (log_ratio * f32(num_buckets - max_exact)).astype(np.int64), num_buckets - 1)
  return buckets + np.where(distance < max_exact, distance, large)


class Relative(nnx.Module):
  """T5's relative position bias: one learned scalar per (bucket of key - query position, head), added to the
  self-attention logits of every layer of the stack (computed once per stack, as T5 shares layer 0's table).

  Param `embedding` [relative_num_buckets, num_heads] (Hugging Face: block 0's relative_attention_bias.weight).
  """

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    self.num_buckets, self.max_distance, self.max_len = (cfg.relative_num_buckets, cfg.relative_max_distance,
                                                         cfg.max_len)
    self.embedding = layers.param(rngs, layers.normal(cfg.init_std), (cfg.relative_num_buckets, cfg.num_heads),
                                  (None, 'heads'), jnp.dtype(cfg.param_dtype))

  def add(self, x: Array, positions: Array) -> Array:
    return x

  def rotary(self, positions: Array) -> tuple[Array, Array] | None:
    return None

  def bias(self, q_positions: Array, k_positions: Array, *, bidirectional: bool) -> Array | None:
    """q_positions [B,T], k_positions [B|1,S] -> float32 [B,N,T,S]."""
    span = self.max_len - 1  # positions lie in [0, max_len), so key - query lies in [-span, span]
    table = relative_bucket(np.arange(-span, span + 1), bidirectional=bidirectional, num_buckets=self.num_buckets,
                            max_distance=self.max_distance)
    relative = jnp.clip(k_positions[:, None, :] - q_positions[:, :, None], -span, span) + span  # [B,T,S]
    buckets = jnp.asarray(table, jnp.int32)[relative]
    values = jnp.take(self.embedding[...].astype(jnp.float32), buckets, axis=0)  # [B,T,S,N]
    return jnp.transpose(values, (0, 3, 1, 2))


POSITIONS: dict[str, type[nnx.Module]] = {'sinusoidal': Sinusoidal, 'rope': Rope, 'learned': Learned,
                                          'relative': Relative}
