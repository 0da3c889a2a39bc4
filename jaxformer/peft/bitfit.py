"""BitFit (Ben Zaken et al. 2022): only the bias terms train (attention, MLP, norm and head biases)."""
from __future__ import annotations

from typing import Any


from jaxformer.errors import ConfigError


def trains(words: list[str]) -> bool:
  return any(word.endswith('bias') for word in words)


def validate(peft: Any, model: Any) -> None:
  if not model.use_bias:
    raise ConfigError('peft.method=bitfit trains the biases, but model.use_bias=False gives the model none; '
                      'use peft.method=lora or a model with biases.')
