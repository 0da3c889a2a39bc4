"""Parameter-efficient fine-tuning: which parameters train, and the small modules some methods add.

  peft.method   none      every parameter trains (full fine-tuning; the default)
                lora      low-rank updates W + (alpha/rank) B A on the projections named by peft.targets (lora.py)
                bitfit    only the biases train (bitfit.py)
                adapter   Houlsby bottlenecks after self-attention and after the MLP (adapter.py)
                prompt    peft.num_prompt_tokens soft embeddings prepended to the (encoder) input (prompt.py)
                prefix    peft.num_prefix_tokens trained keys/values in front of every self-attention layer's
                          (prefix.py; peft.prefix_projection > 0: through peft's reparameterisation MLP)
  peft.quantize           none | nf4 | int8: the frozen base's projection kernels stored quantised, dequantised in
                          the matmul (QLoRA; quantize.py)
  peft.train_extra        comma list of path words that also train (e.g. 'norm', 'bias', 'head'), as the BitFit
                          and adapter papers do.
  peft.train_vocab        yes: the vocabulary's parameters (those with a `vocab` axis: token embeddings, output layer
                          and its bias) train in full; auto (resolve.py) = yes when the tokenizer has added tokens
                          (data.tokenizer_extra), whose new rows must learn. That is Hugging Face peft's
                          modules_to_save=['embed_tokens', 'lm_head'], the Chinese-LLaMA recipe, not its
                          trainable_token_indices (a delta on the new rows only): simpler, and the old rows may adapt
                          to the new data too, at the cost of optimizer state for two [vocab, d_model] matrices.

A head's own output module (paths `classifier.*`, e.g. model.head=classification's pooler and output layer) always
trains, whatever the method: it is new or task-specific, as Hugging Face peft's modules_to_save does for sequence
classification.

A method is one `Method` in METHODS: `attach` adds its modules to a freshly built model (their parameters are
PEFTParam subclasses, so one type filter finds them; the base model's own initialisation is untouched), and
`trains` says which base parameters train as well. The training step differentiates only the trainable split of
the params state (the frozen part is an input, not a differentiated one, so XLA computes no weight gradients for
it), the optimizer holds state only for it, and checkpoints of a PEFT run store only it (training/state.py re-reads
the base model from checkpoint.init_from). Functions here take the run's `peft` section (config.peft).
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable

import jax
from flax import nnx

from jaxformer.errors import ConfigError, check_choice, check_fraction, check_positive
from jaxformer.peft import adapter, bitfit, lora, prefix, prompt, quantize
from jaxformer.peft.params import PEFTParam, path_words

TRAIN_VOCAB = ('auto', 'yes', 'no')
VOCAB_AXIS = 'vocab'  # the logical axis name of the vocabulary dimension (model/layers.py)

__all__ = ['METHODS', 'Method', 'PEFTParam', 'attach', 'count_params', 'is_active', 'merge', 'split', 'trainable',
           'trainable_filter', 'validate']


@dataclasses.dataclass(frozen=True)
class Method:
  """One `peft.method`. attach(model, peft, rngs) adds the method's modules (None: adds nothing); trains(words)
  is True for a base parameter (given its lower-cased path parts) that trains under this method."""
  attach: Callable[[nnx.Module, Any, nnx.Rngs], None] | None
  trains: Callable[[list[str]], bool]
  merge: Callable[[nnx.State, Any], nnx.State] | None = None  # folds its params in (export)
  validate: Callable[[Any, Any], None] | None = None  # (peft section, model section)


def _frozen(words: list[str]) -> bool:
  return False


METHODS: dict[str, Method] = {
    'none': Method(None, lambda words: True),
    'lora': Method(lora.attach, _frozen, merge=lora.merge, validate=lora.validate),
    'bitfit': Method(None, bitfit.trains, validate=bitfit.validate),
    'adapter': Method(adapter.attach, _frozen, validate=adapter.validate),
    'prompt': Method(prompt.attach, _frozen, validate=prompt.validate),
    'prefix': Method(prefix.attach, _frozen, validate=prefix.validate),
}

CLASSIFIER = 'classifier'  # the model attribute of a head's own output module (trains under every method)


def is_active(peft: Any) -> bool:
  """Whether only part of the parameters train (a PEFT run: its checkpoints hold only that part)."""
  return peft.method != 'none'


def _extra_words(peft: Any) -> tuple[str, ...]:
  return tuple(w.strip().lower() for w in str(peft.train_extra).split(',') if w.strip())


def validate(config: Any) -> None:
  """The peft section: one line per bad value (config.validate calls this)."""
  peft = config.peft
  check_choice('peft.method', peft.method, METHODS)
  check_choice('peft.train_vocab', peft.train_vocab, TRAIN_VOCAB)
  method = METHODS[peft.method]
  if method.validate is not None:
    method.validate(peft, config.model)
  base = str(config.checkpoint.init_from)
  if base and not base.startswith('hf:') and not os.path.isdir(
      os.path.join(os.path.expanduser(base), 'checkpoints')):
    raise ConfigError(f'checkpoint.init_from={base!r}: no jaxformer checkpoints in {os.path.join(base, "checkpoints")}; '
                      'give the workdir of a finished training run (the model to start from).')
  quantize.validate(config)
  if _extra_words(peft) and peft.method == 'none':
    raise ConfigError(f'peft.train_extra={peft.train_extra!r} only applies with a PEFT method (peft.method=none '
                      'already trains everything); set peft.method or drop train_extra.')


def attach(model: nnx.Module, peft: Any, rngs: nnx.Rngs) -> nnx.Module:
  """Adds the method's modules to a freshly built model (in place; returned for chaining)."""
  method = METHODS[peft.method]
  if method.attach is not None:
    method.attach(model, peft, rngs)
  return model


def trainable_filter(peft: Any) -> Callable[[tuple, Any], bool]:
  """An nnx filter (path, variable) -> bool: True for the parameters that train under the peft section."""
  method, extra = METHODS[peft.method], _extra_words(peft)
  vocab = peft.train_vocab == 'yes'  # 'auto' is decided by resolve.py; unresolved it trains nothing extra

  def trains(path: tuple, variable: Any) -> bool:
    if isinstance(variable, PEFTParam):
      return True
    if isinstance(variable, quantize.QuantizedParam):  # the quantised frozen base (peft.quantize)
      return False
    if vocab and VOCAB_AXIS in (variable.get_metadata().get('out_sharding') or ()):
      return True
    words = path_words(path)
    if words[:1] == [CLASSIFIER]:
      return True
    return method.trains(words) or any(w in part for part in words for w in extra)

  return trains


def split(params: nnx.State, peft: Any) -> tuple[nnx.State, nnx.State]:
  """(trainable, frozen) halves of a params state; nnx.merge_state(frozen, trainable) gives it back."""
  trainable_part, frozen_part = nnx.split_state(params, trainable_filter(peft), ...)
  return trainable_part, frozen_part


def trainable(params: nnx.State, peft: Any) -> nnx.State:
  return split(params, peft)[0]


def _size(tree: Any) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def count_params(params: nnx.State, peft: Any) -> tuple[int, int]:
  """(num_params, num_trainable_params) of a params state (arrays or ShapeDtypeStructs)."""
  return _size(params), _size(trainable(params, peft))


def check_trainable(params: nnx.State, peft: Any) -> None:
  """A PEFT config that trains nothing in this model (e.g. bitfit without biases, a train_extra word that names no
  parameter) is a one-line error before step 1."""
  for word in _extra_words(peft):
    if not any(word in part for path, _ in nnx.to_flat_state(params) for part in path_words(path)):
      raise ConfigError(f'peft.train_extra word {word!r} names no parameter of this model; use words from the '
                        'parameter paths, e.g. norm, bias, head, embed.')
  if _size(trainable(params, peft)) == 0:
    raise ConfigError(f'peft.method={peft.method} trains no parameter of this model (bitfit needs '
                      'model.use_bias=True); pick another peft.method.')


def base_params(params: nnx.State) -> nnx.State:
  """The base model's parameters: the params state without the modules a PEFT method attached."""
  return nnx.split_state(params, PEFTParam, ...)[1]


def merge(model_or_params: nnx.Module | nnx.State, peft: Any) -> nnx.State:
  """Plain base parameters for export: the method's parameters folded in (LoRA: W + (alpha/rank) B A), so the result
  has exactly the base model's tree. Methods whose modules cannot be folded into the base weights (adapter,
  prompt, prefix) are a ConfigError naming the method. A model whose base is quantised (peft.quantize) is dequantised in
  place first, and LoRA folds into the dequantised weights (as peft's merge_and_unload on a 4-bit base)."""
  if isinstance(model_or_params, nnx.Module):  # a quantised base (peft.quantize): dequantised first, in place
    model_or_params = nnx.state(quantize.dequantize(model_or_params), nnx.Param)
  params = model_or_params
  method = METHODS[peft.method]
  if method.attach is None:
    return base_params(params)  # none / bitfit: the trained parameters are base parameters already
  if method.merge is None:
    raise ConfigError(f'peft.method={peft.method} adds modules that cannot be folded into the base weights, so the '
                      'run cannot be exported as a plain model; export supports peft.method=lora, bitfit or none.')
  return method.merge(params, peft)


def set_training(model: nnx.Module, training: bool) -> None:
  """Turns the PEFT modules' own dropout on (training) or off. The model's dropouts take `deterministic` per call;
  the PEFT modules sit behind hooks that do not see it, so the train step sets it here."""
  for _, module in nnx.iter_modules(model):
    if isinstance(module, lora.LoRA):
      module.dropout.deterministic = not training
