"""QLoRA: LoRA on a GPT-2-small-shape base stored in float32, bfloat16, NF4 or int8 (peft.quantize), one table.

  python benchmarks/qlora_memory.py                          # CPU: 27 min on 2 cores at load average ~21
  python benchmarks/qlora_memory.py --base_steps=200 --steps=100 --batch=8 --seq_len=128
  python benchmarks/qlora_memory.py --memory_only --unrolled   # bytes and XLA memory only, unscanned blocks

1. A base run: GPT-2 small's trunk (12 x 768, 12 heads, d_ff 3072, learned positions, LayerNorm, tied embeddings,
   scanned blocks: configs/gpt2_small.py) with tinyshakespeare's characters as its vocabulary (65 tokens, so the
   table is about the trunk: GPT-2's own 50257-token embedding adds 147 MiB of float32 to every row, never
   quantised, as in QLoRA), trained --base_steps full steps.
2. LoRA r=8 on every projection (peft.targets=all) from that base (checkpoint.init_from), the same batches and
   schedule, with the frozen base stored: float32 (model.param_dtype=float32), bfloat16 (param_dtype=bfloat16,
   so the LoRA factors are bfloat16 too), nf4 and int8 (param_dtype=float32: LoRA factors, embeddings and norms
   in float32). The compute dtype is float32 in every row (CPU).
3. Per row: parameter bytes, frozen and trainable (the abstract train state, exact); XLA's memory analysis of the
   compiled train step (compiled.memory_analysis(): arguments = state + batch, temp = activations and workspace,
   their sum less the donated aliases ~ the step's peak); median step time and its ratio to the float32 row (same
   process, same machine); train loss at the last logged step and the eval loss after --steps steps.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.compile_time import lowered_train_step  # noqa: E402
from configs import gpt2_small  # noqa: E402
from jaxformer import peft  # noqa: E402
from jaxformer.apps.train import run  # noqa: E402
from jaxformer.peft import quantize  # noqa: E402
from jaxformer.resolve import resolve  # noqa: E402
from jaxformer.training import optimizer as opt_lib  # noqa: E402
from jaxformer.training import state as state_lib  # noqa: E402
from jaxformer.training.writers import read_metrics  # noqa: E402

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), '..', 'shared', 'data')
MIB = 2 ** 20

# row name -> (model.param_dtype, peft.quantize)
BASES = {'float32': ('float32', 'none'), 'bfloat16': ('bfloat16', 'none'), 'nf4': ('float32', 'nf4'),
         'int8': ('float32', 'int8')}


def base_config(args, steps: int, data_dir: str):
  config = gpt2_small.get_config()
  config.data.update(source='text:' + os.path.join(DATA, 'tinyshakespeare', 'input.txt'), tokenizer='char',
                     vocab_size=0, seq_len=args.seq_len, pack=True, sampling='random_windows', data_dir=data_dir)
  config.model.update(vocab_size=0, max_len=args.seq_len)
  config.train.update(batch_size=args.batch, num_steps=steps, learning_rate=1e-3, warmup_steps=max(1, steps // 5),
                      log_every=1, eval_every=steps, eval_steps=4, eval_batch_size=args.batch, steps_per_call=1)
  config.checkpoint.update(every_steps=steps, async_save=False)
  config.mesh.update(data=1, fsdp=1, tensor=1, distributed='off')
  config.model.scan_layers = not args.unrolled
  return config


def lora_config(args, base_dir: str, name: str):
  config = base_config(args, args.steps, os.path.join(os.path.dirname(base_dir), 'data'))
  param_dtype, kind = BASES[name]
  config.model.param_dtype = param_dtype
  config.train.update(learning_rate=3e-3, weight_decay=0.0)
  config.peft.update(method='lora', targets='all', rank=8, alpha=16.0, quantize=kind)
  config.checkpoint.init_from = base_dir
  return config


def nbytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def measure(config, workdir: str) -> dict:
  """Parameter bytes of the abstract train state, and XLA's memory analysis of the compiled step."""
  r = resolve(config, workdir, training=False)
  tx, schedule = opt_lib.make_optimizer(r.config.train)
  setup = state_lib.make_setup(r.config, r.mesh, tx, schedule)
  trainable, frozen = peft.split(setup.abstract_state['params'], r.config.peft)
  mem = lowered_train_step(r.config).compile().memory_analysis()
  peak = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
  return dict(frozen=nbytes(frozen), trainable=nbytes(trainable), opt=nbytes(setup.abstract_state['opt_state']),
              args=mem.argument_size_in_bytes, temp=mem.temp_size_in_bytes, peak=peak)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--base_steps', type=int, default=10)
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--batch', type=int, default=4)
  parser.add_argument('--seq_len', type=int, default=64)
  parser.add_argument('--bases', default=','.join(BASES))
  parser.add_argument('--unrolled', action='store_true', help='model.scan_layers=False (default: scanned blocks)')
  parser.add_argument('--memory_only', action='store_true', help='no training runs: bytes and XLA memory only')
  parser.add_argument('--workdir', default=os.path.join(tempfile.gettempdir(), 'jaxformer_qlora_bench'))
  args = parser.parse_args()
  base_dir = os.path.join(args.workdir, 'base')
  if not os.path.isdir(os.path.join(base_dir, 'checkpoints')):
    run(base_config(args, args.base_steps, os.path.join(args.workdir, 'data')), base_dir)

  results = []
  for name in args.bases.split(','):
    config = lora_config(args, base_dir, name)
    workdir = os.path.join(args.workdir, name)
    row = measure(config, workdir)
    if args.memory_only:
      row.update(name=name, step_time=float('nan'), train_loss=float('nan'), eval_loss=float('nan'))
      results.append(row)
      print(name, row, flush=True)
      continue
    run(config, workdir)
    rows = read_metrics(workdir)
    times = [r['step_time'] for r in rows if r.get('step_time')]
    row.update(name=name, step_time=float(np.median(times)), train_loss=[r for r in rows if 'train_loss' in r][-1][
        'train_loss'], eval_loss=[r for r in rows if 'eval_loss' in r][-1]['eval_loss'])
    results.append(row)
    print(name, row, flush=True)

  ref = results[0]
  print(f'\njax {jax.__version__}, {platform.processor() or platform.machine()}, {jax.devices()[0].device_kind}, '
        f'load average {os.getloadavg()[0]:.1f}; GPT-2-small trunk, char vocabulary; base: {args.base_steps} steps; '
        f'LoRA r=8 (all projections): {args.steps} steps, batch {args.batch} x {args.seq_len}, '
        f'{"unrolled" if args.unrolled else "scanned"} blocks\n')
  print('| frozen base | frozen MiB | trainable MiB | AdamW MiB | XLA args MiB | XLA temp MiB | step peak MiB '
        '| peak vs f32 | step ms | time vs f32 | train loss | eval loss |')
  print('|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|')
  for r in results:
    print(f'| {r["name"]} | {r["frozen"] / MIB:.1f} | {r["trainable"] / MIB:.2f} | {r["opt"] / MIB:.2f} '
          f'| {r["args"] / MIB:.1f} | {r["temp"] / MIB:.1f} | {r["peak"] / MIB:.1f} | {r["peak"] / ref["peak"]:.2f} '
          f'| {1e3 * r["step_time"]:.0f} | {r["step_time"] / ref["step_time"]:.2f} | {r["train_loss"]:.4f} '
          f'| {r["eval_loss"]:.4f} |')


if __name__ == '__main__':
  main()
