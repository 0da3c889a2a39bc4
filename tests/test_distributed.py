"""Subprocess tests: SIGTERM (preemption) saves and exits 0; a 2-process jax.distributed run on localhost CPU.

Run as a script (`python tests/test_distributed.py worker WORKDIR`) this file is the distributed worker.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(tempfile.gettempdir(), 'jaxformer_test_xla_cache')
STEPS = 6


def _env(devices: int, **extra) -> dict:
  env = dict(os.environ)
  # backend optimisation level 0 halves XLA:CPU compile time, which dominates these tiny runs
  env.update(XLA_FLAGS=f'--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0',
             JAX_PLATFORMS='cpu',
             PYTHONPATH=os.pathsep.join(filter(None, (REPO, os.environ.get('PYTHONPATH', '')))),
             JAX_COMPILATION_CACHE_DIR=CACHE, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0.5')
  env.update({k: str(v) for k, v in extra.items()})
  return env


def _config():
  sys.path.insert(0, REPO)
  from tests.test_train import tiny
  c = tiny('gpt_tiny', num_steps=STEPS, log_every=1, eval_every=STEPS, eval_steps=2)
  c.mesh.update(data=-1, fsdp=1, tensor=1, distributed='auto')
  return c


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _rows(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def test_two_process_run_matches_single_process(tmp_path):
  """2 processes x 2 CPU devices (coordinator on 127.0.0.1) == 1 process x 4 devices, step by step."""
  multi = str(tmp_path / 'multi')
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), 'worker', multi],
                            env=_env(2, JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}', JAX_NUM_PROCESSES=2,
                                     JAX_PROCESS_ID=i),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  try:
    outputs = [p.communicate(timeout=300)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  assert '2 process(es)' in outputs[0]

  # the same config in this process on 4 of the 8 test devices, no jax.distributed
  from jaxformer.apps.train import run
  single = str(tmp_path / 'single')
  config = _config()
  config.mesh.update(data=4, distributed='off')
  run(config, single)

  multi_rows, single_rows = _rows(multi), _rows(single)
  train_m = [r['train_loss'] for r in multi_rows if 'train_loss' in r]
  train_s = [r['train_loss'] for r in single_rows if 'train_loss' in r]
  assert len(train_m) == STEPS
  np.testing.assert_allclose(train_m, train_s, rtol=1e-5, atol=1e-5)
  eval_m = [r['eval_loss'] for r in multi_rows if 'eval_loss' in r]
  eval_s = [r['eval_loss'] for r in single_rows if 'eval_loss' in r]
  np.testing.assert_allclose(eval_m, eval_s, rtol=1e-5)
  assert os.path.isdir(os.path.join(multi, 'checkpoints', str(STEPS)))


def test_sigterm_saves_a_restorable_checkpoint_and_exits_0(tmp_path):
  workdir = str(tmp_path)
  cmd = [sys.executable, os.path.join(REPO, 'train.py'), '--config=configs/gpt_tiny.py', f'--workdir={workdir}',
         '--config.model.num_layers=1', '--config.model.d_model=32', '--config.model.num_heads=2',
         '--config.model.d_ff=64', '--config.model.max_len=32', '--config.data.seq_len=32',
         '--config.train.batch_size=8', '--config.train.num_steps=100000', '--config.train.log_every=1',
         '--config.train.eval_every=100000', '--config.checkpoint.every_steps=100000', '--config.mesh.distributed=off']
  proc = subprocess.Popen(cmd, cwd=REPO, env=_env(1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  metrics = os.path.join(workdir, 'metrics.jsonl')
  deadline = time.time() + 240
  try:
    while time.time() < deadline and proc.poll() is None:
      if os.path.exists(metrics) and len(open(metrics).readlines()) >= 3:
        break
      time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 0, out[-3000:]
  assert 'SIGTERM' in out

  from jaxformer import sharding as shd
  from jaxformer.training import checkpoint
  from jaxformer.training import state as state_lib
  step = checkpoint.latest_step(workdir)
  logged = max(r['step'] for r in _rows(workdir))
  assert step is not None and step >= 3 and step >= logged
  config = checkpoint.saved_config(workdir)
  import ml_collections
  config = ml_collections.ConfigDict(config)
  model, restored = state_lib.restore_model(workdir, config, shd.make_mesh(config))
  assert restored == step


def _worker(workdir: str) -> None:
  import jax
  jax.config.update('jax_compilation_cache_dir', CACHE)
  from jaxformer.apps.train import run
  result = run(_config(), workdir)
  assert result['step'] == STEPS, result


if __name__ == '__main__':
  if len(sys.argv) == 3 and sys.argv[1] == 'worker':
    _worker(sys.argv[2])
  else:
    sys.exit('usage: python tests/test_distributed.py worker WORKDIR')
