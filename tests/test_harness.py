"""lm-evaluation-harness on jaxformer: the committed offline tasks (benchmarks/harness/tasks) give the same
per-request answers and task scores as lm-eval's own Hugging Face backend on the tiny fixtures (numbers made by
tests/fixtures/harness/make_reference.py with torch; none here), on the 8-device test mesh; eval.py --mode=harness
end to end; its user-facing errors through the CLI."""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from configs import hf as hf_recipe
from jaxformer.apps import evaluate as evaluation
from jaxformer.apps import harness as harness_app
from jaxformer.likelihood import ContinuationScorer, bucket_length

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = REPO / 'tests' / 'fixtures' / 'hf'
TASKS = REPO / 'benchmarks' / 'harness' / 'tasks'
with open(REPO / 'tests' / 'fixtures' / 'harness' / 'reference.json', encoding='utf-8') as _f:
  REFERENCE = json.load(_f)

if harness_app.lm_eval is None:
  if os.environ.get('CI'):
    raise RuntimeError("lm_eval is missing in CI; the test extra installs it (pip install -e '.[test]').")
  pytest.skip("lm_eval not installed (pip install -e '.[harness]')", allow_module_level=True)


def _restored(fixture: str, tmp_path, **mesh):
  model, _, tokenizer = fixture.partition('+')  # 'a+b': fixture a's model with fixture b's tokenizer
  config = hf_recipe.get_config(str(FIXTURES / model))
  if tokenizer:
    config.data.tokenizer = f'hf:{FIXTURES.parent / tokenizer}'
  config.mesh.update(mesh)
  return evaluation.restore(config, str(tmp_path / 'wd'))  # no checkpoint: the pretrained weights (init_from)


def _run(r, case: dict, batch_size: int) -> dict:
  lm = harness_app.JaxformerLM(harness_app.HarnessModel(r.model, r.tokenizer, r.config, r.mesh, r.rules),
                               batch_size=batch_size, max_gen_toks=256)
  assert lm.max_length == case['max_length'] or case['backend'] == 'seq2seq'
  tasks = harness_app.load_tasks(case['tasks'], str(TASKS))
  return harness_app.run_tasks(lm, tasks, num_fewshot=case['num_fewshot'], limit=case['limit'], bootstrap_iters=0,
                               apply_chat_template=case.get('apply_chat_template', False),
                               log_samples=True), lm


@pytest.mark.parametrize('case_name,mesh', [('gpt2', {}), ('gpt2_3shot', {'fsdp': 2}), ('llama', {}), ('t5', {}),
                                            ('llama_2shot_chat', {})])
def test_requests_and_scores_equal_lm_eval_hf_backend(case_name, mesh, tmp_path):
  """Every request's (log-probability, is_greedy), rolling log-likelihood and generated text equal the HF
  backend's (llama_2shot_chat: requests rendered with the tokenizer's chat template, few-shot examples as turns) (log-probabilities within 1e-4), so every task score is identical; batches of 4 rows in length buckets
  (the reference ran one request at a time), data-parallel over the 8 test devices (+ fsdp for one case)."""
  case = REFERENCE[case_name]
  r = _restored(case['fixture'], tmp_path, **mesh)
  results, lm = _run(r, case, batch_size=4)
  for task in case['tasks']:
    ours = {s['doc_id']: s for s in results['samples'][task]}
    assert sorted(ours) == sorted(s['doc_id'] for s in case['samples'][task])
    for ref in case['samples'][task]:
      mine = ours[ref['doc_id']]
      assert [list(a) if isinstance(a, tuple) else a for a in mine['arguments']] == ref['arguments']
      for got, want in zip(mine['resps'], ref['resps'], strict=True):
        got = got[0] if isinstance(got[0], (tuple, list)) else got  # loglikelihood answers are (logp, greedy)
        want = want[0] if isinstance(want[0], list) else want
        if isinstance(want[0], str):
          assert got[0] == want[0], (task, ref['doc_id'])
        else:
          np.testing.assert_allclose(float(got[0]), want[0], rtol=0, atol=1e-4, err_msg=f'{task} {ref["doc_id"]}')
          if len(want) > 1:
            assert bool(got[1]) == want[1], (task, ref['doc_id'])
    for metric, value in case['metrics'][task].items():
      np.testing.assert_allclose(results['results'][task][metric], value, rtol=1e-5, err_msg=f'{task} {metric}')
  lengths = {sum(len(x) for x in a if isinstance(x, str)) for task in case['tasks'] for ref in case['samples'][task]
             for a in ref['arguments']}  # distinct request sizes (in characters)
  assert len(lm.scorer.shapes) <= 8 < len(lengths)  # a few (batch, length bucket) programs, not one per request


def test_scorer_buckets_and_truncates_like_the_harness():
  """Contexts too long for the model are cut on the left to max_len input tokens; lengths round up to buckets."""
  assert [bucket_length(n, 128) for n in (1, 16, 17, 100, 129)] == [16, 16, 32, 128, 128]
  scorer = object.__new__(ContinuationScorer)
  scorer.max_len, scorer.encoder_decoder = 8, False
  row = scorer._row(list(range(10, 22)), [30, 31])
  assert row['tokens'] == [15, 16, 17, 18, 19, 20, 21, 30] and row['targets'] == [16, 17, 18, 19, 20, 21, 30, 31]
  assert row['scored'] == 2


def _eval_py(workdir, *args, cwd=None):
  return subprocess.run([sys.executable, str(REPO / 'eval.py'), f'--workdir={workdir}', *args],
                        capture_output=True, text=True, cwd=cwd or REPO, timeout=600)


def test_eval_py_harness_end_to_end_and_errors(tmp_path):
  """eval.py --mode=harness on an hf: directory, run from another directory (task data is found beside the YAMLs):
  the table on stdout, the results JSON beside eval.json; then one error line each for an unknown task, a task that
  downloads its data, and an encoder_only model."""
  gpt2 = f'--config={REPO / "configs" / "hf.py"}:{FIXTURES / "gpt2"}'
  run = _eval_py(tmp_path / 'wd', gpt2, '--mode=harness', '--tasks=synth_next_word,synth_continue',
                 f'--config.harness.include_path={TASKS}', '--config.harness.limit=8', cwd=tmp_path)
  assert run.returncode == 0, run.stderr[-3000:]
  assert '|synth_next_word|' in run.stdout.replace(' ', '') and 'exact_match' in run.stdout
  saved = json.loads((tmp_path / 'wd' / 'harness.json').read_text())
  want = REFERENCE['gpt2']['metrics']['synth_next_word']['acc,none']  # the first 12; these are the first 8
  assert saved['results']['synth_next_word']['acc,none'] >= 0 and saved['n-samples']['synth_next_word']['effective'] == 8
  assert want >= 0 and saved['step'] == 0

  run = _eval_py(tmp_path / 'wd', gpt2, '--mode=harness', '--tasks=synth_next_wrd',
                 f'--config.harness.include_path={TASKS}')
  assert run.returncode != 0
  lines = [line for line in run.stderr.splitlines() if line.startswith('error:')]
  assert len(lines) == 1 and "unknown harness task 'synth_next_wrd'" in lines[0] and 'synth_next_word' in lines[0]
  assert 'Traceback' not in run.stderr

  hub_task = tmp_path / 'hub_tasks'
  hub_task.mkdir()
  (hub_task / 'needs_hub.yaml').write_text('task: needs_hub\ndataset_path: jaxformer-test/no-such-dataset\n'
                                           'output_type: loglikelihood\ntest_split: test\ndoc_to_text: "{{q}}"\n'
                                           'doc_to_target: "{{a}}"\nmetric_list:\n  - metric: acc\n')
  run = _eval_py(tmp_path / 'wd', gpt2, '--mode=harness', '--tasks=needs_hub',
                 f'--config.harness.include_path={hub_task}')
  lines = [line for line in run.stderr.splitlines() if line.startswith('error:')]
  assert run.returncode != 0 and len(lines) == 1 and 'Hugging Face Hub' in lines[0], run.stderr[-2000:]
  assert 'Traceback' not in run.stderr

  run = _eval_py(tmp_path / 'bert', f'--config={REPO / "configs" / "hf.py"}:{FIXTURES / "bert"}', '--mode=harness',
                 '--tasks=synth_continue', f'--config.harness.include_path={TASKS}')
  lines = [line for line in run.stderr.splitlines() if line.startswith('error:')]
  assert run.returncode != 0 and len(lines) == 1 and 'encoder_only' in lines[0], run.stderr[-2000:]

  # without the extra: eval.py run with lm_eval made unimportable
  argv = [str(REPO / 'eval.py'), f'--workdir={tmp_path / "wd"}', gpt2, '--mode=harness', '--tasks=synth_continue']
  code = (f'import sys, runpy; sys.modules["lm_eval"] = None; sys.argv = {argv!r}; '
          f'runpy.run_path({str(REPO / "eval.py")!r}, run_name="__main__")')
  run = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=REPO, timeout=600)
  lines = [line for line in run.stderr.splitlines() if line.startswith('error:')]
  assert run.returncode != 0 and len(lines) == 1 and "pip install -e '.[harness]'" in lines[0], run.stderr[-2000:]


def test_train_py_harness_tasks_in_eval_rows(tmp_path):
  """train.harness_tasks: a misspelt task stops train.py at start-up with one line (nothing trained); a good one adds
  harness/<task>/<metric> to the eval rows of metrics.jsonl."""
  def train_py(workdir, *args):
    return subprocess.run([sys.executable, str(REPO / 'train.py'), f'--config={REPO / "configs" / "gpt_tiny.py"}',
                           f'--workdir={workdir}', '--config.train.num_steps=4', '--config.train.eval_every=4',
                           '--config.train.eval_steps=1', '--config.train.log_every=2', '--config.model.num_layers=1',
                           '--config.model.d_model=32', '--config.model.d_ff=64', '--config.train.batch_size=8',
                           f'--config.harness.include_path={TASKS}', '--config.harness.limit=4', *args],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
  run = train_py(tmp_path / 'bad', '--config.train.harness_tasks=synth_next_wrd')
  lines = [line for line in run.stderr.splitlines() if line.startswith('error:')]
  assert run.returncode != 0 and len(lines) == 1 and 'train.harness_tasks' in lines[0], run.stderr[-2000:]
  assert not (tmp_path / 'bad' / 'checkpoints').exists()

  run = train_py(tmp_path / 'good', '--config.train.harness_tasks=synth_next_word,synth_continue')
  assert run.returncode == 0, run.stderr[-3000:]
  rows = [json.loads(line) for line in (tmp_path / 'good' / 'metrics.jsonl').read_text().splitlines()]
  evals = [row for row in rows if 'eval_loss' in row]
  assert [row['step'] for row in evals] == [4]
  assert 0 <= evals[0]['harness/synth_next_word/acc'] <= 1 and 'harness/synth_continue/exact_match' in evals[0]
  assert 'harness/synth_next_word/acc' in run.stdout  # the eval log line
