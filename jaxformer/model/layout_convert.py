"""Moves parameter (and any params-shaped) trees between the unrolled and the scanned stack layouts.

  unrolled  ...['blocks'][i][...]         one subtree per layer (nnx.List index i)
  scanned   ...['blocks']['layers'][...]  one subtree, every leaf with a leading axis of size num_layers

Only the 'blocks' subtrees change; everything else passes through. The same rule applies to the optimizer state
(Adam's mu / nu mirror the parameters) and to the rng streams, so a checkpoint written with one
model.scan_layers restores into the other: restore it in its saved layout, then `convert_state` it into the
layout of the model being built (see tests/test_scan.py).
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.model.scan import LAYERS

BLOCKS = 'blocks'


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
      out[key] = {LAYERS: jax.tree.map(lambda *xs: jnp.stack(xs), *[to_layout(x, scanned=True) for x in layers])}
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
