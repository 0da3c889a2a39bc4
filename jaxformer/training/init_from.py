"""`checkpoint.init_from`: start a run from pretrained parameters (only the parameters).

  ''           random initialisation (the default)
  hf:<dir>     a Hugging Face checkpoint directory (jaxformer.hf reads it; no torch)
  <workdir>    another jaxformer run: the parameters of its newest checkpoint

Step, optimizer state, RNG and data position start fresh, so the run can use any data source. A run that already
has checkpoints of its own resumes from them and ignores init_from (step.init_state applies it, through the PEFT
base rule jaxformer/peft/base.py, only when a run starts from step 0). The run's own `config.model` decides the
shapes; a checkpoint that disagrees is one line. Either model.scan_layers layout serves either (converted by
checkpoint.restore_in_layout; Hugging Face weights by jaxformer.hf).
"""
from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from jaxformer import hf
from jaxformer import sharding as shd
from jaxformer.config import ConfigError


def spec(config: Any) -> str:
  return str(config.checkpoint.get('init_from', '') or '')


def load_params(config: Any, abstract_params: Any) -> Any:
  """checkpoint.init_from's parameters with the tree, dtypes and shardings of `abstract_params` (ShapeDtypeStructs
  carrying .sharding; a PEFT run passes only its base part). One-line ConfigErrors for a source that cannot serve.
  The one loader: fresh starts (step.init_state), PEFT resumes and evaluations all read the base through it."""
  source = spec(config)
  if source.startswith(hf.PREFIX):
    directory = os.path.expanduser(source[len(hf.PREFIX):])
    try:
      params = hf.load_params(directory, config.model)
    except ConfigError as e:
      raise ConfigError(f'checkpoint.init_from={source}: {e}') from None
    return hf.with_params(abstract_params, params)
  directory = os.path.join(os.path.abspath(os.path.expanduser(source)), 'checkpoints')
  if not os.path.isdir(directory):
    raise ConfigError(f'checkpoint.init_from={source!r}: no jaxformer checkpoints in {directory}; give a training '
                      'workdir, or hf:<dir> for a Hugging Face checkpoint.')
  from jaxformer.training import checkpoint as ckpt_lib  # not at the top: checkpoint -> step -> peft.base -> here
  options = ocp.CheckpointManagerOptions(create=False, read_only=True)
  manager = ocp.CheckpointManager(directory, options=options, item_names=('params',))

  def restore(abstract: Any) -> tuple[Any, None]:
    return manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract)))['params'], None

  try:
    step = manager.latest_step()
    if step is None:
      raise ConfigError(f'checkpoint.init_from={source!r}: no complete checkpoint in {directory}.')
    try:  # a base saved with the other model.scan_layers is restored in its layout, then converted
      params, _ = ckpt_lib.restore_in_layout(
          restore, abstract_params, ckpt_lib.saved_layout(source, step),
          lambda scanned: ckpt_lib.params_in_layout(config, abstract_params, scanned))
    except (ValueError, KeyError) as e:
      raise ConfigError(f'checkpoint.init_from={source!r} (step {step}) does not fit this model '
                        f'({str(e).splitlines()[0][:200]}); use the base run\'s model section.') from None
  finally:
    manager.close()
  return params


def initial_params(config: Any, abstract_params: Any, mesh: jax.sharding.Mesh):
  """The params nnx.State for the train state, filled from checkpoint.init_from (see load_params)."""
  del mesh  # the shardings travel on abstract_params
  return load_params(config, abstract_params)


def load_model(config: Any, mesh: jax.sharding.Mesh) -> nnx.Module:
  """The model init_from names, for evaluating a workdir that has no checkpoints of its own yet."""
  from jaxformer.training import step as step_lib  # not at the top: step imports this module (fresh starts)
  abstract = nnx.eval_shape(lambda: step_lib.build_model(config))
  graphdef, abstract_params, _ = step_lib.split_model(abstract)
  shardings = shd.state_shardings(abstract_params, mesh, shd.rules_from_config(config))
  abstract_params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_params,
                                 shardings)
  params = initial_params(config, abstract_params, mesh)
  rest = jax.jit(lambda: step_lib.split_model(step_lib.build_model(config))[2])()
  return nnx.merge(graphdef, params, rest)
