"""Writes the committed offline lm-evaluation-harness tasks under benchmarks/harness/tasks/ (run by hand).

The harness's own tasks download their data from the Hugging Face Hub; these read local JSON-lines files
(`dataset_path: json`, data_files relative to the YAML, which jaxformer's harness mode resolves), so they run on a
machine without network. They are built from the built-in synthetic language (builtin:lm, the README's quick-start
data: a seeded word-bigram language, jaxformer/data/sources/builtin.py), whose true next-word distribution is
known, so a model that learned the language scores far above chance and a random one does not:

  synth_next_word   multiple choice by log-likelihood: after a document's first words, the true next word vs three
                    words the language never puts after the last one (acc, acc_norm; chance 0.25)
  synth_continue    generation until a stop string: greedy text after "<words> " cut at the next " " must equal the
                    most likely next word (exact_match)
  synth_vote        synth_continue sampled 5 times at temperature 1 and voted (majority_vote filter): the
                    self-consistency evaluation (maj@5, and the first sample alone)
  synth_rolling     rolling log-likelihood of whole documents (word / byte perplexity, bits per byte)

Questions come from the language's test split, few-shot examples from its training split.

  python benchmarks/harness/make_tasks.py
"""
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..'))
from jaxformer.data.sources.builtin import synthetic_language  # noqa: E402

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'tasks')
SEED = 7
QUESTIONS, SHOTS = 100, 20


def _write_jsonl(name: str, rows: list[dict]) -> None:
  os.makedirs(os.path.join(HERE, 'data'), exist_ok=True)
  with open(os.path.join(HERE, 'data', name), 'w', encoding='utf-8') as f:
    f.writelines(json.dumps(r, ensure_ascii=False) + '\n' for r in rows)


def _prefixes(lang, docs: list[str], n: int, rng: np.random.Generator) -> list[tuple[list[str], str]]:
  """n (first words, true next word) pairs, 3..8 words of context, from distinct documents."""
  out = []
  for j in rng.permutation(len(docs))[:n]:
    words = docs[j].split(' ')
    k = int(rng.integers(3, 9))
    out.append((words[:k], words[k]))
  return out


def next_word_rows(lang, docs: list[str], n: int, rng: np.random.Generator) -> list[dict]:
  index = {w: i for i, w in enumerate(lang.words)}
  rows = []
  for context, answer in _prefixes(lang, docs, n, rng):
    impossible = [w for w in lang.words if lang.transition[index[context[-1]], index[w]] == 0]
    wrong = [impossible[i] for i in rng.choice(len(impossible), size=3, replace=False)]
    label = int(rng.integers(4))
    choices = wrong[:label] + [answer] + wrong[label:]
    rows.append({'context': ' '.join(context), 'choices': choices, 'label': label})
  return rows


def continue_rows(lang, docs: list[str], n: int, rng: np.random.Generator) -> list[dict]:
  index = {w: i for i, w in enumerate(lang.words)}
  rows = []
  for context, _ in _prefixes(lang, docs, n, rng):
    likeliest = lang.words[int(np.argmax(lang.transition[index[context[-1]]]))]
    rows.append({'context': ' '.join(context), 'answer': likeliest})
  return rows


COMMON = """dataset_path: json
dataset_kwargs:
  data_files:
    train: data/{name}_train.jsonl
    test: data/{name}_test.jsonl
training_split: train
fewshot_split: train
test_split: test
"""

# the generation tasks: greedy (synth_continue), or 5 samples majority-voted (synth_vote)
GENERATE = """task: {name}
{{common}}output_type: generate_until
doc_to_text: "{{{{{{{{context}}}}}}}} "
doc_to_target: "{{{{{{{{answer}}}}}}}}"
target_delimiter: ""
generation_kwargs:
  until:
    - " "
    - "\\n"
  {sampling}
  max_gen_toks: 12
{voting}metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
VOTING = """repeats: 5
filter_list:
  - name: "first"
    filter:
      - function: "take_first"
  - name: "maj@5"
    filter:
      - function: "majority_vote"
      - function: "take_first"
"""

YAMLS = {
    'synth_next_word': """task: synth_next_word
{common}output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""",
    'synth_continue': GENERATE.format(name='synth_continue', sampling='do_sample: false', voting=''),
    'synth_vote': GENERATE.format(name='synth_vote', sampling='do_sample: true\n  temperature: 1.0', voting=VOTING),
    'synth_rolling': """task: synth_rolling
{common}output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: byte_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
metadata:
  version: 1.0
""",
}


def main() -> None:
  lang = synthetic_language()
  rng = np.random.default_rng(SEED)
  train, test = lang.split('train'), lang.split('test')
  data = {
      'synth_next_word': (next_word_rows(lang, train, SHOTS, rng), next_word_rows(lang, test, QUESTIONS, rng)),
      'synth_continue': (continue_rows(lang, train, SHOTS, rng), continue_rows(lang, test, QUESTIONS, rng)),
      'synth_rolling': ([{'text': d} for d in train[:SHOTS]], [{'text': d} for d in test[:QUESTIONS // 2]]),
  }
  data['synth_vote'] = data['synth_continue']
  for name, (train_rows, test_rows) in data.items():
    _write_jsonl(f'{name}_train.jsonl', train_rows)
    _write_jsonl(f'{name}_test.jsonl', test_rows)
    with open(os.path.join(HERE, f'{name}.yaml'), 'w', encoding='utf-8') as f:
      f.write(YAMLS[name].format(common=COMMON.format(name=name)))
  print(f'wrote {len(data)} tasks to {HERE}')


if __name__ == '__main__':
  main()
