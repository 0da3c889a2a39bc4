"""Prefix tuning (Li & Liang 2021): peft.num_prefix_tokens trained key/value vectors in front of the keys and values
of every self-attention layer (encoder and decoder stacks; cross-attention gets none, as Hugging Face peft, whose
prefix is the past_key_values of the self-attention layers only).

Per stack, one `Prefix` module holds the keys and values of all its layers, [layers, 2, P, kv_heads, head_dim]
(`keys_values`); the Stack computes them once per call and hands each layer its slice, which Attention
concatenates in front of its keys/values (after any KV cache: the cache holds only real tokens, and every decoding
step, greedy / beam / sample, prepends the same prefix).

Conventions (those of peft + transformers, so a peft adapter gives the same logits, see from_peft):
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

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxformer.errors import ConfigError, check_positive
from jaxformer.hf import weights
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

  def keys_values(self) -> tuple[Array, Array]:
    """(keys, values), each [layers, P, kv_heads, head_dim] in the compute dtype."""
    if self.kv is not None:
      kv = self.kv[...]
    else:
      kv = jnp.transpose(self.flat().reshape(self.length, self.num_layers, 2, self.kv_heads, self.head_dim),
                         (1, 2, 0, 3, 4))
    kv = kv.astype(self.dtype)
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
    kv = jnp.transpose(prefix.flat().reshape(prefix.length, prefix.num_layers, 2, prefix.kv_heads, prefix.head_dim),
                       (1, 2, 0, 3, 4))
    flat[(name, 'prefix', 'kv')] = PrefixParam(kv.astype(dtype), out_sharding=KV_NAMES, eager_sharding=False)
  return nnx.from_flat_state(flat)


def from_peft(prompt_embeddings: Any, *, num_layers: int, kv_heads: int, head_dim: int) -> np.ndarray:
  """peft's saved prefix (adapter_model.safetensors 'prompt_embeddings', [num_virtual_tokens, num_layers * 2 *
  token_dim] with token_dim = kv_heads * head_dim) -> our `prefix.kv` [layers, 2, P, kv_heads, head_dim].

  peft views the tensor as [P, layers * 2, heads, head_dim] and permutes it to [layers * 2, heads, P, head_dim],
  layer l's key being entry 2l and its value 2l + 1 (PeftModel.get_prompt), which is this reshape."""
  x = np.asarray(prompt_embeddings, np.float32)
  p, width = x.shape
  if width != num_layers * 2 * kv_heads * head_dim:
    raise ConfigError(f'peft prefix of shape {x.shape}: expected [num_virtual_tokens, {num_layers} layers x 2 x '
                      f'{kv_heads} kv heads x {head_dim}] for this model; the adapter belongs to another model.')
  return np.transpose(x.reshape(p, num_layers, 2, kv_heads, head_dim), (1, 2, 0, 3, 4))


def read_peft_prefix(directory: str, *, num_layers: int, kv_heads: int, head_dim: int) -> np.ndarray:
  """A peft PREFIX_TUNING directory's prefix as our `prefix.kv` [layers, 2, P, kv_heads, head_dim]. peft saves the
  computed prefix ('prompt_embeddings') with or without its reparameterisation MLP, so both load alike."""
  path = os.path.join(directory, 'adapter_model.safetensors')
  if not os.path.isfile(path):
    raise ConfigError(f'{directory} has no adapter_model.safetensors; save the adapter with safe_serialization=True.')
  tensors = weights.read_file(path)
  if 'prompt_embeddings' not in tensors:
    raise ConfigError(f'{path} holds no prompt_embeddings (it has {", ".join(sorted(tensors)) or "nothing"}), so '
                      'it is not a prefix-tuning adapter.')
  return from_peft(tensors['prompt_embeddings'], num_layers=num_layers, kv_heads=kv_heads, head_dim=head_dim)


def load_peft_adapter(directory: str, model: nnx.Module) -> None:
  """Sets the prefix of `model` (decoder_only, built with peft.method=prefix, prefix_projection=0 and the adapter's
  num_virtual_tokens) from a peft PrefixTuningConfig adapter directory (adapter_config.json +
  adapter_model.safetensors, as PeftModel.save_pretrained writes it). A ConfigError names any mismatch. (A run
  loads one with peft.adapter=DIR: hf/peft_format.py.)"""
  with open(os.path.join(directory, 'adapter_config.json'), encoding='utf-8') as f:
    config = json.load(f)
  if config.get('peft_type') != 'PREFIX_TUNING':
    raise ConfigError(f'{directory}: peft_type={config.get("peft_type")!r}, not a prefix-tuning adapter; use '
                      'peft.method=prefix only with PREFIX_TUNING adapters.')
  prefix = getattr(getattr(model, 'decoder', None), 'prefix', None)
  if model.config.arch != 'decoder_only' or prefix is None or prefix.kv is None:
    raise ConfigError(f'{directory}: a peft prefix adapter loads into a decoder_only model built with '
                      'peft.method=prefix and peft.prefix_projection=0.')
  if config['num_virtual_tokens'] != prefix.length:
    n = config['num_virtual_tokens']
    raise ConfigError(f'{directory}: num_virtual_tokens={n}, but the model has peft.num_prefix_tokens='
                      f'{prefix.length}; set peft.num_prefix_tokens={n}.')
  kv = read_peft_prefix(directory, num_layers=prefix.num_layers, kv_heads=prefix.kv_heads, head_dim=prefix.head_dim)
  prefix.kv.set_value(jnp.asarray(kv, prefix.kv.get_value().dtype))


def to_peft(kv: Any) -> np.ndarray:
  """Our `prefix.kv` [layers, 2, P, kv_heads, head_dim] -> peft's 'prompt_embeddings' [P, layers * 2 * kv_heads *
  head_dim] (from_peft's inverse)."""
  x = np.asarray(kv, np.float32)
  return np.transpose(x, (2, 0, 1, 3, 4)).reshape(x.shape[2], -1)


def write_peft_adapter(directory: str, model: nnx.Module, base_model: str = '') -> dict[str, Any]:
  """Writes a decoder_only model's prefix as a peft PREFIX_TUNING adapter (adapter_config.json +
  adapter_model.safetensors, as PeftModel.save_pretrained writes one): the prefix merged away from its MLP if it
  has one (peft saves the computed prefix too, and loads it with prefix_projection off). Returns the config."""
  prefix = getattr(getattr(model, 'decoder', None), 'prefix', None)
  if model.config.arch != 'decoder_only' or prefix is None:
    raise ConfigError('a peft prefix adapter holds a decoder_only model\'s prefix (peft.method=prefix); this run '
                      'has none to write.')
  kv = prefix.kv[...] if prefix.kv is not None else jnp.transpose(
      prefix.flat().reshape(prefix.length, prefix.num_layers, 2, prefix.kv_heads, prefix.head_dim), (1, 2, 0, 3, 4))
  token_dim = prefix.kv_heads * prefix.head_dim
  config = {'peft_type': 'PREFIX_TUNING', 'task_type': 'CAUSAL_LM', 'base_model_name_or_path': base_model,
            'num_virtual_tokens': prefix.length, 'num_layers': prefix.num_layers, 'token_dim': token_dim,
            'num_attention_heads': prefix.kv_heads, 'num_transformer_submodules': 1,
            'encoder_hidden_size': token_dim, 'prefix_projection': False, 'inference_mode': True,
            'modules_to_save': None, 'revision': None, 'auto_mapping': None, 'init_weights': None}
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, 'adapter_config.json'), 'w', encoding='utf-8') as f:
    json.dump(config, f, indent=2)
  weights.write_file(os.path.join(directory, 'adapter_model.safetensors'),
                     {'prompt_embeddings': to_peft(jax.device_get(kv))}, {'format': 'pt'})
  return config
