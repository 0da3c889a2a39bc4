"""A second Ctrl-C ends training at once, even while the main thread is inside one long C call (an XLA compile),
where Python cannot run its signal handlers."""
import subprocess
import sys

from conftest import REPO

_SCRIPT = r'''
import os, signal, threading, time
import numpy as np
from jaxformer.apps.train import _StopFlag

flag = _StopFlag()
flag.install()
a = np.ones((4000, 4000), np.float32)
def ctrl_c_twice():
  time.sleep(0.5)
  os.kill(os.getpid(), signal.SIGINT)
  time.sleep(0.1)
  os.kill(os.getpid(), signal.SIGINT)
threading.Thread(target=ctrl_c_twice, daemon=True).start()
b = np.linalg.matrix_power(a / 4000.0, 64)  # seconds inside C: no Python signal handler runs before it returns
print('finished the C call', flush=True)
'''


def test_second_ctrl_c_inside_a_long_c_call_exits_at_once():
  out = subprocess.run([sys.executable, '-c', _SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 130, (out.returncode, out.stdout, out.stderr[-2000:])
  assert 'second Ctrl-C' in out.stderr and 'finished the C call' not in out.stdout
