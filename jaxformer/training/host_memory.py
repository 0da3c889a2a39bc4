"""Keep freed host memory in the process instead of handing it back to the OS after every step (glibc malloc).

Why: XLA:CPU allocates each executable's temporary buffer (tens of MB even for a small model's train step) on
every call. glibc serves an allocation above its mmap threshold with a fresh mmap and unmaps it on free, and it
trims the heap top above its trim threshold, so every call page-faults the whole buffer back in, zero-filled by
the kernel. On the shakespeare_char:cpu step that was ~12 ms of a ~47 ms step (benchmarks/RESULTS.md). Raising
both thresholds makes malloc reuse the memory, which is what tcmalloc and jemalloc do by default; the cost is that
the process keeps its peak host memory. GPU runs are unaffected either way (device memory has its own allocator).

Set JAXFORMER_MALLOC_DEFAULTS=1 in the environment to leave glibc's defaults alone.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
_LARGE = 2**31 - 1  # glibc >= 2.35 accepts thresholds above its old 32 MiB cap
_applied: bool | None = None


def keep_freed_memory() -> bool:
  """Raise glibc's mmap and trim thresholds once per process; True if they are (now) raised.

  A no-op (False) on non-glibc systems and when JAXFORMER_MALLOC_DEFAULTS=1.
  """
  global _applied
  if _applied is not None:
    return _applied
  _applied = False
  if os.environ.get('JAXFORMER_MALLOC_DEFAULTS', '') not in ('', '0'):
    return False
  if platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc':
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
    ok = libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(_LARGE)) == 1
    ok = libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(_LARGE)) == 1 and ok
  except (OSError, AttributeError):
    return False
  _applied = ok
  return ok
