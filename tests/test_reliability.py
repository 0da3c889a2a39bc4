"""Faults and bad input through the CLIs (subprocess train.py / eval.py): exit code, at most two lines on stderr and
no traceback, and good checkpoints unchanged (file checksums before/after).

One trained workdir (8 gpt_tiny-sized steps, checkpoints at 4, 6, 8) is made once and copied per test.
"""
import hashlib
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = ['--config=configs/gpt_tiny.py', '--config.model.num_layers=1', '--config.model.d_model=32',
        '--config.model.d_ff=64', '--config.model.max_len=32', '--config.data.seq_len=32', '--config.data.prefetch=1',
        '--config.train.batch_size=8', '--config.train.warmup_steps=2', '--config.train.log_every=1',
        '--config.train.eval_every=4', '--config.train.eval_steps=1', '--config.checkpoint.every_steps=2',
        '--config.checkpoint.async_save=False', '--config.mesh.data=1', '--config.mesh.fsdp=1',
        '--config.mesh.tensor=1']
ENV = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': ''}


def train_args(workdir, *extra, num_steps=8):
  return [sys.executable, 'train.py', *TINY, f'--workdir={workdir}', f'--config.train.num_steps={num_steps}', *extra]


def cli(args, timeout=300):
  return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=ENV)


def checksums(workdir):
  """sha256 of every checkpoint file, by path relative to DIR/checkpoints."""
  root = pathlib.Path(workdir) / 'checkpoints'
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob('*'))
          if p.is_file()}


def of_step(sums, step):
  return {k: v for k, v in sums.items() if k.split('/')[0] == str(step)}


def assert_user_error(proc, *needles):
  """Exit status 2, at most two lines on stderr (error + hint), no traceback anywhere, the needles in line 1."""
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
  assert 1 <= len(lines) <= 2 and 'Traceback' not in proc.stderr + proc.stdout, proc.stderr[-3000:]
  assert lines[0].startswith('error: '), lines
  for needle in needles:
    assert needle in lines[0], lines[0]
  return lines


def train_losses(workdir):
  rows = [json.loads(line) for line in (pathlib.Path(workdir) / 'metrics.jsonl').read_text().splitlines()]
  return {r['step']: r['train_loss'] for r in rows if 'train_loss' in r}


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('trained') / 'run'
  proc = cli(train_args(workdir))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['4', '6', '8']
  return workdir


@pytest.fixture
def copy(trained, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(trained, workdir)
  return workdir


def test_first_row_records_parameter_counts(trained):
  rows = [json.loads(line) for line in (trained / 'metrics.jsonl').read_text().splitlines()]
  assert rows[0]['step'] == 1 and rows[0]['num_params'] == rows[0]['num_trainable_params'] > 1000
  assert all('num_params' not in r for r in rows[1:])


def test_nan_run_stops_keeps_finite_checkpoints_and_resumes_with_lower_lr(copy):
  before = checksums(copy)
  proc = cli(train_args(copy, '--config.train.learning_rate=1e9', '--config.train.max_bad_steps=2', num_steps=20))
  lines = assert_user_error(proc, 'training diverged', 'not finite')
  assert len(lines) == 2 and 'lower learning rate' in lines[1] and '--config.train.learning_rate=' in lines[1]
  after = checksums(copy)
  steps = sorted(int(s) for s in os.listdir(copy / 'checkpoints'))
  for step in (4, 6, 8):  # the good checkpoints are unchanged unless rotated out by a finite one
    if step in steps:
      assert of_step(after, step) == of_step(before, step)
  rows = [json.loads(line) for line in (copy / 'metrics.jsonl').read_text().splitlines()]
  bad = [r['step'] for r in rows if 'train_loss' in r and None in (r['train_loss'], r['grad_norm'])]
  assert bad and bad[0] > 8 and max(steps) < bad[0]  # no checkpoint from the bad steps on
  assert max(r['step'] for r in rows) < bad[0] + 2  # stopped within max_bad_steps
  # resuming from the last good checkpoint with a lower learning rate works and stays finite
  proc = cli(train_args(copy, '--config.train.learning_rate=1e-3', num_steps=max(steps) + 2))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f'resumed from checkpoint step {max(steps)}' in proc.stdout
  losses = train_losses(copy)
  assert all(losses[s] is not None for s in range(max(steps) + 1, max(steps) + 3))


def test_flipped_byte_in_newest_checkpoint_falls_back_to_previous(copy):
  before = checksums(copy)
  data_files = sorted((p for p in (copy / 'checkpoints' / '8' / 'params').rglob('*') if p.is_file()),
                      key=lambda p: p.stat().st_size)
  target = data_files[-1]
  raw = bytearray(target.read_bytes())
  raw[len(raw) // 2] ^= 0xFF
  target.write_bytes(bytes(raw))
  # eval.py (read-only) skips it and scores step 6, moving nothing
  proc = cli([sys.executable, 'eval.py', *TINY, f'--workdir={copy}'])
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr and 'checksum mismatch' in proc.stdout
  assert json.loads((copy / 'eval.json').read_text())['step'] == 6
  assert os.path.isdir(copy / 'checkpoints' / '8')
  # train.py moves it aside with one line, resumes from 6 and re-saves 8
  proc = cli(train_args(copy))
  assert proc.returncode == 0, proc.stderr[-3000:]
  warnings = [line for line in proc.stdout.splitlines() if 'unreadable or corrupt' in line]
  assert len(warnings) == 1 and 'Traceback' not in proc.stderr, proc.stdout
  assert 'resumed from checkpoint step 6' in proc.stdout
  assert os.path.isdir(copy / 'checkpoints_unreadable' / '8')
  assert of_step(checksums(copy), 6) == of_step(before, 6)
  assert sorted(os.listdir(copy / 'checkpoints')) == ['4', '6', '8']


def test_second_train_py_on_a_workdir_refuses(copy):
  """A live run's lock (this test process holds it) makes a second train.py refuse, naming the holder."""
  (copy / 'train.lock').write_text(json.dumps({'host': socket.gethostname(), 'pid': os.getpid()}))
  assert_user_error(cli(train_args(copy)), 'in use by another train.py', f'pid {os.getpid()}')


def test_sigint_saves_and_resumes_exactly(trained, tmp_path):
  workdir = tmp_path / 'run'
  # No compilation cache: the first step compiles for a while, so the Ctrl-C lands before the run is over.
  first = subprocess.Popen(train_args(workdir, '--config.train.compilation_cache_dir='), cwd=REPO, env=ENV,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    for line in first.stdout:  # the run has installed its handlers and is about to compile the first step
      if 'parameters' in line:
        break
    first.send_signal(signal.SIGINT)  # lands during compilation / the first steps
    out, err = first.communicate(timeout=300)
  finally:
    if first.poll() is None:
      first.kill()
  assert first.returncode == 130, err[-3000:]
  assert 'Traceback' not in err and 'SIGINT: saved checkpoint at step' in out, (out, err)
  assert not (workdir / 'train.lock').exists()
  stopped = int(out.split('SIGINT: saved checkpoint at step ')[1].split(';')[0])
  assert 1 <= stopped < 8
  proc = cli(train_args(workdir))  # resumes and finishes: the same losses as the uninterrupted run, bit for bit
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f'resumed from checkpoint step {stopped}' in proc.stdout
  assert train_losses(workdir) == train_losses(trained)


def test_stale_lock_of_a_dead_process_is_replaced(copy):
  dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True, text=True)
  (copy / 'train.lock').write_text(json.dumps({'host': socket.gethostname(), 'pid': int(dead.stdout)}))
  proc = cli(train_args(copy))  # already at step 8: nothing to train, but it must get past the lock
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'removed a stale lock' in proc.stdout and not (copy / 'train.lock').exists()


def test_disk_full_at_the_metrics_writer_is_one_line(copy):
  before = checksums(copy)
  boom = ('import errno, runpy, sys\n'  # ENOSPC at the writer, then train.py as usual
          'from jaxformer.training import writers\n'
          'def write(self, step, metrics):\n'
          '  raise OSError(errno.ENOSPC, "No space left on device", self.path)\n'
          'writers.MetricWriter.write = write\n'
          'sys.argv = sys.argv[1:]\n'
          'runpy.run_path("train.py", run_name="__main__")\n')
  proc = cli([sys.executable, '-c', boom, *train_args(copy, num_steps=10)[1:]])
  assert_user_error(proc, 'no space left', 'metrics.jsonl', 'free some space')
  assert of_step(checksums(copy), 8) == of_step(before, 8)


def test_another_model_on_a_workdir_is_refused_before_anything_is_written(copy):
  before, config_json = checksums(copy), (copy / 'config.json').read_bytes()
  proc = cli(train_args(copy, '--config.model.d_model=64'))
  assert_user_error(proc, 'holds checkpoints of another model', 'model.d_model=32 there, 64 here')
  assert (copy / 'config.json').read_bytes() == config_json and checksums(copy) == before


def test_changed_data_source_with_a_cached_tokenizer_is_one_line(copy, tmp_path):
  text = tmp_path / 'corpus.txt'
  text.write_text('some other text entirely\n' * 200)
  proc = cli(train_args(copy, f'--config.data.source=text:{text}'))
  assert_user_error(proc, 'cached tokenizer', "data.source='builtin:lm'", 'new --workdir')


def test_out_of_range_values_fail_before_the_workdir_is_touched(tmp_path):
  for flag, key in (('--config.train.learning_rate=-0.1', 'train.learning_rate'),
                    ('--config.train.weight_decay=-1.0', 'train.weight_decay'),
                    ('--config.model.dropout=1.5', 'model.dropout')):
    proc = cli(train_args(tmp_path / 'new', flag))
    assert_user_error(proc, key)
  assert not (tmp_path / 'new').exists()


def test_a_run_without_checkpoints_starts_a_fresh_metrics_file(copy):
  old = (copy / 'metrics.jsonl').read_text()
  shutil.rmtree(copy / 'checkpoints')
  proc = cli(train_args(copy, num_steps=2))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert sorted(train_losses(copy)) == [1, 2]
  kept = list(copy.glob('metrics.*.jsonl.old'))
  assert len(kept) == 1 and kept[0].read_text() == old


def test_eval_json_holds_null_for_non_finite_values(tmp_path, capsys):
  from jaxformer.apps import evaluate as evaluation
  results = evaluation.finite_or_null({'step': 3, 'loss': float('nan'), 'perplexity': float('inf'), 'bleu': 1.5})
  assert results == {'step': 3, 'loss': None, 'perplexity': None, 'bleu': 1.5}
  assert 'loss, perplexity not finite' in capsys.readouterr().out
  path = tmp_path / 'e.json'
  evaluation._write_json(str(path), results)
  assert json.loads(path.read_text())['loss'] is None
  with pytest.raises(ValueError):  # strict JSON: a NaN that slipped through is a bug, not a silent 'NaN'
    evaluation._write_json(str(path), {'loss': float('nan')})


@pytest.fixture
def small_disk(tmp_path):
  """A 600 kB tmpfs (needs root and mount rights; skipped elsewhere: the simulated ENOSPC test covers the path)."""
  mount = tmp_path / 'disk'
  mount.mkdir()
  if os.geteuid() != 0 or subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=600k', 'tmpfs', str(mount)],
                                         capture_output=True).returncode:
    pytest.skip('cannot mount a small tmpfs here')
  yield mount
  subprocess.run(['umount', str(mount)], check=True)


def test_real_disk_full_during_checkpointing_is_one_line(small_disk):
  proc = cli(train_args(small_disk / 'run', '--config.checkpoint.every_steps=1', '--config.checkpoint.keep=100',
                        '--config.checkpoint.async_save=True', num_steps=40))
  assert_user_error(proc, 'no space left', 'free some space')


# ------------------------------------------------------------------------------ in-process: the loop's own rules
def _tiny(**train):
  from tests.test_train import tiny
  return tiny('gpt_tiny', **train)


def test_an_error_at_an_eval_step_is_raised_after_that_steps_checkpoint(tmp_path, monkeypatch):
  from jaxformer import data
  from jaxformer.apps import evaluate as evaluation
  from jaxformer.training import checkpoint
  from jaxformer.apps.train import run

  def broken(self, params, rest, **kwargs):
    raise data.DataError('validation text broke')
  monkeypatch.setattr(evaluation.Evaluator, 'training_row', broken)
  with pytest.raises(data.DataError, match='validation text broke'):
    run(_tiny(num_steps=6, eval_every=3), str(tmp_path))
  assert checkpoint.all_steps(str(tmp_path)) == [3]  # checkpoint.every_steps=1000: saved because eval failed


def test_skip_bad_steps_keeps_parameters_finite_until_max_bad_steps(tmp_path):
  import numpy as np
  from flax import nnx
  from jax import tree
  from jaxformer import sharding as shd
  from jaxformer.training import checkpoint
  from jaxformer.training import state as state_lib
  from jaxformer.apps.train import run
  from jaxformer.errors import NonFiniteError
  config = _tiny(num_steps=30, learning_rate=1e9, max_bad_steps=3, skip_bad_steps=True, log_every=1)
  config.checkpoint.every_steps = 1
  with pytest.raises(NonFiniteError, match=r'3 non-finite step\(s\) in a row'):  # not "parameters ... not finite"
    run(config, str(tmp_path))
  model, step = state_lib.restore_model(str(tmp_path), config, shd.make_mesh(config))
  params = tree.leaves(nnx.state(model, nnx.Param))
  assert step >= 1 and all(np.isfinite(np.asarray(x)).all() for x in params)
  # resuming with skip_bad_steps flipped would not fit the saved optimizer state: refused up front
  config.train.skip_bad_steps = False
  with pytest.raises(Exception, match=r'train.skip_bad_steps=True there, False here'):
    run(config, str(tmp_path))
