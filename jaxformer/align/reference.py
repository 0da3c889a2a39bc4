"""align.precompute_reference=True: the reference model's log-probabilities computed once per example, before
training (TRL's precompute_ref_log_probs), so the reference's parameters need not stay in memory while training.

Rows are keyed by their content (a hash of both sides' tokens and targets): the precomputing pass reads each split
in order, training reads the same rows shuffled and packed by the same Task, and `add` finds each row's numbers by
its key. The table is kept as DIR/reference_logps.npz, so a resumed run reads it instead of computing it again.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping

import numpy as np

from jaxformer.align.pairwise import REFERENCE_KEYS
from jaxformer.errors import DataError

FILE = 'reference_logps.npz'
_ROW_KEYS = ('chosen_tokens', 'chosen_targets', 'rejected_tokens', 'rejected_targets')


def row_keys(batch: Mapping[str, np.ndarray]) -> list[bytes]:
  """One 16-byte content key per row of a preference batch."""
  parts = [np.ascontiguousarray(batch[k]) for k in _ROW_KEYS]
  return [hashlib.blake2b(b''.join(p[i].tobytes() for p in parts), digest_size=16).digest()
          for i in range(len(parts[0]))]


class ReferenceTable:
  """key -> (reference chosen log-prob, reference rejected log-prob)."""

  def __init__(self, table: dict[bytes, tuple[float, float]] | None = None):
    self.table = dict(table or {})

  def __len__(self) -> int:
    return len(self.table)

  def fill(self, batches: Iterable[Mapping[str, np.ndarray]], logps) -> None:
    """Computes the rows of `batches` it does not have: logps(batch) -> (chosen [B], rejected [B]) numpy."""
    for batch in batches:
      keys = row_keys(batch)
      if all(k in self.table for k in keys):
        continue
      chosen, rejected = logps(batch)
      self.table.update({k: (float(c), float(r)) for k, c, r in zip(keys, chosen, rejected)})

  def add(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The batch with REFERENCE_KEYS [B] float32 from the table."""
    try:
      values = np.asarray([self.table[k] for k in row_keys(batch)], np.float32).reshape(-1, 2)
    except KeyError:
      raise DataError('a training row has no precomputed reference log-probabilities (the data changed since '
                      f'{FILE} was written?); delete it to compute them again, or set '
                      'align.precompute_reference=False.') from None
    return {**batch, REFERENCE_KEYS[0]: values[:, 0], REFERENCE_KEYS[1]: values[:, 1]}

  def save(self, workdir: str) -> str:
    path = os.path.join(workdir, FILE)
    keys = np.frombuffer(b''.join(self.table), np.uint8).reshape(-1, 16)
    tmp = path + '.tmp.npz'
    np.savez(tmp, keys=keys, values=np.asarray(list(self.table.values()), np.float64).reshape(-1, 2))
    os.replace(tmp, path)
    return path

  @classmethod
  def load(cls, workdir: str) -> ReferenceTable | None:
    path = os.path.join(workdir, FILE)
    if not os.path.isfile(path):
      return None
    with np.load(path) as f:
      return cls({bytes(k): (float(v[0]), float(v[1])) for k, v in zip(f['keys'], f['values'])})


class WithReference:
  """A training iterator whose batches carry the table's reference log-probabilities (state passes through)."""

  def __init__(self, inner, table: ReferenceTable):
    self.inner, self.table = inner, table

  def __iter__(self):
    return self

  def __next__(self):
    return self.table.add(next(self.inner))

  def get_state(self):
    return self.inner.get_state()

  def set_state(self, state):
    self.inner.set_state(state)

  def close(self):
    if hasattr(self.inner, 'close'):
      self.inner.close()
