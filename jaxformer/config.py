"""Config validation: turn an ml_collections config into checked, typed settings.

Every error is one line that names the key, the bad value and the fix, because the person reading it
is usually looking at a command line, not at this file. Choices are checked against the registries that implement
them (the model's in jaxformer/model/config.py, optimizers and schedules in training/optimizer.py, decoding methods
in decoding.py), so adding a choice there needs no edit here. ConfigError and ModelConfig are re-exported.
"""
from __future__ import annotations

import ml_collections

from jaxformer import align
from jaxformer import data as data_lib
from jaxformer import decoding
from jaxformer import heads
from jaxformer import metrics
from jaxformer import peft
from jaxformer import voting
from jaxformer.errors import ConfigError, check_choice, check_fraction, check_positive
from jaxformer.model.config import ModelConfig, validate_model
from jaxformer.training import optimizer

__all__ = ['ConfigError', 'ModelConfig', 'validate', 'validate_model']

DISTRIBUTED = ('auto', 'on', 'off')


def check_sequence_lengths(config: ml_collections.ConfigDict, n: int) -> None:
  """A 'sequence' mesh axis of n devices (context parallelism) splits every row's length into n equal pieces: each
  length the model trains on must divide (n = -1: resolved with the mesh, and resolve.resolve checks again)."""
  if n in (1, -1):
    return
  lengths = [('data.seq_len', config.data.seq_len)]
  if config.model.arch == 'encoder_decoder':
    lengths.append(('data.src_seq_len', config.data.src_seq_len))
  for key, length in lengths:
    if length % n:
      raise ConfigError(f'{key}={length} is not divisible by mesh.sequence={n} (context parallelism splits each row '
                        f'into {n} equal pieces); use a multiple of {n}, or another mesh.sequence.')


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks the whole config (every key present: settings.fill) before anything expensive happens."""
  validate_model(config.model)
  peft.validate(config)
  align.validate(config)
  data, train, mesh, decode = config.data, config.train, config.mesh, config.decode

  kind = str(data.source).split(':', 1)[0]
  if ':' not in str(data.source) or kind not in data_lib.SOURCES:
    raise ConfigError(
        f'data.source={data.source!r} is not a valid source; use builtin:<name>, text:<path or glob>, '
        'parallel:<prefix>, jsonl:<path or glob> or tfds:<name>[/<config>].')
  tokenizer_kind, _, tokenizer_arg = str(data.tokenizer).partition(':')  # hf:<dir> names a pretrained tokenizer
  check_choice('data.tokenizer', tokenizer_kind, data_lib.TOKENIZERS)
  if data_lib.TOKENIZERS[tokenizer_kind].pretrained != bool(tokenizer_arg):
    raise ConfigError(f'data.tokenizer={data.tokenizer!r}: ' + (
        f'use {tokenizer_kind}:<directory> (a tokenizer.json directory)' if not tokenizer_arg else
        f'{tokenizer_kind} is trained on the data and takes no argument; use data.tokenizer={tokenizer_kind}') + '.')
  check_choice('data.objective', data.objective, data_lib.OBJECTIVES)
  check_choice('data.sampling', data.sampling, data_lib.SAMPLINGS)
  if data.sampling == 'random_windows' and config.model.arch == 'encoder_decoder':
    raise ConfigError('data.sampling=random_windows cuts windows from one token stream, which does not apply to '
                      'model.arch=encoder_decoder; use data.sampling=streams.')
  for key in ('seq_len', 'src_seq_len'):
    check_positive(f'data.{key}', data[key])
  longest = max(data.seq_len, data.src_seq_len if config.model.arch == 'encoder_decoder' else 0)
  if longest > config.model.max_len:
    raise ConfigError(
        f'data.seq_len/src_seq_len={longest} exceeds model.max_len={config.model.max_len}; '
        'raise model.max_len or lower the data lengths.')
  if config.peft.method == 'prefix' and longest + config.peft.num_prefix_tokens > config.model.max_len:
    raise ConfigError(  # the tokens' positions start after the prefix (peft/prefix.py)
        f'data.seq_len/src_seq_len={longest} + peft.num_prefix_tokens={config.peft.num_prefix_tokens} exceeds '
        f'model.max_len={config.model.max_len}: the tokens\' positions start after the prefix; lower the data '
        'lengths or the prefix tokens.')
  check_fraction('data.mask_rate', data.mask_rate)
  if not 0 < float(data.spm_character_coverage) <= 1:
    raise ConfigError(f'data.spm_character_coverage={data.spm_character_coverage!r} must be in (0, 1] (1.0 = every '
                      'character its own piece; 0.9995 is SentencePiece\'s choice for Chinese / Japanese).')
  examples = align.examples_of(config)
  if kind not in data_lib.EXAMPLE_KINDS[examples]:
    reader = (f'align.method={config.align.method}' if align.METHODS[config.align.method].examples
              else f'model.head={config.model.head}')
    raise ConfigError(f'{reader} reads {examples} examples, which data.source={data.source!r} '
                      f'does not have; use data.source={data_lib.EXAMPLE_KINDS[examples][0]}:<file or {{split}} '
                      'pattern> (see README: Data).')
  if examples == 'tagged' and not data_lib.label_names(config):
    raise ConfigError('model.head=token_classification needs data.label_names, the tag strings in id order (e.g. '
                      '--config.data.label_names=O,B-PER,I-PER): entity-level F1 reads them.')
  if examples == 'spans':
    check_positive('data.doc_stride', data.doc_stride, allow_zero=True)
    for key in ('n_best_size', 'max_answer_len'):
      check_positive(f'decode.{key}', config.decode[key])
  if examples in ('labelled', 'tagged'):
    names = data_lib.label_names(config)
    if len(names) > config.model.num_classes:
      raise ConfigError(f'data.label_names has {len(names)} names but model.num_classes={config.model.num_classes}; '
                        f'set --config.model.num_classes={len(names)}.')
    if len(set(names)) != len(names):
      raise ConfigError(f'data.label_names={data.label_names!r} repeats a name; each class needs its own.')

  check_choice('train.optimizer', train.optimizer, optimizer.OPTIMIZERS)
  check_choice('train.schedule', train.schedule, optimizer.SCHEDULES)
  for key in ('batch_size', 'num_steps', 'grad_accum_steps', 'log_every', 'eval_every'):
    check_positive(f'train.{key}', train[key])
  check_positive('train.warmup_steps', train.warmup_steps, allow_zero=True)
  for key, allowed in (('eval_steps', 'a positive number of batches or -1 (the whole split)'),
                       ('final_eval_steps', 'a positive number of batches, -1 (the whole split) or 0 (= train.eval_steps)')):
    value = train[key]
    if not isinstance(value, int) or value < -1 or (value == 0 and key == 'eval_steps'):
      raise ConfigError(f'train.{key}={value!r} must be {allowed}.')
  if train.batch_size % train.grad_accum_steps:
    raise ConfigError(
        f'train.batch_size={train.batch_size} is not divisible by train.grad_accum_steps={train.grad_accum_steps}; '
        'each micro-batch must hold the same number of rows.')
  check_fraction('train.label_smoothing', train.label_smoothing)

  check_positive('checkpoint.every_steps', config.checkpoint.every_steps)
  check_positive('checkpoint.keep', config.checkpoint.keep)
  k = train.steps_per_call
  check_positive('train.steps_per_call', k)
  if k > 1:
    bad = [f'{name}={value}' for name, value in (('train.log_every', train.log_every),
                                                  ('train.eval_every', train.eval_every),
                                                  ('checkpoint.every_steps', config.checkpoint.every_steps))
           if value % k]
    if bad:
      raise ConfigError(f'{", ".join(bad)} must be a multiple of train.steps_per_call={k} (steps run {k} per call); '
                        f'use multiples of {k} or set train.steps_per_call=1.')

  for axis in ('data', 'fsdp', 'sequence', 'expert', 'tensor'):
    size = mesh[axis]
    if not isinstance(size, int) or (size <= 0 and size != -1):
      raise ConfigError(f'mesh.{axis}={size!r} must be a positive integer, or -1 for the remaining devices.')
  if [mesh.data, mesh.fsdp, mesh.sequence, mesh.expert, mesh.tensor].count(-1) > 1:
    raise ConfigError('only one of mesh.data, mesh.fsdp, mesh.sequence, mesh.expert, mesh.tensor may be -1 (the '
                      'remaining devices).')
  check_sequence_lengths(config, mesh.sequence)
  if mesh.expert not in (1, -1) and config.model.num_experts and config.model.num_experts % mesh.expert:
    raise ConfigError(f'mesh.expert={mesh.expert} does not divide model.num_experts={config.model.num_experts}; '
                      'pick mesh.expert from its divisors so each device holds whole experts.')
  check_choice('mesh.distributed', mesh.distributed, DISTRIBUTED)

  check_choice('decode.method', decode.method, decoding.METHODS)
  check_choice('decode.embed_pooling', decode.embed_pooling, heads.POOLINGS)
  check_positive('decode.beam_size', decode.beam_size)
  check_positive('decode.max_len', decode.max_len)
  check_positive('decode.top_k', decode.top_k, allow_zero=True)
  for key in ('eos_id', 'start_id'):
    if not isinstance(decode[key], int) or decode[key] < -1:
      raise ConfigError(f'decode.{key}={decode[key]!r} must be a token id >= 0, or -1 for the tokenizer\'s.')
  if not 0.0 < decode.top_p <= 1.0:
    raise ConfigError(f'decode.top_p={decode.top_p!r} must be in (0, 1]; 1.0 turns nucleus sampling off.')
  if decode.temperature < 0:
    raise ConfigError(f'decode.temperature={decode.temperature!r} must be >= 0 (0 = greedy).')
  if decode.bleu_tokenize not in metrics.BLEU_TOKENIZE_CHOICES:
    raise ConfigError(f'decode.bleu_tokenize={decode.bleu_tokenize!r} is not valid; use one of '
                      f'{", ".join(c for c in metrics.BLEU_TOKENIZE_CHOICES if c)}, or \'\' to follow data.tgt_lang.')
  check_positive('decode.bleu_max_ngram', decode.bleu_max_ngram)
  check_positive('decode.num_samples', decode.num_samples)
  try:  # the generation controls: decoding's own checks (one line naming the key), and the answer regex
    decoding.DecodeSettings.from_config(decode)
    voting.compile_pattern(str(decode.answer_pattern))
  except ValueError as e:
    raise ConfigError(str(e)) from None
