"""Tests for fractional bit widths by the outlier split (quant/split.py)."""

# Notation: D = dim, O = outlier channels, D - O = regular channels, N =
# vectors, *B / *Y = leading axes of stored vectors / queries. A split
# "O@hi + (D-O)@lo" spends hi bits on each outlier and lo on each regular
# channel.

import math

from absl.testing import absltest
from absl.testing import parameterized
import conftest
import jax
import jax.numpy as jnp
import numpy as np

import turboquant_jax as tq
from turboquant_jax.quant import rotation
from turboquant_jax.quant import split


def _split_mse(sq, x):
  x_hat = tq.dequantize(sq, jax.jit(tq.quantize)(sq, x))
  return float(jnp.mean(jnp.sum((x - x_hat) ** 2, -1)
                        / jnp.sum(x * x, -1)))


class ConstructionTest(parameterized.TestCase):

  def test_two_and_a_half_bits_is_half_and_half(self):
    # When asking for 2.5 bits at D = 128.
    sq = tq.make_quantizer(jax.random.key(0), 128, 2.5)
    # Then round(0.5·128) = 64 channels get 3 bits and 64 get 2.
    self.assertIsInstance(sq, tq.SplitQuantizer)
    self.assertEqual((sq.outlier.dim, sq.outlier.bits), (64, 3))
    self.assertEqual((sq.regular.dim, sq.regular.bits), (64, 2))
    self.assertEqual(sq.bits, 2.5)
    # And the outliers are channels 0..63 until set from data.
    np.testing.assert_array_equal(sq.outlier_channels, np.arange(64))
    np.testing.assert_array_equal(sq.regular_channels, np.arange(64, 128))

  def test_paper_split_is_32_at_3_plus_96_at_2(self):
    # Given the paper's "2.5-bit" cache: 32 outliers at 3 bits, 96 at 2 bits
    # and fp16 norms.
    sq = tq.make_split_quantizer(jax.random.key(1), 128, 3, 2, 32,
                                 norm_dtype="float16")
    self.assertEqual((sq.outlier.dim, sq.outlier.bits), (32, 3))
    self.assertEqual((sq.regular.dim, sq.regular.bits), (96, 2))
    # Then the code bits are (32·3 + 96·2)/128 = 2.25 ...
    self.assertEqual(sq.bits, 2.25)
    # ... and with both fp16 norms (32·3 + 96·2 + 16 + 16)/128 = 2.5.
    sqt = tq.quantize(sq, jnp.ones((3, 128)))
    self.assertEqual(sqt.bits_per_vector, 320)
    self.assertEqual(sqt.bits_per_coordinate, 2.5)
    # And asking make_quantizer for 2.25 bits gives the same split.
    same = tq.make_quantizer(jax.random.key(1), 128, 2.25)
    self.assertEqual((same.outlier.dim, same.outlier.bits,
                      same.regular.dim, same.regular.bits), (32, 3, 96, 2))

  def test_bits_per_coordinate_with_float32_norms(self):
    # (64·3 + 64·2 + 32 + 32) / 128 = 3.0
    sq = tq.make_quantizer(jax.random.key(2), 128, 2.5)
    self.assertEqual(tq.quantize(sq, jnp.ones((128,))).bits_per_coordinate,
                     3.0)

  @parameterized.parameters(
      # (D, bits) -> (O, hi, lo) with O = round(frac·D) and lo + O/D = bits.
      (128, 2.5, (64, 3, 2)), (128, 2.25, (32, 3, 2)),
      (128, 3.5, (64, 4, 3)), (8, 2.5, (4, 3, 2)), (8, 7.5, (4, 8, 7)),
      (10, 1.1, (1, 2, 1)), (3, 1 + 2 / 3, (2, 2, 1)))
  def test_split_for_bits(self, dim, bits, expected):
    self.assertEqual(split.split_for_bits(dim, bits), expected)

  @parameterized.parameters(
      (8, 2.3),      # 2 + 2/8 = 2.25 and 2 + 3/8 = 2.375: 2.3 unreachable
      (8, 0.5),      # floor 0: no 0-bit quantizer
      (8, 8.5),      # 9 bits for the outliers
      (8, 2.01),     # round(0.08) = 0 outlier channels
      (8, 2.99),     # round(7.92) = 8 = D outlier channels
      (128, 2.3))    # 2 + 38/128 = 2.296875
  def test_split_for_bits_rejects(self, dim, bits):
    with self.assertRaisesRegex(ValueError, "bits"):
      split.split_for_bits(dim, bits)
    with self.assertRaisesRegex(ValueError, "bits"):
      tq.make_quantizer(jax.random.key(0), dim, bits)

  def test_integer_valued_float_bits_give_a_plain_quantizer(self):
    q = tq.make_quantizer(jax.random.key(0), 32, 3.0)
    self.assertIsInstance(q, tq.Quantizer)
    self.assertEqual(q.bits, 3)

  def test_outlier_channels_are_sorted_and_complemented(self):
    sq = tq.make_split_quantizer(jax.random.key(3), 16, 3, 2,
                                 jnp.array([12, 3, 9]))
    np.testing.assert_array_equal(sq.outlier_channels, [3, 9, 12])
    np.testing.assert_array_equal(
        sq.regular_channels, [0, 1, 2, 4, 5, 6, 7, 8, 10, 11, 13, 14, 15])


class ChannelSelectionTest(parameterized.TestCase):

  def test_select_outliers_finds_planted_channels(self):
    # Given 32 planted channels with 10x the scale of the other 96.
    rng = np.random.default_rng(0)
    planted = np.sort(rng.choice(128, 32, replace=False))
    scale = np.ones(128, np.float32)
    scale[planted] = 10.0
    x = jax.random.normal(jax.random.key(4), (500, 128)) * scale
    # Then the top-32 channels by energy are exactly those, ascending.
    chosen = tq.select_outliers(x, 32)
    self.assertEqual(chosen.dtype, jnp.int32)
    np.testing.assert_array_equal(chosen, planted)

  def test_select_outliers_per_head(self):
    # Given two heads [2, N, D] with different planted channels.
    x = jax.random.normal(jax.random.key(5), (2, 300, 16))
    x = x.at[0, :, jnp.array([1, 7])].multiply(8.0)
    x = x.at[1, :, jnp.array([15, 2])].multiply(8.0)
    np.testing.assert_array_equal(tq.select_outliers(x, 2), [[1, 7], [2, 15]])

  def test_with_outlier_channels_moves_the_extra_bits(self):
    # Given data whose energy sits in 32 planted channels.
    rng = np.random.default_rng(1)
    planted = np.sort(rng.choice(128, 32, replace=False))
    scale = np.ones(128, np.float32)
    scale[planted] = 6.0
    x = jax.random.normal(jax.random.key(6), (2000, 128)) * scale
    sq = tq.make_split_quantizer(jax.random.key(7), 128, 3, 2, 32)
    # When the outlier set is taken from the data.
    moved = tq.with_outlier_channels(sq, tq.select_outliers(x, 32))
    # Then the planted channels get the 3-bit quantizer ...
    np.testing.assert_array_equal(moved.outlier_channels, planted)
    np.testing.assert_array_equal(
        moved.regular_channels, np.setdiff1d(np.arange(128), planted))
    sqt = tq.quantize(moved, x)
    direct = tq.quantize(sq.outlier, x[:, planted])
    np.testing.assert_array_equal(sqt.outlier.codes, direct.codes)
    # ... and the error falls. The planted channels hold 1152/1248 = 92% of
    # the energy: ≈ 0.92·D(32, 3) + 0.08·D(96, 2) ≈ 0.04 once they get 3
    # bits, against ≈ 0.09 with channels 0..31 at 3 bits (~3/4 of the
    # energy then sits in the 2-bit part).
    self.assertLess(_split_mse(moved, x), 0.6 * _split_mse(sq, x))

  def test_with_outlier_channels_is_independent_of_order(self):
    # Given one channel set in two orders.
    sq = tq.make_split_quantizer(jax.random.key(8), 16, 3, 2, 3)
    a = tq.with_outlier_channels(sq, jnp.array([12, 3, 9]))
    b = tq.with_outlier_channels(sq, jnp.array([3, 9, 12]))
    # Then it is the same quantizer: the documented ascending channels (as
    # make_split_quantizer sorts them) and the same reconstruction.
    np.testing.assert_array_equal(a.outlier_channels, [3, 9, 12])
    x = jax.random.normal(jax.random.key(9), (4, 16))
    np.testing.assert_array_equal(tq.dequantize(a, tq.quantize(a, x)),
                                  tq.dequantize(b, tq.quantize(b, x)))

  def test_select_and_set_under_jit(self):
    # Given data whose top-8 energy channels are 56..63.
    sq = tq.make_split_quantizer(jax.random.key(10), 64, 4, 2, 8)
    scale = jnp.ones((64,)).at[56:].set(5.0)
    x = jax.random.normal(jax.random.key(11), (50, 64)) * scale

    def fn(sq, x):
      moved = tq.with_outlier_channels(sq, tq.select_outliers(x, 8))
      return moved, tq.quantize(moved, x)

    moved_jit, sqt_jit = jax.jit(fn)(sq, x)
    moved, sqt = fn(sq, x)
    np.testing.assert_array_equal(moved_jit.outlier_channels,
                                  np.arange(56, 64))
    np.testing.assert_array_equal(moved_jit.regular_channels,
                                  moved.regular_channels)
    for name in ("outlier", "regular"):
      np.testing.assert_array_equal(getattr(sqt_jit, name).codes,
                                    getattr(sqt, name).codes)


class ReconstructionTest(parameterized.TestCase):

  def test_parts_go_back_to_their_channels(self):
    # Given outliers at unsorted channels (12, 3, 9) of D = 16.
    sq = tq.make_split_quantizer(jax.random.key(12), 16, 3, 2,
                                 jnp.array([12, 3, 9]))
    x = jax.random.normal(jax.random.key(13), (2, 5, 16))
    sqt = tq.quantize(sq, x)
    x_hat = tq.dequantize(sq, sqt)
    # Then channels (3, 9, 12) hold the outlier part's reconstruction of
    # x[..., (3, 9, 12)], and the rest the regular part's.
    self.assertEqual(x_hat.shape, (2, 5, 16))
    out = np.array([3, 9, 12])
    reg = np.setdiff1d(np.arange(16), out)
    np.testing.assert_array_equal(x_hat[..., out],
                                  tq.dequantize(sq.outlier, sqt.outlier))
    np.testing.assert_array_equal(x_hat[..., reg],
                                  tq.dequantize(sq.regular, sqt.regular))
    np.testing.assert_array_equal(
        sqt.outlier.codes, tq.quantize(sq.outlier, x[..., out]).codes)

  def test_high_bits_reconstruct_each_channel_in_place(self):
    # Given 8 and 7 bits (D_mse <= 3e-4), a channel mix-up would be an O(1)
    # error.
    sq = tq.make_split_quantizer(jax.random.key(14), 16, 8, 7,
                                 jnp.array([12, 3, 9]))
    x = jax.random.normal(jax.random.key(15), (100, 16))
    x_hat = tq.dequantize(sq, tq.quantize(sq, x))
    per_channel = np.mean((x - x_hat) ** 2, axis=0) / np.mean(x**2, axis=0)
    self.assertLess(np.max(per_channel), 0.01)

  def test_split_mse_lies_between_the_integer_widths(self):
    # Given isotropic unit vectors and the 2.5-bit split (64@3 + 64@2).
    dim, num = 128, 4000
    sq = tq.make_quantizer(jax.random.key(16), dim, 2.5)
    x = conftest.random_unit_vectors(jax.random.key(17), (num,), dim)
    d_split = _split_mse(sq, x)
    # Then it lies between the 3-bit and 2-bit D_mse ...
    self.assertLess(tq.codebook_mse(dim, 3), d_split)
    self.assertLess(d_split, tq.codebook_mse(dim, 2))
    # ... at E‖x_o‖² D(64, 3) + E‖x_r‖² D(64, 2) with E‖x_o‖² = 64/128.
    # The s.e. of the estimate is ~0.4%, 3% is > 7 s.e.
    expected = 0.5 * tq.codebook_mse(64, 3) + 0.5 * tq.codebook_mse(64, 2)
    np.testing.assert_allclose(d_split, expected, rtol=0.03)

  @parameterized.parameters("mse", "prod")
  def test_inner_product_equals_query_times_dequantized(self, method):
    sq = tq.make_quantizer(jax.random.key(18), 32, 2.5, method,
                           outlier_channels=np.arange(0, 32, 2))
    x = jax.random.normal(jax.random.key(19), (2, 3, 32))
    y = jax.random.normal(jax.random.key(20), (4, 32))
    sqt = tq.quantize(sq, x)
    scores = tq.inner_product(sq, sqt, y)
    self.assertEqual(scores.shape, (4, 2, 3))
    expected = np.einsum("yd,abd->yab", np.asarray(y, np.float64),
                         np.asarray(tq.dequantize(sq, sqt), np.float64))
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-5)


class FoldedRotationTest(parameterized.TestCase):

  @parameterized.parameters("haar", "hadamard")
  def test_one_matrix_gathers_and_rotates_both_parts(self, kind):
    # Given a 2.5-bit split at D = 64 with scattered outlier channels.
    sq = tq.with_outlier_channels(
        tq.make_quantizer(jax.random.key(3), 64, 2.5, rotation=kind),
        jnp.array([1, 5, 6, 9, 10, 20, 21, 22, 30, 31, 33, 35, 40, 41, 47,
                   49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62,
                   63, 0, 2]))
    x = jax.random.normal(jax.random.key(4), (5, 64))
    e = split.folded_rotation(sq)
    # Then E x is each part's rotated channels, the outliers first.
    want = jnp.concatenate(
        [rotation.apply(p.rotation, jnp.take(x, ch, axis=-1))
         for p, ch in ((sq.outlier, sq.outlier_channels),
                       (sq.regular, sq.regular_channels))], axis=-1)
    np.testing.assert_allclose(x @ e.T, want, atol=2e-5)
    # And Eᵀ undoes it: each part's inverse rotation back at its channels.
    np.testing.assert_allclose(want @ e, x, atol=2e-5)
    np.testing.assert_allclose(e @ e.T, np.eye(64), atol=2e-5)


class TransformTest(absltest.TestCase):

  def test_pytree_round_trip_and_jit(self):
    sq = tq.make_quantizer(jax.random.key(21), 32, 2.5, "prod")
    x = jax.random.normal(jax.random.key(22), (5, 32))
    sqt = tq.quantize(sq, x)
    for tree in (sq, sqt):
      leaves, treedef = jax.tree_util.tree_flatten(tree)
      again = jax.tree_util.tree_unflatten(treedef, leaves)
      self.assertIsInstance(again, type(tree))
      for u, v in zip(jax.tree.leaves(again), leaves):
        np.testing.assert_array_equal(u, v)
    # Under jit the codes are bit-identical; the norms may differ by an ulp
    # (the channel gather fuses into the norm reduction).
    jitted = jax.jit(tq.quantize)(sq, x)
    for u, v in zip(jax.tree.leaves(jitted), jax.tree.leaves(sqt)):
      if jnp.issubdtype(u.dtype, jnp.integer):
        np.testing.assert_array_equal(u, v)
      else:
        np.testing.assert_allclose(u, v, rtol=1e-6)
    np.testing.assert_allclose(jax.jit(tq.dequantize)(sq, sqt),
                               tq.dequantize(sq, sqt), rtol=1e-6, atol=1e-6)

  def test_vmap_over_vectors(self):
    sq = tq.make_quantizer(jax.random.key(23), 32, 2.5)
    x = jax.random.normal(jax.random.key(24), (6, 32))
    batched = jax.vmap(tq.quantize, in_axes=(None, 0))(sq, x)
    direct = tq.quantize(sq, x)
    np.testing.assert_array_equal(batched.outlier.codes, direct.outlier.codes)
    np.testing.assert_array_equal(batched.regular.codes, direct.regular.codes)


class ValidationTest(parameterized.TestCase):

  @parameterized.parameters(
      ([1, 1, 2], "repeat"), ([0, 5, 16], r"\[0, 16\)"),
      ([-1, 3, 4], r"\[0, 16\)"), ([[1, 2, 3]], "1-D"),
      ([1.0, 2.0, 3.0], "integer"))
  def test_bad_channels(self, channels, regex):
    key = jax.random.key(0)
    with self.assertRaisesRegex(ValueError, regex):
      tq.make_split_quantizer(key, 16, 3, 2, np.array(channels))
    sq = tq.make_split_quantizer(key, 16, 3, 2, 3)
    if np.asarray(channels).ndim == 1:
      with self.assertRaisesRegex(ValueError, regex):
        tq.with_outlier_channels(sq, np.array(channels))

  @parameterized.parameters(
      dict(channels=0), dict(channels=16),
      dict(channels=np.array([], np.int32)),
      dict(channels=np.arange(16, dtype=np.int32)))
  def test_outlier_count_must_leave_both_parts_non_empty(self, channels):
    with self.assertRaisesRegex(ValueError, "outlier channels"):
      tq.make_split_quantizer(jax.random.key(0), 16, 3, 2, channels)

  def test_with_outlier_channels_keeps_the_count(self):
    sq = tq.make_split_quantizer(jax.random.key(0), 16, 3, 2, 3)
    with self.assertRaisesRegex(ValueError, "outlier count"):
      tq.with_outlier_channels(sq, jnp.array([1, 2]))

  def test_make_quantizer_outlier_channels(self):
    key = jax.random.key(0)
    with self.assertRaisesRegex(ValueError, "needs 64"):
      tq.make_quantizer(key, 128, 2.5, outlier_channels=np.arange(32))
    with self.assertRaisesRegex(ValueError, "fractional"):
      tq.make_quantizer(key, 128, 3, outlier_channels=np.arange(32))

  def test_mismatched_inputs(self):
    sq = tq.make_quantizer(jax.random.key(0), 32, 2.5)
    plain = tq.make_quantizer(jax.random.key(0), 32, 2)
    with self.assertRaisesRegex(ValueError, "SplitQuantizedTensor"):
      tq.dequantize(sq, tq.quantize(plain, jnp.ones((32,))))
    with self.assertRaisesRegex(ValueError, r"x\.shape"):
      tq.quantize(sq, jnp.ones((4, 31)))
    with self.assertRaisesRegex(ValueError, r"x\.shape"):
      jax.jit(tq.quantize)(sq, jnp.ones((4, 31)))
    sqt = tq.quantize(sq, jnp.ones((4, 32)))
    with self.assertRaisesRegex(ValueError, r"y\.shape"):
      tq.inner_product(sq, sqt, jnp.ones((2, 16)))
    with self.assertRaisesRegex(ValueError, "non-finite"):
      tq.quantize(sq, jnp.ones((4, 32)).at[1, 1].set(jnp.nan))


if __name__ == "__main__":
  absltest.main()
