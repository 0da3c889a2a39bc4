"""Exact-match accuracy of a trained decoder_only checkpoint on a prompts file ({"prompt", "answer"} per line).

  python benchmarks/preferences/accuracy.py WORKDIR benchmarks/preferences/data/prompts_validation.jsonl
  python benchmarks/preferences/accuracy.py WORKDIR FILE --samples 8 [--temperature 1.0] [--limit 100]

Restores WORKDIR's newest checkpoint (or --step's) as eval.py does (jaxformer.apps.evaluate.restore, with the run's saved config:
its decode section, greedy for configs/preferences_tiny.py) and generates for every prompt in batches of
decode.batch_size (generate_texts); a completion is scored by rewards.exact_match. --samples N also draws N samples
per prompt (decode.method=sample at --temperature) and reports their mean accuracy and pass@N: what best-of-N and
RL can reach from this model.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from benchmarks.preferences import rewards  # noqa: E402
from jaxformer import settings  # noqa: E402
from jaxformer.apps.evaluate import generate_texts, restore  # noqa: E402


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('workdir')
  parser.add_argument('file', help='jsonl with "prompt" and "answer" per line')
  parser.add_argument('--samples', type=int, default=0, help='also N sampled completions per prompt (0 = greedy only)')
  parser.add_argument('--temperature', type=float, default=1.0)
  parser.add_argument('--limit', type=int, default=0, help='only the first N prompts (0 = all)')
  parser.add_argument('--step', type=int, default=None, help='the checkpoint step (default: the newest)')
  parser.add_argument('--show', type=int, default=5, help='print this many prompts with their completions')
  args = parser.parse_args()

  with open(args.file, encoding='utf-8') as f:
    rows = [json.loads(line) for line in f if line.strip()]
  rows = rows[:args.limit] if args.limit > 0 else rows
  prompts, answers = [r['prompt'] for r in rows], [r['answer'] for r in rows]
  with open(os.path.join(args.workdir, 'config.json'), encoding='utf-8') as f:
    config = settings.upgrade_saved(json.load(f))

  start = time.perf_counter()
  r = restore(config, args.workdir, checkpoint_step=args.step)
  greedy = generate_texts(r, prompts)
  scores = rewards.exact_match(prompts, greedy, answer=answers)
  for p, c, a in list(zip(prompts, greedy, answers))[:args.show]:
    print(f'  {p}{c!r:8} answer {a}')
  print(f'{args.file}: greedy exact match {sum(scores) / len(scores):.4f} ({int(sum(scores))}/{len(scores)}) '
        f'at step {r.step}')
  if args.samples > 0:
    config.decode.update(method='sample', temperature=args.temperature, top_k=0, top_p=1.0)
    r = restore(config, args.workdir, checkpoint_step=args.step)
    n = args.samples
    repeated = [p for p in prompts for _ in range(n)]
    sampled = rewards.exact_match(repeated, generate_texts(r, repeated), answer=[a for a in answers for _ in range(n)])
    per_prompt = [sampled[i * n:(i + 1) * n] for i in range(len(prompts))]
    print(f'{args.file}: {n} samples per prompt at temperature {args.temperature}: mean exact match '
          f'{sum(sampled) / len(sampled):.4f}, pass@{n} {sum(max(s) for s in per_prompt) / len(prompts):.4f}')
  print(f'({time.perf_counter() - start:.1f}s)')


if __name__ == '__main__':
  main()
