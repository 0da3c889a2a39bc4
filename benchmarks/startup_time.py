"""Time to the first train step and wall time of a short shakespeare_char `cpu` run, cold vs warm persistent
compilation cache (train.compilation_cache_dir), one table.

  python benchmarks/startup_time.py                 # 10 steps; cache in a fresh temporary folder
  python benchmarks/startup_time.py --steps=50

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


def run(cache_dir: str, workdir: str, steps: int) -> tuple[float, float]:
  """(seconds to the first logged step, seconds end to end) of one train.py process."""
  cmd = [sys.executable, 'train.py', '--config=configs/shakespeare_char.py:cpu', f'--workdir={workdir}',
         f'--config.train.num_steps={steps}', '--config.train.log_every=1', f'--config.train.eval_every={steps}',
         f'--config.checkpoint.every_steps={steps}', f'--config.train.compilation_cache_dir={cache_dir}',
         '--config.train.steps_per_call=1']
  start = time.perf_counter()
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=dict(os.environ, JAX_PLATFORMS='cpu'))
  first = None
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if first is None and line.startswith('step 1/'):
      first = time.perf_counter() - start
  proc.wait()
  total = time.perf_counter() - start
  if proc.returncode:
    raise SystemExit(''.join(lines[-30:]))
  return (first if first is not None else float('nan')), total


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--steps', type=int, default=10)
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


if __name__ == '__main__':
  main()
