"""Expert load over training, from the train rows a mixture-of-experts run writes (DIR/metrics.jsonl).

  python benchmarks/moe_load.py --workdirs=runs/moe_aux,runs/moe_no_aux --output=docs/moe_expert_load.png

For each workdir: one panel of `train_expert_load/<e>` (each expert's share of the token-to-expert assignments,
averaged over the MoE layers; 1 / num_experts each when balanced) against the step, and the router entropy
(`train_router_entropy`), and a printed table of the final loads, their max / min and the last train loss. A
balanced router keeps every line near 1 / E; a collapsing one sends most tokens to a few experts.
"""
from __future__ import annotations

import argparse
import json
import os


def read_rows(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    rows = [json.loads(line) for line in f if line.strip()]
  rows = [r for r in rows if any(k.startswith('train_expert_load/') for k in r)]
  if not rows:
    raise SystemExit(f'error: {workdir}/metrics.jsonl has no train_expert_load/<e> rows; is it a model.num_experts '
                     '> 0 run?')
  return rows


def experts(rows: list[dict]) -> list[str]:
  return sorted((k for k in rows[0] if k.startswith('train_expert_load/')), key=lambda k: int(k.rsplit('/', 1)[1]))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--workdirs', required=True, help='comma-separated run directories')
  parser.add_argument('--labels', default='', help='comma-separated panel titles (default: the directory names)')
  parser.add_argument('--output', default='moe_expert_load.png')
  args = parser.parse_args(argv)
  workdirs = args.workdirs.split(',')
  labels = args.labels.split(',') if args.labels else [os.path.basename(w.rstrip('/')) for w in workdirs]

  print(f'{"run":<24} {"final loads":<32} {"max/min":>8} {"entropy":>8} {"loss":>8}')
  runs = []
  for workdir, label in zip(workdirs, labels):
    rows = read_rows(workdir)
    keys = experts(rows)
    last = rows[-1]
    loads = [last[k] for k in keys]
    print(f'{label:<24} {" ".join(f"{x:.3f}" for x in loads):<32} {max(loads) / max(min(loads), 1e-9):>8.2f} '
          f'{last.get("train_router_entropy", float("nan")):>8.3f} {last.get("train_loss", float("nan")):>8.4f}')
    runs.append((label, rows, keys))

  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 3.6), sharey=True, squeeze=False)
  for ax, (label, rows, keys) in zip(axes[0], runs):
    steps = [r['step'] for r in rows]
    for k in keys:
      ax.plot(steps, [r[k] for r in rows], label=f'expert {k.rsplit("/", 1)[1]}')
    ax.axhline(1 / len(keys), color='grey', linestyle=':', linewidth=1)
    ax.set_title(label, fontsize=10)
    ax.set_xlabel('step')
    entropy = ax.twinx()
    entropy.plot(steps, [r.get('train_router_entropy', float('nan')) for r in rows], color='black', linewidth=0.8,
                 linestyle='--', label='router entropy')
    entropy.set_ylabel('router entropy (nats)', fontsize=8)
  axes[0][0].set_ylabel('share of token-expert assignments')
  axes[0][0].legend(fontsize=7, loc='upper left')
  fig.tight_layout()
  fig.savefig(args.output, dpi=110)
  print(f'wrote {args.output}')


if __name__ == '__main__':
  main()
