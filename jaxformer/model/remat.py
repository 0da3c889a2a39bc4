"""model.remat: which activations of a block the backward pass keeps, and which it recomputes.

Each entry is a `jax.checkpoint` policy applied to one block (unrolled or scanned stack alike); the block's input
is always kept. From most memory / least compute to least memory / most compute:

  none         no rematerialisation: the forward pass stores every intermediate the backward pass needs
               (fastest; activation memory ~ layers x (a dozen [B,T,D]-sized tensors + the attention probabilities
               [B,N,T,T] + the MLP hidden [B,T,F])).
  dots         keep every matmul output (projections, MLP, attention scores), recompute the elementwise rest
               (norms, activations, softmax, dropout): a few % more compute; saves the elementwise intermediates.
  projections  keep the matmul outputs without batch dimensions (q/k/v/out projections, MLP in/out), recompute
               attention scores and softmax too (MaxText's 'minimal'): drops the [B,N,T,T] tensors, the biggest
               saving at long sequence lengths, for the cost of recomputing attention.
  block        keep only each block's input and recompute the whole block in the backward pass (one extra forward
               pass of the blocks: ~+1/3 of their FLOPs; activation memory ~ layers x one [B,T,D] tensor).
  full         the same policy as block, under MaxText's name for it.

Decoding (a KV cache is given) never rematerialises. Use `benchmarks/remat_memory.py` to see the peak memory of
each policy for a given shape.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax


@dataclasses.dataclass(frozen=True)
class Remat:
  """One model.remat choice: `policy` is the jax.checkpoint policy (None = save nothing but the block's input)."""
  policy: Callable[..., bool] | None
  doc: str


_BLOCK = Remat(None, 'keep each block input only; recompute the block')

REMATS: dict[str, Remat | None] = {
    'none': None,
    'dots': Remat(jax.checkpoint_policies.dots_saveable, 'keep all matmul outputs'),
    'projections': Remat(jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
                         'keep projection outputs; recompute attention'),
    'block': _BLOCK,
    'full': _BLOCK,
}


def checkpoint(fn: Callable, name: str) -> Callable:
  """`fn` (a pure function of arrays) under model.remat=`name`'s jax.checkpoint policy; unchanged for 'none'.

  prevent_cse=False: the function runs inside lax.scan (the scanned stack), where CSE cannot undo the remat
  (jax.checkpoint's documented advice)."""
  remat = REMATS[name]
  if remat is None:
    return fn
  return jax.checkpoint(fn, policy=remat.policy, prevent_cse=False)
