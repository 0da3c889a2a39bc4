"""model.head=token_classification: a label per token (NER, POS tagging). Hidden states [B,T,D] -> dropout ->
dense [D, model.num_classes] + bias -> float32 logits [B, T, num_classes], scored by cross-entropy against `labels`
[B, T]: the tag of each word on its first sub-token, -1 (unscored) on its other sub-tokens, the framing ids and
padding, exactly as Hugging Face's run_ner aligns labels (label_all_tokens=False). data.rows.TaggedTask builds the
rows from jsonl lines {"tokens": [...words], "tags": [...]} (data.words_key / data.tags_key; tags as ids or
data.label_names, which this head requires: the tag strings are what the entity metrics read).

Evaluation reads the word-level predictions (the argmax at each word's first sub-token) and reports the word
accuracy and entity-level precision / recall / F1 exactly as seqeval's default mode computes them (its
`get_entities`, micro-averaged; IOB2 / BIO / IOBES tags): an entity is a (type, first word, last word) chunk, and a
predicted entity counts only when the gold one has the same type and boundaries. Plain labels (no B- / I- prefix)
are read as seqeval reads them: the tag's first character is the chunk tag, the rest the type, so each label is
its own entity type and consecutive equal labels one entity. Per-type precision / recall / F1 / support are in
eval.py --mode=score's results. Evaluation decodes on the host of a single-process run (multi-host: each host
counts its own rows' entities).

The output layer's parameters are `classifier.*`; jaxformer.hf writes them as BERT's `classifier` and GPT-2's
`classifier` / Llama's `score` (transformers' *ForTokenClassification).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxformer import logical
from jaxformer.errors import ConfigError
from jaxformer.heads.base import Head
from jaxformer.metrics import MetricAccumulator
from jaxformer.model import layers

if TYPE_CHECKING:
  from jaxformer.model.config import ModelConfig

Array = jax.Array
TOKEN_LOGITS = ('batch', 'length', None)  # logical axes of per-token label logits [B, T, num_labels]


class TokenClassifier(nnx.Module):
  """dropout -> dense [D, outputs] + bias -> float32 [B, T, outputs]: a label score per token (transformers'
  *ForTokenClassification: dropout + classifier; *ForQuestionAnswering's qa_outputs with 2 outputs)."""

  def __init__(self, cfg: ModelConfig, outputs: int, *, dropout: bool, rngs: nnx.Rngs):
    pdt, self.dtype = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
    self.kernel = layers.param(rngs, layers.normal(cfg.init_std), (cfg.d_model, outputs), ('embed', None), pdt)
    self.bias = layers.param(rngs, layers.zeros, (outputs,), (None,), pdt)
    self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs) if dropout else None

  def token_scores(self, h: Array, deterministic: bool) -> Array:
    x = h.astype(self.dtype)
    if self.dropout is not None:
      x = self.dropout(x, deterministic=deterministic)
    out = layers.matmul(x, self.kernel[...].astype(self.dtype), out_dtype=jnp.float32)
    return out + self.bias[...].astype(jnp.float32)


class TokenClassificationHead(TokenClassifier):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    super().__init__(cfg, cfg.num_classes, dropout=True, rngs=rngs)

  def __call__(self, h: Array, segment_ids: Array, *, deterministic: bool = True) -> Array:
    """h [B,T,D] -> logits [B, T, num_classes] (float32); padding positions are scored but never counted."""
    del segment_ids
    return logical.constrain(self.token_scores(h, deterministic), TOKEN_LOGITS)


# ------------------------------------------------------------------------------------- seqeval's entities


def _end_of_chunk(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
  return ((prev_tag in ('E', 'S')) or (prev_tag in ('B', 'I') and tag in ('B', 'S', 'O'))
          or (prev_tag not in ('O', '.') and prev_type != type_))


def _start_of_chunk(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
  return ((tag in ('B', 'S')) or (prev_tag in ('E', 'S', 'O') and tag in ('E', 'I'))
          or (tag != 'O' and tag != '.' and prev_type != type_))


def get_entities(tags: Sequence[str]) -> list[tuple[str, int, int]]:
  """(type, first, last) chunks of one sentence's tags, as seqeval.metrics.sequence_labeling.get_entities (its
  default, prefix mode): the tag is the first character, the type what follows its first '-' ('_' if none)."""
  chunks = []
  prev_tag, prev_type, begin = 'O', '', 0
  for i, chunk in enumerate(list(tags) + ['O']):
    tag = chunk[0]
    type_ = chunk[1:].split('-', maxsplit=1)[-1] or '_'
    if _end_of_chunk(prev_tag, tag, prev_type, type_):
      chunks.append((prev_type, begin, i - 1))
    if _start_of_chunk(prev_tag, tag, prev_type, type_):
      begin = i
    prev_tag, prev_type = tag, type_
  return chunks


def entity_counts(gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]]) -> dict[str, float]:
  """Per-type sums over sentences: `true:<type>` gold entities, `pred:<type>` predicted, `tp:<type>` both."""
  out: dict[str, float] = {}
  for g, p in zip(gold, predicted):
    gold_set, pred_set = set(get_entities(g)), set(get_entities(p))
    for prefix, entities in (('true', gold_set), ('pred', pred_set), ('tp', gold_set & pred_set)):
      for type_, _, _ in entities:
        key = f'{ENTITY_SUM}{prefix}:{type_}'
        out[key] = out.get(key, 0.0) + 1.0
  return out


ENTITY_SUM = 'entity_'  # MetricAccumulator.extra keys: entity_true:<type>, entity_pred:<type>, entity_tp:<type>


def _divide(a: float, b: float) -> float:
  return a / b if b > 0 else 0.0  # seqeval's zero_division default: 0 (with a warning)


def entity_scores(sums: dict[str, float]) -> dict[str, Any]:
  """precision, recall, f1 (micro over types, seqeval's default average) and per type precision/<type>,
  recall/<type>, f1/<type>, support/<type> (seqeval's classification_report) from entity_counts' sums."""
  types = sorted({k.split(':', 1)[1] for k in sums if k.startswith(ENTITY_SUM)})
  get = lambda kind, t: sums.get(f'{ENTITY_SUM}{kind}:{t}', 0.0)  # noqa: E731

  def prf(tp: float, pred: float, true: float) -> dict[str, float]:
    p, r = _divide(tp, pred), _divide(tp, true)
    return {'precision': p, 'recall': r, 'f1': _divide(2 * p * r, p + r)}

  out: dict[str, Any] = prf(*(sum(get(kind, t) for t in types) for kind in ('tp', 'pred', 'true')))
  for t in types:
    out.update({f'{k}/{t}': v for k, v in prf(get('tp', t), get('pred', t), get('true', t)).items()})
    out[f'support/{t}'] = int(get('true', t))
  return out


def word_sequences(labels: np.ndarray, predictions: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
  """Per row, (gold, predicted) label ids of its words: the positions whose label is not -1 (first sub-tokens)."""
  out = []
  for row_labels, row_predictions in zip(labels, predictions):
    scored = row_labels >= 0
    if scored.any():
      out.append((row_labels[scored], row_predictions[scored]))
  return out


class TokenClassification(Head):
  name = 'token_classification'
  module = TokenClassificationHead
  archs = ('encoder_only', 'decoder_only')
  fields = ('num_classes',)
  examples = 'tagged'
  observes = True
  unit = 'words'
  hf_class = 'ForTokenClassification'

  def validate(self, model: Any) -> None:
    super().validate(model)
    num_classes = model.num_classes
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
      raise ConfigError(f'model.head=token_classification needs model.num_classes >= 2 (the number of tags), but it '
                        f'is {num_classes!r}; set --config.model.num_classes.')

  def targets(self, batch, unscored):
    del unscored  # sub-tokens after a word's first, framing ids and padding carry label -1
    return batch['labels'], -1

  def observe(self, acc: MetricAccumulator, batch: dict[str, np.ndarray], logits: np.ndarray, config: Any,
              read_examples: Callable[[Sequence[int]], list]) -> None:
    del read_examples
    names = label_names_of(config)
    rows = word_sequences(np.asarray(batch['labels']), np.argmax(logits, axis=-1))
    acc.add_extra(entity_counts([[names[i] for i in g] for g, _ in rows],
                                [[names[i] for i in p] for _, p in rows]))

  def _scores(self, acc: MetricAccumulator) -> dict[str, Any]:
    n = acc.weight_sum
    return {'num_words': int(round(n)), 'loss': acc.loss_sum / n if n > 0 else float('nan'),
            'accuracy': acc.correct_sum / n if n > 0 else float('nan'), **entity_scores(acc.extra or {})}

  def eval_row(self, acc):
    out = self._scores(acc)
    return {'eval_loss': out['loss'], 'eval_accuracy': out['accuracy'], 'eval_precision': out['precision'],
            'eval_recall': out['recall'], 'eval_f1': out['f1'], 'eval_words': float(out['num_words'])}

  def results(self, acc, arch):
    return self._scores(acc)

  def output_flops(self, cfg, rows, tokens):
    return float(rows * tokens * 6 * cfg.d_model * cfg.num_classes)


def label_names_of(config: Any) -> list[str]:
  """data.label_names as a list, one name per class id (an id past the names is its number)."""
  names = [n.strip() for n in str(config.data.label_names).split(',') if n.strip()]
  return names + [str(i) for i in range(len(names), int(config.model.num_classes))]
