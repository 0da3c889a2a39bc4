"""The JAXFORMER_TEST_SCAN_LAYERS hook reaches the processes the CLI tests spawn (tests/scan_layers/)."""
import os
import subprocess
import sys

from conftest import REPO

_PROBE = ('from configs import default; from jaxformer import settings; '
          'print(default.get_config().model.scan_layers, settings.default_config().model.scan_layers)')


def _probe(pythonpath: str) -> str:
  env = dict(os.environ, PYTHONPATH=pythonpath, JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, '-c', _PROBE], cwd=REPO, env=env, capture_output=True, text=True, check=True)
  return out.stdout.split()


def test_hook_turns_scan_layers_on_in_a_subprocess():
  assert _probe(str(REPO / 'tests' / 'scan_layers')) == ['True', 'True']


def test_without_the_hook_the_real_defaults_hold():
  assert _probe('') == ['False', 'False']
