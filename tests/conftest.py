"""Test setup: 8 virtual CPU devices so sharding tests have a real mesh to shard over.

Must run before jax is imported anywhere, which is why it lives in conftest.py.
"""
import os
import pathlib

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / 'shared' / 'data'


@pytest.fixture(scope='session')
def shared_data() -> pathlib.Path:
  """../shared/data beside the checkout. In CI it must exist: a missing folder fails, never skips silently."""
  if not SHARED_DATA.is_dir():
    if os.environ.get('CI'):
      pytest.fail(f'{SHARED_DATA} is missing in CI; the shared data folder must sit beside the checkout.')
    pytest.skip(f'{SHARED_DATA} not found (expected beside the checkout)')
  return SHARED_DATA
