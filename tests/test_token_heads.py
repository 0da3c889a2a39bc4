"""model.head=token_classification (NER) and model.head=span (extractive QA): metrics equal to seqeval's and the
official SQuAD v1.1 script's, word / window alignment equal to Hugging Face run_ner's / run_qa's, answers decoded
back to text, the losses, BertForTokenClassification / BertForQuestionAnswering import and export, a tiny train +
eval of each, and one-line errors. Reference numbers: tests/fixtures/token_heads/make_reference.py (seqeval, SQuAD,
transformers' tokenizer) and tests/fixtures/hf/make_fixtures.py bert_ner bert_qa (logits)."""
import json
import os
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import default
from jaxformer import data as D
from jaxformer import heads, hf, metrics
from jaxformer.apps import evaluate as evaluation
from jaxformer.apps.train import run
from jaxformer.heads import span as span_lib
from jaxformer.heads import token_classification as tc
from jaxformer.model import build_model
from jaxformer.training import step

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = REPO / 'tests' / 'fixtures'
HF_BERT = FIXTURES / 'hf' / 'bert'
NER_NAMES = 'O,B-PER,I-PER,B-LOC,I-LOC'
ONE_DEVICE = {**os.environ, 'XLA_FLAGS': os.environ.get('XLA_FLAGS', '').replace(
    '--xla_force_host_platform_device_count=8', '').strip()}


@pytest.fixture(scope='module')
def reference():
  with open(FIXTURES / 'token_heads' / 'reference.json', encoding='utf-8') as f:
    return json.load(f)


def tiny_config(head, source, **data):
  config = default.get_config()
  config.model.update(arch='encoder_only', head=head, num_classes=5 if head == 'token_classification' else 0,
                      vocab_size=0, d_model=32, d_ff=64, num_layers=1, num_heads=4, max_len=64, position='learned',
                      norm='layer', norm_position='post', mlp='gelu', type_vocab_size=2)
  config.data.update(dict(dict(source=source, seq_len=48, pack=False, prefetch=0, doc_stride=12,
                               label_names=NER_NAMES if head == 'token_classification' else ''), **data))
  config.train.update(batch_size=16, num_steps=30, learning_rate=3e-3, warmup_steps=3, log_every=30, eval_every=30,
                      eval_steps=-1, compilation_cache_dir='')
  config.checkpoint.update(every_steps=30, async_save=False)
  return config


# ------------------------------------------------------------------------------------------------ metrics
def test_entity_scores_equal_seqeval(reference):
  for case in reference['seqeval']:
    got = tc.entity_scores(tc.entity_counts(case['gold'], case['pred']))
    for key in ('precision', 'recall', 'f1'):
      assert got[key] == pytest.approx(case[key], abs=1e-12), (case, key)
    for type_, want in case['per_type'].items():
      assert got[f'precision/{type_}'] == pytest.approx(want['precision'])
      assert got[f'recall/{type_}'] == pytest.approx(want['recall'])
      assert got[f'f1/{type_}'] == pytest.approx(want['f1-score'])
      assert got[f'support/{type_}'] == want['support']


def test_squad_scores_equal_the_official_script(reference):
  r = reference['squad']
  each = [span_lib.squad_example_scores(p, a) for p, a in zip(r['predictions'], r['answers'])]
  assert [e[0] for e in each] == r['exact_match_each']
  assert [e[1] for e in each] == pytest.approx(r['f1_each'])
  got = span_lib.squad_scores(r['predictions'], r['answers'])
  assert got['exact_match'] == pytest.approx(r['exact_match']) and got['f1'] == pytest.approx(r['f1'])


# ---------------------------------------------------------------------------------------------- alignment
def test_ner_rows_align_labels_as_run_ner(reference):
  """hf: tokenizer: ids and labels (first sub-token of each word, -1 elsewhere) equal transformers' + run_ner's."""
  config = tiny_config('token_classification', 'jsonl:unused', seq_len=reference['ner_max_length'],
                       tokenizer=f'hf:{HF_BERT}')
  tok = D.HFTokenizer(str(HF_BERT))
  names = NER_NAMES.split(',')
  cases = reference['ner_alignment']
  task = D.rows.make_task(config, tok, train=False)
  pieces = task.tokenize([D.sources.Tagged(tuple(c['tokens']), tuple(names.index(t) for t in c['tags']))
                          for c in cases])
  for case, (tokens, labels) in zip(cases, pieces):
    assert tokens.tolist() == case['input_ids']
    assert labels.tolist() == [-1 if x == -100 else names.index(x) for x in case['labels']]


@pytest.mark.parametrize('kind', ['char', 'byte'])
def test_jaxformer_tokenizers_label_the_first_piece_of_each_word(kind):
  words = ['zoë', 'ab', 'c']
  tok = D.CharTokenizer.build(['zoë ab c']) if kind == 'char' else D.ByteTokenizer()
  config = tiny_config('token_classification', 'jsonl:unused', seq_len=16, tokenizer=kind)
  (tokens, labels), = D.rows.make_task(config, tok, train=False).tokenize([D.sources.Tagged(tuple(words), (1, 2, 3))])
  text = 'zoë ab c'
  want = [-1] + [1, -1, -1] + [-1] * (kind == 'byte') + [-1, 2, -1, -1, 3] + [-1]  # BOS .. EOS; ë is 2 bytes
  assert labels.tolist() == want
  assert tokens.tolist() == [tok.bos_id, *tok.encode(text), tok.eos_id]


def test_qa_windows_equal_run_qa(reference):
  """hf: tokenizer: each window's ids, token types, start / end labels and context offsets equal run_qa's."""
  r = reference['qa_windows']
  config = tiny_config('span', 'jsonl:unused', seq_len=r['max_length'], doc_stride=r['doc_stride'])
  tok = D.HFTokenizer(str(HF_BERT))
  examples = [D.sources.SpanExample(x['context'], x['question'], tuple(x['answers']['text']),
                                    tuple(x['answers']['answer_start'])) for x in r['lines']]
  task = D.rows.make_task(config, tok, train=False)
  windows = [(i, w) for i, piece in enumerate(task.tokenize(examples)) for w in piece]
  assert len(windows) == len(r['windows'])
  for (i, (tokens, types, labels, offsets)), want in zip(windows, r['windows']):
    assert i == want['example']
    assert tokens.tolist() == want['input_ids'] and types.tolist() == want['token_type_ids']
    assert list(labels) == [want['start_position'], want['end_position']]
    assert offsets.tolist() == [o if o is not None else [-1, -1] for o in want['offsets']]


@pytest.mark.parametrize('tokenizer', ['char', 'hf'])
def test_gold_spans_decode_to_the_gold_answers(tmp_path, tokenizer):
  """Logits peaked at each window's labels decode (over windows, through the offsets) to the gold text: EM 100."""
  source = f'jsonl:{FIXTURES}/qa/{{split}}.jsonl'
  config = tiny_config('span', source, seq_len=40, doc_stride=10,
                       tokenizer=f'hf:{HF_BERT}' if tokenizer == 'hf' else 'char')
  tok = D.HFTokenizer(str(HF_BERT)) if tokenizer == 'hf' else D.CharTokenizer.build(
      D.tokenizers.training_texts(D.get_source(config, str(tmp_path)), 'train'))
  split = D.get_source(config, str(tmp_path)).split('validation')
  head = heads.HEADS['span']
  acc = metrics.MetricAccumulator()
  windows = 0
  for batch in D.EvalIterator(D.rows.make_task(config, tok, train=False), split, D.DataLayout(32)):
    logits = np.zeros((len(batch['tokens']), 2, 40), np.float32)
    for row, (start, end) in enumerate(batch['labels']):
      if start > 0:  # the window holds the answer
        logits[row, 0, start] = logits[row, 1, end] = 10.0
    windows += int((batch['example_ids'] >= 0).sum())
    head.observe(acc, batch, logits, config, split.read)
  out = head.results(acc, 'encoder_only')
  assert out['num_examples'] == len(split) and out['num_windows'] == windows > len(split)  # contexts need windows
  assert out['exact_match'] == 100.0 and out['f1'] == 100.0
  r = next(iter(acc.records.values()))
  assert r['prediction'] in r['answers']


# ------------------------------------------------------------------------------------------------- losses
def test_span_loss_is_the_mean_of_start_and_end_cross_entropy():
  config = tiny_config('span', 'jsonl:unused')
  config.model.vocab_size = 24
  model = build_model(config.model, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  tokens = rng.integers(5, 24, size=(3, 10)).astype(np.int32)
  labels = np.array([[2, 4], [0, 0], [-1, -1]], np.int32)  # the third row is padding
  loss, sums = step.compute_loss(model, {'tokens': tokens, 'segment_ids': np.ones_like(tokens), 'labels': labels},
                                 config, deterministic=True)
  logits = np.asarray(model(jnp.asarray(tokens)), np.float64)
  assert logits.shape == (3, 2, 10)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  start = -np.mean([logp[i, 0, labels[i, 0]] for i in range(2)])
  end = -np.mean([logp[i, 1, labels[i, 1]] for i in range(2)])
  assert float(loss) == pytest.approx((start + end) / 2, rel=1e-5) and float(sums['weight_sum']) == 4


# ------------------------------------------------------------------------------------------ Hugging Face
@pytest.mark.parametrize('name,head,architecture', [('bert_ner', 'token_classification', 'BertForTokenClassification'),
                                                    ('bert_qa', 'span', 'BertForQuestionAnswering')])
def test_hf_bert_token_heads_import_and_export(tmp_path, name, head, architecture):
  directory = FIXTURES / 'hf' / name
  section, model = hf.load(str(directory))
  assert section.head == head and (head != 'token_classification' or section.num_classes == 5)
  with open(directory / 'expected.json') as f:
    e = json.load(f)
  logits = model(jnp.asarray(e['input_ids']), token_type_ids=jnp.asarray(e['token_type_ids']))
  mask = np.asarray(e['attention_mask'], bool)  # padding positions are scored by neither side but not compared
  want = np.asarray(e['logits'], np.float32)
  got = np.asarray(logits)
  if head == 'span':
    got, want, mask = got.transpose(0, 2, 1), want.transpose(0, 2, 1), mask
  np.testing.assert_allclose(got[mask], want[mask], atol=2e-5, rtol=1e-5)
  hf.save(model, section, str(tmp_path / 'out'))
  with open(tmp_path / 'out' / 'config.json') as f:
    assert json.load(f)['architectures'] == [architecture]
  ours, theirs = hf.weights.read_dir(str(tmp_path / 'out')), hf.weights.read_dir(str(directory))
  assert set(ours) == {k for k in theirs if 'position_ids' not in k}
  for key, value in ours.items():
    np.testing.assert_array_equal(value, theirs[key], err_msg=key)


# -------------------------------------------------------------------------------------- train and evaluate
def test_ner_trains_and_reports_entity_f1(tmp_path):
  config = tiny_config('token_classification', f'jsonl:{FIXTURES}/ner/{{split}}.jsonl', tokenizer='char')
  config.train.update(num_steps=60, eval_every=60, log_every=60)
  workdir = str(tmp_path / 'ner')
  run(config, workdir)
  rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  last = rows[-1]
  words = sum(len(json.loads(line)['tokens']) for line in open(FIXTURES / 'ner/validation.jsonl'))
  assert 0.97 * words <= last['eval_words'] <= words  # a word past a row's 48 characters is cut off, not scored
  assert last['eval_accuracy'] > 0.75 and last['eval_f1'] > 0.2, last  # all-O guessing: ~0.69 accuracy, F1 0
  results = evaluation.run(config, workdir)
  assert results['f1'] == pytest.approx(last['eval_f1']) and {'f1/PER', 'f1/LOC', 'support/PER'} <= set(results)
  # entity F1 recomputed outside the eval path, from the model's predictions
  r = evaluation.restore(config, workdir)
  names = NER_NAMES.split(',')
  gold, predicted = [], []
  for batch in D.make_eval_iterator(r.config, r.tokenizer, workdir, 'validation', layout=D.DataLayout(16)):
    logits = np.asarray(r.model(jnp.asarray(batch['tokens']), segment_ids=jnp.asarray(batch['segment_ids'])))
    for labels, predictions in tc.word_sequences(batch['labels'], logits.argmax(-1)):
      gold.append([names[i] for i in labels])
      predicted.append([names[i] for i in predictions])
  assert tc.entity_scores(tc.entity_counts(gold, predicted))['f1'] == pytest.approx(results['f1'])


def test_qa_trains_and_eval_py_reports_squad_scores(tmp_path):
  workdir = tmp_path / 'qa'
  config = tiny_config('span', f'jsonl:{FIXTURES}/qa/{{split}}.jsonl', tokenizer='char')
  config.train.update(num_steps=20, eval_every=20, log_every=20)
  run(config, str(workdir))
  row = [json.loads(line) for line in open(workdir / 'metrics.jsonl')][-1]
  assert row['eval_examples'] == 60 and 0 <= row['eval_exact_match'] <= row['eval_f1'] <= 100, row
  out = subprocess.run([sys.executable, 'eval.py', '--config=configs/qa.py', f'--workdir={workdir}'], cwd=REPO,
                       capture_output=True, text=True, timeout=300, env=ONE_DEVICE)
  assert out.returncode == 0, out.stderr[-3000:]
  with open(workdir / 'eval.json') as f:
    results = json.load(f)
  assert results['head'] == 'span' and results['num_examples'] == 60 and results['num_windows'] > 60
  assert results['exact_match'] == pytest.approx(row['eval_exact_match'])
  assert results['f1'] == pytest.approx(row['eval_f1'])


# ------------------------------------------------------------------------------------------------ errors
def _train_error(tmp_path, recipe, *overrides):
  out = subprocess.run([sys.executable, 'train.py', f'--config={recipe}', f'--workdir={tmp_path / "run"}',
                        '--config.train.num_steps=1', *overrides], cwd=REPO, capture_output=True, text=True,
                       timeout=300, env=ONE_DEVICE)
  lines = [line for line in out.stderr.splitlines() if line.strip()]
  assert out.returncode == 2 and len(lines) == 1 and 'Traceback' not in out.stderr, out.stderr[-3000:]
  return lines[0]


def test_ner_without_label_names_is_one_line(tmp_path):
  line = _train_error(tmp_path, 'configs/ner.py', '--config.data.label_names=')
  assert 'model.head=token_classification needs data.label_names' in line


def test_a_wrong_answer_start_is_one_line(tmp_path):
  (tmp_path / 'train.jsonl').write_text(json.dumps({'context': 'the cat is red.', 'question': 'what colour?',
                                                    'answers': {'text': ['red'], 'answer_start': [3]}}) + '\n')
  line = _train_error(tmp_path, 'configs/qa.py', f'--config.data.source=jsonl:{tmp_path}/{{split}}.jsonl')
  assert "train.jsonl:1: answer 'red' is not the context's text at answer_start=3" in line
