"""Per-device activation memory of a long-sequence train step with and without context parallelism (mesh.sequence),
on 8 virtual CPU devices, one table.

  python benchmarks/context_parallel.py                      # seq_len 8192, batch 2, chunked attention
  python benchmarks/context_parallel.py --seq_len=4096 --impl=xla

The step is lowered and compiled exactly as train.py builds it (nothing is allocated or run) and XLA's own
per-device memory_analysis() is read: 'temp' is the activations and workspace (what context parallelism splits),
'args' the train state + batch in. The batch is 2 rows, so data parallelism alone cannot split a row any further:
the base row is data=2 (2 devices, one whole row each); the others add a 'sequence' axis of 2 / 4 devices, which
splits each row's length (the keys / values are all-gathered per layer, model/attention.py). Ratios are against
the base row of the same run.
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from benchmarks.compile_time import lowered_train_step  # noqa: E402
from configs import default  # noqa: E402

MIB = 2 ** 20
SEQUENCE = (1, 2, 4)


def long_config(sequence: int, seq_len: int, impl: str):
  """A small Llama-style decoder (4 x 256, 8 heads / 2 kv heads, RoPE, SwiGLU), float32, batch 2 x seq_len."""
  config = default.get_config()
  config.model.update(arch='decoder_only', num_layers=4, d_model=256, num_heads=8, num_kv_heads=2, d_ff=1024,
                      vocab_size=256, max_len=seq_len, position='rope', norm='rms', mlp='swiglu',
                      attention_impl=impl, scan_layers=True)
  config.data.seq_len = seq_len
  config.train.batch_size = 2
  config.mesh.update(data=2, fsdp=1, sequence=sequence, tensor=1)
  return config


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--seq_len', type=int, default=8192)
  parser.add_argument('--impl', default='chunked', choices=('chunked', 'xla', 'reference'))
  args = parser.parse_args()
  jax.config.update('jax_enable_compilation_cache', False)
  print(f'jax {jax.__version__}, {jax.device_count()} {jax.default_backend()} devices, 4 x 256 decoder (8 heads, 2 kv '
        f'heads), batch 2 x {args.seq_len}, attention_impl={args.impl}, scanned stack, '
        f'load average {os.getloadavg()[0]:.1f}')
  print('| data x sequence | devices | tokens / device | XLA temp / device (MiB) | vs sequence=1 | '
        'XLA args / device (MiB) |')
  print('|---|---:|---:|---:|---:|---:|')
  base = None
  for sequence in SEQUENCE:
    mem = lowered_train_step(long_config(sequence, args.seq_len, args.impl)).compile().memory_analysis()
    base = base or mem.temp_size_in_bytes
    print(f'| 2 x {sequence} | {2 * sequence} | {args.seq_len // sequence} | {mem.temp_size_in_bytes / MIB:.1f} | '
          f'{mem.temp_size_in_bytes / base:.3f}x | {mem.argument_size_in_bytes / MIB:.1f} |', flush=True)


if __name__ == '__main__':
  main()
