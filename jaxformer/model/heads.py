"""What a model outputs from its final hidden states: `model.head` (HEADS) and, for classification, `model.pooling`
(POOLINGS).

  lm              per-token logits [B, T, vocab] (the families' own output: masked-LM transform for encoder_only,
                  the tied / untied output projection)
  classification  one vector per row, pooled from the hidden states by model.pooling, [+ BERT's pooler: dense + tanh
                  (model.pooler)] -> dropout -> dense -> float32 logits [B, model.num_classes]

Pooling reads which tokens are real from the segment ids (0 = padding), so padding never changes a row's logits:
  first  the first real token (BERT's [CLS]; the default for encoder_only)
  mean   the mean of the real tokens
  last   the last real token (GPT-2 / Llama ForSequenceClassification; the default for decoder_only, whose causal
         mask lets only the last token see the whole row)

Classifier parameters carry logical axis names like every other parameter, so the mesh rules shard them; their
paths start with `classifier.` (what peft.train_extra names, and what jaxformer.hf maps to BERT's
`bert.pooler.dense` / `classifier`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer import logical
from jaxformer.model import layers

if TYPE_CHECKING:
  from jaxformer.model.config import ModelConfig

Array = jax.Array
CLASS_LOGITS = ('batch', None)  # logical axes of classification logits [B, num_classes]


def _first(h: Array, real: Array) -> Array:
  index = jnp.argmax(real, axis=1)  # the first True (0 for a row with no real token)
  return jnp.take_along_axis(h, index[:, None, None], axis=1)[:, 0]


def _last(h: Array, real: Array) -> Array:
  t = real.shape[1]
  index = t - 1 - jnp.argmax(real[:, ::-1], axis=1)  # the last True
  index = jnp.where(real.any(axis=1), index, 0)
  return jnp.take_along_axis(h, index[:, None, None], axis=1)[:, 0]


def _mean(h: Array, real: Array) -> Array:
  w = real.astype(jnp.float32)[..., None]
  total = jnp.sum(h.astype(jnp.float32) * w, axis=1)
  return (total / jnp.maximum(jnp.sum(w, axis=1), 1.0)).astype(h.dtype)


# model.pooling: (hidden states [B,T,D], real-token mask [B,T]) -> [B,D]
POOLINGS: dict[str, Callable[[Array, Array], Array]] = {'first': _first, 'mean': _mean, 'last': _last}
# model.pooling='' picks this per arch
DEFAULT_POOLING = {'encoder_only': 'first', 'decoder_only': 'last'}
CLASSIFICATION_ARCHS = tuple(DEFAULT_POOLING)


class ClassificationHead(nnx.Module):
  """pool -> [pooler: dense + tanh] -> dropout -> dense [D, num_classes] (+ bias) -> float32 logits."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    pdt, self.dtype = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
    self.pool = POOLINGS[cfg.pooling]
    init = layers.normal(cfg.init_std)
    self.pooler = layers.param(rngs, init, (cfg.d_model, cfg.d_model), (None, 'embed'), pdt) if cfg.pooler else None
    self.pooler_bias = layers.param(rngs, layers.zeros, (cfg.d_model,), ('embed',), pdt) if cfg.pooler else None
    self.kernel = layers.param(rngs, init, (cfg.d_model, cfg.num_classes), ('embed', None), pdt)
    self.bias = layers.param(rngs, layers.zeros, (cfg.num_classes,), (None,), pdt)
    self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs)

  def __call__(self, h: Array, segment_ids: Array, *, deterministic: bool = True) -> Array:
    """h [B,T,D], segment_ids [B,T] (0 = padding) -> logits [B, num_classes] (float32)."""
    x = self.pool(h.astype(self.dtype), segment_ids != 0)
    if self.pooler is not None:
      x = jnp.tanh(layers.matmul(x, self.pooler[...].astype(self.dtype)) + self.pooler_bias[...].astype(self.dtype))
    x = self.dropout(x, deterministic=deterministic)
    logits = layers.matmul(x, self.kernel[...].astype(self.dtype), out_dtype=jnp.float32)
    logits = logits + self.bias[...].astype(jnp.float32)
    return logical.constrain(logits, CLASS_LOGITS)


# model.head: the module a model gets as `classifier` (None: the family's own per-token LM output)
HEADS: dict[str, type[nnx.Module] | None] = {'lm': None, 'classification': ClassificationHead}
