"""A quantised frozen base under a PEFT method (QLoRA, Dettmers et al. 2023): peft.quantize = none | nf4 | int8.

What is quantised: the projection kernels of every Attention (query, key, value, out) and dense MLP (wi, wi_gate,
wo), the linear layers QLoRA quantises. Embeddings, the output projection, norms, biases, mixture-of-experts weights
and a head's own modules stay in model.param_dtype, as do the PEFT method's parameters (LoRA A/B).

  nf4    4-bit NormalFloat codes (NF4_CODE, bitsandbytes' table), two per uint8 (the first in the high nibble), over
         blocks of peft.quantize_block (64) consecutive weights of the flattened kernel, each scaled by its absmax;
         the absmax values are double-quantised as in the paper and bitsandbytes' compress_statistics: their mean
         (`absmax_offset`, float32) is subtracted and the rest quantised to 8 bits with bitsandbytes' signed
         dynamic map over blocks of peft.quantize_stats_block (256), each with a float32 scale (`absmax_scale`).
         About 4.127 bits per weight. Numerics equal bitsandbytes 0.50 (tests/fixtures/quant/make_reference.py).
  int8   per-output-channel absmax int8 (LLM.int8()'s vector-wise quantisation of the torch [out, in] weight):
         codes = round(w * 127 / absmax) with one float32 absmax per output unit (`scale`).

Storage: a quantised kernel becomes a QuantizedKernel module in place of the nnx.Param, holding QuantizedParam
variables (a Param subclass that never trains: the trainable split leaves it in the frozen half, so checkpoints,
which hold only the trainables, never contain it). Sharding: int8 codes keep the kernel's shape and logical axis
names (the scales keep the output axes' names); NF4 codes keep the kernel's input dimensions and names when the
output size is a multiple of the block ([*in, out/2], so blocks never cross an input row; absmax codes [*in,
out/block]), else they are stored flat and replicated; the second-level scales are always replicated (tiny). A
stacked kernel (model.scan_layers) is quantised layer by layer, every array keeping the leading 'layers' axis.

Compute: the model calls kernel.matmul(x, dtype) (layers.kernel_matmul): the kernel is dequantised in the compute
dtype right before the matmul, inside jax.checkpoint so the backward pass dequantises again instead of keeping
each layer's full weight alive until then (what bitsandbytes' Linear4bit does too). The full-precision weight is
never a stored parameter.

Where the quantised base comes from: training/state.py reads checkpoint.init_from in full precision and quantises
it once (`attach` on the loaded model, jitted); a resumed run re-reads and re-quantises it (deterministic). Export
(peft.merge) dequantises first and folds LoRA into the dequantised base, as peft's merge_and_unload on a 4-bit base.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxformer.errors import ConfigError, check_choice
from jaxformer.model import attention as attention_lib
from jaxformer.model import layers, scan
from jaxformer.peft.params import sharding_names

Array = jax.Array

# bitsandbytes' NF4 table (create_normal_map(offset=0.9677083, use_extra_value=True)): quantiles of N(0, 1) scaled to
# [-1, 1], with an exact zero.
NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], np.float32)


def dynamic_code() -> np.ndarray:
  """bitsandbytes' signed 8-bit dynamic map (create_dynamic_map(signed=True)): 7 decades of exponents, each with a
  linear fraction. torch's float32 linspace rounds 22 of its 256 entries one bit differently (<= 6e-8)."""
  data: list[float] = []
  for i in range(7):
    bounds = np.linspace(0.1, 1, 2 ** i + 1, dtype=np.float32)
    means = (bounds[:-1] + bounds[1:]) / np.float32(2)
    values = np.float32(10.0 ** (i - 6)) * means
    data += list(values) + list(-values)
  return np.sort(np.array(data + [0.0, 1.0], np.float32))


DYNAMIC_CODE = dynamic_code()


def _nearest(scaled: Array, code: np.ndarray) -> Array:
  """Index of the nearest entry of the sorted `code` (a value on a midpoint takes the lower one, as torch.bucketize
  in bitsandbytes)."""
  midpoints = jnp.asarray((code[:-1] + code[1:]) / np.float32(2))
  return jnp.searchsorted(midpoints, scaled, side='left').astype(jnp.uint8)


def _blocks(x: Array, block: int) -> Array:
  """A flat vector zero-padded to whole blocks, [num_blocks, block] (zeros never raise a block's absmax)."""
  pad = -x.shape[0] % block
  return jnp.pad(x, (0, pad)).reshape(-1, block)


def quantize_blockwise(x: Array, code: np.ndarray, block: int) -> tuple[Array, Array]:
  """bitsandbytes' quantize_blockwise of a flat float32 vector: (uint8 codes [n], float32 absmax [num_blocks])."""
  b = _blocks(x, block)
  absmax = jnp.abs(b).max(-1)
  scaled = jnp.clip(b * (1.0 / jnp.maximum(absmax, 1e-38))[:, None], -1, 1)
  return _nearest(scaled, code).reshape(-1)[:x.shape[0]], absmax


def dequantize_blockwise(codes: Array, absmax: Array, code: np.ndarray, block: int) -> Array:
  values = _blocks(jnp.asarray(code)[codes.astype(jnp.int32)], block) * absmax[:, None]
  return values.reshape(-1)[:codes.shape[0]]


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def nf4_quantize(x: Array, block: int = 64, stats_block: int = 256, double: bool = True) -> dict[str, Array]:
  """bitsandbytes' quantize_4bit(x, blocksize=block, quant_type='nf4', compress_statistics=double) of a flat vector:
  {codes: uint8 [ceil(n/2)], absmax_codes: uint8 [num_blocks], absmax_scale: float32 [ceil(num_blocks/stats_block)],
  absmax_offset: float32 []} (double) or {codes, absmax: float32 [num_blocks]}."""
  x = x.astype(jnp.float32)
  q, absmax = quantize_blockwise(x, NF4_CODE, block)
  q = jnp.pad(q, (0, x.shape[0] % 2))
  packed = (q[0::2] << 4) | q[1::2]
  if not double:
    return {'codes': packed, 'absmax': absmax}
  offset = absmax.mean()
  absmax_codes, absmax_scale = quantize_blockwise(absmax - offset, DYNAMIC_CODE, stats_block)
  return {'codes': packed, 'absmax_codes': absmax_codes, 'absmax_scale': absmax_scale, 'absmax_offset': offset}


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def nf4_dequantize(q: dict[str, Array], n: int, block: int = 64, stats_block: int = 256,
                   dtype: Any = jnp.float32) -> Array:
  """The flat vector of `n` weights back from nf4_quantize's arrays, in `dtype` (block scales in float32)."""
  if 'absmax' in q:
    absmax = q['absmax']
  else:
    absmax = dequantize_blockwise(q['absmax_codes'].reshape(-1), q['absmax_scale'], DYNAMIC_CODE,
                                  stats_block) + q['absmax_offset']
  packed = q['codes'].reshape(-1)
  codes = jnp.stack([packed >> 4, packed & 0xF], axis=-1).reshape(-1)[:n]
  values = _blocks(jnp.asarray(NF4_CODE, dtype)[codes.astype(jnp.int32)], block) * absmax.reshape(-1, 1).astype(dtype)
  return values.reshape(-1)[:n]


@jax.jit
def int8_quantize(w: Array) -> dict[str, Array]:
  """Per-column absmax int8 of w [K, M] (column = output unit): {codes: int8 [K, M], scale: float32 [M]}, as
  bitsandbytes' int8_vectorwise_quant of the [M, K] torch weight."""
  w = w.astype(jnp.float32)
  scale = jnp.abs(w).max(0)
  codes = jnp.round(w * (127.0 / jnp.where(scale > 0, scale, 1.0)))
  return {'codes': codes.astype(jnp.int8), 'scale': scale}


def int8_dequantize(q: dict[str, Array], dtype: Any = jnp.float32) -> Array:
  return q['codes'].astype(dtype) * (q['scale'] / 127.0).astype(dtype)


# ------------------------------------------------------------------------------------------- kernels in a model
class QuantizedParam(nnx.Param):
  """An array of a quantised frozen kernel (codes or scales). A Param so it sits in the params state (placed and
  sharded like the rest of the frozen base); never trainable (peft.trainable_filter)."""


@dataclasses.dataclass(frozen=True)
class Kind:
  """One peft.quantize choice. quantize(w, in_dims, peft) -> {name: array} for a kernel w [*in, *out] (float32);
  dequantize(arrays, shape, in_dims, peft, dtype) -> the kernel [*shape] in dtype. An array whose leading dims are
  the kernel's input dims carries their logical axis names (`rows`: the names of the rest are None)."""
  quantize: Callable[[Array, int, Any], dict[str, Array]]
  dequantize: Callable[[dict[str, Array], tuple, int, Any, Any], Array]
  names: Callable[[str, tuple, int], tuple]  # (array name, kernel names, in_dims) -> the array's names


def _nf4_kernel(w: Array, in_dims: int, peft: Any) -> dict[str, Array]:
  block, in_shape, m = int(peft.quantize_block), w.shape[:in_dims], math.prod(w.shape[in_dims:])
  q = nf4_quantize(w.reshape(-1), block, int(peft.quantize_stats_block))
  if m % block == 0:  # blocks never cross an input row: keep the input dims (and their shardable names)
    q['codes'] = q['codes'].reshape(*in_shape, m // 2)
    q['absmax_codes'] = q['absmax_codes'].reshape(*in_shape, m // block)
  return q


def _nf4_dequantize(q: dict[str, Array], shape: tuple, in_dims: int, peft: Any, dtype: Any) -> Array:
  n = math.prod(shape)
  return nf4_dequantize(q, n, int(peft.quantize_block), int(peft.quantize_stats_block), dtype).reshape(shape)


def _nf4_names(name: str, names: tuple, in_dims: int, ndim: int) -> tuple:
  if name in ('codes', 'absmax_codes') and ndim == in_dims + 1:
    return names[:in_dims] + (None,)
  return (None,) * ndim


def _int8_kernel(w: Array, in_dims: int, peft: Any) -> dict[str, Array]:
  k = math.prod(w.shape[:in_dims])
  q = int8_quantize(w.reshape(k, -1))
  return {'codes': q['codes'].reshape(w.shape), 'scale': q['scale'].reshape(w.shape[in_dims:])}


def _int8_dequantize(q: dict[str, Array], shape: tuple, in_dims: int, peft: Any, dtype: Any) -> Array:
  return int8_dequantize(q, dtype).reshape(shape)


def _int8_names(name: str, names: tuple, in_dims: int, ndim: int) -> tuple:
  return names if name == 'codes' else names[in_dims:]


KINDS: dict[str, Kind | None] = {
    'none': None,
    'nf4': Kind(_nf4_kernel, _nf4_dequantize, _nf4_names),
    'int8': Kind(_int8_kernel, _int8_dequantize, _int8_names),
}

# The projections quantised (kernel attribute names of Attention / MLP) and how many leading input dims each has.
PROJECTIONS = ('query', 'key', 'value', 'out', 'wi', 'wi_gate', 'wo')
INPUT_DIMS = {'out': 2}


def is_active(peft: Any) -> bool:
  """Whether the frozen base is stored quantised (only under a PEFT method: with none everything trains)."""
  return peft.method != 'none' and peft.quantize != 'none'


def validate(config: Any) -> None:
  """peft.quantize and its block sizes (peft.validate calls this): one line per bad value."""
  peft = config.peft
  check_choice('peft.quantize', peft.quantize, KINDS)
  if peft.quantize == 'none':
    return
  if peft.method == 'none':
    raise ConfigError(f'peft.quantize={peft.quantize} quantises the frozen base of a PEFT run, but peft.method=none '
                      'trains every parameter; set peft.method=lora (QLoRA) or drop peft.quantize.')
  if not config.checkpoint.init_from:
    raise ConfigError(f'peft.quantize={peft.quantize} quantises the pretrained base read from checkpoint.init_from, '
                      'which is empty; set checkpoint.init_from=<workdir> or hf:<dir>.')
  for key, allowed in (('quantize_block', (32, 64, 128, 256, 512, 1024, 2048, 4096)),
                       ('quantize_stats_block', (64, 128, 256, 512, 1024, 2048, 4096))):
    if getattr(peft, key) not in allowed:
      raise ConfigError(f'peft.{key}={getattr(peft, key)!r} must be one of {", ".join(map(str, allowed))} '
                        '(the block sizes bitsandbytes accepts).')


class QuantizedKernel(nnx.Module):
  """A frozen kernel of shape `shape` ([*in, *out], in = its first `in_dims` dims) stored quantised by peft.quantize.
  A stacked kernel (num_layers > 0) is quantised per layer and its arrays keep the leading 'layers' dim; inside the
  scan each layer sees its slice."""

  def __init__(self, value: Array, names: tuple, in_dims: int, num_layers: int, peft: Any, dtype: Any):
    lead = 1 if num_layers else 0
    self.kind, self.in_dims, self.dtype = str(peft.quantize), in_dims, jnp.dtype(dtype)
    self.shape, self.names, self.lead_names = tuple(value.shape[lead:]), tuple(names[lead:]), tuple(names[:lead])
    self.param_dtype = jnp.dtype(value.dtype)
    self.quantize_block, self.quantize_stats_block = int(peft.quantize_block), int(peft.quantize_stats_block)
    kind = KINDS[self.kind]
    quantize = lambda w: kind.quantize(w.astype(jnp.float32), in_dims, peft)  # noqa: E731
    arrays = jax.vmap(quantize)(value) if lead else quantize(value)
    self.array_names = tuple(arrays)
    self.codes_ndim = arrays['codes'].ndim - lead  # per layer; inside the scan the arrays have lost the lead
    for name, array in arrays.items():
      axes = kind.names(name, self.names, in_dims, array.ndim - lead)
      setattr(self, name, QuantizedParam(array, out_sharding=self.lead_names + axes, eager_sharding=False))

  def _arrays(self) -> dict[str, Array]:
    return {n: getattr(self, n)[...] for n in self.array_names}

  def _dequantize(self, arrays: dict[str, Array], dtype: Any) -> Array:
    return KINDS[self.kind].dequantize(arrays, self.shape, self.in_dims, self, dtype)

  def dequantize(self, dtype: Any | None = None) -> Array:
    """The kernel [*lead, *shape] in `dtype` (default: the compute dtype)."""
    dtype = self.dtype if dtype is None else jnp.dtype(dtype)
    arrays = self._arrays()
    one = lambda q: self._dequantize(q, dtype)  # noqa: E731
    for _ in range(arrays['codes'].ndim - self.codes_ndim):
      one = jax.vmap(one)
    return one(arrays)

  def __getitem__(self, index: Any) -> Array:
    """kernel[...] as for an nnx.Param: the dequantised kernel in the compute dtype."""
    return self.dequantize()[index]

  def matmul(self, x: Array, dtype: Any) -> Array:
    """x [..., prod(in)] @ the dequantised kernel -> [..., *out], in `dtype`. Dequantised inside jax.checkpoint, so
    the backward pass recomputes it from the codes instead of keeping the full weight alive as a residual."""
    k = math.prod(self.shape[:self.in_dims])

    def dense(x: Array, arrays: dict[str, Array]) -> Array:
      return layers.matmul(x, self._dequantize(arrays, dtype).reshape(k, *self.shape[self.in_dims:]))

    return jax.checkpoint(dense)(x.astype(dtype), self._arrays())

  def to_param(self) -> nnx.Param:
    """The dequantised kernel as a plain nnx.Param in model.param_dtype (export: the base LoRA merges into)."""
    return nnx.Param(self.dequantize(jnp.float32).astype(self.param_dtype),
                     out_sharding=self.lead_names + self.names, eager_sharding=False)


def _quantizable(module: nnx.Module) -> list[str]:
  if not isinstance(module, (attention_lib.Attention, layers.MLP)):
    return []
  return [n for n in PROJECTIONS if isinstance(getattr(module, n, None), nnx.Param)]


def attach(model: nnx.Module, peft: Any) -> nnx.Module:
  """Replaces every Attention / MLP projection kernel of `model` by its QuantizedKernel (in place; returned for
  chaining); does nothing unless is_active(peft). Run it after the base weights are in place."""
  if not is_active(peft):
    return model
  for module, num_layers in list(scan.stacked_layers(model)):
    for name in _quantizable(module):
      kernel = getattr(module, name)
      setattr(module, name, QuantizedKernel(kernel.get_value(), sharding_names(kernel), INPUT_DIMS.get(name, 1),
                                            num_layers, peft, module.dtype))
  return model


def dequantize(model: nnx.Module) -> nnx.Module:
  """Puts every QuantizedKernel of `model` back as a plain nnx.Param (dequantised, in model.param_dtype), in place."""
  for _, module in list(nnx.iter_modules(model)):
    for name in PROJECTIONS:
      kernel = getattr(module, name, None)
      if isinstance(kernel, QuantizedKernel):
        setattr(module, name, kernel.to_param())
  return model


def param_bytes(params: nnx.State) -> int:
  """Bytes of a params state's arrays (what the quantisation saves is visible here; element counts mislead)."""
  return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(params))
