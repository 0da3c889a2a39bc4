"""Time to the first train step and wall time of a short shakespeare_char `cpu` run, cold vs warm persistent
compilation cache (train.compilation_cache_dir), one table.

  python benchmarks/startup_time.py                 # 10 steps; cache in a fresh temporary folder
  python benchmarks/startup_time.py --steps=50
  python benchmarks/startup_time.py --full --torch_python=/path/to/venv-with-torch/bin/python [--repeats=3]

--full adds the end-to-end table: the whole recipe (2000 steps, its 7 two-batch estimates of the validation
loss, the whole split at step 2000, and 2 checkpoints) with a cold and a warm cache, side by side with nanoGPT's CPU run
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
import statistics
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
  parser.add_argument('--repeats', type=int, default=2, help='--full: warm jaxformer / nanoGPT pairs')
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
  # nanoGPT and jaxformer alternate (nanoGPT, cold, then --repeats x (warm, nanoGPT)), so a host whose speed drifts
  # over the minutes this takes drifts both columns alike; the medians are compared
  nanogpt = [run_nanogpt(args.torch_python)]
  full_cache = os.path.join(tmp, 'full_cache')
  cold = run(full_cache, os.path.join(tmp, 'full_cold'), None)[1]
  warm = []
  for i in range(args.repeats):
    warm.append(run(full_cache, os.path.join(tmp, f'full_warm{i}'), None)[1])
    nanogpt.append(run_nanogpt(args.torch_python))
  reference = statistics.median(nanogpt)
  print('| run | end to end (s), each run | median (s) | median / nanoGPT median |')
  print('|---|---|---:|---:|')
  for name, times in (('nanoGPT reference (PyTorch; 2000 steps, 9 estimates + checkpoints)', nanogpt),
                      ('jaxformer, cold cache (2000 steps, 7 estimates + the whole split at the end, 2 checkpoints)', [cold]),
                      ('jaxformer, warm cache (the same)', warm)):
    print(f'| {name} | {", ".join(f"{t:.1f}" for t in times)} | {statistics.median(times):.1f} | '
          f'{statistics.median(times) / reference:.2f}x |')

if __name__ == '__main__':
  main()
