"""Tests for the TurboQuant quantizers and the public API (mse, prod, qjl)."""

# Notation: D = dim, b = bits per coordinate, M = QJL sketch size, P = packed
# words, *B = leading axes of stored vectors, *Y = leading axes of queries,
# K = independent quantizers (keys), N = vectors per quantizer, Π = rotation,
# S = Gaussian sketch, c = codebook, x̃ = dequantized x.

import dataclasses
import math

from absl.testing import absltest
from absl.testing import parameterized
import conftest
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import turboquant_jax as tq
from turboquant_jax.quant import rotation as rotation_lib

_QJL_SCALE = math.sqrt(math.pi / 2)

# (method, bits) covering every code path: mse, prod without an mse stage
# (b = 1), prod with one, and the bare sketch.
_METHOD_BITS = (("mse", 1), ("mse", 3), ("prod", 1), ("prod", 3), ("qjl", 1))

_quantize = jax.jit(tq.quantize)
_dequantize = jax.jit(tq.dequantize)
_inner_product = jax.jit(tq.inner_product)


def _round_trip(q, x):
  return _dequantize(q, _quantize(q, x))


def _assert_tree_equal(a, b):
  """Same structure (static fields included) and bit-identical leaves."""
  la, ta = jax.tree_util.tree_flatten(a)
  lb, tb = jax.tree_util.tree_flatten(b)
  assert ta == tb, (ta, tb)
  for u, v in zip(la, lb):
    np.testing.assert_array_equal(u, v)


def _pair_errors(method, dim, bits, num_keys, num_vectors, rho, seed,
                 x_norm=1.0, y_norm=1.0, **kwargs):
  """Errors <y, x̃> - <y, x> of K independent quantizers on N pairs each.

  Each quantizer (own Π and S) quantizes its own N vectors x, paired with
  queries y at <x̂, ŷ> = rho (rho=None: y independent of x). Returns f64[K, N].
  """
  k_quant, k_data, k_query = jax.random.split(jax.random.key(seed), 3)
  keys = jax.random.split(k_quant, num_keys)
  qs = jax.vmap(lambda k: tq.make_quantizer(k, dim, bits, method,
                                            **kwargs))(keys)
  shape = (num_keys, num_vectors)
  if rho is None:
    x = conftest.random_unit_vectors(k_data, shape, dim)
    y = conftest.random_unit_vectors(k_query, shape, dim)
  else:
    x, y = conftest.correlated_pairs(k_data, shape, dim, rho)
  x, y = x * x_norm, y * y_norm

  @jax.jit
  def errors(qs, x, y):
    x_hat = jax.vmap(_round_trip)(qs, x)
    return jnp.sum(y * x_hat, axis=-1) - jnp.sum(y * x, axis=-1)

  return np.asarray(errors(qs, x, y), np.float64)


def _identity_rotation(q):
  """q with Π = I, so that the codes can be worked out by hand."""
  eye = jnp.eye(q.dim, dtype=jnp.float32)
  return dataclasses.replace(
      q, rotation=dataclasses.replace(q.rotation, matrix=eye))


def _reference_dequantize(q, x):
  """Algorithms 1 and 2 and QJL written out in float64 numpy from q's Π, S, c.

  The prod residual is sketched in the rotated domain (S Π has the law of S),
  as the module docstring describes.
  """
  x = np.asarray(x, np.float64)
  norm = np.linalg.norm(x, axis=-1, keepdims=True)
  c = np.asarray(q.centroids, np.float64)
  if q.method == "qjl":
    s = np.asarray(q.sketch, np.float64)
    signs = np.where(x @ s.T >= 0, 1.0, -1.0)
    return _QJL_SCALE / s.shape[0] * norm * (signs @ s)
  pi = np.asarray(rotation_lib.as_matrix(q.rotation), np.float64)
  y = x @ pi.T                                          # Π x
  y_mse = np.zeros_like(y)
  if c.size:
    t = np.asarray(q.thresholds, np.float64)
    idx = np.sum(y[..., None] / norm[..., None] > t, axis=-1)
    y_mse = norm * c[idx]
    if q.norm_correction:
      y_mse *= 1 / np.linalg.norm(c[idx], axis=-1, keepdims=True)
  if q.method == "prod":
    s = np.asarray(q.sketch, np.float64)
    r = y - y_mse
    gamma = np.linalg.norm(r, axis=-1, keepdims=True)
    signs = np.where(r @ s.T >= 0, 1.0, -1.0)
    y_mse = y_mse + _QJL_SCALE / s.shape[0] * gamma * (signs @ s)
  return y_mse @ pi                                     # Πᵀ (...)


class HandCheckedTest(parameterized.TestCase):
  """At D = 3 the 1-bit codebook is ±1/2 and the 2-bit one ±1/4, ±3/4."""

  def test_one_bit_identity_rotation(self):
    # Given Π = I and x = (3, -4, 0): ‖x‖ = 5, x/‖x‖ = (0.6, -0.8, 0).
    q = _identity_rotation(tq.make_quantizer(jax.random.key(0), 3, 1))
    x = jnp.array([3.0, -4.0, 0.0])
    # When quantized.
    qt = tq.quantize(q, x)
    # Then the indices are (1, 0, 0): the threshold is 0 and 0 is not > 0.
    # Packed (b = 1, k = 8, W = 1): 1 | 0<<1 | 0<<2 = 1.
    np.testing.assert_array_equal(qt.codes, [1])
    np.testing.assert_allclose(qt.norms, 5.0, rtol=1e-7)
    # And x̃ = 5 · (1/2, -1/2, -1/2).
    np.testing.assert_allclose(tq.dequantize(q, qt), [2.5, -2.5, -2.5],
                               rtol=1e-6)
    # And <(1, 1, 1), x̃> = -2.5.
    np.testing.assert_allclose(
        tq.inner_product(q, qt, jnp.ones((3,))), -2.5, rtol=1e-6)

  def test_two_bit_identity_rotation(self):
    # Given Π = I and x = (2, -1, 2): ‖x‖ = 3, x/‖x‖ = (2/3, -1/3, 2/3);
    # thresholds -1/2, 0, 1/2 -> indices (3, 1, 3) -> centroids (3/4, -1/4,
    # 3/4). Packed (b = 2, k = 4, W = 1): 3 | 1<<2 | 3<<4 = 55.
    q = _identity_rotation(tq.make_quantizer(jax.random.key(0), 3, 2))
    qt = tq.quantize(q, jnp.array([2.0, -1.0, 2.0]))
    np.testing.assert_array_equal(qt.codes, [55])
    np.testing.assert_allclose(tq.dequantize(q, qt), [2.25, -0.75, 2.25],
                               rtol=1e-6)

  def test_norm_correction_identity_rotation(self):
    # Given the 1-bit case above: ‖c[idx]‖ = ‖(1/2, -1/2, -1/2)‖ = √3/2, so
    # the stored scale is 5 / (√3/2) = 10/√3 and x̃ = (5/√3)·(1, -1, -1),
    # whose norm is 5 = ‖x‖.
    q = _identity_rotation(
        tq.make_quantizer(jax.random.key(0), 3, 1, norm_correction=True))
    qt = tq.quantize(q, jnp.array([3.0, -4.0, 0.0]))
    np.testing.assert_allclose(qt.norms, 10 / math.sqrt(3), rtol=1e-6)
    x_hat = tq.dequantize(q, qt)
    np.testing.assert_allclose(x_hat, 5 / math.sqrt(3) * np.array([1, -1, -1]),
                               rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(x_hat), 5.0, rtol=1e-6)

  def test_one_bit_haar_is_half_signs_rotated_back(self):
    # Given a real Haar Π at D = 3: x̃ = ‖x‖ · Πᵀ (sign(Π x) / 2).
    q = tq.make_quantizer(jax.random.key(1), 3, 1)
    x = np.array([[0.3, -1.2, 2.0], [-4.0, 0.5, 0.25]])
    pi = np.asarray(rotation_lib.as_matrix(q.rotation), np.float64)
    expected = (np.linalg.norm(x, axis=-1, keepdims=True)
                * (np.sign(x @ pi.T) / 2) @ pi)
    np.testing.assert_allclose(tq.dequantize(q, tq.quantize(q, x)), expected,
                               rtol=1e-5, atol=1e-6)

  @parameterized.parameters(
      dict(method="mse", bits=2), dict(method="mse", bits=6),
      dict(method="mse", bits=3, norm_correction=True),
      dict(method="mse", bits=4, rotation="hadamard"),
      dict(method="prod", bits=1), dict(method="prod", bits=3),
      dict(method="prod", bits=2, norm_correction=True),
      dict(method="qjl", bits=1), dict(method="qjl", bits=1, sketch_dim=24))
  def test_matches_numpy_reference(self, method, bits, **kwargs):
    # Given a quantizer at D = 16 and x of arbitrary norms.
    q = tq.make_quantizer(jax.random.key(bits), 16, bits, method, **kwargs)
    x = jax.random.normal(jax.random.key(100 + bits), (8, 16)) * 3
    # Then x̃ equals the algorithm written out in float64 numpy.
    np.testing.assert_allclose(_round_trip(q, x),
                               _reference_dequantize(q, x), rtol=1e-4,
                               atol=1e-4)

  @parameterized.product(bits=(1, 3, 8), rotation=("haar", "hadamard"))
  def test_norm_correction_preserves_norm(self, bits, rotation):
    # Given vectors of norms spread over four decades.
    q = tq.make_quantizer(jax.random.key(bits), 64, bits,
                          norm_correction=True, rotation=rotation)
    x = jax.random.normal(jax.random.key(1), (2, 5, 64))
    x = x * jnp.logspace(-2, 2, 5)[:, None]
    # Then ‖x̃‖ = ‖x‖.
    np.testing.assert_allclose(jnp.linalg.norm(_round_trip(q, x), axis=-1),
                               jnp.linalg.norm(x, axis=-1), rtol=1e-5)


class DistortionTest(parameterized.TestCase):
  """E‖x - x̃‖² / ‖x‖² = D_mse(d, b) (PAPER.md section 2) for mse."""

  @parameterized.parameters(
      (128, 1, "haar", 4000), (128, 2, "haar", 4000),
      (128, 3, "haar", 4000), (128, 4, "haar", 4000),
      (1536, 1, "haar", 1000), (1536, 2, "haar", 1000),
      (1536, 3, "haar", 1000), (1536, 4, "haar", 1000),
      (128, 1, "hadamard", 4000), (128, 2, "hadamard", 4000),
      (128, 3, "hadamard", 4000), (128, 4, "hadamard", 4000))
  def test_mse_matches_exact_value(self, dim, bits, rotation, num):
    # Given random directions with norms in [0.1, 10].
    k_q, k_x, k_r = jax.random.split(jax.random.key(dim + bits), 3)
    q = tq.make_quantizer(k_q, dim, bits, rotation=rotation)
    x = conftest.random_unit_vectors(k_x, (num,), dim)
    x = x * jnp.exp(jax.random.uniform(k_r, (num, 1), minval=-2.3,
                                       maxval=2.3))
    # When quantized and dequantized.
    x_hat = _round_trip(q, x)
    err = np.asarray(jnp.sum((x - x_hat) ** 2, -1) / jnp.sum(x * x, -1))
    # Then the mean relative error is D_mse(d, b). The estimate's standard
    # error is <= 0.45% here, so 2% is > 4 s.e. The randomized Hadamard
    # transform is not exactly Haar, hence 3% for it (for these isotropic
    # inputs it should in fact do as well as Haar).
    tol = 0.02 if rotation == "haar" else 0.03
    np.testing.assert_allclose(err.mean(), tq.codebook_mse(dim, bits),
                               rtol=tol)


class _StatisticsTestCase(parameterized.TestCase):

  def _assert_unbiased(self, errors):
    # One mean per quantizer: the K means are independent, the N errors of
    # one quantizer are not (they share S).
    mean, se = conftest.mean_and_standard_error(errors.mean(axis=1))
    self.assertLess(abs(mean), 3 * se, f"{mean=} {se=}")


# The mark goes on the class: parameterized's generated methods do not carry
# marks put on the decorated method.
@pytest.mark.slow
class SlowInnerProductStatisticsTest(_StatisticsTestCase):

  @parameterized.product(bits=(1, 2, 3, 4), rho=(0.3, 0.9))
  def test_prod_is_unbiased_large(self, bits, rho):
    # Given 1000 quantizers x 100 pairs = 1e5 pairs at D = 128.
    errors = _pair_errors("prod", 128, bits, 1000, 100, rho,
                          seed=100 + 10 * bits + int(10 * rho))
    self._assert_unbiased(errors)

  @parameterized.parameters(16, 1024)
  def test_qjl_unbiased_large(self, sketch_dim):
    # Given 1000 sketches x 100 pairs at D = 128, <k̂, q̂> = 0.9.
    errors = _pair_errors("qjl", 128, 1, 1000, 100, 0.9, seed=sketch_dim,
                          sketch_dim=sketch_dim)
    self._assert_unbiased(errors)


class InnerProductStatisticsTest(_StatisticsTestCase):

  @parameterized.parameters(
      dict(bits=1), dict(bits=2), dict(bits=3), dict(bits=4),
      dict(bits=3, norm_correction=True), dict(bits=2, rotation="hadamard"))
  def test_prod_is_unbiased(self, bits, **kwargs):
    # Given 250 quantizers x 40 pairs at D = 64 with <x, y> = 0.8.
    errors = _pair_errors("prod", 64, bits, 250, 40, 0.8, seed=10 + bits,
                          **kwargs)
    # Then the mean error is within 3 standard errors of 0.
    self._assert_unbiased(errors)

  def test_same_check_detects_the_bias_of_mse(self):
    # Given the same design for mse at 1 bit, the mean error is
    # (1 - D_mse - 1)·0.8 ≈ -0.29: far outside 3 s.e.
    errors = _pair_errors("mse", 64, 1, 250, 40, 0.8, seed=3)
    mean, se = conftest.mean_and_standard_error(errors.mean(axis=1))
    self.assertGreater(abs(mean), 30 * se)
    np.testing.assert_allclose(mean, -0.8 * tq.codebook_mse(64, 1), rtol=0.02)

  @parameterized.parameters(1, 2, 3, 4)
  def test_prod_variance_matches_theory_and_bound(self, bits):
    # Given independent unit x, y at D = M = 128 (100 quantizers x 400).
    dim = 128
    errors = _pair_errors("prod", dim, bits, 100, 400, None, seed=20 + bits)
    d_prod = np.mean(errors**2)
    # Conditional on the residual r (γ = ‖r‖), the QJL error has variance
    # (π/2·γ²‖y‖² - <y, r>²)/M; with E γ² = D_mse(b-1) (D_mse(0) = 1) and
    # E<y, r>² = γ²/D: D·D_prod = (π/2 - 1/D)·D_mse(b-1) ≈ π/2·D_mse(b-1).
    mse_prev = 1.0 if bits == 1 else tq.codebook_mse(dim, bits - 1)
    expected = (math.pi / 2 - 1 / dim) * mse_prev
    # The relative s.e. of a mean square of 4e4 errors is ~1%.
    np.testing.assert_allclose(dim * d_prod, expected, rtol=0.05)
    # And under Theorem 2: D_prod <= √3·π²·‖y‖²/D · 4^-b.
    self.assertLess(d_prod, math.sqrt(3) * math.pi**2 / dim * 4.0**-bits)

  @parameterized.parameters(1, 2, 3, 4)
  def test_mse_shrinks_inner_products(self, bits):
    # Given y = ρ x + √(1-ρ²) z with ρ ~ U(-1, 1) at D = 128.
    dim, num = 128, 10000
    k_q, k_xy, k_rho = jax.random.split(jax.random.key(30 + bits), 3)
    rho = jax.random.uniform(k_rho, (num,), minval=-1, maxval=1)
    x, y = conftest.correlated_pairs(k_xy, (num,), dim, rho)
    q = tq.make_quantizer(k_q, dim, bits)
    est = np.asarray(jnp.sum(y * _round_trip(q, x), axis=-1), np.float64)
    # When <y, x̃> is regressed on <y, x> = ρ.
    slope, intercept = np.polyfit(np.asarray(rho, np.float64), est, 1)
    # Then the slope is E<x, x̃> = 1 - D_mse(b) (by the centroid condition
    # E[t·Q(t)] = E[Q(t)²]); s.e. ~0.1%.
    np.testing.assert_allclose(slope, 1 - tq.codebook_mse(dim, bits),
                               rtol=0.01)
    self.assertLess(abs(intercept), 0.005)
    if bits == 1:
      # The paper's 2/π (the d → ∞ value of 1 - D_mse(1)).
      np.testing.assert_allclose(slope, 2 / math.pi, rtol=0.02)

  @parameterized.parameters(32, 256)
  def test_qjl_unbiased_with_variance_under_bound(self, sketch_dim):
    # Given stored keys of norm 3 and queries of norm 0.5, <k̂, q̂> = 0.6,
    # D = 64, 200 sketches x 100 pairs.
    dim, rho, k_norm, q_norm = 64, 0.6, 3.0, 0.5
    errors = _pair_errors("qjl", dim, 1, 200, 100, rho, seed=sketch_dim,
                          x_norm=k_norm, y_norm=q_norm, sketch_dim=sketch_dim)
    self._assert_unbiased(errors)
    # Var = (π/2·‖q‖²‖k‖² - <q, k>²)/M <= π/(2M)·‖q‖²‖k‖².
    sq = (q_norm * k_norm) ** 2
    variance = np.mean(errors**2)
    np.testing.assert_allclose(
        variance, (math.pi / 2 * sq - (rho * q_norm * k_norm) ** 2)
        / sketch_dim, rtol=0.05)
    self.assertLess(variance, math.pi / (2 * sketch_dim) * sq)


class BitsPerCoordinateTest(parameterized.TestCase):

  @parameterized.parameters(
      # (128·4 code bits + 32 norm bits) / 128 = 4.25
      dict(dim=128, bits=4, method="mse", kwargs={}, expected=4.25),
      # b = 2 mse codes + 128 sign bits + two fp16 norms:
      # (128·2 + 128 + 16 + 16) / 128 = 3.25
      dict(dim=128, bits=3, method="prod",
           kwargs=dict(norm_dtype="float16"), expected=3.25),
      # prod at 1 bit: no codes, no mse norm: (128 + 32) / 128 = 1.25
      dict(dim=128, bits=1, method="prod", kwargs={}, expected=1.25),
      # 256 sign bits + a float32 norm: (256 + 32) / 128 = 2.25
      dict(dim=128, bits=1, method="qjl", kwargs=dict(sketch_dim=256),
           expected=2.25),
      # D = 50, b = 3: planes of ceil(50/4) = 13 and ceil(50/8) = 7 bytes,
      # (20·8 + 16) / 50 = 3.52
      dict(dim=50, bits=3, method="mse", kwargs=dict(norm_dtype="bfloat16"),
           expected=3.52))
  def test_hand_count(self, dim, bits, method, kwargs, expected):
    q = tq.make_quantizer(jax.random.key(0), dim, bits, method, **kwargs)
    qt = tq.quantize(q, jnp.ones((2, dim)))
    self.assertAlmostEqual(qt.bits_per_coordinate, expected, places=12)
    self.assertEqual(qt.bits_per_vector, round(expected * dim))


class PytreeAndTransformTest(parameterized.TestCase):

  @parameterized.parameters(*_METHOD_BITS)
  def test_quantizer_and_tensor_are_pytrees(self, method, bits):
    q = tq.make_quantizer(jax.random.key(0), 32, bits, method)
    qt = tq.quantize(q, jax.random.normal(jax.random.key(1), (4, 32)))
    for tree in (q, qt):
      leaves, treedef = jax.tree_util.tree_flatten(tree)
      again = jax.tree_util.tree_unflatten(treedef, leaves)
      self.assertIsInstance(again, type(tree))
      _assert_tree_equal(again, tree)
      # Through jit as an argument and as a result.
      _assert_tree_equal(jax.jit(lambda t: t)(tree), tree)
    # Static configuration is part of the tree structure, not a leaf.
    other = tq.make_quantizer(jax.random.key(0), 32, bits, method,
                              norm_dtype="float16")
    self.assertNotEqual(jax.tree_util.tree_structure(other),
                        jax.tree_util.tree_structure(q))

  @parameterized.parameters(*_METHOD_BITS)
  def test_jit_equals_eager(self, method, bits):
    q = tq.make_quantizer(jax.random.key(2), 64, bits, method)
    x = jax.random.normal(jax.random.key(3), (16, 64))
    y = jax.random.normal(jax.random.key(4), (5, 64))
    qt = tq.quantize(q, x)
    # Codes, signs and norms: bit for bit.
    _assert_tree_equal(jax.jit(tq.quantize)(q, x), qt)
    np.testing.assert_allclose(jax.jit(tq.dequantize)(q, qt),
                               tq.dequantize(q, qt), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(jax.jit(tq.inner_product)(q, qt, y),
                               tq.inner_product(q, qt, y), rtol=1e-6,
                               atol=1e-6)

  @parameterized.product(method_bits=_METHOD_BITS,
                         lead=((), (7,), (2, 3, 4)))
  def test_leading_shapes(self, method_bits, lead):
    method, bits = method_bits
    dim = 32
    q = tq.make_quantizer(jax.random.key(5), dim, bits, method)
    x = jax.random.normal(jax.random.key(6), (*lead, dim))
    # When quantized with leading shape *B.
    qt = _quantize(q, x)
    # Then every per-vector field has leading shape *B.
    self.assertEqual(qt.shape, lead)
    for arr in (qt.codes, qt.signs):
      if arr is not None:
        self.assertEqual(arr.shape[:-1], lead)
    for arr in (qt.norms, qt.residual_norms):
      if arr is not None:
        self.assertEqual(arr.shape, lead)
    self.assertEqual(_dequantize(q, qt).shape, (*lead, dim))
    # And the codes equal those of the flattened batch (norms to an ulp:
    # XLA may sum a row in a different order for a different batch shape).
    flat = _quantize(q, x.reshape(-1, dim))
    for name in ("codes", "signs"):
      if getattr(qt, name) is not None:
        np.testing.assert_array_equal(
            getattr(qt, name).reshape(getattr(flat, name).shape),
            getattr(flat, name))
    for name in ("norms", "residual_norms"):
      if getattr(qt, name) is not None:
        np.testing.assert_allclose(getattr(qt, name).reshape(-1),
                                   getattr(flat, name), rtol=1e-6)

  @parameterized.parameters(*_METHOD_BITS)
  def test_vmap_over_vectors(self, method, bits):
    q = tq.make_quantizer(jax.random.key(7), 32, bits, method)
    x = jax.random.normal(jax.random.key(8), (6, 32))
    batched = jax.vmap(tq.quantize, in_axes=(None, 0))(q, x)
    direct = tq.quantize(q, x)
    for name in ("codes", "signs"):
      if getattr(direct, name) is not None:
        np.testing.assert_array_equal(getattr(batched, name),
                                      getattr(direct, name))
    np.testing.assert_allclose(
        jax.vmap(tq.dequantize, in_axes=(None, 0))(q, batched),
        tq.dequantize(q, direct), rtol=1e-5, atol=1e-6)

  @parameterized.parameters(*_METHOD_BITS)
  def test_vmap_make_quantizer_over_keys(self, method, bits):
    # Given 3 keys, quantizers drawn under vmap, and a vmapped quantize.
    keys = jax.random.split(jax.random.key(9), 3)
    qs = jax.vmap(lambda k: tq.make_quantizer(k, 32, bits, method))(keys)
    x = jax.random.normal(jax.random.key(10), (3, 4, 32))
    qts = jax.vmap(tq.quantize)(qs, x)
    x_hat = jax.vmap(tq.dequantize)(qs, qts)
    for i in range(3):
      # Then each slice is what the i-th key's own quantizer gives.
      qi = tq.make_quantizer(keys[i], 32, bits, method)
      _assert_tree_equal(jax.tree.map(lambda a, i=i: a[i], qs), qi)
      qti = tq.quantize(qi, x[i])
      for name in ("codes", "signs"):
        if getattr(qti, name) is not None:
          np.testing.assert_array_equal(getattr(qts, name)[i],
                                        getattr(qti, name))
      np.testing.assert_allclose(x_hat[i], tq.dequantize(qi, qti), rtol=1e-5,
                                 atol=1e-6)
    # And different keys give different quantizers.
    drawn = qs.sketch if qs.rotation is None else qs.rotation.matrix
    self.assertGreater(np.max(np.abs(drawn[0] - drawn[1])), 0.1)

  @parameterized.parameters(*_METHOD_BITS)
  def test_low_precision_input_is_accepted(self, method, bits):
    q = tq.make_quantizer(jax.random.key(11), 32, bits, method)
    x = jax.random.normal(jax.random.key(12), (4, 32))
    for dtype in (jnp.bfloat16, jnp.float16):
      low = x.astype(dtype)
      # The input is upcast first: same result as quantizing it in float32.
      _assert_tree_equal(_quantize(q, low),
                         _quantize(q, low.astype(jnp.float32)))
      self.assertEqual(_dequantize(q, _quantize(q, low)).dtype, jnp.float32)

  @parameterized.parameters("float16", "bfloat16")
  def test_low_precision_norms(self, norm_dtype):
    q = tq.make_quantizer(jax.random.key(13), 32, 3, "prod",
                          norm_dtype=norm_dtype)
    ref = tq.make_quantizer(jax.random.key(13), 32, 3, "prod")
    x = jax.random.normal(jax.random.key(14), (4, 32))
    qt = _quantize(q, x)
    self.assertEqual(qt.norms.dtype, jnp.dtype(norm_dtype))
    self.assertEqual(qt.residual_norms.dtype, jnp.dtype(norm_dtype))
    # bfloat16 keeps 8 significant bits: relative rounding <= 2^-8.
    np.testing.assert_allclose(qt.norms, _quantize(ref, x).norms, rtol=2**-8)


class InnerProductTest(parameterized.TestCase):

  @parameterized.parameters(
      ("mse", 2, "haar"), ("mse", 4, "haar"), ("prod", 1, "haar"),
      ("prod", 3, "haar"), ("qjl", 1, "haar"), ("mse", 3, "hadamard"),
      ("prod", 2, "hadamard"))
  def test_equals_query_times_dequantized(self, method, bits, rotation):
    # Given stored x[2, 3, D] and queries y[4, 5, D] at D = 64.
    q = tq.make_quantizer(jax.random.key(bits), 64, bits, method,
                          rotation=rotation)
    x = conftest.random_unit_vectors(jax.random.key(15), (2, 3), 64) * 2
    y = jax.random.normal(jax.random.key(16), (4, 5, 64)) / 8
    qt = _quantize(q, x)
    # When scored from the codes.
    scores = _inner_product(q, qt, y)
    # Then the shape is [*Y, *B] and the values are y · x̃ᵀ.
    self.assertEqual(scores.shape, (4, 5, 2, 3))
    expected = np.einsum("abd,ijd->abij", np.asarray(y, np.float64),
                         np.asarray(_dequantize(q, qt), np.float64))
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-5)

  def test_single_query_single_vector(self):
    q = tq.make_quantizer(jax.random.key(0), 16, 2, "prod")
    qt = _quantize(q, jnp.ones((16,)))
    y = jnp.arange(16.0)
    score = _inner_product(q, qt, y)
    self.assertEqual(score.shape, ())
    np.testing.assert_allclose(score, y @ _dequantize(q, qt), rtol=1e-5)


class ValidationTest(parameterized.TestCase):
  """Every error is a ValueError at trace time, so also inside jax.jit."""

  def _assert_raises_eager_and_jit(self, regex, fn, *args):
    with self.assertRaisesRegex(ValueError, regex):
      fn(*args)
    with self.assertRaisesRegex(ValueError, regex):
      jax.jit(fn)(*args)

  @parameterized.parameters(*_METHOD_BITS)
  def test_wrong_last_dim(self, method, bits):
    q = tq.make_quantizer(jax.random.key(0), 32, bits, method)
    self._assert_raises_eager_and_jit(r"x\.shape=\(4, 31\)", tq.quantize, q,
                                      jnp.zeros((4, 31)))
    self._assert_raises_eager_and_jit(r"x\.shape=\(\)", tq.quantize, q,
                                      jnp.zeros(()))
    qt = tq.quantize(q, jnp.ones((4, 32)))
    self._assert_raises_eager_and_jit(r"y\.shape=\(2, 33\)", tq.inner_product,
                                      q, qt, jnp.zeros((2, 33)))

  @parameterized.parameters(jnp.int32, jnp.uint8, jnp.bool_)
  def test_non_float_input(self, dtype):
    q = tq.make_quantizer(jax.random.key(0), 32, 2)
    self._assert_raises_eager_and_jit(r"x\.dtype", tq.quantize, q,
                                      jnp.ones((4, 32), dtype))
    qt = tq.quantize(q, jnp.ones((4, 32)))
    self._assert_raises_eager_and_jit(r"y\.dtype", tq.inner_product, q, qt,
                                      jnp.ones((4, 32), dtype))

  @parameterized.parameters(
      dict(bits=0, method="mse"), dict(bits=9, method="mse"),
      dict(bits=9.0, method="mse"), dict(bits=-1, method="prod"),
      dict(bits=True, method="mse"), dict(bits=2, method="qjl"),
      dict(bits=0, method="qjl"), dict(bits=9, method="prod"))
  def test_bits_out_of_range(self, bits, method):
    make = lambda k: tq.make_quantizer(k, 32, bits, method)
    self._assert_raises_eager_and_jit("bits", make, jax.random.key(0))

  @parameterized.parameters(float("inf"), float("nan"))
  def test_non_finite_bits(self, bits):
    # A non-finite bit width is user input like any other: ValueError naming
    # bits (it reaches split_for_bits, whose math.floor raises OverflowError
    # for inf and a ValueError not naming bits for nan).
    with self.assertRaisesRegex(ValueError, "bits"):
      tq.make_quantizer(jax.random.key(0), 32, bits)

  def test_bad_method_dim_and_options(self):
    key = jax.random.key(0)
    with self.assertRaisesRegex(ValueError, "method"):
      tq.make_quantizer(key, 32, 2, "kmeans")
    with self.assertRaisesRegex(ValueError, "dim=2"):
      tq.make_quantizer(key, 2, 2)
    with self.assertRaisesRegex(ValueError, "norm_dtype"):
      tq.make_quantizer(key, 32, 2, norm_dtype="float64")
    with self.assertRaisesRegex(ValueError, "sketch_dim"):
      tq.make_quantizer(key, 32, 2, "prod", sketch_dim=64)
    with self.assertRaisesRegex(ValueError, "sketch_dim"):
      tq.make_quantizer(key, 32, 1, "qjl", sketch_dim=0)

  @parameterized.parameters("mse", "prod")
  def test_hadamard_needs_power_of_two(self, method):
    make = lambda k: tq.make_quantizer(k, 96, 2, method, rotation="hadamard")
    self._assert_raises_eager_and_jit("dim=96", make, jax.random.key(0))

  def test_mismatched_quantizer_and_tensor(self):
    key = jax.random.key(0)
    q = tq.make_quantizer(key, 32, 2)
    qt = tq.quantize(q, jnp.ones((4, 32)))
    y = jnp.ones((3, 32))
    for other in (tq.make_quantizer(key, 32, 3),
                  tq.make_quantizer(key, 32, 2, "prod"),
                  tq.make_quantizer(key, 64, 2)):
      self._assert_raises_eager_and_jit("does not match", tq.dequantize,
                                        other, qt)
      if other.dim == 32:
        self._assert_raises_eager_and_jit("does not match", tq.inner_product,
                                          other, qt, y)


class ZeroAndNonFiniteTest(parameterized.TestCase):

  @parameterized.product(
      [dict(method_bits=mb, rotation="haar") for mb in _METHOD_BITS]
      + [dict(method_bits=mb, rotation="hadamard")
         for mb in (("mse", 3), ("prod", 1), ("prod", 3))],
      norm_correction=(False, True))
  def test_zero_vectors_round_trip_to_zero(self, method_bits, norm_correction,
                                           rotation):
    method, bits = method_bits
    q = tq.make_quantizer(jax.random.key(1), 16, bits, method,
                          norm_correction=norm_correction, rotation=rotation)
    # Given zero vectors mixed with a non-zero one.
    x = jnp.zeros((3, 16)).at[1].set(jnp.arange(16.0) - 7.5)
    qt = tq.quantize(q, x)
    x_hat = tq.dequantize(q, qt)
    # Then they come back exactly zero, with nothing non-finite anywhere.
    for leaf in jax.tree.leaves(qt):
      self.assertTrue(np.all(np.isfinite(np.asarray(leaf, np.float64))))
    np.testing.assert_array_equal(x_hat[0], np.zeros(16))
    np.testing.assert_array_equal(x_hat[2], np.zeros(16))
    self.assertTrue(np.all(np.isfinite(x_hat)))
    scores = tq.inner_product(q, qt, jnp.ones((2, 16)))
    np.testing.assert_array_equal(scores[:, 0], [0.0, 0.0])
    np.testing.assert_array_equal(scores[:, 2], [0.0, 0.0])

  @parameterized.product(method_bits=_METHOD_BITS,
                         bad=(float("nan"), float("inf"), float("-inf")))
  def test_eager_quantize_rejects_non_finite(self, method_bits, bad):
    method, bits = method_bits
    q = tq.make_quantizer(jax.random.key(2), 16, bits, method)
    x = jnp.ones((3, 16)).at[2, 5].set(bad)
    with self.assertRaisesRegex(ValueError, "non-finite"):
      tq.quantize(q, x)

  @parameterized.parameters(*_METHOD_BITS)
  def test_under_jit_only_the_bad_vector_is_nan(self, method, bits):
    dim = 32
    q = tq.make_quantizer(jax.random.key(3), dim, bits, method)
    x = jax.random.normal(jax.random.key(4), (6, dim))
    # Given a NaN in vector 1 and an Inf in vector 4.
    bad = x.at[1, 3].set(jnp.nan).at[4, 0].set(jnp.inf)
    good_rows = np.array([0, 2, 3, 5])
    # When quantized under jit (which cannot raise).
    qt = _quantize(q, bad)
    x_hat = tq.dequantize(q, qt)
    # Then the bad vectors dequantize to all-NaN and score NaN.
    self.assertTrue(np.all(np.isnan(x_hat[np.array([1, 4])])))
    self.assertFalse(np.any(np.isnan(x_hat[good_rows])))
    scores = tq.inner_product(q, qt, jnp.ones((2, dim)))
    self.assertTrue(np.all(np.isnan(scores[:, np.array([1, 4])])))
    self.assertFalse(np.any(np.isnan(scores[:, good_rows])))
    # And the other vectors are stored exactly as without the bad ones: as a
    # batch of the same shape with the bad rows replaced...
    fixed = _quantize(q, bad.at[1].set(1.0).at[4].set(1.0))
    pick = lambda t: jax.tree.map(lambda a: np.asarray(a)[good_rows], t)
    _assert_tree_equal(pick(qt), pick(fixed))
    # ... and as when quantized alone (codes exactly, floats to an ulp).
    alone = _quantize(q, x[good_rows])
    for u, v in zip(jax.tree.leaves(pick(qt)), jax.tree.leaves(alone)):
      if jnp.issubdtype(u.dtype, jnp.integer):
        np.testing.assert_array_equal(u, v)
      else:
        np.testing.assert_allclose(u, v, rtol=1e-6)


if __name__ == "__main__":
  absltest.main()
