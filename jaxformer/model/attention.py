"""Multi-head / grouped-query attention: the kernel dispatch, the reference oracle, self/cross attention, KV cache.

Shapes follow `jax.nn.dot_product_attention` so no transposes are needed: q [B,T,N,H], k/v [B,S,K,H] with K kv
heads dividing the N query heads, masks bool broadcastable to [B,N,T,S] (True = may attend).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.model import layers, positions

Array = jax.Array


def reference_attention(q: Array, k: Array, v: Array, mask: Array | None,
                        dropout: Callable[[Array], Array] | None = None, *, bias: Array | None = None,
                        scale: float | None = None) -> Array:
  """Plain-jnp attention: the oracle for tests, and the path that can drop attention probabilities.

  bias: float, broadcastable to [B,N,T,S], added to the scaled logits (T5's relative positions). scale: the logit
  scale, None = 1 / sqrt(head_dim). Query rows with no allowed key (padding) return zeros.
  """
  b, t, n, h = q.shape
  kv_heads = k.shape[2]
  qg = q.reshape(b, t, kv_heads, n // kv_heads, h)
  logits = jnp.einsum('btkgh,bskh->bkgts', qg, k, preferred_element_type=jnp.float32)
  logits = logits / math.sqrt(h) if scale is None else logits * scale
  if bias is not None:
    bias = jnp.broadcast_to(bias, (b, bias.shape[1], t, k.shape[1])).astype(jnp.float32)
    logits = logits + (bias[:, :, None] if bias.shape[1] == 1 else bias.reshape(b, kv_heads, n // kv_heads, t, -1))
  if mask is not None:
    mask = _grouped_mask(mask, b, n, kv_heads, t, k.shape[1])
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  if mask is not None:
    probs = jnp.where(mask, probs, 0.0)  # fully masked rows -> all-zero probabilities -> zero output
  if dropout is not None:
    probs = dropout(probs)
  out = jnp.einsum('bkgts,bskh->btkgh', probs.astype(v.dtype), v)
  return out.reshape(b, t, n, h)


def _grouped_mask(mask: Array, b: int, n: int, kv_heads: int, t: int, s: int) -> Array:
  """[B|1, N|1, T, S] -> broadcastable [B, K, G, T, S] matching the grouped query layout."""
  mask = jnp.broadcast_to(mask, (b, mask.shape[1], t, s))
  if mask.shape[1] == 1:
    return mask[:, :, None]
  return mask.reshape(b, kv_heads, n // kv_heads, t, s)


# model.attention_impl: 'reference' is reference_attention; the others are jax.nn.dot_product_attention's
# implementations, with 'auto' resolved by resolve_implementation.
IMPLEMENTATIONS = ('auto', 'xla', 'cudnn', 'reference')


def resolve_implementation(implementation: str, dtype: Any, head_dim: int, q_len: int, kv_len: int,
                           has_bias: bool = False) -> str:
  """'auto' -> 'cudnn' where the cuDNN flash kernel accepts the call (GPU, 16-bit, head_dim % 8 == 0 and <= 128,
  even lengths since we pass a mask, no additive bias: a trained bias needs its gradient, which the kernel only
  gives for some bias shapes), else 'xla'. Decided at trace time, so it costs nothing per step."""
  if implementation != 'auto':
    return implementation
  ok = (jax.default_backend() == 'gpu' and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        and head_dim % 8 == 0 and head_dim <= 128 and q_len % 2 == 0 and kv_len % 2 == 0 and not has_bias)
  return 'cudnn' if ok else 'xla'


def dot_product_attention(q: Array, k: Array, v: Array, mask: Array | None, *, implementation: str = 'xla',
                          is_causal: bool = False, bias: Array | None = None, scale: float | None = None) -> Array:
  """`jax.nn.dot_product_attention` with the mask semantics of `reference_attention` (and its bias / scale).

  `is_causal` is a hint (the mask must already hold the causal part): the cuDNN kernel then skips the masked
  upper triangle. Rows with no allowed key give zeros (jax would return the mean of v there).
  """
  if implementation == 'reference':
    return reference_attention(q, k, v, mask, bias=bias, scale=scale)
  requested = implementation
  implementation = resolve_implementation(implementation, q.dtype, q.shape[-1], q.shape[1], k.shape[1],
                                          has_bias=bias is not None)
  full = lambda x: jnp.broadcast_to(x, (q.shape[0], x.shape[1], q.shape[1], k.shape[1]))  # noqa: E731
  if mask is not None:  # cuDNN wants the mask at full [T, S] size (it becomes an additive bias)
    mask = full(mask)
  if bias is not None:
    bias = full(bias).astype(q.dtype)
  try:
    out = jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale, implementation=implementation,
                                       is_causal=is_causal and implementation == 'cudnn')
  except (NotImplementedError, ValueError, RuntimeError):
    if requested != 'auto' or implementation == 'xla':
      raise
    # 'auto' picked cuDNN but this GPU / cuDNN version / shape is not supported (checked at trace time).
    out = jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale, implementation='xla')
  if mask is None:
    return out
  row_has_key = jnp.any(mask, axis=-1)  # [B, N|1, T]
  return out * jnp.swapaxes(row_has_key, 1, 2)[..., None].astype(out.dtype)


class Attention(nnx.Module):
  """Multi-head attention with `num_kv_heads` key/value heads (MHA, GQA or MQA); self- or cross-attention.

  Self-attention calls leave `kv` None; cross-attention passes `kv=attn.kv(encoded)` (computed once, and kept in
  the decoding cache). With `cache` (self-attention decoding) the new keys/values are written at `cache_index`.
  """

  def __init__(self, cfg, *, out_std: float | None = None, rngs: nnx.Rngs):
    """out_std: init std of the output projection (GPT-2 scales it down by sqrt(residual sublayers))."""
    d, n, kvh, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    self.num_heads, self.num_kv_heads, self.head_dim = n, kvh, h
    self.scale = None if cfg.attention_scale == -1 else float(cfg.attention_scale)  # None: 1 / sqrt(head_dim)
    self.dtype = jnp.dtype(cfg.dtype)
    self.implementation = cfg.attention_impl
    pdt, std = jnp.dtype(cfg.param_dtype), cfg.init_std
    out_std = std if out_std is None else out_std
    self.query = layers.param(rngs, layers.normal(std), (d, n, h), ('embed', 'heads', 'kv'), pdt)
    self.key = layers.param(rngs, layers.normal(std), (d, kvh, h), ('embed', 'kv_heads', 'kv'), pdt)
    self.value = layers.param(rngs, layers.normal(std), (d, kvh, h), ('embed', 'kv_heads', 'kv'), pdt)
    self.out = layers.param(rngs, layers.normal(out_std), (n, h, d), ('heads', 'kv', 'embed'), pdt)
    bias = lambda shape, names, on: layers.param(rngs, layers.zeros, shape, names, pdt) if on else None
    qkv_bias = cfg.use_bias or cfg.qkv_bias
    self.query_bias = bias((n, h), ('heads', 'kv'), qkv_bias)
    self.key_bias = bias((kvh, h), ('kv_heads', 'kv'), qkv_bias)
    self.value_bias = bias((kvh, h), ('kv_heads', 'kv'), qkv_bias)
    self.out_bias = bias((d,), ('embed',), cfg.use_bias)
    self.attention_dropout = nnx.Dropout(cfg.attention_dropout, rngs=rngs)

  def _project(self, x: Array, kernel: nnx.Param, bias: nnx.Param | None) -> Array:
    y = layers.matmul(x, kernel[...].astype(self.dtype))  # [B,T,D] @ [D,N,H] -> [B,T,N,H]
    y = y if bias is None else y + bias[...].astype(self.dtype)
    return layers.lora_update(self, kernel, x, y)

  def kv(self, x: Array) -> tuple[Array, Array]:
    """Keys and values [B,S,K,H] of `x` (the encoder output, for cross-attention)."""
    x = x.astype(self.dtype)
    return self._project(x, self.key, self.key_bias), self._project(x, self.value, self.value_bias)

  def __call__(self, x: Array, mask: Array | None, *, kv: tuple[Array, Array] | None = None,
               rope: tuple[Array, Array] | None = None, bias: Array | None = None, cache: dict | None = None,
               cache_index: Array | None = None, causal: bool = False,
               deterministic: bool = True) -> tuple[Array, dict | None]:
    """x [B,T,D] -> ([B,T,D], updated cache or None). bias: added to the logits, [B|1, N, T, S]."""
    x = x.astype(self.dtype)
    q = self._project(x, self.query, self.query_bias)
    k, v = self.kv(x) if kv is None else kv
    if rope is not None:
      q, k = positions.apply_rope(q, *rope), positions.apply_rope(k, *rope)
    if cache is not None:  # write the T new keys/values at each row's index, attend over the whole cache
      write = jax.vmap(lambda c, u, i: jax.lax.dynamic_update_slice_in_dim(c, u.astype(c.dtype), i, axis=0))
      k, v = write(cache['k'], k, cache_index), write(cache['v'], v, cache_index)
      cache = {'k': k, 'v': v}
    if not deterministic and self.attention_dropout.rate > 0:
      out = reference_attention(q, k, v, mask, dropout=lambda p: self.attention_dropout(p, deterministic=False),
                                bias=bias, scale=self.scale)
    else:
      implementation = self.implementation
      if cache is not None and implementation != 'reference':
        implementation = 'xla'  # decoding: a few queries against a long cache; flash kernels gain nothing here
      out = dot_product_attention(q, k, v, mask, implementation=implementation, is_causal=causal, bias=bias,
                                  scale=self.scale)
    w = self.out[...].astype(self.dtype)  # [N,H,D]
    out = out.reshape(*out.shape[:-2], -1)
    y = layers.matmul(out, w.reshape(-1, w.shape[-1]))
    if self.out_bias is not None:
      y = y + self.out_bias[...].astype(self.dtype)
    return layers.adapter_update(self, layers.lora_update(self, self.out, out, y)), cache
