"""Evaluation metrics: token-weighted loss / perplexity / accuracy sums, bits per byte / character, BLEU and chrF.

Perplexity is exp(total NLL / total target tokens) over the whole split. Averaging per-batch perplexities
or per-batch mean losses is wrong whenever batches hold different numbers of tokens (the last batch, packed
rows), so everything here carries *sums* (`loss_sum`, `weight_sum`, `correct_sum`, `byte_sum`, `char_sum`) and
divides once at the end. The sums are accumulated on the host in float64, so adding many float32 batch sums loses
nothing visible.

Per-token perplexity depends on the tokenizer (a BPE token covers several characters), so it cannot compare a
char, a byte and a BPE model. Bits per byte / per character can: the same total NLL, in bits, divided by the UTF-8
bytes / Unicode characters the scored target tokens decode to (each tokenizer's `token_bytes` / `token_chars`
tables; special tokens count 0, so the NLL of EOS is charged to the text it ends).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

SUM_KEYS = ('loss_sum', 'weight_sum', 'correct_sum', 'byte_sum', 'char_sum')
LENGTH_SUMS = {'byte_sum': 'token_bytes', 'char_sum': 'token_chars'}  # sum key -> the tokenizer's length table

# decode.bleu_tokenize: '' picks sacrebleu's tokenizer from the target language (BLEU_TOKENIZE_BY_LANG, else 13a).
BLEU_TOKENIZE_CHOICES = ('', '13a', 'intl', 'zh', 'char', 'none')
# Primary language subtag -> sacrebleu tokenizer. 13a splits on spaces and punctuation only, so it sees a whole
# Chinese sentence as one word (BLEU ~0); Japanese needs a morphological analyser (sacrebleu[ja]).
BLEU_TOKENIZE_BY_LANG = {'zh': 'zh', 'cmn': 'zh', 'yue': 'zh', 'lzh': 'zh', 'ja': 'ja-mecab', 'jpn': 'ja-mecab'}
BLEU_DEFAULT_TOKENIZE = '13a'
BLEU_MAX_NGRAM_ORDER = 4  # sacrebleu's (and every paper's) default


def token_metrics(logits: jax.Array, targets: jax.Array, weights: jax.Array | None = None,
                  length_tables: Mapping[str, Any] | None = None, unscored: int = 0) -> dict[str, jax.Array]:
  """Token-weighted sums of NLL, weight and correct argmax predictions. weights None -> the targets that are
  neither negative nor `unscored` (the tokenizer's unscored_target: jaxformer's pad id 0, -1 for hf:).

  This is the plain reference (no label smoothing, no z-loss); training's compute_loss returns the same keys.
  For decoder_only the targets are the next tokens, for encoder_decoder the target tokens, for encoder_only
  the original tokens at the masked positions (unscored elsewhere), so in every case padding carries no weight.
  length_tables ({'byte_sum': token_bytes, 'char_sum': token_chars}, see `length_tables`) adds those sums.
  """
  if weights is None:
    weights = (targets >= 0) & (targets != unscored)
  weights = weights.astype(jnp.float32)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, jnp.maximum(targets, 0)[..., None].astype(jnp.int32), axis=-1)[..., 0]
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return {
      'loss_sum': jnp.sum(nll * weights),
      'weight_sum': jnp.sum(weights),
      'correct_sum': jnp.sum(correct * weights),
      **length_sums(targets, weights, length_tables),
  }


def length_tables(tokenizer: Any, arch: str = 'decoder_only') -> dict[str, np.ndarray] | None:
  """{'byte_sum': tokenizer.token_bytes, 'char_sum': tokenizer.token_chars}: int32 [vocab] arrays, the UTF-8
  bytes / characters each token id decodes to, which an eval step needs to report bits per byte / character.

  None for encoder_only: its targets are the masked tokens only, which are not a text whose bits could be counted."""
  if arch == 'encoder_only':
    return None
  return {key: np.asarray(getattr(tokenizer, attr), np.int32) for key, attr in LENGTH_SUMS.items()}


def length_sums(targets: jax.Array, weights: jax.Array, tables: Mapping[str, Any] | None) -> dict[str, jax.Array]:
  """sum(weights * table[targets]) per table: the bytes / characters of text the weighted targets decode to."""
  if not tables:
    return {}
  ids = targets.astype(jnp.int32)
  return {key: jnp.sum(jnp.take(jnp.asarray(table, jnp.float32), ids, mode='clip') * weights)
          for key, table in tables.items()}


def confusion_matrix(labels: jax.Array, predictions: jax.Array, weights: jax.Array, num_classes: int) -> jax.Array:
  """float32 [C, C]: entry [i, j] = the weight of examples with label i predicted as j (weight 0: not counted)."""
  one_hot = lambda x: jax.nn.one_hot(jnp.clip(x, 0, num_classes - 1), num_classes, dtype=jnp.float32)  # noqa: E731
  return jnp.einsum('b,bi,bj->ij', weights.astype(jnp.float32), one_hot(labels), one_hot(predictions))


def macro_f1(confusion: Any) -> float:
  """Macro-averaged F1 of a confusion matrix [labels, predictions]: F1 = 2 TP / (2 TP + FP + FN) per class,
  averaged over the classes that occur among the labels or the predictions (sklearn's
  f1_score(average='macro') without `labels=`); nan when there are none."""
  c = np.asarray(confusion, np.float64)
  tp = np.diag(c)
  fp, fn = c.sum(axis=0) - tp, c.sum(axis=1) - tp
  present = (c.sum(axis=0) + c.sum(axis=1)) > 0
  if not present.any():
    return math.nan
  return float(np.mean(2 * tp[present] / (2 * tp[present] + fp[present] + fn[present])))


def macro_f1_score(labels: Sequence[int], predictions: Sequence[int]) -> float:
  """macro_f1 of label / prediction lists (class ids >= 0)."""
  labels, predictions = np.asarray(labels, np.int64), np.asarray(predictions, np.int64)
  n = int(max(labels.max(initial=-1), predictions.max(initial=-1))) + 1
  c = np.zeros((max(n, 1), max(n, 1)), np.float64)
  np.add.at(c, (labels, predictions), 1.0)
  return macro_f1(c)


def perplexity(loss_sum: float, weight_sum: float) -> float:
  """exp(token-weighted mean NLL); inf when that overflows. Raises on zero tokens (nothing was scored)."""
  if weight_sum <= 0:
    raise ValueError('perplexity of zero target tokens is undefined; the split produced no non-padding targets.')
  mean = float(loss_sum) / float(weight_sum)
  return math.exp(mean) if mean < 700 else math.inf


def bits_per_unit(loss_sum: float, unit_sum: float) -> float:
  """Total NLL (nats) in bits per byte / character; nan when there is no text (unit_sum 0)."""
  return float(loss_sum) / math.log(2) / float(unit_sum) if unit_sum > 0 else math.nan


@dataclasses.dataclass
class MetricAccumulator:
  """Sums the SUM_KEYS over batches in float64 on the host; divides once in `result`.

  `add` takes the metrics dict of one batch (jax or numpy scalars); keys it lacks add nothing. When each host
  computed sums over its own rows only (not over a global jit), call `merge_hosts()` once at the end; a jit over
  the global mesh already returns global sums, and merging those again would count every token process_count times.
  """
  loss_sum: float = 0.0
  weight_sum: float = 0.0
  correct_sum: float = 0.0
  byte_sum: float = 0.0
  char_sum: float = 0.0
  num_batches: int = 0
  confusion: np.ndarray | None = None  # model.head=classification: [C, C] counts, summed like the others
  extra: dict[str, float] | None = None  # an objective's own scalar sums (align.pairwise: margin_sum, ...)
  records: dict | None = None  # a head's per-example host state (heads.span: the best answer per question)

  def add(self, metrics: Mapping[str, Any]) -> None:
    values = jax.device_get(dict(metrics))
    confusion = values.pop('confusion', None)
    for key, value in values.items():
      value = float(np.asarray(value, dtype=np.float64))
      if key in SUM_KEYS:
        setattr(self, key, getattr(self, key) + value)
      else:
        self.extra = self.extra or {}
        self.extra[key] = self.extra.get(key, 0.0) + value
    if confusion is not None:
      confusion = np.asarray(confusion, np.float64)
      self.confusion = confusion if self.confusion is None else self.confusion + confusion
    self.num_batches += 1

  def add_extra(self, sums: Mapping[str, float]) -> None:
    """Adds host-side sums (a head's `observe`: entity counts) to `extra`."""
    self.extra = self.extra or {}
    for key, value in sums.items():
      self.extra[key] = self.extra.get(key, 0.0) + float(value)

  def merge(self, other: MetricAccumulator) -> MetricAccumulator:
    confusions = [c for c in (self.confusion, other.confusion) if c is not None]
    extra = {k: (self.extra or {}).get(k, 0.0) + (other.extra or {}).get(k, 0.0)
             for k in {**(self.extra or {}), **(other.extra or {})}}
    return MetricAccumulator(*(getattr(self, k) + getattr(other, k) for k in SUM_KEYS),
                             num_batches=self.num_batches + other.num_batches,
                             confusion=sum(confusions) if confusions else None, extra=extra or None)

  def merge_hosts(self) -> MetricAccumulator:
    """Sums the per-host accumulators of all processes (a no-op on one host); the confusion matrix too (every
    host must have one of the same shape, or none)."""
    if jax.process_count() == 1:
      return self
    from jax.experimental import multihost_utils
    confusion = [] if self.confusion is None else list(self.confusion.ravel())
    local = np.array([getattr(self, k) for k in SUM_KEYS] + [self.num_batches] + confusion, dtype=np.float64)
    gathered = np.asarray(multihost_utils.process_allgather(local))  # [processes, len(SUM_KEYS) + 1 + C * C]
    total = gathered.reshape(-1, local.size).sum(axis=0)
    k = len(SUM_KEYS)
    return MetricAccumulator(*map(float, total[:k]), num_batches=int(total[k]),
                             confusion=total[k + 1:].reshape(self.confusion.shape) if confusion else None)

  def sums(self) -> dict[str, float]:
    """Every sum by its metrics key (SUM_KEYS and the extras)."""
    return {**{k: getattr(self, k) for k in SUM_KEYS}, **(self.extra or {})}

  def result(self, with_accuracy: bool = False) -> dict[str, float]:
    """loss (mean NLL per target token), perplexity, num_tokens; bits_per_byte / bits_per_char (and num_bytes /
    num_chars) when length sums were added; accuracy when asked."""
    out = {
        'num_tokens': int(round(self.weight_sum)),
        'loss': self.loss_sum / self.weight_sum if self.weight_sum > 0 else math.nan,
        'perplexity': perplexity(self.loss_sum, self.weight_sum),
    }
    if self.byte_sum > 0:
      out.update(bits_per_byte=bits_per_unit(self.loss_sum, self.byte_sum), num_bytes=int(round(self.byte_sum)))
    if self.char_sum > 0:
      out.update(bits_per_char=bits_per_unit(self.loss_sum, self.char_sum), num_chars=int(round(self.char_sum)))
    if with_accuracy:
      out['accuracy'] = self.correct_sum / self.weight_sum
    return out

  def classification_result(self) -> dict[str, float]:
    """num_examples, loss (mean cross-entropy per example), accuracy and macro_f1 (from the confusion matrix)."""
    n = self.weight_sum
    return {'num_examples': int(round(n)), 'loss': self.loss_sum / n if n > 0 else math.nan,
            'accuracy': self.correct_sum / n if n > 0 else math.nan,
            'macro_f1': macro_f1(self.confusion) if self.confusion is not None else math.nan}


# -------------------------------------------------------------------------------------------- BLEU and chrF
def bleu_tokenizer(tgt_lang: str = '', override: str = '') -> tuple[str, str]:
  """(sacrebleu tokenizer name, a note or '') for text in `tgt_lang`; `override` (decode.bleu_tokenize) wins.

  '' = by language: Chinese -> 'zh' (splits every CJK character), Japanese -> 'ja-mecab' when its dependency
  (sacrebleu[ja]) imports, else 13a with a note; any other language -> '13a' (sacrebleu's default, WMT's).
  """
  if override not in BLEU_TOKENIZE_CHOICES:
    raise ValueError(f'decode.bleu_tokenize={override!r} is not valid; use one of '
                     f'{", ".join(repr(c) for c in BLEU_TOKENIZE_CHOICES)} ("" = by data.tgt_lang).')
  if override:
    return override, ''
  lang = str(tgt_lang).lower().replace('_', '-').split('-')[0]
  name = BLEU_TOKENIZE_BY_LANG.get(lang, BLEU_DEFAULT_TOKENIZE)
  if name.endswith('-mecab'):
    from sacrebleu.metrics import BLEU  # the mecab tokenizers raise RuntimeError without their extra
    try:
      BLEU(tokenize=name)
    except RuntimeError:
      return BLEU_DEFAULT_TOKENIZE, (f'note: BLEU uses tokenize=13a for {tgt_lang!r}: sacrebleu\'s {name} tokenizer '
                                     f'needs `pip install "sacrebleu[ja]"`.')
  return name, ''


def _check_pairs(hypotheses: Sequence[str], references: Sequence[str], metric: str) -> None:
  if len(hypotheses) != len(references):
    raise ValueError(f'{metric} needs one hypothesis per reference; got {len(hypotheses)} hypotheses and '
                     f'{len(references)} references.')


def bleu(hypotheses: Sequence[str], references: Sequence[str], *, src_lang: str = '', tgt_lang: str = '',
         tokenize: str = '', max_ngram_order: int = BLEU_MAX_NGRAM_ORDER, **bleu_kwargs: Any) -> dict[str, Any]:
  """Corpus BLEU of detokenized text through sacrebleu (exp smoothing), tokenized for the target language.

  tokenize: '' = by tgt_lang (see `bleu_tokenizer`), or a sacrebleu tokenizer name. Returns {'bleu': score,
  'sacrebleu_signature': ..., 'direction': 'src->tgt'} so the number can be quoted the way papers do; the
  signature names the tokenizer ('tok:zh'), and a max_ngram_order other than 4 is appended as '|ngram:N' (sacrebleu
  leaves it out, and a BLEU-2 must not pass for a BLEU-4). Inputs must be detokenized text (what tokenizer.decode
  returns), one line per sentence. A note about the tokenizer choice, if any, is under 'bleu_note'.
  """
  from sacrebleu.metrics import BLEU  # corpus_bleu() is a thin wrapper over this; it also gives the signature
  _check_pairs(hypotheses, references, 'BLEU')
  if int(max_ngram_order) < 1:
    raise ValueError(f'decode.bleu_max_ngram={max_ngram_order!r} must be a positive integer (4 = standard BLEU).')
  name, note = bleu_tokenizer(tgt_lang, tokenize) if tokenize in BLEU_TOKENIZE_CHOICES else (tokenize, '')
  metric = BLEU(tokenize=name, max_ngram_order=int(max_ngram_order), **bleu_kwargs)
  score = metric.corpus_score(list(hypotheses), [list(references)])
  signature = str(metric.get_signature())
  if int(max_ngram_order) != BLEU_MAX_NGRAM_ORDER:
    signature += f'|ngram:{int(max_ngram_order)}'
  out = {
      'bleu': float(score.score),
      'sacrebleu_signature': signature,
      'direction': f'{src_lang}->{tgt_lang}' if src_lang or tgt_lang else '',
  }
  if note:
    out['bleu_note'] = note
  return out


def chrf(hypotheses: Sequence[str], references: Sequence[str], **chrf_kwargs: Any) -> dict[str, Any]:
  """Corpus chrF (sacrebleu.CHRF: character 6-grams, beta 2) -> {'chrf': score, 'chrf_signature': ...}.

  Character n-grams need no word tokenizer, so chrF means the same in every language (Chinese included)."""
  from sacrebleu.metrics import CHRF
  _check_pairs(hypotheses, references, 'chrF')
  metric = CHRF(**chrf_kwargs)
  score = metric.corpus_score(list(hypotheses), [list(references)])
  return {'chrf': float(score.score), 'chrf_signature': str(metric.get_signature())}
