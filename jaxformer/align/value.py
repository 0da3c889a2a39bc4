"""align.method=ppo's value head: V(state) per token = dense [D, 1] (+ bias) on the policy's final hidden states,
the value model of the original RLHF recipe sharing the policy's trunk (TRL's PPOTrainer keeps a separate value
model; sharing halves the memory and the forward passes, and its gradient reaches the trunk only through
align.value_coef x the value loss).

Its parameters are ValueParams, a PEFTParam kind: they always train, a checkpoint.init_from base never holds them
(they start fresh: zero output at step 0), and export drops them (peft.base_params), so the exported policy is a
plain language model.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.model import layers
from jaxformer.peft.params import PEFTParam, new_param

ATTRIBUTE = 'value_head'  # the model attribute it is attached as


class ValueParam(PEFTParam):
  """A value head's kernel or bias."""


class ValueHead(nnx.Module):
  def __init__(self, cfg: Any, *, rngs: nnx.Rngs):
    pdt = jnp.dtype(cfg.param_dtype)
    self.kernel = new_param(ValueParam, rngs, layers.zeros, (cfg.d_model, 1), ('embed', None), pdt)
    self.bias = new_param(ValueParam, rngs, layers.zeros, (1,), (None,), pdt)

  def __call__(self, h: jax.Array) -> jax.Array:
    """hidden states [B,T,D] -> values [B,T] float32."""
    v = layers.matmul(h, self.kernel[...].astype(h.dtype), out_dtype=jnp.float32)[..., 0]
    return v + self.bias[...].astype(jnp.float32)[0]


def attach(model: nnx.Module, rngs: nnx.Rngs) -> nnx.Module:
  setattr(model, ATTRIBUTE, ValueHead(model.config, rngs=rngs))
  return model


def values(model: nnx.Module, rows: dict[str, jax.Array], *, deterministic: bool = True) -> tuple[jax.Array, jax.Array]:
  """(logits [N,T,V], values [N,T]) of next-token rows."""
  logits, h = model(rows['tokens'], positions=rows['positions'], segment_ids=rows['segment_ids'],
                    deterministic=deterministic, return_hidden=True)
  return logits, getattr(model, ATTRIBUTE)(h)
