"""Fine-tuning through the CLI: a char-tokenizer base pretrained on text A, adapted with LoRA on text B that holds
characters A never had (the run inherits the base's tokenizer, the new characters become <unk> and are reported,
eval.py scores the result), and prompt tuning followed by eval.py --mode=generate."""
import json
import os
import subprocess
import sys

import pytest

from jaxformer.apps.train import run
from tests.test_train import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT_A = 'the cat sat on the mat and the dog ate a log\n' * 80
TEXT_B = 'THE CAT SAT ON 7 MATS: über 9 dogs!\n' * 40 + 'the cat sat on the mat\n' * 40
NEW_CHARS = set(TEXT_B) - set(TEXT_A)
# the model of tests.test_train.tiny('gpt_tiny') (so the in-process base and the CLI runs agree), a short run
OVERRIDES = ['model.num_layers=1', 'model.d_model=32', 'model.num_heads=2', 'model.d_ff=64', 'model.max_len=32',
             'data.seq_len=32', 'data.prefetch=1', 'mesh.data=1', 'mesh.fsdp=1', 'mesh.tensor=1',
             'mesh.distributed=off', 'checkpoint.every_steps=4', 'checkpoint.async_save=False', 'train.batch_size=8',
             'train.num_steps=4', 'train.warmup_steps=1', 'train.log_every=2', 'train.eval_every=4',
             'train.eval_steps=1']


def cli(script, *args):
  env = {**{k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}, 'JAX_PLATFORMS': 'cpu'}
  proc = subprocess.run([sys.executable, script, '--config=configs/gpt_tiny.py', *args,
                         *(f'--config.{o}' for o in OVERRIDES)], cwd=REPO, capture_output=True, text=True,
                        timeout=600, env=env)
  assert proc.returncode == 0 and 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  return proc


@pytest.fixture(scope='module')
def texts(tmp_path_factory):
  d = tmp_path_factory.mktemp('texts')
  (d / 'a.txt').write_text(TEXT_A)
  (d / 'b.txt').write_text(TEXT_B)
  return d


@pytest.fixture(scope='module')
def base(texts, tmp_path_factory):
  """A char model pretrained on text A for a few steps (in-process: only the fine-tuning runs need the CLI)."""
  workdir = tmp_path_factory.mktemp('base')
  config = tiny('gpt_tiny', num_steps=4, eval_every=4, eval_steps=1)
  config.data.source = f'text:{texts / "a.txt"}'
  config.checkpoint.every_steps = 4
  run(config, str(workdir))
  return workdir


def chars_of(workdir):
  with open(os.path.join(workdir, 'tokenizer', 'chars.json'), encoding='utf-8') as f:
    return json.load(f)


def test_lora_on_new_text_inherits_the_base_tokenizer_and_reports_unknown_chars(base, texts, tmp_path):
  assert NEW_CHARS and not NEW_CHARS & set(chars_of(base))
  workdir = tmp_path / 'lora'
  proc = cli('train.py', f'--workdir={workdir}', f'--config.data.source=text:{texts / "b.txt"}',
             f'--config.checkpoint.init_from={base}', '--config.peft.method=lora', '--config.peft.rank=2')
  assert chars_of(workdir) == chars_of(base)  # the base's ids, not a vocabulary built from text B
  (line,) = [line for line in proc.stdout.splitlines() if 'characters outside' in line]
  assert f'checkpoint.init_from={base}' in line and '<unk>' in line and 'train ' in line
  assert any(c in line for c in NEW_CHARS)
  with open(workdir / 'tokenizer' / 'tokenizer.json') as f:
    assert json.load(f)['inherited_from'] == str(base)
  scored = cli('eval.py', f'--workdir={workdir}')
  results = json.loads((workdir / 'eval.json').read_text())
  assert results['loss'] > 0 and 'Traceback' not in scored.stderr


def test_prompt_tuning_then_generate(base, texts, tmp_path):
  workdir = tmp_path / 'prompt'
  cli('train.py', f'--workdir={workdir}', f'--config.data.source=text:{texts / "b.txt"}',
      f'--config.checkpoint.init_from={base}', '--config.peft.method=prompt', '--config.peft.num_prompt_tokens=4')
  proc = cli('eval.py', f'--workdir={workdir}', '--mode=generate', '--prompt=the cat', '--config.decode.max_len=6')
  assert proc.stdout.startswith('the cat') and len(proc.stdout.strip()) > len('the cat')


def test_another_tokenizer_than_the_base_is_one_line(base, texts, tmp_path):
  env = {**{k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}, 'JAX_PLATFORMS': 'cpu'}
  proc = subprocess.run([sys.executable, 'train.py', '--config=configs/gpt_tiny.py', f'--workdir={tmp_path / "x"}',
                         f'--config.data.source=text:{texts / "b.txt"}', f'--config.checkpoint.init_from={base}',
                         '--config.data.tokenizer=byte', *(f'--config.{o}' for o in OVERRIDES)],
                        cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
  assert proc.returncode != 0
  lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith('WARNING')]
  assert len(lines) == 1 and 'Traceback' not in proc.stderr, proc.stderr
  assert "data.tokenizer='char'" in lines[0] and "data.tokenizer='byte'" in lines[0]
