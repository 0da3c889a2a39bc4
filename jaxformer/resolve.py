"""resolve(config, workdir): the one place a run's derived settings are filled in and its config is checked.

train.py and eval.py both start here, so the config is validated once, model.vocab_size is taken from the
tokenizer once, the eval batch size is worked out once and the ModelConfig is built once. The data source is
opened here too and the splits the run will read are checked before step 1, so a misspelt data.eval_split is a
one-line error at start-up rather than a surprise at the first evaluation.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import ml_collections
from jax.sharding import Mesh

from jaxformer import compilation_cache, data as data_lib
from jaxformer import sharding as shd
from jaxformer.config import ConfigError, ModelConfig, validate
from jaxformer.training import host_memory

TRAINING_SPLITS = ('train_split', 'eval_split')  # the data.* keys a training run reads


@dataclasses.dataclass(frozen=True)
class Resolved:
  """Everything a run derives from (config, workdir) before touching parameters."""
  config: ml_collections.ConfigDict  # a private copy, model.vocab_size filled in
  model: ModelConfig
  workdir: str  # absolute
  source: data_lib.Source
  tokenizer: data_lib.Tokenizer
  mesh: Mesh
  rules: tuple
  eval_batch_size: int


def eval_batch_size(config: ml_collections.ConfigDict) -> int:
  """train.eval_batch_size, or train.batch_size when it is 0."""
  return int(config.train.eval_batch_size or config.train.batch_size)


def fill_vocab_size(config: ml_collections.ConfigDict, tokenizer: Any) -> None:
  """model.vocab_size 0 -> the tokenizer's; a smaller one than the tokenizer needs is an error."""
  if not config.model.vocab_size:
    config.model.vocab_size = int(tokenizer.vocab_size)
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


def resolve(config: ml_collections.ConfigDict, workdir: str, *, training: bool,
            splits: Sequence[str] | None = None) -> Resolved:
  """Validates `config` once and fills in what it leaves to the run (see the module docstring).

  training: also check the training batch layout. splits: split names to check (default for training: the
  data.train_split and data.eval_split). Builds (and caches in the workdir) the tokenizer when there is none.
  """
  config = ml_collections.ConfigDict(config.to_dict())  # a private, unlocked copy we may fill in
  host_memory.keep_freed_memory()  # XLA:CPU's per-call temp buffers: no page faults every step
  shd.maybe_initialize_distributed(config)  # before anything touches a device
  validate(config)
  compilation_cache.enable(config.train.get('compilation_cache_dir', compilation_cache.DEFAULT_DIR))  # before compiling
  workdir = os.path.abspath(workdir)
  source = data_lib.get_source(config, workdir)
  if splits is None:
    splits = [config.data[key] for key in TRAINING_SPLITS] if training else []
  check_splits(config, source, splits)
  tokenizer = data_lib.get_tokenizer(config, workdir, source=source)
  fill_vocab_size(config, tokenizer)
  model = ModelConfig.from_config(config.model)
  mesh = shd.make_mesh(config)
  rules = shd.rules_from_config(config)
  check_batch_sizes(config, mesh, rules, training=training)
  return Resolved(config, model, workdir, source, tokenizer, mesh, rules, eval_batch_size(config))
