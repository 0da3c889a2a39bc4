"""Peak memory and step time of model.attention_impl=chunked vs xla as the sequence grows (forward + backward).

  python benchmarks/attention_memory.py                                  # CPU: 1k .. 32k, ~8 GiB budget
  python benchmarks/attention_memory.py --lengths=1024,4096 --chunk=256  # another block size

A small decoder_only stack (2 layers, d_model 128, 2 heads x 64, d_ff 512, vocab 256, float32, batch 1, one
packed row of two documents, so the mask is a real segment mask), loss = summed token cross-entropy, jitted
gradient with respect to the parameters. 'temp' is XLA's scratch for that step from compiled.memory_analysis()
(activations kept for the backward pass + workspace); compiling allocates nothing, so every length gets a temp
column. A step is only run where xla's / chunked's temp fits --max_gib; times are the median of --reps runs after
a warm-up run. Ratios are chunked / xla in the same process.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from configs import default  # noqa: E402
from jaxformer.model import attention, build_model  # noqa: E402

GIB = 2 ** 30


def make_step(impl: str, seq_len: int):
  """(jitted loss-gradient step, its params, batch) for a fresh model with model.attention_impl=impl."""
  cfg = default.get_config().model
  cfg.update(arch='decoder_only', num_layers=2, d_model=128, num_heads=2, d_ff=512, vocab_size=256,
             max_len=seq_len, position='rope', attention_impl=impl, dropout=0.0)
  graphdef, params, rest = nnx.split(build_model(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
  tokens = jax.random.randint(jax.random.key(1), (1, seq_len), 0, 256)
  segments = jnp.where(jnp.arange(seq_len) < seq_len // 3, 1, 2)[None]  # two packed documents

  def loss(params, tokens, segments):
    logits = nnx.merge(graphdef, params, rest)(tokens, segment_ids=segments)
    logp = jax.nn.log_softmax(logits[:, :-1])
    return -jnp.take_along_axis(logp, tokens[:, 1:, None], -1).sum()

  return jax.jit(jax.grad(loss)), (params, tokens, segments)


def measure(impl: str, seq_len: int, max_gib: float, reps: int) -> tuple[float, float | None]:
  """(temp GiB, median step seconds or None when not run)."""
  step, args = make_step(impl, seq_len)
  compiled = step.lower(*args).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes / GIB
  if temp > max_gib:
    return temp, None
  jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return temp, statistics.median(times)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--lengths', default='1024,2048,4096,8192,16384,32768')
  parser.add_argument('--chunk', type=int, default=attention.CHUNK, help='query / key block of chunked')
  parser.add_argument('--max_gib', type=float, default=8.0, help='run a step only if its temp fits this')
  parser.add_argument('--max_run_len', type=int, default=16384, help='longest length that is also timed')
  parser.add_argument('--reps', type=int, default=2)
  args = parser.parse_args()
  attention.CHUNK = args.chunk
  jax.config.update('jax_enable_compilation_cache', False)
  print(f'# {jax.devices()[0].device_kind} ({jax.default_backend()}, {os.cpu_count()} cores); jax {jax.__version__}; '
        f'chunk {args.chunk}; 2 layers x d_model 128, 2 heads x 64, float32, batch 1; forward + backward')
  print('| length | xla temp (GiB) | chunked temp (GiB) | chunked / xla | xla step (s) | chunked step (s) | '
        'chunked / xla |')
  print('|---:|---:|---:|---:|---:|---:|---:|')
  for seq_len in (int(x) for x in args.lengths.split(',')):
    budget = args.max_gib if seq_len <= args.max_run_len else 0.0  # 0: compile only
    (xla_mem, xla_s), (ch_mem, ch_s) = (measure(impl, seq_len, budget, args.reps) for impl in ('xla', 'chunked'))
    fmt = lambda sec: '-' if sec is None else f'{sec:.3f}'  # noqa: E731
    ratio = '-' if xla_s is None or ch_s is None else f'{ch_s / xla_s:.2f}x'
    print(f'| {seq_len} | {xla_mem:.3f} | {ch_mem:.3f} | {ch_mem / xla_mem:.3f}x | {fmt(xla_s)} | {fmt(ch_s)} | '
          f'{ratio} |', flush=True)


if __name__ == '__main__':
  main()
