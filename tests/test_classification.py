"""model.head=classification: pooling, rows from labelled jsonl, the loss, macro-F1, Hugging Face BERT classifiers,
PEFT, sharding, and the one-line errors of bad labelled data."""
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tokenizers
from flax import nnx

from configs import default
from jaxformer import data as D
from jaxformer import hf, metrics, peft, resolve
from jaxformer.apps import evaluate as evaluation
from jaxformer import sharding as shd
from jaxformer import heads
from jaxformer.model import build_model
from jaxformer.training import step
from jaxformer.training import state as state_lib
from jaxformer.apps.train import run
from tests.test_sharding import setup_for

REPO = pathlib.Path(__file__).resolve().parents[1]
BERT_CLS = REPO / 'tests' / 'fixtures' / 'hf' / 'bert_cls'
ONE_DEVICE = {**os.environ, 'XLA_FLAGS': os.environ.get('XLA_FLAGS', '').replace(
    '--xla_force_host_platform_device_count=8', '').strip()}


def tiny_model_section(arch='encoder_only', **overrides) -> ml_collections.ConfigDict:
  section = default.get_config().model
  section.update(arch=arch, head='classification', num_classes=3, vocab_size=24, d_model=32, d_ff=64, num_layers=1,
                 num_heads=4, max_len=16)
  section.update(overrides)
  return section


def toy_records(n, seed, key='text'):
  """Separable: label 1 iff the letters contain an 'x'."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    letters = list(rng.choice(list('abcdef'), size=int(rng.integers(3, 9))))
    label = int(rng.integers(2))
    if label:
      letters.insert(int(rng.integers(len(letters) + 1)), 'x')
    out.append({key: ''.join(letters), 'label': label})
  return out


def write_jsonl(path, records):
  path.write_text(''.join(json.dumps(r) + '\n' for r in records), encoding='utf-8')
  return path


def classify_config(source, arch='encoder_only', **data):
  config = default.get_config()
  config.model.update(tiny_model_section(arch, num_classes=2, vocab_size=0, max_len=32))
  config.data.update(dict(dict(source=source, seq_len=16, pack=False, prefetch=0), **data))
  config.train.update(batch_size=16, num_steps=50, learning_rate=3e-3, warmup_steps=5, log_every=25, eval_every=50,
                      eval_steps=-1, compilation_cache_dir='')
  config.checkpoint.update(every_steps=50, async_save=False)
  return config


# ------------------------------------------------------------------------------------------------- pooling
def _reference_pool(h, real, kind):
  out = []
  for row, mask in zip(np.asarray(h, np.float64), np.asarray(real)):
    idx = np.flatnonzero(mask)
    out.append({'first': row[idx[0]], 'last': row[idx[-1]], 'mean': row[idx].mean(axis=0)}[kind])
  return np.stack(out)


@pytest.mark.parametrize('kind', sorted(heads.POOLINGS))
def test_pooling_matches_a_numpy_reference(kind):
  rng = np.random.default_rng(0)
  h = rng.normal(size=(3, 6, 4)).astype(np.float32)
  real = np.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 0, 0]], bool)  # row 3: left padding too
  np.testing.assert_allclose(heads.POOLINGS[kind](jnp.asarray(h), jnp.asarray(real)), _reference_pool(h, real, kind),
                             rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('arch,pooling', [('encoder_only', 'first'), ('encoder_only', 'mean'),
                                          ('decoder_only', 'last'), ('decoder_only', 'mean')])
def test_logits_do_not_depend_on_padding(arch, pooling):
  """The same rows padded to 6 and to 12 tokens (and beside a longer row) give the same [B, C] logits."""
  model = build_model(tiny_model_section(arch, pooling=pooling, pooler=True), rngs=nnx.Rngs(0))
  rows = [[1, 7, 8, 9, 2], [1, 5, 2], [1, 10, 11, 12, 13, 2]]
  def padded(width):
    out = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
      out[i, :len(r)] = r
    return jnp.asarray(out)
  short, long = model(padded(6)), model(padded(12))
  assert short.shape == (3, 3) and short.dtype == jnp.float32
  np.testing.assert_allclose(short, long, rtol=1e-5, atol=1e-6)
  alone = model(padded(6)[1:2, :3])
  np.testing.assert_allclose(short[1:2], alone, rtol=1e-5, atol=1e-6)


def test_default_pooling_per_arch_and_validation():
  assert build_model(tiny_model_section('encoder_only'), rngs=nnx.Rngs(0)).config.pooling == 'first'
  assert build_model(tiny_model_section('decoder_only'), rngs=nnx.Rngs(0)).config.pooling == 'last'
  for overrides, message in (({'head': 'clasification'}, "did you mean 'classification'"),
                             ({'pooling': 'max'}, 'model.pooling'), ({'num_classes': 1}, 'num_classes >= 2'),
                             ({'arch': 'encoder_decoder'}, 'not supported for model.arch=encoder_decoder')):
    with pytest.raises(Exception, match=message):
      build_model(tiny_model_section(**overrides), rngs=nnx.Rngs(0))


# ------------------------------------------------------------------------------------------------- macro-F1
@pytest.mark.parametrize('labels,predictions', [
    ([0, 1, 2, 0, 1, 2, 2, 2], [0, 2, 1, 0, 0, 2, 2, 1]),
    ([0, 0, 1, 1, 1], [0, 3, 1, 1, 0]),  # class 3 only predicted, class 2 nowhere: excluded from the average
    ([1, 1, 1], [1, 1, 1]),
    ([0, 1, 0, 1], [1, 0, 1, 0]),
])
def test_macro_f1_equals_sklearn(labels, predictions):
  from sklearn.metrics import f1_score  # the independent reference (a test dependency: pyproject [test])
  want = f1_score(labels, predictions, average='macro')
  assert metrics.macro_f1_score(labels, predictions) == pytest.approx(want, abs=1e-12)
  # the in-jit confusion matrix (padding rows have weight 0) gives the same
  weights = jnp.asarray([1.0] * len(labels) + [0.0, 0.0])
  confusion = metrics.confusion_matrix(jnp.asarray(labels + [-1, -1]), jnp.asarray(predictions + [0, 2]), weights, 4)
  assert metrics.macro_f1(confusion) == pytest.approx(want, abs=1e-6)


# ------------------------------------------------------------------------------------------------- rows
def _task(config, tokenizer):
  return D.rows.make_task(config, tokenizer, train=False)


def test_rows_frame_texts_and_pairs(tmp_path):
  """One example per row: jaxformer's framing (BOS a EOS b EOS), token types 0 / 1, labels, padding rows -1."""
  records = [{'text': 'abc', 'label': 1}, {'text_a': 'ab', 'text_b': 'cde', 'label': 'pos'}]
  write_jsonl(tmp_path / 'train.jsonl', records * 3)
  config = classify_config(f'jsonl:{tmp_path}/{{split}}.jsonl', label_names='neg,pos', seq_len=8)
  source = D.get_source(config, str(tmp_path))
  assert source.kind == 'labelled'
  split = source.split('train')
  assert split.read([0, 1]) == [D.Labelled('abc', '', 1), D.Labelled('ab', 'cde', 1)]
  tok = D.CharTokenizer.build(['abcde'])
  batch = next(iter(D.EvalIterator(_task(config, tok), split, D.DataLayout(4))))
  bos, eos = tok.bos_id, tok.eos_id
  a, b, c, d, e = tok.encode('abcde')
  np.testing.assert_array_equal(batch['tokens'][:2], [[bos, a, b, c, eos, 0, 0, 0], [bos, a, b, eos, c, d, e, eos]])
  np.testing.assert_array_equal(batch['token_type_ids'][:2], [[0] * 8, [0, 0, 0, 0, 1, 1, 1, 1]])
  np.testing.assert_array_equal(batch['segment_ids'][:2], [[1] * 5 + [0] * 3, [1] * 8])
  np.testing.assert_array_equal(batch['labels'], [1, 1, 1, 1])
  last = list(D.EvalIterator(_task(config, tok), split, D.DataLayout(4)))[-1]  # 6 examples: 2 padding rows
  np.testing.assert_array_equal(last['labels'], [1, 1, -1, -1])
  assert 'targets' not in batch and set(D.model_inputs(batch)) == {'tokens', 'positions', 'segment_ids',
                                                                   'token_type_ids'}


def test_bert_pairs_are_framed_as_the_tokenizer_frames_them(tmp_path):
  """[CLS] a [SEP] b [SEP] and its token types, as the tokenizer.json's own post-processor (transformers) makes
  them; a pair too long for data.seq_len loses tokens from the longer text first."""
  records = [{'text_a': 'hear me speak', 'text_b': 'we proceed', 'label': 0},
             {'text_a': 'first citizen before we proceed any further', 'text_b': 'hear me', 'label': 2}]
  write_jsonl(tmp_path / 'train.jsonl', records)
  config = classify_config(f'jsonl:{tmp_path}/{{split}}.jsonl', tokenizer=f'hf:{BERT_CLS}', seq_len=20)
  config.model.num_classes = 3
  tok = D.get_tokenizer(config, str(tmp_path))
  split = D.get_source(config, str(tmp_path)).split('train')
  batch = next(iter(D.EvalIterator(_task(config, tok), split, D.DataLayout(2))))
  reference = tokenizers.Tokenizer.from_file(str(BERT_CLS / 'tokenizer.json'))
  want = reference.encode(records[0]['text_a'], records[0]['text_b'])
  n = len(want.ids)
  np.testing.assert_array_equal(batch['tokens'][0, :n], want.ids)
  np.testing.assert_array_equal(batch['token_type_ids'][0, :n], want.type_ids)
  assert n < 20 and not batch['tokens'][0, n:].any()
  assert len(reference.encode(records[1]['text_a'], records[1]['text_b']).ids) > 20
  reference.enable_truncation(20, strategy='longest_first')
  want = reference.encode(records[1]['text_a'], records[1]['text_b'])
  np.testing.assert_array_equal(batch['tokens'][1], want.ids)
  np.testing.assert_array_equal(batch['token_type_ids'][1], want.type_ids)


def test_loss_is_the_mean_cross_entropy_of_the_real_examples():
  config = classify_config('jsonl:unused')
  config.model.update(vocab_size=24)
  model = build_model(config.model, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  tokens = rng.integers(5, 24, size=(4, 6)).astype(np.int32)
  batch = {'tokens': tokens, 'segment_ids': np.ones_like(tokens), 'labels': np.array([0, 1, 1, -1], np.int32)}
  loss, sums = step.compute_loss(model, batch, config, deterministic=True, confusion=True)
  logits = np.asarray(model(jnp.asarray(tokens)), np.float64)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  want = -np.mean([logp[i, batch['labels'][i]] for i in range(3)])
  assert float(loss) == pytest.approx(want, rel=1e-5)
  assert float(sums['weight_sum']) == 3
  assert float(np.asarray(sums['confusion']).sum()) == 3


# ------------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize('arch', ['encoder_only', 'decoder_only'])
def test_classifier_learns_a_separable_toy_task(arch, tmp_path):
  """label = 'the text has an x': a tiny model reaches high accuracy in 50 steps; eval.py's macro-F1 is that of
  the model's own predictions on the split."""
  write_jsonl(tmp_path / 'train.jsonl', toy_records(400, 0))
  write_jsonl(tmp_path / 'validation.jsonl', toy_records(64, 1))
  config = classify_config(f'jsonl:{tmp_path}/{{split}}.jsonl', arch)
  workdir = str(tmp_path / 'run')
  run(config, workdir)
  rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert rows[-1]['eval_accuracy'] >= 0.95 and rows[-1]['eval_examples'] == 64, rows[-1]
  results = evaluation.run(config, workdir)
  assert results['accuracy'] == pytest.approx(rows[-1]['eval_accuracy'])
  assert results['num_examples'] == 64 and 'perplexity' not in results
  # macro-F1 against the model's predictions, computed outside the eval path
  r = evaluation.restore(config, workdir)
  labels, predictions = [], []
  for batch in D.make_eval_iterator(r.config, r.tokenizer, workdir, 'validation', layout=D.DataLayout(16)):
    keep = batch['labels'] >= 0
    logits = r.model(**{k: jnp.asarray(v) for k, v in D.model_inputs(batch).items()})
    labels += batch['labels'][keep].tolist()
    predictions += np.asarray(jnp.argmax(logits, -1))[keep].tolist()
  assert results['macro_f1'] == pytest.approx(metrics.macro_f1_score(labels, predictions), abs=1e-6)
  assert results['accuracy'] == pytest.approx(np.mean(np.equal(labels, predictions)))


def test_sharded_classification_step_matches_single_device(tmp_path):
  config = classify_config('jsonl:unused')
  config.model.update(vocab_size=24, pooler=True)
  config.train.update(batch_size=8, learning_rate=1e-2, warmup_steps=0)
  rng = np.random.default_rng(0)
  tokens = rng.integers(5, 24, size=(8, 16)).astype(np.int32)
  tokens[::2, 10:] = 0
  batch = {'tokens': tokens, 'segment_ids': (tokens != 0).astype(np.int32),
           'positions': np.broadcast_to(np.arange(16, dtype=np.int32), (8, 16)).copy(),
           'token_type_ids': np.zeros_like(tokens), 'labels': rng.integers(0, 2, size=8).astype(np.int32)}
  losses = []
  for mesh in ({}, {'data': 2, 'fsdp': 2, 'tensor': 2}):
    cfg = ml_collections.ConfigDict(config.to_dict())
    cfg.mesh.update(dict(data=1, fsdp=1, tensor=1), **mesh)
    setup, state = setup_for(cfg)
    if mesh:
      kernel = state['params']['classifier']['kernel']
      assert kernel.sharding.spec[0] == 'fsdp' and kernel.addressable_shards[0].data.shape == (16, 2)
    train_step = step.make_train_step(cfg, setup)
    out = []
    for _ in range(2):
      state, m = train_step(state, shd.shard_batch(batch, setup.mesh, setup.rules))
      out.append((float(m['loss']), float(m['grad_norm'])))
    losses.append(out)
  np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)


# ------------------------------------------------------------------------------------------------- Hugging Face
def test_bert_for_sequence_classification_logits_equal_transformers(tmp_path):
  section, model = hf.load(str(BERT_CLS))
  assert (section.head, section.num_classes, section.pooling, section.pooler) == ('classification', 3, 'first', True)
  with open(BERT_CLS / 'expected.json') as f:
    e = json.load(f)
  logits = model(jnp.asarray(e['input_ids']))  # padding (id 0) is masked, as transformers' attention_mask does
  np.testing.assert_allclose(logits, np.asarray(e['logits'], np.float32), atol=2e-5, rtol=1e-5)
  # exported back: a BertForSequenceClassification with the same tensors
  hf.save(model, section, str(tmp_path / 'out'))
  with open(tmp_path / 'out' / 'config.json') as f:
    written = json.load(f)
  assert written['architectures'] == ['BertForSequenceClassification'] and len(written['id2label']) == 3
  ours, theirs = hf.weights.read_dir(str(tmp_path / 'out')), hf.weights.read_dir(str(BERT_CLS))
  assert set(ours) == {k for k in theirs if 'position_ids' not in k}
  for name, value in ours.items():
    np.testing.assert_array_equal(value, theirs[name], err_msg=name)


def test_a_masked_lm_bert_starts_a_fresh_classifier():
  section = hf.model_section(str(REPO / 'tests' / 'fixtures' / 'hf' / 'bert'))
  section.update(head='classification', num_classes=2, pooler=True)
  _, model = hf.load(str(REPO / 'tests' / 'fixtures' / 'hf' / 'bert'), section)
  _, mlm = hf.load(str(REPO / 'tests' / 'fixtures' / 'hf' / 'bert'))
  np.testing.assert_array_equal(model.embed.embedding[...], mlm.embed.embedding[...])  # the encoder is loaded
  assert model(jnp.asarray([[2, 5, 6, 3]])).shape == (1, 2)


def test_peft_trains_the_classifier_under_every_method():
  config = default.get_config()
  config.model.update(tiny_model_section(pooler=True))
  config.peft.update(method='lora', targets='attention')
  abstract = nnx.eval_shape(lambda: state_lib.build_model(config))
  trainable = nnx.to_flat_state(peft.trainable(nnx.state(abstract, nnx.Param), config.peft))
  names = {'.'.join(map(str, path)) for path, _ in trainable}
  assert {'classifier.kernel', 'classifier.bias', 'classifier.pooler', 'classifier.pooler_bias'} <= names
  assert not any(n.startswith('encoder.') and 'lora' not in n for n in names), names


@pytest.fixture(scope='module')
def masked_lm_run(tmp_path_factory):
  """A jaxformer masked-LM run (encoder_only, head=lm, char tokenizer) on the toy texts: a base to fine-tune."""
  tmp = tmp_path_factory.mktemp('mlm_base')
  for split, seed in (('train', 0), ('validation', 1)):
    (tmp / f'toy.{split}.txt').write_text(''.join(r['text'] + '\n' for r in toy_records(200, seed)))
  config = classify_config(f'text:{tmp}/toy.{{split}}.txt', text_unit='line', tokenizer='char')
  config.model.update(head='lm', num_classes=0)
  config.train.update(num_steps=5, eval_every=5, eval_steps=1, log_every=5)
  config.checkpoint.every_steps = 5
  run(config, str(tmp / 'run'))
  return str(tmp / 'run'), config


def _flat(params):
  return {'.'.join(map(str, p)): np.asarray(x) for p, x in nnx.to_flat_state(params)}


@pytest.mark.parametrize('method', ['none', 'lora'])
def test_a_classifier_starts_from_a_jaxformer_masked_lm_run(masked_lm_run, method, tmp_path):
  """checkpoint.init_from=<masked-LM workdir> with model.head=classification: the encoder comes from the base run
  (bit-identical), its masked-LM head is dropped, the classifier keeps the seed's initialisation; so too under
  PEFT, and when a classifier without checkpoints of its own is evaluated."""
  base_dir, base_config = masked_lm_run
  base = _flat(nnx.state(evaluation.restore(base_config, base_dir).model, nnx.Param))
  for split, seed in (('train', 2), ('validation', 3)):  # the base's letters, so its char vocabulary fits
    write_jsonl(tmp_path / f'{split}.jsonl', toy_records(64, seed))
  config = classify_config(f'jsonl:{tmp_path}/{{split}}.jsonl')
  config.checkpoint.init_from = base_dir
  config.peft.method = method
  config = resolve.resolve(config, str(tmp_path / 'cls'), training=True).config  # vocab: the base's tokenizer
  _, state = setup_for(config)
  params = _flat(peft.base_params(state['params']))
  seed_init = _flat(peft.base_params(nnx.state(state_lib.build_model(config), nnx.Param)))
  shared = sorted(set(params) & set(base))
  assert shared and all(k.startswith(('encoder.', 'embed')) or 'embed' in k for k in shared), shared
  for k in shared:
    np.testing.assert_array_equal(params[k], base[k], err_msg=k)
  head = [k for k in params if k.startswith('classifier.')]
  assert head and not set(head) & set(base)
  for k in head:  # the seed's initialisation (jitted and sharded vs eager: equal up to float rounding)
    np.testing.assert_allclose(params[k], seed_init[k], rtol=1e-5, atol=1e-7, err_msg=k)
  assert set(base) - set(params), 'the base\'s masked-LM head should be left out'
  if method == 'none':  # eval.py on a workdir with no checkpoints evaluates init_from's model
    model = evaluation.restore(config, str(tmp_path / 'cls')).model
    evaluated = _flat(nnx.state(model, nnx.Param))
    for k in shared + head:
      np.testing.assert_array_equal(evaluated[k], params[k], err_msg=k)


# ------------------------------------------------------------------------------------------------- errors
def _train_py(tmp_path, source, *overrides):
  out = subprocess.run([sys.executable, 'train.py', '--config=configs/classify.py', f'--workdir={tmp_path / "run"}',
                        f'--config.data.source={source}', '--config.train.num_steps=1', *overrides],
                       cwd=REPO, capture_output=True, text=True, timeout=300, env=ONE_DEVICE)
  lines = [line for line in out.stderr.splitlines() if line.strip()]
  assert out.returncode == 2 and len(lines) == 1 and 'Traceback' not in out.stderr, out.stderr[-3000:]
  return lines[0]


@pytest.mark.parametrize('line,message', [
    ({'text': 'abc'}, "train.jsonl:2: no 'label' field (the line has: text); add it, or set data.label_key"),
    ({'sentence': 'abc', 'label': 0}, "train.jsonl:2: no 'text' field, nor both 'text_a' and 'text_b'"),
    ({'text': 'abc', 'label': 3}, 'train.jsonl:2: label 3 is outside [0, model.num_classes=3)'),
    ({'text': 'abc', 'label': 'great'}, "train.jsonl:2: label 'great' is not one of data.label_names"),
])
def test_train_py_bad_labelled_lines_are_one_line(tmp_path, line, message):
  path = tmp_path / 'train.jsonl'
  path.write_text(json.dumps({'text': 'fine', 'label': 'neutral'}) + '\n' + json.dumps(line) + '\n')
  assert message in _train_py(tmp_path, f'jsonl:{path}')


@pytest.mark.parametrize('override,message', [
    ('--config.model.head=classifier', "model.head='classifier' is not a valid choice"),
    ('--config.model.pooling=max', "model.pooling='max' is not a valid choice"),
    ('--config.model.arch=encoder_decoder', 'model.head=classification is not supported for model.arch=encoder_decoder'),
    ('--config.data.label_names=a,b,c,d', 'data.label_names has 4 names but model.num_classes=3'),
])
def test_train_py_bad_head_settings_are_one_line(tmp_path, override, message):
  assert message in _train_py(tmp_path, 'jsonl:tests/fixtures/classify/{split}.jsonl', override)


def test_train_py_classification_on_unlabelled_data_is_one_line(tmp_path):
  assert 'model.head=classification reads labelled examples' in _train_py(tmp_path, 'builtin:lm')


def test_classify_recipe_on_a_workdir_without_its_config_is_one_line(tmp_path):
  (tmp_path / 'base' / 'checkpoints').mkdir(parents=True)
  out = subprocess.run([sys.executable, 'train.py', f'--config=configs/classify.py:{tmp_path / "base"}',
                        f'--workdir={tmp_path / "run"}'], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env=ONE_DEVICE)
  lines = [line for line in out.stderr.splitlines() if line.strip()]
  assert out.returncode == 2 and len(lines) == 1 and 'Traceback' not in out.stderr, out.stderr[-3000:]
  assert f'no config.json in {tmp_path / "base"}; give a jaxformer training workdir' in lines[0]


def test_eval_py_generate_on_a_classifier_is_one_line(tmp_path):
  """No checkpoint needed: checkpoint.init_from=hf:bert_cls is evaluated as it is."""
  out = subprocess.run([sys.executable, 'eval.py', f'--config=configs/classify.py:{BERT_CLS}',
                        f'--workdir={tmp_path / "run"}', '--mode=generate', '--prompt=hi'],
                       cwd=REPO, capture_output=True, text=True, timeout=300, env=ONE_DEVICE)
  lines = [line for line in out.stderr.splitlines() if line.strip() and 'WARNING' not in line]
  assert out.returncode == 2 and 'Traceback' not in out.stderr, out.stderr[-3000:]
  assert lines[-1].startswith('error: --mode=generate decodes text') and 'model.head=classification' in lines[-1]
