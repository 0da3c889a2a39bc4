"""PEFT methods (jaxformer/peft): step 0 is the base model, only what trains changes, no optimizer state for frozen
parameters, merged LoRA weights equal base + update, trainable counts equal their formulas, LoRA on a mesh."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxformer import peft
from jaxformer import sharding as shd
from jaxformer.config import ConfigError, validate
from jaxformer.model import layers, layout_convert
from jaxformer.peft import lora
from jaxformer.training import step
from jaxformer.training import state as state_lib
from tests.test_sharding import lm_batch, setup_for, small_config


def peft_config(method='lora', *, arch='decoder_only', **peft_values):
  config = small_config()
  config.model.update(num_kv_heads=2, use_bias=True)  # GQA, and biases for bitfit
  if arch != 'decoder_only':
    config.model.arch = arch
  config.peft.method = method
  config.peft.update(**peft_values)
  return config


def model_of(config, params=None):
  model = state_lib.build_model(config)
  if params is not None:
    graphdef, _, rest = step.split_model(model)
    model = nnx.merge(graphdef, params, rest)
  return model


def logits_of(model, arch, seed=0):
  rng = np.random.default_rng(seed)
  tokens = jnp.asarray(rng.integers(1, 65, size=(2, 12)), jnp.int32)
  tokens = tokens.at[1, -3:].set(0)  # padding
  if arch == 'encoder_decoder':
    return model(tokens, tokens[:, ::-1])
  return model(tokens)


def flat(state):
  return {'/'.join(map(str, path)): np.asarray(v.get_value()) for path, v in nnx.to_flat_state(state)}


def base_part(config):
  """The base config a PEFT config adapts (same seed: the same base parameters)."""
  base = config.copy_and_resolve_references()
  base.peft.method = 'none'
  return base


@pytest.mark.parametrize('arch', ['decoder_only', 'encoder_only', 'encoder_decoder'])
@pytest.mark.parametrize('method,extra', [('lora', dict(targets='all')), ('adapter', {}),
                                          ('lora', dict(targets='q,v', dropout=0.1))])
def test_step0_equals_base_exactly(arch, method, extra):
  config = peft_config(method, arch=arch, **extra)
  base = base_part(config)
  np.testing.assert_array_equal(np.asarray(logits_of(model_of(config), arch)),
                                np.asarray(logits_of(model_of(base), arch)))
  base_params = flat(nnx.state(model_of(base), nnx.Param))
  adapted = flat(peft.base_params(nnx.state(model_of(config), nnx.Param)))
  assert adapted.keys() == base_params.keys()


def test_lora_bf16_step0_equals_base():
  config = peft_config('lora', targets='all')
  config.model.dtype = 'bfloat16'
  np.testing.assert_array_equal(np.asarray(logits_of(model_of(config), 'decoder_only')),
                                np.asarray(logits_of(model_of(base_part(config)), 'decoder_only')))


def one_step(config, n=1):
  setup, state = setup_for(config)
  before = flat(state['params'])
  train_step = step.make_train_step(config, setup)
  for i in range(n):
    state, _ = train_step(state, shd.shard_batch(lm_batch(seed=i), setup.mesh, setup.rules))
  return setup, state, before


@pytest.mark.parametrize('method,extra', [('lora', dict(targets='attention')), ('bitfit', {}),
                                          ('adapter', dict(train_extra='norm')), ('prompt', dict(num_prompt_tokens=3))])
def test_one_step_changes_only_trainable_and_optimizer_state_is_trainable_only(method, extra):
  config = peft_config(method, **extra)
  config.train.weight_decay = 0.1
  _, state, before = one_step(config)
  after = flat(state['params'])
  trainable = set(flat(peft.trainable(state['params'], config.peft)))
  assert trainable and trainable != set(after)
  changed = {key for key in after if not np.array_equal(before[key], after[key])}
  assert changed <= trainable  # frozen: bit-identical
  # what gets a gradient at step 0 moves (adapters' down-projections wait for a non-zero up-projection)
  must_move = {k for k in trainable if not k.endswith(('adapter/down', 'adapter/down_bias'))}
  assert must_move and must_move <= changed, must_move - changed
  # AdamW: mu and nu per trainable parameter, nothing for the frozen ones
  n_trainable = peft.count_params(state['params'], config.peft)[1]
  opt_sizes = sum(x.size for x in jax.tree.leaves(state['opt_state']) if x.ndim > 0)
  assert opt_sizes == 2 * n_trainable


def test_merged_lora_weights_give_base_plus_update_logits():
  config = peft_config('lora', targets='all', rank=4, alpha=8.0)
  config.model.mlp = 'swiglu'
  _, state, _ = one_step(config, n=3)
  adapted = model_of(config, state['params'])
  assert any(np.abs(v).max() > 0 for k, v in flat(state['params']).items() if k.endswith('lora/wo/b'))
  merged = peft.merge(state['params'], config.peft)
  plain = model_of(base_part(config), merged)
  np.testing.assert_allclose(np.asarray(logits_of(plain, 'decoder_only')),
                             np.asarray(logits_of(adapted, 'decoder_only')), rtol=1e-5, atol=1e-5)
  # the merge is W + (alpha / r) A B for one kernel, by hand
  per_layer = lambda tree: layout_convert.to_flat_layout(flat(tree), scanned=False, sep='/')  # noqa: E731
  f = per_layer(state['params'])
  prefix = 'decoder/blocks/0/attn/'
  a, b, w = f[prefix + 'lora/query/a'], f[prefix + 'lora/query/b'], f[prefix + 'query']
  expected = w + 2.0 * np.einsum('dr,rnh->dnh', a, b)
  np.testing.assert_allclose(per_layer(merged)[prefix + 'query'], expected, rtol=1e-6, atol=1e-7)
  with pytest.raises(ConfigError, match='adapter'):
    peft.merge(state['params'], peft_config('adapter').peft)


def test_trainable_counts_equal_the_formulas():
  config = peft_config('lora')
  cfg = config.model
  d, f, n, k, h, layers_ = cfg.d_model, cfg.d_ff, cfg.num_heads, cfg.num_kv_heads, cfg.d_model // cfg.num_heads, 1
  abstract = nnx.state(nnx.eval_shape(lambda: state_lib.build_model(config)), nnx.Param)
  r = config.peft.rank
  attention = r * ((d + n * h) + 2 * (d + k * h) + (n * h + d))
  assert peft.count_params(abstract, config.peft)[1] == layers_ * attention
  mlp_cfg = peft_config('lora', targets='mlp', rank=3)
  abstract = nnx.state(nnx.eval_shape(lambda: state_lib.build_model(mlp_cfg)), nnx.Param)
  gated = layers.MLPS[cfg.mlp].gated  # swiglu: wi_gate is a third target
  assert peft.count_params(abstract, mlp_cfg.peft)[1] == layers_ * 3 * ((d + f) * (2 if gated else 1) + (f + d))
  m = 5
  ad_cfg = peft_config('adapter', adapter_dim=m)
  abstract = nnx.state(nnx.eval_shape(lambda: state_lib.build_model(ad_cfg)), nnx.Param)
  assert peft.count_params(abstract, ad_cfg.peft)[1] == layers_ * 2 * (d * m + m + m * d + d)
  pr_cfg = peft_config('prompt', num_prompt_tokens=7)
  abstract = nnx.state(nnx.eval_shape(lambda: state_lib.build_model(pr_cfg)), nnx.Param)
  assert peft.count_params(abstract, pr_cfg.peft)[1] == 7 * d
  bf_cfg = peft_config('bitfit')  # layer norm: q,k,v,out biases + MLP biases + 3 norm biases (attn, mlp, final)
  bf_cfg.model.norm = 'layer'
  abstract = nnx.state(nnx.eval_shape(lambda: state_lib.build_model(bf_cfg)), nnx.Param)
  total, trainable = peft.count_params(abstract, bf_cfg.peft)
  assert trainable == layers_ * ((n * h + 2 * k * h + d) + (f + d) + 2 * d) + d
  none_cfg = peft_config('none')
  assert peft.count_params(abstract, none_cfg.peft) == (total, total)


@pytest.mark.parametrize('arch', ['encoder_only', 'encoder_decoder'])
def test_prompt_on_the_encoder_side_keeps_shapes_and_changes_logits(arch):
  config = peft_config('prompt', arch=arch, num_prompt_tokens=3)
  logits = np.asarray(logits_of(model_of(config), arch))
  base_logits = np.asarray(logits_of(model_of(base_part(config)), arch))
  assert logits.shape == base_logits.shape and not np.allclose(logits, base_logits)


def test_prompt_tokens_are_seen_and_dropped():
  config = peft_config('prompt', num_prompt_tokens=4)
  model = model_of(config)
  base_logits = np.asarray(logits_of(model_of(base_part(config)), 'decoder_only'))
  logits = np.asarray(logits_of(model, 'decoder_only'))
  assert logits.shape == base_logits.shape  # the prompt positions give no logits
  assert not np.allclose(logits, base_logits)  # every real token sees the prompt
  # still causal: changing the last real token changes no earlier logit
  tokens = jnp.asarray(np.arange(1, 13)[None], jnp.int32)
  changed = tokens.at[0, -1].set(40)
  np.testing.assert_allclose(np.asarray(model(tokens))[:, :-1], np.asarray(model(changed))[:, :-1], atol=1e-6)


def test_lora_on_a_mesh_equals_one_device_and_shards_its_factors():
  mesh = dict(data=2, fsdp=2, tensor=2)
  single, sharded = peft_config('lora', targets='all'), peft_config('lora', targets='all')
  sharded.mesh.update(**mesh)
  _, s1, _ = one_step(single, n=2)
  setup, s8, _ = one_step(sharded, n=2)
  a, b = flat(s1['params']), flat(s8['params'])
  scanned = bool(single.model.scan_layers)
  # Adam steps are 1e-2; its first steps are about lr * sign(g), so a gradient near 0 moves by up to a step's
  # share under the sharded scan's other reduction order (one element in 512 by up to 2.1e-4 with scan_layers,
  # 2% of a step; a sharding bug moves whole factors by steps)
  atol = 5e-4 if scanned else 2e-5
  for key in a:
    np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=atol, err_msg=key)
  specs = {'/'.join(map(str, p)): v.get_value().sharding.spec for p, v in nnx.to_flat_state(s8['params'])}
  block, lead = ('decoder/blocks/layers/', (None,)) if scanned else ('decoder/blocks/0/', ())  # 'layers': unsharded
  assert specs[block + 'attn/lora/query/a'] == P(*lead, 'fsdp', None)  # ('embed', rank)
  assert specs[block + 'attn/lora/query/b'] == P(*lead, None, 'tensor', None)  # (rank, 'heads', 'kv')
  assert specs[block + 'attn/lora/out/a'] == P(*lead, 'tensor', None, None)  # ('heads', 'kv', rank)
  assert specs[block + 'mlp/lora/wi/b'] == P(*lead, None, 'tensor')  # (rank, 'mlp')


@pytest.mark.parametrize('key,value,match', [
    ('rank', 0, 'peft.rank'), ('targets', 'attention,ffn', "unknown target 'ffn'"), ('method', 'qlora', 'peft.method'),
    ('dropout', 1.5, 'peft.dropout'), ('train_extra', 'norm', None)])
def test_bad_peft_values_are_config_errors(key, value, match):
  config = peft_config('lora' if key != 'train_extra' else 'none')
  config.peft[key] = value
  with pytest.raises(ConfigError, match=match or 'train_extra'):
    validate(config)


def test_target_groups():
  assert lora.target_names('attention') == ('query', 'key', 'value', 'out')
  assert lora.target_names('q, o, wi') == ('query', 'out', 'wi')
  assert set(lora.target_names('all')) == set(lora.ATTENTION + lora.MLP)
