"""`checkpoint.init_from`: start a run from pretrained parameters (only the parameters).

  ''           random initialisation (the default)
  hf:<dir>     a Hugging Face checkpoint directory (jaxformer.hf reads it; no torch)
  <workdir>    another jaxformer run: the parameters of its newest checkpoint

Step, optimizer state, RNG and data position start fresh, so the run can use any data source. A run that already
has checkpoints of its own resumes from them and ignores init_from (the training loop only calls `apply` when it
starts from step 0). The run's own `config.model` decides the shapes; a checkpoint that disagrees is one line.
"""
from __future__ import annotations

import os
from typing import Any

import jax
from flax import nnx

from jaxformer import hf
from jaxformer import sharding as shd
from jaxformer.config import ConfigError
from jaxformer.training import checkpoint as ckpt_lib
from jaxformer.training import step as step_lib


def spec(config: Any) -> str:
  return str(config.checkpoint.get('init_from', '') or '')


def initial_params(config: Any, abstract_params: Any, mesh: jax.sharding.Mesh):
  """The params nnx.State for the train state: `abstract_params` (ShapeDtypeStructs with .sharding) filled from
  checkpoint.init_from, each array placed on its sharding."""
  source = spec(config)
  if source.startswith(hf.PREFIX):
    directory = os.path.expanduser(source[len(hf.PREFIX):])
    try:
      params = hf.load_params(directory, config.model)
    except ConfigError as e:
      raise ConfigError(f'checkpoint.init_from={source}: {e}') from None
    return hf.with_params(abstract_params, params)
  if not os.path.isdir(ckpt_lib.checkpoint_dir(source)):
    raise ConfigError(f'checkpoint.init_from={source!r}: no jaxformer checkpoints in '
                      f'{ckpt_lib.checkpoint_dir(source)}; '
                      'give a training workdir, or hf:<dir> for a Hugging Face checkpoint.')
  model, _ = ckpt_lib.restore_model(source, config, mesh)
  return jax.tree.map(lambda x, a: jax.device_put(x, a.sharding), nnx.state(model, nnx.Param), abstract_params)


def apply(config: Any, setup: step_lib.TrainSetup, state: dict) -> dict:
  """A freshly initialised train state with its params replaced by init_from's and the optimizer state rebuilt
  for them (step, RNG and data position stay fresh)."""
  params = initial_params(config, setup.abstract_state['params'], setup.mesh)
  opt_state = jax.jit(setup.tx.init, out_shardings=setup.state_shardings['opt_state'])(params)
  return {**state, 'params': params, 'opt_state': opt_state}


def load_model(config: Any, mesh: jax.sharding.Mesh) -> nnx.Module:
  """The model init_from names, for evaluating a workdir that has no checkpoints of its own yet."""
  abstract = nnx.eval_shape(lambda: step_lib.build_model(config))
  graphdef, abstract_params, _ = step_lib.split_model(abstract)
  shardings = shd.state_shardings(abstract_params, mesh, shd.rules_from_config(config))
  abstract_params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_params,
                                 shardings)
  params = initial_params(config, abstract_params, mesh)
  rest = jax.jit(lambda: step_lib.split_model(step_lib.build_model(config))[2])()
  return nnx.merge(graphdef, params, rest)
