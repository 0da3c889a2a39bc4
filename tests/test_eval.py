"""eval.py / evaluation.run end to end on checkpoints from short training runs of each tiny recipe.

Each recipe is trained for a handful of steps with a tiny model (in-process `jaxformer.training.run`, which is
all train.py does), then evaluated; the loss must equal the eval_loss training logged for the same step and split.
"""
import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxformer import decoding
from jaxformer import evaluation as evaluation_lib  # the Evaluator and scoring
from jaxformer.apps import evaluate as evaluation  # eval.py's application

REPO = pathlib.Path(__file__).resolve().parents[1]

TINY = {  # recipe -> extra overrides (beyond the common tiny ones below)
    'gpt_tiny': {'data.seq_len': 32, 'model.max_len': 64,
                 # sharded parameters: fsdp x tensor, so decoding is checked on a real training mesh
                 'mesh.data': 2, 'mesh.fsdp': 2, 'mesh.tensor': 2},
    'bert_tiny': {'data.seq_len': 32, 'model.max_len': 32},
    't5_tiny': {'data.seq_len': 48, 'data.src_seq_len': 12, 'model.max_len': 48, 'model.num_decoder_layers': 1,
                'decode.max_len': 12},
}
COMMON = {'model.d_model': 32, 'model.d_ff': 64, 'model.num_layers': 1, 'train.batch_size': 8,
          'train.num_steps': 4, 'train.warmup_steps': 1, 'train.eval_every': 2, 'train.eval_steps': 2,
          'train.log_every': 2, 'checkpoint.every_steps': 2, 'checkpoint.async_save': False}


def recipe_config(recipe, **overrides):
  import importlib
  config = importlib.import_module(f'configs.{recipe}').get_config()
  for key, value in {**COMMON, **TINY[recipe], **overrides}.items():
    *parents, leaf = key.split('.')
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def as_cli(overrides):
  return [f'--config.{k}={v}' for k, v in overrides.items()]


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """recipe -> workdir of a finished 4-step run (checkpoints at steps 2 and 4, evals logged at both)."""
  from jaxformer.apps import train as training
  cache = {}

  def get(recipe):
    if recipe not in cache:
      workdir = tmp_path_factory.mktemp(recipe)
      training.run(recipe_config(recipe), str(workdir))
      cache[recipe] = workdir
    return cache[recipe]

  return get


def logged_eval(workdir, step):
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines() if line.strip()]
  return next(r for r in rows if r['step'] == step and 'eval_loss' in r)


def check_against_training(results, workdir, step):
  logged = logged_eval(workdir, step)
  assert results['step'] == step
  assert results['loss'] == pytest.approx(logged['eval_loss'], rel=1e-5, abs=1e-6)
  assert results['num_tokens'] == int(logged['eval_tokens'])
  assert results['perplexity'] == pytest.approx(np.exp(results['loss']), rel=1e-9)
  assert 1.0 < results['perplexity'] < 1e3


def test_decoder_only_eval_matches_training_and_generates_on_a_sharded_mesh(trained, capsys):
  workdir = trained('gpt_tiny')
  config = recipe_config('gpt_tiny')
  out = workdir / 'latest.json'
  results = evaluation.run(config, str(workdir), output=str(out))
  check_against_training(results, workdir, 4)
  # how the model computes may differ from training's (model/config.py EXECUTION_KEYS): the same loss
  other = recipe_config('gpt_tiny', **{'model.attention_impl': 'reference', 'model.remat': 'full'})
  recomputed = evaluation.run(other, str(workdir), output=str(workdir / 'other.json'),
                              overrides=['model.attention_impl', 'model.remat'])
  assert recomputed['loss'] == pytest.approx(results['loss'], rel=1e-5)
  saved = json.loads(out.read_text())
  assert {'step', 'split', 'num_tokens', 'loss', 'perplexity', 'token_accuracy'} <= set(saved)
  assert saved['split'] == 'validation' and saved['loss'] == results['loss']
  # An older checkpoint, chosen explicitly, matches what training logged at that step.
  check_against_training(evaluation.run(config, str(workdir), checkpoint_step=2), workdir, 2)
  assert json.loads((workdir / 'eval.json').read_text())['step'] == 2  # the default output path

  # Generation with the parameters sharded over fsdp x tensor equals decoding a single-device copy.
  restored = evaluation.restore(config, str(workdir))
  specs = {str(x.sharding.spec) for x in jax.tree.leaves(restored.model) if hasattr(x, 'sharding')}
  assert any('fsdp' in s or 'tensor' in s for s in specs), specs
  config.decode.max_len = 10
  capsys.readouterr()
  gen = evaluation.run(config, str(workdir), mode='generate', prompt=['ka', 'zo mi'])
  printed = capsys.readouterr().out
  assert gen['outputs'][0] in printed and printed.count('\n') >= 2
  local = jax.device_put(restored.model, jax.devices()[0])
  tok = restored.tokenizer
  for text, got in zip(['ka', 'zo mi'], gen['outputs']):
    ids = decoding.greedy(local, np.asarray([[tok.bos_id] + tok.encode(text)]), max_new_tokens=10)
    assert tok.decode(np.asarray(ids)[0]) == got


def test_encoder_only_eval_reports_masked_accuracy(trained):
  workdir = trained('bert_tiny')
  results = evaluation.run(recipe_config('bert_tiny'), str(workdir))
  check_against_training(results, workdir, 4)
  saved = json.loads((workdir / 'eval.json').read_text())
  assert 0.0 <= saved['masked_accuracy'] <= 1.0 and 'bleu' not in saved
  assert saved['masked_accuracy'] == pytest.approx(logged_eval(workdir, 4)['eval_accuracy'], abs=1e-6)
  with pytest.raises(evaluation.EvalError, match='decoder_only'):
    evaluation.run(recipe_config('bert_tiny'), str(workdir), mode='generate', prompt='ka')


def test_eval_cli_encoder_decoder_writes_bleu_and_translates(trained, tmp_path):
  workdir = trained('t5_tiny')
  out = tmp_path / 'eval.json'
  # The recipe alone: model/data/train settings come from the checkpoint's saved config; decode is overridden.
  cmd = [sys.executable, 'eval.py', '--config=configs/t5_tiny.py', f'--workdir={workdir}', f'--output={out}',
         '--config.decode.max_len=10']
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'perplexity' in proc.stdout and 'bleu' in proc.stdout
  results = json.loads(out.read_text())
  check_against_training(results, workdir, 4)
  assert 0.0 <= results['bleu'] <= 100.0
  assert results['sacrebleu_signature'].startswith('nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:')
  assert results['direction'] == 'digits->en'
  assert results['bleu_examples'] == 16 and results['decode']['max_len'] == 10

  src = tmp_path / 'src.txt'
  src.write_text('12\n7041\n')
  config = recipe_config('t5_tiny')
  config.decode.update(method='beam', beam_size=2)
  translated = tmp_path / 'hyp.txt'
  res = evaluation.run(config, str(workdir), mode='translate', input_path=str(src), output=str(translated))
  assert translated.read_text().splitlines() == res['outputs'] and len(res['outputs']) == 2


def test_errors_are_one_clear_line(trained, tmp_path):
  workdir = trained('gpt_tiny')
  empty_dir = tmp_path / 'nothing'
  empty_dir.mkdir()
  with pytest.raises(evaluation.EvalError, match='no checkpoint in .*train first'):
    evaluation.run(recipe_config('gpt_tiny'), str(empty_dir))
  with pytest.raises(evaluation.EvalError, match='is a decoder_only model .* model.arch=encoder_decoder'):
    evaluation.run(recipe_config('t5_tiny'), str(workdir))
  with pytest.raises(evaluation.EvalError, match='model.d_model=64 contradicts the checkpoint'):
    evaluation.run(recipe_config('gpt_tiny', **{'model.d_model': 64}), str(workdir), overrides=['model.d_model'])
  with pytest.raises(evaluation.EvalError, match='checkpoint_step=3: no such checkpoint .*2, 4'):
    evaluation.run(recipe_config('gpt_tiny'), str(workdir), checkpoint_step=3)
  empty = tmp_path / 'empty.txt'
  empty.write_text('\n')
  with pytest.raises(evaluation.EvalError, match='empty.txt is empty'):
    evaluation.run(recipe_config('t5_tiny'), str(workdir), mode='translate', input_path=str(empty))

  # Through the CLI: exit status non-zero, one line on stderr, no traceback.
  for args in (['--config=configs/bert_tiny.py', f'--workdir={workdir}'],
               ['--config=configs/gpt_tiny.py', f'--workdir={empty_dir}']):
    proc = subprocess.run([sys.executable, 'eval.py', *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0
    assert len(lines) == 1 and lines[0].startswith('error: '), proc.stderr
    assert 'Traceback' not in proc.stderr


def test_score_keeps_each_split_and_step(trained, capsys):
  """Without --output, results go to DIR/eval_<split>_step<N>.json, and DIR/eval.json is the latest of them."""
  workdir = trained('gpt_tiny')
  config = recipe_config('gpt_tiny')
  first = evaluation.run(config, str(workdir), split='test', checkpoint_step=2)
  assert f'wrote {workdir / "eval_test_step2.json"} (and {workdir / "eval.json"}' in capsys.readouterr().out
  second = evaluation.run(config, str(workdir))
  assert json.loads((workdir / 'eval_test_step2.json').read_text()) == first
  assert json.loads((workdir / 'eval_validation_step4.json').read_text()) == second
  assert json.loads((workdir / 'eval.json').read_text()) == second and first['loss'] != second['loss']


def eval_cli(*args):
  return subprocess.run([sys.executable, 'eval.py', *args], cwd=REPO, capture_output=True, text=True, timeout=600)


def warnings_of(proc):
  assert proc.returncode == 0 and 'Traceback' not in proc.stdout + proc.stderr, proc.stderr[-3000:]
  return [line for line in proc.stderr.splitlines() if line.startswith('WARNING')]


def test_translate_cli_keeps_blank_lines_and_reports_cut_ones(trained, tmp_path):
  workdir = trained('t5_tiny')
  src, hyp = tmp_path / 'src.txt', tmp_path / 'hyp.txt'
  long_line = '7' * (2 * TINY['t5_tiny']['data.src_seq_len'])
  src.write_text(f'12\n\n{long_line}\n5\n')
  proc = eval_cli('--config=configs/t5_tiny.py', f'--workdir={workdir}', '--mode=translate', f'--input={src}',
                  f'--output={hyp}', '--config.decode.max_len=10')
  (warning,) = warnings_of(proc)
  assert f'1 of 4 lines of {src}' in warning and 'data.src_seq_len=12' in warning
  lines = hyp.read_text().split('\n')
  assert len(lines) == 5 and lines[1] == '' and lines[4] == ''  # 4 lines, each ending in '\n'
  # The other lines are translated as they would be alone.
  config = recipe_config('t5_tiny', **{'decode.max_len': 10})
  alone = tmp_path / 'alone.txt'
  alone.write_text('12\n5\n')
  assert evaluation.run(config, str(workdir), mode='translate', input_path=str(alone))['outputs'] == [lines[0],
                                                                                                        lines[3]]


def test_generate_cli_names_prompt_characters_outside_the_vocabulary(trained):
  proc = eval_cli('--config=configs/gpt_tiny.py', f'--workdir={trained("gpt_tiny")}', '--mode=generate',
                  '--prompt=kaQ€a', '--config.decode.max_len=4')
  (warning,) = warnings_of(proc)
  assert "'Q' '€'" in warning and 'vocabulary' in warning
  assert proc.stdout.startswith('kaQ€a')


def test_periodic_evals_estimate_and_the_final_one_scores_train_final_eval_steps(tmp_path):
  """train.eval_steps batches every eval_every steps, train.final_eval_steps (-1: the whole split) at the last step;
  eval.py scores like the final evaluation, and an explicit --config.train.eval_steps scores like a periodic one."""
  from jaxformer.apps import train as training
  overrides = {'mesh.data': 1, 'mesh.fsdp': 1, 'mesh.tensor': 1, 'train.eval_steps': 1, 'train.final_eval_steps': -1}
  config = recipe_config('gpt_tiny', **overrides)
  training.run(config, str(tmp_path))
  periodic, final = logged_eval(tmp_path, 2), logged_eval(tmp_path, 4)
  rows_tokens = config.train.eval_batch_size or config.train.batch_size
  assert periodic['eval_tokens'] <= rows_tokens * config.data.seq_len < final['eval_tokens']
  whole = evaluation.run(config, str(tmp_path), bleu=False)  # the saved config's final_eval_steps: the whole split
  check_against_training(whole, tmp_path, 4)
  assert whole['eval_batches'] > 1
  config.train.eval_steps = 1  # as if --config.train.eval_steps=1 on eval.py's command line
  estimate = evaluation.run(config, str(tmp_path), checkpoint_step=2, overrides=['train.eval_steps'])
  check_against_training(estimate, tmp_path, 2)
  assert estimate['eval_batches'] == 1


def test_spread_picks_evenly_over_the_split():
  assert evaluation_lib.spread(14, 2) == [3, 10]
  assert evaluation_lib.spread(10, 5) == [1, 3, 5, 7, 9]
  assert evaluation_lib.spread(3, -1) == evaluation_lib.spread(3, 7) == [0, 1, 2]
  assert evaluation_lib.spread(5, 0) == []


def test_a_subset_evaluation_scores_batches_spread_over_the_split_built_once(trained, monkeypatch):
  """train.eval_steps=N scores the N batches `spread` picks (their metric sums exactly), from batches the Evaluator
  built on its first evaluation: the source is read once however often it evaluates."""
  from jaxformer import data as data_lib
  from jaxformer.training import step as step_lib
  calls = []
  real = data_lib.make_eval_iterator
  monkeypatch.setattr(data_lib, 'make_eval_iterator', lambda *a, **k: calls.append(1) or real(*a, **k))
  workdir = trained('gpt_tiny')
  config = recipe_config('gpt_tiny', **{'train.eval_steps': -1})
  restored = evaluation.restore(config, str(workdir), overrides=['train.eval_steps'])
  graphdef, params, rest = step_lib.split_model(restored.model)
  evaluator = evaluation.Evaluator(restored.resolved, graphdef, 'validation')
  whole = evaluator.accumulate(params, rest, final=False)
  reads = len(calls)
  assert reads >= 1
  per_batch = [float(evaluator._step(params, rest, b, evaluator._tables)['loss_sum']) for b in evaluator.batches(-1)]
  assert len(per_batch) >= 3 and whole.num_batches == len(per_batch)
  config = restored.resolved.config  # frozen settings: the evaluation of 2 batches is another run's settings
  evaluator.r = dataclasses.replace(evaluator.r, config=dataclasses.replace(
      config, train=dataclasses.replace(config.train, eval_steps=2)))
  subset = evaluator.accumulate(params, rest, final=False)
  assert evaluator.scored == evaluation_lib.spread(len(per_batch), 2) and evaluator.scored != [0, 1]
  assert subset.loss_sum == pytest.approx(sum(per_batch[i] for i in evaluator.scored), rel=1e-6)
  assert whole.loss_sum == pytest.approx(sum(per_batch), rel=1e-6)
  assert len(calls) == reads  # the second and third evaluation read no data


def test_a_split_too_large_to_keep_is_streamed_and_n_means_its_first_n(trained, monkeypatch, capsys):
  from jaxformer.training import step as step_lib
  monkeypatch.setattr(evaluation_lib, 'MAX_CACHED_EVAL_BYTES', 1)
  workdir = trained('gpt_tiny')
  restored = evaluation.restore(recipe_config('gpt_tiny'), str(workdir))  # the saved train.eval_steps=2
  graphdef, params, rest = step_lib.split_model(restored.model)
  evaluator = evaluation.Evaluator(restored.resolved, graphdef, 'validation')
  acc = evaluator.accumulate(params, rest, final=False)
  assert evaluator.scored == [0, 1] and acc.num_batches == 2
  assert 'is streamed at each evaluation' in capsys.readouterr().err
  evaluator.accumulate(params, rest, final=False)
  assert evaluator.scored == [0, 1] and 'streamed' not in capsys.readouterr().err  # warned once
