"""Writes the committed data of the preference / RL recipes (configs/preferences_tiny.py): 2-digit addition.

  python benchmarks/preferences/make_data.py [--out benchmarks/preferences/data] [--seed 0]

Task: a prompt "37+45=" and the answer "82" (a, b in 10..99: 8,100 problems). Verifiable: the answer is checked
exactly (benchmarks/preferences/rewards.py). Standard library only; the same seed writes the same bytes.

The SFT demonstrations are almost all carry-free (every column's digits add up to less than 10: 23+45=68, not
37+45=82 nor 52+61=113): all carry-free problems of the training pool and a seeded 3% (CARRY_SHARE) of those with
a carry. Everything else is uniform over all problems, ~76% of which carry. So supervised fine-tuning learns the
format and carry-free sums and only a little carrying: its held-out exact match is modest and stable, and a reward
on uniform prompts (RL), preference pairs or rankings that include carrying have room to raise it.

Every problem is used by at most one held-out file, and no held-out problem appears in any training file:
  held out (700, uniform)  sft_validation (200), prompts_validation (200), pairs_validation (200),
                           ranked_validation (100)
  training pool (7,400)    prompts_train: 1,000 uniform problems, none of them in sft_train (RL sees new problems);
                           sft_train: the rest of the pool, carry-free plus CARRY_SHARE of the carrying ones;
                           pairs_train (2,000) and ranked_train (300): uniform over the whole pool
Files (one JSON object per line):
  sft_{split}.jsonl      {"prompt", "response"}                 supervised fine-tuning (data.source=jsonl:...)
  prompts_{split}.jsonl  {"prompt", "answer"}                   RL prompts; the reward compares with "answer"
  pairs_{split}.jsonl    {"prompt", "chosen", "rejected"}       chosen = the sum, rejected = a plausible mistake
  ranked_{split}.jsonl   {"prompt", "responses": [best, ..., worst]}   the sum, a near miss, a far-off number
"""
import argparse
import json
import os
import random

LOW, HIGH = 10, 99  # both operands
HELD_OUT = {'sft': 200, 'prompts': 200, 'pairs': 200, 'ranked': 100}
PROMPTS_TRAIN, PAIRS_TRAIN, RANKED_TRAIN = 1000, 2000, 300
CARRY_SHARE = 0.03  # of the training pool's problems with a carry, the share kept in sft_train


def carries(a: int, b: int) -> bool:
  """Whether adding a and b carries in some column (units into tens, or tens into hundreds)."""
  return a % 10 + b % 10 >= 10 or a // 10 + b // 10 >= 10


def prompt(a: int, b: int) -> str:
  return f'{a}+{b}='


def plausible_mistake(a: int, b: int, rng: random.Random) -> int:
  """A wrong sum a careless adder might write: off by 1 or 2, a dropped or extra carry (+-10), one digit
  changed, or the two digits of the units column added without the carry. Never the sum, never negative."""
  s = a + b
  while True:
    kind = rng.choice(('off_small', 'carry', 'digit', 'no_carry'))
    if kind == 'off_small':
      wrong = s + rng.choice((-2, -1, 1, 2))
    elif kind == 'carry':
      wrong = s + rng.choice((-10, 10))
    elif kind == 'digit':
      digits = list(str(s))
      i = rng.randrange(len(digits))
      digits[i] = rng.choice([d for d in '0123456789' if d != digits[i] and not (i == 0 and d == '0')])
      wrong = int(''.join(digits))
    else:  # each column's digits added mod 10, carries lost: 37+45 -> 72
      wrong = (a // 10 + b // 10) * 10 + (a % 10 + b % 10) % 10
    if wrong != s and wrong >= 0:
      return wrong


def ranking(a: int, b: int, rng: random.Random) -> list[str]:
  """[the sum, a near miss (off by 1..3), a far-off number (off by 20 or more)]: ordered both by exact match and
  by rewards.numeric_closeness (1, 0.7..0.9, 0)."""
  s = a + b
  near = s + rng.choice((-3, -2, -1, 1, 2, 3))
  far = s
  while abs(far - s) < 20:
    far = rng.randint(LOW + LOW, HIGH + HIGH)
  return [str(s), str(near), str(far)]


def write(path: str, rows: list[dict]) -> None:
  with open(path, 'w', encoding='ascii', newline='\n') as f:
    for row in rows:
      f.write(json.dumps(row) + '\n')


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--out', default=os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data'))
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args()
  rng = random.Random(args.seed)
  problems = [(a, b) for a in range(LOW, HIGH + 1) for b in range(LOW, HIGH + 1)]
  rng.shuffle(problems)

  held: dict[str, list[tuple[int, int]]] = {}
  start = 0
  for name, n in HELD_OUT.items():
    held[name], start = problems[start:start + n], start + n
  pool = problems[start:]
  prompts_train, rest = pool[:PROMPTS_TRAIN], pool[PROMPTS_TRAIN:]
  carrying = [p for p in rest if carries(*p)]
  kept = set(rng.sample(carrying, round(CARRY_SHARE * len(carrying))))
  sft_train = [p for p in rest if not carries(*p) or p in kept]
  pairs_train, ranked_train = rng.sample(pool, PAIRS_TRAIN), rng.sample(pool, RANKED_TRAIN)

  splits = {
      'sft': {'train': sft_train, 'validation': held['sft']},
      'prompts': {'train': prompts_train, 'validation': held['prompts']},
      'pairs': {'train': pairs_train, 'validation': held['pairs']},
      'ranked': {'train': ranked_train, 'validation': held['ranked']},
  }
  makers = {
      'sft': lambda a, b: {'prompt': prompt(a, b), 'response': str(a + b)},
      'prompts': lambda a, b: {'prompt': prompt(a, b), 'answer': str(a + b)},
      'pairs': lambda a, b: {'prompt': prompt(a, b), 'chosen': str(a + b),
                             'rejected': str(plausible_mistake(a, b, rng))},
      'ranked': lambda a, b: {'prompt': prompt(a, b), 'responses': ranking(a, b, rng)},
  }
  os.makedirs(args.out, exist_ok=True)
  for kind, by_split in splits.items():
    for split, items in by_split.items():
      path = os.path.join(args.out, f'{kind}_{split}.jsonl')
      write(path, [makers[kind](a, b) for a, b in items])
      share = sum(carries(*p) for p in items) / len(items)
      print(f'{path}: {len(items)} lines, {share:.0%} with a carry')


if __name__ == '__main__':
  main()
