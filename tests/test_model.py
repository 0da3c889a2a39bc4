"""Model invariances for every arch x position x norm placement, on tiny models (CPU, seconds).

Each check compares the model against itself under a transformation that must not matter (padding, packing,
future tokens, the KV cache), so a wrong mask or position shows up as a logit difference.
"""
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import default
from jaxformer.model import build_model, count_params

ARCHS = ('encoder_only', 'decoder_only', 'encoder_decoder')
POSITIONS = ('learned', 'sinusoidal', 'rope')
NORM_POSITIONS = ('pre', 'post')
COMBOS = list(itertools.product(ARCHS, POSITIONS, NORM_POSITIONS))
DECODER_COMBOS = [c for c in COMBOS if c[0] != 'encoder_only']
L = 8  # every test uses rows of this length (plus L_SHORT for the unpadded rows), so each model compiles little
L_SHORT = 5
VOCAB = 23
ATOL = 2e-5


def tiny_config(arch='decoder_only', position='learned', norm_position='pre', **overrides):
  """A 2-layer d_model=16 model; the other choices rotate with the position type so every option is exercised."""
  model = default.get_config().model
  variant = {
      'learned': dict(norm='layer', mlp='gelu', use_bias=True, tie_embeddings=True, num_kv_heads=2),
      'sinusoidal': dict(norm='layer', mlp='relu', use_bias=True, tie_embeddings=False, num_kv_heads=4),
      'rope': dict(norm='rms', mlp='swiglu', use_bias=False, tie_embeddings=True, num_kv_heads=1),
  }.get(position, {})
  model.update(arch=arch, position=position, norm_position=norm_position, num_layers=2, num_decoder_layers=1,
               num_heads=4, d_model=16, d_ff=32, vocab_size=VOCAB, max_len=16, init_std=0.3, **variant)
  model.update(**overrides)
  return model


class Runner:
  """A model built once per config and shared by the tests. Runs eagerly: every tiny model has the same shapes,
  so JAX's per-primitive compilation cache is shared across the 18 configurations (much faster than one jit
  compilation per model and input signature); test_jitted_decoding_loop covers the jitted path."""

  def __init__(self, model_cfg, seed=0):
    self.arch = model_cfg.arch
    self.model = build_model(model_cfg, rngs=nnx.Rngs(params=seed, dropout=seed + 1))

  def __call__(self, *args, **kw):
    return np.asarray(self.model(*args, **kw))

  def init_cache(self, src=None):
    return self.model.init_cache(2, L, src_tokens=src)

  def decode_step(self, tokens, cache):
    return self.model.decode_step(tokens, cache)


@functools.lru_cache(maxsize=None)
def runner(arch, position, norm_position):
  return Runner(tiny_config(arch, position, norm_position))


def tokens(rng, batch, length, low=5):
  return jnp.asarray(rng.integers(low, VOCAB, size=(batch, length)), jnp.int32)


def pad_to(x, length):
  return jnp.pad(x, ((0, 0), (0, length - x.shape[1])))


def call(r, src, tgt, **kw):
  """Runs either calling convention: (src, tgt) for encoder_decoder, else the single sequence `tgt`."""
  if r.arch == 'encoder_decoder':
    return r(src, tgt, **kw)
  return r(tgt, **{k.replace('tgt_', ''): v for k, v in kw.items() if k.startswith('tgt_')})


# ----------------------------------------------------------------------------------------------- tests
def test_gpt2_small_parameter_count():
  from configs import gpt2_small
  model = nnx.eval_shape(lambda: build_model(gpt2_small.get_config().model, rngs=nnx.Rngs(0)))
  assert count_params(model) == 124_439_808


@pytest.mark.parametrize('recipe', ['gpt_tiny', 'bert_tiny', 't5_tiny', 'bert_base', 't5_small', 'transformer_base'])
def test_recipes_build(recipe):
  import importlib
  config = importlib.import_module(f'configs.{recipe}').get_config()
  config.model.vocab_size = config.model.vocab_size or 100
  model = nnx.eval_shape(lambda: build_model(config.model, rngs=nnx.Rngs(0)))
  assert count_params(model) > 0


def test_build_without_vocab_size_is_a_clear_error():
  from jaxformer.config import ConfigError
  with pytest.raises(ConfigError, match='model.vocab_size'):
    build_model(tiny_config(vocab_size=0), rngs=nnx.Rngs(0))


@pytest.mark.parametrize('arch,position,norm_position', COMBOS)
def test_padding_invariance(arch, position, norm_position):
  r, rng = runner(arch, position, norm_position), np.random.default_rng(0)
  src, tgt = tokens(rng, 2, L_SHORT), tokens(rng, 2, L_SHORT)
  short = call(r, src, tgt)
  padded = call(r, pad_to(src, L), pad_to(tgt, L))
  assert short.shape == (2, L_SHORT, VOCAB) and short.dtype == np.float32
  assert np.all(np.isfinite(padded))
  np.testing.assert_allclose(padded[:, :L_SHORT], short, atol=ATOL)


@pytest.mark.parametrize('arch,position,norm_position', COMBOS)
def test_causality(arch, position, norm_position):
  """Changing tokens after t leaves logits up to t unchanged (decoders); the encoder sees the whole row."""
  r, rng = runner(arch, position, norm_position), np.random.default_rng(1)
  src, tgt = tokens(rng, 2, L), tokens(rng, 2, L)
  t = 3
  changed = tgt.at[:, t + 1:].set((tgt[:, t + 1:] - 5 + 1) % (VOCAB - 5) + 5)
  a, b = call(r, src, tgt), call(r, src, changed)
  if arch == 'encoder_only':  # bidirectional: earlier positions see the change
    assert np.abs(a[:, :t + 1] - b[:, :t + 1]).max() > 1e-4
  else:
    np.testing.assert_allclose(a[:, :t + 1], b[:, :t + 1], atol=ATOL)
    assert np.abs(a[:, t + 1:] - b[:, t + 1:]).max() > 1e-4  # and the change is seen where it should be
  if arch == 'encoder_decoder':  # the decoder attends to the whole source
    src_changed = src.at[:, -1].set((src[:, -1] - 5 + 1) % (VOCAB - 5) + 5)
    assert np.abs(a[:, 0] - call(r, src_changed, tgt)[:, 0]).max() > 1e-4


@pytest.mark.parametrize('arch,position,norm_position', COMBOS)
def test_packed_documents_match_separate_rows(arch, position, norm_position):
  """A row packing two documents (segment ids 1, 2; positions restarting at 0) equals each document alone."""
  r, rng = runner(arch, position, norm_position), np.random.default_rng(2)
  la, lb, sa, sb = 3, 4, 5, 3  # target and source lengths of documents A and B (A+B <= L)
  tgt_a, tgt_b, src_a, src_b = tokens(rng, 1, la), tokens(rng, 1, lb), tokens(rng, 1, sa), tokens(rng, 1, sb)

  def packed(a, b):
    row = pad_to(jnp.concatenate([a, b], 1), L)
    seg = pad_to(jnp.array([[1] * a.shape[1] + [2] * b.shape[1]]), L)
    pos = pad_to(jnp.array([list(range(a.shape[1])) + list(range(b.shape[1]))]), L)
    return row, seg, pos

  tgt, tgt_seg, tgt_pos = packed(tgt_a, tgt_b)
  src, src_seg, src_pos = packed(src_a, src_b)
  out = call(r, src, tgt, src_segment_ids=src_seg, src_positions=src_pos, tgt_segment_ids=tgt_seg,
             tgt_positions=tgt_pos)
  alone_a = call(r, pad_to(src_a, L), pad_to(tgt_a, L))
  alone_b = call(r, pad_to(src_b, L), pad_to(tgt_b, L))
  np.testing.assert_allclose(out[:, :la], alone_a[:, :la], atol=ATOL)
  np.testing.assert_allclose(out[:, la:la + lb], alone_b[:, :lb], atol=ATOL)


@pytest.mark.parametrize('arch,position,norm_position', DECODER_COMBOS)
def test_kv_cache_decoding_matches_full_forward(arch, position, norm_position):
  """Prefill 3 tokens, then 1 token at a time: the logits equal the full forward pass, padding included."""
  r, rng = runner(arch, position, norm_position), np.random.default_rng(3)
  src = tokens(rng, 2, L).at[1, 5:].set(0)  # second source row is padded
  tgt = tokens(rng, 2, L).at[1, 2].set(0).at[0, 6:].set(0)  # a pad inside the prompt and trailing pads
  full = call(r, src, tgt)
  cache = r.init_cache(src if arch == 'encoder_decoder' else None)
  for leaf in jax.tree.leaves(cache):
    assert leaf.shape[0] == 2, 'every cache leaf must be batch-leading'
  logits, cache = r.decode_step(tgt[:, :3], cache)
  steps = [logits]
  for i in range(3, L):
    logits, cache = r.decode_step(tgt[:, i:i + 1], cache)
    steps.append(logits)
  incremental = np.asarray(jnp.concatenate(steps, axis=1))
  assert incremental.dtype == np.float32
  np.testing.assert_allclose(incremental, full, atol=ATOL)
  np.testing.assert_array_equal(cache['index'], [L, L])


def test_decode_step_does_not_mutate_the_model():
  r = runner('decoder_only', 'rope', 'pre')
  snapshot = lambda: jax.tree.map(
      lambda x: np.asarray(jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x),
      nnx.state(r.model))
  before = snapshot()
  cache = r.model.init_cache(2, L)
  r.model.decode_step(jnp.full((2, 3), 7, jnp.int32), cache)
  after = snapshot()
  jax.tree.map(np.testing.assert_array_equal, before, after)


def test_init_cache_checks():
  model = runner('encoder_decoder', 'learned', 'pre').model
  with pytest.raises(ValueError, match='src_tokens'):
    model.init_cache(2, L)
  with pytest.raises(ValueError, match='max_len'):
    runner('decoder_only', 'learned', 'pre').model.init_cache(2, 17)


@pytest.mark.parametrize('arch', ARCHS)
def test_bf16_compute_with_f32_params(arch):
  rng = np.random.default_rng(4)
  src, tgt = tokens(rng, 2, L).at[0, 6:].set(0), tokens(rng, 2, L).at[1, 5:].set(0)
  f32 = Runner(tiny_config(arch, 'rope'))
  bf16 = Runner(tiny_config(arch, 'rope', dtype='bfloat16', param_dtype='float32'))
  for leaf in jax.tree.leaves(nnx.state(bf16.model, nnx.Param)):
    assert leaf.dtype == jnp.float32
  a, b = call(f32, src, tgt), call(bf16, src, tgt)
  assert b.dtype == np.float32 and np.all(np.isfinite(b))
  scale = np.abs(a).max()
  assert np.abs(a - b).max() < 0.05 * scale, (np.abs(a - b).max(), scale)
  assert np.abs(a - b).max() > 0  # the bf16 model really computed in bf16


EXPECTED_NAMES = {
    ('embed', 'embedding'): ('vocab', 'embed'),
    ('unembed', 'kernel'): ('embed', 'vocab'),
    ('positions', 'embedding'): (None, 'embed'),
    ('attn', 'query'): ('embed', 'heads', 'kv'),
    ('attn', 'key'): ('embed', 'kv_heads', 'kv'),
    ('attn', 'value'): ('embed', 'kv_heads', 'kv'),
    ('attn', 'out'): ('heads', 'kv', 'embed'),
    ('attn', 'query_bias'): ('heads', 'kv'),
    ('attn', 'key_bias'): ('kv_heads', 'kv'),
    ('attn', 'value_bias'): ('kv_heads', 'kv'),
    ('attn', 'out_bias'): ('embed',),
    ('mlp', 'wi'): ('embed', 'mlp'),
    ('mlp', 'wi_gate'): ('embed', 'mlp'),
    ('mlp', 'wo'): ('mlp', 'embed'),
    ('mlp', 'wi_bias'): ('mlp',),
    ('mlp', 'wo_bias'): ('embed',),
    ('norm', 'scale'): ('embed',),
    ('norm', 'bias'): ('embed',),
}


@pytest.mark.parametrize('position', POSITIONS)
def test_params_carry_logical_axis_names(position):
  allowed = {None, 'vocab', 'embed', 'heads', 'kv_heads', 'kv', 'mlp'}
  model = nnx.eval_shape(lambda: build_model(tiny_config('encoder_decoder', position), rngs=nnx.Rngs(0)))
  seen = set()
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    names, shape = var.get_metadata().get('out_sharding'), var.shape
    assert names is not None and len(names) == len(shape), (path, names, shape)
    if 'layers' in path:  # model.scan_layers: the stacked layer axis leads (its own rule, unsharded by default)
      assert names[0] == 'layers', (path, names)
      names, shape = names[1:], shape[1:]
    assert set(names) <= allowed, (path, names)
    assert len([n for n in names if n]) == len(set(n for n in names if n)), (path, names)
    parent = str(path[-2]).replace('cross_', '')
    parent = 'norm' if parent.endswith('norm') else parent
    key = (parent, str(path[-1]))
    if key in EXPECTED_NAMES:
      assert tuple(names) == EXPECTED_NAMES[key], (path, names)
      seen.add(key)
    if len(shape) == 1:  # the default train.weight_decay_exclude='norm,bias,embed' must spare these
      assert any(w in str(part) for part in path for w in ('norm', 'bias')), path
  assert {('embed', 'embedding'), ('attn', 'query'), ('attn', 'key'), ('attn', 'out'), ('mlp', 'wi'),
          ('mlp', 'wo'), ('norm', 'scale')} <= seen


def test_reference_and_xla_attention_give_the_same_model():
  rng = np.random.default_rng(5)
  src, tgt = tokens(rng, 2, L).at[1, 6:].set(0), tokens(rng, 2, L).at[0, 5:].set(0)
  a = call(Runner(tiny_config('encoder_decoder', 'learned', attention_impl='xla')), src, tgt)
  b = call(Runner(tiny_config('encoder_decoder', 'learned', attention_impl='reference')), src, tgt)
  np.testing.assert_allclose(a, b, atol=ATOL)


@pytest.mark.parametrize('position', ['rope', 'relative'])  # relative: the shared bias goes through the remat
def test_remat_gives_the_same_loss_and_gradients(position):
  rng = np.random.default_rng(6)
  src, tgt = tokens(rng, 2, L), tokens(rng, 2, L)

  def loss_and_grads(remat):
    model = build_model(tiny_config('encoder_decoder', position, remat=remat, dropout=0.1), rngs=nnx.Rngs(0))
    loss = lambda m: jnp.mean(jax.nn.log_softmax(m(src, tgt, deterministic=False))[..., 5])
    return nnx.jit(nnx.value_and_grad(loss))(model)

  (l1, g1), (l2, g2) = loss_and_grads('none'), loss_and_grads('block')
  np.testing.assert_allclose(l1, l2, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g1, g2)


def test_dropout_only_when_not_deterministic():
  model = build_model(tiny_config('decoder_only', 'learned', dropout=0.3, attention_dropout=0.3),
                      rngs=nnx.Rngs(params=0, dropout=1))
  tgt = tokens(np.random.default_rng(7), 2, L)
  a, b = model(tgt), model(tgt)
  np.testing.assert_array_equal(a, b)
  c, d = model(tgt, deterministic=False), model(tgt, deterministic=False)
  assert np.all(np.isfinite(c)) and np.abs(a - c).max() > 1e-4 and np.abs(c - d).max() > 1e-4


def test_gpt2_style_scaled_residual_init():
  """Residual output projections start at init_std / sqrt(residual sublayers in their stack), as GPT-2."""
  model = build_model(tiny_config('encoder_decoder', 'learned', num_layers=4, num_decoder_layers=2, d_model=32,
                                  init_std=0.02), rngs=nnx.Rngs(0))
  std = lambda params: np.std(np.concatenate([np.ravel(p[...]) for p in params]))
  for stack, sublayers in ((model.encoder, 2 * 4), (model.decoder, 3 * 2)):
    blocks = [stack.blocks.layers] if stack.scanned else stack.blocks  # scanned: one block, stacked variables
    outs = [b.attn.out for b in blocks] + [b.mlp.wo for b in blocks]
    np.testing.assert_allclose(std(outs), 0.02 / np.sqrt(sublayers), rtol=0.05)
    np.testing.assert_allclose(std([b.attn.query for b in blocks]), 0.02, rtol=0.05)


def test_jitted_decoding_loop():
  """decode_step under jit inside lax.fori_loop (how decoding uses it) equals the eager full forward pass."""
  r = runner('decoder_only', 'rope', 'pre')
  prompt = tokens(np.random.default_rng(8), 2, 3)
  graphdef, state = nnx.split(r.model)

  @jax.jit
  def greedy(state, prompt):
    model = nnx.merge(graphdef, state)
    logits, cache = model.decode_step(prompt, model.init_cache(2, L))
    out = jnp.zeros((2, L), jnp.int32).at[:, :3].set(prompt).at[:, 3].set(jnp.argmax(logits[:, -1], -1))

    def body(i, carry):
      out, cache = carry
      logits, cache = model.decode_step(jax.lax.dynamic_slice_in_dim(out, i, 1, axis=1), cache)
      return out.at[:, i + 1].set(jnp.argmax(logits[:, -1], -1)), cache

    return jax.lax.fori_loop(3, L - 1, body, (out, cache))[0]

  out = greedy(state, prompt)
  np.testing.assert_array_equal(out[:, :3], prompt)
  full = r(out)  # teacher-forced on the generated row: each generated token is the argmax of the step before
  np.testing.assert_array_equal(np.argmax(full[:, 2:-1], -1), out[:, 3:])
