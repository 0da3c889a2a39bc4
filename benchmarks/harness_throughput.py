"""lm-evaluation-harness throughput: jaxformer's harness model batched vs one request at a time.

  python benchmarks/harness_throughput.py                   # a 6-layer, d_model 384 decoder (random weights)
  python benchmarks/harness_throughput.py --d_model=128 --layers=2 --batch_sizes=1,8,32

Runs the committed offline tasks (benchmarks/harness/tasks) through lm_eval.simple_evaluate, exactly what
`eval.py --mode=harness` runs, for each batch size (harness.batch_size), and prints requests per second of
  synth_next_word   loglikelihood: 4 choices per question (100 questions, 400 requests)
  synth_rolling     loglikelihood_rolling: 50 documents
  synth_continue    generate_until: 100 greedy generations, cut at a stop string
Each task is run twice per batch size and the second (warm: compiled programs reused) is timed, end to end and
the model's share (the time inside the scorer and the decoder; the rest is the harness building prompts and
scoring answers in Python); the first run's time, which includes compiling one program per length bucket, is shown
too. Answers must not depend on the batch
size: every configuration's scores are checked equal to batch size 1's within float32 rounding (relative 1e-5;
printed as 'same').
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
from flax import nnx  # noqa: E402

from configs import default  # noqa: E402
from jaxformer import resolve as resolve_lib  # noqa: E402
from jaxformer.apps import harness as harness_app  # noqa: E402
from jaxformer.model import build_model, count_params  # noqa: E402

TASKS = REPO / 'benchmarks' / 'harness' / 'tasks'
REQUESTS = {'synth_next_word': 400, 'synth_rolling': 50, 'synth_continue': 100}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--batch_sizes', default='1,32')
  parser.add_argument('--d_model', type=int, default=384)
  parser.add_argument('--layers', type=int, default=6)
  parser.add_argument('--tasks', default=','.join(REQUESTS))
  args = parser.parse_args(argv)

  config = default.get_config()
  config.model.update(arch='decoder_only', position='rope', norm='rms', mlp='swiglu', use_bias=False,
                      num_layers=args.layers, num_heads=4, d_model=args.d_model, d_ff=3 * args.d_model, max_len=128)
  config.data.update(source='builtin:lm', tokenizer='byte', seq_len=128)
  config.mesh.data = 1
  r = resolve_lib.resolve(config, '/tmp/jaxformer_harness_bench', training=False)
  model = build_model(r.config.model, rngs=nnx.Rngs(params=0, dropout=1))
  print(f'decoder_only d_model={args.d_model} layers={args.layers}: {count_params(model):,} parameters, byte '
        f'tokenizer, max_len 128, on {jax.devices()[0].platform}')

  rows, first_scores = [], {}
  for task in args.tasks.split(','):
    tasks = harness_app.load_tasks([task], str(TASKS))
    for bs in (int(b) for b in args.batch_sizes.split(',')):
      lm = harness_app.JaxformerLM(harness_app.HarnessModel(model, r.tokenizer, r.config, r.mesh, r.rules),
                                   batch_size=bs, max_gen_toks=16)
      model_seconds = _timed(lm)
      times = []
      for _ in range(2):
        model_seconds[0] = 0.0
        start = time.perf_counter()
        results = harness_app.run_tasks(lm, tasks, num_fewshot=0, limit=0, bootstrap_iters=0)
        times.append(time.perf_counter() - start)
      scores = harness_app.flat_metrics(results)
      ref = first_scores.setdefault(task, scores)
      same = ref.keys() == scores.keys() and all(abs(scores[k] - v) <= 1e-5 * abs(v) for k, v in ref.items())
      n = REQUESTS.get(task, 0)
      rows.append((task, bs, n / times[1], n / model_seconds[0], times[0], times[1], same))

  print(f'\n{"task":<16} {"batch":>5} {"requests/s":>11} {"vs batch 1":>10} {"model only":>10} {"vs batch 1":>10} '
        f'{"cold s":>7} {"warm s":>7}  scores')
  base = {t: (rps, mrps) for t, bs, rps, mrps, *_ in rows if bs == 1}
  for task, bs, rps, mrps, cold, warm, same in rows:
    ratio = f'{rps / base[task][0]:.1f}x' if task in base else '-'
    mratio = f'{mrps / base[task][1]:.1f}x' if task in base else '-'
    print(f'{task:<16} {bs:>5} {rps:>11.1f} {ratio:>10} {mrps:>10.1f} {mratio:>10} {cold:>7.2f} {warm:>7.2f}  '
          f'{"same" if same else "DIFFER"}')


def _timed(lm: harness_app.JaxformerLM) -> list[float]:
  """Wraps the model calls of `lm` (scorer, decoder) with a clock; returns the running total (seconds)."""
  total = [0.0]
  def clocked(fn):
    def call(*args, **kwargs):
      start = time.perf_counter()
      try:
        return fn(*args, **kwargs)
      finally:
        total[0] += time.perf_counter() - start
    return call
  scorer = lm.scorer
  lm.scorer = clocked(scorer)
  lm.scorer.shapes = scorer.shapes
  lm._decode = clocked(lm._decode)
  return total


if __name__ == '__main__':
  main()
