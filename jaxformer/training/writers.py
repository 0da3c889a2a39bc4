"""Metric sinks: DIR/metrics.jsonl (one JSON object per row) and TensorBoard events in DIR/tensorboard/.

Only process 0 writes; other processes get a writer that does nothing.
"""
from __future__ import annotations

import json
import math
import os
import sys
from typing import Any, Mapping


def _clean(value: Any) -> Any:
  """JSON-safe scalars: ints stay ints, NaN/inf become None."""
  if isinstance(value, int) and not isinstance(value, bool):
    return value
  try:
    value = float(value)
  except (TypeError, ValueError):
    return value
  return None if math.isnan(value) or math.isinf(value) else value


def _import_summary_writer():
  """tensorboardX.SummaryWriter without tensorboardX's optional `import torch` (seconds of start-up for nothing:
  we only log scalars). If torch is already imported it is left alone."""
  if 'tensorboardX' in sys.modules or 'torch' in sys.modules:
    from tensorboardX import SummaryWriter
    return SummaryWriter
  sys.modules['torch'] = None  # makes `import torch` raise ImportError inside tensorboardX's try/except
  try:
    from tensorboardX import SummaryWriter
  finally:
    del sys.modules['torch']
  return SummaryWriter


class MetricWriter:
  def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._tb = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      if tensorboard:
        SummaryWriter = _import_summary_writer()
        self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'), flush_secs=30)

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    """Appends {'step': step, **metrics} to metrics.jsonl and each numeric value as a TensorBoard scalar."""
    if not self.enabled:
      return
    row = {'step': int(step)}
    row.update({k: _clean(v) for k, v in metrics.items()})
    with open(self.path, 'a') as f:
      f.write(json.dumps(row) + '\n')
    if self._tb is not None:
      for key, value in row.items():
        if key != 'step' and isinstance(value, float):
          self._tb.add_scalar(key, value, int(step))

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def read_metrics(workdir: str) -> list[dict]:
  """The rows of DIR/metrics.jsonl (for tests and tools)."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
