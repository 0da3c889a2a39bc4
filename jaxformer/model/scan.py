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

The block itself is reused unchanged: ScannedBlocks takes the factory that builds one Block. Inputs shared by all
layers (masks, rotary tables, encoder output, any per-stack bias) are passed through as keyword arguments.
Modules added to the blocks later (PEFT's LoRA factors and adapters) are built the same way, by `stack_modules`,
so each layer gets its own; `stacked_layers(model)` says which modules sit inside a scanned stack.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
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
               remat: str = 'none', return_intermediates: bool = False,
               **shared: Any) -> tuple[Array, dict | None] | tuple[Array, dict | None, dict]:
    """x [B,T,D] through every layer -> (x, the updated stacked cache or None).

    cache: {'k','v'} [B,L,S,K,H] (decoding); cross_kv: (k, v) [B,L,S,K,H], the cross-attention keys/values of
    every layer (decoding an encoder_decoder); shared: the Block's other keyword arguments, the same for each
    layer. remat: a model.remat name (ignored when decoding, as in the unrolled stack). return_intermediates: a
    third element, each layer's Block intermediates plus its output 'hidden', stacked [L, ...] (the scan's
    per-layer outputs)."""
    graphdef, params, rest = self._split()

    def layer(x, layer_params, layer_rest, layer_cache, layer_cross):
      block = nnx.merge(graphdef, layer_params, layer_rest)
      out = block(x, cache=layer_cache, cross_kv=layer_cross, return_intermediates=return_intermediates, **shared)
      x = logical.constrain(out[0], logical.HIDDEN)
      intermediates = {**out[2], 'hidden': x} if return_intermediates else None
      return x, out[1], nnx.state(block, nnx.Not(nnx.Param)), intermediates

    if cache is None:
      layer = remat_lib.checkpoint(layer, remat)

    def body(carry, xs):
      x, stacked = carry
      layer_params, layer_rest, i = xs
      at = lambda tree: None if tree is None else jax.tree.map(lambda c: jax.lax.dynamic_index_in_dim(
          c, i, CACHE_LAYER_AXIS, keepdims=False), tree)
      x, layer_cache, layer_rest, intermediates = layer(x, layer_params, layer_rest, at(stacked), at(cross_kv))
      if stacked is not None:
        put = lambda c, u: jax.lax.dynamic_update_index_in_dim(c, u.astype(c.dtype), i, CACHE_LAYER_AXIS)
        stacked = jax.tree.map(put, stacked, layer_cache)
      return (x, stacked), (layer_rest, intermediates)

    (x, cache), (rest, intermediates) = jax.lax.scan(body, (x, cache), (params, rest, jnp.arange(self.num_layers)))
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

  def empty_cache(self, shape: tuple[int, ...], dtype: Any) -> dict[str, Array]:
    """Zero self-attention keys/values for every layer: shape [B,S,K,H] -> {'k','v'} [B,L,S,K,H]."""
    stacked = (shape[0], self.num_layers) + tuple(shape[1:])
    return {'k': jnp.zeros(stacked, dtype), 'v': jnp.zeros(stacked, dtype)}


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
