"""model.scan_layers defaults to True in this process and, through PYTHONPATH + sitecustomize.py, in every Python
process it spawns (train.py, eval.py, python -m jaxformer.hf run by the CLI tests).

Used only when JAXFORMER_TEST_SCAN_LAYERS=1 (tests/conftest.py). The one default a test can leave alone is
configs/default.py's model.scan_layers (every recipe, tiny config and Hugging Face import starts there); it is
patched right after the module is first imported.
"""
from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import sys
import types


def _patch_default(module: types.ModuleType) -> None:
  get_config = module.get_config

  @functools.wraps(get_config)
  def scanned_default():
    config = get_config()
    config.model.scan_layers = True
    return config

  module.get_config = scanned_default


_PATCHES = {'configs.default': _patch_default}


class _PatchAfterImport(importlib.abc.MetaPathFinder):
  """Finds the real module, then applies its patch once the module body has run."""

  def __init__(self):
    self.pending = dict(_PATCHES)

  def find_spec(self, name, path=None, target=None):
    patch = self.pending.pop(name, None)
    if patch is None:
      return None
    spec = importlib.util.find_spec(name)  # this finder no longer answers for `name`
    if spec is None or spec.loader is None:
      return spec
    exec_module = spec.loader.exec_module

    def exec_then_patch(module):
      exec_module(module)
      patch(module)

    spec.loader.exec_module = exec_then_patch
    return spec


def install() -> None:
  finder = _PatchAfterImport()
  for name in list(finder.pending):
    if name in sys.modules:  # already imported: patch in place
      finder.pending.pop(name)(sys.modules[name])
  sys.meta_path.insert(0, finder)
