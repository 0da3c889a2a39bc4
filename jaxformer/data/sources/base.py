"""The interface every source implements: a `Source` of named `Split`s, each a random-access list of examples.

An example is a `str` (a text source, kind 'text'), a `(source, target)` pair of `str` (a translation source,
kind 'pairs'), an `Instruction(prompt, response)` (kind 'instructions'; also a pair, so encoder_decoder reads it
as one, while decoder_only scores only its response), a `Conversation(messages)` (kind 'conversations': chat
messages, decoder_only), a `Labelled(text_a, text_b, label)` (kind 'labelled',
model.head=classification), a `Tagged(words, tags)` (kind 'tagged', model.head=token_classification), a
`SpanExample(context, question, answer_texts, answer_starts)` (kind 'spans', model.head=span), a
`Preference(prompt, chosen, rejected, margin)` (kind 'preference': model.head=reward,
align.method=dpo / simpo) or a `Prompt(prompt, fields)` (kind 'prompts': the online align methods). The pipeline only ever sees this interface, so shuffling,
per-host sharding and exact resumption are the same code for all sources.
"""
from __future__ import annotations

import os
import dataclasses
from typing import Any, Callable, NamedTuple, Sequence

from jaxformer.errors import DataError

Example = Any  # str | tuple[str, str] | Instruction | Conversation | Labelled | Tagged | SpanExample | Preference | Prompt


class Instruction(NamedTuple):
  """An instruction example: the model is trained to produce `response` after `prompt`."""
  prompt: str
  response: str


@dataclasses.dataclass(frozen=True)
class Conversation:
  """A chat example (kind 'conversations'): `messages` is the JSON list of {"role", "content"} objects, rendered
  with the run's chat template (data/chat.py); decoder_only trains on the assistant messages only. Not a tuple, so
  nothing mistakes it for a (source, target) pair."""
  messages: str


class Labelled(NamedTuple):
  """A classification example (model.head=classification): a text, or a text pair when `text_b` is not empty, and
  its class id in [0, model.num_classes)."""
  text_a: str
  text_b: str
  label: int


class Tagged(NamedTuple):
  """A token-classification example (model.head=token_classification): pre-split words and one tag id per word
  (kind 'tagged')."""
  words: tuple[str, ...]
  tags: tuple[int, ...]


class SpanExample(NamedTuple):
  """An extractive question-answering example (model.head=span, SQuAD's format; kind 'spans'): the answers are
  spans of `context`, each a text and its character offset (empty for a question without an answer)."""
  context: str
  question: str
  answer_texts: tuple[str, ...]
  answer_starts: tuple[int, ...]


class Preference(NamedTuple):
  """A preference pair: after `prompt`, `chosen` is the better response and `rejected` the worse; `margin` is how
  much better (a reward model's optional margin; 0 when the data gives none)."""
  prompt: str
  chosen: str
  rejected: str
  margin: float


class ChatPreference(Preference):
  """A preference pair in the conversational format (TRL's): `prompt` is the JSON list of the conversation's
  messages so far, `chosen` / `rejected` JSON lists of the assistant message(s) that follow; rendered with the chat
  template (data/chat.py) when the pair is tokenized."""


class Prompt(NamedTuple):
  """A prompt to sample completions for (align.method=grpo / rloo / ppo); `fields` is the JSON object of the
  line's other fields (e.g. the reference answer a reward function checks against)."""
  prompt: str
  fields: str


class ChatPrompt(Prompt):
  """A prompt in the conversational format: `prompt` is the JSON list of the messages so far; it is rendered with
  the chat template and its generation prompt before sampling (data/chat.py)."""


# How a split name finds its files (local sources) after the exact name.
SPLIT_ALIASES = {
    'train': ('train',),
    'validation': ('validation', 'valid', 'val', 'dev'),
    'test': ('test',),
}


class Split:
  """A random-access split: `len(split)` examples, `read(indices)` returns them in that order."""

  name: str

  def __len__(self) -> int:
    raise NotImplementedError

  def read(self, indices: Sequence[int]) -> list[Example]:
    raise NotImplementedError


class ListSplit(Split):
  """A split held in memory (built-in data, empty splits)."""

  def __init__(self, name: str, examples: Sequence[Example]):
    self.name = name
    self._examples = examples

  def __len__(self) -> int:
    return len(self._examples)

  def read(self, indices: Sequence[int]) -> list[Example]:
    return [self._examples[int(i)] for i in indices]


class Source:
  """A data source: `kind` is 'text' (LM documents), 'pairs' ((source, target) translation pairs) or
  'instructions' (Instruction examples).

  `splits` maps a split name to a Split or to a zero-argument callable making it on first use; `description` is
  a human-readable name for logs.
  """

  def __init__(self, spec: str, kind: str, splits: dict[str, Split | Callable[[], Split]], description: str = ''):
    self.spec = spec
    self.kind = kind
    self._splits = splits
    self.description = description

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


# A source factory: (spec, the part after 'kind:', config, data_dir) -> Source. data_dir is where datasets are
# read from or converted into (see data_dir_for).
SourceFactory = Callable[[str, str, Any, str], Source]


def data_dir_for(config: Any, workdir: str) -> str:
  """data.data_dir, or <workdir>/data when empty."""
  return os.path.abspath(os.path.expanduser(config.data.data_dir or os.path.join(workdir, 'data')))


def split_candidates(split: str) -> tuple[str, ...]:
  """The names a split is looked up by: itself first, then its aliases."""
  return (split,) + tuple(a for a in SPLIT_ALIASES.get(split, ()) if a != split)


def config_splits(config: Any) -> list[str]:
  """Every split a run may ask for: train / validation / test and the config's split keys (unsliced)."""
  names = ['train', 'validation', 'test']
  for key in ('train_split', 'eval_split', 'test_split'):
    value = str(getattr(config.data, key))
    if value not in names and '[' not in value:
      names.append(value)
  return names
