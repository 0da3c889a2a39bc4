"""Prompt tuning (Lester et al. 2021): peft.num_prompt_tokens trained embeddings prepended to the input of the
encoder (encoder_only, encoder_decoder) or the decoder (decoder_only).

The Stack calls `prepend` where the token embeddings enter it. Every real token attends to every prompt token;
prompt tokens attend only to prompt tokens (never to the data, so nothing leaks across packed examples; in a
causal stack causally, so the prompt is n ordinary tokens in front and the causal mask stays lower-triangular,
as the cuDNN kernel's causal hint assumes); padding rows stay fully masked. The prompt takes positions 0..n-1 and
the real tokens keep theirs, so a real token's position encoding is the base model's.

What becomes of the prompt positions' outputs:
  decoder_only     dropped (`strip`): they predict nothing. Decoding prefills them into the first n KV-cache slots
                   (init_cache), so generated tokens see the prompt exactly as in training.
  encoder_only     dropped: the masked-LM head reads the real tokens.
  encoder_decoder  kept: `encode` returns [B, n + S, D] (the prompt first) and the decoder's cross-attention reads
                   the prompt positions too (`cross_mask` / `valid` extend the source mask by n columns, real for
                   every real target token), as the prompt is part of T5's encoder input in the paper.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.errors import ConfigError, check_positive
from jaxformer.model import layers
from jaxformer.peft.params import PromptParam, new_param

Array = jax.Array


def validate(peft: Any, model: Any) -> None:
  check_positive('peft.num_prompt_tokens', peft.num_prompt_tokens)
  if model.sliding_window:  # the prompt's slots would fall out of the window and the ring buffer
    raise ConfigError(f'peft.method=prompt does not combine with model.sliding_window={model.sliding_window}; '
                      'use peft.method=lora (or another method), or model.sliding_window=0.')


class SoftPrompt(nnx.Module):
  """[num_prompt_tokens, d_model] embeddings and the mask/position bookkeeping of prepending them."""

  def __init__(self, num_tokens: int, d_model: int, *, std: float, param_dtype: Any, rngs: nnx.Rngs):
    self.length = num_tokens
    self.embedding = new_param(PromptParam, rngs, layers.normal(std), (num_tokens, d_model), (None, 'embed'),
                               param_dtype)

  def embeddings(self, batch: int, dtype: Any) -> Array:
    """The prompt as a batch of inputs [B, n, D]."""
    d = self.embedding.get_value().shape[-1]
    return jnp.broadcast_to(self.embedding[...].astype(dtype)[None], (batch, self.length, d))

  def positions(self, batch: int) -> Array:
    return jnp.broadcast_to(jnp.arange(self.length, dtype=jnp.int32), (batch, self.length))

  def self_mask(self, heads: int = 1, *, causal: bool) -> Array:
    """bool [1, heads, n, n]: which prompt tokens a prompt token attends to."""
    n = self.length
    mask = jnp.tril(jnp.ones((n, n), bool)) if causal else jnp.ones((n, n), bool)
    return jnp.broadcast_to(mask, (1, heads, n, n))

  def prepend(self, x: Array, positions: Array, mask: Array, *, causal: bool) -> tuple[Array, Array, Array]:
    """x [B,T,D], positions [B,T], mask [B|1,H,T,T] -> the same with the n prompt tokens first."""
    b, t, _ = x.shape
    n, h = self.length, mask.shape[1]
    positions = jnp.concatenate([self.positions(b).astype(positions.dtype), positions], 1)
    mask = jnp.broadcast_to(mask, (b, h, t, t))
    real_rows = jnp.any(mask, axis=-1, keepdims=True)  # [B,H,T,1]: rows that attend to something (not padding)
    top = jnp.concatenate([jnp.broadcast_to(self.self_mask(h, causal=causal), (b, h, n, n)),
                           jnp.zeros((b, h, n, t), bool)], -1)
    bottom = jnp.concatenate([jnp.broadcast_to(real_rows, (b, h, t, n)), mask], -1)
    return jnp.concatenate([self.embeddings(b, x.dtype), x], 1), positions, jnp.concatenate([top, bottom], 2)

  def strip(self, h: Array) -> Array:
    return h[:, self.length:]

  def cross_mask(self, mask: Array, q_real: Array) -> Array:
    """A cross-attention mask [B,H,T,S] onto encoder outputs that start with the prompt -> [B,H,T,n+S]: every real
    query (q_real [B,T]) attends to every prompt position."""
    b, h, t, _ = mask.shape
    prompt_cols = jnp.broadcast_to(q_real[:, None, :, None], (b, h, t, self.length))
    return jnp.concatenate([prompt_cols, mask], -1)

  def valid(self, src_valid: Array) -> Array:
    """Source key validity [B,S] -> [B, n+S] (the prompt positions are always valid)."""
    return jnp.concatenate([jnp.ones((src_valid.shape[0], self.length), bool), src_valid], 1)


def attach(model: nnx.Module, peft: Any, rngs: nnx.Rngs) -> None:
  cfg = model.config
  stack = model.decoder if cfg.arch == 'decoder_only' else model.encoder
  stack.prompt = SoftPrompt(int(peft.num_prompt_tokens), cfg.d_model, std=cfg.init_std,
                            param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)
