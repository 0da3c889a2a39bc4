"""Mixture of experts (model/moe.py): the dispatch implementations against the dense reference, the router losses
against a by-hand numpy computation, the train step's losses and metrics, expert parallelism == one device,
active-parameter FLOPs, scan / decoding / resume, and the config errors."""
import dataclasses
import json
import os
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import gpt_tiny, moe_tiny
from jaxformer import decoding, flops
from jaxformer import sharding as shd
from jaxformer.config import ConfigError
from jaxformer.model import layout_convert, moe, transformer
from jaxformer.model.config import ModelConfig, build_model
from jaxformer.training import step

jax.config.update('jax_compilation_cache_dir', os.path.join(tempfile.gettempdir(), 'jaxformer_test_xla_cache'))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def model_config(**overrides):
  c = moe_tiny.get_config().model
  c.update(vocab_size=40, d_model=16, num_heads=2, d_ff=24, num_layers=2, max_len=16, num_experts=4,
           experts_per_token=2, init_std=0.3)  # O(1) outputs: tolerances mean something
  c.update(**overrides)
  return ModelConfig.from_config(c)


def moe_layer(cfg, seed=0):
  return moe.MoE(cfg, rngs=nnx.Rngs(seed))


def with_impl(layer, impl, capacity_factor=0.0):
  layer = nnx.clone(layer)
  layer.impl, layer.capacity_factor = impl, capacity_factor
  return layer


def inputs(b=2, t=8, d=16, seed=1):
  return jax.random.normal(jax.random.key(seed), (b, t, d))


# --------------------------------------------------------------------------------------------------- dispatch
def test_dropless_and_roomy_capacity_equal_dense_with_gradients():
  # gated experts with biases and a gated shared expert: every parameter kind of the layer gets a gradient
  cfg = model_config(mlp='swiglu', use_bias=True, num_shared_experts=1, router='softmax_topk')
  layer, x = moe_layer(cfg), inputs()
  # capacity E / k: every expert could take every token's copy, so nothing can drop
  impls = {'dense': with_impl(layer, 'dense'), 'dropless': with_impl(layer, 'dropless'),
           'capacity': with_impl(layer, 'capacity', cfg.num_experts / cfg.experts_per_token)}

  @nnx.jit
  def value_and_grad(m, x):  # a nonlinear read-out: every output element's gradient differs
    return nnx.value_and_grad(lambda m, x: jnp.sum(jnp.sin(m(x))), argnums=(0, 1))(m, x), m(x)

  (_, ref_g), ref_y = value_and_grad(impls['dense'], x)
  assert float(jnp.abs(ref_y).max()) > 1e-2
  for name in ('dropless', 'capacity'):
    (_, g), y = value_and_grad(impls[name], x)
    np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-6, err_msg=name)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref_g)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=name)


def test_dense_reference_is_the_weighted_sum_of_chosen_experts():
  """The reference itself, by hand: y_t = sum over the k chosen experts of weight * expert(x_t)."""
  cfg = model_config(mlp='gelu', use_bias=False)
  layer, x = moe_layer(cfg), inputs(b=1, t=3)
  w = {k: np.asarray(getattr(layer, k)[...]) for k in ('router', 'wi', 'wo')}
  y = np.asarray(with_impl(layer, 'dense')(x))
  for t in range(3):
    xt = np.asarray(x[0, t])
    logits = xt @ w['router']
    top = np.argsort(-logits)[:2]
    gate = np.exp(logits[top] - logits[top].max())
    gate /= gate.sum()  # topk_softmax: renormalised
    want = sum(g * (np.asarray(jax.nn.gelu(xt @ w['wi'][e])) @ w['wo'][e]) for g, e in zip(gate, top))
    np.testing.assert_allclose(y[0, t], want, rtol=1e-4, atol=1e-6)


def positions_by_hand(ids, capacity):
  """GShard priority by hand: first choices of every token in order, then second choices; kept [B,T,k]."""
  b, t, k = ids.shape
  kept = np.zeros(ids.shape, bool)
  for r in range(b):
    fill = {}
    for j in range(k):
      for i in range(t):
        e = int(ids[r, i, j])
        kept[r, i, j] = fill.get(e, 0) < capacity
        fill[e] = fill.get(e, 0) + 1
  return kept


def test_small_capacity_drops_and_reports_it():
  cfg = model_config(mlp='gelu', use_bias=False)
  layer, x = moe_layer(cfg), inputs(b=2, t=8)
  small = with_impl(layer, 'capacity', 0.5)  # C = ceil(0.5 * 8 * 2 / 4) = 2 slots per expert per row
  _, ids, weights = layer.route(x)
  kept = positions_by_hand(np.asarray(ids), 2)
  assert 0 < (~kept).sum() < kept.size
  # expected: the dense reference with the dropped copies' weights zeroed
  e = cfg.num_experts
  ye = with_impl(layer, 'dense').experts_einsum(jnp.broadcast_to(x.reshape(-1, 16), (e, 16, 16)))
  combine = (jax.nn.one_hot(ids, e) * (np.asarray(weights) * kept)[..., None]).sum(-2).reshape(16, e)
  want = jnp.einsum('ne,end->nd', combine, ye).reshape(2, 8, 16)
  np.testing.assert_allclose(small(x), want, rtol=1e-5, atol=1e-6)
  small.collect_stats = True
  small(x)
  stats = moe.pop_stats(small)
  np.testing.assert_allclose(stats['dropped'], (~kept).mean(), rtol=1e-6)
  assert moe.capacity(0.5, 8, 2, 4) == 2


# ---------------------------------------------------------------------------------------------- router losses
def test_router_stats_match_numpy_and_transformers_formula():
  rng = np.random.default_rng(0)
  n, e, k = 12, 4, 2
  logits = rng.normal(size=(n, e)).astype(np.float32) * 2
  ids = np.argsort(-logits, axis=-1)[:, :k]
  stats = moe.router_stats(jnp.asarray(logits), jnp.asarray(ids), jnp.ones((n, k), bool), e)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  # transformers' load_balancing_loss_func (modeling_mixtral.py) for one layer, no attention mask:
  tokens_per_expert = np.histogram(ids.reshape(-1), bins=e, range=(0, e))[0] / n
  hf_aux = e * np.sum(tokens_per_expert * p.mean(0))
  np.testing.assert_allclose(stats['aux'], hf_aux, rtol=1e-5)
  lse = np.log(np.exp(logits).sum(-1))
  np.testing.assert_allclose(stats['z'], np.mean(lse ** 2), rtol=1e-5)
  np.testing.assert_allclose(stats['load'], tokens_per_expert / k, rtol=1e-6)
  np.testing.assert_allclose(stats['entropy'], np.mean(-(p * np.log(p)).sum(-1)), rtol=1e-5)
  assert float(stats['dropped']) == 0.0
  # perfectly balanced routing with uniform probabilities: aux = k
  uniform = moe.router_stats(jnp.zeros((4, e)), jnp.asarray([[0, 1], [2, 3], [0, 1], [2, 3]]), jnp.ones((4, 2), bool), e)
  np.testing.assert_allclose(uniform['aux'], k, rtol=1e-6)


def test_routers_renormalise_or_not():
  x = inputs(b=1, t=4)
  for router, renorm in (('topk_softmax', True), ('softmax_topk', False)):
    layer = moe_layer(model_config(router=router))
    logits, ids, w = layer.route(x)
    p = jax.nn.softmax(logits, -1)
    top = jnp.take_along_axis(p, ids, -1)
    np.testing.assert_allclose(w, top / top.sum(-1, keepdims=True) if renorm else top, rtol=1e-6)
    assert bool(jnp.all(top[..., 0] >= jnp.max(jnp.where(jax.nn.one_hot(ids, 4).sum(-2) > 0, -1, p), -1)))


# ------------------------------------------------------------------------------------------------ train step
def step_config(**model):
  config = moe_tiny.get_config()
  config.model.update(vocab_size=65, d_model=32, num_heads=4, d_ff=32, num_layers=2, max_len=16)
  config.model.update(**model)
  config.data.seq_len = 16
  config.train.update(batch_size=8, warmup_steps=0, learning_rate=1e-2)
  config.mesh.update(data=1, fsdp=1, tensor=1, expert=1)
  return config


def run_steps(config, n=2):
  from tests.test_sharding import lm_batch, setup_for
  setup, state = setup_for(config)
  train_step = step.make_train_step(config, setup)
  out = []
  for _ in range(n):
    state, m = train_step(state, shd.shard_batch(lm_batch(), setup.mesh, setup.rules))
    out.append(jax.device_get(m))
  return setup, state, out


def test_expert_parallel_step_equals_one_device_and_reports_router_losses():
  """data=2 x expert=2 x tensor=2 on the 8 virtual devices: same losses, gradients, drops and updates as one device,
  with the expert weights split over the 'expert' mesh axis; the step's objective adds the weighted router losses
  and its metrics carry them. Capacity 0.5 (per sequence, so the same on both meshes) drops some tokens."""
  def config(**mesh):
    c = step_config(moe_impl='capacity', capacity_factor=0.5)
    c.train.update(moe_aux_loss_coef=0.1, moe_z_loss_coef=0.01)
    c.mesh.update(**mesh)
    return c

  _, one_state, one_m = run_steps(config())
  many_setup, many_state, many_m = run_steps(config(data=2, expert=2, tensor=2))
  assert dict(many_setup.mesh.shape) == {'data': 2, 'fsdp': 1, 'expert': 2, 'tensor': 2}
  wi = many_state['params']['decoder']['blocks'][0]['mlp']['wi'].get_value()
  assert wi.sharding.spec[0] == 'expert' and wi.addressable_shards[0].data.shape[0] == 2
  for a, b in zip(one_m, many_m):
    for key in ('loss', 'grad_norm', 'moe_aux_loss', 'moe_dropped_fraction', 'expert_load/0'):
      np.testing.assert_allclose(a[key], b[key], rtol=2e-5, err_msg=key)
  for a, b in zip(jax.tree.leaves(one_state['params']), jax.tree.leaves(many_state['params'])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-4)

  m = one_m[0]
  for name in moe.stats_names(config().model):
    assert name in m and np.isfinite(m[name]), name
  np.testing.assert_allclose(sum(m[f'expert_load/{e}'] for e in range(4)), 1.0, rtol=1e-5)
  assert 1.0 < m['moe_aux_loss'] < 4 * 2 and m['moe_dropped_fraction'] > 0  # ~k = 2 near balance; at most E * k
  np.testing.assert_allclose(m['objective'] - m['loss'], 0.1 * m['moe_aux_loss'] + 0.01 * m['moe_z_loss'],
                             rtol=1e-4)


def test_scanned_moe_step_equals_unrolled():
  """The same parameters (layout_convert) give the same step, router statistics included (stacked [L] there)."""
  from tests.test_sharding import lm_batch, setup_for
  metrics = []
  u_setup, u_state = setup_for(step_config())
  s_setup, s_state = setup_for(step_config(scan_layers=True))
  s_state['params'] = jax.tree.map(jnp.copy, layout_convert.convert_state(u_state['params'], s_state['params']))
  for config, setup, state in ((step_config(), u_setup, u_state), (step_config(scan_layers=True), s_setup, s_state)):
    _, m = step.make_train_step(config, setup)(state, shd.shard_batch(lm_batch(), setup.mesh, setup.rules))
    metrics.append(jax.device_get(m))
  for key in ('loss', 'grad_norm', 'moe_aux_loss', 'router_entropy', 'expert_load/1'):
    np.testing.assert_allclose(metrics[0][key], metrics[1][key], rtol=1e-5, err_msg=key)


# ------------------------------------------------------------------------------------------------ FLOPs, params
def test_flops_and_active_params_count_k_experts():
  cfg = model_config(mlp='swiglu', use_bias=False, num_experts=4, experts_per_token=2, expert_d_ff=24)
  dense_2x = model_config(num_experts=0, mlp='swiglu', use_bias=False, d_ff=48)  # the k active experts' width
  router = 2 * cfg.num_layers * cfg.d_model * cfg.num_experts * 6 * 8  # 6 N per token, 8 tokens
  np.testing.assert_allclose(flops.train_flops_per_step(cfg, 1, 8) - flops.train_flops_per_step(dense_2x, 1, 8),
                             router / 2)
  total = transformer.count_params(nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0))))
  two = transformer.count_params(nnx.eval_shape(lambda: build_model(
      dataclasses.replace(cfg, num_experts=2), rngs=nnx.Rngs(0))))
  # a model with only k experts has the active parameter count, but for its smaller router
  assert moe.num_active_params(cfg, total) == two + cfg.num_layers * cfg.d_model * 2


# ---------------------------------------------------------------------------------------- decode, config, resume
def test_greedy_decode_with_cache_equals_without():
  model = build_model(model_config(), rngs=nnx.Rngs(0))
  prompt = jnp.asarray([[1, 7, 9, 5], [1, 11, 3, 2]])
  got = decoding.greedy(model, prompt, max_new_tokens=6)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(decoding.greedy_without_cache(model, prompt,
                                                                                           max_new_tokens=6)))


@pytest.mark.parametrize('overrides,match', [
    ({'experts_per_token': 5}, 'model.experts_per_token=5 exceeds model.num_experts=4'),
    ({'capacity_factor': -1.0}, 'model.capacity_factor=-1.0 must be a number >= 0'),
    ({'router': 'top1'}, 'model.router'),
    ({'moe_impl': 'capacity'}, 'model.moe_impl=capacity needs model.capacity_factor > 0'),
    ({'scan_layers': True, 'moe_every': 2}, 'model.moe_every=1'),
])
def test_bad_moe_values_are_config_errors(overrides, match):
  c = moe_tiny.get_config().model
  c.update(**overrides)
  with pytest.raises(ConfigError, match=match):
    ModelConfig.from_config(c)


def lora_moe_config(impl, scan=False):
  from tests.test_train import tiny
  config = tiny('gpt_tiny')
  config.model.update(**{k: v for k, v in moe_tiny.get_config().model.items() if 'expert' in k or 'moe' in k})
  config.model.update(num_layers=2, d_model=16, d_ff=24, vocab_size=40, max_len=16, num_experts=4, init_std=0.3,
                      moe_impl=impl, capacity_factor=2.0 if impl == 'capacity' else 0.0, scan_layers=scan,
                      num_shared_experts=1)  # C = 2 * T * k / E = T: nothing dropped; a shared expert gets LoRA too
  config.peft.update(method='lora', targets='all', rank=2, alpha=4.0)
  return config


@pytest.mark.parametrize('impl,scan', [('dropless', False), ('capacity', False), ('dense', True)])
def test_lora_on_experts_equals_the_merged_model(impl, scan):
  """Each expert's own factors (nonzero B) in every dispatch: the adapted model's logits equal those of the base
  with the LoRA updates folded into the stacked expert kernels (what export writes); one expert's merge by hand."""
  from jaxformer import peft
  from jaxformer.peft import lora
  from jaxformer.peft.params import LoRAParam
  from jaxformer.training import state as state_lib
  config = lora_moe_config(impl, scan)
  adapted = state_lib.build_model(config)
  moe_blocks = [m for _, m in nnx.iter_modules(adapted) if isinstance(m, moe.MoE)]
  assert moe_blocks and all(isinstance(m.lora['wi_gate'], lora.ExpertLoRA) for m in moe_blocks)
  assert all(isinstance(m.shared.lora['wo'], lora.LoRA) for m in moe_blocks)
  factors = nnx.state(adapted, LoRAParam)
  leaves, treedef = jax.tree_util.tree_flatten(factors)
  keys = jax.random.split(jax.random.key(5), len(leaves))
  nnx.update(adapted, jax.tree_util.tree_unflatten(treedef, [0.3 * jax.random.normal(k, x.shape, x.dtype)
                                                             for k, x in zip(keys, leaves)]))
  base = config.copy_and_resolve_references()
  base.peft.method = 'none'
  plain = state_lib.build_model(base)
  params = nnx.state(adapted, nnx.Param)
  merged = peft.merge(params, config.peft)
  nnx.update(plain, merged)
  tokens = jnp.asarray(np.random.default_rng(0).integers(1, 40, size=(2, 8)), jnp.int32)
  before = np.asarray(plain(tokens))
  np.testing.assert_allclose(np.asarray(adapted(tokens)), before, rtol=2e-5, atol=2e-5)
  base_logits = np.asarray(state_lib.build_model(base)(tokens))
  assert np.abs(base_logits - before).max() > 1e-2  # the updates matter
  flat = {'/'.join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(params)}
  folded = {'/'.join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(merged)}
  pre = 'decoder/blocks/layers/1/mlp/' if scan else 'decoder/blocks/1/mlp/'
  pick = (lambda x: x[1]) if scan else (lambda x: x)
  if scan:
    pre = 'decoder/blocks/layers/mlp/'
  a, b, w = (pick(flat[pre + k]) for k in ('lora/wo/a', 'lora/wo/b', 'wo'))
  np.testing.assert_allclose(pick(folded[pre + 'wo'])[2], w[2] + 2.0 * a[2] @ b[2], rtol=1e-5, atol=1e-6)


def test_lora_run_on_moe_tiny_trains_the_expert_factors(tmp_path):
  """A short LoRA run (targets=all) on moe_tiny: the loss falls, the expert factors move, the base does not."""
  from jaxformer.apps.train import run
  from jaxformer.training.writers import read_metrics
  from tests.test_train import tiny
  config = tiny('gpt_tiny', num_steps=6, log_every=1, learning_rate=3e-2, warmup_steps=1)
  config.model.update(**{k: v for k, v in moe_tiny.get_config().model.items() if 'expert' in k or 'moe' in k})
  config.peft.update(method='lora', targets='all', rank=2)
  run(config, str(tmp_path))
  losses = [r['train_loss'] for r in read_metrics(str(tmp_path)) if 'train_loss' in r]
  assert len(losses) == 6 and losses[-1] < losses[0]
  rows = [r for r in read_metrics(str(tmp_path)) if 'train_loss' in r]
  assert 'train_expert_load/3' in rows[0]
  from jaxformer import sharding as shd
  from jaxformer.training import state as state_lib
  model, _ = state_lib.restore_model(str(tmp_path), config, shd.make_mesh(config))
  block = model.decoder.blocks[0].mlp
  assert np.abs(np.asarray(block.lora['wi'].b[...])).max() > 0  # B starts at zero: it trained


def test_train_py_bad_moe_value_is_one_line(tmp_path):
  out = subprocess.run(
      [sys.executable, 'train.py', '--config=configs/moe_tiny.py', f'--workdir={tmp_path}',
       '--config.model.experts_per_token=8'], cwd=REPO, capture_output=True, text=True, timeout=300,
      env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert out.returncode != 0
  lines = [line for line in out.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith('error: model.experts_per_token=8 exceeds'), out.stderr


def test_moe_run_logs_router_metrics_and_resumes_exactly(tmp_path):
  from jaxformer.apps.train import run
  from jaxformer.training.writers import read_metrics
  from tests.test_train import tiny

  def config():
    c = tiny('gpt_tiny', num_steps=2, log_every=1, eval_every=1000, eval_steps=1, final_eval_steps=1,
             warmup_steps=1)
    c.model.update(num_layers=2, num_experts=4, moe_every=2, expert_d_ff=32)  # layer 1 MoE, layer 0 dense
    return c

  ref, resumed = str(tmp_path / 'ref'), str(tmp_path / 'resumed')
  run(config(), ref)
  run(config(), resumed, stop_after_steps=1)
  run(config(), resumed)
  rows = [r for r in read_metrics(ref) if 'train_loss' in r]
  first = rows[0]
  assert first['num_active_params'] < first['num_params']
  assert 'train_moe_aux_loss' in first and 'train_expert_load/3' in first and 'train_objective' in first
  losses = lambda w: [r['train_loss'] for r in read_metrics(w) if 'train_loss' in r]
  np.testing.assert_allclose(losses(resumed), losses(ref), rtol=1e-6, atol=1e-6)
  # the eval row and eval.py's JSON carry the router statistics of the evaluated tokens, the same numbers
  logged = [r for r in read_metrics(ref) if 'eval_loss' in r][-1]
  loads = [logged[f'eval_expert_load/{e}'] for e in range(4)]
  assert sum(loads) == pytest.approx(1.0, abs=1e-5) and 0 < logged['eval_router_entropy'] <= np.log(4) + 1e-6
  assert 0 < logged['eval_moe_aux_loss'] < 4  # k = 2 at perfect balance (router_stats' formula)
  from jaxformer.apps import evaluate
  results = evaluate.run(config(), ref, output=str(tmp_path / 'eval.json'))
  saved = json.loads((tmp_path / 'eval.json').read_text())
  for name in ('moe_aux_loss', 'router_entropy', 'expert_load/3', 'moe_z_loss'):
    assert saved[name] == results[name] == pytest.approx(logged[f'eval_{name}'], rel=1e-5, abs=1e-7), name
