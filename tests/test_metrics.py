"""Metrics: perplexity of a uniform model, exact token-weighted aggregation, BLEU against sacrebleu."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sacrebleu

from jaxformer import metrics


def test_uniform_model_perplexity_equals_vocab_size():
  vocab = 37
  rng = np.random.default_rng(0)
  targets = rng.integers(1, vocab, size=(3, 11))
  targets[:, 7:] = 0  # padding must carry no weight
  logits = jnp.full((3, 11, vocab), 1.234, jnp.float32)  # any constant -> uniform softmax
  sums = metrics.token_metrics(logits, jnp.asarray(targets))
  assert float(sums['weight_sum']) == 3 * 7
  acc = metrics.MetricAccumulator()
  acc.add(sums)
  out = acc.result()
  assert out['num_tokens'] == 21
  assert out['perplexity'] == pytest.approx(vocab, rel=1e-5)
  assert out['loss'] == pytest.approx(math.log(vocab), rel=1e-6)


def test_token_weighted_aggregation_is_exact_across_uneven_batches():
  vocab = 13
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(10, 9, vocab)).astype(np.float32) * 3
  targets = rng.integers(1, vocab, size=(10, 9))
  lengths = np.array([9, 1, 2, 9, 3, 0, 5, 9, 1, 4])  # very different token counts per row
  targets[np.arange(9)[None, :] >= lengths[:, None]] = 0

  # Reference: one pass over every non-padding token.
  logp = jax.nn.log_softmax(jnp.asarray(logits), axis=-1)
  nll = -np.take_along_axis(np.asarray(logp), targets[..., None], axis=-1)[..., 0]
  mask = targets != 0
  ref_loss = nll[mask].astype(np.float64).mean()
  ref_acc = (np.argmax(logits, -1) == targets)[mask].mean()

  acc = metrics.MetricAccumulator()
  batch_means = []
  for start, stop in [(0, 1), (1, 3), (3, 4), (4, 7), (7, 10)]:  # uneven batches
    sums = metrics.token_metrics(jnp.asarray(logits[start:stop]), jnp.asarray(targets[start:stop]))
    acc.add(sums)
    batch_means.append(float(sums['loss_sum'] / sums['weight_sum']))
  out = acc.result(with_accuracy=True)
  assert out['num_tokens'] == int(mask.sum())
  assert out['loss'] == pytest.approx(ref_loss, rel=1e-6)
  assert out['perplexity'] == pytest.approx(math.exp(ref_loss), rel=1e-5)
  assert out['accuracy'] == pytest.approx(ref_acc, rel=1e-6)
  # The mean of batch means is a different number here, so the test can tell the two apart.
  assert abs(np.mean(batch_means) - ref_loss) > 1e-3

  # Accumulators merge exactly (e.g. per-host partial sums).
  a, b = metrics.MetricAccumulator(), metrics.MetricAccumulator()
  a.add(metrics.token_metrics(jnp.asarray(logits[:4]), jnp.asarray(targets[:4])))
  b.add(metrics.token_metrics(jnp.asarray(logits[4:]), jnp.asarray(targets[4:])))
  assert a.merge(b).merge_hosts().result()['loss'] == pytest.approx(ref_loss, rel=1e-6)


def test_masked_accuracy_counts_only_masked_positions():
  # encoder_only: targets hold the original token at masked positions and 0 elsewhere.
  logits = jnp.asarray(np.eye(6, dtype=np.float32)[[1, 2, 3, 4, 5, 1]][None] * 10)
  targets = jnp.asarray([[0, 2, 0, 3, 5, 0]])  # argmax is 1,2,3,4,5,1: position 1 right, 3 wrong, 4 right
  sums = metrics.token_metrics(logits, targets)
  assert float(sums['weight_sum']) == 3
  assert float(sums['correct_sum']) == 2


def test_perplexity_of_no_tokens_is_an_error():
  with pytest.raises(ValueError, match='zero target tokens'):
    metrics.perplexity(0.0, 0.0)


def test_bleu_equals_sacrebleu_on_fixed_strings():
  hyps = ['the cat sat on the mat .', 'a dog runs in the park', 'hello world']
  refs = ['the cat sat on the mat .', 'the dog runs in a park', 'hello there world']
  out = metrics.bleu(hyps, refs, src_lang='en', tgt_lang='de')
  expected = sacrebleu.corpus_bleu(hyps, [refs])
  assert out['bleu'] == pytest.approx(expected.score, abs=1e-9)
  assert 0 < out['bleu'] < 100
  assert out['direction'] == 'en->de'
  assert out['sacrebleu_signature'].startswith('nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:')
  assert metrics.bleu(refs, refs)['bleu'] == pytest.approx(100.0)
  with pytest.raises(ValueError, match='one hypothesis per reference'):
    metrics.bleu(hyps[:2], refs)
