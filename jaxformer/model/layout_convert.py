"""Moves parameter (and any params-shaped) trees between the unrolled and the scanned stack layouts.

  unrolled  ...['blocks'][i][...]         one subtree per layer (nnx.List index i)
  scanned   ...['blocks']['layers'][...]  one subtree, every leaf with a leading axis of size num_layers

Only the 'blocks' subtrees change; everything else passes through. The same rule applies to the optimizer state
(Adam's mu / nu mirror the parameters) and to the rng streams, so a checkpoint written with one
model.scan_layers restores into the other: training/checkpoint.py restores it in its saved layout, then
`convert_tree` moves the whole train state (params, optimizer state, rng streams) into the layout of the model
being built. `to_flat_layout` does the same for {'a.blocks.0.b': array} dicts (jaxformer.hf's parameter names).
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxformer.model.scan import LAYERS

BLOCKS = 'blocks'
LAYOUT_KEYS = ('scan_layers',)  # model keys that change how parameters are laid out, not the model they describe


def _is_unrolled(blocks: Mapping) -> bool:
  return bool(blocks) and all(str(k).isdigit() for k in blocks)


def _is_scanned(blocks: Mapping) -> bool:
  return set(blocks) == {LAYERS}


def is_scanned(tree: Mapping) -> bool | None:
  """True / False for the layout of the first 'blocks' subtree found in `tree`, None when it has none."""
  for key, value in tree.items():
    if not isinstance(value, Mapping):
      continue
    if key == BLOCKS and (_is_scanned(value) or _is_unrolled(value)):
      return _is_scanned(value)
    found = is_scanned(value)
    if found is not None:
      return found
  return None


def to_layout(tree: Mapping, *, scanned: bool) -> dict:
  """A nested dict of arrays (e.g. nnx.to_pure_dict(state)) in the requested layout (unchanged if already so).

  Layer keys may be ints or digit strings (orbax restores dict keys as strings)."""
  out = {}
  for key, value in tree.items():
    if not isinstance(value, Mapping):
      out[key] = value
    elif key == BLOCKS and scanned and _is_unrolled(value):
      layers = [value[k] for k in sorted(value, key=int)]
      out[key] = {LAYERS: jax.tree.map(_stack, *[to_layout(x, scanned=True) for x in layers])}
    elif key == BLOCKS and not scanned and _is_scanned(value):
      stacked = value[LAYERS]
      n = len(jax.tree.leaves(stacked)[0])
      out[key] = {i: jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(n)}
    else:
      out[key] = to_layout(value, scanned=scanned)
  return out


def convert_state(state: nnx.State | Mapping, target: nnx.State) -> nnx.State:
  """`state` (either layout) as an nnx.State in the layout, variable types and metadata of `target` (the state,
  or the abstract state from nnx.eval_shape, of the model it is meant for)."""
  pure = nnx.to_pure_dict(state) if isinstance(state, nnx.State) else state
  target_pure = nnx.to_pure_dict(target)
  scanned = is_scanned(target_pure)
  if scanned is not None:
    pure = to_layout(pure, scanned=scanned)
  converted = jax.tree.map(lambda x: x, target)  # a copy whose values are replaced below
  nnx.replace_by_pure_dict(converted, _match_keys(pure, target_pure))
  return converted


def _match_keys(tree: Any, like: Any) -> Any:
  """`tree` with its dict keys typed as in `like` (int layer indices vs the digit strings orbax restores)."""
  if not isinstance(like, Mapping):
    return tree
  by_str = {str(k): k for k in like}
  return {by_str.get(str(k), k): _match_keys(v, like.get(by_str.get(str(k), k))) for k, v in tree.items()}


def _stack(*xs: Any) -> Any:
  """numpy arrays stay on the host (Hugging Face import), anything else is stacked by jax."""
  return np.stack(xs) if all(isinstance(x, np.ndarray) for x in xs) else jnp.stack(xs)


def to_flat_layout(flat: Mapping[str, Any], *, scanned: bool, sep: str = '.') -> dict[str, Any]:
  """{'decoder.blocks.0.attn.query': array, ...} <-> {'decoder.blocks.layers.attn.query': stacked array, ...}."""
  nested: dict = {}
  for name, value in flat.items():
    *parents, leaf = name.split(sep)
    node = nested
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  out: dict[str, Any] = {}

  def walk(node: Mapping, prefix: str) -> None:
    for key, value in node.items():
      name = f'{prefix}{key}'
      walk(value, name + sep) if isinstance(value, Mapping) else out.__setitem__(name, value)
  walk(to_layout(nested, scanned=scanned), '')
  return out


# ------------------------------------------------------------------------ any pytree (the whole train state)
def _part(key: Any) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _normalized(path: tuple) -> tuple[tuple[str, ...], str | None]:
  """(the path's parts with the layer slot after 'blocks' as '*', that slot: a layer index, LAYERS or None)."""
  parts = tuple(_part(k) for k in path)
  for j in range(len(parts) - 1):
    if parts[j] == BLOCKS and (parts[j + 1] == LAYERS or parts[j + 1].isdigit()):
      return parts[:j + 1] + ('*',) + parts[j + 2:], parts[j + 1]
  return parts, None


def tree_is_scanned(tree: Any) -> bool | None:
  """The layout of any pytree holding block leaves (a train state, an abstract one, an optimizer state): True /
  False, None when it has no block leaves."""
  for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
    slot = _normalized(path)[1]
    if slot is not None:
      return slot == LAYERS
  return None


def block_filter(like: nnx.State):
  """An nnx filter matching the variables whose layout-independent path occurs in `like` (any layout): picks, from
  a state of the other layout, the part `like` is (e.g. a PEFT run's trainable parameters)."""
  wanted = {_normalized(tuple(path))[0] for path, _ in nnx.to_flat_state(like)}
  return lambda path, _: _normalized(tuple(path))[0] in wanted


def convert_tree(source: Any, target: Any) -> Any:
  """`source` (any pytree in either layout: a train state, an optimizer state, rng streams) rebuilt with the tree
  structure of `target` (arrays or ShapeDtypeStructs of the same pytree in the wanted layout): leaves are matched by
  path, per-layer leaves stacked into scanned ones or scanned ones indexed per layer. jit-able, so the caller can
  place the result straight onto the target's shardings."""
  by_path: dict[tuple[str, ...], dict[str | None, Any]] = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(source)[0]:
    parts, slot = _normalized(path)
    by_path.setdefault(parts, {})[slot] = leaf
  leaves, treedef = jax.tree_util.tree_flatten_with_path(target)
  out = []
  for path, like in leaves:
    parts, slot = _normalized(path)
    have = by_path.get(parts)
    if have is None:
      raise KeyError(f'{".".join(parts)} is not in the tree being converted')
    if slot in have:
      value = have[slot]
    elif slot == LAYERS:
      n = like.shape[0]
      missing = [i for i in range(n) if str(i) not in have]
      if missing:
        raise KeyError(f'{".".join(parts)}: layer {missing[0]} of {n} is not in the tree being converted')
      value = jnp.stack([have[str(i)] for i in range(n)])
    elif LAYERS in have:
      value = have[LAYERS][int(slot)]
    else:
      raise KeyError(f'{".".join(parts)} (layer {slot}) is not in the tree being converted')
    if tuple(value.shape) != tuple(like.shape):
      raise ValueError(f'{".".join(parts)} has shape {tuple(value.shape)} there, {tuple(like.shape)} here')
    out.append(value)
  return jax.tree_util.tree_unflatten(treedef, out)
