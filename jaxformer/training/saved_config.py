"""What a workdir's checkpoints say about themselves: their folder, the config saved with them, and their layout.

No jax, no orbax: checkpoint.py, state.py and resolve.py read saved configs through it without loading each other.
An older version's config is completed by settings.upgrade_saved.
"""
from __future__ import annotations

import json
import os

CHECKPOINT_DIR = 'checkpoints'


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(os.path.expanduser(workdir)), CHECKPOINT_DIR)


def saved_config(workdir: str, step: int | None = None) -> dict | None:
  """The config stored with checkpoint `step` (falls back to DIR/config.json); None when there is neither."""
  path = os.path.join(os.path.abspath(os.path.expanduser(workdir)), 'config.json')
  if step is not None:
    item = os.path.join(checkpoint_dir(workdir), str(step), 'config')
    for name in ('config', 'metadata') if os.path.isdir(item) else ():
      candidate = os.path.join(item, name)
      if os.path.isfile(candidate):
        path = candidate
        break
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def saved_scan_layers(workdir: str, step: int | None = None) -> bool | None:
  """The layout checkpoint `step` was written in: its config's model.scan_layers (False for configs saved before
  the key existed, which were all unrolled); None when no config was saved with it."""
  saved = saved_config(workdir, step)
  if saved is None:
    return None
  return bool(saved.get('model', {}).get('scan_layers', False))
