"""Self-consistency: extract an answer from each sampled completion and take the majority vote.

Pure Python on texts, so eval.py --mode=generate (decode.answer_pattern with decode.num_samples) and a harness
adapter share one definition of "the answer" and of the vote.
"""
from __future__ import annotations

import collections
import re
from collections.abc import Sequence


def compile_pattern(pattern: str | re.Pattern) -> re.Pattern:
  """decode.answer_pattern as a compiled regex; ValueError (one line naming the key) when it does not compile."""
  if isinstance(pattern, re.Pattern):
    return pattern
  try:
    return re.compile(pattern)
  except re.error as e:
    raise ValueError(f'decode.answer_pattern={pattern!r} is not a valid regular expression ({e}); e.g. '
                     r"--config.decode.answer_pattern='answer is (\-?[0-9]+)'.") from None


def extract_answer(text: str, pattern: str | re.Pattern) -> str | None:
  """The first match's first capture group (the whole match when the pattern has no group), stripped; None when
  nothing matches (or the group did not take part), so that completion does not vote."""
  match = compile_pattern(pattern).search(text)
  if match is None:
    return None
  answer = match.group(1) if match.re.groups else match.group(0)
  return None if answer is None else answer.strip()


def majority_vote(answers: Sequence[str | None]) -> tuple[str | None, int, int]:
  """-> (the most common answer, its votes, the index of the first completion giving it). None answers do not
  vote; ties go to the answer that appeared first. (None, 0, -1) when nothing voted."""
  counts = collections.Counter(a for a in answers if a is not None)
  if not counts:
    return None, 0, -1
  best = max(counts, key=counts.__getitem__)  # Counter keeps first-appearance order; max keeps the first best
  return best, counts[best], list(answers).index(best)


def self_consistency(completions: Sequence[str], pattern: str | re.Pattern) -> dict:
  """The vote over one prompt's sampled completions -> {'output': a completion giving the voted answer (the first
  completion when none voted), 'answer', 'answers' (one per completion, None for no match), 'votes'}."""
  regex = compile_pattern(pattern)
  answers = [extract_answer(c, regex) for c in completions]
  answer, votes, where = majority_vote(answers)
  return {'output': completions[where] if where >= 0 else (completions[0] if completions else ''),
          'answer': answer, 'answers': answers, 'votes': votes}
