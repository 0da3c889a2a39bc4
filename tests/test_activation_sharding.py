"""Activations carry logical sharding constraints inside a mesh context (and only there); the data=2, fsdp=2,
tensor=2 train step compiles without XLA's involuntary full rematerialisation and equals the one-device step, for
the unrolled and the scanned stack; the scanned stack's 'layers' axis is unsharded by the default rules."""
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from conftest import REPO
from configs import gpt_tiny
from jaxformer import sharding as shd
from jaxformer.training import step
from jaxformer.training import state as state_lib

STEP_SCRIPT = textwrap.dedent('''
    import sys
    import jax, numpy as np
    from configs import gpt_tiny
    from jaxformer import sharding as shd
    from jaxformer.training import optimizer, step
    from jaxformer.training import state as state_lib

    def run(scan_layers, **mesh):
      config = gpt_tiny.get_config()
      config.model.update(vocab_size=64, d_model=32, num_heads=4, d_ff=64, num_layers=2, max_len=16,
                          tie_embeddings=True, scan_layers=scan_layers)
      if scan_layers:  # GPT-2's learned positions + biases: the position table is FSDP-sharded like the embedding
        config.model.update(position='learned', use_bias=True, norm='layer', mlp='gelu')
      config.train.update(batch_size=8, warmup_steps=0, learning_rate=1e-2)
      config.mesh.update(**mesh)
      m = shd.make_mesh(config)
      tx, schedule = optimizer.make_optimizer(config.train)
      setup = state_lib.make_setup(config, m, tx, schedule)
      state = state_lib.initial_state(config, setup)
      t = np.random.default_rng(0).integers(1, 64, size=(8, 17)).astype(np.int32)
      batch = shd.shard_batch({'tokens': t[:, :-1], 'targets': t[:, 1:]}, m, setup.rules)
      state, metrics = step.make_train_step(config, setup)(state, batch)
      return float(metrics['loss']), jax.tree.map(np.asarray, state['params'])

    for scan_layers in (False, True):
      loss1, params1 = run(scan_layers, data=1, fsdp=1, tensor=1)
      loss8, params8 = run(scan_layers, data=2, fsdp=2, tensor=2)
      diff = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(params1), jax.tree.leaves(params8)))
      print('scan', scan_layers, 'loss_diff', abs(loss1 - loss8), 'param_diff', diff)
''')


def test_sharded_step_has_no_full_rematerialisation_and_equals_one_device():
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (str(REPO), os.environ.get('PYTHONPATH', '')))), JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=8')
  out = subprocess.run([sys.executable, '-c', STEP_SCRIPT], capture_output=True, text=True, env=env, cwd=REPO,
                       timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'rematerialization' not in out.stderr.lower(), out.stderr[-3000:]
  lines = [line.split() for line in out.stdout.splitlines() if line.startswith('scan')]
  assert len(lines) == 2
  for words in lines:
    assert float(words[3]) < 1e-5 and float(words[5]) < 1e-5, words


def hidden_constraints(config, mesh_sizes):
  """The number of sharding constraints in the lowered forward pass, with or without a mesh context."""
  model = state_lib.build_model(config)
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))
  tokens = jnp.ones((8, 16), jnp.int32)
  if mesh_sizes is None:
    return forward.lower(state, tokens).as_text().count('sharding_constraint')
  config.mesh.update(**mesh_sizes)
  mesh = shd.make_mesh(config)
  with shd.mesh_context(mesh, shd.rules_from_config(config)):
    return forward.lower(state, tokens).as_text().count('sharding_constraint')


@pytest.mark.parametrize('scan_layers', [False, True])
def test_activations_are_constrained_only_inside_a_mesh_context(scan_layers):
  config = gpt_tiny.get_config()
  config.model.update(vocab_size=64, d_model=32, num_heads=4, d_ff=64, num_layers=3, max_len=16,
                      scan_layers=scan_layers)
  assert hidden_constraints(config, None) == 0
  # embedding table, stack input, each block's output (one scan body), logits
  expected = 3 + (1 if scan_layers else 3)
  assert hidden_constraints(config, dict(data=2, fsdp=2, tensor=2)) == expected


def test_scanned_params_shard_as_the_rules_say_with_layers_unsharded():
  config = gpt_tiny.get_config()
  config.model.update(vocab_size=64, d_model=32, num_heads=4, d_ff=64, num_layers=3, max_len=16, scan_layers=True)
  config.mesh.update(data=2, fsdp=2, tensor=2)
  mesh = shd.make_mesh(config)
  abstract = nnx.state(nnx.eval_shape(lambda: state_lib.build_model(config)), nnx.Param)
  shardings = shd.state_shardings(abstract, mesh, shd.rules_from_config(config))
  layers = shardings['decoder']['blocks']['layers']
  assert layers['attn']['query'].get_value().spec == P(None, 'fsdp', 'tensor', None)
  assert layers['mlp']['wi'].get_value().spec == P(None, 'fsdp', 'tensor')
