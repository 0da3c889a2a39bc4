"""keep_freed_memory: repeated large allocations stop page-faulting (the XLA:CPU per-call temp buffer case)."""
import json
import platform
import subprocess
import sys

import pytest

PROBE = r'''
import json, resource, sys
import numpy as np
if sys.argv[1] == 'keep':
    from jaxformer.training.host_memory import keep_freed_memory
    assert keep_freed_memory()
faults = []
for _ in range(4):  # allocate, touch and free 64 MiB, as an executable's temp buffer is per call
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = np.empty(16 * 1024 * 1024, np.float32)
    a.fill(1.0)
    del a
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(faults))
'''


def _faults(mode):
  out = subprocess.run([sys.executable, '-c', PROBE, mode], capture_output=True, text=True, check=True,
                       env={'PATH': '', 'PYTHONPATH': '.'})
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc', reason='glibc only')
def test_repeated_large_allocations_reuse_memory():
  default, kept = _faults('default'), _faults('keep')
  # 64 MiB is 16384 small pages or 32 huge ones (numpy madvises huge pages): either way dozens of faults or more
  assert min(default[1:]) >= 16, f'glibc defaults should fault the buffer in again every time: {default}'
  assert max(kept[1:]) <= min(default[1:]) // 8, f'with keep_freed_memory the buffer should be reused: {kept}'


def test_opt_out_leaves_defaults(monkeypatch):
  from jaxformer.training import host_memory
  monkeypatch.setattr(host_memory, '_applied', None)
  monkeypatch.setenv('JAXFORMER_MALLOC_DEFAULTS', '1')
  assert host_memory.keep_freed_memory() is False
  monkeypatch.setattr(host_memory, '_applied', None)
