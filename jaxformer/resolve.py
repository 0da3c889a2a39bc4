"""resolve(config, workdir): the one place a run's config is filled, checked, typed and its derived values set.

train.py and eval.py both start here, so every key gets its one default (configs/default.py) once, the config is
validated once, model.vocab_size is taken from the tokenizer once, the eval batch size is worked out once, and the
library receives typed, frozen settings (jaxformer/settings.py). The data source is
opened here too and the splits the run will read are checked before step 1, so a misspelt data.eval_split is a
one-line error at start-up rather than a surprise at the first evaluation.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
from jax.sharding import Mesh

from jaxformer import compilation_cache, data as data_lib
from jaxformer import settings as settings_lib
from jaxformer import sharding as shd
from jaxformer.config import ConfigError, ModelConfig, check_sequence_lengths, validate
from jaxformer.hf import peft_format
from jaxformer.model import config as model_config
from jaxformer.model import layout_convert
from jaxformer.training import checkpoint as ckpt_lib
from jaxformer.training import host_memory
from jaxformer.errors import WorkdirError

TRAINING_SPLITS = ('train_split', 'eval_split')  # the data.* keys a training run reads


@dataclasses.dataclass(frozen=True)
class Resolved:
  """Everything a run derives from (config, workdir) before touching parameters."""
  config: settings_lib.Settings  # every key filled, model.vocab_size and the decode ids set
  workdir: str  # absolute
  source: data_lib.Source
  tokenizer: data_lib.Tokenizer
  mesh: Mesh
  rules: tuple
  eval_batch_size: int

  @property
  def model(self) -> ModelConfig:
    return self.config.model


def eval_batch_size(config: ml_collections.ConfigDict) -> int:
  """train.eval_batch_size, or train.batch_size when it is 0."""
  return int(config.train.eval_batch_size or config.train.batch_size)


def fill_decode_ids(config: ml_collections.ConfigDict, tokenizer: Any) -> None:
  """decode.eos_id / start_id -1 -> the tokenizer's: its end-of-sequence id, and the token training put first in
  every target (encoder_decoder: tokenizer.decoder_start_id, T5's pad 0) or BOS (decoder_only; EOS when there is
  none, as GPT-2). One source for the ids, so decoding cannot start from another token than training did."""
  decode = config.decode
  if decode.eos_id == -1:
    decode.eos_id = int(tokenizer.eos_id)
  if decode.start_id == -1:
    if config.model.arch == 'encoder_decoder':
      decode.start_id = int(tokenizer.decoder_start_id)
    else:
      decode.start_id = int(tokenizer.bos_id if tokenizer.bos_id >= 0 else tokenizer.eos_id)


def fill_vocab_size(config: ml_collections.ConfigDict, tokenizer: Any) -> None:
  """model.vocab_size 0 -> the tokenizer's; a smaller one than the tokenizer needs is an error, unless it fits the
  tokenizer without its added tokens (data.tokenizer_extra; e.g. a Hugging Face model's own size): then it grows
  to take them, as resize_token_embeddings(len(tokenizer)) (never shrinking a model's padded vocabulary).
  peft.train_vocab=auto is decided here: yes when the tokenizer has added tokens."""
  if config.peft.train_vocab == 'auto':
    config.peft.train_vocab = 'yes' if tokenizer.extra_tokens and config.peft.method != 'none' else 'no'
  if not config.model.vocab_size:
    config.model.vocab_size = int(tokenizer.vocab_size)
  elif tokenizer.extra_tokens and tokenizer.base_vocab_size <= config.model.vocab_size < tokenizer.vocab_size:
    config.model.vocab_size = int(tokenizer.vocab_size)
  elif config.model.vocab_size < tokenizer.vocab_size and tokenizer.extra_tokens:
    raise ConfigError(f'model.vocab_size={config.model.vocab_size} is smaller than the tokenizer\'s '
                      f'{tokenizer.base_vocab_size} symbols before the {len(tokenizer.extra_tokens)} of '
                      f'data.tokenizer_extra; set model.vocab_size to 0 (= the grown tokenizer\'s '
                      f'{tokenizer.vocab_size}).')
  elif config.model.vocab_size < tokenizer.vocab_size:
    raise ConfigError(f'model.vocab_size={config.model.vocab_size} is smaller than the tokenizer\'s '
                      f'{tokenizer.vocab_size} symbols; set it to 0 (= take the tokenizer\'s) or larger.')


def check_batch_sizes(config: ml_collections.ConfigDict, mesh: Mesh, rules: tuple, *, training: bool) -> None:
  """Global batch sizes must split evenly over the batch shards (and over the grad-accumulation micro-batches)."""
  shards = shd.batch_shards(mesh, rules)
  train = config.train
  micro = train.batch_size // train.grad_accum_steps
  if training and micro % shards:
    raise ConfigError(
        f'train.batch_size={train.batch_size} / train.grad_accum_steps={train.grad_accum_steps} = {micro} rows per '
        f'micro-batch is not divisible by the {shards} batch shards of the mesh (data x fsdp); use a multiple of '
        f'{shards * train.grad_accum_steps}.')
  eval_bs = eval_batch_size(config)
  if eval_bs % shards:
    raise ConfigError(f'train.eval_batch_size={eval_bs} is not divisible by the {shards} batch shards of the mesh; '
                      f'set --config.train.eval_batch_size to a multiple of {shards}.')


def check_splits(config: ml_collections.ConfigDict, source: data_lib.Source, splits: Sequence[str]) -> None:
  """Each split must exist in the source and hold examples (DataError naming the data.* key otherwise)."""
  for name in splits:
    source.split(str(name))


def _number(key: str, value: Any, *, low: float, high: float = math.inf, low_open: bool = False,
            high_open: bool = False) -> None:
  ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
  ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
  if not ok:
    interval = f'{"(" if low_open else "["}{low:g}, {high:g}{")" if high_open else "]"}'
    raise ConfigError(f'{key}={value!r} must be a number in {interval}.')


def check_train_values(config: ml_collections.ConfigDict) -> None:
  """Ranges config.validate does not cover: optimizer numbers, loss terms, the bad-step guard."""
  train = config.train
  _number('train.learning_rate', train.learning_rate, low=0, low_open=True)
  _number('train.min_learning_rate', train.min_learning_rate, low=0, high=train.learning_rate)
  _number('train.weight_decay', train.weight_decay, low=0)
  for key in ('b1', 'b2'):
    _number(f'train.{key}', train[key], low=0, high=1, high_open=True)
  _number('train.eps', train.eps, low=0)
  _number('train.grad_clip_norm', train.grad_clip_norm, low=0)
  _number('train.z_loss', train.z_loss, low=0)
  _number('train.moe_aux_loss_coef', train.moe_aux_loss_coef, low=0)
  _number('train.moe_z_loss_coef', train.moe_z_loss_coef, low=0)
  max_bad = train.max_bad_steps
  if not isinstance(max_bad, int) or max_bad < 1:
    raise ConfigError(f'train.max_bad_steps={max_bad!r} must be a positive integer.')


def fill_adapter_settings(config: ml_collections.ConfigDict) -> None:
  """peft.adapter / peft.adapters (Hugging Face peft directories) decide the peft keys: a LoRA adapter's method,
  rank, alpha and targets (several: the sum of their ranks, scale 1), a prefix adapter's method and length, set
  here once (a note names what changed) and validated as if given."""
  values = peft_format.settings_for(config.peft, config.model)
  if values:  # the saved config must work from any directory
    peft = config.peft
    peft.adapter = os.path.abspath(os.path.expanduser(peft.adapter)) if peft.adapter else ''
    peft.adapters = ','.join(f'{name}:{os.path.abspath(os.path.expanduser(d))}' for name, d in
                             peft_format.named_values('peft.adapters', peft.adapters, 'dir').items())
  changed = {k: v for k, v in values.items() if config.peft[k] != v}
  if changed and jax.process_index() == 0:
    print('note: the adapter(s) set ' + ', '.join(f'peft.{k}={v!r}' for k, v in changed.items()), flush=True)
  config.peft.update(values)
  if changed:
    validate(config)


def checked_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A private, unlocked copy of `config` with every key (configs/default.py's values under it), validated (once)
  on a process ready to touch devices."""
  config = settings_lib.fill(config)
  host_memory.keep_freed_memory()  # XLA:CPU's per-call temp buffers: no page faults every step
  shd.maybe_initialize_distributed(config)  # before anything touches a device
  validate(config)
  fill_adapter_settings(config)
  compilation_cache.enable(config.train.compilation_cache_dir)  # before anything compiles
  check_train_values(config)
  return config


Difference = tuple[str, Any, Any]  # (dotted key, the saved run's value, this config's)


def saved_run_differences(config: Any, saved: dict) -> tuple[list[Difference], list[Difference]]:
  """The one comparison of a config with a saved run: (differences that make it another model, execution keys that
  changed). model.scan_layers is a layout, not another model (the checkpoint converts on restore); model.vocab_size
  0 means "the tokenizer's" (and with data.tokenizer_extra a smaller one grows to it); the execution keys (model.dtype, attention_impl, remat: model/config.py
  EXECUTION_KEYS) may change; train.optimizer and train.skip_bad_steps decide the optimizer state's layout."""
  saved = settings_lib.upgrade_saved(saved)
  differ, changed = [], []
  # compared resolved (num_kv_heads -1 and the head count it stands for are the same model)
  old_model = dataclasses.asdict(ModelConfig.from_config(saved.model))
  new_model = dataclasses.asdict(ModelConfig.from_config(config.model))
  for key, old in old_model.items():
    value = new_model[key]
    if (key == 'vocab_size' and (not value or (config.data.tokenizer_extra and value <= old))) or (
        key in layout_convert.LAYOUT_KEYS):
      continue  # 0, or a size that grows to the saved one with data.tokenizer_extra (fill_vocab_size)
    if (list(old) if isinstance(old, (list, tuple)) else old) != (list(value) if isinstance(value, tuple) else value):
      (changed if key in model_config.EXECUTION_KEYS else differ).append((f'model.{key}', saved.model[key],
                                                                          getattr(config.model, key)))
  for key in ('optimizer', 'skip_bad_steps'):
    if saved.train[key] != getattr(config.train, key):
      differ.append((f'train.{key}', saved.train[key], getattr(config.train, key)))
  return differ, changed


def describe(differences: Sequence[Difference]) -> str:
  return '; '.join(f'{key}={old!r} there, {new!r} here' for key, old, new in differences)


def check_saved_run(config: ml_collections.ConfigDict, workdir: str) -> None:
  """A workdir with checkpoints holds one model: a config whose model section (or optimizer state layout) differs
  is refused before anything is written (WorkdirError naming the keys; saved_run_differences). A changed execution
  key is a note."""
  step = ckpt_lib.latest_step(workdir)
  saved = ckpt_lib.saved_config(workdir, step) if step is not None else None
  if not saved:
    return
  differ, changed = saved_run_differences(config, saved)
  old_layout = bool(settings_lib.upgrade_saved(saved).model.scan_layers)
  if old_layout != bool(config.model.scan_layers) and config.peft.method != 'none' and not config.checkpoint.init_from:
    raise WorkdirError(
        f'--workdir={workdir} holds a PEFT run whose base is the seed\'s initialisation (checkpoint.init_from=\'\'), '
        f'which differs between layouts; resume it with model.scan_layers={old_layout}, or use a new --workdir.')
  if changed and not differ:
    if jax.process_index() == 0:
      print(f'note: resuming {workdir} with another execution setting ({describe(changed)}); the parameters are '
            'the same.', flush=True)
  if differ:
    raise WorkdirError(
        f'--workdir={workdir} holds checkpoints of another model ({describe(differ[:3])}); use a new --workdir, '
        'or the model settings it was trained with to resume.')


def inherit_tokenizer(config: ml_collections.ConfigDict, workdir: str) -> None:
  """checkpoint.init_from=<jaxformer workdir>: this run takes that run's cached tokenizer (when it has none yet),
  so the ids are the ones the pretrained model knows (data/tokenizers.py `inherit`)."""
  base = str(config.checkpoint.init_from)
  if base and not base.startswith('hf:'):  # every process, as get_tokenizer builds on every one (atomic copy)
    data_lib.inherit_tokenizer(os.path.expanduser(base), workdir, config)


def check_tokenizer_cache(config: ml_collections.ConfigDict, workdir: str) -> None:
  """The cached tokenizer must come from this run's data (the source and settings it records in tokenizer.json),
  or from checkpoint.init_from's run (inherited: built from the base's data on purpose)."""
  path = os.path.join(data_lib.tokenizer_dir(workdir), 'tokenizer.json')
  if not os.path.isfile(path):
    return
  with open(path, encoding='utf-8') as f:
    meta = json.load(f)
  if meta.get('kind') == 'byte' or meta.get('kind') != config.data.tokenizer or meta.get('inherited_from'):
    return  # bytes need no data; a different kind gets get_tokenizer's own error
  wanted = {'source': str(config.data.source), 'train_split': str(config.data.train_split)}
  if meta.get('kind') == 'sentencepiece':
    wanted.update(requested_vocab_size=int(config.data.vocab_size), spm_model_type=str(config.data.spm_model_type))
  differ = [f'{k}={meta[k]!r}' for k, v in wanted.items() if k in meta and meta[k] != v]
  if differ:
    raise data_lib.DataError(
        f'the cached tokenizer in {os.path.dirname(path)} was built with data.{", data.".join(differ)}, which this '
        f'config changes; use a new --workdir, or delete {os.path.dirname(path)} to rebuild it (only if the '
        'workdir has no checkpoints you want to resume).')


def resolve(config: ml_collections.ConfigDict, workdir: str, *, training: bool,
            splits: Sequence[str] | None = None, checked: bool = False) -> Resolved:
  """Validates `config` once and fills in what it leaves to the run (see the module docstring).

  training: also check the training batch layout and that the cached tokenizer fits the data. splits: split
  names to check (default for training: the data.train_split and data.eval_split). checked: `config` came from
  checked_config already. Builds (and caches in the workdir) the tokenizer when there is none, or copies
  checkpoint.init_from's when that is a jaxformer run.
  """
  if not checked:
    config = checked_config(config)
  workdir = os.path.abspath(workdir)
  inherit_tokenizer(config, workdir)
  if training:
    check_tokenizer_cache(config, workdir)
  typed = settings_lib.from_config(config)  # the data library reads typed settings too (vocab_size still 0)
  source = data_lib.get_source(typed, workdir)
  if splits is None:
    splits = [config.data[key] for key in TRAINING_SPLITS] if training else []
  check_splits(config, source, splits)
  tokenizer = data_lib.get_tokenizer(typed, workdir, source=source)
  unknown = data_lib.unknown_characters(typed, tokenizer, source, splits)  # may raise: data.max_unk_fraction
  if unknown and jax.process_index() == 0:
    print(unknown, flush=True)
  fill_vocab_size(config, tokenizer)
  fill_decode_ids(config, tokenizer)
  settings = settings_lib.from_config(config)
  mesh = shd.make_mesh(settings)
  rules = shd.rules_from_config(settings)
  check_sequence_lengths(config, mesh.shape.get('sequence', 1))  # mesh.sequence=-1, now resolved
  check_batch_sizes(settings, mesh, rules, training=training)
  return Resolved(settings, workdir, source, tokenizer, mesh, rules, eval_batch_size(settings))
