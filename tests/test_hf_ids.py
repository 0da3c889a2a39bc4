"""Special ids follow the tokenizer (data.tokenizer=hf:<dir>): row framing, loss weights, decoding's cut at eos.

References are transformers' own ids (tests/fixtures/hf/<name>/expected.json: `tokenizer(text)['input_ids']`) and
the pretrained fixture model called directly; jaxformer's own tokenizers keep their rows (tests/test_data_*.py).
"""
import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from configs import hf as hf_recipe
from jaxformer import data as D
from jaxformer import hf, metrics
from jaxformer.apps import evaluate as evaluation
from jaxformer.data import sources
from jaxformer.data.rows import model_inputs
from jaxformer.data.tokenizers import unscored_target
from jaxformer.training import step as step_lib
from jaxformer.training import state as state_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = REPO / 'tests' / 'fixtures' / 'hf'
ONE_DEVICE = {**os.environ, 'XLA_FLAGS': os.environ.get('XLA_FLAGS', '').replace(
    '--xla_force_host_platform_device_count=8', '').strip()}
EXTRA_LINES = ('a!b !', 'Hi!')  # '!' is id 0 in the GPT-2 fixture (as in GPT-2): a real token


def _texts(name: str) -> list[dict]:
  """transformers' {'text', 'ids'} of the fixture's one-line texts."""
  with open(FIXTURES / name / 'expected.json', encoding='utf-8') as f:
    return [t for t in json.load(f)['tokenizer'] if '\n' not in t['text']]


def _config(name: str, tmp_path: pathlib.Path, lines: list[str], **data):
  for split in ('train', 'validation'):
    (tmp_path / f'{split}.txt').write_text(''.join(line + '\n' for line in lines), encoding='utf-8')
  config = hf_recipe.get_config(str(FIXTURES / name))
  config.data.update({'source': f'text:{tmp_path}/{{split}}.txt', 'text_unit': 'line', 'seq_len': 24, 'pack': False,
                      'prefetch': 0, **data})
  return config


@pytest.mark.parametrize('name', ['gpt2', 'llama'])
def test_rows_are_framed_as_transformers_frames_the_text(name, tmp_path):
  texts = _texts(name)
  config = _config(name, tmp_path, [t['text'] for t in texts])
  workdir = str(tmp_path / 'wd')
  tok = D.get_tokenizer(config, workdir)
  batch = next(D.make_eval_iterator(config, tok, workdir, 'train', layout=D.DataLayout(len(texts))))
  for r, t in enumerate(texts):
    # transformers' framing (Llama: <s> first; GPT-2: nothing), and GPT-2's documents end in <|endoftext|>
    doc = t['ids'] + ([tok.eos_id] if name == 'gpt2' else [])
    assert (doc[0] == 1) == (name == 'llama') and tok.eos_id == (300 if name == 'gpt2' else 2)
    n = len(doc) - 1
    np.testing.assert_array_equal(batch['tokens'][r, :n], doc[:-1])
    np.testing.assert_array_equal(batch['targets'][r, :n], doc[1:])
    assert np.all(batch['targets'][r, n:] == -1) and np.all(batch['segment_ids'][r, n:] == 0)


def test_a_real_id_0_target_is_scored_and_padding_is_not(tmp_path):
  config = _config('gpt2', tmp_path, list(EXTRA_LINES))
  workdir = str(tmp_path / 'wd')
  tok = D.get_tokenizer(config, workdir)
  batch = next(D.make_eval_iterator(config, tok, workdir, 'train', layout=D.DataLayout(2)))
  targets = batch['targets']
  weights = np.asarray(step_lib.token_weights(jnp.asarray(targets), unscored_target(config)))
  real = batch['segment_ids'] != 0
  assert (targets[real] == 0).sum() == 3  # the three '!' that are targets ('a!b !' -> a ! b ' !' <eot>; Hi!)
  np.testing.assert_array_equal(weights, real.astype(np.float32))
  # jaxformer's own tokenizers: 0 is their padding and stays unscored
  own = default.get_config()
  assert unscored_target(own) == 0
  np.testing.assert_array_equal(step_lib.token_weights(jnp.asarray([[5, 0, 7]]), unscored_target(own)), [[1, 0, 1]])
  # the loss itself counts the id-0 targets (token_metrics, the plain reference, agrees)
  logits = jax.random.normal(jax.random.key(0), targets.shape + (tok.vocab_size,))
  m = metrics.token_metrics(logits, jnp.asarray(targets), unscored=unscored_target(config))
  assert float(m['weight_sum']) == real.sum()


def _reference_loss(model, batch) -> float:
  logits = np.asarray(model(**{k: jnp.asarray(v) for k, v in model_inputs(batch).items()}, deterministic=True),
                      np.float64)
  targets = batch['targets']
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
      -1, keepdims=True)
  nll = -np.take_along_axis(logp, np.maximum(targets, 0)[..., None], -1)[..., 0]
  w = targets >= 0
  return float((nll * w).sum() / w.sum())


@pytest.mark.parametrize('name', ['gpt2', 'llama'])
def test_train_py_first_loss_is_the_pretrained_models_loss_on_the_same_rows(name, tmp_path):
  lines = [t['text'] for t in _texts(name)] + list(EXTRA_LINES)
  config = _config(name, tmp_path, lines)
  overrides = {'train.num_steps': 1, 'train.log_every': 1, 'train.eval_every': 1, 'train.eval_steps': 1,
               'train.batch_size': 2, 'data.seq_len': 16, 'checkpoint.every_steps': 1,
               'checkpoint.async_save': False, 'model.dropout': 0.0, 'model.attention_dropout': 0.0,
               'data.source': config.data.source, 'data.text_unit': 'line', 'data.prefetch': 0,
               'data.pack': True}
  workdir = tmp_path / 'run'
  out = subprocess.run([sys.executable, 'train.py', f'--config=configs/hf.py:{FIXTURES / name}',
                        f'--workdir={workdir}', *(f'--config.{k}={v}' for k, v in overrides.items())],
                       cwd=REPO, capture_output=True, text=True, timeout=600, env=ONE_DEVICE)
  assert out.returncode == 0, out.stderr[-3000:]
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  logged = next(r['train_loss'] for r in rows if 'train_loss' in r)

  for key, value in overrides.items():
    section, leaf = key.split('.')
    config[section][leaf] = value
  tok = D.get_tokenizer(config, str(workdir))
  batch = next(D.make_train_iterator(config, tok, str(workdir), layout=D.DataLayout(2)))
  assert (batch['targets'] >= 0).sum() > 0
  _, model = hf.load(str(FIXTURES / name), config.model)
  want = _reference_loss(model, batch)
  assert math.isclose(logged, want, rel_tol=1e-4), (logged, want)
  random = _reference_loss(state_lib.build_model(config, seed=123), batch)
  assert abs(random - want) > 1e-3  # i.e. the pretrained weights, not a fresh model, made the first step




def _list_source(kind: str, examples: list):
  return sources.Source('builtin:test', kind, {s: sources.ListSplit(s, examples) for s in ('train', 'validation')})


def test_random_windows_find_gpt2_documents_by_position_not_by_a_bos_id(tmp_path):
  config = _config('gpt2', tmp_path, [], sampling='random_windows', seq_len=12)
  config.train.batch_size = 8
  tok = D.get_tokenizer(config, str(tmp_path))
  source = _list_source('text', ['Hello world!', 'a!b !', 'café naïve', 'Hi!'] * 3)
  batch = next(D.make_train_iterator(config, tok, str(tmp_path), layout=D.DataLayout(8), source=source))
  seg, tokens, targets, pos = batch['segment_ids'], batch['tokens'], batch['targets'], batch['positions']
  new = seg[:, 1:] != seg[:, :-1]  # a document starts at column j + 1
  assert new.any()
  assert np.all(tokens[:, :-1][new] == tok.eos_id)  # ... right after <|endoftext|> (GPT-2 has no BOS)
  assert np.all(pos[:, 1:][new] == 0) and np.all(targets[:, :-1][new] == -1)  # not predicted across documents
  assert np.all(targets[:, :-1][~new] == tokens[:, 1:][~new])  # every other next token is scored, id 0 included


def test_bert_masking_uses_its_mask_id_and_never_masks_cls_sep(tmp_path):
  config = _config('bert', tmp_path, [], mask_rate=0.5, seq_len=16)
  tok = D.get_tokenizer(config, str(tmp_path))
  texts = ['Hello world!', 'café naïve', 'hear me speak.'] * 4  # each fits a row
  source = _list_source('text', texts)
  batch = next(D.make_eval_iterator(config, tok, str(tmp_path), 'train', layout=D.DataLayout(12), source=source))
  original = np.zeros_like(batch['tokens'])
  for r, text in enumerate(texts):
    doc = tok.encode_with_specials(text)  # [CLS] .. [SEP], as transformers frames it
    assert len(doc) <= 16
    original[r, :len(doc)] = doc
  chosen = batch['targets'] >= 0
  assert chosen.sum() > 10
  np.testing.assert_array_equal(batch['targets'][chosen], original[chosen])
  assert not np.isin(original[chosen], [tok.bos_id, tok.eos_id, tok.pad_id]).any()  # [CLS] [SEP] [PAD]
  masked = batch['tokens'] == tok.mask_id
  assert masked.sum() > 0.5 * chosen.sum() and np.all(chosen[masked])
  np.testing.assert_array_equal(batch['tokens'][~chosen], original[~chosen])
  assert np.all(batch['targets'][~chosen] == -1)


def test_t5_pairs_are_framed_as_transformers_labels(tmp_path):
  config = _config('t5_v1_0', tmp_path, [], seq_len=16, src_seq_len=16)
  tok = D.get_tokenizer(config, str(tmp_path))
  pairs = [('Hello world!', 'café naïve'), ('Hi!', 'a b')]
  source = _list_source('parallel', pairs)
  batch = next(D.make_eval_iterator(config, tok, str(tmp_path), 'train', layout=D.DataLayout(2), source=source))
  for r, (src, tgt) in enumerate(pairs):
    enc, labels = tok.encode_with_specials(src), tok.encode_with_specials(tgt)  # T5: ids + </s>
    assert enc[-1] == labels[-1] == 1
    np.testing.assert_array_equal(batch['src_tokens'][r, :len(enc)], enc)
    np.testing.assert_array_equal(batch['targets'][r, :len(labels)], labels)
    np.testing.assert_array_equal(batch['tgt_tokens'][r, :len(labels)], [0] + labels[:-1])  # decoder_start = pad 0
    assert D.encode_source(tok, src, 16) == enc


@pytest.mark.parametrize('name', ['gpt2', 'llama'])
def test_instruction_scores_the_response_and_its_end_only(name, tmp_path):
  config = _config(name, tmp_path, [])
  tok = D.get_tokenizer(config, str(tmp_path))
  prompt, response = 'Hi! Say', ' hello world!'
  source = _list_source('jsonl', [sources.Instruction(prompt, response)])
  batch = next(D.make_eval_iterator(config, tok, str(tmp_path), 'train', layout=D.DataLayout(1), source=source))
  p, r = tok.encode(prompt), tok.encode(response)
  seq = tok.prefix_ids + p + r + [tok.eos_id]  # GPT-2: no prefix; Llama: <s>; both end in eos (to learn to stop)
  n = len(seq) - 1
  np.testing.assert_array_equal(batch['tokens'][0, :n], seq[:-1])
  scored = batch['targets'][0, :n] >= 0
  np.testing.assert_array_equal(batch['targets'][0, :n][scored], r + [tok.eos_id])
  assert not scored[:len(tok.prefix_ids) + len(p) - 1].any()


def test_generate_cuts_at_decode_eos_id_not_at_0(tmp_path):
  """Decoding fills 0 after eos (GPT-2's '!'): eval cuts each row at decode.eos_id instead."""
  with open(FIXTURES / 'gpt2' / 'expected.json', encoding='utf-8') as f:
    e = json.load(f)['generate']
  prompt, new = e['prompt'][0], e['output'][0][len(e['prompt'][0]):]  # transformers' greedy continuation
  config = hf_recipe.get_config(str(FIXTURES / 'gpt2'))
  eos = new[5]  # a decode.eos_id other than the tokenizer's: the rows end there, not at the 0s written after it
  config.decode.update(max_len=len(new), eos_id=eos)
  r = evaluation.restore(config, str(tmp_path / 'wd'))  # no checkpoint: the pretrained weights (init_from)
  assert evaluation._decode_batches(r, prompts=[prompt]) == [new[:new.index(eos)]]
  config.decode.eos_id = 300
  r = evaluation.restore(config, str(tmp_path / 'wd'))
  assert evaluation._decode_batches(r, prompts=[prompt]) == [new]


def test_span_corruption_with_a_t5_tokenizer_uses_its_own_sentinels(tmp_path):
  """T5's <extra_id_k> tokens (looked up by name, not jaxformer's end-of-vocabulary convention) replace the spans,
  and the source's sentinels filled with the target's spans give back the original text's ids."""
  lines = [t['text'] for t in _texts('t5_v1_1')] * 4
  config = _config('t5_v1_1', tmp_path, lines, objective='span_corruption', seq_len=16, src_seq_len=32,
                   text_unit='file', pack=True)
  workdir = str(tmp_path / 'wd')
  tok = D.get_tokenizer(config, workdir)
  sentinels = {tok._tok.token_to_id(f'<extra_id_{k}>') for k in range(8)}
  assert None not in sentinels and max(sentinels) < tok.vocab_size
  original = tok.encode_array('\n'.join(lines) + '\n').tolist()
  batch = next(D.make_train_iterator(config, tok, workdir))
  checked = 0
  for r in range(batch['src_tokens'].shape[0]):
    for s in range(1, batch['src_segment_ids'][r].max() + 1):
      src = batch['src_tokens'][r][batch['src_segment_ids'][r] == s].tolist()
      tgt = batch['targets'][r][batch['tgt_segment_ids'][r] == s].tolist()
      assert src[-1] == tok.eos_id and tgt[-1] == tok.eos_id
      used = [t for t in src if t in sentinels]
      assert used and used == [t for t in tgt if t in sentinels]  # the same sentinels, in the same order
      spans, current = {}, None
      for t in tgt[:-1]:
        if t in sentinels:
          current = spans.setdefault(t, [])
        else:
          current.append(t)
      filled = [x for t in src[:-1] for x in (spans[t] if t in sentinels else [t])]
      assert any(original[i:i + len(filled)] == filled for i in range(len(original) - len(filled) + 1))
      checked += 1
  assert checked >= 2


@pytest.mark.parametrize('name,extra', [('gpt2', 0), ('qwen2', 0), ('llama', 1), ('t5_v1_1', 1), ('bert', 1)])
def test_byte_and_char_counts_of_hf_tokenizers_match_the_decoded_text(name, extra):
  """bits per byte / char divide by these: byte-level BPE counts exactly (also pieces holding part of a Chinese
  character or an emoji); sentencepiece and WordPiece vocabularies count decode's dropped first space (+1)."""
  from jaxformer.data.hf_tokenizer import HFTokenizer
  tok = HFTokenizer(str(FIXTURES / name))
  texts = ['Hello world, this is a test.', 'naïve café ok?'] + (['床前明月光，疑是地上霜。🙂'] if extra == 0 else [])
  for text in texts:
    ids = tok.encode_array(text)
    decoded = tok.decode(ids)
    assert int(tok.token_bytes[ids].sum()) == len(decoded.encode('utf-8')) + extra, (text, decoded)
    assert int(tok.token_chars[ids].sum()) == len(decoded) + extra, (text, decoded)


@pytest.mark.parametrize('name', ['gpt2', 't5_v1_1', 'llama'])
def test_decode_ids_minus_one_come_from_the_tokenizer_and_agree_with_the_checkpoint(name, tmp_path):
  """decode.eos_id / start_id = -1 (configs/default.py) take the tokenizer's ids: the same ones the checkpoint's
  config names (configs/hf.py reads those), and for encoder_decoder the token training put first in every target."""
  from jaxformer import resolve
  config = _config(name, tmp_path, ['Hello world!'])
  expected = (config.decode.eos_id, config.decode.start_id)  # from the checkpoint's config.json
  config.decode.update(eos_id=-1, start_id=-1)
  tok = D.get_tokenizer(config, str(tmp_path))
  resolve.fill_decode_ids(config, tok)
  assert (config.decode.eos_id, config.decode.start_id) == expected
  if config.model.arch == 'encoder_decoder':
    source = _list_source('parallel', [('Hello world!', 'a b')])
    batch = next(D.make_eval_iterator(config, tok, str(tmp_path), 'train', layout=D.DataLayout(1), source=source))
    assert batch['tgt_tokens'][0, 0] == config.decode.start_id


def test_decode_ids_of_jaxformer_tokenizers():
  from jaxformer import resolve
  config = default.get_config()
  assert (config.decode.eos_id, config.decode.start_id) == (-1, -1)
  from jaxformer.data.tokenizers import CharTokenizer
  tok = CharTokenizer(list('abc'))
  resolve.fill_decode_ids(config, tok)
  assert (config.decode.eos_id, config.decode.start_id) == (tok.eos_id, tok.bos_id) == (2, 1)
