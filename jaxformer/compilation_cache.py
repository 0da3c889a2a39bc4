"""JAX's persistent compilation cache: a rerun or resume of the same config loads its compiled steps from disk
instead of compiling them again (seconds on CPU, minutes for large models on accelerators).

train.compilation_cache_dir picks the folder (default DEFAULT_DIR, a user cache directory shared by runs; the
cache key covers the program, the jax/XLA versions and the devices, so sharing is safe); '' turns it off.
It must be set before the first compilation of the process, which is why resolve() calls `enable` first.
"""
from __future__ import annotations

import logging
import os

import jax

DEFAULT_DIR = os.path.join('~', '.cache', 'jaxformer', 'jax_cache')
# JAX skips programs that compiled faster than this; its default (1 s) would skip most CPU-sized steps, whose
# compile time is what a quick experiment waits for.
MIN_COMPILE_TIME_SECS = 0.2


def enable(cache_dir: str | None) -> str | None:
  """Points JAX's persistent cache at `cache_dir` (~ and $VARS expanded; created if missing); '' or None turns
  it off. Returns the folder in use, or None."""
  if not cache_dir:
    jax.config.update('jax_enable_compilation_cache', False)
    return None
  path = os.path.abspath(os.path.expandvars(os.path.expanduser(cache_dir)))
  os.makedirs(path, exist_ok=True)
  jax.config.update('jax_enable_compilation_cache', True)
  jax.config.update('jax_compilation_cache_dir', path)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', MIN_COMPILE_TIME_SECS)
  logging.info('persistent compilation cache: %s', path)
  return path
