"""The one evaluation path: `Evaluator` scores a split with training's loss, for the training loop's eval rows and
for eval.py (jaxformer/apps/evaluate.py), so both score exactly the same tokens with the same code. What is scored
and which numbers come out is the model head's (jaxformer/heads: targets, length tables, eval_row / results).
"""
from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxformer import align
from jaxformer import data as data_lib
from jaxformer import heads
from jaxformer import metrics as metrics_lib
from jaxformer import sharding as shd
from jaxformer.model import moe as moe_lib
from jaxformer.training import step as step_lib


def _warn(msg: str) -> None:
  """A warning on stderr, so printed translations / generations on stdout stay clean to redirect."""
  if jax.process_index() == 0:
    print(f'WARNING: {msg}', file=sys.stderr, flush=True)


@functools.lru_cache(maxsize=8)
def _jitted_eval_step(graphdef: Any, config: Any, mesh: Any):
  """Training's compute_loss on one batch -> its metric sums, jitted once per (model, settings, mesh): evaluating
  another checkpoint of the same model in this process (or at the next eval step) reuses the compiled step."""
  head = heads.head_of(config.model)
  confusion = head.confusion

  def sums(params, rest, batch, length_tables, reference=None):
    if head.observes:  # (metric sums, the logits the head decodes on the host)
      model = step_lib.merge_model(graphdef, params, rest)
      logits = step_lib.model_logits(model, batch, deterministic=True)
      _, metrics = step_lib.loss_sums(model, batch, config, deterministic=True, length_tables=length_tables,
                                      logits=logits)
      return metrics, logits
    if reference is not None:  # align.method=dpo: the frozen reference's log-probabilities
      reference_params = step_lib.reference_model_params(params, reference, config.peft)
      reference_model = step_lib.merge_model(graphdef, reference_params, rest)
      batch = step_lib.with_reference(batch, config, reference_model)
    model = step_lib.merge_model(graphdef, params, rest)
    moe_lib.collect_stats(model)  # a MoE model's router statistics (a model built in this trace: nothing leaks)
    _, metrics = step_lib.compute_loss(model, batch, config, deterministic=True, length_tables=length_tables,
                                       confusion=confusion)
    stats = moe_lib.pop_stats(model)
    return metrics if stats is None else {**metrics, **step_lib.moe_stat_sums(stats, metrics['weight_sum'])}

  return jax.jit(sums, out_shardings=NamedSharding(mesh, PartitionSpec()))


def eval_steps(config: Any, *, final: bool) -> int:
  """How many batches an evaluation scores (-1: the whole split): train.eval_steps for the periodic evaluations;
  train.final_eval_steps, unless 0, for the one at train.num_steps and for eval.py. A cheap estimate every
  eval_every steps and the whole split once at the end, as nanoGPT's estimate_loss and a final report do."""
  final_steps = int(config.train.final_eval_steps)
  return final_steps if final and final_steps != 0 else int(config.train.eval_steps)


MAX_CACHED_EVAL_BYTES = 64 << 20  # an Evaluator keeps its split's host batches when they fit (~3M tokens): a
# larger split is streamed, so its first evaluation never tokenizes more than this just to find out


def spread(total: int, limit: int) -> list[int]:
  """`limit` batch indices spread evenly over `total` (all of them for limit -1 or >= total): a subset that samples
  the whole split, where its first batches would sample only its beginning (shakespeare_char's first 2 of 14
  validation batches read 0.04 lower than the split)."""
  if limit < 0 or limit >= total:
    return list(range(total))
  return [int((j + 0.5) * total / limit) for j in range(limit)]


class Evaluator:
  """Scores one split with training's loss: the one evaluation path of the training loop and of eval.py, so
  both score exactly the same tokens with the same code.

  The split's batches (this host's rows) are built on the first evaluation and kept, so later ones skip
  tokenizing; train.eval_steps / final_eval_steps = N scores N of them spread evenly over the split (`spread`).
  A split whose batches outgrow MAX_CACHED_EVAL_BYTES is streamed instead, and N then means its first N batches.
  """

  def __init__(self, r: Any, graphdef: Any, split: str, reference: Any = None,
               prepare: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None):
    """r: the run's resolve.Resolved (settings, tokenizer, source, mesh, rules, eval batch size); reference: the
    trainable part of the reference model's parameters, for an objective that compares against one (DPO); prepare:
    applied to each host batch (e.g. adding precomputed reference log-probabilities)."""
    self.prepare = prepare
    self.r = r
    self.split = split
    self.reference = reference
    self._step = _jitted_eval_step(graphdef, r.config, r.mesh)
    self.head = heads.head_of(r.config.model)
    self.scorer = align.scorer_of(r.config)  # the objective's rows (pairs), else the head's
    # bytes / characters per token id, for bits per byte / character (None when targets are not text)
    tables = self.head.length_tables(r.tokenizer, r.config.model.arch)
    self._tables = jax.device_put(tables, NamedSharding(r.mesh, PartitionSpec())) if tables else None
    self._layout = shd.data_layout(r.mesh, r.rules, r.eval_batch_size)
    self._cached: list[dict[str, np.ndarray]] | None = None
    self._streamed = False  # the split was too large to keep
    self.scored: list[int] = []  # the batch indices the last evaluation scored

  def _iterator(self) -> Iterator[dict[str, np.ndarray]]:
    batches = data_lib.make_eval_iterator(self.r.config, self.r.tokenizer, self.r.workdir, self.split,
                                          layout=self._layout, source=self.r.source)
    return batches if self.prepare is None else map(self.prepare, batches)

  def _fill_cache(self) -> None:
    batches, size = [], 0
    for batch in self._iterator():
      size += sum(v.nbytes for v in batch.values())
      if size > MAX_CACHED_EVAL_BYTES:
        self._streamed = True
        _warn(f'split {self.split!r} is over {MAX_CACHED_EVAL_BYTES >> 20} MiB of batches: it is streamed at each '
              'evaluation, and train.eval_steps=N scores its first N batches (not N spread over it).')
        return
      batches.append(batch)
    self._cached = batches

  def host_batches(self, limit: int) -> Iterator[dict[str, np.ndarray]]:
    """This host's rows of the batches an evaluation of `limit` batches (-1: all) scores; sets `scored`."""
    if self._cached is None and not self._streamed:
      self._fill_cache()
    self.scored = []
    if self._cached is not None:
      for i in spread(len(self._cached), limit):
        self.scored.append(i)
        yield self._cached[i]
      return
    for i, batch in enumerate(self._iterator()):
      if 0 <= limit <= i:
        break
      self.scored.append(i)
      yield batch

  def batches(self, limit: int) -> Iterator[dict[str, jax.Array]]:
    """The batches an evaluation of `limit` batches (-1: all) scores, placed on the mesh; sets `scored`."""
    for batch in self.host_batches(limit):
      yield shd.shard_batch(batch, self.r.mesh, self.r.rules, self._layout)

  def read_examples(self, indices: Sequence[int]) -> list[Any]:
    """The split's examples at `indices` (what a batch's example_ids point at)."""
    return self.r.source.split(self.split).read(indices)

  def accumulate(self, params: Any, rest: Any, *, final: bool = True) -> metrics_lib.MetricAccumulator:
    """Token-weighted metric sums over the split's eval batches (global: the jit spans the mesh, so no
    merge_hosts); final=False: a periodic evaluation's (`eval_steps`). Raises DataError when they hold no
    target token."""
    acc = metrics_lib.MetricAccumulator()
    with shd.mesh_context(self.r.mesh, self.r.rules):
      for host_batch in self.host_batches(eval_steps(self.r.config, final=final)):
        batch = shd.shard_batch(host_batch, self.r.mesh, self.r.rules, self._layout)
        out = self._step(params, rest, batch, self._tables, self.reference)
        if self.head.observes:  # the logits come back whole (replicated): this host's rows are its batch's
          out, logits = out
          first = self._layout.first_row
          rows = np.asarray(jax.device_get(logits))[first:first + self._layout.rows]
          self.head.observe(acc, host_batch, rows, self.r.config, self.read_examples)
        acc.add(out)
    if acc.weight_sum <= 0:
      raise data_lib.DataError(f'split {self.split!r} of data.source={self.r.config.data.source!r} produced no '
                               f'{self.scorer.unit} to score.')
    return acc

  def training_row(self, params: Any, rest: Any, *, final: bool) -> dict[str, float]:
    """The eval row of DIR/metrics.jsonl, as the head defines it (lm: eval_loss, eval_perplexity, eval_accuracy,
    eval_tokens, eval_bits_per_byte / _char; classification: eval_loss, eval_accuracy, eval_macro_f1,
    eval_examples). final: the evaluation at train.num_steps."""
    acc = self.accumulate(params, rest, final=final)
    moe = step_lib.moe_means(acc.extra, acc.weight_sum)  # a MoE model's: eval_moe_aux_loss, eval_expert_load/<e>
    return {**self.scorer.eval_row(acc), **{f'eval_{name}': value for name, value in moe.items()}}

  def results(self, params: Any, rest: Any) -> dict[str, Any]:
    """eval.py's numbers over the final evaluation's batches (the head's `results`)."""
    acc = self.accumulate(params, rest)
    return {**self.scorer.results(acc, self.r.config.model.arch), **step_lib.moe_means(acc.extra, acc.weight_sum)}
