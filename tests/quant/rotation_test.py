"""Tests for the random rotations (turboquant_jax.quant.rotation)."""

# Notation: D = dimension, R = Hadamard rounds, *B = leading axes, Π = the
# rotation matrix (apply(x) = Π x, invert(y) = Πᵀ y on the last axis).

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
from scipy import linalg

from turboquant_jax.quant import rotation

# Most tests call jitted wrappers: eager Hadamard transforms dispatch (and
# compile) every butterfly op separately, which costs seconds per shape.
_apply = jax.jit(rotation.apply)
_invert = jax.jit(rotation.invert)
_as_matrix = jax.jit(rotation.as_matrix)
_fwht = jax.jit(rotation.fwht)

_KINDS_AND_DIMS = (("haar", 3), ("haar", 50), ("haar", 128), ("hadamard", 1),
                   ("hadamard", 2), ("hadamard", 128), ("hadamard", 1024))


def _sylvester(d: int) -> np.ndarray:
  """The ±1 Sylvester-ordered Hadamard matrix, H_{2n} = [[H, H], [H, -H]]."""
  h = np.ones((1, 1))
  while h.shape[0] < d:
    h = np.kron(np.array([[1.0, 1.0], [1.0, -1.0]]), h)
  return h


class OrthogonalityTest(parameterized.TestCase):

  @parameterized.parameters(*_KINDS_AND_DIMS)
  def test_matrix_is_orthogonal(self, kind, dim):
    # Given a rotation drawn from a key.
    rot = rotation.make_rotation(jax.random.key(dim), dim, kind)
    # When it is written out as a matrix.
    pi = np.asarray(_as_matrix(rot), np.float64)
    # Then Π Πᵀ = Πᵀ Π = I (float32 entries: 1e-5).
    self.assertEqual(pi.shape, (dim, dim))
    np.testing.assert_allclose(pi @ pi.T, np.eye(dim), rtol=0, atol=1e-5)
    np.testing.assert_allclose(pi.T @ pi, np.eye(dim), rtol=0, atol=1e-5)

  @parameterized.parameters(*_KINDS_AND_DIMS)
  def test_apply_and_invert_agree_with_matrix_and_round_trip(self, kind, dim):
    # Given a rotation and vectors with leading shape (2, 3).
    rot = rotation.make_rotation(jax.random.key(10 + dim), dim, kind)
    x = jax.random.normal(jax.random.key(20 + dim), (2, 3, dim))
    pi = np.asarray(_as_matrix(rot), np.float64)
    # When rotated forward and back.
    y = _apply(rot, x)
    back = _invert(rot, y)
    # Then apply is Π x, invert is Πᵀ y, and the round trip is the identity.
    x64 = np.asarray(x, np.float64)
    np.testing.assert_allclose(y, x64 @ pi.T, rtol=0, atol=1e-5)
    np.testing.assert_allclose(_invert(rot, x), x64 @ pi, rtol=0,
                               atol=1e-5)
    np.testing.assert_allclose(back, x, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1),
                               np.linalg.norm(x, axis=-1), rtol=1e-5)

  @parameterized.parameters("haar", "hadamard")
  def test_works_under_jit_and_for_unbatched_vectors(self, kind):
    rot = rotation.make_rotation(jax.random.key(3), 16, kind)
    x = jax.random.normal(jax.random.key(4), (16,))
    y = jax.jit(rotation.apply)(rot, x)
    np.testing.assert_allclose(y, rotation.apply(rot, x), rtol=1e-6,
                               atol=1e-6)
    np.testing.assert_allclose(jax.jit(rotation.invert)(rot, y), x, rtol=0,
                               atol=1e-5)

  def test_haar_matrix_has_no_qr_sign_bias(self):
    # Given many Haar draws, E[Π_ij] = 0; QR without the sign fix gives a
    # positive diagonal (R_ii > 0 convention makes Q_ii biased).
    keys = jax.random.split(jax.random.key(5), 2000)
    mats = jax.vmap(lambda k: rotation.make_rotation(k, 4).matrix)(keys)
    diag_mean = np.asarray(jnp.mean(jnp.diagonal(mats, axis1=-2, axis2=-1)))
    # Each entry has variance 1/4, so the mean of 2000 has s.e. 0.011.
    np.testing.assert_allclose(diag_mean, 0.0, atol=0.05)


class DeterminismTest(parameterized.TestCase):

  @parameterized.parameters("haar", "hadamard")
  def test_same_key_same_rotation_other_key_other_rotation(self, kind):
    # Given two draws from one key and one from another.
    a = rotation.make_rotation(jax.random.key(7), 64, kind)
    b = rotation.make_rotation(jax.random.key(7), 64, kind)
    c = rotation.make_rotation(jax.random.key(8), 64, kind)
    ma, mb, mc = (np.asarray(_as_matrix(r)) for r in (a, b, c))
    # Then the same key gives the identical matrix, and a new key a new one.
    np.testing.assert_array_equal(ma, mb)
    self.assertGreater(np.max(np.abs(ma - mc)), 0.1)

  def test_is_a_pytree_with_static_kind_and_dim(self):
    rot = rotation.make_rotation(jax.random.key(0), 8, "hadamard", rounds=3)
    leaves, treedef = jax.tree_util.tree_flatten(rot)
    self.assertLen(leaves, 1)
    self.assertEqual(leaves[0].shape, (3, 8))
    again = jax.tree_util.tree_unflatten(treedef, leaves)
    self.assertEqual((again.kind, again.dim), ("hadamard", 8))
    np.testing.assert_array_equal(again.signs, rot.signs)


class HadamardTest(parameterized.TestCase):

  @parameterized.parameters(1, 2, 8, 64, 256)
  def test_fwht_equals_scipy_hadamard(self, dim):
    # Given x of leading shape (3,) and scipy's Sylvester matrix H.
    x = jax.random.normal(jax.random.key(dim), (3, dim))
    h = linalg.hadamard(dim)
    # Then fwht(x) = H x for each row (H is symmetric).
    np.testing.assert_allclose(_fwht(x),
                               np.asarray(x, np.float64) @ h.T,
                               rtol=1e-5, atol=1e-4)

  def test_fwht_small_case_by_hand(self):
    # H_4 = [[1,1,1,1],[1,-1,1,-1],[1,1,-1,-1],[1,-1,-1,1]] applied to
    # (1, 2, 3, 4): (10, 1-2+3-4, 1+2-3-4, 1-2-3+4) = (10, -2, -4, 0).
    out = rotation.fwht(jnp.array([1.0, 2.0, 3.0, 4.0]))
    np.testing.assert_array_equal(out, [10.0, -2.0, -4.0, 0.0])

  @parameterized.parameters(2, 4, 16, 32)
  def test_hadamard_equals_dense_construction(self, dim):
    # Given the two rounds of random signs s1, s2 of a Hadamard rotation.
    rot = rotation.make_rotation(jax.random.key(30 + dim), dim, "hadamard")
    s1, s2 = np.asarray(rot.signs, np.float64)
    self.assertTrue(np.all(np.abs(s1) == 1) and np.all(np.abs(s2) == 1))
    # When Π is built densely: Π = (H diag(s2)/√D) · (H diag(s1)/√D).
    h = _sylvester(dim)
    np.testing.assert_array_equal(h, linalg.hadamard(dim))
    one_round = lambda s: h @ np.diag(s) / np.sqrt(dim)
    expected = one_round(s2) @ one_round(s1)
    # Then as_matrix (built from apply) equals it.
    np.testing.assert_allclose(_as_matrix(rot), expected, rtol=0,
                               atol=1e-6)

  def test_single_round_maps_basis_vector_to_flat_vector(self):
    # One round sends e_0 to H diag(s) e_0 / √D = s_0 · (1, ..., 1) / √D.
    rot = rotation.make_rotation(jax.random.key(1), 16, "hadamard", rounds=1)
    y = rotation.apply(rot, jnp.eye(16)[0])
    np.testing.assert_allclose(jnp.abs(y), np.full(16, 0.25), rtol=1e-6)

  def test_non_power_of_two_dim_raises_naming_dim(self):
    with self.assertRaisesRegex(ValueError, r"dim=96"):
      rotation.make_rotation(jax.random.key(0), 96, "hadamard")
    with self.assertRaisesRegex(ValueError, "x.shape"):
      rotation.fwht(jnp.zeros((2, 96)))

  def test_bad_arguments_raise(self):
    with self.assertRaisesRegex(ValueError, "kind"):
      rotation.make_rotation(jax.random.key(0), 8, "givens")
    with self.assertRaisesRegex(ValueError, "dim"):
      rotation.make_rotation(jax.random.key(0), 0)
    with self.assertRaisesRegex(ValueError, "rounds"):
      rotation.make_rotation(jax.random.key(0), 8, "hadamard", rounds=0)


if __name__ == "__main__":
  absltest.main()
