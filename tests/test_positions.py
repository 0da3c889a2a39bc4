"""Position encodings: the sinusoidal formula, RoPE's relative-offset property."""
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxformer.model import positions


def test_sinusoidal_table_matches_the_formula():
  max_len, d = 50, 12
  table = np.asarray(positions.sinusoidal_table(max_len, d))
  expected = np.zeros((max_len, d))
  for pos in range(max_len):
    for i in range(d // 2):
      expected[pos, 2 * i] = math.sin(pos / 10000 ** (2 * i / d))
      expected[pos, 2 * i + 1] = math.cos(pos / 10000 ** (2 * i / d))
  np.testing.assert_allclose(table, expected, atol=1e-5)


def test_sinusoidal_uses_given_positions():
  pos = jnp.array([[0, 1, 2, 0, 1]])
  np.testing.assert_allclose(positions.sinusoidal(pos, 8)[0], positions.sinusoidal_table(3, 8)[np.array([0, 1, 2, 0, 1])],
                             atol=1e-6)


def _rope_scores(q, k, q_pos, k_pos):
  cq, sq = positions.rope(q_pos, q.shape[-1])
  ck, sk = positions.rope(k_pos, k.shape[-1])
  return jnp.einsum('btnh,bsnh->bnts', positions.apply_rope(q, cq, sq), positions.apply_rope(k, ck, sk))


def test_rope_scores_depend_only_on_relative_offsets():
  q = jax.random.normal(jax.random.key(0), (1, 6, 2, 8))
  k = jax.random.normal(jax.random.key(1), (1, 6, 2, 8))
  pos = jnp.arange(6)[None]
  base = _rope_scores(q, k, pos, pos)
  for shift in (1, 7, 123):
    np.testing.assert_allclose(_rope_scores(q, k, pos + shift, pos + shift), base, atol=1e-4)
  # ... and they do depend on the offset itself
  assert np.abs(_rope_scores(q, k, pos, pos + 1) - base).max() > 1e-2


def test_rope_is_the_rotate_half_rotation():
  x = jax.random.normal(jax.random.key(2), (1, 3, 1, 4))
  pos = jnp.array([[0, 1, 5]])
  cos, sin = positions.rope(pos, 4)
  out = np.asarray(positions.apply_rope(x, cos, sin))
  np.testing.assert_allclose(out[0, 0], x[0, 0], atol=1e-6)  # position 0: identity
  np.testing.assert_allclose(np.linalg.norm(out, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)  # a rotation
  # pair (i, i + H/2) rotates by angle p * base^(-2i/H)
  for t, p in enumerate([0, 1, 5]):
    for i in range(2):
      a = p * 10000 ** (-2 * i / 4)
      x1, x2 = float(x[0, t, 0, i]), float(x[0, t, 0, i + 2])
      np.testing.assert_allclose(out[0, t, 0, i], x1 * math.cos(a) - x2 * math.sin(a), atol=1e-5)
      np.testing.assert_allclose(out[0, t, 0, i + 2], x2 * math.cos(a) + x1 * math.sin(a), atol=1e-5)
