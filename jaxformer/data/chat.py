"""Conversations: `messages` rendered with a chat template, as transformers' `apply_chat_template` renders them.

A conversation is a list of {"role", "content"} messages (any other keys go to the template too, as transformers
passes them). The template is a Jinja string, rendered in the environment transformers uses for chat templates (a
sandbox with trim_blocks and lstrip_blocks, loop controls, `raise_exception`, `strftime_now`, a `tojson` that
does not escape HTML) with `messages`, `add_generation_prompt` and the tokenizer's special-token strings
(bos_token, eos_token, ...) as variables; the rendered text is tokenized whole, without adding special tokens, so
the ids are apply_chat_template(messages, tokenize=True)'s (checked on fixtures: tests/fixtures/chat).

Where the template comes from (data.chat_template):
  ''          the tokenizer's own: an hf: directory's chat_template.jinja, else the `chat_template` of its
              tokenizer_config.json (a string, or a list of named templates: 'default' is taken). jaxformer's own
              tokenizers have none, so they get the built-in `turns`.
  a name      a built-in template (TEMPLATES): `turns` (bos, then per message its role, a newline and its content;
              an assistant message ends with eos, the others with a newline: only characters any char vocabulary
              has, and eos, so decoding stops where an assistant turn ends) or `chatml` (<|im_start|>role\\n...
              <|im_end|>\\n, for tokenizers that have those tokens).
  a path      a .jinja file.

Which tokens are trained: the assistant messages' text as the template renders it (its content and whatever the
template puts after it up to the next message, e.g. <|im_end|> or eos), found by rendering the conversation up to
each assistant message with add_generation_prompt=True and up to its end (the span between the two); a token
overlapping such a span is scored, as transformers' return_assistant_tokens_mask counts them. A template that
renders earlier turns differently once later turns follow (some drop earlier reasoning) cannot be cut this way:
that is a one-line error. `{% generation %}` tags (TRL's assistant-mask markup) are accepted and render their body.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
from typing import Any, Sequence

import jinja2
import jinja2.ext
import jinja2.sandbox
import numpy as np

from jaxformer.errors import DataError

ASSISTANT = 'assistant'

TEMPLATES: dict[str, str] = {
    'turns': ("{{ bos_token }}{% for message in messages %}{{ message['role'] }}\n{{ message['content'] }}"
              "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\\n' }}{% endif %}{% endfor %}"
              "{% if add_generation_prompt %}assistant\n{% endif %}"),
    'chatml': ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
               "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
}
OWN_DEFAULT = 'turns'  # what data.chat_template='' means for a tokenizer without a template of its own


class _GenerationTag(jinja2.ext.Extension):
  """`{% generation %}...{% endgeneration %}`: renders its body (the markup TRL-style templates use to mark
  assistant text; the spans here are found by rendering prefixes instead)."""
  tags = {'generation'}

  def parse(self, parser: Any) -> Any:
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(('name:endgeneration',), drop_needle=True)
    return jinja2.nodes.CallBlock(self.call_method('_body'), [], [], body).set_lineno(lineno)

  @staticmethod
  def _body(caller: Any) -> str:
    return caller()


def _raise(message: str) -> None:
  raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                     extensions=[_GenerationTag, jinja2.ext.loopcontrols])
  env.filters['tojson'] = _tojson
  env.globals['raise_exception'] = _raise
  env.globals['strftime_now'] = lambda fmt: datetime.datetime.now().strftime(fmt)
  return env


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
  """A compiled template and the special-token strings it is rendered with; `name` says where it came from."""
  text: str
  special_tokens: dict[str, str]
  name: str

  def __post_init__(self) -> None:
    try:
      compiled = _environment().from_string(self.text)
    except jinja2.exceptions.TemplateSyntaxError as e:
      raise DataError(f'chat template {self.name}: not a valid Jinja template ({e.message}, line {e.lineno}).') from None
    object.__setattr__(self, '_compiled', compiled)

  def render(self, messages: Sequence[dict], *, add_generation_prompt: bool = False) -> str:
    try:
      return self._compiled.render(**self.special_tokens, messages=list(messages), tools=None, documents=None,
                                   add_generation_prompt=add_generation_prompt)
    except jinja2.exceptions.TemplateError as e:
      raise DataError(f'chat template {self.name} refused a conversation: {e}') from None

  def assistant_spans(self, messages: Sequence[dict]) -> tuple[str, list[tuple[int, int]]]:
    """(the rendered conversation, the [start, end) character span of each assistant message)."""
    text = self.render(messages)
    spans = []
    for i, message in enumerate(messages):
      if message.get('role') != ASSISTANT:
        continue
      before = self.render(messages[:i], add_generation_prompt=True)
      through = self.render(messages[:i + 1])
      if not (text.startswith(through) and through.startswith(before)):
        raise DataError(f'chat template {self.name} renders the turns before assistant message {i} differently when '
                        'later turns follow, so its assistant text cannot be located; set data.chat_template to a '
                        'template (.jinja file) that renders each turn the same way whatever follows.')
      spans.append((len(before), len(through)))
    return text, spans


def _read(path: str) -> str:
  with open(path, encoding='utf-8') as f:
    return f.read()


def tokenizer_template(directory: str) -> str | None:
  """The chat template of a Hugging Face tokenizer directory, found as transformers finds it (chat_template.jinja
  first, then tokenizer_config.json's chat_template: a string or a list of {name, template}, 'default' taken)."""
  path = os.path.join(directory, 'chat_template.jinja')
  if os.path.isfile(path):
    return _read(path)
  config_path = os.path.join(directory, 'tokenizer_config.json')
  if not os.path.isfile(config_path):
    return None
  with open(config_path, encoding='utf-8') as f:
    value = json.load(f).get('chat_template')
  if isinstance(value, list):
    named = {t.get('name'): t.get('template') for t in value if isinstance(t, dict)}
    value = named.get('default')
  return value if isinstance(value, str) else None


def template_for(tokenizer: Any, setting: str) -> ChatTemplate:
  """The ChatTemplate of data.chat_template=`setting` for this tokenizer (see the module docstring)."""
  specials = tokenizer.special_token_strings
  setting = str(setting or '')
  if not setting:
    own = getattr(tokenizer, 'chat_template', None)
    if own:
      return ChatTemplate(own, specials, f'of {getattr(tokenizer, "directory", tokenizer.kind)}')
    return ChatTemplate(TEMPLATES[OWN_DEFAULT], specials, OWN_DEFAULT)
  if setting in TEMPLATES:
    return ChatTemplate(TEMPLATES[setting], specials, setting)
  path = os.path.expanduser(setting)
  if not os.path.isfile(path):
    raise DataError(f'data.chat_template={setting!r} is neither a built-in template ({", ".join(TEMPLATES)}) nor a '
                    'file; give one of those names or the path of a .jinja file (\'\' = the tokenizer\'s own).')
  return ChatTemplate(_read(path), specials, path)


def parse_messages(value: Any, where: str) -> list[dict]:
  """A `messages` value checked: a non-empty list of objects with string role and content (one line otherwise)."""
  if isinstance(value, str):
    try:
      value = json.loads(value)
    except json.JSONDecodeError:
      raise DataError(f'{where}: messages is not valid JSON.') from None
  if not isinstance(value, list) or not value:
    raise DataError(f'{where}: messages must be a non-empty list of {{"role": ..., "content": ...}} objects.')
  for k, message in enumerate(value):
    if not isinstance(message, dict) or not isinstance(message.get('role'), str) or not isinstance(
        message.get('content'), str):
      raise DataError(f'{where}: message {k} must be an object with string "role" and "content" fields.')
  # transformers drops None-valued keys before rendering; JSON null never reaches a template either
  return [{k: v for k, v in m.items() if v is not None} for m in value]


def encode(tokenizer: Any, template: ChatTemplate, messages: Sequence[dict], *,
           add_generation_prompt: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """(ids, assistant) of a rendered conversation: int32 ids as apply_chat_template(tokenize=True) gives them and a
  bool per id, True for a token overlapping an assistant message (all False with add_generation_prompt)."""
  if add_generation_prompt:
    text, spans = template.render(messages, add_generation_prompt=True), []
  else:
    text, spans = template.assistant_spans(messages)
  ids, offsets = tokenizer.encode_with_offsets(text, cuts=[c for span in spans for c in span])
  assistant = np.zeros(len(ids), bool)
  for start, end in spans:
    assistant |= (offsets[:, 1] > start) & (offsets[:, 0] < end)
  return ids, assistant


def frame(tokenizer: Any, ids: np.ndarray, assistant: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(tokens, targets) of a conversation for next-token training: tokens = ids[:-1], targets = ids[1:] where the
  target is an assistant token, else unscored."""
  targets = np.where(assistant[1:], ids[1:], tokenizer.unscored_target)
  return ids[:-1].astype(np.int32), targets.astype(np.int32)


class RenderedChat(str):
  """A conversation rendered for generation (add_generation_prompt=True): the text, which is what is printed and
  what a reward model scores, holding its `ids` (the template's tokens, which encoding the text again as a plain
  prompt would not give: no extra BOS, special tokens as themselves) and its `messages`."""
  ids: np.ndarray
  messages: list[dict]


def generation_prompt(tokenizer: Any, template: ChatTemplate, messages: Sequence[dict]) -> RenderedChat:
  """The conversation so far, ready for the model to write the next assistant message."""
  rendered = RenderedChat(template.render(messages, add_generation_prompt=True))
  rendered.ids = tokenizer.encode_with_offsets(rendered)[0]  # the whole text, as encode tokenizes it
  rendered.messages = list(messages)
  return rendered
