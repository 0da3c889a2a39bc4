"""FLOPs per step against the real models' weight counts, and the per-device peak table."""
import types

import jax
import numpy as np
import pytest
from flax import nnx

from configs import bert_tiny, gpt_tiny, t5_tiny
from jaxformer import flops
from jaxformer.config import ModelConfig
from jaxformer.training import step
from jaxformer.training import state as state_lib


def _ndim(path, x) -> int:
  """A parameter's own rank: without the stacked 'layers' axis of model.scan_layers."""
  return x.ndim - ("'layers'" in jax.tree_util.keystr(path))


def _matmul_weights(config):
  """Every weight matrix of the real (abstract) model: parameters of ndim >= 2 that are not biases."""
  abstract = nnx.eval_shape(lambda: state_lib.build_model(config))
  flat = jax.tree_util.tree_flatten_with_path(nnx.state(abstract, nnx.Param))[0]
  return sum(int(np.prod(x.shape)) for path, x in flat
             if _ndim(path, x) >= 2 and 'bias' not in jax.tree_util.keystr(path))


@pytest.mark.parametrize('module,kv', [(gpt_tiny, 1), (gpt_tiny, 4), (bert_tiny, 4)])
def test_lm_flops_are_6n_plus_attention(module, kv):
  config = module.get_config()
  config.model.update(vocab_size=50, num_kv_heads=kv, tie_embeddings=True, position='rope')
  cfg = ModelConfig.from_config(config.model)
  n = _matmul_weights(config)  # tied: the embedding matrix is the logits projection (its lookup is free)
  b, length = 3, 16
  attention = 12 * cfg.num_layers * cfg.d_model * length
  assert flops.train_flops_per_step(cfg, b, length) == pytest.approx(b * length * (6 * n + attention))
  assert flops.flops_per_token(cfg, length) == pytest.approx(6 * n + attention)


def test_sliding_window_layers_count_their_window_as_context():
  """Gemma 2's alternating local / global layers: a windowed layer attends over min(window, seq_len) keys."""
  config = gpt_tiny.get_config()
  config.model.update(vocab_size=50, num_layers=4, position='rope')
  full = ModelConfig.from_config(config.model)
  config.model.update(sliding_window=8, sliding_window_pattern='LG')
  windowed = ModelConfig.from_config(config.model)
  length, qk = 32, full.num_heads * full.head_dim
  saved = 2 * 12 * qk * (length - 8)  # two local layers of four, 8 keys instead of 32
  assert flops.flops_per_token(full, length) - flops.flops_per_token(windowed, length) == pytest.approx(saved)
  assert flops.flops_per_token(windowed, 8) == pytest.approx(flops.flops_per_token(full, 8))  # window >= length


def test_encoder_decoder_counts_both_stacks():
  config = t5_tiny.get_config()
  config.model.update(vocab_size=40, tie_embeddings=True)
  cfg = ModelConfig.from_config(config.model)
  n = _matmul_weights(config)
  b, length = 2, 16  # equal source and target lengths: every weight sees `length` tokens per row
  attention = 12 * cfg.d_model * length * (cfg.num_layers + 2 * cfg.num_decoder_layers)  # self + self + cross
  assert flops.train_flops_per_step(cfg, b, length, length) == pytest.approx(b * length * (6 * n + attention))
  # a longer source costs more (encoder and cross-attention), the target length unchanged
  assert flops.train_flops_per_step(cfg, b, length, 2 * length) > flops.train_flops_per_step(cfg, b, length, length)


def test_hf_features_flops():
  """T5 v1.1 / Qwen2-style: explicit head_dim (heads * head_dim != d_model), a gated GELU MLP, q/k/v biases and a
  relative position table. Lookups (embeddings, the relative bias table) are no matmuls."""
  config = t5_tiny.get_config()
  config.model.update(vocab_size=40, tie_embeddings=False, head_dim=24, mlp='geglu', qkv_bias=True,
                      position='relative', relative_num_buckets=8, relative_max_distance=16)
  cfg = ModelConfig.from_config(config.model)
  abstract = nnx.eval_shape(lambda: state_lib.build_model(config))
  flat = jax.tree_util.tree_flatten_with_path(nnx.state(abstract, nnx.Param))[0]
  n = sum(int(np.prod(x.shape)) for path, x in flat if _ndim(path, x) >= 2 and not any(
      word in jax.tree_util.keystr(path) for word in ('bias', 'positions', "'embed'")))
  b, length = 2, 16
  attention = 12 * cfg.num_heads * cfg.head_dim * length * (cfg.num_layers + 2 * cfg.num_decoder_layers)
  assert cfg.num_heads * cfg.head_dim != cfg.d_model
  assert flops.train_flops_per_step(cfg, b, length, length) == pytest.approx(b * length * (6 * n + attention))


def test_peak_table_and_mfu():
  dev = lambda kind: types.SimpleNamespace(platform='gpu', device_kind=kind, process_index=0)
  assert flops.peak_flops_per_device(dev('NVIDIA H100 80GB HBM3')) == 989e12
  assert flops.peak_flops_per_device(dev('NVIDIA H100 PCIe')) == 756e12
  assert flops.peak_flops_per_device(dev('NVIDIA H200')) == 989e12
  assert flops.peak_flops_per_device(dev('NVIDIA A100-SXM4-80GB'), 'float32') == 156e12
  assert flops.peak_flops_per_device(types.SimpleNamespace(platform='tpu', device_kind='TPU v5 lite')) == 197e12
  assert flops.peak_flops_per_device(types.SimpleNamespace(platform='tpu', device_kind='TPU v5p')) == 459e12
  assert flops.peak_flops_per_device(types.SimpleNamespace(platform='tpu', device_kind='TPU v4')) == 275e12
  assert flops.peak_flops_per_device(dev('Some Future GPU')) is None
  assert flops.peak_flops_total([dev('NVIDIA H100 80GB HBM3')] * 8) == 8 * 989e12
  cpu = flops.peak_flops_total(jax.devices())  # measured, once per host however many virtual devices
  assert 1e8 < cpu < 1e14 and flops.peak_flops_total(jax.devices()) == cpu
  assert flops.mfu(1e12, 2.0, 1e12) == pytest.approx(0.5)
  assert flops.mfu(1e12, 2.0, None) is None


@pytest.mark.parametrize('module,pooler', [(bert_tiny, True), (gpt_tiny, False)])
def test_classifier_flops_count_the_head_once_per_row_and_no_logits(module, pooler):
  config = module.get_config()
  config.model.update(vocab_size=50, position='rope', head='classification', num_classes=3, pooler=pooler)
  cfg = ModelConfig.from_config(config.model)
  abstract = nnx.eval_shape(lambda: state_lib.build_model(config))
  flat = jax.tree_util.tree_flatten_with_path(nnx.state(abstract, nnx.Param))[0]
  matrices = [(jax.tree_util.keystr(path), int(np.prod(x.shape))) for path, x in flat
              if _ndim(path, x) >= 2 and 'bias' not in jax.tree_util.keystr(path)]
  head = sum(n for name, n in matrices if 'classifier' in name)
  trunk = sum(n for name, n in matrices if 'classifier' not in name and "'embed'" not in name)  # lookup: free
  b, length = 3, 16
  attention = 12 * cfg.num_layers * cfg.d_model * length
  assert flops.train_flops_per_step(cfg, b, length) == pytest.approx(b * (length * (6 * trunk + attention) + 6 * head))
