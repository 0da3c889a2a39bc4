"""Passkey retrieval vs context length, with and without RoPE scaling at evaluation (jaxformer/apps/passkey.py).

  python train.py --config=configs/long_context.py:passkey_warmup --workdir=runs/passkey_warmup
  python train.py --config=configs/long_context.py:passkey --workdir=runs/passkey \
      --config.checkpoint.init_from=runs/passkey_warmup
  python benchmarks/passkey.py --workdir=runs/passkey --lengths=384,512,640,768,1024,2048,4096 \
      --scalings=none,linear,dynamic,yarn --num_prompts=20 --batch_size=5 --mentions --plot=docs/passkey.png

Any decoder_only workdir works: one train.py wrote, or one `python -m jaxformer.hf import` made from a Hugging Face
checkpoint (lengths are then in its tokenizer's tokens). Prints a table (accuracy per length per setting) and
writes the JSON (per prompt: depth, key, the model's answer) and optionally a picture.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import default  # noqa: E402
from jaxformer import cli  # noqa: E402
from jaxformer.apps import evaluate  # noqa: E402
from jaxformer.apps import passkey  # noqa: E402
from jaxformer.errors import UserError  # noqa: E402


def plot(results: dict, path: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(5.5, 3.6))
  for scaling in dict.fromkeys(c['scaling'] for c in results['cells']):
    cells = sorted((c for c in results['cells'] if c['scaling'] == scaling), key=lambda c: c['length'])
    label = 'no scaling' if scaling == 'none' else scaling
    ax.plot([c['length'] for c in cells], [c['accuracy'] for c in cells], marker='o', label=label)
  ax.axvline(results['trained_length'], color='grey', linestyle=':', linewidth=1)
  ax.set_xscale('log', base=2)
  ax.set_xlabel('context length (tokens); dotted: trained length')
  ax.set_ylabel(f'passkey accuracy ({results["num_prompts"]} prompts)')
  ax.set_ylim(-0.03, 1.03)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  print(f'wrote {path}')


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--workdir', required=True, help='a decoder_only run directory (train.py or jaxformer.hf import)')
  parser.add_argument('--lengths', default='512,1024,2048,4096', help='prompt lengths in tokens (BOS included)')
  parser.add_argument('--scalings', default='none,linear,dynamic,yarn',
                      help='none (the checkpoint\'s RoPE) and RoPE scalings applied at evaluation only')
  parser.add_argument('--num_prompts', type=int, default=20, help='prompts per length (depths evenly spread)')
  parser.add_argument('--seed', type=int, default=0, help='draws the keys')
  parser.add_argument('--batch_size', type=int, default=20, help='prompts decoded together')
  parser.add_argument('--checkpoint_step', type=int, default=None)
  parser.add_argument('--output', default='', help='the JSON results (default DIR/passkey.json)')
  parser.add_argument('--plot', default='', help='a picture of accuracy vs length (.png), optional')
  parser.add_argument('--mentions', action='store_true',
                      help='also the teacher-forced loss / accuracy of the key\'s digits at its three mentions in '
                           'validation documents (needle, second mention, answer): progress before retrieval shows')
  args = parser.parse_args(argv)
  cli.quiet_logging()
  try:
    lengths = [int(x) for x in args.lengths.split(',') if x]
    scalings = [x for x in args.scalings.split(',') if x]
    config = default.get_config()
    config.decode.batch_size = args.batch_size
    r = passkey.greedy(evaluate.restore(config, args.workdir, checkpoint_step=args.checkpoint_step))
    results = passkey.run(r, lengths, scalings, num_prompts=args.num_prompts, seed=args.seed)
    if args.mentions:
      results['mentions'] = passkey.mention_scores(r)
  except (UserError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(passkey.table(results))
  for mention, score in results.get('mentions', {}).items():
    print(f'{mention:<7} digits: loss {score["loss"]:.3f} nats, accuracy {score["accuracy"]:.2f} (teacher-forced)')
  output = args.output or os.path.join(args.workdir, 'passkey.json')
  with open(output, 'w', encoding='utf-8') as f:
    json.dump(results, f, indent=1)
  print(f'wrote {output}')
  if args.plot:
    plot(results, args.plot)
  return 0


if __name__ == '__main__':
  sys.exit(main())
