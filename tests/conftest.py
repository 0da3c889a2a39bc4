"""Test setup: 8 virtual CPU devices so sharding tests have a real mesh to shard over.

Must run before jax is imported anywhere, which is why it lives in conftest.py.

JAXFORMER_TEST_SCAN_LAYERS=1 runs the tests with model.scan_layers=True wherever they leave it at its default:
configs/default.py's value (every recipe and tiny test config starts there) and the one Hugging Face imports get
(jaxformer.hf's runtime defaults). Tests that set the flag themselves keep their value; train.py / eval.py run as
subprocesses see the real defaults.
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
  """model.scan_layers defaults to True for this session (see the module docstring)."""
  import functools

  from configs import default
  from jaxformer import hf

  get_config = default.get_config

  @functools.wraps(get_config)
  def scanned_default():
    config = get_config()
    config.model.scan_layers = True
    return config

  default.get_config = scanned_default
  hf._RUNTIME_DEFAULTS['scan_layers'] = True  # pylint: disable=protected-access


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
