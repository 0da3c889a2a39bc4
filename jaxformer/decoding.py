"""Greedy, beam search and temperature / top-k / top-p sampling over the model's KV cache.

Everything runs inside one jit per (model graph, settings, shapes): the prompt is prefilled once, then one token
per step in a `lax.while_loop` that stops early when every row is done. The encoder runs once for
encoder_decoder (its keys/values live in the cache). The model is split with `nnx.split`, so the parameters are
jit *arguments*: sharded parameters stay sharded, and new weights do not recompile.

The model contract (see jaxformer/model): `init_cache(batch, max_len, *, encoded=None, src_tokens=None)`,
`decode_step(tokens [B, T], cache, *, valid=None) -> (logits [B, T, V], cache)` (pure; positions continue from
the cache; valid [B, T] bool says which tokens are real), `encode(src_tokens) -> [B, S, D]` for encoder_decoder
(S counts a soft prompt's positions with prompt tuning; the model's cache accounts for its prompt itself).

Every token fed to the decoder is real, whatever its id: prompt tokens, and generated ones even if they equal the
pad id (a T5 model can generate its pad id 0 and then attends to it, as in Hugging Face's generate). Only the
padding written after a row is done is not; the source keeps the model's pad_id mask.

Prompts of different lengths are right-padded with 0 and passed with their lengths. The prefill covers the
shortest prompt; longer prompts are fed one token per step with their own tokens forced (t5x-style), so every row
sees exactly the positions it would see alone, whatever the position encoding.

Beam search follows the Flax WMT / t5x scheme: 2*beam candidates per step, the best `beam` that did not just end
stay alive, the ended ones (among the top `beam` candidates) compete for `beam` finished slots on their
length-penalised score log_prob / ((5 + len) / 6) ** alpha (GNMT), and the search stops once no alive beam can still
beat the worst finished one. Beams still alive at the max_len budget are finished there (truncated) and compete
on the same score. With alpha = 0 and one beam this is exactly greedy decoding.

Generation controls (decode.repetition_penalty, no_repeat_ngram_size, min_new_tokens: `apply_controls`) change the
next-token scores inside the same loops, with transformers' semantics: greedy and sampling apply them to the raw
logits before temperature / top-k / top-p; beam search to the log-softmaxed scores (as transformers' beam search
does), which also become the beams' running scores. Every token already in a row counts (a decoder_only prompt
included; for encoder_decoder the decoder's tokens, its start token included, as transformers' decoder_input_ids).
Off (1.0 / 0 / 0), they add nothing to the program.

Stop strings (decode.stop) are cut on the host, on decoded text (`cut_at_stop`: exact, as lm-eval's `until`;
transformers' stop_strings keep the stop string). Inside the loop a row also ends once its generated tokens end with one of the token sequences
the tokenizer gives for a stop string (`stop_token_patterns`, a jit argument) -- for greedy / sampling only a
saving of steps that never changes the cut text; beam search ends such a hypothesis like EOS (as transformers'
stopping criteria do in beam search).
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.experimental import multihost_utils

from jaxformer.special_tokens import BOS_ID, EOS_ID, PAD_ID

NEG_INF = -1.0e7  # finite, so sums of "impossible" scores never turn into nan


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
  """config.decode's decoding parameters as a hashable value (a static jit argument). max_len counts new tokens
  only. Every field is given: the run's come from its decode section (one default each, configs/default.py)."""
  method: str
  beam_size: int
  length_penalty: float
  temperature: float
  top_k: int
  top_p: float
  max_len: int
  eos_id: int
  start_id: int  # the first decoder token when no prompt is given (T5 starts from its pad id, 0)
  repetition_penalty: float  # CTRL: a seen token's logit / penalty if > 0, * penalty if < 0; 1.0 = off
  no_repeat_ngram_size: int  # ban a token that would repeat an n-gram of the row; 0 = off
  min_new_tokens: int  # EOS is banned until this many new tokens; 0 = off
  num_return_sequences: int  # sample: independent samples per prompt; beam: the best N beams; greedy: 1
  stop: str  # stop strings, comma-separated (parse_stop); cut on the host, an early stop in the loop

  @classmethod
  def from_config(cls, decode: Any, **overrides: Any) -> DecodeSettings:
    """From a decode section (typed settings or a ConfigDict); keyword overrides win."""
    values = {f.name: getattr(decode, f.name) for f in dataclasses.fields(cls)}
    values.update(overrides)
    settings = cls(**values)
    settings.check()
    return settings

  def check(self) -> None:
    """Raises ValueError (one line naming the decode.* key and the fix) for values no method can use."""
    if self.method not in METHODS:  # the registry at the end of this file
      raise ValueError(f'decode.method={self.method!r} is not one of {", ".join(METHODS)}.')
    if not self.repetition_penalty > 0:
      raise ValueError(f'decode.repetition_penalty={self.repetition_penalty!r} must be > 0 (1.0 = off; > 1 '
                       'discourages repeats).')
    for key in ('no_repeat_ngram_size', 'min_new_tokens'):
      if getattr(self, key) < 0:
        raise ValueError(f'decode.{key}={getattr(self, key)!r} must be >= 0 (0 = off).')
    n = self.num_return_sequences
    if n < 1:
      raise ValueError(f'decode.num_return_sequences={n!r} must be >= 1.')
    if n > 1 and self.method == 'greedy':
      raise ValueError(f'decode.num_return_sequences={n} needs decode.method=sample or beam (greedy has one '
                       'answer); set decode.num_return_sequences=1.')
    if self.method == 'beam' and n > self.beam_size:
      raise ValueError(f'decode.num_return_sequences={n} exceeds decode.beam_size={self.beam_size}; raise '
                       f'decode.beam_size to at least {n}.')
    parse_stop(self.stop)

  @property
  def stop_strings(self) -> tuple[str, ...]:
    return parse_stop(self.stop)

  @property
  def controls(self) -> bool:
    """Whether any logits control is on (else the loops are exactly the plain ones)."""
    return (self.repetition_penalty != 1.0 or self.no_repeat_ngram_size > 0
            or (self.min_new_tokens > 0 and self.eos_id >= 0))

  def canonical(self) -> DecodeSettings:
    """Resets the fields this method ignores to IGNORED, so e.g. greedy with another top_p reuses the program.
    stop and num_return_sequences are read outside the jitted loops (stop tokens are an argument), so they are
    always reset."""
    outside = {'stop': OFF['stop'], 'num_return_sequences': OFF['num_return_sequences']}
    if self.method == 'beam':
      return dataclasses.replace(self, temperature=IGNORED['temperature'], top_k=IGNORED['top_k'],
                                 top_p=IGNORED['top_p'], **outside)
    if self.method == 'greedy' or self.temperature == 0:
      return dataclasses.replace(self, method='greedy', **IGNORED, **outside)
    return dataclasses.replace(self, beam_size=IGNORED['beam_size'], length_penalty=IGNORED['length_penalty'],
                               **outside)


# what canonical() puts in the fields a method does not read (values that turn each option off)
IGNORED = {'beam_size': 1, 'length_penalty': 0.0, 'temperature': 1.0, 'top_k': 0, 'top_p': 1.0}
# the generation controls, off
OFF = {'repetition_penalty': 1.0, 'no_repeat_ngram_size': 0, 'min_new_tokens': 0, 'num_return_sequences': 1,
       'stop': ''}


# --------------------------------------------------------------------------------------------- stop strings
_ESCAPES = {'n': '\n', 't': '\t', 'r': '\r', '\\': '\\', ',': ','}


def parse_stop(value: str | Sequence[str]) -> tuple[str, ...]:
  """decode.stop -> the stop strings. A string is a comma-separated list with escapes \\n \\t \\r \\\\ and \\,
  (a literal comma), so a shell can pass --config.decode.stop='\\n\\n,###'; a tuple / list is taken as is (from
  Python). Empty pieces are dropped; '' = no stop strings."""
  if not isinstance(value, str):
    return tuple(str(v) for v in value if str(v))
  out, piece, i = [], [], 0
  while i < len(value):
    c = value[i]
    if c == '\\' and i + 1 < len(value):
      nxt = value[i + 1]
      if nxt not in _ESCAPES:
        raise ValueError(f'decode.stop={value!r}: unknown escape \\{nxt}; use \\n \\t \\r \\\\ or \\, .')
      piece.append(_ESCAPES[nxt])
      i += 2
      continue
    if c == ',':
      out.append(''.join(piece))
      piece = []
    else:
      piece.append(c)
    i += 1
  out.append(''.join(piece))
  return tuple(p for p in out if p)


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
  """The text before the earliest occurrence of any stop string (the text itself when none occurs)."""
  cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
  return text[:cut]


def stop_token_patterns(tokenizer: Any, stop: Sequence[str]) -> np.ndarray | None:
  """The token sequences that end a row early: for each stop string, tokenizer.encode(stop) and of ' ' + stop
  when they decode back to text containing the stop string (so a match means the decoded text contains it and the
  host cut is unchanged). -> int32 [S, L], right-aligned, -1 before a shorter sequence; S and L rounded up (to a
  power of two, a multiple of 4) so that other stop strings of similar size reuse the compiled loop. None: none."""
  seqs = []
  for s in stop:
    for text in (s, ' ' + s):
      ids = [int(i) for i in tokenizer.encode(text)]
      if ids and s in tokenizer.decode(ids) and ids not in seqs:
        seqs.append(ids)
  if not seqs:
    return None
  rows = 1 << (len(seqs) - 1).bit_length()
  width = -(-max(len(ids) for ids in seqs) // 4) * 4
  out = np.full((rows, width), -1, np.int32)
  for row, ids in enumerate(seqs):
    out[row, width - len(ids):] = ids
  return out


def brevity_penalty(length: jax.Array, alpha: float) -> jax.Array:
  """GNMT length penalty ((5 + len) / 6) ** alpha; scores are log_prob / penalty."""
  return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def pad_prompts(prompts: Sequence[Sequence[int]], *, min_len: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """Right-pads token lists with 0 -> (tokens [B, P] int32, lengths [B] int32). Empty prompts are an error."""
  lengths = np.array([len(p) for p in prompts], np.int32)
  if len(prompts) == 0 or lengths.min() < min_len:
    raise ValueError('every prompt needs at least one token (decoder_only prompts start with BOS).')
  tokens = np.zeros((len(prompts), max(int(lengths.max()), min_len)), np.int32)
  for row, prompt in enumerate(prompts):
    tokens[row, :len(prompt)] = prompt
  return tokens, lengths


# --------------------------------------------------------------------------------------- token selection
def sample_logits(rng: jax.Array, logits: jax.Array, *, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0) -> jax.Array:
  """Draws one token per row of logits [..., V]. temperature 0 -> argmax; top_k 0 / top_p 1 -> off.

  Order as in most libraries: temperature, then top-k, then the nucleus (the smallest set of most likely tokens
  whose probability reaches top_p; the most likely token is always in it).
  """
  logits = logits.astype(jnp.float32)
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  vocab = logits.shape[-1]
  if 0 < top_k < vocab:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    sorted_logits = jnp.flip(jnp.sort(logits, axis=-1), axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # probability of the strictly more likely tokens
    keep = mass_before < top_p
    num_keep = jnp.maximum(jnp.sum(keep, axis=-1, keepdims=True), 1)
    threshold = jnp.take_along_axis(sorted_logits, num_keep - 1, axis=-1)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


# ------------------------------------------------------------------------------------------ generation controls
def apply_controls(scores: jax.Array, seqs: jax.Array, length: Any, prompt_lengths: jax.Array,
                   settings: DecodeSettings) -> jax.Array:
  """The next-token scores [R, V] of rows whose first `length` tokens (scalar or [R]) of seqs [R, total] are
  real, after decode.repetition_penalty, no_repeat_ngram_size and min_new_tokens (transformers' processors, in its
  order; banned tokens get NEG_INF). prompt_lengths [R]: where each row's new tokens start (for min_new_tokens).
  Fixed shapes throughout, so it runs inside the jitted loops; the settings are static."""
  rows, total = seqs.shape
  vocab = scores.shape[-1]
  length = jnp.broadcast_to(jnp.asarray(length, jnp.int32), (rows,))
  row_ids = jnp.arange(rows)[:, None]
  positions = jnp.arange(total)

  def mark(ids: jax.Array, where: jax.Array) -> jax.Array:
    """[R, V] bool: the ids [R, W] where `where` holds (others go to a spare column that is dropped)."""
    return jnp.zeros((rows, vocab + 1), bool).at[row_ids, jnp.where(where, ids, vocab)].set(True)[:, :vocab]

  if settings.repetition_penalty != 1.0:
    seen = mark(seqs, positions[None, :] < length[:, None])
    penalty = settings.repetition_penalty
    scores = jnp.where(seen, jnp.where(scores < 0, scores * penalty, scores / penalty), scores)
  n = settings.no_repeat_ngram_size
  if 0 < n <= total:
    windows = total - n + 1  # the n-gram starting at j ends at j + n - 1
    match = jnp.ones((rows, windows), bool)
    for k in range(n - 1):  # the n-gram's first n - 1 tokens equal the row's last n - 1
      last = jnp.take_along_axis(seqs, jnp.clip(length - (n - 1) + k, 0, total - 1)[:, None], axis=1)
      match &= seqs[:, k:k + windows] == last
    complete = (jnp.arange(windows)[None, :] + n - 1 < length[:, None]) & (length[:, None] + 1 >= n)
    scores = jnp.where(mark(seqs[:, n - 1:], match & complete), NEG_INF, scores)
  if settings.min_new_tokens > 0 and 0 <= settings.eos_id < vocab:
    early = (length - prompt_lengths < settings.min_new_tokens)[:, None]
    scores = jnp.where(early & (jnp.arange(vocab) == settings.eos_id), NEG_INF, scores)
  return scores


def ends_with_stop(seqs: jax.Array, index: Any, prompt_lengths: jax.Array, stop_tokens: jax.Array) -> jax.Array:
  """[R] bool: the row's tokens up to and including position `index` end with one of stop_tokens [S, L]
  (right-aligned, -1 = none), all of its tokens generated ones (at or past the row's prompt length)."""
  total = seqs.shape[-1]
  width = stop_tokens.shape[-1]
  window = jnp.take(seqs, jnp.clip(index - width + 1 + jnp.arange(width), 0, total - 1), axis=-1)  # [R, L]
  real = stop_tokens >= 0
  size = jnp.sum(real, axis=-1)  # [S]
  same = jnp.all((window[:, None, :] == stop_tokens[None]) | ~real[None], axis=-1)  # [R, S]
  generated = (index + 1 - size)[None, :] >= prompt_lengths[:, None]
  return jnp.any(same & generated & (size > 0)[None], axis=-1)


# ------------------------------------------------------------------------------------------- the jitted core
def _start(model, prompt, src_tokens, total_len: int, prefill_len: int):
  """Runs the encoder once, builds the cache and prefills the first prefill_len prompt tokens."""
  batch = prompt.shape[0]
  if src_tokens is not None:
    encoded = model.encode(src_tokens)
    cache = model.init_cache(batch, total_len, encoded=encoded, src_tokens=src_tokens)
  else:
    cache = model.init_cache(batch, total_len)
  logits, cache = model.decode_step(prompt[:, :prefill_len], cache, valid=jnp.ones((batch, prefill_len), bool))
  return logits[:, -1].astype(jnp.float32), cache


def _forced(prompt_full, prompt_lengths, index, max_new):
  """(is_forced [B], token [B]): inside its prompt a row takes the prompt token; past its budget, padding."""
  in_prompt = index < prompt_lengths
  past_end = index >= prompt_lengths + max_new
  token = jnp.where(in_prompt, jax.lax.dynamic_index_in_dim(prompt_full, index, axis=1, keepdims=False), PAD_ID)
  return in_prompt | past_end, token


def _new_tokens(seqs, prompt_lengths, max_new):
  """Cuts each row's generated tokens out of the [.., total] buffer, aligned to start at column 0."""
  idx = prompt_lengths.reshape(prompt_lengths.shape + (1,) * (seqs.ndim - 1)) + jnp.arange(max_new)
  idx = jnp.minimum(idx, seqs.shape[-1] - 1)
  return jnp.take_along_axis(seqs, jnp.broadcast_to(idx, seqs.shape[:-1] + (max_new,)), axis=-1)


@struct.dataclass
class SamplingState:
  """The while-loop carry of greedy / sampling. Buffers span the whole [B, prompt + new] width."""
  index: jax.Array  # int32 scalar: the position the next token is written to
  seqs: jax.Array  # [B, total] prompt and generated tokens
  logits: jax.Array  # [B, V] float32 logits for position `index`
  cache: Any  # the model's decoding cache
  done: jax.Array  # [B] bool: the row emitted EOS or used its budget


@struct.dataclass
class BeamState:
  """The while-loop carry of beam search: `beam` alive and `beam` finished hypotheses per row."""
  index: jax.Array  # int32 scalar: the position the next token is written to
  live_seqs: jax.Array  # [B, K, total]
  live_logprobs: jax.Array  # [B, K] sum of token log-probs, best first; NEG_INF for empty slots
  finished_seqs: jax.Array  # [B, K, total]
  finished_scores: jax.Array  # [B, K] length-penalised scores, best first
  finished_flags: jax.Array  # [B, K] bool: the slot holds a finished hypothesis
  logits: jax.Array  # [B, K, V] float32 logits for position `index`
  cache: Any  # the model's cache, batch leading with row b's beams at b * K + k


@functools.partial(jax.jit, static_argnames=('graphdef', 'settings', 'prefill_len'))
def _sample_or_greedy(graphdef, state, prompt, prompt_lengths, src_tokens, rng, stop_tokens, *,
                      settings: DecodeSettings, prefill_len: int):
  model = nnx.merge(graphdef, state)
  batch, prompt_width = prompt.shape
  max_new = settings.max_len
  total = prompt_width + max_new
  seqs = jnp.zeros((batch, total), jnp.int32).at[:, :prompt_width].set(prompt)
  logits, cache = _start(model, prompt, src_tokens, total, prefill_len)
  greedy = settings.method == 'greedy' or settings.temperature == 0

  def cond(s: SamplingState):
    return (s.index < total) & ~jnp.all(s.done)

  def body(s: SamplingState) -> SamplingState:
    logits = s.logits
    if settings.controls:  # before temperature / top-k / top-p, as transformers' processors
      logits = apply_controls(logits, s.seqs, s.index, prompt_lengths, settings)
    if greedy:
      token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    else:
      token = sample_logits(jax.random.fold_in(rng, s.index), logits, temperature=settings.temperature,
                            top_k=settings.top_k, top_p=settings.top_p)
    forced, forced_token = _forced(s.seqs, prompt_lengths, s.index, max_new)
    token = jnp.where(forced, forced_token, token)
    token = jnp.where(s.done, PAD_ID, token)
    seqs = jax.lax.dynamic_update_index_in_dim(s.seqs, token, s.index, axis=1)
    done = s.done | ((token == settings.eos_id) & ~forced) | (s.index + 1 >= prompt_lengths + max_new)
    if stop_tokens is not None:
      done = done | (ends_with_stop(seqs, s.index, prompt_lengths, stop_tokens) & ~forced)
    logits, cache = model.decode_step(token[:, None], s.cache, valid=~s.done[:, None])
    return SamplingState(index=s.index + 1, seqs=seqs, logits=logits[:, 0].astype(jnp.float32), cache=cache,
                         done=done)

  start = SamplingState(index=jnp.int32(prefill_len), seqs=seqs, logits=logits, cache=cache,
                        done=jnp.zeros((batch,), bool))
  return _new_tokens(jax.lax.while_loop(cond, body, start).seqs, prompt_lengths, max_new)


def _gather_beams(x, beam_indices):
  """x [B, K_old, ...], beam_indices [B, K_new] -> [B, K_new, ...]."""
  return jax.vmap(lambda row, idx: row[idx])(x, beam_indices)


@functools.partial(jax.jit, static_argnames=('graphdef', 'settings', 'prefill_len'))
def _beam_search(graphdef, state, prompt, prompt_lengths, src_tokens, stop_tokens, *, settings: DecodeSettings,
                 prefill_len: int):
  model = nnx.merge(graphdef, state)
  batch, prompt_width = prompt.shape
  beam, alpha, max_new = settings.beam_size, settings.length_penalty, settings.max_len
  total = prompt_width + max_new
  logits, cache = _start(model, prompt, src_tokens, total, prefill_len)  # once per row, not per beam
  # Every cache leaf has batch leading: row b's beams sit at b * beam + k.
  cache = jax.tree.map(lambda x: jnp.repeat(x, beam, axis=0) if x.ndim else x, cache)
  logits = jnp.broadcast_to(logits[:, None], (batch, beam, logits.shape[-1]))
  vocab = logits.shape[-1]

  seqs = jnp.zeros((batch, total), jnp.int32).at[:, :prompt_width].set(prompt)
  live_seqs = jnp.broadcast_to(seqs[:, None], (batch, beam, total))
  live_logprobs = jnp.where(jnp.arange(beam) == 0, 0.0, NEG_INF) * jnp.ones((batch, 1))
  finished_seqs = jnp.zeros_like(live_seqs)
  finished_scores = jnp.full((batch, beam), NEG_INF)
  finished_flags = jnp.zeros((batch, beam), bool)

  def finished_rows(index, live_logprobs, finished_scores, finished_flags):
    """A row is done past its budget, or when all finished slots beat the best any alive beam could still reach."""
    generated = index - prompt_lengths  # tokens generated so far (>= 0 once out of the prompt)
    in_prompt = generated < 0
    # log-probs only fall, so the best alive beam's bound is its log-prob over the largest penalty still possible.
    largest_penalty = jnp.maximum(brevity_penalty(max_new, alpha), brevity_penalty(jnp.maximum(generated, 0) + 1,
                                                                                     alpha))
    best_alive = live_logprobs[:, 0] / largest_penalty
    worst_finished = jnp.where(jnp.all(finished_flags, axis=1), jnp.min(finished_scores, axis=1), NEG_INF)
    return (generated >= max_new) | (~in_prompt & (worst_finished > best_alive))

  def cond(s: BeamState):
    return (s.index < total) & ~jnp.all(finished_rows(s.index, s.live_logprobs, s.finished_scores,
                                                      s.finished_flags))

  def body(s: BeamState) -> BeamState:
    index, live_seqs, live_logprobs, logits = s.index, s.live_seqs, s.live_logprobs, s.logits
    log_probs = jax.nn.log_softmax(logits, axis=-1)  # [B, K, V]
    if settings.controls:  # on the log-probs, which the beams then add up (as transformers' beam search)
      log_probs = apply_controls(log_probs.reshape(batch * beam, vocab), live_seqs.reshape(batch * beam, total),
                                 index, jnp.repeat(prompt_lengths, beam), settings).reshape(batch, beam, vocab)
    forced, forced_token = _forced(live_seqs[:, 0], prompt_lengths, index, max_new)
    forced_lp = jnp.where(jnp.arange(vocab) == forced_token[:, None], 0.0, NEG_INF)[:, None, :]
    log_probs = jnp.where(forced[:, None, None], forced_lp, log_probs)
    candidates = (live_logprobs[..., None] + log_probs).reshape(batch, beam * vocab)
    top_logprobs, top_indices = jax.lax.top_k(candidates, 2 * beam)  # [B, 2K]
    top_parents, top_tokens = top_indices // vocab, (top_indices % vocab).astype(jnp.int32)
    top_seqs = jax.lax.dynamic_update_index_in_dim(_gather_beams(live_seqs, top_parents), top_tokens, index, axis=2)
    # An EOS candidate finishes only if it ranks among the top `beam` (it would have survived in a plain beam of
    # that width; as in Hugging Face). Without this, a beam of 1 would bank an EOS that greedy never chose.
    # At the length budget the surviving candidates finish too (truncated), so a likely sequence that ran out of
    # room still beats an unlikely early EOS (t5x would return the EOS one).
    at_limit = (index - prompt_lengths + 1 >= max_new)[:, None]
    stopped = top_tokens == settings.eos_id
    if stop_tokens is not None:  # a stop string ends a hypothesis like EOS
      stopped |= ends_with_stop(top_seqs.reshape(batch * 2 * beam, total), index,
                                jnp.repeat(prompt_lengths, 2 * beam), stop_tokens).reshape(batch, 2 * beam)
    ended = ((stopped | at_limit) & ~forced[:, None] & (top_logprobs > NEG_INF / 2)
             & (jnp.arange(2 * beam) < beam))

    # Alive: the best `beam` candidates that did not just end.
    alive_logprobs, alive_idx = jax.lax.top_k(jnp.where(ended, NEG_INF, top_logprobs), beam)
    new_live_seqs = _gather_beams(top_seqs, alive_idx)
    parents = _gather_beams(top_parents, alive_idx)
    tokens = _gather_beams(top_tokens, alive_idx)

    # Finished: merge the old finished beams with the ones that just ended, keep the best `beam` scores.
    length = (index - prompt_lengths + 1)[:, None]
    new_scores = jnp.where(ended, top_logprobs / brevity_penalty(length, alpha), NEG_INF)
    all_seqs = jnp.concatenate([s.finished_seqs, top_seqs], axis=1)
    all_scores = jnp.concatenate([s.finished_scores, new_scores], axis=1)
    all_flags = jnp.concatenate([s.finished_flags, ended], axis=1)
    finished_scores, keep = jax.lax.top_k(all_scores, beam)
    finished_seqs, finished_flags = _gather_beams(all_seqs, keep), _gather_beams(all_flags, keep)

    flat_parents = (jnp.arange(batch)[:, None] * beam + parents).reshape(-1)
    cache = jax.tree.map(lambda x: x[flat_parents] if x.ndim else x, s.cache)
    logits, cache = model.decode_step(tokens.reshape(batch * beam, 1), cache,
                                      valid=jnp.ones((batch * beam, 1), bool))
    logits = logits[:, 0].astype(jnp.float32).reshape(batch, beam, vocab)
    return BeamState(index=index + 1, live_seqs=new_live_seqs, live_logprobs=alive_logprobs,
                     finished_seqs=finished_seqs, finished_scores=finished_scores, finished_flags=finished_flags,
                     logits=logits, cache=cache)

  start = BeamState(index=jnp.int32(prefill_len), live_seqs=live_seqs, live_logprobs=live_logprobs,
                    finished_seqs=finished_seqs, finished_scores=finished_scores, finished_flags=finished_flags,
                    logits=logits, cache=cache)
  end = jax.lax.while_loop(cond, body, start)
  # A row where nothing ended returns its alive beams (they hit the length budget), scored the same way.
  any_finished = jnp.any(end.finished_flags, axis=1)
  live_scores = end.live_logprobs / brevity_penalty(max_new, alpha)
  seqs = jnp.where(any_finished[:, None, None], end.finished_seqs, end.live_seqs)
  scores = jnp.where(any_finished[:, None], end.finished_scores, live_scores)
  return _new_tokens(seqs, prompt_lengths, max_new), scores


@functools.partial(jax.jit, static_argnames=('graphdef', 'max_new', 'prefill_len', 'eos_id'))
def _greedy_without_cache(graphdef, state, prompt, prompt_lengths, src_tokens, *, max_new: int, prefill_len: int,
                          eos_id: int):
  model = nnx.merge(graphdef, state)
  batch, prompt_width = prompt.shape
  total = prompt_width + max_new
  seqs = jnp.zeros((batch, total), jnp.int32).at[:, :prompt_width].set(prompt)

  def body(index, carry):
    seqs, done = carry
    real = jnp.ones_like(seqs)  # every decoder token is real (the buffer after `index` is the future: causal)
    if src_tokens is not None:  # the whole buffer, every step
      logits = model(src_tokens, seqs, tgt_segment_ids=real)
    else:
      logits = model(seqs, segment_ids=real)
    token = jnp.argmax(jax.lax.dynamic_index_in_dim(logits, index - 1, axis=1, keepdims=False), axis=-1)
    forced, forced_token = _forced(seqs, prompt_lengths, index, max_new)
    token = jnp.where(done, PAD_ID, jnp.where(forced, forced_token, token).astype(jnp.int32))
    done = done | ((token == eos_id) & ~forced)
    return jax.lax.dynamic_update_index_in_dim(seqs, token, index, axis=1), done

  seqs, _ = jax.lax.fori_loop(prefill_len, total, body, (seqs, jnp.zeros((batch,), bool)))
  return _new_tokens(seqs, prompt_lengths, max_new)


# ----------------------------------------------------------------------------------------------- public API
def _prepare(prompt, prompt_lengths, src_tokens, prefill_len=None, start_id=BOS_ID):
  if prompt is None:
    if src_tokens is None:
      raise ValueError('decoder_only decoding needs a prompt (at least BOS per row).')
    prompt = np.full((np.shape(src_tokens)[0], 1), start_id, np.int32)
  if prompt_lengths is None:
    prompt_lengths = np.full((np.shape(prompt)[0],), np.shape(prompt)[1], np.int32)
  # The prefill length is a shape, so it must be concrete: the shortest prompt.
  if prefill_len is None:
    prefill_len = int(np.min(np.asarray(prompt_lengths)))
  if prefill_len < 1:
    raise ValueError('every prompt needs at least one token (BOS).')
  prompt = jnp.asarray(prompt, jnp.int32)
  src = None if src_tokens is None else jnp.asarray(src_tokens, jnp.int32)
  return prompt, jnp.asarray(prompt_lengths, jnp.int32), src, prefill_len


def greedy(model: nnx.Module, prompt: Any = None, *, max_new_tokens: int, prompt_lengths: Any = None,
           src_tokens: Any = None, eos_id: int = EOS_ID, start_id: int = BOS_ID) -> jax.Array:
  """Argmax decoding -> new tokens [B, max_new_tokens], 0 after EOS (EOS itself is kept). 0 can be a real token
  (GPT-2's '!'): cut a row at its first eos_id, not at 0 (evaluation does)."""
  settings = DecodeSettings(method='greedy', max_len=max_new_tokens, eos_id=eos_id, start_id=start_id, **IGNORED,
                            **OFF)
  return sample(model, prompt, None, settings=settings, prompt_lengths=prompt_lengths, src_tokens=src_tokens)


def sample(model: nnx.Module, prompt: Any, rng: jax.Array | None, *, settings: DecodeSettings,
           prompt_lengths: Any = None, src_tokens: Any = None, prefill_len: int | None = None,
           stop_tokens: Any = None) -> jax.Array:
  """Temperature / top-k / top-p sampling (or greedy, by settings.method) -> new tokens [B, settings.max_len].

  Same key, same tokens; the key of step i is fold_in(rng, position i). stop_tokens: stop_token_patterns' array
  (a row ends early once its new tokens end with one; None: only EOS and the budget end a row).
  """
  if settings.method == 'beam':
    raise ValueError('decode.method=beam: call beam_search (or decode, which dispatches on the method).')
  graphdef, state = nnx.split(model)
  prompt, lengths, src, prefill_len = _prepare(prompt, prompt_lengths, src_tokens, prefill_len, settings.start_id)
  if settings.method == 'sample' and settings.temperature > 0 and rng is None:
    raise ValueError('sampling needs an explicit PRNG key (rng=jax.random.key(seed)).')
  if rng is None:
    rng = jax.random.key(0)  # unused by greedy
  stop = None if stop_tokens is None else jnp.asarray(stop_tokens, jnp.int32)
  return _sample_or_greedy(graphdef, state, prompt, lengths, src, rng, stop, settings=settings.canonical(),
                           prefill_len=prefill_len)


def beam_search(model: nnx.Module, prompt: Any = None, *, settings: DecodeSettings, prompt_lengths: Any = None,
                src_tokens: Any = None, prefill_len: int | None = None,
                stop_tokens: Any = None) -> tuple[jax.Array, jax.Array]:
  """-> (new tokens [B, beam, max_len], length-penalised scores [B, beam]), best beam first. stop_tokens (see
  sample) end a hypothesis like EOS."""
  graphdef, state = nnx.split(model)
  prompt, lengths, src, prefill_len = _prepare(prompt, prompt_lengths, src_tokens, prefill_len, settings.start_id)
  settings = dataclasses.replace(settings, method='beam').canonical()
  stop = None if stop_tokens is None else jnp.asarray(stop_tokens, jnp.int32)
  return _beam_search(graphdef, state, prompt, lengths, src, stop, settings=settings, prefill_len=prefill_len)


def greedy_without_cache(model: nnx.Module, prompt: Any = None, *, max_new_tokens: int, prompt_lengths: Any = None,
                         src_tokens: Any = None, eos_id: int = EOS_ID, start_id: int = BOS_ID) -> jax.Array:
  """The baseline the KV cache beats: a full forward pass over the whole [B, P + N] buffer for every new token
  (and the encoder again each step for encoder_decoder). Same output as `greedy`."""
  graphdef, state = nnx.split(model)
  prompt, lengths, src, prefill_len = _prepare(prompt, prompt_lengths, src_tokens, start_id=start_id)
  return _greedy_without_cache(graphdef, state, prompt, lengths, src, max_new=max_new_tokens,
                               prefill_len=prefill_len, eos_id=eos_id)


def decode(model: nnx.Module, settings: DecodeSettings, prompt: Any = None, *, prompt_lengths: Any = None,
           src_tokens: Any = None, rng: jax.Array | None = None, model_max_len: int | None = None,
           batch_sharding: jax.sharding.Sharding | None = None, prefill_len: int | None = None,
           stop_tokens: Any = None) -> np.ndarray:
  """Decodes with settings.method -> new tokens [B, N] as numpy: one sequence per row (the best beam for beam
  search, the first sample; decode_sequences gives settings.num_return_sequences).

  prompt: [B, P] right-padded (decoder_only; encoder_decoder defaults to BOS). src_tokens: [B, S] for
  encoder_decoder. model_max_len (default: model.config.max_len less the decoder's prefix-tuning slots) caps
  P + N: learned positions and the cache end there, so settings.max_len is lowered to fit. batch_sharding: where to
  put the batch (e.g. NamedSharding(mesh, P(('data', 'fsdp')))); rows are padded up to a multiple of its devices
  and cut off again, so decoding runs on the training mesh with sharded parameters. prefill_len: prompt tokens
  prefilled in one pass (a compile-time shape; default and most: the shortest prompt's length); a caller that
  decodes many batches rounds it down to a few values, so a few programs serve them all. stop_tokens:
  stop_token_patterns' array, or None.
  """
  one = dataclasses.replace(settings, num_return_sequences=1)
  return decode_sequences(model, one, prompt, prompt_lengths=prompt_lengths, src_tokens=src_tokens, rng=rng,
                          model_max_len=model_max_len, batch_sharding=batch_sharding, prefill_len=prefill_len,
                          stop_tokens=stop_tokens)[:, 0]


def decode_sequences(model: nnx.Module, settings: DecodeSettings, prompt: Any = None, *, prompt_lengths: Any = None,
                     src_tokens: Any = None, rng: jax.Array | None = None, model_max_len: int | None = None,
                     batch_sharding: jax.sharding.Sharding | None = None, prefill_len: int | None = None,
                     stop_tokens: Any = None) -> np.ndarray:
  """Like decode -> new tokens [B, R, N], R = settings.num_return_sequences: for sampling R independent samples of
  each row (the row repeated R times in one batch), for beam search the R best beams, best first."""
  prompt_np = None if prompt is None else np.asarray(prompt, np.int32)
  src_np = None if src_tokens is None else np.asarray(src_tokens, np.int32)
  batch = (prompt_np if prompt_np is not None else src_np).shape[0]
  if prompt_np is None:
    prompt_np = np.full((batch, 1), settings.start_id, np.int32)
  lengths_np = (np.full((batch,), prompt_np.shape[1], np.int32) if prompt_lengths is None
                else np.asarray(prompt_lengths, np.int32))
  returned = int(settings.num_return_sequences)
  repeats = returned if settings.method == 'sample' else 1
  if repeats > 1:  # R samples of a row: R rows (each row's draws are independent)
    prompt_np, lengths_np = np.repeat(prompt_np, repeats, axis=0), np.repeat(lengths_np, repeats, axis=0)
    src_np = None if src_np is None else np.repeat(src_np, repeats, axis=0)
  rows = batch * repeats
  if model_max_len is None:  # jaxformer models carry their ModelConfig; a prefix (peft) takes its first positions
    model_max_len = getattr(getattr(model, 'config', None), 'max_len', None)
    if model_max_len is not None:
      model_max_len -= getattr(getattr(model, 'decoder', None), 'prefix_length', 0)
  if model_max_len is not None and prompt_np.shape[1] + settings.max_len > model_max_len:
    new = model_max_len - prompt_np.shape[1]
    if new < 1:
      raise ValueError(f'the prompt ({prompt_np.shape[1]} tokens) leaves no room below model.max_len='
                       f'{model_max_len}; shorten the prompt.')
    settings = dataclasses.replace(settings, max_len=new)

  if batch_sharding is not None:
    shards = _batch_shards(batch_sharding)
    padded = -(-rows // shards) * shards
    if padded != rows:  # dummy rows: a BOS prompt (and an empty source), thrown away afterwards
      extra = padded - rows
      prompt_np = np.concatenate([prompt_np, np.full((extra, prompt_np.shape[1]), 0, np.int32)])
      prompt_np[rows:, 0] = settings.start_id
      lengths_np = np.concatenate([lengths_np, np.ones((extra,), np.int32)])
      if src_np is not None:
        src_np = np.concatenate([src_np, np.zeros((extra, src_np.shape[1]), np.int32)])
        src_np[rows:, 0] = EOS_ID
    put = lambda x: jax.device_put(x, batch_sharding)  # noqa: E731
    prompt_in, src_in = put(prompt_np), None if src_np is None else put(src_np)
    lengths_in = put(lengths_np)
  else:
    prompt_in, src_in, lengths_in = prompt_np, src_np, lengths_np
  # lengths_np stays on the host for the prefill length; the device copy is what goes into the jit.
  shortest = int(lengths_np.min())
  prefill_len = shortest if prefill_len is None else max(1, min(int(prefill_len), shortest))
  tokens = METHODS[settings.method](model, prompt_in, rng, settings=settings, prompt_lengths=lengths_in,
                                    src_tokens=src_in, prefill_len=prefill_len, stop_tokens=stop_tokens)
  if not tokens.is_fully_addressable:  # multi-host: every host gets the whole batch back
    tokens = multihost_utils.process_allgather(tokens, tiled=True)
  tokens = np.asarray(jax.device_get(tokens))[:rows]
  if tokens.ndim == 2:  # one sequence per row: [B * R, N] -> [B, R, N]
    return tokens.reshape(batch, repeats, tokens.shape[-1])
  return tokens[:, :returned]


def cut_at_eos(ids: Sequence[int], eos_id: int) -> list[int]:
  """The tokens before the first eos_id (decoding fills 0 after EOS, a real token for e.g. GPT-2)."""
  ids = [int(i) for i in ids]
  return ids[:ids.index(eos_id)] if eos_id in ids else ids


def decode_batches(model: nnx.Module, settings: DecodeSettings, *, prompts: Sequence[Sequence[int]] | None = None,
                   sources: Sequence[Sequence[int]] | None = None, source_width: int = 0,
                   rng: jax.Array | None = None, batch_size: int = 32, model_max_len: int | None = None,
                   batch_sharding: jax.sharding.Sharding | None = None,
                   stop_tokens: Any = None) -> list[list[list[int]]]:
  """Token lists in (decoder_only prompts, BOS included, or encoder_decoder sources), per input
  settings.num_return_sequences token lists out, each cut before its first EOS. Batches of batch_size inputs; the
  key of the batch starting at input i is fold_in(rng, i); sources are right-padded to at least source_width.
  Call inside the mesh's context when batch_sharding is given."""
  rng = jax.random.key(0) if rng is None else rng
  n = len(prompts if prompts is not None else sources)
  bs = max(1, int(batch_size))
  out: list[list[list[int]]] = []
  for start in range(0, n, bs):
    prompt = lengths = src = None
    if prompts is not None:
      prompt, lengths = pad_prompts(prompts[start:start + bs])
    if sources is not None:
      chunk = sources[start:start + bs]
      src = np.zeros((len(chunk), max([source_width] + [len(ids) for ids in chunk])), np.int32)
      for row, ids in enumerate(chunk):
        src[row, :len(ids)] = ids
    seqs = decode_sequences(model, settings, prompt, prompt_lengths=lengths, src_tokens=src,
                            rng=jax.random.fold_in(rng, start), model_max_len=model_max_len,
                            batch_sharding=batch_sharding, stop_tokens=stop_tokens)
    out.extend([cut_at_eos(seq, settings.eos_id) for seq in row] for row in seqs)
  return out


def generate_texts(model: nnx.Module, tokenizer: Any, prompts: Sequence[Sequence[int]], settings: DecodeSettings, *,
                   stop: Sequence[str] | None = None, rng: jax.Array | None = None, batch_size: int = 32,
                   model_max_len: int | None = None,
                   batch_sharding: jax.sharding.Sharding | None = None) -> list[list[str]]:
  """decoder_only prompts (token lists, BOS included) -> per prompt settings.num_return_sequences completions as
  text: cut at EOS, decoded by `tokenizer` (encode / decode), then cut before the first stop string. stop: the
  stop strings of this call (None: settings.stop's); their token sequences also end rows early. Batches as
  decode_batches. settings.max_len is the budget of new tokens (dataclasses.replace it per call). This is the call
  a harness needs: prompts, stop strings and a token budget in, texts out."""
  stop = settings.stop_strings if stop is None else tuple(s for s in stop if s)
  seqs = decode_batches(model, settings, prompts=prompts, rng=rng, batch_size=batch_size, model_max_len=model_max_len,
                        batch_sharding=batch_sharding,
                        stop_tokens=stop_token_patterns(tokenizer, stop) if stop else None)
  return [[cut_at_stop(tokenizer.decode(seq), stop) for seq in row] for row in seqs]


def _batch_shards(sharding: jax.sharding.Sharding) -> int:
  """How many pieces the leading (batch) axis is cut into."""
  if isinstance(sharding, jax.sharding.NamedSharding) and len(sharding.spec) > 0 and sharding.spec[0] is not None:
    axes = sharding.spec[0] if isinstance(sharding.spec[0], tuple) else (sharding.spec[0],)
    return int(np.prod([sharding.mesh.shape[a] for a in axes]))
  return 1


def _beams(model: nnx.Module, prompt: Any, rng: jax.Array | None, **kwargs: Any) -> jax.Array:
  return beam_search(model, prompt, **kwargs)[0]


def _sampled(model: nnx.Module, prompt: Any, rng: jax.Array | None, **kwargs: Any) -> jax.Array:
  return sample(model, prompt, rng, **kwargs)


# decode.method -> (model, prompt, rng, *, settings, prompt_lengths, src_tokens, prefill_len, stop_tokens) -> new
# tokens [B, N] (one per row) or [B, K, N] (K per row, best first).
METHODS: dict[str, Any] = {'greedy': _sampled, 'beam': _beams, 'sample': _sampled}
