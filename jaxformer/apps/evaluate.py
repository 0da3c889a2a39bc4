"""eval.py's application: restore a checkpoint that train.py wrote, then one short function per mode.

Modes
  score      the split's numbers with the training code's own loss (evaluation.Evaluator; which numbers is the
             model head's: loss / perplexity, bits per byte / character and token or masked-token accuracy for lm;
             num_examples, loss, accuracy and macro_f1 for classification); encoder_decoder also translates the
             split and reports sacrebleu BLEU (tokenized for the target language; decode.bleu_tokenize overrides)
             and chrF.
  generate   decoder_only: continue text prompts (--prompt, or --input: a .txt file, one prompt per line, or a .jsonl
             file of {"prompt": ...} lines; --output then gets one JSON line per input line, in order; with
             decode.num_return_sequences > 1 a line holds "outputs": [...]). decode.stop strings cut each text.
             With decode.num_samples=N > 1 and decode.reward_model=<a model.head=reward workdir>: best-of-N, N
             samples per prompt, the one the reward model scores highest returned with its reward; with
             decode.answer_pattern=<regex> instead: self-consistency, the majority answer of the N samples
             (jaxformer.voting).
  translate  encoder_decoder: translate the lines of a file.
  attention  the attention probabilities of every layer and head for one --prompt (encoder_decoder: the source; the
             decoder reads --target, else the model's own translation of it, decoded with decode.*), drawn as heat
             maps (--output=FILE.png / .pdf / .svg, default DIR/attention.png) or saved as arrays (FILE.npz).
  reward     model.head=reward: the reward of each {"prompt", "response"} line of --input (a .jsonl file), one
             {"reward": x} line per input line to --output (default: printed).
  embed      one vector per --input line (.txt, or .jsonl {"text"}): the final hidden states pooled
             (decode.embed_pooling) and L2-normalised, as JSON lines or a .npy array (--output).
  harness    lm-evaluation-harness tasks (--tasks; apps/harness.py): the harness's table, and its results JSON in
             DIR/harness_step<N>.json and DIR/harness.json (or --output).

Which config is used: the checkpoint's saved config (DIR/checkpoints/<step>/config, else DIR/config.json) is the
base. Its model section is authoritative; a requested model.arch that contradicts it, or an explicit
--config.model.* override that does, is an error. Its data and train sections are kept too, so the split is
tokenized, cut into rows and batched exactly as training's final evaluation did (same data.seq_len,
train.final_eval_steps or else train.eval_steps, train.eval_batch_size) and `loss` equals the `eval_loss` training
logged at its last step; explicit overrides of those keys win (e.g. --config.train.eval_steps=-1 scores the whole
split). The decode and mesh sections come from the request: they describe this evaluation and this machine, not
the training run. Parameters are read by training/state.py, the same path export uses.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from jaxformer import align
from jaxformer import data as data_lib
from jaxformer import decoding
from jaxformer import heads
from jaxformer import metrics as metrics_lib
from jaxformer import settings as settings_lib
from jaxformer import sharding as shd
from jaxformer import voting
from jaxformer.data import chat
from jaxformer.errors import UserError
from jaxformer.evaluation import Evaluator, eval_steps
from jaxformer.hf import peft_format
from jaxformer.apps import attention_map
from jaxformer.apps import harness as harness_app
from jaxformer.apps.rewards import RewardModel
from jaxformer.resolve import Resolved, resolve, saved_run_differences
from jaxformer.training import checkpoint as ckpt_lib
from jaxformer.training import state as state_lib
from jaxformer.training import step as step_lib

REQUEST_SECTIONS = ('decode', 'mesh', 'harness')  # taken from the request, never from the checkpoint


class EvalError(UserError, ValueError):
  """A request eval cannot serve. The message is one line naming the file/flag and the fix."""


def _log(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


def _warn(msg: str) -> None:
  """A warning on stderr, so printed translations / generations on stdout stay clean to redirect."""
  if jax.process_index() == 0:
    print(f'WARNING: {msg}', file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ the config
def _get(config: ml_collections.ConfigDict, dotted: str) -> Any:
  node = config
  for part in dotted.split('.'):
    node = node[part]
  return node


def _set(config: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
  *parents, leaf = dotted.split('.')
  node = config
  for part in parents:
    node = node[part]
  node[leaf] = value


def resolve_config(requested: ml_collections.ConfigDict, saved: dict | None, workdir: str,
                   overrides: Iterable[str] | None = None) -> ml_collections.ConfigDict:
  """The config to evaluate with: the saved run config (upgraded: settings.upgrade_saved), plus the request's
  decode/mesh sections and `overrides` (dotted keys the user set explicitly). Raises EvalError when the request
  contradicts the saved model (resolve.saved_run_differences, the check a resume makes too); model.scan_layers is a
  layout, so its override applies (the checkpoint converts on restore), and so do those of the execution keys
  (model.dtype, attention_impl, remat)."""
  overrides = sorted(set(overrides or ()))
  if saved is None:
    _log(f'note: no saved config in {workdir} (config.json); using the requested config as is.')
    return settings_lib.fill(requested)
  where = os.path.join(workdir, 'config.json')
  config = settings_lib.upgrade_saved(saved)
  if config.model.arch != requested.model.arch:
    raise EvalError(
        f'the checkpoint in {workdir} is a {config.model.arch} model ({where}: model.arch), but the requested '
        f'config asks for model.arch={requested.model.arch}; use the recipe the run was trained with.')
  for section in REQUEST_SECTIONS:
    config[section] = ml_collections.ConfigDict(requested[section].to_dict())
  for key in overrides:
    if key.split('.')[0] not in REQUEST_SECTIONS:
      try:
        _set(config, key, _get(requested, key))
      except (KeyError, AttributeError) as e:
        raise EvalError(f'--config.{key}: the saved config in {where} has no such key.') from e
  differ, _ = saved_run_differences(config, saved)  # only an override can make the model differ
  if differ:
    key, old, new = differ[0]
    raise EvalError(f'--config.{key}={new!r} contradicts the checkpoint ({where}: {key}={old!r}); the architecture '
                    'comes from the checkpoint, drop that override.')
  if 'train.eval_steps' in overrides and 'train.final_eval_steps' not in overrides:
    config.train.final_eval_steps = 0  # an explicit eval_steps is what this evaluation scores
  return config


def split_name(config: ml_collections.ConfigDict, split: str | None) -> str:
  """'validation' -> data.eval_split, 'test' -> data.test_split, anything else as given (None = validation)."""
  split = split or 'validation'
  return {'validation': config.data.eval_split, 'test': config.data.test_split}.get(split, split)


def translation_direction(config: ml_collections.ConfigDict) -> str:
  if str(config.data.source) == 'builtin:numbers':  # synthetic: digits -> English number words
    return 'digits->en'
  return f'{config.data.src_lang}->{config.data.tgt_lang}'


# ------------------------------------------------------------------------------------------- restoring a model
@dataclasses.dataclass
class Restored:
  """A resolved run plus the parameters of one checkpoint, sharded onto this machine's mesh."""
  resolved: Resolved
  model: nnx.Module
  step: int

  config = property(lambda self: self.resolved.config)
  tokenizer = property(lambda self: self.resolved.tokenizer)
  mesh = property(lambda self: self.resolved.mesh)
  rules = property(lambda self: self.resolved.rules)


def restore(config: ml_collections.ConfigDict, workdir: str, *, checkpoint_step: int | None = None,
            overrides: Iterable[str] | None = None, split: str | None = None) -> Restored:
  """Resolves the config against the checkpoint and restores the model onto this machine's mesh.
  split: a split name to check at start-up (the one `score` will read)."""
  workdir = os.path.abspath(workdir)
  steps = ckpt_lib.all_steps(workdir) if os.path.isdir(workdir) else []
  if not steps and config.checkpoint.init_from and checkpoint_step is None:
    # Nothing trained here yet: evaluate the weights checkpoint.init_from names (e.g. a pretrained hf:<dir>).
    r = resolve(config, workdir, training=False, splits=[split_name(config, split)] if split else [])
    return Restored(r, state_lib.init_from_model(r.config, r.mesh, r.rules), 0)
  if not os.path.isdir(workdir):
    raise EvalError(f'--workdir={workdir} does not exist; point it at a directory train.py wrote.')
  if not steps:
    raise EvalError(f'no checkpoint in {ckpt_lib.checkpoint_dir(workdir)}; train first (python train.py '
                    f'--config=... --workdir={workdir}).')
  if checkpoint_step is not None and checkpoint_step not in steps:
    raise EvalError(f'--checkpoint_step={checkpoint_step}: no such checkpoint in {ckpt_lib.checkpoint_dir(workdir)} '
                    f'(it has steps {", ".join(map(str, steps))}).')
  saved = ckpt_lib.saved_config(workdir, checkpoint_step if checkpoint_step is not None else steps[-1])
  config = resolve_config(config, saved, workdir, overrides)
  r = resolve(config, workdir, training=False, splits=[split_name(config, split)] if split else [])
  model, step = state_lib.restore_model(workdir, r.config, r.mesh, r.rules, step=checkpoint_step)
  return Restored(r, model, step)


def restore_reward_model(workdir: str, mesh: Any = None, *, flag: str, batch_size: int = 32) -> RewardModel:
  """The model.head=reward run in `workdir`, restored onto `mesh` (a mesh section; default the run's own) with
  its own saved config and tokenizer, to score texts (align.reward_model, decode.reward_model)."""
  workdir = os.path.abspath(os.path.expanduser(workdir))
  steps = ckpt_lib.all_steps(workdir) if os.path.isdir(workdir) else []
  saved = ckpt_lib.saved_config(workdir, steps[-1]) if steps else None
  if saved is None:
    raise EvalError(f'{flag}={workdir}: no checkpoint there; train a reward model first (python train.py '
                    '--config.model.head=reward --config.data.source=jsonl:<pairs> ...).')
  config = settings_lib.upgrade_saved(saved)
  if config.model.head != 'reward':
    raise EvalError(f'{flag}={workdir} is a model.head={config.model.head} run, not a reward model '
                    '(model.head=reward).')
  if mesh is not None:
    config.mesh = ml_collections.ConfigDict(dict(mesh))
  return RewardModel(restore(config, workdir), batch_size=batch_size)


def score_split(r: Restored, split: str) -> tuple[dict[str, Any], list[int]]:
  """The head's numbers (lm: loss / perplexity / accuracy) over the batches of `split` training's final evaluation scores (eval_steps(...,
  final=True); -1: all), computed as training computes them (the same Evaluator), so the loss is the eval_loss
  training logged at its last step. Returns (results, the indices of the scored batches)."""
  graphdef, params, rest = step_lib.split_model(r.model)
  objective = align.objective_of(r.config)
  reference = None
  if objective is not None and objective.needs_reference:  # DPO: scored against the run's frozen start
    abstract = state_lib.abstract_model(r.config, r.mesh, r.rules)[1]
    reference = state_lib.reference_params(r.config, abstract, r.mesh, r.rules)
  evaluator = Evaluator(r.resolved, graphdef, split, reference)
  return evaluator.results(params, rest), evaluator.scored


def decode_settings(config: ml_collections.ConfigDict) -> decoding.DecodeSettings:
  return decoding.DecodeSettings.from_config(config.decode)


def _decode_batches(r: Restored, *, prompts: Sequence[Sequence[int]] | None = None,
                    sources: Sequence[Sequence[int]] | None = None) -> list[list[int]]:
  """Decodes in batches of decode.batch_size on the mesh (batch over the 'batch' axes) -> token lists, each cut
  before its first decode.eos_id (decoding fills 0 after it, which is a real token for e.g. GPT-2). One sequence
  per input (the first of decode.num_return_sequences); rows also end early at decode.stop's tokens."""
  return [seqs[0] for seqs in _decode_sequences(r, prompts=prompts, sources=sources, returned=1)]


def _decode_sequences(r: Restored, *, prompts: Sequence[Sequence[int]] | None = None,
                      sources: Sequence[Sequence[int]] | None = None, returned: int | None = None,
                      stop: Sequence[str] | None = None) -> list[list[list[int]]]:
  """Like _decode_batches -> per input `returned` (default decode.num_return_sequences) token lists. stop: the
  stop strings whose tokens end a row early (default decode.stop's; the text cut is the caller's)."""
  settings = decode_settings(r.config)
  if returned is not None:
    settings = dataclasses.replace(settings, num_return_sequences=returned)
  stop = settings.stop_strings if stop is None else tuple(stop)
  with shd.mesh_context(r.mesh, r.rules):
    return decoding.decode_batches(
        r.model, settings, prompts=prompts, sources=sources, source_width=r.config.data.src_seq_len,
        rng=jax.random.key(int(r.config.seed)), batch_size=r.config.decode.batch_size,
        model_max_len=settings_lib.token_positions(r.config), batch_sharding=shd.batch_sharding(r.mesh, r.rules, 1),
        stop_tokens=decoding.stop_token_patterns(r.tokenizer, stop) if stop else None)


def translate_texts(r: Restored, texts: Sequence[str]) -> tuple[list[str], int]:
  """-> (one translation per text, how many texts were cut to data.src_seq_len tokens). A blank text gets a blank
  translation without decoding, so a file's translations stay aligned with its lines."""
  tok, src_len = r.tokenizer, r.config.data.src_seq_len
  todo = [i for i, t in enumerate(texts) if t.strip()]
  sources = [data_lib.encode_source(tok, texts[i], src_len) for i in todo]
  cut = sum(len(ids) < len(tok.encode(texts[i])) + 1 for i, ids in zip(todo, sources))  # + 1: the EOS
  out = [''] * len(texts)
  stop = decode_settings(r.config).stop_strings
  for i, ids in zip(todo, _decode_batches(r, sources=sources) if todo else []):
    out[i] = decoding.cut_at_stop(tok.decode(ids), stop)
  return out, cut


def characters_outside_vocabulary(tokenizer: data_lib.Tokenizer, text: str) -> list[str]:
  """The distinct characters of `text` (in order) the tokenizer encodes as <unk>."""
  return [c for c in dict.fromkeys(text) if tokenizer.unk_id in tokenizer.encode(c)]


def generate_texts(r: Restored, prompts: Sequence[str]) -> list[str]:
  """decoder_only: one completion of each prompt (the first of decode.num_return_sequences), cut at decode.stop."""
  return [texts[0] for texts in complete(r, prompts, num_return_sequences=1)]


def complete(r: Restored, prompts: Sequence[str], *, stop: Sequence[str] | None = None,
             max_new_tokens: int | None = None, num_return_sequences: int | None = None) -> list[list[str]]:
  """decoder_only: per prompt text, its completions as text (decode.num_return_sequences of them, or
  num_return_sequences), each cut before the first stop string (stop: this call's, e.g. a harness request's
  `until`; default decode.stop's). max_new_tokens: this call's budget (default decode.max_len). The decode
  section's other settings (method, controls, batch_size) apply; rows end early at a stop string's tokens."""
  tok = r.tokenizer
  unknown = characters_outside_vocabulary(tok, ''.join(prompts))
  if unknown:
    _warn(f'--prompt characters not in the tokenizer\'s vocabulary (each becomes <unk>, unseen in training): '
          f'{" ".join(map(repr, unknown))}')
  # a conversation (chat.RenderedChat) brings its template's ids; any other text is a document's beginning
  ids = [[int(i) for i in p.ids] if isinstance(p, chat.RenderedChat) else tok.prompt(tok.encode(p)) for p in prompts]
  longest = max(len(i) for i in ids)
  room = settings_lib.token_positions(r.config)
  if longest >= room:
    raise EvalError(f'a prompt is {longest} tokens (with its framing) but model.max_len={r.config.model.max_len} '
                    + (f'less {r.config.model.max_len - room} prefix positions ' if room < r.config.model.max_len else '')
                    + 'leaves no room to generate; shorten the prompt.')
  if max_new_tokens is not None:  # this call's budget: a Restored whose decode section says so
    config = settings_lib.replace(r.config, decode=dataclasses.replace(r.config.decode, max_len=int(max_new_tokens)))
    r = dataclasses.replace(r, resolved=dataclasses.replace(r.resolved, config=config))
  stop = decode_settings(r.config).stop_strings if stop is None else tuple(s for s in stop if s)
  seqs = _decode_sequences(r, prompts=ids, returned=num_return_sequences, stop=stop)
  return [[decoding.cut_at_stop(tok.decode(s), stop) for s in row] for row in seqs]


# ---------------------------------------------------------------------------------------------------- output
def format_table(results: dict[str, Any]) -> str:
  """Two aligned columns, the way a results table in a log should look."""
  rows = []
  for key, value in results.items():
    if isinstance(value, float):
      text = f'{value:.4f}' if abs(value) < 1e6 else f'{value:.4e}'
    else:
      text = str(value)
    rows.append((key, text))
  width = max(len(k) for k, _ in rows)
  line = '-' * (width + 3 + max(len(v) for _, v in rows))
  return '\n'.join([line] + [f'{k.ljust(width)} | {v}' for k, v in rows] + [line])


def finite_or_null(results: dict[str, Any]) -> dict[str, Any]:
  """Non-finite floats -> None (strict JSON has no NaN/Infinity), with one line naming them."""
  bad = [k for k, v in results.items() if isinstance(v, float) and not math.isfinite(v)]
  if bad:
    _log(f'WARNING: {", ".join(bad)} not finite (NaN/inf), written as null: the checkpoint\'s parameters have '
         'probably diverged; evaluate an earlier --checkpoint_step.')
  return {k: None if k in bad else v for k, v in results.items()}


LATEST_OUTPUT = 'eval.json'  # score without --output: also a copy of the latest results here


def default_output(workdir: str, split: str, step: int) -> str:
  """score's results file without --output: DIR/eval_<split>_step<N>.json, so evaluating another split or step
  keeps the earlier results (characters other than letters, digits, '.', '-' and '_' in a split name -> '_')."""
  return os.path.join(workdir, f'eval_{re.sub(r"[^A-Za-z0-9._-]", "_", split)}_step{step}.json')


def _write_json(path: str, obj: dict) -> None:
  if jax.process_index() != 0:
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, default=float, allow_nan=False)
    f.write('\n')
  os.replace(tmp, path)


def _read_lines(path: str) -> list[str]:
  if not os.path.isfile(path):
    raise EvalError(f'--input={path}: no such file.')
  try:
    with open(path, encoding='utf-8') as f:
      lines = [line.rstrip('\n') for line in f]
  except UnicodeDecodeError as e:
    raise EvalError(f'--input={path} is not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8.') from None
  if not any(line.strip() for line in lines):
    raise EvalError(f'--input={path} is empty; give a file with one source sentence per line.')
  return lines


# ----------------------------------------------------------------------------------------------------- modes
@dataclasses.dataclass(frozen=True)
class Request:
  """What eval.py asked for beyond the config (its flags)."""
  split: str | None = 'validation'
  output: str | None = None
  prompts: tuple[str, ...] = ()
  conversations: tuple[str, ...] = ()  # generate: JSON message lists (--chat, or --input lines with messages)
  input_path: str | None = None
  lines: tuple[str, ...] = ()  # translate: the input file's lines, read before the restore
  bleu: bool = True
  tasks: Any = None  # harness: the lm-evaluation-harness tasks (harness.TaskSet), resolved before the restore
  start: float = 0.0  # perf_counter when the request arrived
  target: str | None = None  # attention, encoder_decoder: the decoder's text (None: the model's translation)
  adapters: tuple[str, ...] = ()  # generate: each prompt's adapter of peft.adapters (a .jsonl's "adapter" fields)


def _prompts_of_file(path: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """--input for generate -> (prompts, conversations as JSON, each line's "adapter" field): a .jsonl file of
  {"prompt": ...} lines or of {"messages": [...]} lines (conversations, continued with the chat template), each
  optionally with an "adapter" (a name of peft.adapters; '' = the configured one); any other file: one prompt per
  line."""
  lines = _read_lines(path)
  if not path.endswith('.jsonl'):
    return tuple(lines), (), ()
  records = list(data_lib.jsonl_records([path], 'a "prompt" field or a "messages" list'))
  adapters = tuple(data_lib.string_field(record, 'adapter', where, None) if 'adapter' in record else ''
                   for where, record in records)
  adapters = adapters if any(adapters) else ()
  if records and 'messages' in records[0][1]:
    conversations = tuple(json.dumps(chat.parse_messages(record.get('messages'), where)) for where, record in records)
    return (), conversations, adapters
  return tuple(data_lib.string_field(record, 'prompt', where, None) for where, record in records), (), adapters


def _chat_prompts(r: Restored, conversations: Sequence[str]) -> tuple[chat.RenderedChat, ...]:
  """Conversations (JSON message lists) rendered with the run's chat template for the next assistant message."""
  template = chat.template_for(r.tokenizer, r.config.data.chat_template)
  return tuple(chat.generation_prompt(r.tokenizer, template, json.loads(c)) for c in conversations)


def _per_adapter(r: Restored, prompts: Sequence[str], adapters: Sequence[str],
                 decode: Callable[[Sequence[str]], list]) -> list:
  """decode(prompts) with each prompt's adapter of peft.adapters (its "adapter" field; '' = the configured
  choice): the prompts are grouped by adapter and the model's LoRA factors set to each in turn; the base stays
  loaded once. Results come back in the prompts' order."""
  peft = r.config.peft
  if not peft.adapters:
    raise EvalError('--input has "adapter" fields, which pick among peft.adapters; set '
                    '--config.peft.adapters=name:dir,... (Hugging Face peft LoRA directories).')
  names = tuple(peft_format.named_values('peft.adapters', peft.adapters, 'dir'))
  unknown = sorted({a for a in adapters if a and a not in names})
  if unknown:
    raise EvalError(f'--input: adapter {unknown[0]!r} is not one of peft.adapters ({", ".join(names)}).')
  out: list = [None] * len(prompts)
  groups: dict[str, list[int]] = {}
  for i, name in enumerate(adapters):
    groups.setdefault(name, []).append(i)
  for name, rows in groups.items():
    state_lib.select_adapter(r.model, r.config, name or None)
    for i, result in zip(rows, decode([prompts[i] for i in rows])):
      out[i] = result
  state_lib.select_adapter(r.model, r.config, None)  # back to the configured choice
  return out


def _jsonl_rows(path: str, keys: Sequence[str]) -> list[dict[str, str]]:
  """{key: string} of each line of a .jsonl --input (one `error:` line naming file:line for a bad one)."""
  wanted = ' and '.join(repr(k) for k in keys) + ' fields'
  return [{k: data_lib.string_field(record, k, where, None) for k in keys}
          for where, record in data_lib.jsonl_records([path], wanted)]


def _write_lines(path: str, lines: Sequence[str]) -> None:
  """One line per item to `path` (process 0)."""
  if jax.process_index() == 0:
    with open(path, 'w', encoding='utf-8') as f:
      f.write(''.join(line + '\n' for line in lines))


def _emit(lines: Sequence[str], output: str | None, done: str) -> None:
  """The lines to --output (then `done`, a one-line summary, is printed), or printed one per line."""
  if output:
    _write_lines(output, lines)
    _log(f'{done} -> {output}')
  else:
    for line in lines:
      _log(line)


def best_of_n(r: Restored, prompts: Sequence[str], reward_model: RewardModel) -> tuple[list[str], list[dict]]:
  """decode.num_samples samples per prompt (decode.method=sample), each scored by the reward model -> (the best
  completion of each prompt, per prompt {'reward': best, 'samples': [...], 'rewards': [...]})."""
  n = int(r.config.decode.num_samples)
  repeated = [p for p in prompts for _ in range(n)]
  samples = generate_texts(r, repeated)
  rewards = reward_model.score(repeated, samples)
  best, details = [], []
  for i in range(len(prompts)):
    group, scores = samples[i * n:(i + 1) * n], rewards[i * n:(i + 1) * n]
    j = int(np.argmax(scores))
    best.append(group[j])
    details.append({'reward': float(scores[j]), 'samples': group, 'rewards': [float(x) for x in scores]})
  return best, details


def self_consistency(r: Restored, prompts: Sequence[str]) -> list[dict]:
  """decode.num_samples samples per prompt (decode.method=sample), each one's answer extracted with
  decode.answer_pattern, the majority answer per prompt -> per prompt {'output', 'answer', 'answers', 'votes'}
  (jaxformer.voting.self_consistency)."""
  n = int(r.config.decode.num_samples)
  samples = complete(r, prompts, num_return_sequences=n)
  return [voting.self_consistency(group, str(r.config.decode.answer_pattern)) for group in samples]


def generate(r: Restored, q: Request) -> dict[str, Any]:
  """decoder_only: each prompt's continuation, printed (and written as JSON to --output; with --input, one JSON line
  per prompt); decode.num_return_sequences > 1 gives several per prompt; with decode.num_samples > 1, best-of-N
  (decode.reward_model) or self-consistency (decode.answer_pattern)."""
  if r.config.model.arch != 'decoder_only':
    raise EvalError(f'--mode=generate needs a decoder_only checkpoint; {r.resolved.workdir} holds '
                    f'{r.config.model.arch} (use --mode=score'
                    + (' or --mode=translate).' if r.config.model.arch == 'encoder_decoder' else ').'))
  if q.conversations:
    q = dataclasses.replace(q, prompts=_chat_prompts(r, q.conversations))
  decode = r.config.decode
  details: list[dict] | None = None
  several: list[list[str]] | None = None
  if decode.num_samples > 1:
    if q.adapters:
      raise EvalError('"adapter" fields in --input pick an adapter per prompt for plain decoding; drop them, or '
                      'decode.num_samples.')
    if not decode.reward_model and not decode.answer_pattern:
      raise EvalError(f'decode.num_samples={decode.num_samples} picks one of N samples: set '
                      '--config.decode.reward_model=<a model.head=reward workdir> (best-of-N by reward) or '
                      '--config.decode.answer_pattern=<regex> (self-consistency: the majority answer).')
    if decode.method != 'sample':
      raise EvalError(f'decode.num_samples={decode.num_samples} needs decode.method=sample (decode.method='
                      f'{decode.method} gives the same completion every time).')
    if decode.num_return_sequences > 1:
      raise EvalError(f'decode.num_samples={decode.num_samples} returns one completion per prompt; set '
                      'decode.num_return_sequences=1 (or drop num_samples to get all the samples).')
    if decode.reward_model:
      reward_model = restore_reward_model(decode.reward_model, dataclasses.asdict(r.config.mesh),
                                          flag='decode.reward_model', batch_size=decode.batch_size)
      texts, details = best_of_n(r, q.prompts, reward_model)
    else:
      details = self_consistency(r, q.prompts)
      texts = [d.pop('output') for d in details]
  elif decode.num_return_sequences > 1:
    several = (_per_adapter(r, q.prompts, q.adapters, lambda ps: complete(r, ps)) if q.adapters
               else complete(r, q.prompts))
    texts = [group[0] for group in several]
  elif q.adapters:
    texts = _per_adapter(r, q.prompts, q.adapters, lambda ps: generate_texts(r, ps))
  else:
    texts = generate_texts(r, q.prompts)
  if q.input_path and q.output:
    lines = []
    for i, (p, t) in enumerate(zip(q.prompts, texts)):
      row = {'prompt': p, 'outputs': several[i]} if several else {'prompt': p, 'output': t}
      if isinstance(p, chat.RenderedChat):
        row = {'messages': p.messages, **row}
      if q.adapters:
        row['adapter'] = q.adapters[i]
      lines.append(json.dumps({**row, **(details[i] if details else {})}))
    _write_lines(q.output, lines)
    _log(f'generated {len(texts)} completions -> {q.output}')
  else:
    for i, (p, t) in enumerate(zip(q.prompts, texts)):
      if several:
        for j, text in enumerate(several[i]):
          _log(f'[{j}] {p}{text}')
      elif details and 'reward' in details[i]:
        _log(f'{p}{t}    [reward {details[i]["reward"]:.4f}]')
      elif details:
        _log(f'{p}{t}    [answer {details[i]["answer"]!r}: {details[i]["votes"]} of {decode.num_samples} votes]')
      else:
        _log(f'{p}{t}')
  results = {'step': r.step, 'mode': 'generate', 'decode': dataclasses.asdict(decode_settings(r.config)),
             'prompts': list(q.prompts), 'outputs': texts}
  if several:
    results['sequences'] = several
  if q.adapters:
    results['adapters'] = list(q.adapters)
  if details and decode.reward_model:
    results.update(num_samples=int(decode.num_samples), reward_model=str(decode.reward_model),
                   rewards=[d['reward'] for d in details], samples=[d['samples'] for d in details],
                   sample_rewards=[d['rewards'] for d in details])
  elif details:
    results.update(num_samples=int(decode.num_samples), answer_pattern=str(decode.answer_pattern),
                   answers=[d['answer'] for d in details], votes=[d['votes'] for d in details],
                   sample_answers=[d['answers'] for d in details])
  if q.output and not q.input_path:
    _write_json(q.output, results)
  return results


def reward(r: Restored, q: Request) -> dict[str, Any]:
  """model.head=reward: the reward of each {"prompt", "response"} line of --input, one {"reward": x} line per input
  line to --output (default: printed)."""
  if r.config.model.head != 'reward':
    raise EvalError(f'--mode=reward scores texts with a reward model; {r.resolved.workdir} is a model.head='
                    f'{r.config.model.head} run (train one with --config.model.head=reward).')
  rows = _jsonl_rows(q.input_path, ('prompt', 'response'))
  model = RewardModel(r, batch_size=r.config.decode.batch_size)
  rewards = model.score([row['prompt'] for row in rows], [row['response'] for row in rows])
  _emit([json.dumps({'reward': float(x)}) for x in rewards], q.output,
        f'scored {len(rewards)} responses (mean reward {float(np.mean(rewards)):.4f})')
  return {'step': r.step, 'mode': 'reward', 'rewards': [float(x) for x in rewards]}


def translate(r: Restored, q: Request) -> dict[str, Any]:
  """encoder_decoder: the input file's lines translated, printed or written one per line to --output."""
  if r.config.model.arch != 'encoder_decoder':
    raise EvalError(f'--mode=translate needs an encoder_decoder checkpoint; {r.resolved.workdir} holds '
                    f'{r.config.model.arch}.')
  texts, cut = translate_texts(r, q.lines)
  if cut:
    _warn(f'{cut} of {len(q.lines)} lines of {q.input_path} are longer than data.src_seq_len='
          f'{r.config.data.src_seq_len} tokens (EOS included) and were cut to that length before translating.')
  _emit(texts, q.output, f'translated {len(q.lines)} lines')
  return {'step': r.step, 'mode': 'translate', 'outputs': texts}


def bleu_of_split(r: Restored, split: str, scored: list[int]) -> dict[str, Any]:
  """encoder_decoder: BLEU and chrF of the split's translations, over the examples the loss covered (exactly so
  when rows are unpacked: one example per row, batch b holding examples b*size ...; the whole split with
  train.eval_steps=-1); sources are cut exactly as training cut them."""
  pairs = data_lib.load_text_pairs(r.config, r.resolved.workdir, split, source=r.resolved.source)
  if eval_steps(r.config, final=True) >= 0:
    size = r.resolved.eval_batch_size
    pairs = [p for b in scored for p in pairs[b * size:(b + 1) * size]]
  hyps, _ = translate_texts(r, [s for s, _ in pairs])
  refs = [t for _, t in pairs]
  direction = translation_direction(r.config)
  b = metrics_lib.bleu(hyps, refs, tgt_lang=direction.split('->')[-1], tokenize=str(r.config.decode.bleu_tokenize),
                       max_ngram_order=int(r.config.decode.bleu_max_ngram))
  if 'bleu_note' in b:
    _log(b['bleu_note'])
  for (src, ref), hyp in list(zip(pairs, hyps))[:3]:
    _log(f'  src: {src}\n  ref: {ref}\n  hyp: {hyp}')
  return dict(bleu=b['bleu'], sacrebleu_signature=b['sacrebleu_signature'], **metrics_lib.chrf(hyps, refs),
              direction=direction, bleu_examples=len(pairs), decode=dataclasses.asdict(decode_settings(r.config)))


def score(r: Restored, q: Request) -> dict[str, Any]:
  """The split's numbers (the head's), BLEU / chrF for encoder_decoder; printed as a table and written to
  --output, or to DIR/eval_<split>_step<N>.json and DIR/eval.json (the latest)."""
  name, workdir = split_name(r.config, q.split), r.resolved.workdir
  results: dict[str, Any] = {'step': r.step, 'split': name, 'arch': r.config.model.arch}
  if heads.head_of(r.config.model).module is not None:  # a task head (not the LM output) is named in the results
    results['head'] = r.config.model.head
  sums, scored = score_split(r, name)
  results.update(sums)
  results['eval_batches'] = len(scored)
  if r.config.model.arch == 'encoder_decoder' and q.bleu and heads.head_of(r.config.model).decodes:
    results.update(bleu_of_split(r, name, scored))
  results['seconds'] = round(time.perf_counter() - q.start, 2)
  _log(f'evaluation of {workdir} (step {r.step}, split {name}):')
  _log(format_table({k: v for k, v in results.items() if k != 'decode'}))
  results = finite_or_null(results)
  if q.output:
    _write_json(q.output, results)
    _log(f'wrote {q.output}')
  else:
    path = default_output(workdir, name, r.step)
    _write_json(path, results)
    _write_json(os.path.join(workdir, LATEST_OUTPUT), results)
    _log(f'wrote {path} (and {os.path.join(workdir, LATEST_OUTPUT)}, the latest evaluation)')
  return results


def whole_text_ids(tok: data_lib.Tokenizer, arch: str, text: str) -> list[int]:
  """A whole text framed as the model reads one: a decoder_only prompt (BOS + text), an encoder_only document
  ([CLS] text [SEP] / BOS text EOS), an encoder_decoder source (text + EOS)."""
  if arch == 'decoder_only':
    return tok.prompt(tok.encode(text))
  framed = tok.document(tok.encode(text)) if arch == 'encoder_only' else tok.source(tok.encode(text))
  return [int(i) for i in framed]


def embedding_rows(r: Restored, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, int]:
  """Texts framed as the model reads a whole text (whole_text_ids) -> (tokens [N, L], segment ids [N, L], how many
  were cut), each cut to the data section's length for that input."""
  arch, data = r.config.model.arch, r.config.data
  length = int(data.src_seq_len if arch == 'encoder_decoder' else data.seq_len)
  rows = [whole_text_ids(r.tokenizer, arch, t) for t in texts]
  cut = sum(len(ids) > length for ids in rows)
  tokens = np.zeros((len(rows), length), np.int32)
  segments = np.zeros((len(rows), length), np.int32)
  for i, ids in enumerate(rows):
    ids = ids[:length]
    tokens[i, :len(ids)], segments[i, :len(ids)] = ids, 1
  return tokens, segments, cut


def embed_texts(r: Restored, texts: Sequence[str]) -> np.ndarray:
  """float32 [N, d_model]: each text's final hidden states (encoder_decoder: the encoder's) pooled over its real
  tokens by decode.embed_pooling, L2-normalised when decode.embed_normalize; in batches of decode.batch_size on the
  mesh."""
  tokens, segments, cut = embedding_rows(r, texts)
  if cut:
    _warn(f'{cut} of {len(texts)} texts are longer than the model reads at once (data.seq_len / src_seq_len) and were '
          'cut before embedding.')
  decode = r.config.decode
  graphdef, params, rest = step_lib.split_model(r.model)
  fn = _jitted_embeddings(graphdef, r.config.model.arch, str(decode.embed_pooling), bool(decode.embed_normalize))
  filler = {'tokens': np.zeros(tokens.shape[1:], np.int32), 'segments': np.eye(1, tokens.shape[1], dtype=np.int32)[0]}
  out = shd.map_batches(lambda batch: fn(params, rest, batch['tokens'], batch['segments']),
                        {'tokens': tokens, 'segments': segments}, decode.batch_size, r.mesh, r.rules,
                        filler=filler)  # empty rows (one real token each) fill the last batch
  return out.astype(np.float32)


@functools.lru_cache(maxsize=4)
def _jitted_embeddings(graphdef: Any, arch: str, pooling: str, normalize: bool):
  """(params, rest, tokens, segment ids) -> [B, d_model] pooled final hidden states (the encoder's for
  encoder_decoder), L2-normalised when `normalize`."""
  pool = heads.POOLINGS[pooling]

  def vectors(params, rest, tokens, segments):
    model = step_lib.merge_model(graphdef, params, rest)
    if arch == 'encoder_decoder':
      h = model.encode(tokens, src_segment_ids=segments)
    else:
      h = model(tokens, segment_ids=segments, return_hidden=True)[1]
    v = pool(h.astype(jnp.float32), segments != 0)
    if normalize:
      v = v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), 1e-12)
    return v
  return jax.jit(vectors)


def embed(r: Restored, q: Request) -> dict[str, Any]:
  """One vector per line of --input (.txt lines, or .jsonl {"text": ...} lines): {"embedding": [...]} JSON lines to
  --output (or a float32 [N, d_model] array when --output ends in .npy), else printed."""
  if q.input_path.endswith('.jsonl'):
    texts = [row['text'] for row in _jsonl_rows(q.input_path, ('text',))]
  else:
    texts = list(q.lines)
  vectors = embed_texts(r, texts)
  done = (f'embedded {len(texts)} texts ({vectors.shape[1]} dimensions, {r.config.decode.embed_pooling} pooling'
          + (', normalised)' if r.config.decode.embed_normalize else ')'))
  if q.output and q.output.endswith('.npy'):
    if jax.process_index() == 0:
      np.save(q.output, vectors)
    _log(f'{done} -> {q.output}')
  else:
    _emit([json.dumps({'embedding': [round(float(x), 7) for x in v]}) for v in vectors], q.output, done)
  return {'step': r.step, 'mode': 'embed', 'num_texts': len(texts), 'dim': int(vectors.shape[1])}


def harness_model(r: Restored) -> harness_app.JaxformerLM:
  """The restored model as an lm-evaluation-harness model (harness.batch_size rows per call, 0 = decode's)."""
  h = r.config.harness
  return harness_app.JaxformerLM(harness_app.HarnessModel(r.model, r.tokenizer, r.config, r.mesh, r.rules),
                                 batch_size=h.batch_size or r.config.decode.batch_size, max_gen_toks=h.max_gen_toks,
                                 seed=int(r.config.seed))


def harness(r: Restored, q: Request) -> dict[str, Any]:
  """lm-evaluation-harness tasks (--tasks) on the checkpoint: the harness's table printed, its results JSON
  written to --output or DIR/harness_step<N>.json and DIR/harness.json (the latest), beside eval.json."""
  h, workdir = r.config.harness, r.resolved.workdir
  harness_app.check_model(r.config, workdir)
  results = harness_app.run_tasks(harness_model(r), q.tasks, num_fewshot=h.num_fewshot, limit=h.limit,
                                  bootstrap_iters=h.bootstrap_iters, log_samples=h.log_samples,
                                  **harness_app.chat_options(h))
  _log(f'lm-evaluation-harness on {workdir} (step {r.step}):')
  _log(harness_app.table(results))
  path = q.output or os.path.join(workdir, f'harness_step{r.step}.json')
  saved = {'step': r.step, **harness_app.json_ready(results)}
  _write_json(path, saved)
  if not q.output:
    _write_json(os.path.join(workdir, 'harness.json'), saved)
  if h.log_samples:
    for task, samples in results.get('samples', {}).items():
      _write_lines(os.path.join(os.path.dirname(os.path.abspath(path)), f'harness_samples_{task}_step{r.step}.jsonl'),
                   [json.dumps(x, default=str, ensure_ascii=False) for x in samples])
  _log(f'wrote {path}')
  return {'step': r.step, 'mode': 'harness', 'tasks': list(q.tasks.names), **harness_app.flat_metrics(results),
          'results_file': path}


def _attention_inputs(r: Restored, q: Request) -> dict[str, list[int]]:
  """Each stack's token ids for --mode=attention, framed as training framed them: decoder_only a prompt (BOS +
  text), encoder_only a document, encoder_decoder the source and decode.start_id + (--target or the translation)."""
  tok, arch, text = r.tokenizer, r.config.model.arch, q.prompts[0]
  unknown = characters_outside_vocabulary(tok, text + (q.target or ''))
  if unknown:
    _warn(f'characters not in the tokenizer\'s vocabulary (each becomes <unk>): {" ".join(map(repr, unknown))}')
  inputs = {'decoder' if arch == 'decoder_only' else 'encoder': whole_text_ids(tok, arch, text)}
  for ids in inputs.values():
    if len(ids) > r.config.model.max_len:
      raise EvalError(f'--prompt is {len(ids)} tokens (framing included) but model.max_len='
                      f'{r.config.model.max_len}, the longest input the model reads; shorten the prompt.')
  if arch == 'encoder_decoder':
    start = decode_settings(r.config).start_id
    target = tok.encode(q.target) if q.target is not None else _decode_batches(r, sources=[inputs['encoder']])[0]
    inputs['decoder'] = [start] + list(target)
    if len(inputs['decoder']) > r.config.model.max_len:
      raise EvalError(f'--target is {len(inputs["decoder"])} tokens with the decoder start token but model.max_len='
                      f'{r.config.model.max_len}; shorten it.')
  return inputs


def attention(r: Restored, q: Request) -> dict[str, Any]:
  """Every layer's and head's attention probabilities for --prompt (model(..., return_intermediates=True)), drawn as
  heat-map grids (attention_map.draw) or saved as arrays (.npz), with the tokens on the axes."""
  inputs = _attention_inputs(r, q)  # stack -> ids: 'encoder' and/or 'decoder', in the model's argument order
  graphdef, params, rest = step_lib.split_model(r.model)
  forward = jax.jit(lambda p, s, *tokens: step_lib.merge_model(graphdef, p, s)(*tokens, return_intermediates=True))
  _, intermediates = forward(params, rest, *(np.asarray([ids], np.int32) for ids in inputs.values()))
  tokens = {stack: [f'<soft {i}>' for i in range(getattr(r.model, stack).prompt_length)]  # peft.method=prompt
                  + attention_map.token_labels(r.tokenizer, ids) for stack, ids in inputs.items()}
  maps = attention_map.attention_maps(jax.device_get(intermediates), tokens)
  output = q.output or os.path.join(r.resolved.workdir, 'attention.png')
  if jax.process_index() == 0:
    if output.endswith('.npz'):
      attention_map.save_npz(output, maps)
    else:
      attention_map.draw(output, maps, title=f'{os.path.basename(r.resolved.workdir)} (step {r.step}): '
                                              f'{q.prompts[0][:60]!r}')
  _log(f'attention of {", ".join(f"{len(ids)} {stack} tokens" for stack, ids in inputs.items())} '
       f'({", ".join(f"{m.name} {list(m.weights.shape)}" for m in maps)}) -> {output}')
  return {'step': r.step, 'mode': 'attention', 'output': output, 'tokens': tokens,
          'shapes': {m.name: list(m.weights.shape) for m in maps}}


MODE_FUNCTIONS = {'score': score, 'generate': generate, 'translate': translate, 'reward': reward,  # eval.py --mode
                  'harness': harness, 'attention': attention, 'embed': embed}
MODES = tuple(MODE_FUNCTIONS)


# ------------------------------------------------------------------------------------------------------- run
def run(config: ml_collections.ConfigDict, workdir: str, *, checkpoint_step: int | None = None,
        split: str | None = 'validation', output: str | None = None, mode: str = 'score',
        prompt: str | Sequence[str] | None = None, input_path: str | None = None,
        bleu: bool = True, overrides: Iterable[str] | None = None, tasks: str | Sequence[str] | None = None,
        target: str | None = None, chat_prompts: bool = False) -> dict[str, Any]:
  """Evaluates the checkpoint in workdir; returns the results dict (also printed, and written as JSON).

  score: writes {step, split, num_tokens, loss, perplexity, ...} to `output` (default
  DIR/eval_<split>_step<N>.json, copied to DIR/eval.json: the latest);
  encoder_decoder adds bleu, sacrebleu_signature, direction (over the same examples the loss covers, or the
  whole split with train.eval_steps=-1; bleu=False skips decoding). generate: `prompt` text(s) -> printed
  continuations (chat_prompts: each prompt is a user message, rendered with the chat template). translate: the
  lines of `input_path` -> printed, or written one per line to `output`. attention:
  one `prompt` (and for encoder_decoder optionally the decoder's `target` text) -> heat maps or arrays in `output`.
  `overrides`: dotted config keys the user set explicitly (see the module docstring).
  """
  if mode not in MODES:
    raise EvalError(f'--mode={mode!r} is not one of {", ".join(MODES)}.')
  lines: tuple[str, ...] = ()
  if mode in ('translate', 'reward', 'embed'):
    if not input_path:
      raise EvalError(f'--mode={mode} needs --input=FILE (' + {
          'translate': 'one source sentence per line).', 'reward': 'a .jsonl file of {"prompt", "response"} lines).',
          'embed': 'one text per line, or a .jsonl file of {"text": ...} lines).'}[mode])
    lines = tuple(_read_lines(input_path))  # before the (slow) restore: a bad file fails fast
  conversations: tuple[str, ...] = ()
  adapters: tuple[str, ...] = ()
  if chat_prompts and mode != 'generate':
    raise EvalError('--chat renders each --prompt as a user message for --mode=generate; drop it here.')
  if mode == 'generate':
    if input_path:
      prompt, conversations, adapters = _prompts_of_file(input_path)
      if adapters and not config.peft.adapters:  # before the (slow) restore
        raise EvalError(f'--input={input_path} has "adapter" fields, which pick among peft.adapters; set '
                        '--config.peft.adapters=name:dir,... (Hugging Face peft LoRA directories).')
    elif prompt is None:
      raise EvalError('--mode=generate needs --prompt=TEXT or --input=FILE (.txt: one prompt per line; .jsonl: '
                      '{"prompt": ...} or {"messages": [...]} lines).')
    elif chat_prompts:
      texts = (prompt,) if isinstance(prompt, str) else tuple(prompt)
      conversations, prompt = tuple(json.dumps([{'role': 'user', 'content': t}]) for t in texts), ()
  task_set = None
  if mode == 'harness':  # the tasks are looked up before the (slow) restore
    names = [t.strip() for t in (tasks.split(',') if isinstance(tasks, str) else tasks or ()) if t.strip()]
    if not names:
      raise EvalError('--mode=harness needs --tasks=NAME[,NAME...] (e.g. --tasks=synth_next_word with '
                      '--config.harness.include_path=benchmarks/harness/tasks).')
    harness_app.check_model(config, 'the requested config')  # the arch cannot change at restore
    task_set = harness_app.load_tasks(names, config.harness.include_path)
  if mode == 'attention':
    prompts = [prompt] if isinstance(prompt, str) else list(prompt or ())
    if len(prompts) != 1 or input_path:
      raise EvalError('--mode=attention needs one --prompt=TEXT (encoder_decoder: the source text; --target=TEXT '
                      'optionally sets the decoder side).')
    if output and not output.endswith(('.npz',) + attention_map.PICTURE_FORMATS):
      raise EvalError(f'--output={output}: --mode=attention writes a picture ('
                      f'{", ".join(attention_map.PICTURE_FORMATS)}) or the arrays (.npz).')
  if target is not None and mode != 'attention':
    raise EvalError('--target is the decoder text of --mode=attention (encoder_decoder); drop it here.')
  if checkpoint_step is not None and checkpoint_step < 0:
    checkpoint_step = None
  request = Request(split=split, output=output, prompts=(prompt,) if isinstance(prompt, str) else tuple(prompt or ()),
                    conversations=conversations, input_path=input_path, lines=lines, bleu=bleu, tasks=task_set,
                    start=time.perf_counter(), target=target, adapters=adapters)
  r = restore(config, workdir, checkpoint_step=checkpoint_step, overrides=overrides,
              split=split if mode == 'score' else None)
  head = heads.head_of(r.config.model)
  if target is not None and r.config.model.arch != 'encoder_decoder':
    raise EvalError(f'--target sets the decoder text of an encoder_decoder model; {r.resolved.workdir} holds '
                    f'{r.config.model.arch} (its --prompt is the whole input).')
  if mode in ('generate', 'translate') and not head.decodes:
    raise EvalError(f'--mode={mode} decodes text, but {r.resolved.workdir} holds a model.head={head.name} model (one '
                    'label per row); use --mode=score (accuracy and macro-F1 on a split).')
  return MODE_FUNCTIONS[mode](r, request)
