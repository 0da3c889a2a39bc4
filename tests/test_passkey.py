"""Passkey retrieval: the prompt generator (data/sources/passkey.py, also builtin:passkey), the scorer, and the
check of a checkpoint at several lengths with and without RoPE scaling (apps/passkey.py, benchmarks/passkey.py)."""
import dataclasses
import pathlib
import re
import subprocess
import sys

import pytest

from configs import long_context
from jaxformer import data
from jaxformer.apps import passkey as passkey_app
from jaxformer.data.sources import passkey
from jaxformer.errors import DataError

REPO = pathlib.Path(__file__).resolve().parents[1]


def filler_fraction_before(prompt):
  """The share of the filler that comes before the needle (the depth the prompt really has)."""
  before = prompt.text[len(passkey.INTRO) + 1:prompt.needle_start]
  after = prompt.text[prompt.needle_start + len(passkey.needle(prompt.key)) + 1:-len(passkey.QUESTION)]
  return len(before) / max(1, len(before) + len(after))


@pytest.mark.parametrize('length', [300, 777, 2048])
def test_prompt_has_the_key_at_the_asked_depth_and_the_asked_length(length):
  sentence = max(len(s) for s in passkey.FILLER.split('. ')) + 2
  for depth in (0.0, 0.1, 0.5, 0.9, 1.0):
    p = passkey.make_prompt(length, depth, '71432')
    assert length - 1 <= len(p.text) <= length  # characters (the char tokenizer's tokens)
    assert p.text.startswith(passkey.INTRO) and p.text.endswith(passkey.QUESTION)
    assert p.text[p.needle_start:].startswith('The pass key is 71432. Remember it. 71432 is the pass key.')
    assert p.text.count('71432') == 2 and re.sub(r'\d', '', p.text) == p.text.replace('71432', '')
    filler = len(p.text) - len(passkey.INTRO) - len(passkey.needle('71432')) - len(passkey.QUESTION)
    assert abs(filler_fraction_before(p) - depth) <= sentence / filler  # the nearest sentence boundary


def test_prompt_length_in_any_tokens():
  words = lambda text: len(text.split())  # a tokenizer whose tokens are words
  p = passkey.make_prompt(400, 0.5, '12345', count=words)
  assert 398 <= words(p.text) <= 400 and len(p.text) > 1500
  with pytest.raises(DataError, match='longer length'):
    passkey.make_prompt(50, 0.5, '12345')


def test_eval_prompts_are_reproducible_by_seed():
  a, b, c = (passkey.eval_prompts(512, 6, seed) for seed in (0, 0, 1))
  assert a == b and [p.key for p in a] != [p.key for p in c]
  assert [p.depth for p in a] == pytest.approx([(i + 0.5) / 6 for i in range(6)])
  assert all(len(p.key) == passkey.KEY_DIGITS for p in a)
  # the same keys and depths at every length: a length's cell differs from another's only by the filler
  assert [(p.key, p.depth) for p in passkey.eval_prompts(1024, 6, 0)] == [(p.key, p.depth) for p in a]


def test_builtin_passkey_drills_source_is_the_warm_up():
  """builtin:passkey_drills: short drills (6-23 characters, 4 times), every 10th document a prompt with its answer,
  at any row length; every character of builtin:passkey is in its text (the passkey run inherits its vocabulary)."""
  config = long_context.get_config('passkey_warmup')
  source = data.get_source(config, '/tmp/unused')
  docs = source.split('train').read(range(100))
  prompts = docs[passkey.WARMUP_PROMPT_EVERY - 1::passkey.WARMUP_PROMPT_EVERY]
  drills = [d for k, d in enumerate(docs) if k % passkey.WARMUP_PROMPT_EVERY != passkey.WARMUP_PROMPT_EVERY - 1]
  assert all(p.rsplit(' ', 1)[0].endswith(passkey.QUESTION) for p in prompts)
  for doc in drills:
    unit = doc.split(' ')[0]
    assert doc == ' '.join([unit] * 4) and 6 <= len(unit) < 24
  passkey_docs = data.get_source(long_context.get_config('passkey'), '/tmp/unused').split('train').read(range(40))
  assert set(''.join(passkey_docs)) <= set(''.join(docs))
  assert source.split('validation').read([3]) != source.split('train').read([3])


def test_builtin_passkey_source():
  config = long_context.get_config('passkey')
  source = data.get_source(config, '/tmp/unused')
  assert source.kind == 'text'
  train = source.split('train')
  first = train.read([0, 5, 17])
  assert first == train.read([0, 5, 17]) and first != source.split('validation').read([0, 5, 17])
  budget = config.data.seq_len - 2  # BOS and EOS
  lengths = []
  docs = train.read(range(400))
  for doc in docs[passkey.DRILL_EVERY - 1::passkey.DRILL_EVERY]:  # copy drills: one random unit repeated
    unit = doc.split(' ')[0]
    assert doc == ' '.join([unit] * doc.count(unit)) and 2 <= doc.count(unit) <= 6 and len(doc) <= budget
    assert set(unit) <= set(passkey.DRILL_ALPHABET) and 8 <= len(unit) < 48
  assert set(passkey.DRILL_ALPHABET) <= set(passkey.INTRO + passkey.FILLER + '0123456789')  # no new characters
  assert len({d.split(' ')[0] for d in docs[1::2]}) == 200
  for doc in [d for k, d in enumerate(docs) if k % passkey.DRILL_EVERY != passkey.DRILL_EVERY - 1]:
    prompt, answer = doc.rsplit(' ', 1)
    key = re.search(r'The pass key is (\d+)\.', doc).group(1)
    assert prompt.endswith(passkey.QUESTION) and answer == f'{key}.' and len(doc) <= budget
    lengths.append(len(doc))
  assert min(lengths) < budget / 2 + 60 and max(lengths) > budget - 20  # lengths spread up to the row
  for doc in source.split('validation').read(range(20)):  # prompts only
    assert doc.rsplit(' ', 1)[0].endswith(passkey.QUESTION)
  config.data.seq_len = 128
  with pytest.raises(DataError, match='too short for a passkey prompt'):
    data.get_source(config, '/tmp/unused').split('train')


def test_scorer():
  prompts = passkey.eval_prompts(400, 5, 3)
  keys = [p.key for p in prompts]
  copy = [' ' + re.search(r'The pass key is (\d+)', p.text).group(1) + '. The' for p in prompts]  # a model that copies
  wrong = [' ' + ''.join(str((int(d) + 1) % 10) for d in k) + '.' for k in keys]
  assert passkey.accuracy(copy, keys) == 1.0
  assert passkey.accuracy(wrong, keys) == 0.0
  assert passkey.accuracy(copy[:2] + wrong[2:], keys) == pytest.approx(0.4)
  assert passkey.answer_of(' is 0123 or 5') == '0123' and passkey.answer_of(' unknown') == ''
  assert not passkey.is_correct(f' {keys[0]}7.', keys[0])  # a longer number is wrong, not a prefix match


@pytest.fixture(scope='module')
def tiny_passkey_run(tmp_path_factory):
  """A decoder trained 2 steps on builtin:passkey rows of 288 characters, restored for greedy decoding."""
  from jaxformer.apps import evaluate
  from jaxformer.apps import train as training
  config = long_context.get_config('passkey')
  config.model.update(d_model=16, d_ff=32, num_layers=1, num_heads=2, max_len=288)
  config.data.seq_len = 288
  config.train.update(batch_size=8, num_steps=2, warmup_steps=1, eval_every=2, eval_steps=1, log_every=1)
  config.checkpoint.update(every_steps=2, async_save=False)
  workdir = tmp_path_factory.mktemp('passkey')
  training.run(config, str(workdir))
  return passkey_app.greedy(evaluate.restore(config, str(workdir)))


def test_passkey_check_end_to_end(tiny_passkey_run):
  r = tiny_passkey_run
  results = passkey_app.run(r, [280, 560], ['none', 'linear'], num_prompts=3, seed=0, log=lambda _: None)
  assert results['trained_length'] == 288 and results['step'] == 2
  cells = {(c['scaling'], c['length']): c for c in results['cells']}
  assert sorted(cells) == [('linear', 280), ('linear', 560), ('none', 280), ('none', 560)]
  assert cells['none', 560]['rope_factor'] == 1.0
  assert cells['linear', 560]['rope_factor'] == pytest.approx((560 + passkey_app.NEW_TOKENS) / 288, abs=1e-4)
  assert cells['linear', 280]['rope_factor'] == 1.0  # inside the trained context: nothing to scale
  for cell in cells.values():
    assert cell['num_prompts'] == 3 and len(cell['prompts']) == 3
    assert cell['accuracy'] == sum(p['answer'] == p['key'] for p in cell['prompts']) / 3
  # factor 1 is the unscaled model: the same greedy completions
  assert [p['completion'] for p in cells['linear', 280]['prompts']] == [p['completion'] for p in
                                                                       cells['none', 280]['prompts']]
  variant, factor = passkey_app.setting_model(r, 'yarn', 1000)
  assert (variant.config.model.rope_scaling, variant.config.model.rope_original_max_len) == ('yarn', 288)
  assert variant.config.model.max_len == 1000 + passkey_app.NEW_TOKENS and factor > 3
  table = passkey_app.table(results)
  assert table.splitlines()[0] == '| RoPE at eval | 280 | 560 |' and len(table.splitlines()) == 4


def test_passkey_check_refuses_what_it_cannot_do(tiny_passkey_run):
  with pytest.raises(passkey_app.PasskeyError, match='is not a RoPE scaling'):
    passkey_app.run(tiny_passkey_run, [300], ['none', 'ntk'])
  learned = dataclasses.replace(tiny_passkey_run.config.model, position='learned')
  r = dataclasses.replace(tiny_passkey_run, resolved=dataclasses.replace(
      tiny_passkey_run.resolved, config=dataclasses.replace(tiny_passkey_run.config, model=learned)))
  with pytest.raises(passkey_app.PasskeyError, match='not rope; use --scalings=none'):
    passkey_app.check_request(r, [300], ['none', 'linear'])
  with pytest.raises(passkey_app.PasskeyError, match='exceed the learned positions'):
    passkey_app.check_request(r, [600], ['none'])


def test_passkey_cli_bad_workdir_is_one_line(tmp_path):
  out = subprocess.run([sys.executable, 'benchmarks/passkey.py', f'--workdir={tmp_path}/missing'], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 2, out.stderr
  assert out.stderr.strip().splitlines() == [f'error: --workdir={tmp_path}/missing does not exist; point it at a '
                                             'directory train.py wrote.']


def test_mention_scores_read_the_keys_digits(tiny_passkey_run):
  """--mentions: each mention's offsets hold the key; the scores are per-digit losses / accuracies of the model."""
  doc = passkey.PasskeySplit('validation', 1, 10, 280).example(3)
  key, starts = passkey_app.mention_starts(doc)
  assert [doc[s:s + len(key)] for s in starts] == [key] * 3 and starts[0] < starts[1] < starts[2]
  scores = passkey_app.mention_scores(tiny_passkey_run, num_docs=4)
  assert set(scores) == set(passkey_app.MENTIONS)
  for score in scores.values():  # an untrained model: near-uniform over the vocabulary, not certain of anything
    assert 1.0 < score['loss'] < 10.0 and 0.0 <= score['accuracy'] <= 1.0
