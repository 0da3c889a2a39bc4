"""Compile time of the real train step vs depth, unrolled vs scanned stack (model.scan_layers), one table.

  python benchmarks/compile_time.py                      # depths 4, 12, 24, 48; both layouts
  python benchmarks/compile_time.py --depths=4,48 --layouts=scanned

The step is built as train.py builds it (make_optimizer -> make_setup -> make_train_step) and lowered for the
abstract train state (train_step.lower), so nothing is allocated or run: 'trace' is Python tracing + lowering to
StableHLO, 'compile' is XLA's compilation. The persistent compilation cache is off, so every row compiles.
Ratios are against the 4-layer row of the same layout, measured in the same process. Shape: a decoder_only
model d_model=256, 4 heads, d_ff=1024, vocab 256, batch 8 x 128 (compile time barely depends on the width).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from configs import default  # noqa: E402
from jaxformer import sharding as shd  # noqa: E402
from jaxformer.training import optimizer as opt_lib  # noqa: E402
from jaxformer.training import step as step_lib  # noqa: E402
from jaxformer.training import state as state_lib


def lowered_train_step(config) -> jax.stages.Lowered:
  """The decoder_only train step of `config` lowered for its abstract state and a [batch, seq_len] batch."""
  mesh = shd.make_mesh(config)
  tx, schedule = opt_lib.make_optimizer(config.train)
  setup = state_lib.make_setup(config, mesh, tx, schedule)
  shape = (config.train.batch_size, config.data.seq_len)
  batch = {key: jax.ShapeDtypeStruct(shape, jax.numpy.int32) for key in ('tokens', 'targets')}
  return step_lib.make_train_step(config, setup).lower(setup.abstract_state, batch)


def depth_config(num_layers: int, scan_layers: bool):
  config = default.get_config()
  config.model.update(arch='decoder_only', num_layers=num_layers, d_model=256, num_heads=4, d_ff=1024,
                      vocab_size=256, max_len=128, scan_layers=scan_layers)
  config.data.seq_len = 128
  config.train.batch_size = 8
  config.mesh.update(data=1, fsdp=1, tensor=1)
  return config


def time_compile(config) -> tuple[float, float]:
  start = time.perf_counter()
  lowered = lowered_train_step(config)
  traced = time.perf_counter()
  lowered.compile()
  return traced - start, time.perf_counter() - traced


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--depths', default='4,12,24,48')
  parser.add_argument('--layouts', default='unrolled,scanned')
  args = parser.parse_args()
  jax.config.update('jax_enable_compilation_cache', False)
  depths = [int(d) for d in args.depths.split(',')]
  print(f'jax {jax.__version__}, backend {jax.default_backend()}, {os.cpu_count()} CPUs, '
        f'load average {os.getloadavg()[0]:.1f}')
  print('| layout | layers | trace + lower (s) | XLA compile (s) | total (s) | total / 4 layers |')
  print('|---|---:|---:|---:|---:|---:|')
  for layout in args.layouts.split(','):
    base = None
    for depth in depths:
      trace, compile_s = time_compile(depth_config(depth, layout == 'scanned'))
      total = trace + compile_s
      base = base or total
      print(f'| {layout} | {depth} | {trace:.2f} | {compile_s:.2f} | {total:.2f} | {total / base:.2f}x |', flush=True)


if __name__ == '__main__':
  main()
