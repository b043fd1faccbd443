"""Tests for bit packing (turboquant_jax.quant.packing)."""

# Notation: D = codes per vector, b = bits per code, P = packed words per
# vector, *B = leading axes, w = plane width, k = word_bits / w fields per
# word, W = ceil(D / k) words per plane. Coordinate i of a plane sits in word
# i % W at slot i // W, i.e. bits [w·(i // W), w·(i // W) + w) of that word.

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from turboquant_jax.quant import packing

_DIMS = (1, 3, 8, 50, 127, 128, 200)
_LEADS = ((), (5,), (2, 3))
_WORDS = (jnp.uint8, jnp.uint32)

_pack_jit = jax.jit(packing.pack, static_argnums=(1, 2))
_unpack_jit = jax.jit(packing.unpack, static_argnums=(1, 2))


def _random_codes(seed: int, shape: tuple[int, ...], bits: int) -> np.ndarray:
  rng = np.random.default_rng(seed)
  return rng.integers(0, 2**bits, size=shape, dtype=np.uint8)


class HandPackedTest(absltest.TestCase):
  """Byte values worked out from the layout in packing.py's docstring."""

  def test_one_bit_ten_codes(self):
    # b = 1: one plane, w = 1, k = 8, W = ceil(10/8) = 2.
    # Word 0 holds coordinates 0, 2, 4, 6, 8 in slots 0..4; word 1 holds
    # 1, 3, 5, 7, 9.
    codes = jnp.array([1, 0, 0, 1, 1, 1, 0, 0, 0, 1], jnp.uint8)
    # word 0: codes (1, 0, 1, 0, 0) -> 1 + 4 = 5
    # word 1: codes (0, 1, 1, 0, 1) -> 2 + 4 + 16 = 22
    np.testing.assert_array_equal(packing.pack(codes, 1), [5, 22])

  def test_two_bits_three_codes(self):
    # b = 2: w = 2, k = 4, W = 1; codes (3, 1, 3) -> 3 | 1<<2 | 3<<4 = 55.
    codes = jnp.array([3, 1, 3], jnp.uint8)
    np.testing.assert_array_equal(packing.pack(codes, 2), [55])

  def test_three_bits_splits_into_a_two_bit_and_a_one_bit_plane(self):
    # b = 3 = 2 + 1. Codes (5, 3, 7, 0, 6) = 0b101, 0b011, 0b111, 0b000,
    # 0b110.
    codes = jnp.array([5, 3, 7, 0, 6], jnp.uint8)
    # Plane of the high 2 bits (code >> 1): (2, 1, 3, 0, 3); w = 2, k = 4,
    # W = ceil(5/4) = 2. Word 0 holds coordinates 0, 2, 4 in slots 0, 1, 2:
    # 2 | 3<<2 | 3<<4 = 2 + 12 + 48 = 62. Word 1 holds 1, 3: 1 | 0<<2 = 1.
    # Plane of the low bit (code & 1): (1, 1, 1, 0, 0); w = 1, k = 8, W = 1:
    # 1 | 1<<1 | 1<<2 = 7.
    np.testing.assert_array_equal(packing.pack(codes, 3), [62, 1, 7])
    self.assertEqual(packing.packed_size(5, 3), 3)

  def test_four_bits_nibbles(self):
    # b = 4: w = 4, k = 2, W = 2. Word 0 = c0 | c2<<4, word 1 = c1 | c3<<4.
    codes = jnp.array([0xA, 0xB, 0xC, 0xD], jnp.uint8)
    np.testing.assert_array_equal(packing.pack(codes, 4), [0xCA, 0xDB])

  def test_eight_bits_in_uint32_words(self):
    # b = 8 in 32-bit words: k = 4, W = 1: word = c0 | c1<<8 | c2<<16.
    codes = jnp.array([1, 2, 255], jnp.uint8)
    packed = packing.pack(codes, 8, jnp.uint32)
    self.assertEqual(packed.dtype, jnp.uint32)
    np.testing.assert_array_equal(packed, [1 + 2 * 256 + 255 * 65536])

  def test_five_bits_planes_four_then_one(self):
    # b = 5 = 4 + 1. Codes (17, 30) = 0b10001, 0b11110.
    # High 4 bits: (8, 15); w = 4, k = 2, W = 1: 8 | 15<<4 = 248.
    # Low bit: (1, 0); w = 1, k = 8, W = 1: 1.
    codes = jnp.array([17, 30], jnp.uint8)
    self.assertEqual(packing.plane_widths(5), (4, 1))
    np.testing.assert_array_equal(packing.pack(codes, 5), [248, 1])

  def test_plane_widths_are_powers_of_two_high_first(self):
    self.assertEqual([packing.plane_widths(b) for b in range(1, 9)],
                     [(1,), (2,), (2, 1), (4,), (4, 1), (4, 2), (4, 2, 1),
                      (8,)])

  def test_unpack_of_hand_packed_bytes(self):
    np.testing.assert_array_equal(
        packing.unpack(jnp.array([62, 1, 7], jnp.uint8), 3, 5),
        [5, 3, 7, 0, 6])

  def test_signs_round_trip_to_plus_minus_one(self):
    positive = jnp.array([True, False, False, True, True])
    packed = packing.pack_signs(positive)
    np.testing.assert_array_equal(packed, [1 + 8 + 16])
    np.testing.assert_array_equal(packing.unpack_signs(packed, 5),
                                  [1.0, -1.0, -1.0, 1.0, 1.0])


class RoundTripTest(parameterized.TestCase):

  # Every (b, D) with one leading axis, and every leading shape for a few D:
  # each case compiles its own shapes, so the full product is slow.
  @parameterized.parameters(
      [dict(bits=b, dim=d, lead=(5,), dtype=jnp.uint8)
       for b in range(1, 9) for d in _DIMS]
      + [dict(bits=b, dim=d, lead=(5,), dtype=jnp.uint32)
         for b in range(1, 9) for d in (1, 3, 127, 200)]
      + [dict(bits=b, dim=d, lead=lead, dtype=dtype)
         for b in range(1, 9) for d in (3, 128)
         for lead in _LEADS if lead != (5,) for dtype in _WORDS])
  def test_unpack_inverts_pack(self, bits, dim, lead, dtype):
    # Given random codes below 2^b.
    codes = _random_codes(bits * 1000 + dim, (*lead, dim), bits)
    # When packed and unpacked (jitted: one compile per shape).
    packed = _pack_jit(jnp.asarray(codes), bits, dtype)
    out = _unpack_jit(packed, bits, dim)
    # Then the codes come back, and the packed shape is *B + (P,).
    self.assertEqual(packed.dtype, dtype)
    self.assertEqual(packed.shape,
                     (*lead, packing.packed_size(dim, bits, dtype)))
    self.assertEqual(out.dtype, jnp.uint8)
    np.testing.assert_array_equal(out, codes)

  @parameterized.product(bits=(1, 3, 4, 6, 7), dtype=_WORDS)
  def test_eager_equals_jit(self, bits, dtype):
    codes = jnp.asarray(_random_codes(bits, (2, 50), bits))
    eager = packing.pack(codes, bits, dtype)
    np.testing.assert_array_equal(eager, _pack_jit(codes, bits, dtype))
    np.testing.assert_array_equal(packing.unpack(eager, bits, 50),
                                  _unpack_jit(eager, bits, 50))

  def test_extreme_codes_round_trip(self):
    for bits in range(1, 9):
      for value in (0, 2**bits - 1):
        codes = jnp.full((37,), value, jnp.uint8)
        for dtype in _WORDS:
          np.testing.assert_array_equal(
              _unpack_jit(_pack_jit(codes, bits, dtype), bits, 37), codes)


class SizeTest(parameterized.TestCase):

  @parameterized.product(bits=tuple(range(1, 9)), dim=(8, 64, 128, 200, 1536))
  def test_packed_size_is_dim_times_bits_over_eight(self, bits, dim):
    # For D a multiple of 8, every plane of width w fills D·w/8 bytes exactly.
    self.assertEqual(packing.packed_size(dim, bits), dim * bits // 8)

  @parameterized.product(bits=tuple(range(1, 9)), dim=(32, 128, 1536))
  def test_uint32_size_is_dim_times_bits_over_32(self, bits, dim):
    self.assertEqual(packing.packed_size(dim, bits, jnp.uint32),
                     dim * bits // 32)

  def test_awkward_dims_round_up_per_plane(self):
    # D = 3, b = 3: the 2-bit plane needs ceil(3/4) = 1 byte and the 1-bit
    # plane ceil(3/8) = 1 byte.
    self.assertEqual(packing.packed_size(3, 3), 2)
    # D = 127, b = 7 = 4+2+1: ceil(127/2) + ceil(127/4) + ceil(127/8)
    # = 64 + 32 + 16.
    self.assertEqual(packing.packed_size(127, 7), 112)
    # D = 1, b = 8 in uint32: one word.
    self.assertEqual(packing.packed_size(1, 8, jnp.uint32), 1)


class ValidationTest(parameterized.TestCase):

  @parameterized.parameters(0, 9, 2.5, True)
  def test_bad_bits(self, bits):
    with self.assertRaisesRegex(ValueError, "bits"):
      packing.pack(jnp.zeros((8,), jnp.uint8), bits)

  @parameterized.parameters(jnp.int8, jnp.uint16, jnp.int32, jnp.float32)
  def test_bad_word_dtype(self, dtype):
    with self.assertRaisesRegex(ValueError, "uint8 or uint32"):
      packing.pack(jnp.zeros((8,), jnp.uint8), 2, dtype)

  def test_unpack_rejects_wrong_word_count(self):
    with self.assertRaisesRegex(ValueError, "packed.shape"):
      packing.unpack(jnp.zeros((3,), jnp.uint8), 2, 16)


if __name__ == "__main__":
  absltest.main()
