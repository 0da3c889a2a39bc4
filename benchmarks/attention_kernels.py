"""Attention kernels: `jax.nn.dot_product_attention` with cuDNN flash attention vs XLA, forward + backward.

  python benchmarks/attention_kernels.py                       # GPU: xla vs cudnn, bf16, several lengths
  python benchmarks/attention_kernels.py --lengths=128,256     # CPU: xla vs the plain-jnp reference

Rows per sequence length: XLA, cuDNN with `is_causal=True` and no mask (the fastest flash path), and cuDNN with
the explicit boolean [B,1,T,S] mask that jaxformer passes today (packing / padding need it; cuDNN turns it into
an additive bias). Times are the median of `--reps` jitted fwd+bwd calls after warm-up; ratios are against XLA in
the same run. Results belong in benchmarks/RESULTS.md with the device and versions printed at the top.
"""
from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from jaxformer.model.attention import reference_attention


def timed(fn, *args, reps: int) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def variants(on_gpu: bool, causal_mask):
  def sdpa(impl, use_mask):
    def f(q, k, v):
      mask = causal_mask if use_mask else None
      return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=not use_mask, implementation=impl)
    return f
  rows = {'xla (is_causal)': sdpa('xla', False)}
  if on_gpu:
    rows['cudnn (is_causal, no mask)'] = sdpa('cudnn', False)
    rows['cudnn (bool mask, as jaxformer)'] = sdpa('cudnn', True)
  else:
    rows['reference (plain jnp, mask)'] = lambda q, k, v: reference_attention(q, k, v, causal_mask)
  return rows


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  on_gpu = jax.default_backend() == 'gpu'
  ap.add_argument('--lengths', default='512,1024,2048,4096' if on_gpu else '128,256')
  ap.add_argument('--batch', type=int, default=8 if on_gpu else 2)
  ap.add_argument('--heads', type=int, default=12 if on_gpu else 4)
  ap.add_argument('--head_dim', type=int, default=64 if on_gpu else 32)
  ap.add_argument('--dtype', default='bfloat16' if on_gpu else 'float32')
  ap.add_argument('--reps', type=int, default=20 if on_gpu else 5)
  args = ap.parse_args()
  dtype = jnp.dtype(args.dtype)
  print(f'# {jax.devices()[0].device_kind}; jax {jax.__version__}; {args.dtype}; batch {args.batch}, '
        f'{args.heads} heads x {args.head_dim}; causal self-attention, forward + backward')
  print('| length | kernel | ms (median) | GFLOP/s | vs xla |')
  print('|---:|---|---:|---:|---:|')
  for t in [int(x) for x in args.lengths.split(',')]:
    keys = jax.random.split(jax.random.PRNGKey(t), 3)
    q, k, v = (jax.random.normal(kk, (args.batch, t, args.heads, args.head_dim), dtype) for kk in keys)
    causal_mask = jnp.tril(jnp.ones((t, t), bool))[None, None]
    # fwd 4*B*N*T^2*H (two matmuls), bwd ~2.5x that; halved for the causal triangle.
    flops = 3.5 * 4 * args.batch * args.heads * t * t * args.head_dim / 2
    base = None
    for name, fn in variants(on_gpu, causal_mask).items():
      loss = lambda q, k, v, fn=fn: fn(q, k, v).astype(jnp.float32).sum()
      step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
      try:
        sec = timed(step, q, k, v, reps=args.reps)
      except Exception as e:  # pylint: disable=broad-except
        print(f'| {t} | {name} | failed: {type(e).__name__}: {str(e).splitlines()[0][:80]} | | |')
        continue
      base = base or sec
      print(f'| {t} | {name} | {sec * 1e3:.3f} | {flops / sec / 1e9:,.0f} | {base / sec:.2f}x |')


if __name__ == '__main__':
  main()
