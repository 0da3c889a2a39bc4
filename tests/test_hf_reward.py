"""model.head=reward in and out of Hugging Face checkpoints (jaxformer.hf): *ForSequenceClassification with
num_labels=1 for GPT-2, Llama, Qwen2 (`score`, no bias, read at the last token that is not pad_token_id) and BERT
(pooler + classifier with bias, read at [CLS]).

No torch here: the fixtures tests/fixtures/hf/{gpt2,llama,qwen2,bert}_reward are tiny random checkpoints that
tests/fixtures/hf/make_fixtures.py made with transformers 5.25.0, with the rewards (logits[:, 0]) transformers gave
for one right-padded batch of rows of lengths 7, 3, 5 and 1 (expected.json; jaxformer's agree within 2e-6).

That transformers loads what jaxformer writes, with the same rewards, was checked by hand with
tests/fixtures/hf/check_export.py (make, runs, then check with torch 2.13.0+cpu / transformers 5.25.0), max
|reward diff| on a right-padded batch: hf.save of fresh reward models -> LlamaForSequenceClassification 2.4e-6,
Qwen2ForSequenceClassification 4.1e-6, GPT2ForSequenceClassification 1.2e-6, BertForSequenceClassification 7e-7;
the four fixtures imported and re-saved 0.8e-6 to 2.2e-6; and `python -m jaxformer.hf export` of 2-step reward
runs (train.py on preference pairs): from gpt2_reward (GPT-2 tokenizer without pad: pad_token_id = eos 300) 9.5e-7,
from bert_reward 3.9e-7, from the llama LM fixture with a fresh reward layer (pad_token_id = eos 2) 1.0e-7, and
gpt_tiny with the char tokenizer (pad 0) 4.5e-8.
"""
import json
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs import default
from jaxformer import hf
from jaxformer.apps import export
from jaxformer.config import ConfigError
from jaxformer.data.hf_tokenizer import HFTokenizer
from jaxformer.hf import weights
from jaxformer.model import build_model

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = REPO / 'tests' / 'fixtures' / 'hf'
# fixture -> (transformers class, model.pooling, model.pooler)
REWARD_FIXTURES = {
    'gpt2_reward': ('GPT2ForSequenceClassification', 'last', False),
    'llama_reward': ('LlamaForSequenceClassification', 'last', False),
    'qwen2_reward': ('Qwen2ForSequenceClassification', 'last', False),
    'bert_reward': ('BertForSequenceClassification', 'first', True),
}


def expected(name: str) -> dict:
  with open(FIXTURES / name / 'expected.json', encoding='utf-8') as f:
    return json.load(f)


_LOADED = {}


def load(name: str):
  """(model section, model) of a fixture: hf.model_section + hf.load_params, the import path of hf.load and
  checkpoint.init_from=hf:, with the model built by model_with."""
  if name not in _LOADED:
    directory = str(FIXTURES / name)
    section = hf.model_section(directory)
    _LOADED[name] = section, model_with(section, hf.load_params(directory, section))
  return _LOADED[name]


def model_with(section, params: dict[str, np.ndarray] | None = None):
  """A model of `section` holding `params` (every parameter; None: random ones, norm scales and biases too, so a
  misplaced one changes the rewards). Built from its abstract shape: what hf.load does less its jitted fresh
  initialisation, whose compilation would take most of this file's time on CPU; dropout's RNG state is unused."""
  abstract = nnx.eval_shape(lambda: build_model(section, rngs=nnx.Rngs(params=0, dropout=1)))
  graphdef, abstract_params, rest = nnx.split(abstract, nnx.Param, ...)
  if params is None:
    rng = np.random.default_rng(1)
    params = {hf._path(p): 0.3 * rng.standard_normal(x.shape).astype(np.float32) + (len(x.shape) == 1)
              for p, x in jax.tree_util.tree_flatten_with_path(abstract_params)[0]}
  key = jax.random.key_data(jax.random.key(0))
  rest = jax.tree.map(lambda x: (jax.random.wrap_key_data(jnp.broadcast_to(key, x.shape + key.shape))
                                 if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else
                                 jnp.zeros(x.shape, x.dtype)), rest)  # [layers] under model.scan_layers
  return nnx.merge(graphdef, hf.with_params(abstract_params, params), rest)


def rewards_of(model, ids, mask) -> np.ndarray:
  """Rewards [B] of right-padded rows: the attention mask is the segment ids (0 = padding), as in reward rows."""
  return np.asarray(model(jnp.asarray(ids), segment_ids=jnp.asarray(mask, jnp.int32)))


def reward_section(**overrides) -> ml_collections.ConfigDict:
  section = default.get_config().model
  section.update(head='reward', position='rope', norm='rms', mlp='swiglu', use_bias=False, num_layers=2, num_heads=4,
                 num_kv_heads=2, d_model=32, d_ff=48, vocab_size=53, max_len=32)
  section.update(overrides)
  return section


# model sections of tiny reward models each family writes (the name is the class written)
GPT2_LIKE = dict(position='learned', norm='layer', mlp='gelu', use_bias=True, num_kv_heads=-1)
BERT_LIKE = dict(arch='encoder_only', position='learned', norm='layer', norm_position='post', mlp='gelu_exact',
                 use_bias=True, num_kv_heads=-1, embed_norm=True, type_vocab_size=2, pooler=True, pad_id=0)
FRESH = {
    'LlamaForSequenceClassification': {},  # gpt_tiny's decoder
    'Qwen2ForSequenceClassification': dict(qkv_bias=True, tie_embeddings=False),
    'GPT2ForSequenceClassification': GPT2_LIKE,
    'BertForSequenceClassification': BERT_LIKE,
}


def padded_batch(vocab_size: int, lengths=(9, 4, 6, 1)) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(0)
  ids = np.zeros((len(lengths), max(lengths)), np.int32)
  mask = np.zeros_like(ids)
  for i, n in enumerate(lengths):
    ids[i, :n], mask[i, :n] = rng.integers(1, vocab_size, size=n), 1
  return ids, mask


# ----------------------------------------------------------------------------------------------------- import
@pytest.mark.parametrize('name', REWARD_FIXTURES)
def test_imported_rewards_equal_transformers(name):
  """The last real token of each right-padded row (decoders) or [CLS] (BERT) gives transformers' reward; GPT-2's
  rows hold token id 0 as a real token, and a one-token row is read at its only token."""
  _, pooling, pooler = REWARD_FIXTURES[name]
  section, model = load(name)
  assert (section.head, section.pooling, section.pooler) == ('reward', pooling, pooler)
  e = expected(name)
  got = rewards_of(model, e['input_ids'], e['attention_mask'])
  np.testing.assert_allclose(got, np.asarray(e['rewards'], np.float32), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('name', REWARD_FIXTURES)
def test_init_from_hf_reward_checkpoint_is_a_reward_model(name):
  """configs/hf.py:DIR (model section from config.json, checkpoint.init_from=hf:DIR) of a reward checkpoint is a
  model.head=reward run whose every parameter, the reward layer included, is the checkpoint's."""
  from configs import hf as hf_recipe  # pylint: disable=g-import-not-at-top  (configs/hf.py, not jaxformer.hf)
  from jaxformer.training import state as state_lib  # pylint: disable=g-import-not-at-top
  directory = FIXTURES / name
  config = hf_recipe.get_config(str(directory))
  assert (config.model.head, config.checkpoint.init_from) == ('reward', f'hf:{directory}')
  abstract = nnx.state(nnx.eval_shape(lambda: state_lib.build_model(config)), nnx.Param)
  got = {hf._path(p): np.asarray(x) for p, x in
         jax.tree_util.tree_flatten_with_path(state_lib.init_from_params(config, abstract))[0]}
  want = hf.model_params(load(name)[1])
  assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
  assert any(k.startswith('classifier.') for k in got)


@pytest.mark.parametrize('name', ['gpt2', 'llama', 'qwen2', 'bert'])
def test_a_language_model_checkpoint_starts_a_fresh_reward_layer(name):
  """--config.model.head=reward on an LM checkpoint: every backbone parameter comes from it, the reward layer (and
  BERT's pooler) is left out, to start freshly initialised; the LM output layer is not read."""
  directory = str(FIXTURES / name)
  section = hf.model_section(directory)
  lm = hf.load_params(directory, section)
  section.update(head='reward', pooler=name == 'bert')
  params = hf.load_params(directory, section)
  assert not any(k.startswith('classifier.') for k in params)
  assert not any(k.startswith(('unembed.', 'head.', 'output_bias')) for k in params)
  assert all(np.array_equal(params[k], lm[k]) for k in params)


# ----------------------------------------------------------------------------------------------------- export
@pytest.mark.parametrize('architecture', FRESH)
def test_export_then_reload_gives_identical_rewards(architecture, tmp_path):
  section = reward_section(**FRESH[architecture])
  model = model_with(section)
  hf.save(model, section, str(tmp_path))
  config = json.loads((tmp_path / 'config.json').read_text())
  assert config['architectures'] == [architecture]
  assert (config['id2label'], config['label2id'], config['problem_type']) == (
      {'0': 'LABEL_0'}, {'LABEL_0': 0}, 'regression')  # num_labels=1
  assert config['pad_token_id'] == 0  # jaxformer's own tokenizers pad with 0
  tensors = weights.read_dir(str(tmp_path))
  if architecture == 'BertForSequenceClassification':
    assert tensors['classifier.weight'].shape == (1, 32) and tensors['classifier.bias'].shape == (1,)
    assert tensors['bert.pooler.dense.weight'].shape == (32, 32)
  else:
    assert tensors['score.weight'].shape == (1, 32) and not any(k.startswith(('score.bias', 'lm_head')) for k in tensors)
  loaded_section = hf.model_section(str(tmp_path))  # config.json reads back as this reward model
  for key in ('arch', 'head', 'pooling', 'pooler', 'd_model', 'num_layers', 'tie_embeddings', 'qkv_bias'):
    assert loaded_section[key] == section[key] or (key == 'pooling' and not section.pooling), key
  params = hf.load_params(str(tmp_path), loaded_section)
  before = hf.model_params(model)
  assert before.keys() == params.keys() and all(np.array_equal(before[k], params[k]) for k in before)
  loaded = model_with(loaded_section, params)
  ids, mask = padded_batch(section.vocab_size)
  np.testing.assert_array_equal(rewards_of(loaded, ids, mask), rewards_of(model, ids, mask))


@pytest.mark.parametrize('name', REWARD_FIXTURES)
def test_imported_reward_fixture_saves_back_unchanged(name, tmp_path):
  section, model = load(name)
  hf.save(model, section, str(tmp_path))
  config = json.loads((tmp_path / 'config.json').read_text())
  assert config['architectures'] == [REWARD_FIXTURES[name][0]]
  original, saved = weights.read_dir(str(FIXTURES / name)), weights.read_dir(str(tmp_path))
  assert saved.keys() == {k for k in original if 'position_ids' not in k}
  for key, value in saved.items():
    np.testing.assert_array_equal(value, np.asarray(original[key], np.float32), err_msg=key)


@pytest.mark.parametrize('name,pad,eos,own_pad', [
    ('gpt2_reward', 300, 300, False),  # GPT-2's tokenizer has no pad token: its eos
    ('llama_reward', 2, 2, False),  # nor has Llama's
    ('qwen2_reward', 300, 300, True),  # Qwen2's pad token is its eos
    ('bert_reward', 0, 3, True),  # [PAD] (eos = [SEP])
])
def test_export_pad_token_id_is_the_tokenizers_pad_else_its_eos(name, pad, eos, own_pad, capsys):
  """A decoder's reward export needs pad_token_id: the tokenizer's pad id, else its eos id; when that is the eos
  id a note says that transformers then reads rows ending in that EOS one token early."""
  tokenizer = HFTokenizer(str(FIXTURES / name))
  ids = export.token_ids(tokenizer, 'decoder_only', needs_pad=True)
  assert (ids['pad_token_id'], ids['eos_token_id']) == (pad, eos)
  assert ('one token early' in capsys.readouterr().out) == (pad == eos)
  assert ('pad_token_id' in export.token_ids(tokenizer, 'decoder_only')) == own_pad  # other classes: as it is


def test_needs_pad_token_and_save_without_one_is_one_line(tmp_path):
  decoder, bert = reward_section(), reward_section(**BERT_LIKE)
  assert hf.needs_pad_token(decoder) and not hf.needs_pad_token(bert)
  assert not hf.needs_pad_token(reward_section(head='lm'))
  with pytest.raises(ConfigError, match='LlamaForSequenceClassification needs pad_token_id') as e:
    hf.save(model_with(decoder), decoder, str(tmp_path), token_ids={'bos_token_id': 1, 'eos_token_id': 2})
  assert '\n' not in str(e.value)


@pytest.mark.parametrize('overrides,message', [
    ({'pooler': True}, "model.pooler=True (needs False)"),
    ({'pooling': 'mean'}, "model.pooling='mean' (needs 'last')"),
    ({**GPT2_LIKE, 'pooling': 'first'}, "model.pooling='first' (needs 'last')"),
    ({**BERT_LIKE, 'pooler': False}, 'model.pooler=False (needs True)'),
    ({**BERT_LIKE, 'pooling': 'mean'}, "model.pooling='mean' (needs 'first')"),
    ({'head': 'classification', 'num_classes': 3},
         "model.head='classification' (needs 'lm' or 'reward' or 'token_classification')"),
])
def test_what_a_family_cannot_express_is_one_line(overrides, message):
  section = reward_section(**overrides)
  with pytest.raises(ConfigError, match=message.replace('(', r'\(').replace(')', r'\)')) as e:
    hf.save(model_with(section), section, '/nonexistent-never-written')
  assert '\n' not in str(e.value)


@pytest.mark.parametrize('name,change,message', [
    ('gpt2_reward', {'id2label': {'0': 'a', '1': 'b', '2': 'c'}},
     r'GPT2ForSequenceClassification with 3 label\(s\).*jaxformer reads num_labels=1 as model.head=reward'),
    ('llama_reward', {'problem_type': 'multi_label_classification'}, 'LlamaForSequenceClassification with 1 label'),
    ('bert_reward', {'problem_type': 'multi_label_classification'},
     'num_labels >= 2 .* as model.head=classification; num_labels=1 as model.head=reward'),
])
def test_sequence_classifiers_jaxformer_cannot_read_are_one_line(name, change, message, tmp_path):
  config = {**json.loads((FIXTURES / name / 'config.json').read_text()), **change}
  (tmp_path / 'config.json').write_text(json.dumps(config))
  with pytest.raises(ConfigError, match=message) as e:
    hf.model_section(str(tmp_path))
  assert '\n' not in str(e.value)
