"""LoRA (Hu et al. 2021): y = x W + (alpha / rank) * dropout(x) A B on the projections named by peft.targets.

A [*in, rank] is small and random (uniform in +-1/sqrt(fan_in), as the reference implementation), B [rank, *out] is
zero, so step 0 is the base model exactly. The factors carry the logical axis names of their base kernel's input /
output dimensions (the rank dimension is unnamed: replicated), so the mesh rules shard them like the kernel.
The model calls them through layers.lora_update (Attention and MLP projections).

Mixture-of-experts blocks (model/moe.py): each expert gets its own factors, stacked like the expert kernels
(ExpertLoRA: A [E, in, rank], B [E, rank, out], the 'expert' axis first, so mesh.expert shards them with their
experts), applied in every model.moe_impl: dropless runs two more ragged matmuls over the same expert-sorted rows,
capacity and dense two more per-expert einsums. A shared expert is a plain MLP and gets a plain LoRA. merge folds
each expert's A_e B_e into its slice of the stacked kernel (the same batched product as a scanned stack's layers).
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.errors import ConfigError, check_fraction, check_positive
from jaxformer.model import attention as attention_lib
from jaxformer.model import layers, moe as moe_lib, scan
from jaxformer.peft.params import LoRAParam, new_param, sharding_names

Array = jax.Array

# peft.targets groups -> projection names (attribute names of the kernels in Attention / MLP); a comma list of
# projection names (or the q, k, v, o aliases) picks them one by one.
ATTENTION = ('query', 'key', 'value', 'out')
MLP = ('wi', 'wi_gate', 'wo')
TARGET_GROUPS = {'attention': ATTENTION, 'mlp': MLP, 'all': ATTENTION + MLP}
ALIASES = {'q': 'query', 'k': 'key', 'v': 'value', 'o': 'out'}
INPUT_DIMS = {'out': 2}  # the output projection [heads, head_dim, embed] reads both head axes; the others one


def target_names(targets: str) -> tuple[str, ...]:
  """peft.targets -> projection names; a ConfigError for an unknown name."""
  names: list[str] = []
  for word in (w.strip().lower() for w in str(targets).split(',') if w.strip()):
    group = TARGET_GROUPS.get(word)
    if group is None:
      name = ALIASES.get(word, word)
      if name not in ATTENTION + MLP:
        raise ConfigError(f'peft.targets={targets!r}: unknown target {word!r}; use attention, mlp, all, or a comma '
                          f'list of {", ".join(ATTENTION + MLP)} (aliases q,k,v,o).')
      group = (name,)
    names += [n for n in group if n not in names]
  if not names:
    raise ConfigError(f'peft.targets={targets!r} names no projection; use attention, mlp, all or a comma list.')
  return tuple(names)


def validate(peft: Any, model: Any) -> None:
  check_positive('peft.rank', peft.rank)
  if not isinstance(peft.rank, int):
    raise ConfigError(f'peft.rank={peft.rank!r} must be a positive integer.')
  check_fraction('peft.dropout', peft.dropout)
  if not peft.alpha > 0:
    raise ConfigError(f'peft.alpha={peft.alpha!r} must be > 0 (the update is scaled by alpha / rank).')
  names = target_names(peft.targets)
  if names == ('wi_gate',) and model.mlp not in ('swiglu', 'geglu'):
    raise ConfigError(f'peft.targets=wi_gate: model.mlp={model.mlp} has no gate projection; use wi, wo or mlp.')


class LoRA(nnx.Module):
  """The low-rank update of one kernel of shape [*in, *out] (in = its first `in_dims` dimensions) whose logical
  axis names are `names`, stored in `pdt`."""

  def __init__(self, shape: tuple[int, ...], names: tuple[str | None, ...], pdt: Any, in_dims: int,
               peft: Any, dtype: Any, *, rngs: nnx.Rngs):
    rank, fan_in = int(peft.rank), math.prod(shape[:in_dims])
    bound = 1.0 / math.sqrt(fan_in)
    uniform = lambda key, s, dt: jax.random.uniform(key, s, dt, -bound, bound)  # noqa: E731
    self.rank, self.scale, self.dtype = rank, float(peft.alpha) / rank, jnp.dtype(dtype)
    self.out_shape = shape[in_dims:]
    self.a = new_param(LoRAParam, rngs, uniform, shape[:in_dims] + (rank,), names[:in_dims] + (None,), pdt)
    self.b = new_param(LoRAParam, rngs, layers.zeros, (rank,) + self.out_shape, (None,) + names[in_dims:], pdt)
    self.dropout = nnx.Dropout(float(peft.dropout), deterministic=True, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    """x [..., prod(in)] -> the update [..., *out] (in the compute dtype)."""
    x = x.astype(self.dtype)
    if self.dropout.rate > 0:
      x = self.dropout(x)
    h = layers.matmul(x, self.a[...].astype(self.dtype).reshape(-1, self.rank))
    y = layers.matmul(h, self.b[...].astype(self.dtype).reshape(self.rank, -1)) * jnp.asarray(self.scale, self.dtype)
    return y.reshape(*x.shape[:-1], *self.out_shape)


class ExpertLoRA(nnx.Module):
  """Every expert's own low-rank update of a stacked expert kernel [E, in, out] (model/moe.py's wi / wi_gate / wo):
  A [E, in, rank] uniform in +-1/sqrt(in), B [E, rank, out] zero. MoE calls `stacked` (capacity / dense dispatch)
  or `ragged` (dropless) beside its own product with the kernel."""

  def __init__(self, shape: tuple[int, ...], names: tuple[str | None, ...], pdt: Any, in_dims: int,
               peft: Any, dtype: Any, *, rngs: nnx.Rngs):
    del in_dims  # always 1 (the expert kernels are 3-D)
    e, d_in, d_out = shape
    rank, bound = int(peft.rank), 1.0 / math.sqrt(d_in)
    uniform = lambda key, s, dt: jax.random.uniform(key, s, dt, -bound, bound)  # noqa: E731
    self.rank, self.scale, self.dtype = rank, float(peft.alpha) / rank, jnp.dtype(dtype)
    self.a = new_param(LoRAParam, rngs, uniform, (e, d_in, rank), (names[0], names[1], None), pdt)
    self.b = new_param(LoRAParam, rngs, layers.zeros, (e, rank, d_out), (names[0], None, names[2]), pdt)
    self.dropout = nnx.Dropout(float(peft.dropout), deterministic=True, rngs=rngs)

  def _in(self, x: Array) -> Array:
    x = x.astype(self.dtype)
    return self.dropout(x) if self.dropout.rate > 0 else x

  def stacked(self, xe: Array) -> Array:
    """Expert e's rows xe [E, ..., in] -> their updates [E, ..., out]."""
    a, b = self.a[...].astype(self.dtype), self.b[...].astype(self.dtype)
    h = jnp.einsum('e...d,edr->e...r', self._in(xe), a)
    return jnp.einsum('e...r,erf->e...f', h, b) * jnp.asarray(self.scale, self.dtype)

  def ragged(self, xs: Array, group_sizes: Array) -> Array:
    """Rows sorted by expert xs [M, in], group_sizes [E] -> their updates [M, out] (two ragged matmuls)."""
    a, b = self.a[...].astype(self.dtype), self.b[...].astype(self.dtype)
    h = jax.lax.ragged_dot(self._in(xs), a, group_sizes)
    return jax.lax.ragged_dot(h, b, group_sizes) * jnp.asarray(self.scale, self.dtype)


def _lora(kernel: nnx.Param, in_dims: int, peft: Any, dtype: Any, num_layers: int,
          rngs: nnx.Rngs, kind: type[nnx.Module] = LoRA) -> nnx.Module:
  """The LoRA of `kernel` (kind: LoRA, or ExpertLoRA for a stacked expert kernel); of each layer's slice when the
  kernel is stacked (model.scan_layers: num_layers > 0)."""
  shape, names, pdt = tuple(kernel.get_value().shape), sharding_names(kernel), kernel.get_value().dtype
  if not num_layers:
    return kind(shape, names, pdt, in_dims, peft, dtype, rngs=rngs)
  return scan.stack_modules(lambda r: kind(shape[1:], names[1:], pdt, in_dims, peft, dtype, rngs=r), num_layers, rngs)


def attach(model: nnx.Module, peft: Any, rngs: nnx.Rngs) -> None:
  """Gives every Attention (self and cross), MLP and MoE block a `lora` dict {projection name: LoRA (ExpertLoRA on a
  MoE block's stacked experts)} for the targets."""
  names = target_names(peft.targets)
  for module, num_layers in list(scan.stacked_layers(model)):
    kind = LoRA
    if isinstance(module, attention_lib.Attention):
      wanted = [n for n in names if n in ATTENTION]
    elif isinstance(module, (layers.MLP, moe_lib.MoE)):
      wanted = [n for n in names if n in MLP and getattr(module, n, None) is not None]
      kind = ExpertLoRA if isinstance(module, moe_lib.MoE) else LoRA
    else:
      continue
    if wanted:
      module.lora = nnx.Dict({n: _lora(getattr(module, n), INPUT_DIMS.get(n, 1), peft, module.dtype, num_layers,
                                       rngs, kind) for n in wanted})


def merge(params: nnx.State, peft: Any) -> nnx.State:
  """The base params with every LoRA update folded in: W + (alpha/rank) * A B (in float32, cast back to W's dtype).
  Either layout: stacked factors (model.scan_layers) fold into each layer's slice of the stacked kernel."""
  scale = float(peft.alpha) / int(peft.rank)
  flat = dict(nnx.to_flat_state(params))
  merged = {path: v for path, v in flat.items() if not isinstance(v, LoRAParam)}
  for path, a in flat.items():
    if not (isinstance(a, LoRAParam) and path[-1] == 'a'):
      continue
    b = flat[path[:-1] + ('b',)]
    kernel_path = path[:-3] + (path[-2],)  # (..., 'lora', name, 'a') -> (..., name)
    w = merged[kernel_path]
    a2, b2, value = a.get_value().astype(jnp.float32), b.get_value().astype(jnp.float32), w.get_value()
    rank, lead = a2.shape[-1], a2.ndim + b2.ndim - 2 - value.ndim  # lead: the stacked 'layers' axis, if any
    n = math.prod(a2.shape[:lead])
    delta = jnp.matmul(a2.reshape(n, -1, rank), b2.reshape(n, rank, -1))
    merged[kernel_path] = w.replace((value.astype(jnp.float32) + scale * delta.reshape(value.shape)).astype(value.dtype))
  return nnx.from_flat_state(merged)
