"""Each Hugging Face model family, once: its config.json <-> our model section, and its tensor names <-> our params.

A family is one class with these methods, registered in FAMILIES under the `model_type`s it reads:

  model_section(hf)  config.json (dict) -> {model key: value} (every key of the model section)
  hf_config(cfg)     ModelConfig -> config.json (dict); the inverse for the keys both sides have
  tensors(cfg)       [Rule]: which Hugging Face tensor holds which of our parameters, and how its layout differs
  mismatches(cfg)    the settings of `cfg` this family cannot express (empty = it can be saved as this family)

Model heads (jaxformer/heads) are mapped in one place, each family's HEADS table: model.head -> HeadMapping (the
head's config.json keys and tensors in this family's checkpoints). The transformers class of a head is the
family's class name + Head.hf_class (the LM: + the family's lm_class), and config.json's "architectures" picks the
head on import (head_of):

  GPT-2, Llama / Mistral / Qwen2   lm = GPT2LMHeadModel / LlamaForCausalLM / Qwen2ForCausalLM;
                                   reward = <Class>ForSequenceClassification with num_labels=1 (`score`, no bias;
                                   the last real token, found through config.json's pad_token_id);
                                   token_classification = <Class>ForTokenClassification (GPT-2 `classifier`, the
                                   others `score`, with bias)
  BERT                             lm = BertForMaskedLM; classification = BertForSequenceClassification with
                                   num_labels >= 2; reward = the same class with num_labels=1 (pooler + classifier);
                                   token_classification = BertForTokenClassification (`classifier`); span =
                                   BertForQuestionAnswering (`qa_outputs`)
  T5                               lm = T5ForConditionalGeneration
  Mixtral, Qwen2-MoE, OLMoE        lm = <Class>ForCausalLM (mixtures of experts; their files hold per-expert
                                   tensors, which from_disk / to_disk convert: see the MoE section below)

Layouts (checked against transformers' modeling_*.py): torch's nn.Linear stores [out, in]; GPT-2's Conv1D stores
[in, out] with q, k, v fused in one [D, 3D] matrix; our attention kernels are query/key/value [D, heads, head_dim]
and out [heads, head_dim, D], MLP kernels [in, out], the untied output projection [D, V], embeddings [V, D].
"""
from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any, Callable

import numpy as np

from jaxformer import heads
from jaxformer.errors import ConfigError
from jaxformer.model import moe as moe_lib
from jaxformer.model.config import ModelConfig

# ------------------------------------------------------------------------------------------------- layouts


@dataclasses.dataclass(frozen=True)
class Rule:
  """One Hugging Face tensor `hf` <-> our parameters `ours` (paths like 'decoder.blocks.0.attn.query')."""
  hf: str
  ours: tuple[str, ...]
  to_ours: Callable[[np.ndarray], tuple[np.ndarray, ...]]
  to_hf: Callable[..., np.ndarray]
  # A tensor a checkpoint may lack (a task head: BertForMaskedLM has no pooler / classifier); its parameters then
  # keep their fresh initialisation, as transformers' "newly initialized" weights do.
  optional: bool = False


def same(hf: str, ours: str) -> Rule:
  return Rule(hf, (ours,), lambda w: (w,), lambda w: w)


def linear(hf: str, ours: str) -> Rule:
  """nn.Linear [out, in] <-> our kernel [in, out] (also lm_head [V, D] <-> unembed [D, V])."""
  return Rule(hf, (ours,), lambda w: (w.T,), lambda w: w.T)


def heads_in(hf: str, ours: str, heads: int, head_dim: int) -> Rule:
  """q/k/v nn.Linear [heads * head_dim, D] <-> [D, heads, head_dim]."""
  return Rule(hf, (ours,), lambda w: (w.T.reshape(-1, heads, head_dim),), lambda w: w.reshape(w.shape[0], -1).T)


def heads_out(hf: str, ours: str, heads: int, head_dim: int) -> Rule:
  """o nn.Linear [D, heads * head_dim] <-> [heads, head_dim, D]."""
  return Rule(hf, (ours,), lambda w: (w.T.reshape(heads, head_dim, -1),), lambda w: w.reshape(heads * head_dim, -1).T)


def heads_bias(hf: str, ours: str, heads: int, head_dim: int) -> Rule:
  """q/k/v bias [heads * head_dim] <-> [heads, head_dim]."""
  return Rule(hf, (ours,), lambda b: (b.reshape(heads, head_dim),), lambda b: b.reshape(-1))


def fused_qkv(hf: str, ours: tuple[str, str, str], heads: int, head_dim: int) -> Rule:
  """GPT-2's Conv1D c_attn: weight [D, 3 * heads * head_dim] (or bias [3 * heads * head_dim]) <-> q, k, v."""
  def to_ours(w):
    return tuple(part.reshape(*part.shape[:-1], heads, head_dim) for part in np.split(w, 3, axis=-1))

  def to_hf(*parts):
    return np.concatenate([p.reshape(*p.shape[:-2], -1) for p in parts], axis=-1)
  return Rule(hf, ours, to_ours, to_hf)


def conv_heads_out(hf: str, ours: str, heads: int, head_dim: int) -> Rule:
  """GPT-2's Conv1D c_proj [heads * head_dim, D] <-> [heads, head_dim, D]."""
  return Rule(hf, (ours,), lambda w: (w.reshape(heads, head_dim, -1),), lambda w: w.reshape(heads * head_dim, -1))


def zeros(hf: str, shape: tuple[int, ...]) -> Rule:
  """A Hugging Face tensor we have no parameter for: written as zeros, and read only if it is all zeros."""
  def to_ours(w):
    if np.any(np.asarray(w, np.float32) != 0):
      raise ConfigError(f'{hf} is not zero, and jaxformer\'s model has no parameter for it.')
    return ()
  return Rule(hf, (), to_ours, lambda: np.zeros(shape, np.float32))


def norm(hf_prefix: str, ours_prefix: str, bias: bool = True) -> list[Rule]:
  """LayerNorm / RMSNorm: weight <-> scale (and bias)."""
  return [same(f'{hf_prefix}.weight', f'{ours_prefix}.scale')] + (
      [same(f'{hf_prefix}.bias', f'{ours_prefix}.bias')] if bias else [])


# ------------------------------------------------------------------------------------------------ families
# Hugging Face activation names -> model.mlp (gelu is the tanh approximation, gelu_exact the erf form).
ACTIVATIONS = {'gelu_new': 'gelu', 'gelu_pytorch_tanh': 'gelu', 'gelu_fast': 'gelu', 'gelu': 'gelu_exact',
               'relu': 'relu'}
_ACTIVATION_NAMES = {'gelu': 'gelu_new', 'gelu_exact': 'gelu', 'relu': 'relu'}  # inverse, for saving


def _get(hf: dict, *keys: str, default: Any = None) -> Any:
  """The first of `keys` that config.json has (families renamed keys over the years)."""
  for key in keys:
    if hf.get(key) is not None:
      return hf[key]
  return default


def _activation(model_type: str, name: str) -> str:
  if name not in ACTIVATIONS:
    raise ConfigError(f'{model_type} activation {name!r} has no jaxformer counterpart; supported: '
                      f'{", ".join(ACTIVATIONS)}.')
  return ACTIVATIONS[name]


def _want(cfg: ModelConfig, **expected: Any) -> list[str]:
  """'model.key=value (needs a, b)' for each key of cfg whose value is not one of the expected ones."""
  out = []
  for key, allowed in expected.items():
    allowed = allowed if isinstance(allowed, tuple) else (allowed,)
    value = getattr(cfg, key)
    if value not in allowed:
      out.append(f'model.{key}={value!r} (needs {" or ".join(repr(a) for a in allowed)})')
  return out


# Settings only the Gemma families express: every other family wants them off.
_NO_GEMMA = dict(embed_scale=False, attention_softcap=0.0, logit_softcap=0.0)


def _head_dim(head_dim: int, d_model: int, heads: int) -> int:
  """model.head_dim: -1 (= d_model // num_heads) unless the checkpoint's differs."""
  return -1 if head_dim * heads == d_model else head_dim


def _common(cfg: ModelConfig) -> dict[str, Any]:
  return {'vocab_size': cfg.vocab_size, 'initializer_range': cfg.init_std, 'dtype': cfg.param_dtype}


# -------------------------------------------------------------------------------------------------- heads
@dataclasses.dataclass(frozen=True)
class HeadMapping:
  """How one model.head (jaxformer/heads) appears in a family's checkpoints: the model keys its config.json gives,
  the config.json keys it writes, its tensors, and the head settings the family cannot express.

  accepts  whether a config.json naming the head's transformers class is this head (classification and reward
           share *ForSequenceClassification: num_labels >= 2 or 1); `reads` says what it accepts, for the message
  pad_token  config.json must have pad_token_id: a decoder's *ForSequenceClassification reads each row at its last
           token that is not pad_token_id (and refuses a batch of several rows without one)"""
  section: Callable[[dict], dict[str, Any]] = lambda hf: {}
  config: Callable[[ModelConfig], dict[str, Any]] = lambda cfg: {}
  tensors: Callable[[ModelConfig], list[Rule]] = lambda cfg: []
  mismatches: Callable[[ModelConfig], list[str]] = lambda cfg: []
  accepts: Callable[[dict], bool] = lambda hf: True
  reads: str = ''
  pad_token: bool = False


def _num_labels(hf: dict) -> int:
  """transformers' num_labels: the size of id2label (what save_pretrained writes), else num_labels (default 2)."""
  return len(hf['id2label']) if hf.get('id2label') else int(hf.get('num_labels', 2))


def _labels_config(num_labels: int, problem_type: str) -> dict[str, Any]:
  id2label = {str(i): f'LABEL_{i}' for i in range(num_labels)}
  return {'id2label': id2label, 'label2id': {v: int(k) for k, v in id2label.items()}, 'problem_type': problem_type}


def _is_classifier(hf: dict) -> bool:
  return _num_labels(hf) >= 2 and hf.get('problem_type') in (None, 'single_label_classification')


def _is_reward(hf: dict) -> bool:
  """num_labels=1: one scalar per row (transformers' problem_type regression, which it sets for one label)."""
  return _num_labels(hf) == 1 and hf.get('problem_type') in (None, 'regression')


def _lm_head_tensors(cfg: ModelConfig) -> list[Rule]:
  """A decoder's untied output projection (lm_head); tied models have none."""
  return [] if cfg.tie_embeddings else [linear('lm_head.weight', 'unembed.kernel')]


def _score_tensors(cfg: ModelConfig) -> list[Rule]:
  """A decoder's *ForSequenceClassification output layer, score [num_labels, D], no bias; optional, so any LM
  checkpoint can start a reward model (the score starts freshly initialised)."""
  return [dataclasses.replace(linear('score.weight', 'classifier.kernel'), optional=True)]


def _bert_mlm_tensors(cfg: ModelConfig) -> list[Rule]:
  """BertForMaskedLM's head: the transform (dense + LayerNorm) and the decoder bias (zeros when we have none)."""
  return [linear('cls.predictions.transform.dense.weight', 'head.kernel'),
          same('cls.predictions.transform.dense.bias', 'head.bias'),
          *norm('cls.predictions.transform.LayerNorm', 'head.norm'),
          same('cls.predictions.bias', 'output_bias') if cfg.output_bias else
          zeros('cls.predictions.bias', (cfg.vocab_size,))]


def _bert_pooled_tensors(cfg: ModelConfig) -> list[Rule]:
  """BertForSequenceClassification's pooler (dense + tanh on the first token) and classifier (with bias), for
  classification and reward alike; optional, so any BERT checkpoint can start either (what it lacks starts freshly
  initialised)."""
  rules = [linear('bert.pooler.dense.weight', 'classifier.pooler'),
           same('bert.pooler.dense.bias', 'classifier.pooler_bias')] if cfg.pooler else []
  rules += [linear('classifier.weight', 'classifier.kernel'), same('classifier.bias', 'classifier.bias')]
  return [dataclasses.replace(rule, optional=True) for rule in rules]


def _bert_reward_tensors(cfg: ModelConfig) -> list[Rule]:
  """As classification's; a reward model without the pooler (model.pooler=False: no export, but any BERT can
  start one) has no classifier bias either."""
  rules = _bert_pooled_tensors(cfg)
  return rules if cfg.pooler else [rule for rule in rules if rule.hf != 'classifier.bias']


def _reward_config(cfg: ModelConfig) -> dict[str, Any]:
  del cfg
  return _labels_config(1, 'regression')  # the problem_type transformers sets for one label


def _bert_pooled_mismatches(cfg: ModelConfig) -> list[str]:
  return _want(cfg, pooling='first', pooler=True)


REWARD_READS = 'num_labels=1 as model.head=reward'


def _token_labels_config(cfg: ModelConfig) -> dict[str, Any]:
  id2label = {str(i): f'LABEL_{i}' for i in range(cfg.num_classes)}
  return {'id2label': id2label, 'label2id': {v: int(k) for k, v in id2label.items()}}


def _token_head(weight: str) -> HeadMapping:
  """*ForTokenClassification: an nn.Linear `weight` [num_labels, D] with bias on every token; optional, so any
  checkpoint of the family can start one."""
  rules = [linear(f'{weight}.weight', 'classifier.kernel'), same(f'{weight}.bias', 'classifier.bias')]
  return HeadMapping(section=lambda hf: dict(head='token_classification', num_classes=_num_labels(hf),
                                             output_bias=False),
                     config=_token_labels_config,
                     tensors=lambda cfg: [dataclasses.replace(rule, optional=True) for rule in rules])


# *ForQuestionAnswering: qa_outputs [2, D] + bias on every token (start, end logits).
SPAN_HEAD = HeadMapping(
    section=lambda hf: dict(head='span', output_bias=False),
    tensors=lambda cfg: [dataclasses.replace(rule, optional=True) for rule in (
        linear('qa_outputs.weight', 'classifier.kernel'), same('qa_outputs.bias', 'classifier.bias'))])

# GPT-2 and the Llama layout: the LM, and a reward model as <Class>ForSequenceClassification (num_labels=1, `score`
# on the last real token, no pooler, no bias).
DECODER_HEADS = {
    'lm': HeadMapping(tensors=_lm_head_tensors),
    'reward': HeadMapping(section=lambda hf: dict(head='reward', pooling='last', pooler=False),
                          config=_reward_config, tensors=_score_tensors,
                          mismatches=lambda cfg: _want(cfg, pooling='last', pooler=False), accepts=_is_reward,
                          reads=REWARD_READS, pad_token=True),
}
# BERT: BertForMaskedLM, and BertForSequenceClassification (the first token -> pooler -> classifier) as a
# classifier (num_labels >= 2) or a reward model (num_labels=1).
BERT_HEADS = {
    'lm': HeadMapping(tensors=_bert_mlm_tensors),
    'classification': HeadMapping(
        section=lambda hf: dict(head='classification', num_classes=_num_labels(hf), pooling='first', pooler=True,
                                output_bias=False),
        config=lambda cfg: _labels_config(cfg.num_classes, 'single_label_classification'),
        tensors=_bert_pooled_tensors, mismatches=_bert_pooled_mismatches, accepts=_is_classifier,
        reads='num_labels >= 2 (problem_type single_label_classification) as model.head=classification'),
    'reward': HeadMapping(section=lambda hf: dict(head='reward', pooling='first', pooler=True, output_bias=False),
                          config=_reward_config, tensors=_bert_reward_tensors, mismatches=_bert_pooled_mismatches,
                          accepts=_is_reward, reads=REWARD_READS),
    'token_classification': _token_head('classifier'),  # BertForTokenClassification (no pooler)
    'span': SPAN_HEAD,  # BertForQuestionAnswering (no pooler)
}


class Family:
  """Base: a Hugging Face family. `model_types` are the config.json model_type values it reads."""
  model_types: tuple[str, ...] = ()
  arch = ''  # our model.arch
  # transformers' class of a model (config.json "architectures") is class_name + the head's Head.hf_class, or
  # + lm_class for the LM (GPT2 + LMHeadModel)
  class_name = ''
  lm_class = ''
  HEADS: dict[str, HeadMapping] = {'lm': HeadMapping()}  # model.head -> how this family's checkpoints hold it

  def model_section(self, hf: dict) -> dict[str, Any]:
    raise NotImplementedError

  def hf_config(self, cfg: ModelConfig) -> dict[str, Any]:
    raise NotImplementedError

  def tensors(self, cfg: ModelConfig) -> list[Rule]:
    raise NotImplementedError

  def mismatches(self, cfg: ModelConfig) -> list[str]:
    raise NotImplementedError

  def class_name_for(self, cfg: ModelConfig) -> str:
    """The transformers class-name prefix this model is written as (Llama's layout: Llama or Qwen2)."""
    return self.class_name

  def architecture_for(self, cfg: ModelConfig) -> str:
    """config.json "architectures" for this model: the family's class for the model's head."""
    return self.class_name_for(cfg) + (heads.head_of(cfg).hf_class or self.lm_class)

  def head_of(self, hf: dict) -> str:
    """The model.head of a config.json: the head whose transformers class (<Class> + Head.hf_class) it names and
    whose mapping accepts it (its labels); 'lm' when it names no head's class. One line for a task class this
    family has no head for (GPT2ForSequenceClassification with 3 labels, T5ForSequenceClassification)."""
    named = [a for a in hf.get('architectures') or [] if isinstance(a, str)]
    suffixes = {h.hf_class for h in heads.HEADS.values() if h.hf_class}
    tasks = [a for a in named if any(a.endswith(suffix) for suffix in suffixes)]
    if not tasks:
      return 'lm'
    for name, mapping in self.HEADS.items():
      hf_class = heads.HEADS[name].hf_class
      if hf_class and any(a.endswith(hf_class) for a in tasks) and mapping.accepts(hf):
        return name
    reads = [m.reads for m in self.HEADS.values() if m.reads]
    raise ConfigError(f'{hf.get("model_type")} {tasks[0]} with {_num_labels(hf)} label(s) (problem_type='
                      f'{hf.get("problem_type")!r}) is not supported; jaxformer reads '
                      f'{"; ".join(reads) if reads else "only its " + self.class_name + self.lm_class}.')

  def head_section(self, hf: dict) -> dict[str, Any]:
    """The model keys of config.json's head (model.head and its keys)."""
    return self.HEADS[self.head_of(hf)].section(hf)

  def head_mismatches(self, cfg: ModelConfig) -> list[str]:
    """model.head, when this family has no mapping for it, or the head's settings the mapping cannot express."""
    return _want(cfg, head=tuple(self.HEADS)) + (self.HEADS[cfg.head].mismatches(cfg) if cfg.head in self.HEADS
                                                 else [])

  def head_config(self, cfg: ModelConfig) -> dict[str, Any]:
    return self.HEADS[cfg.head].config(cfg)

  def head_tensors(self, cfg: ModelConfig) -> list[Rule]:
    return self.HEADS[cfg.head].tensors(cfg)

  # What the family's models have as a whole: routed experts (model.num_experts > 0 exactly when moe) and which
  # model.qk_norm values its checkpoints express.
  moe = False
  qk_norms: tuple[str, ...] = ('none',)

  def feature_mismatches(self, cfg: ModelConfig) -> list[str]:
    """The mismatches of the features a family has or lacks as a whole (experts, query/key norms)."""
    out = _want(cfg, qk_norm=self.qk_norms)
    if not self.moe:
      return out + _want(cfg, num_experts=0)
    return out + ([] if cfg.num_experts else ['model.num_experts=0 (needs > 0: a mixture of experts)'])

  def from_disk(self, tensors: dict[str, np.ndarray], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """The checkpoint's tensors under the names tensors() maps (a family whose files hold a layout other than the
    one its rules name converts here: the MoE families stack per-expert tensors)."""
    del cfg
    return tensors

  def to_disk(self, tensors: dict[str, np.ndarray], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """The inverse of from_disk: tensors() names -> the layout written to model.safetensors."""
    del cfg
    return tensors

  # Tensors a checkpoint may hold that the model does not use (buffers, tied copies, other heads).
  ignored: tuple[str, ...] = ()
  # The base-model prefix some checkpoints (saved from the bare model class) lack.
  prefix = ''


def _attention_rules(cfg: ModelConfig, ours: str, q: str, k: str, v: str, o: str, bias: bool) -> list[Rule]:
  """q, k, v, o as separate nn.Linear layers (BERT, T5, Llama); `bias` = q/k/v biases."""
  n, kv, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  rules = [heads_in(f'{q}.weight', f'{ours}.query', n, h), heads_in(f'{k}.weight', f'{ours}.key', kv, h),
           heads_in(f'{v}.weight', f'{ours}.value', kv, h), heads_out(f'{o}.weight', f'{ours}.out', n, h)]
  if bias:
    rules += [heads_bias(f'{q}.bias', f'{ours}.query_bias', n, h), heads_bias(f'{k}.bias', f'{ours}.key_bias', kv, h),
              heads_bias(f'{v}.bias', f'{ours}.value_bias', kv, h)]
  return rules


def _t5_attention(cfg: ModelConfig, hf: str, ours: str) -> list[Rule]:
  return _attention_rules(cfg, ours, f'{hf}.q', f'{hf}.k', f'{hf}.v', f'{hf}.o', bias=False)


def _llama_layout(cfg: ModelConfig, head: list[Rule], qkv_bias: bool,
                  layer: Callable[[int, str, str], list[Rule]]) -> list[Rule]:
  """The tensors of a Llama-layout checkpoint (Llama / Mistral / Qwen2, Gemma, the MoE families): the embedding,
  the final norm, the head's, and per layer i self_attn.{q,k,v,o}_proj followed by `layer(i, hf, ours)` (the
  family's norms and MLP), hf / ours being layer i's name prefixes."""
  rules = [same('model.embed_tokens.weight', 'embed.embedding'), *norm('model.norm', 'decoder.final_norm', False),
           *head]
  for i in range(cfg.num_layers):
    hf, ours = f'model.layers.{i}', f'decoder.blocks.{i}'
    a = f'{hf}.self_attn'
    rules += [*_attention_rules(cfg, f'{ours}.attn', f'{a}.q_proj', f'{a}.k_proj', f'{a}.v_proj', f'{a}.o_proj',
                                bias=qkv_bias), *layer(i, hf, ours)]
  return rules


def _gated_mlp_rules(hf: str, ours: str) -> list[Rule]:
  return [linear(f'{hf}.gate_proj.weight', f'{ours}.wi_gate'), linear(f'{hf}.up_proj.weight', f'{ours}.wi'),
          linear(f'{hf}.down_proj.weight', f'{ours}.wo')]


class GPT2(Family):
  """GPT2LMHeadModel, and GPT2ForSequenceClassification with num_labels=1 as model.head=reward."""
  model_types = ('gpt2',)
  arch = 'decoder_only'
  class_name, lm_class = 'GPT2', 'LMHeadModel'
  HEADS = {**DECODER_HEADS, 'token_classification': _token_head('classifier')}  # GPT2ForTokenClassification
  prefix = 'transformer.'
  ignored = ('.attn.bias', '.attn.masked_bias', 'lm_head.weight')

  def model_section(self, hf: dict) -> dict[str, Any]:
    if hf.get('scale_attn_by_inverse_layer_idx'):
      raise ConfigError('gpt2 scale_attn_by_inverse_layer_idx=true has no jaxformer counterpart.')
    if hf.get('add_cross_attention'):
      raise ConfigError('gpt2 add_cross_attention=true (an encoder-decoder GPT-2) is not supported.')
    d = hf['n_embd']
    return dict(arch='decoder_only', position='learned', norm='layer', norm_position='pre',
                mlp=_activation('gpt2', hf.get('activation_function', 'gelu_new')), num_layers=hf['n_layer'],
                num_heads=hf['n_head'], num_kv_heads=-1, d_model=d, d_ff=_get(hf, 'n_inner', default=4 * d),
                vocab_size=hf['vocab_size'], max_len=hf['n_positions'], dropout=hf.get('resid_pdrop', 0.1),
                attention_dropout=hf.get('attn_pdrop', 0.1), use_bias=True,
                tie_embeddings=hf.get('tie_word_embeddings', True), norm_eps=hf.get('layer_norm_epsilon', 1e-5),
                init_std=hf.get('initializer_range', 0.02), pad_id=-1,
                attention_scale=-1.0 if hf.get('scale_attn_weights', True) else 1.0, **self.head_section(hf))

  def mismatches(self, cfg: ModelConfig) -> list[str]:
    return _want(cfg, arch='decoder_only', position='learned', norm='layer', norm_position='pre',
                 mlp=tuple(_ACTIVATION_NAMES), use_bias=True, num_kv_heads=cfg.num_heads,
                 head_dim=cfg.d_model // cfg.num_heads, attention_scale=(-1.0, 1.0), output_scale=1.0,
                 type_vocab_size=0, embed_norm=False, output_bias=False, sliding_window=0,
                 **_NO_GEMMA) + self.head_mismatches(cfg)

  def hf_config(self, cfg: ModelConfig) -> dict[str, Any]:
    return {**_common(cfg), **self.head_config(cfg), 'n_embd': cfg.d_model, 'n_layer': cfg.num_layers,
            'n_head': cfg.num_heads, 'n_inner': cfg.d_ff, 'n_positions': cfg.max_len,
            'activation_function': _ACTIVATION_NAMES[cfg.mlp],
            'resid_pdrop': cfg.dropout, 'embd_pdrop': cfg.dropout, 'attn_pdrop': cfg.attention_dropout,
            'layer_norm_epsilon': cfg.norm_eps, 'tie_word_embeddings': cfg.tie_embeddings,
            'scale_attn_weights': cfg.attention_scale == -1.0}

  def tensors(self, cfg: ModelConfig) -> list[Rule]:
    n, h = cfg.num_heads, cfg.head_dim
    rules = [same('transformer.wte.weight', 'embed.embedding'),
             same('transformer.wpe.weight', 'decoder.positions.embedding'),
             *norm('transformer.ln_f', 'decoder.final_norm'), *self.head_tensors(cfg)]
    for i in range(cfg.num_layers):
      hf, ours = f'transformer.h.{i}', f'decoder.blocks.{i}'
      qkv = tuple(f'{ours}.attn.{p}' for p in ('query', 'key', 'value'))
      rules += [*norm(f'{hf}.ln_1', f'{ours}.attn_norm'), *norm(f'{hf}.ln_2', f'{ours}.mlp_norm'),
                fused_qkv(f'{hf}.attn.c_attn.weight', qkv, n, h),
                fused_qkv(f'{hf}.attn.c_attn.bias', tuple(p + '_bias' for p in qkv), n, h),
                conv_heads_out(f'{hf}.attn.c_proj.weight', f'{ours}.attn.out', n, h),
                same(f'{hf}.attn.c_proj.bias', f'{ours}.attn.out_bias'),
                same(f'{hf}.mlp.c_fc.weight', f'{ours}.mlp.wi'), same(f'{hf}.mlp.c_fc.bias', f'{ours}.mlp.wi_bias'),
                same(f'{hf}.mlp.c_proj.weight', f'{ours}.mlp.wo'),
                same(f'{hf}.mlp.c_proj.bias', f'{ours}.mlp.wo_bias')]
    return rules


class Bert(Family):
  """BertForMaskedLM (BertForPreTraining / BertModel checkpoints load too: their other heads are ignored), and
  BertForSequenceClassification (config.json architectures) with BERT's pooler: the first token -> pooler (dense
  + tanh) -> classifier, as model.head=classification (num_labels >= 2) or model.head=reward (num_labels=1). Any
  BERT checkpoint can start either (--config.model.head=classification / reward): tensors it lacks (pooler,
  classifier) start freshly initialised."""
  model_types = ('bert',)
  arch = 'encoder_only'
  class_name, lm_class = 'Bert', 'ForMaskedLM'
  HEADS = BERT_HEADS
  prefix = 'bert.'
  ignored = ('position_ids', 'bert.pooler.', 'cls.seq_relationship.', 'cls.predictions.decoder.')
  NO_TYPES = 2  # type_vocab_size written for a model without token types (all-zero table)

  def model_section(self, hf: dict) -> dict[str, Any]:
    if hf.get('position_embedding_type', 'absolute') != 'absolute':
      raise ConfigError(f'bert position_embedding_type={hf["position_embedding_type"]!r} is not supported '
                        '(only absolute).')
    return dict(arch='encoder_only', position='learned', norm='layer', norm_position='post',
                mlp=_activation('bert', hf.get('hidden_act', 'gelu')), num_layers=hf['num_hidden_layers'],
                num_heads=hf['num_attention_heads'], num_kv_heads=-1, d_model=hf['hidden_size'],
                d_ff=hf['intermediate_size'], vocab_size=hf['vocab_size'], max_len=hf['max_position_embeddings'],
                dropout=hf.get('hidden_dropout_prob', 0.1),
                attention_dropout=hf.get('attention_probs_dropout_prob', 0.1), use_bias=True, tie_embeddings=True,
                norm_eps=hf.get('layer_norm_eps', 1e-12), init_std=hf.get('initializer_range', 0.02),
                pad_id=_get(hf, 'pad_token_id', default=0), type_vocab_size=hf.get('type_vocab_size', 2),
                embed_norm=True, **{'output_bias': True, **self.head_section(hf)})

  def mismatches(self, cfg: ModelConfig) -> list[str]:
    return _want(cfg, arch='encoder_only', position='learned', norm='layer', norm_position='post',
                 mlp=tuple(_ACTIVATION_NAMES), use_bias=True, tie_embeddings=True, num_kv_heads=cfg.num_heads,
                 head_dim=cfg.d_model // cfg.num_heads, attention_scale=-1.0, output_scale=1.0,
                 embed_norm=True, **_NO_GEMMA) + self.head_mismatches(cfg)

  def hf_config(self, cfg: ModelConfig) -> dict[str, Any]:
    return {**_common(cfg), 'hidden_size': cfg.d_model, 'num_hidden_layers': cfg.num_layers,
            'num_attention_heads': cfg.num_heads, 'intermediate_size': cfg.d_ff,
            'max_position_embeddings': cfg.max_len, 'hidden_act': _ACTIVATION_NAMES[cfg.mlp],
            'hidden_dropout_prob': cfg.dropout, 'attention_probs_dropout_prob': cfg.attention_dropout,
            'layer_norm_eps': cfg.norm_eps, 'type_vocab_size': cfg.type_vocab_size or self.NO_TYPES,
            'pad_token_id': max(cfg.pad_id, 0), 'tie_word_embeddings': True, **self.head_config(cfg)}

  def tensors(self, cfg: ModelConfig) -> list[Rule]:
    e = 'bert.embeddings'
    rules = [same(f'{e}.word_embeddings.weight', 'embed.embedding'),
             same(f'{e}.position_embeddings.weight', 'encoder.positions.embedding'),
             *norm(f'{e}.LayerNorm', 'encoder.embed_norm'), *self.head_tensors(cfg)]
    # A jaxformer BERT without token types / output bias is saved with zeros there (the same logits).
    types = f'{e}.token_type_embeddings.weight'
    rules.append(same(types, 'token_type_embedding') if cfg.type_vocab_size else
                 zeros(types, (self.NO_TYPES, cfg.d_model)))
    for i in range(cfg.num_layers):
      hf, ours = f'bert.encoder.layer.{i}', f'encoder.blocks.{i}'
      a = f'{hf}.attention'
      rules += [*_attention_rules(cfg, f'{ours}.attn', f'{a}.self.query', f'{a}.self.key', f'{a}.self.value',
                                  f'{a}.output.dense', bias=True),
                same(f'{hf}.attention.output.dense.bias', f'{ours}.attn.out_bias'),
                *norm(f'{hf}.attention.output.LayerNorm', f'{ours}.attn_norm'),
                linear(f'{hf}.intermediate.dense.weight', f'{ours}.mlp.wi'),
                same(f'{hf}.intermediate.dense.bias', f'{ours}.mlp.wi_bias'),
                linear(f'{hf}.output.dense.weight', f'{ours}.mlp.wo'),
                same(f'{hf}.output.dense.bias', f'{ours}.mlp.wo_bias'),
                *norm(f'{hf}.output.LayerNorm', f'{ours}.mlp_norm')]
    return rules


class T5(Family):
  """T5ForConditionalGeneration: v1.0 (relu, tied, output rescale d_model**-0.5) and v1.1 (gated-gelu, untied)."""
  model_types = ('t5',)
  arch = 'encoder_decoder'
  class_name, lm_class = 'T5', 'ForConditionalGeneration'
  ignored = ('encoder.embed_tokens.weight', 'decoder.embed_tokens.weight')
  MLPS = {'relu': 'relu', 'gated-gelu': 'geglu', 'gated-silu': 'swiglu', 'gelu': 'gelu', 'gelu_new': 'gelu'}
  _MLP_NAMES = {'relu': 'relu', 'geglu': 'gated-gelu', 'swiglu': 'gated-silu', 'gelu': 'gelu_new'}

  def model_section(self, hf: dict) -> dict[str, Any]:
    ff = hf.get('feed_forward_proj', 'relu')
    if ff not in self.MLPS:
      raise ConfigError(f't5 feed_forward_proj={ff!r} has no jaxformer counterpart; supported: {", ".join(self.MLPS)}.')
    tied = hf.get('tie_word_embeddings', True)
    rescale = hf.get('scale_decoder_outputs', tied)  # transformers 5 names it; older configs: rescale iff tied
    return dict(arch='encoder_decoder', position='relative', norm='rms', norm_position='pre', mlp=self.MLPS[ff],
                num_layers=hf['num_layers'], num_decoder_layers=_get(hf, 'num_decoder_layers', 'num_layers'),
                num_heads=hf['num_heads'], num_kv_heads=-1, d_model=hf['d_model'], d_ff=hf['d_ff'],
                head_dim=_head_dim(hf['d_kv'], hf['d_model'], hf['num_heads']), vocab_size=hf['vocab_size'],
                max_len=hf.get('n_positions', 512),
                dropout=hf.get('dropout_rate', 0.1), attention_dropout=hf.get('dropout_rate', 0.1), use_bias=False,
                tie_embeddings=tied, norm_eps=hf.get('layer_norm_epsilon', 1e-6),
                init_std=hf.get('initializer_factor', 1.0) * hf['d_model'] ** -0.5,
                pad_id=_get(hf, 'pad_token_id', default=0), attention_scale=1.0,
                output_scale=hf['d_model'] ** -0.5 if rescale else 1.0,
                relative_num_buckets=hf.get('relative_attention_num_buckets', 32),
                relative_max_distance=hf.get('relative_attention_max_distance', 128), **self.head_section(hf))

  def mismatches(self, cfg: ModelConfig) -> list[str]:
    rescale = (cfg.d_model ** -0.5, 1.0)
    return _want(cfg, arch='encoder_decoder', position='relative', norm='rms', norm_position='pre',
                 mlp=tuple(self._MLP_NAMES), use_bias=False, num_kv_heads=cfg.num_heads, attention_scale=1.0,
                 output_scale=rescale, qkv_bias=False, type_vocab_size=0, embed_norm=False,
                 output_bias=False, **_NO_GEMMA) + self.head_mismatches(cfg)

  def hf_config(self, cfg: ModelConfig) -> dict[str, Any]:
    out = {**_common(cfg), 'd_model': cfg.d_model, 'd_kv': cfg.head_dim, 'd_ff': cfg.d_ff,
           'num_layers': cfg.num_layers, 'num_decoder_layers': cfg.num_decoder_layers, 'num_heads': cfg.num_heads,
           'feed_forward_proj': self._MLP_NAMES[cfg.mlp], 'dropout_rate': cfg.dropout,
           'layer_norm_epsilon': cfg.norm_eps, 'tie_word_embeddings': cfg.tie_embeddings,
           'scale_decoder_outputs': cfg.output_scale != 1.0,
           'relative_attention_num_buckets': cfg.relative_num_buckets,
           'relative_attention_max_distance': cfg.relative_max_distance, 'n_positions': cfg.max_len,
           'pad_token_id': max(cfg.pad_id, 0), 'decoder_start_token_id': max(cfg.pad_id, 0),
           'is_encoder_decoder': True, 'initializer_factor': 1.0}
    if cfg.output_scale != 1.0 and not cfg.tie_embeddings:
      raise ConfigError('model.output_scale with tie_embeddings=False has no T5 counterpart (transformers rescales '
                        'only tied T5 models).')
    return out

  def tensors(self, cfg: ModelConfig) -> list[Rule]:
    rules = [same('shared.weight', 'embed.embedding'), *norm('encoder.final_layer_norm', 'encoder.final_norm', False),
             *norm('decoder.final_layer_norm', 'decoder.final_norm', False),
             *(same(f'{s}.block.0.layer.0.SelfAttention.relative_attention_bias.weight', f'{s}.positions.embedding')
               for s in ('encoder', 'decoder'))]  # T5 keeps the table in block 0; every layer of the stack uses it
    if not cfg.tie_embeddings:
      rules.append(linear('lm_head.weight', 'unembed.kernel'))
    for stack, layers in (('encoder', cfg.num_layers), ('decoder', cfg.num_decoder_layers)):
      for i in range(layers):
        hf, ours = f'{stack}.block.{i}.layer', f'{stack}.blocks.{i}'
        rules += [*_t5_attention(cfg, f'{hf}.0.SelfAttention', f'{ours}.attn'),
                  *norm(f'{hf}.0.layer_norm', f'{ours}.attn_norm', False)]
        ff = 1
        if stack == 'decoder':
          rules += [*_t5_attention(cfg, f'{hf}.1.EncDecAttention', f'{ours}.cross_attn'),
                    *norm(f'{hf}.1.layer_norm', f'{ours}.cross_norm', False)]
          ff = 2
        dense = f'{hf}.{ff}.DenseReluDense'
        if cfg.mlp in ('geglu', 'swiglu'):
          rules += [linear(f'{dense}.wi_0.weight', f'{ours}.mlp.wi_gate'),
                    linear(f'{dense}.wi_1.weight', f'{ours}.mlp.wi')]
        else:
          rules.append(linear(f'{dense}.wi.weight', f'{ours}.mlp.wi'))
        rules += [linear(f'{dense}.wo.weight', f'{ours}.mlp.wo'),
                  *norm(f'{hf}.{ff}.layer_norm', f'{ours}.mlp_norm', False)]
    return rules


# RoPE scaling: transformers' rope_type -> model.rope_scaling ('default' is jaxformer's 'none').
ROPE_TYPES = {'default': 'none', 'linear': 'linear', 'dynamic': 'dynamic', 'llama3': 'llama3', 'yarn': 'yarn'}


def _rope_parameters(hf: dict) -> dict[str, Any]:
  """The RoPE settings of config.json, one flat dict whatever transformers wrote it: `rope_parameters`
  (transformers 5, rope_theta inside) over `rope_scaling` (transformers 4, `type` in the oldest)."""
  rope = {**(hf.get('rope_scaling') or {}), **(hf.get('rope_parameters') or {})}
  if any(isinstance(v, dict) for v in rope.values()):
    raise ConfigError(f'{hf["model_type"]} RoPE parameters per layer type ({", ".join(rope)}) are not supported.')
  rope['rope_type'] = rope.get('rope_type', rope.get('type', 'default'))
  if rope['rope_type'] not in ROPE_TYPES:
    raise ConfigError(f'{hf["model_type"]} rope_type={rope["rope_type"]!r} (RoPE scaling) has no jaxformer '
                      f'counterpart; supported: {", ".join(ROPE_TYPES)}.')
  return rope


def _rope_scaling_section(hf: dict, rope: dict[str, Any], max_position_embeddings: int) -> dict[str, Any]:
  """model.rope_* keys for the RoPE parameters, with transformers' defaults for the ones config.json leaves out."""
  kind = ROPE_TYPES[rope['rope_type']]
  if kind == 'none':
    return {}
  factor = rope.get('factor')
  # transformers' pre-training length: dynamic scales past max_position_embeddings; llama3 and yarn read
  # original_max_position_embeddings (a top-level one first, as Phi-3 saves it), else max_position_embeddings.
  original = max_position_embeddings if kind == 'dynamic' else _get(
      hf, 'original_max_position_embeddings', default=rope.get('original_max_position_embeddings',
                                                               max_position_embeddings))
  if factor is None and kind == 'yarn':  # DeepSeek-style: the ratio of the two lengths
    factor = max_position_embeddings / original
  if factor is None:
    raise ConfigError(f'{hf["model_type"]} rope_type={rope["rope_type"]} has no factor.')
  out = dict(rope_scaling=kind, rope_factor=float(factor), rope_original_max_len=int(original))
  if kind == 'llama3':
    out.update(rope_low_freq_factor=float(rope['low_freq_factor']),
               rope_high_freq_factor=float(rope['high_freq_factor']))
  if kind == 'yarn':
    attention = rope.get('attention_factor')
    out.update(rope_beta_fast=float(rope.get('beta_fast') or 32), rope_beta_slow=float(rope.get('beta_slow') or 1),
               rope_attention_factor=-1.0 if attention is None else float(attention),
               rope_mscale=float(rope.get('mscale') or 0), rope_mscale_all_dim=float(rope.get('mscale_all_dim') or 0),
               rope_truncate=bool(rope.get('truncate', True)))
  return out


def _rope_scaling_config(cfg: ModelConfig) -> dict[str, Any]:
  """config.json's rope_parameters (transformers 5's format) for model.rope_scaling; nothing for none. dynamic's
  max_position_embeddings is where transformers starts scaling, so it is rope_original_max_len."""
  kind = cfg.rope_scaling
  if kind == 'none':
    return {}
  rope = {'rope_type': kind, 'rope_theta': cfg.rope_base, 'factor': cfg.rope_factor}
  if kind == 'dynamic':
    return {'rope_parameters': rope, 'max_position_embeddings': cfg.rope_original_max_len}
  if kind in ('llama3', 'yarn'):
    rope['original_max_position_embeddings'] = cfg.rope_original_max_len
  if kind == 'llama3':
    rope.update(low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor)
  if kind == 'yarn':
    rope.update(beta_fast=cfg.rope_beta_fast, beta_slow=cfg.rope_beta_slow)
    optional = {'attention_factor': (cfg.rope_attention_factor, -1.0), 'mscale': (cfg.rope_mscale, 0.0),
                'mscale_all_dim': (cfg.rope_mscale_all_dim, 0.0), 'truncate': (cfg.rope_truncate, True)}
    rope.update({k: value for k, (value, unset) in optional.items() if value != unset})
  return {'rope_parameters': rope}


def _window_pattern(kinds: list[bool]) -> str:
  """Per-layer windowed (True) / global -> model.sliding_window_pattern: the shortest L/G string whose repetition
  spells every layer (L for all windowed, LG for Gemma 2's alternation, GGLL for Qwen2's max_window_layers=2)."""
  spelled = ''.join('L' if k else 'G' for k in kinds)
  for period in range(1, len(spelled) + 1):
    if all(spelled[i] == spelled[i % period] for i in range(len(spelled))):
      return spelled[:period]
  return spelled


def _sliding_window_section(hf: dict) -> dict[str, Any]:
  """model.sliding_window / sliding_window_pattern of a Mistral or Qwen2 config.json, as transformers 5.25 reads it.

  Mistral: sliding_window (when set) on every layer; its modeling code ignores layer_types. Qwen2: only with
  use_sliding_window; the layers config.json's layer_types calls sliding_attention, or without it those from
  max_window_layers on."""
  window = hf.get('sliding_window')
  if hf['model_type'] == 'mistral' and window:
    return dict(sliding_window=int(window), sliding_window_pattern='L')
  if hf['model_type'] != 'qwen2' or not (hf.get('use_sliding_window') and window):
    return {}
  layers = hf['num_hidden_layers']
  types = hf.get('layer_types') or ['sliding_attention' if i >= hf.get('max_window_layers', 28) else
                                    'full_attention' for i in range(layers)]
  if set(types) - {'sliding_attention', 'full_attention'}:
    raise ConfigError(f'qwen2 layer_types={types!r} has no jaxformer counterpart (full_attention and '
                      'sliding_attention are supported).')
  kinds = [t == 'sliding_attention' for t in types]
  return dict(sliding_window=int(window), sliding_window_pattern=_window_pattern(kinds)) if any(kinds) else {}


class Llama(Family):
  """LlamaForCausalLM, and the families with its layout: Mistral, Qwen2 (bias on q/k/v only); their
  *ForSequenceClassification with num_labels=1 as model.head=reward. RoPE scaling (rope_type linear, dynamic,
  llama3, yarn) maps to model.rope_scaling and its model.rope_* keys; Mistral's and Qwen2's sliding windows to
  model.sliding_window / sliding_window_pattern (max_position_embeddings is kept). A model is written as Qwen2 when
  it has q/k/v biases only, else as Mistral when it has a sliding window, else as Llama."""
  model_types = ('llama', 'mistral', 'qwen2')
  arch = 'decoder_only'
  class_name, lm_class = 'Llama', 'ForCausalLM'
  HEADS = {**DECODER_HEADS, 'token_classification': _token_head('score')}  # <Class>ForTokenClassification
  prefix = 'model.'
  ignored = ('rotary_emb.inv_freq', 'lm_head.weight')

  def model_section(self, hf: dict) -> dict[str, Any]:
    model_type = hf['model_type']
    rope = _rope_parameters(hf)
    if hf.get('partial_rotary_factor', 1.0) != 1.0:
      raise ConfigError(f'{model_type} partial_rotary_factor={hf["partial_rotary_factor"]} is not supported.')
    if hf.get('hidden_act', 'silu') != 'silu':
      raise ConfigError(f'{model_type} hidden_act={hf["hidden_act"]!r} is not supported (only silu = SwiGLU).')
    qkv_bias = model_type == 'qwen2' or bool(hf.get('attention_bias'))
    mlp_bias = bool(hf.get('mlp_bias'))
    if hf.get('attention_bias') and not mlp_bias:  # Llama's attention_bias also covers o_proj
      raise ConfigError(f'{model_type} attention_bias=true without mlp_bias has no jaxformer counterpart.')
    heads = hf['num_attention_heads']
    max_len = hf.get('max_position_embeddings', 2048)
    scaling = _rope_scaling_section(hf, rope, max_len)
    if scaling.get('rope_scaling') == 'yarn':  # YaRN declares factor x its original length usable
      max_len = max(max_len, int(scaling['rope_factor'] * scaling['rope_original_max_len']))
    return dict(arch='decoder_only', position='rope', norm='rms', norm_position='pre', mlp='swiglu',
                num_layers=hf['num_hidden_layers'], num_heads=heads,
                num_kv_heads=_get(hf, 'num_key_value_heads', default=heads), d_model=hf['hidden_size'],
                d_ff=hf['intermediate_size'],
                head_dim=_head_dim(_get(hf, 'head_dim', default=hf['hidden_size'] // heads), hf['hidden_size'], heads),
                vocab_size=hf['vocab_size'], max_len=max_len, dropout=0.0,
                attention_dropout=hf.get('attention_dropout', 0.0), use_bias=mlp_bias,
                qkv_bias=qkv_bias and not mlp_bias, tie_embeddings=hf.get('tie_word_embeddings', False),
                norm_eps=hf.get('rms_norm_eps', 1e-6), rope_base=rope.get('rope_theta', hf.get('rope_theta', 1e4)),
                init_std=hf.get('initializer_range', 0.02), pad_id=-1, **scaling, **_sliding_window_section(hf),
                **self.head_section(hf))

  def mismatches(self, cfg: ModelConfig) -> list[str]:
    return _want(cfg, arch='decoder_only', position='rope', norm='rms', norm_position='pre', mlp='swiglu',
                 output_scale=1.0, type_vocab_size=0, embed_norm=False, output_bias=False,
                 attention_scale=-1.0, **_NO_GEMMA) + self._window_mismatches(cfg) + self.head_mismatches(cfg)

  def _window_mismatches(self, cfg: ModelConfig) -> list[str]:
    """Sliding windows: Qwen2 (q/k/v biases) windows the layers from max_window_layers on; otherwise Mistral (no
    biases) windows every layer."""
    windows = cfg.layer_windows()
    if not any(windows):
      return []
    if self._qwen(cfg):
      first = windows.index(cfg.sliding_window)
      if all(windows[first:]):
        return []
      return [f'model.sliding_window_pattern={cfg.sliding_window_pattern!r} (Qwen2 needs global layers, then '
              f'windowed ones: G...GL...L)']
    bad = [] if all(windows) else [f'model.sliding_window_pattern={cfg.sliding_window_pattern!r} (Mistral windows '
                                   'every layer: L)']
    return bad + _want(cfg, use_bias=False, qkv_bias=False)

  def class_name_for(self, cfg: ModelConfig) -> str:
    if self._qwen(cfg):
      return 'Qwen2'
    return 'Mistral' if cfg.sliding_window else 'Llama'

  @staticmethod
  def _qwen(cfg: ModelConfig) -> bool:
    return cfg.qkv_bias and not cfg.use_bias

  def hf_config(self, cfg: ModelConfig) -> dict[str, Any]:
    out = {**_common(cfg), **self.head_config(cfg), 'hidden_size': cfg.d_model, 'intermediate_size': cfg.d_ff,
           'num_hidden_layers': cfg.num_layers, 'num_attention_heads': cfg.num_heads,
           'num_key_value_heads': cfg.num_kv_heads, 'head_dim': cfg.head_dim, 'hidden_act': 'silu',
           'max_position_embeddings': cfg.max_len, 'rms_norm_eps': cfg.norm_eps, 'rope_theta': cfg.rope_base,
           'attention_dropout': cfg.attention_dropout, 'tie_word_embeddings': cfg.tie_embeddings,
           **_rope_scaling_config(cfg)}
    windows = cfg.layer_windows()
    if self._qwen(cfg):
      if not any(windows):
        return {**out, 'model_type': 'qwen2', 'use_sliding_window': False}
      return {**out, 'model_type': 'qwen2', 'use_sliding_window': True, 'sliding_window': cfg.sliding_window,
              'max_window_layers': windows.index(cfg.sliding_window),
              'layer_types': ['sliding_attention' if w else 'full_attention' for w in windows]}
    if cfg.sliding_window:
      return {**out, 'model_type': 'mistral', 'sliding_window': cfg.sliding_window}
    return {**out, 'attention_bias': cfg.use_bias, 'mlp_bias': cfg.use_bias}

  def tensors(self, cfg: ModelConfig) -> list[Rule]:
    def layer(i: int, hf: str, ours: str) -> list[Rule]:
      rules = [*norm(f'{hf}.input_layernorm', f'{ours}.attn_norm', False),
               *norm(f'{hf}.post_attention_layernorm', f'{ours}.mlp_norm', False),
               *_gated_mlp_rules(f'{hf}.mlp', f'{ours}.mlp')]
      if cfg.use_bias:  # Llama's mlp_bias also gives the gate a bias; jaxformer's SwiGLU gate has none
        rules += [same(f'{hf}.self_attn.o_proj.bias', f'{ours}.attn.out_bias'),
                  zeros(f'{hf}.mlp.gate_proj.bias', (cfg.d_ff,)),
                  same(f'{hf}.mlp.up_proj.bias', f'{ours}.mlp.wi_bias'),
                  same(f'{hf}.mlp.down_proj.bias', f'{ours}.mlp.wo_bias')]
      return rules
    return _llama_layout(cfg, self.head_tensors(cfg), cfg.use_bias or cfg.qkv_bias, layer)


# Gemma's activation names (config.json hidden_act; Gemma 2: hidden_activation) -> model.mlp: a gated GELU
_GEMMA_MLPS = {'gelu_pytorch_tanh': 'geglu', 'gelu_new': 'geglu', 'gelu_fast': 'geglu', 'gelu': 'geglu_exact'}
_GEMMA_ACTIVATIONS = {'geglu': 'gelu_pytorch_tanh', 'geglu_exact': 'gelu'}  # inverse, for saving


class Gemma(Llama):
  """GemmaForCausalLM: Llama's layout and tensor names, with token embeddings scaled by sqrt(hidden_size)
  (model.embed_scale), RMSNorm times (1 + weight) (model.norm=rms_plus_one), a gated GELU MLP (hidden_act:
  gelu_pytorch_tanh -> geglu, gelu -> geglu_exact, as transformers 5.25 reads hidden_act), tied embeddings by
  default and no biases."""
  model_types = ('gemma',)
  class_name = 'Gemma'
  activation_key = 'hidden_act'  # Gemma 2 reads hidden_activation

  def model_section(self, hf: dict) -> dict[str, Any]:
    model_type = hf['model_type']
    if hf.get('attention_bias'):
      raise ConfigError(f'{model_type} attention_bias=true has no jaxformer counterpart.')
    if hf.get('use_bidirectional_attention'):
      raise ConfigError(f'{model_type} use_bidirectional_attention=true is not supported (causal attention only).')
    act = hf.get(self.activation_key, 'gelu_pytorch_tanh')
    if act not in _GEMMA_MLPS:
      raise ConfigError(f'{model_type} {self.activation_key}={act!r} has no jaxformer counterpart; supported: '
                        f'{", ".join(_GEMMA_MLPS)}.')
    rope = _rope_parameters(hf)
    heads = hf['num_attention_heads']
    max_len = hf.get('max_position_embeddings', 8192)
    return dict(arch='decoder_only', position='rope', norm='rms_plus_one', norm_position='pre', mlp=_GEMMA_MLPS[act],
                num_layers=hf['num_hidden_layers'], num_heads=heads,
                num_kv_heads=_get(hf, 'num_key_value_heads', default=heads), d_model=hf['hidden_size'],
                d_ff=hf['intermediate_size'],
                head_dim=_head_dim(_get(hf, 'head_dim', default=256), hf['hidden_size'], heads),
                vocab_size=hf['vocab_size'], max_len=max_len, dropout=0.0,
                attention_dropout=hf.get('attention_dropout', 0.0), use_bias=False, qkv_bias=False,
                tie_embeddings=hf.get('tie_word_embeddings', True), norm_eps=hf.get('rms_norm_eps', 1e-6),
                rope_base=rope.get('rope_theta', hf.get('rope_theta', 1e4)), init_std=hf.get('initializer_range', 0.02),
                pad_id=-1, embed_scale=True, **_rope_scaling_section(hf, rope, max_len), **self.extra_section(hf),
                **self.head_section(hf))

  def extra_section(self, hf: dict) -> dict[str, Any]:
    """The model keys of a later Gemma's own config.json settings (none for Gemma)."""
    del hf
    return {}

  def mismatches(self, cfg: ModelConfig) -> list[str]:
    return _want(cfg, arch='decoder_only', position='rope', norm='rms_plus_one', norm_position='pre',
                 mlp=tuple(_GEMMA_ACTIVATIONS), output_scale=1.0, type_vocab_size=0, embed_norm=False,
                 output_bias=False, attention_scale=-1.0, use_bias=False, qkv_bias=False, embed_scale=True,
                 sliding_window=0, attention_softcap=0.0, logit_softcap=0.0) + self.head_mismatches(cfg)

  def class_name_for(self, cfg: ModelConfig) -> str:
    return self.class_name

  def hf_config(self, cfg: ModelConfig) -> dict[str, Any]:
    return {**_common(cfg), **self.head_config(cfg), 'model_type': self.model_types[0], 'hidden_size': cfg.d_model,
            'intermediate_size': cfg.d_ff, 'num_hidden_layers': cfg.num_layers, 'num_attention_heads': cfg.num_heads,
            'num_key_value_heads': cfg.num_kv_heads, 'head_dim': cfg.head_dim,
            self.activation_key: _GEMMA_ACTIVATIONS[cfg.mlp], 'max_position_embeddings': cfg.max_len,
            'rms_norm_eps': cfg.norm_eps, 'rope_theta': cfg.rope_base, 'attention_bias': False,
            'attention_dropout': cfg.attention_dropout, 'tie_word_embeddings': cfg.tie_embeddings,
            **_rope_scaling_config(cfg)}


class Gemma2(Gemma):
  """Gemma2ForCausalLM: Gemma, plus a norm on each sublayer's output (model.norm_position=sandwich:
  post_attention_layernorm / post_feedforward_layernorm; pre_feedforward_layernorm is the MLP's input norm),
  logits scaled by query_pre_attn_scalar ** -0.5 (model.attention_scale), attention and final logit soft-capping
  (model.attention_softcap / logit_softcap) and sliding-window layers (layer_types; by default local, global, ...:
  model.sliding_window_pattern=LG). Absent keys take Gemma2Config's defaults, as transformers does."""
  model_types = ('gemma2',)
  class_name = 'Gemma2'
  activation_key = 'hidden_activation'

  def model_section(self, hf: dict) -> dict[str, Any]:
    return {**super().model_section(hf), 'norm_position': 'sandwich'}

  def extra_section(self, hf: dict) -> dict[str, Any]:
    layers = hf['num_hidden_layers']
    types = hf.get('layer_types') or ['sliding_attention' if (i + 1) % 2 else 'full_attention' for i in range(layers)]
    if set(types) - {'sliding_attention', 'full_attention'}:
      raise ConfigError(f'gemma2 layer_types={types!r} has no jaxformer counterpart (full_attention and '
                        'sliding_attention are supported).')
    window = hf.get('sliding_window', 4096)
    kinds = [t == 'sliding_attention' for t in types]
    windowed = dict(sliding_window=int(window), sliding_window_pattern=_window_pattern(kinds)) if (
        window and any(kinds)) else {}
    return dict(attention_scale=float(hf.get('query_pre_attn_scalar', 256)) ** -0.5,
                attention_softcap=float(hf.get('attn_logit_softcapping', 50.0) or 0.0),
                logit_softcap=float(hf.get('final_logit_softcapping', 30.0) or 0.0), **windowed)

  def mismatches(self, cfg: ModelConfig) -> list[str]:
    return _want(cfg, arch='decoder_only', position='rope', norm='rms_plus_one', norm_position='sandwich',
                 mlp=tuple(_GEMMA_ACTIVATIONS), output_scale=1.0, type_vocab_size=0, embed_norm=False,
                 output_bias=False, use_bias=False, qkv_bias=False, embed_scale=True) + self.head_mismatches(cfg)

  def hf_config(self, cfg: ModelConfig) -> dict[str, Any]:
    scalar = cfg.head_dim if cfg.attention_scale == -1 else cfg.attention_scale ** -2
    scalar = round(scalar) if abs(scalar - round(scalar)) < 1e-6 * scalar else scalar
    windows = cfg.layer_windows()
    return {**super().hf_config(cfg), 'query_pre_attn_scalar': scalar,
            'sliding_window': cfg.sliding_window or None,
            'layer_types': ['sliding_attention' if w else 'full_attention' for w in windows],
            'attn_logit_softcapping': cfg.attention_softcap or None,
            'final_logit_softcapping': cfg.logit_softcap or None}

  def tensors(self, cfg: ModelConfig) -> list[Rule]:
    def layer(i: int, hf: str, ours: str) -> list[Rule]:  # sandwich norms around both sublayers
      return [*norm(f'{hf}.input_layernorm', f'{ours}.attn_norm', False),
              *norm(f'{hf}.post_attention_layernorm', f'{ours}.attn_post_norm', False),
              *norm(f'{hf}.pre_feedforward_layernorm', f'{ours}.mlp_norm', False),
              *norm(f'{hf}.post_feedforward_layernorm', f'{ours}.mlp_post_norm', False),
              *_gated_mlp_rules(f'{hf}.mlp', f'{ours}.mlp')]
    return _llama_layout(cfg, self.head_tensors(cfg), False, layer)




# ------------------------------------------------------------------------------------------- mixtures of experts
# The MoE families' expert tensors, by the names transformers 5 keeps in memory (its conversion_mapping fuses the
# Hub's per-expert tensors on load): per MoE layer `mlp.experts.gate_up_proj` [E, 2F, D] (gate rows, then up rows),
# `mlp.experts.down_proj` [E, D, F] and the router `mlp.gate.weight` [E, D]. Files hold them per expert, as Hub
# checkpoints do and transformers 5.25's save_pretrained writes: Mixtral `block_sparse_moe.experts.{e}.w1/w3/w2.weight`
# (gate / up / down) and `block_sparse_moe.gate.weight`; Qwen2-MoE, OLMoE `mlp.experts.{e}.gate_proj/up_proj/
# down_proj.weight`. from_disk reads either layout (fused files too); to_disk writes the family's Hub layout.
_PER_EXPERT = re.compile(r'^(?P<layer>(?:.*\.)?layers\.\d+\.)(?:block_sparse_moe|mlp)\.experts\.(?P<e>\d+)\.'
                         r'(?P<w>w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$')
_GATE, _UP, _DOWN = ('w1', 'gate_proj'), ('w3', 'up_proj'), ('w2', 'down_proj')


def _stack_experts(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Per-expert tensors -> each layer's fused gate_up_proj / down_proj; Mixtral's block_sparse_moe -> mlp."""
  out, groups = {}, {}
  for name, w in tensors.items():
    m = _PER_EXPERT.match(name)
    if m is None:
      out[name.replace('.block_sparse_moe.', '.mlp.')] = w
      continue
    kind = 'gate' if m['w'] in _GATE else 'up' if m['w'] in _UP else 'down'
    groups.setdefault(m['layer'], {}).setdefault(kind, {})[int(m['e'])] = w
  for layer, kinds in groups.items():
    if set(kinds) != {'gate', 'up', 'down'} or len({tuple(sorted(v)) for v in kinds.values()}) != 1:
      raise ConfigError(f'{layer}: the experts\' gate, up and down tensors do not match (each expert needs all '
                        'three).')
    experts = sorted(kinds['gate'])
    if experts != list(range(len(experts))):
      raise ConfigError(f'{layer} has experts {experts}; a MoE layer needs experts 0..E-1.')
    stack = lambda kind: np.stack([kinds[kind][e] for e in experts])  # noqa: E731
    out[f'{layer}mlp.experts.gate_up_proj'] = np.concatenate([stack('gate'), stack('up')], axis=1)
    out[f'{layer}mlp.experts.down_proj'] = stack('down')
  return out


def _split_experts(tensors: dict[str, np.ndarray], names: tuple[str, str, str], block: str) -> dict[str, np.ndarray]:
  """The inverse: fused -> `{block}.experts.{e}.{gate,up,down}.weight` (names: the gate / up / down names) and the
  router under `{block}.gate.weight`."""
  out = {}
  for name, w in tensors.items():
    if name.endswith('.mlp.experts.gate_up_proj'):
      layer, f = name[:-len('mlp.experts.gate_up_proj')], w.shape[1] // 2
      for e in range(w.shape[0]):
        out[f'{layer}{block}.experts.{e}.{names[0]}.weight'] = w[e, :f]
        out[f'{layer}{block}.experts.{e}.{names[1]}.weight'] = w[e, f:]
    elif name.endswith('.mlp.experts.down_proj'):
      layer = name[:-len('mlp.experts.down_proj')]
      for e in range(w.shape[0]):
        out[f'{layer}{block}.experts.{e}.{names[2]}.weight'] = w[e]
    elif name.endswith('.mlp.gate.weight'):
      out[name.replace('.mlp.gate.', f'.{block}.gate.')] = w
    else:
      out[name] = w
  return out


def _expert_rules(hf: str, ours: str) -> list[Rule]:
  """One MoE layer's router and stacked experts: gate.weight [E, D] <-> router [D, E]; gate_up_proj [E, 2F, D] <->
  wi_gate, wi [E, D, F]; down_proj [E, D, F] <-> wo [E, F, D]."""
  def split(w):
    f = w.shape[1] // 2
    return np.swapaxes(w[:, :f], 1, 2), np.swapaxes(w[:, f:], 1, 2)
  return [linear(f'{hf}.gate.weight', f'{ours}.router'),
          Rule(f'{hf}.experts.gate_up_proj', (f'{ours}.wi_gate', f'{ours}.wi'), split,
               lambda gate, up: np.swapaxes(np.concatenate([gate, up], axis=2), 1, 2)),
          Rule(f'{hf}.experts.down_proj', (f'{ours}.wo',), lambda w: (np.swapaxes(w, 1, 2),),
               lambda w: np.swapaxes(w, 1, 2))]


def _router(hf: dict, renormalise: bool) -> str:
  """model.router of norm_topk_prob (Mixtral always renormalises)."""
  return 'topk_softmax' if renormalise else 'softmax_topk'


class _MoEFamily(Llama):
  """The Llama layout with routed experts (Mixtral, Qwen2-MoE, OLMoE): the LM head only; SwiGLU experts."""
  arch = 'decoder_only'
  HEADS = {'lm': HeadMapping(tensors=_lm_head_tensors)}
  moe = True
  expert_names = ('gate_proj', 'up_proj', 'down_proj')  # the Hub's per-expert tensor names
  expert_block = 'mlp'  # the module holding the router and experts in Hub files (Mixtral: block_sparse_moe)

  def moe_section(self, hf: dict) -> dict[str, Any]:
    raise NotImplementedError

  def model_section(self, hf: dict) -> dict[str, Any]:
    model_type = hf['model_type']
    if hf.get('hidden_act', 'silu') != 'silu':
      raise ConfigError(f'{model_type} hidden_act={hf["hidden_act"]!r} is not supported (only silu = SwiGLU).')
    if hf.get('router_jitter_noise'):
      logging.warning('%s router_jitter_noise=%s (multiplicative noise on the router input while training) has no '
                      'jaxformer counterpart; training runs without it.', model_type, hf['router_jitter_noise'])
    # Llama's reading of the shared keys (RoPE and its scaling, GQA, head_dim, norms, tying), with no biases
    base = super().model_section({**hf, 'model_type': 'llama', 'attention_bias': False, 'mlp_bias': False})
    return {**base, 'qkv_bias': False, **self.moe_section(hf)}

  def moe_mismatches(self, cfg: ModelConfig) -> list[str]:
    raise NotImplementedError

  def mismatches(self, cfg: ModelConfig) -> list[str]:
    return _want(cfg, arch='decoder_only', position='rope', norm='rms', norm_position='pre', mlp='swiglu',
                 output_scale=1.0, type_vocab_size=0, embed_norm=False, output_bias=False, attention_scale=-1.0,
                 use_bias=False, **_NO_GEMMA) + self.moe_mismatches(cfg) + self.head_mismatches(cfg)

  def class_name_for(self, cfg: ModelConfig) -> str:
    return self.class_name

  def hf_config(self, cfg: ModelConfig) -> dict[str, Any]:
    out = super().hf_config(cfg)
    for key in ('attention_bias', 'mlp_bias', 'use_sliding_window', 'sliding_window', 'max_window_layers',
                'layer_types'):
      out.pop(key, None)
    return {**out, 'model_type': self.model_types[0], 'num_experts_per_tok': cfg.experts_per_token,
            'output_router_logits': False}

  def mlp_rules(self, cfg: ModelConfig, i: int, hf: str, ours: str) -> list[Rule]:
    """Layer i's MLP: the router and experts (+ shared expert) of a MoE block, else a dense SwiGLU."""
    if not moe_lib.is_moe_layer(cfg, i):
      return _gated_mlp_rules(f'{hf}.mlp', f'{ours}.mlp')
    return _expert_rules(f'{hf}.mlp', f'{ours}.mlp')

  def attention_extra(self, cfg: ModelConfig, hf: str, ours: str) -> list[Rule]:
    del cfg, hf, ours
    return []

  def tensors(self, cfg: ModelConfig) -> list[Rule]:
    def layer(i: int, hf: str, ours: str) -> list[Rule]:
      return [*self.attention_extra(cfg, f'{hf}.self_attn', f'{ours}.attn'),
              *norm(f'{hf}.input_layernorm', f'{ours}.attn_norm', False),
              *norm(f'{hf}.post_attention_layernorm', f'{ours}.mlp_norm', False),
              *self.mlp_rules(cfg, i, hf, ours)]
    return _llama_layout(cfg, self.head_tensors(cfg), cfg.qkv_bias, layer)

  def from_disk(self, tensors: dict[str, np.ndarray], cfg: ModelConfig) -> dict[str, np.ndarray]:
    del cfg
    return _stack_experts(tensors)

  def to_disk(self, tensors: dict[str, np.ndarray], cfg: ModelConfig) -> dict[str, np.ndarray]:
    del cfg
    return _split_experts(tensors, self.expert_names, self.expert_block)


class Mixtral(_MoEFamily):
  """MixtralForCausalLM: every layer a MoE block of num_local_experts SwiGLU experts (intermediate_size wide),
  the softmax over the top-k router logits (model.router=topk_softmax), no biases; sliding_window (every layer)
  or null."""
  model_types = ('mixtral',)
  class_name = 'Mixtral'
  expert_names = ('w1', 'w3', 'w2')
  expert_block = 'block_sparse_moe'

  def moe_section(self, hf: dict) -> dict[str, Any]:
    window = hf.get('sliding_window')
    return dict(num_experts=hf['num_local_experts'], experts_per_token=hf['num_experts_per_tok'], moe_every=1,
                router='topk_softmax', num_shared_experts=0, expert_d_ff=0,
                **(dict(sliding_window=int(window), sliding_window_pattern='L') if window else {}))

  def moe_mismatches(self, cfg: ModelConfig) -> list[str]:
    windows = cfg.layer_windows()
    bad = [] if all(windows) or not any(windows) else [
        f'model.sliding_window_pattern={cfg.sliding_window_pattern!r} (Mixtral windows every layer: L)']
    return bad + _want(cfg, qkv_bias=False, router='topk_softmax', moe_every=1, num_shared_experts=0)

  def hf_config(self, cfg: ModelConfig) -> dict[str, Any]:
    return {**super().hf_config(cfg), 'intermediate_size': moe_lib.expert_width(cfg),
            'num_local_experts': cfg.num_experts, 'sliding_window': cfg.sliding_window or None,
            'router_jitter_noise': 0.0}


class Qwen2Moe(_MoEFamily):
  """Qwen2MoeForCausalLM (Qwen1.5-MoE, Qwen2-57B-A14B): q/k/v biases, every decoder_sparse_step-th layer MoE
  (model.moe_every; the others dense, intermediate_size wide), experts moe_intermediate_size wide, a shared expert
  shared_expert_intermediate_size wide (= model.num_shared_experts x expert width) scaled by sigmoid(x w)
  (shared_expert_gate), norm_topk_prob true = topk_softmax, false = softmax_topk. mlp_only_layers that break the
  every-moe_every-th pattern and sliding windows are refused."""
  model_types = ('qwen2_moe',)
  class_name = 'Qwen2Moe'

  def moe_section(self, hf: dict) -> dict[str, Any]:
    layers, step = hf['num_hidden_layers'], hf.get('decoder_sparse_step', 1)
    experts = hf.get('num_experts', 60)
    if hf.get('use_sliding_window'):
      raise ConfigError('qwen2_moe use_sliding_window=true is not supported (set it false: Qwen2-MoE checkpoints '
                        'are trained without windows).')
    only = set(hf.get('mlp_only_layers') or [])
    routed = [i for i in range(layers) if i not in only and experts > 0 and (i + 1) % step == 0]
    if only and routed != [i for i in range(layers) if (i + 1) % step == 0]:
      raise ConfigError(f'qwen2_moe mlp_only_layers={sorted(only)} makes MoE layers {routed}, which '
                        f'model.moe_every (every moe_every-th layer) cannot express; only decoder_sparse_step is '
                        'supported.')
    width, shared = hf.get('moe_intermediate_size', 1408), hf.get('shared_expert_intermediate_size', 5632)
    if shared % width or not shared:
      raise ConfigError(f'qwen2_moe shared_expert_intermediate_size={shared} is not a positive multiple of '
                        f'moe_intermediate_size={width}; jaxformer\'s shared expert is model.num_shared_experts '
                        'experts wide.')
    return dict(num_experts=experts, experts_per_token=hf.get('num_experts_per_tok', 4), moe_every=step,
                router=_router(hf, hf.get('norm_topk_prob', False)), num_shared_experts=shared // width,
                moe_shared_gate=True, expert_d_ff=width, qkv_bias=hf.get('qkv_bias', True))

  def moe_mismatches(self, cfg: ModelConfig) -> list[str]:
    bad = [] if cfg.num_shared_experts else ['model.num_shared_experts=0 (needs >= 1: Qwen2-MoE has a shared '
                                              'expert)']
    return bad + _want(cfg, moe_shared_gate=True, sliding_window=0)

  def hf_config(self, cfg: ModelConfig) -> dict[str, Any]:
    width = moe_lib.expert_width(cfg)
    return {**super().hf_config(cfg), 'num_experts': cfg.num_experts, 'decoder_sparse_step': cfg.moe_every,
            'moe_intermediate_size': width, 'shared_expert_intermediate_size': cfg.num_shared_experts * width,
            'norm_topk_prob': moe_lib.ROUTERS[cfg.router].renormalise, 'mlp_only_layers': [],
            'qkv_bias': cfg.qkv_bias, 'use_sliding_window': False}

  def mlp_rules(self, cfg: ModelConfig, i: int, hf: str, ours: str) -> list[Rule]:
    rules = super().mlp_rules(cfg, i, hf, ours)
    if moe_lib.is_moe_layer(cfg, i):
      rules += [*_gated_mlp_rules(f'{hf}.mlp.shared_expert', f'{ours}.mlp.shared'),
                linear(f'{hf}.mlp.shared_expert_gate.weight', f'{ours}.mlp.shared_gate')]
    return rules


class Olmoe(_MoEFamily):
  """OlmoeForCausalLM: every layer MoE (intermediate_size = the expert width), RMSNorm over each whole q and k
  projection (q_norm, k_norm: model.qk_norm=projection), norm_topk_prob false = softmax_topk (true =
  topk_softmax); attention_bias and clip_qkv are refused."""
  model_types = ('olmoe',)
  class_name = 'Olmoe'
  qk_norms = ('projection',)

  def moe_section(self, hf: dict) -> dict[str, Any]:
    for key in ('attention_bias', 'clip_qkv'):
      if hf.get(key):
        raise ConfigError(f'olmoe {key}={hf[key]!r} has no jaxformer counterpart.')
    heads = hf['num_attention_heads']
    if _get(hf, 'head_dim', default=hf['hidden_size'] // heads) * heads != hf['hidden_size']:
      raise ConfigError(f'olmoe head_dim={hf["head_dim"]} x num_attention_heads != hidden_size is not supported.')
    return dict(num_experts=hf.get('num_experts', 64), experts_per_token=hf.get('num_experts_per_tok', 8),
                moe_every=1, router=_router(hf, hf.get('norm_topk_prob', False)), num_shared_experts=0,
                expert_d_ff=0, qk_norm='projection')

  def moe_mismatches(self, cfg: ModelConfig) -> list[str]:
    return _want(cfg, qkv_bias=False, moe_every=1, num_shared_experts=0, sliding_window=0,
                 head_dim=cfg.d_model // cfg.num_heads)

  def hf_config(self, cfg: ModelConfig) -> dict[str, Any]:
    out = {**super().hf_config(cfg), 'intermediate_size': moe_lib.expert_width(cfg), 'num_experts': cfg.num_experts,
           'norm_topk_prob': moe_lib.ROUTERS[cfg.router].renormalise, 'attention_bias': False, 'clip_qkv': None}
    out.pop('head_dim')  # OLMoE's head width is hidden_size / num_attention_heads
    return out

  def attention_extra(self, cfg: ModelConfig, hf: str, ours: str) -> list[Rule]:
    return [*norm(f'{hf}.q_norm', f'{ours}.q_norm', False), *norm(f'{hf}.k_norm', f'{ours}.k_norm', False)]


FAMILY_CLASSES = (GPT2, Bert, T5, Llama, Gemma, Gemma2, Mixtral, Qwen2Moe, Olmoe)
FAMILIES: dict[str, Family] = {t: cls() for cls in FAMILY_CLASSES for t in cls.model_types}


def for_model_type(model_type: str, where: str) -> Family:
  if model_type not in FAMILIES:
    raise ConfigError(f'{where}: model_type {model_type!r} is not supported; jaxformer reads '
                      f'{", ".join(FAMILIES)}.')
  return FAMILIES[model_type]


def for_model(cfg: ModelConfig) -> Family:
  """The family that can express `cfg`, or a ConfigError naming the settings that have no counterpart."""
  candidates = [(cls(), cls().feature_mismatches(cfg), cls().mismatches(cfg)) for cls in FAMILY_CLASSES
                if cls.arch == cfg.arch]
  # a family with the model's features (experts or not, its q/k norm) is closer than any without; then the fewest
  # other mismatches, the first family of the arch winning a tie
  family, features, others = min(candidates, key=lambda c: (bool(c[1]), len(c[1]) + len(c[2])))
  bad = features + others
  if bad:
    raise ConfigError(f'this model has no Hugging Face counterpart: the closest family, {family.model_types[0]}, '
                      f'needs {"; ".join(bad)}.')
  return family
