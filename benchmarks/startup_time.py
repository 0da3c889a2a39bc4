"""Time to the first train step and wall time of a short shakespeare_char `cpu` run, cold vs warm persistent
compilation cache (train.compilation_cache_dir), one table.

  python benchmarks/startup_time.py                 # 10 steps; cache in a fresh temporary folder
  python benchmarks/startup_time.py --steps=50
  python benchmarks/startup_time.py --full --torch_python=/path/to/venv-with-torch/bin/python

--full adds the end-to-end table: the whole recipe (2000 steps, its 8 evaluations of the whole validation split
and 2 checkpoints) with a cold and a warm cache, side by side with nanoGPT's CPU run
(benchmarks/nanogpt_reference.py --nanogpt_schedule: one seed, nanoGPT's estimate_loss every 250 steps and its
checkpoint on improvement, in the interpreter --torch_python names: torch is no jaxformer dependency), each timed
from process start to exit. Neither side counts nanoGPT's separate data preparation (prepare.py); jaxformer's run
includes its own (tokenizer and ArrayRecord conversion into the fresh workdir).

Each run is a fresh `python train.py` process with a new workdir (so no resume, and the tokenizer is rebuilt);
'cold' starts with an empty cache folder, 'warm' reuses the folder the cold run filled, 'off' sets the cache dir
to ''. Time to the first step: from the process start to the first 'step' line train.py logs (log_every=1).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(cache_dir: str, workdir: str, steps: int | None) -> tuple[float, float]:
  """(seconds to the first logged step, seconds end to end) of one train.py process; steps None: the recipe as
  it is (2000 steps, its evaluations and checkpoints)."""
  cmd = [sys.executable, 'train.py', '--config=configs/shakespeare_char.py:cpu', f'--workdir={workdir}',
         f'--config.train.compilation_cache_dir={cache_dir}']
  if steps is not None:
    cmd += [f'--config.train.num_steps={steps}', '--config.train.log_every=1', f'--config.train.eval_every={steps}',
            f'--config.checkpoint.every_steps={steps}', '--config.train.steps_per_call=1']
  start = time.perf_counter()
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=dict(os.environ, JAX_PLATFORMS='cpu'))
  first = None
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if first is None and line.startswith('step '):
      first = time.perf_counter() - start
  proc.wait()
  total = time.perf_counter() - start
  if proc.returncode:
    raise SystemExit(''.join(lines[-30:]))
  return (first if first is not None else float('nan')), total


def run_nanogpt(python: str) -> float:
  """Seconds end to end of benchmarks/nanogpt_reference.py (one seed) in interpreter `python`."""
  start = time.perf_counter()
  with tempfile.TemporaryDirectory() as out:
    proc = subprocess.run([python, 'benchmarks/nanogpt_reference.py', '--seeds=0', f'--nanogpt_schedule={out}'],
                          cwd=REPO, capture_output=True, text=True)
  if proc.returncode:
    raise SystemExit(proc.stdout[-2000:] + proc.stderr[-2000:])
  return time.perf_counter() - start


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--full', action='store_true', help='also the whole recipe end to end vs nanoGPT')
  parser.add_argument('--torch_python', default=sys.executable, help='an interpreter with torch, for --full')
  args = parser.parse_args()
  tmp = tempfile.mkdtemp(prefix='jaxformer_startup_')
  cache = os.path.join(tmp, 'cache')
  print(f'shakespeare_char cpu, {args.steps} steps, load average {os.getloadavg()[0]:.1f}')
  print('| compilation cache | time to step 1 (s) | end to end (s) | end to end / cold |')
  print('|---|---:|---:|---:|')
  cold = None
  for name, cache_dir in (('cold (empty)', cache), ('warm (filled by cold)', cache), ('off', '')):
    first, total = run(cache_dir, os.path.join(tmp, name.split()[0]), args.steps)
    cold = cold or total
    print(f'| {name} | {first:.1f} | {total:.1f} | {total / cold:.2f}x |', flush=True)
  if not args.full:
    return
  print(f'\nend to end, the whole recipe; load average {os.getloadavg()[0]:.1f}')
  print('| run | end to end (s) | / nanoGPT |')
  print('|---|---:|---:|')
  nanogpt = run_nanogpt(args.torch_python)
  print(f'| nanoGPT reference (PyTorch, 2000 steps, 8 estimates + checkpoints, final eval) | {nanogpt:.1f} | 1.00x |', flush=True)
  full_cache = os.path.join(tmp, 'full_cache')
  for name in ('jaxformer, cold cache', 'jaxformer, warm cache'):
    _, total = run(full_cache, os.path.join(tmp, name.split()[-2]), None)
    print(f'| {name} (2000 steps, 8 evals, 2 checkpoints) | {total:.1f} | {total / nanogpt:.2f}x |', flush=True)


if __name__ == '__main__':
  main()
