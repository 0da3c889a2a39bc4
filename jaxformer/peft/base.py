"""The base model a PEFT run adapts: `checkpoint.init_from`, re-read whenever the run's parameters are assembled
(fresh start, resume, eval.py), because a PEFT run's own checkpoints hold only what trains.

  ''            the base is the seed's initialisation (rebuilt identically from config.seed; tests use this)
  <workdir>     a jaxformer training run: the parameters of its newest checkpoint
  hf:<dir>      a Hugging Face checkpoint (jaxformer.hf)

Every run (PEFT or not) starts from init_from through `with_base`; the loading itself is training/init_from.py's.
"""
from __future__ import annotations

from typing import Any

from flax import nnx

from jaxformer import peft as peft_lib
from jaxformer.errors import ConfigError
from jaxformer.training import init_from as init_from_lib
from jaxformer.training.saved_config import saved_config


def load_base(config: Any, abstract_base: nnx.State) -> nnx.State:
  """checkpoint.init_from's parameters for the base part `abstract_base` (ShapeDtypeStructs carrying .sharding),
  read by training/init_from.py (a jaxformer workdir or hf:<dir>). A PEFT run cannot be another PEFT run's base."""
  source = init_from_lib.spec(config)
  if not source.startswith('hf:') and peft_lib.is_active(saved_config(source) or {}):
    raise ConfigError(f'checkpoint.init_from={source!r} is itself a PEFT run (its checkpoints hold only the adapted '
                      'parameters); start from its base instead, or from a merged export.')
  return init_from_lib.load_params(config, abstract_base)


def with_base(config: Any, params: nnx.State, abstract_params: nnx.State) -> nnx.State:
  """`params` with the base model's part replaced by checkpoint.init_from's (unchanged when it is '')."""
  if not init_from_lib.spec(config):
    return params
  return nnx.merge_state(params, load_base(config, peft_lib.base_params(abstract_params)))
