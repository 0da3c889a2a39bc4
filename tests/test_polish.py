"""Small things from issue 13: packaging, the built-in numbers splits, eval.py's output names, translate's blank
and long lines, generate's out-of-vocabulary prompt characters, TFDS temporary directories."""
import pathlib
import re
import tempfile
import tomllib

import pytest

from jaxformer.data import tokenizers
from jaxformer.errors import DataError
from jaxformer.data.sources import builtin
from jaxformer.data.sources import tfds as tfds_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
# distribution name -> import name, where they differ
IMPORT_NAME = {'orbax-checkpoint': 'orbax', 'tensorflow-datasets': 'tensorflow_datasets', 'ml-collections':
               'ml_collections', 'absl-py': 'absl', 'array-record': 'array_record', 'ml-dtypes': 'ml_dtypes'}
# declared but never imported by our code, with the reason
RUNTIME_ONLY = {'array-record': 'TFDS reads prepared datasets (array_record files) through it'}


def _pyproject():
  return tomllib.loads((REPO / 'pyproject.toml').read_text())


def _requirement_name(spec):
  return re.split(r'[<>=!~\[; ]', spec, maxsplit=1)[0]


def test_every_dependency_is_imported():
  sources = '\n'.join(p.read_text() for p in [*REPO.glob('*.py'), *(REPO / 'jaxformer').rglob('*.py')])
  for spec in _pyproject()['project']['dependencies']:
    name = _requirement_name(spec)
    if name in RUNTIME_ONLY:
      continue
    module = IMPORT_NAME.get(name, name)
    assert re.search(rf'^\s*(import|from) {re.escape(module)}\b', sources, re.M), f'{name} is declared but unused'


def test_tensorboard_is_an_optional_extra():
  project = _pyproject()['project']
  assert any(_requirement_name(s) == 'tensorboard' for s in project['optional-dependencies']['tensorboard'])
  assert not any(_requirement_name(s) == 'tensorboard' for s in project['dependencies'])
  assert not any(_requirement_name(s) == 'tensorboard' for s in project['optional-dependencies']['test'])


def test_numbers_splits_use_only_training_characters():
  """A char vocabulary built on builtin:numbers' training split covers validation and test (no <unk>); the splits
  stay disjoint and full-sized."""
  source = builtin.make_source('builtin:numbers', 'numbers', None, '')
  vocab = tokenizers.CharTokenizer.build(tokenizers.training_texts(source, 'train'))
  seen = set()
  for split, size in builtin.NUMBER_SPLITS.items():
    pairs = source.split(split).read(range(len(source.split(split))))
    assert len(pairs) == size and not seen & {digits for digits, _ in pairs}
    seen |= {digits for digits, _ in pairs}
    missing, _, counts = vocab.uncovered([text for pair in pairs for text in pair])
    assert missing == 0, (split, counts)


def test_tfds_leaves_no_empty_tempdirs(tmp_path, monkeypatch):
  """Converting a local file and asking for an unprepared TFDS dataset leave no tmp*tfds directory behind."""
  scratch = tmp_path / 'tmp'
  scratch.mkdir()
  monkeypatch.setattr(tempfile, 'tempdir', str(scratch))
  data_dir = str(tmp_path / 'data')
  tfds_lib.build_array_record('polish_probe', data_dir, ('text',), {'train': lambda: [{'text': 'ab'}]}, 'probe')
  assert tfds_lib.is_prepared(data_dir, 'polish_probe')
  with pytest.raises(DataError, match='not prepared'):
    tfds_lib.open_tfds('tfds:mnist', 'mnist', data_dir)
  assert list(scratch.iterdir()) == []
