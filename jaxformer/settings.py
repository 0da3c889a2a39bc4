"""A run's settings as typed, frozen sections: what `resolve()` hands to the library.

Every key has exactly one default, in configs/default.py: `fill` lays a config over it once, `from_config` types
the result (one frozen dataclass per section, hashable, so a jitted function may close over it or take it as a
static argument). Keys are documented where their default is set (configs/default.py); the dataclasses here only
say their types. The model section is jaxformer.model's ModelConfig.

Saved configs (DIR/config.json, a checkpoint's config item) of older versions are read through `upgrade_saved`,
the one place that knows what a missing key meant.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import sys
from typing import Any, Mapping

import ml_collections

from jaxformer.decoding import DecodeSettings
from jaxformer.errors import ConfigError
from jaxformer.model.config import ModelConfig
from jaxformer.special_tokens import BOS_ID, EOS_ID


@dataclasses.dataclass(frozen=True)
class DataSettings:
  source: str
  data_dir: str
  tokenizer: str
  vocab_size: int
  spm_model_type: str
  spm_character_coverage: float
  tokenizer_extra: str
  src_lang: str
  tgt_lang: str
  text_key: str
  text_unit: str
  prompt_key: str
  response_key: str
  messages_key: str
  chat_template: str
  chosen_key: str
  rejected_key: str
  responses_key: str
  margin_key: str
  text_pair_keys: str
  label_key: str
  label_names: str
  words_key: str
  tags_key: str
  doc_stride: int
  seq_len: int
  src_seq_len: int
  pack: bool
  sampling: str
  max_unk_fraction: float
  mask_rate: float
  objective: str
  noise_density: float
  mean_noise_span_length: float
  num_sentinels: int
  train_split: str
  eval_split: str
  test_split: str
  prefetch: int


@dataclasses.dataclass(frozen=True)
class TrainSettings:
  batch_size: int
  num_steps: int
  optimizer: str
  learning_rate: float
  schedule: str
  warmup_steps: int
  min_learning_rate: float
  b1: float
  b2: float
  eps: float
  weight_decay: float
  weight_decay_exclude: str
  grad_clip_norm: float
  grad_accum_steps: int
  steps_per_call: int
  label_smoothing: float
  z_loss: float
  moe_aux_loss_coef: float
  moe_z_loss_coef: float
  log_every: int
  eval_every: int
  eval_steps: int
  final_eval_steps: int
  eval_batch_size: int
  max_bad_steps: int
  skip_bad_steps: bool
  compilation_cache_dir: str
  harness_tasks: str


@dataclasses.dataclass(frozen=True)
class PeftSettings:
  method: str
  targets: str
  rank: int
  alpha: float
  dropout: float
  adapter_dim: int
  num_prompt_tokens: int
  num_prefix_tokens: int
  prefix_projection: int
  train_extra: str
  adapter: str
  adapters: str
  adapter_weights: str
  adapter_name: str
  train_vocab: str
  quantize: str
  quantize_block: int
  quantize_stats_block: int


@dataclasses.dataclass(frozen=True)
class AlignSettings:
  method: str
  beta: float
  dpo_loss: str
  gamma: float
  precompute_reference: bool
  reward_margin: bool
  center_rewards: float
  prompts_per_step: int
  num_generations: int
  max_new_tokens: int
  reward_model: str
  reward_fn: str
  clip_eps: float
  kl_coef: float
  updates_per_batch: int
  scale_rewards: bool
  gae_lambda: float
  discount: float
  value_coef: float
  value_clip: float


@dataclasses.dataclass(frozen=True)
class HarnessSettings:
  include_path: str
  num_fewshot: int
  limit: float
  batch_size: int
  max_gen_toks: int
  bootstrap_iters: int
  log_samples: bool
  apply_chat_template: bool
  fewshot_as_multiturn: bool
  system_instruction: str


@dataclasses.dataclass(frozen=True)
class CheckpointSettings:
  every_steps: int
  keep: int
  async_save: bool
  init_from: str


@dataclasses.dataclass(frozen=True)
class MeshSettings:
  data: int
  fsdp: int
  sequence: int  # context parallelism (activations split along their length); in the mesh only when > 1
  expert: int  # expert parallelism (a mixture-of-experts model's experts); in the mesh only when > 1
  tensor: int
  logical_axis_rules: tuple
  distributed: str


@dataclasses.dataclass(frozen=True)
class DecodeSection(DecodeSettings):
  """The decoding method's parameters (decoding.DecodeSettings) and how eval.py batches and scores decodes."""
  batch_size: int
  bleu_tokenize: str
  bleu_max_ngram: int
  num_samples: int
  reward_model: str
  answer_pattern: str
  embed_pooling: str
  embed_normalize: bool
  n_best_size: int
  max_answer_len: int


@dataclasses.dataclass(frozen=True)
class Settings:
  """The whole run: config.<section>.<key> reads the same as on the ConfigDict it came from."""
  seed: int
  model: ModelConfig
  data: DataSettings
  train: TrainSettings
  peft: PeftSettings
  align: AlignSettings
  harness: HarnessSettings
  checkpoint: CheckpointSettings
  mesh: MeshSettings
  decode: DecodeSection

  def to_dict(self) -> dict[str, Any]:
    return to_dict(self)


SECTIONS: dict[str, type] = {'model': ModelConfig, 'data': DataSettings, 'train': TrainSettings, 'peft': PeftSettings,
            'align': AlignSettings, 'harness': HarnessSettings, 'checkpoint': CheckpointSettings, 'mesh': MeshSettings, 'decode': DecodeSection}


# ------------------------------------------------------------------------------------------------ defaults
def default_config() -> ml_collections.ConfigDict:
  """configs/default.py's get_config(): the one default of every key."""
  try:
    module = importlib.import_module('configs.default')
  except ModuleNotFoundError:  # run from elsewhere: the checkout this package lives in
    sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    module = importlib.import_module('configs.default')
  return module.get_config()


def _plain(value: Any) -> Any:
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    return dataclasses.asdict(value)
  if isinstance(value, ml_collections.ConfigDict):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, Mapping):
    return {k: _plain(v) for k, v in value.items()}
  return value


def fill(config: ml_collections.ConfigDict | Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A new ConfigDict: configs/default.py's values with `config`'s laid over them. A key default.py does not have
  is a ConfigError naming it (a recipe's misspelling; command-line ones are caught earlier, by cli)."""
  given = _plain(config)
  out = default_config()
  for key, value in given.items():
    if key not in out:
      raise ConfigError(f'unknown config key {key!r}; the sections are {", ".join(k for k in out.keys())}.')
    if isinstance(out[key], ml_collections.ConfigDict):
      if not isinstance(value, Mapping):
        raise ConfigError(f'config.{key} must be a section (a dict of keys), not {value!r}.')
      for sub, v in value.items():
        if sub not in out[key]:
          raise ConfigError(f'unknown config key {key}.{sub}; see configs/default.py for the keys of {key}.')
        out[key][sub] = _tuple_rules(sub, v)
    else:
      out[key] = value
  return out


def _tuple_rules(key: str, value: Any) -> Any:
  if key == 'logical_axis_rules':  # JSON turns the rules into lists; rules are hashable tuples
    return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in value)
  return value


# ----------------------------------------------------------------------------------------- typed sections
def from_config(config: ml_collections.ConfigDict | Mapping[str, Any]) -> Settings:
  """Typed, frozen settings from a complete config (every key of configs/default.py; `fill` makes one)."""
  given = _plain(config)
  sections = {}
  for name, cls in SECTIONS.items():
    values = given[name]
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in values]
    if missing:
      raise ConfigError(f'config.{name} lacks {", ".join(missing)}; resolve fills every key from configs/default.py.')
    kwargs = {f.name: _tuple_rules(f.name, values[f.name]) for f in dataclasses.fields(cls)}
    sections[name] = ModelConfig.from_config(ml_collections.ConfigDict(kwargs)) if cls is ModelConfig else cls(**kwargs)
  return Settings(seed=int(given['seed']), **sections)


def of(config: Settings | ml_collections.ConfigDict | Mapping[str, Any]) -> Settings:
  """`config` as Settings: Settings pass through; a ConfigDict (e.g. a recipe in a test) is filled and typed."""
  return config if isinstance(config, Settings) else from_config(fill(config))


def to_dict(settings: Settings) -> dict[str, Any]:
  """Plain JSON-able dict (tuples become lists in JSON)."""
  return dataclasses.asdict(settings)


def to_json(settings: Settings) -> str:
  """The settings as canonical JSON (what checkpoints and DIR/config.json store)."""
  return json.dumps(to_dict(settings), indent=2, sort_keys=True, default=str)


def replace(settings: Settings, **sections: Any) -> Settings:
  """A copy with whole sections replaced, e.g. replace(s, model=dataclasses.replace(s.model, scan_layers=True))."""
  return dataclasses.replace(settings, **sections)


def decode_settings(**overrides: Any) -> DecodeSettings:
  """configs/default.py's decode section with `overrides`, its -1 ids read as the jaxformer tokenizers' (EOS, BOS),
  as resolve reads them for those tokenizers: for calling the decoder outside a run (tools, tests)."""
  return DecodeSettings.from_config(default_config().decode, **{'eos_id': EOS_ID, 'start_id': BOS_ID, **overrides})


def token_positions(config: Any) -> int:
  """The positions a sequence's tokens may take: model.max_len, less peft.num_prefix_tokens with prefix tuning (the
  tokens' positions start after the prefix: peft/prefix.py)."""
  prefix = int(config.peft.num_prefix_tokens) if config.peft.method == 'prefix' else 0
  return int(config.model.max_len) - prefix


# ------------------------------------------------------------------------------------------- saved configs
def upgrade_saved(saved: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A config saved by an older version, complete: the keys it lacks (added to configs/default.py since) get their
  default, which in every case is the behaviour those versions had (the peft section, model.scan_layers / head /
  pooling ..., data.sampling / objective / text_unit, train.steps_per_call / final_eval_steps / max_bad_steps,
  decode.eos_id / start_id: -1 = the tokenizer's, as the ids were then). Keys no longer read are dropped."""
  defaults = default_config()
  known = {k: v for k, v in _plain(saved).items() if k in defaults}
  for key, value in list(known.items()):
    if isinstance(defaults[key], ml_collections.ConfigDict):
      known[key] = {k: v for k, v in (value or {}).items() if k in defaults[key]}
  return fill(known)


def saved_peft(saved: Mapping[str, Any] | None) -> PeftSettings:
  """The peft section of a saved config (none when it predates PEFT)."""
  return PeftSettings(**upgrade_saved(saved or {}).peft)
