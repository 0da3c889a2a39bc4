"""The online align methods' training loop (align.method=grpo / rloo / ppo): train.py runs it for them.

Each step (train.num_steps of them) is one rollout and align.updates_per_batch optimizer updates on it:
  1. the next align.prompts_per_step prompts (data.PromptIterator: shuffled, resumable; jsonl: lines with a prompt
     and any other fields), each framed as an instruction's beginning (BOS + prompt) and repeated
     align.num_generations times;
  2. completions sampled with the jitted KV-cache sampler (decode.temperature / top_k / top_p, at most
     align.max_new_tokens; the key of step s is fold_in(key(seed), s), so a resumed run samples what it would have);
  3. rewards: align.reward_fn(prompts, completions, **the rows' other fields) and/or align.reward_model's scores;
  4. the sampling policy's and the reference's per-token log-probabilities of the completions, the KL penalty
     (rloo / ppo: folded into the reward, kl_coef x the summed log-ratio, as TRL), the advantages
     (losses.group_advantages; ppo: a value head and GAE);
  5. the update: training's own jitted, sharded train step with the clipped-surrogate objective (align/rl.py),
     so PEFT, meshes, micro-batching and checkpoints are exactly the supervised ones.
The reference is the run's start (checkpoint.init_from, frozen; under LoRA / adapters the base with fresh
adapters, no second copy of the base). Checkpoints hold the prompt position (the data state); rows in
metrics.jsonl add reward_mean, reward_std, kl, entropy, clip_fraction, completion_length, rollout_time and
update_time; eval rows (every train.eval_every steps) are the greedy completions' reward on data.eval_split's
prompts (eval_reward_mean, eval_reward_std, eval_completion_length).
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from jaxformer import align
from jaxformer import data as data_lib
from jaxformer import decoding
from jaxformer import flops as flops_lib
from jaxformer import resolve as resolve_lib
from jaxformer import settings as settings_lib
from jaxformer import sharding as shd
from jaxformer.align import losses, rl, value
from jaxformer.data import chat
from jaxformer.apps import evaluate
from jaxformer.apps import train as train_app
from jaxformer.apps.rewards import Rewards
from jaxformer.errors import ConfigError
from jaxformer.training import state as state_lib
from jaxformer.training import step as step_lib


class OnlineTrainer(train_app.Trainer):
  """train_app.Trainer whose data are prompts and whose step is rollout + updates (the module doc)."""

  def __init__(self, r: resolve_lib.Resolved):
    a = r.config.align
    self.rows_per_step = int(a.prompts_per_step) * int(a.num_generations)
    shards = shd.batch_shards(r.mesh, r.rules)
    if self.rows_per_step % shards:
      raise ConfigError(f'align.prompts_per_step x align.num_generations = {self.rows_per_step} rows per rollout must '
                        f'be divisible by the {shards} devices the batch is split over; change either.')
    super().__init__(r)
    config = self.config
    graphdef = self.setup.graphdef
    reward_model = (evaluate.restore_reward_model(a.reward_model, dataclasses.asdict(config.mesh),
                                                  flag='align.reward_model', batch_size=config.decode.batch_size)
                    if a.reward_model else None)
    self.rewards = Rewards(a.reward_fn, reward_model)
    needs_reference = float(a.kl_coef) > 0
    self.reference = state_lib.run_reference(config, self.setup, self.state, self.resumed) if needs_reference else None
    self._logps = jax.jit(lambda params, rest, rows: rl.policy_token_logps(
        step_lib.merge_model(graphdef, params, rest), rows))
    self._values = jax.jit(lambda params, rest, rows: value.values(
        step_lib.merge_model(graphdef, params, rest), rows)[1])
    self.sampling = decoding.DecodeSettings.from_config(config.decode, method='sample', max_len=int(a.max_new_tokens))
    self.greedy = decoding.DecodeSettings.from_config(config.decode, method='greedy', max_len=int(a.max_new_tokens))
    self.rng = jax.random.key(int(config.seed))
    self.unscored = r.tokenizer.unscored_target
    seq = int(config.data.seq_len)
    self.log.tokens_per_step = self.rows_per_step * seq
    self.log.step_flops = flops_lib.train_flops_per_step(r.model, self.rows_per_step, seq, None) * int(
        a.updates_per_batch)
    self._warned_cut = False

  # ---------------------------------------------------------------------------------------- Trainer hooks
  def optimizer_section(self):
    """The schedule counts optimizer updates: align.updates_per_batch per step."""
    train, u = self.config.train, int(self.config.align.updates_per_batch)
    return dataclasses.replace(train, num_steps=train.num_steps * u, warmup_steps=train.warmup_steps * u)

  def make_data(self, data_state: Any) -> data_lib.PromptIterator:
    r = self.r
    self.layout = shd.data_layout(r.mesh, r.rules, self.rows_per_step)
    prompts = data_lib.PromptIterator(r.source, self.config.data.train_split, int(self.config.align.prompts_per_step),
                                      int(self.config.seed))
    if data_state is not None:
      prompts.set_state(data_state)
    return prompts

  def make_evaluator(self) -> Any:
    return _RewardEvaluator(self)

  def call_size(self, step: int, stop_after_steps: int | None) -> int:
    return 1  # one rollout per call

  # ------------------------------------------------------------------------------------------- a rollout
  def prompt_texts(self, prompts: list[str | list[dict]]) -> list[str]:
    """Text prompts as they are; conversational ones (lists of messages) rendered with the chat template and its
    generation prompt (chat.RenderedChat: the text the reward functions see, holding the template's ids)."""
    if all(isinstance(p, str) for p in prompts):
      return list(prompts)
    return [p if isinstance(p, str) else chat.generation_prompt(self.r.tokenizer, self.chat_template, p)
            for p in prompts]

  @functools.cached_property
  def chat_template(self) -> chat.ChatTemplate:
    """The run's chat template (data.chat_template), built on the first conversational prompt."""
    return chat.template_for(self.r.tokenizer, self.config.data.chat_template)

  def prompt_ids(self, texts: list[str]) -> list[list[int]]:
    """BOS + prompt ids (a rendered conversation: its template's ids), cut to keep their last data.seq_len -
    align.max_new_tokens tokens."""
    tok, room = self.r.tokenizer, int(self.config.data.seq_len) - int(self.config.align.max_new_tokens)
    out = [[int(i) for i in t.ids] if isinstance(t, chat.RenderedChat) else tok.prompt(tok.encode(t)) for t in texts]
    if any(len(p) > room for p in out) and not self._warned_cut:
      self._warned_cut = True
      train_app._log(f'note: prompts longer than data.seq_len - align.max_new_tokens = {room} tokens keep their last '
                     f'{room} tokens (raise data.seq_len to keep them whole).')
    return [p[-room:] for p in out]

  def sample(self, params: Any, prompts: list[list[int]], settings: decoding.DecodeSettings,
             rng: jax.Array | None) -> list[list[int]]:
    """Completions (cut after their EOS) of the prompts, on the mesh."""
    model = nnx.merge(self.setup.graphdef, params, self.state['rngs'])
    tokens, lengths = decoding.pad_prompts(prompts)
    with shd.mesh_context(self.r.mesh, self.r.rules):
      out = decoding.decode(model, settings, tokens, prompt_lengths=lengths, rng=rng,
                            model_max_len=settings_lib.token_positions(self.config),
                            batch_sharding=shd.batch_sharding(self.r.mesh, self.r.rules, 1))
    return rl.completion_ids(out, settings.eos_id)

  def texts(self, completions: list[list[int]]) -> list[str]:
    eos = self.sampling.eos_id
    return [self.r.tokenizer.decode([t for t in c if t != eos]) for c in completions]

  def rollout(self, step: int) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    a, g = self.config.align, int(self.config.align.num_generations)
    batch = next(self.train_iter)
    texts = self.prompt_texts([p for p, _ in batch for _ in range(g)])
    fields = [f for _, f in batch for _ in range(g)]
    prompts = self.prompt_ids(texts)
    params = self.state['params']
    completions = self.sample(params, prompts, self.sampling, jax.random.fold_in(self.rng, step))
    rewards = self.rewards(texts, self.texts(completions), fields)
    rows = rl.rollout_rows(prompts, completions, int(self.config.data.seq_len), self.unscored)
    placed = shd.shard_batch(rows, self.r.mesh, self.r.rules, self.layout)
    rest = self.state['rngs']
    with shd.mesh_context(self.r.mesh, self.r.rules):
      old = self._logps(params, rest, placed)
      if self.reference is not None:
        ref = self._logps(step_lib.reference_model_params(params, self.reference, self.config.peft), rest, placed)
      else:
        ref = old
    old, ref = np.asarray(jax.device_get(old)), np.asarray(jax.device_get(ref))
    mask = (rows['targets'] >= 0) & (rows['targets'] != self.unscored)
    rows.update(old_logps=old.astype(np.float32), ref_logps=ref.astype(np.float32))
    if a.method == 'ppo':
      with shd.mesh_context(self.r.mesh, self.r.rules):
        old_values = np.asarray(jax.device_get(self._values(params, rest, placed)), np.float32)
      rows.update(self.gae(rewards, old, ref, old_values, mask))
    else:
      shaped = rewards
      if a.method == 'rloo':  # TRL RLOO: the KL penalty is part of the reward
        shaped = losses.rloo_rewards(rewards, old, ref, mask, beta=float(a.kl_coef))
      advantages = losses.group_advantages(shaped, g, method=a.method,
                                           scale=bool(a.scale_rewards) if a.method == 'grpo' else None)
      rows['advantages'] = np.asarray(advantages, np.float32)
    info = {'reward_mean': float(np.mean(rewards)), 'reward_std': float(np.std(rewards)),
            'completion_length': float(np.mean([len(c) for c in completions]))}
    return rows, info

  def gae(self, scores: np.ndarray, old: np.ndarray, ref: np.ndarray, values_: np.ndarray,
          mask: np.ndarray) -> dict[str, np.ndarray]:
    """PPO's per-token advantages, returns and value targets (TRL PPOTrainer): laid out from each completion's first
    token (rl.response_columns), rewards -kl_coef x (log pi_old - log pi_ref) per completion token plus the score
    on the position after it (losses.ppo_rewards), GAE over the value head's values, then back in row positions."""
    a = self.config.align
    cols, inside = rl.response_columns(mask, int(a.max_new_tokens) + 1)
    take = lambda x: np.take_along_axis(x, cols, axis=1) * inside  # noqa: E731
    resp_mask = take(mask.astype(np.float32))
    value_mask = np.asarray(losses.ppo_value_mask(resp_mask)) * inside
    rewards = losses.ppo_rewards(scores, take(old), take(ref), resp_mask, kl_coef=float(a.kl_coef))
    adv, returns = losses.gae(rewards, take(values_) * value_mask, resp_mask, gamma=float(a.discount),
                              lam=float(a.gae_lambda))
    out = {k: np.zeros_like(values_) for k in ('advantages', 'returns', 'value_mask')}
    for key, x in (('advantages', adv), ('returns', returns), ('value_mask', value_mask)):
      x = np.asarray(x, np.float32)
      for i in range(len(cols)):
        keep = value_mask[i] > 0
        out[key][i, cols[i][keep]] = x[i][keep]
    out['old_values'] = values_ * out['value_mask']
    return out

  def train_call(self, step: int, n: int) -> None:
    del n
    start = time.perf_counter()
    rows, info = self.rollout(step)
    mid = time.perf_counter()
    batch = shd.shard_batch(rows, self.r.mesh, self.r.rules, self.layout)
    for _ in range(int(self.config.align.updates_per_batch)):
      self.state, metrics = self.train_step(self.state, batch)
    jax.block_until_ready(metrics['loss'])
    info.update(rollout_time=mid - start, update_time=time.perf_counter() - mid)
    metrics = dict(metrics, **{k: np.float32(v) for k, v in info.items()})
    self.log.add(1, metrics)
    self.unchecked.append((step + 1, 1, metrics))
    self.check_finite(keep_last=True)


class _RewardEvaluator:
  """The online runs' eval rows: the reward of greedy completions of data.eval_split's prompts (all of them)."""

  def __init__(self, trainer: OnlineTrainer):
    self.trainer = trainer
    self.prompts = data_lib.PromptIterator(trainer.r.source, trainer.config.data.eval_split, 1, 0,
                                           shuffle=False).all()

  def training_row(self, params: Any, rest: Any, *, final: bool) -> dict[str, float]:
    del rest, final
    t = self.trainer
    texts = t.prompt_texts([p for p, _ in self.prompts])
    completions = t.sample(params, t.prompt_ids(texts), t.greedy, None)
    rewards = t.rewards(texts, t.texts(completions), [f for _, f in self.prompts])
    return {'eval_reward_mean': float(np.mean(rewards)), 'eval_reward_std': float(np.std(rewards)),
            'eval_completion_length': float(np.mean([len(c) for c in completions])),
            'eval_prompts': float(len(texts))}


def run(config: ml_collections.ConfigDict, workdir: str, *, stop_after_steps: int | None = None) -> dict[str, Any]:
  """train.py for an online align.method: train_app.run with the OnlineTrainer."""
  if not align.METHODS[str(config.align.method)].online:
    raise ConfigError(f'align.method={config.align.method} is not an online method; train with train.py.')
  return train_app.run(config, workdir, stop_after_steps=stop_after_steps, trainer_class=OnlineTrainer)
