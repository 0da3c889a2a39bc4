"""Tokenizers: special ids, round trips (Chinese included), UNK, caching in the workdir, errors."""
import json
import os

import numpy as np
import pytest

from configs import default
from jaxformer import data as D
from jaxformer.config import ConfigError, validate

CHINESE = '机器学习是人工智能的一个分支。我们今天去北京！'
MIXED = 'Hello, 世界! Grüße — naïve café 🎉\ttabs  and   spaces\nnew line'


def _config(**data):
  config = default.get_config()
  config.data.update(**data)
  return config


def _corpus(shared_data, n=3000):
  text = (shared_data / 'tinyshakespeare' / 'input.txt').read_text(encoding='utf-8')
  lines = [l for l in text.split('\n') if l.strip()][:n]
  return lines + [CHINESE, '你好，世界。这是一个测试句子。', '深度学习需要很多数据和计算。'] * 20


@pytest.mark.parametrize('text', ['', 'abc', CHINESE, MIXED, '\x00\x7f'])
def test_byte_round_trip(text):
  tok = D.ByteTokenizer()
  ids = tok.encode(text)
  assert tok.vocab_size == 261 and all(5 <= i < 261 for i in ids)
  assert len(ids) == len(text.encode('utf-8'))
  assert tok.decode(ids) == text


def test_decode_drops_pad_bos_and_stops_at_eos():
  tok = D.ByteTokenizer()
  ids = tok.encode('hi')
  assert tok.decode([1] + ids + [2] + tok.encode('junk') + [0, 0]) == 'hi'
  assert tok.decode(np.array([0, 1] + ids, np.int32)) == 'hi'


def test_char_tokenizer_vocab_round_trip_and_unk():
  tok = D.CharTokenizer.build(['hello world', CHINESE])
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id, tok.mask_id) == (0, 1, 2, 3, 4)
  assert tok.vocab_size == 5 + len(set('hello world' + CHINESE + '\n'))
  for text in ('hello world', CHINESE, 'held\nlow ' + CHINESE[:3]):
    ids = tok.encode(text)
    assert min(ids) >= 5 and tok.decode(ids) == text
  ids = tok.encode('hello zebra')  # z, b, a are not in the vocabulary; e and r are
  assert [c for c, i in zip('hello zebra', ids) if i == tok.unk_id] == ['z', 'b', 'a']
  assert tok.decode(ids) == 'hello \u2047e\u2047r\u2047'
  missing, total, counts = tok.uncovered(['zz top'])
  assert (missing, total) == (4, 6) and counts == {'z': 2, 't': 1, 'p': 1}


@pytest.mark.parametrize('model_type', ['unigram', 'bpe'])
def test_sentencepiece_round_trip_including_chinese(shared_data, model_type):
  tok = D.SentencePieceTokenizer.train(_corpus(shared_data), vocab_size=500, model_type=model_type)
  assert tok.vocab_size == 500
  assert tok._sp.id_to_piece(4) == '<mask>'
  # Unseen characters (not in the corpus) round-trip through byte fallback.
  for text in (CHINESE, MIXED, 'First Citizen: Before we proceed any further, hear me speak.', '  lead', 'trail  ',
               '鳕鱼和鲸鱼 unseen: ß ∑ 𝄞'):
    ids = tok.encode(text)
    assert all(i >= 5 for i in ids), ids
    assert tok.decode(ids) == text
  batch = tok.encode_batch([CHINESE, 'abc'])
  assert [b.tolist() for b in batch] == [tok.encode(CHINESE), tok.encode('abc')]
  assert tok.decode([1] + tok.encode('abc') + [2, 4, 5]) == 'abc'


def test_sentencepiece_vocab_too_large_says_so(shared_data):
  with pytest.raises(D.DataError) as err:
    D.SentencePieceTokenizer.train(_corpus(shared_data, n=200), vocab_size=20000, model_type='unigram')
  message = str(err.value)
  assert '\n' not in message and 'data.vocab_size=20000' in message and '<=' in message
  with pytest.raises(D.DataError) as err:
    D.SentencePieceTokenizer.train(_corpus(shared_data, n=200), vocab_size=50, model_type='bpe')
  assert 'data.vocab_size=50' in str(err.value) and 'too small' in str(err.value)


def test_get_tokenizer_caches_in_workdir_and_reuses(tmp_path):
  workdir = str(tmp_path)
  config = _config(source='builtin:numbers', tokenizer='char')
  tok = D.get_tokenizer(config, workdir)
  assert set(tok.chars) >= set('0123456789 adefghilnorstuvwxy')
  meta = json.loads(open(os.path.join(workdir, 'tokenizer', 'tokenizer.json')).read())
  assert meta['kind'] == 'char' and meta['vocab_size'] == tok.vocab_size
  # A second call (resume / eval) loads the cached one even if the data changed: same ids.
  again = D.get_tokenizer(_config(source='builtin:lm', tokenizer='char'), workdir)
  assert again.chars == tok.chars
  assert again.encode('3207 three') == tok.encode('3207 three')
  with pytest.raises(D.DataError) as err:
    D.get_tokenizer(_config(source='builtin:numbers', tokenizer='byte'), workdir)
  assert 'char' in str(err.value) and 'byte' in str(err.value) and '\n' not in str(err.value)


def test_get_tokenizer_sentencepiece_cached(tmp_path):
  workdir = str(tmp_path)
  config = _config(source='builtin:numbers', tokenizer='sentencepiece', vocab_size=300, spm_model_type='bpe')
  tok = D.get_tokenizer(config, workdir)
  assert os.path.exists(os.path.join(workdir, 'tokenizer', 'spm.model'))
  loaded = D.get_tokenizer(config, workdir)
  text = 'three thousand two hundred seven 3207'
  assert loaded.encode(text) == tok.encode(text) and loaded.decode(tok.encode(text)) == text


def test_unknown_tokenizer_kind(tmp_path):
  with pytest.raises(D.DataError, match='data.tokenizer'):
    D.get_tokenizer(_config(tokenizer='wordpiece'), str(tmp_path))


def test_spm_character_coverage_lets_a_small_vocabulary_cover_chinese(shared_data):
  """data.spm_character_coverage < 1 (SentencePiece's recommendation for CJK): the rarest characters fall back to
  byte pieces, so a vocabulary below the character count trains, and still round-trips every character; at 1.0 the
  same size is refused with one line naming both keys."""
  text = (shared_data / 'zh_fortunes' / 'chinese.txt').read_text(encoding='utf-8')[:60000]
  distinct = len(set(text) - {'\n'})
  with pytest.raises(D.DataError) as err:
    D.SentencePieceTokenizer.train([text], 1200, 'bpe', 1.0)
  assert 'data.vocab_size >=' in str(err.value) and 'data.spm_character_coverage' in str(err.value)
  tok = D.SentencePieceTokenizer.train([text], 1200, 'bpe', 0.98)
  rare = [c for c in set(text) - {'\n'} if len(tok.encode(c)) > 1]  # characters left to byte pieces
  assert tok.vocab_size == 1200 < distinct + 261 and rare
  assert all(tok.decode(tok.encode(c)) == c for c in rare) and tok.decode(tok.encode(text[:500])) == text[:500]
  with pytest.raises(ConfigError, match='spm_character_coverage'):
    validate(_config(tokenizer='sentencepiece', spm_character_coverage=1.5))
