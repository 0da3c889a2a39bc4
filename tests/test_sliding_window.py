"""Sliding-window attention (model.sliding_window, model.sliding_window_pattern): the mask against its definition,
packed rows (and the chunked kernel's lazy mask), scanned stacks, ring-buffer decoding against the full forward
pass, and the Hugging Face import / export of Mistral's and Qwen2's windows. The fixtures mistral_window and
qwen2_window are compared with transformers' logits, greedy tokens and export round trip in test_hf.py with the
other fixtures; the chunked kernel's gradients with a window in test_gemma.py (with soft-capping).

Query t attends key s iff s <= t and t - s < W (transformers' sliding_window_overlay: kv_idx > q_idx - W).
"""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import default
from jaxformer import decoding, hf
from jaxformer.config import ConfigError
from jaxformer.model import build_model
from jaxformer.model.attention import SegmentMask, with_window
from jaxformer.model.config import ModelConfig, validate_model
from test_hf import FIXTURES

SEG = jnp.array([[1] * 5 + [2] * 6 + [0] * 2, [1] * 11 + [0] * 2])  # a packed row with padding; a padded row


def test_window_mask_is_the_definition():
  """Within a segment (positions restart), s <= t and t - s < W; across segments and on padding nothing."""
  w = 3
  got = np.asarray(with_window(SegmentMask(SEG, SEG, True), w).dense())[:, 0]
  seg = np.asarray(SEG)
  t = np.arange(seg.shape[1])
  want = ((seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] != 0) & (t[None, :, None] >= t[None, None, :])
          & (t[None, :, None] - t[None, None, :] < w))
  np.testing.assert_array_equal(got, want)
  dense = with_window(SegmentMask(SEG, SEG, True).dense(), w)  # the dense form narrows the same way
  np.testing.assert_array_equal(np.asarray(dense)[:, 0], want)
  assert got[0, 7].tolist() == [False] * 5 + [True, True, True] + [False] * 5  # segment 2 starts at index 5


def section(**overrides):
  model = default.get_config().model
  model.update(position='rope', norm='rms', mlp='swiglu', use_bias=False, num_layers=3, num_heads=4, num_kv_heads=2,
               d_model=32, d_ff=48, vocab_size=53, max_len=40, pad_id=-1, init_std=0.3, sliding_window=4)
  model.update(overrides)
  return model


_MODELS = {}


@nnx.jit
def forward(model, tokens, segment_ids=None, positions=None):
  """One compiled call (eagerly, the chunked kernel's loops would be traced op by op)."""
  return model(tokens, segment_ids=segment_ids, positions=positions)


def model_of(**overrides):
  key = tuple(sorted(overrides.items()))
  if key not in _MODELS:
    _MODELS[key] = build_model(section(**overrides), rngs=nnx.Rngs(params=0, dropout=1))
  return _MODELS[key]


def test_layer_windows_repeat_the_pattern():
  cfg = ModelConfig.from_config(section(num_layers=5, sliding_window_pattern='LG'))
  assert cfg.layer_windows() == (4, 0, 4, 0, 4)
  assert ModelConfig.from_config(section(sliding_window=0)).layer_windows() == (0, 0, 0)


def test_packed_rows_window_within_each_segment_and_chunked_agrees():
  """A packed row's logits are each document's alone (the window counts from the segment's own start), and
  attention_impl=chunked (the window in the lazy mask) gives the xla logits."""
  tokens = jnp.asarray(np.random.default_rng(0).integers(1, 53, size=(1, 14)))
  segments = jnp.asarray([[1] * 9 + [2] * 5])
  positions = jnp.asarray([list(range(9)) + list(range(5))])
  model = model_of(sliding_window_pattern='LG')
  packed = forward(model, tokens, segments, positions)
  first, second = forward(model, tokens[:, :9]), forward(model, tokens[:, 9:])
  np.testing.assert_allclose(packed[:, :9], first, atol=1e-5)
  np.testing.assert_allclose(packed[:, 9:], second, atol=1e-5)
  chunked = build_model(section(sliding_window_pattern='LG', attention_impl='chunked'),
                        rngs=nnx.Rngs(params=0, dropout=1))
  np.testing.assert_allclose(forward(chunked, tokens, segments, positions), packed, atol=1e-5)


def test_the_window_matters():
  """Positions past the window see fewer keys: same parameters, different logits there (and equal before)."""
  tokens = jnp.asarray(np.random.default_rng(1).integers(1, 53, size=(1, 10)))
  windowed = model_of()
  full = build_model(section(sliding_window=0), rngs=nnx.Rngs(params=0, dropout=1))
  a, b = np.asarray(forward(windowed, tokens)), np.asarray(forward(full, tokens))
  np.testing.assert_allclose(a[:, :4], b[:, :4], atol=1e-5)
  assert np.abs(a[:, 4:] - b[:, 4:]).max() > 1e-2


@pytest.mark.parametrize('overrides', [  # (every layer windowed: the mistral_window fixture's greedy test)
    {'sliding_window_pattern': 'LG'},  # Gemma 2's alternation, unrolled
    {'sliding_window_pattern': 'GLL', 'scan_layers': True},  # mixed kinds under scan: lax.cond per layer
])
def test_ring_buffer_decoding_equals_the_full_forward_pass(overrides):
  """Prompts longer than the window, of different lengths (the longer ones fed one token per step): greedy with
  the ring-buffer cache gives the tokens of a full forward pass per step."""
  model = model_of(**overrides)
  prompt = np.random.default_rng(2).integers(1, 53, size=(3, 9))
  lengths = np.array([9, 5, 7])
  with_cache = decoding.greedy(model, prompt, prompt_lengths=lengths, max_new_tokens=10, eos_id=-5)
  without = decoding.greedy_without_cache(model, prompt, prompt_lengths=lengths, max_new_tokens=10, eos_id=-5)
  np.testing.assert_array_equal(np.asarray(with_cache), np.asarray(without))


def test_windowed_layers_cache_only_the_window():
  """O(W) decoding memory: windowed layers hold W slots, global layers the whole length."""
  cache = model_of(sliding_window_pattern='LG').init_cache(2, 30)
  assert [layer['k'].shape[1] for layer in cache['self']] == [4, 30, 4]
  scanned = model_of(sliding_window_pattern='GLL', scan_layers=True).init_cache(2, 30)['self']
  assert scanned['k'].shape[:3] == (2, 1, 30) and scanned['ring_k'].shape[:3] == (2, 2, 4)


@pytest.mark.parametrize('overrides,message', [
    ({'sliding_window': -1}, 'model.sliding_window=-1 must be a non-negative integer'),
    ({'sliding_window_pattern': 'LX'}, "model.sliding_window_pattern='LX' must be a non-empty string of L"),
    ({'arch': 'encoder_decoder'}, 'model.sliding_window=4 is supported for model.arch=decoder_only only'),
    ({'position': 'relative'}, 'model.sliding_window=4 does not combine with model.position=relative'),
])
def test_bad_window_settings_are_one_line(overrides, message):
  with pytest.raises(ConfigError) as e:
    validate_model(section(**overrides))
  assert message in str(e.value) and '\n' not in str(e.value)


# ------------------------------------------------------------------------------------------- Hugging Face
def test_mistral_and_qwen2_import_their_window_and_keep_their_context():
  mistral, qwen2 = hf.model_section(str(FIXTURES / 'mistral_window')), hf.model_section(str(FIXTURES / 'qwen2_window'))
  assert (mistral.sliding_window, mistral.sliding_window_pattern, mistral.max_len) == (4, 'L', 64)
  # Qwen2: max_window_layers=1, so layer 0 is global and layer 1 windowed
  assert (qwen2.sliding_window, qwen2.sliding_window_pattern, qwen2.max_len) == (3, 'GL', 64)


@pytest.mark.parametrize('overrides,message', [
    ({'sliding_window_pattern': 'LG'}, "model.sliding_window_pattern='LG' (Mistral windows every layer"),
    ({'sliding_window_pattern': 'LG', 'qkv_bias': True}, 'Qwen2 needs global layers, then windowed ones'),
])
def test_windows_no_family_can_express_are_one_line(overrides, message):
  model_section = section(**overrides)
  with pytest.raises(ConfigError) as e:
    hf.save(model_of(**overrides), model_section, '/nonexistent-never-written')
  assert message in str(e.value) and '\n' not in str(e.value)
