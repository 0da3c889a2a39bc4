"""Context parallelism (mesh.sequence): activations split along their length, attention gathering keys / values.

On the 8 virtual CPU devices (conftest.py): a data x sequence (x tensor) train step equals the one-device step (loss,
gradient norm, updated parameters), the batch and the activations really are split along the length, greedy decoding
with the KV cache gives the one-device tokens, the chunked kernel is exact on a slice of the queries
(SegmentMask.q_offset, what each device runs), and train.py takes --config.mesh.sequence (bad lengths: one line).
"""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import gpt_tiny
from jaxformer import decoding
from jaxformer import sharding as shd
from jaxformer.model import attention
from jaxformer.training import optimizer, step
from jaxformer.training import state as state_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ_LEN = 16


def tiny_config(*, impl='xla', window=0, scan=False, **mesh):
  config = gpt_tiny.get_config()
  config.model.update(vocab_size=64, d_model=32, num_heads=4, num_kv_heads=2, d_ff=64, num_layers=1, max_len=32,
                      attention_impl=impl, sliding_window=window, position='rope')
  if scan:
    config.model.update(scan_layers=True, remat='full')
  config.data.seq_len = SEQ_LEN
  config.train.update(batch_size=4, warmup_steps=0, learning_rate=1e-2)
  config.mesh.update(data=1, fsdp=1, sequence=1, tensor=1)
  config.mesh.update(**mesh)
  return config


def packed_batch(batch_size=4, seq_len=SEQ_LEN, vocab=64, seed=0):
  """Two documents per row with their own positions (packing), padding at the end of some rows: the segment /
  position bookkeeping that must survive a length split across devices."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, vocab, size=(batch_size, seq_len + 1)).astype(np.int32)
  inputs, targets = tokens[:, :-1].copy(), tokens[:, 1:].copy()
  cut = 5  # the second document starts inside device 1's piece of the length (4 tokens each at sequence=4)
  segment_ids = np.ones((batch_size, seq_len), np.int32)
  segment_ids[:, cut:] = 2
  positions = np.concatenate([np.arange(cut), np.arange(seq_len - cut)]).astype(np.int32)[None].repeat(batch_size, 0)
  targets[:, cut - 1] = 0
  inputs[0, -3:] = targets[0, -3:] = segment_ids[0, -3:] = positions[0, -3:] = 0
  return {'tokens': inputs, 'targets': targets, 'segment_ids': segment_ids, 'positions': positions}


def setup_for(config):
  mesh = shd.make_mesh(config)
  tx, schedule = optimizer.make_optimizer(config.train)
  setup = state_lib.make_setup(config, mesh, tx, schedule)
  return setup, state_lib.initial_state(config, setup)


def run_steps(config, steps=2):
  """-> per-step (loss, grad_norm), the final params (numpy), the sharded batch, whether context-parallel
  attention was traced."""
  setup, state = setup_for(config)
  calls = []
  real = attention.context_parallel_attention

  def spy(*args, **kwargs):
    calls.append(args[4])  # the mesh axes
    return real(*args, **kwargs)

  attention.context_parallel_attention = spy
  try:
    fn = step.make_train_step(config, setup)
    metrics = []
    for _ in range(steps):
      batch = shd.shard_batch(packed_batch(), setup.mesh, setup.rules)
      state, m = fn(state, batch)
      metrics.append((float(m['loss']), float(m['grad_norm'])))
  finally:
    attention.context_parallel_attention = real
  return metrics, jax.tree.map(np.asarray, state['params']), batch, calls


@pytest.mark.parametrize('impl,window,scan,mesh', [
    ('xla', 0, False, {'data': 2, 'sequence': 4}),
    ('chunked', 6, True, {'data': 2, 'sequence': 2, 'tensor': 2}),  # sliding window, scan_layers, remat
], ids=['xla-data2xseq4', 'chunked-window-scan-data2xseq2xtensor2'])
def test_sequence_sharded_step_equals_one_device(impl, window, scan, mesh):
  one, one_params, _, one_calls = run_steps(tiny_config(impl=impl, window=window, scan=scan))
  many, many_params, batch, many_calls = run_steps(tiny_config(impl=impl, window=window, scan=scan, **mesh))
  assert not one_calls and many_calls and set(many_calls) == {('sequence',)}  # the all-gather path really ran
  # the inputs are split along the length over 'sequence' (and the rows over 'data')
  assert batch['tokens'].sharding.spec[1] == 'sequence'
  shard = batch['tokens'].addressable_shards[0].data.shape
  assert shard == (4 // mesh['data'], SEQ_LEN // mesh['sequence'])
  for (l1, g1), (l8, g8) in zip(one, many):
    np.testing.assert_allclose(l1, l8, rtol=1e-6)
    np.testing.assert_allclose(g1, g8, rtol=1e-5)
  assert one[1][0] < one[0][0]  # it learned something: the comparison is not between two untouched models
  # Adam's first steps move each weight by ~lr * sign(g): the tolerance is 1% of one update (as test_sharding.py)
  for a, b in zip(jax.tree.leaves(one_params), jax.tree.leaves(many_params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
  assert np.mean([np.mean(np.abs(a - b)) for a, b in zip(jax.tree.leaves(one_params),
                                                         jax.tree.leaves(many_params))]) < 1e-6


def _model_on(config):
  """The seeded model with its parameters placed on config's mesh by the rules (the unsharded one for a 1 mesh)."""
  mesh, rules = shd.make_mesh(config), shd.rules_from_config(config)
  model = state_lib.build_model(config)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  params = jax.device_put(params, shd.state_shardings(params, mesh, rules))
  return nnx.merge(graphdef, params, rest), mesh, rules


def test_activations_split_along_length_and_greedy_decoding_matches_one_device():
  config = tiny_config(data=2, sequence=4)
  model, mesh, rules = _model_on(config)
  one_model, _, _ = _model_on(tiny_config())
  batch = packed_batch()
  inputs = {k: batch[k] for k in ('tokens', 'segment_ids', 'positions')}
  with shd.mesh_context(mesh, rules):
    logits = nnx.jit(lambda m, b: m(**b))(model, shd.shard_batch(inputs, mesh, rules))
  assert logits.sharding.spec[1] == 'sequence'  # the residual stream's constraint splits the length
  assert logits.addressable_shards[0].data.shape == (2, SEQ_LEN // 4, 64)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(one_model(**inputs)), atol=2e-5)

  # greedy with the KV cache: prompts of 8 (ragged: rows of 8 and 5 real tokens), 6 new tokens each. The prefill's
  # activations are split along the length by the same constraints; one-token steps are not split (1 % 4 != 0).
  prompts = np.random.default_rng(1).integers(3, 64, size=(4, 8)).astype(np.int32)
  lengths = np.array([8, 5, 8, 5], np.int32)
  prompts[1, 5:] = prompts[3, 5:] = 0
  want = np.asarray(decoding.greedy(one_model, prompts, prompt_lengths=lengths, max_new_tokens=6))
  with shd.mesh_context(mesh, rules):
    sharded = shd.shard_batch({'p': prompts}, mesh, rules)['p']
    assert sharded.sharding.spec[1] == 'sequence'
    got = np.asarray(decoding.greedy(model, sharded, prompt_lengths=lengths, max_new_tokens=6))
  np.testing.assert_array_equal(got, want)


def test_encoder_decoder_with_relative_bias_on_a_sequence_mesh():
  """Both stacks and the cross-attention split along their own lengths (source 16, target 8), T5's relative bias
  split by query rows, padded source rows: the logits of one device."""
  config = tiny_config(impl='chunked', data=2, sequence=4)
  one_config = tiny_config(impl='chunked')
  for c in (config, one_config):
    c.model.update(arch='encoder_decoder', position='relative')
  model, mesh, rules = _model_on(config)
  one_model, _, _ = _model_on(one_config)
  rng = np.random.default_rng(2)
  batch = {'src_tokens': rng.integers(3, 64, (4, 16)).astype(np.int32),
           'tgt_tokens': rng.integers(3, 64, (4, 8)).astype(np.int32)}
  batch['src_tokens'][0, -5:] = 0
  calls = []
  real = attention.context_parallel_attention

  def spy(*args, **kwargs):
    calls.append(args[4])
    return real(*args, **kwargs)

  attention.context_parallel_attention = spy
  try:
    with shd.mesh_context(mesh, rules):
      logits = nnx.jit(lambda m, b: m(**b))(model, shd.shard_batch(batch, mesh, rules))
  finally:
    attention.context_parallel_attention = real
  assert len(calls) == 3  # encoder self-attention, decoder self- and cross-attention
  assert logits.sharding.spec[1] == 'sequence'
  want = one_model(**{k: jnp.asarray(v) for k, v in batch.items()})
  np.testing.assert_allclose(np.asarray(logits), np.asarray(want), atol=2e-5)


@pytest.mark.parametrize('window', [None, 5])
def test_chunked_kernel_on_a_slice_of_the_queries(window):
  """What each device computes: queries [o, o + t) against all keys, causal and windowed by absolute index
  (SegmentMask.q_offset), with blocks small enough that the diagonal / window block ranges are exercised."""
  b, t_all, n, kvh, h, o, t = 2, 16, 4, 2, 8, 8, 4
  kq, kk, kv, kw = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(kq, (b, t_all, n, h))
  k, v = jax.random.normal(kk, (b, t_all, kvh, h)), jax.random.normal(kv, (b, t_all, kvh, h))
  seg = jnp.asarray(np.repeat([[1] * 6 + [2] * 8 + [0] * 2], b, 0), jnp.int32)
  w = jax.random.normal(kw, (b, t, n, h))

  def full(q, k, v):
    mask = attention.SegmentMask(seg, seg, True, window).dense()
    return (attention.reference_attention(q, k, v, mask)[:, o:o + t] * w).sum()

  def piece(q, k, v):
    mask = attention.SegmentMask(seg[:, o:o + t], seg, True, window, jnp.int32(o))
    return (attention.chunked_attention(q[:, o:o + t], k, v, mask, block_q=2, block_kv=2) * w).sum()

  want, got = jax.value_and_grad(full, (0, 1, 2))(q, k, v), jax.value_and_grad(piece, (0, 1, 2))(q, k, v)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  for g, r in zip(got[1], want[1]):
    np.testing.assert_allclose(g, r, atol=1e-5)
  assert float(jnp.abs(want[1][1]).max()) > 0  # keys before the slice get gradient through it


def _train(tmp_path, *args):
  return subprocess.run(
      [sys.executable, 'train.py', '--config=configs/gpt_tiny.py', f'--workdir={tmp_path}',
       '--config.model.num_layers=1', '--config.model.d_model=32', '--config.model.d_ff=64',
       '--config.train.num_steps=2', '--config.train.eval_every=2', '--config.train.eval_steps=1',
       '--config.train.log_every=1', '--config.checkpoint.every_steps=2', *args],
      cwd=REPO, capture_output=True, text=True, timeout=600,
      env={**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': '--xla_force_host_platform_device_count=8'})


def test_train_py_on_a_data_x_sequence_mesh(tmp_path):
  out = _train(tmp_path / 'ok', '--config.mesh.data=2', '--config.mesh.sequence=4', '--config.data.seq_len=32')
  assert out.returncode == 0, out.stderr[-3000:]
  assert os.path.exists(tmp_path / 'ok' / 'metrics.jsonl')
  bad = _train(tmp_path / 'bad', '--config.mesh.data=2', '--config.mesh.sequence=4', '--config.data.seq_len=30')
  lines = [line for line in bad.stderr.splitlines() if line.strip()]
  assert bad.returncode == 2 and len(lines) == 1 and 'Traceback' not in bad.stderr, bad.stderr
  assert lines[0] == ('error: data.seq_len=30 is not divisible by mesh.sequence=4 (context parallelism splits each '
                      'row into 4 equal pieces); use a multiple of 4, or another mesh.sequence.'), lines[0]
