"""Row building: examples -> tokenized items -> packed or padded batch rows, per architecture.

What an architecture needs from the data is asked of ONE object, its `Task` (chosen once from TASKS by
model.arch): how examples become items, which arrays a batch holds, how a row is filled, how a random window is
cut, and what is done to a finished batch (MLM masking). The iterators (pipeline.py) never look at the arch.

Batch keys are the model's argument names, so the step calls `model(**model_inputs(batch))`:
  decoder_only / encoder_only   tokens, positions, segment_ids                           [rows, data.seq_len]
  encoder_decoder               src_tokens, src_positions, src_segment_ids               [rows, data.src_seq_len]
                                tgt_tokens, tgt_positions, tgt_segment_ids               [rows, data.seq_len]
and `targets` (LABEL_KEYS) beside them, aligned with the (decoder) tokens. segment_ids are 1, 2, 3.. per
document within a row and 0 on padding; positions restart at 0 per segment; a target equal to the tokenizer's
`unscored_target` (jaxformer's pad id 0; -1 for hf:, whose id 0 is a real token) is never scored.

Framing comes from the tokenizer (Tokenizer.document / source / target, defined once in tokenizers.py): below,
BOS / EOS are jaxformer's; an hf: tokenizer frames text as transformers does (GPT-2: tokens + <|endoftext|>;
Llama: <s> + tokens; BERT: [CLS] + tokens + [SEP]; T5: source tokens + </s>, decoder [pad] + target, targets
target + </s>).

* decoder_only / encoder_only (LM): an example becomes BOS + tokens + EOS (a translation pair becomes
  source + '\\n' + target). decoder_only rows hold tokens = seq[:-1], targets = seq[1:] of each document;
  encoder_only rows hold the whole sequence. With data.pack, documents are concatenated into rows of data.seq_len
  and a document that does not fit is split: the rest starts the next row of the same stream (new segment,
  positions from 0), so training rows are always full, and no token is lost or repeated. Without data.pack a row
  holds one piece of one document, padded. decoder_only reads an Instruction (jsonl:) as BOS + prompt + response
  + EOS with the prompt's targets unscored: only the response (and its EOS) is scored and counted; and a
  Conversation (jsonl: lines with messages) as its chat template renders it (data/chat.py), only the assistant
  messages' tokens scored.
* encoder_decoder: a pair becomes encoder tokens + EOS, decoder tokens BOS + target, targets target + EOS (a text
  example becomes a pair by data.objective: split_middle, prefix_lm or T5's span_corruption, objectives.py).
  Training drops pairs longer than data.src_seq_len / data.seq_len (evaluation truncates them instead, so every
  example is scored). data.pack puts several whole pairs in a row with
  matching segment ids on both sides; otherwise one pair per row.
* labelled examples (a head whose `examples` are 'labelled', model.head=classification; EXAMPLE_TASKS picks its Task over the arch's): one Labelled example per
  row, padded, never packed; batch keys tokens, positions, segment_ids, token_type_ids and `labels` [rows] (the
  class id; -1 on padding rows). A text pair is framed the BERT way, [CLS] a [SEP] b [SEP] (ClassificationTask).
* encoder_only masking (data.mask_rate of the text tokens, never padding or framing ids; of those 80% -> the
  tokenizer's mask id, 10% -> a random non-special id, 10% unchanged) draws from the rng the iterator passes
  (seeded from seed + step for training, from the batch index for evaluation) over the global batch, so every
  host masks its rows exactly as one host would.
"""
from __future__ import annotations

import collections
import functools
import json
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from jaxformer import align
from jaxformer.errors import DataError
from jaxformer.data.objectives import OBJECTIVES, objective_name, split_at_middle_word
from jaxformer.data import chat
from jaxformer.data.sources import (ChatPreference, Conversation, Instruction, Labelled, Preference, SpanExample,
                                    Tagged)
from jaxformer.data.tokenizers import Tokenizer

LABEL_KEYS = ('targets', 'labels', 'example_ids', 'offsets')  # batch keys that are not model inputs
Rows = dict[str, np.ndarray]


def model_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
  """The batch without its labels: exactly the keyword arguments of the model call."""
  return {k: v for k, v in batch.items() if k not in LABEL_KEYS}


# ----------------------------------------------------------------------------------------------- examples


def as_pair(example: Any) -> tuple[str, str]:
  """A (source, target) pair from a pair or a text example (split at its middle word)."""
  return tuple(example) if isinstance(example, tuple) else split_at_middle_word(_as_text(example))


def _as_text(example: Any) -> str:
  if isinstance(example, Conversation):
    raise DataError('chat conversations (jsonl: lines with messages) train decoder_only models; set '
                    'model.arch=decoder_only, or give encoder models text / prompt-response data.')
  return example[0] + '\n' + example[1] if isinstance(example, tuple) else example


def encode_source(tokenizer: Tokenizer, text: str, src_seq_len: int) -> list[int]:
  """Encoder input for a source text exactly as the pipeline builds it (tokenizer.source), cut to src_seq_len."""
  return tokenizer.source(tokenizer.encode_array(text), src_seq_len).tolist()


class Stream:
  """One row stream: fills rows from its items; its position is (k = next example index, offset within it)."""

  def __init__(self, k: int = 0, offset: int = 0):
    self.k = k
    self.offset = offset
    self.buffer: collections.deque = collections.deque()  # items for k, k+1, ... (derived; not state)
    self.buffered_upto = k

  def reset(self, k: int, offset: int) -> None:
    self.k, self.offset = k, offset
    self.buffer.clear()
    self.buffered_upto = k

  def pop(self) -> None:
    """The front item is used up: move on to the next example."""
    self.buffer.popleft()
    self.k += 1
    self.offset = 0


# A stream's refill: reads its next items into its buffer; False when there are none (the end of an eval split).
Refill = Callable[[Stream], bool]


def mask_tokens(batch: Rows, rng: np.random.Generator, mask_rate: float, tokenizer: Tokenizer, *,
                global_rows: int | None = None, first_row: int = 0) -> Rows:
  """BERT masking: chooses mask_rate of the text tokens (not padding nor the tokenizer's framing ids); 80% ->
  its mask id, 10% a random id (any but its special ids), 10% kept; targets elsewhere are unscored.

  Random numbers are drawn for the whole global batch (global_rows rows) and this host's rows start at
  first_row, so every host masks its rows exactly as a single host would.
  """
  tokens = batch['tokens']
  n, length = tokens.shape
  shape = (global_rows or n, length)
  rows = slice(first_row, first_row + n)
  u_select = rng.random(shape)[rows]
  u_kind = rng.random(shape)[rows]
  allowed = np.setdiff1d(np.arange(tokenizer.vocab_size), sorted(tokenizer.special_ids)).astype(np.int32)
  if len(allowed) == 0:
    allowed = np.arange(tokenizer.vocab_size, dtype=np.int32)
  random_ids = allowed[rng.integers(0, len(allowed), size=shape, dtype=np.int32)[rows]]
  real = (batch['segment_ids'] != 0) & ~np.isin(tokens, sorted(tokenizer.framing_ids))
  chosen = real & (u_select < mask_rate)
  masked = np.where(chosen & (u_kind < 0.8), tokenizer.mask_id, tokens)
  masked = np.where(chosen & (u_kind >= 0.8) & (u_kind < 0.9), random_ids, masked)
  out = dict(batch)
  out['tokens'] = masked.astype(np.int32)
  out['targets'] = np.where(chosen, tokens, tokenizer.unscored_target).astype(np.int32)
  return out


def _segments_of_windows(starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """segment_ids and positions of windows cut from a token stream, `starts` [rows, window] marking the tokens
  that begin a document: a segment per document started (at or before the token) within the window; positions
  count from the last document start inside the window, else from the window's first token."""
  segment_ids = 1 + np.cumsum(starts, axis=1) - starts[:, :1]
  cols = np.arange(starts.shape[1])[None, :]
  last_start = np.maximum.accumulate(np.where(starts, cols, 0), axis=1)
  return segment_ids.astype(np.int32), (cols - last_start).astype(np.int32)


# ------------------------------------------------------------------------------------------------- tasks

_EVAL_SEED = 0x5EED  # evaluation's random objectives: the same for every run, whatever config.seed
_OBJECTIVE_SALT = 0x0B7E


class _ObjectivePiece:
  """A text example's cached tokens in an encoder_decoder stream, still to be made a pair by the objective."""

  __slots__ = ('tokens',)

  def __init__(self, tokens: Any):
    self.tokens = tokens


class Task:
  """How one architecture turns examples into batch rows (see the module doc). `train` selects training's
  handling of over-long examples (dropped) over evaluation's (truncated), and the seed of random objectives.

  An example goes through two steps: tokenize() (batched) and item(piece, position). When random_items, item()
  draws from a generator seeded by the example's position in the stream, so the random part is fresh each epoch
  yet exactly reproducible on resume, and the iterators cache pieces; otherwise they cache the items.
  """

  name = ''
  random_items = False

  def __init__(self, config: Any, tokenizer: Tokenizer, train: bool):
    self.tokenizer = tokenizer
    self.seq_len = int(config.data.seq_len)
    self.src_seq_len = int(config.data.src_seq_len)
    self.pack = bool(config.data.pack)
    self.mask_rate = float(config.data.mask_rate)
    self.train = train
    self.seed = int(config.seed) if train else _EVAL_SEED
    self.chat_template_setting = str(config.data.chat_template)

  @functools.cached_property
  def chat_template(self) -> chat.ChatTemplate:
    """The run's chat template (data/chat.py), built on first use: only conversational examples need one."""
    return chat.template_for(self.tokenizer, self.chat_template_setting)

  def tokenize(self, examples: Sequence[Any]) -> list[Any]:
    """One cacheable piece (token arrays) per example."""
    raise NotImplementedError

  def item(self, piece: Any, position: int) -> Any:
    """The item rows are filled from (None: dropped from training); `position` seeds any random choice."""
    raise NotImplementedError

  def items(self, examples: Sequence[Any], positions: Sequence[int]) -> list[Any]:
    return [self.item(piece, p) for piece, p in zip(self.tokenize(examples), positions)]

  @staticmethod
  def size(item: Any) -> int:
    """Row tokens an item fills (0 for a dropped one)."""
    raise NotImplementedError

  def empty_rows(self, n: int) -> Rows:
    raise NotImplementedError

  def fill_row(self, stream: Stream, rows: Rows, i: int, refill: Refill, max_skips: int) -> None:
    """Fills row i from the stream's items (refilling it as needed); max_skips bounds dropped items in a row."""
    raise NotImplementedError

  def finish(self, batch: Rows, rng: Callable[[], np.random.Generator], global_rows: int | None = None,
             first_row: int = 0) -> Rows:
    """A built batch -> what the model sees (identity; encoder_only masks). `rng` makes the batch's generator."""
    del rng, global_rows, first_row
    return batch

  # random_windows (pipeline.py): None = this architecture has no token-stream windows.
  window_length: int | None = None

  def window_sequence(self, piece: Any) -> np.ndarray:
    """A tokenized example as a whole document (tokenizer.document), the piece of the token stream windows are
    cut from."""
    raise NotImplementedError

  def window_rows(self, windows: np.ndarray, starts: np.ndarray) -> Rows:
    """[rows, window_length] windows of the token stream -> a batch; `starts` marks the documents' first tokens."""
    raise NotImplementedError


class _LanguageModelTask(Task):
  """decoder_only and encoder_only: pieces are documents (tokenizer.document: BOS + tokens + EOS for jaxformer's
  tokenizers); items are aligned (tokens, targets) arrays, packed along the row."""

  def tokenize(self, examples):
    return [self.tokenizer.document(t) for t in self.tokenizer.encode_batch([_as_text(e) for e in examples])]

  def window_sequence(self, piece):
    return piece

  @staticmethod
  def size(item: Any) -> int:
    return 0 if item is None else len(item[0])

  def empty_rows(self, n: int) -> Rows:
    rows = {k: np.zeros((n, self.seq_len), np.int32) for k in ('tokens', 'segment_ids', 'positions')}
    return dict(rows, targets=np.full((n, self.seq_len), self.tokenizer.unscored_target, np.int32))

  def fill_row(self, stream: Stream, rows: Rows, i: int, refill: Refill, max_skips: int) -> None:
    del max_skips  # LM items are never dropped
    fill, seg = 0, 0
    while fill < self.seq_len:
      if not stream.buffer and not refill(stream):
        return
      tokens, targets = stream.buffer[0]
      take = min(len(tokens) - stream.offset, self.seq_len - fill)
      seg += 1
      cols, piece = slice(fill, fill + take), slice(stream.offset, stream.offset + take)
      rows['tokens'][i, cols] = tokens[piece]
      rows['targets'][i, cols] = targets[piece]
      rows['segment_ids'][i, cols] = seg
      rows['positions'][i, cols] = np.arange(take, dtype=np.int32)
      fill += take
      stream.offset += take
      if stream.offset >= len(tokens):
        stream.pop()
      if not self.pack:
        return


class DecoderOnlyTask(_LanguageModelTask):
  """Next-token prediction: tokens = BOS + text, targets = text + EOS. An Instruction is BOS + prompt + response +
  EOS (the prompt is followed directly by the response: put any template or separator into the prompt) whose
  prompt targets are unscored, so only the response and its EOS are scored and counted."""

  name = 'decoder_only'

  def tokenize(self, examples):
    if any(isinstance(e, Conversation) for e in examples):
      return [self._conversation(e) for e in examples]
    if not any(isinstance(e, Instruction) for e in examples):
      return super().tokenize(examples)
    prompts = self.tokenizer.encode_batch([e.prompt for e in examples])
    responses = self.tokenizer.encode_batch([e.response for e in examples])
    # an Instruction: (tokens, targets) as frame_response frames every prompt + response (whole: packing splits it)
    return [frame_response(self.tokenizer, p, r, None, next_token=True)[:2] for p, r in zip(prompts, responses)]

  def _conversation(self, example: Conversation) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, targets) of a chat example rendered with the run's template, only assistant tokens scored."""
    ids, assistant = chat.encode(self.tokenizer, self.chat_template, json.loads(example.messages))
    return chat.frame(self.tokenizer, ids, assistant)

  def item(self, piece, position):
    del position
    if isinstance(piece, tuple):  # an Instruction: already (tokens, targets), the prompt's targets unscored
      return piece
    return piece[:-1], piece[1:]

  def window_sequence(self, piece):
    if isinstance(piece, tuple):
      raise DataError('data.sampling=random_windows cuts windows out of one token stream, which would score the '
                      'prompts of a jsonl: (instruction) source; use data.sampling=streams.')
    return piece

  @property
  def window_length(self) -> int:
    return self.seq_len + 1

  def window_rows(self, windows, starts):
    # a document's first token is not predicted from the previous document: unscored
    tokens, targets = windows[:, :-1], np.where(starts[:, 1:], self.tokenizer.unscored_target, windows[:, 1:])
    segment_ids, positions = _segments_of_windows(starts[:, :-1])
    return {'tokens': np.ascontiguousarray(tokens, np.int32), 'targets': np.ascontiguousarray(targets, np.int32),
            'segment_ids': segment_ids, 'positions': positions}


class EncoderOnlyTask(_LanguageModelTask):
  """Masked-LM: rows hold whole documents (BOS + text + EOS; BERT: [CLS] text [SEP]); finish() masks them and
  sets the targets."""

  name = 'encoder_only'

  def __init__(self, config, tokenizer, train):
    super().__init__(config, tokenizer, train)
    if tokenizer.mask_id < 0:
      raise DataError(f'model.arch=encoder_only (masked LM) needs a mask token, and data.tokenizer='
                      f'{config.data.tokenizer} has none; use a tokenizer with one (BERT\'s [MASK]).')

  def item(self, piece, position):
    del position
    return piece, piece

  def finish(self, batch, rng, global_rows=None, first_row=0):
    return mask_tokens(batch, rng(), self.mask_rate, self.tokenizer, global_rows=global_rows,
                       first_row=first_row)

  @property
  def window_length(self) -> int:
    return self.seq_len

  def window_rows(self, windows, starts):
    segment_ids, positions = _segments_of_windows(starts)
    tokens = np.ascontiguousarray(windows, np.int32)
    return {'tokens': tokens, 'targets': tokens, 'segment_ids': segment_ids, 'positions': positions}


class EncoderDecoderTask(Task):
  """Sequence to sequence: items are (encoder tokens + EOS, BOS + target, target + EOS); whole pairs per row.
  Pair examples are used as they are; text examples become pairs by data.objective (objectives.py)."""

  name = 'encoder_decoder'

  def __init__(self, config, tokenizer, train):
    super().__init__(config, tokenizer, train)
    # the ids framing adds: source (T5 / jaxformer: EOS), target (decoder start .. EOS, one of them not a row token)
    self.src_extra, self.tgt_extra = len(tokenizer.source([])), len(tokenizer.target([])) - 1
    self.objective = OBJECTIVES[objective_name(config)](config, tokenizer, self.src_seq_len - self.src_extra,
                                                        self.seq_len - self.tgt_extra)
    self.random_items = self.objective.random

  def tokenize(self, examples):
    """A pair example -> (source ids, target ids); a text example -> what the objective caches (a numpy array)."""
    pairs = [e for e in examples if isinstance(e, tuple)]
    texts = [_as_text(e) for e in examples if not isinstance(e, tuple)]
    out_pairs = iter(zip(self.tokenizer.encode_batch([p[0] for p in pairs]),
                         self.tokenizer.encode_batch([p[1] for p in pairs])))
    out_texts = iter(self.objective.tokenize(texts))
    return [next(out_pairs) if isinstance(e, tuple) else _ObjectivePiece(next(out_texts)) for e in examples]

  def item(self, piece, position):
    if isinstance(piece, _ObjectivePiece):
      rng = np.random.default_rng([self.seed, _OBJECTIVE_SALT, position])
      piece = self.objective.pair(piece.tokens, rng)
    src, tgt = piece
    enc, dec = self.tokenizer.source(src), self.tokenizer.target(tgt)
    if len(enc) > self.src_seq_len or len(dec) - 1 > self.seq_len:
      if self.train:
        return None  # too long: dropped from training
      enc = self.tokenizer.source(src, self.src_seq_len)
      dec = dec[:self.seq_len + 1]
    return enc, dec[:-1], dec[1:]

  @staticmethod
  def size(item: Any) -> int:
    return 0 if item is None else len(item[1])

  def empty_rows(self, n: int) -> Rows:
    z = lambda m: np.zeros((n, m), np.int32)
    return {'src_tokens': z(self.src_seq_len), 'src_segment_ids': z(self.src_seq_len),
            'src_positions': z(self.src_seq_len), 'tgt_tokens': z(self.seq_len), 'tgt_segment_ids': z(self.seq_len),
            'tgt_positions': z(self.seq_len),
            'targets': np.full((n, self.seq_len), self.tokenizer.unscored_target, np.int32)}

  def fill_row(self, stream: Stream, rows: Rows, i: int, refill: Refill, max_skips: int) -> None:
    fill, src_fill, seg, skips = 0, 0, 0, 0
    while True:
      if not stream.buffer and not refill(stream):
        return
      item = stream.buffer[0]
      if item is None:
        stream.pop()
        skips += 1
        if skips > max_skips:
          raise DataError(
              f'every training pair is longer than data.src_seq_len={self.src_seq_len} (source + EOS) or '
              f'data.seq_len={self.seq_len} (target + EOS); raise them.')
        continue
      src, tgt, targets = item
      if seg and (not self.pack or fill + len(tgt) > self.seq_len or src_fill + len(src) > self.src_seq_len):
        return
      seg += 1
      cols, src_cols = slice(fill, fill + len(tgt)), slice(src_fill, src_fill + len(src))
      rows['tgt_tokens'][i, cols] = tgt
      rows['targets'][i, cols] = targets
      rows['tgt_segment_ids'][i, cols] = seg
      rows['tgt_positions'][i, cols] = np.arange(len(tgt), dtype=np.int32)
      rows['src_tokens'][i, src_cols] = src
      rows['src_segment_ids'][i, src_cols] = seg
      rows['src_positions'][i, src_cols] = np.arange(len(src), dtype=np.int32)
      fill += len(tgt)
      src_fill += len(src)
      stream.pop()
      skips = 0


class _RowPerExampleTask(Task):
  """The labelled heads' rows: one example (or one window of it) per row, padded, never packed; batch keys tokens,
  positions, segment_ids, token_type_ids and `labels` of the head's shape (-1 where nothing is scored)."""

  label_shape: tuple[int, ...] = ()  # per row, after the batch dimension (a class id: (); a tag per token: (T,))

  def item(self, piece, position):
    del position
    return piece

  @staticmethod
  def size(item: Any) -> int:
    return len(item[0])

  def empty_rows(self, n: int) -> Rows:
    rows = {k: np.zeros((n, self.seq_len), np.int32) for k in ('tokens', 'segment_ids', 'positions', 'token_type_ids')}
    return dict(rows, labels=np.full((n, *self.label_shape), -1, np.int32))

  @staticmethod
  def place(rows: Rows, i: int, tokens: np.ndarray, types: np.ndarray | None, labels: Any) -> None:
    """Row i holds one example: its tokens (token types, if any) as segment 1 from position 0, and its labels."""
    n = len(tokens)
    rows['tokens'][i, :n] = tokens
    if types is not None:
      rows['token_type_ids'][i, :n] = types
    rows['segment_ids'][i, :n] = 1
    rows['positions'][i, :n] = np.arange(n, dtype=np.int32)
    labels = np.asarray(labels)
    if labels.ndim:  # a label per token (its tokens only) or a fixed-size label
      rows['labels'][i, :len(labels)] = labels
    else:
      rows['labels'][i] = labels


class ClassificationTask(_RowPerExampleTask):
  """model.head=classification (encoder_only or decoder_only): one Labelled example per row, never packed, cut to
  data.seq_len; `labels` [rows] holds its class id (-1 on padding rows, which are never scored).

  A text is framed as a document (tokenizer.document: BERT [CLS] text [SEP], jaxformer BOS text EOS, GPT-2 text
  <|endoftext|>); a pair as BERT frames one, prefix + a + sep + b + the document's end, where sep is the
  tokenizer's suffix ([SEP]; jaxformer's EOS) or its eos when the framing adds none. token_type_ids are 0 up to and
  including the first separator and 1 after it. Too long a pair loses tokens from the longer text first
  (transformers' longest_first)."""

  name = 'classification'

  def tokenize(self, examples):
    _require(examples, Labelled, 'model.head=classification needs labelled examples',
             'text (or text_a / text_b) and label fields')
    tok = self.tokenizer
    a_ids = tok.encode_batch([e.text_a for e in examples])
    pairs = [i for i, e in enumerate(examples) if e.text_b]
    b_ids = dict(zip(pairs, tok.encode_batch([examples[i].text_b for i in pairs])))
    prefix = list(tok.prefix_ids)
    end = list(tok.document([])[len(prefix):])  # what the framing puts after a document's text
    sep = list(tok.suffix_ids) or ([tok.eos_id] if tok.eos_id >= 0 else [])
    out = []
    for i, (e, a) in enumerate(zip(examples, a_ids)):
      if i not in b_ids:
        a = a[:max(0, self.seq_len - len(prefix) - len(end))]
        first, second = prefix + a.tolist() + end, []
      else:
        a, b = _longest_first(a.tolist(), b_ids[i].tolist(), self.seq_len - len(prefix) - len(sep) - len(end))
        first, second = prefix + a + sep, b + end
      tokens = np.asarray(first + second, np.int32)[:self.seq_len]
      types = np.asarray([0] * len(first) + [1] * len(second), np.int32)[:self.seq_len]
      out.append((tokens, types, int(e.label)))
    return out

  def fill_row(self, stream: Stream, rows: Rows, i: int, refill: Refill, max_skips: int) -> None:
    del max_skips
    if not stream.buffer and not refill(stream):
      return
    tokens, types, label = stream.buffer[0]
    self.place(rows, i, tokens, types, label)
    stream.pop()


class TaggedTask(_RowPerExampleTask):
  """model.head=token_classification: one Tagged example (words + a tag id per word) per row, never packed. The
  words are encoded together (tokenizer.encode_words: an hf: tokenizer as transformers' is_split_into_words, the
  others on the words joined by spaces) and framed as a document (BERT: [CLS] ... [SEP]), cut to data.seq_len;
  `labels` [rows, seq_len] holds each word's tag on its first sub-token and -1 on its other sub-tokens, the framing
  ids and padding (Hugging Face run_ner's alignment); a word cut off by the row's end is not scored."""

  name = 'tagged'

  def tokenize(self, examples):
    _require(examples, Tagged, 'model.head=token_classification needs tagged words',
             'a list of words and a list of tags per line')
    tok = self.tokenizer
    prefix = list(tok.prefix_ids)
    end = list(tok.document([])[len(prefix):])
    out = []
    for e in examples:
      ids, word_ids = tok.encode_words(list(e.words))
      first = np.concatenate([[True], word_ids[1:] != word_ids[:-1]]) if len(ids) else np.zeros(0, bool)
      tags = np.asarray(e.tags, np.int32)
      labels = np.where(first & (word_ids >= 0), tags[np.maximum(word_ids, 0)] if len(tags) else -1, -1)
      keep = max(0, self.seq_len - len(prefix) - len(end))
      tokens = np.concatenate([prefix, ids[:keep], end]).astype(np.int32)[:self.seq_len]
      labels = np.concatenate([[-1] * len(prefix), labels[:keep], [-1] * len(end)]).astype(np.int32)[:self.seq_len]
      out.append((tokens, labels))
    return out

  @property
  def label_shape(self) -> tuple[int, ...]:
    return (self.seq_len,)

  def fill_row(self, stream: Stream, rows: Rows, i: int, refill: Refill, max_skips: int) -> None:
    del max_skips
    if not stream.buffer and not refill(stream):
      return
    tokens, labels = stream.buffer[0]
    self.place(rows, i, tokens, None, labels)
    stream.pop()


class SpanTask(_RowPerExampleTask):
  """model.head=span (extractive QA): a SpanExample becomes one row per window of its context, as Hugging Face
  run_qa's prepare_*_features: prefix + question + sep + context window + the document's end (BERT: [CLS] q [SEP]
  c [SEP]; token types 0 up to the first separator, then 1); the question keeps at most half the row, the context
  windows fill the rest and overlap by data.doc_stride tokens. `labels` [rows, 2] are the first answer's first and
  last token when the window holds all of it, else 0 (the first position, [CLS]); -1 on padding rows.
  Evaluation rows also carry `example_ids` [rows] (the question's index in the split; -1 on padding) and
  `offsets` [rows, seq_len, 2] (each context token's character span in the context; -1 elsewhere), which the
  head decodes answers with; they are no model inputs (LABEL_KEYS)."""

  name = 'spans'

  def __init__(self, config, tokenizer, train):
    super().__init__(config, tokenizer, train)
    self.doc_stride = int(config.data.doc_stride)

  def tokenize(self, examples):
    _require(examples, SpanExample, 'model.head=span needs SQuAD-style questions',
             'context, question and answers {text, answer_start} fields')
    tok = self.tokenizer
    prefix = list(tok.prefix_ids)
    end = list(tok.document([])[len(prefix):])
    sep = list(tok.suffix_ids) or ([tok.eos_id] if tok.eos_id >= 0 else [])
    questions = tok.encode_batch([e.question.lstrip() for e in examples])  # run_qa strips the question's left
    out = []
    for e, q in zip(examples, questions):
      q = q[:max(1, self.seq_len // 2 - len(prefix) - len(sep))].tolist()
      head = prefix + q + sep
      budget = self.seq_len - len(head) - len(end)
      if budget <= self.doc_stride:
        raise DataError(f'data.seq_len={self.seq_len} leaves {budget} context tokens per window after the question, '
                        f'not more than data.doc_stride={self.doc_stride}; lower data.doc_stride or raise '
                        'data.seq_len.')
      ids, offsets = tok.encode_offsets(e.context)
      answer = (e.answer_starts[0], e.answer_starts[0] + len(e.answer_texts[0])) if e.answer_texts else None
      windows = []
      for start in range(0, max(len(ids), 1), budget - self.doc_stride):
        stop = min(len(ids), start + budget)
        tokens = np.asarray(head + ids[start:stop].tolist() + end, np.int32)
        types = np.asarray([0] * len(head) + [1] * (len(tokens) - len(head)), np.int32)
        token_offsets = np.full((len(tokens), 2), -1, np.int32)
        token_offsets[len(head):len(head) + stop - start] = offsets[start:stop]
        windows.append((tokens, types, _span_labels(offsets[start:stop], answer, len(head)), token_offsets))
        if stop >= len(ids):
          break
      out.append(windows)
    return out

  def item(self, piece, position):
    return [(*window, position) for window in piece]

  @staticmethod
  def size(item: Any) -> int:
    return sum(len(w[0]) for w in item)

  label_shape = (2,)

  def empty_rows(self, n: int) -> Rows:
    rows = super().empty_rows(n)
    if not self.train:
      rows['example_ids'] = np.full((n,), -1, np.int32)
      rows['offsets'] = np.full((n, self.seq_len, 2), -1, np.int32)
    return rows

  def fill_row(self, stream: Stream, rows: Rows, i: int, refill: Refill, max_skips: int) -> None:
    del max_skips
    if not stream.buffer and not refill(stream):
      return
    tokens, types, labels, offsets, position = stream.buffer[0][stream.offset]
    self.place(rows, i, tokens, types, labels)
    if not self.train:
      rows['example_ids'][i] = position
      rows['offsets'][i, :len(tokens)] = offsets
    stream.offset += 1
    if stream.offset >= len(stream.buffer[0]):
      stream.pop()


def _span_labels(offsets: np.ndarray, answer: tuple[int, int] | None, first: int) -> tuple[int, int]:
  """(start, end) row positions of the answer's tokens among a window's context tokens (character `offsets`, the
  window's context starting at row position `first`), as run_qa labels them; (0, 0) when the window does not hold
  the whole answer (or there is none)."""
  if answer is None or not len(offsets):
    return 0, 0
  start_char, end_char = answer
  if not (offsets[0, 0] <= start_char and offsets[-1, 1] >= end_char):
    return 0, 0
  start = 0
  while start < len(offsets) and offsets[start, 0] <= start_char:
    start += 1
  end = len(offsets) - 1
  while end >= 0 and offsets[end, 1] >= end_char:
    end -= 1
  return first + start - 1, first + end + 1


class PreferenceTask(Task):
  """Preference pairs (model.head=reward, align.method=dpo / simpo): one pair per row, never packed. Each side is
  framed as an instruction, the prompt and the response tokenized separately, concatenated and EOS appended
  (tokenizer.document: BOS + prompt + response + EOS for jaxformer's tokenizers), into `chosen_*` and `rejected_*`
  arrays (tokens, positions, segment_ids, targets) and `margin` [rows] (0 where the data gives none).

  DPO / SimPO rows (the objective's `per_token`) are next-token rows whose prompt targets are unscored; a side
  longer than data.seq_len keeps its first seq_len tokens (TRL's truncation_mode='keep_start'), and training drops
  a pair whose prompt alone fills the row (no response token left, as TRL drops it). Reward-model rows hold the
  whole framed sequence (the reward is read at its last real token: the EOS); training drops a pair with a side
  longer than data.seq_len (as TRL's RewardTrainer filters them), evaluation keeps its first seq_len tokens, so
  every pair is scored."""

  name = 'preference'

  def __init__(self, config, tokenizer, train):
    super().__init__(config, tokenizer, train)
    self.next_token = align.objective_of(config).per_token and config.model.arch == 'decoder_only'

  def frame(self, prompt: np.ndarray, response: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    """(tokens, targets, whether it was cut) of one prompt + response, at most data.seq_len long."""
    return frame_response(self.tokenizer, prompt, response, self.seq_len, next_token=self.next_token)

  def _chat_pair(self, example: ChatPreference) -> tuple:
    """A conversational pair: each side the chat template's rendering of prompt + response, the prompt part being
    the rendering of the prompt with the generation prompt (its targets unscored)."""
    prompt = json.loads(example.prompt)
    prompt_ids, _ = chat.encode(self.tokenizer, self.chat_template, prompt, add_generation_prompt=True)
    framed = []
    for side in (example.chosen, example.rejected):
      ids, _ = chat.encode(self.tokenizer, self.chat_template, prompt + json.loads(side))
      if not np.array_equal(ids[:len(prompt_ids)], prompt_ids):
        raise DataError(f'chat template {self.chat_template.name}: a response does not continue the tokens of its '
                        'prompt with the generation prompt, so the pair cannot be scored by its response alone.')
      framed.extend(frame_sequence(self.tokenizer, ids, len(prompt_ids), self.seq_len, next_token=self.next_token))
    return (*framed, float(example.margin))

  def tokenize(self, examples):
    _require(examples, Preference, 'preference pairs are needed (model.head=reward, align.method=dpo / simpo)',
             'prompt, chosen and rejected fields')
    if any(isinstance(e, ChatPreference) for e in examples):
      return [self._chat_pair(e) for e in examples]
    enc = self.tokenizer.encode_batch
    prompts, chosen, rejected = (enc([getattr(e, f) for e in examples]) for f in ('prompt', 'chosen', 'rejected'))
    return [(*self.frame(p, c), *self.frame(p, r), float(e.margin))
            for p, c, r, e in zip(prompts, chosen, rejected, examples)]

  def item(self, piece, position):
    del position
    c_tokens, c_targets, c_cut, r_tokens, r_targets, r_cut, margin = piece
    if self.train:
      scored = lambda t: bool(np.any((t >= 0) & (t != self.tokenizer.unscored_target)))  # noqa: E731
      if (self.next_token and not (scored(c_targets) and scored(r_targets))) or (
          not self.next_token and (c_cut or r_cut)):
        return None
    return c_tokens, c_targets, r_tokens, r_targets, margin

  @staticmethod
  def size(item: Any) -> int:
    return 0 if item is None else len(item[0])

  def empty_rows(self, n: int) -> Rows:
    rows: Rows = {}
    for side in ('chosen', 'rejected'):
      rows.update({f'{side}_{k}': np.zeros((n, self.seq_len), np.int32)
                   for k in ('tokens', 'positions', 'segment_ids')})
      rows[f'{side}_targets'] = np.full((n, self.seq_len), self.tokenizer.unscored_target, np.int32)
    rows['margin'] = np.zeros((n,), np.float32)
    return rows

  def fill_row(self, stream: Stream, rows: Rows, i: int, refill: Refill, max_skips: int) -> None:
    skips = 0
    while True:
      if not stream.buffer and not refill(stream):
        return
      item = stream.buffer[0]
      stream.pop()
      if item is not None:
        break
      skips += 1
      if skips > max_skips:
        raise DataError(f'every training pair is cut away at data.seq_len={self.seq_len}: '
                        + ('its prompt alone fills the row' if self.next_token else 'a side is longer than that')
                        + '; raise data.seq_len (and model.max_len).')
    c_tokens, c_targets, r_tokens, r_targets, margin = item
    for side, tokens, targets in (('chosen', c_tokens, c_targets), ('rejected', r_tokens, r_targets)):
      n = len(tokens)
      rows[f'{side}_tokens'][i, :n] = tokens
      rows[f'{side}_targets'][i, :n] = targets
      rows[f'{side}_segment_ids'][i, :n] = 1
      rows[f'{side}_positions'][i, :n] = np.arange(n, dtype=np.int32)
    rows['margin'][i] = margin


def _require(examples: Sequence[Any], kind: type, need: str, fields: str) -> None:
  """A one-line DataError when a Task gets examples of another kind than it reads."""
  bad = [e for e in examples if not isinstance(e, kind)]
  if bad:
    raise DataError(f'{need}, and this data.source gives {type(bad[0]).__name__} examples; use '
                    f'data.source=jsonl:<file> with {fields}.')


def frame_response(tokenizer: Tokenizer, prompt: Sequence[int], response: Sequence[int], seq_len: int | None, *,
                   next_token: bool) -> tuple[np.ndarray, np.ndarray, bool]:
  """One prompt + response framed as an instruction (tokenizer.document(prompt + response) ending in EOS): the one
  framing of instruction tuning, preference pairs and reward rows. Its first seq_len tokens (None: all):
  (tokens, targets, whether it was cut). next_token: tokens = seq[:-1], targets = seq[1:] with the prompt's
  unscored (a policy's rows); else tokens = the whole sequence, targets all unscored (a reward model's rows, read
  at the last real token)."""
  prompt, response = np.asarray(prompt, np.int32), np.asarray(response, np.int32)
  seq = tokenizer.document(np.concatenate([prompt, response]), ends_in_eos=True)
  return frame_sequence(tokenizer, seq, len(tokenizer.prefix_ids) + len(prompt), seq_len, next_token=next_token)


def frame_sequence(tokenizer: Tokenizer, seq: np.ndarray, prompt_length: int, seq_len: int | None, *,
                   next_token: bool) -> tuple[np.ndarray, np.ndarray, bool]:
  """A framed sequence whose first prompt_length ids are the prompt (frame_response's framing, or a chat
  template's rendering) as (tokens, targets, whether it was cut): see frame_response."""
  seq = np.asarray(seq, np.int32)
  if next_token:
    unscored = max(0, prompt_length - 1)
    tokens = seq[:-1]
    targets = np.concatenate([np.full(unscored, tokenizer.unscored_target, np.int32), seq[1 + unscored:]])
  else:
    tokens, targets = seq, np.full(len(seq), tokenizer.unscored_target, np.int32)
  if seq_len is None:
    return tokens, targets.astype(np.int32), False
  return tokens[:seq_len], targets[:seq_len].astype(np.int32), len(tokens) > seq_len


def response_rows(tokenizer: Tokenizer, prompts: Sequence[str], responses: Sequence[str], seq_len: int, *,
                  next_token: bool = False) -> Rows:
  """Rows (tokens, positions, segment_ids, targets [N, seq_len]) of prompt + response texts framed as
  frame_response frames them: what a reward model scores (eval.py --mode=reward, best-of-N, the online align
  methods' rewards)."""
  rows = {k: np.zeros((len(prompts), seq_len), np.int32) for k in ('tokens', 'positions', 'segment_ids')}
  rows['targets'] = np.full((len(prompts), seq_len), tokenizer.unscored_target, np.int32)
  for i, (p, r) in enumerate(zip(tokenizer.encode_batch(list(prompts)), tokenizer.encode_batch(list(responses)))):
    tokens, targets, _ = frame_response(tokenizer, p, r, seq_len, next_token=next_token)
    n = len(tokens)
    rows['tokens'][i, :n], rows['targets'][i, :n] = tokens, targets
    rows['segment_ids'][i, :n], rows['positions'][i, :n] = 1, np.arange(n, dtype=np.int32)
  return rows


def _longest_first(a: list[int], b: list[int], budget: int) -> tuple[list[int], list[int]]:
  """Cuts tokens off the end of the longer of a and b (a on a tie) until both fit `budget`."""
  budget = max(0, budget)
  while len(a) + len(b) > budget:
    if len(a) >= len(b):
      a = a[:-1]
    else:
      b = b[:-1]
  return a, b


TASKS: dict[str, type[Task]] = {t.name: t for t in (DecoderOnlyTask, EncoderOnlyTask, EncoderDecoderTask)}
# the Task of a head's examples (heads/: Head.examples) other than the arch's own text rows
EXAMPLE_TASKS: dict[str, type[Task]] = {'labelled': ClassificationTask, 'preference': PreferenceTask,
                                        'tagged': TaggedTask, 'spans': SpanTask}


def make_task(config: Any, tokenizer: Tokenizer, *, train: bool) -> Task:
  """The Task of the examples config.model's head reads (labelled: ClassificationTask), else of config.model.arch."""
  arch = str(config.model.arch)
  if arch not in TASKS:
    raise DataError(f'model.arch={arch!r} is not valid; use {", ".join(TASKS)}.')
  examples = align.examples_of(config)
  if examples == 'prompts':
    raise DataError(f'align.method={config.align.method} samples its own completions of the prompts (the online loop, '
                    'jaxformer/apps/align.py); there are no batch rows to build.')
  if examples in EXAMPLE_TASKS:
    return EXAMPLE_TASKS[examples](config, tokenizer, train)
  objective_name(config)  # data.objective is valid and applies to this arch
  return TASKS[arch](config, tokenizer, train)
