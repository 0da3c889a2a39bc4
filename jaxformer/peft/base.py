"""The base model a PEFT run adapts: `checkpoint.init_from`, re-read whenever the run's parameters are assembled
(fresh start, resume, eval.py), because a PEFT run's own checkpoints hold only what trains.

  ''            the base is the seed's initialisation (rebuilt identically from config.seed; tests use this)
  <workdir>     a jaxformer training run: the parameters of its newest checkpoint

Hugging Face bases (`hf:<dir>`) come with jaxformer.hf's checkpoint.init_from; `load_base` is the one function
to route through it.
"""
from __future__ import annotations

import json
import os
from typing import Any

import orbax.checkpoint as ocp
from flax import nnx

from jaxformer import peft as peft_lib
from jaxformer.errors import ConfigError


def init_from(config: Any) -> str:
  checkpoint = config.get('checkpoint') or {}
  return str(checkpoint.get('init_from', '') or '')


def _saved_config(workdir: str) -> dict:
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    return {}
  with open(path) as f:
    return json.load(f)


def load_base(config: Any, abstract_base: nnx.State) -> nnx.State:
  """checkpoint.init_from's parameters with the tree, dtypes and shardings of `abstract_base` (the base model's
  params, ShapeDtypeStructs carrying .sharding). One-line ConfigErrors for a base that cannot serve."""
  source = init_from(config)
  if source.startswith('hf:'):
    raise ConfigError(f'checkpoint.init_from={source}: Hugging Face bases need jaxformer.hf (not in this build); '
                      'give a jaxformer training workdir.')
  directory = os.path.join(os.path.abspath(os.path.expanduser(source)), 'checkpoints')
  if not os.path.isdir(directory):
    raise ConfigError(f'checkpoint.init_from={source!r}: no jaxformer checkpoints in {directory}; give the workdir '
                      'of a finished training run.')
  if peft_lib.is_active(_saved_config(source)):
    raise ConfigError(f'checkpoint.init_from={source!r} is itself a PEFT run (its checkpoints hold only the adapted '
                      'parameters); start from its base instead, or from a merged export.')
  options = ocp.CheckpointManagerOptions(create=False, read_only=True)
  manager = ocp.CheckpointManager(directory, options=options, item_names=('params',))
  try:
    step = manager.latest_step()
    if step is None:
      raise ConfigError(f'checkpoint.init_from={source!r}: no complete checkpoint in {directory}.')
    try:
      restored = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_base)))
    except (ValueError, KeyError) as e:
      raise ConfigError(f'checkpoint.init_from={source!r} (step {step}) does not fit this model '
                        f'({str(e).splitlines()[0][:200]}); use the base run\'s model section.') from None
  finally:
    manager.close()
  return restored['params']


def with_base(config: Any, params: nnx.State, abstract_params: nnx.State) -> nnx.State:
  """`params` with the base model's part replaced by checkpoint.init_from's (unchanged when it is '')."""
  if not init_from(config):
    return params
  return nnx.merge_state(params, load_base(config, peft_lib.base_params(abstract_params)))
