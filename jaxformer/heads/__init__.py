"""Heads: what a model outputs and how it is scored, one object per `model.head` (heads/base.py says what a head
owns). Adding a head is one module here plus one line in HEADS; config validation, the model, the train and eval
steps, the data source, FLOPs and jaxformer.hf all ask the registry.

  lm              per-token logits over the vocabulary (lm.py)
  classification  one label per row from pooled hidden states (classification.py)
  reward          one scalar per row, trained on preference pairs (reward.py)
  token_classification  a label per token, entity-level F1 (token_classification.py)
  span            extractive QA: start / end logits, SQuAD exact match and F1 (span.py)
"""
from __future__ import annotations

from typing import Any

from jaxformer.errors import check_choice
from jaxformer.heads.base import Head
from jaxformer.heads.classification import DEFAULT_POOLING, POOLINGS, Classification, validate_pooling
from jaxformer.heads.lm import LM
from jaxformer.heads.reward import Reward
from jaxformer.heads.span import Span
from jaxformer.heads.token_classification import TokenClassification

HEADS: dict[str, Head] = {head.name: head for head in (LM(), Classification(), Reward(), TokenClassification(),
                                                       Span())}
# the model.* keys a fine-tune may change about its base run (checkpoint.init_from with another head)
HEAD_FIELDS: tuple[str, ...] = ('head',) + tuple(dict.fromkeys(f for h in HEADS.values() for f in h.fields))

__all__ = ['DEFAULT_POOLING', 'HEADS', 'HEAD_FIELDS', 'Head', 'POOLINGS', 'head_of', 'validate']


def head_of(model: Any) -> Head:
  """The Head of a model section (a ModelConfig or config.model)."""
  return HEADS[model.head]


def validate(model: Any) -> None:
  """model.head is a registered head, and the model section fits it."""
  check_choice('model.head', model.head, HEADS)
  validate_pooling(model.pooling)  # checked whatever the head, so a misspelt pooling never passes silently
  HEADS[model.head].validate(model)
