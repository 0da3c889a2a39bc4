"""run(config, workdir): init or resume, train, evaluate, log, checkpoint.

The hot loop only dispatches: metrics stay on the devices until a log step fetches them (one host sync per
train.log_every steps), so the host runs ahead of the accelerator and the data pipeline overlaps with compute.

DIR/metrics.jsonl rows (also TensorBoard scalars in DIR/tensorboard/):
  train rows, every train.log_every steps and at the end: step, train_loss (token-weighted cross-entropy, mean over
    the steps since the last row), train_accuracy, learning_rate and grad_norm (of the last step; the norm is
    before clipping), tokens_per_sec (batch_size x seq_len positions per step, padding included: the target side
    for encoder_decoder), target_tokens_per_sec (tokens that carry loss), step_time (s), mfu (model FLOPs
    utilisation, jaxformer.flops; None when the device's peak is unknown); train_objective when label smoothing
    or z-loss make the optimised objective differ from the cross-entropy.
  eval rows, every train.eval_every steps and at the end: step, eval_loss, eval_perplexity, eval_accuracy,
    eval_tokens.
The first step (compilation) is excluded from throughput, and so is time spent evaluating and checkpointing.

train.steps_per_call = k > 1 runs k steps per jitted call on k stacked batches (validate() requires log_every,
eval_every and checkpoint.every_steps to be multiples of k); chunks start at multiples of k, and single steps fill
whatever does not fit a chunk (realigning after a resume, the tail before num_steps or stop_after_steps), so every
step is logged, evaluated and checkpointed (with its exact data position) as with k = 1.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxformer import flops as flops_lib
from jaxformer import sharding as shd
from jaxformer.config import ConfigError, ModelConfig, validate
from jaxformer.training import checkpoint as ckpt_lib
from jaxformer.training import host_memory
from jaxformer.training import optimizer as opt_lib
from jaxformer.training import step as step_lib
from jaxformer.training.writers import MetricWriter


def _log(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


def config_to_json(config: ml_collections.ConfigDict) -> str:
  return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


def write_config(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Writes the resolved config to DIR/config.json (process 0) and returns the path."""
  path = os.path.join(workdir, 'config.json')
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
      f.write(config_to_json(config) + '\n')
    os.replace(tmp, path)
  return path


def check_batch_sizes(config, mesh, rules) -> None:
  """Global batch sizes must split evenly over the batch shards (and over the grad-accumulation micro-batches)."""
  shards = shd.batch_shards(mesh, rules)
  train = config.train
  micro = train.batch_size // train.grad_accum_steps
  if micro % shards:
    raise ConfigError(
        f'train.batch_size={train.batch_size} / train.grad_accum_steps={train.grad_accum_steps} = {micro} rows per '
        f'micro-batch is not divisible by the {shards} batch shards of the mesh (data x fsdp); use a multiple of '
        f'{shards * train.grad_accum_steps}.')
  eval_bs = train.eval_batch_size or train.batch_size
  if eval_bs % shards:
    raise ConfigError(f'train.eval_batch_size={eval_bs} is not divisible by the {shards} batch shards of the mesh; '
                      f'use a multiple of {shards}.')


class _StopFlag:
  """Set by SIGTERM (preemption): the loop saves a checkpoint at the current step and returns normally."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def install(self) -> None:
    if threading.current_thread() is not threading.main_thread():
      return
    self._previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame) -> None:  # noqa: ARG002
    self.requested = True

  def uninstall(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def any_process(self) -> bool:
    """Whether any process got the signal (collective in multi-process runs)."""
    if jax.process_count() == 1:
      return self.requested
    from jax.experimental import multihost_utils
    flags = multihost_utils.process_allgather(np.array([self.requested], np.int32))
    return bool(np.max(flags))


def _fmt_eta(seconds: float) -> str:
  return str(datetime.timedelta(seconds=int(max(seconds, 0))))


def _fmt_rate(x: float) -> str:
  return f'{x / 1e6:.2f}M' if x >= 1e6 else f'{x / 1e3:.1f}k' if x >= 1e3 else f'{x:.0f}'


def eval_batches(config, tokenizer, workdir, split, mesh, rules, layout):
  """The batches an evaluation scores: the first train.eval_steps of `split` (-1: all), placed on the mesh.

  Training's evaluation and eval.py both read through this, so they score exactly the same tokens."""
  from jaxformer import data as data_lib
  iterator = data_lib.make_eval_iterator(config, tokenizer, workdir, split, layout=layout)
  limit = int(config.train.eval_steps)
  try:
    for i, batch in enumerate(iterator):
      if 0 <= limit <= i:
        break
      yield shd.shard_batch(batch, mesh, rules, layout)
  finally:
    if hasattr(iterator, 'close'):
      iterator.close()


def evaluate(state, eval_step, config, tokenizer, workdir, mesh, rules) -> dict[str, float] | None:
  """Token-weighted eval loss / perplexity / accuracy over train.eval_steps batches (-1: the whole split)."""
  eval_bs = config.train.eval_batch_size or config.train.batch_size
  totals = None
  layout = shd.data_layout(mesh, rules, eval_bs)
  for batch in eval_batches(config, tokenizer, workdir, config.data.eval_split, mesh, rules, layout):
    metrics = eval_step(state, batch)
    totals = metrics if totals is None else jax.tree.map(jnp.add, totals, metrics)
  if totals is None:
    return None
  totals = jax.device_get(totals)
  weight = max(float(totals['weight_sum']), 1.0)
  loss = float(totals['loss_sum']) / weight
  return {'eval_loss': loss, 'eval_perplexity': math.exp(min(loss, 50.0)),
          'eval_accuracy': float(totals['correct_sum']) / weight, 'eval_tokens': float(totals['weight_sum'])}


def _truncate_metrics(workdir: str, step: int) -> None:
  """On resume, drop metric rows logged after the checkpoint (they will be produced again)."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if jax.process_index() != 0 or not os.path.exists(path):
    return
  with open(path) as f:
    rows = [line for line in f if line.strip()]
  keep = [line for line in rows if json.loads(line).get('step', 0) <= step]
  if len(keep) != len(rows):
    with open(path, 'w') as f:
      f.writelines(keep)


def run(config: ml_collections.ConfigDict, workdir: str, *, stop_after_steps: int | None = None) -> dict[str, Any]:
  """Trains config on workdir (resuming from its newest checkpoint) and returns the last train/eval metrics.

  stop_after_steps (for tests and tools): behave as if preempted once that step is reached: save and return.
  """
  from jaxformer import data as data_lib
  config = ml_collections.ConfigDict(config.to_dict())  # a private, unlocked copy we may resolve
  host_memory.keep_freed_memory()  # XLA:CPU's per-call temp buffers: no page faults every step
  shd.maybe_initialize_distributed(config)
  validate(config)
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)

  tokenizer = data_lib.get_tokenizer(config, workdir)
  if not config.model.vocab_size:
    config.model.vocab_size = int(tokenizer.vocab_size)
  elif config.model.vocab_size < tokenizer.vocab_size:
    raise ConfigError(f'model.vocab_size={config.model.vocab_size} is smaller than the tokenizer\'s '
                      f'{tokenizer.vocab_size} symbols; set it to 0 (= take the tokenizer\'s) or larger.')
  model_cfg = ModelConfig.from_config(config.model)
  write_config(config, workdir)

  mesh = shd.make_mesh(config)
  rules = shd.rules_from_config(config)
  check_batch_sizes(config, mesh, rules)
  tx, schedule = opt_lib.make_optimizer(config.train)
  setup = step_lib.make_setup(config, mesh, tx, schedule)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(setup.abstract_state['params']))
  _log(f'{model_cfg.arch}: {n_params / 1e6:.2f}M parameters, vocab {model_cfg.vocab_size}; mesh '
       f'{dict(mesh.shape)} on {mesh.devices.size} {jax.devices()[0].platform} device(s), '
       f'{jax.process_count()} process(es)')
  for note in shd.describe_unsharded(setup.abstract_state['params'], mesh, rules)[:8]:
    _log(f'  replicated (mesh does not divide it): {note}')

  checkpointer = ckpt_lib.Checkpointer(workdir, keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)
  restored = checkpointer.restore(setup.abstract_state)
  data_state = None
  if restored is not None:
    state, data_state, start = restored
    _log(f'resumed from checkpoint step {start} in {ckpt_lib.checkpoint_dir(workdir)}')
    _truncate_metrics(workdir, start)
  else:
    state, start = step_lib.init_state(config, setup), 0

  layout = shd.data_layout(mesh, rules, config.train.batch_size)
  train_iter = data_lib.make_train_iterator(config, tokenizer, workdir, layout=layout)
  if data_state is not None:
    train_iter.set_state(data_state)
  train_step = step_lib.make_train_step(config, setup)
  steps_per_call = int(config.train.get('steps_per_call', 1))
  multi_step = step_lib.make_train_step(config, setup, steps_per_call) if steps_per_call > 1 else None
  eval_step = step_lib.make_eval_step(config, setup)

  train = config.train
  num_steps = train.num_steps
  src_len = config.data.src_seq_len if model_cfg.arch == 'encoder_decoder' else None
  step_flops = flops_lib.train_flops_per_step(model_cfg, train.batch_size, config.data.seq_len, src_len)
  peak = flops_lib.peak_flops_total(mesh.devices.flat, model_cfg.dtype)
  tokens_per_step = train.batch_size * config.data.seq_len
  writer = MetricWriter(workdir, enabled=jax.process_index() == 0)
  stop = _StopFlag()
  stop.install()
  config_dict = json.loads(config_to_json(config))

  def save(step_now: int) -> None:
    checkpointer.save(step_now, state, data_state=train_iter.get_state(), config=config_dict)

  last_train: dict[str, Any] = {}
  last_eval: dict[str, Any] | None = None
  last_saved = start if restored is not None else -1
  pending: list[tuple[int, dict]] = []  # (steps in the call, its metrics; stacked [n] when n > 1)
  compiled: set[int] = set()
  window_start, window_steps = time.perf_counter(), 0
  eval_enabled = True
  step = start
  if start >= num_steps:
    _log(f'already at step {start} >= train.num_steps={num_steps}; nothing to train.')
  try:
    while step < num_steps:
      # train.steps_per_call = k > 1: k steps per jitted call, in chunks aligned to multiples of k (so the log /
      # eval / checkpoint steps, multiples of k, are reached exactly); single steps where a chunk would not fit: to
      # align after resuming at another step, before num_steps, or before stop_after_steps.
      n = 1
      if (multi_step is not None and step % steps_per_call == 0 and step + steps_per_call <= num_steps
          and (stop_after_steps is None or step + steps_per_call <= stop_after_steps)):
        n = steps_per_call
      if n == 1:
        batch = next(train_iter)
        state, metrics = train_step(state, shd.shard_batch(batch, mesh, rules, layout))
      else:
        batches = [next(train_iter) for _ in range(n)]
        stacked = {key: np.stack([np.asarray(b[key]) for b in batches]) for key in batches[0]}
        state, metrics = multi_step(state, shd.shard_batch(stacked, mesh, rules, layout, stacked=True))
      step += n
      pending.append((n, metrics))
      window_steps += n
      if n not in compiled:  # exclude each program's first call (compilation) from the throughput
        compiled.add(n)
        jax.block_until_ready(metrics)
        window_start, window_steps = time.perf_counter(), 0
      is_last = step == num_steps
      if step % train.log_every == 0 or is_last:
        fetched = []
        for n_call, m in jax.device_get(pending):  # one metrics dict per step
          fetched += [m] if n_call == 1 else [{key: v[i] for key, v in m.items()} for i in range(n_call)]
        pending = []
        elapsed = time.perf_counter() - window_start
        sec_per_step = elapsed / window_steps if window_steps else float('nan')
        tokens = sum(float(m['tokens']) for m in fetched)
        last_train = {
            'train_loss': float(np.mean([m['loss'] for m in fetched])),
            'train_accuracy': float(np.mean([m['accuracy'] for m in fetched])),
            'learning_rate': float(fetched[-1]['learning_rate']),
            'grad_norm': float(fetched[-1]['grad_norm']),
            'tokens_per_sec': tokens_per_step / sec_per_step if window_steps else None,
            'target_tokens_per_sec': tokens / len(fetched) / sec_per_step if window_steps else None,
            'step_time': sec_per_step if window_steps else None,
            'mfu': flops_lib.mfu(step_flops, sec_per_step, peak) if window_steps else None,
        }
        if train.z_loss or train.label_smoothing:
          last_train['train_objective'] = float(np.mean([m['objective'] for m in fetched]))
        writer.write(step, last_train)
        rate = last_train['tokens_per_sec']
        mfu = last_train['mfu']
        _log(f'step {step}/{num_steps} | loss {last_train["train_loss"]:.4f} | lr {last_train["learning_rate"]:.2e} '
             f'| gnorm {last_train["grad_norm"]:.3f} | '
             + (f'{_fmt_rate(rate)} tok/s | ' if rate else '')
             + (f'mfu {100 * mfu:.2f}% | ' if mfu is not None else '')
             + (f'ETA {_fmt_eta((num_steps - step) * sec_per_step)}' if window_steps else 'ETA ?'))
        window_start, window_steps = time.perf_counter(), 0
      stopping = stop.requested if jax.process_count() == 1 else (
          (step % train.log_every == 0 or is_last) and stop.any_process())
      stopping = stopping or (stop_after_steps is not None and step >= stop_after_steps and not is_last)
      if eval_enabled and (step % train.eval_every == 0 or is_last) and not stopping:
        try:
          last_eval = evaluate(state, eval_step, config, tokenizer, workdir, mesh, rules)
        except (FileNotFoundError, KeyError) as e:
          _log(f'evaluation disabled: {e}')
          eval_enabled, last_eval = False, None
        if last_eval is not None:
          writer.write(step, last_eval)
          _log(f'eval at step {step}: loss {last_eval["eval_loss"]:.4f} | perplexity '
               f'{last_eval["eval_perplexity"]:.3f} | accuracy {last_eval["eval_accuracy"]:.4f}')
        window_start, window_steps = time.perf_counter(), 0
      if step % config.checkpoint.every_steps == 0 or is_last or stopping:
        save(step)
        last_saved = step
        window_start, window_steps = time.perf_counter(), 0
      if stopping:
        _log(f'{"SIGTERM" if stop.requested else "stop_after_steps"}: saved checkpoint at step {step}; exiting.')
        break
    if last_saved != step and step > 0:
      save(step)
  finally:
    stop.uninstall()
    checkpointer.close()
    writer.close()
    if hasattr(train_iter, 'close'):
      train_iter.close()
  return {'step': step, 'stopped_early': step < num_steps, **last_train, **(last_eval or {})}
