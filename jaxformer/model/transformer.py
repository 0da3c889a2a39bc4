"""The three Transformer families, composed from one Block and one Stack.

  EncoderOnly    = Embed -> Stack(bidirectional) -> masked-LM head -> logits
  DecoderOnly    = Embed -> Stack(causal) -> logits
  EncoderDecoder = Embed -> Stack(bidirectional) ==encoded==> Stack(causal, cross-attention) -> logits

A head with an output module of its own (jaxformer/heads, e.g. model.head=classification) replaces the per-token
output of EncoderOnly / DecoderOnly (classification: a classifier over the pooled hidden states, [B, num_classes]).

Masks are built once per call from segment ids (0 = padding; equal non-zero ids may attend, which also keeps
packed documents apart) and shared by every layer (where model.attention_impl=chunked runs they stay segment ids, a
SegmentMask, and the kernel builds each block's piece). Without segment ids, a token is padding iff it equals
model.pad_id (-1: no token is padding, as GPT-2 / Llama, whose id 0 is a real token); the first decoder token of
encoder_decoder is always real, because T5 starts the decoder with its pad id. Decoding is pure:
`decode_step(tokens, cache)` returns new logits and a new cache; the module itself is never mutated.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer import logical
from jaxformer import heads
from jaxformer.model import layers, moe, positions as positions_lib, scan
from jaxformer.model.attention import Attention, SegmentMask, segment_mask, wants_segment_mask, with_window
from jaxformer.model.remat import REMATS  # model.remat's registry (remat.py), validated as transformer.REMATS

if TYPE_CHECKING:  # annotations only: jaxformer.model.config imports this module for its registries
  from jaxformer.model.config import ModelConfig

Array = jax.Array

# What `model(..., return_intermediates=True)` returns beside its output: per stack ('encoder', 'decoder'), each
# layer's attention probabilities and output, stacked along a leading layers axis (scanned or not):
#   'self_attention'   float32 [L, B, heads, T, T]   sums to 1 over keys; 0 on masked keys (causal, padding) and on
#                                                    every key of a padding query
#   'cross_attention'  float32 [L, B, heads, T, S]   encoder_decoder's decoder only (keys: the encoder positions)
#   'hidden'           [L, B, T, D]                  each block's output (the residual stream; before a pre-LN
#                                                    stack's final norm)
#   'router_logits'    float32 [L_moe, B, T, E]      a MoE model's router logits, one row per MoE block (moe.py;
#                                                    transformers' output_router_logits)
# Why a flag on __call__ (as transformers' output_attentions) rather than nnx's sow or a second method: it is one
# static Python bool, so the default call traces exactly the program it traced before (no extra outputs or work), and
# a request threads explicit return values through Block / Stack / the scan, with no module state to reset.
Intermediates = dict[str, dict[str, Array]]


# ---------------------------------------------------------------------------------------------- masks
def attention_mask(q_segments: Array, kv_segments: Array, *, causal: bool,
                   lazy: bool = False) -> Array | SegmentMask:
  """bool [B,1,T,S]: query t may attend key s iff their segment ids are equal and non-zero (and s <= t).
  lazy: the same mask as a SegmentMask (the segment ids), which model.attention_impl=chunked builds block by block."""
  if lazy:
    return SegmentMask(q_segments, kv_segments, causal)
  return segment_mask(q_segments, kv_segments, causal=causal)[:, None]


def ring_mask(index: Array, valid: Array, real: Array, ring: int, window: int) -> Array:
  """bool [B,1,T,R+T]: decoding T new tokens (key slots index .. index+T-1) in a sliding-window layer, which of
  [its R ring slots, the T new keys] each new query attends: real keys s <= t with t - s < window.

  Ring slot j holds the newest slot p < index with p = j mod R (none yet where that is negative); valid [B,L]
  (already holding the new tokens) says which slots hold real tokens, real [B,T] which new tokens are."""
  t = real.shape[1]
  slots = index[:, None] + jnp.arange(t, dtype=jnp.int32)  # [B,T]
  held = index[:, None] - 1 - (index[:, None] - 1 - jnp.arange(ring, dtype=jnp.int32)) % ring  # [B,R]
  held_real = (held >= 0) & jnp.take_along_axis(valid, jnp.maximum(held, 0), axis=1)
  k_slots = jnp.concatenate([held, slots], axis=1)
  k_real = jnp.concatenate([held_real, real], axis=1)
  distance = slots[:, :, None] - k_slots[:, None, :]
  return (k_real[:, None, :] & (distance >= 0) & (distance < window) & real[:, :, None])[:, None]


def real_tokens(tokens: Array, pad_id: int) -> Array:
  """bool, True where a token is not padding (pad_id -1: every token is real)."""
  return jnp.ones(tokens.shape, bool) if pad_id < 0 else tokens != pad_id


def _defaults(tokens: Array, segment_ids: Array | None, positions: Array | None, pad_id: int, *,
              start_is_real: bool = False) -> tuple[Array, Array]:
  """Default segment ids (1 = real, 0 = padding) and positions (0, 1, ...) of an unpacked batch.
  start_is_real: column 0 is real even if it is the pad id (T5's decoder start token)."""
  if segment_ids is None:
    real = real_tokens(tokens, pad_id)
    if start_is_real:
      real = real.at[:, 0].set(True)
    segment_ids = real.astype(jnp.int32)
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
  return segment_ids, positions


# ---------------------------------------------------------------------------------------------- block
# model.norm_position: norm on each sublayer's input, or after its residual sum, or (sandwich, Gemma 2) on both the
# sublayer's input and its output before the residual sum
NORM_POSITIONS = ('pre', 'post', 'sandwich')


class Block(nnx.Module):
  """Self-attention [+ cross-attention] + MLP, each a residual sublayer; pre-LN, post-LN or sandwich."""

  def __init__(self, cfg: ModelConfig, *, cross: bool, out_std: float, rngs: nnx.Rngs, routed: bool = False):
    """routed: the MLP is a mixture of experts (moe.MoE; moe.is_moe_layer says which blocks)."""
    norm = layers.NORMS[cfg.norm]
    self.pre_norm = cfg.norm_position in ('pre', 'sandwich')
    self.attn_norm, self.attn = norm(cfg, rngs=rngs), Attention(cfg, out_std=out_std, rngs=rngs)
    self.cross_norm = norm(cfg, rngs=rngs) if cross else None
    self.cross_attn = Attention(cfg, out_std=out_std, rngs=rngs) if cross else None
    self.mlp_norm = norm(cfg, rngs=rngs)
    self.mlp = (moe.MoE if routed else layers.MLP)(cfg, out_std=out_std, rngs=rngs)
    self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs)
    if cfg.norm_position == 'sandwich':  # a norm on each sublayer's output too (Gemma 2's post_*_layernorm)
      self.attn_post_norm, self.mlp_post_norm = norm(cfg, rngs=rngs), norm(cfg, rngs=rngs)
      self.cross_post_norm = norm(cfg, rngs=rngs) if cross else None

  def _in(self, norm, x: Array) -> Array:
    return norm(x) if self.pre_norm else x

  def _out(self, norm, x: Array, y: Array, deterministic: bool, post_norm=None) -> Array:
    """The residual connection: pre-LN x + y; post-LN norm(x + y); sandwich x + post_norm(y) (dropout on y)."""
    if post_norm is not None:
      y = post_norm(y)
    x = x + self.dropout(y, deterministic=deterministic)
    return x if self.pre_norm else norm(x)

  def _post(self, name: str):
    """The sublayer's output norm under norm_position=sandwich, else None."""
    return getattr(self, f'{name}_post_norm', None)

  def __call__(self, x: Array, mask: Array, *, rope=None, bias: Array | None = None, causal: bool = False,
               encoded: Array | None = None,
               cross_kv: tuple[Array, Array] | None = None, cross_mask: Array | None = None,
               cache: dict | None = None, cache_index: Array | None = None, window: Any = 0,
               deterministic: bool = True, prefix_kv: tuple[Array, Array] | None = None,
               return_intermediates: bool = False) -> tuple[Array, dict | None] | tuple[Array, dict | None, dict]:
    """x [B,T,D] -> (x, updated self-attention cache or None). prefix_kv: this layer's prefix-tuning keys/values
    [P,K,H] (self-attention only; Attention's `prefix`). Cross-attention reads `cross_kv` when given
    (decoding), else projects `encoded`. window: this layer's sliding window (model.sliding_window; 0 = none; a
    traced int32 in a scanned stack, <= 0 = none): without a cache it narrows `mask`; with one (a Python int) the
    cache is the layer's ring buffer and `mask` already covers [ring, new keys] (Stack). return_intermediates: a
    third element {'self_attention' [B,N,T,T] (+ 'cross_attention' [B,N,T,S])}, the attention probabilities
    (Attention's return_weights)."""
    if cache is None and not (isinstance(window, int) and window == 0):
      mask = with_window(mask, window)
    weights = {}  # return_intermediates: the probabilities each attention returns as its third element
    out = self.attn(self._in(self.attn_norm, x), mask, rope=rope, bias=bias, cache=cache, cache_index=cache_index,
                    causal=causal, window=window if cache is not None else 0, deterministic=deterministic,
                    prefix=prefix_kv, return_weights=return_intermediates)
    y, cache = out[0], out[1]
    if return_intermediates:
      weights['self_attention'] = out[2]
    x = self._out(self.attn_norm, x, y, deterministic, self._post('attn'))
    if self.cross_attn is not None:
      kv = cross_kv if cross_kv is not None else self.cross_attn.kv(encoded)
      out = self.cross_attn(self._in(self.cross_norm, x), cross_mask, kv=kv, deterministic=deterministic,
                            return_weights=return_intermediates)
      if return_intermediates:
        weights['cross_attention'] = out[2]
      x = self._out(self.cross_norm, x, out[0], deterministic, self._post('cross'))
    if return_intermediates and isinstance(self.mlp, moe.MoE):
      y, weights['router_logits'] = self.mlp(self._in(self.mlp_norm, x), return_router_logits=True)
    else:
      y = self.mlp(self._in(self.mlp_norm, x))
    x = self._out(self.mlp_norm, x, y, deterministic, self._post('mlp'))
    if return_intermediates:
      return x, cache, weights
    return x, cache


def _block_forward(block: Block, x, mask, rope, bias, encoded, cross_mask, causal: bool, deterministic: bool,
                   window: int, prefix_kv=None):
  return block(x, mask, rope=rope, bias=bias, causal=causal, encoded=encoded, cross_mask=cross_mask,
               window=window, deterministic=deterministic, prefix_kv=prefix_kv)[0]


class Stack(nnx.Module):
  """Positions [+ embedding norm] + `num_layers` blocks (+ final norm for pre-LN). The encoder, and both kinds of
  decoder. The embedding norm (model.embed_norm, BERT) normalises token + type + position embeddings."""

  def __init__(self, cfg: ModelConfig, num_layers: int, *, causal: bool, cross: bool, rngs: nnx.Rngs):
    self.causal, self.remat = causal, cfg.remat
    # each layer's sliding window (0 = global); static, so an unwindowed model builds the program it always did
    self.windows = cfg.layer_windows(num_layers) if causal and not cross else (0,) * num_layers
    self.positions = positions_lib.POSITIONS[cfg.position](cfg, rngs=rngs)
    self.embed_norm = layers.NORMS[cfg.norm](cfg, rngs=rngs) if cfg.embed_norm else None
    self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs)
    # GPT-2 init: each residual branch's output projection gets std / sqrt(number of residual sublayers).
    out_std = cfg.init_std / math.sqrt(num_layers * (3 if cross else 2))
    make_block = lambda rngs, i=0: Block(cfg, cross=cross, out_std=out_std, rngs=rngs,
                                         routed=moe.is_moe_layer(cfg, i))
    if cfg.scan_layers:  # one block body, variables stacked along 'layers' (scan.py); MoE needs moe_every=1 here
      self.blocks = scan.ScannedBlocks(make_block, num_layers, rngs=rngs)
    else:
      self.blocks = nnx.List([make_block(rngs, i) for i in range(num_layers)])
    self.final_norm = layers.NORMS[cfg.norm](cfg, rngs=rngs) if cfg.norm_position != 'post' else None

  def __call__(self, x: Array, positions: Array, mask: Array, *, encoded: Array | None = None,
               cross_mask: Array | None = None, cross_kv: tuple | None = None, cache: tuple | None = None,
               cache_index: Array | None = None, deterministic: bool = True, keep_prompt: bool = False,
               ring_mask: Array | None = None,
               return_intermediates: bool = False) -> tuple[Array, tuple | None] | tuple[Array, tuple | None, dict]:
    """x: token embeddings [B,T,D] -> hidden states [B,T,D] (and the updated per-layer caches). ring_mask:
    decoding with sliding-window layers, their mask over [ring slots, new keys] (ring_mask()).

    A soft prompt (peft.method=prompt) is prepended without a cache and its outputs dropped unless keep_prompt
    (the encoder of encoder_decoder: [B, n+T, D]); with a cache it already sits in the first slots (prefill_prompt).
    A prefix (peft.method=prefix) of P key/value slots goes in front of every layer's self-attention keys, cache or
    not; the tokens' positions then start at P (peft/prefix.py).
    return_intermediates: a third element, every layer's Block intermediates plus 'hidden' (the block's output, the
    residual stream before any final norm), each stacked along a leading layers axis in both layouts:
    'self_attention' [L,B,N,T,T], 'cross_attention' [L,B,N,T,S], 'hidden' [L,B,T,D] (a soft prompt's positions
    included). No rematerialisation then: it is an inspection, not a training step."""
    prompt = getattr(self, 'prompt', None)  # prompt tuning (jaxformer/peft/prompt.py) attaches one
    prepended = prompt is not None and cache is None
    if prepended:
      x, positions, mask = prompt.prepend(x, positions, mask, causal=self.causal)
    n_prefix = self.prefix_length  # prefix tuning (peft/prefix.py): the tokens' positions start after its P slots
    if n_prefix:
      positions = positions + n_prefix
    x = self.positions.add(x, positions)
    if self.embed_norm is not None:
      x = self.embed_norm(x)
    x = logical.constrain(self.dropout(x, deterministic=deterministic), logical.HIDDEN)
    rope = self.positions.rotary(positions)
    # relative position bias [B,N,T,S]: once per stack, shared by every layer. With a cache, key slot s holds the
    # position the token there was written with (cache_positions).
    k_positions = positions if cache is None else self.cache_positions(self._cache_len(cache))[None] + n_prefix
    prefix_kv = None
    if n_prefix:  # the prefix's keys sit at positions 0..P-1 (T5's relative bias sees them there)
      k_positions = jnp.concatenate([jnp.broadcast_to(jnp.arange(n_prefix, dtype=k_positions.dtype),
                                                      (k_positions.shape[0], n_prefix)), k_positions], 1)
      prefix_kv = self.prefix.keys_values()  # [layers, P, K, H] each, computed once per call
    bias = self.positions.bias(positions, k_positions, bidirectional=not self.causal)
    strip = prompt if prepended and not keep_prompt else None
    if self.scanned:
      windowed = {} if not any(self.windows) else {'windows': self.windows, 'ring_mask': ring_mask}
      out = self.blocks(x, mask=mask, rope=rope, bias=bias, causal=self.causal, encoded=encoded,
                        cross_kv=cross_kv, cross_mask=cross_mask, cache=cache, cache_index=cache_index,
                        deterministic=deterministic, remat='none' if return_intermediates else self.remat,
                        prefix_kv=prefix_kv, return_intermediates=return_intermediates, **windowed)
      return (self._finish(out[0], strip),) + tuple(out[1:])
    new_cache, per_layer = [], []
    remat = REMATS[self.remat] if cache is None and not return_intermediates else None
    for i, block in enumerate(self.blocks):
      window = self.windows[i]
      layer_prefix = None if prefix_kv is None else (prefix_kv[0][i], prefix_kv[1][i])
      if remat is not None:
        x = nnx.remat(_block_forward, static_argnums=(7, 8, 9), policy=remat.policy)(
            block, x, mask, rope, bias, encoded, cross_mask, self.causal, deterministic, window, layer_prefix)
        x = logical.constrain(x, logical.HIDDEN)
        continue
      out = block(x, ring_mask if window and cache is not None else mask, rope=rope, bias=bias, causal=self.causal,
                  encoded=encoded, cross_kv=None if cross_kv is None else cross_kv[i], cross_mask=cross_mask,
                  cache=None if cache is None else cache[i], cache_index=cache_index, window=window,
                  deterministic=deterministic, prefix_kv=layer_prefix, return_intermediates=return_intermediates)
      x = logical.constrain(out[0], logical.HIDDEN)
      new_cache.append(out[1])
      if return_intermediates:
        per_layer.append({**out[2], 'hidden': x})
    new_cache = tuple(new_cache) if cache is not None else None
    if return_intermediates:  # one [L, ...] array per name, as the scanned stack gives them
      routers = [layer.pop('router_logits') for layer in per_layer if 'router_logits' in layer]  # MoE blocks only
      stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)
      return self._finish(x, strip), new_cache, {**stacked, **({'router_logits': jnp.stack(routers)} if routers
                                                                 else {})}
    return self._finish(x, strip), new_cache

  def _finish(self, x: Array, strip: Any) -> Array:
    """The final norm (pre-LN), then the soft prompt's positions dropped when `strip` is the prompt."""
    if self.final_norm is not None:
      x = self.final_norm(x)
    return x if strip is None else strip.strip(x)

  @property
  def prefix_length(self) -> int:
    """Prefix-tuning key/value slots in front of every self-attention layer's keys (0 without prefix tuning)."""
    prefix = getattr(self, 'prefix', None)
    return 0 if prefix is None else prefix.length

  @property
  def prompt_length(self) -> int:
    """Soft prompt tokens in front of this stack's input (0 without prompt tuning)."""
    prompt = getattr(self, 'prompt', None)
    return 0 if prompt is None else prompt.length

  def cache_positions(self, cache_len: int) -> Array:
    """The position of each KV-cache slot [cache_len]: slot s holds position s, or with a soft prompt in the first
    n slots, the prompt's 0..n-1 and then the tokens' 0, 1, ... again (as prompt.prepend numbers them)."""
    slots = jnp.arange(cache_len, dtype=jnp.int32)
    n = self.prompt_length
    return slots if n == 0 else jnp.where(slots < n, slots, slots - n)

  def prefill_prompt(self, cache: Any, batch_size: int, dtype: Any) -> Any:
    """Writes the soft prompt's keys/values into the first n slots of an empty self-attention cache. The prompt
    attends only to itself, so this is the same for every row and every input."""
    prompt, n = self.prompt, self.prompt_length
    slots = jnp.arange(self._cache_len(cache))
    mask = (slots[None, :] < n) & (slots[None, :] <= jnp.arange(n)[:, None] if self.causal else True)
    _, cache = self(prompt.embeddings(batch_size, dtype), prompt.positions(batch_size), mask[None, None],
                    cache=cache, cache_index=jnp.zeros((batch_size,), jnp.int32))
    return cache

  @property
  def scanned(self) -> bool:
    return isinstance(self.blocks, scan.ScannedBlocks)

  def _cache_len(self, cache: Any) -> int:
    """Slots of the whole cache (a global layer's; with every layer windowed, its ring's, which no caller then
    reads: relative positions and soft prompts, its readers, refuse model.sliding_window)."""
    if self.scanned:
      return cache['k' if 'k' in cache else 'ring_k'].shape[scan.CACHE_LAYER_AXIS + 1]
    return max(layer['k'].shape[1] for layer in cache)

  def ring_size(self, cache_len: int) -> int:
    """Slots of a sliding-window layer's ring buffer: its window, or the whole cache when that is shorter."""
    return min(max(self.windows), cache_len)

  def empty_cache(self, shape: tuple[int, ...], dtype: Any) -> Any:
    """Zero self-attention keys/values [B,S,K,H] per layer: a tuple of {'k','v'}, or stacked [B,L,S,K,H].
    Sliding-window layers get [B,R,K,H] ring buffers (ring_size; scanned: stacked 'ring_k' / 'ring_v'
    [B,windowed layers,R,K,H] beside the global layers' 'k' / 'v')."""
    if self.scanned:
      return self.blocks.empty_cache(shape, dtype, self.windows, self.ring_size(shape[1]) if any(self.windows) else 0)
    ring = (shape[0], self.ring_size(shape[1]) if any(self.windows) else 0, *shape[2:])
    return tuple({'k': jnp.zeros(ring if w else shape, dtype), 'v': jnp.zeros(ring if w else shape, dtype)}
                 for w in self.windows)

  def cross_cache(self, encoded: Array) -> Any:
    """Every layer's cross-attention keys/values of `encoded`: a tuple of {'k','v'}, or stacked [B,L,S,K,H]."""
    if self.scanned:
      k, v = self.blocks.stacked(lambda block: block.cross_attn.kv(encoded))
      return {'k': k, 'v': v}
    return tuple(dict(zip(('k', 'v'), block.cross_attn.kv(encoded))) for block in self.blocks)


# ----------------------------------------------------------------------------------------------- heads
class MaskedLMHead(nnx.Module):
  """BERT's transform before the (tied) output projection: dense -> activation -> norm.

  The activation is the MLP's; a gated MLP's gate activation is no transform activation, so those use gelu."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    pdt, self.dtype = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
    kind = layers.MLPS[cfg.mlp]
    self.activation = layers.MLPS['gelu'].activation if kind.gated else kind.activation
    self.kernel = layers.param(rngs, layers.normal(cfg.init_std), (cfg.d_model, cfg.d_model), (None, 'embed'), pdt)
    self.bias = layers.param(rngs, layers.zeros, (cfg.d_model,), ('embed',), pdt) if cfg.use_bias else None
    self.norm = layers.NORMS[cfg.norm](cfg, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    h = layers.matmul(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
    if self.bias is not None:
      h = h + self.bias[...].astype(self.dtype)
    return self.norm(self.activation(h))


# ---------------------------------------------------------------------------------------------- models
class _Model(nnx.Module):
  """What the three families share: config, token (+ token-type) embedding, output projection, decoding
  bookkeeping."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    pdt = jnp.dtype(cfg.param_dtype)
    self.embed = layers.Embed(cfg, rngs=rngs)
    self.token_type_embedding = (  # BERT's segment A/B embedding [type_vocab_size, D], added to every token
        layers.param(rngs, layers.normal(cfg.init_std), (cfg.type_vocab_size, cfg.d_model), (None, 'embed'), pdt)
        if cfg.type_vocab_size else None)
    output = heads.head_of(cfg).module  # a head's own output module replaces the per-token LM output
    lm = output is None
    self.unembed = None if cfg.tie_embeddings or not lm else layers.Unembed(cfg, rngs=rngs)
    self.output_bias = (layers.param(rngs, layers.zeros, (cfg.vocab_size,), ('vocab',), pdt)
                        if cfg.output_bias and lm else None)
    self.classifier = None if lm else output(cfg, rngs=rngs)

  def _mask(self, stack: Stack, q_segments: Array, kv_segments: Array, *, causal: bool) -> Array | SegmentMask:
    """attention_mask, lazy (a SegmentMask) where the chunked kernel will read it, so no [T, S] mask is built;
    dense under a soft prompt, whose bookkeeping (prompt.prepend / cross_mask) edits the mask."""
    lazy = wants_segment_mask(self.config.attention_impl, q_segments.shape[1] + stack.prompt_length,
                              kv_segments.shape[1] + stack.prompt_length) and not (stack.prompt_length or
                                                                                   stack.prefix_length)
    return attention_mask(q_segments, kv_segments, causal=causal, lazy=lazy)

  def embed_tokens(self, tokens: Array, token_type_ids: Array | None = None) -> Array:
    """Token embeddings [B,T,D] (times sqrt(d_model) with model.embed_scale, the factor rounded to the compute
    dtype as Gemma's normalizer is), plus the token-type embedding (type 0 where token_type_ids is None)."""
    x = self.embed(tokens)
    if self.config.embed_scale:
      x = x * jnp.asarray(self.config.d_model ** 0.5, x.dtype)
    if self.token_type_embedding is None:
      return x
    table = self.token_type_embedding[...]
    types = jnp.take(table, token_type_ids, axis=0) if token_type_ids is not None else table[0]
    return x + types.astype(x.dtype)

  def logits(self, h: Array) -> Array:
    """Hidden states -> float32 logits [B,T,V] (h scaled by model.output_scale first: T5 v1.0's d_model**-0.5;
    soft-capped last with model.logit_softcap: Gemma 2's final_logit_softcapping)."""
    if self.config.output_scale != 1.0:
      h = h * self.config.output_scale
    logits = self.embed.attend(h) if self.unembed is None else self.unembed(h)
    logits = logits if self.output_bias is None else logits + self.output_bias[...].astype(jnp.float32)
    if self.config.logit_softcap:
      logits = jnp.tanh(logits / self.config.logit_softcap) * self.config.logit_softcap
    return logical.constrain(logits, logical.LOGITS)

  def outputs(self, h: Array, segment_ids: Array, deterministic: bool) -> Array:
    """Final hidden states -> model.head's logits: per token [B,T,V] (lm; encoder_only through its masked-LM
    transform) or the head's own output (classification: per row [B, num_classes], pooled over the real tokens)."""
    if self.classifier is not None:
      return self.classifier(h, segment_ids, deterministic=deterministic)
    lm_head = getattr(self, 'head', None)
    return self.logits(h if lm_head is None else lm_head(h))

  def _empty_cache(self, stack: Stack, batch_size: int, max_len: int) -> dict[str, Any]:
    """max_len tokens' slots, after the soft prompt's n slots (prefilled) when the stack has one."""
    cfg = self.config
    if not heads.head_of(cfg).decodes:
      raise ValueError(f'a model.head={cfg.head} model does not decode; it scores whole rows (eval.py --mode=score).')
    if max_len + stack.prefix_length > cfg.max_len:  # prefix tuning: the tokens' positions start at P
      raise ValueError(f'init_cache max_len={max_len} (+ {stack.prefix_length} prefix positions) exceeds '
                       f'model.max_len={cfg.max_len}; raise model.max_len or decode fewer tokens.')
    n = stack.prompt_length
    shape = (batch_size, n + max_len, cfg.num_kv_heads, cfg.head_dim)
    cache = {'index': jnp.zeros((batch_size,), jnp.int32), 'valid': jnp.zeros((batch_size, n + max_len), bool),
             'self': stack.empty_cache(shape, jnp.dtype(cfg.dtype))}
    if n:
      cache = {'index': jnp.full((batch_size,), n, jnp.int32), 'valid': cache['valid'].at[:, :n].set(True),
               'self': stack.prefill_prompt(cache['self'], batch_size, jnp.dtype(cfg.dtype))}
    return cache

  def _decode(self, stack: Stack, tokens: Array, cache: dict[str, Any], valid: Array | None, *,
              start_is_real: bool = False, cross_kv: tuple | None = None) -> tuple[Array, dict[str, Any]]:
    """Runs T new tokens through `stack` against the cache, written from key slot cache['index'] on; positions
    continue from the slot (less the soft prompt's n slots in front, whose tokens count positions from 0 again).
    valid [B,T]: which tokens are real; None = those that are not model.pad_id (and, with start_is_real, the token
    at position 0). cross_kv: per-layer encoder keys/values (their padding is cache['src_valid'])."""
    index = cache['index']
    t, max_len = tokens.shape[1], cache['valid'].shape[1]
    slots = index[:, None] + jnp.arange(t, dtype=jnp.int32)  # [B,T]
    positions = slots - stack.prompt_length
    if valid is None:
      real = real_tokens(tokens, self.config.pad_id)
      real = real | (positions == 0) if start_is_real else real
    else:
      real = jnp.asarray(valid, bool)
    cross = {}
    if cross_kv is not None:
      cross = {'cross_kv': cross_kv, 'cross_mask': (real[:, :, None] & cache['src_valid'][:, None, :])[:, None]}
    write = jax.vmap(lambda c, u, i: jax.lax.dynamic_update_slice_in_dim(c, u, i, axis=0))
    valid = write(cache['valid'], real, index)
    mask = ((jnp.arange(max_len)[None, None, :] <= slots[:, :, None]) & valid[:, None, :]
            & real[:, :, None])[:, None]
    if any(stack.windows):
      cross['ring_mask'] = ring_mask(index, valid, real, stack.ring_size(max_len), max(stack.windows))
    h, new_self = stack(self.embed_tokens(tokens), positions, mask, cache=cache['self'], cache_index=index, **cross)
    return self.logits(h), {**cache, 'index': index + t, 'valid': valid, 'self': new_self}


class EncoderOnly(_Model):
  """Bidirectional encoder with a masked-LM head (BERT)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    super().__init__(cfg, rngs=rngs)
    self.encoder = Stack(cfg, cfg.num_layers, causal=False, cross=False, rngs=rngs)
    self.head = MaskedLMHead(cfg, rngs=rngs) if heads.head_of(cfg).module is None else None

  def __call__(self, tokens: Array, *, positions: Array | None = None, segment_ids: Array | None = None,
               token_type_ids: Array | None = None, deterministic: bool = True, return_hidden: bool = False,
               return_intermediates: bool = False) -> Array | tuple[Array, Array] | tuple[Array, Intermediates]:
    """-> the head's output; with return_hidden, (output, the final hidden states [B,T,D]) (e.g. sentence
    embeddings); with return_intermediates, (output, [h,] {'encoder': ...}) (see Intermediates)."""
    segment_ids, positions = _defaults(tokens, segment_ids, positions, self.config.pad_id)
    mask = self._mask(self.encoder, segment_ids, segment_ids, causal=False)
    h, _, *inter = self.encoder(self.embed_tokens(tokens, token_type_ids), positions, mask,
                                deterministic=deterministic, return_intermediates=return_intermediates)
    out = self.outputs(h, segment_ids, deterministic)
    result = (out,) + ((h,) if return_hidden else ()) + (({'encoder': inter[0]},) if return_intermediates else ())
    return result if len(result) > 1 else out

  def init_cache(self, *args, **kwargs):
    raise NotImplementedError('encoder_only models do not decode; use arch=decoder_only or encoder_decoder.')

  decode_step = init_cache


class DecoderOnly(_Model):
  """Causal language model (GPT)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    super().__init__(cfg, rngs=rngs)
    self.decoder = Stack(cfg, cfg.num_layers, causal=True, cross=False, rngs=rngs)

  def __call__(self, tokens: Array, *, positions: Array | None = None, segment_ids: Array | None = None,
               token_type_ids: Array | None = None, deterministic: bool = True, return_hidden: bool = False,
               return_intermediates: bool = False) -> Array | tuple[Array, Array] | tuple[Array, Intermediates]:
    """-> the head's output; with return_hidden, (output, the final hidden states [B,T,D]) (e.g. for a value
    head on top, align.method=ppo); with return_intermediates, (output, [h,] {'decoder': ...}) (see
    Intermediates)."""
    segment_ids, positions = _defaults(tokens, segment_ids, positions, self.config.pad_id)
    mask = self._mask(self.decoder, segment_ids, segment_ids, causal=True)
    h, _, *inter = self.decoder(self.embed_tokens(tokens, token_type_ids), positions, mask,
                                deterministic=deterministic, return_intermediates=return_intermediates)
    out = self.outputs(h, segment_ids, deterministic)
    result = (out,) + ((h,) if return_hidden else ()) + (({'decoder': inter[0]},) if return_intermediates else ())
    return result if len(result) > 1 else out

  def init_cache(self, batch_size: int, max_len: int, *, encoded: Array | None = None,
                 src_tokens: Array | None = None) -> dict[str, Any]:
    """{'index' [B] (the next key slot), 'valid' [B,L] (key slots holding a real token), 'self': per layer
    {'k','v'} [B,L,K,H]} (model.scan_layers: 'self' is one {'k','v'} [B,layers,L,K,H]; batch leads every leaf
    either way). With a soft prompt (peft.method=prompt) of n tokens, L = n + max_len and the first n slots hold
    the prompt."""
    return self._empty_cache(self.decoder, batch_size, max_len)

  def decode_step(self, tokens: Array, cache: dict[str, Any], *,
                  valid: Array | None = None) -> tuple[Array, dict[str, Any]]:
    """tokens [B,T] -> (logits [B,T,V], cache). valid [B,T] bool: real tokens (default: not model.pad_id)."""
    return self._decode(self.decoder, tokens, cache, valid)


class EncoderDecoder(_Model):
  """Encoder + decoder with cross-attention (Vaswani et al., T5); one token embedding shared by both sides."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    super().__init__(cfg, rngs=rngs)
    self.encoder = Stack(cfg, cfg.num_layers, causal=False, cross=False, rngs=rngs)
    self.decoder = Stack(cfg, cfg.num_decoder_layers, causal=True, cross=True, rngs=rngs)

  def encode(self, src_tokens: Array, *, src_positions: Array | None = None, src_segment_ids: Array | None = None,
             deterministic: bool = True) -> Array:
    """[B,S] source tokens -> encoder output [B,S,D] ([B, n+S, D] with a soft prompt of n tokens in front)."""
    return self._encode(src_tokens, src_positions, src_segment_ids, deterministic)[0]

  def _encode(self, src_tokens: Array, src_positions: Array | None, src_segment_ids: Array | None,
              deterministic: bool, return_intermediates: bool = False) -> tuple:
    """encode's body -> (encoded, None) or, with return_intermediates, (encoded, None, the encoder's)."""
    src_segment_ids, src_positions = _defaults(src_tokens, src_segment_ids, src_positions, self.config.pad_id)
    mask = self._mask(self.encoder, src_segment_ids, src_segment_ids, causal=False)
    return self.encoder(self.embed_tokens(src_tokens), src_positions, mask, deterministic=deterministic,
                        keep_prompt=True, return_intermediates=return_intermediates)

  def __call__(self, src_tokens: Array, tgt_tokens: Array, *, src_positions: Array | None = None,
               src_segment_ids: Array | None = None, tgt_positions: Array | None = None,
               tgt_segment_ids: Array | None = None, deterministic: bool = True,
               return_intermediates: bool = False) -> Array | tuple[Array, Intermediates]:
    """-> logits [B,T,V]; with return_intermediates, (logits, {'encoder': ..., 'decoder': ...}) (see
    Intermediates)."""
    pad_id = self.config.pad_id
    src_segment_ids, src_positions = _defaults(src_tokens, src_segment_ids, src_positions, pad_id)
    tgt_segment_ids, tgt_positions = _defaults(tgt_tokens, tgt_segment_ids, tgt_positions, pad_id,
                                               start_is_real=True)
    encoded, _, *encoder_inter = self._encode(src_tokens, src_positions, src_segment_ids, deterministic,
                                              return_intermediates)
    if self.encoder.prompt_length:  # the encoder output starts with the soft prompt's positions
      cross_mask = attention_mask(tgt_segment_ids, src_segment_ids, causal=False)
      cross_mask = self.encoder.prompt.cross_mask(cross_mask, tgt_segment_ids != 0)
    else:
      cross_mask = self._mask(self.decoder, tgt_segment_ids, src_segment_ids, causal=False)
    h, _, *decoder_inter = self.decoder(
        self.embed_tokens(tgt_tokens), tgt_positions,
        self._mask(self.decoder, tgt_segment_ids, tgt_segment_ids, causal=True), encoded=encoded,
        cross_mask=cross_mask, deterministic=deterministic, return_intermediates=return_intermediates)
    if return_intermediates:
      return self.logits(h), {'encoder': encoder_inter[0], 'decoder': decoder_inter[0]}
    return self.logits(h)

  def init_cache(self, batch_size: int, max_len: int, *, encoded: Array | None = None,
                 src_tokens: Array | None = None) -> dict[str, Any]:
    """Adds to the decoder-only cache 'cross': per layer {'k','v'} [B,S,K,H] (scan_layers: one {'k','v'}
    [B,layers,S,K,H]) and 'src_valid' [B,S] (S counts a soft prompt's positions: encode returns them)."""
    if src_tokens is None:
      raise ValueError('encoder_decoder init_cache needs src_tokens (for the source padding mask), and '
                       'optionally encoded = model.encode(src_tokens).')
    if encoded is None:
      encoded = self.encode(src_tokens)
    cache = self._empty_cache(self.decoder, batch_size, max_len)
    src_valid = real_tokens(src_tokens, self.config.pad_id)
    if self.encoder.prompt_length:  # encode() put the soft prompt's positions first
      src_valid = self.encoder.prompt.valid(src_valid)
    return {**cache, 'cross': self.decoder.cross_cache(encoded), 'src_valid': src_valid}

  def decode_step(self, tokens: Array, cache: dict[str, Any], *,
                  valid: Array | None = None) -> tuple[Array, dict[str, Any]]:
    """tokens [B,T] -> (logits [B,T,V], cache). valid [B,T] bool: real tokens (default: not model.pad_id, and
    position 0 always: T5's start token is its pad id)."""
    cross = cache['cross']
    cross_kv = (cross['k'], cross['v']) if self.decoder.scanned else tuple((c['k'], c['v']) for c in cross)
    return self._decode(self.decoder, tokens, cache, valid, start_is_real=True, cross_kv=cross_kv)


# model.arch
ARCHS: dict[str, type[_Model]] = {
    'encoder_only': EncoderOnly, 'decoder_only': DecoderOnly, 'encoder_decoder': EncoderDecoder}


def count_params(model: nnx.Module) -> int:
  """Number of parameter scalars (works on abstract models from nnx.eval_shape too)."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
