"""Hugging Face peft's adapter directories <-> jaxformer's LoRA factors, with numpy only (no torch, no peft).

An adapter directory is what `PeftModel.save_pretrained` writes: adapter_config.json (peft_type, r, lora_alpha,
use_rslora, target_modules, rank_pattern, alpha_pattern, ...) and adapter_model.safetensors, whose LoRA tensors
are `base_model.model.<module>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r] for each Hugging Face module
the adapter targets; peft adds scaling * B A (scaling = lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora)
to the module's weight (transposed for GPT-2's Conv1D, whose weight is [in, out]: fan_in_fan_out).

Which Hugging Face module is which of our projections comes from families.py's tensor Rules (the same ones that
load the base): a rule's layout is probed with an index array, so heads_in / heads_out / Conv1D layouts map A and
B exactly as they map the kernel. Our LoRA factors are A [*in, r] and B [r, *out] with scale alpha / rank.

  GPT-2's fused c_attn (q, k, v in one Conv1D [D, 3D]): a peft LoRA on c_attn is one A shared by q, k and v and
  B's three row blocks, so import gives query / key / value the same A. Export writes c_attn with rank r when the
  three A's are equal (what import gave, untrained), and otherwise the exact block form: A = [A_q; A_k; A_v]
  [3r, D], B block-diagonal [3D, 3r], with rank_pattern / alpha_pattern {c_attn: 3r / 3 alpha} so its scaling
  stays alpha / r.

What maps (PEFT_TYPES, keyed by adapter_config.json's peft_type): LORA onto the projections jaxformer's LoRA has
(attention q, k, v, o, self and cross; MLP up / gate / down), and PREFIX_TUNING onto a decoder_only model's
prefix (peft.method=prefix; its files: the "prefix tuning" section below). Anything else, DoRA, bias training,
modules_to_save, embedding / lm_head LoRA, another peft_type, is one ConfigError line naming it.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxformer.errors import ConfigError
from jaxformer.hf import families, weights
from jaxformer.model.config import ModelConfig
from jaxformer.peft import lora as lora_lib

CONFIG_NAME = 'adapter_config.json'
WEIGHTS_NAME = 'adapter_model.safetensors'
KEY_PREFIX = 'base_model.model.'
_LORA_KEY = re.compile(r'^(?P<module>.+)\.lora_(?P<factor>[AB])(?:\.[^.]+)?\.weight$')


# ----------------------------------------------------------------------------------------- the module map
@dataclasses.dataclass(frozen=True)
class Projection:
  """One Hugging Face Linear / Conv1D module <-> our kernel(s) `ours` (one, or GPT-2's fused q, k, v): each
  kernel's shape, how many of its leading dimensions are its input (`in_dims`), and which rows of the module's
  output it is (`out_slices`)."""
  module: str
  ours: tuple[str, ...]
  shapes: tuple[tuple[int, ...], ...]
  in_dims: tuple[int, ...]
  out_slices: tuple[tuple[int, int], ...]
  conv1d: bool  # weight stored [in, out] (peft's fan_in_fan_out)


def _probe(rule: families.Rule, shapes: list[tuple[int, ...]], in_dims: list[int]) -> bool | None:
  """True: the rule writes [in, out] (Conv1D), False: [out, in] (nn.Linear), None: neither (no LoRA mapping), for
  the kernels flattened row-major to [in, out] (and, when fused, concatenated along out)."""
  start, kernels = 0, []
  for shape in shapes:
    kernels.append(np.arange(start, start + math.prod(shape), dtype=np.float64).reshape(shape))
    start += math.prod(shape)
  flat = np.concatenate([k.reshape(math.prod(k.shape[:n]), -1) for k, n in zip(kernels, in_dims)], axis=-1)
  written = np.asarray(rule.to_hf(*kernels))
  if written.shape == flat.shape and np.array_equal(written, flat):
    return True
  if written.shape == flat.T.shape and np.array_equal(written, flat.T):
    return False
  return None


@functools.lru_cache(maxsize=8)
def projections(cfg: ModelConfig) -> dict[str, Projection]:
  """{Hugging Face module path: Projection} for every projection of `cfg` that jaxformer's LoRA can target, in
  the family that expresses `cfg` (per-layer names, whatever cfg.scan_layers)."""
  from jaxformer import hf  # the package: abstract shapes of the unrolled model
  cfg = dataclasses.replace(cfg, scan_layers=False)
  family = families.for_model(cfg)
  _, _, abstract = hf._abstract(cfg)  # pylint: disable=protected-access
  names = set(lora_lib.ATTENTION + lora_lib.MLP)
  out = {}
  for rule in family.tensors(cfg):
    if not rule.hf.endswith('.weight') or not rule.ours or any(p.rsplit('.', 1)[-1] not in names for p in rule.ours):
      continue
    shapes = [tuple(abstract[p].shape) for p in rule.ours]
    in_dims = [lora_lib.INPUT_DIMS.get(p.rsplit('.', 1)[-1], 1) for p in rule.ours]
    conv1d = _probe(rule, shapes, in_dims)
    if conv1d is None:
      continue
    slices, start = [], 0
    for shape, n in zip(shapes, in_dims):
      size = math.prod(shape[n:])
      slices.append((start, start + size))
      start += size
    module = rule.hf[:-len('.weight')]
    out[module] = Projection(module, tuple(rule.ours), tuple(shapes), tuple(in_dims), tuple(slices), conv1d)
  return out


def kernel_of(lora_path: str) -> str:
  """'decoder.blocks.0.attn.lora.query.a' -> 'decoder.blocks.0.attn.query' (the kernel a factor updates)."""
  parts = lora_path.split('.')
  return '.'.join(parts[:-3] + [parts[-2]])


def factor_paths(kernel: str) -> tuple[str, str]:
  """Our parameter paths of a kernel's LoRA factors A and B."""
  prefix, name = kernel.rsplit('.', 1)
  return f'{prefix}.lora.{name}.a', f'{prefix}.lora.{name}.b'


# ------------------------------------------------------------------------------------------------ reading
@dataclasses.dataclass(frozen=True)
class Adapter:
  """A peft adapter read into our layout: factors {our kernel path: (A [*in, r_m], B [r_m, *out], scale_m)}, so
  that kernel + scale_m * A B is peft's weight + delta; `scale` is adapter_config.json's default scaling and
  `rank` its r."""
  directory: str
  peft_type: str
  rank: int
  scale: float
  factors: dict[str, tuple[np.ndarray, np.ndarray, float]]
  method = 'lora'  # the peft.method it loads into

  @property
  def targets(self) -> tuple[str, ...]:
    """Our projection names the adapter updates (peft.targets)."""
    return tuple(dict.fromkeys(k.rsplit('.', 1)[-1] for k in self.factors))

  @property
  def max_rank(self) -> int:
    return max(a.shape[-1] for a, _, _ in self.factors.values())


def read_config(directory: str) -> dict[str, Any]:
  """adapter_config.json of a peft directory, with one-line errors."""
  path = os.path.join(directory, CONFIG_NAME)
  if not os.path.isdir(directory):
    raise ConfigError(f'{directory}: no such directory; give a directory peft\'s save_pretrained wrote '
                      f'({CONFIG_NAME} + {WEIGHTS_NAME}).')
  if not os.path.isfile(path):
    raise ConfigError(f'{directory} has no {CONFIG_NAME}, so it is not a Hugging Face peft adapter directory.')
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise ConfigError(f'{path} is not readable JSON ({e}).') from None


def _pattern_value(patterns: dict[str, Any] | None, module: str, default: Any) -> Any:
  """peft's rank_pattern / alpha_pattern lookup: the first key k with `(.*\\.)?(k)$` matching the module name."""
  for key, value in (patterns or {}).items():
    if re.match(rf'(.*\.)?({key})$', module):
      return value
  return default


def _check_lora_config(directory: str, adapter_json: dict[str, Any]) -> None:
  unsupported = [('use_dora', True, 'DoRA'), ('lora_bias', True, 'a LoRA bias')]
  for key, bad, what in unsupported:
    if adapter_json.get(key) == bad:
      raise ConfigError(f'{directory}: {key}={bad} ({what}) has no jaxformer counterpart; jaxformer reads plain '
                        'LoRA adapters (merge it into the base with peft first).')
  if adapter_json.get('bias', 'none') != 'none':
    raise ConfigError(f'{directory}: bias={adapter_json["bias"]!r} trains biases as well; jaxformer reads LoRA adapters '
                      'with bias="none".')
  for key in ('target_parameters', 'trainable_token_indices', 'layer_replication'):
    if adapter_json.get(key):
      raise ConfigError(f'{directory}: {key}={adapter_json[key]!r} has no jaxformer counterpart; jaxformer reads LoRA on '
                        'the attention and MLP projections.')
  if adapter_json.get('modules_to_save'):
    raise ConfigError(f'{directory}: modules_to_save={adapter_json["modules_to_save"]} (fully trained modules) is not '
                      'read; jaxformer reads the LoRA factors only (export the merged model with peft instead).')


def read_lora(directory: str, adapter_json: dict[str, Any], model_config: Any) -> Adapter:
  """A peft LoRA directory -> Adapter in the layout of `model_config` (our model section of its base)."""
  _check_lora_config(directory, adapter_json)
  cfg = ModelConfig.from_config(model_config)
  table = projections(cfg)
  family = families.for_model(cfg)
  path = os.path.join(directory, WEIGHTS_NAME)
  if not os.path.isfile(path):
    found = [f for f in os.listdir(directory) if f.startswith('adapter_model')]
    raise ConfigError(f'{directory} has no {WEIGHTS_NAME}' + (f' (it has {", ".join(found)}: save it with '
                                                             'safe_serialization=True)' if found else '') + '.')
  r, alpha, rslora = int(adapter_json['r']), float(adapter_json['lora_alpha']), bool(adapter_json.get('use_rslora', False))
  scaling = (lambda a, rank: a / math.sqrt(rank)) if rslora else (lambda a, rank: a / rank)
  pairs: dict[str, dict[str, np.ndarray]] = {}
  for key, value in weights.read_file(path).items():
    m = _LORA_KEY.match(key.removeprefix(KEY_PREFIX))
    if m is None:
      raise ConfigError(f'{directory}: tensor {key} is not a LoRA factor of a Linear layer (lora_A / lora_B); '
                        'jaxformer reads LoRA on the attention and MLP projections.')
    pairs.setdefault(m['module'], {})[m['factor']] = np.asarray(value, np.float32)
  if not pairs:
    raise ConfigError(f'{directory}/{WEIGHTS_NAME} holds no LoRA factors.')
  factors: dict[str, tuple[np.ndarray, np.ndarray, float]] = {}
  for module, ab in sorted(pairs.items()):
    proj = table.get(module) or table.get(family.prefix + module)
    if proj is None:
      example = next(iter(table), '')
      raise ConfigError(f'{directory}: LoRA on {module}, which is not an attention or MLP projection of this '
                        f'{family.model_types[0]} model (e.g. {example}); jaxformer\'s LoRA cannot express it, or '
                        'the adapter was made for another base (checkpoint.init_from).')
    if set(ab) != {'A', 'B'}:
      raise ConfigError(f'{directory}: {module} has lora_{"".join(ab)} without its other factor.')
    a_hf, b_hf = ab['A'], ab['B']
    rank = a_hf.shape[0]
    in_size = math.prod(proj.shapes[0][:proj.in_dims[0]])
    out_size = proj.out_slices[-1][1]
    if a_hf.shape != (rank, in_size) or b_hf.shape != (out_size, rank):
      raise ConfigError(f'{directory}: {module} lora_A {a_hf.shape} / lora_B {b_hf.shape} do not fit its weight '
                        f'[{out_size}, {in_size}]; the adapter was made for another base (checkpoint.init_from).')
    scale = scaling(float(_pattern_value(adapter_json.get('alpha_pattern'), proj.module, alpha)), rank)
    for kernel, shape, n, (lo, hi) in zip(proj.ours, proj.shapes, proj.in_dims, proj.out_slices):
      a = a_hf.T.reshape(*shape[:n], rank)
      b = b_hf[lo:hi].T.reshape(rank, *shape[n:])
      factors[kernel] = (a, b, scale)
  return Adapter(directory, 'LORA', r, scaling(alpha, r), factors)


@dataclasses.dataclass(frozen=True)
class PrefixAdapter:
  """A peft PREFIX_TUNING adapter read into our layout: the decoder's prefix.kv [layers, 2, P, kv_heads, head_dim]."""
  directory: str
  kv: np.ndarray
  method = 'prefix'

  @property
  def settings(self) -> dict[str, Any]:
    return {'method': 'prefix', 'num_prefix_tokens': int(self.kv.shape[2]), 'prefix_projection': 0}

  @property
  def params(self) -> dict[str, np.ndarray]:
    return {'decoder.prefix.kv': self.kv}


def read_prefix(directory: str, adapter_json: dict[str, Any], model_config: Any) -> PrefixAdapter:
  """A peft PREFIX_TUNING directory -> PrefixAdapter for a base whose model section is `model_config`."""
  cfg = ModelConfig.from_config(model_config)
  if cfg.arch != 'decoder_only' or adapter_json.get('num_transformer_submodules', 1) != 1:
    raise ConfigError(f'{directory}: a prefix-tuning adapter (task_type {adapter_json.get("task_type")!r}) loads into '
                      f'a decoder_only model, and this base is {cfg.arch}; give a causal LM base.')
  kv = read_prefix_kv(directory, num_layers=cfg.num_layers, kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim)
  return PrefixAdapter(directory, kv)


AnyAdapter = Adapter | PrefixAdapter
# peft_type -> reader(directory, adapter_config, model section) -> the adapter in our layout
PEFT_TYPES: dict[str, Callable[[str, dict[str, Any], Any], AnyAdapter]] = {'LORA': read_lora,
                                                                            'PREFIX_TUNING': read_prefix}


def read(directory: str, model_config: Any) -> AnyAdapter:
  """The adapter in `directory` for a base whose model section is `model_config`; one ConfigError line when its
  peft_type, options or modules have no jaxformer counterpart."""
  directory = os.path.expanduser(directory)
  adapter_json = read_config(directory)
  kind = str(adapter_json.get('peft_type', '')).upper()
  if kind not in PEFT_TYPES:
    raise ConfigError(f'{directory}: peft_type {adapter_json.get("peft_type")!r} is not read; jaxformer reads '
                      f'{", ".join(PEFT_TYPES)} adapters.')
  return PEFT_TYPES[kind](directory, adapter_json, model_config)


@functools.lru_cache(maxsize=16)
def _read_cached(directory: str, cfg: ModelConfig, stamp: float) -> AnyAdapter:
  del stamp  # part of the key: a rewritten adapter file is read again
  return read(directory, cfg)


def read_for(directory: str, model_config: Any) -> AnyAdapter:
  """read(), cached per directory and model (a run reads its adapters when it resolves and when it builds)."""
  directory = os.path.abspath(os.path.expanduser(directory))
  cfg = ModelConfig.from_config(model_config)
  cfg = dataclasses.replace(cfg, vocab_size=max(cfg.vocab_size, 1), scan_layers=False)  # neither moves a factor
  stamp = os.path.getmtime(os.path.join(directory, WEIGHTS_NAME)) if os.path.isfile(
      os.path.join(directory, WEIGHTS_NAME)) else 0.0
  return _read_cached(directory, cfg, stamp)


# ----------------------------------------------------------------------- the run's adapters (peft section)
def named_values(key: str, value: str, what: str) -> dict[str, str]:
  """'name:x,name2:y' -> {name: x}; one line for a malformed item or a repeated name."""
  out: dict[str, str] = {}
  for item in (i.strip() for i in str(value).split(',') if i.strip()):
    name, sep, rest = item.partition(':')
    if not sep or not name.strip() or not rest.strip():
      raise ConfigError(f'{key}={value!r}: {item!r} is not name:{what}; write {key}=name:{what},name2:{what}.')
    if name.strip() in out:
      raise ConfigError(f'{key}={value!r} names {name.strip()!r} twice.')
    out[name.strip()] = rest.strip()
  return out


def run_adapters(peft: Any, model_config: Any) -> list[tuple[str, AnyAdapter, float]]:
  """(name, adapter, weight) for each adapter the peft section loads: peft.adapter (named 'adapter', weight 1) or
  peft.adapters (LoRA only) with the weights of peft.adapter_weights (or 1 for peft.adapter_name / the first, 0
  for the others); [] when it loads none. One line for each inconsistent setting."""
  if peft.adapter and peft.adapters:
    raise ConfigError('peft.adapter and peft.adapters are both set; give one directory with peft.adapter, or '
                      'several as peft.adapters=name:dir,...')
  if peft.adapter:
    if peft.adapter_weights or peft.adapter_name:
      raise ConfigError('peft.adapter_weights / peft.adapter_name pick among peft.adapters=name:dir,...; with one '
                        'peft.adapter drop them.')
    adapters = [('adapter', read_for(peft.adapter, model_config), 1.0)]
  elif peft.adapters:
    directories = named_values('peft.adapters', peft.adapters, 'dir')
    weights_of = chosen_weights(peft, tuple(directories))
    adapters = [(name, read_for(d, model_config), weights_of[name]) for name, d in directories.items()]
    prefixes = [name for name, a, _ in adapters if a.method != 'lora']
    if prefixes:
      raise ConfigError(f'peft.adapters combines LoRA adapters, and {prefixes[0]!r} is a prefix-tuning adapter; '
                        'load it alone with peft.adapter=DIR.')
  else:
    if peft.adapter_weights or peft.adapter_name:
      raise ConfigError('peft.adapter_weights / peft.adapter_name pick among peft.adapters, which is empty; set '
                        'peft.adapters=name:dir,...')
    return []
  method = adapters[0][1].method
  if peft.method not in ('none', method):
    raise ConfigError(f'peft.adapter(s) load {method} adapters, but peft.method={peft.method}; drop peft.method '
                      f'(the adapter sets {method}).')
  return adapters


def chosen_weights(peft: Any, names: tuple[str, ...], adapter_name: str | None = None) -> dict[str, float]:
  """{adapter name: weight} of peft.adapters: peft.adapter_weights, or 1 for `adapter_name` (default
  peft.adapter_name, else the first) and 0 for the others."""
  if adapter_name is None and peft.adapter_weights:
    if peft.adapter_name:
      raise ConfigError('peft.adapter_name picks one adapter and peft.adapter_weights combines them; set one.')
    given = named_values('peft.adapter_weights', peft.adapter_weights, 'weight')
    unknown = sorted(set(given) - set(names))
    if unknown:
      raise ConfigError(f'peft.adapter_weights names {unknown[0]!r}, which peft.adapters lacks (it has '
                        f'{", ".join(names)}).')
    try:
      return {n: float(given.get(n, 0.0)) for n in names}
    except ValueError:
      raise ConfigError(f'peft.adapter_weights={peft.adapter_weights!r}: a weight is not a number.') from None
  chosen = adapter_name if adapter_name is not None else (peft.adapter_name or names[0])
  if chosen not in names:
    raise ConfigError(f'adapter {chosen!r} is not one of peft.adapters ({", ".join(names)}).')
  return {n: float(n == chosen) for n in names}


def settings_for(peft: Any, model_config: Any) -> dict[str, Any]:
  """The peft keys the run's adapters decide (LoRA: method, rank, alpha, targets; a prefix: method,
  num_prefix_tokens, prefix_projection); {} when it loads none."""
  adapters = [a for _, a, _ in run_adapters(peft, model_config)]
  if adapters and isinstance(adapters[0], PrefixAdapter):
    return adapters[0].settings
  return lora_section(adapters) if adapters else {}


def run_adapter_params(peft: Any, model_config: Any, shapes: dict[str, tuple[int, ...]],
                       adapter_name: str | None = None) -> dict[str, np.ndarray]:
  """Our PEFT parameters {path: array} (unrolled layout) for the run's adapters, in a model whose parameter
  shapes are `shapes` ({path: shape}, unrolled) and whose peft section is `peft` (after settings_for): a prefix
  adapter's prefix; one LoRA adapter's own factors (kernels it does not update keep their fresh initialisation),
  or the weighted block combination of several (adapter_name: that one alone, for a per-request choice)."""
  adapters = run_adapters(peft, model_config)
  if not adapters:
    return {}
  if isinstance(adapters[0][1], PrefixAdapter):
    return adapters[0][1].params
  if adapter_name is not None:
    weights_of = chosen_weights(peft, tuple(n for n, _, _ in adapters), adapter_name)
    adapters = [(n, a, weights_of[n]) for n, a, _ in adapters]
  return combine([(a, w) for _, a, w in adapters], float(peft.alpha) / int(peft.rank), lora_kernels(shapes),
                 zeros_for_missing=len(adapters) > 1)


# --------------------------------------------------------------------------------- into our LoRA parameters
def combine(adapters: list[tuple[Adapter, float]], scale: float, kernels: dict[str, tuple[tuple[int, ...], int]],
            *, zeros_for_missing: bool) -> dict[str, np.ndarray]:
  """Our LoRA parameters {factor path: array} for a model whose LoRA has scale `scale` and rank
  sum_i (adapter i's max rank), such that its update is sum_i w_i * scale_i * A_i B_i on every kernel.

  Each adapter takes its own block of the rank dimension: A = [A_1 | A_2 | ...] and B = [c_1 B_1; c_2 B_2; ...]
  with c_i = w_i * scale_i / scale, zero-padded to the block's width (padding adds nothing). This is the weighted
  sum of the updates (LoRAHub's combination), not LoRA on the averaged A and B (which adds cross terms A_i B_j).
  kernels: {our kernel path: (shape, in_dims)} of the model's LoRA'd kernels; a kernel no adapter updates gets
  zeros (zeros_for_missing) or is left out (keeps its fresh initialisation)."""
  widths = [adapter.max_rank for adapter, _ in adapters]
  total = sum(widths)
  out: dict[str, np.ndarray] = {}
  for kernel, (shape, n) in kernels.items():
    if not zeros_for_missing and not any(kernel in adapter.factors for adapter, _ in adapters):
      continue
    a_full = np.zeros((*shape[:n], total), np.float32)
    b_full = np.zeros((total, *shape[n:]), np.float32)
    start = 0
    for (adapter, weight), width in zip(adapters, widths):
      if kernel in adapter.factors:
        a, b, s = adapter.factors[kernel]
        if tuple(a.shape[:-1]) != tuple(shape[:n]) or tuple(b.shape[1:]) != tuple(shape[n:]):
          raise ConfigError(f'{adapter.directory}: its factors of {kernel} do not fit this model ({shape}); '
                            'the adapter was made for another base.')
        rank = a.shape[-1]
        a_full[..., start:start + rank] = a
        b_full[start:start + rank] = b * (weight * s / scale)
      start += width
    path_a, path_b = factor_paths(kernel)
    out[path_a], out[path_b] = a_full, b_full
  unknown = sorted({k for adapter, _ in adapters for k in adapter.factors} - set(kernels))
  if unknown:
    raise ConfigError(f'{adapters[0][0].directory}: the adapters update {unknown[0]}, which this model\'s LoRA '
                      '(peft.targets) does not cover.')
  return out


def lora_kernels(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[tuple[int, ...], int]]:
  """{our kernel path: (shape, in_dims)} of the LoRA'd kernels of a model, from its {param path: shape}
  (unrolled layout)."""
  return {kernel_of(p): (tuple(shapes[kernel_of(p)]), lora_lib.INPUT_DIMS.get(kernel_of(p).rsplit('.', 1)[-1], 1))
          for p in shapes if '.lora.' in p and p.endswith('.a')}


def lora_section(adapters: list[Adapter]) -> dict[str, Any]:
  """peft.rank / alpha / targets of a model that holds `adapters` (combine): one adapter keeps its own rank (its
  largest, when rank_pattern varies it) and scaling, so training goes on as peft would; several get the sum of
  their ranks and scale 1 (alpha = rank: each adapter's weight and scaling are folded into its B block)."""
  targets = ','.join(dict.fromkeys(t for adapter in adapters for t in adapter.targets))
  if len(adapters) == 1:
    rank = adapters[0].max_rank
    return dict(method='lora', rank=rank, alpha=adapters[0].scale * rank, targets=targets)
  rank = sum(adapter.max_rank for adapter in adapters)
  return dict(method='lora', rank=rank, alpha=float(rank), targets=targets)


# ------------------------------------------------------------------------------------------------ writing
def write_lora(directory: str, params: dict[str, np.ndarray], model_config: Any, *, rank: int, alpha: float,
               dropout: float = 0.0, base_model: str = '') -> list[str]:
  """Writes our LoRA factors (`params`: {path: array}, unrolled layout, the LoRA paths '....lora.<name>.a/b'
  among them) as a peft LoRA directory for the Hugging Face family of `model_config`. Returns the module names."""
  cfg = ModelConfig.from_config(model_config)
  table = projections(cfg)
  kernels = {kernel_of(p) for p in params if '.lora.' in p and p.endswith('.a')}
  tensors: dict[str, np.ndarray] = {}
  rank_pattern: dict[str, int] = {}
  alpha_pattern: dict[str, float] = {}
  blocks = {}  # fused modules: whether the parts' A's differ somewhere (then the block form everywhere)
  for proj in table.values():
    parts = [k for k in proj.ours if k in kernels]
    if len(parts) > 1:
      a0 = params[factor_paths(parts[0])[0]]
      leaf = proj.module.rsplit('.', 1)[-1]
      blocks[leaf] = blocks.get(leaf, False) or any(
          not np.array_equal(params[factor_paths(k)[0]], a0) for k in parts[1:])
  written = []
  for proj in table.values():
    parts = [i for i, k in enumerate(proj.ours) if k in kernels]
    if not parts:
      continue
    leaf = proj.module.rsplit('.', 1)[-1]
    block = blocks.get(leaf, False)
    width = rank * (len(parts) if block else 1)
    a_hf = np.zeros((width, math.prod(proj.shapes[0][:proj.in_dims[0]])), np.float32)
    b_hf = np.zeros((proj.out_slices[-1][1], width), np.float32)
    for j, i in enumerate(parts):
      path_a, path_b = factor_paths(proj.ours[i])
      a = np.asarray(params[path_a], np.float32).reshape(-1, rank).T
      b = np.asarray(params[path_b], np.float32).reshape(rank, -1).T
      cols = slice(j * rank, (j + 1) * rank) if block else slice(0, rank)
      a_hf[cols] = a
      lo, hi = proj.out_slices[i]
      b_hf[lo:hi, cols] = b
    if block:
      rank_pattern[leaf], alpha_pattern[leaf] = width, alpha * len(parts)
    tensors[f'{KEY_PREFIX}{proj.module}.lora_A.weight'] = a_hf
    tensors[f'{KEY_PREFIX}{proj.module}.lora_B.weight'] = b_hf
    written.append(proj.module)
  covered = {k for proj in table.values() for k in proj.ours}
  left = sorted(kernels - covered)
  if left:
    raise ConfigError(f'LoRA factors of {left[0]} have no Hugging Face module to go to.')
  if not written:
    raise ConfigError('the run has no LoRA factors to export (peft.method=lora with peft.targets).')
  conv1d = any(table[m].conv1d for m in written)
  config = {
      'peft_type': 'LORA', 'task_type': _task_type(cfg), 'base_model_name_or_path': base_model or None,
      'r': int(rank), 'lora_alpha': float(alpha), 'lora_dropout': float(dropout), 'use_rslora': False,
      'target_modules': _target_modules(written, _modules(cfg)), 'fan_in_fan_out': conv1d, 'bias': 'none',
      'modules_to_save': None, 'rank_pattern': rank_pattern, 'alpha_pattern': alpha_pattern,
      'init_lora_weights': True, 'inference_mode': True, 'use_dora': False, 'layers_to_transform': None,
      'revision': None,
  }
  os.makedirs(directory, exist_ok=True)
  weights.write_file(os.path.join(directory, WEIGHTS_NAME), tensors, metadata={'format': 'pt'})
  with open(os.path.join(directory, CONFIG_NAME), 'w', encoding='utf-8') as f:
    json.dump(config, f, indent=2, sort_keys=True)
  return written


def _task_type(cfg: ModelConfig) -> str | None:
  if cfg.head != 'lm':
    return None
  return {'decoder_only': 'CAUSAL_LM', 'encoder_decoder': 'SEQ_2_SEQ_LM'}.get(cfg.arch)


def _modules(cfg: ModelConfig) -> list[str]:
  """Every Hugging Face module with a weight in the family's checkpoint (what target_modules is matched against)."""
  rules = families.for_model(cfg).tensors(dataclasses.replace(cfg, scan_layers=False))
  return [r.hf[:-len('.weight')] for r in rules if r.hf.endswith('.weight')]


def _target_modules(written: list[str], every: list[str]) -> list[str]:
  """peft's target_modules: the modules' last names (peft matches a name or a '.name' suffix) when those pick
  exactly the written modules, else the full module names."""
  leaves = sorted({m.rsplit('.', 1)[-1] for m in written})
  picked = {m for m in every if any(m == leaf or m.endswith('.' + leaf) for leaf in leaves)}
  return leaves if picked == set(written) else sorted(written)


# ------------------------------------------------------------------------- prefix tuning (PREFIX_TUNING)
def prefix_from_peft(prompt_embeddings: Any, *, num_layers: int, kv_heads: int, head_dim: int) -> np.ndarray:
  """peft's saved prefix (adapter_model.safetensors 'prompt_embeddings', [num_virtual_tokens, num_layers * 2 *
  token_dim] with token_dim = kv_heads * head_dim) -> our `prefix.kv` [layers, 2, P, kv_heads, head_dim].

  peft views the tensor as [P, layers * 2, heads, head_dim] and permutes it to [layers * 2, heads, P, head_dim],
  layer l's key being entry 2l and its value 2l + 1 (PeftModel.get_prompt), which is this reshape."""
  x = np.asarray(prompt_embeddings, np.float32)
  p, width = x.shape
  if width != num_layers * 2 * kv_heads * head_dim:
    raise ConfigError(f'peft prefix of shape {x.shape}: expected [num_virtual_tokens, {num_layers} layers x 2 x '
                      f'{kv_heads} kv heads x {head_dim}] for this model; the adapter belongs to another model.')
  return np.transpose(x.reshape(p, num_layers, 2, kv_heads, head_dim), (1, 2, 0, 3, 4))


def prefix_to_peft(kv: Any) -> np.ndarray:
  """Our `prefix.kv` [layers, 2, P, kv_heads, head_dim] -> peft's 'prompt_embeddings' [P, layers * 2 * kv_heads *
  head_dim] (prefix_from_peft's inverse)."""
  x = np.asarray(kv, np.float32)
  return np.transpose(x, (2, 0, 1, 3, 4)).reshape(x.shape[2], -1)


def read_prefix_kv(directory: str, *, num_layers: int, kv_heads: int, head_dim: int) -> np.ndarray:
  """A peft PREFIX_TUNING directory's prefix as our `prefix.kv` [layers, 2, P, kv_heads, head_dim]. peft saves the
  computed prefix ('prompt_embeddings') with or without its reparameterisation MLP, so both load alike."""
  path = os.path.join(directory, 'adapter_model.safetensors')
  if not os.path.isfile(path):
    raise ConfigError(f'{directory} has no adapter_model.safetensors; save the adapter with safe_serialization=True.')
  tensors = weights.read_file(path)
  if 'prompt_embeddings' not in tensors:
    raise ConfigError(f'{path} holds no prompt_embeddings (it has {", ".join(sorted(tensors)) or "nothing"}), so '
                      'it is not a prefix-tuning adapter.')
  return prefix_from_peft(tensors['prompt_embeddings'], num_layers=num_layers, kv_heads=kv_heads, head_dim=head_dim)


def load_prefix(directory: str, model: nnx.Module) -> None:
  """Sets the prefix of `model` (decoder_only, built with peft.method=prefix, prefix_projection=0 and the adapter's
  num_virtual_tokens) from a peft PrefixTuningConfig adapter directory (adapter_config.json +
  adapter_model.safetensors, as PeftModel.save_pretrained writes it). A ConfigError names any mismatch. (A run
  loads one with peft.adapter=DIR: read_prefix.)"""
  config = read_config(directory)
  if config.get('peft_type') != 'PREFIX_TUNING':
    raise ConfigError(f'{directory}: peft_type={config.get("peft_type")!r}, not a prefix-tuning adapter; use '
                      'peft.method=prefix only with PREFIX_TUNING adapters.')
  prefix = getattr(getattr(model, 'decoder', None), 'prefix', None)
  if model.config.arch != 'decoder_only' or prefix is None or prefix.kv is None:
    raise ConfigError(f'{directory}: a peft prefix adapter loads into a decoder_only model built with '
                      'peft.method=prefix and peft.prefix_projection=0.')
  if config['num_virtual_tokens'] != prefix.length:
    n = config['num_virtual_tokens']
    raise ConfigError(f'{directory}: num_virtual_tokens={n}, but the model has peft.num_prefix_tokens='
                      f'{prefix.length}; set peft.num_prefix_tokens={n}.')
  kv = read_prefix_kv(directory, num_layers=prefix.num_layers, kv_heads=prefix.kv_heads, head_dim=prefix.head_dim)
  prefix.kv.set_value(jnp.asarray(kv, prefix.kv.get_value().dtype))


def write_prefix(directory: str, model: nnx.Module, base_model: str = '') -> dict[str, Any]:
  """Writes a decoder_only model's prefix as a peft PREFIX_TUNING adapter (adapter_config.json +
  adapter_model.safetensors, as PeftModel.save_pretrained writes one): the prefix merged away from its MLP if it
  has one (peft saves the computed prefix too, and loads it with prefix_projection off). Returns the config."""
  prefix = getattr(getattr(model, 'decoder', None), 'prefix', None)
  if model.config.arch != 'decoder_only' or prefix is None:
    raise ConfigError('a peft prefix adapter holds a decoder_only model\'s prefix (peft.method=prefix); this run '
                      'has none to write.')
  kv = prefix.stacked()
  token_dim = prefix.kv_heads * prefix.head_dim
  config = {'peft_type': 'PREFIX_TUNING', 'task_type': 'CAUSAL_LM', 'base_model_name_or_path': base_model,
            'num_virtual_tokens': prefix.length, 'num_layers': prefix.num_layers, 'token_dim': token_dim,
            'num_attention_heads': prefix.kv_heads, 'num_transformer_submodules': 1,
            'encoder_hidden_size': token_dim, 'prefix_projection': False, 'inference_mode': True,
            'modules_to_save': None, 'revision': None, 'auto_mapping': None, 'init_weights': None}
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, 'adapter_config.json'), 'w', encoding='utf-8') as f:
    json.dump(config, f, indent=2)
  weights.write_file(os.path.join(directory, 'adapter_model.safetensors'),
                     {'prompt_embeddings': prefix_to_peft(jax.device_get(kv))}, {'format': 'pt'})
  return config
