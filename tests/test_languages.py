"""Every language and tokenizer: per-token byte/char tables, unseen characters (<unk>, reported at start-up, a
threshold that fails before step 1), bits per character through training and eval.py, the Chinese recipe."""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from configs import default, zh_char
from jaxformer import data as data_lib
from jaxformer.apps import evaluate as evaluation
from jaxformer.training import checkpoint as ckpt_lib
from jaxformer.apps.train import run

REPO = pathlib.Path(__file__).resolve().parents[1]
ZH = '天地玄黄宇宙洪荒日月盈昃辰宿列张寒来暑往秋收冬藏闰余成岁律吕调阳云腾致雨露结为霜金生丽水玉出昆冈'
TRAIN_LINES = [ZH[i:i + 9] + ' ok' for i in range(0, len(ZH) - 9, 3)] * 4
# '鸟' and '龙' never occur in training; '€' (3 bytes in UTF-8 too) neither
VALID_LINES = ['天地玄黄鸟宇宙洪荒', '日月盈昃龙辰宿列张', '寒来暑往 ok €', '秋收冬藏闰余成岁']
UNSEEN = sum(c in '鸟龙€' for line in VALID_LINES for c in line)


@pytest.mark.parametrize('kind', ['char', 'byte', 'sentencepiece'])
def test_token_tables_count_the_decoded_bytes_and_characters(kind):
  texts = ['中文 text, 混合 ASCII', '\U0001F600 émoji', '天地玄黄\n宇宙洪荒']
  if kind == 'char':
    tok = data_lib.CharTokenizer.build(texts)
  elif kind == 'byte':
    tok = data_lib.ByteTokenizer()
  else:
    tok = data_lib.SentencePieceTokenizer.train(texts * 20, vocab_size=300, model_type='bpe')
  assert tok.token_bytes.shape == tok.token_chars.shape == (tok.vocab_size,)
  specials = [tok.pad_id, tok.bos_id, tok.eos_id, tok.mask_id]  # <unk> is the char tokenizer's '\u2047'
  assert (tok.token_bytes[specials] == 0).all() and (tok.token_chars[specials] == 0).all()
  for text in texts:
    ids = np.asarray(tok.encode(text))
    assert tok.decode(ids) == text
    # sentencepiece also counts the dummy-prefix space it adds before each encoded text (decode drops it)
    extra = 1 if kind == 'sentencepiece' else 0
    assert tok.token_bytes[ids].sum() == len(text.encode()) + extra, text
    assert tok.token_chars[ids].sum() == len(text) + extra, text


def test_char_unk_counts_as_the_character_it_decodes_to():
  tok = data_lib.CharTokenizer.build(['abc'])
  ids = np.asarray(tok.encode('a中b'))
  assert ids[1] == tok.unk_id and tok.decode(ids) == 'a\u2047b'
  assert tok.token_chars[ids].sum() == 3 and tok.token_bytes[ids].sum() == len('a\u2047b'.encode())


def _write_corpus(root: pathlib.Path) -> str:
  (root / 'train.txt').write_text('\n'.join(TRAIN_LINES) + '\n', encoding='utf-8')
  (root / 'validation.txt').write_text('\n'.join(VALID_LINES) + '\n', encoding='utf-8')
  return f'text:{root}/{{split}}.txt'


def _tiny_config(source: str):
  config = default.get_config()
  config.model.update(num_layers=1, num_heads=2, d_model=32, d_ff=64, max_len=16)
  config.data.update(source=source, text_unit='line', tokenizer='char', seq_len=16, prefetch=1)
  config.train.update(batch_size=4, num_steps=4, warmup_steps=1, log_every=2, eval_every=4, eval_steps=-1,
                      eval_batch_size=4)
  config.checkpoint.update(every_steps=4, async_save=False)
  config.mesh.update(data=1, fsdp=1, tensor=1, distributed='off')
  return config


def test_char_model_with_unseen_validation_characters_trains_evaluates_and_reports_them(tmp_path, capsys):
  config = _tiny_config(_write_corpus(tmp_path))
  total = sum(len(line) for line in VALID_LINES)
  out = run(config, str(tmp_path / 'run'))
  printed = capsys.readouterr().out
  assert f'validation {UNSEEN} of {total} ({100 * UNSEEN / total:.3f}%' in printed
  assert printed.count('characters outside the char vocabulary') == 1  # once, at start-up, not per evaluation
  assert out['step'] == 4 and np.isfinite(out['eval_loss'])
  assert 0 < out['eval_bits_per_byte'] < out['eval_bits_per_char']  # CJK: ~3 bytes per character

  # eval.py scores the same tokens: the same bits per character; every validation character counted once
  # (an <unk> as the one character '\u2047' it decodes to: 3 bytes, like the CJK characters and '€' it replaces).
  results = evaluation.run(config, str(tmp_path / 'run'))
  assert results['bits_per_char'] == pytest.approx(out['eval_bits_per_char'], rel=1e-5)
  assert results['bits_per_byte'] == pytest.approx(out['eval_bits_per_byte'], rel=1e-5)
  assert results['num_chars'] == total
  assert results['num_bytes'] == sum(len(line.encode()) for line in VALID_LINES)
  assert 'validation' in capsys.readouterr().out
  with open(tmp_path / 'run' / 'eval.json') as f:
    assert json.load(f)['bits_per_char'] == pytest.approx(results['bits_per_char'])


def test_unknown_character_threshold_is_one_line_before_step_1(tmp_path):
  source = _write_corpus(tmp_path)
  workdir = tmp_path / 'run'
  out = subprocess.run(
      [sys.executable, 'train.py', '--config=configs/gpt_tiny.py', f'--workdir={workdir}',
       f'--config.data.source={source}', '--config.data.text_unit=line', '--config.data.seq_len=16',
       '--config.model.max_len=16', '--config.train.batch_size=4', '--config.mesh.data=1',
       '--config.data.max_unk_fraction=0.01'], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode != 0
  lines = [line for line in out.stderr.splitlines() if line.strip()]
  assert len(lines) == 1, out.stderr
  assert lines[0].startswith('error: ') and 'data.max_unk_fraction=0.01' in lines[0] and "'validation'" in lines[0]
  assert 'Traceback' not in out.stdout + out.stderr
  assert not (workdir / 'checkpoints').exists() and not (workdir / 'metrics.jsonl').exists()


@pytest.fixture(scope='module')
def zh_data_dir(tmp_path_factory):
  """One TFDS conversion of chinese.txt for both variants."""
  return str(tmp_path_factory.mktemp('zh_data'))


@pytest.mark.parametrize('variant', ['char', 'bpe'])
def test_zh_recipe_smoke(variant, shared_data, zh_data_dir, tmp_path, monkeypatch):
  monkeypatch.chdir(REPO)
  config = zh_char.get_config(variant)
  config.mesh.update(data=1, fsdp=1, tensor=1, distributed='off')
  config.data.update(prefetch=1, data_dir=zh_data_dir)
  config.checkpoint.update(every_steps=1000, async_save=False)
  config.train.update(num_steps=2, steps_per_call=1, log_every=1, eval_every=2, eval_steps=1, eval_batch_size=16)
  out = run(config, str(tmp_path))
  assert out['step'] == 2 and np.isfinite(out['eval_bits_per_char']) and out['eval_bits_per_char'] > 0


def test_a_data_problem_at_evaluation_stops_the_run_after_that_steps_checkpoint(tmp_path, monkeypatch):
  config = _tiny_config(_write_corpus(tmp_path))
  config.train.update(eval_every=2, num_steps=4)
  config.checkpoint.every_steps = 2

  def broken(self, params, rest, **kwargs):
    raise data_lib.DataError('the evaluation found a data problem')

  monkeypatch.setattr(evaluation.Evaluator, 'training_row', broken)
  with pytest.raises(data_lib.DataError, match='data problem'):
    run(config, str(tmp_path / 'run'))
  assert ckpt_lib.all_steps(str(tmp_path / 'run')) == [2]


def test_translation_into_chinese_reports_zh_tokenized_bleu_and_chrf(tmp_path):
  src = [f'word{i} number{i % 7}' for i in range(40)]
  tgt = [ZH[i % 30:i % 30 + 6] for i in range(40)]
  for split, rows in (('train', slice(0, 32)), ('validation', slice(32, 40))):
    (tmp_path / f'{split}.en').write_text('\n'.join(src[rows]) + '\n', encoding='utf-8')
    (tmp_path / f'{split}.zh').write_text('\n'.join(tgt[rows]) + '\n', encoding='utf-8')
  config = _tiny_config(f'parallel:{tmp_path}')
  config.model.arch = 'encoder_decoder'
  config.data.update(src_lang='en', tgt_lang='zh', src_seq_len=16, pack=False, sampling='streams')
  config.train.update(num_steps=2, eval_every=2)
  config.decode.max_len = 8
  run(config, str(tmp_path / 'run'))
  results = evaluation.run(config, str(tmp_path / 'run'))
  assert '|tok:zh|' in results['sacrebleu_signature'] and results['direction'] == 'en->zh'
  assert 0 <= results['chrf'] <= 100 and results['chrf_signature'].startswith('nrefs:1|')
  assert np.isfinite(results['bits_per_char']) and results['num_chars'] == sum(len(t) for t in tgt[32:])
