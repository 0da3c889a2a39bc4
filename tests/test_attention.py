"""Attention kernels against the plain-jnp reference, GQA against MHA, and the Attention module's weights."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxformer.config import ModelConfig
from jaxformer.model import attention_mask, dot_product_attention, reference_attention
from jaxformer.model.attention import Attention
from test_model import tiny_config


def qkv(b=2, t=6, s=6, n=4, k=2, h=8, seed=0, dtype=jnp.float32):
  keys = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(keys[0], (b, t, n, h), dtype), jax.random.normal(keys[1], (b, s, k, h), dtype),
          jax.random.normal(keys[2], (b, s, k, h), dtype))


def naive_attention(q, k, v, mask, bias=None, scale=None):
  """Loops over batch and heads with numpy: the textbook formula, independent of both implementations."""
  q, k, v, mask = map(np.asarray, (q, k, v, jnp.broadcast_to(mask, (q.shape[0], q.shape[2], q.shape[1],
                                                                      k.shape[1]))))
  b, t, n, h = q.shape
  group = n // k.shape[2]
  bias = np.zeros(mask.shape) if bias is None else np.broadcast_to(np.asarray(bias), mask.shape)
  scale = 1 / np.sqrt(h) if scale is None else scale
  out = np.zeros_like(q, dtype=np.float64)
  for bi in range(b):
    for ni in range(n):
      scores = q[bi, :, ni] @ k[bi, :, ni // group].T * scale + bias[bi, ni]
      for ti in range(t):
        allowed = mask[bi, ni, ti]
        if not allowed.any():
          continue
        w = np.exp(scores[ti][allowed] - scores[ti][allowed].max())
        out[bi, ti, ni] = (w / w.sum()) @ v[bi, :, ni // group][allowed]
  return out


def packed_masks(t=6, s=6):
  seg_q = jnp.array([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 0, 0]])[:, :t]
  seg_k = jnp.array([[1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1]])[:, :s]
  return {
      'none': None,
      'causal_packed': attention_mask(seg_q, seg_q, causal=True),
      'bidirectional_packed': attention_mask(seg_q, seg_q, causal=False),
      'cross': attention_mask(seg_q, seg_k, causal=False),
      'per_head': jax.random.bernoulli(jax.random.key(3), 0.7, (2, 4, t, s)),
  }


@pytest.mark.parametrize('bias_heads', [4, 1])
@pytest.mark.parametrize('kv_heads', [4, 1])
def test_additive_bias_and_scale(kv_heads, bias_heads):
  """T5: a [B|1, N|1, T, S] bias on unscaled logits, through every implementation and with padding rows."""
  q, k, v = qkv(k=kv_heads)
  bias = jax.random.normal(jax.random.key(7), (1, bias_heads, 6, 6))
  mask = packed_masks()['causal_packed']
  expected = naive_attention(q, k, v, mask, bias=bias, scale=1.0)
  np.testing.assert_allclose(reference_attention(q, k, v, mask, bias=bias, scale=1.0), expected, atol=1e-5)
  for impl in ('xla', 'auto', 'reference'):
    out = dot_product_attention(q, k, v, mask, implementation=impl, bias=bias, scale=1.0)
    np.testing.assert_allclose(out, expected, atol=1e-5, err_msg=impl)


@pytest.mark.parametrize('mask_name', list(packed_masks()))
@pytest.mark.parametrize('kv_heads', [4, 2, 1])
def test_kernels_match_reference_and_naive(mask_name, kv_heads):
  q, k, v = qkv(k=kv_heads)
  mask = packed_masks()[mask_name]
  ref = reference_attention(q, k, v, mask)
  np.testing.assert_allclose(ref, naive_attention(q, k, v, True if mask is None else mask), atol=1e-5)
  for impl in ('xla', 'auto', 'reference'):
    out = dot_product_attention(q, k, v, mask, implementation=impl, is_causal=mask_name == 'causal_packed')
    np.testing.assert_allclose(out, ref, atol=1e-5, err_msg=impl)


def test_fully_masked_rows_give_zeros_not_nan():
  q, k, v = qkv()
  mask = jnp.ones((2, 1, 6, 6), bool).at[0, :, 2].set(False).at[1].set(False)
  for out in (reference_attention(q, k, v, mask), dot_product_attention(q, k, v, mask, implementation='xla')):
    assert np.all(np.isfinite(out))
    np.testing.assert_array_equal(out[0, 2], 0.0)
    np.testing.assert_array_equal(out[1], 0.0)
    assert np.abs(out[0, 3]).max() > 0


def test_fully_masked_rows_have_finite_gradients():
  q, k, v = qkv()
  mask = jnp.ones((2, 1, 6, 6), bool).at[1].set(False)
  for impl in ('xla', 'reference'):
    grads = jax.grad(lambda q, k, v: dot_product_attention(q, k, v, mask, implementation=impl).sum(),
                     argnums=(0, 1, 2))(q, k, v)
    assert all(np.all(np.isfinite(g)) for g in grads), impl


@pytest.mark.parametrize('kv_heads', [2, 1])
def test_gqa_equals_mha_with_repeated_kv_heads(kv_heads):
  q, k, v = qkv(k=kv_heads)
  mask = packed_masks()['causal_packed']
  group = 4 // kv_heads
  mha = reference_attention(q, jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2), mask)
  np.testing.assert_allclose(dot_product_attention(q, k, v, mask, implementation='xla'), mha, atol=1e-5)


def test_bf16_kernel_close_to_f32():
  q, k, v = qkv()
  mask = packed_masks()['causal_packed']
  ref = reference_attention(q, k, v, mask)
  out = dot_product_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), mask, implementation='auto')
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(out.astype(jnp.float32), ref, atol=5e-2)


@pytest.mark.parametrize('use_bias', [True, False])
def test_attention_module_with_kv_heads_equal_heads_is_textbook_mha(use_bias):
  """num_kv_heads == num_heads: each head h uses its own W_q, W_k, W_v slices (Vaswani's MultiHead)."""
  cfg = ModelConfig.from_config(tiny_config(num_kv_heads=4, use_bias=use_bias))
  attn = Attention(cfg, rngs=nnx.Rngs(0))
  if use_bias:  # non-zero biases so they are checked too
    for name in ('query_bias', 'key_bias', 'value_bias', 'out_bias'):
      p = getattr(attn, name)
      p[...] = jax.random.normal(jax.random.key(len(name)), p.shape)
  x = jax.random.normal(jax.random.key(1), (2, 6, cfg.d_model))
  seg = jnp.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
  mask = attention_mask(seg, seg, causal=True)
  out, _ = attn(x, mask)
  wq, wk, wv, wo = (np.asarray(p[...]) for p in (attn.query, attn.key, attn.value, attn.out))
  xs, m = np.asarray(x), np.asarray(mask[:, 0])
  expected = np.zeros_like(xs)
  for b in range(2):
    heads = []
    for h in range(4):
      q, k, v = xs[b] @ wq[:, h], xs[b] @ wk[:, h], xs[b] @ wv[:, h]
      if use_bias:
        q, k, v = q + attn.query_bias[...][h], k + attn.key_bias[...][h], v + attn.value_bias[...][h]
      s = np.where(m[b], q @ k.T / np.sqrt(cfg.head_dim), -1e30)
      p = np.where(m[b], np.exp(s - s.max(-1, keepdims=True)), 0.0)
      p = np.where(m[b].any(-1, keepdims=True), p / np.maximum(p.sum(-1, keepdims=True), 1e-30), 0.0)
      heads.append(p @ v)
    expected[b] = np.concatenate(heads, -1) @ wo.reshape(-1, cfg.d_model)
    if use_bias:
      expected[b] += np.asarray(attn.out_bias[...])
  np.testing.assert_allclose(out, expected, atol=1e-5)
