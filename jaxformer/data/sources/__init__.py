"""Where examples come from. `data.source=<kind>:<arg>` picks a factory from SOURCES by its kind:

  builtin:lm | builtin:numbers   SYNTHETIC data generated in-process        (sources/builtin.py,
  builtin:passkey                                                           sources/passkey.py)
  text:<path or glob>            local text files, LM documents             (sources/local.py)
  parallel:<prefix>              local line-aligned translation files       (sources/local.py)
  jsonl:<path or glob>           local prompt/response instruction data,    (sources/local.py)
                                 labelled texts (model.head=classification),
                                 tagged words (token_classification), SQuAD-style
                                 questions (span),
                                 preference pairs or rankings (model.head=reward,
                                 align.method=dpo|simpo) or prompts (grpo|rloo|ppo)
  tfds:<name>[/<config>]         a prepared TFDS ArrayRecord dataset        (sources/tfds.py)

A factory is `(spec, arg, config, data_dir) -> Source` (sources/base.py); adding a source is one module with a
factory and one line in SOURCES.
"""
from __future__ import annotations

from typing import Any

from jaxformer.errors import DataError, DataFileNotFoundError
from jaxformer.data.sources import builtin, local, tfds
from jaxformer.data.sources.base import (ChatPreference, ChatPrompt, Conversation, Example, Instruction, Labelled,
                                         ListSplit, Preference, Prompt, Source, SourceFactory, SpanExample, Split,
                                         SPLIT_ALIASES, Tagged, data_dir_for)
from jaxformer.data.sources.builtin import (NUMBER_SPLITS, SyntheticLanguage, builtin_lm_entropy, number_to_words,
                                            synthetic_language)
from jaxformer.data.sources.local import TEXT_CHUNK_CHARS, TEXT_SPLIT_FRACTION, jsonl_records, string_field
from jaxformer.data.sources.tfds import TfdsSplit

SOURCES: dict[str, SourceFactory] = {
    'builtin': builtin.make_source,
    'text': local.make_text_source,
    'parallel': local.make_parallel_source,
    'jsonl': local.make_jsonl_source,
    'tfds': tfds.make_source,
}
# Head.examples (jaxformer/heads) -> the source kinds that yield such examples (the first is the one to suggest)
EXAMPLE_KINDS: dict[str, tuple[str, ...]] = {'text': tuple(SOURCES), 'labelled': ('jsonl',), 'preference': ('jsonl',),
                                             'prompts': ('jsonl',), 'tagged': ('jsonl',), 'spans': ('jsonl',)}


def get_source(config: Any, workdir: str) -> Source:
  """Resolves config.data.source into a Source (building the ArrayRecord copy of local files once)."""
  spec = str(config.data.source)
  kind, _, arg = spec.partition(':')
  if not arg:
    raise DataError(f'data.source={spec!r} needs a value after the colon, e.g. text:path/to/file.txt.')
  if kind not in SOURCES:
    raise DataError(
        f'data.source={spec!r} is not a valid source; use builtin:lm, builtin:numbers, builtin:passkey, text:<path or glob>, '
        'parallel:<prefix>, jsonl:<path or glob> or tfds:<name>[/<config>].')
  return SOURCES[kind](spec, arg, config, data_dir_for(config, workdir))
