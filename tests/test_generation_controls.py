"""Generation controls (decode.repetition_penalty, no_repeat_ngram_size, min_new_tokens, num_return_sequences, stop)
and self-consistency voting.

Agreement with transformers: tests/fixtures/hf/generation_reference.json holds what `generate` returned on the tiny
fixtures (make_generation_reference.py, run by hand); here jaxformer decodes the same prompts (batched, so prompts
of different lengths also go through the forced-prompt path) and must return the same token ids. Sampling is checked
by its semantics (independent, reproducible samples; the processors' arithmetic on a known row of logits).
"""
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformer import decoding, hf, voting
from jaxformer.settings import decode_settings

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = REPO / 'tests' / 'fixtures' / 'hf'
ONE_DEVICE = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': ''}

with open(FIXTURES / 'generation_reference.json', encoding='utf-8') as f:
  REFERENCE = json.load(f)


def cut(ids, eos):
  ids = [int(i) for i in ids]
  return ids[:ids.index(eos) + 1] if eos in ids else ids


# ------------------------------------------------------------------------------------ equal to transformers
# Each case compiles its own loop, so the suite checks two cases that combine every control: beam search on the
# decoder_only model, greedy on the encoder_decoder one (the loops apply the controls the same way for both archs).
# JAXFORMER_TEST_ALL_GENERATION=1 checks every case of the reference (30, all equal when this was written).
SUITE = {'gpt2': ('beam_all_controls',), 't5_v1_1': ('greedy_all_controls',)}
ALL = os.environ.get('JAXFORMER_TEST_ALL_GENERATION', '') not in ('', '0')


@pytest.mark.parametrize('name', ['gpt2', 't5_v1_1'] + (['llama'] if ALL else []))
def test_controls_give_transformers_generate_ids(name):
  section, model = hf.load(str(FIXTURES / name))
  ref = REFERENCE['models'][name]
  t5 = section.arch == 'encoder_decoder'
  if t5:
    src, _ = decoding.pad_prompts(ref['prompts'])  # 0 is T5's pad id: masked in the encoder
    prompt = lengths = None
  else:
    prompt, lengths = decoding.pad_prompts(ref['prompts'])
    src = None
  for case, c in ref['cases'].items():
    if not ALL and case not in SUITE[name]:
      continue
    settings = decode_settings(
        method='beam' if c['num_beams'] > 1 else 'greedy', beam_size=max(c['num_beams'], 1), length_penalty=0.0,
        max_len=c['max_new_tokens'], eos_id=c['eos_id'], start_id=0 if t5 else 1,
        repetition_penalty=c['repetition_penalty'], no_repeat_ngram_size=c['no_repeat_ngram_size'],
        min_new_tokens=c['min_new_tokens'], num_return_sequences=c['num_return_sequences'])
    got = decoding.decode_sequences(model, settings, prompt, prompt_lengths=lengths, src_tokens=src)
    got = [[cut(seq, c['eos_id']) for seq in row] for row in got]
    assert got == c['new'], case


def test_reference_cases_exercise_each_control():
  """The reference is only a check if each control changed transformers' output there."""
  cases = REFERENCE['models']['gpt2']['cases']
  plain = [[62, 111, 65, 65, 65, 159, 111, 159]]  # tests/fixtures/hf/gpt2 expected.json: generate without controls
  for case in ('greedy_repetition_penalty', 'greedy_no_repeat_2gram', 'greedy_no_repeat_1gram'):
    assert cases[case]['new'][0][0][:8] != plain[0], case
  assert cases['greedy_min_new_tokens']['new'] != cases['greedy_common_eos']['new']
  assert len({tuple(s) for s in cases['beam_return_3']['new'][0]}) == 3


# ---------------------------------------------------------------------------------------- the processors
def test_apply_controls_on_known_logits():
  seqs = jnp.asarray([[1, 3, 4, 3, 0, 0]])  # 4 real tokens; the rest is the future
  logits = jnp.asarray([[0.5, 2.0, -1.0, 4.0, -2.0, 1.0, 3.0]])
  off = decode_settings(method='sample')
  np.testing.assert_array_equal(decoding.apply_controls(logits, seqs, 4, jnp.asarray([1]), off), logits)

  rp = decoding.apply_controls(logits, seqs, 4, jnp.asarray([1]), decode_settings(repetition_penalty=2.0))
  np.testing.assert_allclose(rp[0], [0.5, 1.0, -1.0, 2.0, -4.0, 1.0, 3.0])  # 1, 3, 4 seen; 0 (future) not

  # 2-grams so far: (1,3) (3,4) (4,3); the last token is 3, so 4 would repeat (3,4).
  ng = np.asarray(decoding.apply_controls(logits, seqs, 4, jnp.asarray([1]), decode_settings(no_repeat_ngram_size=2)))
  assert ng[0, 4] == decoding.NEG_INF and np.array_equal(np.delete(ng[0], 4), np.delete(np.asarray(logits[0]), 4))
  # 3-grams: (1,3,4) (3,4,3); the last two are (4,3): nothing follows them yet.
  ng3 = decoding.apply_controls(logits, seqs, 4, jnp.asarray([1]), decode_settings(no_repeat_ngram_size=3))
  np.testing.assert_array_equal(ng3, logits)

  eos = decoding.EOS_ID
  mn = decode_settings(min_new_tokens=3)
  early = np.asarray(decoding.apply_controls(logits, seqs, 4, jnp.asarray([2]), mn))  # 2 new tokens so far
  assert early[0, eos] == decoding.NEG_INF
  np.testing.assert_array_equal(decoding.apply_controls(logits, seqs, 4, jnp.asarray([1]), mn), logits)  # 3 new


def test_repetition_penalty_applies_to_sampling():
  """Sampling draws from the penalised logits (before temperature): after drawing token 3 (logit 3.0), its logit
  is 3.0 / 20 = 0.15 < token 4's 0.5, so P(3) falls from 0.92 to 1 / (1 + e^0.35) = 0.41 at the next step."""
  from tests.test_decoding import Bigram, V
  table = np.full((V, V), -30.0)
  table[:, 3], table[:, 4] = 3.0, 0.5
  model = Bigram(table)
  prompt = np.ones((256, 1), np.int32)
  plain = decoding.decode(model, decode_settings(method='sample', max_len=2), prompt, rng=jax.random.key(0))
  penalised = decoding.decode(model, decode_settings(method='sample', max_len=2, repetition_penalty=20.0), prompt,
                              rng=jax.random.key(0))
  np.testing.assert_array_equal(penalised[:, 0], plain[:, 0])  # nothing of 3 / 4 seen yet: the same draw
  after_3 = penalised[:, 0] == 3
  assert np.mean(plain[plain[:, 0] == 3, 1] == 3) > 0.85
  assert 0.3 < np.mean(penalised[after_3, 1] == 3) < 0.52


# --------------------------------------------------------------------------- num_return_sequences, stop
def test_sampled_return_sequences_differ_and_are_reproducible():
  from tests.test_decoding import Bigram, random_table
  model = Bigram(random_table(0, scale=0.5))
  settings = decode_settings(method='sample', max_len=6, num_return_sequences=4)
  prompt, lengths = decoding.pad_prompts([[1, 3], [1]])
  a = decoding.decode_sequences(model, settings, prompt, prompt_lengths=lengths, rng=jax.random.key(7))
  b = decoding.decode_sequences(model, settings, prompt, prompt_lengths=lengths, rng=jax.random.key(7))
  assert a.shape == (2, 4, 6)
  np.testing.assert_array_equal(a, b)
  for row in a:
    assert len({tuple(s) for s in row}) > 1


class CharTokenizer:
  """One token per character 'a'..'d' (ids 3..6); EOS 2."""
  eos_id = 2

  def encode(self, text):
    return [3 + 'abcd'.index(c) for c in text if c in 'abcd']

  def decode(self, ids):
    return ''.join('abcd'[i - 3] for i in ids if 3 <= i < 7)


def test_stop_strings_cut_the_text_and_end_rows_early():
  from tests.test_decoding import Bigram
  V = 7
  table = np.full((V, V), -30.0)
  for a, b in ((1, 3), (3, 4), (4, 5), (5, 6), (6, 3)):  # bos -> a b c d a b c d ...
    table[a, b] = 5.0
  model = Bigram(table)
  tok = CharTokenizer()
  settings = decode_settings(method='greedy', max_len=10, eos_id=2)
  assert decoding.generate_texts(model, tok, [[1]], settings) == [['abcdabcdab']]
  assert decoding.generate_texts(model, tok, [[1]], settings, stop=['cd', 'x']) == [['ab']]
  # The loop stopped right after the first 'cd': the tokens after it were never generated.
  patterns = decoding.stop_token_patterns(tok, ['cd'])
  tokens = decoding.decode(model, settings, np.ones((1, 1), np.int32), stop_tokens=patterns)
  assert tokens[0].tolist() == [3, 4, 5, 6] + [0] * 6
  # A stop string inside the prompt does not stop anything; parse_stop reads the config's string.
  prompt = [1, 5, 6]  # 'cd' already there
  assert decoding.generate_texts(model, tok, [prompt], settings, stop=['cd'])[0][0] == 'ab'
  assert decoding.parse_stop('\\n\\n,###,a\\,b') == ('\n\n', '###', 'a,b')
  assert decoding.cut_at_stop('x###y\n\nz', ('\n\n', '###')) == 'x'


def test_off_controls_share_the_program():
  """canonical() drops stop / num_return_sequences (read outside the jitted loop) and the ignored fields."""
  a = decode_settings(method='sample', stop='###', num_return_sequences=3).canonical()
  assert a == decode_settings(method='sample').canonical()
  assert not decode_settings().controls and decode_settings(min_new_tokens=1).controls


# ------------------------------------------------------------------------------------------ self-consistency
def test_majority_vote():
  texts = ['so the answer is 4.', 'answer is 5', 'no idea', 'the answer is 5!', 'answer is 4']
  out = voting.self_consistency(texts, r'answer is (\d+)')
  assert out['answers'] == ['4', '5', None, '5', '4']
  assert (out['answer'], out['votes'], out['output']) == ('4', 2, texts[0])  # tie 2-2: the first to appear
  assert voting.majority_vote([None, '7', '8', '8']) == ('8', 2, 2)
  assert voting.majority_vote([None]) == (None, 0, -1)
  assert voting.extract_answer('x = 12', r'\d+') == '12'  # no group: the whole match
  with pytest.raises(ValueError, match='decode.answer_pattern'):
    voting.compile_pattern('(unclosed')


# ---------------------------------------------------------------------------------------------- errors
def eval_error(tmp_path, *overrides) -> str:
  out = subprocess.run([sys.executable, 'eval.py', f'--config=configs/hf.py:{FIXTURES / "gpt2"}',
                        f'--workdir={tmp_path / "w"}', '--mode=generate', '--prompt=ab', *overrides], cwd=REPO,
                       capture_output=True, text=True, timeout=300, env=ONE_DEVICE)
  lines = [line for line in out.stderr.splitlines() if line.strip()]
  assert out.returncode != 0 and len(lines) == 1 and lines[0].startswith('error: '), out.stderr[-3000:]
  return lines[0]


@pytest.mark.parametrize('overrides,message', [
    (('--config.decode.num_return_sequences=2',), 'decode.num_return_sequences=2 needs decode.method=sample or beam'),
    (('--config.decode.answer_pattern=(x',), 'decode.answer_pattern='),
])
def test_bad_values_are_one_line_through_eval_py(overrides, message, tmp_path):
  assert message in eval_error(tmp_path, *overrides)


@pytest.mark.parametrize('values,message', [
    (dict(min_new_tokens=-1), 'decode.min_new_tokens=-1 must be >= 0'),
    (dict(repetition_penalty=0.0), 'decode.repetition_penalty=0.0 must be > 0'),
    (dict(method='beam', beam_size=2, num_return_sequences=3), 'raise decode.beam_size to at least 3'),
])
def test_bad_values_are_one_config_error(values, message):
  from configs import default
  from jaxformer.config import ConfigError, validate
  from jaxformer import settings as settings_lib
  config = settings_lib.fill(default.get_config())
  config.decode.update(values)
  with pytest.raises(ConfigError, match=message):
    validate(config)


# ------------------------------------------------------------------------------------- eval.py --mode=generate
def test_generate_writes_several_outputs_and_the_vote_per_input_line(tmp_path):
  """The pretrained gpt2 fixture (no training): num_return_sequences=3 gives "outputs" per line, cut at the stop
  strings; num_samples with answer_pattern gives the majority answer of the samples."""
  from configs import hf as hf_recipe
  from jaxformer.apps import evaluate as evaluation
  prompts = tmp_path / 'prompts.jsonl'
  prompts.write_text(''.join(json.dumps({'prompt': p}) + '\n' for p in ('First', 'Hello world', 'ab')))
  config = hf_recipe.get_config(str(FIXTURES / 'gpt2'))
  config.decode.update(method='sample', max_len=6, num_return_sequences=3, stop='e,o')
  out = tmp_path / 'out.jsonl'
  evaluation.run(config, str(tmp_path / 'w'), mode='generate', input_path=str(prompts), output=str(out))
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert [r['prompt'] for r in rows] == ['First', 'Hello world', 'ab']
  texts = [t for r in rows for t in r['outputs']]
  assert all(len(r['outputs']) == 3 for r in rows) and len(set(texts)) > 3
  assert not any('e' in t or 'o' in t for t in texts)
  # The harness's call: this call's stop strings and budget, texts back (greedy: the same as decoding alone).
  config.decode.update(method='greedy', num_return_sequences=1, stop='')
  r = evaluation.restore(config, str(tmp_path / 'w'))
  full = evaluation.complete(r, ['First', 'ab'], max_new_tokens=6)
  two = evaluation.complete(r, ['First', 'ab'], max_new_tokens=2)
  assert [len(t) for t in full] == [1, 1] and full != two
  stop = full[0][0][2:4]
  cut = evaluation.complete(r, ['First', 'ab'], stop=[stop], max_new_tokens=6)
  assert cut[0][0] == decoding.cut_at_stop(full[0][0], [stop]) and stop not in cut[0][0]
  assert cut[1][0] == decoding.cut_at_stop(full[1][0], [stop])

  config.decode.update(method='sample', num_samples=5, answer_pattern='([a-z])')
  evaluation.run(config, str(tmp_path / 'w'), mode='generate', input_path=str(prompts), output=str(out))
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert len(rows) == 3
  for r in rows:
    assert len(r['answers']) == 5 and r['votes'] == r['answers'].count(r['answer'])
    assert r['votes'] == max(r['answers'].count(a) for a in r['answers'] if a is not None)
    assert voting.extract_answer(r['output'], '([a-z])') == r['answer']
