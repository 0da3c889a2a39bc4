"""train.py's command line: misspelt --config.* keys are one clear line naming the key and the nearest keys."""
import errno
import os
import subprocess
import sys

import pytest

from configs import gpt_tiny
from jaxformer import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize('arg,expected', [
    ('--config.model.d_modle=64', 'unknown config key --config.model.d_modle; did you mean --config.model.d_model?'),
    ('--config.modle.d_model=64', 'did you mean --config.model.d_model?'),
    ('--config.train.lerning_rate=1', '--config.train.learning_rate'),
    ('--config.model.zzzz=1', 'valid keys here: model.arch,'),
])
def test_unknown_override_message(arg, expected):
  message = cli.unknown_override(gpt_tiny.get_config(), ['train.py', '--config=configs/gpt_tiny.py', arg])
  assert expected in message
  assert '\n' not in message


def test_known_overrides_pass():
  argv = ['train.py', '--config=configs/gpt_tiny.py', '--config.model.arch=encoder_decoder',
          '--config.model.position=rope', '--config.mesh.fsdp=2']
  assert cli.unknown_override(gpt_tiny.get_config(), argv) is None


def test_train_py_misspelt_key_exits_with_one_line(tmp_path):
  out = subprocess.run(
      [sys.executable, 'train.py', '--config=configs/gpt_tiny.py', f'--workdir={tmp_path}',
       '--config.train.num_stesp=5'], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert out.returncode != 0
  lines = [line for line in out.stderr.splitlines() if line.strip()]
  assert len(lines) == 1, out.stderr
  assert lines[0].startswith('error: unknown config key --config.train.num_stesp; did you mean '
                             '--config.train.num_steps'), out.stderr
  assert not os.listdir(tmp_path)  # failed before touching the workdir


def test_train_py_misspelt_eval_split_fails_at_start_up(tmp_path):
  """Splits are checked before step 1: one line naming the key, no checkpoint, no traceback."""
  out = subprocess.run(
      [sys.executable, 'train.py', '--config=configs/gpt_tiny.py', f'--workdir={tmp_path}',
       '--config.data.eval_split=valdation', '--config.model.num_layers=1', '--config.train.num_steps=2'],
      cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert out.returncode != 0
  lines = [line for line in out.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and 'Traceback' not in out.stderr, out.stderr
  assert "split 'valdation' does not exist" in lines[0] and 'data.eval_split' in lines[0], lines[0]
  assert not os.path.exists(os.path.join(tmp_path, 'checkpoints'))
  assert not os.path.exists(os.path.join(tmp_path, 'metrics.jsonl'))


@pytest.mark.parametrize('arg,expected', [
    ('--config.train.final_eval_steps=-3', 'error: train.final_eval_steps=-3 must be a positive number of batches, '
                                           '-1 (the whole split) or 0 (= train.eval_steps).'),
    ('--config.train.eval_steps=0', 'error: train.eval_steps=0 must be a positive number of batches or -1 (the '
                                    'whole split).'),
    ('--config.decode.start_id=-2', "error: decode.start_id=-2 must be a token id >= 0, or -1 for the tokenizer's."),
])
def test_bad_eval_and_decode_values_are_one_line(tmp_path, arg, expected):
  out = subprocess.run(
      [sys.executable, 'train.py', '--config=configs/gpt_tiny.py', f'--workdir={tmp_path}', arg], cwd=REPO,
      capture_output=True, text=True, timeout=120, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  lines = [line for line in out.stderr.splitlines() if line.strip()]
  assert out.returncode == 2 and len(lines) == 1 and 'Traceback' not in out.stderr, out.stderr
  assert lines[0] == expected, lines[0]


def test_unknown_recipe_variant_is_one_line(tmp_path):
  out = subprocess.run(
      [sys.executable, 'train.py', '--config=configs/shakespeare_char.py:tpu', f'--workdir={tmp_path}'],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  lines = [line for line in out.stderr.splitlines() if line.strip()]
  assert out.returncode == 2 and len(lines) == 1 and 'Traceback' not in out.stderr, out.stderr
  assert "unknown shakespeare_char variant 'tpu'; use one of: cpu, gpu" in lines[0]


def test_file_system_failures_are_recognised_through_wrappers():
  """orbax surfaces a full disk as an OSError in the cause chain or as TensorStore's ValueError text."""
  tensorstore = ValueError('RESOURCE_EXHAUSTED: Error writing local file "/w/checkpoints/2.orbax-checkpoint-tmp/d/af": '
                           "Failed to write 8972 bytes to file 7: No space left on device [os_error_code='28']")
  assert str(cli._file_system_cause(tensorstore)).startswith(
      'no space left on the device writing /w/checkpoints/2.orbax-checkpoint-tmp/d/af')
  try:
    try:
      raise PermissionError(13, 'Permission denied', '/w/metrics.jsonl')
    except OSError as e:
      raise RuntimeError('save failed') from e
  except RuntimeError as wrapped:
    assert 'permission denied writing /w/metrics.jsonl' in str(cli._file_system_cause(wrapped))
  assert cli._file_system_cause(ValueError('shapes (3,) and (4,) do not match')) is None  # a bug stays a bug
  assert cli._file_system_cause(OSError(errno.EBADF, 'Bad file descriptor')) is None


_THREAD_THEN = '''
import threading, sys
from jaxformer import cli
from jaxformer.errors import UserError

def command():
  def writer():  # an async checkpoint writer failing for the same cause as the main thread
    raise RuntimeError('Event loop is closed (background writer)')

  def native_writer():  # a C++ thread whose Python callback fails: PyErr_Print -> sys.excepthook
    try:
      raise RuntimeError('Event loop is closed (native callback)')
    except RuntimeError:
      sys.excepthook(*sys.exc_info())

  class Finalizer:  # how the observed one arrives: pybind11 reports a failed callback through sys.unraisablehook
    def __del__(self):
      raise RuntimeError('Event loop is closed (unraisable)')

  for target in (writer, native_writer, Finalizer):
    t = threading.Thread(target=target)
    t.start()
    t.join()
  if sys.argv[1] == 'user_error':
    raise UserError('no space left on device under /x', hint='free some space')
  return 'ok'

print(cli.guarded(command))
'''


@pytest.mark.parametrize('ending', ['user_error', 'success'])
def test_background_thread_tracebacks_are_held_until_the_command_ends(ending):
  """A user error is one line even when a background thread raised on the way (the disk-full flake: orbax's async
  writer); a command that ends normally still shows the thread's traceback, after its own output."""
  proc = subprocess.run([sys.executable, '-c', _THREAD_THEN, ending], cwd=REPO, capture_output=True, text=True,
                        timeout=120)
  if ending == 'user_error':
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == ['error: no space left on device under /x', 'hint: free some space'], proc.stderr
  else:
    assert proc.returncode == 0 and proc.stdout.strip() == 'ok', proc.stderr
    assert proc.stderr.count('Traceback') == 3 and 'Event loop is closed (background writer)' in proc.stderr
    assert 'Event loop is closed (native callback)' in proc.stderr and '(unraisable)' in proc.stderr
