"""run(config, workdir): restore a checkpoint that train.py wrote, score a split, decode, write the results.

Modes
  score      loss / perplexity, bits per byte / character (decoder_only, encoder_decoder) and masked-token
             accuracy (encoder_only) on a split with the training code's own `compute_loss`; encoder_decoder also
             translates the split and reports sacrebleu BLEU (tokenized for the target language;
             decode.bleu_tokenize overrides) and chrF. model.head=classification: num_examples, loss (mean
             cross-entropy per example), accuracy and macro_f1.
  generate   decoder_only: continue a text prompt.
  translate  encoder_decoder: translate the lines of a file.

Which config is used: the checkpoint's saved config (DIR/checkpoints/<step>/config, else DIR/config.json) is the
base. Its model section is authoritative; a requested model.arch that contradicts it, or an explicit
--config.model.* override that does, is an error. Its data and train sections are kept too, so the split is
tokenized, cut into rows and batched exactly as training's final evaluation did (same data.seq_len,
train.final_eval_steps or else train.eval_steps, train.eval_batch_size) and `loss` equals the `eval_loss` training
logged at its last step; explicit overrides of those keys win (e.g. --config.train.eval_steps=-1 scores the whole
split). The decode and mesh sections come from
the request: they describe this evaluation and this machine, not the training run.
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
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from jax.sharding import NamedSharding, PartitionSpec

from jaxformer import data as data_lib
from jaxformer import decoding
from jaxformer import metrics as metrics_lib
from jaxformer import sharding as shd
from jaxformer.model import config as model_config
from jaxformer.model import layout_convert
from jaxformer.resolve import Resolved, resolve
from jaxformer.training import checkpoint as ckpt_lib
from jaxformer.training import init_from
from jaxformer.training import step as step_lib
from jaxformer.errors import UserError

MODES = ('score', 'generate', 'translate')
REQUEST_SECTIONS = ('decode', 'mesh')  # taken from the request, never from the checkpoint


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


def _same(a: Any, b: Any) -> bool:
  norm = lambda x: list(x) if isinstance(x, (tuple, list)) else x  # noqa: E731 (JSON turns tuples into lists)
  return norm(a) == norm(b)


def resolve_config(requested: ml_collections.ConfigDict, saved: dict | None, workdir: str,
                   overrides: Iterable[str] | None = None) -> ml_collections.ConfigDict:
  """The config to evaluate with: the saved run config, plus the request's decode/mesh sections and `overrides`
  (dotted keys the user set explicitly). Raises EvalError when the request contradicts the saved model;
  model.scan_layers is a layout, so its override applies (restore_model converts the checkpoint), and so do those
  of the execution keys (model.dtype, attention_impl, remat)."""
  overrides = sorted(set(overrides or ()))
  if saved is None:
    _log(f'note: no saved config in {workdir} (config.json); using the requested config as is.')
    return ml_collections.ConfigDict(requested.to_dict())
  where = os.path.join(workdir, 'config.json')
  saved_model = saved.get('model', {})
  if saved_model.get('arch') not in (None, requested.model.arch):
    raise EvalError(
        f'the checkpoint in {workdir} is a {saved_model["arch"]} model ({where}: model.arch), but the requested '
        f'config asks for model.arch={requested.model.arch}; use the recipe the run was trained with.')
  # applied: the checkpoint converts on restore (layout), or computes the same function another way (execution)
  layout = {f'model.{k}' for k in (*layout_convert.LAYOUT_KEYS, *model_config.EXECUTION_KEYS)}
  for key in overrides:
    if key in layout:
      continue
    if key.startswith('model.') and key[6:] in saved_model and not _same(_get(requested, key), saved_model[key[6:]]):
      raise EvalError(
          f'--config.{key}={_get(requested, key)!r} contradicts the checkpoint ({where}: {key}='
          f'{saved_model[key[6:]]!r}); the architecture comes from the checkpoint, drop that override.')
  config = ml_collections.ConfigDict(saved)
  for section in REQUEST_SECTIONS:
    config[section] = ml_collections.ConfigDict(requested[section].to_dict())
  for key in overrides:
    if key.split('.')[0] not in REQUEST_SECTIONS and (not key.startswith('model.') or key in layout):
      try:
        _set(config, key, _get(requested, key))
      except (KeyError, AttributeError) as e:
        raise EvalError(f'--config.{key}: the saved config in {where} has no such key.') from e
  if 'train.eval_steps' in overrides and 'train.final_eval_steps' not in overrides and 'final_eval_steps' in config.train:
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


# ----------------------------------------------------------------------------------- scoring (shared with training)
def config_json(config: ml_collections.ConfigDict) -> str:
  """The config as canonical JSON (what checkpoints and DIR/config.json store)."""
  return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


@functools.lru_cache(maxsize=8)
def _jitted_eval_step(graphdef: Any, config_text: str, mesh: Any):
  """Training's compute_loss on one batch -> its metric sums, jitted once per (model, config, mesh): evaluating
  another checkpoint of the same model in this process (or at the next eval step) reuses the compiled step."""
  config = ml_collections.ConfigDict(json.loads(config_text))

  def sums(params, rest, batch, length_tables):
    _, metrics = step_lib.compute_loss(step_lib.merge_model(graphdef, params, rest), batch, config,
                                       deterministic=True, length_tables=length_tables,
                                       confusion=step_lib.is_classification(config))
    return metrics

  return jax.jit(sums, out_shardings=NamedSharding(mesh, PartitionSpec()))


def eval_steps(config: ml_collections.ConfigDict, *, final: bool) -> int:
  """How many batches an evaluation scores (-1: the whole split): train.eval_steps for the periodic evaluations;
  train.final_eval_steps, unless 0, for the one at train.num_steps and for eval.py. A cheap estimate every
  eval_every steps and the whole split once at the end, as nanoGPT's estimate_loss and a final report do."""
  final_steps = int(config.train.get('final_eval_steps', 0))
  return final_steps if final and final_steps != 0 else int(config.train.eval_steps)


MAX_CACHED_EVAL_BYTES = 64 << 20  # an Evaluator keeps its split's host batches when they fit (~3M tokens): a
# larger split is streamed, so its first evaluation never tokenizes more than this just to find out


def spread(total: int, limit: int) -> list[int]:
  """`limit` batch indices spread evenly over `total` (all of them for limit -1 or >= total): a subset that samples
  the whole split, where its first batches would sample only its beginning (shakespeare_char's first 2 of 14
  validation batches read 0.04 lower than the split)."""
  if limit < 0 or limit >= total:
    return list(range(total))
  return [int((j + 0.5) * total / limit) for j in range(limit)]


class Evaluator:
  """Scores one split with training's loss: the one evaluation path of the training loop and of eval.py, so
  both score exactly the same tokens with the same code.

  The split's batches (this host's rows) are built on the first evaluation and kept, so later ones skip
  tokenizing; train.eval_steps / final_eval_steps = N scores N of them spread evenly over the split (`spread`).
  A split whose batches outgrow MAX_CACHED_EVAL_BYTES is streamed instead, and N then means its first N batches.
  """

  def __init__(self, r: Resolved, graphdef: Any, split: str):
    self.r = r
    self.split = split
    self._step = _jitted_eval_step(graphdef, config_json(r.config), r.mesh)
    # bytes / characters per token id, for bits per byte / character (None for encoder_only and classification)
    self.classification = step_lib.is_classification(r.config)
    tables = None if self.classification else metrics_lib.length_tables(r.tokenizer, r.config.model.arch)
    self._tables = jax.device_put(tables, NamedSharding(r.mesh, PartitionSpec())) if tables else None
    self._layout = shd.data_layout(r.mesh, r.rules, r.eval_batch_size)
    self._cached: list[dict[str, np.ndarray]] | None = None
    self._streamed = False  # the split was too large to keep
    self.scored: list[int] = []  # the batch indices the last evaluation scored

  def _iterator(self) -> data_lib.EvalIterator:
    return data_lib.make_eval_iterator(self.r.config, self.r.tokenizer, self.r.workdir, self.split,
                                       layout=self._layout, source=self.r.source)

  def _fill_cache(self) -> None:
    batches, size = [], 0
    for batch in self._iterator():
      size += sum(v.nbytes for v in batch.values())
      if size > MAX_CACHED_EVAL_BYTES:
        self._streamed = True
        _warn(f'split {self.split!r} is over {MAX_CACHED_EVAL_BYTES >> 20} MiB of batches: it is streamed at each '
              'evaluation, and train.eval_steps=N scores its first N batches (not N spread over it).')
        return
      batches.append(batch)
    self._cached = batches

  def batches(self, limit: int) -> Iterator[dict[str, jax.Array]]:
    """The batches an evaluation of `limit` batches (-1: all) scores, placed on the mesh; sets `scored`."""
    if self._cached is None and not self._streamed:
      self._fill_cache()
    self.scored = []
    if self._cached is not None:
      for i in spread(len(self._cached), limit):
        self.scored.append(i)
        yield shd.shard_batch(self._cached[i], self.r.mesh, self.r.rules, self._layout)
      return
    for i, batch in enumerate(self._iterator()):
      if 0 <= limit <= i:
        break
      self.scored.append(i)
      yield shd.shard_batch(batch, self.r.mesh, self.r.rules, self._layout)

  def accumulate(self, params: Any, rest: Any, *, final: bool = True) -> metrics_lib.MetricAccumulator:
    """Token-weighted metric sums over the split's eval batches (global: the jit spans the mesh, so no
    merge_hosts); final=False: a periodic evaluation's (`eval_steps`). Raises DataError when they hold no
    target token."""
    acc = metrics_lib.MetricAccumulator()
    with shd.mesh_context(self.r.mesh, self.r.rules):
      for batch in self.batches(eval_steps(self.r.config, final=final)):
        acc.add(self._step(params, rest, batch, self._tables))
    if acc.weight_sum <= 0:
      raise data_lib.DataError(f'split {self.split!r} of data.source={self.r.config.data.source!r} produced no '
                               f'{"examples" if self.classification else "target tokens"} to score.')
    return acc

  def training_row(self, params: Any, rest: Any, *, final: bool) -> dict[str, float]:
    """The eval row of DIR/metrics.jsonl: eval_loss, eval_perplexity, eval_accuracy, eval_tokens, and
    eval_bits_per_byte / eval_bits_per_char (decoder_only, encoder_decoder); model.head=classification: eval_loss,
    eval_accuracy, eval_macro_f1, eval_examples. final: the evaluation at train.num_steps."""
    acc = self.accumulate(params, rest, final=final)
    if self.classification:
      out = acc.classification_result()
      return {'eval_loss': out['loss'], 'eval_accuracy': out['accuracy'], 'eval_macro_f1': out['macro_f1'],
              'eval_examples': float(out['num_examples'])}
    out = acc.result(with_accuracy=True)
    row = {'eval_loss': out['loss'], 'eval_perplexity': out['perplexity'], 'eval_accuracy': out['accuracy'],
           'eval_tokens': float(out['num_tokens'])}
    row.update({f'eval_{key}': out[key] for key in ('bits_per_byte', 'bits_per_char') if key in out})
    return row


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
  if not steps and init_from.spec(config) and checkpoint_step is None:
    # Nothing trained here yet: evaluate the weights checkpoint.init_from names (e.g. a pretrained hf:<dir>).
    r = resolve(ml_collections.ConfigDict(config.to_dict()), workdir, training=False,
                splits=[split_name(config, split)] if split else [])
    return Restored(r, init_from.load_model(r.config, r.mesh), 0)
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
  model, step = ckpt_lib.restore_model(workdir, r.config, r.mesh, step=checkpoint_step, model_config=r.model)
  return Restored(r, model, step)


def score(r: Restored, split: str) -> tuple[dict[str, Any], list[int]]:
  """Loss / perplexity / accuracy over the batches of `split` training's final evaluation scores (eval_steps(...,
  final=True); -1: all), computed as training computes them (the same Evaluator), so the loss is the eval_loss
  training logged at its last step. Returns (results, the indices of the scored batches)."""
  graphdef, params, rest = step_lib.split_model(r.model)
  evaluator = Evaluator(r.resolved, graphdef, split)
  acc = evaluator.accumulate(params, rest)
  if evaluator.classification:  # num_examples, loss, accuracy, macro_f1
    return acc.classification_result(), evaluator.scored
  out = acc.result(with_accuracy=True)
  accuracy = out.pop('accuracy')
  out['masked_accuracy' if r.config.model.arch == 'encoder_only' else 'token_accuracy'] = accuracy
  return out, evaluator.scored


def decode_settings(config: ml_collections.ConfigDict) -> decoding.DecodeSettings:
  return decoding.DecodeSettings.from_config(config.decode)


def _decode_batches(r: Restored, *, prompts: Sequence[Sequence[int]] | None = None,
                    sources: Sequence[Sequence[int]] | None = None) -> list[list[int]]:
  """Decodes in batches of decode.batch_size on the mesh (batch over the 'batch' axes) -> token lists, each cut
  before its first decode.eos_id (decoding fills 0 after it, which is a real token for e.g. GPT-2)."""
  config = r.config
  settings = decode_settings(config)
  sharding = shd.batch_sharding(r.mesh, r.rules, 1)
  rng = jax.random.key(int(config.seed))
  n = len(prompts if prompts is not None else sources)
  bs = max(1, int(config.decode.batch_size))
  out: list[list[int]] = []
  with shd.mesh_context(r.mesh, r.rules):
    for start in range(0, n, bs):
      prompt = lengths = src = None
      if prompts is not None:
        prompt, lengths = decoding.pad_prompts(prompts[start:start + bs])
      if sources is not None:
        src = np.zeros((min(bs, n - start), config.data.src_seq_len), np.int32)
        for row, ids in enumerate(sources[start:start + bs]):
          src[row, :len(ids)] = ids
      tokens = decoding.decode(r.model, settings, prompt, prompt_lengths=lengths, src_tokens=src,
                               rng=jax.random.fold_in(rng, start), model_max_len=config.model.max_len,
                               batch_sharding=sharding)
      out.extend(_until(row.tolist(), settings.eos_id) for row in tokens)
  return out


def _until(ids: list[int], eos_id: int) -> list[int]:
  return ids[:ids.index(eos_id)] if eos_id in ids else ids


def translate_texts(r: Restored, texts: Sequence[str]) -> tuple[list[str], int]:
  """-> (one translation per text, how many texts were cut to data.src_seq_len tokens). A blank text gets a blank
  translation without decoding, so a file's translations stay aligned with its lines."""
  tok, src_len = r.tokenizer, r.config.data.src_seq_len
  todo = [i for i, t in enumerate(texts) if t.strip()]
  sources = [data_lib.encode_source(tok, texts[i], src_len) for i in todo]
  cut = sum(len(ids) < len(tok.encode(texts[i])) + 1 for i, ids in zip(todo, sources))  # + 1: the EOS
  out = [''] * len(texts)
  for i, ids in zip(todo, _decode_batches(r, sources=sources) if todo else []):
    out[i] = tok.decode(ids)
  return out, cut


def characters_outside_vocabulary(tokenizer: data_lib.Tokenizer, text: str) -> list[str]:
  """The distinct characters of `text` (in order) the tokenizer encodes as <unk>."""
  return [c for c in dict.fromkeys(text) if tokenizer.unk_id in tokenizer.encode(c)]


def generate_texts(r: Restored, prompts: Sequence[str]) -> list[str]:
  tok = r.tokenizer
  unknown = characters_outside_vocabulary(tok, ''.join(prompts))
  if unknown:
    _warn(f'--prompt characters not in the tokenizer\'s vocabulary (each becomes <unk>, unseen in training): '
          f'{" ".join(map(repr, unknown))}')
  ids = [tok.prompt(tok.encode(p)) for p in prompts]
  longest = max(len(i) for i in ids)
  if longest >= r.config.model.max_len:
    raise EvalError(f'--prompt is {longest} tokens (with BOS) but model.max_len={r.config.model.max_len} leaves no '
                    'room to generate; shorten the prompt.')
  return [tok.decode(out) for out in _decode_batches(r, prompts=ids)]


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


# ------------------------------------------------------------------------------------------------------- run
def run(config: ml_collections.ConfigDict, workdir: str, *, checkpoint_step: int | None = None,
        split: str | None = 'validation', output: str | None = None, mode: str = 'score',
        prompt: str | Sequence[str] | None = None, input_path: str | None = None,
        bleu: bool = True, overrides: Iterable[str] | None = None) -> dict[str, Any]:
  """Evaluates the checkpoint in workdir; returns the results dict (also printed, and written as JSON).

  score: writes {step, split, num_tokens, loss, perplexity, ...} to `output` (default
  DIR/eval_<split>_step<N>.json, copied to DIR/eval.json: the latest);
  encoder_decoder adds bleu, sacrebleu_signature, direction (over the same examples the loss covers, or the
  whole split with train.eval_steps=-1; bleu=False skips decoding). generate: `prompt` text(s) -> printed
  continuations. translate: the lines of `input_path` -> printed, or written one per line to `output`.
  `overrides`: dotted config keys the user set explicitly (see the module docstring).
  """
  if mode not in MODES:
    raise EvalError(f'--mode={mode!r} is not one of {", ".join(MODES)}.')
  if mode == 'translate':
    if not input_path:
      raise EvalError('--mode=translate needs --input=FILE (one source sentence per line).')
    lines = _read_lines(input_path)  # before the (slow) restore: a bad file fails fast
  if mode == 'generate' and prompt is None:
    raise EvalError('--mode=generate needs --prompt=TEXT.')
  if checkpoint_step is not None and checkpoint_step < 0:
    checkpoint_step = None

  start = time.perf_counter()
  r = restore(config, workdir, checkpoint_step=checkpoint_step, overrides=overrides,
              split=split if mode == 'score' else None)
  arch = r.config.model.arch
  workdir = os.path.abspath(workdir)
  head = str(r.config.model.get('head', 'lm'))
  if mode != 'score' and head != 'lm':
    raise EvalError(f'--mode={mode} decodes text, but {workdir} holds a model.head={head} model (one label per '
                    'row); use --mode=score (accuracy and macro-F1 on a split).')

  if mode == 'generate':
    if arch != 'decoder_only':
      raise EvalError(f'--mode=generate needs a decoder_only checkpoint; {workdir} holds {arch} (use --mode=score'
                      + (' or --mode=translate).' if arch == 'encoder_decoder' else ').'))
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    texts = generate_texts(r, prompts)
    for p, t in zip(prompts, texts):
      _log(f'{p}{t}')
    results = {'step': r.step, 'mode': mode, 'decode': dataclasses.asdict(decode_settings(r.config)),
               'prompts': prompts, 'outputs': texts}
    if output:
      _write_json(output, results)
    return results

  if mode == 'translate':
    if arch != 'encoder_decoder':
      raise EvalError(f'--mode=translate needs an encoder_decoder checkpoint; {workdir} holds {arch}.')
    texts, cut = translate_texts(r, lines)
    if cut:
      _warn(f'{cut} of {len(lines)} lines of {input_path} are longer than data.src_seq_len='
            f'{r.config.data.src_seq_len} tokens (EOS included) and were cut to that length before translating.')
    if output:
      if jax.process_index() == 0:
        with open(output, 'w', encoding='utf-8') as f:
          f.write(''.join(t + '\n' for t in texts))
      _log(f'translated {len(lines)} lines -> {output}')
    else:
      for t in texts:
        _log(t)
    return {'step': r.step, 'mode': mode, 'outputs': texts}

  name = split_name(r.config, split)
  results: dict[str, Any] = {'step': r.step, 'split': name, 'arch': arch}
  if head != 'lm':
    results['head'] = head
  sums, scored = score(r, name)
  results.update(sums)
  results['eval_batches'] = len(scored)
  if arch == 'encoder_decoder' and bleu:
    pairs = data_lib.load_text_pairs(r.config, workdir, name, source=r.resolved.source)
    if eval_steps(r.config, final=True) >= 0:  # the examples the loss covered (exactly so when rows are unpacked:
      size = r.resolved.eval_batch_size      # one example per row, batch b holding examples b*size ... )
      pairs = [p for b in scored for p in pairs[b * size:(b + 1) * size]]
    hyps, _ = translate_texts(r, [s for s, _ in pairs])  # cut exactly as training cut them
    refs = [t for _, t in pairs]
    direction = translation_direction(r.config)
    b = metrics_lib.bleu(hyps, refs, tgt_lang=direction.split('->')[-1],
                         tokenize=str(r.config.decode.get('bleu_tokenize', '')),
                         max_ngram_order=int(r.config.decode.get('bleu_max_ngram', metrics_lib.BLEU_MAX_NGRAM_ORDER)))
    if 'bleu_note' in b:
      _log(b['bleu_note'])
    results.update(bleu=b['bleu'], sacrebleu_signature=b['sacrebleu_signature'], **metrics_lib.chrf(hyps, refs),
                   direction=direction, bleu_examples=len(pairs),
                   decode=dataclasses.asdict(decode_settings(r.config)))
    for (src, ref), hyp in list(zip(pairs, hyps))[:3]:
      _log(f'  src: {src}\n  ref: {ref}\n  hyp: {hyp}')
  results['seconds'] = round(time.perf_counter() - start, 2)
  _log(f'evaluation of {workdir} (step {r.step}, split {name}):')
  _log(format_table({k: v for k, v in results.items() if k != 'decode'}))
  results = finite_or_null(results)
  if output:
    _write_json(output, results)
    _log(f'wrote {output}')
  else:
    path = default_output(workdir, name, r.step)
    _write_json(path, results)
    _write_json(os.path.join(workdir, LATEST_OUTPUT), results)
    _log(f'wrote {path} (and {os.path.join(workdir, LATEST_OUTPUT)}, the latest evaluation)')
  return results
