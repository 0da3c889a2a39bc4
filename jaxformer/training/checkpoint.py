"""Orbax checkpoints: params, optimizer state, step, rng streams, the data iterator's position and the config.

Layout (one orbax CheckpointManager under DIR/checkpoints, one folder per step):
  DIR/checkpoints/<step>/params/     the model parameters (nnx.Param state), sharded arrays (OCDBT)
  DIR/checkpoints/<step>/opt_state/  the optax state
  DIR/checkpoints/<step>/extra/      {'step', 'rngs'}: the step counter and the model's rng streams (key data + count)
  DIR/checkpoints/<step>/data/       JSON: every process's data-iterator state
  DIR/checkpoints/<step>/config/     JSON: the resolved config
Parameters live in their own item so evaluation restores them without touching the optimizer state.

Arrays are restored with the shardings of the *current* mesh (the abstract target carries them), so a checkpoint
saved with fsdp=2 restores onto data=8 or onto one device.

Layouts: a checkpoint written with the other model.scan_layers (per-layer 'blocks.<i>' subtrees vs one stacked
'blocks.layers' subtree) restores too: `restore_in_layout` restores it in the layout it was saved in (read from its
saved config, else its tree metadata) and converts params, optimizer state (Adam's mu / nu mirror the params) and
the per-layer rng streams into the layout being built, onto its shardings (layout_convert.convert_tree). Training
resumes, restore_params (eval.py, export) and checkpoint.init_from all go through it (training/state.py decides
what is read; this module only reads and writes).

Unreadable checkpoints: orbax writes each step into a temporary folder and renames it when complete, so a save cut
short is never listed. If the newest listed step still fails to restore (files lost or truncated afterwards),
training falls back to the newest step that does restore, moves the unreadable newer ones to
DIR/checkpoints_unreadable/ (never deleted; they would otherwise collide with the steps about to be re-saved) and
says so in one line. If no step restores, it stops with one line naming the folder and the error; nothing moves
(that is usually a changed model config, not corruption). Evaluation (restore_params) follows the same policy
(restore_newest) but only reads: it skips unreadable steps and moves nothing.

Integrity: when a save has finished, the sha256 of each of its files goes to DIR/checkpoint_checksums/<step>.json;
restore checks them first, so a corrupt checkpoint (flipped bytes orbax would read without complaint, a missing
file) counts as unreadable and is never loaded. Steps without a record (saved before checksums existed, or by a
run killed right after the save) are restored unchecked.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from jaxformer.data import state_for_host
from jaxformer.model import layout_convert
from jaxformer.training.saved_config import CHECKPOINT_DIR, checkpoint_dir, saved_config, saved_scan_layers
from jaxformer.errors import UserError

__all__ = ['CHECKPOINT_DIR', 'CheckpointError', 'Checkpointer', 'all_steps', 'checkpoint_dir', 'latest_step',
           'restore_in_layout', 'restore_params', 'saved_config', 'saved_layout']

UNREADABLE_DIR = 'checkpoints_unreadable'
CHECKSUM_DIR = 'checkpoint_checksums'  # <step>.json: sha256 of every file of DIR/checkpoints/<step>/


class CheckpointError(UserError, RuntimeError):
  """A checkpoint that cannot be used. The message names the folder and what to do."""


# --------------------------------------------------------------------------------------------- typed rng keys
def _is_key(x: Any) -> bool:
  return hasattr(x, 'dtype') and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def keys_to_data(tree: Any) -> Any:
  """Typed PRNG key arrays -> their uint32 key data (what orbax can store)."""
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _abstract_key_data(tree: Any) -> Any:
  def one(x):
    if _is_key(x):
      data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype))
      return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=getattr(x, 'sharding', None))
    return x
  return jax.tree.map(one, tree)


def data_to_keys(tree: Any, abstract: Any) -> Any:
  """Inverse of keys_to_data, guided by the abstract tree (which says which leaves were keys, and their impl)."""
  def one(x, a):
    if _is_key(a):
      return jax.random.wrap_key_data(x, impl=getattr(a.dtype, '_impl', None))
    return x
  return jax.tree.map(one, tree, abstract)


# ------------------------------------------------------------------------------------------------- checksums
def _checksum_path(workdir: str, step: int) -> str:
  return os.path.join(os.path.abspath(workdir), CHECKSUM_DIR, f'{int(step)}.json')


def _file_digests(step_dir: str) -> dict[str, str]:
  digests = {}
  for root, _, files in os.walk(step_dir):
    for name in files:
      path = os.path.join(root, name)
      with open(path, 'rb') as f:
        digests[os.path.relpath(path, step_dir)] = hashlib.file_digest(f, 'sha256').hexdigest()
  return dict(sorted(digests.items()))


def record_checksums(workdir: str, step: int) -> None:
  """Writes DIR/checkpoint_checksums/<step>.json for a finished save (process 0)."""
  if jax.process_index() != 0:
    return
  path = _checksum_path(workdir, step)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(_file_digests(os.path.join(checkpoint_dir(workdir), str(step))), f, indent=0)
  os.replace(tmp, path)


def verify_checksums(workdir: str, step: int) -> str | None:
  """None if the step's files match their recorded checksums (or none were recorded: a checkpoint from before
  checksums, or one whose run died right after the save), else what differs."""
  path = _checksum_path(workdir, step)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    expected = json.load(f)
  actual = _file_digests(os.path.join(checkpoint_dir(workdir), str(step)))
  for name, digest in expected.items():
    if actual.get(name) != digest:
      return f'checksum mismatch in {name}' if name in actual else f'{name} is missing'
  return None


# ------------------------------------------------------------------------------------------------ multi-host
def _gather_json(obj: Any) -> list[Any]:
  """Every process's JSON-able object, on every process (data-iterator states differ per host)."""
  if jax.process_count() == 1:
    return [obj]
  from jax.experimental import multihost_utils
  raw = np.frombuffer(json.dumps(obj).encode(), dtype=np.uint8)
  lengths = multihost_utils.process_allgather(np.array([raw.size], np.int32))
  padded = np.zeros((int(np.max(lengths)),), np.uint8)
  padded[:raw.size] = raw
  everyone = multihost_utils.process_allgather(padded)
  return [json.loads(bytes(everyone[i][:int(lengths[i][0])]).decode()) for i in range(jax.process_count())]


# --------------------------------------------------------------------------------------------------- manager
def _manager(workdir: str, *, keep: int | None = None, async_save: bool = False,
             read_only: bool = False) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, enable_async_checkpointing=async_save, create=not read_only, read_only=read_only)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                               item_names=('params', 'opt_state', 'extra', 'data', 'config'))


def all_steps(workdir: str) -> list[int]:
  """The complete checkpoint steps in workdir, oldest first."""
  if not os.path.isdir(checkpoint_dir(workdir)):
    return []
  manager = _manager(workdir, read_only=True)
  try:
    return sorted(manager.all_steps())
  finally:
    manager.close()


def latest_step(workdir: str) -> int | None:
  """The newest complete checkpoint step in workdir, or None."""
  steps = all_steps(workdir)
  return steps[-1] if steps else None


def restore_newest(manager: ocp.CheckpointManager, steps: list[int],
                   args: ocp.args.Composite | Callable[[int], Any],
                   workdir: str) -> tuple[Any, int, list[tuple[int, str]]]:
  """The fallback policy (training and evaluation): restore the newest of `steps` that restores.

  args: the restore arguments, or restore(step) -> the restored items (e.g. restore_in_layout for that step).
  Returns (restored items, step, the newer steps that failed); the caller reports and moves those. Raises one
  CheckpointError when none restores (usually a changed model config, not corruption: nothing is moved)."""
  restore = args if callable(args) else lambda s: manager.restore(s, args=args)
  failed: list[tuple[int, str]] = []
  for s in sorted(steps, reverse=True):
    corrupt = verify_checksums(workdir, s)
    if corrupt:
      logging.info('checkpoint step %d in %s is corrupt (%s)', s, checkpoint_dir(workdir), corrupt)
      failed.append((s, corrupt))
      continue
    try:
      return restore(s), s, failed
    except Exception as e:  # noqa: BLE001 - any failure means "this step is unusable", reported by the caller
      msg = f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'[:300]
      logging.info('checkpoint step %d in %s could not be restored (%s)', s, checkpoint_dir(workdir), msg)
      failed.append((s, msg))
  bad = ', '.join(str(f) for f, _ in failed)
  raise CheckpointError(
      f'no checkpoint in {checkpoint_dir(workdir)} could be restored (steps {bad}; newest: {failed[0][1]}); '
      'if the model config changed, use a new --workdir.')


# ---------------------------------------------------------------------------------------------------- layouts
def _tree_metadata_layout(workdir: str, step: int) -> bool | None:
  """The layout orbax's tree metadata of the step's params shows (for checkpoints saved without a model config)."""
  path = os.path.join(checkpoint_dir(workdir), str(step), 'params')
  if not os.path.isdir(path):
    return None
  absl_logger = logging.getLogger('absl')
  level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)  # orbax warns that the item has no _CHECKPOINT_METADATA of its own
  try:
    tree = ocp.StandardCheckpointer().metadata(path).item_metadata
    tree = getattr(tree, 'tree', tree)
  except Exception:  # noqa: BLE001 - unreadable metadata: the restore itself will report the step
    return None
  finally:
    absl_logger.setLevel(level)
  return layout_convert.is_scanned(tree) if isinstance(tree, dict) else None


def saved_layout(workdir: str, step: int) -> bool | None:
  """Whether checkpoint `step` of `workdir` holds scanned blocks (model.scan_layers=True): from the config saved
  with it, else from its tree metadata; None when neither tells."""
  saved = saved_config(workdir, step)
  if saved and 'model' in saved:
    return saved_scan_layers(workdir, step)
  return _tree_metadata_layout(workdir, step)


def convert_restored(restored: Any, target: Any) -> Any:
  """`restored` (a tree of the other layout) in the tree, layout and shardings of `target` (ShapeDtypeStructs
  carrying .sharding): one jitted stack / slice, so each array lands directly on its target sharding."""
  shardings = jax.tree.map(lambda a: a.sharding, target)
  return jax.jit(lambda tree: layout_convert.convert_tree(tree, target), out_shardings=shardings)(restored)


def restore_in_layout(restore: Callable[[Any], tuple[Any, Any]], target: Any, saved_scanned: bool | None,
                      abstract_in: Callable[[bool], Any] | None) -> tuple[Any, Any]:
  """The one rule for checkpoints written with the other model.scan_layers (training resumes, restore_model,
  checkpoint.init_from): restore(abstract) -> (tree like `abstract`, anything else) is called with `target` when
  the checkpoint has target's layout (or says nothing), else with abstract_in(saved_scanned), the same abstract
  tree built in the saved layout, whose result is then converted into target's layout and shardings."""
  wanted = layout_convert.tree_is_scanned(target)
  if abstract_in is None or saved_scanned is None or wanted is None or saved_scanned == wanted:
    return restore(target)
  tree, other = restore(abstract_in(saved_scanned))
  return convert_restored(tree, target), other


def report_fallback(workdir: str, failed: list[tuple[int, str]], used: int, moved_to: str | None) -> None:
  """One line saying which unreadable or corrupt steps were skipped (and where they went)."""
  if failed and jax.process_index() == 0:
    print(f'WARNING: checkpoint step(s) {[f for f, _ in failed]} in {checkpoint_dir(workdir)} are unreadable or '
          f'corrupt ({failed[0][1]}); using step {used}' + (f', moved them to {moved_to}.' if moved_to else '.'),
          flush=True)


def _restore_args(abstract_state: dict) -> dict:
  return {
      'params': ocp.args.StandardRestore(abstract_state['params']),
      'opt_state': ocp.args.StandardRestore(abstract_state['opt_state']),
      'extra': ocp.args.StandardRestore(_abstract_key_data(
          {'step': abstract_state['step'], 'rngs': abstract_state['rngs']})),
      'data': ocp.args.JsonRestore(),
      'config': ocp.args.JsonRestore(),
  }


class Checkpointer:
  """Saves and restores the train state of one workdir (a thin layer over orbax's CheckpointManager)."""

  def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True, params_filter: Any = None,
               complete_params: Callable[[Any], Any] | None = None,
               abstract_in_layout: Callable[[bool], dict] | None = None):
    """params_filter: an nnx filter of the parameters to store (a PEFT run: only what trains; None = all), and
    complete_params(restored) -> all the parameters (the run's base supplies the rest); abstract_in_layout(scanned)
    -> the run's abstract train state built with model.scan_layers=scanned, so a checkpoint of the other layout
    restores (None: only checkpoints of the run's own layout do). training/state.make_checkpointer gives all three."""
    self.workdir = workdir
    self.params_filter, self.complete_params = params_filter, complete_params
    self.abstract_in_layout = abstract_in_layout
    self.keep = keep
    self.async_save = async_save
    self.manager = _manager(workdir, keep=keep, async_save=async_save)
    self._unrecorded: list[int] = []  # steps saved by this run whose checksums are not written yet

  def save(self, step: int, state: dict, *, data_state: Any = None, config: Any = None) -> bool:
    """Starts saving (asynchronously when enabled; arrays are copied off the devices before this returns, so the
    caller may donate them right away). Collective: every process calls it."""
    self._record_finished()
    states = _gather_json(data_state)
    extra = keys_to_data({'step': state['step'], 'rngs': state['rngs']})
    args = ocp.args.Composite(
        params=ocp.args.StandardSave(self._stored(state['params'])),
        opt_state=ocp.args.StandardSave(state['opt_state']),
        extra=ocp.args.StandardSave(extra),
        data=ocp.args.JsonSave({'process_count': len(states), 'states': states}),
        config=ocp.args.JsonSave(config if config is not None else {}),
    )
    saved = self.manager.save(int(step), args=args, force=True)
    self._unrecorded.append(int(step))
    if not self.async_save:
      self._record_finished()
    return saved

  def _record_finished(self) -> None:
    """Waits for the pending save, then records the checksums of the steps this run saved and drops those of
    steps orbax has rotated out."""
    if not self._unrecorded:
      return
    self.manager.wait_until_finished()
    present = set(self.manager.all_steps())
    for s in self._unrecorded:
      if s in present:
        record_checksums(self.workdir, s)
    self._unrecorded = []
    folder = os.path.join(os.path.abspath(self.workdir), CHECKSUM_DIR)
    if jax.process_index() == 0 and os.path.isdir(folder):
      for name in os.listdir(folder):
        if name.endswith('.json') and name[:-5].isdigit() and int(name[:-5]) not in present:
          os.remove(os.path.join(folder, name))

  def close(self) -> None:
    self.manager.wait_until_finished()
    self._record_finished()
    self.manager.close()

  def restore(self, abstract_state: dict, *, step: int | None = None,
              move_unreadable: bool = True) -> tuple[dict, Any, int] | None:
    """(state, this process's data-iterator state or None, step) from `step` or the newest readable checkpoint;
    None when the workdir has no checkpoint. Arrays land with the shardings in `abstract_state`."""
    steps = sorted(self.manager.all_steps(), reverse=True)
    if step is not None:
      if step not in steps:
        raise CheckpointError(
            f'no checkpoint for step {step} in {checkpoint_dir(self.workdir)} (have: {sorted(steps)}).')
      steps = [step]
    if not steps:
      return None
    target = self._stored_state(abstract_state)
    in_layout = None if self.abstract_in_layout is None else (
        lambda scanned: self._stored_state(self.abstract_in_layout(scanned)))
    one = lambda s: restore_in_layout(  # noqa: E731
        lambda abstract: self._restore_step(s, abstract), target, saved_layout(self.workdir, s), in_layout)
    (state, data), s, failed = restore_newest(self.manager, steps, one, self.workdir)
    if self.complete_params is not None:
      state['params'] = self.complete_params(state['params'])
    states = (data or {}).get('states') or []
    data_state = state_for_host(states, jax.process_index(), jax.process_count())
    if data_state is None and states:
      logging.warning('checkpoint step %d was written by %d processes, this run has %d: the data iterator '
                      'restarts from its beginning.', s, len(states), jax.process_count())
    report_fallback(self.workdir, failed, s, self._unreadable_dir if move_unreadable else None)
    if failed and move_unreadable:
      self._move_aside([f for f, _ in failed])
    return state, data_state, s

  def _stored(self, params: Any) -> Any:
    return params if self.params_filter is None else nnx.split_state(params, self.params_filter, ...)[0]

  def _stored_state(self, abstract_state: dict) -> dict:
    """The train state's arrays a checkpoint holds: step, the stored params, optimizer state, rng streams."""
    return {'step': abstract_state['step'], 'params': self._stored(abstract_state['params']),
            'opt_state': abstract_state['opt_state'], 'rngs': abstract_state['rngs']}

  def _restore_step(self, step: int, abstract: dict) -> tuple[dict, Any]:
    """(the stored train state of `step`, restored onto `abstract`, its data item)."""
    restored = self.manager.restore(step, args=ocp.args.Composite(**_restore_args(abstract)))
    extra = restored['extra']
    state = {'step': extra['step'], 'params': restored['params'], 'opt_state': restored['opt_state'],
             'rngs': data_to_keys(extra['rngs'], abstract['rngs'])}
    return state, restored['data']

  @property
  def _unreadable_dir(self) -> str:
    return os.path.join(os.path.abspath(self.workdir), UNREADABLE_DIR)

  def _move_aside(self, steps: list[int]) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
    if jax.process_index() == 0:
      target = self._unreadable_dir
      os.makedirs(target, exist_ok=True)
      for s in steps:
        src = os.path.join(checkpoint_dir(self.workdir), str(s))
        if os.path.exists(src):
          shutil.move(src, os.path.join(target, str(s)))
        if os.path.exists(_checksum_path(self.workdir, s)):
          shutil.move(_checksum_path(self.workdir, s), os.path.join(target, f'{s}.checksums.json'))
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices('jaxformer_move_unreadable')
    self.manager = _manager(self.workdir, keep=self.keep, async_save=self.async_save)


def restore_params(workdir: str, stored: Any, step: int | None,
                   abstract_in_layout: Callable[[bool], Any] | None) -> tuple[Any, int]:
  """(params like `stored`, step): the params item of `step` (default: the newest readable one), onto stored's
  shardings; a checkpoint of the other model.scan_layers layout is restored through abstract_in_layout and
  converted. Reads only (evaluation and export): unreadable steps are skipped, nothing is moved."""
  if not os.path.isdir(checkpoint_dir(workdir)):
    raise CheckpointError(f'no checkpoints in {checkpoint_dir(workdir)}; train first (python train.py ...).')
  manager = _manager(workdir, read_only=True)

  def restore_step(s: int, abstract: Any) -> tuple[Any, None]:
    return manager.restore(s, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract)))['params'], None

  try:
    steps = manager.all_steps() if step is None else [step]
    if not steps:
      raise CheckpointError(f'no checkpoints in {checkpoint_dir(workdir)}; train first (python train.py ...).')
    (params, _), s, failed = restore_newest(
        manager, steps, lambda s: restore_in_layout(lambda abstract: restore_step(s, abstract), stored,
                                                    saved_layout(workdir, s), abstract_in_layout), workdir)
  finally:
    manager.close()
  report_fallback(workdir, failed, s, None)
  return params, int(s)
