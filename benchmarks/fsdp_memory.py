"""Per-device bytes of the train state (parameters + AdamW state) as the mesh moves from data to fsdp / tensor
parallelism, on 8 virtual CPU devices, one table.

  python benchmarks/fsdp_memory.py                    # GPT-2-small shape, scanned stack, state bytes only
  python benchmarks/fsdp_memory.py --compile          # also XLA's per-device memory_analysis of the train step

The train state is built abstractly exactly as train.py builds it (make_setup: the shardings come from
mesh.logical_axis_rules), and each leaf's bytes on one device are those of its shard
(`sharding.shard_shape`), so the 'state / device' column is exact, not a model: the largest device's share of
params + mu + nu. With --compile the step is lowered and compiled for that mesh (nothing allocated or run) and
XLA's own per-device numbers are added: 'args' (state + batch in) and 'temp' (activations and workspace).
Ratios are against the pure data-parallel row (every device holds the whole state) of the same run.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from benchmarks.compile_time import lowered_train_step  # noqa: E402
from configs import default  # noqa: E402
from jaxformer import sharding as shd  # noqa: E402
from jaxformer.training import optimizer as opt_lib  # noqa: E402
from jaxformer.training import step as step_lib  # noqa: E402
from jaxformer.training import state as state_lib

MIB = 2 ** 20
MESHES = ((8, 1, 1), (4, 2, 1), (2, 4, 1), (1, 8, 1), (4, 1, 2), (2, 2, 2), (1, 4, 2))


def small_config(mesh: tuple[int, int, int], batch: int, seq_len: int, scan_layers: bool):
  """GPT-2 small's shape (12 x 768, 12 heads, vocab 50257, tied embeddings), float32 parameters."""
  config = default.get_config()
  config.model.update(arch='decoder_only', num_layers=12, d_model=768, num_heads=12, d_ff=3072, vocab_size=50257,
                      max_len=max(1024, seq_len), dropout=0.0, position='learned', use_bias=True,
                      tie_embeddings=True, scan_layers=scan_layers)
  config.data.seq_len = seq_len
  config.train.batch_size = batch
  config.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])
  return config


def state_bytes_per_device(abstract_state) -> dict[str, int]:
  """The bytes of params / opt_state held by the fullest device (every leaf's shard, summed per device)."""
  out = {}
  for part in ('params', 'opt_state'):
    per_device: dict[int, int] = {}
    for leaf in jax.tree.leaves(abstract_state[part]):
      sharding = leaf.sharding
      nbytes = math.prod(sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
      for device in sharding.device_set:
        per_device[device.id] = per_device.get(device.id, 0) + nbytes
    out[part] = max(per_device.values())
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--compile', action='store_true', help="also compile the step for XLA's per-device numbers")
  parser.add_argument('--layout', default='scanned', choices=('scanned', 'unrolled'))
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--seq_len', type=int, default=256)
  args = parser.parse_args()
  jax.config.update('jax_enable_compilation_cache', False)
  print(f'jax {jax.__version__}, {jax.device_count()} {jax.default_backend()} devices, GPT-2-small shape, '
        f'{args.layout} stack, batch {args.batch} x {args.seq_len}, load average {os.getloadavg()[0]:.1f}')
  header = '| data x fsdp x tensor | params / device (MiB) | AdamW state / device (MiB) | state / device | vs data-only |'
  rule = '|---|---:|---:|---:|---:|'
  if args.compile:
    header += ' XLA args / device (MiB) | XLA temp / device (MiB) |'
    rule += '---:|---:|'
  print(header)
  print(rule)
  base = None
  for mesh_sizes in MESHES:
    config = small_config(mesh_sizes, args.batch, args.seq_len, args.layout == 'scanned')
    mesh = shd.make_mesh(config)
    tx, schedule = opt_lib.make_optimizer(config.train)
    setup = state_lib.make_setup(config, mesh, tx, schedule)
    nbytes = state_bytes_per_device(setup.abstract_state)
    total = nbytes['params'] + nbytes['opt_state']
    base = base or total
    row = (f'| {" x ".join(map(str, mesh_sizes))} | {nbytes["params"] / MIB:.1f} | {nbytes["opt_state"] / MIB:.1f} '
           f'| {total / MIB:.1f} | {total / base:.3f}x |')
    if args.compile:
      mem = lowered_train_step(config).compile().memory_analysis()
      row += f' {mem.argument_size_in_bytes / MIB:.1f} | {mem.temp_size_in_bytes / MIB:.1f} |'
    print(row, flush=True)


if __name__ == '__main__':
  main()
