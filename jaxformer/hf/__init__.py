"""Hugging Face checkpoints in and out, without torch or transformers: config.json and safetensors, read directly.

  model_config, model = hf.load('path/to/gpt2')     # the model section (ConfigDict) and the NNX model
  hf.save(model, model_config, 'out/')               # config.json + model.safetensors that transformers loads

Supported model_types: gpt2, bert (masked LM), t5 (v1.0 and v1.1), llama, mistral, qwen2 (sliding windows too),
gemma, gemma2, and the mixtures of experts mixtral, qwen2_moe, olmoe (see families.py, one class per family), and task heads (model.head; each family's HEADS table):
BertForSequenceClassification as classification (num_labels >= 2) or reward (num_labels=1), and the GPT-2 / Llama /
Mistral / Qwen2 / Gemma *ForSequenceClassification with num_labels=1 as reward (written with pad_token_id in
config.json: transformers reads each row at its last token that is not the pad id). `save` also works for models
jaxformer built itself when a family can express the config (gpt_tiny's RoPE + RMSNorm + SwiGLU decoder is a
Llama); otherwise one ConfigError line names the setting.
Errors are ConfigError (train.py / eval.py print them as one line): a missing directory, no config.json, no
weights, an unsupported model_type, shapes that contradict the model section.

Layouts: the tensor mapping (families.py) names the unrolled parameters ('decoder.blocks.3.attn.query'); a
model.scan_layers=True model is converted at the boundary (layout_convert.to_flat_layout): load stacks the
per-layer arrays into 'decoder.blocks.layers.*', save unstacks them first.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from jaxformer import settings as settings_lib
from jaxformer.errors import ConfigError
from jaxformer.model.config import ModelConfig, validate_model
from jaxformer.special_tokens import BOS_ID, EOS_ID, PAD_ID
from jaxformer.data.hf_tokenizer import PREFIX  # 'hf:', also for checkpoint.init_from
from jaxformer.hf import families, weights
from jaxformer.hf.families import FAMILIES
from jaxformer.model import build_model, layout_convert

__all__ = ['FAMILIES', 'load', 'load_params', 'model_section', 'needs_pad_token', 'read_config', 'save']

CONFIG_NAME = 'config.json'


def read_config(directory: str) -> dict[str, Any]:
  """config.json of a Hugging Face directory, with one-line errors for what is missing."""
  if not os.path.isdir(directory):
    raise ConfigError(f'{directory}: no such directory; give a Hugging Face checkpoint directory (what '
                      'save_pretrained writes: config.json + model.safetensors).')
  path = os.path.join(directory, CONFIG_NAME)
  if not os.path.isfile(path):
    raise ConfigError(f'{directory} has no {CONFIG_NAME}, so it is not a Hugging Face checkpoint directory (what '
                      'save_pretrained writes).')
  try:
    with open(path, encoding='utf-8') as f:
      config = json.load(f)
  except (OSError, ValueError) as e:
    raise ConfigError(f'{path} is not readable JSON ({e}).') from None
  if 'model_type' not in config:
    raise ConfigError(f'{path} has no model_type; jaxformer reads {", ".join(FAMILIES)}.')
  return config


def _family(directory: str) -> tuple[dict[str, Any], families.Family]:
  config = read_config(directory)
  return config, families.for_model_type(config['model_type'], directory)


def model_section(directory: str) -> ml_collections.ConfigDict:
  """The `model` config section (every key) equivalent to the directory's config.json."""
  hf_config, family = _family(directory)
  try:
    values = family.model_section(hf_config)
  except ConfigError as e:
    raise ConfigError(f'{directory}: {e}') from None
  except KeyError as e:
    raise ConfigError(f'{directory}/{CONFIG_NAME} lacks {e.args[0]!r}, which {hf_config["model_type"]} '
                      'needs.') from None
  fields = dataclasses.fields(ModelConfig)
  unknown = sorted(set(values) - {f.name for f in fields})
  if unknown:
    raise ConfigError(f'jaxformer.hf sets model.{", model.".join(unknown)}, which the model library does not have '
                      '(families.py and ModelConfig disagree).')
  # Keys config.json does not decide (dtype, param_dtype, attention_impl, remat, scan_layers, ...): configs/default.py's
  section = settings_lib.default_config().model
  section.update(values)
  try:
    validate_model(section)
  except ConfigError as e:
    raise ConfigError(f'{directory} ({hf_config["model_type"]}): {e}') from None
  return section


# ------------------------------------------------------------------------------------------------- params
def _path(keys) -> str:
  return '.'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in keys if not hasattr(k, 'name'))


def _abstract(model_config: Any):
  """graphdef, abstract params (nnx.State of ShapeDtypeStruct), {path: ShapeDtypeStruct}; nothing allocated."""
  abstract = nnx.eval_shape(lambda: build_model(model_config, rngs=nnx.Rngs(params=0, dropout=1)))
  graphdef, params, _ = nnx.split(abstract, nnx.Param, ...)
  flat = {_path(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  return graphdef, params, flat


def load_params(directory: str, model_config: Any) -> dict[str, np.ndarray]:
  """{param path: array} of the directory's weights, laid out for `model_config` (our model section, either
  model.scan_layers layout).

  Every parameter must come from the checkpoint with the shape the section implies; a mismatch (e.g. a
  --config.model override that contradicts config.json) is one line naming the tensor. The exception are a task
  head's optional tensors (a BERT checkpoint without a classifier read for model.head=classification): their
  parameters are left out of the result (with one log line) and keep their fresh initialisation (with_params' fill).
  """
  hf_config, family = _family(directory)
  cfg = ModelConfig.from_config(model_config)
  _, _, abstract = _abstract(dataclasses.replace(cfg, scan_layers=False))  # the names families.py maps
  tensors = family.from_disk(weights.read_dir(directory), cfg)  # MoE: per-expert tensors stacked
  used, out, missing, fresh = set(), {}, [], []
  for rule in family.tensors(cfg):
    name = rule.hf if rule.hf in tensors else rule.hf.removeprefix(family.prefix)
    if name not in tensors:
      (fresh if rule.optional else missing).append(rule)
      continue
    used.add(name)
    unknown = [p for p in rule.ours if p not in abstract]
    if unknown:
      raise ConfigError(f'jaxformer.hf maps {rule.hf} to model parameter {unknown[0]}, which this model does not '
                        'have (families.py and the model library disagree).')
    w = tensors[name]
    expected = rule.to_hf(*(np.broadcast_to(np.zeros((), np.float32), abstract[p].shape) for p in rule.ours)).shape
    if tuple(w.shape) != tuple(expected):
      raise ConfigError(f'{directory}: {name} has shape {tuple(w.shape)}, but the model section needs '
                        f'{tuple(expected)} for {", ".join(rule.ours)}; a --config.model override contradicts the '
                        'checkpoint (drop it), or config.json does not match the weights.')
    for path, value in zip(rule.ours, rule.to_ours(w)):
      out[path] = value
  if missing:
    raise ConfigError(f'{directory} lacks {len(missing)} tensor(s) the {hf_config["model_type"]} model needs, e.g. '
                      f'{", ".join(rule.hf for rule in missing[:3])}.')
  if fresh:
    logging.warning('%s has no %s: model parameter(s) %s start freshly initialised (train them).', directory,
                    ', '.join(rule.hf for rule in fresh), ', '.join(p for rule in fresh for p in rule.ours))
  left = sorted(set(abstract) - set(out) - {p for rule in fresh for p in rule.ours})
  if left:
    raise ConfigError(f'jaxformer.hf gives no value to model parameter(s) {", ".join(left[:3])} for '
                      f'{hf_config["model_type"]} (families.py and the model library disagree).')
  unused = [n for n in tensors if n not in used and not any(part in n for part in family.ignored)]
  if unused:
    logging.warning('%s: %d tensor(s) not used by the %s model, e.g. %s', directory, len(unused),
                    hf_config['model_type'], ', '.join(sorted(unused)[:5]))
  return layout_convert.to_flat_layout(out, scanned=True) if cfg.scan_layers else out


def with_params(abstract_params, params: dict[str, np.ndarray], fill: Any = None):
  """nnx.State like `abstract_params` holding `params` (cast to each parameter's dtype; placed on its sharding
  when the abstract leaf has one). A parameter `params` lacks (a fresh task head, see load_params) comes from
  `fill` (a params State of the same tree), or with fill=None is left out: the State then holds only `params`, for
  nnx.merge_state over freshly initialised ones."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract_params)
  if fill is None and any(_path(path) not in params for path, _ in leaves):
    flat = nnx.to_flat_state(abstract_params)
    kept = [(path, leaf) for path, leaf in flat if '.'.join(map(str, path)) in params]
    abstract_params = nnx.from_flat_state(kept)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract_params)
  fill_values = {} if fill is None else {_path(p): x for p, x in jax.tree_util.tree_flatten_with_path(fill)[0]}
  values = []
  for path, leaf in leaves:
    key = _path(path)
    value = jnp.asarray(params[key] if key in params else fill_values[key], dtype=leaf.dtype)
    sharding = getattr(leaf, 'sharding', None)
    values.append(jax.device_put(value, sharding) if sharding is not None else value)
  return jax.tree_util.tree_unflatten(treedef, values)


def load(directory: str, model_config: Any = None) -> tuple[ml_collections.ConfigDict, nnx.Module]:
  """(model section, NNX model with the checkpoint's weights). `model_config` overrides the section read from
  config.json (e.g. another dtype); its shapes must match the checkpoint."""
  section = model_section(directory) if model_config is None else ml_collections.ConfigDict(
      dataclasses.asdict(model_config) if isinstance(model_config, ModelConfig) else model_config.to_dict())
  params = load_params(directory, section)
  graphdef, abstract_params, _ = _abstract(section)
  fresh, rest = jax.jit(lambda: nnx.split(build_model(section, rngs=nnx.Rngs(params=0, dropout=1)), nnx.Param,
                                          ...)[1:])()
  return section, nnx.merge(graphdef, with_params(abstract_params, params, fill=fresh), rest)


def model_params(model: nnx.Module) -> dict[str, np.ndarray]:
  """{param path: numpy array} of a model (gathered to this host)."""
  leaves = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]
  return {_path(p): np.asarray(jax.device_get(x)) for p, x in leaves}


def needs_pad_token(model_config: Any) -> bool:
  """Whether the Hugging Face class `model_config` is saved as needs pad_token_id in config.json: a decoder's
  *ForSequenceClassification (model.head=reward) reads each row at its last token that is not the pad id."""
  cfg = ModelConfig.from_config(model_config)
  return families.for_model(cfg).HEADS[cfg.head].pad_token


def save(model: nnx.Module, model_config: Any, directory: str, *, token_ids: dict[str, int] | None = None,
         label_names: Sequence[str] = ()) -> str:
  """Writes config.json + model.safetensors for the Hugging Face family that expresses `model_config`.

  token_ids: bos_token_id / eos_token_id / pad_token_id (and decoder_start_token_id) for config.json, e.g. an
  hf: tokenizer's; None = jaxformer's own tokenizers' ids (pad 0, bos 1, eos 2). label_names (data.label_names):
  config.json's id2label / label2id names for a classifier's classes or a tagger's tags. A class that needs a pad id
  (needs_pad_token) without one in token_ids is a ConfigError. Returns the model_type written.
  """
  cfg = ModelConfig.from_config(model_config)
  family = families.for_model(cfg)
  architecture = family.architecture_for(cfg)
  if token_ids is not None and family.HEADS[cfg.head].pad_token and token_ids.get('pad_token_id') is None:
    raise ConfigError(f'a {architecture} needs pad_token_id in config.json (transformers reads each row at its last '
                      'token that is not the pad id); give token_ids a pad_token_id.')
  params = layout_convert.to_flat_layout(model_params(model), scanned=False)  # a scanned model: per-layer names
  tensors, used = {}, set()
  for rule in family.tensors(cfg):
    tensors[rule.hf] = np.ascontiguousarray(rule.to_hf(*(params[p] for p in rule.ours)))
    used.update(rule.ours)
  left = sorted(set(params) - used)
  if left:
    raise ConfigError(f'model parameter(s) {", ".join(left[:3])} have no place in a {family.model_types[0]} '
                      'checkpoint.')
  tensors = family.to_disk(tensors, cfg)  # the layout the family's Hub checkpoints have (MoE: per expert)
  if token_ids is None:
    token_ids = {'pad_token_id': PAD_ID, 'bos_token_id': BOS_ID, 'eos_token_id': EOS_ID}
    if cfg.arch == 'encoder_decoder':
      token_ids['decoder_start_token_id'] = BOS_ID  # jaxformer's decoders start from bos
  config = {'architectures': [architecture], 'model_type': family.model_types[0], **family.hf_config(cfg),
            **token_ids}
  if label_names and len(config.get('id2label') or {}) == len(label_names):
    config['id2label'] = {str(i): name for i, name in enumerate(label_names)}
    config['label2id'] = {name: i for i, name in enumerate(label_names)}
  os.makedirs(directory, exist_ok=True)
  weights.write_file(os.path.join(directory, weights.WEIGHTS_NAME), tensors, metadata={'format': 'pt'})
  index = os.path.join(directory, weights.INDEX_NAME)
  if os.path.exists(index):  # a stale index would point transformers at other shards
    os.remove(index)
  with open(os.path.join(directory, CONFIG_NAME), 'w', encoding='utf-8') as f:
    json.dump(config, f, indent=2, sort_keys=True)
  return config['model_type']
