"""The Head interface: everything that depends on what a model outputs, in one object per `model.head`.

A head owns its output module (built as the model's `classifier`; None: the family's own per-token LM output),
the archs it supports, its model.* keys, the examples its data source reads (data.sources: 'text' = the arch's own
rows, 'labelled' = a label per example), its loss targets, its evaluation metrics and their row in metrics.jsonl /
eval.json, its FLOPs, and its Hugging Face class (hf/families.py asks `hf_class`). The rest of the code asks the
head object (heads.HEADS[model.head]) and never tests a head's name.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import jax
import numpy as np

from jaxformer.errors import ConfigError
from jaxformer.metrics import MetricAccumulator

if TYPE_CHECKING:
  from jaxformer.model.config import ModelConfig

ALL_ARCHS = ('encoder_only', 'decoder_only', 'encoder_decoder')


class Head:
  name: str = ''
  module: type | None = None  # nnx.Module class (cfg, rngs=) -> output [B, ...]; None: per-token LM logits
  archs: tuple[str, ...] = ALL_ARCHS
  fields: tuple[str, ...] = ()  # its model.* keys (besides model.head): a fine-tune may change them (init_from)
  examples: str = 'text'  # what the data source yields for it (data.sources.EXAMPLE_KINDS)
  objective: str = ''  # '' = cross-entropy against `targets`; else a pair objective in align.OBJECTIVES (reward)
  decodes: bool = False  # eval.py --mode=generate / translate apply
  confusion: bool = False  # evaluation accumulates a [C, C] confusion matrix
  observes: bool = False  # evaluation hands each batch's logits to `observe` (metrics decoded on the host)
  unit: str = 'target tokens'  # what weight_sum counts, for messages
  hf_class: str = ''  # the transformers class-name suffix of the exported model, e.g. 'ForSequenceClassification'

  def validate(self, model: Any) -> None:
    """The model section's keys of this head (config validation and hf import call it)."""
    if model.arch not in self.archs:
      raise ConfigError(f'model.head={self.name} is not supported for model.arch={model.arch}; use '
                        f'{" or ".join(self.archs)}.')

  def targets(self, batch: Mapping[str, jax.Array], unscored: int) -> tuple[jax.Array, int]:
    """(what the logits are scored against, the marker of an unscored entry); `unscored` is the tokenizer's."""
    raise NotImplementedError

  def length_tables(self, tokenizer: Any, arch: str) -> dict | None:
    """Bytes / characters per target id (bits per byte / character), or None when targets are not text."""
    return None

  def observe(self, acc: MetricAccumulator, batch: dict[str, np.ndarray], logits: np.ndarray, config: Any,
              read_examples: Callable[[Sequence[int]], list]) -> None:
    """(observes=True) Adds what one evaluated batch says beyond the loss sums to `acc` (entity counts, decoded
    answers): `batch` is the host batch, `logits` the model's output on it, `read_examples` reads the split's
    examples by index (what example_ids in the batch point at)."""
    raise NotImplementedError

  def eval_row(self, acc: MetricAccumulator) -> dict[str, float]:
    """The eval row of metrics.jsonl (keys start with eval_)."""
    raise NotImplementedError

  def results(self, acc: MetricAccumulator, arch: str) -> dict[str, Any]:
    """eval.py --mode=score's numbers."""
    raise NotImplementedError

  def output_flops(self, cfg: ModelConfig, rows: int, tokens: int) -> float:
    """Training FLOPs (forward + backward) of the output layer for `rows` rows of `tokens` tokens."""
    raise NotImplementedError
