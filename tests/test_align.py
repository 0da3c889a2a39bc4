"""Learning from preferences (jaxformer/align): preference data, reward models, DPO / SimPO against the frozen
reference (full fine-tuning and LoRA, sharded and not, precomputed or per step), the online methods (grpo, rloo,
ppo: rollouts, rewards, exact resume), best-of-N and eval.py --mode=reward, and their one-line errors.

One tiny SFT run (a module fixture) is the start of every run here; each run is a few steps."""
import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import default
from jaxformer import align
from jaxformer import data as D
from jaxformer import peft as peft_lib
from jaxformer import resolve
from jaxformer import settings as settings_lib
from jaxformer import sharding as shd
from jaxformer.apps import align as align_app
from jaxformer.apps import evaluate as eval_app
from jaxformer.apps.train import run
from jaxformer.training import optimizer
from jaxformer.training import state as state_lib
from jaxformer.training import step as step_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
LN2 = math.log(2.0)

REWARD_MODULE = '''
def exact(prompts, completions, answer, **rows):
  return [1.0 if c.strip() == a else 0.0 for c, a in zip(completions, answer)]

def raises(prompts, completions, **rows):
  raise RuntimeError('boom')

def length(prompts, completions, **rows):
  return [float(len(c)) for c in completions]

def not_a_number(prompts, completions, **rows):
  return ['high'] * len(prompts)
'''


def _sums(rng, n):
  out = []
  for _ in range(n):
    a, b = int(rng.integers(10, 50)), int(rng.integers(10, 50))
    out.append((f'{a}+{b}=', str(a + b), str(a + b + int(rng.choice([-10, -1, 1, 10])))))
  return out


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  """pairs / sft / prompts jsonl files ({split}), a ranking file and a reward-function module."""
  d = tmp_path_factory.mktemp('align_data')
  rng = np.random.default_rng(0)
  for split, n in (('train', 192), ('validation', 24)):
    rows = _sums(rng, n)
    (d / f'sft_{split}.jsonl').write_text(''.join(json.dumps({'prompt': p, 'response': g}) + '\n' for p, g, _ in rows))
    (d / f'pairs_{split}.jsonl').write_text(''.join(json.dumps({'prompt': p, 'chosen': g, 'rejected': b}) + '\n'
                                                    for p, g, b in rows))
    (d / f'prompts_{split}.jsonl').write_text(''.join(json.dumps({'prompt': p, 'answer': g}) + '\n'
                                                      for p, g, _ in rows))
  (d / 'ranked.jsonl').write_text(json.dumps({'prompt': '1+1=', 'responses': ['2', '3', '11']}) + '\n'
                                  + json.dumps({'prompt': '2+2=', 'chosen': '4', 'rejected': '5', 'margin': 0.5})
                                  + '\n\n')
  (d / 'align_rewards_test.py').write_text(REWARD_MODULE)
  return d


def tiny_config(source, **sections):
  config = default.get_config()
  config.model.update(arch='decoder_only', position='rope', norm='rms', mlp='swiglu', use_bias=False, num_layers=1,
                      num_heads=2, d_model=32, d_ff=64, max_len=32)
  config.data.update(source=source, tokenizer='char', seq_len=16, pack=False, prefetch=0)
  config.train.update(batch_size=16, num_steps=4, learning_rate=1e-3, warmup_steps=1, log_every=2, eval_every=4,
                      eval_steps=-1, compilation_cache_dir='')
  config.checkpoint.update(every_steps=100, async_save=False)
  config.mesh.update(data=1)
  for section, values in sections.items():
    config[section].update(values)
  return config


@pytest.fixture(scope='module')
def sft(files, tmp_path_factory):
  """A tiny SFT run on the sums: every alignment run here starts from it."""
  workdir = tmp_path_factory.mktemp('sft')
  config = tiny_config(f'jsonl:{files}/sft_{{split}}.jsonl', train=dict(num_steps=40, learning_rate=3e-3))
  run(config, str(workdir))
  return workdir


def pair_config(files, sft, **sections):
  sections.setdefault('checkpoint', {}).update(init_from=str(sft))
  return tiny_config(f'jsonl:{files}/pairs_{{split}}.jsonl', **sections)


# --------------------------------------------------------------------------------------------------- data
def test_preference_lines_and_rankings(files, tmp_path):
  config = settings_lib.of(tiny_config(f'jsonl:{files}/ranked.jsonl', align=dict(method='dpo')))
  source = D.get_source(config, str(tmp_path))
  every = [e for split in ('train', 'validation') for e in source.split(split).read(range(len(source.split(split))))]
  assert [(e.prompt, e.chosen, e.rejected, e.margin) for e in every] == [
      ('1+1=', '2', '3', 0.0), ('1+1=', '2', '11', 0.0), ('1+1=', '3', '11', 0.0), ('2+2=', '4', '5', 0.5)]


def test_preference_rows_score_only_the_response(files, sft):
  r = resolve.resolve(pair_config(files, sft, align=dict(method='dpo')), str(sft), training=False)
  tok = r.tokenizer
  task = D.rows.PreferenceTask(r.config, tok, train=True)
  item = task.item(task.tokenize([D.sources.Preference('12+34=', '46', '47', 0.0)])[0], 0)
  c_tokens, c_targets, r_tokens, r_targets, _ = item
  scored = c_targets[(c_targets != tok.unscored_target)]
  assert tok.decode(scored[:-1]) == '46' and scored[-1] == tok.eos_id  # the response and its EOS, nothing else
  np.testing.assert_array_equal(c_tokens[1:][c_targets[:-1] != tok.unscored_target], scored[:-1])
  assert tok.decode(r_targets[r_targets != tok.unscored_target][:-1]) == '47'
  # a prompt that fills data.seq_len leaves no response token: training drops the pair, evaluation keeps it unscored
  long = task.tokenize([D.sources.Preference('1' * 20, '2', '3', 0.0)])
  assert task.item(long[0], 0) is None
  assert D.rows.PreferenceTask(r.config, tok, train=False).item(long[0], 0) is not None
  # a reward model's rows hold the whole framed sequence: its last real token is the EOS
  reward = settings_lib.replace(r.config, model=settings_lib.dataclasses.replace(r.config.model, head='reward'),
                                align=settings_lib.dataclasses.replace(r.config.align, method='none'))
  rows = D.response_rows(tok, ['12+34='], ['46'], 16)
  assert not D.rows.PreferenceTask(reward, tok, train=True).next_token
  n = int(rows['segment_ids'][0].sum())
  assert rows['tokens'][0, n - 1] == tok.eos_id and tok.decode(rows['tokens'][0, 1:n - 1]) == '12+34=46'


# ---------------------------------------------------------------------------------------------------- DPO
def _first_step(config):
  config = resolve.checked_config(config)
  settings = settings_lib.from_config(config)
  mesh = shd.make_mesh(settings)
  rules = shd.rules_from_config(settings)
  return settings, mesh, rules


def dpo_first_steps(files, sft, workdir, steps=2, **sections):
  """The DPO train step's metrics for the first `steps` batches (a fresh run from the SFT model)."""
  sections['align'] = dict(sections.get('align', {}), method='dpo')
  config = pair_config(files, sft, **sections)
  r = resolve.resolve(config, str(workdir), training=True)
  tx, schedule = optimizer.make_optimizer(r.config.train)
  setup = state_lib.make_setup(r.config, r.mesh, tx, schedule, r.rules)
  state = state_lib.initial_state(r.config, setup)
  reference = state_lib.reference_params(r.config, setup.abstract_state['params'], r.mesh, r.rules)
  train_step = step_lib.make_train_step(r.config, setup)
  layout = shd.data_layout(r.mesh, r.rules, r.config.train.batch_size)
  batches = D.make_train_iterator(r.config, r.tokenizer, str(workdir), layout=layout, source=r.source)
  out = []
  for _ in range(steps):
    state, metrics = train_step(state, shd.shard_batch(next(batches), r.mesh, r.rules, layout), reference)
    out.append(jax.device_get(metrics))
  return out, state, reference, r


def test_dpo_step_zero_is_ln2_and_learns(files, sft, tmp_path):
  metrics, state, reference, r = dpo_first_steps(files, sft, tmp_path / 'full', steps=3,
                                                 train=dict(learning_rate=3e-3))
  first = metrics[0]
  assert abs(float(first['loss']) - LN2) < 1e-6  # policy == reference: -log sigmoid(0)
  assert abs(float(first['rewards_chosen'])) < 1e-6 and abs(float(first['rewards_rejected'])) < 1e-6
  assert float(first['logps_chosen']) < 0 and float(first['logps_rejected']) < 0
  assert float(metrics[-1]['loss']) < LN2  # the policy moved towards the chosen responses
  # full fine-tuning: the reference is a whole copy of the start, frozen
  assert len(jax.tree.leaves(reference)) == len(jax.tree.leaves(state['params']))


def test_dpo_under_lora_uses_the_base_as_reference(files, sft, tmp_path):
  metrics, state, reference, r = dpo_first_steps(files, sft, tmp_path / 'lora', steps=1,
                                                 peft=dict(method='lora', targets='all', rank=4))
  assert abs(float(metrics[0]['loss']) - LN2) < 1e-6
  lora_leaves = jax.tree.leaves(peft_lib.trainable(state['params'], r.config.peft))
  assert len(jax.tree.leaves(reference)) == len(lora_leaves)  # no second copy of the base: only the adapters' start
  assert sum(x.size for x in jax.tree.leaves(reference)) < 0.5 * sum(x.size for x in jax.tree.leaves(state['params']))


def test_dpo_sharded_equals_unsharded(files, sft, tmp_path):
  one, _, _, _ = dpo_first_steps(files, sft, tmp_path / 'one', steps=2)
  many, state, _, r = dpo_first_steps(files, sft, tmp_path / 'mesh', steps=2, mesh=dict(data=2, fsdp=2, tensor=2))
  assert r.mesh.devices.size == 8
  kernel = [x for x in jax.tree.leaves(state['params']) if x.ndim == 2 and x.shape[0] == 32][0]
  assert len(kernel.sharding.device_set) > 1  # parameters really are sharded
  for a, b in zip(one, many):
    for key in ('loss', 'grad_norm', 'reward_margin', 'logps_chosen'):
      np.testing.assert_allclose(float(a[key]), float(b[key]), rtol=2e-5, atol=2e-6)


def test_simpo_trains_without_reference(files, sft, tmp_path):
  config = pair_config(files, sft, align=dict(method='simpo', beta=2.0, gamma=0.5), train=dict(num_steps=2,
                                                                                                eval_every=2))
  result = run(config, str(tmp_path / 'simpo'))
  assert math.isfinite(result['train_loss']) and 0.0 <= result['eval_reward_accuracy'] <= 1.0
  assert result['eval_pairs'] == 24


def test_dpo_run_precomputed_reference_matches(files, sft, tmp_path):
  config = pair_config(files, sft, align=dict(method='dpo'), train=dict(num_steps=2, eval_every=2))
  per_step = run(config, str(tmp_path / 'per_step'))
  config.align.precompute_reference = True
  pre = run(config, str(tmp_path / 'pre'))
  assert os.path.isfile(tmp_path / 'pre' / 'reference_logps.npz')
  for key in ('eval_loss', 'eval_reward_margin', 'train_loss'):
    assert abs(per_step[key] - pre[key]) < 1e-5, key
  scored = eval_app.run(config, str(tmp_path / 'per_step'))  # eval.py --mode=score: the same reference, numbers
  assert scored['loss'] == pytest.approx(per_step['eval_loss'], abs=1e-6) and scored['num_pairs'] == 24
  assert scored['reward_margin'] == pytest.approx(per_step['eval_reward_margin'], abs=1e-6)
  rows = [json.loads(line) for line in open(tmp_path / 'per_step' / 'metrics.jsonl')]
  assert {'train_reward_accuracy', 'train_reward_margin', 'train_rewards_chosen', 'train_rewards_rejected',
          'train_logps_chosen', 'train_logps_rejected'} <= set(rows[0])


# ----------------------------------------------------------------------------------------------- rewards
@pytest.fixture(scope='module')
def reward_model(files, sft, tmp_path_factory):
  workdir = tmp_path_factory.mktemp('rm')
  config = pair_config(files, sft, model=dict(head='reward'), train=dict(num_steps=20, eval_every=20,
                                                                         learning_rate=3e-3))
  result = run(config, str(workdir))
  return workdir, result


def test_reward_model_trains_and_scores(files, reward_model, tmp_path):
  workdir, result = reward_model
  assert {'eval_loss', 'eval_accuracy', 'eval_margin', 'eval_pairs'} <= set(result)
  assert result['eval_pairs'] == 24
  rows = [{'prompt': '12+13=', 'response': '25'}, {'prompt': '12+13=', 'response': '26'}]
  path = tmp_path / 'in.jsonl'
  path.write_text(''.join(json.dumps(x) + '\n' for x in rows))
  out = tmp_path / 'out.jsonl'
  config = pair_config(files, workdir, model=dict(head='reward'))
  got = eval_app.run(config, str(workdir), mode='reward', input_path=str(path), output=str(out))
  lines = [json.loads(line) for line in out.read_text().splitlines()]
  assert [x['reward'] for x in lines] == pytest.approx(got['rewards']) and len(lines) == 2
  scorer = eval_app.restore_reward_model(str(workdir), flag='test')
  np.testing.assert_allclose(scorer.score(['12+13='] * 2, ['25', '26']), got['rewards'], rtol=1e-6)
  # the score is the model's scalar at the last real token: padding rows do not change it
  np.testing.assert_allclose(scorer.score(['12+13='] * 3, ['25', '26', '2']), list(got['rewards']) + [
      scorer.score(['12+13='], ['2'])[0]], rtol=1e-5)


def test_best_of_n_returns_the_highest_reward(files, sft, reward_model):
  workdir, _ = reward_model
  config = tiny_config(f'jsonl:{files}/sft_{{split}}.jsonl')
  config.decode.update(num_samples=3, method='sample', reward_model=str(workdir), max_len=4)
  got = eval_app.run(config, str(sft), mode='generate', prompt=['12+13=', '40+41='])
  for best, rewards, samples, out in zip(got['rewards'], got['sample_rewards'], got['samples'], got['outputs']):
    assert best == max(rewards) and len(samples) == 3 and out == samples[int(np.argmax(rewards))]


# ------------------------------------------------------------------------------------------------ online
def online_config(files, sft, method, **align_values):
  align_values = {'reward_fn': 'align_rewards_test:exact', **align_values}
  config = tiny_config(f'jsonl:{files}/prompts_{{split}}.jsonl', align=dict(
      method=method, prompts_per_step=4, num_generations=4, max_new_tokens=4, **align_values), checkpoint=dict(init_from=str(sft), every_steps=2), train=dict(eval_every=2, log_every=1))
  config.data.seq_len = 24
  return config


@pytest.fixture()
def reward_module_on_path(files, monkeypatch):
  monkeypatch.syspath_prepend(str(files))
  return files


ROLLOUT_KEYS = ('train_reward_mean', 'train_reward_std', 'train_kl', 'train_entropy', 'train_clip_fraction',
                'train_completion_length', 'train_rollout_time', 'train_update_time')


def _rows(workdir):
  return [json.loads(line) for line in open(workdir / 'metrics.jsonl')]


def test_grpo_runs_and_resumes_exactly_and_sharded(reward_module_on_path, sft, tmp_path):
  """Straight through on a data x fsdp x tensor mesh of 8 devices; stopped at step 2 and resumed on one device:
  the same rollouts, rewards and updates (sharded = unsharded, resume = no stop)."""
  # completion length as the reward: every group has different rewards (the tiny SFT model gets no sum right yet)
  config = online_config(reward_module_on_path, sft, 'grpo', reward_fn='align_rewards_test:length')
  sharded = config.copy_and_resolve_references()
  sharded.mesh.update(data=2, fsdp=2, tensor=2)
  straight = align_app.run(sharded, str(tmp_path / 'straight'))
  stopped = align_app.run(config, str(tmp_path / 'resumed'), stop_after_steps=2)
  assert stopped['stopped_by'] == 'stop_after_steps'
  resumed = align_app.run(config, str(tmp_path / 'resumed'))
  last = lambda d: [r for r in _rows(d) if 'train_loss' in r][-1]  # noqa: E731
  # the sampled completions and so the rewards are identical; the float sums differ by reduction order on the mesh
  tolerance = {'train_reward_mean': (0, 0), 'train_loss': (0, 1e-5), 'train_kl': (1e-3, 1e-6), 'grad_norm': (1e-4, 0)}
  for key, (rel, abs_) in tolerance.items():
    assert last(tmp_path / 'straight')[key] == pytest.approx(last(tmp_path / 'resumed')[key], rel=rel, abs=abs_), key
  assert straight['eval_reward_mean'] == pytest.approx(resumed['eval_reward_mean'])
  first = _rows(tmp_path / 'straight')[0]
  assert set(ROLLOUT_KEYS) <= set(first) and 0 < first['train_reward_mean'] <= first['train_completion_length']
  # step 1 samples from the reference itself: no KL, and the update's ratio starts at 1 (nothing clipped)
  assert abs(first['train_kl']) < 1e-6 and first['train_clip_fraction'] == 0.0


@pytest.mark.parametrize('method', ['rloo', 'ppo'])
def test_rloo_and_ppo_run(reward_module_on_path, sft, tmp_path, method):
  config = online_config(reward_module_on_path, sft, method, reward_fn='align_rewards_test:length')
  config.train.update(num_steps=2, eval_every=2)
  if method == 'rloo':  # under LoRA: the reference is the base with the fresh adapters
    config.peft.update(method='lora', targets='all', rank=4)
  result = align_app.run(config, str(tmp_path / method))
  first = _rows(tmp_path / method)[0]
  assert set(ROLLOUT_KEYS) <= set(first) and 'eval_reward_mean' in result
  assert abs(first['train_kl']) < 1e-6
  if method == 'rloo':
    assert first['num_trainable_params'] < first['num_params'] / 2
  if method == 'ppo':  # the value head trains with the policy
    assert first['train_value_loss'] > 0 and 'train_vf_clip_fraction' in first


# ------------------------------------------------------------------------------------------------ errors
def _cli(args, cwd):
  return subprocess.run([sys.executable, str(REPO / 'train.py'), *args], capture_output=True, text=True, cwd=cwd,
                        timeout=600)


def _one_line_error(proc, *needles):
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [line for line in proc.stderr.splitlines() if line.startswith('error:')]
  assert len(lines) == 1 and 'Traceback' not in proc.stderr, proc.stderr[-2000:]
  for needle in needles:
    assert needle in lines[0], lines[0]


def test_cli_errors_are_one_line(files, sft, tmp_path):
  bad = tmp_path / 'bad_{split}.jsonl'
  for split in ('train', 'validation'):
    (tmp_path / f'bad_{split}.jsonl').write_text(json.dumps({'prompt': 'a', 'chosen': 'b', 'rejected': 'c'}) + '\n'
                                                 + json.dumps({'prompt': 'a', 'rejected': 'c'}) + '\n')
  common = [f'--config={REPO}/configs/gpt_tiny.py', f'--config.checkpoint.init_from={sft}', '--config.data.seq_len=16',
            *(f'--config.model.{k}={v}' for k, v in dict(num_layers=1, num_heads=2, d_model=32, d_ff=64,
                                                          max_len=32).items())]
  proc = _cli(common + [f'--workdir={tmp_path / "w1"}', f'--config.data.source=jsonl:{bad}',
                        '--config.align.method=dpo'], REPO)
  _one_line_error(proc, 'bad_train.jsonl:2', "'chosen'")
  proc = _cli([f'--config={REPO}/configs/gpt_tiny.py', f'--workdir={tmp_path / "w2"}', '--config.model.arch=encoder_only',
               f'--config.data.source=jsonl:{files}/pairs_{{split}}.jsonl', '--config.align.method=dpo'], REPO)
  _one_line_error(proc, 'align.method=dpo', 'decoder_only')
  for fn, needle in (('raises', 'RuntimeError: boom'), ('not_a_number', "'high'")):
    proc = _cli(common + [f'--workdir={tmp_path / fn}', f'--config.data.source=jsonl:{files}/prompts_{{split}}.jsonl',
                          '--config.align.method=grpo', f'--config.align.reward_fn=align_rewards_test:{fn}',
                          '--config.align.max_new_tokens=4', '--config.train.num_steps=1'], files)
    _one_line_error(proc, f'align.reward_fn=align_rewards_test:{fn}', needle)
  proc = _cli(common + [f'--workdir={tmp_path / "w3"}', f'--config.data.source=jsonl:{files}/prompts_{{split}}.jsonl',
                        '--config.align.method=grpo', '--config.align.reward_fn=align_rewards_test:exact',
                        '--config.align.max_new_tokens=16'], files)
  _one_line_error(proc, 'align.max_new_tokens=16', 'data.seq_len=16')
  assert not (tmp_path / 'w3').exists()  # refused before the workdir is touched
  evaluate = lambda *args: subprocess.run([sys.executable, str(REPO / 'eval.py'), *common[:1], f'--workdir={sft}',  # noqa: E731
                                           *args], capture_output=True, text=True, cwd=REPO, timeout=600)
  _one_line_error(evaluate('--mode=generate', '--prompt=12+13=', '--config.decode.num_samples=2',
                           '--config.decode.method=sample'), 'decode.num_samples=2', 'decode.reward_model')
  _one_line_error(evaluate('--mode=reward', f'--input={REPO}/tests/fixtures/align/responses.jsonl'),
                  '--mode=reward', 'model.head=lm')
  before = sorted(os.listdir(sft / 'checkpoints'))
  _one_line_error(evaluate('--mode=generate', '--prompt=12+13=', '--config.decode.num_samples=2',
                           '--config.decode.method=sample', f'--config.decode.reward_model={sft}'),
                  f'decode.reward_model={sft}', 'not a reward model')
  assert sorted(os.listdir(sft / 'checkpoints')) == before  # the checkpoints are untouched
