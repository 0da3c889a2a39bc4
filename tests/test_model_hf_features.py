"""The model features Hugging Face families need (T5, BERT, GPT-2, Llama, Qwen2), each against a plain numpy
reference computed from the module's own parameters, on tiny models."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxformer.model import attention_mask, build_model
from jaxformer.model.attention import Attention
from jaxformer.model.config import ModelConfig
from test_model import tiny_config


def blocks_of(stack):
  """A stack's blocks, one module per layer in either layout (scanned: copies of each layer's slice)."""
  return stack.blocks.unstacked() if stack.scanned else list(stack.blocks)


def randomize(module, names, seed=0):
  """Non-zero values for parameters that start at zero (biases), so the reference checks them."""
  for i, name in enumerate(names):
    p = getattr(module, name)
    p[...] = jax.random.normal(jax.random.key(seed + i), p.shape)


def textbook_attention(attn, x, mask, *, scale, bias=None, qkv_bias=False, out_bias=False, kv_x=None):
  """Per-head numpy attention from attn's parameters. bias: [B, N, T, S] added to the scaled logits; kv_x: the
  keys' and values' input (cross-attention), default x."""
  wq, wk, wv, wo = (np.asarray(p[...]) for p in (attn.query, attn.key, attn.value, attn.out))
  n, kvh = wq.shape[1], wk.shape[1]
  xs, m = np.asarray(x, np.float64), np.asarray(mask[:, 0])
  ks = xs if kv_x is None else np.asarray(kv_x, np.float64)
  out = np.zeros(xs.shape[:2] + (wo.shape[-1],))
  for b in range(xs.shape[0]):
    heads = []
    for h in range(n):
      g = h // (n // kvh)
      q, k, v = xs[b] @ wq[:, h], ks[b] @ wk[:, g], ks[b] @ wv[:, g]
      if qkv_bias:
        q, k, v = q + attn.query_bias[...][h], k + attn.key_bias[...][g], v + attn.value_bias[...][g]
      s = q @ k.T * scale + (0.0 if bias is None else np.asarray(bias)[b, h])
      s = np.where(m[b], s, -1e30)
      p = np.where(m[b], np.exp(s - s.max(-1, keepdims=True)), 0.0)
      p = np.where(m[b].any(-1, keepdims=True), p / np.maximum(p.sum(-1, keepdims=True), 1e-30), 0.0)
      heads.append(p @ v)
    out[b] = np.concatenate(heads, -1) @ wo.reshape(-1, wo.shape[-1])
    if out_bias:
      out[b] += np.asarray(attn.out_bias[...])
  return out


# --------------------------------------------------------------------- head_dim, attention_scale, qkv_bias
@pytest.mark.parametrize('head_dim,scale,impl', [(8, -1.0, 'xla'), (8, 1.0, 'xla'), (6, 1.0, 'reference'),
                                                 (-1, 0.5, 'xla')])
def test_attention_head_dim_and_scale(head_dim, scale, impl):
  """T5: heads * d_kv != d_model, no 1/sqrt(d) scaling. head_dim=-1 keeps d_model // num_heads."""
  cfg = ModelConfig.from_config(tiny_config(num_heads=4, num_kv_heads=2, head_dim=head_dim, attention_scale=scale,
                                            use_bias=False, attention_impl=impl))
  attn = Attention(cfg, rngs=nnx.Rngs(0))
  h = 16 // 4 if head_dim == -1 else head_dim
  assert attn.query.shape == (16, 4, h) and attn.key.shape == (16, 2, h) and attn.out.shape == (4, h, 16)
  x = jax.random.normal(jax.random.key(1), (2, 6, 16))
  seg = jnp.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 2, 2, 2]])
  mask = attention_mask(seg, seg, causal=True)
  expected = textbook_attention(attn, x, mask, scale=1 / math.sqrt(h) if scale == -1 else scale)
  np.testing.assert_allclose(attn(x, mask)[0], expected, atol=1e-5)


def test_qkv_bias_without_output_bias():
  """Qwen2: biases on q/k/v only (use_bias=False elsewhere)."""
  cfg = ModelConfig.from_config(tiny_config(num_kv_heads=2, use_bias=False, qkv_bias=True))
  attn = Attention(cfg, rngs=nnx.Rngs(0))
  assert attn.out_bias is None and attn.query_bias.shape == (4, 4) and attn.key_bias.shape == (2, 4)
  randomize(attn, ('query_bias', 'key_bias', 'value_bias'))
  x = jax.random.normal(jax.random.key(1), (2, 5, 16))
  seg = jnp.ones((2, 5), jnp.int32)
  mask = attention_mask(seg, seg, causal=False)
  expected = textbook_attention(attn, x, mask, scale=0.5, qkv_bias=True)
  np.testing.assert_allclose(attn(x, mask)[0], expected, atol=1e-5)
  model = build_model(tiny_config(use_bias=False, qkv_bias=True), rngs=nnx.Rngs(0))
  assert blocks_of(model.decoder)[0].mlp.wi_bias is None  # the MLP stays bias-free


# ------------------------------------------------------------------------------------------ MLP choices
def _gelu_tanh(x):
  return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


_GELU_EXACT = np.vectorize(lambda x: 0.5 * x * (1 + math.erf(x / math.sqrt(2))))
MLP_REFERENCES = {  # name -> (activation, gated)
    'gelu': (_gelu_tanh, False), 'gelu_exact': (_GELU_EXACT, False), 'relu': (lambda x: np.maximum(x, 0), False),
    'swiglu': (lambda x: x / (1 + np.exp(-x)), True), 'geglu': (_gelu_tanh, True)}


@pytest.mark.parametrize('mlp', sorted(MLP_REFERENCES))
def test_mlp_against_numpy(mlp):
  """HF conventions: BERT erf GELU, GPT-2 tanh GELU, T5 v1.1 act(x wi_0) * (x wi_1), Llama silu(gate) * up."""
  from jaxformer.model import layers
  cfg = ModelConfig.from_config(tiny_config(mlp=mlp, use_bias=True))
  module = layers.MLP(cfg, rngs=nnx.Rngs(0))
  randomize(module, ('wi_bias', 'wo_bias'))
  x = np.asarray(jax.random.normal(jax.random.key(2), (3, 16)) * 2, np.float64)
  act, gated = MLP_REFERENCES[mlp]
  wi, wo = np.asarray(module.wi[...]), np.asarray(module.wo[...])
  h = x @ wi + np.asarray(module.wi_bias[...])
  h = act(x @ np.asarray(module.wi_gate[...])) * h if gated else act(h)
  expected = h @ wo + np.asarray(module.wo_bias[...])
  np.testing.assert_allclose(module(jnp.asarray(x, jnp.float32)), expected, atol=1e-4, rtol=1e-5)
  assert (module.wi_gate is not None) == gated
  if mlp in ('gelu', 'gelu_exact'):  # the two GELUs are different functions (so the choice matters)
    other = layers.MLPS['gelu_exact' if mlp == 'gelu' else 'gelu'].activation
    assert np.abs(np.asarray(other(jnp.asarray(x @ wi))) - act(x @ wi)).max() > 1e-4


# ------------------------------------------------------------------------------------------------ pad_id
def test_pad_id_none_makes_token_zero_real():
  """GPT-2 / Llama (pad_id=-1): a 0 inside the row is a word, attended like any other token."""
  tokens = jnp.array([[1, 0, 7, 0, 9, 0]])
  none = build_model(tiny_config(pad_id=-1), rngs=nnx.Rngs(0))
  np.testing.assert_allclose(none(tokens), none(tokens, segment_ids=jnp.ones_like(tokens)), atol=1e-6)
  zero = build_model(tiny_config(), rngs=nnx.Rngs(0))  # same parameters, default pad_id=0: the zeros are padding
  np.testing.assert_allclose(zero(tokens), none(tokens, segment_ids=(tokens != 0).astype(jnp.int32)), atol=1e-6)
  assert np.abs(np.asarray(zero(tokens))[0, 2] - np.asarray(none(tokens))[0, 2]).max() > 1e-4


def test_t5_decoder_start_token_zero_is_attended():
  """T5 (pad_id=0): the decoder input starts with 0 and must not be masked; source padding still is."""
  model = build_model(tiny_config('encoder_decoder', pad_id=0), rngs=nnx.Rngs(0))
  src, tgt = jnp.array([[5, 6, 7, 0]]), jnp.array([[0, 8, 9]])
  expected = model(src, tgt, src_segment_ids=jnp.array([[1, 1, 1, 0]]), tgt_segment_ids=jnp.ones_like(tgt))
  np.testing.assert_allclose(model(src, tgt), expected, atol=1e-6)  # decoding from 0: test_t5_v1_0_tied_rescaled_relu


def test_greedy_decoding_with_token_zero():
  """Decoding agrees with re-running the full forward for GPT-2-style prompts containing 0 (pad_id=-1), including
  rows of different lengths (the longer prompt is fed through the loop). T5 decoding from start token 0:
  test_t5_v1_0_tied_rescaled_relu."""
  from jaxformer import decoding
  from test_decoding import full_forward_greedy
  model = build_model(tiny_config(pad_id=-1), rngs=nnx.Rngs(3))
  prompts = [[1, 0, 7], [0, 9]]
  tokens, lengths = decoding.pad_prompts(prompts)
  got = decoding.greedy(model, tokens, prompt_lengths=lengths, max_new_tokens=5)
  np.testing.assert_array_equal(got, full_forward_greedy(model, prompts, 5))


# ---------------------------------------------------------------------- a plain reference of the whole model
def ref_norm(norm, x):
  from jaxformer.model import layers
  x = np.asarray(x, np.float64)
  scale = np.asarray(norm.scale[...])
  if isinstance(norm, layers.LayerNorm):
    y = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + norm.eps) * scale
    return y if norm.bias is None else y + np.asarray(norm.bias[...])
  return x / np.sqrt(np.square(x).mean(-1, keepdims=True) + norm.eps) * scale  # T5 / Llama RMSNorm


def ref_mlp(mlp, x, kind):
  act, gated = MLP_REFERENCES[kind]
  bias = lambda p: 0.0 if p is None else np.asarray(p[...])  # noqa: E731
  h = x @ np.asarray(mlp.wi[...]) + bias(mlp.wi_bias)
  h = act(x @ np.asarray(mlp.wi_gate[...])) * h if gated else act(h)
  return h @ np.asarray(mlp.wo[...]) + bias(mlp.wo_bias)


def ref_stack(stack, cfg, x, mask, *, bias=None, encoded=None, cross_mask=None):
  """Embeddings in, hidden states out: [embed norm] + blocks (pre- or post-LN) + [final norm]."""
  pre = cfg.norm_position == 'pre'
  scale = 1 / math.sqrt(cfg.head_dim) if cfg.attention_scale == -1 else cfg.attention_scale
  attend = dict(scale=scale, qkv_bias=cfg.use_bias or cfg.qkv_bias, out_bias=cfg.use_bias)
  if stack.embed_norm is not None:
    x = ref_norm(stack.embed_norm, x)

  def sublayer(x, norm, f):
    y = f(ref_norm(norm, x) if pre else x)
    return x + y if pre else ref_norm(norm, x + y)

  for block in blocks_of(stack):
    x = sublayer(x, block.attn_norm, lambda h: textbook_attention(block.attn, h, mask, bias=bias, **attend))
    if block.cross_attn is not None:
      x = sublayer(x, block.cross_norm,
                   lambda h: textbook_attention(block.cross_attn, h, cross_mask, kv_x=encoded, **attend))
    x = sublayer(x, block.mlp_norm, lambda h: ref_mlp(block.mlp, h, cfg.mlp))
  return x if stack.final_norm is None else ref_norm(stack.final_norm, x)


def ref_logits(model, cfg, h):
  h = h * cfg.output_scale
  w = np.asarray(model.embed.embedding[...]).T if model.unembed is None else np.asarray(model.unembed.kernel[...])
  logits = h @ w
  return logits if model.output_bias is None else logits + np.asarray(model.output_bias[...])


def test_bert_embeddings_and_mlm_head_against_reference():
  """BERT: word + token-type + learned position embeddings -> LayerNorm -> post-LN blocks (erf GELU) -> MLM head
  (dense -> GELU -> LayerNorm) -> tied decoder + output bias."""
  config = tiny_config('encoder_only', norm_position='post', mlp='gelu_exact', type_vocab_size=2, embed_norm=True,
                       output_bias=True, norm_eps=1e-12, num_kv_heads=4)
  model = build_model(config, rngs=nnx.Rngs(0))
  cfg = model.config
  assert model.token_type_embedding.shape == (2, 16) and model.output_bias.shape == (cfg.vocab_size,)
  assert model.encoder.embed_norm.scale.shape == (16,) and model.encoder.embed_norm.bias.shape == (16,)
  randomize(model, ('output_bias',))
  randomize(model.encoder.embed_norm, ('bias',), seed=5)
  tokens = jnp.array([[1, 7, 8, 9, 2, 0], [1, 5, 6, 2, 10, 11]])
  types = jnp.array([[0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1]])
  got = model(tokens, token_type_ids=types)
  table = lambda p: np.asarray(p[...])  # noqa: E731
  x = (table(model.embed.embedding)[tokens] + table(model.token_type_embedding)[types]
       + table(model.encoder.positions.embedding)[np.arange(6)])
  seg = (tokens != 0).astype(jnp.int32)
  h = ref_stack(model.encoder, cfg, x, attention_mask(seg, seg, causal=False))
  head = model.head
  h = _GELU_EXACT(h @ table(head.kernel) + table(head.bias))
  expected = ref_logits(model, cfg, ref_norm(head.norm, h))
  np.testing.assert_allclose(got, expected, atol=2e-4, rtol=1e-4)
  # token_type_ids default to zeros
  np.testing.assert_allclose(model(tokens), model(tokens, token_type_ids=jnp.zeros_like(tokens)), atol=1e-6)


def test_output_scale_and_untied_bias_for_decoders():
  """T5 v1.0's tied-logit rescale (h * d_model**-0.5) and an output bias, through decoding too."""
  config = tiny_config(output_scale=16 ** -0.5, output_bias=True, tie_embeddings=True)
  model = build_model(config, rngs=nnx.Rngs(0))
  randomize(model, ('output_bias',))
  tokens = jnp.array([[1, 7, 8, 9]])
  seg = jnp.ones_like(tokens)
  x = np.asarray(model.embed.embedding[...])[tokens] + np.asarray(model.decoder.positions.embedding[...])[:4]
  h = ref_stack(model.decoder, model.config, x, attention_mask(seg, seg, causal=True))
  np.testing.assert_allclose(model(tokens), ref_logits(model, model.config, h), atol=1e-4, rtol=1e-4)
  cache = model.init_cache(1, 4)
  np.testing.assert_allclose(model.decode_step(tokens, cache)[0], model(tokens), atol=1e-5)


# ------------------------------------------------------------------------- T5 relative position bias
def t5_bucket(relative, bidirectional, num_buckets, max_distance):
  """The T5 paper's bucketing, one pair at a time in float64."""
  bucket = 0
  if bidirectional:
    num_buckets //= 2
    bucket += num_buckets if relative > 0 else 0
    distance = abs(relative)
  else:
    distance = max(-relative, 0)
  exact = num_buckets // 2
  if distance < exact:
    return bucket + distance
  large = exact + int(math.log(distance / exact) / math.log(max_distance / exact) * (num_buckets - exact))
  return bucket + min(large, num_buckets - 1)


@pytest.mark.parametrize('bidirectional', [True, False])
def test_relative_buckets_match_the_t5_definition(bidirectional):
  from jaxformer.model import positions
  relative = np.arange(-300, 301)
  got = positions.relative_bucket(relative, bidirectional=bidirectional, num_buckets=32, max_distance=128)
  expected = [t5_bucket(int(r), bidirectional, 32, 128) for r in relative]
  np.testing.assert_array_equal(got, expected)
  assert got.min() == 0 and got.max() == 31  # every bucket is used (causal: all for keys at or before the query)


def _t5_config(**overrides):
  """T5 v1.1-like: relative bias, RMSNorm, no biases, unscaled attention, gated GELU, head_dim != d_model/heads."""
  values = dict(position='relative', norm='rms', mlp='geglu', use_bias=False, attention_scale=1.0, head_dim=6,
                num_kv_heads=4, relative_num_buckets=8, relative_max_distance=12, tie_embeddings=False)
  return tiny_config('encoder_decoder', **{**values, **overrides})


def _ref_bias(table, q_pos, k_pos, bidirectional, cfg):
  """[B,N,T,S] from the table [buckets, N] by the per-pair definition."""
  q_pos, k_pos = np.asarray(q_pos), np.asarray(k_pos)
  out = np.zeros((q_pos.shape[0], table.shape[1], q_pos.shape[1], k_pos.shape[1]))
  for b in range(q_pos.shape[0]):
    for t in range(q_pos.shape[1]):
      for s in range(k_pos.shape[1]):
        rel = int(k_pos[b, s] - q_pos[b, t])
        out[b, :, t, s] = table[t5_bucket(rel, bidirectional, cfg.relative_num_buckets, cfg.relative_max_distance)]
  return out


def test_t5_against_reference_with_packing_and_decoding():
  """Both stacks against the plain reference (encoder bidirectional buckets, decoder causal buckets, no bias on
  cross-attention), on packed rows whose positions restart per segment; then the KV cache gives the same logits."""
  model = build_model(_t5_config(), rngs=nnx.Rngs(0))
  cfg = model.config
  for stack in (model.encoder, model.decoder):
    assert stack.positions.embedding.shape == (8, 4)
    assert stack.final_norm is not None
  src = jnp.array([[3, 4, 5, 6, 7, 8, 9, 10], [5, 6, 7, 8, 0, 0, 0, 0]])
  src_seg = jnp.array([[1, 1, 1, 1, 1, 2, 2, 2], [1, 1, 1, 1, 0, 0, 0, 0]])
  src_pos = jnp.array([[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 0, 0, 0, 0]])
  tgt = jnp.array([[0, 11, 12, 0, 13, 14], [0, 15, 16, 17, 18, 19]])
  tgt_seg = jnp.array([[1, 1, 1, 2, 2, 2], [1, 1, 1, 1, 1, 1]])
  tgt_pos = jnp.array([[0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 4, 5]])
  got = model(src, tgt, src_positions=src_pos, src_segment_ids=src_seg, tgt_positions=tgt_pos,
              tgt_segment_ids=tgt_seg)
  emb = np.asarray(model.embed.embedding[...])
  enc_table, dec_table = (np.asarray(s.positions.embedding[...]) for s in (model.encoder, model.decoder))
  encoded = ref_stack(model.encoder, cfg, emb[src], attention_mask(src_seg, src_seg, causal=False),
                      bias=_ref_bias(enc_table, src_pos, src_pos, True, cfg))
  h = ref_stack(model.decoder, cfg, emb[tgt], attention_mask(tgt_seg, tgt_seg, causal=True),
                bias=_ref_bias(dec_table, tgt_pos, tgt_pos, False, cfg), encoded=encoded,
                cross_mask=attention_mask(tgt_seg, src_seg, causal=False))
  np.testing.assert_allclose(got, ref_logits(model, cfg, h), atol=2e-4, rtol=1e-4)

  # decoding: one unpacked row per batch entry, the prefix then one token at a time against the cache
  src1, tgt1 = src[1:], tgt[1:]
  full = model(src1, tgt1)
  cache = model.init_cache(1, 8, src_tokens=src1)
  steps = [model.decode_step(tgt1[:, :3], cache)]
  for i in range(3, 6):
    steps.append(model.decode_step(tgt1[:, i:i + 1], steps[-1][1]))
  np.testing.assert_allclose(jnp.concatenate([s[0] for s in steps], 1), full, atol=1e-5)


def test_t5_v1_0_tied_rescaled_relu():
  """T5 v1.0: relu MLP, tied embeddings with the d_model**-0.5 logit rescale; decoding from start token 0
  agrees with the full forward."""
  from jaxformer import decoding
  from test_decoding import full_forward_greedy
  model = build_model(_t5_config(mlp='relu', tie_embeddings=True, output_scale=16 ** -0.5), rngs=nnx.Rngs(1))
  src = jnp.array([[5, 6, 7, 8, 9, 0], [10, 11, 12, 0, 0, 0]])
  got = decoding.greedy(model, src_tokens=src, max_new_tokens=6, start_id=0)
  np.testing.assert_array_equal(got, full_forward_greedy(model, [[0], [0]], 6, src=src))


def test_every_decoder_token_is_real_in_decoding():
  """T5 (pad_id=0) attends to a decoder token 0 after the start, as Hugging Face's generate does for a generated
  pad id: decoder prompts with an inner 0 (fed through the same loop step as generated tokens, the longer row one
  token at a time) decode exactly as the full forward over all-real decoder tokens."""
  from jaxformer import decoding
  from test_decoding import full_forward_greedy
  model = build_model(_t5_config(mlp='relu'), rngs=nnx.Rngs(1))
  src = jnp.array([[5, 6, 7, 8, 9, 0], [10, 11, 12, 0, 0, 0]])
  prompts = [[0, 13, 0, 14], [0, 0]]
  tokens, lengths = decoding.pad_prompts(prompts)
  got = decoding.greedy(model, tokens, prompt_lengths=lengths, src_tokens=src, max_new_tokens=3)
  np.testing.assert_array_equal(got, full_forward_greedy(model, prompts, 3, src=src))
  tgt = jnp.array(prompts[:1])  # masking the inner 0 (the default for a forward call) would give other logits
  assert np.abs(np.asarray(model(src[:1], tgt)) - np.asarray(model(src[:1], tgt, tgt_segment_ids=jnp.ones_like(tgt)))
                ).max() > 1e-4
