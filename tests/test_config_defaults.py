"""Every config key has one default, in configs/default.py: the typed sections the library receives have exactly its
keys, the keys the library reads exist there, and no library code carries a fallback of its own (`.get(key,
default)` on a config section) outside settings.upgrade_saved, the one reader of older saved configs."""
import ast
import dataclasses
import os
import re

import ml_collections
import pytest

from configs import default
from jaxformer import settings

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'jaxformer')
SECTION_NAMES = tuple(settings.SECTIONS)


def _library_files():
  for folder, _, files in os.walk(ROOT):
    for name in files:
      if name.endswith('.py'):
        yield os.path.join(folder, name)


def test_typed_sections_have_exactly_the_default_keys():
  config = default.get_config()
  assert set(config.keys()) == {'seed', *SECTION_NAMES}
  for name, cls in settings.SECTIONS.items():
    fields = {f.name for f in dataclasses.fields(cls)}
    assert fields == set(config[name].keys()), (name, fields ^ set(config[name].keys()))


def test_fill_gives_every_key_one_value_from_default_py():
  filled = settings.fill({'train': {'batch_size': 4}})
  assert filled.train.batch_size == 4
  assert filled.train.max_bad_steps == default.get_config().train.max_bad_steps == 3  # one value (was 1 elsewhere)
  typed = settings.from_config(filled)
  assert dataclasses.is_dataclass(typed) and hash(typed) == hash(settings.from_config(settings.fill({'train': {
      'batch_size': 4}})))
  with pytest.raises(dataclasses.FrozenInstanceError):
    typed.train.batch_size = 8  # frozen: the library cannot change a run's settings


def test_a_misspelt_key_in_a_recipe_is_one_config_error():
  from jaxformer.errors import ConfigError
  with pytest.raises(ConfigError, match=r'unknown config key train.batchsize'):
    settings.fill({'train': {'batchsize': 4}})


def test_old_saved_configs_are_upgraded_in_one_place():
  saved = default.get_config().to_dict()
  del saved['peft'], saved['train']['max_bad_steps'], saved['model']['head']
  upgraded = settings.upgrade_saved(saved)
  assert upgraded.peft.method == 'none' and upgraded.model.head == 'lm' and upgraded.train.max_bad_steps == 3


_ATTRIBUTE_READ = re.compile(r'\bconfig\.(' + '|'.join(SECTION_NAMES) + r')\.([a-z_]+)\b')


def test_every_key_the_library_reads_is_in_default_py():
  config = default.get_config()
  unknown = []
  for path in _library_files():
    with open(path, encoding='utf-8') as f:
      text = f.read()
    for section, key in _ATTRIBUTE_READ.findall(text):
      value = config[section]
      if key not in value and not hasattr(ml_collections.ConfigDict, key) and key not in ('items', 'keys'):
        unknown.append(f'{os.path.relpath(path, ROOT)}: config.{section}.{key}')
  assert not unknown, unknown


def _fallback_reads(tree: ast.AST) -> list[str]:
  """`<x>.get('key', default)` where <x> names a config section (config.train, train, decode, ...)."""
  found = []
  for node in ast.walk(tree):
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == 'get'
        and len(node.args) == 2 and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
      owner = ast.unparse(node.func.value)
      if owner.split('.')[-1] in SECTION_NAMES or owner == 'config':
        found.append(f'{owner}.get({node.args[0].value!r}, ...) at line {node.lineno}')
  return found


def test_no_library_code_carries_its_own_default():
  bad = []
  for path in _library_files():
    if os.path.basename(path) == 'settings.py':
      continue  # upgrade_saved: the one reader of older configs
    with open(path, encoding='utf-8') as f:
      tree = ast.parse(f.read(), path)
    bad += [f'{os.path.relpath(path, ROOT)}: {b}' for b in _fallback_reads(tree)]
  assert not bad, bad


def test_the_fallback_check_can_fail():
  tree = ast.parse("steps = config.train.get('steps_per_call', 1)\nx = hf.get('n_layer', 2)\n")
  assert _fallback_reads(tree) == ["config.train.get('steps_per_call', ...) at line 1"]


def test_a_recipe_with_a_key_default_py_lacks_is_one_line_through_the_cli(tmp_path):
  """A recipe file (not a --config.* flag) that sets a key configs/default.py does not have: train.py stops before
  anything is written, with one line naming the key."""
  import subprocess
  import sys
  repo = os.path.dirname(ROOT)
  recipe = tmp_path / 'recipe.py'
  recipe.write_text('from configs import gpt_tiny\n\n\ndef get_config():\n  config = gpt_tiny.get_config()\n'
                    '  config.train.warmup_step = 10\n  return config\n')
  workdir = tmp_path / 'run'
  out = subprocess.run([sys.executable, 'train.py', f'--config={recipe}', f'--workdir={workdir}'], cwd=repo,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 2, out.stderr
  lines = [line for line in out.stderr.splitlines() if line.strip()]
  assert lines == ['error: unknown config key train.warmup_step; see configs/default.py for the keys of train.'], lines
  assert not (workdir / 'checkpoints').exists()
