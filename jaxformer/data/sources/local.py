"""Local files: text: (LM documents), parallel: (line-aligned translation pairs), jsonl: (instruction data).

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
  jsonl:<path or glob>     instruction data: one JSON object per line with a prompt and a response field
                           (data.prompt_key / data.response_key), or conversations: a `messages` list of
                           {"role", "content"} objects per line (data.messages_key; rendered with the chat
                           template, data/chat.py; the first line decides); blank lines are skipped, any other line that is
                           not such an object is an error naming file:line. Splits as for text (`{split}` in the
                           path, or the first 90% / last 10% of the examples). With model.head=classification the
                           lines are labelled texts instead: `text` (data.text_key) or `text_a` + `text_b`
                           (data.text_pair_keys) and `label` (data.label_key): an integer in
                           [0, model.num_classes) or one of data.label_names. With preference examples
                           (model.head=reward, align.method=dpo|simpo) each line has a prompt and a chosen and a
                           rejected response (data.chosen_key / data.rejected_key; an optional float margin,
                           data.margin_key), or a ranking, data.responses_key: [best, ..., worst], which becomes
                           every ordered pair (best > second, best > third, ..., second > third, ...). With prompts
                           (align.method=grpo|rloo|ppo) each line has a prompt; its other fields go along to the
                           reward function. With model.head=token_classification each line has a list of words
                           (data.words_key) and one tag per word (data.tags_key: ids or data.label_names); with
                           model.head=span each line is SQuAD's: context, question, answers {text, answer_start}.

All three are converted ONCE into a TFDS ArrayRecord dataset named `jaxformer_text_<hash>` /
`jaxformer_parallel_<hash>` / `jaxformer_jsonl_<hash>` in the data dir (the hash covers the resolved file paths,
sizes and mtimes, the split mapping and the languages or field names, so changed files give a new dataset) and
then read like any TFDS dataset (sources/tfds.py).
"""
from __future__ import annotations

import functools
import glob as glob_lib
import gzip
import hashlib
import json
import os
from typing import Any, Callable, Sequence

from jaxformer import align
from jaxformer.errors import DataError, DataFileNotFoundError
from jaxformer.data import chat
from jaxformer.data.sources.base import Source, config_splits, split_candidates
from jaxformer.data.sources.tfds import build_array_record, is_prepared, open_array_record

TEXT_SPLIT_FRACTION = 0.9  # text: without {split}: first 90% train, last 10% validation
TEXT_CHUNK_CHARS = 2048  # text_unit=file: long documents become examples of about this many characters
TEXT_UNITS = ('file', 'line')
FORMAT = 1  # bump when the on-disk layout of converted datasets changes


# ---------------------------------------------------------------------------------------------- reading files


def _open_text(path: str):
  if path.endswith('.gz'):
    return gzip.open(path, 'rt', encoding='utf-8', newline='')
  return open(path, 'rt', encoding='utf-8', newline='')


def read_file(path: str) -> str:
  try:
    with _open_text(path) as f:
      return f.read()
  except UnicodeDecodeError as e:
    raise DataError(f'{path} is not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8.') from None


def read_lines(path: str) -> list[str]:
  """Lines of a file without their line ending ('\\n' or '\\r\\n')."""
  lines = read_file(path).split('\n')
  if lines and lines[-1] == '':
    lines.pop()
  return [line[:-1] if line.endswith('\r') else line for line in lines]


def fingerprint(parts: Any) -> str:
  """A short hash naming the converted dataset of these inputs."""
  return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


def file_id(path: str) -> list[Any]:
  st = os.stat(path)
  return [os.path.abspath(path), st.st_size, int(st.st_mtime)]


def expand(spec: str, pattern: str) -> list[str]:
  """The files a glob matches, sorted; DataFileNotFoundError if none."""
  pattern = os.path.expanduser(pattern)
  paths = sorted(p for p in glob_lib.glob(pattern) if os.path.isfile(p))
  if not paths:
    raise DataFileNotFoundError(f'data.source={spec!r}: no file matches {pattern!r}; check the path.')
  return paths


def files_per_split(spec: str, pattern: str, config: Any) -> dict[str, list[str]]:
  """A path with `{split}`: the files each split's name (or first alias) matches; the training split must match."""
  files = {}
  for split in config_splits(config):
    for stem in split_candidates(split):
      matches = sorted(p for p in glob_lib.glob(os.path.expanduser(pattern.replace('{split}', stem)))
                       if os.path.isfile(p))
      if matches:
        files[split] = matches
        break
  if 'train' not in files and config.data.train_split not in files:
    raise DataFileNotFoundError(
        f'data.source={spec!r}: no training file matches {pattern.replace("{split}", "train")!r}; check the path.')
  return files


def find_split_file(directory: str, split: str, suffixes: Sequence[str]) -> str | None:
  """The file for `split` under the documented rule: exact stem, aliases, then a unique `<alias>*` glob."""
  for stem in split_candidates(split):
    for suffix in suffixes:
      path = os.path.join(directory, stem + suffix)
      if os.path.isfile(path):
        return path
  for stem in split_candidates(split):
    matches = sorted({p for suffix in suffixes
                      for p in glob_lib.glob(os.path.join(directory, glob_lib.escape(stem) + '*' + suffix))})
    if len(matches) == 1:
      return matches[0]
    if len(matches) > 1:
      raise DataError(
          f'split {split!r} matches several files ({", ".join(os.path.basename(m) for m in matches)}) in '
          f'{directory}; set the split key (data.eval_split / data.test_split) to the exact file stem.')
  return None


# ------------------------------------------------------------------------------------------------------ text:


def chunks(text: str, size: int | None = None) -> list[str]:
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
    return [line for p in paths for line in read_lines(p) if line.strip()]
  return [c for p in paths for c in chunks(read_file(p))]


def _fraction_splits(spec: str, paths: list[str], read: Callable[[Sequence[str]], list[Any]]) -> dict[str, Any]:
  """train / validation factories for a path without {split}: the first 90% / last 10% of the examples `read`
  gets from the files (read once, on first use)."""
  cache = []

  def part(train: bool):
    def make():
      if not cache:
        cache.append(read(paths))
        if not cache[0]:
          raise DataError(f'data.source={spec!r}: {", ".join(paths[:3])} holds no non-empty text; check it.')
      ex = cache[0]
      cut = max(1, int(len(ex) * TEXT_SPLIT_FRACTION))
      return ex[:cut] if train else ex[cut:]
    return make
  return {'train': part(True), 'validation': part(False)}


def _character_splits(spec: str, path: str) -> dict[str, Any]:
  """One file, text_unit=file: the first 90% / last 10% of its characters (exactly nanoGPT's Shakespeare split)."""
  def part(train: bool):
    def make():
      text = read_file(path)
      if not text.strip():
        raise DataError(f'data.source={spec!r}: {path} holds no text; check the file.')
      cut = int(len(text) * TEXT_SPLIT_FRACTION)
      return chunks(text[:cut] if train else text[cut:])
    return make
  return {'train': part(True), 'validation': part(False)}


def make_text_source(spec: str, pattern: str, config: Any, data_dir: str) -> Source:
  unit = str(config.data.text_unit)
  if unit not in TEXT_UNITS:
    raise DataError(f'data.text_unit={unit!r} is not valid; use file (each file one document) or line.')
  if '{split}' in pattern:
    files = files_per_split(spec, pattern, config)
    ids = {s: [file_id(p) for p in ps] for s, ps in files.items()}
    generators = {s: functools.partial(_text_examples, ps, unit) for s, ps in files.items()}
  else:
    paths = expand(spec, pattern)
    ids = {'all': [file_id(p) for p in paths], 'fraction': TEXT_SPLIT_FRACTION}
    if unit == 'file' and len(paths) == 1:
      generators = _character_splits(spec, paths[0])
    else:
      generators = _fraction_splits(spec, paths, functools.partial(_text_examples, unit=unit))
  name = 'jaxformer_text_' + fingerprint([FORMAT, 'text', unit, TEXT_CHUNK_CHARS, ids])
  description = f'text source {spec} (text_unit={unit})'
  build_array_record(name, data_dir, ('text',),
                     {s: (lambda make=make: ({'text': t} for t in make())) for s, make in generators.items()},
                     description)
  return open_array_record(spec, 'text', name, data_dir, ('text',), description)


# -------------------------------------------------------------------------------------------------- parallel:


def _misaligned(paths: Sequence[str], counts: Sequence[int]) -> DataError:
  return DataError(
      f'parallel files {paths[0]} ({counts[0]} lines) and {paths[1]} ({counts[1]} lines) differ in line count; '
      'they must be aligned line by line.')


def make_parallel_source(spec: str, prefix: str, config: Any, data_dir: str) -> Source:
  directory = os.path.expanduser(prefix)
  if not os.path.isdir(directory):
    raise DataFileNotFoundError(f'data.source={spec!r}: directory {directory!r} does not exist; check the path.')
  src, tgt = str(config.data.src_lang), str(config.data.tgt_lang)
  if src == tgt:
    raise DataError(f'data.src_lang and data.tgt_lang are both {src!r}; a parallel source needs two languages.')
  files: dict[str, tuple[str, str]] = {}
  for split in config_splits(config):
    pair = [find_split_file(directory, split, ('.' + lang, '.' + lang + '.gz')) for lang in (src, tgt)]
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

  def reader(paths):
    def make():
      a, b = read_lines(paths[0]), read_lines(paths[1])
      if len(a) != len(b):
        raise _misaligned(paths, (len(a), len(b)))
      return ({src: x, tgt: y} for x, y in zip(a, b))
    return make

  ids = {s: [file_id(p) for p in ps] for s, ps in files.items()}
  name = 'jaxformer_parallel_' + fingerprint([FORMAT, 'parallel', src, tgt, ids])
  # Check alignment before writing anything, so the error names the files.
  for paths in ([] if is_prepared(data_dir, name) else files.values()):
    counts = [len(read_lines(p)) for p in paths]
    if counts[0] != counts[1]:
      raise _misaligned(paths, counts)
  description = f'parallel source {spec} ({src}->{tgt})'
  build_array_record(name, data_dir, (src, tgt), {s: reader(ps) for s, ps in files.items()}, description)
  return open_array_record(spec, 'pairs', name, data_dir, (src, tgt), description)


# ----------------------------------------------------------------------------------------------------- jsonl:


def _instructions(paths: Sequence[str], prompt_key: str, response_key: str) -> list[tuple[str, str]]:
  """(prompt, response) of every non-blank line; DataError naming file:line for a line that is not such an object."""
  out = []
  for path in paths:
    for number, line in enumerate(read_lines(path), start=1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f'{path}:{number}: not valid JSON ({e.msg}); each line must be one JSON object with '
                        f'{prompt_key!r} and {response_key!r} fields.') from None
      if not isinstance(record, dict):
        raise DataError(f'{path}:{number}: a JSON {type(record).__name__}, not an object; each line must be one '
                        f'JSON object with {prompt_key!r} and {response_key!r} fields.')
      for key, setting in ((prompt_key, 'data.prompt_key'), (response_key, 'data.response_key')):
        if key not in record:
          raise DataError(f'{path}:{number}: no {key!r} field (the line has: {", ".join(map(str, record)) or "none"}); '
                          f'add it, or set {setting} to the field that holds it.')
        if not isinstance(record[key], str):
          raise DataError(f'{path}:{number}: field {key!r} is a JSON {type(record[key]).__name__}, not a string.')
      out.append((record[prompt_key], record[response_key]))
  return out


def _first_record(spec: str, pattern: str, config: Any) -> dict:
  """The first JSON object of the source's first file ({} if none): whether the lines are conversations."""
  paths = (sorted(p for ps in files_per_split(spec, pattern, config).values() for p in ps) if '{split}' in pattern
           else expand(spec, pattern))
  if paths:  # read up to the first non-blank line only: this runs at every start, and the file may be large
    try:
      with _open_text(paths[0]) as f:
        line = next((line for line in f if line.strip()), '')
      record = json.loads(line) if line else {}
      if isinstance(record, dict):
        return record
    except (UnicodeDecodeError, json.JSONDecodeError):
      pass
  for _, record in jsonl_records(paths[:1], 'the fields of the data'):  # a bad first line: its one-line error
    return record
  return {}


def _conversations(paths: Sequence[str], key: str) -> list[tuple[str]]:
  """(messages as JSON,) of every line: chat data (data.messages_key), rendered later with the chat template."""
  out = []
  for where, record in jsonl_records(paths, f'a {key!r} list of messages'):
    if key not in record:
      raise DataError(f'{where}: no {key!r} field (the line has: {", ".join(map(str, record)) or "none"}); every line '
                      f'of a conversation file needs one (data.messages_key).')
    messages = chat.parse_messages(record[key], where)
    if not any(m['role'] == chat.ASSISTANT for m in messages):
      raise DataError(f'{where}: the conversation has no "assistant" message, so nothing in it would be trained; '
                      'add one or drop the line.')
    out.append((json.dumps(messages, ensure_ascii=False),))
  return out


def label_names(config: Any) -> list[str]:
  """data.label_names as a list (the label strings in class-id order; [] = integer labels)."""
  return [n.strip() for n in str(config.data.label_names).split(',') if n.strip()]


def _classification_keys(config: Any) -> tuple[str, str, str, str]:
  """(text key, pair key a, pair key b, label key) of a labelled jsonl line."""
  data = config.data
  pair = [k.strip() for k in str(data.text_pair_keys).split(',')]
  if len(pair) != 2 or not all(pair):
    raise DataError(f'data.text_pair_keys={data.text_pair_keys!r} must name two fields, e.g. text_a,text_b.')
  return str(data.text_key or 'text'), pair[0], pair[1], str(data.label_key)


def _label(value: Any, where: str, names: Sequence[str], num_classes: int) -> int:
  """A line's label as a class id in [0, num_classes): an integer, or one of data.label_names."""
  if isinstance(value, str):
    if not names:
      raise DataError(f'{where}: label {value!r} is a string; set data.label_names to the label strings in class-id '
                      'order (e.g. --config.data.label_names=negative,positive), or use integer labels.')
    if value not in names:
      raise DataError(f'{where}: label {value!r} is not one of data.label_names ({", ".join(names)}); fix the line '
                      'or add the name to data.label_names.')
    value = names.index(value)
  elif not isinstance(value, int) or isinstance(value, bool):
    raise DataError(f'{where}: label {json.dumps(value)} is not an integer class id or a label name.')
  if not 0 <= value < num_classes:
    raise DataError(f'{where}: label {value} is outside [0, model.num_classes={num_classes}); fix the line or raise '
                    'model.num_classes.')
  return value


def _labelled(paths: Sequence[str], config: Any) -> list[tuple[str, str, str]]:
  """(text_a, text_b ('' for a single text), label id as a string) of every non-blank line of labelled data."""
  text_key, key_a, key_b, label_key = _classification_keys(config)
  names, num_classes = label_names(config), int(config.model.num_classes)
  out = []
  for where, record in jsonl_records(paths, f'a {text_key!r} (or {key_a!r} and {key_b!r}) and a {label_key!r} field'):
    has = lambda: ", ".join(map(str, record)) or "none"  # noqa: E731
    if text_key in record:
      texts = (record[text_key], '')
      fields = (text_key,)
    elif key_a in record and key_b in record:
      texts = (record[key_a], record[key_b])
      fields = (key_a, key_b)
    else:
      raise DataError(f'{where}: no {text_key!r} field, nor both {key_a!r} and {key_b!r} (the line has: {has()}); '
                      'add them, or set data.text_key / data.text_pair_keys to the fields that hold the text.')
    for key, text in zip(fields, texts):
      if not isinstance(text, str):
        raise DataError(f'{where}: field {key!r} is a JSON {type(text).__name__}, not a string.')
    if label_key not in record:
      raise DataError(f'{where}: no {label_key!r} field (the line has: {has()}); add it, or set data.label_key to '
                      'the field that holds the label.')
    out.append((*texts, str(_label(record[label_key], where, names, num_classes))))
  return out


def jsonl_records(paths: Sequence[str], wanted: str):
  """(file:line, JSON object) of every non-blank line; DataError naming file:line for a line that is not one."""
  for path in paths:
    for number, line in enumerate(read_lines(path), start=1):
      if not line.strip():
        continue
      where = f'{path}:{number}'
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f'{where}: not valid JSON ({e.msg}); each line must be one JSON object with {wanted}.') from None
      if not isinstance(record, dict):
        raise DataError(f'{where}: a JSON {type(record).__name__}, not an object; each line must be one JSON object '
                        f'with {wanted}.')
      yield where, record


def string_field(record: dict, key: str, where: str, setting: str | None, *, empty_ok: bool = True) -> str:
  """record[key] as a string; a one-line DataError naming file:line (`where`) and the config key that names the
  field (`setting`, if any) when it is missing, not a string, or (not empty_ok) blank."""
  if key not in record:
    fix = f'add it, or set {setting} to the field that holds it' if setting else 'add it'
    raise DataError(f'{where}: no {key!r} field (the line has: {", ".join(map(str, record)) or "none"}); {fix}.')
  value = record[key]
  if not isinstance(value, str):
    raise DataError(f'{where}: field {key!r} is a JSON {type(value).__name__}, not a string.')
  if not empty_ok and not value.strip():
    raise DataError(f'{where}: field {key!r} is empty; a response needs at least one character (drop the line).')
  return value


def _preferences(paths: Sequence[str], config: Any) -> list[tuple[str, str, str, str]]:
  """(prompt, chosen, rejected, margin as a string) of every pair: a line's chosen/rejected pair, or every ordered
  pair of its ranking (data.responses_key, best first)."""
  data = config.data
  prompt_key, chosen_key, rejected_key = str(data.prompt_key), str(data.chosen_key), str(data.rejected_key)
  ranking_key, margin_key = str(data.responses_key), str(data.margin_key)
  out = []
  wanted = f'{prompt_key!r} and {chosen_key!r} + {rejected_key!r} (or a ranking {ranking_key!r}) fields'
  conversational = None
  for where, record in jsonl_records(paths, wanted):
    if conversational is None:
      conversational = isinstance(record.get(prompt_key), list)
    if conversational:
      out.append(_chat_preference(record, where, prompt_key, chosen_key, rejected_key, margin_key))
      continue
    prompt = string_field(record, prompt_key, where, 'data.prompt_key')
    if ranking_key in record and chosen_key not in record:
      ranking = record[ranking_key]
      if not isinstance(ranking, list) or len(ranking) < 2:
        raise DataError(f'{where}: field {ranking_key!r} must be a list of at least two responses, best first.')
      responses = [string_field({ranking_key: r}, ranking_key, where, 'data.responses_key', empty_ok=False)
                   for r in ranking]
      out += [(prompt, responses[i], responses[j], '0') for i in range(len(responses))
              for j in range(i + 1, len(responses))]
      continue
    if chosen_key not in record and rejected_key not in record:
      raise DataError(f'{where}: no {chosen_key!r} / {rejected_key!r} fields nor a ranking {ranking_key!r} (the line '
                      f'has: {", ".join(map(str, record)) or "none"}); add them, or set data.chosen_key / '
                      'data.rejected_key / data.responses_key.')
    chosen = string_field(record, chosen_key, where, 'data.chosen_key', empty_ok=False)
    rejected = string_field(record, rejected_key, where, 'data.rejected_key', empty_ok=False)
    margin = record.get(margin_key, 0.0)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)):
      raise DataError(f'{where}: field {margin_key!r} is {json.dumps(margin)}, not a number.')
    out.append((prompt, chosen, rejected, repr(float(margin))))
  return out


def _chat_preference(record: dict, where: str, prompt_key: str, chosen_key: str, rejected_key: str,
                     margin_key: str) -> tuple[str, str, str, str]:
  """A conversational pair (TRL's format: the prompt a list of messages, chosen / rejected lists of the assistant
  message(s) that follow, or strings: one assistant message) as JSON message lists and the margin."""
  if not isinstance(record.get(prompt_key), list):
    raise DataError(f'{where}: field {prompt_key!r} is not a list of messages, but the file\'s first pair is '
                    'conversational; write every line in one format.')
  prompt = chat.parse_messages(record[prompt_key], where)
  sides = []
  for key, setting in ((chosen_key, 'data.chosen_key'), (rejected_key, 'data.rejected_key')):
    value = record.get(key)
    if isinstance(value, str):
      value = [{'role': chat.ASSISTANT, 'content': string_field(record, key, where, setting, empty_ok=False)}]
    elif value is None:
      string_field(record, key, where, setting)  # the one-line "no such field" error
    sides.append(json.dumps(chat.parse_messages(value, f'{where} ({key})'), ensure_ascii=False))
  margin = record.get(margin_key, 0.0)
  if isinstance(margin, bool) or not isinstance(margin, (int, float)):
    raise DataError(f'{where}: field {margin_key!r} is {json.dumps(margin)}, not a number.')
  return json.dumps(prompt, ensure_ascii=False), sides[0], sides[1], repr(float(margin))


def _prompts(paths: Sequence[str], config: Any) -> list[tuple[str, str]]:
  """(prompt, the line's other fields as JSON) of every line."""
  key = str(config.data.prompt_key)
  out = []
  for where, record in jsonl_records(paths, f'a {key!r} field'):
    if isinstance(record.get(key), list):  # conversational: the messages so far (rendered with the chat template)
      prompt = json.dumps(chat.parse_messages(record[key], where), ensure_ascii=False)
    else:
      prompt = string_field(record, key, where, 'data.prompt_key', empty_ok=False)
    out.append((prompt, json.dumps({k: v for k, v in record.items() if k != key}, sort_keys=True)))
  return out


def _tagged(paths: Sequence[str], config: Any) -> list[tuple[str, str]]:
  """(words, tag ids) as JSON lists, of every line of token-classification data: a list of words
  (data.words_key) and as many tags (data.tags_key), each an integer id or one of data.label_names."""
  words_key, tags_key = str(config.data.words_key), str(config.data.tags_key)
  names, num_classes = label_names(config), int(config.model.num_classes)
  out = []
  for where, record in jsonl_records(paths, f'a {words_key!r} list of words and a {tags_key!r} list of tags'):
    for key, setting in ((words_key, 'data.words_key'), (tags_key, 'data.tags_key')):
      if key not in record:
        raise DataError(f'{where}: no {key!r} field (the line has: {", ".join(map(str, record)) or "none"}); add it, '
                        f'or set {setting} to the field that holds it.')
      if not isinstance(record[key], list):
        raise DataError(f'{where}: field {key!r} is a JSON {type(record[key]).__name__}, not a list.')
    words, tags = record[words_key], record[tags_key]
    if len(words) != len(tags):
      raise DataError(f'{where}: {len(words)} words but {len(tags)} tags; each word needs exactly one tag.')
    if not all(isinstance(w, str) for w in words):
      raise DataError(f'{where}: field {words_key!r} must be a list of strings (the words).')
    ids = [_label(t, where, names, num_classes) for t in tags]
    out.append((json.dumps(words, ensure_ascii=False), json.dumps(ids)))
  return out


def _spans(paths: Sequence[str], config: Any) -> list[tuple[str, str, str]]:
  """(context, question, [answer texts, answer starts] as JSON) of every line of SQuAD-format data: `context`,
  `question` and `answers` {"text": [...], "answer_start": [...]} (character offsets into the context; each answer
  must be the context's text there)."""
  del config
  out = []
  for where, record in jsonl_records(paths, "'context', 'question' and 'answers' fields (SQuAD's format)"):
    context = string_field(record, 'context', where, None)
    question = string_field(record, 'question', where, None)
    answers = record.get('answers')
    if (not isinstance(answers, dict) or not isinstance(answers.get('text'), list)
        or not isinstance(answers.get('answer_start'), list)):
      raise DataError(f'{where}: field \'answers\' must be {{"text": [...], "answer_start": [...]}} (SQuAD\'s format).')
    texts, starts = answers['text'], answers['answer_start']
    if len(texts) != len(starts):
      raise DataError(f'{where}: {len(texts)} answer texts but {len(starts)} answer_start offsets; give one each.')
    for text, start in zip(texts, starts):
      if (not isinstance(text, str) or isinstance(start, bool) or not isinstance(start, int)
          or context[start:start + len(text)] != text):
        raise DataError(f'{where}: answer {text!r} is not the context\'s text at answer_start={start!r}; '
                        'answer_start is the character offset of the answer in the context.')
    out.append((context, question, json.dumps([texts, starts], ensure_ascii=False)))
  return out


# examples kind -> (read(paths, config), ArrayRecord features, the config keys that change what is read)
_READERS: dict[str, tuple[Callable[..., list], tuple[str, ...], Callable[[Any], tuple]]] = {
    'preference': (_preferences, ('prompt', 'chosen', 'rejected', 'margin'),
                   lambda c: (c.data.prompt_key, c.data.chosen_key, c.data.rejected_key, c.data.responses_key,
                              c.data.margin_key)),
    'prompts': (_prompts, ('prompt', 'fields'), lambda c: (c.data.prompt_key,)),
    'tagged': (_tagged, ('words', 'tags'),
               lambda c: (c.data.words_key, c.data.tags_key, c.data.label_names, c.model.num_classes)),
    'spans': (_spans, ('context', 'question', 'answers'), lambda c: ()),
}


def make_jsonl_source(spec: str, pattern: str, config: Any, data_dir: str) -> Source:
  """Instruction data, labelled texts (model.head=classification), preference pairs or prompts: whichever
  examples the run reads (align.examples_of)."""
  examples = align.examples_of(config)
  if examples in _READERS:
    reader, features, keys_of = _READERS[examples]
    keys = tuple(map(str, keys_of(config)))
    read = functools.partial(reader, config=config)
    kind = examples
    if examples in ('preference', 'prompts') and isinstance(_first_record(spec, pattern, config).get(keys[0]), list):
      kind = f'chat_{examples}'  # TRL's conversational format: rendered with the chat template when tokenized
    description = f'jsonl source {spec} ({examples}: {", ".join(keys)})'
  elif examples == 'labelled':
    keys = _classification_keys(config) + (','.join(label_names(config)), str(config.model.num_classes))
    read = functools.partial(_labelled, config=config)
    kind, features = 'labelled', ('text_a', 'text_b', 'label')
    description = f'jsonl source {spec} (labelled: {keys[0]} or {keys[1]}+{keys[2]} -> {keys[3]})'
  elif _first_record(spec, pattern, config).keys() >= {str(config.data.messages_key)}:
    keys = (str(config.data.messages_key),)
    read = functools.partial(_conversations, key=keys[0])
    kind, features = 'conversations', ('messages',)
    description = f'jsonl source {spec} (conversations: {keys[0]})'
  else:
    keys = (str(config.data.prompt_key), str(config.data.response_key))
    read = functools.partial(_instructions, prompt_key=keys[0], response_key=keys[1])
    kind, features = 'instructions', ('prompt', 'response')
    description = f'jsonl source {spec} ({keys[0]} -> {keys[1]})'
  if '{split}' in pattern:
    files = files_per_split(spec, pattern, config)
    ids = {s: [file_id(p) for p in ps] for s, ps in files.items()}
    generators = {s: functools.partial(read, ps) for s, ps in files.items()}
  else:
    paths = expand(spec, pattern)
    ids = {'all': [file_id(p) for p in paths], 'fraction': TEXT_SPLIT_FRACTION}
    generators = _fraction_splits(spec, paths, read)
  name = 'jaxformer_jsonl_' + fingerprint([FORMAT, 'jsonl', keys, ids] + ([kind] if kind != 'instructions' else []))
  records = {s: (lambda make=make: (dict(zip(features, ex)) for ex in make())) for s, make in generators.items()}
  build_array_record(name, data_dir, features, records, description)
  return open_array_record(spec, kind, name, data_dir, features, description)
