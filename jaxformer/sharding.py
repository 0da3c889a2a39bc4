"""Device mesh, logical-axis rules and the placement of parameters and batches.

One mesh with axes ('data', 'fsdp', 'sequence', 'expert', 'tensor') serves every layout: pure data parallel is data=N,
FSDP is fsdp=N, context parallelism (activations split along their length, attention gathering keys / values:
model/attention.py's context_parallel_attention) is sequence=N, tensor parallel is tensor=N, expert parallelism (a
mixture-of-experts model's stacked expert weights split over their 'expert' logical axis, model/moe.py) is
expert=N, and mixes are products of those. The 'sequence' and 'expert' axes are in the mesh only when their size is
> 1, so every other run keeps the three-axis mesh (and the compiled programs) it had; rules naming an axis the mesh
lacks ignore it. Parameters carry logical axis names (the model's
`nnx.with_partitioning` metadata, e.g. ('embed', 'vocab')) and `config.mesh.logical_axis_rules` maps each name to
mesh axes, so changing the layout is a config change, never a code change.

A dimension whose size is not divisible by the mesh axes it is mapped to (num_kv_heads=1 with tensor=2, a 65-token
vocabulary with tensor=2) is left replicated over those axes instead of failing: correctness first, and the memory
cost of a few replicated small tensors is negligible. `describe_unsharded` lists the dimensions this happened to.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
from typing import Any, Iterator, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxformer.errors import ConfigError
from jaxformer.data.layout import DataLayout
from jaxformer.logical import logical_to_spec  # defined there: the model constrains activations with it too

MESH_AXES = ('data', 'fsdp', 'sequence', 'expert', 'tensor')
OPTIONAL_AXES = ('sequence', 'expert')  # in the mesh only when their size is > 1
Rules = Sequence[tuple[str, Any]]


# ----------------------------------------------------------------------------------------------- multi-host
def _env_int(name: str, default: int = 1) -> int:
  try:
    return int(os.environ.get(name, default))
  except ValueError:
    return default


def distributed_env_present() -> bool:
  """True when the environment describes a multi-process job (explicit JAX settings, SLURM, Open MPI, TPU pod)."""
  env = os.environ
  return bool(
      env.get('JAX_COORDINATOR_ADDRESS')
      or _env_int('SLURM_NTASKS') > 1
      or _env_int('OMPI_COMM_WORLD_SIZE') > 1
      or len([h for h in env.get('TPU_WORKER_HOSTNAMES', '').split(',') if h]) > 1)


def maybe_initialize_distributed(config) -> bool:
  """Calls `jax.distributed.initialize` when mesh.distributed='on', or 'auto' and the environment asks for it.

  Must run before anything touches a device. Explicit settings come from JAX_COORDINATOR_ADDRESS,
  JAX_NUM_PROCESSES and JAX_PROCESS_ID; otherwise JAX's cluster auto-detection (SLURM, MPI, TPU) fills them in.
  Returns whether jax.distributed is (now) initialized.
  """
  mode = config.mesh.distributed
  if jax.distributed.is_initialized():
    return True
  if mode == 'off' or (mode == 'auto' and not distributed_env_present()):
    return False
  kwargs = {}
  if os.environ.get('JAX_COORDINATOR_ADDRESS'):
    kwargs['coordinator_address'] = os.environ['JAX_COORDINATOR_ADDRESS']
    if 'JAX_NUM_PROCESSES' in os.environ:
      kwargs['num_processes'] = int(os.environ['JAX_NUM_PROCESSES'])
    if 'JAX_PROCESS_ID' in os.environ:
      kwargs['process_id'] = int(os.environ['JAX_PROCESS_ID'])
  jax.distributed.initialize(**kwargs)
  logging.info('jax.distributed: process %d of %d, %d local / %d global devices', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


# ----------------------------------------------------------------------------------------------------- mesh
def mesh_shape(config, num_devices: int) -> tuple[int, ...]:
  """Resolves config.mesh.{data,fsdp,sequence,expert,tensor} (one of them may be -1 = the remaining devices), in
  MESH_AXES order."""
  sizes = [getattr(config.mesh, a) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ConfigError('only one of mesh.data, mesh.fsdp, mesh.sequence, mesh.expert, mesh.tensor may be -1 (the '
                      'remaining devices).')
  if -1 in sizes:
    i = sizes.index(-1)
    known = math.prod(s for s in sizes if s != -1)
    if num_devices % known:
      raise ConfigError(
          f'mesh.{MESH_AXES[i]}=-1 cannot fill {num_devices} devices: the other axes multiply to {known}, '
          f'which does not divide {num_devices}; set the mesh sizes explicitly.')
    sizes[i] = num_devices // known
  total = math.prod(sizes)
  if total > num_devices:
    raise ConfigError(
        f'mesh {" x ".join(f"{a}={n}" for a, n in zip(MESH_AXES, sizes))} = {total} devices, but only '
        f'{num_devices} are available; lower the mesh.* sizes.')
  return tuple(sizes)  # type: ignore[return-value]


def make_mesh(config, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The ('data', 'fsdp', ['sequence',] ['expert',] 'tensor') mesh ('sequence' / 'expert' only when their size
  is > 1). If it needs fewer devices than there are, the first N are used."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(config, len(devices))
  names = tuple(a for a, n in zip(MESH_AXES, sizes) if n > 1 or a not in OPTIONAL_AXES)
  shape = tuple(n for a, n in zip(MESH_AXES, sizes) if a in names)
  n = math.prod(shape)
  if n < len(devices):
    if jax.process_count() > 1:
      raise ConfigError(
          f'the mesh uses {n} of {len(devices)} devices; in a multi-process run it must use all of them '
          '(set one of mesh.data/fsdp/tensor to -1).')
    logging.warning('mesh %s uses the first %d of %d devices', shape, n, len(devices))
    devices = devices[:n]
  try:
    from jax.experimental import mesh_utils
    array = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  except Exception:  # noqa: BLE001 - topology-aware placement is an optimisation; any order is correct
    array = np.asarray(devices, dtype=object).reshape(shape)
  axis_type = getattr(jax.sharding, 'AxisType', None)
  if axis_type is not None:
    return Mesh(array, names, axis_types=(axis_type.Auto,) * len(names))
  return Mesh(array, names)


def rules_from_config(config) -> tuple[tuple[str, Any], ...]:
  """config.mesh.logical_axis_rules as a tuple of (logical name, mesh axis | tuple of axes | None)."""
  rules = []
  for entry in config.mesh.logical_axis_rules:
    name, axes = entry
    if isinstance(axes, list):
      axes = tuple(axes)
    for a in (axes if isinstance(axes, tuple) else (axes,)):
      if a is not None and a not in MESH_AXES:
        raise ConfigError(
            f'mesh.logical_axis_rules maps {name!r} to unknown mesh axis {a!r}; use {", ".join(MESH_AXES)} or None.')
    rules.append((name, axes))
  return tuple(rules)


@contextlib.contextmanager
def mesh_context(mesh: Mesh, rules: Rules) -> Iterator[None]:
  """Makes `mesh` and the logical rules current (for models that constrain activations by logical name)."""
  with contextlib.ExitStack() as stack:
    if hasattr(jax, 'set_mesh'):
      stack.enter_context(jax.set_mesh(mesh))
    else:  # older jax
      stack.enter_context(mesh)
    stack.enter_context(nnx.logical_axis_rules(tuple(rules)))
    yield


# ------------------------------------------------------------------------------------------ logical -> mesh
def logical_to_sharding(names: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh,
                        rules: Rules) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(names, shape, mesh, rules))


def _is_variable(x: Any) -> bool:
  return isinstance(x, nnx.Variable)


def variable_axes(v: nnx.Variable) -> tuple[str | None, ...] | None:
  """The logical axis names a model Variable was annotated with (nnx.with_partitioning), or None."""
  meta = v.get_metadata()
  names = meta.get('out_sharding') or meta.get('sharding_names') or meta.get('sharding')
  return tuple(names) if names else None


def state_shardings(state: Any, mesh: Mesh, rules: Rules) -> Any:
  """NamedShardings (same tree as `state`, Variables kept) from each Variable's logical-axis metadata.

  Variables without metadata and plain leaves are replicated.
  """
  replicated = NamedSharding(mesh, PartitionSpec())

  def one(x):
    if _is_variable(x):
      value = x.get_value()
      names = variable_axes(x)
      shape = getattr(value, 'shape', ())
      if names is not None and len(names) == len(shape):
        return x.replace(logical_to_sharding(names, shape, mesh, rules))
      return x.replace(replicated)
    return replicated

  return jax.tree.map(one, state, is_leaf=_is_variable)


def describe_unsharded(state: Any, mesh: Mesh, rules: Rules) -> list[str]:
  """'path: dim i (name=size) replicated' for each dimension that a rule maps but the mesh cannot divide."""
  notes = []
  table = dict(rules)
  flat = jax.tree_util.tree_flatten_with_path(state, is_leaf=_is_variable)[0]
  for path, v in flat:
    if not _is_variable(v):
      continue
    names = variable_axes(v)
    shape = getattr(v.get_value(), 'shape', ())
    if not names or len(names) != len(shape):
      continue
    spec = logical_to_spec(names, shape, mesh, rules)
    for i, (name, size) in enumerate(zip(names, shape)):
      wanted = table.get(name)
      wanted = tuple(a for a in (wanted if isinstance(wanted, tuple) else (wanted,))
                     if a and mesh.shape.get(a, 1) > 1)
      got = spec[i] if i < len(spec) else None
      got = got if isinstance(got, tuple) else (got,) if got else ()
      if wanted and set(wanted) - set(got):
        notes.append(f'{jax.tree_util.keystr(path)}: dim {i} ({name}={size}) not sharded over '
                     f'{"x".join(sorted(set(wanted) - set(got)))}')
  return notes


def opt_state_shardings(opt_state_shape: Any, params: Any, params_shardings: Any, mesh: Mesh) -> Any:
  """Shardings for an optax state: each leaf that mirrors a parameter (same path suffix and shape, as Adam's mu
  and nu do) gets that parameter's sharding; everything else (counts, Adafactor's factored rows/cols) is
  replicated."""
  replicated = NamedSharding(mesh, PartitionSpec())
  by_path = {}
  for (path, p), (_, s) in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                               jax.tree_util.tree_flatten_with_path(params_shardings)[0]):
    by_path[tuple(path)] = (tuple(p.shape), s)

  def one(path, leaf):
    path = tuple(path)
    shape = tuple(getattr(leaf, 'shape', ()))
    for start in range(len(path)):
      hit = by_path.get(path[start:])
      if hit is not None:
        return hit[1] if hit[0] == shape else replicated
    return replicated

  return jax.tree_util.tree_map_with_path(one, opt_state_shape)


# ---------------------------------------------------------------------------------------------------- batches
def batch_sharding(mesh: Mesh, rules: Rules, ndim: int = 2, length: int | None = None) -> NamedSharding:
  """Sharding of a [batch, length, ...] array: 'batch' rows over its mesh axes, the rest as 'length'/replicated.
  length: dimension 1's size, when known; one the 'length' axes (mesh.sequence) do not divide stays whole."""
  table = {name: _present(axes, mesh) for name, axes in rules}
  spec = [table.get('batch')]
  if ndim > 1:
    spec.append(table.get('length'))
  spec += [None] * (ndim - len(spec))
  # A mesh axis can appear once only: drop 'length' axes that 'batch' already uses.
  b = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
  if ndim > 1 and spec[1] is not None:
    l = tuple(a for a in (spec[1] if isinstance(spec[1], tuple) else (spec[1],)) if a not in b)
    if length is not None and length % math.prod(mesh.shape[a] for a in l):
      l = ()
    spec[1] = l[0] if len(l) == 1 else l or None
  return NamedSharding(mesh, PartitionSpec(*spec))


def stacked_batch_sharding(mesh: Mesh, rules: Rules, ndim: int = 3, length: int | None = None) -> NamedSharding:
  """Sharding of [steps, batch, length, ...] (train.steps_per_call batches stacked): the leading axis unsharded,
  the rest as batch_sharding."""
  return NamedSharding(mesh, PartitionSpec(None, *batch_sharding(mesh, rules, ndim - 1, length).spec))


def batch_shards(mesh: Mesh, rules: Rules) -> int:
  """How many ways the batch dimension is split (global batch sizes must be a multiple)."""
  axes = dict(rules).get('batch')
  axes = axes if isinstance(axes, tuple) else (axes,)
  return math.prod(mesh.shape.get(a, 1) for a in axes if a is not None)


def _present(axes: Any, mesh: Mesh) -> Any:
  """A rule's mesh axes less those this mesh lacks (mesh.expert=1 leaves 'expert' out of the mesh, mesh.sequence=1
  'sequence')."""
  if axes is None:
    return None
  kept = tuple(a for a in (axes if isinstance(axes, tuple) else (axes,)) if a in mesh.shape)
  return None if not kept else kept if isinstance(axes, tuple) else kept[0]


def round_to_shards(size: int, mesh: Mesh, rules: Rules) -> int:
  """The smallest multiple of the batch shards that holds `size` rows (at least one)."""
  shards = batch_shards(mesh, rules)
  return -(-max(1, int(size)) // shards) * shards


def map_batches(fn: Any, rows: Mapping[str, np.ndarray], batch_size: int, mesh: Mesh, rules: Rules, *,
                filler: Mapping[str, np.ndarray] | None = None) -> np.ndarray | None:
  """fn(sharded batch) -> per-row outputs, over `rows` ([N, ...] host arrays, one process) in batches of batch_size
  rows (rounded up to the batch shards), inside the mesh's context. The last batch is filled up with `filler` (one
  row per key; default zeros), so one compiled shape serves every batch. -> the real rows' outputs concatenated
  (numpy), None when there are no rows."""
  size = round_to_shards(batch_size, mesh, rules)
  n = len(next(iter(rows.values())))
  out = []
  with mesh_context(mesh, rules):
    for start in range(0, n, size):
      chunk = {k: v[start:start + size] for k, v in rows.items()}
      real = len(next(iter(chunk.values())))
      if real < size:
        chunk = {k: np.concatenate([v, np.repeat(filler[k][None] if filler else np.zeros((1,) + v.shape[1:], v.dtype),
                                                 size - real, axis=0)]) for k, v in chunk.items()}
      out.append(np.asarray(jax.device_get(fn(shard_batch(chunk, mesh, rules))))[:real])
  return np.concatenate(out) if out else None


def data_layout(mesh: Mesh, rules: Rules, global_batch: int) -> DataLayout:
  """Which rows of each global batch this process feeds: shard shard_index of num_shards equal slices.

  Normally (process_index, process_count); processes that share batch rows (e.g. tensor parallel across hosts)
  get the same shard index, so each loads exactly the rows its devices hold.
  """
  if jax.process_count() == 1:
    return DataLayout(global_batch, 0, 1)
  sharding = batch_sharding(mesh, rules, 1)
  rows = set()
  for idx in sharding.addressable_devices_indices_map((global_batch,)).values():
    sl = idx[0]
    start, stop = sl.start or 0, global_batch if sl.stop is None else sl.stop
    rows.update(range(start, stop))
  lo, hi = min(rows), max(rows) + 1
  if hi - lo != len(rows) or global_batch % (hi - lo):
    raise ConfigError('this process holds non-contiguous batch rows; put mesh.data/fsdp outermost (the default rules '
                      'do) so each host owns one contiguous slice of the batch.')
  return DataLayout(global_batch, lo // (hi - lo), global_batch // (hi - lo))


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh, rules: Rules, layout: DataLayout | None = None, *,
                stacked: bool = False) -> dict[str, jax.Array]:
  """Per-host numpy batch -> global jax Arrays sharded along 'batch' (each host passes only its own rows, the
  slice `layout` names; None: a single host holding the whole batch).
  stacked: the arrays are [steps, batch, ...] (several batches on a leading, unsharded axis)."""
  out = {}
  count = layout.num_shards if layout is not None else 1
  for key, value in batch.items():
    value = np.asarray(value)
    if stacked:
      sharding = stacked_batch_sharding(mesh, rules, value.ndim, value.shape[2] if value.ndim > 2 else None)
      global_shape = (value.shape[0], value.shape[1] * count) + value.shape[2:]
    else:
      sharding = batch_sharding(mesh, rules, value.ndim, value.shape[1] if value.ndim > 1 else None)
      global_shape = (value.shape[0] * count,) + value.shape[1:]
    out[key] = jax.make_array_from_process_local_data(sharding, value, global_shape)
  return out
