"""Prefix tuning (Li & Liang 2021): peft.num_prefix_tokens trained key/value vectors in front of the keys and values
of every self-attention layer (encoder and decoder stacks; cross-attention gets none, as Hugging Face peft, whose
prefix is the past_key_values of the self-attention layers only).

Per stack, one `Prefix` module holds the keys and values of all its layers, [layers, 2, P, kv_heads, head_dim]
(`keys_values`); the Stack computes them once per call and hands each layer its slice, which Attention
concatenates in front of its keys/values (after any KV cache: the cache holds only real tokens, and every decoding
step, greedy / beam / sample, prepends the same prefix).

Conventions (those of peft + transformers, so a peft adapter gives the same logits; its files are read and written
by hf/peft_format.py):
  positions  the prefix has none: its keys are used as given (RoPE is not applied to them, as transformers keeps
             past keys already rotated), and the real tokens' positions start at P (they come after the P cached
             prefix slots; peft offsets position_ids by num_virtual_tokens). T5's relative bias sees the prefix at
             key positions 0..P-1. So sequences must fit model.max_len - P.
  masks      every query that attends to anything (a real token) sees every prefix slot, in every packed segment
             alike; padding queries see none (they stay all-masked and give zeros).
  projection peft.prefix_projection = h > 0: the prefix is the output of peft's reparameterisation MLP (its
             PrefixEncoder), embedding [P, E] -> Linear(E, h) -> tanh -> Linear(h, layers * 2 * E), with
             E = kv_heads * head_dim, and training learns the MLP (and its checkpoints hold it, so a run resumes).
             `merge_projection` computes the prefixes once and returns the state of the same model built with
             prefix_projection=0 ("merged away": what an adapter for inference stores; peft's save_pretrained
             stores the same computed tensor, 'prompt_embeddings').
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.errors import ConfigError, check_positive
from jaxformer.model import layers
from jaxformer.peft.params import PrefixParam, new_param

Array = jax.Array
KV_NAMES = (None, None, None, 'kv_heads', 'kv')  # logical axes of prefix.kv [layers, 2, P, K, H]


def validate(peft: Any, model: Any) -> None:
  check_positive('peft.num_prefix_tokens', peft.num_prefix_tokens)
  if not isinstance(peft.num_prefix_tokens, int):
    raise ConfigError(f'peft.num_prefix_tokens={peft.num_prefix_tokens!r} must be a positive integer.')
  if not isinstance(peft.prefix_projection, int) or peft.prefix_projection < 0:
    raise ConfigError(f'peft.prefix_projection={peft.prefix_projection!r} must be an integer >= 0 (the hidden size '
                      'of the reparameterisation MLP; 0 = train the prefixes directly).')
  if peft.num_prefix_tokens >= model.max_len:
    raise ConfigError(f'peft.num_prefix_tokens={peft.num_prefix_tokens} leaves no position for the tokens: they '
                      f'start at position {peft.num_prefix_tokens} and model.max_len={model.max_len}; use fewer '
                      'prefix tokens.')
  if model.sliding_window:  # would the prefix leave the window? peft's answer depends on the cache class; refuse
    raise ConfigError(f'peft.method=prefix does not combine with model.sliding_window={model.sliding_window}; use '
                      'peft.method=lora (or another method), or model.sliding_window=0.')


class Prefix(nnx.Module):
  """The trained key/value prefixes of one stack's self-attention layers (directly, or through the MLP)."""

  def __init__(self, num_tokens: int, num_layers: int, kv_heads: int, head_dim: int, projection: int, *,
               std: float, param_dtype: Any, dtype: Any, rngs: nnx.Rngs):
    self.length, self.num_layers, self.kv_heads, self.head_dim = num_tokens, num_layers, kv_heads, head_dim
    self.dtype = jnp.dtype(dtype)
    width = num_layers * 2 * kv_heads * head_dim
    param = lambda init, shape, names: new_param(PrefixParam, rngs, init, shape, names, param_dtype)  # noqa: E731
    if projection:  # peft's PrefixEncoder: its token_dim is kv_heads * head_dim (d_model without GQA)
      token_dim = kv_heads * head_dim
      self.embedding = param(layers.normal(std), (num_tokens, token_dim), (None, None))
      self.hidden = param(layers.normal(token_dim ** -0.5), (token_dim, projection), (None, None))
      self.hidden_bias = param(layers.zeros, (projection,), (None,))
      self.out = param(layers.normal(std * projection ** -0.5), (projection, width), (None, None))
      self.out_bias = param(layers.zeros, (width,), (None,))
      self.kv = None
    else:
      self.kv = param(layers.normal(std), (num_layers, 2, num_tokens, kv_heads, head_dim), KV_NAMES)

  def flat(self) -> Array:
    """The prefix in peft's layout [P, layers * 2 * kv_heads * head_dim] (float32): the MLP's output."""
    e = self.embedding[...].astype(jnp.float32)
    h = jnp.tanh(e @ self.hidden[...].astype(jnp.float32) + self.hidden_bias[...].astype(jnp.float32))
    return h @ self.out[...].astype(jnp.float32) + self.out_bias[...].astype(jnp.float32)

  def stacked(self) -> Array:
    """The prefix as `kv` holds it, [layers, 2, P, kv_heads, head_dim]: kv itself, or the MLP's output (float32)."""
    if self.kv is not None:
      return self.kv[...]
    return jnp.transpose(self.flat().reshape(self.length, self.num_layers, 2, self.kv_heads, self.head_dim),
                         (1, 2, 0, 3, 4))

  def keys_values(self) -> tuple[Array, Array]:
    """(keys, values), each [layers, P, kv_heads, head_dim] in the compute dtype."""
    kv = self.stacked().astype(self.dtype)
    return kv[:, 0], kv[:, 1]


def attach(model: nnx.Module, peft: Any, rngs: nnx.Rngs) -> None:
  """A Prefix on every stack (the encoder's and the decoder's self-attention)."""
  cfg = model.config
  for name in ('encoder', 'decoder'):
    stack = getattr(model, name, None)
    if stack is None:
      continue
    num_layers = cfg.num_decoder_layers if name == 'decoder' and cfg.arch == 'encoder_decoder' else cfg.num_layers
    stack.prefix = Prefix(int(peft.num_prefix_tokens), num_layers, cfg.num_kv_heads, cfg.head_dim,
                          int(peft.prefix_projection), std=cfg.init_std, param_dtype=jnp.dtype(cfg.param_dtype),
                          dtype=cfg.dtype, rngs=rngs)


MLP_PARAMS = ('embedding', 'hidden', 'hidden_bias', 'out', 'out_bias')


def merge_projection(model: nnx.Module) -> nnx.State:
  """The params state of a model whose prefixes come through the MLP -> that of the same model built with
  peft.prefix_projection=0: each stack's `prefix.kv` [layers, 2, P, kv_heads, head_dim], computed once, in place of
  the MLP. A model without the MLP gives its state unchanged."""
  flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  for name in ('encoder', 'decoder'):
    prefix = getattr(getattr(model, name, None), 'prefix', None)
    if prefix is None or prefix.kv is not None:
      continue
    dtype = prefix.embedding.get_value().dtype
    for param in MLP_PARAMS:
      flat.pop((name, 'prefix', param))
    flat[(name, 'prefix', 'kv')] = PrefixParam(prefix.stacked().astype(dtype), out_sharding=KV_NAMES,
                                               eager_sharding=False)
  return nnx.from_flat_state(flat)
