"""Logical axis names -> mesh axes: the one mapping shared by parameters (jaxformer.sharding places them) and
activations (the model constrains its hidden states and logits with `constrain`).

A bottom module (no project imports), so the model can constrain activations without importing the training
side of the code base.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
from flax.core import spmd as core_spmd
from jax.sharding import NamedSharding, PartitionSpec

Rules = Sequence[tuple[str, Any]]


def logical_to_spec(names: Sequence[str | None] | None, shape: Sequence[int], mesh: Any,
                    rules: Rules) -> PartitionSpec:
  """PartitionSpec for an array with logical axis `names` (mesh: a Mesh or AbstractMesh).

  Each mesh axis is used at most once (first dimension wins). If a dimension is not divisible by the product of
  its mesh axes, trailing axes are dropped until it is (possibly to none: replicated).
  """
  if not names:
    return PartitionSpec()
  if len(names) != len(shape):
    raise ValueError(f'logical axes {tuple(names)} do not match the array shape {tuple(shape)}.')
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for name, size in zip(names, shape):
    axes = table.get(name) if name is not None else None
    if axes is None:
      spec.append(None)
      continue
    # an axis the mesh lacks is ignored (sharding.make_mesh leaves out mesh.expert=1)
    axes = tuple(a for a in (axes if isinstance(axes, tuple) else (axes,)) if a not in used and a in mesh.shape)
    while axes and size % math.prod(mesh.shape[a] for a in axes):
      axes = axes[:-1]
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return PartitionSpec(*spec)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """x with a sharding constraint from its logical axis `names`, inside a mesh context (sharding.mesh_context:
  jax.set_mesh + nnx.logical_axis_rules); outside one (a plain unsharded call) x is returned unchanged.

  Why: parameters alone leave XLA to guess the layout of activations, and with fsdp > 1 its guess for the tied
  embedding's gradient is 'replicate everything' (the involuntary full rematerialisation warning)."""
  mesh = jax.sharding.get_abstract_mesh()
  rules = core_spmd.get_logical_axis_rules()
  if mesh.empty or not rules:
    return x
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(names, x.shape, mesh, rules)))


def context_axes(name: str = 'length') -> tuple[str, ...]:
  """The mesh axes (present, of size > 1) the current rules split logical axis `name` over in an activation
  [batch, name, ...]: its rule's axes less those 'batch' already takes (each mesh axis is used once per array, the
  first dimension winning, as logical_to_spec). () outside a mesh context. With the default rules: ('sequence',)
  when mesh.sequence > 1 (context parallelism), else ()."""
  mesh = jax.sharding.get_abstract_mesh()
  rules = core_spmd.get_logical_axis_rules()
  if mesh.empty or not rules:
    return ()
  table = dict(rules)
  as_tuple = lambda axes: () if axes is None else axes if isinstance(axes, tuple) else (axes,)  # noqa: E731
  taken = set(as_tuple(table.get('batch')))
  return tuple(a for a in as_tuple(table.get(name)) if a not in taken and mesh.shape.get(a, 1) > 1)


# The activations' logical axes (names the rules table maps).
HIDDEN = ('batch', 'length', 'embed')
LOGITS = ('batch', 'length', 'vocab')
