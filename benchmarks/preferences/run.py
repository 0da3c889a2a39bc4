"""The learning-from-preferences recipes, end to end, as a user runs them (train.py / eval.py in subprocesses), and
the table of benchmarks/RESULTS.md.

  python benchmarks/preferences/run.py [--runs runs/pref] [--only sft,grpo,...]

Stages (configs/preferences_tiny.py's variants; each later one starts from the SFT run):
  sft            supervised fine-tuning on 2-digit sums (sft_{split}.jsonl, mostly carry-free)
  reward         label the SFT model's samples of the training prompts (exact match stands in for the human
                 rankers: each wrong sample ranks below the sum), then a reward model on those pairs + the committed
                 pairs_train.jsonl (chosen = the right sum): accuracy on the held-out pairs_validation.jsonl
  dpo / simpo    on the same pairs: the policy's preference accuracy (log p(chosen) > log p(rejected) on held-out
                 pairs) and its greedy exact match on held-out prompts, before -> after
  grpo/rloo/ppo  on prompts_{split}.jsonl with the exact-match reward_fn: held-out greedy exact match before -> after
  best_of_n      eval.py --mode=generate with decode.num_samples=8 and the reward model vs plain sampling
Exact match is on prompts_validation.jsonl (200 held-out sums, ~3/4 with a carry). Wall times are this machine's
(2 CPU cores); KL is the last logged per-token KL estimate to the reference (online methods) or
logps - ref_logps per response token (DPO: its eval rewards / beta).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

DATA = os.path.join('benchmarks', 'preferences', 'data')
PROMPTS = os.path.join(DATA, 'prompts_validation.jsonl')
STAGES = ('sft', 'reward', 'dpo', 'simpo', 'grpo', 'rloo', 'ppo', 'best_of_n')


def sh(args: list[str]) -> float:
  """Runs a command from the repo root (output shown), raising on failure; returns its wall time."""
  print('$ ' + ' '.join(args), flush=True)
  start = time.perf_counter()
  subprocess.run(args, cwd=REPO, check=True)
  return time.perf_counter() - start


def rows(workdir: str) -> list[dict]:
  with open(os.path.join(REPO, workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    return [json.loads(line) for line in f if line.strip()]


def last(workdir: str, key: str) -> float | None:
  values = [r[key] for r in rows(workdir) if key in r]
  return values[-1] if values else None


def answers() -> list[dict]:
  with open(os.path.join(REPO, PROMPTS), encoding='utf-8') as f:
    return [json.loads(line) for line in f if line.strip()]


def exact(outputs: list[str], rows_: list[dict]) -> float:
  return sum(o.strip() == r['answer'] for o, r in zip(outputs, rows_)) / len(rows_)


def generate(workdir: str, out: str, *flags: str, prompts: str = PROMPTS) -> list[dict]:
  """eval.py --mode=generate over a prompts file (default: the held-out prompts) -> its output lines."""
  sh([sys.executable, 'eval.py', '--config=configs/preferences_tiny.py', f'--workdir={workdir}', '--mode=generate',
      f'--input={prompts}', f'--output={out}', *flags])
  with open(os.path.join(REPO, out), encoding='utf-8') as f:
    return [json.loads(line) for line in f if line.strip()]


def greedy_accuracy(workdir: str) -> float:
  return exact([x['output'] for x in generate(workdir, f'{workdir}/greedy.jsonl')], answers())


def preference_accuracy(workdir: str) -> float:
  """Share of held-out pairs whose chosen response the policy finds likelier (summed response log-prob)."""
  import jax
  import numpy as np
  from jaxformer import data as data_lib
  from jaxformer import sharding as shd
  from jaxformer.align import pairwise
  from jaxformer.apps import evaluate
  from configs import preferences_tiny

  config = preferences_tiny.get_config('dpo')  # the pairs, read as a DPO run reads them
  r = evaluate.restore(config, os.path.join(REPO, workdir),
                       overrides=['data.source', 'data.pack', 'data.seq_len', 'align.method', 'checkpoint.init_from'])
  unscored = r.tokenizer.unscored_target
  layout = shd.data_layout(r.mesh, r.rules, 50)
  fn = jax.jit(lambda batch: pairwise.response_logps(r.model, batch, unscored, deterministic=True))
  right = total = 0
  for batch in data_lib.make_eval_iterator(r.config, r.tokenizer, r.resolved.workdir, r.config.data.eval_split,
                                           layout=layout, source=r.resolved.source):
    lp = jax.device_get(fn(shd.shard_batch(batch, r.mesh, r.rules, layout)))
    real = (batch['chosen_segment_ids'].sum(1) > 0)
    right += int(np.sum((lp['chosen_logps'] > lp['rejected_logps']) & real))
    total += int(real.sum())
  return right / total


def label_pairs(sft: str, stem: str, samples: int = 4) -> int:
  """The RLHF labelling step, with exact match standing in for the human rankers: `samples` sampled completions of
  the SFT model for each training prompt; every distinct wrong one becomes a pair (the right sum > it). Written with
  the committed synthetic pairs to STEM_train.jsonl (validation: the committed held-out pairs, unchanged)."""
  with open(os.path.join(REPO, DATA, 'prompts_train.jsonl'), encoding='utf-8') as f:
    rows = [json.loads(line) for line in f if line.strip()]
  repeated = os.path.join(REPO, f'{stem}_prompts.jsonl')
  with open(repeated, 'w', encoding='utf-8') as f:
    f.writelines(json.dumps({'prompt': r['prompt']}) + '\n' for r in rows for _ in range(samples))
  out = generate(sft, f'{stem}_samples.jsonl', '--config.decode.method=sample', prompts=repeated)
  pairs = []
  for i, r in enumerate(rows):
    wrong = sorted({x['output'].strip() for x in out[i * samples:(i + 1) * samples]} - {r['answer'], ''})
    pairs += [json.dumps({'prompt': r['prompt'], 'chosen': r['answer'], 'rejected': w}) + '\n' for w in wrong]
  for split in ('train', 'validation'):
    with open(os.path.join(REPO, DATA, f'pairs_{split}.jsonl'), encoding='utf-8') as f:
      committed = f.readlines()
    with open(os.path.join(REPO, f'{stem}_{split}.jsonl'), 'w', encoding='utf-8') as f:
      f.writelines(committed + (pairs if split == 'train' else []))
  return len(pairs)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--runs', default='runs/pref', help='the workdirs go under this folder')
  parser.add_argument('--only', default=','.join(STAGES), help='comma list of stages (sft first when missing)')
  args = parser.parse_args()
  only = args.only.split(',')
  wd = lambda name: f'{args.runs}_{name}'  # noqa: E731

  def train(variant: str, *flags: str) -> float:
    shutil.rmtree(os.path.join(REPO, wd(variant)), ignore_errors=True)  # each stage from scratch (train.py resumes)
    return sh([sys.executable, 'train.py', f'--config=configs/preferences_tiny.py:{variant}', f'--workdir={wd(variant)}',
               f'--config.checkpoint.init_from={wd("sft")}', *flags])

  table, results = [], {}
  if 'sft' in only or not os.path.isdir(os.path.join(REPO, wd('sft'))):
    shutil.rmtree(os.path.join(REPO, wd('sft')), ignore_errors=True)
    seconds = sh([sys.executable, 'train.py', '--config=configs/preferences_tiny.py', f'--workdir={wd("sft")}'])
    results['sft'] = dict(seconds=seconds, eval_loss=last(wd('sft'), 'eval_loss'))
  base = greedy_accuracy(wd('sft'))
  results['sft_exact_match'] = base
  table.append(('SFT', 'held-out exact match (greedy)', '-', f'{base:.3f}', '-', results.get('sft', {}).get('seconds')))
  if 'reward' in only or 'best_of_n' in only:
    start = time.perf_counter()
    labelled = label_pairs(wd('sft'), wd('labelled'))  # + the SFT model's own wrong samples, ranked below the sum
    seconds = time.perf_counter() - start
    seconds += train('reward', f'--config.data.source=jsonl:{wd("labelled")}_{{split}}.jsonl')
    acc = last(wd('reward'), 'eval_accuracy')
    results['reward'] = dict(seconds=seconds, eval_accuracy=acc, eval_margin=last(wd('reward'), 'eval_margin'),
                             on_policy_pairs=labelled)
    table.append(('reward model', 'held-out pair accuracy', '0.5 (chance)', f'{acc:.3f}', '-', seconds))
  for method in ('dpo', 'simpo'):
    if method in only:
      before = preference_accuracy(wd('sft'))
      seconds = train(method)
      after, em = preference_accuracy(wd(method)), greedy_accuracy(wd(method))
      kl = None
      if method == 'dpo':  # mean (log pi - log pi_ref) per chosen response = rewards_chosen / beta
        kl = last(wd(method), 'eval_rewards_chosen') / 0.1
      results[method] = dict(seconds=seconds, preference_accuracy=[before, after], exact_match=[base, em],
                             eval_reward_accuracy=last(wd(method), 'eval_reward_accuracy'), logratio_chosen=kl)
      table.append((method.upper() if method == 'dpo' else 'SimPO', 'held-out preference accuracy (policy)',
                    f'{before:.3f}', f'{after:.3f}', '-' if kl is None else f'{kl:.2f} (chosen log-ratio)', seconds))
      table.append(('', 'held-out exact match (greedy)', f'{base:.3f}', f'{em:.3f}', '', ''))
  for method in ('grpo', 'rloo', 'ppo'):
    if method in only:
      seconds = train(method)
      em = greedy_accuracy(wd(method))
      kl = last(wd(method), 'train_kl')
      results[method] = dict(seconds=seconds, exact_match=[base, em], kl=kl,
                             reward_mean=last(wd(method), 'train_reward_mean'))
      table.append((method.upper(), 'held-out exact match (greedy)', f'{base:.3f}', f'{em:.3f}', f'{kl:.4f}',
                    seconds))
  if 'best_of_n' in only:
    start = time.perf_counter()
    out = generate(wd('sft'), f'{wd("sft")}/best_of_8.jsonl', '--config.decode.num_samples=8',
                   '--config.decode.method=sample', f'--config.decode.reward_model={wd("reward")}')
    seconds = time.perf_counter() - start
    rows_ = answers()
    sampled = sum(s.strip() == r['answer'] for x, r in zip(out, rows_) for s in x['samples']) / (8 * len(rows_))
    best = exact([x['output'] for x in out], rows_)
    oracle = sum(any(s.strip() == r['answer'] for s in x['samples']) for x, r in zip(out, rows_)) / len(rows_)
    results['best_of_n'] = dict(seconds=seconds, plain_sampling=sampled, best_of_8=best, pass_at_8=oracle)
    table.append(('best-of-8 (reward model)', 'held-out exact match vs plain sampling', f'{sampled:.3f}',
                  f'{best:.3f}', f'pass@8 {oracle:.3f}', seconds))
  print('\n| method | measure | before | after | KL to the reference | wall time (s) |')
  print('|---|---|---|---|---|---|')
  for name, measure, before, after, kl, seconds in table:
    print(f'| {name} | {measure} | {before} | {after} | {kl} | {"" if seconds in ("", None) else f"{seconds:.0f}"} |')
  with open(os.path.join(REPO, f'{args.runs}_results.json'), 'w', encoding='utf-8') as f:
    json.dump(results, f, indent=2)


if __name__ == '__main__':
  main()
