"""Mixture of experts (model.num_experts > 0): a routed MLP replacing the dense MLP of every `moe_every`-th block.

  router        logits = x W_router [.., E] (float32); ROUTERS: `topk_softmax` (Mixtral: the k largest logits'
                softmax = the top-k softmax probabilities renormalised to sum to 1) or `softmax_topk` (Qwen2-MoE /
                OLMoE with norm_topk_prob=False: the top-k of the softmax over all E, not renormalised). Both pick
                the same k experts; only the combine weights differ.
  experts       E copies of the model.mlp kind (gated or not), d_model -> expert_d_ff -> d_model, stacked along a
                leading dimension with the logical axis name 'expert' (mesh.expert shards it: expert parallelism).
  shared        model.num_shared_experts = n: one MLP of width n * expert_d_ff that every token goes through
                (DeepSeek / Qwen2-MoE), scaled by a sigmoid gate sigmoid(x w) when model.moe_shared_gate (Qwen2-MoE).
  dispatch      IMPLEMENTATIONS (model.moe_impl), the same function up to float rounding (and drops):
                  dropless  token copies sorted by expert, each expert's contiguous rows one `jax.lax.ragged_dot`
                            (MaxText's sparse_matmul): no drops, no padding, FLOPs ~ k / E of `dense` (but XLA:CPU
                            runs ragged_dot slowly: benchmarks/RESULTS.md). Under mesh.expert > 1 the compiler
                            partitions the ragged matmuls itself (correct, tested equal; it may gather the expert
                            weights: a shard_map all-to-all as MaxText's is the follow-up for large meshes).
                  capacity  per-sequence buffers of C = ceil(capacity_factor * T * k / E) slots per expert
                            (GShard / Switch, MaxText's dense_matmul): first choices are placed before second
                            choices, earlier tokens before later; a token copy past its expert's capacity is dropped
                            (its share of the MoE output is 0: only the residual carries the token). Dispatch and
                            combine are one-hot einsums, so under a mesh with an 'expert' axis the buffer
                            [E, B, C, D] is constrained to ('expert', 'batch', ...) and the compiler inserts the
                            token exchange (all-to-all / reduce-scatter) from the sharding constraints alone.
                  dense     every expert on every token, outputs masked by the combine weights: E / k times the
                            compute; the reference the tests compare the others with.
Why the per-layer router statistics are sown (nnx.Intermediate) only when `collect_stats` is set: the train step
sets it on the model it builds (collect_stats(model)) and pops them after the forward pass (pop_stats), so
evaluation and KV-cache decoding trace exactly what they traced without it, and nothing is sown into a module held
by an outer trace (decoding loops). Dense models (num_experts=0) contain no MoE module: nothing changes for them.

Layers: block i (0-based, in each stack) is MoE iff (i + 1) % moe_every == 0 (Qwen2-MoE's decoder_sparse_step
counting: moe_every=2 makes layers 1, 3, ...; 1 = every layer). A scanned stack (model.scan_layers) has one block
body, so it needs moe_every=1 (config validation says so).

The Hugging Face interop (Mixtral / Qwen2-MoE / OLMoE: per-expert w1/w3/w2 or gate/up/down_proj, or transformers'
fused gate_up_proj / down_proj <-> stacked wi_gate/wi/wo; router `gate.weight` <-> `router` transposed) is
jaxformer/hf/families.py's. model(..., return_intermediates=True) gives each MoE layer's router logits
('router_logits', transformer.Intermediates).
"""
from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer import logical
from jaxformer.model import layers

if TYPE_CHECKING:
  from jaxformer.model.config import ModelConfig

Array = jax.Array
EXPERT = 'expert'  # the logical axis of the stacked expert dimension (config.mesh.logical_axis_rules maps it)


@dataclasses.dataclass(frozen=True)
class Router:
  """One model.router choice: renormalise = the k selected probabilities are rescaled to sum to 1."""
  renormalise: bool
  doc: str


ROUTERS: dict[str, Router] = {
    'topk_softmax': Router(True, 'softmax over the k largest logits (Mixtral; = top-k softmax renormalised)'),
    'softmax_topk': Router(False, 'top-k of the softmax over all experts, not renormalised (Qwen2-MoE, OLMoE)'),
}
IMPLEMENTATIONS = ('dropless', 'capacity', 'dense')  # model.moe_impl


def is_moe_layer(cfg: ModelConfig, index: int) -> bool:
  """Whether block `index` (0-based) of a stack is a MoE block: every moe_every-th, counting from 1."""
  return cfg.num_experts > 0 and (index + 1) % cfg.moe_every == 0


def expert_width(cfg: ModelConfig) -> int:
  """Each expert's hidden width: model.expert_d_ff, 0 = model.d_ff."""
  return cfg.expert_d_ff or cfg.d_ff


def capacity(capacity_factor: float, tokens: int, k: int, num_experts: int) -> int:
  """Slots per expert per sequence of `tokens` tokens: ceil(capacity_factor * tokens * k / E), at least 1."""
  return max(1, math.ceil(capacity_factor * tokens * k / num_experts))


class MoE(nnx.Module):
  """The routed MLP: router + E stacked experts (+ shared expert). x [B,T,D] -> [B,T,D]."""

  def __init__(self, cfg: ModelConfig, *, out_std: float | None = None, rngs: nnx.Rngs):
    e, d, f = cfg.num_experts, cfg.d_model, expert_width(cfg)
    pdt, std = jnp.dtype(cfg.param_dtype), cfg.init_std
    out_std = std if out_std is None else out_std
    kind = layers.MLPS[cfg.mlp]
    self.num_experts, self.k, self.impl = e, cfg.experts_per_token, cfg.moe_impl
    self.capacity_factor, self.renormalise = cfg.capacity_factor, ROUTERS[cfg.router].renormalise
    self.activation, self.dtype = kind.activation, jnp.dtype(cfg.dtype)
    self.router = layers.param(rngs, layers.normal(std), (d, e), ('embed', None), pdt)
    self.wi = layers.param(rngs, layers.normal(std), (e, d, f), (EXPERT, 'embed', 'mlp'), pdt)
    self.wi_gate = (layers.param(rngs, layers.normal(std), (e, d, f), (EXPERT, 'embed', 'mlp'), pdt)
                    if kind.gated else None)
    self.wo = layers.param(rngs, layers.normal(out_std), (e, f, d), (EXPERT, 'mlp', 'embed'), pdt)
    self.wi_bias = layers.param(rngs, layers.zeros, (e, f), (EXPERT, 'mlp'), pdt) if cfg.use_bias else None
    self.wo_bias = layers.param(rngs, layers.zeros, (e, d), (EXPERT, 'embed'), pdt) if cfg.use_bias else None
    n = cfg.num_shared_experts
    self.shared = (layers.MLP(dataclasses.replace(cfg, d_ff=n * f), out_std=out_std, rngs=rngs) if n else None)
    self.shared_gate = (layers.param(rngs, layers.normal(std), (d, 1), ('embed', None), pdt)
                        if n and cfg.moe_shared_gate else None)
    self.collect_stats = False  # set by collect_stats(model) in the train step

  # ------------------------------------------------------------------------------------------------- routing
  def route(self, x: Array) -> tuple[Array, Array, Array]:
    """x [..., D] -> (router logits float32 [..., E], expert ids int32 [..., k], combine weights float32 [..., k])."""
    logits = layers.matmul(x.astype(jnp.float32), self.router[...].astype(jnp.float32))
    probs = jax.nn.softmax(logits, axis=-1)
    top, ids = jax.lax.top_k(probs, self.k)
    if self.renormalise:
      top = top / jnp.sum(top, axis=-1, keepdims=True)
    return logits, ids.astype(jnp.int32), top

  # ------------------------------------------------------------------------------------------------- experts
  def _hidden(self, h: Array, gate: Array | None) -> Array:
    return self.activation(h) if gate is None else self.activation(gate) * h

  def _lora(self, name: str, x: Array, y: Array, group_sizes: Array | None = None) -> Array:
    """y (rows x times expert kernel `name`) plus its LoRA update when PEFT attached one (jaxformer/peft/lora.py's
    ExpertLoRA: `stacked` for [E, ..., in] rows, `ragged` for expert-sorted rows with group_sizes)."""
    lora = getattr(self, 'lora', None)
    if lora is None or name not in lora:
      return y
    update = lora[name].stacked(x) if group_sizes is None else lora[name].ragged(x, group_sizes)
    return y + update.astype(y.dtype)

  def experts_einsum(self, xe: Array) -> Array:
    """Every expert on its own rows: xe [E, ..., D] -> [E, ..., D] (dense and capacity dispatch)."""
    w = lambda p: p[...].astype(self.dtype)
    bias = lambda b, y: y if b is None else y + w(b).reshape(b.shape[:1] + (1,) * (y.ndim - 2) + b.shape[1:])
    h = bias(self.wi_bias, self._lora('wi', xe, jnp.einsum('e...d,edf->e...f', xe, w(self.wi))))
    gate = None if self.wi_gate is None else self._lora(
        'wi_gate', xe, jnp.einsum('e...d,edf->e...f', xe, w(self.wi_gate)))
    hidden = self._hidden(h, gate)
    return bias(self.wo_bias, self._lora('wo', hidden, jnp.einsum('e...f,efd->e...d', hidden, w(self.wo))))

  def experts_ragged(self, xs: Array, group_sizes: Array, expert_of_row: Array) -> Array:
    """Rows sorted by expert, xs [M, D] with group_sizes [E] rows per expert -> [M, D] (dropless dispatch)."""
    w = lambda p: p[...].astype(self.dtype)
    bias = lambda b, y: y if b is None else y + jnp.take(w(b), expert_of_row, axis=0)
    h = bias(self.wi_bias, self._lora('wi', xs, jax.lax.ragged_dot(xs, w(self.wi), group_sizes), group_sizes))
    gate = None if self.wi_gate is None else self._lora(
        'wi_gate', xs, jax.lax.ragged_dot(xs, w(self.wi_gate), group_sizes), group_sizes)
    hidden = self._hidden(h, gate)
    return bias(self.wo_bias, self._lora('wo', hidden, jax.lax.ragged_dot(hidden, w(self.wo), group_sizes),
                                         group_sizes))

  # ------------------------------------------------------------------------------------------------ dispatch
  def _dense(self, x: Array, ids: Array, weights: Array) -> tuple[Array, Array]:
    """Every expert on every token; y = sum_e combine[e] * expert_e(x)."""
    b, t, d = x.shape
    flat = x.reshape(b * t, d)
    ye = self.experts_einsum(jnp.broadcast_to(flat, (self.num_experts, b * t, d)))  # [E, N, D]
    combine = jnp.sum(jax.nn.one_hot(ids, self.num_experts, dtype=jnp.float32) * weights[..., None], axis=-2)
    y = jnp.einsum('ne,end->nd', combine.reshape(b * t, -1).astype(ye.dtype), ye)
    return y.reshape(b, t, d), jnp.ones(ids.shape, bool)

  def _dropless(self, x: Array, ids: Array, weights: Array) -> tuple[Array, Array]:
    """Token copies sorted by expert id, one ragged matmul per projection, unsorted and weighted back."""
    b, t, d = x.shape
    n, k = b * t, self.k
    flat_ids = ids.reshape(n * k)
    order = jnp.argsort(flat_ids, stable=True)  # copy j of token i sits at i * k + j
    sorted_ids = flat_ids[order]
    xs = jnp.take(x.reshape(n, d), order // k, axis=0)
    group_sizes = jnp.bincount(flat_ids, length=self.num_experts).astype(jnp.int32)
    ys = self.experts_ragged(xs, group_sizes, sorted_ids)
    y = jnp.zeros_like(ys).at[order].set(ys).reshape(n, k, d)
    y = jnp.einsum('nkd,nk->nd', y, weights.reshape(n, k).astype(y.dtype))
    return y.reshape(b, t, d), jnp.ones(ids.shape, bool)

  def _capacity(self, x: Array, ids: Array, weights: Array) -> tuple[Array, Array]:
    """Per-sequence expert buffers [E, B, C, D]; copies past capacity are dropped (kept [B,T,k] says which)."""
    b, t, d = x.shape
    e, k = self.num_experts, self.k
    c = capacity(self.capacity_factor, t, k, e)
    onehot = jax.nn.one_hot(ids, e, dtype=jnp.int32)  # [B,T,k,E]
    # priority: every token's first choice, then every second choice, ... (GShard); within a choice, token order
    choice_major = jnp.swapaxes(onehot, 1, 2).reshape(b, k * t, e)
    position = jnp.sum((jnp.cumsum(choice_major, axis=1) - 1) * choice_major, axis=-1)  # slot in its expert
    position = jnp.swapaxes(position.reshape(b, k, t), 1, 2)  # [B,T,k]
    kept = position < c
    slot = jax.nn.one_hot(jnp.where(kept, position, c), c, dtype=jnp.float32)  # dropped: all zero
    dispatch = jnp.einsum('btke,btkc->btec', onehot.astype(jnp.float32), slot)  # [B,T,E,C]
    combine = jnp.einsum('btke,btkc,btk->btec', onehot.astype(jnp.float32), slot, weights)
    xe = jnp.einsum('btec,btd->ebcd', dispatch.astype(x.dtype), x)
    xe = logical.constrain(xe, (EXPERT, 'batch', None, 'embed'))  # the token exchange, done by the compiler
    ye = logical.constrain(self.experts_einsum(xe), (EXPERT, 'batch', None, 'embed'))
    y = jnp.einsum('btec,ebcd->btd', combine.astype(ye.dtype), ye)
    return y, kept

  # ---------------------------------------------------------------------------------------------------- call
  def __call__(self, x: Array, return_router_logits: bool = False) -> Array | tuple[Array, Array]:
    """x [B,T,D] -> [B,T,D]; with return_router_logits also the router's logits float32 [B,T,E] (what
    transformers' output_router_logits gives per MoE layer, there flattened to [B*T, E])."""
    x = x.astype(self.dtype)
    logits, ids, weights = self.route(x)
    dispatch: dict[str, Callable[..., tuple[Array, Array]]] = {
        'dropless': self._dropless, 'capacity': self._capacity, 'dense': self._dense}
    y, kept = dispatch[self.impl](x, ids, weights)
    if self.shared is not None:
      s = self.shared(x)
      if self.shared_gate is not None:
        s = s * jax.nn.sigmoid(layers.matmul(x, self.shared_gate[...].astype(self.dtype)))
      y = y + s
    if self.collect_stats:
      # an Intermediate attribute (what sow writes, without its deprecated outside-nnx.capture path); pop_stats
      # removes it, so the state the train step splits back out has the structure it started with
      self.moe_stats = nnx.Intermediate(router_stats(logits, ids, kept, self.num_experts))
    y = logical.constrain(y, logical.HIDDEN)
    return (y, logits) if return_router_logits else y


# ------------------------------------------------------------------------------------------ losses / metrics
def router_stats(logits: Array, ids: Array, kept: Array, num_experts: int) -> dict[str, Array]:
  """One layer's router losses and metrics over all its tokens (padding included), float32:
    aux       E * sum_e f_e P_e: f_e = token copies sent to e / tokens (sums to k over e), P_e = mean router
              probability of e (Switch eq. 4-6; transformers' load_balancing_loss_func for one layer); k at balance
    z         mean logsumexp(logits)^2 (ST-MoE's router z-loss)
    load      [E] share of the token copies routed to each expert (sums to 1)
    dropped   share of the token copies dropped for capacity (0 for dropless / dense)
    entropy   mean entropy (nats) of the router's softmax over all experts."""
  logits = logits.reshape(-1, num_experts).astype(jnp.float32)
  n = logits.shape[0]
  probs = jax.nn.softmax(logits, axis=-1)
  counts = jnp.sum(jax.nn.one_hot(ids.reshape(-1), num_experts, dtype=jnp.float32), axis=0)  # [E]
  aux = num_experts * jnp.sum(counts / n * jnp.mean(probs, axis=0))
  lse = jax.nn.logsumexp(logits, axis=-1)
  log_p = jax.nn.log_softmax(logits, axis=-1)
  return {'aux': aux, 'z': jnp.mean(jnp.square(lse)), 'load': counts / jnp.sum(counts),
          'dropped': 1.0 - jnp.mean(kept.astype(jnp.float32)), 'entropy': jnp.mean(-jnp.sum(probs * log_p, -1))}


def collect_stats(model: nnx.Module, on: bool = True) -> None:
  """Makes every MoE layer of `model` sow its router statistics on the next call (the train step asks)."""
  for _, module in nnx.iter_modules(model):
    if isinstance(module, MoE):
      module.collect_stats = on


def pop_stats(model: nnx.Module) -> dict[str, Array] | None:
  """The router statistics sown since collect_stats, removed from the model and averaged over the MoE layers
  (a scanned stack's come stacked [L, ...]); None when nothing was sown (a dense model)."""
  sown = nnx.to_pure_dict(nnx.pop(model, nnx.Intermediate))
  per_layer = [leaf for leaf in jax.tree.leaves(sown, is_leaf=lambda x: isinstance(x, dict) and 'aux' in x)
               if isinstance(leaf, dict) and 'aux' in leaf]
  if not per_layer:
    return None
  out = {}
  for key in per_layer[0]:
    base = per_layer[0][key].shape[-1:] if key == 'load' else ()
    out[key] = jnp.mean(jnp.concatenate([s[key].reshape((-1,) + base) for s in per_layer]), axis=0)
  return out


def num_active_params(cfg: ModelConfig, num_params: int) -> int:
  """Parameters one token goes through: the total less the (E - k) unused experts of every MoE layer."""
  if not cfg.num_experts:
    return num_params
  per_expert = (3 if layers.MLPS[cfg.mlp].gated else 2) * cfg.d_model * expert_width(cfg)
  per_expert += (expert_width(cfg) + cfg.d_model) if cfg.use_bias else 0
  stacks = [cfg.num_layers] + ([cfg.num_decoder_layers] if cfg.arch == 'encoder_decoder' else [])
  moe_layers = sum(n // cfg.moe_every for n in stacks)
  return num_params - moe_layers * (cfg.num_experts - cfg.experts_per_token) * per_expert


def moe_layer_count(cfg: ModelConfig, num_layers: int) -> int:
  """MoE blocks in a stack of num_layers (0 for a dense model)."""
  return 0 if not cfg.num_experts else num_layers // cfg.moe_every


def stats_names(cfg: Any) -> list[str]:
  """The train-row metric names a MoE model adds (for documentation and tests)."""
  return (['moe_aux_loss', 'moe_z_loss', 'moe_dropped_fraction', 'router_entropy']
          + [f'expert_load/{e}' for e in range(cfg.num_experts)])
