"""Growing a byte model's vocabulary for Chinese (the Chinese-LLaMA recipe, small): bits per character.

  python benchmarks/zh_vocab_extend.py [--base_steps=300] [--steps=300] [--top=500] [--out=/tmp/zh_vocab]

1. base      configs/zh_char.py:byte's model trained on English (tinyshakespeare, UTF-8 bytes) for --base_steps;
2. tokens    the --top most frequent Chinese characters (CJK ideographs and CJK / full-width punctuation) of
             zh_fortunes' TRAINING split (the split the runs train on, read through jaxformer's text source), one
             per line: OUT/zh_top.txt;
3. continued the base continued on zh_fortunes for --steps, the same config twice:
               bytes      as is (a Chinese character = 3 byte tokens);
               extended   data.tokenizer_extra=OUT/zh_top.txt (each of those characters one token, its embedding
                          and output row starting at the mean of the base's 261);
   plus, to separate the base's part from the vocabulary's, both tokenizers from scratch (no base), same steps.

Prints one table row per run from its metrics.jsonl: the final eval on the whole validation split
(eval_bits_per_char, the metric comparable across tokenizers). Runs on CPU in a few minutes per run.
"""
import argparse
import collections
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ZH = os.path.join(REPO, '..', 'shared', 'data', 'zh_fortunes', 'chinese.txt')
EN = os.path.join(REPO, '..', 'shared', 'data', 'tinyshakespeare', 'input.txt')


def is_chinese(c: str) -> bool:
  o = ord(c)
  return 0x3000 <= o <= 0x303F or 0x3400 <= o <= 0x4DBF or 0x4E00 <= o <= 0x9FFF or 0xFF00 <= o <= 0xFFEF


def top_characters(top: int, path: str) -> tuple[int, float]:
  """Writes the `top` most frequent Chinese characters of zh_fortunes' training split to `path`; returns how many
  distinct Chinese characters the split has and the share of its Chinese characters the chosen ones are."""
  sys.path.insert(0, REPO)
  from configs import zh_char  # pylint: disable=g-import-not-at-top
  from jaxformer import settings  # pylint: disable=g-import-not-at-top
  from jaxformer.data import get_source  # pylint: disable=g-import-not-at-top
  from jaxformer.data.tokenizers import training_texts  # pylint: disable=g-import-not-at-top
  config = zh_char.get_config('byte')
  config.data.source = f'text:{ZH}'
  config.data.data_dir = os.path.join(os.path.dirname(path), 'data')
  source = get_source(settings.from_config(config), os.path.dirname(path))
  counts = collections.Counter()
  for text in training_texts(source, 'train'):
    counts.update(c for c in text if is_chinese(c))
  chosen = [c for c, _ in counts.most_common(top)]
  with open(path, 'w', encoding='utf-8') as f:
    f.write(''.join(c + '\n' for c in chosen))
  return len(counts), sum(counts[c] for c in chosen) / max(sum(counts.values()), 1)


def train(workdir: str, steps: int, *flags: str) -> float:
  start = time.time()
  data_dir = os.path.join(os.path.dirname(workdir), 'data')  # one conversion of each text file for every run
  subprocess.run([sys.executable, 'train.py', '--config=configs/zh_char.py:byte', f'--workdir={workdir}',
                  f'--config.data.data_dir={data_dir}',
                  f'--config.train.num_steps={steps}', f'--config.train.eval_every={steps}',
                  f'--config.checkpoint.every_steps={steps}', '--config.train.warmup_steps=30', *flags],
                 cwd=REPO, check=True, stdout=subprocess.DEVNULL)
  return time.time() - start


def final_eval(workdir: str) -> dict:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return [r for r in rows if 'eval_bits_per_char' in r][-1]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--base_steps', type=int, default=300)
  parser.add_argument('--steps', type=int, default=300)
  parser.add_argument('--top', type=int, default=500)
  parser.add_argument('--out', default='/tmp/zh_vocab')
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  tokens = os.path.join(args.out, 'zh_top.txt')
  distinct, coverage = top_characters(args.top, tokens)
  print(f'{args.top} most frequent of {distinct} Chinese characters in the training split: {100 * coverage:.1f}% of '
        f'its Chinese characters -> {tokens}')
  base = os.path.join(args.out, 'base_en_bytes')
  runs = {}
  if not os.path.isfile(os.path.join(base, 'metrics.jsonl')):
    runs['base'] = train(base, args.base_steps, f'--config.data.source=text:{EN}')
  zh = f'--config.data.source=text:{ZH}'
  arms = {'bytes (continued)': [zh, f'--config.checkpoint.init_from={base}'],
          f'bytes + top {args.top} chars (continued)': [zh, f'--config.checkpoint.init_from={base}',
                                                        f'--config.data.tokenizer_extra={tokens}'],
          'bytes from scratch': [zh],
          f'bytes + top {args.top} chars from scratch': [zh, f'--config.data.tokenizer_extra={tokens}']}
  names = {name: os.path.join(args.out, name.split(' (')[0].replace(' + ', '_').replace(' ', '_')) for name in arms}
  for name, flags in arms.items():
    runs[name] = train(names[name], args.steps, *flags)
  print(f'\n| run | vocab | val bits / char | val bits / byte | val loss / token | val tokens | wall |')
  print('|---|---|---|---|---|---|---|')
  for name in arms:
    row = final_eval(names[name])
    with open(os.path.join(names[name], 'config.json')) as f:
      vocab = json.load(f)['model']['vocab_size']
    print(f'| {name} | {vocab} | **{row["eval_bits_per_char"]:.3f}** | {row["eval_bits_per_byte"]:.3f} | '
          f'{row["eval_loss"]:.3f} | {row.get("eval_tokens", "")} | {runs[name]:.0f} s |')
  base_row = final_eval(base)
  print(f'\nbase (English bytes, {args.base_steps} steps): val bits/char on Shakespeare {base_row["eval_bits_per_char"]:.3f}')


if __name__ == '__main__':
  main()
