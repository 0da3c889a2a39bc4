"""Evaluation metrics: token-weighted loss / perplexity / accuracy sums, and BLEU through sacrebleu.

Perplexity is exp(total NLL / total target tokens) over the whole split. Averaging per-batch perplexities
or per-batch mean losses is wrong whenever batches hold different numbers of tokens (the last batch, packed
rows), so everything here carries *sums* (`loss_sum`, `weight_sum`, `correct_sum`) and divides once at the end.
The sums are accumulated on the host in float64, so adding many float32 batch sums loses nothing visible.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

SUM_KEYS = ('loss_sum', 'weight_sum', 'correct_sum')


def token_metrics(logits: jax.Array, targets: jax.Array, weights: jax.Array | None = None) -> dict[str, jax.Array]:
  """Token-weighted sums of NLL, weight and correct argmax predictions. weights None -> (targets != 0).

  This is the plain reference (no label smoothing, no z-loss); training's compute_loss returns the same keys.
  For decoder_only the targets are the next tokens, for encoder_decoder the target tokens, for encoder_only
  the original tokens at the masked positions (0 elsewhere), so in every case padding carries no weight.
  """
  if weights is None:
    weights = (targets != 0)
  weights = weights.astype(jnp.float32)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return {
      'loss_sum': jnp.sum(nll * weights),
      'weight_sum': jnp.sum(weights),
      'correct_sum': jnp.sum(correct * weights),
  }


def perplexity(loss_sum: float, weight_sum: float) -> float:
  """exp(token-weighted mean NLL); inf when that overflows. Raises on zero tokens (nothing was scored)."""
  if weight_sum <= 0:
    raise ValueError('perplexity of zero target tokens is undefined; the split produced no non-padding targets.')
  mean = float(loss_sum) / float(weight_sum)
  return math.exp(mean) if mean < 700 else math.inf


@dataclasses.dataclass
class MetricAccumulator:
  """Sums loss_sum / weight_sum / correct_sum over batches in float64 on the host; divides once in `result`.

  `add` takes the metrics dict of one batch (jax or numpy scalars). When each host computed sums over its own
  rows only (not over a global jit), call `merge_hosts()` once at the end; a jit over the global mesh already
  returns global sums, and merging those again would count every token process_count times.
  """
  loss_sum: float = 0.0
  weight_sum: float = 0.0
  correct_sum: float = 0.0
  num_batches: int = 0

  def add(self, metrics: Mapping[str, Any]) -> None:
    values = jax.device_get({k: metrics[k] for k in SUM_KEYS if k in metrics})
    for key, value in values.items():
      setattr(self, key, getattr(self, key) + float(np.asarray(value, dtype=np.float64)))
    self.num_batches += 1

  def merge(self, other: MetricAccumulator) -> MetricAccumulator:
    return MetricAccumulator(*(getattr(self, k) + getattr(other, k) for k in SUM_KEYS),
                             num_batches=self.num_batches + other.num_batches)

  def merge_hosts(self) -> MetricAccumulator:
    """Sums the per-host accumulators of all processes (a no-op on one host)."""
    if jax.process_count() == 1:
      return self
    from jax.experimental import multihost_utils
    local = np.array([getattr(self, k) for k in SUM_KEYS] + [self.num_batches], dtype=np.float64)
    gathered = np.asarray(multihost_utils.process_allgather(local))  # [processes, 4]
    total = gathered.reshape(-1, local.size).sum(axis=0)
    return MetricAccumulator(*map(float, total[:3]), num_batches=int(total[3]))

  def result(self, with_accuracy: bool = False) -> dict[str, float]:
    """loss (mean NLL per target token), perplexity, num_tokens, and accuracy when asked (encoder_only)."""
    out = {
        'num_tokens': int(round(self.weight_sum)),
        'loss': self.loss_sum / self.weight_sum if self.weight_sum > 0 else math.nan,
        'perplexity': perplexity(self.loss_sum, self.weight_sum),
    }
    if with_accuracy:
      out['accuracy'] = self.correct_sum / self.weight_sum
    return out


def bleu(hypotheses: Sequence[str], references: Sequence[str], *, src_lang: str = '', tgt_lang: str = '',
         **bleu_kwargs: Any) -> dict[str, Any]:
  """Corpus BLEU of detokenized text with sacrebleu's defaults (13a tokenization, exp smoothing).

  Returns {'bleu': score, 'sacrebleu_signature': ..., 'direction': 'src->tgt'} so the number can be quoted
  the way papers do. Inputs must be detokenized text (what tokenizer.decode returns), one line per sentence.
  """
  from sacrebleu.metrics import BLEU  # corpus_bleu() is a thin wrapper over this; it also gives the signature
  if len(hypotheses) != len(references):
    raise ValueError(f'BLEU needs one hypothesis per reference; got {len(hypotheses)} hypotheses and '
                     f'{len(references)} references.')
  metric = BLEU(**bleu_kwargs)
  score = metric.corpus_score(list(hypotheses), [list(references)])
  return {
      'bleu': float(score.score),
      'sacrebleu_signature': str(metric.get_signature()),
      'direction': f'{src_lang}->{tgt_lang}' if src_lang or tgt_lang else '',
  }
