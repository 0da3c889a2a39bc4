"""Position encodings. Each is a module with three hooks, so a stack treats them alike:

  add(x, positions) -> the token embeddings x [B,T,D] with absolute positions added (or x unchanged);
  rotary(positions) -> (cos, sin) applied to queries and keys in self-attention, or None;
  bias(q_positions, k_positions, bidirectional=) -> float32 [B,N,T,S] added to self-attention logits, or None.

Positions come from the caller (packed rows restart at 0; decoding continues from the cache index), never from
the row index. Adding an encoding is one class plus one entry in POSITIONS.
"""
from __future__ import annotations

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


def rope(positions: Array, head_dim: int, base: float = 10000.0) -> tuple[Array, Array]:
  """cos, sin [B,T,1,H] (float32) for the rotate-half form: frequencies base^(-2i/H), i < H/2, repeated twice."""
  inv_freq = 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B,T,H/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
  return jnp.cos(angles), jnp.sin(angles)


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
  """Rotary position embedding (Su et al.), rotate-half form, on queries and keys of self-attention."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    self.head_dim, self.base = cfg.head_dim, cfg.rope_base

  def add(self, x: Array, positions: Array) -> Array:
    return x

  def rotary(self, positions: Array) -> tuple[Array, Array] | None:
    return rope(positions, self.head_dim, self.base)

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
