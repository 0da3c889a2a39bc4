"""Train and eval iterators: shuffle, read, build rows (rows.py), shard per host, prefetch; exactly resumable.

Plain numpy and one background thread rather than grain: packing splits long documents across rows (no token is
lost), which grain's packers do not do, and the whole position of the pipeline is a handful of integers we can
checkpoint as JSON and restore exactly, prefetch included. numpy + sentencepiece's batched C++ encoder are far
faster than the training step (see benchmarks/data_throughput.py).

data.sampling picks how training rows are drawn (SAMPLINGS):

* streams (the default). How the training stream is laid out (the reason hosts never read each other's data and
  yet the union of all hosts' slices IS the global batch a single host would produce):
  - The training split (N examples) is read as an endless sequence of epochs; epoch e is the permutation
    `default_rng([seed, PERM, e]).permutation(N)`. Global position g means example perm_{g // N}[g % N].
  - Row r of every global batch (r < B = the layout's batch_size) is produced by its own *row stream*, which
    consumes the positions r, r + B, r + 2B, ... in order. Host h of P owns the streams h*B/P .. (h+1)*B/P - 1
    and only ever reads their examples. A stream's whole state is [k, offset]: its next position index and how
    many tokens of that example are already used, so `get_state()` is a small JSON dict and `set_state()`
    restores exactly.
  - Tokenized training examples are kept in memory up to CACHE_TOKENS, so a small dataset (Multi30k,
    tinyshakespeare) is read and tokenized once; larger ones are re-read each epoch.
* random_windows (LM archs; nanoGPT's `get_batch`): the whole training split is tokenized once into one token
  stream (one document per example, tokenizer.document: BOS + tokens + EOS for jaxformer's tokenizers, in split
  order) and each row of step s is the window at an offset drawn
  from `default_rng([seed, WINDOW, s])` over the global batch. Windows are i.i.d., so consecutive steps are
  uncorrelated: on tinyshakespeare this trains ~0.025 nats lower than streams in the same 2000 steps
  (benchmarks/RESULTS.md). The state is the step alone, so it resumes under any number of hosts.

encoder_only masking draws from `default_rng([seed, MLM, step])` in training and from a fixed seed per batch
index in evaluation.
"""
from __future__ import annotations

import collections
import copy
import queue
import threading
from typing import Any, Iterator

import numpy as np

from jaxformer.errors import DataError
from jaxformer.data.layout import DataLayout
from jaxformer.data.rows import Rows, Stream, Task, as_pair, make_task
from jaxformer.data.sources import Source, Split, get_source
from jaxformer.data.tokenizers import Tokenizer

STATE_VERSION = 1
CACHE_TOKENS = 1 << 25  # tokenized training examples kept in memory (~32M tokens): small datasets are read once
MAX_WINDOW_TOKENS = 1 << 28  # random_windows keeps the tokenized training split in memory (int32)
_MLM_SALT = 0x4D4C4D
_EVAL_MASK_SEED = 0x5EED
_PERM_SALT = 0xDA7A
_WINDOW_SALT = 0x817D


# --------------------------------------------------------------------------------------------- training


class _Producer:
  """What every sampling shares: the task, this host's slice of the global rows, the step, and finishing a batch."""

  sampling = ''
  resumes_on_any_layout = False  # whether a saved position is independent of the host layout

  def __init__(self, config: Any, tokenizer: Tokenizer, split: Split, layout: DataLayout):
    self.task = make_task(config, tokenizer, train=True)
    self.seed = int(config.seed)
    self.layout = layout
    self.step = 0

  def next_batch(self) -> Rows:
    batch = self._rows()
    step = self.step
    batch = self.task.finish(batch, lambda: np.random.default_rng([self.seed, _MLM_SALT, step]),
                             global_rows=self.layout.batch_size, first_row=self.layout.first_row)
    self.step += 1
    return batch

  def _rows(self) -> Rows:
    raise NotImplementedError

  def state(self) -> dict[str, Any]:
    raise NotImplementedError

  def set_state(self, state: dict[str, Any]) -> None:
    raise NotImplementedError

  def _check_state(self, state: dict[str, Any], keys: tuple[str, ...], what: str) -> None:
    saved = state.get('sampling', 'streams')  # states saved before random_windows existed are streams
    if saved != self.sampling:
      raise DataError(f'the saved data position is for data.sampling={saved}, but this run has '
                      f'data.sampling={self.sampling}; set data.sampling={saved} to resume, or start a new workdir.')
    expect = self.state()
    for key in keys:
      if state.get(key) != expect[key]:
        raise DataError(f'data iterator state has {key}={state.get(key)!r} but this run has {expect[key]!r}; a saved '
                        f'data position only restores into the same {what}.')


class _StreamProducer(_Producer):
  """Builds this host's rows of consecutive global batches; the state is the streams' (k, offset) and the step."""

  sampling = 'streams'

  def __init__(self, config: Any, tokenizer: Tokenizer, split: Split, layout: DataLayout):
    super().__init__(config, tokenizer, split, layout)
    self.split = split
    self.n = len(split)
    self.streams = [Stream() for _ in range(layout.rows)]
    self._perms: collections.OrderedDict = collections.OrderedDict()
    self._mean_size = 32.0
    self._cache: dict[int, Any] = {}  # split index -> tokenized item, while under CACHE_TOKENS
    self._cached_tokens = 0

  def _perm(self, epoch: int) -> np.ndarray:
    if epoch not in self._perms:
      self._perms[epoch] = np.random.default_rng([self.seed, _PERM_SALT, epoch]).permutation(self.n)
      while len(self._perms) > 3:
        self._perms.popitem(last=False)
    return self._perms[epoch]

  def example_index(self, stream_row: int, k: int) -> int:
    """The split index read by global stream `stream_row` as its k-th example (global position
    stream_row + k * batch_size, which also seeds the example's random objective)."""
    g = stream_row + k * self.layout.batch_size
    return int(self._perm(g // self.n)[g % self.n])

  def _refill(self, streams: list[int]) -> None:
    """Reads and tokenizes the next few examples of each listed stream in one batched call."""
    want = []
    count = max(2, min(256, int(np.ceil((self.task.seq_len + 1) / max(self._mean_size, 1.0))) + 1))
    for j in streams:
      s = self.streams[j]
      for k in range(s.buffered_upto, s.buffered_upto + count):
        position = self.layout.first_row + j + k * self.layout.batch_size
        want.append((j, position, self.example_index(self.layout.first_row + j, k)))
      s.buffered_upto += count
    missing = sorted({index for _, _, index in want if index not in self._cache})
    fresh = dict(zip(missing, self.task.tokenize(self.split.read(missing)))) if missing else {}
    random_items = self.task.random_items
    if not random_items:  # an item does not depend on its position: build it once and cache it
      fresh = {index: self.task.item(piece, 0) for index, piece in fresh.items()}
    for index, piece in fresh.items():
      if self._cached_tokens >= CACHE_TOKENS:
        break
      self._cache[index] = piece
      self._cached_tokens += _num_tokens(piece) + 8
    sizes = []
    for j, position, index in want:
      item = self._cache[index] if index in self._cache else fresh[index]
      item = self.task.item(item, position) if random_items else item
      self.streams[j].buffer.append(item)
      sizes.append(self.task.size(item))
    self._mean_size = 0.9 * self._mean_size + 0.1 * float(np.mean(sizes))

  def _refill_one(self, stream: Stream) -> bool:
    self._refill([self.streams.index(stream)])
    return True

  def _rows(self) -> Rows:
    # One batched read for every stream that is short of a row's worth of tokens.
    low = [j for j, s in enumerate(self.streams)
           if sum(self.task.size(it) for it in s.buffer) - s.offset <= self.task.seq_len]
    if low:
      self._refill(low)
    rows = self.task.empty_rows(self.layout.rows)
    for j, s in enumerate(self.streams):
      self.task.fill_row(s, rows, j, self._refill_one, max_skips=self.n)
    return rows

  def state(self) -> dict[str, Any]:
    return {'version': STATE_VERSION, 'sampling': self.sampling, 'step': self.step, 'seed': self.seed,
            'batch_size': self.layout.batch_size, 'process_index': self.layout.shard_index,
            'process_count': self.layout.num_shards, 'num_examples': self.n,
            'streams': [[s.k, s.offset] for s in self.streams]}

  def set_state(self, state: dict[str, Any]) -> None:
    self._check_state(state, ('version', 'seed', 'batch_size', 'process_index', 'process_count', 'num_examples'),
                      'seed, train.batch_size, host layout and training split')
    streams = state['streams']
    if len(streams) != len(self.streams):
      raise DataError(f'data iterator state has {len(streams)} row streams, this host has {len(self.streams)}.')
    for s, (k, offset) in zip(self.streams, streams):
      s.reset(int(k), int(offset))
    self.step = int(state['step'])


class _WindowProducer(_Producer):
  """Rows are i.i.d. random windows of the tokenized training split (see the module doc); state = the step."""

  sampling = 'random_windows'
  resumes_on_any_layout = True

  def __init__(self, config: Any, tokenizer: Tokenizer, split: Split, layout: DataLayout):
    super().__init__(config, tokenizer, split, layout)
    self.window = self.task.window_length
    if self.window is None:
      raise DataError(f'data.sampling=random_windows cuts windows out of one token stream, which has no meaning for '
                      f'model.arch={self.task.name}; use data.sampling=streams.')
    n = len(split)
    pieces, total = [], 0
    for start in range(0, n, 4096):
      for piece in self.task.tokenize(split.read(range(start, min(n, start + 4096)))):
        pieces.append(self.task.window_sequence(piece))
        total += len(pieces[-1])
      if total > MAX_WINDOW_TOKENS:
        raise DataError(f'data.sampling=random_windows holds the tokenized training split in memory, and it is over '
                        f'{MAX_WINDOW_TOKENS:,} tokens; use data.sampling=streams for a split this large.')
    self.tokens = np.concatenate(pieces).astype(np.int32) if pieces else np.zeros(0, np.int32)
    lengths = np.asarray([len(p) for p in pieces], np.int64)
    self.starts = np.zeros(len(self.tokens), bool)  # the first token of each document
    self.starts[(np.cumsum(lengths) - lengths)[lengths > 0]] = True
    if len(self.tokens) <= self.window:
      raise DataError(f'the training split has {len(self.tokens)} tokens, too few for data.sampling=random_windows '
                      f'with data.seq_len={self.task.seq_len}; lower data.seq_len or use more data.')

  def _rows(self) -> Rows:
    rng = np.random.default_rng([self.seed, _WINDOW_SALT, self.step])
    offsets = rng.integers(0, len(self.tokens) - self.window + 1, size=self.layout.batch_size)
    offsets = offsets[self.layout.first_row:self.layout.first_row + self.layout.rows]
    cols = offsets[:, None] + np.arange(self.window)[None, :]
    return self.task.window_rows(self.tokens[cols], self.starts[cols])

  def state(self) -> dict[str, Any]:
    return {'version': STATE_VERSION, 'sampling': self.sampling, 'step': self.step, 'seed': self.seed,
            'batch_size': self.layout.batch_size, 'process_index': self.layout.shard_index,
            'process_count': self.layout.num_shards, 'num_tokens': int(len(self.tokens))}

  def set_state(self, state: dict[str, Any]) -> None:
    self._check_state(state, ('version', 'seed', 'batch_size', 'num_tokens'),
                      'data.sampling, seed, train.batch_size and training split')
    self.step = int(state['step'])


def _num_tokens(piece: Any) -> int:
  """Token ids held by a tokenized example (arrays, possibly nested in tuples)."""
  if isinstance(piece, np.ndarray):
    return piece.size
  if isinstance(piece, tuple):
    return sum(_num_tokens(p) for p in piece)
  tokens = getattr(piece, 'tokens', None)  # rows._ObjectivePiece
  return 0 if tokens is None else _num_tokens(tokens)


SAMPLINGS: dict[str, type[_Producer]] = {p.sampling: p for p in (_StreamProducer, _WindowProducer)}


def state_for_host(states: list[dict[str, Any]], process_index: int, process_count: int) -> dict[str, Any] | None:
  """This process's data position out of the per-process states a checkpoint saved, or None if it cannot resume.

  Stream positions belong to one host layout (each host owns its row streams); a sampling whose position does not
  depend on the layout (random_windows: the global step alone) resumes exactly under any number of hosts.
  """
  if len(states) == process_count:
    return states[process_index]
  if states and getattr(SAMPLINGS.get(states[0].get('sampling', 'streams')), 'resumes_on_any_layout', False):
    return states[0]
  return None


class TrainIterator:
  """Infinite iterator of this host's training batches with background prefetch and exact get/set_state.

  The state returned by get_state() is the position after the last batch handed out by __next__, whatever the
  prefetch thread has already prepared, so saving it and restoring with set_state() continues exactly.
  """

  def __init__(self, producer: _Producer, prefetch: int):
    self._producer = producer
    self._prefetch = max(0, int(prefetch))
    self._state = producer.state()
    self._queue: queue.Queue | None = None
    self._thread: threading.Thread | None = None
    self._stop = threading.Event()

  def __iter__(self) -> Iterator[Rows]:
    return self

  def __next__(self) -> Rows:
    if self._prefetch == 0:
      batch = self._producer.next_batch()
      self._state = self._producer.state()
      return batch
    if self._thread is None:
      self._start()
    item = self._queue.get()
    if isinstance(item, BaseException):
      self._thread = None
      raise item
    batch, self._state = item
    return batch

  def _start(self) -> None:
    self._stop = threading.Event()
    self._queue = queue.Queue(maxsize=self._prefetch)
    self._thread = threading.Thread(target=self._work, args=(self._stop, self._queue), daemon=True,
                                    name='jaxformer-data-prefetch')
    self._thread.start()

  def _work(self, stop: threading.Event, out: queue.Queue) -> None:
    try:
      while not stop.is_set():
        item = (self._producer.next_batch(), self._producer.state())
        while not stop.is_set():
          try:
            out.put(item, timeout=0.1)
            break
          except queue.Full:
            pass
    except BaseException as e:  # pylint: disable=broad-except
      out.put(e)

  def close(self) -> None:
    """Stops the prefetch thread (the producer is then at an unknown position: set_state resets it)."""
    if self._thread is not None:
      self._stop.set()
      while self._thread.is_alive():
        try:
          self._queue.get_nowait()
        except queue.Empty:
          pass
        self._thread.join(timeout=0.05)
      self._thread = None

  def get_state(self) -> dict[str, Any]:
    return copy.deepcopy(self._state)

  def set_state(self, state: dict[str, Any]) -> None:
    self.close()
    self._producer.set_state(state)
    self._state = self._producer.state()

  def __del__(self):
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except
      pass


def make_train_iterator(config: Any, tokenizer: Tokenizer, workdir: str, *, layout: DataLayout | None = None,
                        source: Source | None = None) -> TrainIterator:
  """Infinite training batches of this host's `layout.rows` rows (default: one shard per process of
  train.batch_size); see the module doc."""
  layout = layout or DataLayout.for_process(int(config.train.batch_size))
  layout.check('train.batch_size')
  sampling = str(config.data.sampling)
  if sampling not in SAMPLINGS:
    raise DataError(f'data.sampling={sampling!r} is not valid; use {" or ".join(SAMPLINGS)}.')
  make_task(config, tokenizer, train=True)  # an invalid model.arch fails before the source is read
  source = source or get_source(config, workdir)
  split = source.split(str(config.data.train_split))
  return TrainIterator(SAMPLINGS[sampling](config, tokenizer, split, layout), int(config.data.prefetch))


# ------------------------------------------------------------------------------------------------- eval


class EvalIterator:
  """One pass over a split in file order: every example once; the last batch is padded with all-zero rows.

  Every host builds the same global rows (eval splits are small) and keeps its slice, so all hosts yield the
  same number of batches.
  """

  def __init__(self, task: Task, split: Split, layout: DataLayout):
    self.task = task
    self.split = split
    self.n = len(split)
    self.layout = layout
    self._stream = Stream()
    self._batch_index = 0
    self._done = False

  def _refill(self, stream: Stream) -> bool:
    start = stream.buffered_upto
    if start >= self.n:
      return False
    stop = min(self.n, start + 1024)
    stream.buffer.extend(self.task.items(self.split.read(range(start, stop)), range(start, stop)))
    stream.buffered_upto = stop
    return True

  def __iter__(self) -> Iterator[Rows]:
    return self

  def __next__(self) -> Rows:
    if self._done:
      raise StopIteration
    rows = self.task.empty_rows(self.layout.batch_size)
    filled = 0
    for i in range(self.layout.batch_size):
      if not self._stream.buffer and not self._refill(self._stream):
        break
      self.task.fill_row(self._stream, rows, i, self._refill, max_skips=0)
      filled += 1
    if filled == 0:
      self._done = True
      raise StopIteration
    if not self._stream.buffer and self._stream.buffered_upto >= self.n:
      self._done = True
    index = self._batch_index
    batch = self.task.finish(rows, lambda: np.random.default_rng([_EVAL_MASK_SEED, index]))
    self._batch_index += 1
    first, n = self.layout.first_row, self.layout.rows
    return {k: v[first:first + n] for k, v in batch.items()}


def make_eval_iterator(config: Any, tokenizer: Tokenizer, workdir: str, split: str, *, layout: DataLayout,
                       source: Source | None = None) -> EvalIterator:
  """Finite, deterministic, one pass over `split`: this host's slice of each batch of `layout.batch_size` rows."""
  layout.check('eval batch_size')
  task = make_task(config, tokenizer, train=False)
  source = source or get_source(config, workdir)
  data = source.split(split)
  return EvalIterator(task, data, layout)


def load_text_pairs(config: Any, workdir: str, split: str, *, source: Source | None = None) -> list[tuple[str, str]]:
  """Raw (source, reference) texts of a split, in order (text sources are split at their middle word)."""
  source = source or get_source(config, workdir)
  data = source.split(split)
  out = []
  for start in range(0, len(data), 4096):
    out.extend(as_pair(e) for e in data.read(range(start, min(len(data), start + 4096))))
  return out
