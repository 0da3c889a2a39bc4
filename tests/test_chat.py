"""Chat templates (jaxformer/data/chat.py): conversations rendered and tokenized as transformers'
apply_chat_template does (committed reference from tests/fixtures/chat/make_reference.py), assistant-only loss,
the one-line errors, and train.py / eval.py --mode=generate on conversations."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxformer.data import chat
from jaxformer.data.hf_tokenizer import HFTokenizer
from jaxformer.data.sources import Conversation
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


def test_train_and_generate_on_conversations(tmp_path):
  workdir = tmp_path / 'run'
  _cli('train.py', f'--workdir={workdir}', *TINY)
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
