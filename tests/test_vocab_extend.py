"""data.tokenizer_extra: a vocabulary that grows (added tokens, embeddings and output layer grown, PEFT trains the
new rows, export writes the grown tokenizer and model).

Reference numbers: tests/fixtures/hf/added_tokens.json, made by tests/fixtures/hf/make_added_tokens.py with
transformers 5.25.0 (`add_tokens` ids for the gpt2, llama and bert fixtures; the rows `resize_token_embeddings`
gives). The exported grown model loads in transformers with the same logits: tests/fixtures/hf/check_export.py
`vocab` + `check` (run_llama_vocab_extend, 2026-12-06: max |logits diff| 4.65e-6; AutoTokenizer on the exported
tokenizer.json gives jaxformer's ids for every text).
"""
import json
import os
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tokenizers
from flax import nnx

from configs import hf as hf_recipe
from jaxformer import resolve
from jaxformer import sharding as shd
from jaxformer.apps.train import run
from jaxformer.data import tokenizers as tok_lib
from jaxformer.data.hf_tokenizer import HFTokenizer
from jaxformer.errors import DataError
from jaxformer.hf import weights
from jaxformer.training import state as state_lib
from jaxformer.training import vocab_growth
from tests.test_train import tiny

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = REPO / 'tests' / 'fixtures' / 'hf'
REFERENCE = json.loads((FIXTURES / 'added_tokens.json').read_text(encoding='utf-8'))
ONE_DEVICE = {**os.environ, 'XLA_FLAGS': '', 'JAX_PLATFORMS': 'cpu'}
CORPUS = ('First Citizen: before we proceed any further, hear me speak. 你好，世界。天下大同，世界和平。\n' * 40)


forward = nnx.jit(lambda model, ids: model(ids))  # one compiled program, not op by op


def token_file(directory: pathlib.Path, tokens) -> str:
  path = directory / 'extra.txt'
  path.write_text('\n'.join(tokens) + '\n', encoding='utf-8')
  return str(path)


# -------------------------------------------------------------------------------------------------- tokenizers
def test_byte_and_char_tokenizers_take_added_tokens_after_their_vocabulary():
  byte = tok_lib.ByteTokenizer()
  assert byte.extend(['你好', '好', 'a', '你好', '世']) == ['你好', '好', '世']  # a byte already has an id
  assert (byte.base_vocab_size, byte.vocab_size) == (261, 264)
  ids = byte.encode('a你好世界好')
  # longest token first ('你好' before '好'), '界' (not added) stays three bytes
  assert ids == [ord('a') + 5, 261, 263, *(b + 5 for b in '界'.encode()), 262]
  assert byte.decode(ids) == 'a你好世界好'
  assert list(byte.token_chars[-3:]) == [2, 1, 1] and list(byte.token_bytes[-3:]) == [6, 3, 3]

  char = tok_lib.CharTokenizer(['a', 'b'])
  assert char.extend(['b', '中', '文']) == ['中', '文'] and char.vocab_size == 9
  assert char.encode('ab中文x') == [5, 6, 7, 8, 3] and char.decode([5, 7, 8]) == 'a中文'
  with pytest.raises(DataError, match='single characters'):
    char.extend(['中文'])


def test_sentencepiece_takes_added_tokens_as_user_defined_pieces():
  sp = tok_lib.SentencePieceTokenizer.train(['hear me speak, we proceed further\n' * 30], 300, 'bpe')
  base = sp.vocab_size
  assert sp.extend(['你好', 'zqx']) == ['你好', 'zqx'] and sp.vocab_size == base + 2
  ids = sp.encode('speak 你好zqxzqx')
  assert ids.count(base) == 1 and ids.count(base + 1) == 2  # always whole, never merged into others
  assert sp.decode(ids) == 'speak 你好zqxzqx'


@pytest.mark.parametrize('name', ['gpt2', 'llama', 'bert'])
def test_hf_added_tokens_give_transformers_ids(name):
  """add_tokens on a byte-level BPE, a Metaspace BPE with byte fallback and a lower-casing WordPiece: the ids and
  decoded texts transformers gave, including tokens the vocabulary had ('你' in BERT's) and a multi-word one."""
  ref = REFERENCE['fixtures'][name]
  tok = HFTokenizer(str(FIXTURES / name))
  tok.extend(REFERENCE['extra_tokens'])
  assert tok.vocab_size == ref['vocab_size']
  for case in ref['tokenizer']:
    ids = tok.encode_with_specials(case['text'])
    assert ids == case['ids'], case['text']
    assert tok.decode(ids) == case['decoded']


def test_added_tokens_are_kept_in_the_workdir_and_a_changed_file_is_refused(tmp_path):
  first = token_file(tmp_path, ['你好', '世'])
  tok = tok_lib.extend_from_workdir(tok_lib.ByteTokenizer(), str(tmp_path / 'w'), first)
  again = tok_lib.extend_from_workdir(tok_lib.ByteTokenizer(), str(tmp_path / 'w'))  # eval: no key needed
  assert again.extra_tokens == tok.extra_tokens == ('你好', '世')
  other = tmp_path / 'other.txt'
  other.write_text('你好\n界\n', encoding='utf-8')
  with pytest.raises(DataError, match='new --workdir'):
    tok_lib.extend_from_workdir(tok_lib.ByteTokenizer(), str(tmp_path / 'w'), str(other))


# ----------------------------------------------------------------------------------------- model growth (HF)
def test_grow_vocab_appends_the_mean_row_along_the_vocabulary_axis():
  emb = jnp.arange(12, dtype=jnp.float32).reshape(4, 3)
  grown = vocab_growth.mean_rows(emb, 0, 6)
  np.testing.assert_array_equal(grown[:4], emb)
  np.testing.assert_allclose(grown[4:], np.tile(np.asarray(emb).mean(0), (2, 1)))
  assert vocab_growth.grown_shape_axis((3, 4), (3, 6), 4, 6) == 1
  with pytest.raises(ValueError):
    vocab_growth.grown_shape_axis((3, 4), (5, 6), 4, 6)


@pytest.fixture(scope='module')
def hf_extra(tmp_path_factory):
  return token_file(tmp_path_factory.mktemp('tokens'), REFERENCE['extra_tokens'])


def grown_model(name: str, extra: str, workdir: str):
  config = hf_recipe.get_config(str(FIXTURES / name))
  config.data.update(tokenizer_extra=extra, source='builtin:lm')
  config.mesh.update(data=1, fsdp=1, tensor=1, distributed='off')
  r = resolve.resolve(config, workdir, training=False)
  return r, state_lib.init_from_model(r.config, r.mesh, r.rules)


@pytest.mark.parametrize('name', ['llama'])  # untied: embeddings and lm_head (the byte run below is tied)
def test_init_from_hf_grows_rows_as_transformers_and_keeps_old_logits(name, hf_extra, tmp_path):
  ref = REFERENCE['fixtures'][name]
  r, model = grown_model(name, hf_extra, str(tmp_path))
  old, new = ref['old_vocab_size'], ref['vocab_size']
  assert r.config.model.vocab_size == new
  params = {'.'.join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  # transformers samples around the mean with 1e-9 x the covariance; jaxformer takes the mean
  np.testing.assert_allclose(params['embed.embedding'][old:], ref['embed_new_rows'], atol=1e-4)
  np.testing.assert_allclose(params['embed.embedding'][old:], np.tile(ref['embed_mean'], (new - old, 1)), atol=1e-6)
  if 'unembed.kernel' in params:
    np.testing.assert_allclose(params['unembed.kernel'][:, old:].T, ref['output_new_rows'], atol=1e-4)
  # the base's inputs: its logits for the old tokens are transformers' (expected.json), the new ones all equal
  base = json.loads((FIXTURES / name / 'expected.json').read_text())
  logits = np.asarray(forward(model, jnp.asarray(base['input_ids'])))
  np.testing.assert_allclose(logits[..., :old], base['logits'], atol=1e-4)
  np.testing.assert_allclose(logits[..., old:], np.repeat(logits[..., old:old + 1], new - old, -1), atol=1e-5)
  # and the resized transformers model's logits, inputs with new ids included (to its sampling noise)
  np.testing.assert_allclose(np.asarray(forward(model, jnp.asarray(ref['input_ids']))), ref['logits'], atol=1e-2)


# ------------------------------------------------------------------------ a jaxformer base, LoRA, resume, eval
@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  path = tmp_path_factory.mktemp('corpus') / 'text.txt'
  path.write_text(CORPUS, encoding='utf-8')
  return path


def byte_config(corpus, **train):
  config = tiny('gpt_tiny', **train)
  config.data.update(tokenizer='byte', source=f'text:{corpus}', seq_len=32)
  return config


def flat_params(workdir, config):
  model, _ = state_lib.restore_model(str(workdir), ml_collections.ConfigDict(config),
                                     shd.make_mesh(ml_collections.ConfigDict(config)))
  return model, {'.'.join(map(str, p)): np.asarray(v.get_value()) for p, v in
                 nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_lora_run_on_a_grown_byte_vocabulary_starts_from_the_base_and_trains_the_new_rows(corpus, tmp_path):
  base = tmp_path / 'base'
  run(byte_config(corpus, num_steps=4), str(base))
  base_model, base_params = flat_params(base, json.loads((base / 'config.json').read_text()))

  config = byte_config(corpus, num_steps=6, learning_rate=3e-2)
  config.seed = 3
  config.peft.update(method='lora', rank=4)
  config.checkpoint.init_from = str(base)
  config.data.tokenizer_extra = token_file(tmp_path, ['你好', '世界', '天下'])
  grown = tmp_path / 'grown'
  r = resolve.resolve(config.copy_and_resolve_references(), str(grown), training=True)
  assert r.config.model.vocab_size == 264 and r.config.peft.train_vocab == 'yes'  # auto: the new rows train
  start = state_lib.init_from_model(r.config, r.mesh, r.rules)
  ids = jnp.asarray([[1, 50, 60, 70, 80]])
  np.testing.assert_allclose(np.asarray(forward(start, ids))[..., :261], np.asarray(forward(base_model, ids)),
                             atol=1e-5)

  run(config, str(grown))
  saved = json.loads((grown / 'config.json').read_text())
  model, params = flat_params(grown, saved)
  emb = params['embed.embedding']
  assert emb.shape == (264, 32)
  mean = base_params['embed.embedding'].mean(0)
  assert np.abs(emb[261:] - mean).max() > 1e-3  # the added tokens' rows trained
  # eval reads the workdir's tokenizer (the added tokens kept there) and scores the Chinese text with them
  tok = tok_lib.get_tokenizer(r.config, str(grown))
  assert tok.vocab_size == 264 and tok.encode('你好世界')[:2] == [261, 262]


# ---------------------------------------------------------------------------------------------- export, CLI
def test_export_writes_the_grown_tokenizer_and_model(hf_extra, corpus, tmp_path):
  workdir, out = tmp_path / 'run', tmp_path / 'hf'
  config = hf_recipe.get_config(str(FIXTURES / 'llama'))
  config.data.update(tokenizer_extra=hf_extra, source=f'text:{corpus}', seq_len=16, prefetch=1)
  config.mesh.update(data=1, fsdp=1, tensor=1, distributed='off')
  config.train.update(num_steps=2, eval_every=1000, eval_steps=1, log_every=1, learning_rate=1e-2, warmup_steps=0)
  config.checkpoint.update(every_steps=2, async_save=False)
  run(config, str(workdir))
  done = subprocess.run([sys.executable, '-m', 'jaxformer.hf', 'export', f'--workdir={workdir}', f'--output={out}'],
                        cwd=REPO, capture_output=True, text=True, timeout=300, env=ONE_DEVICE)
  assert done.returncode == 0, done.stderr[-2000:]
  ref = REFERENCE['fixtures']['llama']
  exported = tokenizers.Tokenizer.from_file(str(out / 'tokenizer.json'))
  assert exported.get_vocab_size(with_added_tokens=True) == ref['vocab_size']
  ours = HFTokenizer(str(FIXTURES / 'llama'))
  ours.extend(REFERENCE['extra_tokens'])
  for case in ref['tokenizer']:
    assert HFTokenizer(str(out)).encode_with_specials(case['text']) == case['ids'] == ours.encode_with_specials(
        case['text'])
  tensors = weights.read_dir(str(out))
  assert tensors['model.embed_tokens.weight'].shape == (ref['vocab_size'], 32)
  assert tensors['lm_head.weight'].shape == (ref['vocab_size'], 32)
  assert json.loads((out / 'config.json').read_text())['vocab_size'] == ref['vocab_size']


def test_train_py_a_multi_character_token_for_the_char_tokenizer_is_one_line(tmp_path, corpus):
  extra = token_file(tmp_path, ['中', '中文'])
  out = subprocess.run([sys.executable, 'train.py', '--config=configs/gpt_tiny.py', f'--workdir={tmp_path / "w"}',
                        f'--config.data.source=text:{corpus}', f'--config.data.tokenizer_extra={extra}',
                        '--config.train.num_steps=1'], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env=ONE_DEVICE)
  lines = [line for line in out.stderr.splitlines() if line.strip()]
  assert out.returncode != 0 and len(lines) == 1, out.stderr[-2000:]
  assert 'data.tokenizer_extra' in lines[0] and "'中文'" in lines[0] and 'data.tokenizer=byte' in lines[0]


def test_model_vocab_size_grows_to_hold_the_added_tokens_or_is_one_line():
  from configs import default
  from jaxformer.errors import ConfigError
  byte = tok_lib.ByteTokenizer()
  byte.extend(['你好', '世界'])
  config = default.get_config()
  config.peft.method = 'lora'
  config.model.vocab_size = 261  # the base's size (a Hugging Face config.json's): grows, as resize_token_embeddings
  resolve.fill_vocab_size(config, byte)
  assert config.model.vocab_size == 263 and config.peft.train_vocab == 'yes'
  config.model.vocab_size = 200
  with pytest.raises(ConfigError, match='before the 2 of data.tokenizer_extra; set model.vocab_size to 0'):
    resolve.fill_vocab_size(config, byte)
