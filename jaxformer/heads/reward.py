"""model.head=reward: one scalar per row, a reward model. The hidden states are pooled by model.pooling ('' = the
last real token for decoder_only, where the causal mask lets only it see the whole row, as transformers'
*ForSequenceClassification reads it; the first, [CLS], for encoder_only) [+ BERT's pooler: dense + tanh, and then
a bias, as BertForSequenceClassification] -> dense [D, 1] -> float32 rewards [B].

It trains on preference pairs (data.sources 'preference' examples: prompt + chosen / rejected responses, each row
framed as an instruction, BOS + prompt + response + EOS) with the Bradley-Terry loss (align.pairwise.BradleyTerry:
-log sigmoid(r_chosen - r_rejected [- margin]) + align.center_rewards * (r_chosen + r_rejected)^2), and reports
loss, accuracy (share of pairs with r_chosen > r_rejected) and margin (mean r_chosen - r_rejected). Start it from
any LM run or hf: directory with checkpoint.init_from: the LM output layer is replaced, as for classification.
Its parameters are `classifier.*` (they train under every PEFT method); jaxformer.hf writes them as transformers'
`score` (GPT-2, Llama, Qwen2; no bias) or BERT's pooler + `classifier` with num_labels=1, and reads such
*ForSequenceClassification checkpoints back as model.head=reward (hf/families.py's HEADS tables).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer import logical
from jaxformer.heads.base import Head
from jaxformer.heads.classification import DEFAULT_POOLING, POOLINGS
from jaxformer.model import layers

Array = jax.Array


class RewardHead(nnx.Module):
  """pool -> [pooler: dense + tanh] -> dense [D, 1] (+ a bias with the pooler) -> float32 rewards [B]."""

  def __init__(self, cfg: Any, *, rngs: nnx.Rngs):
    pdt, self.dtype = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
    self.pool = POOLINGS[cfg.pooling]
    init = layers.normal(cfg.init_std)
    self.pooler = layers.param(rngs, init, (cfg.d_model, cfg.d_model), (None, 'embed'), pdt) if cfg.pooler else None
    self.pooler_bias = layers.param(rngs, layers.zeros, (cfg.d_model,), ('embed',), pdt) if cfg.pooler else None
    self.kernel = layers.param(rngs, init, (cfg.d_model, 1), ('embed', None), pdt)
    self.bias = layers.param(rngs, layers.zeros, (1,), (None,), pdt) if cfg.pooler else None
    self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs)

  def __call__(self, h: Array, segment_ids: Array, *, deterministic: bool = True) -> Array:
    """h [B,T,D], segment_ids [B,T] (0 = padding) -> rewards [B] (float32)."""
    x = self.pool(h.astype(self.dtype), segment_ids != 0)
    if self.pooler is not None:
      x = jnp.tanh(layers.matmul(x, self.pooler[...].astype(self.dtype)) + self.pooler_bias[...].astype(self.dtype))
    x = self.dropout(x, deterministic=deterministic)
    reward = layers.matmul(x, self.kernel[...].astype(self.dtype), out_dtype=jnp.float32)[:, 0]
    if self.bias is not None:
      reward = reward + self.bias[...].astype(jnp.float32)[0]
    return logical.constrain(reward, ('batch',))


class Reward(Head):
  name = 'reward'
  module = RewardHead
  archs = tuple(DEFAULT_POOLING)
  fields = ('pooling', 'pooler')
  examples = 'preference'
  objective = 'bradley_terry'
  unit = 'pairs'
  hf_class = 'ForSequenceClassification'

  def targets(self, batch, unscored):
    raise NotImplementedError('model.head=reward scores pairs (align.pairwise.BradleyTerry), not targets')

  def output_flops(self, cfg, rows, tokens):
    del tokens  # one pooled vector per row through (BERT's pooler and) the output layer
    d = cfg.d_model
    return float(rows * 6 * d * (1 + (d if cfg.pooler else 0)))
