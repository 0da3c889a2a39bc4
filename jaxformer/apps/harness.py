"""lm-evaluation-harness on jaxformer models: zero- / few-shot task scores, the way papers report them.

`JaxformerLM` is an lm_eval model (a `TemplateLM`: the harness's own code turns (context, continuation) texts into
token ids, exactly as for its Hugging Face backend) whose three request types run on jaxformer:

  loglikelihood          likelihood.ContinuationScorer: batched, jitted, one program per length bucket, on the
                         run's mesh
  loglikelihood_rolling  the harness's rolling windows (model.max_len tokens, one token of context) scored the same way
                         (a Hugging Face tokenizer's text as its backend frames it, even Llama's <s> after the prefix
                         <s>; a jaxformer tokenizer's text after BOS, as jaxformer frames documents)
  generate_until         decoding.decode (greedy, or sampling when the task asks do_sample; a task's
                         repetition_penalty / no_repeat_ngram_size / min_new_tokens too), batched per generation
                         settings, cut at the task's `until` strings and EOS (a batch stops once every row has
                         produced one of them)

Tokens follow lm-eval's Hugging Face backend: a decoder's text is framed as the tokenizer frames a document start
(prefix ids: Llama's <s>, jaxformer's BOS; nothing for GPT-2), an empty context is the prefix token (BOS, else EOS);
an encoder_decoder's context is framed as a source (+ </s>) and the continuation is plain ids.

Tasks: names from `harness.include_path` folders (YAML task configs; relative `data_files` in a task's
`dataset_kwargs` are read relative to its YAML, so a folder of tasks + data works from any directory) or the
harness's own tasks, which download their data from the Hugging Face Hub (an error here, without network, unless
the datasets are in the local cache).

Needs the optional extra: pip install -e '.[harness]'.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import logging
import os
import zlib
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from jaxformer import decoding
from jaxformer import settings as settings_lib
from jaxformer import sharding as shd
from jaxformer.errors import UserError
from jaxformer.data import chat as chat_lib
from jaxformer.likelihood import ContinuationScorer, bucket_length

try:
  import lm_eval
  from lm_eval.api.model import TemplateLM
  from lm_eval.models import utils as lm_utils
  from lm_eval import utils as lm_eval_utils
except ImportError:  # the harness mode explains how to install it (require_harness)
  lm_eval = None
  TemplateLM = object  # type: ignore[assignment,misc]

INSTALL = "pip install -e '.[harness]'"
# generation kwargs a task may set (transformers' generate names) -> the decode.* key it becomes (until,
# max_gen_toks and do_sample are handled apart)
GEN_KWARGS = {'temperature': 'temperature', 'top_p': 'top_p', 'top_k': 'top_k',
              'repetition_penalty': 'repetition_penalty', 'no_repeat_ngram_size': 'no_repeat_ngram_size',
              'min_new_tokens': 'min_new_tokens'}


class HarnessError(UserError, ValueError):
  """A harness request that cannot run: a missing extra, an unknown task, a task that needs the network."""


def require_harness(flag: str = '--mode=harness') -> None:
  if lm_eval is None:
    raise HarnessError(f'{flag} needs lm-evaluation-harness (lm_eval); install it with {INSTALL}.')


@dataclasses.dataclass(frozen=True)
class HarnessModel:
  """What the adapter needs of a model: the module, its tokenizer and config sections, and where it runs."""
  model: Any
  tokenizer: Any
  config: Any  # the run's config (model / data / decode / harness sections)
  mesh: Any
  rules: Any


class JaxformerLM(TemplateLM):
  """An lm_eval model backed by a jaxformer model (decoder_only or encoder_decoder, a language-model head)."""

  def __init__(self, source: HarnessModel, *, batch_size: int, max_gen_toks: int, seed: int = 0):
    super().__init__()
    self.source, self.tokenizer = source, source.tokenizer
    config = source.config
    self.arch = str(config.model.arch)
    self.backend = 'seq2seq' if self.arch == 'encoder_decoder' else 'causal'
    self._max_length = settings_lib.token_positions(config)  # lm-eval's max_length: what the tokens may fill
    self._max_gen_toks, self.seed = int(max_gen_toks), int(seed)
    self.batch_size = max(1, int(batch_size))
    self.decode_section = config.decode
    self.scorer = ContinuationScorer(
        source.model, mesh=source.mesh, rules=source.rules, batch_size=self.batch_size, max_len=self._max_length,
        encoder_decoder=self.backend == 'seq2seq', src_len=int(config.data.src_seq_len) or self._max_length,
        decoder_start_id=self.tokenizer.decoder_start_id)
    # the decoding programs used: (batch, prompt width, new tokens, prefilled tokens)
    self.generation_shapes: set[tuple[int, int, int, int]] = set()

  # ------------------------------------------------------------------------------------------- tokens
  @property
  def eot_token_id(self) -> int:
    return int(self.tokenizer.eos_id)

  @property
  def prefix_token_id(self) -> int:
    bos = int(self.tokenizer.bos_id)
    return bos if bos >= 0 else self.eot_token_id

  @property
  def max_length(self) -> int:
    return self._max_length

  @property
  def max_gen_toks(self) -> int:
    return self._max_gen_toks

  @property
  def tokenizer_name(self) -> str:
    return f'jaxformer-{self.tokenizer.kind}'

  # ------------------------------------------------------------------------------------ chat templates
  # harness.apply_chat_template: lm-eval renders each request's (few-shot) messages with apply_chat_template, then
  # tokenizes the text; as its HF backend, no prefix token is added in front of text that starts with it already.
  chat = False  # run_tasks sets it: texts may hold the template's special-token strings (jaxformer: <s>, </s>)

  @functools.cached_property
  def _template(self) -> chat_lib.ChatTemplate:
    return chat_lib.template_for(self.tokenizer, self.source.config.data.chat_template)

  def chat_template(self, chat_template: bool | str = False) -> str | None:
    return self._template.text if chat_template else None

  def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """The messages rendered as transformers' apply_chat_template(tokenize=False) renders them; without the
    generation prompt the final message is continued (continue_final_message: the text ends with its content)."""
    template = self._template
    if add_generation_prompt:
      return template.render(chat_history, add_generation_prompt=True)
    tag = 'CONTINUE_FINAL_MESSAGE_TAG '
    history = [*chat_history[:-1], {**chat_history[-1], 'content': chat_history[-1]['content'] + tag}]
    text = template.render(history)
    at = text.rindex(tag.strip())
    return text[:at] if text[at:at + len(tag)] == tag else text[:at].rstrip()

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                 **kwargs: Any) -> list[int]:
    """Plain ids, or (the default, as transformers' encode) framed: a decoder's document start, an encoder's
    source. A chat-rendered text brings its own start (and jaxformer tokenizers read its special-token strings)."""
    if self.chat:
      ids = [int(i) for i in self.tokenizer.encode_with_offsets(string)[0]]
      bos = self.tokenizer.special_token_strings.get('bos_token')
      if add_special_tokens is None and bos and string.startswith(bos):
        add_special_tokens = False
    else:
      ids = self.tokenizer.encode(string)
    if add_special_tokens is not False:
      if self.backend == 'seq2seq':
        ids = [int(i) for i in self.tokenizer.source(ids)]
      else:
        ids = list(self.tokenizer.prefix_ids) + ids
    return ids[-left_truncate_len:] if left_truncate_len else ids

  def tok_decode(self, tokens: Sequence[int]) -> str:
    return self.tokenizer.decode(tokens)

  # ------------------------------------------------------------------------------------- log-likelihood
  def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                            disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
    out = self.scorer([(context, continuation) for _, context, continuation in requests])
    for (key, _, _), answer in zip(requests, out):
      if key is not None:
        self.cache_hook.add_partial('loglikelihood', key, answer)
    return out

  def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
    """Each text's log-likelihood over disjoint windows of model.max_len tokens (the harness's windows)."""
    windows, owner = [], []
    for i, (text,) in enumerate(req.args for req in requests):
      ids = self.tok_encode(text)
      if not self.tokenizer.pretrained and ids[:1] == [self.prefix_token_id]:
        ids = ids[1:]  # jaxformer's framing is the prefix token itself: score the text after it, not BOS after BOS
      for window in lm_eval_utils.get_rolling_token_windows(token_list=ids,
                                                            prefix_token=self.prefix_token_id,
                                                            max_seq_len=self.max_length, context_len=1):
        windows.append(lm_eval_utils.make_disjoint_window(window))
        owner.append(i)
    scores = self.scorer(windows)
    totals = [0.0] * len(requests)
    for i, (logp, _) in zip(owner, scores):
      totals[i] += logp
    for req, total in zip(requests, totals):
      self.cache_hook.add_partial('loglikelihood_rolling', req.args, total)
    return totals

  # ----------------------------------------------------------------------------------------- generation
  def _settings(self, kwargs: dict[str, Any], max_new: int) -> decoding.DecodeSettings:
    """The run's decode section, with the task's generation kwargs (greedy unless do_sample)."""
    unknown = sorted(set(kwargs) - set(GEN_KWARGS) - {'do_sample'})
    if unknown:
      raise HarnessError(f'a harness task asks for generation kwargs {", ".join(unknown)}, which jaxformer\'s '
                         f'harness model does not map (it reads until, max_gen_toks, do_sample, '
                         f'{", ".join(GEN_KWARGS)}); drop them from the task\'s generation_kwargs.')
    overrides = {GEN_KWARGS[k]: v for k, v in kwargs.items() if k in GEN_KWARGS}
    sample = bool(kwargs.get('do_sample')) and float(kwargs.get('temperature', 1.0)) > 0
    return decoding.DecodeSettings.from_config(self.decode_section, **overrides, max_len=max_new,
                                               method='sample' if sample else 'greedy',
                                               eos_id=self.eot_token_id)

  def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
    """Requests grouped by their generation kwargs, longest prompt first, batch_size rows per decode call (the
    prompt width padded to a length bucket, so a few programs serve every batch)."""
    groups: dict[str, list[int]] = {}
    for i, req in enumerate(requests):
      groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
    out: list[str] = [''] * len(requests)
    for key, members in groups.items():
      kwargs = lm_utils.normalize_gen_kwargs(dict(requests[members[0]].args[1]), self.max_gen_toks)
      # no EOS text among the stops: jaxformer's decode already ends a row at EOS (and drops it)
      until = lm_utils.handle_stop_sequences(kwargs.pop('until', None), eos=None)
      max_new = int(kwargs.pop('max_gen_toks'))
      kwargs.pop('max_length', None)
      if self.backend == 'causal' and max_new >= self.max_length:
        raise HarnessError(f'a harness task asks for max_gen_toks={max_new} new tokens, but model.max_len='
                           f'{self.max_length} leaves no room for its prompt; lower harness.max_gen_toks or the task\'s '
                           'max_gen_toks.')
      settings = self._settings(kwargs, max_new)
      stop_tokens = decoding.stop_token_patterns(self.tokenizer, until)  # rows stop early once all have stopped
      prompts = {i: self._prompt(requests[i].args[0], max_new) for i in members}
      order = sorted(members, key=lambda i: (-len(prompts[i]), i))
      for start in range(0, len(order), self.batch_size):
        chunk = order[start:start + self.batch_size]
        texts = self._decode([prompts[i] for i in chunk], settings, stop_tokens, until,
                             seed_offset=start + zlib.crc32(key.encode()) % 10_000)
        for i, text in zip(chunk, texts):
          out[i] = lm_utils.postprocess_generated_text(text, until, None)
          self.cache_hook.add_partial('generate_until', requests[i].args, out[i])
    return out

  def _prompt(self, context: str, max_new: int) -> list[int]:
    if self.backend == 'seq2seq':
      src_len = int(self.source.config.data.src_seq_len) or self.max_length
      return [int(i) for i in self.tokenizer.source(self.tokenizer.encode(context), src_len)]
    ids = self.tok_encode(context, left_truncate_len=self.max_length - max_new)
    return ids or [self.prefix_token_id]

  def _text_until(self, ids: list[int], until: Sequence[str]) -> str:
    """The generated ids' text where lm-eval's HF backend (one request at a time) ends it: generation stops at the
    first step whose last len(encode(stop)) + 2 tokens decode to a text holding a stop string (its
    MultiTokenEOSCriteria), which can come before the stop shows in the whole text's decoding (a newline byte
    token next to invalid UTF-8 bytes decodes to replacement characters together)."""
    decode = self.tokenizer.decode
    windows = [(stop, len(self.tokenizer.encode(stop)) + 2) for stop in until]
    for t in range(1, len(ids) + 1):
      if any(stop in decode(ids[max(0, t - w):t]) for stop, w in windows):
        return decode(ids[:t])
    return decode(ids)

  def _decode(self, prompts: list[list[int]], settings: decoding.DecodeSettings, stop_tokens: np.ndarray | None,
              until: Sequence[str], seed_offset: int) -> list[str]:
    n = len(prompts)
    rows = prompts + [prompts[-1]] * (self.batch_size - n)  # one batch shape: repeat the last prompt
    width = bucket_length(max(len(p) for p in rows), self.max_length if self.backend == 'causal' else 0)
    padded = np.zeros((len(rows), width), np.int32)
    lengths = np.array([len(p) for p in rows], np.int32)
    for r, p in enumerate(rows):
      padded[r, :len(p)] = p
    if self.backend == 'causal':
      max_new = min(settings.max_len, self.max_length - width)
      if max_new < settings.max_len:  # the bucket's padding must not eat the budget: use the exact width
        padded, width = padded[:, :int(lengths.max())], int(lengths.max())
        max_new = min(settings.max_len, self.max_length - width)
      settings = dataclasses.replace(settings, max_len=max_new)
      prompt, lengths_in, src = padded, lengths, None
    else:
      prompt, lengths_in, src = None, None, padded
    prefill = 1 << (int(lengths.min()).bit_length() - 1)  # a power of two: a few programs serve every batch
    self.generation_shapes.add((len(rows), width, settings.max_len, prefill))
    rng = jax.random.fold_in(jax.random.key(self.seed), seed_offset)
    sharding = shd.batch_sharding(self.source.mesh, self.source.rules, 1)
    with shd.mesh_context(self.source.mesh, self.source.rules):
      tokens = decoding.decode(self.source.model, settings, prompt, prompt_lengths=lengths_in, src_tokens=src,
                               rng=rng, model_max_len=self.max_length, batch_sharding=sharding,
                               prefill_len=prefill, stop_tokens=stop_tokens)
    return [self._text_until(row.tolist(), until) for row in tokens[:n]]


# ------------------------------------------------------------------------------------------------- tasks
def _localized(config: dict[str, Any], folder: str) -> dict[str, Any]:
  """A task config whose relative dataset_kwargs.data_files are made absolute, relative to its YAML's folder."""
  kwargs = dict(config.get('dataset_kwargs') or {})
  files = kwargs.get('data_files')
  def fix(path: Any) -> Any:
    if isinstance(path, str) and not os.path.isabs(path) and '://' not in path:
      return os.path.normpath(os.path.join(folder, path))
    return path
  if isinstance(files, dict):
    kwargs['data_files'] = {k: [fix(p) for p in v] if isinstance(v, list) else fix(v) for k, v in files.items()}
  elif files is not None:
    kwargs['data_files'] = [fix(p) for p in files] if isinstance(files, list) else fix(files)
  return {**config, 'dataset_kwargs': kwargs} if files is not None else config


def _include_paths(include_path: str) -> list[str]:
  paths = [os.path.abspath(os.path.expanduser(p)) for p in str(include_path).split(',') if p.strip()]
  for p in paths:
    if not os.path.isdir(p):
      raise HarnessError(f'harness.include_path={p}: no such folder; point it at a folder of task YAML files.')
  return paths


@dataclasses.dataclass(frozen=True)
class TaskSet:
  """Task names resolved once (so a bad name fails before a slow restore or a training run): what
  lm_eval.simple_evaluate is given, and the TaskManager that indexed them."""
  names: tuple[str, ...]
  specs: tuple[Any, ...]
  manager: Any


@functools.lru_cache(maxsize=4)
def _load_tasks(names: tuple[str, ...], include_path: str, flag: str) -> TaskSet:
  return load_tasks(names, include_path, flag=flag, cached=False)


def load_tasks(names: Sequence[str], include_path: str, *, flag: str = '--tasks', cached: bool = True) -> TaskSet:
  """Local tasks (include_path) are indexed first, the harness's built-in index (seconds to build) only for names
  not found there. A local task's relative data_files are read relative to its YAML. cached: the same request
  again returns the same TaskSet (a training run checks its tasks at start-up, then uses them)."""
  if cached:
    return _load_tasks(tuple(names), str(include_path), flag)
  require_harness(flag)
  from lm_eval.tasks import TaskManager
  from lm_eval.tasks._yaml_loader import load_yaml
  paths = _include_paths(include_path)
  manager = TaskManager(include_path=paths, include_defaults=False) if paths else None
  missing = [n for n in names if manager is None or n not in manager.task_index]
  if missing:
    manager = TaskManager(include_path=paths or None)
    unknown = [n for n in missing if n not in manager.task_index]
    if unknown:
      close = difflib.get_close_matches(unknown[0], manager.all_tasks, n=3)
      hint = f' (did you mean {", ".join(close)}?)' if close else ''
      where = f' in harness.include_path={include_path} or' if paths else ''
      raise HarnessError(f'{flag}: unknown harness task {unknown[0]!r}{hint}: no task of that name{where} among '
                         'lm-evaluation-harness\'s tasks; give a task name or a folder of task YAMLs '
                         '(--config.harness.include_path=DIR).')
  specs: list[Any] = []
  for name in names:
    entry = manager.task_index[name]
    yaml_path = str(entry.yaml_path) if entry.yaml_path else ''
    local = yaml_path and any(os.path.abspath(yaml_path).startswith(p + os.sep) for p in paths)
    if local and entry.kind.name == 'TASK':
      specs.append(_localized(load_yaml(yaml_path, resolve_func=True), os.path.dirname(yaml_path)))
    else:
      specs.append(name)
  return TaskSet(tuple(names), tuple(specs), manager)


def run_tasks(lm: JaxformerLM, tasks: TaskSet, *, num_fewshot: int, limit: float, bootstrap_iters: int,
              log_samples: bool = False, apply_chat_template: bool = False, fewshot_as_multiturn: bool = True,
              system_instruction: str = '') -> dict[str, Any]:
  """lm_eval.simple_evaluate with jaxformer's model -> the harness's results dict. The harness's own seeds (few-shot
  examples, shuffling) stay at its defaults, so prompts equal those of any other lm-eval run; the model's sampling
  follows the run's seed (JaxformerLM). apply_chat_template: requests are rendered with the run's chat template
  (data.chat_template), few-shot examples as earlier turns when fewshot_as_multiturn (lm-eval's own options)."""
  lm.chat = bool(apply_chat_template)
  for name in ('lm-eval', 'lm_eval'):  # the harness logs every request batch at INFO
    logging.getLogger(name).setLevel(logging.WARNING)
  import datasets  # lm_eval's dependency
  datasets.disable_progress_bars()
  try:
    return lm_eval.simple_evaluate(model=lm, tasks=list(tasks.specs), task_manager=tasks.manager,
                                   num_fewshot=None if num_fewshot < 0 else num_fewshot,
                                   limit=limit if limit > 0 else None, bootstrap_iters=bootstrap_iters,
                                   log_samples=log_samples, apply_chat_template=bool(apply_chat_template),
                                   fewshot_as_multiturn=bool(fewshot_as_multiturn) and bool(apply_chat_template),
                                   system_instruction=system_instruction or None)
  except HarnessError:
    raise
  except Exception as e:  # noqa: BLE001 (dataset download failures surface as many exception types)
    text = f'{type(e).__name__}: {e}'
    if any(s in text for s in ('ConnectionError', 'huggingface.co', 'Couldn\'t reach', 'offline', 'resolve')):
      raise HarnessError(f'a harness task downloads its data from the Hugging Face Hub, which this machine cannot '
                         f'reach ({text.splitlines()[0][:160]}); use a local task (dataset_path: json and '
                         'data_files) in a folder given by --config.harness.include_path.') from None
    raise


def chat_options(h: Any) -> dict[str, Any]:
  """run_tasks' chat keywords from the harness section."""
  return {'apply_chat_template': h.apply_chat_template, 'fewshot_as_multiturn': h.fewshot_as_multiturn,
          'system_instruction': h.system_instruction}


def check_model(config: Any, where: str) -> None:
  """The harness needs next-token log-probabilities: a decoder (decoder_only or encoder_decoder) with the LM head."""
  arch, head = str(config.model.arch), str(config.model.head)
  if arch == 'encoder_only' or head != 'lm':
    what = 'an encoder_only (masked) model' if arch == 'encoder_only' else f'a model.head={head} model'
    raise HarnessError(f'lm-evaluation-harness scores and generates text with a language model, but {where} is '
                       f'{what}; use a decoder_only or encoder_decoder model with model.head=lm.')


def training_tasks(config: Any) -> TaskSet:
  """train.harness_tasks, checked (the model kind, every name): what a training run calls before it writes
  anything, so a misspelt task never costs a run."""
  check_model(config, 'this run')
  names = [t.strip() for t in str(config.train.harness_tasks).split(',') if t.strip()]
  return load_tasks(names, config.harness.include_path, flag='train.harness_tasks')


class TrainingHarness:
  """train.harness_tasks at each evaluation of a training run: rows of 'harness/<task>/<metric>' values (eval rows
  of metrics.jsonl and TensorBoard)."""

  def __init__(self, config: Any, tokenizer: Any, mesh: Any, rules: Any):
    self.config, self.tokenizer, self.mesh, self.rules = config, tokenizer, mesh, rules
    self.tasks = training_tasks(config)

  def row(self, model: Any) -> dict[str, float]:
    h = self.config.harness
    lm = JaxformerLM(HarnessModel(model, self.tokenizer, self.config, self.mesh, self.rules),
                     batch_size=h.batch_size or self.config.decode.batch_size, max_gen_toks=h.max_gen_toks,
                     seed=int(self.config.seed))
    results = run_tasks(lm, self.tasks, num_fewshot=h.num_fewshot, limit=h.limit, bootstrap_iters=0,
                        **chat_options(h))
    return {f'harness/{k}': v for k, v in flat_metrics(results).items()}


def flat_metrics(results: dict[str, Any]) -> dict[str, float]:
  """{'<task>/<metric>[,<filter>]': value} of the numeric results (stderr and sample counts left out), for a
  metrics row."""
  out = {}
  for task, values in results.get('results', {}).items():
    for key, value in values.items():
      if key in ('alias', 'sample_len') or 'stderr' in key or not isinstance(value, (int, float)) or isinstance(value, bool):
        continue
      metric, _, filter_name = key.partition(',')
      name = metric if filter_name in ('', 'none') else f'{metric},{filter_name}'
      out[f'{task}/{name}'] = float(value)
  return out


def table(results: dict[str, Any]) -> str:
  return lm_eval_utils.make_table(results)


def json_ready(results: dict[str, Any]) -> dict[str, Any]:
  """The results without per-request samples, as plain JSON (the harness's own serialiser for odd values)."""
  keep = {k: v for k, v in results.items() if k != 'samples'}
  return json.loads(json.dumps(keep, default=lm_eval_utils.handle_non_serializable))
