"""Passkey retrieval of a decoder_only checkpoint (benchmarks/passkey.py): accuracy per context length, with RoPE
as trained and with each RoPE scaling applied at evaluation only (no fine-tuning), as the position-interpolation
literature measures it (Chen et al. 2023; bloc97's dynamic NTK; YaRN, Peng et al. 2023).

For each length L the same prompts (data/sources/passkey.py: keys from the seed, depths evenly spread) are
greedy-decoded; a completion is right when its first number is the key. A scaled setting replaces the model's
model.rope_scaling by its kind with rope_factor = (L + new tokens) / T and rope_original_max_len = T, where T is
the context the model was trained at (its model.rope_original_max_len, which defaults to model.max_len), so every
position the decoding reaches is inside the interpolated range; at L <= T the factor is 1 and every setting is the
unscaled model. 'none' is the checkpoint's own RoPE (scaled already if it was trained or imported with scaling).
The parameters are shared by every setting: only the static RoPE frequencies and the cache length change.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxformer.apps import evaluate
from jaxformer.data.sources import passkey as passkey_data
from jaxformer.model.positions import ROPE_SCALINGS
from jaxformer import heads
from jaxformer import settings as settings_lib
from jaxformer.training import state as state_lib

NEW_TOKENS = passkey_data.KEY_DIGITS + 2  # ' 71432.': room for the key, its space and one more token
AS_TRAINED = 'none'


class PasskeyError(evaluate.EvalError):
  """A passkey request this checkpoint cannot serve (one line naming the flag and the fix)."""


def trained_length(r: evaluate.Restored) -> int:
  """T: the context the model's positions were trained at (model.rope_original_max_len, default model.max_len)."""
  return int(r.config.model.rope_original_max_len)


def setting_model(r: evaluate.Restored, scaling: str, length: int) -> tuple[evaluate.Restored, float]:
  """(r with RoPE `scaling` for prompts of `length` tokens and a cache long enough for them, its rope_factor), the
  same parameters. scaling 'none' keeps the checkpoint's RoPE."""
  model_cfg, train_len = r.config.model, trained_length(r)
  needed = length + NEW_TOKENS
  factor = max(1.0, needed / train_len)
  changes: dict[str, Any] = {'max_len': max(needed, model_cfg.max_len), 'rope_original_max_len': train_len}
  if scaling != AS_TRAINED:
    changes.update(rope_scaling=scaling, rope_factor=factor)
  else:
    factor = float(model_cfg.rope_factor) if model_cfg.rope_scaling != 'none' else 1.0
  config = settings_lib.replace(r.config, model=dataclasses.replace(model_cfg, **changes))
  graphdef = state_lib.abstract_model(config, r.mesh, r.rules)[0]
  _, params, rest = nnx.split(r.model, nnx.Param, ...)
  model = nnx.merge(graphdef, params, rest)
  resolved = dataclasses.replace(r.resolved, config=config)
  return dataclasses.replace(r, resolved=resolved, model=model), factor


def check_request(r: evaluate.Restored, lengths: Sequence[int], scalings: Sequence[str]) -> None:
  """PasskeyError for a checkpoint or request the check cannot run."""
  cfg = r.config.model
  if cfg.arch != 'decoder_only' or not heads.head_of(cfg).decodes:
    raise PasskeyError(f'passkey retrieval decodes text: {r.resolved.workdir} holds a {cfg.arch} model.head='
                       f'{cfg.head} model; use a decoder_only language model.')
  unknown = [s for s in scalings if s not in ROPE_SCALINGS]
  if unknown:
    raise PasskeyError(f'--scalings: {", ".join(unknown)} is not a RoPE scaling; use some of '
                       f'{", ".join(ROPE_SCALINGS)}.')
  if cfg.position != 'rope':
    if any(s != AS_TRAINED for s in scalings):
      raise PasskeyError(f'--scalings: {r.resolved.workdir} has model.position={cfg.position}, not rope; use '
                         '--scalings=none.')
    if cfg.position == 'learned' and max(lengths) + NEW_TOKENS > cfg.max_len:
      raise PasskeyError(f'--lengths: {max(lengths)} tokens + {NEW_TOKENS} new ones exceed the learned positions '
                         f'(model.max_len={cfg.max_len}); use lengths up to {cfg.max_len - NEW_TOKENS}.')


def run(r: evaluate.Restored, lengths: Sequence[int], scalings: Sequence[str], *, num_prompts: int = 20,
        seed: int = 0, log: Any = print) -> dict[str, Any]:
  """Accuracy of every (scaling, length) on num_prompts prompts -> a JSON-able dict: the settings and one cell per
  pair with its accuracy and, per prompt, the depth, key and the model's answer."""
  check_request(r, lengths, scalings)
  tok = r.tokenizer

  def count(text: str) -> int:  # a prompt's length as decoding sees it: BOS included
    return len(tok.prompt(tok.encode(text)))

  prompts = {length: passkey_data.eval_prompts(length, num_prompts, seed, count) for length in lengths}
  cells = []
  for scaling in scalings:
    for length in lengths:
      variant, factor = setting_model(r, scaling, length)
      completions = [texts[0] for texts in evaluate.complete(
          variant, [p.text for p in prompts[length]], stop=(), max_new_tokens=NEW_TOKENS, num_return_sequences=1)]
      keys = [p.key for p in prompts[length]]
      cell = {'scaling': scaling, 'length': length, 'rope_factor': round(factor, 4),
              'accuracy': passkey_data.accuracy(completions, keys), 'num_prompts': len(keys),
              'prompts': [{'depth': round(p.depth, 4), 'key': p.key, 'answer': passkey_data.answer_of(c),
                           'completion': c} for p, c in zip(prompts[length], completions)]}
      log(f'passkey {scaling:<8} length {length:>6} factor {factor:>6.2f}: accuracy {cell["accuracy"]:.3f}')
      cells.append(cell)
  return {'step': r.step, 'trained_length': trained_length(r), 'num_prompts': num_prompts, 'seed': seed,
          'new_tokens': NEW_TOKENS, 'cells': cells}


def greedy(r: evaluate.Restored) -> evaluate.Restored:
  """r decoding greedily, one sequence per prompt, no stop strings or sampling controls (the check's decoding)."""
  decode = dataclasses.replace(r.config.decode, method='greedy', num_return_sequences=1, repetition_penalty=1.0,
                               no_repeat_ngram_size=0, min_new_tokens=0, stop='', num_samples=1)
  return dataclasses.replace(r, resolved=dataclasses.replace(
      r.resolved, config=settings_lib.replace(r.config, decode=decode)))


def table(results: dict[str, Any]) -> str:
  """Accuracy per length (columns) per scaling (rows), as printed and pasted into RESULTS.md."""
  lengths = sorted({c['length'] for c in results['cells']})
  scalings = list(dict.fromkeys(c['scaling'] for c in results['cells']))
  acc = {(c['scaling'], c['length']): c['accuracy'] for c in results['cells']}
  lines = ['| RoPE at eval | ' + ' | '.join(f'{n}' for n in lengths) + ' |',
           '|---|' + '---:|' * len(lengths)]
  for s in scalings:
    lines.append(f'| {s} | ' + ' | '.join(f'{acc[(s, n)]:.2f}' for n in lengths) + ' |')
  return '\n'.join(lines)


MENTIONS = ('needle', 'second', 'answer')  # the key's three mentions in a builtin:passkey document


def mention_starts(doc: str) -> tuple[str, tuple[int, int, int]]:
  """(key, character offsets of its needle, second and answer mentions) of a builtin:passkey prompt document."""
  key = re.search(r'The pass key is (\d+)\.', doc).group(1)
  return key, (doc.index(f'The pass key is {key}') + len('The pass key is '),
               doc.index(f'Remember it. {key}') + len('Remember it. '), len(doc) - len(key) - 1)


def mention_scores(r: evaluate.Restored, num_docs: int = 64) -> dict[str, dict[str, float]]:
  """Teacher-forced loss (nats per digit) and accuracy of the key's digits at its three mentions in builtin:passkey
  validation documents of up to the trained length: the needle's (random: ln 10 = 2.303 at best), the second
  mention's (a copy 20 characters back) and the answer's (retrieval). Shows a run on its way to retrieval before
  greedy answers do. Character-level tokenizers only (a character is a token)."""
  if str(r.config.data.tokenizer) != 'char':
    raise PasskeyError(f'--mentions scores character positions; {r.resolved.workdir} has data.tokenizer='
                       f'{r.config.data.tokenizer}, not char.')
  docs = passkey_data.split_of('validation', trained_length(r)).read(range(num_docs))
  rows = [r.tokenizer.prompt(r.tokenizer.encode(d)) for d in docs]
  ids = np.zeros((len(rows), max(map(len, rows))), np.int32)
  for i, row in enumerate(rows):
    ids[i, :len(row)] = row
  logp = np.asarray(nnx.jit(lambda model, x: jax.nn.log_softmax(model(x).astype(jnp.float32), -1))(r.model, ids))
  losses: dict[str, list[float]] = {m: [] for m in MENTIONS}
  hits: dict[str, list[bool]] = {m: [] for m in MENTIONS}
  for b, doc in enumerate(docs):
    key, starts = mention_starts(doc)
    offset = len(rows[b]) - len(doc)  # BOS: character j is token offset + j, predicted at offset + j - 1
    for mention, start in zip(MENTIONS, starts):
      for t in range(offset + start, offset + start + len(key)):
        losses[mention].append(float(-logp[b, t - 1, rows[b][t]]))
        hits[mention].append(bool(np.argmax(logp[b, t - 1]) == rows[b][t]))
  return {m: {'loss': float(np.mean(losses[m])), 'accuracy': float(np.mean(hits[m]))} for m in MENTIONS}
