"""`checkpoint.init_from`: start a run from pretrained parameters (only the parameters).

  ''           random initialisation (the default)
  hf:<dir>     a Hugging Face checkpoint directory (jaxformer.hf reads it; no torch)
  <workdir>    another jaxformer run: the parameters of its newest checkpoint

Step, optimizer state, RNG and data position start fresh, so the run can use any data source. A run that already
has checkpoints of its own resumes from them and ignores init_from (step.init_state applies it, through the PEFT
base rule jaxformer/peft/base.py, only when a run starts from step 0). The run's own `config.model` decides the
shapes; a checkpoint that disagrees is one line. Either model.scan_layers layout serves either (converted by
checkpoint.restore_in_layout; Hugging Face weights by jaxformer.hf).

The output head may differ from the base run's (model.head / num_classes / pooling / pooler, HEAD_FIELDS): a
classifier fine-tuned from a jaxformer masked-LM run takes the encoder and leaves its classifier freshly
initialised, as it would from a Hugging Face BERT. Only parameters of equal path and shape are taken then; the
result is a partial State (merged over the fresh initialisation by the caller) and one log line names the rest.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from jaxformer import hf
from jaxformer import sharding as shd
from jaxformer.config import ConfigError
from jaxformer.training.saved_config import saved_config

HEAD_FIELDS = ('head', 'num_classes', 'pooling', 'pooler')  # what a fine-tune may change about the base model


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
    base_config, target = _base_model_config(config, source, step), abstract_params
    if base_config is not config:  # another head: restore the base's own tree, keep what this model shares
      abstract_params = abstract_params_for(base_config, _mesh_of(target))
    try:  # a base saved with the other model.scan_layers is restored in its layout, then converted
      params, _ = ckpt_lib.restore_in_layout(
          restore, abstract_params, ckpt_lib.saved_layout(source, step),
          lambda scanned: ckpt_lib.params_in_layout(base_config, abstract_params, scanned))
    except (ValueError, KeyError) as e:
      raise ConfigError(f'checkpoint.init_from={source!r} (step {step}) does not fit this model '
                        f'({str(e).splitlines()[0][:200]}); use the base run\'s model section.') from None
  finally:
    manager.close()
  return params if base_config is config else _shared_part(params, target, source)


def _base_model_config(config: Any, source: str, step: int) -> Any:
  """`config` itself when the base run has this model's head; else a copy with the base's HEAD_FIELDS (and no
  PEFT modules: a base is never a PEFT run), the model whose tree the base checkpoint holds."""
  saved = (saved_config(source, step) or {}).get('model') or {}
  changed = {k: saved[k] for k in HEAD_FIELDS if k in saved and saved[k] != config.model.get(k)}
  if not changed:
    return config
  base = ml_collections.ConfigDict(config.to_dict())
  base.model.update(changed)
  if 'peft' in base:
    base.peft.method = 'none'
    base.peft.train_extra = ''
  return base


def _mesh_of(abstract_params: Any) -> jax.sharding.Mesh | None:
  for leaf in jax.tree.leaves(abstract_params):
    sharding = getattr(leaf, 'sharding', None)
    if isinstance(sharding, jax.sharding.NamedSharding):
      return sharding.mesh
  return None


def _shared_part(params: nnx.State, target: nnx.State, source: str) -> nnx.State:
  """The parameters of `params` that `target` has with the same shape (a partial State), logging what is not."""
  wanted = {path: leaf.shape for path, leaf in nnx.to_flat_state(target)}
  have = list(nnx.to_flat_state(params))
  kept = [(path, x) for path, x in have if wanted.get(path) == x.shape]
  kept_paths = {path for path, _ in kept}
  fresh = sorted('.'.join(map(str, p)) for p in set(wanted) - kept_paths)
  unused = sorted('.'.join(map(str, p)) for p, _ in have if p not in kept_paths)
  logging.warning('checkpoint.init_from=%s has another model head: %d parameter(s) start freshly initialised (%s); '
                  '%d of the base are not used (%s).', source, len(fresh), _summary(fresh), len(unused),
                  _summary(unused))
  return nnx.from_flat_state(kept)


def _summary(paths: list[str], limit: int = 4) -> str:
  return ', '.join(paths[:limit]) + (f', ... ({len(paths) - limit} more)' if len(paths) > limit else '') or 'none'


def abstract_params_for(config: Any, mesh: jax.sharding.Mesh | None) -> nnx.State:
  """The params of config's model as ShapeDtypeStructs, placed by the mesh rules when `mesh` is given."""
  from jaxformer.training import step as step_lib  # not at the top: step imports this module (fresh starts)
  _, abstract, _ = step_lib.split_model(nnx.eval_shape(lambda: step_lib.build_model(config)))
  if mesh is None:
    return abstract
  shardings = shd.state_shardings(abstract, mesh, shd.rules_from_config(config))
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def initial_params(config: Any, abstract_params: Any, mesh: jax.sharding.Mesh):
  """The params nnx.State for the train state, filled from checkpoint.init_from (see load_params)."""
  del mesh  # the shardings travel on abstract_params
  return load_params(config, abstract_params)


def load_model(config: Any, mesh: jax.sharding.Mesh) -> nnx.Module:
  """The model init_from names, for evaluating a workdir that has no checkpoints of its own yet."""
  from jaxformer.training import step as step_lib  # not at the top: step imports this module (fresh starts)
  graphdef = step_lib.split_model(nnx.eval_shape(lambda: step_lib.build_model(config)))[0]
  abstract_params = abstract_params_for(config, mesh)
  shardings = jax.tree.map(lambda a: a.sharding, abstract_params)
  params = initial_params(config, abstract_params, mesh)
  if len(nnx.to_flat_state(params)) < len(nnx.to_flat_state(abstract_params)):  # a fresh task head: initialise it
    fresh = jax.jit(lambda: step_lib.split_model(step_lib.build_model(config))[1], out_shardings=shardings)()
    params = nnx.merge_state(fresh, params)
  rest = jax.jit(lambda: step_lib.split_model(step_lib.build_model(config))[2])()
  return nnx.merge(graphdef, params, rest)
