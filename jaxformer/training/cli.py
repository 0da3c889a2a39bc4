"""Command-line helpers for train.py: misspelt --config.* keys become one clear line, not a traceback."""
from __future__ import annotations

import difflib
import importlib.util
import os
import sys
from typing import Sequence

import ml_collections


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """Loads a recipe like config_flags does: `path[:arg]`, calling get_config() (or get_config(arg))."""
  path, _, arg = path.partition(':')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'--config={path}: no such file; recipes live in configs/ (e.g. configs/gpt_tiny.py).')
  repo = os.path.dirname(os.path.dirname(os.path.abspath(path)))
  if repo not in sys.path:
    sys.path.insert(0, repo)
  spec = importlib.util.spec_from_file_location('_jaxformer_recipe', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def leaf_keys(config: ml_collections.ConfigDict, prefix: str = '') -> list[str]:
  keys = []
  for key, value in config.items():
    full = f'{prefix}{key}'
    keys.append(full)
    if isinstance(value, ml_collections.ConfigDict):
      keys += leaf_keys(value, full + '.')
  return keys


def unknown_override(config: ml_collections.ConfigDict, argv: Sequence[str], flag: str = 'config') -> str | None:
  """The error line for the first --config.<key>=... whose key is not in `config`, or None if all exist."""
  keys = leaf_keys(config)
  known = set(keys)
  for arg in argv[1:]:
    if not arg.startswith(f'--{flag}.'):
      continue
    key = arg[len(flag) + 3:].split('=', 1)[0]
    if key in known:
      continue
    parent, _, leaf = key.rpartition('.')
    if parent in known or not parent:  # a wrong last component: compare with its siblings
      siblings = [k for k in keys if k.rpartition('.')[0] == parent]
      close = difflib.get_close_matches(leaf, [k.rpartition('.')[2] for k in siblings], n=3, cutoff=0.5)
      close = [f'{parent}.{c}' if parent else c for c in close]
    else:  # a wrong section: compare whole keys of the same depth
      siblings = [k for k in keys if '.' not in k]
      close = difflib.get_close_matches(key, [k for k in keys if k.count('.') == key.count('.')], n=3, cutoff=0.6)
    if close:
      hint = f'did you mean {" or ".join(f"--{flag}.{c}" for c in close)}?'
    else:
      hint = f'valid keys here: {", ".join(siblings[:24])}'
    return f'unknown config key --{flag}.{key}; {hint}'
  return None


def check_overrides(argv: Sequence[str], flag: str = 'config') -> None:
  """Exits with status 1 and one line on stderr when a --config.<key> override names no key of the recipe."""
  path = None
  for i, arg in enumerate(argv[1:], start=1):
    if arg.startswith(f'--{flag}='):
      path = arg.split('=', 1)[1]
    elif arg == f'--{flag}' and i + 1 < len(argv):
      path = argv[i + 1]
  if path is None:
    return
  try:
    config = load_config_file(path)
  except (FileNotFoundError, ValueError) as e:  # ValueError: a recipe's get_config rejects its argument
    sys.exit(f'error: {e}')
  message = unknown_override(config, argv, flag)
  if message:
    sys.exit(f'error: {message}')
