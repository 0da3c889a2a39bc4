"""Peak memory of a GPT-2-medium-shaped train step per model.remat policy, from XLA's compiled.memory_analysis().

  python benchmarks/remat_memory.py                       # scanned stack, every policy
  python benchmarks/remat_memory.py --layout=unrolled --batch=4 --seq_len=512

Compile only: the step is lowered for the abstract train state (nothing allocated, nothing run), so a 355M-param
step fits in a CPU's memory budget. Columns: 'temp' is XLA's scratch for the step (activations kept for the
backward pass + workspace) -- what remat trades; 'args + out' the train state and batch in and out (the same for
every policy, donation aliases them). Ratios are against 'none' in the same run. No FLOPs column: XLA's cost
analysis counts a while-loop (scan) body once, so it misses the scanned layers' recompute; the compute cost of each
policy is in jaxformer/model/remat.py.
Shape: 24 layers x d_model 1024, 16 heads, d_ff 4096, vocab 50257, batch 8 x 1024 by default.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from benchmarks.compile_time import lowered_train_step  # noqa: E402
from configs import default  # noqa: E402
from jaxformer.model import remat  # noqa: E402

GIB = 2 ** 30


def medium_config(policy: str, scan_layers: bool, batch: int, seq_len: int):
  config = default.get_config()
  config.model.update(arch='decoder_only', num_layers=24, d_model=1024, num_heads=16, d_ff=4096, vocab_size=50257,
                      max_len=max(1024, seq_len), dropout=0.0, remat=policy, scan_layers=scan_layers)
  config.data.seq_len = seq_len
  config.train.batch_size = batch
  config.mesh.update(data=1, fsdp=1, tensor=1)
  return config


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--layout', default='scanned', choices=('scanned', 'unrolled'))
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--seq_len', type=int, default=1024)
  parser.add_argument('--policies', default=','.join(n for n in remat.REMATS if n != 'full'))  # full = block
  args = parser.parse_args()
  jax.config.update('jax_enable_compilation_cache', False)
  print(f'jax {jax.__version__}, backend {jax.default_backend()}, layout {args.layout}, '
        f'batch {args.batch} x {args.seq_len}')
  print('| model.remat | temp (GiB) | temp / none | args + out (GiB) |')
  print('|---|---:|---:|---:|')
  base = None
  for policy in args.policies.split(','):
    compiled = lowered_train_step(medium_config(policy, args.layout == 'scanned', args.batch, args.seq_len)).compile()
    mem = compiled.memory_analysis()
    temp, io = mem.temp_size_in_bytes, mem.argument_size_in_bytes + mem.output_size_in_bytes
    base = base or temp
    print(f'| {policy} | {temp / GIB:.2f} | {temp / base:.2f}x | {io / GIB:.2f} |', flush=True)


if __name__ == '__main__':
  main()
