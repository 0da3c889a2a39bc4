"""Scanned layers (model.scan_layers): one block body, its parameters stacked along a leading 'layers' axis.

An unrolled stack puts every layer into the compiled program, so compile time grows with depth; a scanned stack
traces and compiles one layer and runs it `num_layers` times with jax.lax.scan (MaxText / t5x `scan_layers`).
The numerics are those of the unrolled stack given the same parameters (layout_convert.py moves parameters and
checkpoints between the two layouts).

Layout:
  parameters   every Block variable gets a leading axis of size num_layers; its logical axis names get a leading
               'layers' (config.mesh.logical_axis_rules maps it, unsharded by default).
  rng streams  stacked too (nnx.split_rngs at construction): each layer draws its own dropout masks.
  KV cache     {'k', 'v'} [B, L, S, K, H]: batch stays the leading axis of every cache leaf (decoding reorders
               beams along it), layers second. The whole cache is the scan's carry and each layer reads and writes
               its slice, so decoding never copies the cache per layer into a stacked output.
  windows      sliding-window layers (model.sliding_window) differ from global ones in their mask and, decoding, in
               their cache (a ring buffer of R slots), so: without a cache each layer's window is a scanned int32
               (<= 0 = global) that narrows the shared mask; decoding, the windowed layers' rings are stacked apart
               ('ring_k' / 'ring_v' [B, windowed layers, R, K, H]) and, when a stack mixes both kinds, each layer
               runs under lax.cond on its kind (one branch per kind, both traced once).

The block itself is reused unchanged: ScannedBlocks takes the factory that builds one Block. Inputs shared by all
layers (masks, rotary tables, encoder output, any per-stack bias) are passed through as keyword arguments.
Modules added to the blocks later (PEFT's LoRA factors and adapters) are built the same way, by `stack_modules`,
so each layer gets its own; `stacked_layers(model)` says which modules sit inside a scanned stack.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxformer import logical
from jaxformer.model import remat as remat_lib

Array = jax.Array
LAYERS = 'layers'  # the logical axis name of the stacked layer dimension
CACHE_LAYER_AXIS = 1  # cache leaves are [B, L, ...]


def stack_modules(make: Callable[[nnx.Rngs], nnx.Module], num_layers: int, rngs: nnx.Rngs) -> nnx.Module:
  """`num_layers` modules make(rngs), as one module whose variables are stacked along a leading 'layers' axis (each
  layer drawn from its own split of the rng streams; the logical axis names get a leading 'layers')."""
  @nnx.split_rngs(splits=num_layers)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: LAYERS})
  def build(rngs: nnx.Rngs) -> nnx.Module:
    return make(rngs)

  return build(rngs)


class ScannedBlocks(nnx.Module):
  """`num_layers` blocks as one module with stacked variables, applied with jax.lax.scan."""

  def __init__(self, make_block: Callable[[nnx.Rngs], nnx.Module], num_layers: int, *, rngs: nnx.Rngs):
    self.num_layers = num_layers
    self.layers = stack_modules(make_block, num_layers, rngs)

  def _split(self):
    return nnx.split(self.layers, nnx.Param, ...)

  def __call__(self, x: Array, *, cache: dict | None = None, cross_kv: tuple[Array, Array] | None = None,
               remat: str = 'none', windows: tuple[int, ...] | None = None, ring_mask: Array | None = None,
               prefix_kv: tuple[Array, Array] | None = None, return_intermediates: bool = False,
               **shared: Any) -> tuple[Array, dict | None] | tuple[Array, dict | None, dict]:
    """x [B,T,D] through every layer -> (x, the updated stacked cache or None).

    cache: {'k','v'} [B,L,S,K,H] (decoding); cross_kv: (k, v) [B,L,S,K,H], the cross-attention keys/values of
    every layer (decoding an encoder_decoder); shared: the Block's other keyword arguments, the same for each
    layer. remat: a model.remat name (ignored when decoding, as in the unrolled stack). windows: each layer's
    sliding window (0 = global; None = none anywhere), ring_mask: the windowed layers' decoding mask (Stack).
    prefix_kv: prefix tuning's keys/values [L,P,K,H] (each layer gets its slice).
    return_intermediates: a third element, each layer's Block intermediates plus its output 'hidden', stacked
    [L, ...] (the scan's per-layer outputs)."""
    graphdef, params, rest = self._split()

    def layer(x, layer_params, layer_rest, layer_cache, layer_cross, **per_layer):
      block = nnx.merge(graphdef, layer_params, layer_rest)
      out = block(x, cache=layer_cache, cross_kv=layer_cross, return_intermediates=return_intermediates,
                  **{**shared, **per_layer})
      x = logical.constrain(out[0], logical.HIDDEN)
      intermediates = {**out[2], 'hidden': x} if return_intermediates else None
      return x, out[1], nnx.state(block, nnx.Not(nnx.Param)), intermediates

    if cache is None:
      layer = remat_lib.checkpoint(layer, remat)
    windowed = windows is not None and any(windows)
    at = lambda tree, i: None if tree is None else jax.tree.map(lambda c: jax.lax.dynamic_index_in_dim(
        c, i, CACHE_LAYER_AXIS, keepdims=False), tree)
    put = lambda c, u, i: jax.lax.dynamic_update_index_in_dim(c, u.astype(c.dtype), i, CACHE_LAYER_AXIS)

    def windowed_step(x, stacked, layer_params, layer_rest, layer_cross, is_local, group):
      """Decoding a stack with windowed layers: the layer's own cache (ring or whole) at its place in its kind's
      stack (group), its mask and its static window; lax.cond between the kinds when both are present."""
      def run(local: bool, x, stacked):
        names = ('ring_k', 'ring_v') if local else ('k', 'v')
        layer_cache = {'k': at(stacked[names[0]], group), 'v': at(stacked[names[1]], group)}
        extra = {'mask': ring_mask, 'window': max(windows)} if local else {}
        x, layer_cache, new_rest, _ = layer(x, layer_params, layer_rest, layer_cache, layer_cross, **extra)
        stacked = {**stacked, names[0]: put(stacked[names[0]], layer_cache['k'], group),
                   names[1]: put(stacked[names[1]], layer_cache['v'], group)}
        return x, stacked, new_rest

      if 'k' not in stacked or 'ring_k' not in stacked:
        return run('ring_k' in stacked, x, stacked)
      return jax.lax.cond(is_local, lambda x, c: run(True, x, c), lambda x, c: run(False, x, c), x, stacked)

    def body(carry, xs):
      x, stacked = carry
      layer_params, layer_rest, i, *window_group = xs
      window, group = window_group if windowed else (None, None)
      if windowed and stacked is not None:
        x, stacked, layer_rest = windowed_step(x, stacked, layer_params, layer_rest, at(cross_kv, i), window > 0,
                                               group)
        return (x, stacked), (layer_rest, None)
      per_layer = {'window': window} if windowed else {}
      if prefix_kv is not None:  # (prefix tuning refuses sliding windows, so the windowed step never needs it)
        per_layer['prefix_kv'] = (prefix_kv[0][i], prefix_kv[1][i])
      x, layer_cache, layer_rest, intermediates = layer(x, layer_params, layer_rest, at(stacked, i), at(cross_kv, i),
                                                        **per_layer)
      if stacked is not None:
        stacked = jax.tree.map(lambda c, u: put(c, u, i), stacked, layer_cache)
      return (x, stacked), (layer_rest, intermediates)

    xs = (params, rest, jnp.arange(self.num_layers))
    if windowed:  # each layer's window, and its place among the layers of its kind: its slice of that kind's cache
      kinds = np.asarray(windows)
      groups = np.where(kinds > 0, np.cumsum(kinds > 0) - 1, np.cumsum(kinds <= 0) - 1)
      xs += (jnp.asarray(kinds, jnp.int32), jnp.asarray(groups, jnp.int32))
    (x, cache), (rest, intermediates) = jax.lax.scan(body, (x, cache), xs)
    if not shared.get('deterministic', True):  # only dropout draws from the rng streams (their counts advanced);
      nnx.update(self.layers, rest)  # decoding loops hold the module in an outer trace, where it must not change
    return (x, cache, intermediates) if return_intermediates else (x, cache)

  def stacked(self, per_layer: Callable[[nnx.Module], Any]) -> Any:
    """per_layer(block) for every layer, stacked along CACHE_LAYER_AXIS (e.g. cross-attention keys/values)."""
    graphdef, params, rest = self._split()
    return jax.vmap(lambda p, r: per_layer(nnx.merge(graphdef, p, r)), out_axes=CACHE_LAYER_AXIS)(params, rest)

  def unstacked(self) -> list[nnx.Module]:
    """Each layer's block as its own module holding copies of that layer's variables: for inspection and reference
    implementations (changing them does not change this module)."""
    graphdef, state = nnx.split(self.layers)
    return [nnx.merge(graphdef, jax.tree.map(lambda x, i=i: x[i], state)) for i in range(self.num_layers)]

  def empty_cache(self, shape: tuple[int, ...], dtype: Any, windows: tuple[int, ...] = (),
                  ring: int = 0) -> dict[str, Array]:
    """Zero self-attention keys/values for every layer: shape [B,S,K,H] -> {'k','v'} [B,L,S,K,H]; with windowed
    layers (windows > 0), theirs apart as ring buffers {'ring_k','ring_v'} [B,windowed,ring,K,H] and 'k' / 'v'
    holding the global layers only (absent when there are none)."""
    local = sum(1 for w in windows if w)
    out = {}
    if self.num_layers - local:
      stacked = (shape[0], self.num_layers - local) + tuple(shape[1:])
      out.update(k=jnp.zeros(stacked, dtype), v=jnp.zeros(stacked, dtype))
    if local:
      rings = (shape[0], local, ring) + tuple(shape[2:])
      out.update(ring_k=jnp.zeros(rings, dtype), ring_v=jnp.zeros(rings, dtype))
    return out


def stacked_layers(model: nnx.Module) -> Iterator[tuple[nnx.Module, int]]:
  """(module, num_layers) for every submodule of `model`: num_layers > 0 when its variables carry the stacked
  'layers' axis (it sits inside a ScannedBlocks), 0 otherwise. What a method adding modules to blocks asks (PEFT)."""
  inside: dict[int, int] = {}
  for _, module in nnx.iter_modules(model):
    if isinstance(module, ScannedBlocks):
      for _, sub in nnx.iter_modules(module.layers):
        inside[id(sub)] = module.num_layers
  for _, module in list(nnx.iter_modules(model)):
    yield module, inside.get(id(module), 0)
