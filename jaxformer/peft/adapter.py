"""Bottleneck adapters (Houlsby et al. 2019): y + up(gelu(down(y))) on the output of each block's self-attention
and MLP, before the residual sum. `up` starts at zero, so step 0 is the base model exactly. The model calls them
through layers.adapter_update."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.errors import check_positive
from jaxformer.model import layers, scan, transformer
from jaxformer.peft.params import AdapterParam, new_param

Array = jax.Array


def validate(peft: Any, model: Any) -> None:
  check_positive('peft.adapter_dim', peft.adapter_dim)


class Adapter(nnx.Module):
  """d_model -> adapter_dim -> d_model with a residual connection."""

  def __init__(self, d_model: int, dim: int, *, std: float, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    self.dtype = jnp.dtype(dtype)
    self.down = new_param(AdapterParam, rngs, layers.normal(std), (d_model, dim), ('embed', None), param_dtype)
    self.down_bias = new_param(AdapterParam, rngs, layers.zeros, (dim,), (None,), param_dtype)
    self.up = new_param(AdapterParam, rngs, layers.zeros, (dim, d_model), (None, 'embed'), param_dtype)
    self.up_bias = new_param(AdapterParam, rngs, layers.zeros, (d_model,), ('embed',), param_dtype)

  def __call__(self, y: Array) -> Array:
    x = y.astype(self.dtype)
    h = jax.nn.gelu(layers.matmul(x, self.down[...].astype(self.dtype)) + self.down_bias[...].astype(self.dtype))
    out = layers.matmul(h, self.up[...].astype(self.dtype)) + self.up_bias[...].astype(self.dtype)
    return (x + out).astype(y.dtype)


def attach(model: nnx.Module, peft: Any, rngs: nnx.Rngs) -> None:
  """Two adapters per Block: on its self-attention and on its MLP (cross-attention keeps none, as in the paper)."""
  cfg = model.config
  make = lambda r: Adapter(cfg.d_model, int(peft.adapter_dim), std=cfg.init_std, dtype=cfg.dtype,  # noqa: E731
                           param_dtype=jnp.dtype(cfg.param_dtype), rngs=r)
  for module, num_layers in list(scan.stacked_layers(model)):
    if isinstance(module, transformer.Block):  # a scanned stack's one Block: one adapter per layer, stacked
      for sublayer in (module.attn, module.mlp):
        sublayer.adapter = scan.stack_modules(make, num_layers, rngs) if num_layers else make(rngs)
