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
from flax import nnx

from jaxformer import logical
from jaxformer.heads.base import Head
from jaxformer.heads.classification import DEFAULT_POOLING, PooledOutput

Array = jax.Array


class RewardHead(PooledOutput):
  """PooledOutput with one output, and a bias only with BERT's pooler (transformers' GPT-2 / Llama / Qwen2 `score`
  layers have none) -> float32 rewards [B]."""

  def __init__(self, cfg: Any, *, rngs: nnx.Rngs):
    super().__init__(cfg, 1, bias=cfg.pooler, rngs=rngs)

  def __call__(self, h: Array, segment_ids: Array, *, deterministic: bool = True) -> Array:
    """h [B,T,D], segment_ids [B,T] (0 = padding) -> rewards [B] (float32)."""
    return logical.constrain(self.pooled_output(h, segment_ids, deterministic)[:, 0], ('batch',))


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
