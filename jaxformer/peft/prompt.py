"""Prompt tuning (Lester et al. 2021): peft.num_prompt_tokens trained embeddings prepended to the input of the
encoder (encoder_only, encoder_decoder) or the decoder (decoder_only).

The Stack calls `prepend` where the token embeddings enter it and `strip` on its output, so the prompt positions
produce no logits (and, for encoder_decoder, no encoder outputs: the decoder reads the prompt through the encoded
real tokens). Every real token attends to every prompt token; prompt tokens attend only to each other (never to
the data, so nothing leaks across packed examples or past the causal mask); padding rows stay fully masked. The
prompt takes positions 0..n-1 and the real tokens keep theirs, so a real token's position encoding is the base
model's. Decoding a decoder_only model with a prompt is not supported (the prompt would have to be in the KV cache).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from jaxformer.errors import ConfigError, check_positive
from jaxformer.model import layers
from jaxformer.peft.params import PromptParam, new_param

Array = jax.Array


def validate(peft: ml_collections.ConfigDict, model: Any) -> None:
  check_positive('peft.num_prompt_tokens', peft.num_prompt_tokens)


class SoftPrompt(nnx.Module):
  """[num_prompt_tokens, d_model] embeddings and the mask/position bookkeeping of prepending them."""

  def __init__(self, num_tokens: int, d_model: int, *, std: float, param_dtype: Any, rngs: nnx.Rngs):
    self.length = num_tokens
    self.embedding = new_param(PromptParam, rngs, layers.normal(std), (num_tokens, d_model), (None, 'embed'),
                               param_dtype)

  def prepend(self, x: Array, positions: Array, mask: Array, *, decoding: bool) -> tuple[Array, Array, Array]:
    """x [B,T,D], positions [B,T], mask [B|1,1,T,T] -> the same with the n prompt tokens first."""
    if decoding:
      raise ConfigError('peft.method=prompt does not decode a decoder_only model (the prompt is not in the '
                                'KV cache); score it with eval.py, or use peft.method=lora / adapter to generate.')
    b, t, d = x.shape
    n = self.length
    prompt = jnp.broadcast_to(self.embedding[...].astype(x.dtype)[None], (b, n, d))
    positions = jnp.concatenate([jnp.broadcast_to(jnp.arange(n, dtype=positions.dtype), (b, n)), positions], 1)
    mask = jnp.broadcast_to(mask, (b, mask.shape[1], t, t))
    real_rows = jnp.any(mask, axis=-1, keepdims=True)  # [B,H,T,1]: rows that attend to something (not padding)
    top = jnp.concatenate([jnp.ones((b, mask.shape[1], n, n), bool), jnp.zeros((b, mask.shape[1], n, t), bool)], -1)
    bottom = jnp.concatenate([jnp.broadcast_to(real_rows, (b, mask.shape[1], t, n)), mask], -1)
    return jnp.concatenate([prompt, x], 1), positions, jnp.concatenate([top, bottom], 2)

  def strip(self, h: Array) -> Array:
    return h[:, self.length:]


def attach(model: nnx.Module, peft: ml_collections.ConfigDict, rngs: nnx.Rngs) -> None:
  cfg = model.config
  stack = model.decoder if cfg.arch == 'decoder_only' else model.encoder
  stack.prompt = SoftPrompt(int(peft.num_prompt_tokens), cfg.d_model, std=cfg.init_std,
                            param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)
