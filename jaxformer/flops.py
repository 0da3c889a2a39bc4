"""Model FLOPs and accelerator peaks, for tokens/s -> MFU (model FLOPs utilisation).

Formula (PaLM, appendix B): training FLOPs = 6 * N * tokens + attention, where N counts the weights of every
matrix multiply a token goes through (attention projections, MLP: a MoE block's router + k routed + shared experts, the output/logits projection; embedding *lookups*
cost nothing and are not counted) and attention adds 12 * layers * heads * head_dim * context per token (QK^T and AV,
2 FLOPs per multiply-add, x3 for forward + backward). Causal masking is not discounted, as in PaLM/MaxText; a
sliding-window layer's context is min(window, seq_len) (MaxText's count for local layers).
encoder_decoder counts both stacks over their own lengths: the encoder over src_seq_len tokens, the decoder over
seq_len tokens, cross-attention over src_seq_len keys, and the cross-attention key/value projections over the
encoder tokens. The output layer is counted by the model's head (heads/: output_flops; a classifier sees one pooled
vector per row, no logits projection). The counts are from the config, so they are the same on every backend.

Peaks are dense per-device FLOP/s by device kind and compute dtype. float32 on NVIDIA uses the TF32 figure (XLA's
default matmul precision there); TPUs run float32 matmuls as bf16 passes by default, so they use the bf16 figure.
On CPU there is no table: a quick float32 matmul measures the host once per process (cached).
"""
from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp

from jaxformer import heads
from jaxformer.model import layers, moe
from jaxformer.model.config import ModelConfig

# (substring of device_kind, lower-cased; peak bf16/fp16 FLOP/s; peak float32 FLOP/s). First match wins.
PEAK_FLOPS: tuple[tuple[str, float, float], ...] = (
    ('h200', 989e12, 494e12),
    ('gh200', 989e12, 494e12),
    ('h100 pcie', 756e12, 378e12),
    ('h100', 989e12, 494e12),
    ('a100', 312e12, 156e12),
    ('l4', 121e12, 60e12),
    ('a10g', 70e12, 35e12),
    ('v100', 125e12, 15.7e12),
    ('tpu v6 lite', 918e12, 918e12),
    ('tpu v6e', 918e12, 918e12),
    ('tpu v5 lite', 197e12, 197e12),
    ('tpu v5e', 197e12, 197e12),
    ('tpu v5p', 459e12, 459e12),
    ('tpu v5', 459e12, 459e12),
    ('tpu v4', 275e12, 275e12),
    ('tpu v3', 123e12, 123e12),
)


def _attn_weights(cfg: ModelConfig) -> int:
  d, h = cfg.d_model, cfg.head_dim
  return d * cfg.num_heads * h * 2 + d * cfg.num_kv_heads * h * 2  # query + output, key + value


def _mlp_weights(cfg: ModelConfig) -> int:
  return (3 if layers.MLPS[cfg.mlp].gated else 2) * cfg.d_model * cfg.d_ff  # gated: the extra wi_gate


def _mlp_weights_stack(cfg: ModelConfig, num_layers: int) -> int:
  """MLP weights a token goes through in a stack of num_layers blocks: a MoE block (model/moe.py) counts its
  router and the k routed + the shared experts' widths (the active parameters), not all E experts."""
  routed = moe.moe_layer_count(cfg, num_layers)
  if not routed:
    return num_layers * _mlp_weights(cfg)
  width = moe.expert_width(cfg) * (cfg.experts_per_token + cfg.num_shared_experts)
  per_moe = (3 if layers.MLPS[cfg.mlp].gated else 2) * cfg.d_model * width + cfg.d_model * cfg.num_experts
  per_moe += cfg.d_model if cfg.num_shared_experts and cfg.moe_shared_gate else 0
  return (num_layers - routed) * _mlp_weights(cfg) + routed * per_moe


def train_flops_per_step(cfg: ModelConfig, batch_size: int, seq_len: int, src_seq_len: int | None = None) -> float:
  """Model FLOPs of one training step (forward + backward) on a [batch_size, seq_len] batch."""
  d = cfg.d_model
  qk = cfg.num_heads * cfg.head_dim  # width of QK^T and AV (= d_model unless model.head_dim is set)
  attn = _attn_weights(cfg)
  enc_mlp = _mlp_weights_stack(cfg, cfg.num_layers)  # all layers' (active) MLP weights
  if cfg.arch == 'encoder_decoder':
    src = src_seq_len or seq_len
    kv = 2 * d * cfg.num_kv_heads * cfg.head_dim
    enc_per_token = 6 * (cfg.num_layers * attn + enc_mlp) + 12 * cfg.num_layers * qk * src
    enc_per_token += 6 * cfg.num_decoder_layers * kv  # cross-attention keys/values of the encoder output
    dec_per_token = (6 * (cfg.num_decoder_layers * (attn + (attn - kv)) + _mlp_weights_stack(cfg, cfg.num_decoder_layers))
                     + 12 * cfg.num_decoder_layers * qk * (seq_len + src))
    trunk = batch_size * (src * enc_per_token + seq_len * dec_per_token)
  else:
    context = sum(min(w, seq_len) if w else seq_len for w in cfg.layer_windows())  # over the layers
    trunk = batch_size * seq_len * (6 * (cfg.num_layers * attn + enc_mlp) + 12 * qk * context)
  return float(trunk + heads.head_of(cfg).output_flops(cfg, batch_size, seq_len))


def flops_per_token(cfg: ModelConfig, seq_len: int, src_seq_len: int | None = None) -> float:
  """Training FLOPs per (target-side) token."""
  return train_flops_per_step(cfg, 1, seq_len, src_seq_len) / seq_len


@functools.lru_cache(maxsize=None)
def measure_cpu_flops(n: int = 1024, repeats: int = 10) -> float:
  """FLOP/s of a float32 [n, n] matmul on the first CPU device, best of `repeats` (cached per process)."""
  device = jax.devices('cpu')[0]
  x = jax.device_put(jnp.ones((n, n), jnp.float32), device)
  f = jax.jit(lambda a: a @ a)
  f(x).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    t = time.perf_counter()
    f(x).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2.0 * n ** 3 / max(best, 1e-9)


def peak_flops_per_device(device: jax.Device | None = None, dtype: str = 'bfloat16') -> float | None:
  """Dense peak FLOP/s of one device for matmuls in `dtype`; None for an unknown accelerator (MFU then unknown).

  On CPU, every virtual device shares the same cores, so the measured figure is for the whole host: use
  `peak_flops_total` rather than multiplying this by the device count.
  """
  device = device or jax.devices()[0]
  if device.platform == 'cpu':
    return measure_cpu_flops()
  kind = device.device_kind.lower()
  for key, half, single in PEAK_FLOPS:
    if key in kind:
      return half if dtype in ('bfloat16', 'float16') else single
  return None


def peak_flops_total(devices, dtype: str = 'bfloat16') -> float | None:
  """Peak FLOP/s of all `devices` together (CPU: measured host peak x number of processes)."""
  devices = list(devices)
  if not devices:
    return None
  if devices[0].platform == 'cpu':
    return measure_cpu_flops() * len({d.process_index for d in devices})
  peak = peak_flops_per_device(devices[0], dtype)
  return None if peak is None else peak * len(devices)


def mfu(flops_per_step: float, step_seconds: float, peak_total: float | None) -> float | None:
  """Achieved model FLOP/s over peak, in [0, 1] (None when the peak is unknown)."""
  if not peak_total or step_seconds <= 0:
    return None
  return flops_per_step / step_seconds / peak_total
