"""model.remat: every policy gives the loss and gradients of 'none' (with dropout on, so the recomputed forward
must draw the same masks), for the unrolled and the scanned stack."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxformer.model import build_model, remat
from test_model import L, tiny_config, tokens

# one name per distinct policy ('full' is block's policy under MaxText's name)
POLICIES = [name for name, r in remat.REMATS.items() if r is not None and name != 'full']


def loss_and_grads(policy, scan_layers):
  cfg = tiny_config('encoder_decoder', 'rope', remat=policy, scan_layers=scan_layers, dropout=0.1,
                    attention_dropout=0.1)
  model = build_model(cfg, rngs=nnx.Rngs(params=0, dropout=1))
  rng = np.random.default_rng(6)
  src, tgt = tokens(rng, 2, L), tokens(rng, 2, L)
  loss = lambda m: jnp.mean(jax.nn.log_softmax(m(src, tgt, deterministic=False))[..., 5])
  return nnx.jit(nnx.value_and_grad(loss))(model)


# the unrolled stack's 'block' is also checked in test_model.py
@pytest.mark.parametrize('scan_layers,policies', [(False, ['dots', 'projections']), (True, POLICIES)])
def test_every_policy_gives_the_loss_and_gradients_of_none(scan_layers, policies):
  l0, g0 = loss_and_grads('none', scan_layers)
  assert float(jnp.abs(g0['decoder']['blocks'][0 if not scan_layers else 'layers']['mlp']['wi'][...]).max()) > 0
  for policy in policies:
    l1, g1 = loss_and_grads(policy, scan_layers)
    np.testing.assert_allclose(l1, l0, rtol=1e-5, err_msg=policy)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, atol=1e-6, err_msg=policy), g0, g1)


def test_policies_differ_in_what_they_save():
  """The registry's policies are not all the same function: 'dots' keeps batched matmuls, 'projections' does not."""
  batched = jax.make_jaxpr(lambda a, b: jnp.einsum('bij,bjk->bik', a, b))(jnp.ones((2, 3, 3)), jnp.ones((2, 3, 3)))
  eqn = batched.eqns[0]
  assert remat.REMATS['dots'].policy(eqn.primitive, *[v.aval for v in eqn.invars], **eqn.params)
  assert not remat.REMATS['projections'].policy(eqn.primitive, *[v.aval for v in eqn.invars], **eqn.params)
  assert remat.REMATS['block'] is remat.REMATS['full'] and remat.REMATS['none'] is None
