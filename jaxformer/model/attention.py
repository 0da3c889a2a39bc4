"""Multi-head / grouped-query attention: the kernel dispatch, the reference oracle, self/cross attention, KV cache.

Shapes follow `jax.nn.dot_product_attention` so no transposes are needed: q [B,T,N,H], k/v [B,S,K,H] with K kv
heads dividing the N query heads, masks bool broadcastable to [B,N,T,S] (True = may attend), or a `SegmentMask`
(the same mask kept as segment ids, so the chunked kernel never builds it whole).

Context parallelism (mesh.sequence > 1, the 'length' logical axis split over devices): self- and cross-attention
without a cache keep each device's queries and all-gather the keys / values (context_parallel_attention, a
shard_map around whichever kernel runs). All-gather rather than a ring because with GQA the gathered K/V are
num_heads / num_kv_heads times smaller than the queries that stay put, and it composes with every kernel, mask,
window and bias unchanged; no causal load balancing (what that costs: context_parallel_attention's docstring).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from jaxformer import logical
from jaxformer.model import layers, positions

Array = jax.Array


def reference_attention(q: Array, k: Array, v: Array, mask: Array | None,
                        dropout: Callable[[Array], Array] | None = None, *, bias: Array | None = None,
                        scale: float | None = None, softcap: float | None = None,
                        return_probs: bool = False) -> Array | tuple[Array, Array]:
  """Plain-jnp attention: the oracle for tests, and the path that can drop (or return) attention probabilities.

  bias: float, broadcastable to [B,N,T,S], added to the scaled logits (T5's relative positions). scale: the logit
  scale, None = 1 / sqrt(head_dim). softcap: the logits (+ bias) become softcap * tanh(logits / softcap) before the
  mask (Gemma 2's attn_logit_softcapping). Query rows with no allowed key (padding) return zeros. return_probs: also
  the float32 probabilities [B,N,T,S] (before dropout; 0 on masked keys, so a fully masked row is all 0).
  """
  b, t, n, h = q.shape
  kv_heads = k.shape[2]
  qg = q.reshape(b, t, kv_heads, n // kv_heads, h)
  logits = jnp.einsum('btkgh,bskh->bkgts', qg, k, preferred_element_type=jnp.float32)
  logits = logits / math.sqrt(h) if scale is None else logits * scale
  if bias is not None:
    bias = jnp.broadcast_to(bias, (b, bias.shape[1], t, k.shape[1])).astype(jnp.float32)
    logits = logits + (bias[:, :, None] if bias.shape[1] == 1 else bias.reshape(b, kv_heads, n // kv_heads, t, -1))
  if softcap is not None:
    logits = jnp.tanh(logits / softcap) * softcap
  if mask is not None:
    mask = _grouped_mask(mask, b, n, kv_heads, t, k.shape[1])
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  if mask is not None:
    probs = jnp.where(mask, probs, 0.0)  # fully masked rows -> all-zero probabilities -> zero output
  weights = probs
  if dropout is not None:
    probs = dropout(probs)
  out = jnp.einsum('bkgts,bskh->btkgh', probs.astype(v.dtype), v).reshape(b, t, n, h)
  if return_probs:  # [B,K,G,T,S] -> [B,N,T,S]: query head k * G + g, as q was grouped above
    return out, weights.reshape(b, n, t, k.shape[1])
  return out


def _grouped_mask(mask: Array, b: int, n: int, kv_heads: int, t: int, s: int) -> Array:
  """[B|1, N|1, T, S] -> broadcastable [B, K, G, T, S] matching the grouped query layout."""
  mask = jnp.broadcast_to(mask, (b, mask.shape[1], t, s))
  if mask.shape[1] == 1:
    return mask[:, :, None]
  return mask.reshape(b, kv_heads, n // kv_heads, t, s)


# model.attention_impl: 'reference' is reference_attention, 'chunked' is chunked_attention (below); the others are
# jax.nn.dot_product_attention's implementations, with 'auto' resolved by resolve_implementation.
IMPLEMENTATIONS = ('auto', 'xla', 'cudnn', 'reference', 'chunked')
# 'auto' off GPU switches from xla to chunked at T * S >= this: 2k x 2k, where xla's [B, N, T, S] float32 scores (and
# their gradient) start to dominate a step's memory; shorter sequences (every tiny recipe) keep xla's speed.
AUTO_CHUNKED_MIN_SCORES = 2048 * 2048


def _auto_chunked(q_len: int, kv_len: int) -> bool:
  return jax.default_backend() != 'gpu' and q_len * kv_len >= AUTO_CHUNKED_MIN_SCORES


def wants_segment_mask(implementation: str, q_len: int, kv_len: int) -> bool:
  """Whether a model should pass its masks as `SegmentMask`s: only where the chunked kernel will run (any other
  kernel would densify them in every layer instead of once per call)."""
  return implementation == 'chunked' or (implementation == 'auto' and _auto_chunked(q_len, kv_len))


def resolve_implementation(implementation: str, dtype: Any, head_dim: int, q_len: int, kv_len: int,
                           has_bias: bool = False) -> str:
  """'auto' -> 'cudnn' where the cuDNN flash kernel accepts the call (GPU, 16-bit, head_dim % 8 == 0 and <= 128,
  even lengths since we pass a mask, no additive bias: a trained bias needs its gradient, which the kernel only
  gives for some bias shapes); off GPU 'chunked' for long sequences (T * S >= AUTO_CHUNKED_MIN_SCORES); else
  'xla'. Decided at trace time, so it costs nothing per step."""
  if implementation != 'auto':
    return implementation
  ok = (jax.default_backend() == 'gpu' and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        and head_dim % 8 == 0 and head_dim <= 128 and q_len % 2 == 0 and kv_len % 2 == 0 and not has_bias)
  if ok:
    return 'cudnn'
  return 'chunked' if _auto_chunked(q_len, kv_len) else 'xla'


def dot_product_attention(q: Array, k: Array, v: Array, mask: Array | SegmentMask | None, *,
                          implementation: str = 'xla', is_causal: bool = False, bias: Array | None = None,
                          scale: float | None = None, softcap: float | None = None) -> Array:
  """`jax.nn.dot_product_attention` with the mask semantics of `reference_attention` (and its bias / scale).

  `is_causal` is a hint (the mask must already hold the causal part): the cuDNN kernel then skips the masked
  upper triangle. Rows with no allowed key give zeros (jax would return the mean of v there). softcap (Gemma 2),
  which jax.nn.dot_product_attention has no argument for: the chunked kernel where it runs, else the plain-jnp
  reference (XLA fuses it as it would the xla implementation's).
  """
  if implementation == 'reference':
    return reference_attention(q, k, v, dense_mask(mask), bias=bias, scale=scale, softcap=softcap)
  requested = implementation
  implementation = resolve_implementation(implementation, q.dtype, q.shape[-1], q.shape[1], k.shape[1],
                                          has_bias=bias is not None)
  if implementation == 'chunked':
    return chunked_attention(q, k, v, mask, bias=bias, scale=scale, softcap=softcap)
  if softcap is not None:
    return reference_attention(q, k, v, dense_mask(mask), bias=bias, scale=scale, softcap=softcap)
  mask = dense_mask(mask)
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


# ------------------------------------------------------------------------------ chunked (flash-style) attention
# Default query and key/value block of chunked_attention: each step holds [B, N, 512, 512] float32 scores (1 MiB per
# batch row and head), big enough that the two block matmuls keep a CPU busy, small enough that memory is linear in
# T with a small constant. Decoding ([B,1] queries) uses a single query block of the query length.
CHUNK = 512
_NEG = float(jnp.finfo(jnp.float32).min)  # masked logits: finite, so a fully masked block gives no inf - inf


def segment_mask(q_segments: Array, kv_segments: Array, *, causal: bool, q_start: Any = 0,
                 kv_start: Any = 0, window: Any = None) -> Array:
  """bool [B,T,S]: query t may attend key s iff their segment ids are equal and non-zero (and, causal, s <= t;
  with a window, t - s < window). q_start / kv_start: the absolute index of the first query / key (a block inside
  the chunked kernel)."""
  mask = (q_segments[:, :, None] == kv_segments[:, None, :]) & (q_segments[:, :, None] != 0)
  t, s = q_segments.shape[1], kv_segments.shape[1]
  if causal:
    mask = mask & ((q_start + jnp.arange(t))[:, None] >= (kv_start + jnp.arange(s))[None, :])
  if window is not None:
    mask = mask & window_band(q_start + jnp.arange(t), kv_start + jnp.arange(s), window)
  return mask


def window_band(q_index: Array, kv_index: Array, window: Any) -> Array:
  """bool [T,S]: t - s < window (transformers' sliding_window_overlay, kv_idx > q_idx - window), the causal part
  left to the mask. window <= 0 (a global layer's entry in a scanned stack's per-layer windows) allows every key.
  Indices, not positions: within a packed segment they differ by the same amount, and segments never see each other."""
  band = q_index[:, None] - kv_index[None, :] < window
  return band if isinstance(window, int) else band | (window <= 0)


def with_window(mask: Array | SegmentMask | None, window: Any) -> Array | SegmentMask | None:
  """A self-attention mask [B,1|N,T,T] (or SegmentMask) limited to the window (a Python int > 0, or a traced
  int32 scalar where <= 0 means none): query t keeps key s only if t - s < window."""
  if isinstance(mask, SegmentMask):
    return SegmentMask(mask.q_segments, mask.kv_segments, mask.causal, window, mask.q_offset)
  t, s = mask.shape[-2:]
  return mask & window_band(jnp.arange(t), jnp.arange(s), window)


@jax.tree_util.register_pytree_node_class
class SegmentMask:
  """The [B,1,T,S] mask of `segment_mask`, kept as its segment ids q [B,T] / kv [B,S] and the causal flag.

  Why: for long sequences the boolean [T, S] mask is itself quadratic (1 GiB per row at 32k), and as an input shared
  by every layer XLA keeps it live; the chunked kernel builds each block's piece inside its loop instead (and skips
  the blocks above the diagonal when causal). Every other kernel calls `dense()`.
  """

  def __init__(self, q_segments: Array, kv_segments: Array, causal: bool, window: Any = None, q_offset: Any = 0):
    """window: sliding-window attention (with_window), None = none. q_offset: the index of the first query among
    the keys (a device's slice of the queries under context parallelism: context_parallel_attention), 0 = the
    queries and keys start together."""
    self.q_segments, self.kv_segments, self.causal, self.window = q_segments, kv_segments, causal, window
    self.q_offset = q_offset

  def tree_flatten(self):
    return (self.q_segments, self.kv_segments, self.window, self.q_offset), self.causal

  @classmethod
  def tree_unflatten(cls, causal, children):
    q, kv, window, q_offset = children
    return cls(q, kv, causal, window, q_offset)

  @property
  def shape(self) -> tuple[int, int, int, int]:
    return (self.q_segments.shape[0], 1, self.q_segments.shape[1], self.kv_segments.shape[1])

  def dense(self) -> Array:
    return segment_mask(self.q_segments, self.kv_segments, causal=self.causal, q_start=self.q_offset,
                        window=self.window)[:, None]


def dense_mask(mask: Array | SegmentMask | None) -> Array | None:
  """A boolean mask array (a SegmentMask materialised) for the kernels that take one."""
  return mask.dense() if isinstance(mask, SegmentMask) else mask


def chunked_attention(q: Array, k: Array, v: Array, mask: Array | SegmentMask | None, *, bias: Array | None = None,
                      scale: float | None = None, block_q: int | None = None,
                      block_kv: int | None = None, softcap: float | None = None) -> Array:
  """Flash-style attention in plain JAX: memory linear in T (no [T, S] scores, probabilities or mask are live).

  Queries go in blocks of block_q, keys/values in blocks of block_kv; each query block keeps a running max and sum
  (online softmax, float32) over the key blocks. The backward pass (custom_vjp) saves only the output and each row's
  logsumexp and recomputes every block's probabilities, as FlashAttention-2 does. A causal SegmentMask skips the
  key blocks above the diagonal in both passes. Same semantics as reference_attention: mask / bias broadcastable
  to [B,N,T,S] (bias added to the scaled logits, with gradient), GQA / MQA, rows with no allowed key give zeros.
  Lengths that are no multiple of the block are padded (padded keys masked, padded queries dropped). block_q /
  block_kv: None = CHUNK. softcap: logits (+ bias) -> softcap * tanh(logits / softcap) before the mask (Gemma 2).
  """
  b, t, n, h = q.shape
  s, kv_heads = k.shape[1], k.shape[2]
  scale = 1.0 / math.sqrt(h) if scale is None else float(scale)
  bq, bk = min(block_q or CHUNK, t), min(block_kv or CHUNK, s)
  tp, sp = -(-t // bq) * bq, -(-s // bk) * bk
  qg = _pad(q.reshape(b, t, kv_heads, n // kv_heads, h), 1, tp)
  k, v = _pad(k, 1, sp), _pad(v, 1, sp)
  dense, q_seg, kv_seg, causal, window, q_offset = None, None, None, False, None, jnp.zeros((), jnp.int32)
  if isinstance(mask, SegmentMask):  # padded ids are 0: padded keys and queries attend nothing
    q_seg, kv_seg, causal = _pad(mask.q_segments, 1, tp), _pad(mask.kv_segments, 1, sp), mask.causal
    window = None if mask.window is None else jnp.asarray(mask.window, jnp.int32)
    q_offset = jnp.asarray(mask.q_offset, jnp.int32)
  elif mask is not None:
    mask = jnp.asarray(mask, bool)
    dense = _pad(_pad(jnp.broadcast_to(mask, mask.shape[:2] + (t, s)), 2, tp), 3, sp)
  if bias is not None:
    bias = _pad(_pad(jnp.broadcast_to(bias, bias.shape[:2] + (t, s)), 2, tp), 3, sp)
  out = _flash(qg, k, v, bias, dense, q_seg, (kv_seg, window, q_offset), (scale, causal, bq, bk, s, softcap))
  return out[:, :t].reshape(b, t, n, h)


def _pad(x: Array, axis: int, size: int) -> Array:
  if x.shape[axis] == size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths)


def _grouped(x: Array, kv_heads: int) -> Array:
  """[B|1, N|1, tq, sk] -> [B|1, K|1, G|1, tq, sk], matching the blocks' grouped-query layout."""
  if x.shape[1] == 1:
    return x[:, :, None]
  return x.reshape(x.shape[0], kv_heads, x.shape[1] // kv_heads, *x.shape[2:])


def _block_logits_and_mask(qb, kb, bias, dense, q_seg, kv_seg, cfg, q0, k0):
  """The scaled (+ bias, soft-capped) float32 logits [B,K,G,bq,bk] of one block, masked logits set to _NEG, its mask,
  and d capped / d uncapped (1 - tanh^2; None without a cap). kv_seg: (key segment ids or None, the sliding window
  or None, the index of the first query among the keys: SegmentMask.q_offset)."""
  scale, causal, bq, bk, s_len, softcap = cfg
  kv_seg, window, q_offset = kv_seg
  kv_heads = kb.shape[2]
  logits = jnp.einsum('bqkgh,bskh->bkgqs', qb, kb, preferred_element_type=jnp.float32) * scale
  if bias is not None:
    block = jax.lax.dynamic_slice(bias, (0, 0, q0, k0), bias.shape[:2] + (bq, bk))
    logits = logits + _grouped(block, kv_heads).astype(jnp.float32)
  capped = None
  if softcap is not None:
    capped = jnp.tanh(logits / softcap)
    logits = capped * softcap
    capped = 1.0 - jnp.square(capped)
  mask = None
  if dense is not None:
    mask = _grouped(jax.lax.dynamic_slice(dense, (0, 0, q0, k0), dense.shape[:2] + (bq, bk)), kv_heads)
  elif q_seg is not None:
    qs, ks = jax.lax.dynamic_slice_in_dim(q_seg, q0, bq, 1), jax.lax.dynamic_slice_in_dim(kv_seg, k0, bk, 1)
    mask = segment_mask(qs, ks, causal=causal, q_start=q_offset + q0, kv_start=k0, window=window)[:, None, None]
  elif s_len % bk:  # no mask, but padded keys
    mask = (k0 + jnp.arange(bk) < s_len)[None, None, None, None]
  if mask is not None:
    logits = jnp.where(mask, logits, _NEG)
  return logits, mask, capped


def _kv_block_range(cfg, q0, num_kv_blocks):
  """Key blocks [0, hi) a query block starting at (absolute index) q0 can see: all, or (causal) those not above the
  diagonal."""
  _, causal, bq, bk, _, _ = cfg
  return jnp.minimum(num_kv_blocks, (q0 + bq - 1) // bk + 1) if causal else num_kv_blocks


def _kv_block_start(window, cfg, q0):
  """The first key block a query block starting at q0 can see: 0, or (sliding window) the block of key
  q0 - window + 1, the oldest its first query keeps (a window <= 0 is none)."""
  if window is None:
    return 0
  bk = cfg[3]
  return jnp.where(window > 0, jnp.maximum(0, q0 - window + 1) // bk, 0)


def _q_block_end(window, cfg, k0, num_q_blocks, q_offset):
  """One past the last query block that sees key block k0 under a sliding window: its queries t < k0 + bk - 1 +
  window (all blocks without one). q_offset: the index of query 0 among the keys."""
  if window is None:
    return num_q_blocks
  _, _, bq, bk, _, _ = cfg
  return jnp.where(window > 0, jnp.minimum(num_q_blocks, (k0 + bk + window - 2 - q_offset) // bq + 1), num_q_blocks)


def _flash_forward(q, k, v, bias, dense, q_seg, kv_seg, cfg):
  """-> output [B,Tp,K,G,H] (q.dtype) and each row's logsumexp [B,K,G,Tp] (+inf for rows with no allowed key)."""
  _, _, bq, bk, _, _ = cfg
  b, tp, kv_heads, g, h = q.shape
  nq, nk = tp // bq, k.shape[1] // bk

  def q_block(i, carry):
    out, lse = carry
    q0 = i * bq
    qb = jax.lax.dynamic_slice_in_dim(q, q0, bq, 1)

    def kv_block(j, state):
      m, l, acc = state
      k0 = j * bk
      kb, vb = (jax.lax.dynamic_slice_in_dim(x, k0, bk, 1) for x in (k, v))
      logits, mask, _ = _block_logits_and_mask(qb, kb, bias, dense, q_seg, kv_seg, cfg, q0, k0)
      m_new = jnp.maximum(m, logits.max(-1))
      p = jnp.exp(logits - m_new[..., None])
      p = p if mask is None else jnp.where(mask, p, 0.0)
      alpha = jnp.exp(m - m_new)
      acc = alpha[..., None] * acc + jnp.einsum('bkgqs,bskh->bkgqh', p.astype(v.dtype), vb,
                                                preferred_element_type=jnp.float32)
      return m_new, alpha * l + p.sum(-1), acc

    init = (jnp.full((b, kv_heads, g, bq), _NEG, jnp.float32), jnp.zeros((b, kv_heads, g, bq), jnp.float32),
            jnp.zeros((b, kv_heads, g, bq, h), jnp.float32))
    first_query = kv_seg[2] + q0  # its index among the keys (q_offset: a slice of the queries)
    m, l, acc = jax.lax.fori_loop(_kv_block_start(kv_seg[1], cfg, first_query),
                                  _kv_block_range(cfg, first_query, nk), kv_block, init)
    has_key = l > 0
    o = acc / jnp.where(has_key, l, 1.0)[..., None]  # rows with no allowed key: acc is 0, so 0
    out = jax.lax.dynamic_update_slice_in_dim(out, jnp.moveaxis(o, 3, 1).astype(out.dtype), q0, 1)
    row_lse = jnp.where(has_key, m + jnp.log(jnp.where(has_key, l, 1.0)), jnp.inf)
    return out, jax.lax.dynamic_update_slice_in_dim(lse, row_lse, q0, 3)

  init = (jnp.zeros(q.shape, q.dtype), jnp.zeros((b, kv_heads, g, tp), jnp.float32))
  return jax.lax.fori_loop(0, nq, q_block, init)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _flash(q, k, v, bias, dense, q_seg, kv_seg, cfg):
  return _flash_forward(q, k, v, bias, dense, q_seg, kv_seg, cfg)[0]


def _flash_fwd(q, k, v, bias, dense, q_seg, kv_seg, cfg):
  out, lse = _flash_forward(q, k, v, bias, dense, q_seg, kv_seg, cfg)
  return out, (q, k, v, bias, dense, q_seg, kv_seg, out, lse)


def _flash_bwd(cfg, residuals, d_out):
  """FlashAttention-2's backward: per key block, over the query blocks that see it, recompute the probabilities
  from the saved logsumexp; dK / dV accumulate in the inner loop's carry, dQ and dBias in whole-length buffers."""
  q, k, v, bias, dense, q_seg, kv_seg, out, lse = residuals
  scale, causal, bq, bk, _, _ = cfg
  tp, sp = q.shape[1], k.shape[1]
  nq, nk = tp // bq, sp // bk
  # D = rowsum(dO * O): the softmax backward's per-row term
  delta = jnp.einsum('bqkgh,bqkgh->bkgq', d_out.astype(jnp.float32), out.astype(jnp.float32))

  def kv_block(j, carry):
    dq, dk, dv, dbias = carry
    k0 = j * bk
    kb, vb = (jax.lax.dynamic_slice_in_dim(x, k0, bk, 1) for x in (k, v))

    def q_block(i, inner):
      dq, dk_j, dv_j, dbias = inner
      q0 = i * bq
      qb, dob = (jax.lax.dynamic_slice_in_dim(x, q0, bq, 1) for x in (q, d_out))
      row_lse, row_delta = (jax.lax.dynamic_slice_in_dim(x, q0, bq, 3)[..., None] for x in (lse, delta))
      logits, mask, capped = _block_logits_and_mask(qb, kb, bias, dense, q_seg, kv_seg, cfg, q0, k0)
      p = jnp.exp(logits - row_lse)  # masked: exp(_NEG - lse) = 0; rows with no key: lse = inf -> 0
      dv_j = dv_j + jnp.einsum('bkgqs,bqkgh->bskh', p.astype(v.dtype), dob, preferred_element_type=jnp.float32)
      dp = jnp.einsum('bqkgh,bskh->bkgqs', dob, vb, preferred_element_type=jnp.float32)
      ds = p * (dp - row_delta)  # d loss / d (scaled logits + bias), through the soft cap when there is one
      ds = ds if capped is None else ds * capped
      if dbias is not None:
        g = ds.reshape(ds.shape[0], -1, bq, bk)
        g = g.sum(1, keepdims=True) if bias.shape[1] == 1 else g
        g = g.sum(0, keepdims=True) if bias.shape[0] == 1 else g
        dbias = jax.lax.dynamic_update_slice(dbias, g, (0, 0, q0, k0))  # each block is visited once
      ds = (ds * scale).astype(q.dtype)
      dq_i = jax.lax.dynamic_slice_in_dim(dq, q0, bq, 1) + jnp.einsum(
          'bkgqs,bskh->bqkgh', ds, kb, preferred_element_type=jnp.float32)
      dq = jax.lax.dynamic_update_slice_in_dim(dq, dq_i, q0, 1)
      dk_j = dk_j + jnp.einsum('bkgqs,bqkgh->bskh', ds, qb, preferred_element_type=jnp.float32)
      return dq, dk_j, dv_j, dbias

    q_offset = kv_seg[2]
    # causal: query blocks that end before this key block see none of it
    first = jnp.maximum(0, (k0 - q_offset) // bq) if causal else 0
    zeros = jnp.zeros(kb.shape, jnp.float32)
    last = _q_block_end(kv_seg[1], cfg, k0, nq, q_offset)
    dq, dk_j, dv_j, dbias = jax.lax.fori_loop(first, last, q_block, (dq, zeros, zeros, dbias))
    dk = jax.lax.dynamic_update_slice_in_dim(dk, dk_j, k0, 1)
    return dq, dk, jax.lax.dynamic_update_slice_in_dim(dv, dv_j, k0, 1), dbias

  init = (jnp.zeros(q.shape, jnp.float32), jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32),
          None if bias is None else jnp.zeros(bias.shape, jnp.float32))
  dq, dk, dv, dbias = jax.lax.fori_loop(0, nk, kv_block, init)
  dbias = None if bias is None else dbias.astype(bias.dtype)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dbias, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ------------------------------------------------------------------------------------------ context parallelism
def context_parallel_axes(q_len: int, kv_len: int) -> tuple[str, ...]:
  """The mesh axes the current logical rules split activations' 'length' over (mesh.sequence > 1 with the default
  rules), or () where context_parallel_attention does not apply: no such axis, or a length they do not divide (a
  one-token decoding step, a soft prompt's extra positions; those run as plain sharded code, which is correct)."""
  axes = logical.context_axes('length')
  if not axes:
    return ()
  n = math.prod(jax.sharding.get_abstract_mesh().shape[a] for a in axes)
  return axes if q_len % n == 0 and kv_len % n == 0 else ()


def context_parallel_attention(q: Array, k: Array, v: Array, mask: Array | SegmentMask | None,
                               axes: tuple[str, ...], *, implementation: str = 'xla', is_causal: bool = False,
                               bias: Array | None = None, scale: float | None = None,
                               softcap: float | None = None) -> Array:
  """dot_product_attention with queries, keys and values split along their length over the mesh `axes` (context
  parallelism): each device keeps its T / n queries, all-gathers the keys and values (and the key segment ids)
  across `axes` and attends locally; the output stays split like the queries. Any implementation runs inside.

  All-gather, not a ring (MaxText offers both; Llama 3 trained with all-gather): the keys and values are the small
  side of attention (num_kv_heads <= num_heads: with GQA / MQA a gathered K/V is num_heads / num_kv_heads times
  smaller than the queries, which never move), one collective per layer is simple to get right with any kernel,
  sliding window, packing and soft-capping, and its backward is the matching reduce-scatter of dK / dV. A ring
  would overlap the transfers with the block computations but needs a kernel of its own; at the lengths a CPU or a
  few GPUs reach, the gathered K/V ([B, S, K, H] per layer) is small beside the activations that stay split.

  No causal load balancing: device i holds queries [i T/n, (i+1) T/n). With model.attention_impl=chunked the kernel
  skips key blocks above the diagonal, so device i does about (2i + 1) / (2n) of a whole row's work and the last
  device (2n - 1) / (2n) of it; the step waits for the last, so attention takes (2n - 1) / n times as long as with
  balanced chunks (each device an early and a late piece, MaxText's reordering): 1.75x at n = 4, -> 2x for large n.
  Memory still splits evenly.
  xla / reference compute every [T/n, S] block (masked), so every device does the same work. Reordering would mean
  permuting tokens, positions, segment ids and targets at the input; a later step.

  Positions and segment ids are per-token inputs split like the tokens, so packed rows and RoPE stay exact; causal
  masking uses each device's query offset (SegmentMask.q_offset). mask: dense [B|1, N|1, T, S] (its T rows split)
  or a SegmentMask (query ids split, key ids gathered); bias: [B|1, N, T|1, S] (T5's, its T rows split).
  """
  mesh = jax.sharding.get_abstract_mesh()
  n = math.prod(mesh.shape[a] for a in axes)
  seq = axes[0] if len(axes) == 1 else axes
  t_local = q.shape[1] // n
  by_length = PartitionSpec(None, seq)
  rows = lambda x: PartitionSpec(None, None, seq if x.shape[2] == q.shape[1] else None)  # noqa: E731  [B,N,T,S]
  gather = lambda x: jax.lax.all_gather(x, axes, axis=1, tiled=True)  # noqa: E731

  segments = isinstance(mask, SegmentMask)
  window = mask.window if segments else None
  static_window = window is None or isinstance(window, int)
  args = {'q': q, 'k': k, 'v': v}
  specs = {'q': by_length, 'k': by_length, 'v': by_length}
  if segments:
    args.update(q_seg=mask.q_segments, kv_seg=mask.kv_segments)
    specs.update(q_seg=by_length, kv_seg=by_length)
    if not static_window:  # a scanned stack's per-layer window: a traced scalar
      args['window'], specs['window'] = jnp.asarray(window, jnp.int32), PartitionSpec()
  elif mask is not None:
    args['mask'], specs['mask'] = mask, rows(mask)
  if bias is not None:
    args['bias'], specs['bias'] = bias, rows(bias)

  def local(a):
    local_mask = a.get('mask')
    if segments:
      offset = jax.lax.axis_index(axes) * t_local
      local_mask = SegmentMask(a['q_seg'], gather(a['kv_seg']), mask.causal,
                               window if static_window else a['window'], offset)
    # no is_causal here: cuDNN would take query 0 to be key 0, which holds on the first device only
    return dot_product_attention(a['q'], gather(a['k']), gather(a['v']), local_mask, implementation=implementation,
                                 bias=a.get('bias'), scale=scale, softcap=softcap)

  return jax.shard_map(local, mesh=mesh, in_specs=(specs,), out_specs=by_length, axis_names=frozenset(axes),
                       check_vma=False)(args)


# model.qk_norm: a norm (model.norm's kind and eps) on the queries and keys after their projections, before RoPE:
# 'projection' normalises each token's whole projection, all heads together (OLMoE / OLMo 2's q_norm, k_norm: scales
# [heads * head_dim] and [kv_heads * head_dim]); 'head' each head's vector with one [head_dim] scale (Qwen3, Gemma 3).
QK_NORMS = ('none', 'projection', 'head')


def with_prefix(k: Array, v: Array, mask: Array | SegmentMask | None,
                prefix: tuple[Array, Array]) -> tuple[Array, Array, Array | None]:
  """Keys/values [B,S,K,H] and a mask [B|1,N|1,T,S] -> with the prefix's P slots [P,K,H] first: [B,P+S,K,H] and
  [B,N|1,T,P+S], the prefix columns visible to every query row that allows some key (not to padding rows)."""
  pk, pv = prefix
  b, p = k.shape[0], pk.shape[0]
  k = jnp.concatenate([jnp.broadcast_to(pk.astype(k.dtype)[None], (b,) + pk.shape), k], 1)
  v = jnp.concatenate([jnp.broadcast_to(pv.astype(v.dtype)[None], (b,) + pv.shape), v], 1)
  mask = dense_mask(mask)
  if mask is not None:
    mask = jnp.asarray(mask, bool)
    rows = jnp.any(mask, axis=-1, keepdims=True)  # [B|1,N|1,T,1]
    mask = jnp.concatenate([jnp.broadcast_to(rows, rows.shape[:-1] + (p,)), mask], -1)
  return k, v, mask


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
    self.softcap = float(cfg.attention_softcap) if cfg.attention_softcap else None  # Gemma 2
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
    self.qk_norm = cfg.qk_norm
    if cfg.qk_norm != 'none':
      norm = layers.NORMS[cfg.norm]
      width = lambda heads: h if cfg.qk_norm == 'head' else heads * h  # noqa: E731
      self.q_norm = norm(dataclasses.replace(cfg, d_model=width(n), use_bias=False), rngs=rngs)
      self.k_norm = norm(dataclasses.replace(cfg, d_model=width(kvh), use_bias=False), rngs=rngs)
    self.attention_dropout = nnx.Dropout(cfg.attention_dropout, rngs=rngs)

  def _project(self, x: Array, kernel: nnx.Param, bias: nnx.Param | None) -> Array:
    y = layers.kernel_matmul(x, kernel, self.dtype)  # [B,T,D] @ [D,N,H] -> [B,T,N,H]
    y = y if bias is None else y + bias[...].astype(self.dtype)
    return layers.lora_update(self, kernel, x, y)

  def _normalise(self, y: Array, which: str) -> Array:
    """model.qk_norm on queries or keys y [B,T,heads,H] ('q' / 'k'); unchanged when it is none."""
    if self.qk_norm == 'none':
      return y
    norm = self.q_norm if which == 'q' else self.k_norm
    return norm(y) if self.qk_norm == 'head' else norm(y.reshape(*y.shape[:-2], -1)).reshape(y.shape)

  def kv(self, x: Array) -> tuple[Array, Array]:
    """Keys and values [B,S,K,H] of `x` (the encoder output, for cross-attention)."""
    x = x.astype(self.dtype)
    k = self._normalise(self._project(x, self.key, self.key_bias), 'k')
    return k, self._project(x, self.value, self.value_bias)

  def __call__(self, x: Array, mask: Array | None, *, kv: tuple[Array, Array] | None = None,
               rope: tuple[Array, Array] | None = None, bias: Array | None = None, cache: dict | None = None,
               cache_index: Array | None = None, causal: bool = False, window: int = 0,
               deterministic: bool = True, prefix: tuple[Array, Array] | None = None,
               return_weights: bool = False) -> tuple[Array, dict | None] | tuple[Array, dict | None, Array]:
    """x [B,T,D] -> ([B,T,D], updated cache or None). bias: added to the logits, [B|1, N, T, S].

    window > 0 with a cache: the cache is a ring buffer of R slots (a sliding-window layer decoding; R = the window,
    or less when the whole cache is shorter), key slot s holding the newest token whose index is s mod R. The T
    queries attend over [the R ring slots, then the T new keys] (`mask` [B,1,T,R+T] says which hold keys inside
    each query's window), so a prefill longer than the window still sees every key it needs; then the newest
    min(T, R) new keys/values are written into their ring slots.

    prefix: prefix tuning's keys and values [P,K,H] of this layer (peft/prefix.py), put in front of the keys/values
    (after the cache: it holds only tokens); every query that attends to some key sees all P; `bias`, if any,
    already has their P columns first. Their columns are dropped from returned weights.

    return_weights: also the attention probabilities [B,N,T,S] (float32), as a third element. Only the plain-jnp
    softmax materialises them, so this request runs reference_attention whatever model.attention_impl is (the
    output is the same up to float rounding); without it the configured kernel runs, untouched."""
    x = x.astype(self.dtype)
    q = self._normalise(self._project(x, self.query, self.query_bias), 'q')
    k, v = self.kv(x) if kv is None else kv
    if rope is not None:
      q, k = positions.apply_rope(q, *rope), positions.apply_rope(k, *rope)
    if cache is not None and window:
      ring, t = cache['k'].shape[1], k.shape[1]
      newest = min(t, ring)
      slots = (cache_index[:, None] + t - newest + jnp.arange(newest)) % ring  # distinct slots in each row
      put = jax.vmap(lambda c, u, s: c.at[s].set(u.astype(c.dtype)))
      new_cache = {'k': put(cache['k'], k[:, t - newest:], slots), 'v': put(cache['v'], v[:, t - newest:], slots)}
      k = jnp.concatenate([cache['k'], k.astype(cache['k'].dtype)], axis=1)
      v = jnp.concatenate([cache['v'], v.astype(cache['v'].dtype)], axis=1)
      cache = new_cache
    elif cache is not None:  # write the T new keys/values at each row's index, attend over the whole cache
      write = jax.vmap(lambda c, u, i: jax.lax.dynamic_update_slice_in_dim(c, u.astype(c.dtype), i, axis=0))
      k, v = write(cache['k'], k, cache_index), write(cache['v'], v, cache_index)
      cache = {'k': k, 'v': v}
    if prefix is not None:
      k, v, mask = with_prefix(k, v, mask, prefix)
      causal = False  # the mask is no longer the lower triangle the cuDNN causal hint assumes
    weights = None
    if return_weights or (not deterministic and self.attention_dropout.rate > 0):
      # attention dropout needs the probabilities: the plain-jnp path, whatever model.attention_impl (also chunked)
      drop = None
      if not deterministic and self.attention_dropout.rate > 0:
        drop = lambda p: self.attention_dropout(p, deterministic=False)  # noqa: E731
      out = reference_attention(q, k, v, dense_mask(mask), dropout=drop, bias=bias, scale=self.scale,
                                softcap=self.softcap, return_probs=return_weights)
      if return_weights:
        out, weights = out
        weights = weights if prefix is None else weights[..., prefix[0].shape[0]:]
    else:
      implementation = self.implementation
      if cache is not None and implementation in ('auto', 'cudnn'):
        # decoding: a few queries against a long cache; flash kernels gain nothing here (a long prefill off GPU
        # still goes chunked under auto, as without a cache)
        implementation = 'chunked' if implementation == 'auto' and _auto_chunked(q.shape[1], k.shape[1]) else 'xla'
      axes = () if cache is not None else context_parallel_axes(q.shape[1], k.shape[1])
      if axes:  # mesh.sequence > 1: each device attends with its slice of the queries (context parallelism)
        out = context_parallel_attention(q, k, v, mask, axes, implementation=implementation, is_causal=causal,
                                         bias=bias, scale=self.scale, softcap=self.softcap)
      else:
        out = dot_product_attention(q, k, v, mask, implementation=implementation, is_causal=causal, bias=bias,
                                    scale=self.scale, softcap=self.softcap)
    out = out.reshape(*out.shape[:-2], -1)
    y = layers.kernel_matmul(out, self.out, self.dtype, in_dims=2)  # [B,T,N*H] @ [N,H,D]
    if self.out_bias is not None:
      y = y + self.out_bias[...].astype(self.dtype)
    y = layers.adapter_update(self, layers.lora_update(self, self.out, out, y))
    return (y, cache, weights) if return_weights else (y, cache)
