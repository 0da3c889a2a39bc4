"""model.head=classification: one label per row. The hidden states are pooled by model.pooling (POOLINGS)
[+ BERT's pooler: dense + tanh (model.pooler)] -> dropout -> dense -> float32 logits [B, model.num_classes], scored by
cross-entropy against `labels` [B] (-1 on padding rows); accuracy and macro-F1 from the confusion matrix.

Pooling reads which tokens are real from the segment ids (0 = padding), so padding never changes a row's logits:
  first  the first real token (BERT's [CLS]; the default for encoder_only)
  mean   the mean of the real tokens
  last   the last real token (GPT-2 / Llama ForSequenceClassification; the default for decoder_only, whose causal
         mask lets only the last token see the whole row)

Classifier parameters carry logical axis names like every other parameter, so the mesh rules shard them; their
paths start with `classifier.` (what jaxformer.hf maps to BERT's `bert.pooler.dense` / `classifier`). The
classifier trains under every PEFT method (new and task-specific, as Hugging Face peft's modules_to_save).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer import logical
from jaxformer.errors import ConfigError, check_choice
from jaxformer.heads.base import Head
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


class PooledOutput(nnx.Module):
  """pool -> [pooler: dense + tanh] -> dropout -> dense [D, outputs] (+ bias) -> float32 [B, outputs]: the output
  module of the heads that read one vector per row (classification; reward, with one output)."""

  def __init__(self, cfg: ModelConfig, outputs: int, *, bias: bool, rngs: nnx.Rngs):
    pdt, self.dtype = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
    self.pool = POOLINGS[cfg.pooling]
    init = layers.normal(cfg.init_std)
    self.pooler = layers.param(rngs, init, (cfg.d_model, cfg.d_model), (None, 'embed'), pdt) if cfg.pooler else None
    self.pooler_bias = layers.param(rngs, layers.zeros, (cfg.d_model,), ('embed',), pdt) if cfg.pooler else None
    self.kernel = layers.param(rngs, init, (cfg.d_model, outputs), ('embed', None), pdt)
    self.bias = layers.param(rngs, layers.zeros, (outputs,), (None,), pdt) if bias else None
    self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs)

  def pooled_output(self, h: Array, segment_ids: Array, deterministic: bool) -> Array:
    """h [B,T,D], segment_ids [B,T] (0 = padding) -> [B, outputs] (float32)."""
    x = self.pool(h.astype(self.dtype), segment_ids != 0)
    if self.pooler is not None:
      x = jnp.tanh(layers.matmul(x, self.pooler[...].astype(self.dtype)) + self.pooler_bias[...].astype(self.dtype))
    x = self.dropout(x, deterministic=deterministic)
    out = layers.matmul(x, self.kernel[...].astype(self.dtype), out_dtype=jnp.float32)
    return out if self.bias is None else out + self.bias[...].astype(jnp.float32)


class ClassificationHead(PooledOutput):
  """PooledOutput with model.num_classes outputs and a bias -> float32 logits [B, num_classes]."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    super().__init__(cfg, cfg.num_classes, bias=True, rngs=rngs)

  def __call__(self, h: Array, segment_ids: Array, *, deterministic: bool = True) -> Array:
    """h [B,T,D], segment_ids [B,T] (0 = padding) -> logits [B, num_classes] (float32)."""
    return logical.constrain(self.pooled_output(h, segment_ids, deterministic), CLASS_LOGITS)


class Classification(Head):
  name = 'classification'
  module = ClassificationHead
  archs = tuple(DEFAULT_POOLING)
  fields = ('num_classes', 'pooling', 'pooler')
  examples = 'labelled'
  confusion = True
  unit = 'examples'
  hf_class = 'ForSequenceClassification'

  def validate(self, model: Any) -> None:
    super().validate(model)
    num_classes = model.num_classes
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
      raise ConfigError(f'model.head=classification needs model.num_classes >= 2 (the number of labels), but it is '
                        f'{num_classes!r}; set --config.model.num_classes.')

  def targets(self, batch, unscored):
    del unscored  # padding rows carry label -1
    return batch['labels'], -1

  def eval_row(self, acc):
    out = acc.classification_result()
    return {'eval_loss': out['loss'], 'eval_accuracy': out['accuracy'], 'eval_macro_f1': out['macro_f1'],
            'eval_examples': float(out['num_examples'])}

  def results(self, acc, arch):
    return acc.classification_result()

  def output_flops(self, cfg, rows, tokens):
    del tokens  # one pooled vector per row through (BERT's pooler and) the classifier
    d = cfg.d_model
    return float(rows * 6 * d * (cfg.num_classes + (d if cfg.pooler else 0)))


def validate_pooling(pooling: str) -> None:
  if pooling:
    check_choice('model.pooling', pooling, POOLINGS)
