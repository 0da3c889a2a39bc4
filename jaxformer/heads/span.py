"""model.head=span: extractive question answering (SQuAD). Hidden states [B,T,D] -> dense [D, 2] + bias -> float32
start and end logits, stacked as [B, 2, T]; the loss is the mean of the start and the end cross-entropy against
`labels` [B, 2] (the answer's first and last token; -1 on padding rows), as transformers'
*ForQuestionAnswering computes it.

Rows (data.rows.SpanTask) are Hugging Face run_qa's: question first, then the context, BERT-framed ([CLS] question
[SEP] context [SEP], token types 0 / 1); a context longer than the row is cut into windows that overlap by
data.doc_stride tokens, each its own row; a window that does not hold the whole (first) answer points both labels
at position 0 (the [CLS]).

Evaluation decodes, for every question, the best span over all its windows as run_qa's postprocess_qa_predictions
does: per window the decode.n_best_size highest start and end logits, pairs inside the context with
start <= end and at most decode.max_answer_len tokens, scored start + end logit; the best pair's character offsets
give the answer text ('' when no window has a valid pair). It reports SQuAD v1.1's exact match and F1 (percent;
the official normalisation: lowercase, no punctuation, no articles a / an / the, whitespace collapsed; the best
over the gold answers), besides the loss and the start / end token accuracy. `squad_scores` is the official
metric on strings.

The output layer's parameters are `classifier.*`; jaxformer.hf writes them as transformers' `qa_outputs`.
"""
from __future__ import annotations

import collections
import re
import string
from typing import Any, Callable, Sequence

import jax
import numpy as np

from jaxformer import logical
from jaxformer.heads.base import Head
from jaxformer.heads.token_classification import TokenClassifier
from jaxformer.metrics import MetricAccumulator

Array = jax.Array
SPAN_LOGITS = ('batch', None, 'length')  # logical axes of [B, 2 (start, end), T]


class SpanHead(TokenClassifier):
  """dense [D, 2] + bias (transformers' qa_outputs; no dropout) -> float32 [B, 2, T]: start and end logits."""

  def __init__(self, cfg: Any, *, rngs: Any):
    super().__init__(cfg, 2, dropout=False, rngs=rngs)

  def __call__(self, h: Array, segment_ids: Array, *, deterministic: bool = True) -> Array:
    del segment_ids
    return logical.constrain(self.token_scores(h, deterministic).transpose(0, 2, 1), SPAN_LOGITS)


# --------------------------------------------------------------------------------- SQuAD v1.1's metric


def normalize_answer(text: str) -> str:
  """The official SQuAD v1.1 normalisation: lowercase, punctuation removed, articles removed, whitespace collapsed."""
  text = ''.join(c for c in text.lower() if c not in _PUNCTUATION)
  text = re.sub(r'\b(a|an|the)\b', ' ', text)
  return ' '.join(text.split())


_PUNCTUATION = frozenset(string.punctuation)


def _f1(prediction: str, truth: str) -> float:
  pred, gold = normalize_answer(prediction).split(), normalize_answer(truth).split()
  common = collections.Counter(pred) & collections.Counter(gold)
  same = sum(common.values())
  if same == 0:
    return 0.0
  precision, recall = same / len(pred), same / len(gold)
  return 2 * precision * recall / (precision + recall)


def squad_example_scores(prediction: str, answers: Sequence[str]) -> tuple[float, float]:
  """(exact match, F1) of one prediction: the best over the gold answers (an unanswerable question's gold is '')."""
  answers = list(answers) or ['']
  return (max(float(normalize_answer(prediction) == normalize_answer(a)) for a in answers),
          max(_f1(prediction, a) for a in answers))


def squad_scores(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> dict[str, float]:
  """{'exact_match', 'f1'} in percent over the questions (the official evaluate-v1.1 script)."""
  scores = [squad_example_scores(p, a) for p, a in zip(predictions, answers)]
  n = max(len(scores), 1)
  return {'exact_match': 100.0 * sum(s[0] for s in scores) / n, 'f1': 100.0 * sum(s[1] for s in scores) / n}


# ----------------------------------------------------------------------------------------- decoding spans


def best_span(start_logits: np.ndarray, end_logits: np.ndarray, offsets: np.ndarray, n_best: int,
              max_answer_len: int) -> tuple[float, int, int] | None:
  """(score, first character, end character) of one window's best answer, or None: among the n_best highest start
  and end logits, the pairs of context tokens (offsets[t, 0] >= 0) with start <= end < start + max_answer_len,
  scored start + end logit (run_qa's postprocess_qa_predictions)."""
  starts = np.argsort(start_logits, kind='stable')[::-1][:n_best]
  ends = np.argsort(end_logits, kind='stable')[::-1][:n_best]
  best = None
  for s in starts:
    if offsets[s, 0] < 0:
      continue
    for e in ends:
      if offsets[e, 0] < 0 or e < s or e - s + 1 > max_answer_len:
        continue
      score = float(start_logits[s] + end_logits[e])
      if best is None or score > best[0]:
        best = (score, int(offsets[s, 0]), int(offsets[e, 1]))
  return best


class Span(Head):
  name = 'span'
  module = SpanHead
  archs = ('encoder_only',)
  examples = 'spans'
  observes = True
  unit = 'answer ends'
  hf_class = 'ForQuestionAnswering'

  def targets(self, batch, unscored):
    del unscored  # padding rows carry -1
    return batch['labels'], -1

  def observe(self, acc: MetricAccumulator, batch: dict[str, np.ndarray], logits: np.ndarray, config: Any,
              read_examples: Callable[[Sequence[int]], list]) -> None:
    """Keeps, per question (acc.records[example index]), the best span of its windows seen so far."""
    ids = np.asarray(batch['example_ids'])
    offsets = np.asarray(batch['offsets'])
    records = acc.records if acc.records is not None else {}
    acc.records = records
    wanted = sorted({int(i) for i in ids if i >= 0} - set(records))
    for i, example in zip(wanted, read_examples(wanted) if wanted else []):
      records[i] = {'score': -np.inf, 'prediction': '', 'context': example.context,
                    'answers': list(example.answer_texts), 'windows': 0}
    for row, i in enumerate(ids):
      if i < 0:
        continue
      record = records[int(i)]
      record['windows'] += 1
      best = best_span(logits[row, 0], logits[row, 1], offsets[row], int(config.decode.n_best_size),
                       int(config.decode.max_answer_len))
      if best is not None and best[0] > record['score']:
        record['score'], record['prediction'] = best[0], record['context'][best[1]:best[2]]

  def _scores(self, acc: MetricAccumulator) -> dict[str, Any]:
    records = acc.records or {}
    n = acc.weight_sum
    squad = squad_scores([r['prediction'] for r in records.values()], [r['answers'] for r in records.values()])
    return {'num_examples': len(records), 'num_windows': sum(r['windows'] for r in records.values()),
            'loss': acc.loss_sum / n if n > 0 else float('nan'),
            'position_accuracy': acc.correct_sum / n if n > 0 else float('nan'), **squad}

  def eval_row(self, acc):
    out = self._scores(acc)
    return {'eval_loss': out['loss'], 'eval_exact_match': out['exact_match'], 'eval_f1': out['f1'],
            'eval_position_accuracy': out['position_accuracy'], 'eval_examples': float(out['num_examples'])}

  def results(self, acc, arch):
    return self._scores(acc)

  def output_flops(self, cfg, rows, tokens):
    return float(rows * tokens * 6 * cfg.d_model * 2)
