"""Tests for the Lloyd–Max codebooks (turboquant_jax.quant.codebook)."""

# Notation: d = vector dimension, b = bits per coordinate, c = centroids
# (sorted, 2**b of them), t = one coordinate of a uniform unit vector in R^d.

import importlib.resources
import math
import time

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
from scipy import integrate
from scipy import special
from scipy import stats

import turboquant_jax as tq
from turboquant_jax.quant import codebook as codebook_lib

# PAPER.md section 2: exact Lloyd–Max D_mse for b = 1..4.
_PAPER_MSE_D128 = (0.360889, 0.116000, 0.033966, 0.009315)
_PAPER_MSE_GAUSSIAN = (0.363380, 0.117482, 0.034548, 0.009501)
# The paper prints 6 decimals: rounding error <= 5e-7.
_PAPER_ATOL = 1e-6

# The solver stops once max |c - E[t | cell]| < 1e-10 / sqrt(d); allow twice
# that for the test's own quadrature error (~1e-12 in the same units).
_FIXED_POINT_TOL = 2e-10

_DIMS = (3, 50, 100, 128, 1536, 4096)   # 100 is not in the shipped table
_ALL_BITS = tuple(range(1, 9))


def _sphere_density(d: int):
  """f(t) = Γ(d/2)/(√π Γ((d-1)/2)) (1-t²)^((d-3)/2) on [-1, 1], in logs."""
  log_c = (special.gammaln(d / 2) - 0.5 * math.log(math.pi)
           - special.gammaln((d - 1) / 2))

  def f(t):
    if abs(t) > 1:
      return 0.0
    if d == 3:
      return 0.5
    if abs(t) == 1:
      return 0.0
    return math.exp(log_c + (d - 3) / 2 * math.log1p(-t * t))

  return f


def _support(d: int) -> tuple[float, float]:
  # Beyond 40 standard deviations (1/√d) the density is below e^-800: cut
  # there so that quad does not waste its samples on an all-zero tail.
  reach = min(1.0, 40 / math.sqrt(d))
  return -reach, reach


def _quad(g, lo, hi) -> float:
  val, _ = integrate.quad(g, lo, hi, epsabs=0, epsrel=1e-12, limit=200)
  return val


def _cells(d: int, c: np.ndarray):
  """Cell edges of nearest-centroid quantization with centroids c."""
  lo, hi = _support(d)
  mid = (c[:-1] + c[1:]) / 2
  return np.concatenate([[lo], mid]), np.concatenate([mid, [hi]])


def _conditional_means(d: int, c: np.ndarray) -> np.ndarray:
  """E[t | t in cell i] by numerical quadrature of the sphere density."""
  f = _sphere_density(d)
  means = []
  for lo, hi in zip(*_cells(d, c)):
    mass = _quad(f, lo, hi)
    means.append(_quad(lambda t: t * f(t), lo, hi) / mass)
  return np.array(means)


def _quadrature_mse(d: int, c: np.ndarray) -> float:
  """d · E[(t - Q(t))²] by quadrature: D_mse for a unit vector."""
  f = _sphere_density(d)
  total = 0.0
  for ci, lo, hi in zip(c, *_cells(d, c)):
    total += _quad(lambda t, ci=ci: (t - ci) ** 2 * f(t), lo, hi)
  return d * total


class HandCheckedTest(parameterized.TestCase):
  """At d = 3 the coordinate density is uniform: f(t) = Γ(3/2)/(√π Γ(1)) = 1/2.

  Lloyd–Max for a uniform law is the uniform quantizer: 2^b cells of width
  Δ = 2/2^b, centroids at the cell centres -1 + (i + 1/2)·Δ, and per
  coordinate error Δ²/12, so D_mse(3, b) = 3 · (2/2^b)² / 12 = 4^-b.
  """

  def test_dim3_one_bit_is_plus_minus_half(self):
    # Given the two cells [-1, 0] and [0, 1], each centroid is its midpoint.
    c = tq.codebook(3, 1)
    np.testing.assert_allclose(c, [-0.5, 0.5], rtol=0, atol=1e-12)

  def test_dim3_two_bits_is_quarters(self):
    # Δ = 1/2: cells [-1,-1/2], [-1/2,0], [0,1/2], [1/2,1] -> ±1/4, ±3/4.
    c = tq.codebook(3, 2)
    np.testing.assert_allclose(c, [-0.75, -0.25, 0.25, 0.75], rtol=0,
                               atol=1e-12)
    # The boundaries are the cell edges: midpoints of adjacent centroids.
    np.testing.assert_allclose(tq.boundaries(3, 2), [-0.5, 0.0, 0.5],
                               rtol=0, atol=1e-12)

  @parameterized.parameters(*_ALL_BITS)
  def test_dim3_is_uniform_quantizer(self, bits):
    # Given Δ = 2 / 2^b, the centroids are -1 + (i + 1/2)·Δ.
    delta = 2 / 2**bits
    expected = -1 + (np.arange(2**bits) + 0.5) * delta
    np.testing.assert_allclose(tq.codebook(3, bits), expected, rtol=0,
                               atol=1e-12)

  @parameterized.parameters(*_ALL_BITS)
  def test_dim3_mse_is_four_to_minus_b(self, bits):
    # D_mse(3, b) = 3 · (2/2^b)² / 12 = 4^-b.
    expected = 3 * (2 / 2**bits) ** 2 / 12
    self.assertAlmostEqual(expected, 4.0**-bits, places=15)
    np.testing.assert_allclose(tq.codebook_mse(3, bits), expected, rtol=1e-9)


class TestDensityTest(absltest.TestCase):
  """Checks the test's own density before the codebooks are judged by it."""

  def test_density_is_normalized_with_variance_one_over_d(self):
    for d in _DIMS:
      f = _sphere_density(d)
      lo, hi = _support(d)
      self.assertAlmostEqual(_quad(f, lo, hi), 1.0, places=10)
      self.assertAlmostEqual(_quad(lambda t, f=f: t * t * f(t), lo, hi) * d,
                             1.0, places=10)


class CodebookPropertiesTest(parameterized.TestCase):

  @parameterized.product(dim=_DIMS, bits=_ALL_BITS)
  def test_shape_sorted_symmetric_and_inside_support(self, dim, bits):
    # When the codebook is fetched.
    c = tq.codebook(dim, bits)
    # Then it has 2^b sorted float64 entries, symmetric about 0, in (-1, 1).
    self.assertEqual(c.shape, (2**bits,))
    self.assertEqual(c.dtype, np.float64)
    self.assertTrue(np.all(np.diff(c) > 0))
    np.testing.assert_array_equal(c, -c[::-1])
    self.assertLess(np.max(np.abs(c)), 1.0)
    b = tq.boundaries(dim, bits)
    np.testing.assert_allclose(b, (c[:-1] + c[1:]) / 2, rtol=0, atol=0)

  @parameterized.product(dim=(128, 1536, 4096), bits=_ALL_BITS)
  def test_values_scale_as_one_over_sqrt_dim(self, dim, bits):
    # Given √d·t -> N(0, 1) as d grows, √d·c tends to the Gaussian codebook.
    c = tq.codebook(dim, bits)
    deviation = np.max(np.abs(c * math.sqrt(dim) - tq.gaussian_codebook(bits)))
    # The deviation is O(1/d); 40/d is ~1.5x the worst case seen (b = 8).
    self.assertLess(deviation, 40 / dim)

  @parameterized.product(dim=_DIMS, bits=_ALL_BITS)
  def test_each_centroid_is_the_mean_of_its_cell(self, dim, bits):
    # Given the cells of the codebook (midpoint boundaries).
    c = tq.codebook(dim, bits)
    # When E[t | cell] is computed independently by quadrature of f.
    means = _conditional_means(dim, c)
    # Then c is a fixed point of the Lloyd iteration.
    np.testing.assert_allclose(c * math.sqrt(dim), means * math.sqrt(dim),
                               rtol=0, atol=_FIXED_POINT_TOL)

  @parameterized.parameters(*_ALL_BITS)
  def test_gaussian_centroid_is_mean_of_its_cell(self, bits):
    # E[Z | a < Z < b] = (φ(a) - φ(b)) / (Φ(b) - Φ(a)) for Z ~ N(0, 1).
    c = tq.gaussian_codebook(bits)
    edges = np.concatenate([[-np.inf], (c[:-1] + c[1:]) / 2, [np.inf]])
    lo, hi = edges[:-1], edges[1:]
    mass = stats.norm.sf(lo) - stats.norm.sf(hi)
    means = (stats.norm.pdf(lo) - stats.norm.pdf(hi)) / mass
    np.testing.assert_allclose(c, means, rtol=0, atol=_FIXED_POINT_TOL)

  @parameterized.parameters(1, 2, 3, 4)
  def test_mse_d128_matches_paper_table(self, bits):
    self.assertAlmostEqual(tq.codebook_mse(128, bits),
                           _PAPER_MSE_D128[bits - 1], delta=_PAPER_ATOL)

  @parameterized.parameters(1, 2, 3, 4)
  def test_gaussian_mse_matches_paper_table(self, bits):
    self.assertAlmostEqual(tq.gaussian_mse(bits),
                           _PAPER_MSE_GAUSSIAN[bits - 1], delta=_PAPER_ATOL)

  @parameterized.product(dim=(3, 50, 128, 1536), bits=(1, 2, 4, 8))
  def test_mse_matches_quadrature(self, dim, bits):
    # Given the codebook, D_mse = d · Σ_i ∫_cell_i (t - c_i)² f(t) dt.
    expected = _quadrature_mse(dim, tq.codebook(dim, bits))
    # atol: the library computes D as E[t²]·d - Σ(...), a difference of two
    # O(1) numbers, so it is exact to ~1e-12 absolute, not relative.
    np.testing.assert_allclose(tq.codebook_mse(dim, bits), expected,
                               rtol=1e-9, atol=1e-11)

  @parameterized.product(dim=_DIMS, bits=_ALL_BITS)
  def test_mse_within_paper_bounds(self, dim, bits):
    # Theorem 1: 4^-b <= D_mse <= √3·π/2 · 4^-b (d = 3 attains the lower).
    d_mse = tq.codebook_mse(dim, bits)
    self.assertGreaterEqual(d_mse, 4.0**-bits * (1 - 1e-9))
    self.assertLessEqual(d_mse, math.sqrt(3) * math.pi / 2 * 4.0**-bits)

  @parameterized.parameters(*_ALL_BITS)
  def test_mse_decreases_with_bits_and_approaches_gaussian(self, bits):
    if bits < 8:
      self.assertLess(tq.codebook_mse(128, bits + 1),
                      tq.codebook_mse(128, bits))
    # Finite d is slightly better than the Gaussian limit, by O(1/d).
    self.assertLess(tq.codebook_mse(128, bits), tq.gaussian_mse(bits))
    np.testing.assert_allclose(tq.codebook_mse(4096, bits),
                               tq.gaussian_mse(bits), rtol=1e-3)


class ShippedTableTest(parameterized.TestCase):

  def _table(self):
    ref = importlib.resources.files("turboquant_jax.quant").joinpath(
        "codebook_table.npz")
    with ref.open("rb") as f, np.load(f) as data:
      return {k: data[k] for k in data.files}

  def test_table_holds_every_listed_dim_and_bits(self):
    table = self._table()
    expected = {f"d{d}_b{b}" for d in codebook_lib.TABLE_DIMS
                for b in _ALL_BITS}
    self.assertEqual(set(table), expected)

  @parameterized.parameters((3, 1), (50, 3), (64, 6), (128, 4), (200, 2),
                            (768, 5), (1536, 8), (4096, 7))
  def test_codebook_is_shipped_entry_and_equals_fresh_solve(self, dim, bits):
    # Given the shipped entry and a from-scratch solve.
    shipped = self._table()[f"d{dim}_b{bits}"]
    fresh = codebook_lib.solve_codebook(dim, bits)
    # Then codebook() returns the shipped entry, and it equals the solve.
    np.testing.assert_array_equal(tq.codebook(dim, bits), shipped)
    np.testing.assert_allclose(shipped * math.sqrt(dim), fresh * math.sqrt(dim),
                               rtol=0, atol=1e-12)


class CacheTest(absltest.TestCase):

  def test_repeated_calls_return_same_read_only_object(self):
    for dim in (128, 100):   # shipped, and solved on demand
      first = tq.codebook(dim, 3)
      self.assertIs(tq.codebook(dim, 3), first)
      self.assertIs(tq.codebook(np.int64(dim), np.int32(3)), first)
      self.assertFalse(first.flags.writeable)
      with self.assertRaises(ValueError):
        first[0] = 0.0
    self.assertIs(tq.gaussian_codebook(3), tq.gaussian_codebook(3))

  def test_cached_calls_are_fast(self):
    tq.codebook(1536, 8)
    start = time.perf_counter()
    for _ in range(1000):
      tq.codebook(1536, 8)
    # A cache hit is a dict lookup plus argument checks: ~1 µs. 50 ms for a
    # thousand leaves room for a slow CI machine but not for any re-solve.
    self.assertLess(time.perf_counter() - start, 0.05)


class PublishedAndGaussianTest(parameterized.TestCase):

  def test_gaussian_one_bit_is_plus_minus_sqrt_two_over_pi(self):
    # E[|Z|] = √(2/π): the 1-bit centroid is the mean of a half-normal.
    r = math.sqrt(2 / math.pi)
    np.testing.assert_allclose(tq.gaussian_codebook(1), [-r, r], rtol=1e-12)

  @parameterized.parameters(64, 128, 1536)
  def test_published_codebooks_match_gaussian_to_three_digits(self, dim):
    for bits in (1, 2):
      # Given the printed values (±0.453, ±1.51) in units of 1/√d, they agree
      # with the exact N(0, 1) codebook (±0.45278, ±1.51042) to 1e-3.
      np.testing.assert_allclose(
          tq.published_codebook(dim, bits),
          tq.gaussian_codebook(bits) / math.sqrt(dim), rtol=0,
          atol=1e-3 / math.sqrt(dim))

  def test_published_codebook_rejects_unprinted_bits(self):
    with self.assertRaisesRegex(ValueError, "bits"):
      tq.published_codebook(128, 3)


class ValidationTest(parameterized.TestCase):

  @parameterized.parameters(0, 9, -1, 2.5, True, False, "2", None)
  def test_bad_bits(self, bits):
    for fn in (lambda: tq.codebook(128, bits),
               lambda: tq.boundaries(128, bits),
               lambda: tq.codebook_mse(128, bits),
               lambda: codebook_lib.solve_codebook(128, bits),
               lambda: tq.gaussian_codebook(bits),
               lambda: tq.published_codebook(128, bits)):
      with self.assertRaisesRegex(ValueError, "bits"):
        fn()

  @parameterized.parameters(2, 1, 0, -5, 2.0, 128.5, True)
  def test_bad_dim(self, dim):
    for fn in (lambda: tq.codebook(dim, 2),
               lambda: codebook_lib.solve_codebook(dim, 2),
               lambda: tq.published_codebook(dim, 2)):
      with self.assertRaisesRegex(ValueError, "dim"):
        fn()


if __name__ == "__main__":
  absltest.main()
