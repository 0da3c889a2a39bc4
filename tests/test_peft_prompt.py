"""Prompt tuning (jaxformer/peft/prompt.py) against references that know nothing of the soft prompt: a prompt equal
to some tokens' embeddings gives the un-prompted model's logits for those tokens in front (decoder_only: a plain
causal forward; encoder_decoder: the base encoder/decoder with the masks built by hand); KV-cache decoding gives the
full forward pass's logits and tokens with every method; scanned layers equal unrolled ones."""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from jaxformer import settings
from jaxformer.settings import decode_settings
from jaxformer import decoding, peft
from jaxformer.model import build_model, layout_convert
from tests.test_model import VOCAB, tiny_config

N = 3  # soft prompt tokens


@functools.lru_cache(maxsize=None)
def _base(arch, position, overrides):
  return build_model(tiny_config(arch, position, **dict(overrides)), rngs=nnx.Rngs(params=0, dropout=1))


def models(arch='decoder_only', position='rope', *, n=N, scale=1.0, **overrides):
  """(base model, the same with a soft prompt of n tokens: random, `scale` times the embedding scale)."""
  base = nnx.clone(_base(arch, position, tuple(sorted(overrides.items()))))
  prompted = nnx.clone(base)
  peft.attach(prompted, settings.fill({'peft': {'method': 'prompt', 'num_prompt_tokens': n}}).peft, nnx.Rngs(params=5))
  stack = prompted.decoder if arch == 'decoder_only' else prompted.encoder
  stack.prompt.embedding.set_value(stack.prompt.embedding.get_value() * scale)
  return base, prompted


def prompt_of(model):
  return (model.decoder if model.config.arch == 'decoder_only' else model.encoder).prompt


def set_prompt_to_tokens(model, ids):
  prompt_of(model).embedding.set_value(model.embed.embedding.get_value()[np.asarray(ids)])


@nnx.jit
def call(model, args, kwargs):
  """model(*args, **kwargs) under jit (eager forward passes of many tiny ops are what makes such tests slow)."""
  return model(*args, **kwargs)


@functools.partial(nnx.jit, static_argnums=(1, 2))
def init_cache(model, batch, max_len, src=None):
  return model.init_cache(batch, max_len, src_tokens=src)


def stepper(model):
  """model.decode_step under one jit (eager decoding of many tiny ops is the slow part of these tests)."""
  return nnx.jit(lambda m, tokens, cache, valid=None: m.decode_step(tokens, cache, valid=valid))


def rows(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).integers(5, VOCAB, size=shape), jnp.int32)


# ------------------------------------------------------------------------------------------------ decoder_only
@pytest.mark.parametrize('position', ['rope', 'learned', 'relative'])
def test_decoder_prompt_of_token_embeddings_equals_those_tokens_in_front(position):
  base, prompted = models('decoder_only', position)
  ids = rows(1, (N,))
  set_prompt_to_tokens(prompted, ids)
  x = rows(2, (2, 8))
  seg = jnp.ones((2, 8), jnp.int32).at[1, 6:].set(0)  # row 1 padded at the end
  got = call(prompted, (x,), dict(segment_ids=seg))
  # the base model, the tokens in front, positions 0..N-1 then 0..T-1 again, one causal segment
  full = jnp.concatenate([jnp.broadcast_to(ids, (2, N)), x], 1)
  positions = jnp.concatenate([jnp.broadcast_to(jnp.arange(N), (2, N)), jnp.broadcast_to(jnp.arange(8), (2, 8))], 1)
  want = call(base, (full,), dict(positions=positions,
                                        segment_ids=jnp.concatenate([jnp.ones((2, N), jnp.int32), seg], 1)))[:, N:]
  real = np.asarray(seg, bool)
  np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=2e-5)
  assert not np.allclose(np.asarray(got), np.asarray(call(base, (x,), dict(segment_ids=seg))), atol=1e-3)  # the prompt matters


@pytest.mark.parametrize('position,scan', [('rope', False), ('relative', True)])
def test_decoder_prompt_kv_cache_equals_the_full_forward_pass(position, scan):
  _, model = models('decoder_only', position, scale=3.0, scan_layers=scan)
  seq = rows(3, (2, 9))
  full = np.asarray(call(model, (seq,), {}))  # no cache: the prompt prepended in the forward pass
  cache = init_cache(model, 2, 12)
  assert cache['valid'].shape == (2, N + 12) and np.all(np.asarray(cache['index']) == N)
  step = stepper(model)
  logits, cache = step(model, seq[:, :4], cache)  # prefill, then one token at a time
  steps = [np.asarray(logits)]
  for i in range(4, 9):
    logits, cache = step(model, seq[:, i:i + 1], cache)
    steps.append(np.asarray(logits))
  np.testing.assert_allclose(np.concatenate(steps, 1), full, atol=2e-5)
  # greedy decoding (ragged prompts) = recomputing model(prompt + generated) without a cache at every step
  prompt, lengths = np.asarray(seq[:, :4]), np.array([4, 2], np.int32)
  got = decoding.greedy(model, prompt, max_new_tokens=6, prompt_lengths=lengths, eos_id=-1)
  want = decoding.greedy_without_cache(model, prompt, max_new_tokens=6, prompt_lengths=lengths, eos_id=-1)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_decoder_prompt_decodes_with_every_method():
  _, model = models('decoder_only', 'rope', scale=3.0)
  prompt = np.asarray(rows(4, (2, 3)))
  greedy = np.asarray(decoding.greedy(model, prompt, max_new_tokens=5, eos_id=-1))
  settings = decode_settings(method='beam', beam_size=3, length_penalty=0.0, max_len=5, eos_id=-1)
  beams, scores = decoding.beam_search(model, prompt, settings=settings)
  # the best beam's score is its log-probability under the full (uncached) forward pass
  seq = jnp.concatenate([jnp.asarray(prompt), beams[:, 0]], 1)
  log_probs = jax.nn.log_softmax(call(model, (seq,), {})[:, 2:-1], -1)
  want = jnp.take_along_axis(log_probs, beams[:, 0][..., None], -1).sum((1, 2))
  np.testing.assert_allclose(np.asarray(scores[:, 0]), np.asarray(want), rtol=1e-4, atol=1e-4)
  top1 = decode_settings(method='sample', temperature=1.0, top_k=1, max_len=5, eos_id=-1)
  np.testing.assert_array_equal(decoding.decode(model, top1, prompt, rng=jax.random.key(0)), greedy)


# --------------------------------------------------------------------------------------------- encoder_decoder
def hand_built_reference(base, ids, src, tgt, pad_id):
  """The base model's encoder on [prompt tokens; source] and its decoder on the result, every mask by hand: the
  prompt attends to itself, real source tokens to the prompt and the real source, real target tokens (causally)
  to the target and cross to the prompt and the real source."""
  b, s = src.shape
  t = tgt.shape[1]
  src_real = np.asarray(src) != pad_id
  keys = np.concatenate([np.ones((b, N), bool), src_real], 1)  # [B, N+S]
  enc_mask = np.zeros((b, N + s, N + s), bool)
  enc_mask[:, :N, :N] = True
  enc_mask[:, N:, :] = src_real[:, :, None] & keys[:, None, :]
  tgt_real = np.asarray(tgt) != pad_id
  tgt_real[:, 0] = True  # the decoder start token
  self_mask = tgt_real[:, :, None] & tgt_real[:, None, :] & np.tril(np.ones((t, t), bool))
  cross_mask = tgt_real[:, :, None] & keys[:, None, :]
  return _reference(base, ids, src, tgt, *(jnp.asarray(m)[:, None] for m in (enc_mask, self_mask, cross_mask)))


@nnx.jit
def _reference(base, ids, src, tgt, enc_mask, self_mask, cross_mask):
  (b, s), t = src.shape, tgt.shape[1]
  x = jnp.concatenate([base.embed(jnp.broadcast_to(ids, (b, N))), base.embed(src)], 1)
  positions = jnp.concatenate([jnp.broadcast_to(jnp.arange(N), (b, N)), jnp.broadcast_to(jnp.arange(s), (b, s))], 1)
  encoded, _ = base.encoder(x, positions, enc_mask)
  h, _ = base.decoder(base.embed(tgt), jnp.broadcast_to(jnp.arange(t), (b, t)), self_mask, encoded=encoded,
                      cross_mask=cross_mask)
  return base.logits(h)


@pytest.mark.parametrize('position', ['relative', 'rope'])
def test_encoder_decoder_prompt_of_token_embeddings_equals_hand_built_reference(position):
  base, prompted = models('encoder_decoder', position)
  ids = rows(5, (N,))
  set_prompt_to_tokens(prompted, ids)
  src, tgt = rows(6, (2, 7)).at[1, 4:].set(0), rows(7, (2, 6)).at[0, 4:].set(0)
  got = np.asarray(call(prompted, (src, tgt), {}))
  want = np.asarray(hand_built_reference(base, ids, src, tgt, prompted.config.pad_id))
  real = np.asarray(tgt) != 0
  real[:, 0] = True
  np.testing.assert_allclose(got[real], want[real], atol=2e-5)
  encoded = jax.eval_shape(lambda: prompted.encode(src))
  assert encoded.shape == (2, N + 7, prompted.config.d_model)  # the prompt positions come back, first


@pytest.mark.parametrize('scan', [False, True])
def test_encoder_decoder_prompt_kv_cache_equals_the_full_forward_pass(scan):
  _, model = models('encoder_decoder', 'relative', scale=3.0, scan_layers=scan)
  src, tgt = rows(8, (2, 7)).at[1, 3:].set(0), rows(9, (2, 6))
  tgt = tgt.at[:, 0].set(1)
  full = np.asarray(call(model, (src, tgt), dict(tgt_segment_ids=jnp.ones_like(tgt))))
  cache = init_cache(model, 2, 8, src)
  assert cache['src_valid'].shape == (2, N + 7) and np.asarray(cache['src_valid'])[:, :N].all()
  steps, step = [], stepper(model)
  for i in range(6):
    logits, cache = step(model, tgt[:, i:i + 1], cache, jnp.ones((2, 1), bool))
    steps.append(np.asarray(logits))
  np.testing.assert_allclose(np.concatenate(steps, 1), full, atol=2e-5)
  got = decoding.greedy(model, src_tokens=src, max_new_tokens=6, eos_id=-1)
  want = decoding.greedy_without_cache(model, src_tokens=src, max_new_tokens=6, eos_id=-1)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


# ------------------------------------------------------------------------------------------------ scan_layers
@pytest.mark.parametrize('arch', ['decoder_only', 'encoder_only', 'encoder_decoder'])
def test_prompt_with_scanned_layers_equals_unrolled(arch):
  _, unrolled = models(arch, 'learned', scale=3.0)
  _, scanned = models(arch, 'learned', scale=3.0, scan_layers=True)
  nnx.update(scanned, layout_convert.convert_state(nnx.state(unrolled, nnx.Param), nnx.state(scanned, nnx.Param)))
  np.testing.assert_array_equal(np.asarray(prompt_of(scanned).embedding.get_value()),
                                np.asarray(prompt_of(unrolled).embedding.get_value()))
  x = rows(10, (2, 8)).at[1, 6:].set(0)
  args = (x, x[:, ::-1]) if arch == 'encoder_decoder' else (x,)
  got, want = np.asarray(call(scanned, args, {})), np.asarray(call(unrolled, args, {}))
  assert got.shape == want.shape == (2, 8, VOCAB)
  np.testing.assert_allclose(got, want, atol=2e-5)
