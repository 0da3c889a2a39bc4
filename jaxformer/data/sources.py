"""Where examples come from: TFDS by name, local text / parallel files, and built-in synthetic data.

Every source ends up as a `Split` per split name: a random-access sequence (`len`, `read(indices)`) of examples,
each a `str` (a text source) or a `(source, target)` pair of `str` (a translation source). The pipeline only
ever sees that interface, so shuffling, per-host sharding and exact resumption are the same code for all sources.

  tfds:<name>[/<config>]   `tfds.data_source(name, data_dir=data.data_dir, download=False)` over ArrayRecord,
                           without TensorFlow. There is no network: the dataset must already be prepared there as
                           ArrayRecord (`tfds build <name> --file_format=array_record --data_dir=...`).
  text:<path or glob>      data.text_unit='file' (default): each file is one document (nanoGPT's view of
                           tinyshakespeare); a long document is cut at line ends into examples of about
                           TEXT_CHUNK_CHARS characters, each getting its own BOS/EOS. data.text_unit='line': one
                           example per non-empty line. `.gz` is read transparently. Splits: if the path contains
                           `{split}` it is filled with the split's file name (see SPLIT_ALIASES); otherwise the
                           first 90% is `train` and the last 10% `validation` -- of the characters for one file
                           with text_unit=file (exactly nanoGPT's Shakespeare split), else of the examples. No
                           `test` split then.
  parallel:<prefix>        files `<prefix>/<stem>.<lang>[.gz]` for data.src_lang / data.tgt_lang, aligned by line.
                           A split name finds its files by the first rule that matches: the exact stem; then the
                           aliases in SPLIT_ALIASES (validation -> val, valid, dev); then a unique `<alias>*` glob,
                           so `test` finds Multi30k's `test_2016_flickr`. Set data.eval_split/test_split to an exact
                           stem (e.g. test_2017_flickr) to pick another.
  builtin:lm               SYNTHETIC: a seeded random word bigram language (see `SyntheticLanguage`); its exact
                           entropy per document is known (`builtin_lm_entropy`), so a model's loss can be compared
                           with the best achievable one.
  builtin:numbers          SYNTHETIC: numbers to English words ('3207' -> 'three thousand two hundred seven'), a
                           deterministic transduction (translation) task.

text: and parallel: sources are converted ONCE into a TFDS ArrayRecord dataset named
`jaxformer_text_<hash>` / `jaxformer_parallel_<hash>` in the data dir (the hash covers the resolved file paths,
sizes and mtimes, the split mapping and the languages, so changed files give a new dataset) and then read through
the same `tfds.data_source` path as any TFDS dataset. The writer is a `tfds.core.GeneratorBasedBuilder` with
`file_format='array_record'` and `disable_shuffling=True` (file order is kept); TFDS writes ArrayRecord without
TensorFlow and without Beam. The builder class is not registered, so `tfds.data_source(<name>)` falls back to
reading the prepared files (`dataset_info.json`, `features.json`, `*.array_record-*`).
"""
from __future__ import annotations

import functools
import glob as glob_lib
import gzip
import hashlib
import json
import logging
import math
import os
from typing import Any, Sequence

import numpy as np

from jaxformer.user_errors import UserError

Example = Any  # str | tuple[str, str]


class DataError(UserError, ValueError):
  """A data problem (source, split, file, tokenizer). The message is one line naming the file or key and the fix."""


class DataFileNotFoundError(DataError, FileNotFoundError):
  """A file or path named by the config does not exist."""


SPLIT_ALIASES = {
    'train': ('train',),
    'validation': ('validation', 'valid', 'val', 'dev'),
    'test': ('test',),
}
TEXT_SPLIT_FRACTION = 0.9  # text: without {split}: first 90% train, last 10% validation
TEXT_CHUNK_CHARS = 2048  # text_unit=file: long documents become examples of about this many characters
_BUILDER_VERSION = '1.0.0'
_FORMAT = 1  # bump when the on-disk layout of converted datasets changes


# ----------------------------------------------------------------------------------------------- interface


class Split:
  """A random-access split: `len(split)` examples, `read(indices)` returns them in that order."""

  name: str

  def __len__(self) -> int:
    raise NotImplementedError

  def read(self, indices: Sequence[int]) -> list[Example]:
    raise NotImplementedError


class ListSplit(Split):
  """A split held in memory (built-in data)."""

  def __init__(self, name: str, examples: Sequence[Example]):
    self.name = name
    self._examples = examples

  def __len__(self) -> int:
    return len(self._examples)

  def read(self, indices: Sequence[int]) -> list[Example]:
    return [self._examples[int(i)] for i in indices]


class TfdsSplit(Split):
  """A split of a TFDS ArrayRecord data source; decodes bytes features to str."""

  def __init__(self, name: str, data_source: Any, kind: str, keys: tuple[str, ...]):
    self.name = name
    self._ds = data_source
    self._kind = kind
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
        return [v[0] for v in values] if self._kind == 'text' else [tuple(v) for v in values]
      except Exception:  # pylint: disable=broad-except
        if self._fast:
          raise
        self._fast = False
    records = self._ds.__getitems__(indices)
    if self._kind == 'text':
      return [_to_str(r[self._keys[0]]) for r in records]
    return [(_to_str(r[self._keys[0]]), _to_str(r[self._keys[1]])) for r in records]


def _parse_text_features(record: bytes, keys: tuple[str, ...]) -> list[str]:
  from tensorflow_datasets.proto import tf_example_pb2  # pylint: disable=g-import-not-at-top
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


class Source:
  """A data source: `kind` is 'text' (LM documents) or 'pairs' ((source, target) translation pairs)."""

  def __init__(self, spec: str, kind: str, splits: dict[str, Any], description: str = ''):
    self.spec = spec
    self.kind = kind
    self._splits = splits  # name -> Split or a zero-arg callable making it
    self.description = description

  @property
  def split_names(self) -> list[str]:
    return list(self._splits)

  def split(self, name: str) -> Split:
    if name not in self._splits:
      raise DataError(
          f'split {name!r} does not exist in data.source={self.spec!r} (it has: {", ".join(self._splits)}); '
          'set data.train_split / data.eval_split / data.test_split to one of those.')
    split = self._splits[name]
    if callable(split) and not isinstance(split, Split):
      split = self._splits[name] = split()
    if len(split) == 0:
      raise DataError(f'split {name!r} of data.source={self.spec!r} is empty; it needs at least one example.')
    return split


# -------------------------------------------------------------------------------------------- entry point


def data_dir_for(config: Any, workdir: str) -> str:
  """data.data_dir, or <workdir>/data when empty."""
  return os.path.abspath(os.path.expanduser(config.data.data_dir or os.path.join(workdir, 'data')))


def get_source(config: Any, workdir: str) -> Source:
  """Resolves config.data.source into a Source (building the ArrayRecord copy of local files once)."""
  spec = str(config.data.source)
  kind, _, arg = spec.partition(':')
  if not arg:
    raise DataError(f'data.source={spec!r} needs a value after the colon, e.g. text:path/to/file.txt.')
  if kind == 'builtin':
    return _builtin_source(spec, arg)
  data_dir = data_dir_for(config, workdir)
  if kind == 'tfds':
    return _tfds_source(spec, arg, data_dir, config)
  if kind == 'text':
    return _text_source(spec, arg, data_dir, config)
  if kind == 'parallel':
    return _parallel_source(spec, arg, data_dir, config)
  raise DataError(
      f'data.source={spec!r} is not a valid source; use builtin:lm, builtin:numbers, text:<path or glob>, '
      'parallel:<prefix> or tfds:<name>[/<config>].')


# ---------------------------------------------------------------------------------------------------- tfds


def _import_tfds():
  os.environ.setdefault('TFDS_DISABLE_TQDM', '1')
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    tfds.disable_progress_bar()
  except Exception:  # pylint: disable=broad-except
    pass
  return tfds


def _first_line(err: BaseException) -> str:
  text = str(err).strip().splitlines()
  return text[0] if text else type(err).__name__


def _open_tfds(spec: str, name: str, data_dir: str) -> tuple[Any, Any]:
  """Opens every split of a prepared TFDS dataset; one-line DataError if unknown or not prepared."""
  tfds = _import_tfds()
  base = name.split('/')[0].split(':')[0]
  try:
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


def _tfds_source(spec: str, name: str, data_dir: str, config: Any) -> Source:
  sources, info = _open_tfds(spec, name, data_dir)
  kind, keys = _tfds_kind(spec, info.features, config)
  splits = {str(k): TfdsSplit(str(k), v, kind, keys) for k, v in sources.items()}
  tfds = _import_tfds()

  # Sliced splits ('train[:90%]') are opened on demand through tfds.data_source as well.
  class _Splits(dict):

    def __contains__(self, key):
      if dict.__contains__(self, key):
        return True
      if '[' in str(key):
        try:
          self[key] = TfdsSplit(key, tfds.data_source(name, split=key, data_dir=data_dir, download=False), kind, keys)
          return True
        except Exception:  # pylint: disable=broad-except
          return False
      return False

  return Source(spec, kind, _Splits(splits), description=f'TFDS {name} from {data_dir}')


# ------------------------------------------------------------------------------------- local files -> tfds


def _open_text(path: str):
  if path.endswith('.gz'):
    return gzip.open(path, 'rt', encoding='utf-8', newline='')
  return open(path, 'rt', encoding='utf-8', newline='')


def _read_lines(path: str) -> list[str]:
  """Lines of a file without their line ending ('\\n' or '\\r\\n')."""
  try:
    with _open_text(path) as f:
      text = f.read()
  except UnicodeDecodeError as e:
    raise DataError(f'{path} is not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8.') from None
  lines = text.split('\n')
  if lines and lines[-1] == '':
    lines.pop()
  return [line[:-1] if line.endswith('\r') else line for line in lines]


def _read_file(path: str) -> str:
  try:
    with _open_text(path) as f:
      return f.read()
  except UnicodeDecodeError as e:
    raise DataError(f'{path} is not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8.') from None


def _fingerprint(parts: Any) -> str:
  return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


def _file_id(path: str) -> list[Any]:
  st = os.stat(path)
  return [os.path.abspath(path), st.st_size, int(st.st_mtime)]


def _expand(spec: str, pattern: str) -> list[str]:
  pattern = os.path.expanduser(pattern)
  paths = sorted(p for p in glob_lib.glob(pattern) if os.path.isfile(p))
  if not paths:
    raise DataFileNotFoundError(f'data.source={spec!r}: no file matches {pattern!r}; check the path.')
  return paths


def _prepared(data_dir: str, name: str) -> bool:
  return os.path.exists(os.path.join(data_dir, name, _BUILDER_VERSION, 'dataset_info.json'))


def _build_local(kind: str, name: str, data_dir: str, features: dict[str, str],
                 generators: dict[str, Any], description: str) -> None:
  """Writes an ArrayRecord TFDS dataset `name` (splits from zero-arg example-list factories) unless it exists.

  TFDS cannot write an empty split, so empty ones are left out and listed in <name>/empty_splits.json; asking for
  one then gives the 'split is empty' error rather than 'no such split'.
  """
  if _prepared(data_dir, name):
    return
  tfds = _import_tfds()
  feature_dict = tfds.features.FeaturesDict({k: tfds.features.Text() for k in features})
  examples = {split: list(make()) for split, make in generators.items()}
  empty = sorted(split for split, ex in examples.items() if not ex)
  examples = {split: ex for split, ex in examples.items() if ex}
  if not examples:
    raise DataError(f'{description}: every split is empty; check the files.')

  class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version(_BUILDER_VERSION)
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
  builder = _Builder(data_dir=data_dir, file_format='array_record')
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  del kind


def _local_source(spec: str, kind: str, name: str, data_dir: str, keys: tuple[str, ...], description: str) -> Source:
  sources, _ = _open_tfds(spec, name, data_dir)
  splits: dict[str, Any] = {str(k): TfdsSplit(str(k), v, kind, keys) for k, v in sources.items()}
  try:
    with open(os.path.join(data_dir, name, 'empty_splits.json')) as f:
      for split in json.load(f):
        splits[split] = ListSplit(split, [])
  except FileNotFoundError:
    pass
  return Source(spec, kind, splits, description=description)


def _split_candidates(split: str) -> tuple[str, ...]:
  return SPLIT_ALIASES.get(split, (split,))


def _find_split_file(directory: str, split: str, suffixes: Sequence[str]) -> str | None:
  """The file for `split` under the documented rule: exact stem, aliases, then a unique `<alias>*` glob."""
  for stem in (split,) + tuple(a for a in _split_candidates(split) if a != split):
    for suffix in suffixes:
      path = os.path.join(directory, stem + suffix)
      if os.path.isfile(path):
        return path
  for stem in _split_candidates(split):
    matches = sorted({p for suffix in suffixes for p in glob_lib.glob(os.path.join(directory, glob_lib.escape(stem) + '*' + suffix))})
    if len(matches) == 1:
      return matches[0]
    if len(matches) > 1:
      raise DataError(
          f'split {split!r} matches several files ({", ".join(os.path.basename(m) for m in matches)}) in '
          f'{directory}; set the split key (data.eval_split / data.test_split) to the exact file stem.')
  return None


def _config_splits(config: Any) -> list[str]:
  names = ['train', 'validation', 'test']
  for key in ('train_split', 'eval_split', 'test_split'):
    value = str(config.data[key])
    if value not in names and '[' not in value:
      names.append(value)
  return names


def _text_source(spec: str, pattern: str, data_dir: str, config: Any) -> Source:
  unit = str(config.data.get('text_unit', 'file'))
  if unit not in ('file', 'line'):
    raise DataError(f'data.text_unit={unit!r} is not valid; use file (each file one document) or line.')
  if '{split}' in pattern:
    files = {}
    for split in _config_splits(config):
      for stem in (split,) + tuple(a for a in _split_candidates(split) if a != split):
        matches = sorted(p for p in glob_lib.glob(os.path.expanduser(pattern.replace('{split}', stem)))
                         if os.path.isfile(p))
        if matches:
          files[split] = matches
          break
    if 'train' not in files and config.data.train_split not in files:
      raise DataFileNotFoundError(
          f'data.source={spec!r}: no training file matches {pattern.replace("{split}", "train")!r}; check the path.')
    ids = {s: [_file_id(p) for p in ps] for s, ps in files.items()}
    generators = {s: functools.partial(_text_examples, ps, unit) for s, ps in files.items()}
  else:
    paths = _expand(spec, pattern)
    ids = {'all': [_file_id(p) for p in paths], 'fraction': TEXT_SPLIT_FRACTION}
    if unit == 'file' and len(paths) == 1:
      def part(train: bool):
        def make():
          text = _read_file(paths[0])
          if not text.strip():
            raise DataError(f'data.source={spec!r}: {paths[0]} holds no text; check the file.')
          cut = int(len(text) * TEXT_SPLIT_FRACTION)
          return _chunks(text[:cut] if train else text[cut:])
        return make
    else:
      cache = []

      def part(train: bool):
        def make():
          if not cache:
            cache.append(_text_examples(paths, unit))
            if not cache[0]:
              raise DataError(f'data.source={spec!r}: {", ".join(paths[:3])} holds no non-empty text; check it.')
          ex = cache[0]
          cut = max(1, int(len(ex) * TEXT_SPLIT_FRACTION))
          return ex[:cut] if train else ex[cut:]
        return make
    generators = {'train': part(True), 'validation': part(False)}
  name = 'jaxformer_text_' + _fingerprint([_FORMAT, 'text', unit, TEXT_CHUNK_CHARS, ids])
  description = f'text source {spec} (text_unit={unit})'
  _build_local('text', name, data_dir, {'text': ''},
               {s: (lambda make=make: ({'text': t} for t in make())) for s, make in generators.items()}, description)
  return _local_source(spec, 'text', name, data_dir, ('text',), description)


def _chunks(text: str, size: int | None = None) -> list[str]:
  """A document cut at line ends into pieces of about `size` characters (a single longer line is cut anywhere)."""
  size = size or TEXT_CHUNK_CHARS
  out, start = [], 0
  while start < len(text):
    end = start + size
    if end < len(text):
      newline = text.find('\n', end - 1)
      end = newline + 1 if newline != -1 and newline - end < size else end
    out.append(text[start:end])
    start = end
  return [c for c in out if c.strip()]


def _text_examples(paths: Sequence[str], unit: str) -> list[str]:
  """unit='line': the non-empty lines of the files; unit='file': each file's text (in chunks if long)."""
  if unit == 'line':
    return [line for p in paths for line in _read_lines(p) if line.strip()]
  return [c for p in paths for c in _chunks(_read_file(p))]


def _parallel_source(spec: str, prefix: str, data_dir: str, config: Any) -> Source:
  directory = os.path.expanduser(prefix)
  if not os.path.isdir(directory):
    raise DataFileNotFoundError(f'data.source={spec!r}: directory {directory!r} does not exist; check the path.')
  src, tgt = str(config.data.src_lang), str(config.data.tgt_lang)
  if src == tgt:
    raise DataError(f'data.src_lang and data.tgt_lang are both {src!r}; a parallel source needs two languages.')
  files: dict[str, tuple[str, str]] = {}
  for split in _config_splits(config):
    pair = []
    for lang in (src, tgt):
      pair.append(_find_split_file(directory, split, ('.' + lang, '.' + lang + '.gz')))
    if pair[0] and pair[1]:
      files[split] = (pair[0], pair[1])
    elif pair[0] or pair[1]:
      have, missing = (pair[0], tgt) if pair[0] else (pair[1], src)
      raise DataFileNotFoundError(
          f'{have} has no counterpart for language {missing!r} in {directory} (expected '
          f'{os.path.basename(have).split(".")[0]}.{missing}[.gz]); check data.src_lang/data.tgt_lang.')
  train = config.data.train_split if config.data.train_split in files else 'train'
  if train not in files:
    raise DataFileNotFoundError(
        f'data.source={spec!r}: no training files {directory}/train.{src}[.gz] and {directory}/train.{tgt}[.gz]; '
        'check the prefix and data.src_lang/data.tgt_lang.')

  def reader(split, paths):
    def make():
      a, b = _read_lines(paths[0]), _read_lines(paths[1])
      if len(a) != len(b):
        raise DataError(
            f'parallel files {paths[0]} ({len(a)} lines) and {paths[1]} ({len(b)} lines) differ in line count; '
            'they must be aligned line by line.')
      return ({src: x, tgt: y} for x, y in zip(a, b))
    del split
    return make

  ids = {s: [_file_id(p) for p in ps] for s, ps in files.items()}
  name = 'jaxformer_parallel_' + _fingerprint([_FORMAT, 'parallel', src, tgt, ids])
  # Check alignment before writing anything, so the error names the files.
  for split, paths in ([] if _prepared(data_dir, name) else files.items()):
    counts = [_count_lines(p) for p in paths]
    if counts[0] != counts[1]:
      raise DataError(
          f'parallel files {paths[0]} ({counts[0]} lines) and {paths[1]} ({counts[1]} lines) differ in line count; '
          'they must be aligned line by line.')
  description = f'parallel source {spec} ({src}->{tgt})'
  _build_local('parallel', name, data_dir, {src: '', tgt: ''},
               {s: reader(s, ps) for s, ps in files.items()}, description)
  return _local_source(spec, 'pairs', name, data_dir, (src, tgt), description)


def _count_lines(path: str) -> int:
  return len(_read_lines(path))


# ------------------------------------------------------------------------------------------------ builtin


def _builtin_source(spec: str, name: str) -> Source:
  if name == 'lm':
    lang = synthetic_language()
    return Source(spec, 'text', {s: functools.partial(ListSplit, s, lang.split(s)) for s in lang.SPLITS},
                  description='SYNTHETIC random word-bigram language (builtin:lm)')
  if name == 'numbers':
    return Source(spec, 'pairs', {s: functools.partial(_numbers_split, s) for s in NUMBER_SPLITS},
                  description='SYNTHETIC numbers -> English words (builtin:numbers)')
  raise DataError(f'data.source={spec!r}: unknown built-in dataset {name!r}; use builtin:lm or builtin:numbers.')


class SyntheticLanguage:
  """SYNTHETIC data. A seeded random word-level bigram language with exactly computable entropy.

  64 made-up words (consonant-vowel syllables). A document has L ~ Uniform{12..24} words (independent of the
  words); the first word is drawn from a Dirichlet-random initial distribution and each next word from one of 6
  random successors of the previous word (Dirichlet-random probabilities). Words are joined by single spaces, so
  the text determines the word sequence and the entropy of a document is H(L) + H(first) + sum of the expected
  transition entropies, computed exactly by propagating the word distribution. Splits are generated from separate
  random streams; validation/test documents that also occur in an earlier split are dropped, so splits never
  overlap. The language itself is fixed (its own seed), config.seed only changes the reading order.
  """

  SEED = 20240601
  NUM_WORDS = 64
  SUCCESSORS = 6
  MIN_WORDS, MAX_WORDS = 12, 24
  SPLITS = {'train': 20000, 'validation': 1000, 'test': 1000}

  def __init__(self):
    rng = np.random.default_rng(self.SEED)
    consonants, vowels = list('bdfgklmnprstvz'), list('aeiou')
    words: list[str] = []
    while len(words) < self.NUM_WORDS:
      n = int(rng.integers(1, 4))
      w = ''.join(consonants[rng.integers(len(consonants))] + vowels[rng.integers(len(vowels))] for _ in range(n))
      if w not in words:
        words.append(w)
    self.words = words
    w = self.NUM_WORDS
    self.initial = rng.dirichlet(np.ones(w))
    self.transition = np.zeros((w, w))
    for i in range(w):
      succ = rng.choice(w, size=self.SUCCESSORS, replace=False)
      self.transition[i, succ] = rng.dirichlet(np.ones(self.SUCCESSORS))
    self._splits: dict[str, list[str]] = {}

  def _generate(self, rng: np.random.Generator, n: int) -> list[str]:
    lengths = rng.integers(self.MIN_WORDS, self.MAX_WORDS + 1, size=n)
    ids = np.zeros((n, self.MAX_WORDS), np.int64)
    ids[:, 0] = rng.choice(self.NUM_WORDS, size=n, p=self.initial)
    cum = np.cumsum(self.transition, axis=1)
    cum[:, -1] = 1.0
    for t in range(1, self.MAX_WORDS):
      u = rng.random(n)
      ids[:, t] = (u[:, None] > cum[ids[:, t - 1]]).sum(axis=1)
    words = self.words
    return [' '.join(words[j] for j in row[:length]) for row, length in zip(ids, lengths)]

  def split(self, name: str) -> list[str]:
    if not self._splits:
      seen: set[str] = set()
      for k, (split, size) in enumerate(self.SPLITS.items()):
        docs = self._generate(np.random.default_rng([self.SEED, k + 1]), size)
        if split != 'train':
          docs = [d for d in docs if d not in seen]
        seen.update(docs)
        self._splits[split] = docs
    return self._splits[name]

  def entropy(self) -> dict[str, float]:
    """Exact entropy (nats) per document, and expected characters / words per document."""
    p = self.initial
    def h(q):
      q = q[q > 0]
      return float(-(q * np.log(q)).sum())
    row_h = np.array([h(r) for r in self.transition])
    lengths = np.arange(self.MIN_WORDS, self.MAX_WORDS + 1)
    h_doc = math.log(len(lengths)) + h(p)
    word_len = np.array([len(w) for w in self.words], np.float64)
    chars = float(p @ word_len)
    for t in range(1, self.MAX_WORDS):
      p_continue = float((lengths > t).mean())  # P(L > t): the document has a word at index t
      h_doc += p_continue * float(p @ row_h)
      p = p @ self.transition
      chars += p_continue * float(p @ word_len)
    mean_words = float(lengths.mean())
    chars += mean_words - 1  # spaces
    return {'nats_per_document': h_doc, 'chars_per_document': chars, 'words_per_document': mean_words,
            'nats_per_char_token': h_doc / (chars + 1)}  # +1: the EOS a decoder_only model also predicts


@functools.cache
def synthetic_language() -> SyntheticLanguage:
  return SyntheticLanguage()


def builtin_lm_entropy(tokenizer: Any = None, split: str = 'validation') -> float:
  """Best achievable decoder_only loss (nats per target token) on builtin:lm with unpacked documents.

  Per document the model predicts its tokens plus EOS, so this is H(document) / E[tokens + 1]. With a char
  tokenizer E[tokens] is the exact expected character count; otherwise it is measured on `split`.
  """
  lang = synthetic_language()
  info = lang.entropy()
  if tokenizer is None or getattr(tokenizer, 'kind', '') in ('char', 'byte'):
    return info['nats_per_char_token']
  docs = lang.split(split)
  mean_tokens = float(np.mean([len(tokenizer.encode(d)) for d in docs]))
  return info['nats_per_document'] / (mean_tokens + 1)


_ONES = ('zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen '
         'seventeen eighteen nineteen').split()
_TENS = ('', '', 'twenty', 'thirty', 'forty', 'fifty', 'sixty', 'seventy', 'eighty', 'ninety')
NUMBER_SPLITS = {'train': 50000, 'validation': 1000, 'test': 1000}
_NUMBERS_SEED = 20240602


def number_to_words(n: int) -> str:
  """English words for 0 <= n < 10**9, without 'and' or hyphens: 3207 -> 'three thousand two hundred seven'."""
  if n < 0 or n >= 10**9:
    raise ValueError(f'number_to_words supports 0 <= n < 10**9, got {n}')
  if n < 20:
    return _ONES[n]
  if n < 100:
    return _TENS[n // 10] + ('' if n % 10 == 0 else ' ' + _ONES[n % 10])
  for size, word in ((10**6, 'million'), (1000, 'thousand'), (100, 'hundred')):
    if n >= size:
      rest = n % size
      return number_to_words(n // size) + ' ' + word + ('' if rest == 0 else ' ' + number_to_words(rest))
  raise AssertionError(n)


@functools.cache
def _numbers() -> dict[str, np.ndarray]:
  """SYNTHETIC: distinct numbers below 10**6, digit counts 1..6 roughly equally likely; test, validation, train."""
  rng = np.random.default_rng(_NUMBERS_SEED)
  total = sum(NUMBER_SPLITS.values())
  digits = rng.integers(1, 7, size=4 * total)
  low = np.where(digits == 1, 0, 10 ** (digits - 1))
  values = low + (rng.random(4 * total) * (10**digits - low)).astype(np.int64)
  _, first = np.unique(values, return_index=True)
  values = values[np.sort(first)][:total]
  out, start = {}, 0
  for split in ('test', 'validation', 'train'):
    out[split] = values[start:start + NUMBER_SPLITS[split]]
    start += NUMBER_SPLITS[split]
  return out


class _NumbersSplit(Split):

  def __init__(self, name: str):
    self.name = name
    self._values = _numbers()[name]

  def __len__(self) -> int:
    return len(self._values)

  def read(self, indices: Sequence[int]) -> list[Example]:
    return [(str(int(v)), number_to_words(int(v))) for v in self._values[np.asarray(indices, np.int64)]]


def _numbers_split(name: str) -> Split:
  return _NumbersSplit(name)
