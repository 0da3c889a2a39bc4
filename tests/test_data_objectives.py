"""encoder_decoder objectives on text (data.objective): T5 span corruption, prefix LM; sentinel ids; resume."""
import json

import numpy as np
import pytest

from configs import default
from jaxformer import data as D
from jaxformer.data import objectives
from jaxformer.data.tokenizers import BOS_ID, EOS_ID


def _config(objective, seq_len=32, src_seq_len=64, batch_size=4, prefetch=0, **data):
  config = default.get_config()
  config.model.arch = 'encoder_decoder'
  config.train.batch_size = batch_size
  config.data.update(source='builtin:lm', objective=objective, seq_len=seq_len, src_seq_len=src_seq_len,
                     prefetch=prefetch, **data)
  return config


@pytest.fixture(scope='module')
def lm(tmp_path_factory):
  """builtin:lm, its char tokenizer with 100 sentinels, and the tokenized training documents."""
  config = _config('span_corruption')
  workdir = str(tmp_path_factory.mktemp('wd'))
  source = D.get_source(config, workdir)
  tok = D.get_tokenizer(config, workdir, source=source)
  return source, tok, workdir


def _fill(inputs, targets, sentinels):
  """T5's inverse: each sentinel of the inputs replaced by the tokens after the same sentinel in the targets."""
  spans, current = {}, None
  for t in targets:
    if t in sentinels:
      current = int(t)
      spans[current] = []
    else:
      spans[current].append(int(t))
  out = []
  for t in inputs:
    out.extend(spans[int(t)] if t in sentinels else [int(t)])
  return out


def _is_window(part, whole):
  n = len(part)
  return any(list(whole[s:s + n]) == list(part) for s in range(len(whole) - n + 1))


def _pairs_of_stream(batches, r):
  """(source ids, target ids) of row stream r, in order: one per segment (rows are packed)."""
  out = []
  for b in batches:
    for s in range(1, b['src_segment_ids'][r].max() + 1):
      src = b['src_tokens'][r][b['src_segment_ids'][r] == s]
      tgt = b['targets'][r][b['tgt_segment_ids'][r] == s]
      dec = b['tgt_tokens'][r][b['tgt_segment_ids'][r] == s]
      assert src[-1] == EOS_ID and tgt[-1] == EOS_ID and dec[0] == BOS_ID
      np.testing.assert_array_equal(dec[1:], tgt[:-1])
      out.append((src[:-1], tgt[:-1]))
  return out


def test_sentinels_come_from_the_end_of_the_vocabulary(lm, tmp_path):
  _, tok, workdir = lm
  plain = D.get_tokenizer(_config('split_middle'), str(tmp_path / 'plain'))
  assert tok.num_sentinels == 100 and tok.vocab_size == plain.vocab_size + 100
  ids = tok.sentinel_ids(3)
  assert ids == [tok.vocab_size - 1, tok.vocab_size - 2, tok.vocab_size - 3]
  assert tok.decode(tok.encode('ka') + [ids[0]] + tok.encode('be') + [ids[2]]) == 'ka<extra_id_0>be<extra_id_2>'
  assert D.get_tokenizer(_config('span_corruption'), workdir).vocab_size == tok.vocab_size  # reloaded with them
  with pytest.raises(D.DataError, match='sentinel'):
    tok.sentinel_ids(101)
  with pytest.raises(D.DataError, match='new workdir'):  # the cached vocabulary has no room for the objective
    D.get_tokenizer(_config('span_corruption'), str(tmp_path / 'plain'))


def test_span_corruption_inputs_and_targets_reconstruct_the_original(lm):
  source, tok, workdir = lm
  config = _config('span_corruption')
  it = D.make_train_iterator(config, tok, workdir, source=source)
  batches = [next(it) for _ in range(6)]
  sentinels = set(tok.sentinel_ids(100))
  docs = source.split('train')
  for r in range(config.train.batch_size):
    for k, (src, tgt) in enumerate(_pairs_of_stream(batches, r)):
      assert len(src) <= 63 and len(tgt) <= 31  # + EOS: src_seq_len 64, seq_len 32
      original = tok.encode(docs.read([it._producer.example_index(r, k)])[0])
      restored = _fill(src, tgt, sentinels)
      assert _is_window(restored, original)  # a window of the document, every token back in place
      assert len(restored) == min(len(original), it._producer.task.objective.raw_length)
      got = [t for t in src if t in sentinels]
      assert got == tok.sentinel_ids(len(got))  # <extra_id_0>, <extra_id_1>, ... in order


@pytest.mark.parametrize('density,mean_span', [(0.15, 3.0), (0.3, 5.0)])
def test_noise_mask_density_and_mean_span_length(density, mean_span):
  rng = np.random.default_rng(0)
  noise = spans = total = 0
  hits = np.zeros(200)
  for _ in range(2000):
    length = int(rng.integers(20, 400))
    mask = objectives.random_spans_noise_mask(length, density, mean_span, rng)
    assert mask.shape == (length,) and not mask[0]  # starts with non-noise, as T5
    noise += mask.sum()
    total += length
    spans += np.sum(mask & ~np.concatenate([[False], mask[:-1]]))
    if length >= 200:
      hits += mask[:200]
  assert abs(noise / total - density) < 0.005
  assert abs(noise / spans - mean_span) < 0.1
  assert hits[1:].min() > 0  # every position but the first (always non-noise) is sometimes noise


def test_prefix_lm_splits_a_window_at_a_random_point(lm):
  source, tok, workdir = lm
  config = _config('prefix_lm', seq_len=24, src_seq_len=24)
  it = D.make_train_iterator(config, tok, workdir, source=source)
  batches = [next(it) for _ in range(8)]
  docs = source.split('train')
  cuts = []
  for r in range(config.train.batch_size):
    for k, (src, tgt) in enumerate(_pairs_of_stream(batches, r)):
      original = tok.encode(docs.read([it._producer.example_index(r, k)])[0])
      assert len(src) >= 1 and len(tgt) >= 1 and len(src) <= 23 and len(tgt) <= 23
      assert _is_window(list(src) + list(tgt), original)
      cuts.append(len(src))
  assert len(set(cuts)) > 5  # the split point varies


@pytest.mark.parametrize('objective', ['span_corruption', 'prefix_lm'])
def test_random_objectives_resume_exactly_and_differ_per_epoch(lm, objective):
  source, tok, workdir = lm
  config = _config(objective, prefetch=2)
  it = D.make_train_iterator(config, tok, workdir, source=source)
  [next(it) for _ in range(5)]
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(4)]
  it.close()
  fresh = D.make_train_iterator(config, tok, workdir, source=source)
  fresh.set_state(state)
  for e, g in zip(expected, [next(fresh) for _ in range(4)]):
    for key in e:
      np.testing.assert_array_equal(e[key], g[key])
  fresh.close()
  # The same example at two stream positions (two epochs) is corrupted differently; the same position alike.
  task = fresh._producer.task
  (piece,) = task.tokenize(source.split('train').read([0]))
  a, b, again = task.item(piece, 3), task.item(piece, 3 + 20000 * 4), task.item(piece, 3)
  assert not all(np.array_equal(x, y) for x, y in zip(a, b))
  assert all(np.array_equal(x, y) for x, y in zip(a, again))


def test_objective_errors():
  tok = D.ByteTokenizer()
  source = D.get_source(_config('split_middle'), '/x')
  with pytest.raises(D.DataError, match='data.objective'):
    D.make_train_iterator(_config('t5'), tok, '/x', source=source)
  config = _config('prefix_lm')
  config.model.arch = 'decoder_only'
  with pytest.raises(D.DataError, match='encoder_decoder'):
    D.make_train_iterator(config, tok, '/x', source=source)
  with pytest.raises(D.DataError, match='sentinel'):  # a tokenizer without sentinels
    D.make_train_iterator(_config('span_corruption'), tok, '/x', source=source)
