"""Sources: built-in synthetic data, text / parallel files through TFDS ArrayRecord, tfds: by name, and errors."""
import gzip
import math
import os

import numpy as np
import pytest

from configs import default
from jaxformer import data as D
from jaxformer.data import sources


def _config(**data):
  config = default.get_config()
  config.data.update(**data)
  return config


def _read_gz_lines(path):
  with gzip.open(path, 'rt', encoding='utf-8') as f:
    return f.read().split('\n')[:-1]


def _one_line(err):
  message = str(err.value)
  assert '\n' not in message and message, message
  return message


# ------------------------------------------------------------------------------------------------ builtin


@pytest.mark.parametrize('n,words', [
    (0, 'zero'), (7, 'seven'), (13, 'thirteen'), (20, 'twenty'), (45, 'forty five'), (100, 'one hundred'),
    (110, 'one hundred ten'), (3207, 'three thousand two hundred seven'), (90000, 'ninety thousand'),
    (999999, 'nine hundred ninety nine thousand nine hundred ninety nine'), (1000000, 'one million'),
])
def test_number_to_words(n, words):
  assert D.number_to_words(n) == words


def test_builtin_numbers_splits_disjoint_and_correct(tmp_path):
  source = D.get_source(_config(source='builtin:numbers'), str(tmp_path))
  assert source.kind == 'pairs'
  seen = {}
  for name in ('train', 'validation', 'test'):
    split = source.split(name)
    pairs = split.read(range(len(split)))
    srcs = [p[0] for p in pairs]
    assert len(set(srcs)) == len(srcs)
    for s, t in pairs[:200]:
      assert t == D.number_to_words(int(s))
    seen[name] = set(srcs)
  assert not seen['train'] & seen['validation'] and not seen['train'] & seen['test']
  assert not seen['validation'] & seen['test']
  # Several digit lengths are represented in training.
  lengths = {len(s) for s in list(seen['train'])[:5000]}
  assert lengths >= {3, 4, 5, 6}


def test_builtin_lm_splits_disjoint_and_entropy_matches_samples(tmp_path):
  source = D.get_source(_config(source='builtin:lm'), str(tmp_path))
  assert source.kind == 'text'
  texts = {n: source.split(n).read(range(len(source.split(n)))) for n in ('train', 'validation', 'test')}
  assert not set(texts['train']) & set(texts['validation'])
  assert not set(texts['train']) & set(texts['test']) and not set(texts['validation']) & set(texts['test'])
  lang = sources.synthetic_language()
  info = lang.entropy()
  index = {w: i for i, w in enumerate(lang.words)}
  n_lengths = lang.MAX_WORDS - lang.MIN_WORDS + 1

  def nll(doc):
    ids = [index[w] for w in doc.split(' ')]
    logp = math.log(1 / n_lengths) + math.log(lang.initial[ids[0]])
    for a, b in zip(ids, ids[1:]):
      logp += math.log(lang.transition[a, b])
    return -logp

  docs = texts['train'][:5000]
  empirical = np.mean([nll(d) for d in docs])
  stderr = np.std([nll(d) for d in docs]) / math.sqrt(len(docs))
  assert abs(empirical - info['nats_per_document']) < 4 * stderr + 1e-3, (empirical, info)
  chars = np.mean([len(d) for d in docs])
  assert abs(chars - info['chars_per_document']) < 0.02 * chars
  assert D.builtin_lm_entropy() == pytest.approx(info['nats_per_document'] / (info['chars_per_document'] + 1))


# ---------------------------------------------------------------------------------------------- text files


def test_text_source_90_10_split_and_reuse(tmp_path):
  path = tmp_path / 'corpus.txt.gz'
  lines = [f'line {i} 中文 ü' for i in range(50)]
  with gzip.open(path, 'wt', encoding='utf-8') as f:
    f.write('\n'.join(lines[:10]) + '\n\n  \n' + '\n'.join(lines[10:]) + '\n')  # blank lines are skipped
  config = _config(source=f'text:{path}', text_unit='line')
  workdir = str(tmp_path / 'wd')
  source = D.get_source(config, workdir)
  train, val = source.split('train'), source.split('validation')
  assert train.read(range(len(train))) == lines[:45]
  assert val.read(range(len(val))) == lines[45:]
  with pytest.raises(D.DataError, match='test'):
    source.split('test')
  built = [d for d in os.listdir(os.path.join(workdir, 'data')) if d.startswith('jaxformer_text_')]
  assert len(built) == 1
  info = os.path.join(workdir, 'data', built[0], '1.0.0', 'dataset_info.json')
  mtime = os.path.getmtime(info)
  D.get_source(config, workdir)  # converted once: reused, not rebuilt
  assert os.path.getmtime(info) == mtime
  assert len([d for d in os.listdir(os.path.join(workdir, 'data')) if d.startswith('jaxformer_text_')]) == 1

  # The converted dataset is a normal TFDS dataset: readable by name through tfds:.
  by_name = D.get_source(_config(source=f'tfds:{built[0]}', data_dir=os.path.join(workdir, 'data')), 'unused')
  assert by_name.kind == 'text'
  assert by_name.split('train').read([0, 44]) == [lines[0], lines[44]]
  assert len(by_name.split('train[:10]')) == 10


def test_text_source_glob_per_file_and_split_placeholder(tmp_path):
  for i in range(10):
    (tmp_path / f'doc{i}.txt').write_text(f'document {i}\nsecond line\n')
  source = D.get_source(_config(source=f'text:{tmp_path}/doc*.txt'), str(tmp_path / 'wd'))
  train = source.split('train')
  assert len(train) == 9 and train.read([0]) == ['document 0\nsecond line\n']
  assert source.split('validation').read([0]) == ['document 9\nsecond line\n']

  split_dir = tmp_path / 'splits'
  split_dir.mkdir()
  (split_dir / 'wiki.train.txt').write_text('a\nb\nc\n')
  (split_dir / 'wiki.valid.txt').write_text('d\n')
  (split_dir / 'wiki.test.txt').write_text('e\nf\n')
  source = D.get_source(_config(source=f'text:{split_dir}/wiki.{{split}}.txt', text_unit='line'),
                        str(tmp_path / 'wd2'))
  assert source.split('train').read([0, 1, 2]) == ['a', 'b', 'c']
  assert source.split('validation').read([0]) == ['d']
  assert source.split('test').read([0, 1]) == ['e', 'f']


def test_shakespeare_text_source_as_one_document_and_by_lines(shared_data, tmp_path):
  path = shared_data / 'tinyshakespeare' / 'input.txt'
  text = path.read_text(encoding='utf-8')
  # text_unit=file (default): nanoGPT's split, first 90% of the characters; chunks at line ends, nothing lost.
  source = D.get_source(_config(source=f'text:{path}'), str(tmp_path))
  train, val = source.split('train'), source.split('validation')
  cut = int(len(text) * 0.9)
  train_chunks = train.read(range(len(train)))
  assert ''.join(train_chunks) == text[:cut]
  assert ''.join(val.read(range(len(val)))) == text[cut:]
  assert all(len(c) < 2 * sources.TEXT_CHUNK_CHARS for c in train_chunks) and len(train_chunks) > 400
  assert all(c.endswith('\n') for c in train_chunks[:-1])
  # text_unit=line: one example per non-empty line, 90/10 by lines.
  lines = [l for l in text.split('\n') if l.strip()]
  source = D.get_source(_config(source=f'text:{path}', text_unit='line'), str(tmp_path))
  train, val = source.split('train'), source.split('validation')
  cut = int(len(lines) * 0.9)
  assert len(train) == cut and len(val) == len(lines) - cut
  assert train.read([0, cut - 1]) == [lines[0], lines[cut - 1]]
  assert val.read([0, len(val) - 1]) == [lines[cut], lines[-1]]
  with pytest.raises(D.DataError, match='data.text_unit'):
    D.get_source(_config(source=f'text:{path}', text_unit='paragraph'), str(tmp_path))


# ------------------------------------------------------------------------------------------- parallel files


@pytest.fixture(scope='module')
def multi30k_workdir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('multi30k'))


def test_multi30k_parallel_source_is_aligned(shared_data, multi30k_workdir):
  prefix = shared_data / 'multi30k'
  config = _config(source=f'parallel:{prefix}', src_lang='en', tgt_lang='de')
  files = {'train': 'train', 'validation': 'val', 'test': 'test_2016_flickr'}
  for split, stem in files.items():
    en = _read_gz_lines(prefix / f'{stem}.en.gz')
    de = _read_gz_lines(prefix / f'{stem}.de.gz')
    pairs = D.load_text_pairs(config, multi30k_workdir, split)
    assert len(pairs) == len(en) == len(de)
    for i in (0, 1, 17, len(en) // 2, len(en) - 1):
      assert pairs[i] == (en[i], de[i])
  assert D.load_text_pairs(config, multi30k_workdir, 'train')[0] == (
      'Two young, White males are outside near many bushes.',
      'Zwei junge weiße Männer sind im Freien in der Nähe vieler Büsche.')
  # The other direction is its own dataset, with swapped pairs.
  reverse = _config(source=f'parallel:{prefix}', src_lang='de', tgt_lang='en')
  assert D.load_text_pairs(reverse, multi30k_workdir, 'validation')[3] == (
      _read_gz_lines(prefix / 'val.de.gz')[3], _read_gz_lines(prefix / 'val.en.gz')[3])


def test_parallel_split_names_follow_the_documented_rule(tmp_path):
  d = tmp_path / 'corpus'
  d.mkdir()
  for stem, n in (('train', 3), ('dev', 2), ('newstest2014', 1), ('newstest2015', 1)):
    (d / f'{stem}.fr').write_text(''.join(f'{stem} fr {i}\n' for i in range(n)))
    (d / f'{stem}.en').write_text(''.join(f'{stem} en {i}\n' for i in range(n)))
  config = _config(source=f'parallel:{d}', src_lang='fr', tgt_lang='en', test_split='newstest2015')
  source = D.get_source(config, str(tmp_path / 'wd'))
  assert source.split('validation').read([1]) == [('dev fr 1', 'dev en 1')]
  assert source.split('newstest2015').read([0]) == [('newstest2015 fr 0', 'newstest2015 en 0')]
  with pytest.raises(D.DataError, match='test'):
    source.split('test')  # ambiguous newstest* is not guessed


# ---------------------------------------------------------------------------------------------------- errors


def test_error_missing_text_path(tmp_path):
  with pytest.raises(D.DataFileNotFoundError) as err:
    D.get_source(_config(source=f'text:{tmp_path}/nope*.txt'), str(tmp_path))
  assert 'nope*.txt' in _one_line(err)
  assert isinstance(err.value, FileNotFoundError)


def test_error_missing_parallel_prefix_and_language(tmp_path):
  with pytest.raises(D.DataFileNotFoundError) as err:
    D.get_source(_config(source=f'parallel:{tmp_path}/missing'), str(tmp_path))
  assert 'missing' in _one_line(err)
  (tmp_path / 'train.en').write_text('a\n')
  (tmp_path / 'train.de').write_text('b\n')
  with pytest.raises(D.DataFileNotFoundError) as err:
    D.get_source(_config(source=f'parallel:{tmp_path}', src_lang='en', tgt_lang='fr'), str(tmp_path / 'wd'))
  assert 'train.en' in _one_line(err) and 'fr' in str(err.value)


def test_error_parallel_line_counts_differ(tmp_path):
  (tmp_path / 'train.en').write_text('a\nb\nc\n')
  (tmp_path / 'train.de').write_text('x\ny\n')
  with pytest.raises(D.DataError) as err:
    D.get_source(_config(source=f'parallel:{tmp_path}'), str(tmp_path / 'wd'))
  message = _one_line(err)
  assert 'train.en' in message and 'train.de' in message and '3' in message and '2' in message


def test_error_empty_split(tmp_path):
  (tmp_path / 'blank.txt').write_text('\n  \n\n')
  with pytest.raises(D.DataError) as err:
    D.get_source(_config(source=f'text:{tmp_path}/blank.txt'), str(tmp_path / 'wd'))
  assert 'blank.txt' in _one_line(err)
  (tmp_path / 'one.txt').write_text('only line\n')
  source = D.get_source(_config(source=f'text:{tmp_path}/one.txt', text_unit='line'), str(tmp_path / 'wd'))
  with pytest.raises(D.DataError) as err:
    source.split('validation')
  assert 'empty' in _one_line(err) and 'validation' in str(err.value)


def test_error_unknown_tfds_and_builtin_names(tmp_path):
  with pytest.raises(D.DataError) as err:
    D.get_source(_config(source='tfds:no_such_dataset_xyz'), str(tmp_path))
  assert 'no_such_dataset_xyz' in _one_line(err)
  with pytest.raises(D.DataError) as err:  # a real TFDS name, but nothing prepared (and no network)
    D.get_source(_config(source='tfds:tiny_shakespeare'), str(tmp_path))
  assert 'tiny_shakespeare' in _one_line(err) and 'not prepared' in str(err.value)
  with pytest.raises(D.DataError) as err:
    D.get_source(_config(source='builtin:nope'), str(tmp_path))
  assert 'builtin:nope' in _one_line(err)
  with pytest.raises(D.DataError) as err:
    D.get_source(_config(source='builtin:lm'), str(tmp_path)).split('dev')
  assert "'dev'" in _one_line(err)
