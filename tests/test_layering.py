"""The layering rule of README's Layout section, read from the source: imports point down, and nothing imports in a
circle, counting imports inside functions (only `if TYPE_CHECKING:` blocks, which never run, are left out).

Floors, lowest first; a module may import its own floor (without a cycle) and any floor below:
  bottom        errors, metrics, special_tokens, logical, compilation_cache
  library       model/, data/, peft/, hf/, heads/, align/ (preference and RL objectives), training/ (step, losses,
                optimizer, checkpoint I/O, ...),
                evaluation (the Evaluator), decoding, likelihood (continuation scoring), sharding, flops, settings (the
                typed config sections)
  resolution    config (validate), resolve
  run state     training/state.py: where parameters come from
  applications  apps/ (the train loop, the eval app, export), cli, hf/__main__ (python -m jaxformer.hf)
"""
from __future__ import annotations

import ast
import os
import textwrap

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'jaxformer')

FLOORS = (
    ('bottom', ('jaxformer', 'jaxformer.errors', 'jaxformer.metrics', 'jaxformer.special_tokens', 'jaxformer.logical',
                'jaxformer.compilation_cache')),
    ('library', ('jaxformer.model', 'jaxformer.data', 'jaxformer.peft', 'jaxformer.hf', 'jaxformer.heads', 'jaxformer.align',
                 'jaxformer.training', 'jaxformer.evaluation', 'jaxformer.decoding', 'jaxformer.likelihood',
                 'jaxformer.sharding', 'jaxformer.flops', 'jaxformer.settings', 'jaxformer.voting')),
    ('resolution', ('jaxformer.config', 'jaxformer.resolve')),
    ('run state', ('jaxformer.training.state',)),
    ('applications', ('jaxformer.apps', 'jaxformer.cli', 'jaxformer.hf.__main__')),
)
# Packages that must not reach each other whatever the floors say (the "done when").
FORBIDDEN = (
    ('jaxformer.training', ('jaxformer.evaluation', 'jaxformer.resolve', 'jaxformer.config', 'jaxformer.apps',
                            'jaxformer.cli')),
    ('jaxformer.peft', ('jaxformer.training',)),
    ('jaxformer.hf', ('jaxformer.training',)),
)


def _within(module: str, prefix: str) -> bool:
  return module == prefix or module.startswith(prefix + '.')


def floor_of(module: str) -> int:
  """The floor of the longest matching prefix (training.state sits above training/)."""
  best, level = -1, None
  for i, (_, prefixes) in enumerate(FLOORS):
    for prefix in prefixes:
      if _within(module, prefix) and len(prefix) > best:
        best, level = len(prefix), i
  assert level is not None, f'{module} is on no floor of tests/test_layering.py; add it to FLOORS'
  return level


def modules(root: str = ROOT) -> dict[str, str]:
  """Dotted module name -> file path, for every .py file under root (a package is its __init__)."""
  out = {}
  base = os.path.dirname(root)
  for folder, _, files in os.walk(root):
    for name in files:
      if name.endswith('.py'):
        path = os.path.join(folder, name)
        dotted = os.path.relpath(path, base)[:-3].replace(os.sep, '.')
        out[dotted[:-len('.__init__')] if dotted.endswith('.__init__') else dotted] = path
  return out


class _Imports(ast.NodeVisitor):
  def __init__(self, module: str, is_package: bool, known: set[str]):
    self.package = module if is_package else module.rpartition('.')[0]
    self.known, self.found = known, set()

  def visit_If(self, node: ast.If) -> None:  # `if TYPE_CHECKING:` never runs
    test = node.test
    if (isinstance(test, ast.Name) and test.id == 'TYPE_CHECKING') or (
        isinstance(test, ast.Attribute) and test.attr == 'TYPE_CHECKING'):
      for child in node.orelse:
        self.visit(child)
      return
    self.generic_visit(node)

  def _add(self, name: str) -> None:
    while name and name not in self.known:  # `import jaxformer.model.heads.X` -> the module that exists
      name = name.rpartition('.')[0]
    if name:
      self.found.add(name)

  def visit_Import(self, node: ast.Import) -> None:
    for alias in node.names:
      self._add(alias.name)

  def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
    if node.level:
      parts = self.package.split('.')
      base = '.'.join(parts[:len(parts) - node.level + 1])
      source = f'{base}.{node.module}' if node.module else base
    else:
      source = node.module or ''
    for alias in node.names:  # `from pkg import submodule` imports the submodule, else a name of pkg
      full = f'{source}.{alias.name}'
      self._add(full if full in self.known else source)


def import_graph(root: str = ROOT) -> dict[str, set[str]]:
  """module -> the jaxformer modules it imports (anywhere in the file)."""
  found = modules(root)
  known = set(found)
  graph = {}
  for name, path in found.items():
    with open(path, encoding='utf-8') as f:
      tree = ast.parse(f.read(), path)
    visitor = _Imports(name, path.endswith('__init__.py'), known)
    visitor.visit(tree)
    graph[name] = {m for m in visitor.found if m != name and m.startswith('jaxformer')}
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import cycle as [a, b, ..., a], or None."""
  state: dict[str, int] = {}
  stack: list[str] = []

  def visit(node: str) -> list[str] | None:
    state[node] = 1
    stack.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == 1:
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state and (cycle := visit(nxt)):
        return cycle
    stack.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state and (cycle := visit(node)):
      return cycle
  return None


def violations(graph: dict[str, set[str]]) -> list[str]:
  """Upward imports and forbidden reaches, one line each."""
  bad = []
  for module, targets in sorted(graph.items()):
    for target in sorted(targets):
      if _within(module, target) and target != module:
        continue  # a module importing its own package's __init__ names (e.g. jaxformer.peft.lora -> jaxformer.peft)
      if floor_of(target) > floor_of(module):
        bad.append(f'{module} ({FLOORS[floor_of(module)][0]}) imports {target} ({FLOORS[floor_of(target)][0]})')
      for source, banned in FORBIDDEN:
        if _within(module, source) and any(_within(target, b) for b in banned) and not _within(target, source):
          bad.append(f'{module} imports {target}: {source} must not reach {", ".join(banned)}')
  return bad


def test_jaxformer_has_no_import_cycle():
  cycle = find_cycle(import_graph())
  assert cycle is None, 'import cycle: ' + ' -> '.join(cycle)


def test_imports_point_down():
  bad = violations(import_graph())
  assert not bad, '\n'.join(bad)


def _write(root: str, files: dict[str, str]) -> str:
  for rel, text in files.items():
    path = os.path.join(root, 'jaxformer', rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
      f.write(textwrap.dedent(text))
  return os.path.join(root, 'jaxformer')


def test_a_planted_cycle_through_a_function_import_is_found(tmp_path):
  root = _write(str(tmp_path), {
      '__init__.py': '',
      'model/__init__.py': '',
      'model/a.py': 'from jaxformer.model import b\n',
      'model/b.py': 'def f():\n  from jaxformer.model import a  # late import: still a cycle\n',
      'model/c.py': 'from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n  from jaxformer.model import a\n',
  })
  graph = import_graph(root)
  assert find_cycle(graph) == ['jaxformer.model.a', 'jaxformer.model.b', 'jaxformer.model.a']
  assert 'jaxformer.model.a' not in graph['jaxformer.model.c']  # TYPE_CHECKING imports never run


def test_a_planted_upward_import_is_found(tmp_path):
  root = _write(str(tmp_path), {
      '__init__.py': '', 'apps/__init__.py': '', 'apps/train.py': '', 'training/__init__.py': '',
      'training/step.py': 'import jaxformer.apps.train\n', 'peft/__init__.py': 'from ..training import step\n',
  })
  bad = violations(import_graph(root))
  assert any('jaxformer.training.step (library) imports jaxformer.apps.train (applications)' in b for b in bad), bad
  assert any(b.startswith('jaxformer.peft imports jaxformer.training.step') for b in bad), bad


@pytest.mark.parametrize('module,floor', [('jaxformer.training.state', 'run state'), ('jaxformer.training.step',
                                                                                         'library'),
                                          ('jaxformer.hf.__main__', 'applications'), ('jaxformer.errors', 'bottom')])
def test_floors(module, floor):
  assert FLOORS[floor_of(module)][0] == floor
