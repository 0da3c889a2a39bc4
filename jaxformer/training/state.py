"""Where a run's parameters come from, decided in one place.

The train state of a run, in this order of precedence (the first that applies wins):
  1. resume         the workdir has checkpoints: the newest readable one (params, optimizer state, step, rng
                    streams, data position), converted from the other model.scan_layers layout when needed. A PEFT
                    run's checkpoints hold only what trains; its frozen base is re-read as in 3.
  2. init_from      checkpoint.init_from = <jaxformer workdir> (the parameters of its newest checkpoint; a base run
                    with another model.head gives the shared trunk, the new head starts fresh) or hf:<dir> (a
                    Hugging Face checkpoint, read by jaxformer.hf). Step, optimizer state and data start fresh.
  3. PEFT base      a PEFT method's own modules always start fresh; the base model under them comes from 2, or
                    from the seed when init_from is '' (rebuilt identically from config.seed).
  4. fresh init     config.seed's initialisation, created directly sharded (each device computes its shards).

The reference model of align.method=dpo (and of the online methods' KL) is the parameters a fresh run starts
from (2-4: checkpoint.init_from, frozen; under LoRA / adapters the base with the fresh adapters, whose output is
the base's): `reference_params` rebuilds it by those rules and returns only its trainable part, since the frozen
part IS the run's frozen parameters (no second copy of the base under PEFT); `run_reference` copies a fresh run's
step-0 trainable parameters instead of reading checkpoint.init_from a second time.

Evaluation and export read parameters through the same rules (`restore_model`; `init_from_model` for a workdir
that has no checkpoints yet). Checkpoint files are read and written by checkpoint.py; this module decides what
to read and assembles the state.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxformer import align
from jaxformer import hf
from jaxformer import peft as peft_lib
from jaxformer.peft import quantize as quantize_lib
from jaxformer import settings as settings_lib
from jaxformer import sharding as shd
from jaxformer.errors import ConfigError
from jaxformer.heads import HEAD_FIELDS
from jaxformer.hf import peft_format
from jaxformer.model import build_model as build_base_model
from jaxformer.model import layout_convert
from jaxformer.training import checkpoint as ckpt_lib
from jaxformer.training import vocab_growth
from jaxformer.training.saved_config import saved_config
from jaxformer.training.step import TrainSetup, split_model


# ------------------------------------------------------------------------------------------------ the model
def build_model(config: Any, *, seed: int | None = None) -> nnx.Module:
  """The model with its `params` and `dropout` rng streams seeded from config.seed. Variables are created
  unsharded (eager sharding off): shardings are applied by the jitted init's out_shardings instead, which also
  copes with dimensions the mesh cannot divide. The PEFT method's modules (config.peft) are attached after the
  base model is built, from rng streams of their own, so the base parameters do not depend on the method; so is
  align.method=ppo's value head."""
  seed = int(config.seed if seed is None else seed)
  with nnx.use_eager_sharding(False):
    model = build_base_model(config.model, rngs=nnx.Rngs(params=seed, dropout=seed + 1))
    model = peft_lib.attach(model, config.peft, nnx.Rngs(params=seed + 2, dropout=seed + 3))
    model = quantize_lib.attach(model, config.peft)  # peft.quantize: the frozen kernels stored quantised
    return align.attach(model, config, nnx.Rngs(params=seed + 4))  # ppo: the value head


def abstract_model(config: Any, mesh: Mesh, rules: tuple | None = None) -> tuple[Any, nnx.State, nnx.State]:
  """(graphdef, params as ShapeDtypeStructs on `mesh`'s shardings, the abstract rest) of config's model."""
  rules = shd.rules_from_config(config) if rules is None else rules
  graphdef, abs_params, abs_rest = split_model(nnx.eval_shape(lambda: build_model(config)))
  params_sh = shd.state_shardings(abs_params, mesh, rules)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abs_params, params_sh)
  return graphdef, target, abs_rest


def in_layout(config: Any, scanned: bool) -> Any:
  """config with model.scan_layers=scanned: the same model in the other parameter layout."""
  config = settings_lib.of(config)
  return settings_lib.replace(config, model=dataclasses.replace(config.model, scan_layers=bool(scanned)))


def _init_state(config: Any, tx: optax.GradientTransformation) -> dict:
  _, params, rest = split_model(build_model(config))
  return {'step': jnp.zeros((), jnp.int32), 'params': params,
          'opt_state': tx.init(peft_lib.trainable(params, config.peft)), 'rngs': rest}


def make_setup(config: Any, mesh: Mesh, tx: optax.GradientTransformation, schedule: Any,
               rules: tuple | None = None) -> TrainSetup:
  """Shapes and shardings of the train state, computed without allocating it (nnx.eval_shape / jax.eval_shape)."""
  config = settings_lib.of(config)
  rules = shd.rules_from_config(config) if rules is None else rules
  graphdef, abs_params, _ = split_model(nnx.eval_shape(lambda: build_model(config)))
  abs_state = jax.eval_shape(functools.partial(_init_state, config, tx))
  replicated = NamedSharding(mesh, PartitionSpec())
  params_sh = shd.state_shardings(abs_params, mesh, rules)
  peft_lib.check_trainable(abs_params, config.peft)
  shardings = {
      'step': replicated,
      'params': params_sh,
      'opt_state': shd.opt_state_shardings(abs_state['opt_state'], peft_lib.trainable(abs_params, config.peft),
                                           peft_lib.trainable(params_sh, config.peft), mesh),
      'rngs': jax.tree.map(lambda _: replicated, abs_state['rngs']),
  }
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abs_state, shardings)
  return TrainSetup(graphdef, tx, schedule, mesh, rules, abstract, shardings, config)


# ------------------------------------------------------------------------------- 4. fresh init, 3. PEFT base
def initial_state(config: Any, setup: TrainSetup) -> dict:
  """A fresh run's train state, created directly sharded (jit + out_shardings); the base model's parameters come
  from checkpoint.init_from when it is set (a PEFT method's own parameters stay freshly initialised)."""
  config = settings_lib.of(config)
  with shd.mesh_context(setup.mesh, setup.rules):
    state = jax.jit(functools.partial(_init_state, config, setup.tx), out_shardings=setup.state_shardings)()
  state['params'] = with_base(config, state['params'], setup.abstract_state['params'])
  return state


def initial_params(config: Any, abstract_params: nnx.State, mesh: Mesh, rules: tuple) -> nnx.State:
  """Every parameter as a fresh run starts, placed on `abstract_params`' shardings: the seed's initialisation, with
  the base replaced by checkpoint.init_from's (what completes a PEFT checkpoint's trainable params)."""
  config = settings_lib.of(config)
  shardings = jax.tree.map(lambda a: a.sharding, abstract_params)
  with shd.mesh_context(mesh, rules):
    params = jax.jit(lambda: split_model(build_model(config))[1], out_shardings=shardings)()
  return with_base(config, params, abstract_params)


def reference_params(config: Any, abstract_params: nnx.State, mesh: Mesh, rules: tuple) -> nnx.State:
  """The trainable part (peft.trainable) of the reference model's parameters: what the run's trainable parameters
  were at step 0 (initial_params), on `abstract_params`' shardings. Merged over the run's frozen parameters it is
  the whole reference model."""
  config = settings_lib.of(config)
  return peft_lib.trainable(initial_params(config, abstract_params, mesh, rules), config.peft)


def run_reference(config: Any, setup: TrainSetup, state: dict, resumed: bool) -> nnx.State:
  """reference_params of a training run: a fresh run's step-0 trainable parameters ARE the reference, so they are
  copied (the train step donates the state) instead of read again from checkpoint.init_from; a resumed run
  rebuilds them (reference_params)."""
  config = settings_lib.of(config)
  if resumed:
    return reference_params(config, setup.abstract_state['params'], setup.mesh, setup.rules)
  shardings = peft_lib.trainable(setup.state_shardings['params'], config.peft)
  copy = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree), out_shardings=shardings)
  return copy(peft_lib.trainable(state['params'], config.peft))


def with_base(config: Any, params: nnx.State, abstract_params: nnx.State) -> nnx.State:
  """`params` with the base model's part (all but the PEFT modules) replaced by checkpoint.init_from's (quantised
  with peft.quantize), and the PEFT parameters by peft.adapter(s)' (with_adapters)."""
  if config.checkpoint.init_from:
    read = _quantized_base if quantize_lib.is_active(config.peft) else init_from_params
    params = nnx.merge_state(params, read(config, peft_lib.base_params(abstract_params)))
  return with_adapters(config, params, abstract_params)


def _unrolled_shapes(config: Any) -> dict[str, tuple[int, ...]]:
  _, abstract, _ = split_model(nnx.eval_shape(lambda: build_model(in_layout(config, False))))
  return {'.'.join(map(str, p)): tuple(x.shape) for p, x in nnx.to_flat_state(abstract)}


def with_adapters(config: Any, params: nnx.State, abstract_params: nnx.State,
                  adapter_name: str | None = None) -> nnx.State:
  """`params` with the PEFT parameters of the Hugging Face peft directories peft.adapter / peft.adapters
  (hf/peft_format.py: a prefix adapter's prefix, one LoRA adapter's own factors, or several combined by
  peft.adapter_weights / adapter_name; adapter_name here: that one alone), placed on `abstract_params`' shardings
  in the model's layout."""
  config = settings_lib.of(config)
  if not (config.peft.adapter or config.peft.adapters):
    return params
  values = peft_format.run_adapter_params(config.peft, config.model, _unrolled_shapes(config), adapter_name)
  if config.model.scan_layers:
    values = layout_convert.to_flat_layout(values, scanned=True)
  return nnx.merge_state(params, hf.with_params(abstract_params, values))


def select_adapter(model: nnx.Module, config: Any, adapter_name: str) -> None:
  """Sets the model's LoRA factors to the adapter `adapter_name` of peft.adapters alone (the base and the other
  parameters stay): a per-request choice with the base loaded once."""
  params = nnx.state(model, nnx.Param)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params)
  nnx.update(model, with_adapters(config, params, abstract, adapter_name))


def _quantized_base(config: Any, abstract_base: nnx.State) -> nnx.State:
  """3. with peft.quantize: checkpoint.init_from's base read in full precision (the model without quantisation),
  then quantised once on device by the model's own quantize_lib.attach (jitted, onto `abstract_base`'s shardings),
  so the tree is exactly the quantised model's. Deterministic: a resumed run re-quantises to the same arrays."""
  plain = settings_lib.replace(config, peft=dataclasses.replace(config.peft, quantize='none'))
  mesh, rules = _mesh_of(abstract_base), shd.rules_from_config(config)
  base = init_from_params(plain, peft_lib.base_params(abstract_model(plain, mesh, rules)[1]))

  def quantize(base: nnx.State) -> nnx.State:
    model = build_model(plain)
    nnx.update(model, base)
    return peft_lib.base_params(split_model(quantize_lib.attach(model, config.peft))[1])

  with shd.mesh_context(mesh, rules):
    return jax.jit(quantize, out_shardings=jax.tree.map(lambda a: a.sharding, abstract_base))(base)


# ----------------------------------------------------------------------------------------------- 2. init_from
def init_from_params(config: Any, abstract_params: nnx.State) -> nnx.State:
  """checkpoint.init_from's parameters with the tree, dtypes and shardings of `abstract_params` (ShapeDtypeStructs
  carrying .sharding; a PEFT run passes only its base part). A base run with another head gives a partial State
  (the shared trunk), merged over the fresh initialisation by the caller. A base with a smaller vocabulary (this
  run's tokenizer has added tokens: data.tokenizer_extra) is read at its own size and grown, the new rows the
  mean of the old (training/vocab_growth.py). One-line ConfigErrors for a source that cannot serve."""
  config = settings_lib.of(config)
  source, new = config.checkpoint.init_from, int(config.model.vocab_size)
  old = _base_vocab_size(config)
  if not old or old == new:
    return _init_from_params(config, abstract_params)
  if old > new:
    raise ConfigError(f'checkpoint.init_from={source} has a vocabulary of {old} but this model {new} '
                      f'(model.vocab_size); fine-tune with the base\'s tokenizer (and its data.tokenizer_extra, if it '
                      'had one) and model.vocab_size=0.')
  small = settings_lib.replace(config, model=dataclasses.replace(config.model, vocab_size=old))
  params = _init_from_params(small, _params_in_layout(small, abstract_params, bool(config.model.scan_layers)))
  logging.info('checkpoint.init_from=%s: vocabulary grown from %d to %d (new rows = the mean of the old)', source,
               old, new)
  try:
    return vocab_growth.grow_vocab(params, abstract_params, old, new)
  except ValueError as e:
    raise ConfigError(f'checkpoint.init_from={source}: cannot grow its vocabulary from {old} to {new} ({e}).') from None


def _base_vocab_size(config: Any) -> int:
  """The vocabulary size of checkpoint.init_from's model (0 when it does not say)."""
  source = config.checkpoint.init_from
  if source.startswith(hf.PREFIX):
    try:
      return int(hf.model_section(os.path.expanduser(source[len(hf.PREFIX):])).vocab_size)
    except ConfigError as e:
      raise ConfigError(f'checkpoint.init_from={source}: {e}') from None
  return int(((saved_config(source) or {}).get('model') or {}).get('vocab_size') or 0)


def _init_from_params(config: Any, abstract_params: nnx.State) -> nnx.State:
  """init_from_params at the base's own vocabulary size."""
  source = config.checkpoint.init_from
  if source.startswith(hf.PREFIX):
    try:
      params = hf.load_params(os.path.expanduser(source[len(hf.PREFIX):]), config.model)
    except ConfigError as e:
      raise ConfigError(f'checkpoint.init_from={source}: {e}') from None
    return hf.with_params(abstract_params, params)
  directory = ckpt_lib.checkpoint_dir(source)
  if not os.path.isdir(directory):
    raise ConfigError(f'checkpoint.init_from={source!r}: no jaxformer checkpoints in {directory}; give a training '
                      'workdir, or hf:<dir> for a Hugging Face checkpoint.')
  saved = saved_config(source) or {}
  if peft_lib.is_active(settings_lib.saved_peft(saved)):
    raise ConfigError(f'checkpoint.init_from={source!r} is itself a PEFT run (its checkpoints hold only the adapted '
                      'parameters); start from its base instead, or from a merged export.')
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False, read_only=True),
                                  item_names=('params',))

  def restore(abstract: Any) -> tuple[Any, None]:
    return manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract)))['params'], None

  try:
    step = manager.latest_step()
    if step is None:
      raise ConfigError(f'checkpoint.init_from={source!r}: no complete checkpoint in {directory}.')
    base_config, target = _base_run_config(config, source, step), abstract_params
    mesh = _mesh_of(target)
    if base_config is not config:  # another head: restore the base's own tree, keep what this model shares
      abstract_params = abstract_model(base_config, mesh)[1]
    try:  # a base saved with the other model.scan_layers is restored in its layout, then converted
      params, _ = ckpt_lib.restore_in_layout(
          restore, abstract_params, ckpt_lib.saved_layout(source, step),
          lambda scanned: _params_in_layout(base_config, abstract_params, scanned))
    except (ValueError, KeyError) as e:
      raise ConfigError(f'checkpoint.init_from={source!r} (step {step}) does not fit this model '
                        f'({str(e).splitlines()[0][:200]}); use the base run\'s model section.') from None
  finally:
    manager.close()
  return params if base_config is config else _shared_part(params, target, source)


def _base_run_config(config: Any, source: str, step: int) -> Any:
  """`config` itself when the base run has this model's head; else a copy with the base's HEAD_FIELDS (and no
  PEFT modules: a base is never a PEFT run), the model whose tree the base checkpoint holds."""
  saved = (saved_config(source, step) or {}).get('model') or {}
  changed = {k: saved[k] for k in HEAD_FIELDS if k in saved and saved[k] != getattr(config.model, k)}
  if not changed:
    return config
  return settings_lib.replace(config, model=dataclasses.replace(config.model, **changed),
                              peft=dataclasses.replace(config.peft, method='none', train_extra=''))


def _mesh_of(abstract_params: Any) -> Mesh:
  for leaf in jax.tree.leaves(abstract_params):
    sharding = getattr(leaf, 'sharding', None)
    if isinstance(sharding, NamedSharding):
      return sharding.mesh
  raise ValueError('abstract parameters without a NamedSharding')


def _params_in_layout(config: Any, like: nnx.State, scanned: bool) -> nnx.State:
  """The part of config's model parameters that `like` holds (e.g. a PEFT run's base, or its trainable part), as
  ShapeDtypeStructs of the `scanned` layout on like's mesh: the abstract target for restoring a checkpoint of
  that layout (checkpoint.restore_in_layout)."""
  _, params, _ = abstract_model(in_layout(config, scanned), _mesh_of(like))
  return nnx.split_state(params, layout_convert.block_filter(like), ...)[0]


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


# ---------------------------------------------------------------------------------------------------- 1. resume
def make_checkpointer(config: Any, setup: TrainSetup, workdir: str) -> ckpt_lib.Checkpointer:
  """The run's Checkpointer: it restores checkpoints of either model.scan_layers layout (converted), and for a
  PEFT run stores only the trainable parameters and completes them from the base (3.) on restore."""
  config = settings_lib.of(config)

  def abstract_in_layout(scanned: bool) -> dict:
    return make_setup(in_layout(config, scanned), setup.mesh, setup.tx, setup.schedule, setup.rules).abstract_state

  kwargs: dict[str, Any] = {'abstract_in_layout': abstract_in_layout}
  if peft_lib.is_active(config.peft):
    abstract = setup.abstract_state['params']
    kwargs['params_filter'] = peft_lib.trainable_filter(config.peft)
    kwargs['complete_params'] = lambda trained: nnx.merge_state(
        peft_lib.split(initial_params(config, abstract, setup.mesh, setup.rules), config.peft)[1], trained)
  return ckpt_lib.Checkpointer(workdir, keep=config.checkpoint.keep, async_save=config.checkpoint.async_save,
                               **kwargs)


def train_state(config: Any, setup: TrainSetup, checkpointer: ckpt_lib.Checkpointer) -> tuple[dict, Any, int, bool]:
  """(state, the data iterator's saved position or None, step, resumed): 1. when the workdir has a readable
  checkpoint, else 2-4."""
  restored = checkpointer.restore(setup.abstract_state)
  if restored is not None:
    state, data_state, step = restored
    return state, data_state, step, True
  return initial_state(config, setup), None, 0, False


# ------------------------------------------------------------------------------------------ evaluation, export
def _merge_rest(config: Any, graphdef: Any, params: nnx.State, abs_rest: Any, mesh: Mesh, rules: tuple) -> nnx.Module:
  replicated = NamedSharding(mesh, PartitionSpec())
  with shd.mesh_context(mesh, rules):
    rest = jax.jit(lambda: split_model(build_model(config))[2],
                   out_shardings=jax.tree.map(lambda _: replicated, abs_rest))()
  return nnx.merge(graphdef, params, rest)


def restore_model(workdir: str, config: Any, mesh: Mesh, rules: tuple | None = None,
                  step: int | None = None) -> tuple[nnx.Module, int]:
  """(model, step): the parameters of `step` (default: the newest readable one) sharded onto `mesh`, by rule 1 (a
  PEFT run's base re-read by rule 3). Only the params item is read; a checkpoint of the other layout converts.
  model.vocab_size 0 ("the tokenizer's") is read from the run's DIR/config.json."""
  config = settings_lib.of(config)
  rules = shd.rules_from_config(config) if rules is None else rules
  if not config.model.vocab_size:
    vocab = settings_lib.upgrade_saved(saved_config(workdir) or {}).model.vocab_size
    if not vocab:
      raise ckpt_lib.CheckpointError(f'model.vocab_size is 0 and {os.path.join(workdir, "config.json")} does not '
                                     'give it; pass the config the run was trained with.')
    config = settings_lib.replace(config, model=dataclasses.replace(config.model, vocab_size=int(vocab)))
  graphdef, target, abs_rest = abstract_model(config, mesh, rules)
  peft_run = peft_lib.is_active(config.peft)  # its checkpoints hold only the trained params; the base is re-read
  stored = peft_lib.trainable(target, config.peft) if peft_run else target
  params, s = ckpt_lib.restore_params(workdir, stored, step,
                                      lambda scanned: _params_in_layout(config, stored, scanned))
  if peft_run:
    params = nnx.merge_state(peft_lib.split(initial_params(config, target, mesh, rules), config.peft)[1], params)
  return _merge_rest(config, graphdef, params, abs_rest, mesh, rules), s


def init_from_model(config: Any, mesh: Mesh, rules: tuple | None = None) -> nnx.Module:
  """The model checkpoint.init_from names (rules 2-4), for evaluating a workdir that has no checkpoints yet."""
  config = settings_lib.of(config)
  rules = shd.rules_from_config(config) if rules is None else rules
  graphdef, abstract, abs_rest = abstract_model(config, mesh, rules)
  params = initial_params(config, abstract, mesh, rules)
  return _merge_rest(config, graphdef, params, abs_rest, mesh, rules)
