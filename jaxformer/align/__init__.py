"""Learning from preferences and from a reward: the third stage of a chat model's training.

  align.method   none    the head's own objective (lm: next-token cross-entropy; model.head=reward: Bradley-Terry
                         on preference pairs, pairwise.BradleyTerry)
                 dpo     direct preference optimisation against the frozen reference (pairwise.DPO)
                 simpo   reference-free, length-normalised (pairwise.SimPO)
                 grpo    online: sample align.num_generations completions per prompt, score them (a reward model
                 rloo    and/or a Python function), group-normalised (grpo) or leave-one-out (rloo) advantages,
                 ppo     or a value head with GAE (ppo); the clipped surrogate + KL to the reference (rl.py;
                         the loop is jaxformer/apps/align.py)

The losses themselves are pure functions (losses.py). A method is one `Method` in METHODS: which examples it reads
(data.sources: 'preference' pairs or 'prompts'), its objective over a batch (offline methods) or that it runs the
online loop, and its checks; config validation, the data source, the train step and the train app all ask this
registry. The reference model is built in training/state.py (`reference_params`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

from jaxformer import heads
from jaxformer.align import losses
from jaxformer.align.pairwise import DPO, BradleyTerry, PairObjective, SimPO
from jaxformer.align import value
from jaxformer.align.rl import PolicyUpdate, PPOUpdate, RLOOUpdate
from jaxformer.errors import ConfigError, check_choice, check_positive

__all__ = ['METHODS', 'Method', 'OBJECTIVES', 'PairObjective', 'attach', 'examples_of', 'objective_of', 'scorer_of',
           'validate']

def _check_policy(config: Any, method: str) -> None:
  model = config.model
  if model.arch != 'decoder_only' or heads.head_of(model).module is not None:
    raise ConfigError(f'align.method={method} fine-tunes a decoder_only language model (model.head=lm); this run is '
                      f'model.arch={model.arch} with model.head={model.head}. Train a reward model with '
                      'model.head=reward and align.method=none.')
  if config.peft.method == 'prompt':
    raise ConfigError(f'align.method={method} with peft.method=prompt: the reference model would see the soft prompt; '
                      'use peft.method=lora or adapter (their reference is the base with the adapters off).')
  if not config.align.beta > 0:
    raise ConfigError(f'align.beta={config.align.beta!r} must be > 0.')


def _check_dpo(config: Any) -> None:
  _check_policy(config, 'dpo')
  check_choice('align.dpo_loss', config.align.dpo_loss, losses.DPO_LOSSES)


def _check_online(config: Any) -> None:
  align = config.align
  _check_policy(config, align.method)
  if not align.reward_model and not align.reward_fn:
    raise ConfigError(f'align.method={align.method} needs a reward: set align.reward_model=<workdir of a model.head='
                      'reward run> and/or align.reward_fn=<module:function>.')
  for key in ('prompts_per_step', 'num_generations', 'max_new_tokens', 'updates_per_batch'):
    check_positive(f'align.{key}', getattr(align, key))
  if align.max_new_tokens >= config.data.seq_len:
    raise ConfigError(f'align.max_new_tokens={align.max_new_tokens} leaves no room for the prompt in data.seq_len='
                      f'{config.data.seq_len} (the rollout rows hold prompt + completion); raise data.seq_len (and '
                      'model.max_len).')
  if align.method in ('grpo', 'rloo') and align.num_generations < 2:
    raise ConfigError(f'align.method={align.method} compares completions of the same prompt: align.num_generations '
                      f'must be >= 2 (it is {align.num_generations}).')


@dataclasses.dataclass(frozen=True)
class Method:
  """One align.method: the examples it reads (None: the head's), its objective over a batch (offline methods),
  whether it runs the online loop, and its config checks."""
  examples: str | None = None
  objective: PairObjective | PolicyUpdate | None = None
  online: bool = False
  validate: Callable[[Any], None] | None = None
  value_head: bool = False  # the policy gets a value head (ppo)


METHODS: dict[str, Method] = {
    'none': Method(),
    'dpo': Method('preference', DPO(), validate=_check_dpo),
    'simpo': Method('preference', SimPO(), validate=lambda c: _check_policy(c, 'simpo')),
    'grpo': Method('prompts', PolicyUpdate(), online=True, validate=_check_online),
    'rloo': Method('prompts', RLOOUpdate(), online=True, validate=_check_online),
    'ppo': Method('prompts', PPOUpdate(), online=True, validate=_check_online, value_head=True),
}
# Head.objective -> the objective a head trains with on its own (model.head=reward: pairs)
OBJECTIVES: dict[str, PairObjective] = {'bradley_terry': BradleyTerry()}


def objective_of(config: Any) -> PairObjective | PolicyUpdate | None:
  """The run's pair objective (an offline align.method's, else its head's), or None: the head's cross-entropy."""
  method = METHODS[config.align.method]
  if method.objective is not None:
    return method.objective
  name = heads.head_of(config.model).objective
  return OBJECTIVES[name] if name else None


def scorer_of(config: Any) -> Any:
  """What turns evaluation sums into metrics rows (eval_row / results / unit): the objective, else the head."""
  return objective_of(config) or heads.head_of(config.model)


def examples_of(config: Any) -> str:
  """What the run's data source yields (data.sources.EXAMPLE_KINDS): the align method's examples, else the head's."""
  return METHODS[config.align.method].examples or heads.head_of(config.model).examples


def attach(model: Any, config: Any, rngs: Any) -> Any:
  """Adds the method's own modules to a freshly built policy (ppo: the value head); returns the model."""
  if METHODS[config.align.method].value_head:
    value.attach(model, rngs)
  return model


def validate(config: Any) -> None:
  """The align section (config.validate calls this)."""
  check_choice('align.method', config.align.method, METHODS)
  method = METHODS[config.align.method]
  if method.validate is not None:
    method.validate(config)
