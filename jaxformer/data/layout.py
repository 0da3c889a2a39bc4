"""Which rows of each global batch a host loads (t5x's DataLayout): the data side of the host/mesh contract."""
from __future__ import annotations

import dataclasses

import jax

from jaxformer.errors import DataError


@dataclasses.dataclass(frozen=True)
class DataLayout:
  """This host feeds rows [shard_index * rows, (shard_index + 1) * rows) of every global batch of batch_size rows.

  Normally shard_index / num_shards are jax.process_index() / process_count(); hosts that hold the same batch rows
  (e.g. tensor parallel across hosts) share a shard index (sharding.data_layout derives it from the mesh).
  """

  batch_size: int  # global rows per batch
  shard_index: int = 0
  num_shards: int = 1

  def __post_init__(self):
    if not 0 <= self.shard_index < self.num_shards:
      raise DataError(f'DataLayout: shard_index={self.shard_index} must be in [0, num_shards={self.num_shards}).')

  @classmethod
  def for_process(cls, batch_size: int) -> DataLayout:
    """One shard per process (the layout when every process holds its own batch rows)."""
    return cls(int(batch_size), jax.process_index(), jax.process_count())

  @property
  def rows(self) -> int:
    """Rows this host loads per batch."""
    return self.batch_size // self.num_shards

  @property
  def first_row(self) -> int:
    return self.shard_index * self.rows

  def check(self, key: str) -> None:
    """DataError unless the batch splits into equal host slices; `key` names the config key of batch_size."""
    if self.batch_size <= 0 or self.batch_size % self.num_shards:
      raise DataError(f'{key}={self.batch_size} is not a positive multiple of the {self.num_shards} hosts; each host '
                      'takes an equal slice of the global batch.')
