"""Prefix tuning (jaxformer/peft/prefix.py) against references that know nothing of it: a prefix equal to the keys /
values the base model caches for some tokens gives the base model's logits with those tokens in front (every
position kind, scanned or not); packed segments each see the prefix; KV-cache decoding equals the no-cache path with
every method (decoder_only and encoder_decoder); the reparameterisation MLP merges away; peft 0.21.2's adapters
(tests/fixtures/peft_prefix, made by make_fixtures.py there) give peft's logits."""
import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxformer import decoding, hf, peft, settings
from jaxformer.errors import ConfigError
from jaxformer.hf import weights
from jaxformer.model import build_model
from jaxformer.peft import prefix as prefix_lib
from jaxformer.settings import decode_settings
from tests.test_model import VOCAB, tiny_config

P = 3  # prefix tokens
FIXTURES = pathlib.Path(__file__).resolve().parent / 'fixtures'


def peft_section(n=P, projection=0):
  return settings.fill({'peft': {'method': 'prefix', 'num_prefix_tokens': n, 'prefix_projection': projection}}).peft


@functools.lru_cache(maxsize=None)
def _base(arch, position, overrides):
  return build_model(tiny_config(arch, position, **dict(overrides)), rngs=nnx.Rngs(params=0, dropout=1))


def models(arch='decoder_only', position='rope', *, projection=0, **overrides):
  """(base model, the same with a random prefix of P tokens in every self-attention layer)."""
  base = nnx.clone(_base(arch, position, tuple(sorted(overrides.items()))))
  prefixed = nnx.clone(base)
  peft.attach(prefixed, peft_section(projection=projection), nnx.Rngs(params=5))
  for stack in (getattr(prefixed, 'encoder', None), getattr(prefixed, 'decoder', None)):
    if stack is not None and stack.prefix.kv is not None:  # scaled up: the prefix must visibly matter
      stack.prefix.kv.set_value(stack.prefix.kv.get_value() * 5.0)
  return base, prefixed


@nnx.jit
def call(model, args, kwargs):
  return model(*args, **kwargs)


@functools.partial(nnx.jit, static_argnums=(2,))
def cached_keys_values(model, ids, num_layers):
  """The base model's per-layer cached keys/values of `ids` [1,P] -> [layers, 2, P, K, H] (keys already rotated)."""
  cache = model.init_cache(1, ids.shape[1])
  _, cache = model.decode_step(ids, cache)
  c = cache['self']
  if isinstance(c, dict):  # scanned: [B, layers, S, K, H]
    return jnp.stack([c['k'][0], c['v'][0]], 1)
  return jnp.stack([jnp.stack([layer['k'][0], layer['v'][0]]) for layer in c])


def rows(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).integers(5, VOCAB, size=shape), jnp.int32)


# ------------------------------------------------------------------------------------------------ numerics
@pytest.mark.parametrize('position,scan', [('rope', False), ('learned', True), ('relative', False)])
def test_prefix_of_cached_tokens_equals_those_tokens_in_front(position, scan):
  """The prefix is P cached slots in front: the tokens' positions start at P, RoPE is not re-applied to the prefix
  keys, T5's bias sees them at positions 0..P-1, and padding queries stay masked."""
  base, prefixed = models('decoder_only', position, scan_layers=scan)
  ids = rows(1, (1, P))
  prefixed.decoder.prefix.kv.set_value(cached_keys_values(base, ids, 2))
  x = rows(2, (2, 8))
  seg = jnp.ones((2, 8), jnp.int32).at[1, 6:].set(0)
  got = np.asarray(call(prefixed, (x,), dict(segment_ids=seg)))
  want = np.asarray(call(base, (jnp.concatenate([jnp.broadcast_to(ids, (2, P)), x], 1),),
                         dict(segment_ids=jnp.concatenate([jnp.ones((2, P), jnp.int32), seg], 1))))[:, P:]
  real = np.asarray(seg, bool)
  np.testing.assert_allclose(got[real], want[real], atol=2e-5)
  assert not np.allclose(got, np.asarray(call(base, (x,), dict(segment_ids=seg))), atol=1e-3)  # the prefix matters


@pytest.mark.parametrize('arch', ['decoder_only', 'encoder_only'])
def test_every_packed_segment_sees_the_prefix(arch):
  """A row packing two documents (segment ids 1, 2, positions restarting) gives each document's logits alone."""
  _, model = models(arch, 'rope')
  a, b = rows(3, (1, 5)), rows(4, (1, 3))
  packed = jnp.concatenate([a, b, jnp.zeros((1, 2), jnp.int32)], 1)
  seg = jnp.asarray([[1] * 5 + [2] * 3 + [0] * 2], jnp.int32)
  pos = jnp.asarray([list(range(5)) + list(range(3)) + [0, 0]], jnp.int32)
  got = np.asarray(call(model, (packed,), dict(segment_ids=seg, positions=pos)))
  np.testing.assert_allclose(got[0, :5], np.asarray(call(model, (a,), {}))[0], atol=2e-5)
  np.testing.assert_allclose(got[0, 5:8], np.asarray(call(model, (b,), {}))[0], atol=2e-5)


@pytest.mark.parametrize('scan', [False, True])
def test_decoder_prefix_decodes_with_every_method_as_without_cache(scan):
  base, model = models('decoder_only', 'rope', scan_layers=scan)
  prompt, lengths = np.asarray(rows(5, (2, 4))), np.array([4, 2], np.int32)
  greedy = decoding.greedy(model, prompt, max_new_tokens=5, prompt_lengths=lengths, eos_id=-1)
  want = decoding.greedy_without_cache(model, prompt, max_new_tokens=5, prompt_lengths=lengths, eos_id=-1)
  np.testing.assert_array_equal(np.asarray(greedy), np.asarray(want))
  assert not np.array_equal(np.asarray(greedy), np.asarray(decoding.greedy(
      base, prompt, max_new_tokens=5, prompt_lengths=lengths, eos_id=-1)))  # the prefix changes the output
  beam = decode_settings(method='beam', beam_size=3, length_penalty=0.0, max_len=5, eos_id=-1)
  beams, scores = decoding.beam_search(model, prompt[:, :3], settings=beam)
  # the best beam's score, recomputed without a cache (every token real: a generated 0 is no padding)
  seq = jnp.concatenate([jnp.asarray(prompt[:, :3]), beams[:, 0]], 1)
  log_probs = jax.nn.log_softmax(call(model, (seq,), dict(segment_ids=jnp.ones(seq.shape, jnp.int32)))[:, 2:-1], -1)
  want_scores = jnp.take_along_axis(log_probs, beams[:, 0][..., None], -1).sum((1, 2))
  np.testing.assert_allclose(np.asarray(scores[:, 0]), np.asarray(want_scores), rtol=1e-4, atol=1e-4)
  top1 = decode_settings(method='sample', temperature=1.0, top_k=1, max_len=5, eos_id=-1)
  np.testing.assert_array_equal(decoding.decode(model, top1, prompt[:, :3], rng=jax.random.key(0)),
                                decoding.greedy(model, prompt[:, :3], max_new_tokens=5, eos_id=-1))


def test_encoder_decoder_prefix_cache_equals_the_full_forward_pass():
  """Both stacks have prefixes (the decoder's cross-attention none): step-by-step decoding gives the forward pass's
  logits, and the encoder's prefix changes them."""
  _, model = models('encoder_decoder', 'relative')
  src, tgt = rows(6, (2, 5)), rows(7, (2, 6))
  full = np.asarray(call(model, (src, tgt), {}))
  step = nnx.jit(lambda m, t, c: m.decode_step(t, c))
  cache = nnx.jit(lambda m, s: m.init_cache(2, 6, src_tokens=s))(model, src)
  logits, cache = step(model, tgt[:, :3], cache)
  steps = [np.asarray(logits)]
  for i in range(3, 6):
    logits, cache = step(model, tgt[:, i:i + 1], cache)
    steps.append(np.asarray(logits))
  np.testing.assert_allclose(np.concatenate(steps, 1), full, atol=2e-5)
  no_encoder_prefix = nnx.clone(model)
  no_encoder_prefix.encoder.prefix.kv.set_value(jnp.zeros_like(model.encoder.prefix.kv.get_value()))
  assert not np.allclose(np.asarray(call(no_encoder_prefix, (src, tgt), {})), full, atol=1e-3)


def test_reparameterisation_mlp_merges_into_plain_prefixes():
  _, with_mlp = models('decoder_only', 'learned', projection=6)
  assert with_mlp.decoder.prefix.kv is None
  merged_state = prefix_lib.merge_projection(with_mlp)
  _, plain = models('decoder_only', 'learned')
  nnx.update(plain, merged_state)
  x = rows(8, (2, 7))
  np.testing.assert_allclose(np.asarray(call(plain, (x,), {})), np.asarray(call(with_mlp, (x,), {})), atol=1e-5)
  paths = lambda state: {path for path, _ in nnx.to_flat_state(state)}  # noqa: E731
  assert paths(merged_state) == paths(nnx.state(plain, nnx.Param))  # the MLP is gone, `kv` in its place


# ------------------------------------------------------------------------------------------------ peft interop
@functools.lru_cache(maxsize=None)
def _hf(name):
  return hf.load(str(FIXTURES / 'hf' / name))


@pytest.mark.parametrize('case,base', [('gpt2', 'gpt2'), ('llama', 'llama'), ('llama_mlp', 'llama')])
def test_peft_prefix_adapter_gives_peft_logits(case, base):
  """peft 0.21.2 + transformers 5.25: the adapter's prompt_embeddings (converted by from_peft) give the PeftModel's
  logits; llama_mlp's PrefixEncoder weights, run by our MLP, give the same (so its layout is peft's)."""
  directory = FIXTURES / 'peft_prefix' / case
  e = json.loads((directory / 'expected.json').read_text())
  section, model = _hf(base)
  n = json.loads((directory / 'adapter_config.json').read_text())['num_virtual_tokens']
  model = nnx.clone(model)
  peft.attach(model, peft_section(n), nnx.Rngs(params=0))
  prefix_lib.load_peft_adapter(str(directory), model)
  ids, mask = jnp.asarray(e['input_ids']), jnp.asarray(e['attention_mask'], jnp.int32)
  want, real = np.asarray(e['logits'], np.float32), np.asarray(mask, bool)
  got = np.asarray(call(model, (ids,), dict(segment_ids=mask)))[..., :want.shape[-1]]
  np.testing.assert_allclose(got[real], want[real], atol=2e-5, rtol=1e-5)
  if case.endswith('_mlp'):
    mlp = weights.read_file(str(directory / 'mlp.safetensors'))
    with_mlp = nnx.clone(_hf(base)[1])
    peft.attach(with_mlp, peft_section(n, projection=mlp['transform.0.bias'].shape[0]), nnx.Rngs(params=0))
    p = with_mlp.decoder.prefix
    for ours, theirs, transpose in [('embedding', 'embedding.weight', False), ('hidden', 'transform.0.weight', True),
                                    ('hidden_bias', 'transform.0.bias', False), ('out', 'transform.2.weight', True),
                                    ('out_bias', 'transform.2.bias', False)]:
      getattr(p, ours).set_value(jnp.asarray(mlp[theirs].T if transpose else mlp[theirs]))
    got = np.asarray(call(with_mlp, (ids,), dict(segment_ids=mask)))[..., :want.shape[-1]]
    np.testing.assert_allclose(got[real], want[real], atol=2e-5, rtol=1e-5)


def test_peft_adapter_of_another_shape_is_one_clear_error():
  section, model = _hf('gpt2')
  model = nnx.clone(model)
  peft.attach(model, peft_section(5), nnx.Rngs(params=0))
  with pytest.raises(ConfigError, match='num_virtual_tokens=4.*peft.num_prefix_tokens=4'):
    prefix_lib.load_peft_adapter(str(FIXTURES / 'peft_prefix' / 'gpt2'), model)
  with pytest.raises(ConfigError, match='another model'):
    prefix_lib.from_peft(np.zeros((4, 96)), num_layers=2, kv_heads=4, head_dim=8)
