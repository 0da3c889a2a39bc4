"""jsonl: instruction data -- decoder_only scores only the responses, encoder_decoder maps prompt -> response."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import default
from jaxformer import data as D
from jaxformer import sharding as shd
from jaxformer.data.tokenizers import BOS_ID, EOS_ID
from jaxformer.training import step
from tests.test_sharding import setup_for, small_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _records(n, seed=0):
  rng = np.random.default_rng(seed)
  words = ['ab', 'cd', 'ef', 'gh', 'ij']
  make = lambda k: ' '.join(rng.choice(words, size=k))
  return [{'prompt': f'q{i % 10} ' + make(int(rng.integers(1, 3))) + ':',
           'response': make(int(rng.integers(1, 3))), 'id': i} for i in range(n)]


def _write(path, records):
  path.write_text(''.join(json.dumps(r) + '\n' for r in records), encoding='utf-8')
  return path


def _config(path, arch='decoder_only', **data):
  config = default.get_config()
  config.model.arch = arch
  config.train.batch_size = 8
  config.data.update(dict(dict(source=f'jsonl:{path}', seq_len=16, src_seq_len=16, prefetch=0), **data))
  return config


@pytest.fixture(scope='module')
def instructions(tmp_path_factory):
  folder = tmp_path_factory.mktemp('jsonl')
  train, val = _records(80), _records(10, seed=1)
  _write(folder / 'train.jsonl', train)
  _write(folder / 'valid.jsonl', val)
  return folder, train, val


def test_jsonl_source_splits_and_examples(instructions, tmp_path):
  folder, train, val = instructions
  source = D.get_source(_config(folder / '{split}.jsonl'), str(tmp_path))
  assert source.kind == 'instructions'
  got = source.split('train').read(range(len(train)))
  assert [(e.prompt, e.response) for e in got] == [(r['prompt'], r['response']) for r in train]
  assert source.split('validation').read([0])[0].response == val[0]['response']  # 'valid' is an alias
  # Custom field names, and no {split}: the first 90% of the lines train, the last 10% validate.
  renamed = [{'question': r['prompt'], 'answer': r['response']} for r in train]
  single = _write(tmp_path / 'all.jsonl', renamed)
  source = D.get_source(_config(single, prompt_key='question', response_key='answer'), str(tmp_path))
  assert len(source.split('train')) == 72 and source.split('validation').read([0])[0].prompt == train[72]['prompt']


def test_decoder_only_scores_only_the_responses(instructions, tmp_path):
  folder, train, _ = instructions
  config = _config(folder / '{split}.jsonl', pack=False)
  tok = D.get_tokenizer(config, str(tmp_path))
  it = D.make_train_iterator(config, tok, str(tmp_path))
  batch = next(it)
  for r in range(8):
    record = train[it._producer.example_index(r, 0)]
    prompt, response = tok.encode(record['prompt']), tok.encode(record['response'])
    n = 1 + len(prompt) + len(response)
    np.testing.assert_array_equal(batch['tokens'][r][:n], [BOS_ID] + prompt + response)  # fits one row
    np.testing.assert_array_equal(batch['targets'][r][:n], [0] * len(prompt) + response + [EOS_ID])
    assert not batch['targets'][r][n:].any()


def test_the_steps_token_count_counts_only_responses(instructions, tmp_path):
  folder, train, _ = instructions
  config = small_config()  # the tiny decoder_only of the step tests (vocab 65, seq_len 16)
  config.data.update(source=f'jsonl:{folder / "{split}.jsonl"}', pack=False, prefetch=0, tokenizer='char')
  tok = D.get_tokenizer(config, str(tmp_path))
  assert tok.vocab_size <= config.model.vocab_size
  it = D.make_train_iterator(config, tok, str(tmp_path))
  batch = next(it)
  expected = sum(len(tok.encode(train[it._producer.example_index(r, 0)]['response'])) + 1 for r in range(8))
  setup, state = setup_for(config)
  _, metrics = step.make_train_step(config, setup)(state, shd.shard_batch(batch, setup.mesh, setup.rules))
  assert float(metrics['tokens']) == expected


def test_packing_keeps_instructions_apart(instructions, tmp_path):
  folder, train, _ = instructions
  config = _config(folder / '{split}.jsonl', seq_len=40)
  tok = D.get_tokenizer(config, str(tmp_path))
  batch = next(D.make_train_iterator(config, tok, str(tmp_path)))
  prompts, responses = [r['prompt'] for r in train], [r['response'] for r in train]
  whole = 0
  for r in range(8):
    seg = batch['segment_ids'][r]
    assert seg.min() >= 1 and seg.max() >= 2  # packed full, several instructions per row
    for s in range(2, seg.max() + 1):  # segment 1 may continue the previous row's instruction
      tokens, targets = batch['tokens'][r][seg == s], batch['targets'][r][seg == s]
      np.testing.assert_array_equal(batch['positions'][r][seg == s], np.arange(len(tokens)))
      assert tokens[0] == BOS_ID
      n_prompt = int(np.argmax(targets != 0)) if targets.any() else len(targets)
      prompt, response = tok.decode(tokens[1:n_prompt + 1]), tok.decode(targets[n_prompt:])
      assert any(p.startswith(prompt) for p in prompts)
      assert not targets[:n_prompt].any() and any(x.startswith(response) for x in responses)
      whole += int(targets[-1] == EOS_ID and response in responses)
  assert whole >= 8


def test_encoder_decoder_maps_prompt_to_response(instructions, tmp_path):
  folder, _, val = instructions
  config = _config(folder / '{split}.jsonl', arch='encoder_decoder', pack=False)
  tok = D.get_tokenizer(config, str(tmp_path))
  batch = next(D.make_eval_iterator(config, tok, str(tmp_path), 'validation', layout=D.DataLayout(8)))
  for r in range(8):
    assert tok.decode(batch['src_tokens'][r]) == val[r]['prompt']
    assert tok.decode(batch['targets'][r]) == val[r]['response']
  assert D.load_text_pairs(config, str(tmp_path), 'validation')[0] == (val[0]['prompt'], val[0]['response'])


@pytest.mark.parametrize('line,expected', [
    ('{"prompt": "a", "response": "b"', 'not valid JSON'),
    ('["a", "b"]', 'not an object'),
    ('{"prompt": "a"}', "no 'response' field"),
    ('{"prompt": "a", "response": 3}', 'not a string'),
])
def test_bad_lines_name_the_file_and_line(tmp_path, line, expected):
  path = tmp_path / 'data.jsonl'
  path.write_text('{"prompt": "x", "response": "y"}\n\n' + line + '\n', encoding='utf-8')
  with pytest.raises(D.DataError) as err:
    D.get_source(_config(path), str(tmp_path / 'wd'))
  message = str(err.value)
  assert message.startswith(f'{path}:3: ') and expected in message and '\n' not in message


def test_train_py_missing_field_is_one_line(tmp_path):
  path = _write(tmp_path / 'data.jsonl', [{'prompt': 'a', 'response': 'b'}] * 20 + [{'prompt': 'a', 'answer': 'b'}])
  out = subprocess.run(
      [sys.executable, 'train.py', '--config=configs/gpt_tiny.py', f'--workdir={tmp_path / "wd"}',
       f'--config.data.source=jsonl:{path}', '--config.train.num_steps=1'],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode != 0
  lines = [line for line in out.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and 'Traceback' not in out.stderr, out.stderr
  assert f'{path}:21: ' in lines[0] and "data.response_key" in lines[0]
