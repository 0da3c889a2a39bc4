"""Metrics: perplexity of a uniform model, exact token-weighted aggregation, BLEU against sacrebleu."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sacrebleu

from jaxformer import metrics
from jaxformer.data import ByteTokenizer


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


# ------------------------------------------------------------------------------ BLEU per language, chrF
ZH_HYPS = ['我今天很高兴去学校。', '他喜欢吃苹果和香蕉。', '天气很好，我们去公园散步吧。']
ZH_REFS = ['我今天很高兴去上学。', '他喜欢吃苹果和橘子。', '天气很好，我们去公园散步。']


def test_chinese_bleu_uses_the_zh_tokenizer_and_equals_sacrebleu():
  out = metrics.bleu(ZH_HYPS, ZH_REFS, src_lang='en', tgt_lang='zh')
  expected = sacrebleu.corpus_bleu(ZH_HYPS, [ZH_REFS], tokenize='zh').score
  assert out['bleu'] == pytest.approx(expected, abs=1e-9)
  assert '|tok:zh|' in out['sacrebleu_signature']
  # 13a sees each Chinese sentence as one or two 'words': near-identical sentences score ~0.
  wrong = sacrebleu.corpus_bleu(ZH_HYPS, [ZH_REFS], tokenize='13a').score
  assert wrong < 10 and out['bleu'] > 50
  assert metrics.bleu(ZH_HYPS, ZH_REFS, tgt_lang='zh-TW')['bleu'] == pytest.approx(expected, abs=1e-9)


def test_bleu_tokenizer_choice_follows_the_target_language_and_the_override():
  assert metrics.bleu_tokenizer('zh') == ('zh', '')
  assert metrics.bleu_tokenizer('zh_CN') == ('zh', '')
  assert metrics.bleu_tokenizer('de') == ('13a', '')
  assert metrics.bleu_tokenizer('') == ('13a', '')
  assert metrics.bleu_tokenizer('zh', 'char') == ('char', '')
  assert metrics.bleu_tokenizer('de', 'intl') == ('intl', '')
  try:
    sacrebleu.BLEU(tokenize='ja-mecab')
    has_mecab = True
  except RuntimeError:
    has_mecab = False
  name, note = metrics.bleu_tokenizer('ja')
  if has_mecab:
    assert (name, note) == ('ja-mecab', '')
  else:
    assert name == '13a' and 'sacrebleu[ja]' in note and '\n' not in note
  with pytest.raises(ValueError, match='decode.bleu_tokenize'):
    metrics.bleu_tokenizer('zh', 'zh2')


def test_bleu_override_and_ngram_order_show_in_the_signature():
  hyps = ['the cat sat on the mat .', 'a dog runs in the park']
  refs = ['the cat sat on a mat .', 'the dog runs in a park']
  out = metrics.bleu(hyps, refs, tgt_lang='zh', tokenize='13a', max_ngram_order=2)
  expected = sacrebleu.metrics.BLEU(tokenize='13a', max_ngram_order=2).corpus_score(hyps, [refs]).score
  assert out['bleu'] == pytest.approx(expected, abs=1e-9)
  assert out['bleu'] != pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)  # BLEU-2 is not BLEU-4
  assert '|tok:13a|' in out['sacrebleu_signature'] and out['sacrebleu_signature'].endswith('|ngram:2')
  assert 'ngram' not in metrics.bleu(hyps, refs)['sacrebleu_signature']


def test_chrf_equals_sacrebleu():
  out = metrics.chrf(ZH_HYPS, ZH_REFS)
  expected = sacrebleu.metrics.CHRF().corpus_score(ZH_HYPS, [ZH_REFS])
  assert out['chrf'] == pytest.approx(expected.score, abs=1e-9) and 0 < out['chrf'] < 100
  assert out['chrf_signature'].startswith('nrefs:1|case:mixed|eff:yes|nc:6|nw:0|space:no|version:')
  assert metrics.chrf(ZH_REFS, ZH_REFS)['chrf'] == pytest.approx(100.0)
  with pytest.raises(ValueError, match='one hypothesis per reference'):
    metrics.chrf(ZH_HYPS[:1], ZH_REFS)


# ------------------------------------------------------------------------ bits per byte / per character
def test_uniform_model_over_bytes_has_exactly_8_bits_per_byte():
  tok = ByteTokenizer()
  text = 'Chinese 中文 and ASCII, emoji \U0001F600.\n'
  targets = jnp.asarray(tok.encode(text) + [0] * 5)[None]  # trailing padding carries no weight
  logits = jnp.full((1, targets.shape[1], tok.vocab_size), -1e9, jnp.float32).at[..., 5:].set(0.0)
  acc = metrics.MetricAccumulator()
  acc.add(metrics.token_metrics(logits, targets, length_tables=metrics.length_tables(tok)))
  out = acc.result()
  assert out['num_bytes'] == len(text.encode()) and out['num_chars'] == len(text)
  assert out['bits_per_byte'] == pytest.approx(8.0, rel=1e-6)
  assert out['bits_per_char'] == pytest.approx(8.0 * len(text.encode()) / len(text), rel=1e-6)
  assert out['perplexity'] == pytest.approx(256.0, rel=1e-5)


def test_bits_per_char_aggregates_exactly_across_uneven_batches():
  tok = ByteTokenizer()
  texts = ['a', '中文字', 'héllo wörld', '', '\U0001F600 ok', 'x' * 9, 'ü']  # 1-4 bytes per character
  width = max(len(t.encode()) for t in texts)
  targets = np.zeros((len(texts), width), np.int32)
  for row, t in enumerate(texts):
    targets[row, :len(t.encode())] = tok.encode(t)
  rng = np.random.default_rng(2)
  logits = rng.normal(size=targets.shape + (tok.vocab_size,)).astype(np.float32) * 2
  nll = -np.take_along_axis(np.asarray(jax.nn.log_softmax(jnp.asarray(logits))), targets[..., None], -1)[..., 0]
  total_bits = nll[targets != 0].astype(np.float64).sum() / math.log(2)
  ref_bpc = total_bits / sum(len(t) for t in texts)
  ref_bpb = total_bits / sum(len(t.encode()) for t in texts)

  tables = metrics.length_tables(tok)
  acc, per_batch = metrics.MetricAccumulator(), []
  for start, stop in [(0, 1), (1, 2), (2, 5), (5, 7)]:  # uneven batches; one holds an empty text
    sums = metrics.token_metrics(jnp.asarray(logits[start:stop]), jnp.asarray(targets[start:stop]),
                                 length_tables=tables)
    acc.add(sums)
    per_batch.append(float(sums['loss_sum']) / math.log(2) / float(sums['char_sum']))
  out = acc.result()
  assert out['bits_per_char'] == pytest.approx(ref_bpc, rel=1e-6)
  assert out['bits_per_byte'] == pytest.approx(ref_bpb, rel=1e-6)
  assert abs(np.mean(per_batch) - ref_bpc) > 1e-2  # averaging per-batch values would be a different number
  a, b = metrics.MetricAccumulator(), metrics.MetricAccumulator()
  a.add(metrics.token_metrics(jnp.asarray(logits[:3]), jnp.asarray(targets[:3]), length_tables=tables))
  b.add(metrics.token_metrics(jnp.asarray(logits[3:]), jnp.asarray(targets[3:]), length_tables=tables))
  assert a.merge(b).result()['bits_per_char'] == pytest.approx(ref_bpc, rel=1e-6)


def test_no_length_tables_means_no_bits_keys():
  out_keys = metrics.MetricAccumulator(loss_sum=3.0, weight_sum=2.0).result().keys()
  assert 'bits_per_byte' not in out_keys and 'bits_per_char' not in out_keys
  assert metrics.length_tables(ByteTokenizer(), 'encoder_only') is None


def test_merged_accumulators_keep_the_confusion_matrix():
  """Classification sums merged across accumulators (per-host evaluation) give the macro-F1 of all examples."""
  from jaxformer.metrics import MetricAccumulator, macro_f1_score
  rng = np.random.default_rng(0)
  labels, predictions = rng.integers(0, 3, 40), rng.integers(0, 3, 40)
  parts = []
  for part in (slice(0, 13), slice(13, 40)):
    c = np.zeros((3, 3))
    np.add.at(c, (labels[part], predictions[part]), 1.0)
    acc = MetricAccumulator()
    acc.add({'loss_sum': 1.0, 'weight_sum': float(len(labels[part])),
             'correct_sum': float((labels[part] == predictions[part]).sum()), 'confusion': c})
    parts.append(acc)
  merged = parts[0].merge(parts[1]).merge_hosts().classification_result()
  assert merged['num_examples'] == 40
  assert merged['macro_f1'] == pytest.approx(macro_f1_score(labels, predictions), rel=1e-12)
  assert merged['accuracy'] == pytest.approx(float((labels == predictions).mean()))
