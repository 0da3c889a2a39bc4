"""tfds:<name>[/<config>] -- a prepared TFDS dataset read through `tfds.data_source` (ArrayRecord, no TensorFlow).

There is no network: the dataset must already be prepared in data.data_dir as ArrayRecord
(`tfds build <name> --file_format=array_record --data_dir=...`). Also here: the ArrayRecord writer the local
sources (text:, parallel:) convert their files with, so every source is read through the same TfdsSplit.
"""
from __future__ import annotations

import contextlib
import glob
import io
import json
import logging
import os
import tempfile
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from jaxformer.errors import DataError
from jaxformer.data.sources.base import (ChatPreference, ChatPrompt, Conversation, Example, Instruction, Labelled,
                                         ListSplit, Preference, Prompt, Source, SpanExample, Split, Tagged)

BUILDER_VERSION = '1.0.0'


def import_tfds():
  """tensorflow_datasets, imported on first use: it is slow to import and only TFDS / local sources need it."""
  os.environ.setdefault('TFDS_DISABLE_TQDM', '1')
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    tfds.disable_progress_bar()
  except Exception:  # pylint: disable=broad-except
    pass
  return tfds


@contextlib.contextmanager
def _no_stray_tfds_tempdirs():
  """Removes the empty tempfile.mkdtemp('tfds') directories TFDS made meanwhile: constructing a builder for a
  dataset not prepared yet makes one for GCS metadata and never removes it (DatasetInfo.initialize_from_bucket;
  GCS is disabled, so it stays empty) -- one /tmp/tmp*tfds per local-file conversion or unprepared TFDS name."""
  pattern = os.path.join(tempfile.gettempdir(), 'tmp*tfds')
  before = set(glob.glob(pattern))
  try:
    yield
  finally:
    for path in set(glob.glob(pattern)) - before:
      with contextlib.suppress(OSError):  # not empty (not ours to remove) or already gone
        os.rmdir(path)


# How the text features of a record (in `keys` order) become an example, per source kind.
_EXAMPLE = {'text': lambda values: values[0], 'pairs': tuple, 'instructions': lambda values: Instruction(*values),
            'labelled': lambda values: Labelled(values[0], values[1], int(values[2])),
            'preference': lambda values: Preference(values[0], values[1], values[2], float(values[3])),
            'chat_preference': lambda values: ChatPreference(values[0], values[1], values[2], float(values[3])),
            'prompts': lambda values: Prompt(*values), 'chat_prompts': lambda values: ChatPrompt(*values),
            'conversations': lambda values: Conversation(values[0]),
            # lists are stored as JSON strings
            'tagged': lambda values: Tagged(tuple(json.loads(values[0])), tuple(json.loads(values[1]))),
            'spans': lambda values: SpanExample(values[0], values[1], *map(tuple, json.loads(values[2])))}


class TfdsSplit(Split):
  """A split of a TFDS ArrayRecord data source; decodes bytes features to str."""

  def __init__(self, name: str, data_source: Any, kind: str, keys: tuple[str, ...]):
    self.name = name
    self._ds = data_source
    self._example = _EXAMPLE[kind]
    self._keys = keys
    self._len = len(data_source)
    self._fast = None  # None: not tried yet; False: the records are not plain text features

  def __len__(self) -> int:
    return self._len

  def read(self, indices: Sequence[int]) -> list[Example]:
    if not len(indices):
      return []
    indices = [int(i) for i in indices]
    raw = getattr(self._ds, 'data_source', None)
    if raw is not None and self._fast is not False:
      # Fast path: parse the stored tf.Example protos directly (3x faster than TFDS's generic decoding).
      try:
        values = [_parse_text_features(r, self._keys) for r in raw.__getitems__(indices)]
        self._fast = True
        return [self._example(v) for v in values]
      except Exception:  # pylint: disable=broad-except
        if self._fast:
          raise
        self._fast = False
    return [self._example([_to_str(r[key]) for key in self._keys]) for r in self._ds.__getitems__(indices)]


def _parse_text_features(record: bytes, keys: tuple[str, ...]) -> list[str]:
  from tensorflow_datasets.proto import tf_example_pb2  # pylint: disable=g-import-not-at-top  (see import_tfds)
  feature = tf_example_pb2.Example.FromString(record).features.feature
  out = []
  for key in keys:
    (value,) = feature[key].bytes_list.value
    out.append(value.decode('utf-8'))
  return out


def _to_str(value: Any) -> str:
  if isinstance(value, bytes):
    return value.decode('utf-8')
  if isinstance(value, np.ndarray) and value.dtype == object and value.shape == ():
    return _to_str(value.item())
  return str(value)


def _first_line(err: BaseException) -> str:
  text = str(err).strip().splitlines()
  return text[0] if text else type(err).__name__


def open_tfds(spec: str, name: str, data_dir: str) -> tuple[Any, Any]:
  """Opens every split of a prepared TFDS dataset; one-line DataError if unknown or not prepared."""
  tfds = import_tfds()
  base = name.split('/')[0].split(':')[0]
  try:
    with _no_stray_tfds_tempdirs():
      sources = tfds.data_source(name, data_dir=data_dir, download=False, try_gcs=False)
  except tfds.core.registered.DatasetNotFoundError:
    raise DataError(
        f'data.source={spec!r}: TFDS dataset {base!r} is unknown and not prepared in data_dir {data_dir} '
        '(check the name, or set data.data_dir to where it was prepared).') from None
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(
        f'data.source={spec!r}: TFDS dataset {name!r} is not prepared as ArrayRecord in data_dir {data_dir} '
        f'(no network here; prepare it with `tfds build {base} --file_format=array_record --data_dir=...` and set '
        f'data.data_dir): {_first_line(e)}') from None
  if not sources:
    raise DataError(f'data.source={spec!r}: TFDS dataset {name!r} in {data_dir} has no splits.')
  info = next(iter(sources.values())).dataset_info
  return sources, info


def _tfds_kind(spec: str, features: Any, config: Any) -> tuple[str, tuple[str, ...]]:
  """Text (data.text_key or the only string feature) or pairs (src_lang and tgt_lang features)."""
  feats = dict(features.items()) if hasattr(features, 'items') else {}
  strings = [k for k, f in feats.items() if _is_text_feature(f)]
  src, tgt = config.data.src_lang, config.data.tgt_lang
  if config.data.text_key:
    if config.data.text_key not in feats:
      raise DataError(
          f'data.text_key={config.data.text_key!r} is not a feature of data.source={spec!r} '
          f'(features: {", ".join(feats)}).')
    return 'text', (config.data.text_key,)
  if 'translation' in feats:  # some datasets nest the languages under 'translation'
    raise DataError(f'data.source={spec!r} nests its languages under "translation", which is not supported yet.')
  if src in feats and tgt in feats:
    return 'pairs', (src, tgt)
  if len(strings) == 1:
    return 'text', (strings[0],)
  raise DataError(
      f'data.source={spec!r} has string features {strings or list(feats)}; set data.text_key to the one holding '
      f'the text, or data.src_lang/data.tgt_lang (now {src!r}/{tgt!r}) for translation.')


def _is_text_feature(feature: Any) -> bool:
  try:
    return np.dtype(feature.np_dtype).kind in ('O', 'S', 'U') and not getattr(feature, 'shape', ())
  except Exception:  # pylint: disable=broad-except
    return type(feature).__name__ == 'Text'


class _SlicedSplits(dict):
  """The opened splits, plus sliced ones ('train[:90%]') opened on demand through tfds.data_source."""

  def __init__(self, splits: dict[str, Split], name: str, data_dir: str, kind: str, keys: tuple[str, ...]):
    super().__init__(splits)
    self._args = name, data_dir, kind, keys

  def __contains__(self, key):
    if dict.__contains__(self, key):
      return True
    if '[' not in str(key):
      return False
    name, data_dir, kind, keys = self._args
    try:
      ds = import_tfds().data_source(name, split=key, data_dir=data_dir, download=False)
    except Exception:  # pylint: disable=broad-except
      return False
    self[key] = TfdsSplit(key, ds, kind, keys)
    return True


def make_source(spec: str, name: str, config: Any, data_dir: str) -> Source:
  """tfds:<name>[/<config>]: text (data.text_key) or translation pairs (data.src_lang / data.tgt_lang)."""
  sources, info = open_tfds(spec, name, data_dir)
  kind, keys = _tfds_kind(spec, info.features, config)
  splits = {str(k): TfdsSplit(str(k), v, kind, keys) for k, v in sources.items()}
  return Source(spec, kind, _SlicedSplits(splits, name, data_dir, kind, keys),
                description=f'TFDS {name} from {data_dir}')


# ------------------------------------------------------------------------- writing local files as ArrayRecord


def is_prepared(data_dir: str, name: str) -> bool:
  return os.path.exists(os.path.join(data_dir, name, BUILDER_VERSION, 'dataset_info.json'))


def build_array_record(name: str, data_dir: str, features: Sequence[str],
                       generators: dict[str, Callable[[], Iterable[dict[str, str]]]], description: str) -> None:
  """Writes an ArrayRecord TFDS dataset `name` of text features (splits from zero-arg factories) unless it exists.

  The writer is a `tfds.core.GeneratorBasedBuilder` with `disable_shuffling=True` (file order is kept); TFDS
  writes ArrayRecord without TensorFlow and Beam. The builder is not registered, so `tfds.data_source(<name>)`
  later falls back to reading the prepared files. TFDS cannot write an empty split, so empty ones are left out and
  listed in <name>/empty_splits.json; asking for one then gives the 'split is empty' error, not 'no such split'.
  """
  if is_prepared(data_dir, name):
    return
  tfds = import_tfds()
  feature_dict = tfds.features.FeaturesDict({k: tfds.features.Text() for k in features})
  examples = {split: list(make()) for split, make in generators.items()}
  empty = sorted(split for split, ex in examples.items() if not ex)
  examples = {split: ex for split, ex in examples.items() if ex}
  if not examples:
    raise DataError(f'{description}: every split is empty; check the files.')

  class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version(BUILDER_VERSION)
    code_path = None  # no checksums file to look up (and avoids needing importlib_resources)

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, description=description, features=feature_dict,
                                   disable_shuffling=True)

    def _split_generators(self, dl_manager):
      del dl_manager
      return {split: self._generate_examples(ex) for split, ex in examples.items()}

    def _generate_examples(self, ex):
      yield from enumerate(ex)

  _Builder.name = name
  logging.info('Converting %s into a TFDS ArrayRecord dataset %s in %s', description, name, data_dir)
  os.makedirs(os.path.join(data_dir, name), exist_ok=True)
  with open(os.path.join(data_dir, name, 'empty_splits.json'), 'w') as f:
    json.dump(empty, f)
  # TFDS prints "Downloading and preparing": nothing is downloaded
  with _no_stray_tfds_tempdirs(), contextlib.redirect_stdout(io.StringIO()):
    builder = _Builder(data_dir=data_dir, file_format='array_record')
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))


def open_array_record(spec: str, kind: str, name: str, data_dir: str, keys: tuple[str, ...],
                      description: str) -> Source:
  """The Source over a dataset build_array_record wrote (its empty splits included)."""
  sources, _ = open_tfds(spec, name, data_dir)
  splits: dict[str, Split] = {str(k): TfdsSplit(str(k), v, kind, keys) for k, v in sources.items()}
  try:
    with open(os.path.join(data_dir, name, 'empty_splits.json')) as f:
      for split in json.load(f):
        splits[split] = ListSplit(split, [])
  except FileNotFoundError:
    pass
  return Source(spec, kind, splits, description=description)
