"""What jaxformer imports unconditionally at module level is a runtime dependency in pyproject.toml: the README's
quick start installs `pip install -e .` without the test extra, so a package only the test extra brings in (as
jinja2 once was) breaks it while the suite passes."""
import ast
import importlib.metadata
import pathlib
import re
import sys
import tomllib

REPO = pathlib.Path(__file__).resolve().parents[1]


def _top_level_imports(path: pathlib.Path) -> set[str]:
  """Top-level package names imported in the module body (not inside functions or try blocks: optional extras)."""
  names = set()
  for node in ast.parse(path.read_text(encoding='utf-8')).body:
    if isinstance(node, ast.Import):
      names.update(alias.name.split('.')[0] for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      names.add(node.module.split('.')[0])
  return names


def _normalise(name: str) -> str:
  return re.sub(r'[-_.]+', '-', name).lower()


def test_module_level_imports_are_runtime_dependencies():
  declared = {_normalise(re.split(r'[<>=!~;\[ ]', d, maxsplit=1)[0])
              for d in tomllib.loads((REPO / 'pyproject.toml').read_text())['project']['dependencies']}
  distributions = importlib.metadata.packages_distributions()
  missing = {}
  for path in sorted((REPO / 'jaxformer').rglob('*.py')):
    for name in _top_level_imports(path):
      if name in sys.stdlib_module_names or name in ('jaxformer', 'configs', '__future__'):
        continue
      owners = {_normalise(d) for d in distributions.get(name, [name])}
      if not owners & declared and not any(_normalise(o) in declared for o in owners):
        missing.setdefault(name, str(path.relative_to(REPO)))
  # jaxlib / etils come with jax / orbax; a name whose distribution a declared package already requires is fine
  required = set()
  for dist in declared:
    try:
      required.update(_normalise(re.split(r'[<>=!~;\[ ]', r, maxsplit=1)[0])
                      for r in importlib.metadata.requires(dist) or [] if 'extra ==' not in r)
    except importlib.metadata.PackageNotFoundError:
      pass
  missing = {n: p for n, p in missing.items()
             if not {_normalise(d) for d in distributions.get(n, [n])} & required}
  assert not missing, f'imported at module level but not in pyproject dependencies: {missing}'
