"""The variable types PEFT methods create (one type each, so an nnx type filter selects them), and path helpers."""
from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from jaxformer.model import layers


class PEFTParam(nnx.Param):
  """A parameter added by a PEFT method (trains; never part of the base model)."""


class LoRAParam(PEFTParam):
  """A LoRA factor (A [*in, rank] or B [rank, *out])."""


class AdapterParam(PEFTParam):
  """A bottleneck adapter's weight or bias."""


class PromptParam(PEFTParam):
  """Soft prompt embeddings [num_prompt_tokens, d_model]."""


class PrefixParam(PEFTParam):
  """Prefix tuning's key/value prefixes [layers, 2, P, kv_heads, head_dim], or its reparameterisation MLP."""


def new_param(kind: type[PEFTParam], rngs: nnx.Rngs, init: layers.Initializer, shape: tuple[int, ...],
              names: tuple[str | None, ...], dtype: Any) -> PEFTParam:
  """Like layers.param: the logical axis names ride along, so the mesh rules shard PEFT parameters too."""
  assert len(shape) == len(names), (shape, names)
  return kind(init(rngs.params(), shape, dtype), out_sharding=names, eager_sharding=False)


def path_words(path: tuple) -> list[str]:
  """Lower-cased parts of a state path (strings, or jax key entries)."""
  words = []
  for part in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(part, attr):
        part = getattr(part, attr)
        break
    words.append(str(part).lower())
  return words


def sharding_names(variable: nnx.Variable) -> tuple[str | None, ...]:
  names = variable.get_metadata().get('out_sharding')
  return tuple(names) if names else (None,) * jax.numpy.ndim(variable.get_value())
