"""Pipeline: packing, MLM masking statistics, determinism, exact resume (with prefetch), host slices, eval, errors."""
import json

import numpy as np
import pytest

from configs import default
from jaxformer import data as D
from jaxformer.data import pipeline, sources
from jaxformer.data.tokenizers import BOS_ID, EOS_ID


class RecordingSplit(sources.ListSplit):
  """A list split that records every index read (to check hosts and held-out splits)."""

  def __init__(self, name, examples):
    super().__init__(name, examples)
    self.reads = []

  def read(self, indices):
    indices = [int(i) for i in indices]
    self.reads.extend(indices)
    return super().read(indices)


def _docs(n=60, seed=0, max_len=60):
  rng = np.random.default_rng(seed)
  letters = np.array(list('abcdefghijklmnopqrstuvwxyz'))
  # Lengths from 1 to 3x the row length, so documents are split across rows.
  return [f'{i}:' + ''.join(rng.choice(letters, size=int(rng.integers(1, max_len)))) for i in range(n)]


def _source(train, validation=None, test=None, kind='text'):
  splits = {'train': RecordingSplit('train', train)}
  if validation is not None:
    splits['validation'] = RecordingSplit('validation', validation)
  if test is not None:
    splits['test'] = RecordingSplit('test', test)
  return sources.Source('builtin:test', kind, splits)


def _config(arch='decoder_only', batch_size=4, seq_len=20, src_seq_len=16, pack=True, prefetch=0, seed=0, **data):
  config = default.get_config()
  config.seed = seed
  config.model.arch = arch
  config.train.batch_size = batch_size
  config.data.update(seq_len=seq_len, src_seq_len=src_seq_len, pack=pack, prefetch=prefetch, **data)
  return config


def _tokenizer(texts):
  return D.CharTokenizer.build(texts)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _train(config, tok, source, process_index=0, process_count=1):
  layout = D.DataLayout(config.train.batch_size, process_index, process_count)
  return D.make_train_iterator(config, tok, '/nonexistent', source=source, layout=layout)


def _segments(row_seg, *arrays):
  """[(segment id, [array slices...])] in row order."""
  out = []
  for s in np.unique(row_seg[row_seg > 0]):
    where = np.nonzero(row_seg == s)[0]
    assert np.all(np.diff(where) == 1), 'a segment must be contiguous'
    out.append((int(s), [a[where] for a in arrays]))
  return out


# ------------------------------------------------------------------------------------------------- packing


@pytest.mark.parametrize('pack', [True, False])
def test_lm_packing_loses_and_repeats_nothing(pack):
  docs = _docs()
  tok = _tokenizer(docs)
  config = _config(batch_size=4, seq_len=20, pack=pack)
  source = _source(docs)
  it = _train(config, tok, source)
  batches = _take(it, 60)
  producer = it._producer
  b, n = 4, len(docs)
  for r in range(b):
    stream_targets, stream_inputs, first_pos = [], [], []
    for batch in batches:
      seg, inp, tgt, pos = (batch[k][r] for k in ('segment_ids', 'tokens', 'targets', 'positions'))
      if pack:
        assert np.all(seg > 0), 'packed training rows are full'
      else:
        assert set(np.unique(seg)) <= {0, 1} and np.all((seg > 0) == (tgt > 0))
      segs = _segments(seg, inp, tgt, pos)
      assert [s for s, _ in segs] == list(range(1, len(segs) + 1))
      for _, (i, t, p) in segs:
        np.testing.assert_array_equal(p, np.arange(len(p)))  # positions restart per segment
        np.testing.assert_array_equal(i[1:], t[:-1])  # targets are the next tokens within the segment
        stream_inputs.append(i)
        stream_targets.append(t)
      assert np.all(inp[seg == 0] == 0) and np.all(tgt[seg == 0] == 0) and np.all(pos[seg == 0] == 0)
    # The stream's targets, concatenated, are exactly its documents' tokens + EOS, in order: none lost or repeated.
    got = np.concatenate(stream_targets)
    docs_in_order = []
    expected = []
    k = 0
    while sum(map(len, expected)) < len(got):
      index = producer.example_index(r, k)
      docs_in_order.append(index)
      expected.append(np.array(tok.encode(docs[index]) + [2]))
      k += 1
    expected = np.concatenate(expected)[:len(got)]
    np.testing.assert_array_equal(got, expected)
    inputs = np.concatenate(stream_inputs)
    np.testing.assert_array_equal(inputs[inputs != 1], got[got != 2][:np.sum(inputs != 1)])
    # The first epoch's positions r, r + B, ... are read in the permutation of seed 0: each document once.
    first = [d for kk, d in enumerate(docs_in_order) if r + kk * b < n]
    assert len(set(first)) == len(first)
  all_first = {producer.example_index(r, k) for r in range(b) for k in range(n) if r + k * b < n}
  assert all_first == set(range(n))


def test_attention_mask_from_segments_blocks_other_documents():
  docs = _docs(60, max_len=15)
  tok = _tokenizer(docs)
  batch = next(_train(_config(batch_size=8, seq_len=40), tok, _source(docs)))
  seg = batch['segment_ids']
  # The mask the model builds: same non-zero segment, causal.
  mask = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] > 0) & np.tril(np.ones((40, 40), bool))
  for r in range(seg.shape[0]):
    # Which document each token comes from, recovered from the text: a new document starts after BOS.
    doc_id = np.cumsum(batch['tokens'][r] == 1) + 1000 * seg[r]
    for i in range(40):
      for j in range(40):
        if mask[r, i, j]:
          assert doc_id[i] == doc_id[j] and seg[r, i] == seg[r, j]
        elif j <= i and seg[r, i] == seg[r, j] and seg[r, i] > 0:
          raise AssertionError('a causal pair inside a segment must be allowed')
    # More than one document in the row, and the mask is block-diagonal between them.
    assert seg[r].max() >= 2
    a, b = np.nonzero(seg[r] == 1)[0], np.nonzero(seg[r] == 2)[0]
    assert not mask[r][np.ix_(b, a)].any() and not mask[r][np.ix_(a, b)].any()


def test_encoder_only_rows_hold_whole_sequences():
  docs = _docs(20)
  tok = _tokenizer(docs)
  config = _config(arch='encoder_only', batch_size=2, seq_len=30, mask_rate=0.0)
  batches = _take(_train(config, tok, _source(docs)), 30)
  # mask_rate 0: inputs are the plain packed BOS + tokens + EOS and there are no targets.
  tokens = np.concatenate([b['tokens'][0] for b in batches])
  assert all(np.all(b['targets'] == 0) for b in batches)
  text = ''.join('|' if t == 1 else ('#' if t == 2 else tok.decode([t])) for t in tokens)
  first = text.split('#')[0]
  assert first.startswith('|') and first[1:] in docs


# --------------------------------------------------------------------------------------------------- MLM


def test_mlm_masking_statistics_and_determinism():
  config = _config(arch='encoder_only', batch_size=16, seq_len=64, mask_rate=0.15, source='builtin:lm')
  source = D.get_source(config, '/nonexistent')
  tok = D.CharTokenizer.build(source.split('train').read(range(200)))
  it = _train(config, tok, source)
  chosen = masked = random = kept = real = 0
  for _ in range(60):
    batch = next(it)
    tgt, inp = batch['targets'], batch['tokens']
    original = np.where(tgt > 0, tgt, inp)
    is_real = (original >= 3) & (original != 4)
    assert np.all(tgt[~is_real] == 0), 'pad, BOS and EOS are never chosen'
    sel = tgt > 0
    real += is_real.sum()
    chosen += sel.sum()
    masked += (sel & (inp == 4)).sum()
    kept += (sel & (inp == tgt)).sum()
    random += (sel & (inp != 4) & (inp != tgt)).sum()
    assert np.all(inp[sel & (inp != 4)] >= 5)
    assert np.all(inp[~sel] == original[~sel])
  real_vocab = tok.vocab_size - 5
  assert real > 50000
  assert abs(chosen / real - 0.15) < 0.01
  assert abs(masked / chosen - 0.8) < 0.02
  assert abs(random / chosen - 0.1 * (1 - 1 / real_vocab)) < 0.02
  assert abs(kept / chosen - (0.1 + 0.1 / real_vocab)) < 0.02
  # Deterministic from seed + step: a fresh iterator gives the same masks; another seed does not.
  a = _take(_train(config, tok, source), 3)
  b = _take(_train(config, tok, source), 3)
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  assert not np.array_equal(a[1]['tokens'], a[2]['tokens'])


def test_eval_masking_is_repeatable_and_independent_of_seed():
  docs = _docs(40)
  tok = _tokenizer(docs)
  runs = []
  for seed in (0, 1, 0):
    config = _config(arch='encoder_only', seq_len=32, seed=seed)
    runs.append(list(D.make_eval_iterator(config, tok, '/x', 'validation', layout=D.DataLayout(4),
                                          source=_source(docs, docs))))
  for x, y in zip(runs[0], runs[1]):
    np.testing.assert_array_equal(x['tokens'], y['tokens'])
  assert sum((b['targets'] > 0).sum() for b in runs[0]) > 0


# ------------------------------------------------------------------------------------- order and resume


def test_order_is_deterministic_per_seed():
  docs = _docs(80)
  tok = _tokenizer(docs)
  run = lambda seed: np.stack([b['tokens'] for b in _take(_train(_config(seed=seed), tok, _source(docs)), 5)])
  np.testing.assert_array_equal(run(0), run(0))
  assert not np.array_equal(run(0), run(1))


@pytest.mark.parametrize('arch,prefetch', [('decoder_only', 0), ('decoder_only', 3), ('encoder_only', 2),
                                           ('encoder_decoder', 2)])
def test_resume_from_saved_state_is_exact(arch, prefetch):
  if arch == 'encoder_decoder':
    config = _config(arch=arch, source='builtin:numbers', batch_size=4, seq_len=64, src_seq_len=12, prefetch=prefetch)
  else:
    config = _config(arch=arch, source='builtin:lm', batch_size=4, seq_len=48, prefetch=prefetch)
  source = D.get_source(config, '/nonexistent')
  tok = D.CharTokenizer.build(''.join(e) if isinstance(e, tuple) else e for e in source.split('train').read(range(300)))
  it = _train(config, tok, source)
  _take(it, 7)
  state = json.loads(json.dumps(it.get_state()))  # JSON-serializable
  expected = _take(it, 6)
  it.close()

  fresh = _train(config, tok, source)
  fresh.set_state(state)
  got = _take(fresh, 6)
  # Restoring into the running iterator (its prefetch thread is ahead) works as well.
  _take(it, 2)
  it.set_state(state)
  again = _take(it, 6)
  for e, g, a in zip(expected, got, again):
    assert e.keys() == g.keys() == a.keys()
    for k in e:
      np.testing.assert_array_equal(e[k], g[k])
      np.testing.assert_array_equal(e[k], a[k])
  assert fresh.get_state() == it.get_state()
  fresh.close()
  it.close()


def test_set_state_rejects_a_foreign_state():
  docs = _docs()
  tok = _tokenizer(docs)
  state = _train(_config(seed=0), tok, _source(docs)).get_state()
  with pytest.raises(D.DataError, match='seed'):
    _train(_config(seed=1), tok, _source(docs)).set_state(state)


# -------------------------------------------------------------------------------------------------- hosts


@pytest.mark.parametrize('arch', ['decoder_only', 'encoder_only', 'encoder_decoder'])
def test_two_hosts_read_disjoint_examples_and_together_make_the_global_batch(arch):
  if arch == 'encoder_decoder':
    pairs = [(str(i * 37), D.number_to_words(i * 37)) for i in range(200)]
    make = lambda: _source(pairs, kind='pairs')
    tok = _tokenizer([p for pair in pairs for p in pair])
    config = _config(arch=arch, batch_size=8, seq_len=48, src_seq_len=12)
  else:
    docs = _docs(200)
    make = lambda: _source(docs)
    tok = _tokenizer(docs)
    config = _config(arch=arch, batch_size=8, seq_len=24)
  whole_source = make()
  whole = _take(_train(config, tok, whole_source), 6)
  hosts, reads = [], []
  for h in range(2):
    source = make()
    hosts.append(_take(_train(config, tok, source, process_index=h, process_count=2), 6))
    reads.append(set(source.split('train').reads))
  assert reads[0] and reads[1] and not reads[0] & reads[1]
  for w, h0, h1 in zip(whole, *hosts):
    for k in w:
      assert h0[k].shape[0] == 4
      np.testing.assert_array_equal(np.concatenate([h0[k], h1[k]]), w[k])


def test_training_reads_only_the_training_split(tmp_path):
  docs = _docs(50)
  source = _source(docs, validation=['held out validation'], test=['held out test'])
  config = _config(tokenizer='char')
  tok = D.get_tokenizer(config, str(tmp_path), source=source)
  _take(_train(config, tok, source), 20)
  assert source.split('train').reads
  assert not source._splits['validation'].reads and not source._splits['test'].reads


# --------------------------------------------------------------------------------------------------- eval


@pytest.mark.parametrize('pack', [True, False])
def test_eval_lm_reads_every_example_once_and_pads_the_last_batch(pack):
  docs = _docs(37)
  tok = _tokenizer(docs)
  config = _config(seq_len=20, pack=pack)
  batches = list(D.make_eval_iterator(config, tok, '/x', 'validation', layout=D.DataLayout(4),
                                      source=_source(['x'], docs)))
  targets = np.concatenate([b['targets'].reshape(-1) for b in batches])
  expected = np.concatenate([tok.encode(d) + [2] for d in docs])
  np.testing.assert_array_equal(targets[targets > 0], expected)
  last = batches[-1]
  assert all(b['tokens'].shape == (4, 20) for b in batches)
  empty = ~(last['segment_ids'] > 0).any(axis=1)
  assert empty.any() or len(targets[targets > 0]) % 80 == 0
  assert np.all(last['tokens'][empty] == 0) and np.all(last['targets'][empty] == 0)
  # Two hosts: slices of the same global batches, same number of batches.
  halves = [list(D.make_eval_iterator(config, tok, '/x', 'validation', layout=D.DataLayout(4, h, 2),
                                      source=_source(['x'], docs))) for h in range(2)]
  assert len(halves[0]) == len(halves[1]) == len(batches)
  for w, a, b in zip(batches, *halves):
    np.testing.assert_array_equal(np.concatenate([a['targets'], b['targets']]), w['targets'])


@pytest.mark.parametrize('pack', [False, True])
def test_seq2seq_batches_match_the_pairs(pack):
  config = _config(arch='encoder_decoder', source='builtin:numbers', batch_size=8, seq_len=128 if pack else 64, src_seq_len=16,
                   pack=pack)
  source = D.get_source(config, '/nonexistent')
  tok = D.CharTokenizer.build(t for p in source.split('train').read(range(2000)) for t in p)
  evaluation = D.make_eval_iterator(config, tok, '/x', 'validation', layout=D.DataLayout(8), source=source)
  for batch in _take(_train(config, tok, source), 3) + list(evaluation)[:3]:
    for r in range(8):
      dec = _segments(batch['tgt_segment_ids'][r], batch['tgt_tokens'][r], batch['targets'][r],
                      batch['tgt_positions'][r])
      enc = _segments(batch['src_segment_ids'][r], batch['src_tokens'][r], batch['src_positions'][r])
      assert [s for s, _ in dec] == [s for s, _ in enc]
      assert pack or len(dec) <= 1
      for (_, (dinp, dtgt, dpos)), (_, (einp, epos)) in zip(dec, enc):
        assert dinp[0] == 1 and dtgt[-1] == 2 and einp[-1] == 2
        np.testing.assert_array_equal(dinp[1:], dtgt[:-1])
        np.testing.assert_array_equal(dpos, np.arange(len(dpos)))
        np.testing.assert_array_equal(epos, np.arange(len(epos)))
        assert tok.decode(dtgt) == D.number_to_words(int(tok.decode(einp)))
    if pack:
      assert batch['tgt_segment_ids'].max() >= 2


def test_eval_seq2seq_order_matches_load_text_pairs_and_truncates(tmp_path):
  pairs = [('a ' * n, 'b ' * (n + 1)) for n in range(1, 30)]
  source = _source([('x', 'y')], validation=pairs, kind='pairs')
  tok = _tokenizer(['a b x y '])
  config = _config(arch='encoder_decoder', seq_len=20, src_seq_len=10, pack=False)
  batches = list(D.make_eval_iterator(config, tok, '/x', 'validation', layout=D.DataLayout(5), source=source))
  rows = [(b['src_tokens'][r], b['targets'][r]) for b in batches for r in range(5)
          if b['src_segment_ids'][r].any()]
  assert len(rows) == len(pairs)
  assert D.load_text_pairs(config, '/x', 'validation', source=source) == pairs
  for (enc, tgt), (src, ref) in zip(rows, pairs):
    assert tok.decode(enc) == src[:9]  # truncated to src_seq_len - 1 tokens + EOS
    assert tok.decode(tgt) == ref[:20]
    assert D.encode_source(tok, src, 10) == [int(t) for t in enc[enc > 0]]


# ------------------------------------------------------------------------------------------------- errors


def test_error_all_training_pairs_too_long():
  pairs = [('x' * 50, 'y')] * 10
  source = _source(pairs, kind='pairs')
  with pytest.raises(D.DataError) as err:
    next(_train(_config(arch='encoder_decoder', src_seq_len=16), _tokenizer(['xy']), source))
  assert 'data.src_seq_len=16' in str(err.value) and '\n' not in str(err.value)


def test_long_training_pairs_are_dropped():
  pairs = [('x' * 50, 'long')] + [(str(i), 'y' * (i % 5 + 1)) for i in range(30)]
  source = _source(pairs, kind='pairs')
  tok = _tokenizer(['xy0123456789long'])
  batches = _take(_train(_config(arch='encoder_decoder', src_seq_len=16, batch_size=2, pack=False), tok, source), 40)
  assert all((b['src_tokens'] != tok.encode('x')[0]).all() for b in batches)


def test_char_vocabulary_not_covering_eval_text_gives_unk_not_an_error():
  # Unseen characters become <unk>; their rate is reported (and limited) at start-up, never by the eval iterator.
  docs = _docs(20)
  tok = _tokenizer(docs)  # lowercase letters, digits, ':'
  batches = list(D.make_eval_iterator(_config(), tok, '/x', 'validation', layout=D.DataLayout(2),
                                      source=_source(docs, ['ÄÖÜ ÉÈ 中文'] * 5)))
  targets = np.concatenate([b['targets'].reshape(-1) for b in batches])
  assert (targets == tok.unk_id).sum() == 5 * len('ÄÖÜÉÈ中文')


def test_error_batch_not_divisible_by_hosts():
  docs = _docs()
  with pytest.raises(D.DataError, match='train.batch_size=6'):
    _train(_config(batch_size=6), _tokenizer(docs), _source(docs), process_index=0, process_count=4)


def test_error_missing_split_names_the_key():
  docs = _docs()
  with pytest.raises(D.DataError) as err:
    D.make_eval_iterator(_config(), _tokenizer(docs), '/x', 'validation', layout=D.DataLayout(2),
                         source=_source(docs))
  assert 'data.eval_split' in str(err.value)


def test_multi30k_subset_with_sentencepiece_end_to_end(shared_data, tmp_path):
  """parallel: -> ArrayRecord -> sentencepiece trained on the train split -> packed seq2seq batches, aligned."""
  import gzip
  raw = {}
  for stem, n in (('train', 1500), ('val', 100)):
    for lang in ('en', 'de'):
      with gzip.open(shared_data / 'multi30k' / f'{stem}.{lang}.gz', 'rt', encoding='utf-8') as f:
        raw[stem, lang] = f.read().split('\n')[:n]
      (tmp_path / f'{stem}.{lang}').write_text('\n'.join(raw[stem, lang]) + '\n', encoding='utf-8')
  config = _config(arch='encoder_decoder', source=f'parallel:{tmp_path}', tokenizer='sentencepiece', vocab_size=700,
                   batch_size=4, seq_len=96, src_seq_len=64, pack=True, prefetch=2)
  workdir = str(tmp_path / 'wd')
  tok = D.get_tokenizer(config, workdir)
  assert tok.vocab_size == 700
  pairs = set(zip(raw['train', 'en'], raw['train', 'de']))
  it = D.make_train_iterator(config, tok, workdir, layout=D.DataLayout(4))
  for batch in _take(it, 3):
    for r in range(4):
      dec = _segments(batch['tgt_segment_ids'][r], batch['targets'][r])
      enc = _segments(batch['src_segment_ids'][r], batch['src_tokens'][r])
      for (_, (tgt,)), (_, (src,)) in zip(dec, enc):
        assert (tok.decode(src), tok.decode(tgt)) in pairs
  val = list(D.make_eval_iterator(config, tok, workdir, 'validation', layout=D.DataLayout(8)))
  assert sum(int(b['src_segment_ids'].max(axis=1).sum()) for b in val) >= 100 // 8  # rows hold >= 1 pair
  got = [tok.decode(b['targets'][r][b['tgt_segment_ids'][r] == s]) for b in val for r in range(8)
         for s in range(1, b['tgt_segment_ids'][r].max() + 1)]
  assert got == raw['val', 'de']


# ---------------------------------------------------------------------------------------- random windows


def _stream_of(docs, tok):
  """The training split as the one token stream random_windows samples from: BOS + tokens + EOS per document."""
  return np.concatenate([np.concatenate([[BOS_ID], tok.encode(d), [EOS_ID]]) for d in docs])


@pytest.mark.parametrize('arch', ['decoder_only', 'encoder_only'])
def test_random_windows_are_contiguous_slices_of_the_token_stream(arch):
  docs = _docs(60)
  tok = _tokenizer(docs)
  stream = _stream_of(docs, tok)
  seq_len = 20
  it = _train(_config(arch=arch, seq_len=seq_len, sampling='random_windows', batch_size=8), tok, _source(docs))
  starts = []
  for b in _take(it, 30):
    for i in range(8):
      # encoder_only: masked positions hold the original token in targets, the rest are unchanged in inputs
      inputs = b['tokens'][i] if arch == 'decoder_only' else np.where(b['targets'][i] != 0, b['targets'][i],
                                                                       b['tokens'][i])
      full = np.concatenate([inputs, b['targets'][i][-1:]]) if arch == 'decoder_only' else inputs
      hits = [s for s in range(len(stream) - len(full) + 1) if np.array_equal(stream[s:s + len(full)], full)]
      if arch == 'decoder_only' and not hits:  # the last target was BOS (zeroed): match the inputs alone
        hits = [s for s in range(len(stream) - seq_len + 1) if np.array_equal(stream[s:s + seq_len], inputs)]
      assert hits, 'every row must be a window of the token stream'
      starts.append(hits[0])
      seg, pos = b['segment_ids'][i], b['positions'][i]
      # Positions restart and segments advance exactly at document starts (BOS) inside the window.
      bos = b['tokens'][i] == BOS_ID if arch == 'decoder_only' else stream[hits[0]:hits[0] + seq_len] == BOS_ID
      expect_seg = 1 + np.cumsum(bos) - bos[0]
      np.testing.assert_array_equal(seg, expect_seg)
      for s in np.unique(seg):
        np.testing.assert_array_equal(pos[seg == s], np.arange((seg == s).sum()) + (pos[seg == s][0] if s == 1 else 0))
      if arch == 'decoder_only':
        np.testing.assert_array_equal(b['tokens'][i][1:], np.where(b['targets'][i][:-1] == 0, BOS_ID,
                                                                   b['targets'][i][:-1]))
        assert not np.any(b['targets'][i] == BOS_ID), 'EOS -> BOS is not a prediction target'
  # Offsets are spread over the whole stream (i.i.d. uniform), not walking through it in order.
  starts = np.array(starts)
  assert starts.min() < len(stream) * 0.2 and starts.max() > len(stream) * 0.7
  assert len(np.unique(starts)) > 0.8 * len(starts)


def test_random_windows_resume_hosts_and_seed():
  docs = _docs(80)
  tok = _tokenizer(docs)
  cfg = lambda seed=0: _config(seq_len=16, sampling='random_windows', batch_size=8, seed=seed, prefetch=2)
  it = _train(cfg(), tok, _source(docs))
  _take(it, 5)
  state = json.loads(json.dumps(it.get_state()))
  expected = _take(it, 4)
  it.close()
  fresh = _train(cfg(), tok, _source(docs))
  fresh.set_state(state)
  for e, g in zip(expected, _take(fresh, 4)):
    for k in e:
      np.testing.assert_array_equal(e[k], g[k])
  fresh.close()
  # Two hosts' rows together are the single-host global batch.
  whole = _take(_train(cfg(), tok, _source(docs)), 3)
  halves = [_take(_train(cfg(), tok, _source(docs), process_index=h, process_count=2), 3) for h in range(2)]
  for w, h0, h1 in zip(whole, *halves):
    for k in w:
      np.testing.assert_array_equal(np.concatenate([h0[k], h1[k]]), w[k])
  assert not np.array_equal(whole[0]['tokens'], _take(_train(cfg(seed=1), tok, _source(docs)), 1)[0]['tokens'])
  with pytest.raises(D.DataError, match='sampling'):
    _train(_config(seq_len=16, batch_size=8), tok, _source(docs)).set_state(state)


def test_random_windows_errors():
  docs = _docs(3, max_len=5)
  tok = _tokenizer(docs)
  with pytest.raises(D.DataError, match='too few'):
    _train(_config(seq_len=200, sampling='random_windows'), tok, _source(docs))
  with pytest.raises(D.DataError, match='encoder_decoder'):
    pairs = [('1', 'one'), ('2', 'two')]
    _train(_config(arch='encoder_decoder', sampling='random_windows'), _tokenizer(['1', '2', 'one', 'two']),
           _source(pairs, kind='pairs'))
  with pytest.raises(D.DataError, match='sampling'):
    _train(_config(sampling='random'), tok, _source(docs))


def test_random_windows_state_resumes_on_another_host_count():
  """The saved position is the step alone, so a 2-host run's state continues exactly in a 1-host run."""
  docs = _docs(80)
  tok = _tokenizer(docs)
  cfg = _config(seq_len=16, sampling='random_windows', batch_size=8)
  hosts = [_train(cfg, tok, _source(docs), process_index=h, process_count=2) for h in range(2)]
  for it in hosts:
    _take(it, 3)
  state = hosts[0].get_state()
  single = _train(cfg, tok, _source(docs))
  single.set_state(state)
  nxt = [next(it) for it in hosts]
  got = next(single)
  for k in got:
    np.testing.assert_array_equal(np.concatenate([nxt[0][k], nxt[1][k]]), got[k])
