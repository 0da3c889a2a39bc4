"""Building blocks below attention: parameters with logical axis names, norms, MLPs, the token embedding.

Each choice in the config (`model.norm`, `model.mlp`, `model.dtype`) is one entry in a registry here (NORMS, MLPS,
DTYPES), which is also what config validation accepts, so adding a variant is one class or function plus one entry.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer import logical

Array = jax.Array
Initializer = Callable[[jax.Array, tuple[int, ...], Any], Array]


def normal(std: float) -> Initializer:
  return jax.nn.initializers.normal(std)


DTYPES: dict[str, Any] = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}

zeros: Initializer = jax.nn.initializers.zeros
ones: Initializer = jax.nn.initializers.ones


def param(rngs: nnx.Rngs, init: Initializer, shape: tuple[int, ...], names: tuple[str | None, ...],
          dtype: Any) -> nnx.Param:
  """A parameter carrying its logical axis names as `out_sharding` metadata.

  eager_sharding=False: the model is built the same way with or without a mesh; the training code maps the names
  to mesh axes (config.mesh.logical_axis_rules) and places the state, e.g. via nnx.get_partition_spec.
  """
  assert len(shape) == len(names), (shape, names)
  return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=names, eager_sharding=False)


# ------------------------------------------------------------------------------------------------ norms
class LayerNorm(nnx.Module):
  """LayerNorm over the last axis, computed in float32 (bias follows model.use_bias)."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    pdt = jnp.dtype(cfg.param_dtype)
    self.eps, self.dtype = cfg.norm_eps, jnp.dtype(cfg.dtype)
    self.scale = param(rngs, ones, (cfg.d_model,), ('embed',), pdt)
    self.bias = param(rngs, zeros, (cfg.d_model,), ('embed',), pdt) if cfg.use_bias else None

  def __call__(self, x: Array) -> Array:
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...].astype(jnp.float32)
    if self.bias is not None:
      y = y + self.bias[...].astype(jnp.float32)
    return y.astype(self.dtype)


class RMSNorm(nnx.Module):
  """RMSNorm (no mean subtraction, no bias), computed in float32."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    self.eps, self.dtype = cfg.norm_eps, jnp.dtype(cfg.dtype)
    self.scale = param(rngs, ones, (cfg.d_model,), ('embed',), jnp.dtype(cfg.param_dtype))

  def __call__(self, x: Array) -> Array:
    x = x.astype(jnp.float32)
    y = x * jax.lax.rsqrt(jnp.square(x).mean(-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(self.dtype)


class RMSNormPlusOne(RMSNorm):
  """Gemma's RMSNorm: the scale is stored as an offset from 1 (multiplies by 1 + w, w initialised to 0), still in
  float32 and cast to the compute dtype after the product, as transformers' GemmaRMSNorm."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    self.eps, self.dtype = cfg.norm_eps, jnp.dtype(cfg.dtype)
    self.scale = param(rngs, zeros, (cfg.d_model,), ('embed',), jnp.dtype(cfg.param_dtype))

  def __call__(self, x: Array) -> Array:
    x = x.astype(jnp.float32)
    y = x * jax.lax.rsqrt(jnp.square(x).mean(-1, keepdims=True) + self.eps)
    return (y * (1.0 + self.scale[...].astype(jnp.float32))).astype(self.dtype)


NORMS: dict[str, type[nnx.Module]] = {'layer': LayerNorm, 'rms': RMSNorm, 'rms_plus_one': RMSNormPlusOne}


# -------------------------------------------------------------------------------------------------- mlp
@dataclasses.dataclass(frozen=True)
class MLPKind:
  """One `model.mlp` choice. gated: a second input projection `wi_gate`, h = activation(x W_gate) * (x W_in)
  (Shazeer 2020); it changes the parameter count, so flops.py and the masked-LM head ask this flag."""
  activation: Callable[[Array], Array]
  gated: bool = False


MLPS: dict[str, MLPKind] = {
    'gelu': MLPKind(jax.nn.gelu),  # tanh approximation: GPT-2 ('gelu_new' in Hugging Face)
    'relu': MLPKind(jax.nn.relu),  # T5 v1.0
    'swiglu': MLPKind(jax.nn.silu, gated=True),  # silu(x W_gate) * (x W_in): Llama
    'gelu_exact': MLPKind(functools.partial(jax.nn.gelu, approximate=False)),  # erf GELU: BERT ('gelu' in HF)
    'geglu': MLPKind(jax.nn.gelu, gated=True),  # tanh GELU, gated: T5 v1.1 ('gated-gelu'), Gemma
    'geglu_exact': MLPKind(functools.partial(jax.nn.gelu, approximate=False), gated=True),  # erf GELU, gated
}


# ------------------------------------------------------------------------------------------------- PEFT hooks
# jaxformer/peft attaches modules to built layers (`lora`: {kernel attribute name: update}, `adapter`); without
# them these return y unchanged, so a model without PEFT is untouched.
def lora_update(module: nnx.Module, kernel: nnx.Param, x: Array, y: Array) -> Array:
  """y = x @ kernel (+ bias), plus the LoRA update of `kernel` when one is attached to `module`."""
  lora = getattr(module, 'lora', None)
  if lora is not None:
    for name, update in lora.items():
      if getattr(module, name) is kernel:
        return y + update(x).astype(y.dtype)
  return y


def adapter_update(module: nnx.Module, y: Array) -> Array:
  """The sublayer output y through the adapter attached to `module`, if any."""
  adapter = getattr(module, 'adapter', None)
  return y if adapter is None else adapter(y)


def matmul(x: Array, w: Array, *, transpose_w: bool = False, out_dtype=None) -> Array:
  """x [..., K] @ w [K, ...] (or w [N, K] with transpose_w) as ONE 2-D matmul over the flattened rows.

  Why 2-D: XLA:CPU differentiates a 3-D einsum ('btd,dnh->btnh') into a weight gradient whose activation operand
  is first written transposed by a strided loop fusion, ~40% of the backward pass; with [B*T, K] operands the
  weight gradient is a plain x^T @ dy (benchmarks/NOTES_cpu_performance.md). Same math on every backend.
  """
  k = x.shape[-1]
  w2 = w.reshape(-1, k) if transpose_w else w.reshape(k, -1)
  dims = (((1,), (1,)) if transpose_w else ((1,), (0,)), ((), ()))
  y = jax.lax.dot_general(x.reshape(-1, k), w2, dims, preferred_element_type=out_dtype)
  out_shape = w.shape[:1] if transpose_w else w.shape[1:]
  return y.reshape(*x.shape[:-1], *out_shape)


def kernel_matmul(x: Array, kernel: Any, dtype: Any, in_dims: int = 1) -> Array:
  """x [..., K] @ kernel [*in, *out] (K = prod(in), in = its first `in_dims` dims) -> [..., *out] in `dtype`. A
  quantised frozen kernel (peft.quantize) brings its own `matmul`, which dequantises it inside."""
  own = getattr(kernel, 'matmul', None)
  if own is not None:
    return own(x.astype(dtype), dtype)
  w = kernel[...].astype(dtype)
  return matmul(x, w.reshape(x.shape[-1], *w.shape[in_dims:]))


class MLP(nnx.Module):
  """Position-wise feed-forward: d_model -> d_ff -> d_model, optionally gated (SwiGLU)."""

  def __init__(self, cfg, *, out_std: float | None = None, rngs: nnx.Rngs):
    """out_std: init std of the output projection (GPT-2 scales it down by sqrt(residual sublayers))."""
    d, f, pdt, std = cfg.d_model, cfg.d_ff, jnp.dtype(cfg.param_dtype), cfg.init_std
    out_std = std if out_std is None else out_std
    kind = MLPS[cfg.mlp]
    self.activation, self.dtype = kind.activation, jnp.dtype(cfg.dtype)
    self.wi = param(rngs, normal(std), (d, f), ('embed', 'mlp'), pdt)
    self.wi_gate = param(rngs, normal(std), (d, f), ('embed', 'mlp'), pdt) if kind.gated else None
    self.wo = param(rngs, normal(out_std), (f, d), ('mlp', 'embed'), pdt)
    self.wi_bias = param(rngs, zeros, (f,), ('mlp',), pdt) if cfg.use_bias else None
    self.wo_bias = param(rngs, zeros, (d,), ('embed',), pdt) if cfg.use_bias else None

  def _dense(self, x: Array, kernel: nnx.Param, bias: nnx.Param | None) -> Array:
    y = kernel_matmul(x, kernel, self.dtype)
    y = y if bias is None else y + bias[...].astype(self.dtype)
    return lora_update(self, kernel, x, y)

  def __call__(self, x: Array) -> Array:
    x = x.astype(self.dtype)
    h = self._dense(x, self.wi, self.wi_bias)
    if self.wi_gate is not None:
      h = self.activation(lora_update(self, self.wi_gate, x, kernel_matmul(x, self.wi_gate, self.dtype))) * h
    else:
      h = self.activation(h)
    return adapter_update(self, self._dense(h, self.wo, self.wo_bias))


# ------------------------------------------------------------------------------------------- embeddings
class Embed(nnx.Module):
  """Token embedding [vocab, embed]; `attend` is the tied output projection (logits in float32)."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    self.dtype = jnp.dtype(cfg.dtype)
    self.embedding = param(rngs, normal(cfg.init_std), (cfg.vocab_size, cfg.d_model), ('vocab', 'embed'),
                           jnp.dtype(cfg.param_dtype))

  def __call__(self, tokens: Array) -> Array:
    # The lookup reads the table gathered over its 'embed' shards (FSDP), so the result can take the batch
    # sharding; gathering from an embed-sharded table makes XLA replicate everything (logical.constrain).
    table = logical.constrain(self.embedding[...], ('vocab', None))
    return jnp.take(table, tokens, axis=0).astype(self.dtype)

  def attend(self, x: Array) -> Array:
    return matmul(x.astype(self.dtype), self.embedding[...].astype(self.dtype), transpose_w=True,
                  out_dtype=jnp.float32)


class Unembed(nnx.Module):
  """Untied output projection [embed, vocab] (no bias, as GPT-2)."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    self.dtype = jnp.dtype(cfg.dtype)
    self.kernel = param(rngs, normal(cfg.init_std), (cfg.d_model, cfg.vocab_size), ('embed', 'vocab'),
                        jnp.dtype(cfg.param_dtype))

  def __call__(self, x: Array) -> Array:
    return matmul(x.astype(self.dtype), self.kernel[...].astype(self.dtype), out_dtype=jnp.float32)
