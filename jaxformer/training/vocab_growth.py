"""Growing a pretrained model's vocabulary (data.tokenizer_extra): new rows for the added tokens.

Every parameter with a vocabulary axis (token embeddings [vocab, d], an untied output layer [d, vocab], an output
bias [vocab]; a tied model has only the first) gets the new rows at the end of that axis, each the MEAN of the old
rows, in float32, cast back.

Hugging Face's resize_token_embeddings(..., mean_resizing=True) (transformers 5.25 modeling_utils
_init_added_embeddings_weights_with_mean / _init_added_lm_head_bias_with_mean) samples each new row from a normal
with the old rows' mean and 1e-9 x their covariance (the bias: std 1e-9 x theirs), falling back to the mean when
that covariance is not positive definite: its rows differ from the mean by about 3e-5 of the old rows' spread.
jaxformer takes the mean itself: the same to that precision, and deterministic, which matters because a PEFT run
re-reads its frozen base (checkpoint.init_from, grown here) at every restore, eval and export and must get the
same parameters each time. The mean row keeps the grown model's output close to the base's (Hewitt 2021,
"Initializing new word embeddings for pretrained language models", the reason transformers made it the default):
old tokens' logits are unchanged, and each new token gets the average logit.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx


def grown_shape_axis(old: tuple[int, ...], new: tuple[int, ...], old_vocab: int, new_vocab: int) -> int | None:
  """The axis along which `old` grows to `new` (old_vocab -> new_vocab); None when the shapes are equal; a
  ValueError when they differ otherwise."""
  if tuple(old) == tuple(new):
    return None
  differ = [a for a, (o, n) in enumerate(zip(old, new)) if o != n]
  if len(old) != len(new) or len(differ) != 1 or (old[differ[0]], new[differ[0]]) != (old_vocab, new_vocab):
    raise ValueError(f'shape {tuple(old)} does not grow to {tuple(new)} along a vocabulary axis '
                     f'({old_vocab} -> {new_vocab})')
  return differ[0]


def mean_rows(x: jax.Array, axis: int, new_size: int) -> jax.Array:
  """x with rows appended along `axis` up to new_size, each the mean of x's rows (float32, cast back)."""
  mean = jnp.mean(x.astype(jnp.float32), axis=axis, keepdims=True).astype(x.dtype)
  shape = list(x.shape)
  shape[axis] = new_size - x.shape[axis]
  return jnp.concatenate([x, jnp.broadcast_to(mean, shape)], axis=axis)


def grow_vocab(params: nnx.State, target: nnx.State, old_vocab: int, new_vocab: int) -> nnx.State:
  """`params` (a base's, vocabulary old_vocab) with every vocabulary-sized parameter grown to `target`'s shape
  (ShapeDtypeStructs; a leaf with a .sharding is placed on it). Paths of params missing from target are an error."""
  wanted = {jax.tree_util.keystr(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(target)[0]}

  def grow(path: Any, x: jax.Array) -> jax.Array:
    want = wanted[jax.tree_util.keystr(path)]
    axis = grown_shape_axis(x.shape, want.shape, old_vocab, new_vocab)
    if axis is None:
      return x
    sharding = getattr(want, 'sharding', None)
    fn = jax.jit(mean_rows, static_argnums=(1, 2), out_shardings=sharding)
    return fn(x, axis, new_vocab)

  return jax.tree_util.tree_map_with_path(grow, params)
