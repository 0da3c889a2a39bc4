"""run(config, workdir): init or resume, train, evaluate, log, checkpoint.

The hot loop only dispatches: metrics stay on the devices until a log step fetches them, and the only per-call
sync is the NaN guard reading the *previous* call's loss and gradient norm, so the host stays one call ahead of
the accelerator and the data pipeline overlaps with compute.

Faults (see jaxformer.errors; train.py prints them as one line, exit status 2):
  - train.max_bad_steps steps in a row with a non-finite loss or gradient norm stop the run (NonFiniteError naming
    the step and the last good checkpoint); a checkpoint is never saved from non-finite parameters or optimizer
    state, so the good ones are never rotated out. train.skip_bad_steps=True skips non-finite updates instead
    (optax.apply_if_finite) until max_bad_steps of them in a row.
  - one run per workdir (DIR/train.lock, jaxformer.training.lock); a workdir whose checkpoints hold another model
    is refused before anything is written.
  - SIGTERM and SIGINT (Ctrl-C) save a checkpoint at the current step and return (train.py exits 0 / 130); a
    second Ctrl-C ends the process at once.
  - an error at an evaluation step is raised after that step's checkpoint is saved.
  - a run without checkpoints starts a fresh metrics.jsonl (an old one is kept as metrics.<time>.jsonl.old).

DIR/metrics.jsonl rows (also TensorBoard scalars in DIR/tensorboard/):
  train rows, every train.log_every steps and at the end (a fresh run's first row also has num_params and
    num_trainable_params): step, train_loss (token-weighted cross-entropy, mean over
    the steps since the last row), train_accuracy, learning_rate and grad_norm (of the last step; the norm is
    before clipping), tokens_per_sec (batch_size x seq_len positions per step, padding included: the target side
    for encoder_decoder), target_tokens_per_sec (tokens that carry loss), step_time (s), mfu (model FLOPs
    utilisation, jaxformer.flops; None when the device's peak is unknown); train_objective when label smoothing
    or z-loss make the optimised objective differ from the cross-entropy. A mixture-of-experts model
    (model.num_experts > 0, model/moe.py) adds num_active_params to the first row, and to every train row (means
    over its MoE layers and steps) train_moe_aux_loss (load balancing, k at balance), train_moe_z_loss,
    train_moe_dropped_fraction, train_router_entropy, train_expert_load/<e> (share of token copies per expert) and
    train_objective (cross-entropy + the weighted router losses).
  eval rows, every train.eval_every steps (train.eval_steps batches) and at the end (train.final_eval_steps):
    step, eval_loss, eval_perplexity, eval_accuracy, eval_tokens (model.head=classification: eval_loss,
    eval_accuracy, eval_macro_f1, eval_examples); eval_bits_per_byte and eval_bits_per_char (decoder_only /
    encoder_decoder: the eval NLL in bits per UTF-8 byte / character of the scored target text, comparable across
    tokenizers). An objective over preference pairs (align/pairwise.py: model.head=reward, align.method=dpo /
    simpo) has its own rows: eval_loss and its names (accuracy, margin, rewards_chosen, ... for a reward model;
    reward_accuracy, reward_margin, rewards_*, logps_* for DPO / SimPO) and eval_pairs, and train rows add the same
    names with train_; pairs count as two rows in tokens_per_sec and MFU. The online methods' rows are apps/align.py's.
With train.harness_tasks the eval rows also hold the lm-evaluation-harness scores of those tasks, as
'harness/<task>/<metric>[,<filter>]' (apps/harness.py; the harness section says how: few-shot, limit, ...).
The first step (compilation) is excluded from throughput, and so is time spent evaluating and checkpointing.

train.steps_per_call = k > 1 runs k steps per jitted call on k stacked batches (validate() requires log_every,
eval_every and checkpoint.every_steps to be multiples of k); chunks start at multiples of k, and single steps fill
whatever does not fit a chunk (realigning after a resume, the tail before num_steps or stop_after_steps), so every
step is logged, evaluated and checkpointed (with its exact data position) as with k = 1.
"""
from __future__ import annotations

import datetime
import json
import os
import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxformer import align
from jaxformer import data as data_lib
from jaxformer import errors
from jaxformer import evaluation as eval_lib
from jaxformer import flops as flops_lib
from jaxformer import peft as peft_lib
from jaxformer import resolve as resolve_lib
from jaxformer import settings as settings_lib
from jaxformer import sharding as shd
from jaxformer.align import reference as reference_lib
from jaxformer.model import moe as moe_lib
from jaxformer.apps import harness as harness_app
from jaxformer.training import checkpoint as ckpt_lib
from jaxformer.training import optimizer as opt_lib
from jaxformer.training import state as state_lib
from jaxformer.training import step as step_lib
from jaxformer.training.lock import WorkdirLock
from jaxformer.training.writers import MetricWriter


def _log(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


def write_config(config: settings_lib.Settings, workdir: str) -> str:
  """Writes the resolved settings to DIR/config.json (process 0) and returns the path."""
  path = os.path.join(workdir, 'config.json')
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
      f.write(settings_lib.to_json(config) + '\n')
    os.replace(tmp, path)
  return path


class _StopFlag:
  """Set by SIGTERM (preemption) or SIGINT (Ctrl-C): the loop saves a checkpoint at the current step and returns.
  A second Ctrl-C gets the default action: the process ends at once (even inside a long XLA call)."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.requested: str | None = None  # the signal's name once one arrived
    self._previous: dict[int, Any] = {}
    self._wakeup: tuple[int, int, int] | None = None  # (read fd, write fd, the wakeup fd before ours)

  def install(self) -> None:
    if threading.current_thread() is not threading.main_thread():
      return
    for sig in self.SIGNALS:
      self._previous[sig] = signal.getsignal(sig)
      signal.signal(sig, self._handle)
    self._watch_second_ctrl_c()

  def _watch_second_ctrl_c(self) -> None:
    """Python runs signal handlers only between bytecodes, so Ctrl-Cs that arrive inside a long XLA compile wait
    for it. The interpreter also writes each signal's number to a wakeup fd at once, from C: a thread reading it
    ends the process at the second SIGINT, wherever the main thread is."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    self._wakeup = (read_fd, write_fd, signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False))

    def watch() -> None:
      interrupts = 0
      while data := os.read(read_fd, 64):
        interrupts += data.count(bytes([signal.SIGINT]))
        if interrupts >= 2:
          os.write(2, b'interrupted (second Ctrl-C): exiting without saving.\n')
          os._exit(130)
      os.close(read_fd)

    threading.Thread(target=watch, name='second-ctrl-c', daemon=True).start()

  def _handle(self, signum, frame) -> None:  # noqa: ARG002
    self.requested = signal.Signals(signum).name
    if signum == signal.SIGINT:
      signal.signal(signal.SIGINT, signal.SIG_DFL)
      _log('Ctrl-C: saving a checkpoint at the end of this step, then exiting (press Ctrl-C again to abort now).')

  def uninstall(self) -> None:
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)
    self._previous = {}
    if self._wakeup is not None:
      read_fd, write_fd, previous_fd = self._wakeup
      signal.set_wakeup_fd(previous_fd)
      os.close(write_fd)  # the watcher reads EOF and ends; it closes nothing itself
      self._wakeup = None

  def any_process(self) -> bool:
    """Whether any process got a signal (collective in multi-process runs)."""
    if jax.process_count() == 1:
      return self.requested is not None
    from jax.experimental import multihost_utils  # only multi-process runs need it
    flags = multihost_utils.process_allgather(np.array([self.requested is not None], np.int32))
    return bool(np.max(flags))


def _fmt_eta(seconds: float) -> str:
  return str(datetime.timedelta(seconds=int(max(seconds, 0))))


def _fmt_rate(x: float) -> str:
  return f'{x / 1e6:.2f}M' if x >= 1e6 else f'{x / 1e3:.1f}k' if x >= 1e3 else f'{x:.0f}'


def _fresh_metrics(workdir: str) -> None:
  """A run without checkpoints starts a new metrics.jsonl; an old one is kept aside as metrics.<time>.jsonl.old."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if jax.process_index() == 0 and os.path.exists(path):
    aside = os.path.join(workdir, f'metrics.{time.strftime("%Y%m%d-%H%M%S")}.jsonl.old')
    os.replace(path, aside)
    _log(f'note: no checkpoint to resume from; moved the old metrics.jsonl to {aside}')


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


class TrainLog:
  """The train rows: metrics stay on the devices until a log step fetches them all at once (one host sync per
  train.log_every steps); throughput is timed over the steps since the last row, excluding each program's first
  call (compilation) and time spent evaluating or checkpointing (`restart_clock`)."""

  def __init__(self, r: resolve_lib.Resolved, writer: MetricWriter):
    config, train = r.config, r.config.train
    src_len = config.data.src_seq_len if r.model.arch == 'encoder_decoder' else None
    self.step_flops = flops_lib.train_flops_per_step(r.model, train.batch_size, config.data.seq_len, src_len)
    objective = align.objective_of(config)
    rows_per_example = 1
    if isinstance(objective, align.PairObjective):  # two rows per pair (chosen, rejected), + the reference's forwards
      rows_per_example = 2
      self.step_flops *= objective.flops_factor(config)
    self.peak = flops_lib.peak_flops_total(r.mesh.devices.flat, r.model.dtype)
    self.tokens_per_step = train.batch_size * config.data.seq_len * rows_per_example
    self.num_steps = train.num_steps
    self.with_objective = bool(train.z_loss or train.label_smoothing or r.model.num_experts)
    self.writer = writer
    self.pending: list[tuple[int, dict]] = []  # (steps in the call, its metrics; stacked [n] when n > 1)
    self.compiled: set[int] = set()
    self.first_row_extra: dict[str, Any] = {}  # added to this run's first train row (a fresh run: num_params)
    self.restart_clock()

  def restart_clock(self) -> None:
    self.window_start, self.window_steps = time.perf_counter(), 0

  def add(self, n: int, metrics: dict) -> None:
    self.pending.append((n, metrics))
    self.window_steps += n
    if n not in self.compiled:  # exclude each program's first call (compilation) from the throughput
      self.compiled.add(n)
      jax.block_until_ready(metrics)
      self.restart_clock()

  def flush(self, step: int) -> dict[str, Any]:
    """Fetches the pending metrics, writes and prints one train row, and returns it."""
    fetched = []
    for n_call, m in jax.device_get(self.pending):  # one metrics dict per step
      fetched += [m] if n_call == 1 else [{key: v[i] for key, v in m.items()} for i in range(n_call)]
    self.pending = []
    timed = self.window_steps > 0
    sec_per_step = (time.perf_counter() - self.window_start) / self.window_steps if timed else float('nan')
    tokens = sum(float(m['tokens']) for m in fetched)
    row = {
        'train_loss': float(np.mean([m['loss'] for m in fetched])),
        'learning_rate': float(fetched[-1]['learning_rate']),
        'grad_norm': float(fetched[-1]['grad_norm']),
        'tokens_per_sec': self.tokens_per_step / sec_per_step if timed else None,
        'target_tokens_per_sec': tokens / len(fetched) / sec_per_step if timed else None,
        'step_time': sec_per_step if timed else None,
        'mfu': flops_lib.mfu(self.step_flops, sec_per_step, self.peak) if timed else None,
    }
    if 'accuracy' in fetched[0]:
      row['train_accuracy'] = float(np.mean([m['accuracy'] for m in fetched]))
    if self.with_objective:
      row['train_objective'] = float(np.mean([m['objective'] for m in fetched]))
    for key in fetched[0]:  # an objective's own per-step numbers (align: reward_margin, rewards_chosen, ...)
      if key not in STEP_METRICS:
        row[f'train_{key}'] = float(np.mean([m[key] for m in fetched]))
    self.writer.write(step, {**self.first_row_extra, **row})
    self.first_row_extra = {}
    rate, mfu = row['tokens_per_sec'], row['mfu']
    _log(f'step {step}/{self.num_steps} | loss {row["train_loss"]:.4f} | lr {row["learning_rate"]:.2e} '
         f'| gnorm {row["grad_norm"]:.3f} | '
         + (f'{_fmt_rate(rate)} tok/s | ' if rate else '')
         + (f'mfu {100 * mfu:.2f}% | ' if mfu is not None else '')
         + (f'ETA {_fmt_eta((self.num_steps - step) * sec_per_step)}' if timed else 'ETA ?'))
    self.restart_clock()
    return row


STEP_METRICS = ('loss', 'objective', 'accuracy', 'tokens', 'grad_norm', 'learning_rate')  # the train step's own


def _all_finite(tree: Any) -> jax.Array:
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.array(True)


_all_finite_jit = jax.jit(_all_finite)


class Trainer:
  """One training run on one workdir: the state (fresh or resumed), its data, its jitted steps, evaluation and
  checkpointing. `run` drives it; each method is one thing the loop does."""

  def __init__(self, r: resolve_lib.Resolved):
    self.r = r
    config = r.config
    self.config, self.workdir = config, r.workdir
    self.max_bad_steps = int(config.train.max_bad_steps)
    tx, schedule = opt_lib.make_optimizer(self.optimizer_section())
    if config.train.skip_bad_steps:  # a non-finite gradient leaves params and optimizer state as they were
      tx = optax.apply_if_finite(tx, max_consecutive_errors=2 ** 30)  # our bad-step guard decides when to stop
    self.setup = state_lib.make_setup(config, r.mesh, tx, schedule, r.rules)
    self.num_params, self.num_trainable_params = peft_lib.count_params(self.setup.abstract_state['params'],
                                                                       config.peft)
    self._describe()
    self.checkpointer = state_lib.make_checkpointer(config, self.setup, r.workdir)
    self.writer = MetricWriter(r.workdir, enabled=jax.process_index() == 0)
    self.log = TrainLog(r, self.writer)
    self.state, data_state, self.start, self.resumed = state_lib.train_state(config, self.setup, self.checkpointer)
    resumed = self.resumed
    if resumed:
      _log(f'resumed from checkpoint step {self.start} in {ckpt_lib.checkpoint_dir(r.workdir)}')
      _truncate_metrics(r.workdir, self.start)
    else:
      _fresh_metrics(r.workdir)
      self.log.first_row_extra = {'num_params': self.num_params, 'num_trainable_params': self.num_trainable_params,
                                  **({'num_active_params': moe_lib.num_active_params(r.model, self.num_params)}
                                     if r.model.num_experts else {})}
    self.last_saved = self.start if resumed else -1
    self.train_iter = self.make_data(data_state)
    self.steps_per_call = int(config.train.steps_per_call)
    self.train_step = step_lib.make_train_step(config, self.setup)
    self.multi_step = (step_lib.make_train_step(config, self.setup, self.steps_per_call)
                       if self.steps_per_call > 1 else None)
    objective = align.objective_of(config)
    # align.method=dpo: the frozen reference's trainable part (its frozen part is the run's own frozen params)
    self.reference = (state_lib.run_reference(config, self.setup, self.state, resumed)
                      if objective is not None and objective.needs_reference else None)
    self.reference_table = None
    if self.reference is not None and config.align.precompute_reference:
      self.reference_table = self._precompute_reference()
      self.train_iter = reference_lib.WithReference(self.train_iter, self.reference_table)
      self.reference = None  # no longer needed: its numbers are in the table
    self.evaluator = self.make_evaluator()
    # train.harness_tasks: lm-evaluation-harness tasks at each evaluation (checked by run() before anything ran)
    self.harness = (harness_app.TrainingHarness(config, r.tokenizer, r.mesh, r.rules)
                    if config.train.harness_tasks else None)
    self.config_dict = json.loads(settings_lib.to_json(config))
    self.unchecked: list[tuple[int, int, dict]] = []  # (first step, steps, metrics) not yet checked for NaN/inf
    self.bad_steps, self.first_bad = 0, None

  def optimizer_section(self) -> settings_lib.TrainSettings:
    """The train section the optimizer and its schedule are built from."""
    return self.config.train

  def make_data(self, data_state: Any) -> Any:
    """The training data iterator (at the checkpoint's position when resuming); sets self.layout."""
    r = self.r
    self.layout = shd.data_layout(r.mesh, r.rules, self.config.train.batch_size)
    train_iter = data_lib.make_train_iterator(self.config, r.tokenizer, r.workdir, layout=self.layout,
                                              source=r.source)
    if data_state is not None:
      train_iter.set_state(data_state)
    return train_iter

  def make_evaluator(self) -> Any:
    """What writes the eval rows: `training_row(params, rngs, final=)`."""
    table = self.reference_table
    return eval_lib.Evaluator(self.r, self.setup.graphdef, self.config.data.eval_split, self.reference,
                              prepare=None if table is None else table.add)

  def _precompute_reference(self) -> reference_lib.ReferenceTable:
    """align.precompute_reference: the reference's log-probabilities of every training and evaluation pair,
    computed once (or read back from DIR/reference_logps.npz when resuming)."""
    r, config = self.r, self.config
    if jax.process_count() > 1:
      raise errors.ConfigError('align.precompute_reference=True runs on one process for now; set it to False '
                               '(the reference is then computed at each step) for a multi-process run.')
    table = reference_lib.ReferenceTable.load(r.workdir) or reference_lib.ReferenceTable()
    graphdef, unscored = self.setup.graphdef, r.tokenizer.unscored_target
    objective = align.objective_of(config)
    params = step_lib.reference_model_params(self.state['params'], self.reference, config.peft)

    @jax.jit
    def logps(params, rest, batch):
      ref = objective.reference_logps(step_lib.merge_model(graphdef, params, rest), batch, unscored)
      return ref['ref_chosen_logps'], ref['ref_rejected_logps']

    layout = shd.data_layout(r.mesh, r.rules, r.eval_batch_size)
    before, start = len(table), time.perf_counter()
    with shd.mesh_context(r.mesh, r.rules):
      for split in dict.fromkeys((config.data.train_split, config.data.eval_split)):
        batches = data_lib.make_eval_iterator(config, r.tokenizer, r.workdir, split, layout=layout, source=r.source)
        table.fill(batches, lambda b: jax.device_get(logps(params, self.state['rngs'],
                                                           shd.shard_batch(b, r.mesh, r.rules, layout))))
    if len(table) != before:
      path = table.save(r.workdir)
      _log(f'precomputed the reference log-probabilities of {len(table) - before} pairs in '
           f'{time.perf_counter() - start:.1f}s -> {path}')
    return table

  def _describe(self) -> None:
    mesh, params = self.r.mesh, self.setup.abstract_state['params']
    _log(f'{self.r.model.arch}: {self.num_params / 1e6:.2f}M parameters ({self.num_trainable_params:,} trainable), vocab '
         f'{self.r.model.vocab_size}; mesh {dict(mesh.shape)} on {mesh.devices.size} {jax.devices()[0].platform} '
         f'device(s), {jax.process_count()} process(es)')
    for note in shd.describe_unsharded(params, mesh, self.r.rules)[:8]:
      _log(f'  replicated (mesh does not divide it): {note}')

  def call_size(self, step: int, stop_after_steps: int | None) -> int:
    """Steps in the next jitted call: train.steps_per_call = k in chunks aligned to multiples of k (so the log /
    eval / checkpoint steps, multiples of k, are reached exactly); 1 where a chunk would not fit: to align after
    resuming at another step, before num_steps, or before stop_after_steps."""
    k = self.steps_per_call
    end = self.config.train.num_steps if stop_after_steps is None else min(self.config.train.num_steps,
                                                                           stop_after_steps)
    return k if self.multi_step is not None and step % k == 0 and step + k <= end else 1

  def train_call(self, step: int, n: int) -> None:
    """Runs steps step+1 .. step+n (one jitted call), queues their metrics for the next train row and checks the
    previous call's for NaN/inf (one call behind, so the host still runs ahead of the devices)."""
    mesh, rules = self.r.mesh, self.r.rules
    if n == 1:
      batch = shd.shard_batch(next(self.train_iter), mesh, rules, self.layout)
      self.state, metrics = self.train_step(self.state, batch, self.reference)
    else:
      batches = [next(self.train_iter) for _ in range(n)]
      stacked = {key: np.stack([np.asarray(b[key]) for b in batches]) for key in batches[0]}
      self.state, metrics = self.multi_step(self.state, shd.shard_batch(stacked, mesh, rules, self.layout,
                                                                        stacked=True), self.reference)
    self.log.add(n, metrics)
    self.unchecked.append((step + 1, n, metrics))
    self.check_finite(keep_last=True)

  def check_finite(self, keep_last: bool = False) -> None:
    """Counts consecutive steps whose loss or gradient norm is not finite; raises NonFiniteError at
    train.max_bad_steps of them."""
    todo = self.unchecked[:-1] if keep_last else self.unchecked
    self.unchecked = self.unchecked[len(todo):]
    for first, n, metrics in todo:
      loss, gnorm = jax.device_get((metrics['loss'], metrics['grad_norm']))
      finite = np.isfinite(np.reshape(loss, (-1,))) & np.isfinite(np.reshape(gnorm, (-1,)))
      for i, ok in enumerate(finite):
        if ok:
          self.bad_steps, self.first_bad = 0, None
          continue
        self.bad_steps += 1
        self.first_bad = first + i if self.first_bad is None else self.first_bad
        if self.bad_steps >= self.max_bad_steps:
          raise self._non_finite(f'{self.bad_steps} non-finite step(s) in a row from step {self.first_bad}, '
                                 f'train.max_bad_steps={self.max_bad_steps}')

  def _non_finite(self, what: str) -> errors.NonFiniteError:
    good = sorted(self.checkpointer.manager.all_steps())
    lr = float(self.config.train.learning_rate)
    if good:
      resume = (f'the last good checkpoint is step {good[-1]}; resume from it with a lower learning rate, e.g. '
                f'--config.train.learning_rate={lr / 10:g}')
    else:
      resume = f'no checkpoint was saved; start again with a lower learning rate (now {lr:g})'
    return errors.NonFiniteError(f'training diverged: loss or gradient norm not finite ({what}); stopped '
                                 f'without saving it.', hint=resume + '.')

  def evaluate(self, step: int, *, final: bool) -> dict[str, float]:
    row = self.evaluator.training_row(self.state['params'], self.state['rngs'], final=final)
    if self.harness is not None:
      row.update(self.harness.row(step_lib.merge_model(self.setup.graphdef, self.state['params'], self.state['rngs'])))
    self.writer.write(step, row)
    shown = (('loss', 'eval_loss', '.4f'), ('perplexity', 'eval_perplexity', '.3f'), ('accuracy', 'eval_accuracy', '.4f'),
             ('macro-F1', 'eval_macro_f1', '.4f'), ('F1', 'eval_f1', '.4f'),
             ('exact match', 'eval_exact_match', '.2f'), ('bits/char', 'eval_bits_per_char', '.4f'),
             ('margin', 'eval_margin', '.4f'), ('reward accuracy', 'eval_reward_accuracy', '.4f'),
             ('reward margin', 'eval_reward_margin', '.4f'), ('reward', 'eval_reward_mean', '.4f'),
             ('completion length', 'eval_completion_length', '.1f'))
    _log(f'eval at step {step}: ' + ' | '.join([f'{name} {row[key]:{fmt}}' for name, key, fmt in shown if key in row]
                                               + [f'{k} {v:.4f}' for k, v in row.items() if k.startswith('harness/')]))
    self.log.restart_clock()
    return row

  def save(self, step: int) -> None:
    """Saves a checkpoint, never one whose parameters or optimizer state are not finite (NonFiniteError)."""
    self.check_finite()
    if not bool(_all_finite_jit({'params': self.state['params'], 'opt_state': self.state['opt_state']})):
      raise self._non_finite(f'the parameters at step {step} are not finite')
    self.checkpointer.save(step, self.state, data_state=self.train_iter.get_state(), config=self.config_dict)
    self.last_saved = step
    self.log.restart_clock()

  def close(self) -> None:
    self.checkpointer.close()
    self.writer.close()
    if hasattr(self.train_iter, 'close'):
      self.train_iter.close()


def run(config: ml_collections.ConfigDict, workdir: str, *, stop_after_steps: int | None = None,
        trainer_class: type[Trainer] | None = None) -> dict[str, Any]:
  """Trains config on workdir (resuming from its newest checkpoint) and returns the last train/eval metrics, plus
  'stopped_by' (SIGTERM, SIGINT, stop_after_steps or None).

  stop_after_steps (for tests and tools): behave as if preempted once that step is reached: save and return.
  trainer_class: the Trainer subclass that runs it (apps/align.py's for the online align methods).
  One run per workdir (a lock); the workdir's saved run must match the config before anything is written.
  """
  config = resolve_lib.checked_config(config)
  if config.train.harness_tasks:  # before anything is written: a misspelt task name never costs a run
    harness_app.training_tasks(config)
  workdir = os.path.abspath(workdir)
  with WorkdirLock(workdir, enabled=jax.process_index() == 0):
    resolve_lib.check_saved_run(config, workdir)
    r = resolve_lib.resolve(config, workdir, training=True, checked=True)
    write_config(r.config, r.workdir)
    stop = _StopFlag()
    stop.install()
    try:
      trainer = (trainer_class or Trainer)(r)
      try:
        return _train(trainer, stop, stop_after_steps)
      finally:
        trainer.close()
    finally:
      stop.uninstall()


def _train(trainer: Trainer, stop: _StopFlag, stop_after_steps: int | None) -> dict[str, Any]:
  """The loop: train calls; train rows every train.log_every; eval every train.eval_every; checkpoints every
  checkpoint.every_steps, at the end, and at a stop (signal or stop_after_steps)."""
  train, every_ckpt = trainer.config.train, trainer.config.checkpoint.every_steps
  last_train: dict[str, Any] = {}
  last_eval: dict[str, Any] | None = None
  step, stopped_by = trainer.start, None
  if step >= train.num_steps:
    _log(f'already at step {step} >= train.num_steps={train.num_steps}; nothing to train.')
  while step < train.num_steps:
    n = trainer.call_size(step, stop_after_steps)
    trainer.train_call(step, n)
    step += n
    is_last = step == train.num_steps
    log_step = step % train.log_every == 0 or is_last
    if log_step:
      last_train = trainer.log.flush(step)
    # a signal may reach one process first; in multi-process runs they agree at log steps (a collective)
    stopping = stop.requested is not None if jax.process_count() == 1 else (log_step and stop.any_process())
    if stopping:
      stopped_by = stop.requested or 'SIGTERM'
    elif stop_after_steps is not None and step >= stop_after_steps and not is_last:
      stopping, stopped_by = True, 'stop_after_steps'
    if (step % train.eval_every == 0 or is_last) and not stopping:
      try:
        last_eval = trainer.evaluate(step, final=is_last)
      except errors.UserError:
        trainer.save(step)  # the step's work is kept; the error is reported after the checkpoint
        raise
    if step % every_ckpt == 0 or is_last or stopping:
      trainer.save(step)
    if stopping:
      _log(f'{stopped_by}: saved checkpoint at step {step}; exiting.')
      break
  if trainer.last_saved != step and step > 0:
    trainer.save(step)
  return {'step': step, 'stopped_early': step < train.num_steps, 'stopped_by': stopped_by, **last_train,
          **(last_eval or {})}
