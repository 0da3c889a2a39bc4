"""Input pipeline: shuffle, tokenize, pack or pad, mask (MLM), batch, shard per host, prefetch; exactly resumable.

Plain numpy and one background thread rather than grain: packing here splits long documents across rows (no token
is lost), which grain's packers do not do, and the whole position of the pipeline is a handful of integers we can
checkpoint as JSON and restore exactly, prefetch included. numpy + sentencepiece's batched C++ encoder are far
faster than the training step (see benchmarks/data_throughput.py).

How the training stream is laid out (the reason hosts never read each other's data and yet the union of all
hosts' slices IS the global batch a single host would produce):

* The training split (N examples) is read as an endless sequence of epochs; epoch e is the permutation
  `default_rng([seed, e]).permutation(N)`. Global position g means example perm_{g // N}[g % N].
* Row r of every global batch (r < train.batch_size = B) is produced by its own *row stream*, which consumes the
  positions r, r + B, r + 2B, ... in order. Host h of P owns the streams h*B/P .. (h+1)*B/P - 1 and only ever reads
  their examples. A stream's whole state is [k, offset]: its next position index and how many tokens of that
  example are already used, so `get_state()` is a small JSON dict and `set_state()` restores exactly.
* decoder_only / encoder_only (LM): an example becomes BOS + tokens + EOS (a translation pair becomes
  source + '\\n' + target). decoder_only rows hold inputs = seq[:-1], targets = seq[1:] of each document; encoder_only
  rows hold the whole sequence. With data.pack, documents are concatenated into rows of data.seq_len and a document
  that does not fit is split: the rest starts the next row of the same stream (new segment, positions from 0), so
  training rows are always full, and no token is lost or repeated. Without data.pack a row holds one piece of one
  document, padded.
* encoder_decoder: a pair becomes encoder tokens + EOS, decoder inputs BOS + target, targets target + EOS (a text
  source is split into pairs at its middle word). Training drops pairs longer than data.src_seq_len / data.seq_len
  (evaluation truncates them instead, so every example is scored). data.pack puts several whole pairs in a row with
  matching segment ids on both sides; otherwise one pair per row.
* encoder_only masking (data.mask_rate of the non-special tokens; of those 80% -> MASK, 10% -> a random real
  token, 10% unchanged) draws from `default_rng([seed, MLM, step])` over the global batch, so it is deterministic
  from seed + step and identical whichever host computes it; evaluation uses a fixed seed per batch index.
* Tokenized training examples are kept in memory up to CACHE_TOKENS, so a small dataset (Multi30k,
  tinyshakespeare) is read and tokenized once; larger ones are re-read each epoch.
* Batches: dict of int32 numpy arrays `inputs`, `targets`, `segment_ids`, `positions` [rows, data.seq_len] (+
  `encoder_inputs`, `encoder_segment_ids`, `encoder_positions` [rows, data.src_seq_len] for encoder_decoder).
  segment_ids are 1, 2, 3.. per document within a row and 0 on padding; loss weight = targets != 0.
* data.sampling='random_windows' (LM archs; nanoGPT's `get_batch`) replaces the row streams for training: the
  whole training split is tokenized once into one token stream (BOS + tokens + EOS per example, in split order)
  and each row of step s is the window of seq_len + 1 tokens at an offset drawn from
  `default_rng([seed, WINDOW, s])` over the global batch (segment ids/positions restart at document markers).
  Windows are i.i.d., so consecutive steps are uncorrelated: on tinyshakespeare this trains ~0.025 nats lower
  than sequential streams in the same 2000 steps (benchmarks/RESULTS.md). The state is the step alone.
"""
from __future__ import annotations

import collections
import copy
import logging
import queue
import threading
from typing import Any, Iterator, Sequence

import numpy as np

from jaxformer.config import SAMPLINGS
from jaxformer.data.sources import DataError, Source, Split, get_source
from jaxformer.data.tokenizers import BOS_ID, EOS_ID, MASK_ID, NUM_SPECIAL, Tokenizer

STATE_VERSION = 1
CACHE_TOKENS = 1 << 25  # tokenized training examples kept in memory (~32M tokens): small datasets are read once
_MLM_SALT = 0x4D4C4D
_EVAL_MASK_SEED = 0x5EED
_PERM_SALT = 0xDA7A
_WINDOW_SALT = 0x817D
MAX_WINDOW_TOKENS = 1 << 28  # random_windows keeps the tokenized training split in memory (int32)


# ----------------------------------------------------------------------------------------------- examples


def _halves(text: str) -> tuple[str, str]:
  """A text example as a (source, target) pair: split at the middle word."""
  words = text.split(' ')
  k = max(1, len(words) // 2) if len(words) > 1 else 0
  return ' '.join(words[:k]), ' '.join(words[k:])


def _as_pair(example: Any) -> tuple[str, str]:
  return example if isinstance(example, tuple) else _halves(example)


def _as_text(example: Any) -> str:
  return example[0] + '\n' + example[1] if isinstance(example, tuple) else example


class _Task:
  """Turns examples into tokenized items: LM items are (inputs, targets) aligned arrays; seq2seq items are
  (encoder tokens, decoder inputs, decoder targets)."""

  def __init__(self, config: Any, tokenizer: Tokenizer, train: bool):
    self.arch = str(config.model.arch)
    self.tokenizer = tokenizer
    self.seq_len = int(config.data.seq_len)
    self.src_seq_len = int(config.data.src_seq_len)
    self.pack = bool(config.data.pack)
    self.train = train
    self.seq2seq = self.arch == 'encoder_decoder'

  def items(self, examples: Sequence[Any]) -> list[Any]:
    tok = self.tokenizer
    if self.seq2seq:
      pairs = [_as_pair(e) for e in examples]
      srcs = tok.encode_batch([p[0] for p in pairs])
      tgts = tok.encode_batch([p[1] for p in pairs])
      out = []
      for s, t in zip(srcs, tgts):
        enc = np.concatenate([s, [EOS_ID]]).astype(np.int32)
        dec = np.concatenate([[BOS_ID], t, [EOS_ID]]).astype(np.int32)
        if len(enc) > self.src_seq_len or len(dec) - 1 > self.seq_len:
          if self.train:
            out.append(None)  # too long: dropped from training
            continue
          enc = np.concatenate([enc[:self.src_seq_len - 1], [EOS_ID]]).astype(np.int32)
          dec = dec[:self.seq_len + 1]
        out.append((enc, dec[:-1], dec[1:]))
      return out
    out = []
    for t in tok.encode_batch([_as_text(e) for e in examples]):
      seq = np.concatenate([[BOS_ID], t, [EOS_ID]]).astype(np.int32)
      out.append((seq[:-1], seq[1:]) if self.arch == 'decoder_only' else (seq, seq))
    return out

  @staticmethod
  def size(item: Any) -> int:
    if item is None:
      return 0
    return len(item[0]) if len(item) == 2 else len(item[1])


class _Rows:
  """Empty rows for a batch, filled in place."""

  def __init__(self, n: int, seq_len: int, src_seq_len: int, seq2seq: bool):
    z = lambda m: np.zeros((n, m), np.int32)
    self.arrays = {'inputs': z(seq_len), 'targets': z(seq_len), 'segment_ids': z(seq_len), 'positions': z(seq_len)}
    if seq2seq:
      self.arrays.update(encoder_inputs=z(src_seq_len), encoder_segment_ids=z(src_seq_len),
                         encoder_positions=z(src_seq_len))


class _Stream:
  """One row stream: fills rows from its examples; state is (k = next example index, offset within it)."""

  def __init__(self, k: int = 0, offset: int = 0):
    self.k = k
    self.offset = offset
    self.buffer: collections.deque = collections.deque()  # items for k, k+1, ... (derived; not state)
    self.buffered_upto = k

  def reset(self, k: int, offset: int) -> None:
    self.k, self.offset = k, offset
    self.buffer.clear()
    self.buffered_upto = k


def _fill_lm_row(stream: _Stream, rows: _Rows, i: int, seq_len: int, pack: bool, more) -> None:
  a = rows.arrays
  fill, seg = 0, 0
  while fill < seq_len:
    if not stream.buffer:
      if not more(stream):
        return
    inp, tgt = stream.buffer[0]
    take = min(len(inp) - stream.offset, seq_len - fill)
    seg += 1
    sl = slice(fill, fill + take)
    a['inputs'][i, sl] = inp[stream.offset:stream.offset + take]
    a['targets'][i, sl] = tgt[stream.offset:stream.offset + take]
    a['segment_ids'][i, sl] = seg
    a['positions'][i, sl] = np.arange(take, dtype=np.int32)
    fill += take
    stream.offset += take
    if stream.offset >= len(inp):
      stream.buffer.popleft()
      stream.k += 1
      stream.offset = 0
    if not pack:
      return


def _fill_seq2seq_row(stream: _Stream, rows: _Rows, i: int, seq_len: int, src_seq_len: int, pack: bool, more,
                      max_skips: int) -> None:
  a = rows.arrays
  fill, src_fill, seg, skips = 0, 0, 0, 0
  while True:
    if not stream.buffer:
      if not more(stream):
        return
    item = stream.buffer[0]
    if item is None:
      stream.buffer.popleft()
      stream.k += 1
      skips += 1
      if skips > max_skips:
        raise DataError(
            f'every training pair is longer than data.src_seq_len={src_seq_len} (source + EOS) or data.seq_len='
            f'{seq_len} (target + EOS); raise them.')
      continue
    enc, dinp, dtgt = item
    if seg and (not pack or fill + len(dinp) > seq_len or src_fill + len(enc) > src_seq_len):
      return
    seg += 1
    n, m = len(dinp), len(enc)
    a['inputs'][i, fill:fill + n] = dinp
    a['targets'][i, fill:fill + n] = dtgt
    a['segment_ids'][i, fill:fill + n] = seg
    a['positions'][i, fill:fill + n] = np.arange(n, dtype=np.int32)
    a['encoder_inputs'][i, src_fill:src_fill + m] = enc
    a['encoder_segment_ids'][i, src_fill:src_fill + m] = seg
    a['encoder_positions'][i, src_fill:src_fill + m] = np.arange(m, dtype=np.int32)
    fill += n
    src_fill += m
    stream.buffer.popleft()
    stream.k += 1
    skips = 0


def mask_tokens(batch: dict[str, np.ndarray], rng: np.random.Generator, mask_rate: float, vocab_size: int, *,
                global_rows: int | None = None, first_row: int = 0) -> dict[str, np.ndarray]:
  """BERT masking: chooses mask_rate of the real tokens (not pad/bos/eos); 80% -> MASK, 10% random, 10% kept.

  Random numbers are drawn for the whole global batch (global_rows rows) and this host's rows start at
  first_row, so every host masks its rows exactly as a single host would.
  """
  tokens = batch['inputs']
  n, length = tokens.shape
  shape = (global_rows or n, length)
  rows = slice(first_row, first_row + n)
  u_select = rng.random(shape)[rows]
  u_kind = rng.random(shape)[rows]
  random_ids = rng.integers(NUM_SPECIAL, max(vocab_size, NUM_SPECIAL + 1), size=shape, dtype=np.int32)[rows]
  real = (tokens != 0) & (tokens != BOS_ID) & (tokens != EOS_ID)
  chosen = real & (u_select < mask_rate)
  inputs = np.where(chosen & (u_kind < 0.8), MASK_ID, tokens)
  inputs = np.where(chosen & (u_kind >= 0.8) & (u_kind < 0.9), random_ids, inputs)
  out = dict(batch)
  out['inputs'] = inputs.astype(np.int32)
  out['targets'] = np.where(chosen, tokens, 0).astype(np.int32)
  return out


# --------------------------------------------------------------------------------------------- training


def _host(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise DataError(f'process_index={process_index} must be in [0, process_count={process_count}).')
  return int(process_index), int(process_count)


class _Producer:
  """What both training producers share: this host's slice of the global rows, the step, and MLM masking."""

  def __init__(self, config: Any, tokenizer: Tokenizer, process_index: int, process_count: int, batch_size: int):
    self.config = config
    self.task = _Task(config, tokenizer, train=True)
    self.seed = int(config.seed)
    self.global_rows = batch_size
    self.rows = batch_size // process_count
    self.first_row = process_index * self.rows
    self.process_index, self.process_count = process_index, process_count
    self.vocab_size = tokenizer.vocab_size
    self.step = 0

  def _finish(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """encoder_only masking (deterministic from seed + step over the global batch), then the next step."""
    if self.task.arch == 'encoder_only':
      rng = np.random.default_rng([self.seed, _MLM_SALT, self.step])
      batch = mask_tokens(batch, rng, float(self.config.data.mask_rate), self.vocab_size,
                          global_rows=self.global_rows, first_row=self.first_row)
    self.step += 1
    return batch


class _TrainProducer(_Producer):
  """Builds this host's rows of consecutive global batches; the state is the streams' (k, offset) and the step."""

  def __init__(self, config: Any, tokenizer: Tokenizer, split: Split, process_index: int, process_count: int,
               batch_size: int):
    super().__init__(config, tokenizer, process_index, process_count, batch_size)
    self.split = split
    self.n = len(split)
    self.streams = [_Stream() for _ in range(self.rows)]
    self._perms: collections.OrderedDict = collections.OrderedDict()
    self._mean_size = 32.0
    self._cache: dict[int, Any] = {}  # split index -> tokenized item, while under CACHE_TOKENS
    self._cached_tokens = 0

  # Example order --------------------------------------------------------------------------------------
  def _perm(self, epoch: int) -> np.ndarray:
    if epoch not in self._perms:
      self._perms[epoch] = np.random.default_rng([self.seed, _PERM_SALT, epoch]).permutation(self.n)
      while len(self._perms) > 3:
        self._perms.popitem(last=False)
    return self._perms[epoch]

  def example_index(self, stream_row: int, k: int) -> int:
    """The split index read by global stream `stream_row` as its k-th example."""
    g = stream_row + k * self.global_rows
    return int(self._perm(g // self.n)[g % self.n])

  # Reading -----------------------------------------------------------------------------------------------
  def _refill(self, streams: list[int]) -> None:
    """Reads and tokenizes the next few examples of each listed stream in one batched call."""
    want = []
    seq_len = self.task.seq_len
    count = max(2, min(256, int(np.ceil((seq_len + 1) / max(self._mean_size, 1.0))) + 1))
    for j in streams:
      s = self.streams[j]
      for k in range(s.buffered_upto, s.buffered_upto + count):
        want.append((j, k, self.example_index(self.first_row + j, k)))
      s.buffered_upto += count
    missing = sorted({w[2] for w in want if w[2] not in self._cache})
    fresh = dict(zip(missing, self.task.items(self.split.read(missing)))) if missing else {}
    sizes = [_Task.size(it) for it in fresh.values()]
    if sizes:
      self._mean_size = 0.9 * self._mean_size + 0.1 * float(np.mean(sizes))
    for index, item in fresh.items():
      if self._cached_tokens >= CACHE_TOKENS:
        break
      self._cache[index] = item
      self._cached_tokens += _Task.size(item) + 8
    for j, _, index in want:
      self.streams[j].buffer.append(self._cache[index] if index in self._cache else fresh[index])

  def _more(self, stream: _Stream) -> bool:
    self._refill([self.streams.index(stream)])
    return True

  def next_batch(self) -> dict[str, np.ndarray]:
    seq_len, src_seq_len = self.task.seq_len, self.task.src_seq_len
    # Batched read for every stream that is short of a row's worth of tokens.
    low = []
    for j, s in enumerate(self.streams):
      have = sum(_Task.size(it) for it in s.buffer) - s.offset
      if have <= seq_len:
        low.append(j)
    if low:
      self._refill(low)
    rows = _Rows(self.rows, seq_len, src_seq_len, self.task.seq2seq)
    for j, s in enumerate(self.streams):
      if self.task.seq2seq:
        _fill_seq2seq_row(s, rows, j, seq_len, src_seq_len, self.task.pack, self._more, max_skips=self.n)
      else:
        _fill_lm_row(s, rows, j, seq_len, self.task.pack, self._more)
    return self._finish(rows.arrays)

  # State -------------------------------------------------------------------------------------------------
  def state(self) -> dict[str, Any]:
    return {'version': STATE_VERSION, 'sampling': 'streams', 'step': self.step, 'seed': self.seed,
            'batch_size': self.global_rows, 'process_index': self.process_index,
            'process_count': self.process_count, 'num_examples': self.n,
            'streams': [[s.k, s.offset] for s in self.streams]}

  def set_state(self, state: dict[str, Any]) -> None:
    expect = self.state()
    _check_sampling(state, 'streams')
    for key in ('version', 'seed', 'batch_size', 'process_index', 'process_count', 'num_examples'):
      if state.get(key) != expect[key]:
        raise DataError(
            f'data iterator state has {key}={state.get(key)!r} but this run has {expect[key]!r}; a saved data '
            'position only restores into the same seed, train.batch_size, host layout and training split.')
    streams = state['streams']
    if len(streams) != len(self.streams):
      raise DataError(f'data iterator state has {len(streams)} row streams, this host has {len(self.streams)}.')
    for s, (k, offset) in zip(self.streams, streams):
      s.reset(int(k), int(offset))
    self.step = int(state['step'])


def _check_sampling(state: dict[str, Any], sampling: str) -> None:
  saved = state.get('sampling', 'streams')  # states saved before random_windows existed are streams
  if saved != sampling:
    raise DataError(f'the saved data position is for data.sampling={saved}, but this run has data.sampling={sampling}; '
                    f'set data.sampling={saved} to resume, or start a new workdir.')


def state_for_host(states: list[dict[str, Any]], process_index: int, process_count: int) -> dict[str, Any] | None:
  """This host's data position out of the per-host states a checkpoint saved, or None if it cannot resume.

  Stream positions belong to one host layout (each host owns its row streams); a random_windows position is the
  global step alone, so it resumes exactly under any number of hosts.
  """
  if len(states) == process_count:
    return states[process_index]
  if states and states[0].get('sampling') == 'random_windows':
    return states[0]
  return None


class _WindowProducer(_Producer):
  """Rows are i.i.d. random windows of the tokenized training split (see the module doc); state = the step."""

  def __init__(self, config: Any, tokenizer: Tokenizer, split: Split, process_index: int, process_count: int,
               batch_size: int):
    super().__init__(config, tokenizer, process_index, process_count, batch_size)
    if self.task.seq2seq:
      raise DataError('data.sampling=random_windows cuts windows out of one token stream, which has no meaning for '
                      'model.arch=encoder_decoder; use data.sampling=streams.')
    n = len(split)
    pieces, total = [], 0
    for start in range(0, n, 4096):
      for inp, tgt in self.task.items(split.read(range(start, min(n, start + 4096)))):
        seq = np.concatenate([inp, tgt[-1:]]) if self.task.arch == 'decoder_only' else inp  # BOS .. EOS
        pieces.append(seq)
        total += len(seq)
      if total > MAX_WINDOW_TOKENS:
        raise DataError(f'data.sampling=random_windows holds the tokenized training split in memory, and it is over '
                        f'{MAX_WINDOW_TOKENS:,} tokens; use data.sampling=streams for a split this large.')
    self.tokens = np.concatenate(pieces).astype(np.int32) if pieces else np.zeros(0, np.int32)
    self.window = self.task.seq_len + (1 if self.task.arch == 'decoder_only' else 0)
    if len(self.tokens) <= self.window:
      raise DataError(f'the training split has {len(self.tokens)} tokens, too few for data.sampling=random_windows '
                      f'with data.seq_len={self.task.seq_len}; lower data.seq_len or use more data.')

  def next_batch(self) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([self.seed, _WINDOW_SALT, self.step])
    offsets = rng.integers(0, len(self.tokens) - self.window + 1, size=self.global_rows)
    offsets = offsets[self.first_row:self.first_row + self.rows]
    idx = offsets[:, None] + np.arange(self.window)[None, :]
    win = self.tokens[idx]
    seq_len = self.task.seq_len
    if self.task.arch == 'decoder_only':
      inputs, targets = win[:, :-1], np.where(win[:, 1:] == BOS_ID, 0, win[:, 1:])  # EOS -> BOS: not a target
    else:
      inputs = targets = win
    # Segment = documents started (a BOS at or before the token) within the window; positions count from the
    # last document start inside the window, else from the window's first token.
    starts = inputs == BOS_ID
    segment_ids = 1 + np.cumsum(starts, axis=1) - starts[:, :1]
    cols = np.arange(seq_len)[None, :]
    last_start = np.maximum.accumulate(np.where(starts, cols, 0), axis=1)
    positions = (cols - last_start).astype(np.int32)
    batch = {'inputs': np.ascontiguousarray(inputs, np.int32), 'targets': np.ascontiguousarray(targets, np.int32),
             'segment_ids': segment_ids.astype(np.int32), 'positions': positions}
    return self._finish(batch)

  def state(self) -> dict[str, Any]:
    return {'version': STATE_VERSION, 'sampling': 'random_windows', 'step': self.step, 'seed': self.seed,
            'batch_size': self.global_rows, 'process_index': self.process_index,
            'process_count': self.process_count, 'num_tokens': int(len(self.tokens))}

  def set_state(self, state: dict[str, Any]) -> None:
    expect = self.state()
    _check_sampling(state, 'random_windows')
    for key in ('version', 'seed', 'batch_size', 'num_tokens'):
      if state.get(key) != expect[key]:
        raise DataError(
            f'data iterator state has {key}={state.get(key)!r} but this run has {expect[key]!r}; a saved data '
            'position only restores into the same data.sampling, seed, train.batch_size and training split.')
    self.step = int(state['step'])


class TrainIterator:
  """Infinite iterator of this host's training batches with background prefetch and exact get/set_state.

  The state returned by get_state() is the position after the last batch handed out by __next__, whatever the
  prefetch thread has already prepared, so saving it and restoring with set_state() continues exactly.
  """

  def __init__(self, producer: _TrainProducer, prefetch: int):
    self._producer = producer
    self._prefetch = max(0, int(prefetch))
    self._state = producer.state()
    self._queue: queue.Queue | None = None
    self._thread: threading.Thread | None = None
    self._stop = threading.Event()

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
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


def make_train_iterator(config: Any, tokenizer: Tokenizer, workdir: str, *, process_index: int | None = None,
                        process_count: int | None = None, source: Source | None = None) -> TrainIterator:
  """Infinite per-host training batches (leading dim train.batch_size // process_count); see the module doc."""
  process_index, process_count = _host(process_index, process_count)
  batch_size = int(config.train.batch_size)
  if batch_size % process_count:
    raise DataError(f'train.batch_size={batch_size} is not divisible by the {process_count} hosts; each host '
                    'takes an equal slice of the global batch.')
  _check_arch(config)
  source = source or get_source(config, workdir)
  split = source.split(str(config.data.train_split))
  sampling = str(config.data.get('sampling', 'streams'))
  if sampling not in SAMPLINGS:
    raise DataError(f'data.sampling={sampling!r} is not valid; use {" or ".join(SAMPLINGS)}.')
  if sampling == 'random_windows':
    producer = _WindowProducer(config, tokenizer, split, process_index, process_count, batch_size)
  else:
    producer = _TrainProducer(config, tokenizer, split, process_index, process_count, batch_size)
  return TrainIterator(producer, int(config.data.prefetch))


def _check_arch(config: Any) -> None:
  if config.model.arch not in ('encoder_only', 'decoder_only', 'encoder_decoder'):
    raise DataError(f'model.arch={config.model.arch!r} is not valid; use encoder_only, decoder_only or '
                    'encoder_decoder.')


# ------------------------------------------------------------------------------------------------- eval


class EvalIterator:
  """One pass over a split in file order: every example once; the last batch is padded with all-zero rows.

  Every host builds the same global rows (eval splits are small) and keeps its slice, so all hosts yield the
  same number of batches.
  """

  def __init__(self, config: Any, tokenizer: Tokenizer, split: Split, batch_size: int, process_index: int,
               process_count: int):
    self.task = _Task(config, tokenizer, train=False)
    self.split = split
    self.n = len(split)
    self.batch_size = batch_size
    self.rows = batch_size // process_count
    self.first_row = process_index * self.rows
    self.mask_rate = float(config.data.mask_rate)
    self.vocab_size = tokenizer.vocab_size
    self._stream = _Stream()
    self._batch_index = 0
    self._done = False

  def _more(self, stream: _Stream) -> bool:
    start = stream.buffered_upto
    if start >= self.n:
      return False
    stop = min(self.n, start + 1024)
    for item in self.task.items(self.split.read(range(start, stop))):
      stream.buffer.append(item)
    stream.buffered_upto = stop
    return True

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._done:
      raise StopIteration
    t = self.task
    rows = _Rows(self.batch_size, t.seq_len, t.src_seq_len, t.seq2seq)
    filled = 0
    for i in range(self.batch_size):
      if not self._stream.buffer and not self._more(self._stream):
        break
      if t.seq2seq:
        _fill_seq2seq_row(self._stream, rows, i, t.seq_len, t.src_seq_len, t.pack, self._more, max_skips=0)
      else:
        _fill_lm_row(self._stream, rows, i, t.seq_len, t.pack, self._more)
      filled += 1
    if filled == 0:
      self._done = True
      raise StopIteration
    if not self._stream.buffer and self._stream.buffered_upto >= self.n:
      self._done = True
    batch = rows.arrays
    if t.arch == 'encoder_only':
      rng = np.random.default_rng([_EVAL_MASK_SEED, self._batch_index])
      batch = mask_tokens(batch, rng, self.mask_rate, self.vocab_size)
    self._batch_index += 1
    return {k: v[self.first_row:self.first_row + self.rows] for k, v in batch.items()}


def make_eval_iterator(config: Any, tokenizer: Tokenizer, workdir: str, split: str, *, batch_size: int,
                       process_index: int | None = None, process_count: int | None = None,
                       source: Source | None = None) -> EvalIterator:
  """Finite, deterministic, one pass over `split` (this host's slice of each batch of `batch_size` rows)."""
  process_index, process_count = _host(process_index, process_count)
  if batch_size <= 0 or batch_size % process_count:
    raise DataError(f'eval batch_size={batch_size} must be a positive multiple of the {process_count} hosts.')
  _check_arch(config)
  source = source or get_source(config, workdir)
  data = source.split(split)
  return EvalIterator(config, tokenizer, data, batch_size, process_index, process_count)


def load_text_pairs(config: Any, workdir: str, split: str, *, source: Source | None = None) -> list[tuple[str, str]]:
  """Raw (source, reference) texts of a split, in order (text sources are split at their middle word)."""
  source = source or get_source(config, workdir)
  data = source.split(split)
  out = []
  for start in range(0, len(data), 4096):
    out.extend(_as_pair(e) for e in data.read(range(start, min(len(data), start + 4096))))
  return out


def encode_source(tokenizer: Tokenizer, text: str, src_seq_len: int) -> list[int]:
  """Encoder input for a source text exactly as the pipeline builds it: tokens + EOS, truncated to src_seq_len."""
  ids = tokenizer.encode(text)[:max(0, src_seq_len - 1)]
  return ids + [EOS_ID]
