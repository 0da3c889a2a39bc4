"""Hugging Face checkpoints in and out (jaxformer.hf), against numbers transformers computed (tests/fixtures/hf).

No torch and no network here: the fixtures are tiny random checkpoints that tests/fixtures/hf/make_fixtures.py made
with transformers 5.24, with the logits, greedy generate output and tokenizer ids transformers gave for them.
That transformers loads what hf.save writes, with the same logits, was checked by hand with
tests/fixtures/hf/check_export.py (max |logits diff|: gpt_tiny-like decoder -> LlamaForCausalLM 6e-6, GPT-2-like ->
GPT2LMHeadModel 2e-6, untied Llama with biases 3e-6, and every fixture imported then re-saved: bert 4e-6, gpt2 3e-6,
llama 6e-6, qwen2 6e-6, t5 v1.0 2e-6, t5 v1.1 4e-5; transformers 5.25, sliding windows and Gemma: Mistral-like
window 3 -> MistralForCausalLM 4.7e-6, Qwen2-like with layers G, L -> Qwen2ForCausalLM 5.0e-6, Gemma-like 2.0e-5,
Gemma 2-like (sandwich norms, soft-caps, window LG) 5.4e-6; fixtures re-saved: mistral_window 8.6e-6,
qwen2_window 8.6e-6, gemma 1.5e-5, gemma2 7.1e-6).

"""
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs import default
from jaxformer import decoding, hf
from jaxformer.config import ConfigError, validate
from jaxformer.training import state as state_lib
from jaxformer.data import get_tokenizer
from jaxformer.data.hf_tokenizer import HFTokenizer
from jaxformer.hf import families, weights
from jaxformer.model import build_model, layout_convert

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = REPO / 'tests' / 'fixtures' / 'hf'
MODELS = ('gpt2', 'bert', 't5_v1_0', 't5_v1_1', 'llama', 'qwen2', 'mistral_window', 'qwen2_window', 'gemma', 'gemma2')
DECODERS = ('gpt2', 't5_v1_0', 't5_v1_1', 'llama', 'qwen2', 'mistral_window', 'qwen2_window', 'gemma', 'gemma2')
TOKENIZERS = ('gpt2', 'bert', 't5_v1_0', 'llama', 'qwen2')


def expected(name: str) -> dict:
  with open(FIXTURES / name / 'expected.json', encoding='utf-8') as f:
    return json.load(f)


_LOADED = {}


def load(name: str):
  if name not in _LOADED:
    _LOADED[name] = hf.load(str(FIXTURES / name))
  return _LOADED[name]


def tiny_section(**overrides) -> ml_collections.ConfigDict:
  """A gpt_tiny-like model section (RoPE, RMSNorm, SwiGLU, no biases, GQA), small."""
  section = default.get_config().model
  section.update(position='rope', norm='rms', mlp='swiglu', use_bias=False, num_layers=2, num_heads=4,
                 num_kv_heads=2, d_model=32, d_ff=48, vocab_size=53, max_len=32)
  section.update(overrides)
  return section


def random_model(section):
  """Every parameter random, norm scales and biases too (so a misplaced one changes the logits)."""
  model = build_model(section, rngs=nnx.Rngs(params=0, dropout=1))
  leaves, treedef = jax.tree_util.tree_flatten(nnx.state(model, nnx.Param))
  keys = jax.random.split(jax.random.key(1), len(leaves))
  nnx.update(model, jax.tree_util.tree_unflatten(
      treedef, [0.3 * jax.random.normal(k, x.shape, x.dtype) + (x.ndim == 1) for k, x in zip(keys, leaves)]))
  return model


def logits_of(model, section, e: dict) -> np.ndarray:
  ids = jnp.asarray(e['input_ids'])
  if section.arch == 'encoder_decoder':
    return np.asarray(model(ids, jnp.asarray(e['decoder_input_ids'])))
  return np.asarray(model(ids))


# ------------------------------------------------------------------------------------------ import: logits
@pytest.mark.parametrize('name', MODELS)
def test_imported_logits_equal_transformers(name):
  """The default call (token id 0 included: a real token for GPT-2 / Llama, T5's decoder start) gives
  transformers' logits; BERT / T5 source padding (attention_mask 0) is compared where transformers attends."""
  section, model = load(name)
  e = expected(name)
  want = np.asarray(e['logits'], np.float32)
  got = logits_of(model, section, e)
  assert got.shape[:2] == want.shape[:2]
  got = got[..., :want.shape[-1]]
  if section.arch == 'encoder_only':
    real = np.asarray(e['attention_mask'], bool)
    got, want = got[real], want[real]
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)


def test_sharded_and_bfloat16_checkpoints_are_read():
  """llama is saved in 5 shards (model.safetensors.index.json), qwen2 in bfloat16; the reader agrees with the
  safetensors library where that can read the file (it has no numpy bfloat16)."""
  safetensors_numpy = pytest.importorskip('safetensors.numpy')  # a test dependency (pyproject [test])
  tensors = weights.read_dir(str(FIXTURES / 'llama'))
  with open(FIXTURES / 'llama' / weights.INDEX_NAME) as f:
    assert set(tensors) == set(json.load(f)['weight_map'])
  reference = {}
  for shard in sorted(FIXTURES.glob('llama/model-*.safetensors')):
    reference.update(safetensors_numpy.load_file(str(shard)))
  assert all(np.array_equal(tensors[k], reference[k]) for k in reference)
  bf16 = weights.read_dir(str(FIXTURES / 'qwen2'))
  assert {str(v.dtype) for v in bf16.values()} == {'bfloat16'}


# ---------------------------------------------------------------------------------------- import: decoding
@pytest.mark.parametrize('name', DECODERS)
def test_greedy_decoding_equals_transformers_generate(name):
  """t5_v1_1 generates its pad id 0 mid-sequence; transformers keeps it as a real decoder token, and so must we."""
  section, model = load(name)
  e = expected(name)['generate']
  prompt, output = np.asarray(e['prompt']), np.asarray(e['output'])
  eos = hf.read_config(str(FIXTURES / name))['eos_token_id']
  if section.arch == 'encoder_decoder':  # generate's output starts with decoder_start_token_id
    new = output[:, 1:]
    got = decoding.greedy(model, output[:, :1], src_tokens=prompt, max_new_tokens=new.shape[1], eos_id=eos)
  else:
    new = output[:, prompt.shape[1]:]
    got = decoding.greedy(model, prompt, max_new_tokens=new.shape[1], eos_id=eos)
  np.testing.assert_array_equal(np.asarray(got), new)


# ------------------------------------------------------------------------------------------------ tokenizer
@pytest.mark.parametrize('name', TOKENIZERS)
def test_hf_tokenizer_gives_transformers_ids(name, tmp_path):
  config = default.get_config()
  config.data.tokenizer = f'hf:{FIXTURES / name}'
  validate(config)
  tok = get_tokenizer(config, str(tmp_path))
  assert isinstance(tok, HFTokenizer)
  for case in expected(name)['tokenizer']:
    assert tok.encode_with_specials(case['text']) == case['ids'], case['text']
    assert tok.prefix_ids + tok.encode(case['text']) + tok.suffix_ids == case['ids']
    assert tok.decode(case['ids']) == case['decoded']


def test_hf_tokenizer_special_ids():
  """The tokenizer's own ids, not jaxformer's 0-4 (-1 where a token does not exist)."""
  gpt2, bert, t5, llama = (HFTokenizer(str(FIXTURES / n)) for n in ('gpt2', 'bert', 't5_v1_0', 'llama'))
  assert (gpt2.bos_id, gpt2.eos_id, gpt2.pad_id, gpt2.prefix_ids, gpt2.suffix_ids) == (300, 300, -1, [], [])
  assert (bert.bos_id, bert.eos_id, bert.pad_id, bert.mask_id) == (2, 3, 0, 4)  # [CLS], [SEP], [PAD], [MASK]
  assert (t5.bos_id, t5.eos_id, t5.pad_id, t5.suffix_ids, t5.vocab_size) == (-1, 1, 0, [1], 158)
  assert (llama.bos_id, llama.eos_id, llama.prefix_ids, llama.suffix_ids) == (1, 2, [1], [])


def test_tokenizer_config_add_eos_token_rebuilds_the_post_processor(tmp_path):
  """An explicit add_bos_token / add_eos_token in tokenizer_config.json rebuilds the post-processor, as transformers'
  update_post_processor does (transformers 4's LlamaTokenizerFast, 5's generic backend). transformers 5.24's
  LlamaTokenizer class was seen to keep <s> and add no </s> here instead: not emulated."""
  for f in ('tokenizer.json', 'tokenizer_config.json'):
    (tmp_path / f).write_bytes((FIXTURES / 'llama' / f).read_bytes())
  config = json.loads((tmp_path / 'tokenizer_config.json').read_text())
  (tmp_path / 'tokenizer_config.json').write_text(json.dumps({**config, 'add_bos_token': False,
                                                              'add_eos_token': True}))
  tok = HFTokenizer(str(tmp_path))
  assert (tok.prefix_ids, tok.suffix_ids) == ([], [2])


# ------------------------------------------------------------------------------------------------- export
def test_gpt_tiny_like_model_exports_as_llama(tmp_path):
  section = tiny_section()
  model = random_model(section)
  assert hf.save(model, section, str(tmp_path)) == 'llama'
  config = json.loads((tmp_path / 'config.json').read_text())
  assert config['architectures'] == ['LlamaForCausalLM']
  assert {k: config[k] for k in ('hidden_size', 'intermediate_size', 'num_hidden_layers', 'num_attention_heads',
                                 'num_key_value_heads', 'head_dim', 'tie_word_embeddings', 'attention_bias')} == {
      'hidden_size': 32, 'intermediate_size': 48, 'num_hidden_layers': 2, 'num_attention_heads': 4,
      'num_key_value_heads': 2, 'head_dim': 8, 'tie_word_embeddings': True, 'attention_bias': False}
  shapes = {k: tuple(v.shape) for k, v in weights.read_dir(str(tmp_path)).items()}
  want = {'model.embed_tokens.weight': (53, 32), 'model.norm.weight': (32,)}
  for i in range(2):
    p = f'model.layers.{i}.'
    want.update({p + 'self_attn.q_proj.weight': (32, 32), p + 'self_attn.k_proj.weight': (16, 32),
                 p + 'self_attn.v_proj.weight': (16, 32), p + 'self_attn.o_proj.weight': (32, 32),
                 p + 'mlp.gate_proj.weight': (48, 32), p + 'mlp.up_proj.weight': (48, 32),
                 p + 'mlp.down_proj.weight': (32, 48), p + 'input_layernorm.weight': (32,),
                 p + 'post_attention_layernorm.weight': (32,)})
  assert shapes == want
  # q_proj row h * head_dim + j is head h, dimension j of our query kernel [D, N, H].
  q = weights.read_dir(str(tmp_path))['model.layers.0.self_attn.q_proj.weight']
  ours = layout_convert.to_flat_layout(hf.model_params(model), scanned=False)['decoder.blocks.0.attn.query']
  np.testing.assert_array_equal(q[1 * 8 + 3], ours[:, 1, 3])


@pytest.mark.parametrize('overrides', [
    {},  # Llama (tied)
    {'tie_embeddings': False, 'use_bias': True},  # Llama with biases and an lm_head
    {'position': 'learned', 'norm': 'layer', 'mlp': 'gelu', 'use_bias': True, 'num_kv_heads': -1},  # GPT-2
])
def test_save_then_load_is_identity(overrides, tmp_path):
  section = tiny_section(**overrides)
  model = random_model(section)
  hf.save(model, section, str(tmp_path))
  _, loaded = hf.load(str(tmp_path), section)
  before, after = hf.model_params(model), hf.model_params(loaded)
  assert before.keys() == after.keys()
  assert all(np.array_equal(before[k], after[k]) for k in before)
  ids = jnp.asarray(np.random.default_rng(0).integers(1, 53, size=(2, 9)))
  np.testing.assert_array_equal(np.asarray(loaded(ids)), np.asarray(model(ids)))
  loaded_section = hf.model_section(str(tmp_path))  # config.json reads back as the same model
  for key in ('arch', 'position', 'norm', 'mlp', 'd_model', 'd_ff', 'num_heads', 'num_kv_heads', 'num_layers',
              'vocab_size', 'max_len', 'use_bias', 'tie_embeddings', 'norm_eps', 'rope_base'):
    assert loaded_section[key] == section[key], key


@pytest.mark.parametrize('name', MODELS)
def test_imported_fixture_saves_back_unchanged(name, tmp_path):
  section, model = load(name)
  assert hf.save(model, section, str(tmp_path)) == hf.read_config(str(FIXTURES / name))['model_type']
  original, saved = weights.read_dir(str(FIXTURES / name)), weights.read_dir(str(tmp_path))
  for key, value in saved.items():  # every tensor written is the original's (tied copies are not written)
    np.testing.assert_array_equal(value, np.asarray(original[key], np.float32), err_msg=key)


@pytest.mark.parametrize('overrides,setting', [
    ({'position': 'sinusoidal'}, 'model.position'),
    ({'arch': 'encoder_only', 'norm_position': 'pre', 'position': 'learned', 'norm': 'layer', 'mlp': 'gelu',
      'use_bias': True, 'num_kv_heads': -1}, 'model.norm_position'),
])
def test_no_counterpart_is_one_line_naming_the_setting(overrides, setting):
  section = tiny_section(**overrides)
  with pytest.raises(ConfigError, match=setting) as e:
    hf.save(random_model(section), section, '/nonexistent-never-written')
  assert '\n' not in str(e.value)


# ------------------------------------------------------------------------------------------------- errors
# CLI subprocesses run on one CPU device (not conftest's 8 virtual ones): a tiny model compiles faster there.
ONE_DEVICE = {**os.environ, 'XLA_FLAGS': os.environ.get('XLA_FLAGS', '').replace(
    '--xla_force_host_platform_device_count=8', '').strip()}

def _hf_dir(tmp_path, model_type='llama', with_weights=True) -> pathlib.Path:
  section = tiny_section()
  hf.save(random_model(section), section, str(tmp_path))
  if model_type != 'llama':
    config = json.loads((tmp_path / 'config.json').read_text())
    (tmp_path / 'config.json').write_text(json.dumps({**config, 'model_type': model_type}))
  if not with_weights:
    (tmp_path / 'model.safetensors').unlink()
  return tmp_path


@pytest.mark.parametrize('case,message', [
    ('missing', 'no such directory'),
    ('no_config', 'has no config.json'),
    ('no_weights', 'has no model.safetensors'),
    ('unsupported', "model_type 'gpt_neox' is not supported; jaxformer reads gpt2, bert, t5, llama, mistral, qwen2"),
    ('shape', 'model.safetensors|has shape'),
])
def test_load_errors_are_one_line(case, message, tmp_path):
  directory, override = tmp_path / 'ckpt', None
  if case == 'no_config':
    directory.mkdir()
  elif case == 'no_weights':
    _hf_dir(directory, with_weights=False)
    override = tiny_section()
  elif case == 'unsupported':
    _hf_dir(directory, 'gpt_neox')
  elif case == 'shape':
    _hf_dir(directory)
    override = tiny_section(d_ff=64)
  with pytest.raises(ConfigError, match=message) as e:
    hf.load(str(directory), override)
  assert '\n' not in str(e.value)


@pytest.mark.parametrize('case,message', [
    ('missing', 'no such directory'),
    ('no_config', 'has no config.json'),
    ('unsupported', "model_type 'gpt_neox' is not supported"),
])
def test_train_py_with_a_bad_hf_directory_is_one_line(case, message, tmp_path):
  directory = tmp_path / 'ckpt'
  if case == 'no_config':
    directory.mkdir()
  elif case == 'unsupported':
    _hf_dir(directory, 'gpt_neox')
  out = subprocess.run([sys.executable, 'train.py', f'--config=configs/hf.py:{directory}',
                        f'--workdir={tmp_path / "run"}'], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env=ONE_DEVICE)
  lines = [line for line in out.stderr.splitlines() if line.strip()]
  assert out.returncode != 0 and len(lines) == 1, out.stderr
  assert message in lines[0]


def _train_py_error(directory, workdir, *overrides) -> str:
  quick = ['--config.train.num_steps=1', '--config.train.eval_every=1', '--config.train.eval_steps=1',
           '--config.data.seq_len=16']  # should it train after all (the test then fails), only briefly
  out = subprocess.run([sys.executable, 'train.py', f'--config=configs/hf.py:{directory}', f'--workdir={workdir}',
                        *quick, *overrides], cwd=REPO, capture_output=True, text=True, timeout=300, env=ONE_DEVICE)
  lines = [line for line in out.stderr.splitlines() if line.strip()]
  assert out.returncode != 0 and len(lines) == 1, out.stderr[-3000:]
  return lines[0]


def test_train_py_tokenizer_larger_than_the_model_is_one_line(tmp_path):
  line = _train_py_error(FIXTURES / 't5_v1_0', tmp_path, f'--config.data.tokenizer=hf:{FIXTURES / "gpt2"}')
  assert 'model.vocab_size=160' in line and '301' in line


@pytest.mark.parametrize('case,message', [('no_weights', 'has no model.safetensors'), ('shape', 'has shape')])
def test_train_py_unusable_weights_are_one_line(case, message, tmp_path):
  directory = tmp_path / 'ckpt'
  for f in os.listdir(FIXTURES / 'llama'):
    if case != 'no_weights' or 'safetensors' not in f:
      (directory / f).parent.mkdir(exist_ok=True)
      (directory / f).write_bytes((FIXTURES / 'llama' / f).read_bytes())
  overrides = ['--config.model.d_ff=128'] if case == 'shape' else []
  assert message in _train_py_error(directory, tmp_path / 'run', *overrides)


# ---------------------------------------------------------------------------------- recipe and init_from
def test_hf_recipe_builds_the_whole_config(tmp_path):
  sys.path.insert(0, str(REPO))
  from configs import hf as hf_recipe  # pylint: disable=g-import-not-at-top  (configs/hf.py, not jaxformer.hf)
  directory = _hf_dir(tmp_path / 'ckpt')
  config = hf_recipe.get_config(str(directory))
  validate(config)
  assert config.data.tokenizer == config.checkpoint.init_from == f'hf:{directory}'
  assert config.model.to_dict() == hf.model_section(str(directory)).to_dict()
  assert config.data.seq_len <= config.model.max_len and config.train.learning_rate <= 1e-4


@pytest.mark.parametrize('name,eos,start', [('gpt2', 300, 300), ('t5_v1_1', 1, 0), ('llama', 2, 1)])
def test_hf_recipe_decodes_with_the_checkpoints_ids(name, eos, start):
  from configs import hf as hf_recipe  # pylint: disable=g-import-not-at-top  (configs/hf.py, not jaxformer.hf)
  config = hf_recipe.get_config(str(FIXTURES / name))
  validate(config)
  assert (config.decode.eos_id, config.decode.start_id) == (eos, start)


def test_init_from_takes_only_the_parameters(tmp_path):
  from jaxformer import sharding as shd  # pylint: disable=g-import-not-at-top
  from jaxformer.training import optimizer, step as step_lib  # pylint: disable=g-import-not-at-top
  section = tiny_section()
  pretrained = random_model(section)
  hf.save(pretrained, section, str(tmp_path / 'ckpt'))
  config = default.get_config()
  config.model = section
  config.checkpoint.init_from = f'hf:{tmp_path / "ckpt"}'
  config.mesh.update(data=2, fsdp=2, tensor=2)
  mesh = shd.make_mesh(config)
  tx, schedule = optimizer.make_optimizer(config.train)
  setup = state_lib.make_setup(config, mesh, tx, schedule)
  state = state_lib.initial_state(config, setup)  # a fresh start reads checkpoint.init_from's parameters
  got = {hf._path(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(state['params'])[0]}
  want = hf.model_params(pretrained)
  assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
  assert int(state['step']) == 0
  rebuilt = jax.tree.leaves(setup.tx.init(state['params']))  # the optimizer starts fresh, for these params
  assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(jax.tree.leaves(state['opt_state']), rebuilt))
  for a, s in zip(jax.tree.leaves(state['params']), jax.tree.leaves(setup.state_shardings['params'])):
    assert a.sharding == s


def test_init_from_with_contradicting_override_is_one_line(tmp_path):
  from jaxformer import sharding as shd  # pylint: disable=g-import-not-at-top
  from jaxformer.training import state as state_lib  # pylint: disable=g-import-not-at-top
  section = tiny_section()
  hf.save(random_model(section), section, str(tmp_path / 'ckpt'))
  config = default.get_config()
  config.model = tiny_section(num_kv_heads=4)
  config.checkpoint.init_from = f'hf:{tmp_path / "ckpt"}'
  with pytest.raises(ConfigError, match=r'checkpoint.init_from=hf:.*k_proj.weight has shape \(16, 32\)') as e:
    state_lib.init_from_model(config, shd.make_mesh(config))
  assert '\n' not in str(e.value)


# ------------------------------------------------------------------------------------ the CLI, end to end
def _train(workdir, config, *args) -> None:
  out = subprocess.run([sys.executable, 'train.py', f'--config={config}', f'--workdir={workdir}',
                        '--config.train.num_steps=2',
                        '--config.train.log_every=1', '--config.train.eval_every=2', '--config.train.eval_steps=1',
                        '--config.checkpoint.every_steps=2', '--config.checkpoint.async_save=False',
                        '--config.train.batch_size=4', '--config.data.seq_len=16', *args],
                       cwd=REPO, capture_output=True, text=True, timeout=600, env=ONE_DEVICE)
  assert out.returncode == 0, out.stderr[-3000:]


def _export(workdir, output) -> str:
  out = subprocess.run([sys.executable, '-m', 'jaxformer.hf', 'export', f'--workdir={workdir}', f'--output={output}'],
                       cwd=REPO, capture_output=True, text=True, timeout=600, env=ONE_DEVICE)
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout


def test_export_cli_writes_the_newest_checkpoint(tmp_path):
  from jaxformer import sharding as shd  # pylint: disable=g-import-not-at-top
  from jaxformer.training import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  run, out = tmp_path / 'run', tmp_path / 'hf'
  _train(run, 'configs/gpt_tiny.py', '--config.model.d_model=32', '--config.model.d_ff=48')
  assert 'wrote llama checkpoint' in _export(run, out)
  config = ml_collections.ConfigDict(ckpt_lib.saved_config(str(run)))
  model, step = state_lib.restore_model(str(run), config, shd.make_mesh(config))
  assert step == 2
  exported = hf.load_params(str(out), config.model)
  trained = hf.model_params(model)
  assert exported.keys() == trained.keys() and all(np.array_equal(exported[k], trained[k]) for k in trained)
  hf_config = json.loads((out / 'config.json').read_text())
  assert (hf_config['bos_token_id'], hf_config['eos_token_id'], hf_config['pad_token_id']) == (1, 2, 0)


def test_fine_tune_from_hf_then_export_round_trips(tmp_path, shared_data):
  """train.py --config=configs/hf.py:DIR starts from DIR's weights (a learning rate of 1e-30 moves
  no float32 weight of the fixture, all non-zero; 0 itself is refused at start-up), and the export gives back DIR's
  tensors and tokenizer."""
  fixture = FIXTURES / 'llama'
  run, out = tmp_path / 'run', tmp_path / 'hf'
  _train(run, f'configs/hf.py:{fixture}', '--config.train.learning_rate=1e-30',
         f'--config.data.source=text:{shared_data / "tinyshakespeare" / "input.txt"}')
  _export(run, out)
  original, exported = weights.read_dir(str(fixture)), weights.read_dir(str(out))
  assert exported.keys() == original.keys()
  assert all(np.array_equal(exported[k], original[k]) for k in original)
  assert (out / 'tokenizer.json').read_bytes() == (fixture / 'tokenizer.json').read_bytes()
  hf_config = json.loads((out / 'config.json').read_text())
  assert (hf_config['bos_token_id'], hf_config['eos_token_id']) == (1, 2)
