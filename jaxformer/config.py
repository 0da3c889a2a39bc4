"""Config validation: turn an ml_collections config into checked, typed settings.

Every error is one line that names the key, the bad value and the fix, because the person reading it
is usually looking at a command line, not at this file.
"""
from __future__ import annotations

import dataclasses
import difflib
from typing import Any

import ml_collections


class ConfigError(ValueError):
  """A config value that cannot work. The message names the key and the fix."""


ARCHS = ('encoder_only', 'decoder_only', 'encoder_decoder')
POSITIONS = ('sinusoidal', 'rope', 'learned')
NORMS = ('layer', 'rms')
NORM_POSITIONS = ('pre', 'post')
MLPS = ('gelu', 'relu', 'swiglu')
DTYPES = ('float32', 'bfloat16', 'float16')
ATTENTION_IMPLS = ('auto', 'xla', 'cudnn', 'reference')
REMATS = ('none', 'block')
TOKENIZERS = ('char', 'byte', 'sentencepiece')
SOURCE_KINDS = ('builtin', 'text', 'parallel', 'tfds')
SAMPLINGS = ('streams', 'random_windows')
OPTIMIZERS = ('adamw', 'adafactor', 'sgd')
SCHEDULES = ('cosine', 'linear', 'constant', 'rsqrt')
DECODE_METHODS = ('greedy', 'beam', 'sample')
DISTRIBUTED = ('auto', 'on', 'off')


def _choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
  if value not in choices:
    close = difflib.get_close_matches(str(value), choices, n=1)
    hint = f' (did you mean {close[0]!r}?)' if close else ''
    raise ConfigError(f'{key}={value!r} is not a valid choice{hint}; use one of: {", ".join(choices)}.')


def _positive(key: str, value: Any, allow_zero: bool = False) -> None:
  ok = isinstance(value, int) and (value >= 0 if allow_zero else value > 0)
  if not ok:
    raise ConfigError(f'{key}={value!r} must be a {"non-negative" if allow_zero else "positive"} integer.')


def _fraction(key: str, value: Any, upper_inclusive: bool = False) -> None:
  ok = 0.0 <= value <= 1.0 if upper_inclusive else 0.0 <= value < 1.0
  if not ok:
    raise ConfigError(f'{key}={value!r} must be in [0, 1{"]" if upper_inclusive else ")"}.')


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The model section with defaults resolved (-1 -> the real value). Hashable, so jit can treat it as static."""
  arch: str
  position: str
  norm: str
  norm_position: str
  mlp: str
  num_layers: int
  num_decoder_layers: int
  num_heads: int
  num_kv_heads: int
  d_model: int
  d_ff: int
  vocab_size: int
  max_len: int
  dropout: float
  attention_dropout: float
  use_bias: bool
  tie_embeddings: bool
  norm_eps: float
  rope_base: float
  dtype: str
  param_dtype: str
  attention_impl: str
  remat: str
  init_std: float

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  @classmethod
  def from_config(cls, model: ml_collections.ConfigDict | ModelConfig) -> ModelConfig:
    if isinstance(model, ModelConfig):
      return model
    validate_model(model)
    values = {f.name: model[f.name] for f in dataclasses.fields(cls)}
    if values['num_kv_heads'] == -1:
      values['num_kv_heads'] = values['num_heads']
    if values['num_decoder_layers'] == -1:
      values['num_decoder_layers'] = values['num_layers']
    return cls(**values)


def validate_model(model: ml_collections.ConfigDict) -> None:
  """Checks the model section alone (build_model calls this)."""
  _choice('model.arch', model.arch, ARCHS)
  _choice('model.position', model.position, POSITIONS)
  _choice('model.norm', model.norm, NORMS)
  _choice('model.norm_position', model.norm_position, NORM_POSITIONS)
  _choice('model.mlp', model.mlp, MLPS)
  _choice('model.dtype', model.dtype, DTYPES)
  _choice('model.param_dtype', model.param_dtype, DTYPES)
  _choice('model.attention_impl', model.attention_impl, ATTENTION_IMPLS)
  _choice('model.remat', model.remat, REMATS)
  for key in ('num_layers', 'num_heads', 'd_model', 'd_ff', 'max_len'):
    _positive(f'model.{key}', model[key])
  if model.num_decoder_layers != -1:
    _positive('model.num_decoder_layers', model.num_decoder_layers)
  _positive('model.vocab_size', model.vocab_size, allow_zero=True)
  if model.d_model % model.num_heads:
    raise ConfigError(
        f'model.d_model={model.d_model} is not divisible by model.num_heads={model.num_heads}; '
        f'pick num_heads from the divisors of d_model (e.g. {_divisors_near(model.d_model, model.num_heads)}).')
  kv = model.num_heads if model.num_kv_heads == -1 else model.num_kv_heads
  if not isinstance(kv, int) or kv <= 0:
    raise ConfigError(f'model.num_kv_heads={model.num_kv_heads!r} must be a positive integer, or -1 for num_heads.')
  if model.num_heads % kv:
    raise ConfigError(
        f'model.num_heads={model.num_heads} is not divisible by model.num_kv_heads={kv}; grouped-query attention '
        f'needs num_kv_heads to divide num_heads (e.g. {_divisors_near(model.num_heads, kv)}).')
  if model.position == 'rope' and (model.d_model // model.num_heads) % 2:
    raise ConfigError(
        f'model.position=rope needs an even head dimension, but d_model/num_heads = '
        f'{model.d_model}/{model.num_heads} = {model.d_model // model.num_heads}; change d_model or num_heads.')
  _fraction('model.dropout', model.dropout)
  _fraction('model.attention_dropout', model.attention_dropout)


def _divisors_near(n: int, target: int) -> int:
  divisors = [d for d in range(1, n + 1) if n % d == 0]
  return min(divisors, key=lambda d: abs(d - target))


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks the whole config before anything expensive happens."""
  validate_model(config.model)
  data, train, mesh, decode = config.data, config.train, config.mesh, config.decode

  kind = str(data.source).split(':', 1)[0]
  if ':' not in str(data.source) or kind not in SOURCE_KINDS:
    raise ConfigError(
        f'data.source={data.source!r} is not a valid source; use builtin:<name>, text:<path or glob>, '
        'parallel:<prefix> or tfds:<name>[/<config>].')
  if not str(data.tokenizer).startswith('hf:'):  # hf:<dir> = a Hugging Face tokenizer.json (data/hf_tokenizer.py)
    _choice('data.tokenizer', data.tokenizer, TOKENIZERS)
  sampling = data.get('sampling', 'streams')  # configs saved before the key existed read as streams
  _choice('data.sampling', sampling, SAMPLINGS)
  if sampling == 'random_windows' and config.model.arch == 'encoder_decoder':
    raise ConfigError('data.sampling=random_windows cuts windows from one token stream, which does not apply to '
                      'model.arch=encoder_decoder; use data.sampling=streams.')
  for key in ('seq_len', 'src_seq_len'):
    _positive(f'data.{key}', data[key])
  longest = max(data.seq_len, data.src_seq_len if config.model.arch == 'encoder_decoder' else 0)
  if longest > config.model.max_len:
    raise ConfigError(
        f'data.seq_len/src_seq_len={longest} exceeds model.max_len={config.model.max_len}; '
        'raise model.max_len or lower the data lengths.')
  _fraction('data.mask_rate', data.mask_rate)

  _choice('train.optimizer', train.optimizer, OPTIMIZERS)
  _choice('train.schedule', train.schedule, SCHEDULES)
  for key in ('batch_size', 'num_steps', 'grad_accum_steps', 'log_every', 'eval_every'):
    _positive(f'train.{key}', train[key])
  _positive('train.warmup_steps', train.warmup_steps, allow_zero=True)
  if train.batch_size % train.grad_accum_steps:
    raise ConfigError(
        f'train.batch_size={train.batch_size} is not divisible by train.grad_accum_steps={train.grad_accum_steps}; '
        'each micro-batch must hold the same number of rows.')
  _fraction('train.label_smoothing', train.label_smoothing)

  _positive('checkpoint.every_steps', config.checkpoint.every_steps)
  _positive('checkpoint.keep', config.checkpoint.keep)
  k = train.get('steps_per_call', 1)
  _positive('train.steps_per_call', k)
  if k > 1:
    bad = [f'{name}={value}' for name, value in (('train.log_every', train.log_every),
                                                  ('train.eval_every', train.eval_every),
                                                  ('checkpoint.every_steps', config.checkpoint.every_steps))
           if value % k]
    if bad:
      raise ConfigError(f'{", ".join(bad)} must be a multiple of train.steps_per_call={k} (steps run {k} per call); '
                        f'use multiples of {k} or set train.steps_per_call=1.')

  for axis in ('data', 'fsdp', 'tensor'):
    size = mesh[axis]
    if not isinstance(size, int) or (size <= 0 and size != -1):
      raise ConfigError(f'mesh.{axis}={size!r} must be a positive integer, or -1 for the remaining devices.')
  if [mesh.data, mesh.fsdp, mesh.tensor].count(-1) > 1:
    raise ConfigError('only one of mesh.data, mesh.fsdp, mesh.tensor may be -1 (the remaining devices).')
  _choice('mesh.distributed', mesh.distributed, DISTRIBUTED)

  _choice('decode.method', decode.method, DECODE_METHODS)
  _positive('decode.beam_size', decode.beam_size)
  _positive('decode.max_len', decode.max_len)
  _positive('decode.top_k', decode.top_k, allow_zero=True)
  if not 0.0 < decode.top_p <= 1.0:
    raise ConfigError(f'decode.top_p={decode.top_p!r} must be in (0, 1]; 1.0 turns nucleus sampling off.')
  if decode.temperature < 0:
    raise ConfigError(f'decode.temperature={decode.temperature!r} must be >= 0 (0 = greedy).')
