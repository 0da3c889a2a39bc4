"""model.attention_impl=chunked: the flash-style kernel against reference_attention and xla, forward and gradients.

Tiny shapes with small blocks passed explicitly (block_q=4, block_kv=3), so every case runs several blocks, lengths
that are no multiple of a block, and (causal) the skipped blocks above the diagonal. Everything is jitted: eagerly,
each loop of the kernel would be traced and compiled again on every call.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxformer.model import attention, build_model, dot_product_attention, reference_attention
from jaxformer.model.attention import SegmentMask, chunked_attention
from test_attention import qkv
from test_model import tiny_config

BLOCKS = dict(block_q=4, block_kv=3)
ATOL = 2e-5
T = 13
SEG = jnp.array([[1] * 5 + [2] * 6 + [0] * 2, [1] * 11 + [0] * 2])  # packed row + padding, padded row
SEG_KV = jnp.array([[1] * 3 + [2] * 7, [1] * 10])  # S = 10 for cross-attention


def masks():
  """name -> (mask as passed to chunked, the dense mask the oracle gets, key length)."""
  causal, bidir, cross = SegmentMask(SEG, SEG, True), SegmentMask(SEG, SEG, False), SegmentMask(SEG, SEG_KV, False)
  per_head = jax.random.bernoulli(jax.random.key(3), 0.7, (2, 4, T, T))
  return {
      'none': (None, None, T),
      'causal_segments': (causal, causal.dense(), T),
      'causal_dense': (causal.dense(), causal.dense(), T),
      'bidirectional_segments': (bidir, bidir.dense(), T),
      'cross_segments': (cross, cross.dense(), 10),
      'per_head_dense': (per_head, per_head, T),
  }


def grads(fn, *args):
  """Loss value and gradients of a non-trivial scalar of fn's output with respect to every argument."""
  weights = jax.random.normal(jax.random.key(9), jax.eval_shape(fn, *args).shape)
  return jax.jit(jax.value_and_grad(lambda *a: (fn(*a) * weights).sum(), argnums=tuple(range(len(args)))))(*args)


def assert_close(got, want, atol=ATOL):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, atol=atol, rtol=1e-4)


# every mask form with grouped-query heads; multi-head and multi-query attention with the masks the models build
CASES = ([(name, 2) for name in masks()]
         + [(name, kv) for name in ('causal_segments', 'per_head_dense') for kv in (4, 1)])


@pytest.mark.parametrize('mask_name,kv_heads', CASES)
def test_chunked_matches_reference_and_xla_forward_and_gradients(mask_name, kv_heads):
  mask, dense, s = masks()[mask_name]
  q, k, v = qkv(t=T, s=s, k=kv_heads)
  chunked = lambda q, k, v: chunked_attention(q, k, v, mask, **BLOCKS)  # noqa: E731
  ref = lambda q, k, v: reference_attention(q, k, v, dense)  # noqa: E731
  xla = lambda q, k, v: dot_product_attention(q, k, v, dense, implementation='xla')  # noqa: E731
  out = jax.jit(chunked)(q, k, v)
  assert_close(out, ref(q, k, v))
  assert_close(out, xla(q, k, v))
  got = grads(chunked, q, k, v)
  assert_close(got, grads(ref, q, k, v))
  assert_close(got, grads(xla, q, k, v))


@pytest.mark.parametrize('bias_shape,kv_heads', [((1, 4, T, T), 4), ((1, 4, T, T), 1), ((2, 1, T, T), 2),
                                               ((1, 1, 1, T), 1)])
def test_relative_bias_and_scale_with_bias_gradient(bias_shape, kv_heads):
  """T5: a [B|1, N|1, T, S] bias on unscaled logits; the bias is trained, so its gradient must match too."""
  q, k, v = qkv(t=T, s=T, k=kv_heads)
  bias = jax.random.normal(jax.random.key(7), bias_shape)
  mask = SegmentMask(SEG, SEG, False)
  chunked = lambda q, k, v, b: chunked_attention(q, k, v, mask, bias=b, scale=1.0, **BLOCKS)  # noqa: E731
  ref = lambda q, k, v, b: reference_attention(q, k, v, mask.dense(), bias=b, scale=1.0)  # noqa: E731
  assert_close(jax.jit(chunked)(q, k, v, bias), ref(q, k, v, bias))
  assert_close(grads(chunked, q, k, v, bias), grads(ref, q, k, v, bias))


def test_dispatch_and_auto():
  """dot_product_attention routes 'chunked' (any mask form); 'auto' off GPU picks it only for long sequences."""
  q, k, v = qkv(t=T, s=T)
  mask = SegmentMask(SEG, SEG, True)
  ref = reference_attention(q, k, v, mask.dense())
  for impl in ('chunked', 'xla', 'reference', 'auto'):  # a SegmentMask is densified for the other kernels
    assert_close(jax.jit(lambda q, k, v: dot_product_attention(q, k, v, mask, implementation=impl))(q, k, v), ref)
  assert 'chunked' in attention.IMPLEMENTATIONS
  if jax.default_backend() != 'gpu':
    big = attention.AUTO_CHUNKED_MIN_SCORES
    assert attention.resolve_implementation('auto', jnp.float32, 64, 1024, 1024) == 'xla'
    assert attention.resolve_implementation('auto', jnp.float32, 64, big, 1) == 'chunked'
    assert attention.wants_segment_mask('auto', big, 1) and not attention.wants_segment_mask('auto', 1024, 1024)
  assert attention.wants_segment_mask('chunked', 8, 8) and not attention.wants_segment_mask('xla', 10 ** 6, 10 ** 6)


def test_fully_masked_rows_give_zeros_and_finite_gradients():
  """Padding queries (no allowed key) give zeros, as reference_attention, and contribute no gradient."""
  q, k, v = qkv(t=T, s=T)
  mask = jnp.ones((2, 1, T, T), bool).at[0, :, 2].set(False).at[1].set(False)
  chunked = lambda q, k, v: chunked_attention(q, k, v, mask, **BLOCKS)  # noqa: E731
  out = jax.jit(chunked)(q, k, v)
  np.testing.assert_array_equal(out[0, 2], 0.0)
  np.testing.assert_array_equal(out[1], 0.0)
  got, want = grads(chunked, q, k, v), grads(lambda q, k, v: reference_attention(q, k, v, mask), q, k, v)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(got))
  assert_close(got, want)


@pytest.mark.parametrize('new_tokens', [1, 5])
def test_decode_against_a_cache(new_tokens):
  """One token (or a prefill of 5) at slot 20 of a 37-slot cache, attending the filled slots: one query block."""
  q, k, v = qkv(t=new_tokens, s=37, k=1)
  slots = 20 + jnp.arange(new_tokens)
  valid = jnp.arange(37) < 20 + new_tokens
  mask = ((jnp.arange(37)[None, :] <= slots[:, None]) & valid[None, :])[None, None]  # as transformer._decode
  mask = jnp.broadcast_to(mask, (2, 1, new_tokens, 37))
  for blocks in (BLOCKS, {}):  # small blocks, the default ones
    out = jax.jit(lambda q, k, v, blocks=blocks: chunked_attention(q, k, v, mask, **blocks))(q, k, v)
    assert_close(out, reference_attention(q, k, v, mask))


def test_bf16_close_to_f32():
  q, k, v = qkv(t=T, s=T)
  mask = SegmentMask(SEG, SEG, True)
  ref = reference_attention(q, k, v, mask.dense())
  bf16 = [x.astype(jnp.bfloat16) for x in (q, k, v)]
  out = jax.jit(lambda q, k, v: chunked_attention(q, k, v, mask, **BLOCKS))(*bf16)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(out.astype(jnp.float32), ref, atol=5e-2)


def test_backward_memory_is_linear():
  """Compiled forward + backward at T = S = 2048: XLA's scratch stays far below one [T, S] float32 score matrix
  (the chunked backward recomputes the block probabilities instead of saving them); xla's is several of them."""
  q, k, v = (x[:1, :, :1] for x in qkv(t=2048, s=2048, n=1, k=1, h=16))
  mask = SegmentMask(jnp.ones((1, 2048), jnp.int32), jnp.ones((1, 2048), jnp.int32), True)
  scores = 2048 * 2048 * 4

  def temp(fn):
    step = jax.jit(jax.grad(lambda q, k, v: fn(q, k, v).sum(), argnums=(0, 1, 2)))
    return step.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes

  chunked = temp(lambda q, k, v: chunked_attention(q, k, v, mask, block_q=256, block_kv=256))
  xla = temp(lambda q, k, v: dot_product_attention(q, k, v, mask.dense(), implementation='xla'))
  assert chunked < scores / 8, (chunked, scores)
  assert xla > scores, (xla, scores)


@pytest.mark.parametrize('arch,position', [('decoder_only', 'rope'), ('encoder_decoder', 'relative')])
def test_model_loss_and_gradients_match_xla(monkeypatch, arch, position):
  """A tiny model with packed + padded rows: attention_impl=chunked (SegmentMasks, several blocks) gives the loss
  and parameter gradients of attention_impl=xla."""
  monkeypatch.setattr(attention, 'CHUNK', 3)
  seg = jnp.array([[1, 1, 1, 2, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1, 0, 0]])
  tokens = jnp.asarray(np.random.default_rng(0).integers(5, 23, size=(2, 8)), jnp.int32)

  def loss_and_grads(impl):
    model = build_model(tiny_config(arch, position, attention_impl=impl), rngs=nnx.Rngs(params=0, dropout=1))

    def loss(model):
      if arch == 'encoder_decoder':
        logits = model(tokens, tokens, src_segment_ids=seg, tgt_segment_ids=seg)
      else:
        logits = model(tokens, segment_ids=seg)
      logp = jax.nn.log_softmax(logits)
      return -(jnp.take_along_axis(logp, tokens[..., None], -1)[..., 0] * (seg != 0)).sum()

    value, g = nnx.jit(nnx.value_and_grad(loss))(model)
    return value, nnx.to_pure_dict(g)

  got, want = loss_and_grads('chunked'), loss_and_grads('xla')
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4), got[1], want[1])


def test_model_decoding_matches_xla():
  """decode_step with attention_impl=chunked (prefill, then single tokens against the cache) gives xla's logits."""
  tokens = jnp.asarray(np.random.default_rng(1).integers(5, 23, size=(2, 6)), jnp.int32)
  logits = {}
  for impl in ('chunked', 'xla'):
    model = build_model(tiny_config('decoder_only', 'rope', attention_impl=impl), rngs=nnx.Rngs(0))
    cache = model.init_cache(2, 8)
    step = nnx.jit(lambda model, tokens, cache: model.decode_step(tokens, cache))
    out, cache = step(model, tokens[:, :4], cache)
    steps = [out]
    for i in (4, 5):
      out, cache = step(model, tokens[:, i:i + 1], cache)
      steps.append(out)
    logits[impl] = jnp.concatenate(steps, 1)
  np.testing.assert_allclose(logits['chunked'], logits['xla'], atol=ATOL)
