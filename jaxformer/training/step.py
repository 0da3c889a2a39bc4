"""Losses, the layout of the train state, and the jitted, sharded train step (training/state.py builds the state).

The train state is a plain dict pytree, so jit, orbax and the sharding helpers all see the same thing:
  {'step': int32 scalar, 'params': nnx.State of nnx.Param, 'opt_state': optax state, 'rngs': nnx.State of the
   model's non-parameter variables (its rng streams: key + count)}
With a PEFT method (config.peft) 'params' still holds every parameter, but the step differentiates and updates
only the trainable split (peft.split) and 'opt_state' covers only that split: frozen parameters get no gradient,
no optimizer state and no weight decay.
and the model's static structure is the `graphdef`. A step merges graphdef + state into a module, runs it, and
splits the updated state back out (the functional NNX pattern), so the state can be donated and sharded with
explicit in/out shardings.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxformer import align
from jaxformer import heads
from jaxformer import metrics as metrics_lib
from jaxformer import peft as peft_lib
from jaxformer import sharding as shd
from jaxformer.data.rows import model_inputs
from jaxformer.data.tokenizers import unscored_target
from jaxformer.model import moe as moe_lib

Batch = Mapping[str, jax.Array]


# ----------------------------------------------------------------------------------------------------- losses
def model_logits(model: nnx.Module, batch: Batch, *, deterministic: bool) -> jax.Array:
  """The model called on the batch: its keys other than the labels are the model's argument names (data.rows)."""
  return model(**model_inputs(batch), deterministic=deterministic)


def token_losses(logits: jax.Array, targets: jax.Array, *, label_smoothing: float = 0.0,
                 z_loss: float = 0.0) -> tuple[jax.Array, jax.Array]:
  """(cross_entropy, objective) per token, both float32 [..., L].

  cross_entropy is the plain -log p(target) (what perplexity needs); objective adds label smoothing (the KL to the
  smoothed target, so its minimum is 0) and the z-loss z * logsumexp(logits)^2 (PaLM), and is what gets
  differentiated.
  """
  logits = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  ids = jnp.maximum(targets, 0).astype(jnp.int32)  # an unscored -1 gathers id 0 (and gets weight 0)
  target_logit = jnp.take_along_axis(logits, ids[..., None], axis=-1)[..., 0]
  log_p = target_logit - lse
  ce = -log_p
  objective = ce
  if label_smoothing > 0:
    vocab = logits.shape[-1]
    confidence = 1.0 - label_smoothing
    low = label_smoothing / (vocab - 1)
    sum_log_p = jnp.sum(logits, axis=-1) - vocab * lse
    smoothed = -(confidence * log_p + low * (sum_log_p - log_p))
    normalizer = -(confidence * np.log(confidence) + (vocab - 1) * low * np.log(low + 1e-20))
    objective = smoothed - normalizer
  if z_loss > 0:
    objective = objective + z_loss * jnp.square(lse)
  return ce, objective


def token_weights(targets: jax.Array, unscored: int = 0) -> jax.Array:
  """float32 loss weight per target token: 1 where the target is a real token, 0 where it is `unscored` (the
  tokenizer's marker, data.tokenizers.unscored_target: jaxformer's pad id 0, or -1 when id 0 is a real token)."""
  return ((targets >= 0) & (targets != unscored)).astype(jnp.float32)


def loss_targets(batch: Batch, config) -> tuple[jax.Array, int]:
  """(what the logits are scored against, its unscored marker), as the model's head defines them (heads/: the
  per-token `targets` and the tokenizer's marker for lm, the per-row `labels` and -1 for classification)."""
  return heads.head_of(config.model).targets(batch, unscored_target(config))


def loss_sums(model: nnx.Module, batch: Batch, config, *, deterministic: bool,
              length_tables: Mapping[str, jax.Array] | None = None,
              confusion: bool = False, logits: jax.Array | None = None) -> tuple[jax.Array, dict]:
  """(objective_sum, metrics) with token-weighted sums, so micro-batches and hosts aggregate exactly; `logits`:
  the model's output on the batch when the caller already has it (evaluation of a head that observes them).

  The same code serves all architectures: the data pipeline already puts next tokens (decoder_only), the original
  tokens at the masked positions (encoder_only) or the shifted target (encoder_decoder) in `targets`, and a
  token counts exactly when its target is not the tokenizer's unscored marker (token_weights). length_tables
  (metrics.length_tables(tokenizer)) adds byte_sum / char_sum, the text the weighted targets decode to (for bits
  per byte / character). A head with per-row logits (classification: [B, C] against `labels` [B]) is scored the
  same way (weight_sum counts examples); confusion=True adds its [C, C] confusion matrix (rows: labels).
  """
  if logits is None:
    logits = model_logits(model, batch, deterministic=deterministic)
  targets, unscored = loss_targets(batch, config)
  weights = token_weights(targets, unscored)
  train = config.train
  ce, objective = token_losses(logits, targets, label_smoothing=float(train.label_smoothing),
                               z_loss=float(train.z_loss))
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  metrics = {
      'loss_sum': jnp.sum(ce * weights),
      'weight_sum': jnp.sum(weights),
      'correct_sum': jnp.sum(correct * weights),
      **metrics_lib.length_sums(targets, weights, length_tables),
  }
  if confusion:
    metrics['confusion'] = metrics_lib.confusion_matrix(targets, jnp.argmax(logits, axis=-1), weights,
                                                        logits.shape[-1])
  return jnp.sum(objective * weights), metrics


def reference_model_params(params: nnx.State, reference: nnx.State, peft) -> nnx.State:
  """The reference model's whole parameters: its trainable part (training/state.reference_params) over the run's
  own frozen parameters (under PEFT the base: never copied)."""
  return nnx.merge_state(peft_lib.split(params, peft)[1], reference)


def with_reference(batch: Batch, config, reference_model: nnx.Module | None) -> Batch:
  """The batch with the reference model's log-probabilities (align.pairwise.REFERENCE_KEYS) when the run's
  objective compares against a reference (align.method=dpo) and the data did not bring them precomputed."""
  objective = align.objective_of(config)
  if objective is None or not objective.needs_reference or align.pairwise.REFERENCE_KEYS[0] in batch:
    return batch
  if reference_model is None:
    raise ValueError(f'align.method={config.align.method} needs the reference model (training/state.reference_params)')
  ref = objective.reference_logps(reference_model, batch, unscored_target(config))
  return {**batch, **jax.lax.stop_gradient(ref)}


def objective_sums(model: nnx.Module, batch: Batch, config, *, deterministic: bool,
                   length_tables: Mapping[str, jax.Array] | None = None,
                   confusion: bool = False) -> tuple[jax.Array, dict]:
  """(objective_sum, metric sums) of the run's objective: the head's cross-entropy (loss_sums), or a pair
  objective (align.objective_of: a reward model's Bradley-Terry loss, DPO, SimPO) whose weight_sum counts pairs."""
  objective = align.objective_of(config)
  if objective is None:
    return loss_sums(model, batch, config, deterministic=deterministic, length_tables=length_tables,
                     confusion=confusion)
  return objective.sums(model, batch, config, unscored_target(config), deterministic=deterministic)


def weight_total(batch: Batch, config) -> jax.Array:
  """What the batch's objective is averaged over (target tokens, examples or pairs), known before the forward."""
  objective = align.objective_of(config)
  if objective is None:
    return jnp.sum(token_weights(*loss_targets(batch, config)))
  return jnp.sum(objective.weights(batch, unscored_target(config)))


def compute_loss(model: nnx.Module, batch: Batch, config, *, deterministic: bool,
                 length_tables: Mapping[str, jax.Array] | None = None,
                 confusion: bool = False) -> tuple[jax.Array, dict]:
  """(loss, metrics): loss = the weighted mean objective of this batch; metrics holds the float32 sums
  loss_sum (plain cross-entropy, or the pair loss), weight_sum (target tokens / examples / pairs) and correct_sum
  for exact aggregation (and byte_sum / char_sum when length_tables are given, an objective's own sums)."""
  objective_sum, metrics = objective_sums(model, batch, config, deterministic=deterministic,
                                          length_tables=length_tables, confusion=confusion)
  return objective_sum / jnp.maximum(metrics['weight_sum'], 1.0), metrics


def add_moe_losses(model: nnx.Module, objective_sum: jax.Array, metrics: dict, config) -> tuple[jax.Array, dict]:
  """A MoE model's router losses (moe.pop_stats: averaged over its MoE layers) added to the objective, weighted by
  train.moe_aux_loss_coef / moe_z_loss_coef and by the batch's weight_sum (so that, divided by the step's weight
  total, each micro-batch's term counts as its share of the tokens), and their sums added to the metrics. The model
  must have been called with moe.collect_stats set; a dense model is returned unchanged."""
  stats = moe_lib.pop_stats(model)
  if stats is None:
    return objective_sum, metrics
  w = metrics['weight_sum']
  train = config.train
  objective_sum = objective_sum + w * (float(train.moe_aux_loss_coef) * stats['aux']
                                       + float(train.moe_z_loss_coef) * stats['z'])
  return objective_sum, {**metrics, **moe_stat_sums(stats, w)}


def moe_stat_sums(stats: dict[str, jax.Array], weight_sum: jax.Array) -> dict[str, jax.Array]:
  """moe.pop_stats' statistics as metric sums (MOE_SUM + name: weight_sum * value), so that batches and
  micro-batches aggregate by their share of the tokens, as the loss does; the names are moe.stats_names'."""
  sums = {'moe_aux_loss': stats['aux'], 'moe_z_loss': stats['z'], 'moe_dropped_fraction': stats['dropped'],
          'router_entropy': stats['entropy'], **{f'expert_load/{e}': v for e, v in enumerate(stats['load'])}}
  return {f'{MOE_SUM}{name}': weight_sum * v for name, v in sums.items()}


def moe_means(sums: Mapping[str, float] | None, weight_sum: float) -> dict[str, float]:
  """The MoE statistics among accumulated metric sums (MOE_SUM keys), divided by their weight: {name: mean}."""
  return {key[len(MOE_SUM):]: value / max(weight_sum, 1.0) for key, value in (sums or {}).items()
          if key.startswith(MOE_SUM)}


MOE_SUM = 'moe_sum:'  # metric keys holding weight_sum * a MoE statistic (the step divides them by its weight total)


# ------------------------------------------------------------------------------------------------ train state
def split_model(model: nnx.Module):
  """graphdef, params (nnx.Param), rest (every other variable: rng streams and the like)."""
  return nnx.split(model, nnx.Param, ...)


@dataclasses.dataclass
class TrainSetup:
  """Everything static about a training run on one mesh (built by training/state.make_setup)."""
  graphdef: Any
  tx: optax.GradientTransformation
  schedule: Callable[[jax.Array], jax.Array]
  mesh: Mesh
  rules: tuple
  abstract_state: Any  # ShapeDtypeStruct tree (with .sharding) of the train state
  state_shardings: Any
  config: Any  # the run's resolved settings

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, PartitionSpec())


def merge_model(graphdef, params, rest) -> nnx.Module:
  """A module from the split state. The states are copied first (fresh Variable objects in the current trace):
  nnx.merge reuses the Variables of the State it is given, and a Variable created outside a jax transform (e.g.
  the rng count of a dropout stream, merged inside value_and_grad) may not be mutated inside it."""
  copy = lambda tree: jax.tree.map(lambda x: x, tree)
  return nnx.merge(graphdef, copy(params), copy(rest))


# ----------------------------------------------------------------------------------------------------- steps
def split_microbatches(batch: Batch, k: int) -> Batch:
  """[B, ...] -> [k, B/k, ...] with micro-batch j = rows j, j+k, j+2k, ...; the row axis keeps its sharding
  (each device's contiguous block of rows is split among the micro-batches), so no data moves."""
  def one(x):
    x = x.reshape((x.shape[0] // k, k) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)
  return jax.tree.map(one, batch)


def make_train_step(config, setup: TrainSetup, steps_per_call: int = 1) -> Callable[[dict, Batch], tuple[dict, dict]]:
  """The jitted train step: (state, batch) -> (state, metrics); state donated, shardings explicit.

  With train.grad_accum_steps = k the batch is split into k micro-batches and a lax.scan sums their gradients of
  the token-weighted loss sums; dividing by the total token count gives exactly the gradient of the k-times
  larger batch, then one optimizer update is applied.

  With steps_per_call = n > 1 (the loop passes train.steps_per_call) the callable takes n batches stacked on a
  new leading axis ([n, B, ...], that axis unsharded, B sharded as usual) and runs n full optimizer steps in one
  jitted call (a lax.scan of the same step function, so the math is the same); every metric comes back stacked
  ([n], one entry per step). This amortises the per-call dispatch and host sync, which matters on CPU.
  """
  graphdef, tx, schedule = setup.graphdef, setup.tx, setup.schedule
  k = int(config.train.grad_accum_steps)
  n_steps = int(steps_per_call)
  if n_steps < 1:
    raise ValueError(f'steps_per_call={steps_per_call!r} must be a positive integer')

  def grads_of(params, frozen, rest, batch, denom):
    def loss_fn(p):  # p: the trainable params; the frozen ones are an input, so they get no gradient
      model = merge_model(graphdef, nnx.merge_state(frozen, p), rest)
      peft_lib.set_training(model, True)
      moe_lib.collect_stats(model)  # a MoE model sows its router statistics; add_moe_losses pops them
      objective_sum, metrics = objective_sums(model, batch, config, deterministic=False)
      objective_sum, metrics = add_moe_losses(model, objective_sum, metrics, config)
      _, _, new_rest = split_model(model)
      # Scaled by the whole batch's token count here, not after: the gradient comes out already normalised
      # (one scalar multiply in the backward pass instead of a division per parameter).
      return objective_sum / denom, (metrics, new_rest, objective_sum)
    (_, (metrics, new_rest, objective_sum)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    metrics = dict(metrics, objective_sum=objective_sum)
    return grads, metrics, new_rest

  objective = align.objective_of(config)
  extra_names = {} if objective is None else objective.names

  def step_fn(state, batch, reference):
    params, frozen = peft_lib.split(state['params'], config.peft)
    rest = state['rngs']
    if reference is not None:  # the frozen reference model (align.method=dpo): its log-probabilities, no gradient
      batch = with_reference(batch, config, merge_model(graphdef, nnx.merge_state(frozen, reference), rest))
    # The weights depend on the targets alone, so the batch's token count is known before the forward pass.
    denom = jnp.maximum(weight_total(batch, config), 1.0)
    if k == 1:
      grads, metrics, rest = grads_of(params, frozen, rest, batch, denom)
    else:
      micro = split_microbatches(batch, k)

      def body(carry, mb):
        g_acc, m_acc, r = carry
        g, m, r = grads_of(params, frozen, r, mb, denom)
        return (jax.tree.map(jnp.add, g_acc, g), jax.tree.map(jnp.add, m_acc, m), r), None

      zeros_g = jax.tree.map(jnp.zeros_like, params)
      first = jax.tree.map(lambda x: x[0], micro)
      zeros_m = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype),
                             jax.eval_shape(lambda: grads_of(params, frozen, rest, first, denom)[1]))
      (grads, metrics, rest), _ = jax.lax.scan(body, (zeros_g, zeros_m, rest), micro)
    updates, opt_state = tx.update(grads, state['opt_state'], params)
    new_params = nnx.merge_state(frozen, optax.apply_updates(params, updates))
    out = {
        'loss': metrics['loss_sum'] / denom,
        'objective': metrics['objective_sum'] / denom,
        'tokens': metrics['weight_sum'],
        'grad_norm': optax.tree.norm(grads),
        'learning_rate': schedule(state['step']),
        **{name: metrics[key] / denom for name, key in extra_names.items()},
        **{key[len(MOE_SUM):]: value / denom for key, value in metrics.items() if key.startswith(MOE_SUM)},
    }
    if objective is None or objective.has_accuracy:
      out['accuracy'] = metrics['correct_sum'] / denom
    new_state = {'step': state['step'] + 1, 'params': new_params, 'opt_state': opt_state, 'rngs': rest}
    return new_state, out

  def multi_step_fn(state, batches, reference):
    # metrics stacked along the leading (step) axis
    return jax.lax.scan(lambda s, b: step_fn(s, b, reference), state, batches)

  fn = step_fn if n_steps == 1 else multi_step_fn
  jitted = {}
  reference_sh = peft_lib.trainable(setup.state_shardings['params'], config.peft)

  def jitted_for(batch, reference):
    # the shapes too: a length that mesh.sequence does not divide is placed whole (shd.batch_sharding)
    keys = (tuple(sorted(batch)), reference is None, tuple(tuple(batch[k].shape) for k in sorted(batch)))
    if keys not in jitted:
      keys_of_batch = keys[0]
      length = lambda x, dim: x.shape[dim] if x.ndim > dim else None  # noqa: E731
      if n_steps == 1:
        batch_sh = {key: shd.batch_sharding(setup.mesh, setup.rules, batch[key].ndim, length(batch[key], 1))
                    for key in keys_of_batch}
      else:
        for key in keys_of_batch:
          if batch[key].shape[0] != n_steps:
            raise ValueError(f'steps_per_call={n_steps} needs batches stacked on a leading axis of size {n_steps}; '
                             f'{key!r} has shape {batch[key].shape}')
        batch_sh = {key: shd.stacked_batch_sharding(setup.mesh, setup.rules, batch[key].ndim, length(batch[key], 2))
                    for key in keys_of_batch}
      jitted[keys] = jax.jit(fn, in_shardings=(setup.state_shardings, batch_sh,
                                               None if reference is None else reference_sh),
                             out_shardings=(setup.state_shardings, setup.replicated), donate_argnums=(0,))
    return jitted[keys]

  def train_step(state, batch, reference=None):
    """reference: the trainable part of the frozen reference model's parameters (training/state.reference_params)
    for an objective that needs one (align.method=dpo without precomputed log-probabilities)."""
    fn = jitted_for(batch, reference)
    with shd.mesh_context(setup.mesh, setup.rules):
      return fn(state, batch, reference)

  def lower(state, batch, reference=None):
    """The step lowered for (abstract) state and batch, e.g. setup.abstract_state and ShapeDtypeStructs: compile
    it and read .memory_analysis() or time the compilation without allocating or running anything."""
    fn = jitted_for(batch, reference)
    with shd.mesh_context(setup.mesh, setup.rules):
      return fn.lower(state, batch, reference)

  train_step.lower = lower
  return train_step
