"""Test setup: 8 virtual CPU devices so sharding tests have a real mesh to shard over.

Must run before jax is imported anywhere, which is why it lives in conftest.py.

JAXFORMER_TEST_SCAN_LAYERS=1 runs the tests with model.scan_layers=True wherever they leave it at its default:
configs/default.py's value (every recipe, tiny test config and Hugging Face import starts there), in the test process
and in the train.py / eval.py / jaxformer.hf processes the CLI tests spawn (tests/scan_layers/sitecustomize.py, via
PYTHONPATH). Tests that set the flag keep their value.
"""
import os
import pathlib

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / 'shared' / 'data'
SCAN_LAYERS = os.environ.get('JAXFORMER_TEST_SCAN_LAYERS', '') not in ('', '0')


def _force_scan_layers() -> None:
  """model.scan_layers defaults to True here and in every process the tests spawn (tests/scan_layers/)."""
  import sys

  hook_dir = str(REPO / 'tests' / 'scan_layers')
  sys.path.insert(0, hook_dir)
  os.environ['PYTHONPATH'] = os.pathsep.join(p for p in (hook_dir, os.environ.get('PYTHONPATH', '')) if p)
  import scan_layers_hook  # pylint: disable=import-outside-toplevel

  scan_layers_hook.install()


if SCAN_LAYERS:
  _force_scan_layers()


@pytest.fixture(scope='session')
def shared_data() -> pathlib.Path:
  """../shared/data beside the checkout. In CI it must exist: a missing folder fails, never skips silently."""
  if not SHARED_DATA.is_dir():
    if os.environ.get('CI'):
      pytest.fail(f'{SHARED_DATA} is missing in CI; the shared data folder must sit beside the checkout.')
    pytest.skip(f'{SHARED_DATA} not found (expected beside the checkout)')
  return SHARED_DATA


def pytest_report_header(config):
  return 'model.scan_layers forced on (JAXFORMER_TEST_SCAN_LAYERS)' if SCAN_LAYERS else None
