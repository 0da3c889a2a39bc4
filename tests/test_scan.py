"""model.scan_layers: the scanned stack equals the unrolled one given the same parameters (logits, loss and
gradients, KV-cache decoding with every method), draws different dropout per layer, and checkpoints move between
the two layouts."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import gpt_tiny
from jaxformer import decoding, sharding as shd
from jaxformer.settings import decode_settings
from jaxformer.model import build_model, layout_convert
from jaxformer.training import checkpoint, optimizer, step
from jaxformer.training import state as state_lib
from test_model import L, tiny_config, tokens

# (arch, position, norm_position): every arch, pre- and post-LN, GQA (rope: 1 kv head, learned: 2 of 4 heads), T5's
# relative position bias (computed once per stack, shared by the scanned layers)
CASES = [('encoder_only', 'learned', 'post'), ('decoder_only', 'rope', 'pre'), ('encoder_decoder', 'relative', 'post')]
ATOL = 2e-5


def pair(arch, position, norm_position, **overrides):
  """(unrolled model, scanned model) holding the same parameters (converted from the unrolled one)."""
  cfg = tiny_config(arch, position, norm_position, num_layers=3, num_decoder_layers=2, scan_layers=False, **overrides)
  unrolled = build_model(cfg, rngs=nnx.Rngs(params=0, dropout=1))
  cfg.scan_layers = True
  scanned = build_model(cfg, rngs=nnx.Rngs(params=0, dropout=1))
  params = layout_convert.convert_state(nnx.state(unrolled, nnx.Param), nnx.state(scanned, nnx.Param))
  nnx.update(scanned, params)
  return unrolled, scanned


def inputs(arch, seed=0):
  rng = np.random.default_rng(seed)
  src, tgt = tokens(rng, 2, L).at[1, 6:].set(0), tokens(rng, 2, L).at[0, 5:].set(0)
  return (src, tgt) if arch == 'encoder_decoder' else (tgt,)


def loss_and_grads(model, args):
  def loss(m):
    return jnp.mean(jax.nn.log_softmax(m(*args))[..., 3])
  return nnx.jit(nnx.value_and_grad(loss))(model)


@pytest.mark.parametrize('arch,position,norm_position', CASES)
def test_scanned_equals_unrolled_logits_loss_and_grads(arch, position, norm_position):
  unrolled, scanned = pair(arch, position, norm_position)
  args = inputs(arch)
  np.testing.assert_allclose(scanned(*args), unrolled(*args), atol=ATOL)
  (l1, g1), (l2, g2) = loss_and_grads(unrolled, args), loss_and_grads(scanned, args)
  np.testing.assert_allclose(l2, l1, rtol=1e-5)
  g2 = layout_convert.to_layout(nnx.to_pure_dict(g2), scanned=False)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, atol=1e-6), nnx.to_pure_dict(g1), g2)


def test_scanned_decoding_equals_unrolled_with_every_method():
  """decoder_only through decoding.decode (greedy, beam: reorders the stacked cache along batch, sample)."""
  unrolled, scanned = pair('decoder_only', 'rope', 'pre')
  prompt = np.asarray(tokens(np.random.default_rng(1), 2, 3))
  for method in decoding.METHODS:
    settings = decode_settings(method=method, max_len=4, beam_size=2)
    a = decoding.decode(unrolled, settings, prompt, rng=jax.random.key(0))
    b = decoding.decode(scanned, settings, prompt, rng=jax.random.key(0))
    np.testing.assert_array_equal(b, a, err_msg=method)


def test_scanned_kv_cache_equals_unrolled_encoder_decoder():
  """Prefill + two cached steps: self-attention cache and cross-attention keys/values stacked along layers."""
  unrolled, scanned = pair('encoder_decoder', 'relative', 'post')
  src, tgt = inputs('encoder_decoder', seed=2)
  caches = [m.init_cache(2, L, src_tokens=src) for m in (unrolled, scanned)]
  assert caches[1]['self']['k'].shape[:2] == caches[1]['cross']['k'].shape[:2] == (2, 2)  # [B, layers, ...]
  for piece in (tgt[:, :4], tgt[:, 4:5], tgt[:, 5:6]):
    (a, caches[0]), (b, caches[1]) = unrolled.decode_step(piece, caches[0]), scanned.decode_step(piece, caches[1])
    np.testing.assert_allclose(b, a, atol=ATOL)


def test_dropout_differs_across_scanned_layers():
  """Each layer has its own dropout stream: giving every layer the first layer's key changes the output."""
  _, scanned = pair('decoder_only', 'learned', 'pre', dropout=0.2)
  (tgt,) = inputs('decoder_only')
  rngs = nnx.state(scanned, nnx.RngKey)
  keys = jax.random.key_data(rngs['decoder']['blocks']['layers']['dropout']['rngs']['key'][...])
  assert len({tuple(np.ravel(k)) for k in np.asarray(keys)}) == 3  # three layers, three keys
  run = lambda: np.asarray(nnx.clone(scanned)(tgt, deterministic=False))
  a, b = run(), run()
  np.testing.assert_array_equal(a, b)  # the same streams give the same masks
  same = jax.tree.map(lambda k: jnp.broadcast_to(k[...][:1], k.shape) if k.ndim else k[...], rngs)
  nnx.update(scanned, same)
  assert np.abs(run() - a).max() > 1e-4


@pytest.mark.parametrize('from_scanned', [True, False])
def test_checkpoint_restores_into_the_other_layout(tmp_path, from_scanned):
  """A train-state checkpoint written in one layout restores (params) into a model of the other layout with equal
  logits: restore in the saved layout (restore_model), then convert_state into the requested one."""
  config = gpt_tiny.get_config()
  config.model.update(vocab_size=23, num_layers=2, d_model=16, num_heads=2, d_ff=32, max_len=16,
                      scan_layers=from_scanned)
  config.mesh.update(data=1, fsdp=1, tensor=1)
  mesh = shd.make_mesh(config)
  tx, schedule = optimizer.make_optimizer(config.train)
  setup = state_lib.make_setup(config, mesh, tx, schedule)
  state = state_lib.initial_state(config, setup)
  ckpt = checkpoint.Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(0, state, config=config.to_dict())
  ckpt.close()
  saved, _ = state_lib.restore_model(str(tmp_path), config, mesh)  # in the layout it was written in
  other = config.copy_and_resolve_references()
  other.model.scan_layers = not from_scanned
  model = state_lib.build_model(other)
  nnx.update(model, layout_convert.convert_state(nnx.state(saved, nnx.Param), nnx.state(model, nnx.Param)))
  assert layout_convert.is_scanned(nnx.to_pure_dict(nnx.state(model, nnx.Param))) is (not from_scanned)
  (tgt,) = inputs('decoder_only')
  np.testing.assert_allclose(model(tgt), saved(tgt), atol=ATOL)
  # and back: the round trip is the identity
  back = layout_convert.convert_state(nnx.state(model, nnx.Param), nnx.state(saved, nnx.Param))
  jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(back),
               nnx.to_pure_dict(nnx.state(saved, nnx.Param)))


def test_scanned_params_carry_a_leading_layers_axis():
  _, scanned = pair('encoder_decoder', 'learned', 'pre')
  query = nnx.state(scanned, nnx.Param)['decoder']['blocks']['layers']['attn']['query']
  assert query.shape[0] == 2 and query.get_metadata()['out_sharding'] == ('layers', 'embed', 'heads', 'kv')
