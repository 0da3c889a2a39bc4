"""Log-likelihoods of given continuations: what a few-shot benchmark asks of a language model.

A request is two token lists, a context and a continuation. The answer is the sum of the continuation's token
log-probabilities given the context, and whether greedy decoding would have produced the continuation (every
continuation token is the argmax at its position) — lm-evaluation-harness's `(logprob, is_greedy)`.

decoder_only: the model reads (context + continuation)[:-1], cut on the left to model.max_len tokens, and the last
len(continuation) positions are scored (Hugging Face's causal convention in lm-eval). encoder_decoder: the encoder
reads the context (its last src_len tokens), the decoder reads [decoder start] + continuation[:-1] and every
continuation token is scored (lm-eval's seq2seq convention: labels shifted right).

Requests are sorted longest first and cut into batches of `batch_size` rows (the last one padded with empty rows
to a power of two), each padded on the right to a length bucket (powers of two from MIN_BUCKET, capped at the
model's length): one compiled program per bucket, little padding. The batch axis is sharded like training's
('batch' over the mesh's data axes); parameters stay where they are.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxformer import sharding as shd

MIN_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class Rows:
  """One batch as the model reads it (numpy, [batch, bucket])."""
  arrays: dict[str, np.ndarray]
  order: list[int]  # the request index of each real row


def bucket_length(n: int, cap: int, minimum: int = MIN_BUCKET) -> int:
  """The smallest power of two >= n (at least `minimum`), or `cap` when that is smaller."""
  size = minimum
  while size < n:
    size *= 2
  return min(size, cap) if cap > 0 else size


@functools.lru_cache(maxsize=8)
def _scorer(graphdef: Any, encoder_decoder: bool):
  """The jitted forward: (params, rest, batch) -> (sum of scored log-probs [B] float32, all greedy [B] bool)."""
  def score(params, rest, batch):
    model = nnx.merge(graphdef, params, rest)
    if encoder_decoder:
      logits = model(batch['src_tokens'], batch['tokens'], src_segment_ids=batch['src_segment_ids'],
                     tgt_segment_ids=batch['segment_ids'])
    else:
      logits = model(batch['tokens'], segment_ids=batch['segment_ids'])
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    targets, scored = batch['targets'], batch['scored']
    token_logp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    greedy = jnp.argmax(logp, axis=-1) == targets
    return (jnp.sum(jnp.where(scored, token_logp, 0.0), axis=-1),
            jnp.all(greedy | ~scored, axis=-1))
  return jax.jit(score)


class ContinuationScorer:
  """Scores (context, continuation) token lists with a model on a mesh. `__call__(requests)` -> one
  (log-probability, is_greedy) per request, in the requests' order."""

  def __init__(self, model: nnx.Module, *, mesh: Any, rules: Any, batch_size: int, max_len: int,
               encoder_decoder: bool = False, src_len: int = 0, decoder_start_id: int = 0):
    self.graphdef, self.params, self.rest = nnx.split(model, nnx.Param, ...)
    self.mesh, self.rules = mesh, rules
    self.shards = shd.batch_shards(mesh, rules)
    self.batch_size = shd.round_to_shards(batch_size, mesh, rules)  # a multiple of the devices rows split over
    self.max_len, self.src_len = int(max_len), int(src_len or max_len)
    self.encoder_decoder, self.decoder_start_id = encoder_decoder, int(decoder_start_id)
    self.shapes: set[tuple[int, ...]] = set()  # the (batch, length[, source length]) programs used so far

  # ------------------------------------------------------------------------------------------------ rows
  def _row(self, context: Sequence[int], continuation: Sequence[int]) -> dict[str, list[int] | int]:
    """The model's input, targets and how many trailing targets are scored, for one request."""
    context, continuation = [int(i) for i in context], [int(i) for i in continuation]
    if not continuation:
      raise ValueError('a continuation needs at least one token.')
    if self.encoder_decoder:
      target = continuation[-self.max_len:]
      return {'src': context[-self.src_len:], 'tokens': [self.decoder_start_id] + target[:-1], 'targets': target,
              'scored': len(target)}
    if not context:
      raise ValueError('a decoder_only request needs at least one context token (e.g. BOS).')
    if len(continuation) > self.max_len:
      raise ValueError(f'a continuation of {len(continuation)} tokens does not fit model.max_len={self.max_len}.')
    whole = (context + continuation)[-(self.max_len + 1):]
    return {'tokens': whole[:-1], 'targets': whole[1:], 'scored': len(continuation)}

  def _batch(self, rows: list[dict], order: list[int]) -> Rows:
    length = bucket_length(max(len(r['tokens']) for r in rows), self.max_len)
    # the last, partial batch: rows rounded up to a power of two (of devices), not to batch_size
    b = min(self.batch_size, -(-bucket_length(len(rows), 0, minimum=1) // self.shards) * self.shards)
    arrays = {k: np.zeros((b, length), np.int32) for k in ('tokens', 'segment_ids', 'targets')}
    arrays['scored'] = np.zeros((b, length), bool)
    if self.encoder_decoder:
      src_length = bucket_length(max(len(r['src']) for r in rows), self.src_len)
      arrays['src_tokens'] = np.zeros((b, src_length), np.int32)
      arrays['src_segment_ids'] = np.zeros((b, src_length), np.int32)
    for i, r in enumerate(rows):
      n = len(r['tokens'])
      arrays['tokens'][i, :n] = r['tokens']
      arrays['segment_ids'][i, :n] = 1  # explicit: id 0 is a real token in many vocabularies
      arrays['targets'][i, :n] = r['targets']
      arrays['scored'][i, n - r['scored']:n] = True
      if self.encoder_decoder:
        arrays['src_tokens'][i, :len(r['src'])] = r['src']
        arrays['src_segment_ids'][i, :len(r['src'])] = 1
    for i in range(len(rows), b):  # empty rows: one real token each, nothing scored
      arrays['segment_ids'][i, 0] = 1
      if self.encoder_decoder:
        arrays['src_segment_ids'][i, 0] = 1
    return Rows(arrays, order)

  def batches(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[Rows]:
    """The requests as padded batches, longest first (so the first batch shows the worst case at once)."""
    rows = [self._row(c, x) for c, x in requests]
    order = sorted(range(len(rows)), key=lambda i: (-len(rows[i]['tokens']) - len(rows[i].get('src', ())), i))
    return [self._batch([rows[i] for i in order[s:s + self.batch_size]], order[s:s + self.batch_size])
            for s in range(0, len(order), self.batch_size)]

  # ---------------------------------------------------------------------------------------------- scoring
  def __call__(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]],
               progress: Any = None) -> list[tuple[float, bool]]:
    """progress: called with the number of requests each finished batch scored (e.g. a tqdm's update)."""
    fn = _scorer(self.graphdef, self.encoder_decoder)
    out: list[tuple[float, bool] | None] = [None] * len(requests)
    with shd.mesh_context(self.mesh, self.rules):
      for rows in self.batches(requests):
        self.shapes.add(tuple(rows.arrays['tokens'].shape) + tuple(rows.arrays.get('src_tokens', np.zeros((0, 0))).shape[1:]))
        batch = shd.shard_batch(rows.arrays, self.mesh, self.rules)
        logp, greedy = jax.device_get(fn(self.params, self.rest, batch))
        for row, index in enumerate(rows.order):
          out[index] = (float(logp[row]), bool(greedy[row]))
        if progress is not None:
          progress(len(rows.order))
    return out  # type: ignore[return-value]
