"""Chat templates (jaxformer/data/chat.py): conversations rendered and tokenized as transformers'
apply_chat_template does (committed reference from tests/fixtures/chat/make_reference.py), assistant-only loss,
the one-line errors, and train.py / eval.py --mode=generate on conversations."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs.default import get_config as default_config
from jaxformer.data import chat, rows
from jaxformer.data.hf_tokenizer import HFTokenizer
from jaxformer.data.prompts import PromptIterator
from jaxformer.data.sources import ChatPreference, Conversation, get_source
from jaxformer.data.tokenizers import ByteTokenizer
from jaxformer.errors import DataError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, 'tests', 'fixtures', 'chat')
with open(os.path.join(FIXTURES, 'reference.json'), encoding='utf-8') as _f:
  REFERENCE = json.load(_f)
CASES = [(name, i) for name in ('llama_chat', 'qwen_chat') for i in range(len(REFERENCE[name]))]
TALK = [{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'yo'},
        {'role': 'user', 'content': 'q'}, {'role': 'assistant', 'content': 'ok'}]


@pytest.mark.parametrize('name,index', CASES)
def test_ids_and_assistant_mask_equal_transformers(name, index):
  """The tokenizer's own template (tokenizer_config.json for llama_chat, chat_template.jinja for qwen_chat, whose
  <|im_start|> / <|im_end|> are added special tokens): text, ids, generation-prompt ids, and the assistant mask
  transformers gives for the same template with {% generation %} tags."""
  row = REFERENCE[name][index]
  tok = HFTokenizer(os.path.join(FIXTURES, name))
  template = chat.template_for(tok, '')
  assert template.render(row['messages']) == row['text']
  ids, assistant = chat.encode(tok, template, row['messages'])
  assert ids.tolist() == row['ids']
  assert assistant.astype(int).tolist() == row['assistant_mask']
  prompt = chat.generation_prompt(tok, template, row['messages'][:-1])
  assert prompt.ids.tolist() == row['prompt_ids'] and row['text'].startswith(str(prompt))


def test_training_targets_are_the_assistant_tokens_only():
  tok = ByteTokenizer()
  template = chat.template_for(tok, '')  # jaxformer's tokenizers: the built-in `turns`
  assert template.render(TALK) == '<s>user\nhi\nassistant\nyo</s>user\nq\nassistant\nok</s>'
  ids, assistant = chat.encode(tok, template, TALK)
  assert ids[0] == tok.bos_id and (ids == tok.eos_id).sum() == 2  # the special strings became the ids
  tokens, targets = chat.frame(tok, ids, assistant)
  assert np.array_equal(tokens, ids[:-1])
  scored = targets[targets != tok.unscored_target]
  assert bytes(int(t) - 5 for t in scored if t != tok.eos_id).decode() == 'yook'  # byte ids are byte + 5
  assert (scored == tok.eos_id).sum() == 2  # each assistant turn's eos is trained, so the model learns to stop


def test_template_errors_are_one_line(tmp_path):
  tok = HFTokenizer(os.path.join(FIXTURES, 'llama_chat'))
  with pytest.raises(DataError, match='alternate'):  # the template's own raise_exception
    chat.encode(tok, chat.template_for(tok, ''), [{'role': 'assistant', 'content': 'x'}])
  with pytest.raises(DataError, match='neither a built-in template'):
    chat.template_for(tok, 'no_such_template')
  bad = tmp_path / 'bad.jinja'
  bad.write_text('{% for m in messages %}{{ m.content }')
  with pytest.raises(DataError, match='not a valid Jinja template'):
    chat.template_for(tok, str(bad))
  drops = tmp_path / 'drops.jinja'  # renders only the last two messages: earlier turns change as later ones come
  drops.write_text('{% for m in messages[-2:] %}{{ m.role }}: {{ m.content }}\n{% endfor %}')
  with pytest.raises(DataError, match='differently when later turns follow'):
    chat.encode(tok, chat.template_for(tok, str(drops)), TALK)
  with pytest.raises(DataError, match='message 1 must be an object'):
    chat.parse_messages([{'role': 'user', 'content': 'x'}, {'role': 'user'}], 'f.jsonl:3')


def test_conversations_are_not_pairs():
  """A Conversation is never read as a (source, target) pair by the code that checks for tuples."""
  assert not isinstance(Conversation('[]'), tuple)


def _cli(script, *args, ok=True):
  env = {**{k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}, 'JAX_PLATFORMS': 'cpu'}
  proc = subprocess.run([sys.executable, script, '--config=configs/gpt_tiny.py', *args], cwd=REPO,
                        capture_output=True, text=True, timeout=600, env=env)
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  assert (proc.returncode == 0) == ok, proc.stderr[-3000:]
  return proc


TINY = ['--config.model.num_layers=1', '--config.model.d_model=32', '--config.model.num_heads=2',
        '--config.model.d_ff=64', '--config.model.max_len=128', '--config.data.seq_len=128',
        '--config.train.batch_size=4', '--config.train.num_steps=2', '--config.train.eval_every=2',
        '--config.train.eval_steps=1', '--config.train.log_every=1', '--config.checkpoint.async_save=False',
        '--config.mesh.distributed=off', f'--config.data.source=jsonl:{FIXTURES}/{{split}}.jsonl']


@pytest.fixture(scope='module')
def chat_run(tmp_path_factory):
  """A tiny decoder trained on the toy conversations for two steps (shared by the tests below)."""
  workdir = tmp_path_factory.mktemp('chat') / 'run'
  _cli('train.py', f'--workdir={workdir}', *TINY)
  return workdir


def test_train_and_generate_on_conversations(chat_run, tmp_path):
  workdir = chat_run
  rows = [json.loads(line) for line in open(workdir / 'metrics.jsonl')]
  assert any('eval_loss' in r for r in rows)
  out = tmp_path / 'out.jsonl'
  _cli('eval.py', f'--workdir={workdir}', '--mode=generate', f'--input={FIXTURES}/prompts.jsonl', f'--output={out}',
       '--config.decode.max_len=4', *TINY)
  lines = [json.loads(line) for line in open(out)]
  prompts = [json.loads(line)['messages'] for line in open(os.path.join(FIXTURES, 'prompts.jsonl'))]
  assert [line['messages'] for line in lines] == prompts
  assert lines[1]['prompt'].endswith('Write lamp in capitals.\nassistant\n')  # the generation prompt, rendered
  assert all(isinstance(line['output'], str) for line in lines)


def test_bad_conversation_file_is_one_line(tmp_path):
  data = tmp_path / 'talk.jsonl'
  data.write_text(json.dumps({'messages': [{'role': 'user', 'content': 'no answer here'}]}) + '\n')
  proc = _cli('train.py', f'--workdir={tmp_path / "run"}', *TINY[:-1], f'--config.data.source=jsonl:{data}', ok=False)
  assert 'has no "assistant" message' in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_conversations_for_an_encoder_model_are_one_line():
  config = default_config()
  examples = [Conversation(json.dumps(TALK))]
  for task in (rows.EncoderOnlyTask(config, ByteTokenizer(), True), rows.EncoderDecoderTask(config, ByteTokenizer(),
                                                                                          True)):
    with pytest.raises(DataError, match='train decoder_only models'):
      task.tokenize(examples)
  tokens, targets = rows.DecoderOnlyTask(config, ByteTokenizer(), True).tokenize(examples)[0]
  assert np.array_equal(tokens, chat.encode(ByteTokenizer(), chat.template_for(ByteTokenizer(), ''), TALK)[0][:-1])


def test_conversational_preference_pairs_score_the_response_only():
  """TRL's conversational pairs: each side is the template's rendering of prompt + response; the prompt part (the
  rendering with the generation prompt) is unscored in DPO rows."""
  config = default_config()
  config.align.method = 'dpo'
  tok = ByteTokenizer()
  template = chat.template_for(tok, '')
  prompt = TALK[:3]
  pair = ChatPreference(json.dumps(prompt), json.dumps(TALK[3:]), json.dumps([{'role': 'assistant', 'content': 'no'}]),
                        0.0)
  c_tokens, c_targets, _, r_tokens, r_targets, _, _ = rows.PreferenceTask(config, tok, True).tokenize([pair])[0]
  ids, _ = chat.encode(tok, template, TALK)
  assert np.array_equal(c_tokens, ids[:-1])
  n_prompt = len(chat.encode(tok, template, prompt, add_generation_prompt=True)[0])
  scored = c_targets[c_targets != tok.unscored_target]
  assert np.array_equal(scored, ids[n_prompt:]) and bytes(int(t) - 5 for t in scored[:-1]).decode() == 'ok'
  assert bytes(int(t) - 5 for t in r_targets[r_targets != tok.unscored_target][:-1]).decode() == 'no'


def test_dpo_on_conversational_pairs_through_the_cli(chat_run, tmp_path):
  base = chat_run
  _cli('train.py', f'--workdir={tmp_path / "dpo"}', *TINY[:-1], f'--config.checkpoint.init_from={base}',
       '--config.align.method=dpo', '--config.data.pack=False',
       f'--config.data.source=jsonl:{FIXTURES}/preferences_{{split}}.jsonl')
  evals = [r for r in map(json.loads, open(tmp_path / 'dpo' / 'metrics.jsonl')) if 'eval_pairs' in r]
  assert evals and evals[-1]['eval_pairs'] > 0 and 0.0 <= evals[-1]['eval_reward_accuracy'] <= 1.0


def test_grpo_on_conversational_prompts_through_the_cli(chat_run, tmp_path):
  """Prompts as lists of messages (the online methods): rendered with the template's generation prompt."""
  config = default_config()
  config.align.method, config.data.source = 'grpo', f'jsonl:{FIXTURES}/rl_prompts_{{split}}.jsonl'
  source = get_source(config, str(tmp_path / 'read'))
  prompt, fields = PromptIterator(source, 'validation', 1, 0, shuffle=False).all()[0]
  assert isinstance(prompt, list) and prompt[-1]['role'] == 'user' and 'answer' in fields
  _cli('train.py', f'--workdir={tmp_path / "grpo"}', *TINY[:-1], f'--config.checkpoint.init_from={chat_run}',
       '--config.align.method=grpo', '--config.align.reward_fn=benchmarks.preferences.rewards:exact_match',
       '--config.align.prompts_per_step=2', '--config.align.num_generations=2', '--config.align.max_new_tokens=4',
       '--config.data.pack=False', f'--config.data.source=jsonl:{FIXTURES}/rl_prompts_{{split}}.jsonl')
  evals = [r for r in map(json.loads, open(tmp_path / 'grpo' / 'metrics.jsonl')) if 'eval_prompts' in r]
  assert evals and evals[-1]['eval_prompts'] == 20 and 0.0 <= evals[-1]['eval_reward_mean'] <= 1.0


def test_chat_flag_outside_generate_is_one_line(tmp_path):
  proc = _cli('eval.py', f'--workdir={tmp_path}', '--mode=score', '--chat', ok=False)
  assert '--chat renders each --prompt as a user message' in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1
