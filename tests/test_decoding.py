"""Decoding: greedy / beam / sampling over the KV cache.

Most tests use a tiny hand-written "bigram" model that implements the model's decoding contract
(encode / init_cache / decode_step) with logits read from a fixed table, so the right answer is known exactly
(and a model where greedy is suboptimal is easy to build). The real-model tests compare the cached decode against
repeated full forward passes.
"""
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxformer import decoding
from jaxformer.settings import decode_settings

V = 6  # 0 pad, 1 bos, 2 eos, 3..5 symbols


class Bigram(nnx.Module):
  """Next-token logits depend only on the current token (a [V, V] table); encoder_decoder adds a bias row chosen
  by the first source token. The cache holds the per-row position (batch-leading, as the contract asks)."""

  def __init__(self, table, src_bias=None):
    self.table = nnx.Param(jnp.asarray(table, jnp.float32))
    self.src_bias = None if src_bias is None else nnx.Param(jnp.asarray(src_bias, jnp.float32))

  def encode(self, src_tokens, *, src_positions=None, src_segment_ids=None):
    return jax.nn.one_hot(src_tokens, self.table.shape[0])

  def init_cache(self, batch_size, max_len, *, encoded=None, src_tokens=None):
    cache = {'index': jnp.zeros((batch_size,), jnp.int32)}
    if encoded is not None:
      cache['src0'] = jnp.argmax(encoded[:, 0], axis=-1)
    return cache

  def _logits(self, tokens, src0):
    out = self.table[...][tokens]
    if src0 is not None:
      out = out + self.src_bias[...][src0][:, None]
    return out

  def decode_step(self, tokens, cache, *, valid=None):
    return self._logits(tokens, cache.get('src0')), dict(cache, index=cache['index'] + tokens.shape[1])

  def __call__(self, *args, **kwargs):
    if len(args) == 2:
      return self._logits(args[1], args[0][:, 0])
    return self._logits(args[0], None)


def trap_table():
  """From BOS, token 3 is likelier than 4, but 3 leads to a spread-out future and 4 almost surely to EOS."""
  p = np.full((V, V), 1e-9)
  p[1, 3], p[1, 4] = 0.55, 0.45
  p[3, 5], p[3, 3], p[3, 4], p[3, 2] = 0.3, 0.25, 0.25, 0.2
  p[4, 2], p[4, 3] = 0.95, 0.05
  p[5, 2], p[5, 3] = 0.9, 0.1
  p[2, 2] = p[0, 2] = 1.0
  return np.log(p / p.sum(-1, keepdims=True))


def random_table(seed, scale=3.0):
  t = np.random.default_rng(seed).normal(size=(V, V)) * scale
  t[:, 0] = t[:, 1] = -30.0  # never pad / bos
  return t


def seq_logprob(table, prompt_last, tokens):
  """Sum of log-probs of tokens (up to and including the first EOS) under the bigram table; and that length."""
  logp = np.asarray(jax.nn.log_softmax(jnp.asarray(table, jnp.float32), axis=-1), np.float64)
  total, prev = 0.0, prompt_last
  for n, tok in enumerate(tokens, 1):
    total += logp[prev, tok]
    if tok == decoding.EOS_ID:
      return total, n
    prev = tok
  return total, len(tokens)


def penalised(score, length, alpha):
  return score / ((5 + length) / 6) ** alpha


def test_greedy_on_table_model_matches_the_argmax_chain_and_stops_at_eos():
  model = Bigram(trap_table())
  out = decoding.greedy(model, np.ones((2, 1), np.int32), max_new_tokens=5)
  np.testing.assert_array_equal(np.asarray(out), [[3, 5, 2, 0, 0]] * 2)
  np.testing.assert_array_equal(np.asarray(decoding.greedy_without_cache(model, np.ones((2, 1)), max_new_tokens=5)),
                                np.asarray(out))


@pytest.mark.parametrize('alpha', [0.0, 0.6, 1.0])
def test_beam_search_finds_the_better_sequence_where_greedy_does_not(alpha):
  table, max_new = trap_table(), 4
  model = Bigram(table)
  prompt = np.ones((1, 1), np.int32)
  greedy = np.asarray(decoding.greedy(model, prompt, max_new_tokens=max_new))[0]
  settings = decode_settings(method='beam', beam_size=3, length_penalty=alpha, max_len=max_new)
  beams, scores = decoding.beam_search(model, prompt, settings=settings)
  best = list(np.asarray(beams)[0, 0])

  # Exhaustive search over every continuation: EOS-terminated within max_new tokens, or max_new without EOS.
  candidates = []
  for n in range(1, max_new + 1):
    for body in itertools.product([3, 4, 5], repeat=n - 1):
      seq = list(body) + [decoding.EOS_ID]
      lp, length = seq_logprob(table, 1, seq)
      candidates.append((penalised(lp, length, alpha), seq))
  for seq in itertools.product([3, 4, 5], repeat=max_new):  # ran out of room: finished at the budget, truncated
    candidates.append((penalised(*seq_logprob(table, 1, list(seq)), alpha), list(seq)))
  best_score, best_seq = max(candidates)
  greedy_score = penalised(*seq_logprob(table, 1, list(greedy)), alpha)

  assert best_seq == [4, 2]
  assert best[:len(best_seq)] == best_seq and not any(best[len(best_seq):])
  assert float(scores[0, 0]) == pytest.approx(best_score, abs=1e-4)
  assert greedy_score < best_score - 0.1  # greedy really is suboptimal here
  # Beams come sorted, and each reported score is the penalised log-prob of its own sequence.
  s = np.asarray(scores)[0]
  assert np.all(np.diff(s) <= 1e-6)
  for k in range(settings.beam_size):
    seq = list(np.asarray(beams)[0, k])
    assert s[k] == pytest.approx(penalised(*seq_logprob(table, 1, seq), alpha), abs=1e-4)


def test_beam_search_and_greedy_stop_early_once_the_result_is_settled():
  calls = []

  class Counting(Bigram):
    def decode_step(self, tokens, cache, *, valid=None):
      jax.debug.callback(lambda: calls.append(1))
      return super().decode_step(tokens, cache, valid=valid)

  model = Counting(trap_table())
  settings = decode_settings(method='beam', beam_size=2, length_penalty=0.0, max_len=50)
  beams, _ = decoding.beam_search(model, np.ones((1, 1), np.int32), settings=settings)
  assert list(np.asarray(beams)[0, 0, :3]) == [4, 2, 0]
  # prefill + a few steps: both beams' best continuations are finished and no alive beam can beat them.
  assert len(calls) < 8
  calls.clear()
  decoding.greedy(model, np.ones((1, 1), np.int32), max_new_tokens=50)
  assert len(calls) == 4  # prefill + one step per token until EOS (3 tokens)


def test_beam_search_with_one_beam_equals_greedy():
  # alpha = 0: with a length penalty a beam of 1 may legitimately prefer a longer sequence that greedy stopped short of.
  for seed in range(3):
    model = Bigram(random_table(seed, scale=1.0))
    prompt, lengths = decoding.pad_prompts([[1], [1, 3], [1, 5, 4, 3]])
    greedy = decoding.greedy(model, prompt, prompt_lengths=lengths, max_new_tokens=7)
    settings = decode_settings(method='beam', beam_size=1, length_penalty=0.0, max_len=7)
    beams, _ = decoding.beam_search(model, prompt, prompt_lengths=lengths, settings=settings)
    np.testing.assert_array_equal(np.asarray(beams)[:, 0], np.asarray(greedy))


def test_beam_search_without_any_eos_returns_the_best_alive_beam():
  table = random_table(3)
  table[:, 2] = -30.0  # EOS is never chosen
  model = Bigram(table)
  settings = decode_settings(method='beam', beam_size=4, length_penalty=0.6, max_len=3)
  beams, scores = decoding.beam_search(model, np.ones((1, 1), np.int32), settings=settings)
  logp = np.asarray(jax.nn.log_softmax(jnp.asarray(table, jnp.float32)), np.float64)
  best = max(itertools.product([3, 4, 5], repeat=3),
             key=lambda s: logp[1, s[0]] + logp[s[0], s[1]] + logp[s[1], s[2]])
  assert tuple(np.asarray(beams)[0, 0]) == best
  assert float(scores[0, 0]) < 0


def test_variable_length_prompts_decode_like_single_prompts():
  model = Bigram(random_table(4, scale=1.0))
  prompts = [[1, 4], [1], [1, 3, 5, 4]]
  tokens, lengths = decoding.pad_prompts(prompts)
  beam = decode_settings(method='beam', beam_size=2, length_penalty=0.6, max_len=5)
  batched_greedy = np.asarray(decoding.greedy(model, tokens, prompt_lengths=lengths, max_new_tokens=5))
  batched_beam = np.asarray(decoding.beam_search(model, tokens, prompt_lengths=lengths, settings=beam)[0])[:, 0]
  for row, prompt in enumerate(prompts):
    one = np.asarray([prompt], np.int32)
    np.testing.assert_array_equal(batched_greedy[row], np.asarray(decoding.greedy(model, one, max_new_tokens=5))[0])
    np.testing.assert_array_equal(batched_beam[row], np.asarray(decoding.beam_search(model, one, settings=beam)[0])[0, 0])


def test_top_k_one_and_zero_temperature_equal_greedy():
  model = Bigram(random_table(5, scale=1.0))
  prompt = np.array([[1], [1], [1], [1]], np.int32)
  greedy = np.asarray(decoding.greedy(model, prompt, max_new_tokens=8))
  for settings in [decode_settings(method='sample', temperature=1.0, top_k=1, max_len=8),
                   decode_settings(method='sample', temperature=1e-6, max_len=8),
                   decode_settings(method='sample', temperature=0.0, max_len=8)]:
    for seed in range(2):
      out = decoding.sample(model, prompt, jax.random.key(seed), settings=settings)
      np.testing.assert_array_equal(np.asarray(out), greedy)
  # ... while plain sampling from the same (flat-ish) model does differ from greedy.
  plain = decode_settings(method='sample', temperature=1.0, max_len=8)
  assert not np.array_equal(np.asarray(decoding.sample(model, prompt, jax.random.key(0), settings=plain)), greedy)


def test_top_p_never_leaves_the_nucleus():
  sample_logits = jax.jit(decoding.sample_logits, static_argnames=('temperature', 'top_k', 'top_p'))
  probs = np.array([0.0, 0.0, 0.05, 0.4, 0.3, 0.15, 0.1])
  logits = jnp.log(jnp.asarray(probs) + 1e-12).astype(jnp.float32)
  n = 20000
  draws = np.asarray(sample_logits(jax.random.key(0), jnp.broadcast_to(logits, (n, 7)), top_p=0.75))
  # Sorted: 0.4, 0.3 (mass before = 0.4 < 0.75 -> in), 0.15 (mass before 0.7 < 0.75 -> in), 0.1 (0.85 -> out).
  nucleus = {3, 4, 5}
  assert set(np.unique(draws)) == nucleus
  freq = np.bincount(draws, minlength=7) / n
  np.testing.assert_allclose(freq[[3, 4, 5]], probs[[3, 4, 5]] / 0.85, atol=0.015)
  # top_p combined with top_k: top_k=2 leaves {3, 4}; the nucleus of that (0.4/0.7 = 0.57 < 0.75) keeps both.
  draws = np.asarray(sample_logits(jax.random.key(1), jnp.broadcast_to(logits, (n, 7)), top_k=2, top_p=0.75))
  assert set(np.unique(draws)) == {3, 4}
  # A tiny top_p keeps only the most likely token.
  draws = np.asarray(sample_logits(jax.random.key(2), jnp.broadcast_to(logits, (1000, 7)), top_p=0.01))
  assert set(np.unique(draws)) == {3}


def test_top_p_inside_the_decode_loop_stays_in_each_steps_nucleus():
  table = random_table(6, scale=1.5)
  model = Bigram(table)
  settings = decode_settings(method='sample', temperature=1.0, top_p=0.6, max_len=6)
  out = np.asarray(decoding.sample(model, np.ones((256, 1), np.int32), jax.random.key(7), settings=settings))
  probs = np.asarray(jax.nn.softmax(jnp.asarray(table, jnp.float32)))
  for prev in range(V):
    order = np.argsort(-probs[prev])
    before = np.cumsum(probs[prev][order]) - probs[prev][order]
    nucleus = set(order[before < 0.6])
    prevs = np.concatenate([np.ones((256, 1), int), out[:, :-1]], axis=1)
    emitted = set(out[(prevs == prev) & (out != 0)])
    assert emitted <= nucleus, (prev, emitted, nucleus)


def test_sampling_is_reproducible_for_a_key():
  model = Bigram(random_table(8, scale=0.5))
  settings = decode_settings(method='sample', temperature=1.0, top_k=4, top_p=0.9, max_len=10)
  prompt = np.ones((8, 1), np.int32)
  a = np.asarray(decoding.sample(model, prompt, jax.random.key(42), settings=settings))
  b = np.asarray(decoding.sample(model, prompt, jax.random.key(42), settings=settings))
  c = np.asarray(decoding.sample(model, prompt, jax.random.key(43), settings=settings))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  with pytest.raises(ValueError, match='PRNG key'):
    decoding.sample(model, prompt, None, settings=settings)


def test_encoder_decoder_path_uses_the_source():
  table = random_table(9, scale=0.5)
  bias = np.zeros((V, V))
  bias[3, 4] = bias[4, 5] = 50.0  # source starting with 3 -> always emit 4; with 4 -> always 5
  model = Bigram(table, bias)
  src = np.array([[3, 5, 2], [4, 3, 2]], np.int32)
  out = np.asarray(decoding.greedy(model, None, src_tokens=src, max_new_tokens=3))
  np.testing.assert_array_equal(out, [[4, 4, 4], [5, 5, 5]])
  np.testing.assert_array_equal(
      np.asarray(decoding.greedy_without_cache(model, None, src_tokens=src, max_new_tokens=3)), out)
  settings = decode_settings(method='beam', beam_size=2, max_len=3)
  np.testing.assert_array_equal(decoding.decode(model, settings, src_tokens=src), out)


def test_decode_on_a_mesh_with_padded_batch_equals_unsharded():
  devices = np.array(jax.devices()[:4])
  mesh = jax.sharding.Mesh(devices, ('data',))
  model = Bigram(random_table(10, scale=1.0))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  prompts, lengths = decoding.pad_prompts([[1], [1, 3], [1, 4, 4], [1], [1, 5], [1]])  # 6 rows on 4 devices
  for settings in [decode_settings(method='greedy', max_len=5),
                   decode_settings(method='beam', beam_size=3, max_len=5),
                   decode_settings(method='sample', top_k=3, max_len=5)]:
    ref = decoding.decode(model, settings, prompts, prompt_lengths=lengths, rng=jax.random.key(0))
    got = decoding.decode(model, settings, prompts, prompt_lengths=lengths, rng=jax.random.key(0),
                          batch_sharding=sharding)
    assert got.shape == (6, 5)
    np.testing.assert_array_equal(got, ref)


def test_decode_caps_new_tokens_at_model_max_len():
  model = Bigram(random_table(11))
  out = decoding.decode(model, decode_settings(max_len=50), np.ones((1, 3), np.int32), model_max_len=8)
  assert out.shape == (1, 5)
  with pytest.raises(ValueError, match='model.max_len'):
    decoding.decode(model, decode_settings(max_len=5), np.ones((1, 8), np.int32), model_max_len=8)


def test_settings_from_config():
  from configs import default
  config = default.get_config()
  config.decode.update(method='beam', beam_size=3, length_penalty=1.0)
  s = decoding.DecodeSettings.from_config(config.decode, max_len=9)
  assert (s.method, s.beam_size, s.length_penalty, s.max_len) == ('beam', 3, 1.0, 9)
  assert math.isclose(float(decoding.brevity_penalty(3, 0.6)), (8 / 6) ** 0.6, rel_tol=1e-6)


# ------------------------------------------------------------------------------------------- the real model
def tiny_model(arch, position='rope', seed=0, **overrides):
  from configs import default
  from jaxformer.model import build_model
  config = default.get_config()
  config.model.update(arch=arch, position=position, num_layers=1, num_heads=2, d_model=32, d_ff=64, vocab_size=17,
                      max_len=24, init_std=0.3, **overrides)
  model = build_model(config.model, rngs=nnx.Rngs(params=seed, dropout=seed))
  if config.model.scan_layers:  # the unrolled model's weights (the seed draws others in the scanned layout), so
    from jaxformer.model import layout_convert  # properties of these particular weights hold in either layout
    unrolled = config.model.copy_and_resolve_references()
    unrolled.scan_layers = False
    weights = nnx.state(build_model(unrolled, rngs=nnx.Rngs(params=seed, dropout=seed)), nnx.Param)
    nnx.update(model, layout_convert.convert_state(weights, nnx.state(model, nnx.Param)))
  return model


def make_forward(model):
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, tokens, src):
    """Every decoder token is real, whatever its id (decoding's rule, as Hugging Face's generate)."""
    m = nnx.merge(graphdef, state)
    real = jnp.ones_like(tokens)
    return m(src, tokens, tgt_segment_ids=real) if src is not None else m(tokens, segment_ids=real)

  return lambda tokens, src=None: np.asarray(forward(state, jnp.asarray(tokens), src))


def full_forward_greedy(model, prompts, steps, src=None):
  """The reference: re-run the whole model on each row's sequence so far; take the argmax at its last position.

  Rows sit in a fixed zero-padded buffer so one jit serves every step; the causal mask keeps the padding after a
  row's last token from touching it. No cache anywhere.
  """
  forward = make_forward(model)
  src = None if src is None else jnp.asarray(src, jnp.int32)
  buf = np.zeros((len(prompts), max(map(len, prompts)) + steps), np.int32)
  for row, prompt in enumerate(prompts):
    buf[row, :len(prompt)] = prompt
  pos = [len(p) for p in prompts]
  out = np.zeros((len(prompts), steps), np.int32)
  done = [False] * len(prompts)
  for step in range(steps):
    logits = forward(buf, src)
    for row in range(len(prompts)):
      if not done[row]:
        out[row, step] = buf[row, pos[row]] = int(np.argmax(logits[row, pos[row] - 1]))
        pos[row] += 1
        done[row] = out[row, step] == decoding.EOS_ID
  return out


def test_greedy_with_cache_equals_repeated_full_forward_decoder_only():
  # Learned (absolute) positions: a row whose prompt is shorter than the batch's longest must still see its own
  # positions 0, 1, 2, ... (a relative encoding such as rope would hide a constant shift).
  model = tiny_model('decoder_only', position='learned')
  prompts = [[1, 7, 9, 5], [1, 11], [1, 6, 8]]  # different lengths: the batched run pads and forces
  tokens, lengths = decoding.pad_prompts(prompts)
  steps = 10
  got = np.asarray(decoding.greedy(model, tokens, prompt_lengths=lengths, max_new_tokens=steps))
  np.testing.assert_array_equal(got, full_forward_greedy(model, prompts, steps))
  assert len(set(got[:, 0])) > 1 or len(set(got[:, 1])) > 1  # not a degenerate constant output
  # beam of 1 (alpha 0) and top-k 1 sampling are greedy too, on the real model
  beam = decode_settings(method='beam', beam_size=1, length_penalty=0.0, max_len=steps)
  np.testing.assert_array_equal(
      np.asarray(decoding.beam_search(model, tokens, prompt_lengths=lengths, settings=beam)[0])[:, 0], got)
  topk = decode_settings(method='sample', top_k=1, max_len=steps)
  np.testing.assert_array_equal(
      np.asarray(decoding.sample(model, tokens, jax.random.key(3), prompt_lengths=lengths, settings=topk)), got)


def test_greedy_with_cache_equals_repeated_full_forward_encoder_decoder():
  model = tiny_model('encoder_decoder', position='rope', num_kv_heads=1)
  src = np.asarray([[5, 9, 12, 7, 2], [8, 6, 2, 0, 0]], np.int32)  # a padded source row: padding must be masked
  steps = 8
  got = np.asarray(decoding.greedy(model, None, src_tokens=src, max_new_tokens=steps))
  np.testing.assert_array_equal(got, full_forward_greedy(model, [[decoding.BOS_ID]] * 2, steps, src=src))
  # A real beam never scores below greedy's own sequence (alpha 0: scores are plain log-probs).
  wide = decode_settings(method='beam', beam_size=4, length_penalty=0.0, max_len=steps)
  _, scores = decoding.beam_search(model, None, src_tokens=src, settings=wide)
  tgt = np.concatenate([np.ones((2, 1), np.int32), got], axis=1)
  logp = np.asarray(jax.nn.log_softmax(make_forward(model)(tgt, src), axis=-1))
  for row in range(2):
    greedy_lp = sum(logp[row, i, t] for i, t in enumerate(got[row]) if t)
    assert float(scores[row, 0]) >= greedy_lp - 1e-4
