"""Tests of the KV caches (full, TurboQuant, KIVI) behind one protocol.

Notation: B batch, K KV heads, S capacity, T tokens written at once,
D head dim, G KIVI group size, W full-precision window.
"""

import dataclasses

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from turboquant_jax import cache as cache_lib
from turboquant_jax.cache import CacheConfig
from turboquant_jax.cache import kivi_cache
from turboquant_jax.quant import rotation
from turboquant_jax.quant import split

B, K, S, D = 2, 2, 16, 64

# One entry per cache flavour; the tests below run over all of them.
CONFIGS = {
    "full": CacheConfig(kind="full"),
    "tq3_2": CacheConfig(kind="turboquant", key_bits=3, value_bits=2),
    "tq2.5": CacheConfig(kind="turboquant", key_bits=2.5, value_bits=2.5),
    "tq3.5": CacheConfig(kind="turboquant", key_bits=3.5, value_bits=3.5),
    "tq_prod": CacheConfig(kind="turboquant", key_bits=3, key_method="prod"),
    "tq_window": CacheConfig(kind="turboquant", key_bits=2, value_bits=2,
                             window=4),
    # 8-bit log norms on every norm field (scale and QJL residual norm).
    "tq_norm8": CacheConfig(kind="turboquant", key_bits=3, value_bits=2,
                            key_method="prod", window=4, norm_bits=8),
    # The first 2 tokens in full precision beside a 3-token window.
    "tq_sink": CacheConfig(kind="turboquant", key_bits=2, value_bits=2,
                           window=3, sink=2),
    "kivi": CacheConfig(kind="kivi", key_bits=2, value_bits=2, group_size=4),
    "kivi_window": CacheConfig(kind="kivi", key_bits=4, value_bits=2,
                               group_size=4, window=3),
}
ALL = [dict(testcase_name=name, name=name) for name in CONFIGS]
# Caches that treat each sequence on its own: the outlier split (fractional
# bits) picks its outlier channels from the whole batch's prefill.
PER_SEQUENCE = [c for c in ALL if c["name"] not in ("tq2.5", "tq3.5")]
# Caches whose quantizer does not depend on the prefill data: 8-bit norms
# also take their code range from each sequence's prefill.
DATA_INDEPENDENT = [c for c in PER_SEQUENCE if c["name"] != "tq_norm8"]


def _kv(seed: int, tokens: int, batch: int = B):
  """Random k, v f32[B, K, T, D], keys with a few large channels."""
  kk, kv = jax.random.split(jax.random.key(seed))
  k = jax.random.normal(kk, (batch, K, tokens, D), jnp.float32)
  k = k * jnp.where(jnp.arange(D) % 16 == 3, 8.0, 1.0)  # outlier channels
  v = jax.random.normal(kv, (batch, K, tokens, D), jnp.float32)
  return k, v


def _init(name: str, capacity: int = S, batch: int = B):
  return cache_lib.init(CONFIGS[name], batch, K, capacity, D,
                        key=jax.random.key(42))


def _valid(x, lengths):
  """x [B, K, S, D] -> list of per-sequence [K, L, D] numpy arrays."""
  x = np.asarray(x)     # slicing on the host: no per-length compilation
  return [x[b, :, :int(n)] for b, n in enumerate(np.asarray(lengths))]


def _numpy(arrays):
  return [np.asarray(x) for x in arrays]


def _assert_same_valid(a, b):
  """Same lengths and same dequantized contents at the valid positions."""
  np.testing.assert_array_equal(a.lengths, b.lengths)
  for xa, xb in zip(cache_lib.dequantize(a), cache_lib.dequantize(b)):
    for ya, yb in zip(_valid(xa, a.lengths), _valid(xb, b.lengths)):
      np.testing.assert_array_equal(ya, yb)


class ProtocolTest(parameterized.TestCase):
  """Every cache kind: shapes, consistency, jit overflow, ragged lengths.

  To keep compilation cheap every test prefills T = 8 (padded) tokens and
  appends chunks of T = 1 or 3, so each kind compiles few shapes.
  """

  @parameterized.named_parameters(*ALL)
  def test_prefill_append_shapes(self, name):
    # Given an empty cache, when prompts of lengths [5, 3] are prefilled and
    # then 1 and 3 tokens appended,
    cache = _init(name)
    self.assertEqual((cache.batch, cache.kv_heads, cache.capacity,
                      cache.head_dim), (B, K, S, D))
    cache = cache_lib.prefill(cache, *_kv(0, 8), jnp.array([5, 3]))
    cache = cache_lib.append(cache, *_kv(1, 1))
    cache = cache_lib.append(cache, *_kv(2, 3))
    # then lengths grew by 4 and dequantize gives f32[B, K, S, D].
    np.testing.assert_array_equal(cache.lengths, [9, 7])
    self.assertEqual(cache.lengths.dtype, jnp.int32)
    for x in cache_lib.dequantize(cache):
      self.assertEqual(x.shape, (B, K, S, D))
      self.assertEqual(x.dtype, jnp.float32)
      self.assertTrue(np.all(np.isfinite(x)))
    self.assertEqual(cache.config, CONFIGS[name])

  @parameterized.named_parameters(*ALL)
  def test_token_by_token_equals_chunks(self, name):
    # Given the same prefill (ragged lengths [3, 1]), which fixes the
    # outlier channels of fractional-bit caches in both runs,
    start = cache_lib.prefill(_init(name), *_kv(0, 8), jnp.array([3, 1]))
    k, v = _kv(1, 6)
    # when 6 tokens are appended one at a time or as two chunks of 3,
    one = start
    for t in range(6):
      one = cache_lib.append(one, k[:, :, t:t + 1], v[:, :, t:t + 1])
    chunks = cache_lib.append(start, k[:, :, :3], v[:, :, :3])
    chunks = cache_lib.append(chunks, k[:, :, 3:], v[:, :, 3:])
    # then attention reads exactly the same keys and values (KIVI: key
    # groups that complete inside a chunk or token by token get the same
    # ranges; TurboQuant: each token is quantized on its own).
    _assert_same_valid(one, chunks)
    np.testing.assert_array_equal(one.lengths, [9, 7])

  @parameterized.named_parameters(*DATA_INDEPENDENT)
  def test_appends_equal_prefill_at_once(self, name):
    # Fractional-bit caches are excluded: their outlier channels are the
    # top channels of the prefill, so prefilling 1 token or 8 picks
    # different channel sets (different quantizers), by design; the test
    # above covers their appends.
    k, v = _kv(3, 8)
    at_once = cache_lib.prefill(_init(name), k, v, jnp.array([8, 8]))
    steps = cache_lib.prefill(_init(name), k, v, jnp.array([1, 1]))
    for lo, hi in ((1, 2), (2, 5), (5, 8)):
      steps = cache_lib.append(steps, k[:, :, lo:hi], v[:, :, lo:hi])
    _assert_same_valid(at_once, steps)

  @parameterized.named_parameters(*ALL)
  def test_prefill_padding_is_never_read(self, name):
    # Given prompts of lengths [5, 2] padded to T = 8, once with zeros and
    # once with huge junk (which would ruin group ranges, outlier choice or
    # the window ring if it were stored),
    k, v = _kv(4, 8)
    lengths = jnp.array([5, 2])
    pad = (jnp.arange(8)[None, None, :, None]
           >= lengths[:, None, None, None])
    clean = cache_lib.prefill(_init(name), jnp.where(pad, 0.0, k),
                              jnp.where(pad, 0.0, v), lengths)
    junk = cache_lib.prefill(_init(name), jnp.where(pad, 1e4, k),
                             jnp.where(pad, -1e4, v), lengths)
    # then both caches read the same, also after an append.
    _assert_same_valid(clean, junk)
    k1, v1 = _kv(5, 3)
    _assert_same_valid(cache_lib.append(clean, k1, v1),
                       cache_lib.append(junk, k1, v1))

  @parameterized.named_parameters(*PER_SEQUENCE)
  def test_sequences_are_independent(self, name):
    # Given two batches that share sequence 0 but differ in sequence 1
    # (data and length); fractional bits are excluded, their outlier
    # channels are chosen over the whole batch's prefill,
    k, v = _kv(6, 8)
    k2, v2 = _kv(7, 8)
    a = cache_lib.prefill(_init(name), k, v, jnp.array([7, 4]))
    b = cache_lib.prefill(_init(name), k.at[1].set(k2[1]),
                          v.at[1].set(v2[1]), jnp.array([7, 8]))
    k1, v1 = _kv(8, 3)
    a = cache_lib.append(a, k1, v1)
    b = cache_lib.append(b, k1, v1.at[1].set(-v1[1]))
    # then sequence 0 reads the same in both.
    for xa, xb in zip(_numpy(cache_lib.dequantize(a)),
                      _numpy(cache_lib.dequantize(b))):
      np.testing.assert_array_equal(xa[0, :, :10], xb[0, :, :10])

  @parameterized.named_parameters(*ALL)
  def test_jit_overflow_drops_only_own_tokens(self, name):
    # Given sequence 0 at length 15 of 16 and sequence 1 at 11, built from
    # the same tokens as a batch at lengths [13, 11] (tokens 4, 5 of
    # sequence 0's prompt are zero, so fractional-bit caches pick the same
    # outlier channels from prompts of lengths [6, 2] and [4, 2]),
    k, v = _kv(9, 8)
    k, v = k.at[0, :, 4:6].set(0.0), v.at[0, :, 4:6].set(0.0)
    over = cache_lib.prefill(_init(name), k, v, jnp.array([6, 2]))
    fits = cache_lib.prefill(_init(name), k, v, jnp.array([4, 2]))
    for seed in (10, 11, 12):
      over = cache_lib.append(over, *_kv(seed, 3))
      fits = cache_lib.append(fits, *_kv(seed, 3))
    np.testing.assert_array_equal(over.lengths, [15, 11])
    # when 3 more tokens are appended under jit (sequence 0 needs 18 > 16),
    k1, v1 = _kv(13, 3)
    before = over
    over = jax.jit(cache_lib.append)(over, k1, v1)
    fits = cache_lib.append(fits, k1, v1)
    # then sequence 1 is bit-identical to the batch without overflow;
    np.testing.assert_array_equal(over.lengths, [S, 14])
    np.testing.assert_array_equal(fits.lengths, [S, 14])
    d_over = _numpy(cache_lib.dequantize(over))
    d_fits = _numpy(cache_lib.dequantize(fits))
    for xo, xf in zip(d_over, d_fits):
      np.testing.assert_array_equal(xo[1], xf[1])
    # and sequence 0 kept the one token that fit, as if only it had come.
    one = cache_lib.append(before, k1[:, :, :1], v1[:, :, :1])
    for xo, x1 in zip(d_over, _numpy(cache_lib.dequantize(one))):
      np.testing.assert_array_equal(xo[0], x1[0])

  @parameterized.named_parameters(*ALL)
  def test_errors(self, name):
    cache = _init(name)
    k, v = _kv(0, 8)
    lengths = jnp.array([4, 4])
    with self.assertRaisesRegex(ValueError, "head_dim"):
      cache_lib.prefill(cache, k[..., :32], v[..., :32], lengths)
    with self.assertRaisesRegex(ValueError, "batch"):
      cache_lib.prefill(cache, k[:1], v[:1], lengths[:1])
    with self.assertRaisesRegex(ValueError, "lengths.shape"):
      cache_lib.prefill(cache, k, v, lengths[:1])
    with self.assertRaisesRegex(ValueError, "v.shape"):
      cache_lib.prefill(cache, k, v[:, :, :3], lengths)
    with self.assertRaisesRegex(ValueError, "integer"):
      cache_lib.prefill(cache, k, v, jnp.array([4.0, 4.0]))
    with self.assertRaisesRegex(ValueError, "capacity"):
      big, bigv = _kv(0, S + 1)
      cache_lib.prefill(cache, big, bigv, jnp.array([S, S]))
    with self.assertRaisesRegex(ValueError, "lengths reach 9"):
      cache_lib.prefill(cache, k, v, jnp.array([9, 4]))         # > T = 8
    cache = cache_lib.prefill(cache, k, v, jnp.array([4, 1]))
    with self.assertRaisesRegex(ValueError, "head_dim"):
      cache_lib.append(cache, k[:, :, :1, :8], v[:, :, :1, :8])
    with self.assertRaisesRegex(ValueError, "capacity"):
      k13, v13 = _kv(1, S - 3)           # 4 + 13 = 17 > 16 for sequence 0
      cache_lib.append(cache, k13, v13)
    # Filling to exactly the capacity is fine; one more token is not.
    for _ in range(4):
      cache = cache_lib.append(cache, k[:, :, :3], v[:, :, :3])
    np.testing.assert_array_equal(cache.lengths, [S, S - 3])
    with self.assertRaisesRegex(ValueError, f"capacity is {S}"):
      cache_lib.append(cache, k[:, :, :1], v[:, :, :1])


class AccuracyTest(parameterized.TestCase):

  def test_turboquant_8bit_is_close(self):
    # PAPER.md §2: D_mse(b) ≈ √3π/2 · 4^-b for unit vectors, so at 8 bits
    # E‖x̃ - x‖² / ‖x‖² ≈ 2.72 · 4^-8 ≈ 4.2e-5 (d=128 is slightly lower),
    # i.e. a relative error ‖x̃ - x‖ / ‖x‖ of about 6.5e-3. The fp16 norm adds
    # (2^-11)² ≈ 2.4e-7, negligible.
    cfg = CacheConfig(kind="turboquant", key_bits=8, value_bits=8)
    cache = cache_lib.init(cfg, 2, 4, 64, 128, key=jax.random.key(0))
    kk, kv = jax.random.split(jax.random.key(1))
    k = jax.random.normal(kk, (2, 4, 64, 128)) * 3.0
    v = jax.random.normal(kv, (2, 4, 64, 128))
    cache = cache_lib.prefill(cache, k, v, jnp.array([64, 64]))
    for x, xq in zip((k, v), cache_lib.dequantize(cache)):
      rel = (jnp.sum((xq - x) ** 2, -1) / jnp.sum(x ** 2, -1))  # [B, K, S]
      mean = float(jnp.mean(rel))
      self.assertBetween(mean, 2.5e-5, 6e-5)
      self.assertLess(float(jnp.max(rel)), 2e-4)

  def test_window_is_exact(self):
    # With a float32 window the last W tokens read back exactly; older
    # ones are quantized (not exact).
    cfg = CacheConfig(kind="turboquant", key_bits=3, value_bits=3, window=4,
                      dtype="float32")
    k, v = _kv(10, 9)
    cache = cache_lib.prefill(cache_lib.init(cfg, B, K, S, D), k, v,
                              jnp.array([9, 6]))
    dk, dv = cache_lib.dequantize(cache)
    for x, dx in ((k, dk), (v, dv)):
      np.testing.assert_array_equal(dx[0, :, 5:9], x[0, :, 5:9])
      np.testing.assert_array_equal(dx[1, :, 2:6], x[1, :, 2:6])
      self.assertGreater(float(jnp.min(jnp.abs(dx[0, :, :5] - x[0, :, :5])
                                       .max(-1))), 0.0)


class SplitRotationTest(parameterized.TestCase):

  def test_folded_rotations_follow_the_chosen_channels(self):
    # Given a 3.5-bit key, 4-bit value cache (only the keys split).
    cfg = CacheConfig(kind="turboquant", key_bits=3.5, value_bits=4)
    cache = cache_lib.init(cfg, B, K, S, D, key=jax.random.key(0))
    self.assertIsNone(cache.value_split_rotation)
    fold = lambda q: jax.vmap(split.folded_rotation)(q)
    np.testing.assert_array_equal(cache.key_split_rotation,
                                  fold(cache.key_quantizer))
    # When prefill picks the outlier channels (the planted ones, 3 mod 16).
    k, v = _kv(5, 12)
    filled = cache_lib.prefill(cache, k, v, jnp.array([12, 7]))
    # Then the channels moved and the folded rotations moved with them.
    self.assertFalse(np.array_equal(filled.key_quantizer.outlier_channels,
                                    cache.key_quantizer.outlier_channels))
    np.testing.assert_array_equal(filled.key_split_rotation,
                                  fold(filled.key_quantizer))
    self.assertEqual(filled.key_split_rotation.shape, (K, D, D))

  @parameterized.parameters((2.5, 2.5), (3.5, 4), (4, 3.5))
  def test_kernel_tiles_of_the_split_follow_the_chosen_channels(self, kb,
                                                                vb):
    # Given a D = 64 cache whose split tensors have parts of 32 channels
    # (the GPU kernel rotates those in the kernel, per KV head).
    cfg = CacheConfig(kind="turboquant", key_bits=kb, value_bits=vb)
    cache = cache_lib.init(cfg, B, K, S, D, key=jax.random.key(2))
    k, v = _kv(7, 12)
    for c in (cache, cache_lib.prefill(cache, k, v, jnp.array([12, 7]))):
      # Then its tiles are each tensor's folded rotation per head in f16
      # (a shared rotation broadcast to every head), made again by prefill.
      self.assertEqual(c.rotation_tiles.shape, (2, K, 1, D, D))
      for tiles, q in zip(c.rotation_tiles, (c.key_quantizer,
                                             c.value_quantizer)):
        if isinstance(q, split.SplitQuantizer):
          want = jax.vmap(split.folded_rotation)(q)
        else:
          want = jnp.broadcast_to(rotation.as_matrix(q.rotation), (K, D, D))
        np.testing.assert_array_equal(tiles[:, 0],
                                      want.astype(jnp.float16))
    filled = cache_lib.prefill(cache, k, v, jnp.array([12, 7]))
    self.assertFalse(np.array_equal(filled.rotation_tiles,
                                    cache.rotation_tiles))
    # Other splits (parts not 32 / 32, a window, prod keys) keep none.
    for other in (CacheConfig(kind="turboquant", key_bits=2.25,
                              value_bits=4),
                  CacheConfig(kind="turboquant", key_bits=2.5,
                              value_bits=2.5, window=4),
                  CacheConfig(kind="turboquant", key_bits=2.5,
                              value_bits=2.5, key_method="prod")):
      self.assertIsNone(cache_lib.init(other, B, K, S, D,
                                       key=jax.random.key(2)).rotation_tiles)

  def test_value_rotations_are_kept_transposed(self):
    # Given a 4-bit key, 2.5-bit value cache (only the values split).
    cfg = CacheConfig(kind="turboquant", key_bits=4, value_bits=2.5)
    cache = cache_lib.init(cfg, B, K, S, D, key=jax.random.key(1))
    self.assertIsNone(cache.key_split_rotation)
    k, v = _kv(6, 12)
    for c in (cache, cache_lib.prefill(cache, k, v, jnp.array([12, 7]))):
      # Then each head's folded value rotation is stored as its
      # transpose (the form the rotation back reads row by row).
      folded = jax.vmap(split.folded_rotation)(c.value_quantizer)
      np.testing.assert_array_equal(c.value_split_rotation,
                                    jnp.swapaxes(folded, 1, 2))


class MemoryTest(parameterized.TestCase):
  """memory() against byte counts written out by hand.

  Everywhere: B = 2 sequences, K = 2 KV heads, S = 16, D = 64, and the
  lengths i32[2] = 8 bytes, which bytes_per_token spreads over the B·S = 32
  token slots: + 0.25 bytes per token. A bf16 cache stores per token
  2 heads · 2 (k, v) · 64 · 2 bytes = 512 bytes.
  """

  def _check(self, cfg, *, total, fixed, per_token):
    cache = cache_lib.init(cfg, B, K, S, D, key=jax.random.key(0))
    m = cache_lib.memory(cache)
    self.assertEqual(m["nbytes"], total)
    self.assertEqual(m["fixed_nbytes"], fixed)
    self.assertEqual(m["bytes_per_token"], per_token)
    self.assertAlmostEqual(m["compression_ratio"], 512 / per_token)
    self.assertAlmostEqual(m["bits_per_coordinate"],
                           per_token * 8 / (2 * K * D))
    return m

  def test_full(self):
    # keys + values: 2 · B·K·S·D · 2 bytes = 2 · 2·2·16·64 · 2 = 16384.
    self._check(CacheConfig(kind="full"), total=16384 + 8, fixed=0,
                per_token=512.25)

  def test_turboquant_4bit(self):
    # Per vector: codes 64·4/8 = 32 bytes + fp16 norm 2 = 34 bytes; per
    # token 2 heads · 2 (k, v) · 34 = 136 bytes, 136 · 32 slots = 4352.
    # Fixed, per quantizer (keys, values): Haar rotation 64·64·4 = 16384,
    # 16 centroids · 4 = 64, 15 thresholds · 4 = 60: 16508; two: 33016;
    # plus both rotations as the GPU kernel's f16 tiles, 2 · 64·64·2 =
    # 16384: 49400. Compression 512 / 136.25 ≈ 3.76.
    m = self._check(CacheConfig(kind="turboquant", key_bits=4, value_bits=4),
                    total=49400 + 4352 + 8, fixed=49400, per_token=136.25)
    self.assertAlmostEqual(m["compression_ratio"], 3.7578, places=4)

  @parameterized.named_parameters(
      # As test_turboquant_4bit, plus bf16 rings for keys and values:
      # 2 · B·K·W·D · 2 bytes = 2 · 2·2·4·64 · 2 = 4096 = 128 per token slot.
      # With a window the kernel does not rotate: no rotation tiles, the
      # fixed part is the quantizers' 33016 bytes.
      ("window", dict(window=4), 33016, 33016 + 4352 + 4096 + 8,
       136 + 128 + 0.25),
      # As test_turboquant_4bit with a 1-byte norm code: per vector 32 + 1 =
      # 33 bytes, per token 2 · 2 · 33 = 132 bytes, · 32 slots = 4224. Plus
      # the code ranges: f32 (lo, hi) per sequence, head and norm field,
      # keys and values: 2 · B·K·1·2 · 4 bytes = 64 = 2 per token slot.
      ("norm8", dict(norm_bits=8), 49400, 49400 + 4224 + 64 + 8,
       132 + 2 + 0.25),
  )
  def test_turboquant_4bit_with(self, option, fixed, total, per_token):
    # The fixed part (rotations, their tiles, codebooks) as in
    # test_turboquant_4bit.
    self._check(CacheConfig(kind="turboquant", key_bits=4, value_bits=4,
                            **option),
                total=total, fixed=fixed, per_token=per_token)

  def test_turboquant_split_2p5(self):
    # 2.5 bits at D = 64: 32 outlier channels at 3 bits + 32 at 2 bits.
    # Per vector: 3-bit codes of 32 channels in planes 2+1: 32·2/8 + 32/8
    # = 12 bytes; 2-bit codes 32·2/8 = 8 bytes; two fp16 norms 4 bytes:
    # 24 bytes (= 3 bits per coordinate). Per token 2·2·24 = 96 bytes.
    # Fixed per KV head: outlier quantizer 32·32·4 + 8·4 + 7·4 = 4156,
    # regular 32·32·4 + 4·4 + 3·4 = 4124, channel indices 2 · 32 · 4 = 256,
    # the folded rotation (split.folded_rotation) 64·64·4 = 16384, and
    # as the GPU kernel's f16 tile (parts of 32: it rotates in the kernel)
    # 64·64·2 = 8192: 33112; · 2 heads · 2 (keys, values) = 132448.
    self._check(CacheConfig(kind="turboquant", key_bits=2.5,
                            value_bits=2.5),
                total=132448 + 96 * 32 + 8, fixed=132448, per_token=96.25)

  def test_turboquant_prod_split_norm8(self):
    # 2.5-bit prod keys at D = 64: each part (32 channels) stores codes, a
    # norm code, QJL signs (32/8 = 4 bytes) and a residual norm code.
    # Outlier part at 3 bits = 2-bit mse codes (8 bytes) + signs 4 + 2 norm
    # codes; regular at 2 bits = 1-bit codes (4) + signs 4 + 2 codes: 24
    # bytes per key. 2.5-bit values: 12 + 8 + 2 norm codes = 22 bytes.
    # Per token 2 heads · (24 + 22) = 92 bytes, · 32 slots = 2944. Ranges:
    # keys 4 fields, values 2, B·K·2 · 4 bytes each: 6 · 32 = 192 = 6 per
    # token slot.
    cfg = CacheConfig(kind="turboquant", key_bits=2.5, value_bits=2.5,
                      key_method="prod", norm_bits=8)
    cache = cache_lib.init(cfg, B, K, S, D, key=jax.random.key(0))
    fixed = cache_lib.memory(cache)["fixed_nbytes"]
    self._check(cfg, total=fixed + 2944 + 192 + 8, fixed=fixed,
                per_token=92 + 6 + 0.25)

  def test_kivi(self):
    # G = 4, 2-bit keys and values, W = 0. Per head and sequence:
    #   key codes: 16 tokens · 64·2/8 = 16 · 16 = 256 bytes;
    #   key min + scale: 16/4 = 4 groups · 64 channels · 2 · 2 bytes = 1024;
    #   key ring: max(W, G - 1) = 3 tokens · 64 · 2 bytes (bf16) = 384;
    #   value codes: 16 · 16 = 256; value min + scale: 16 tokens · 64/4 = 16
    #   groups · 2 · 2 bytes = 1024; no value ring.
    # Sum 2944 bytes; · B·K = 4 → 11776, i.e. 368 per token slot.
    self._check(CacheConfig(kind="kivi", key_bits=2, value_bits=2,
                            group_size=4),
                total=11776 + 8, fixed=0, per_token=368.25)

  def test_kivi_window_and_tail(self):
    # G = 32 (KIVI's), W = 5, 4-bit keys and 2-bit values, S = 16 < G: the
    # one would-be key group never completes, so no key codes or ranges are
    # stored at all. Per head and sequence:
    #   key ring max(5, 31) = 31 tokens · 64 · 2 bytes = 3968;
    #   value codes 16 · 16 = 256; value min + scale 16 · 2 groups · 2 · 2
    #   = 128; value ring 5 · 64 · 2 = 640.
    # Sum 4992; · 4 = 19968 = 624 per token slot.
    cfg = CacheConfig(kind="kivi", key_bits=4, value_bits=2, window=5)
    self._check(cfg, total=19968 + 8, fixed=0, per_token=624.25)

  def test_kivi_long_cache(self):
    # KIVI-2 with G = 32 at S = 4096, D = 128, one sequence and head:
    # keys 4096·32 codes + 128 groups·128·4 (min, scale) + 31·128·2 ring
    # = 131072 + 65536 + 7936; values 131072 + 4096·4 groups·4 = 65536.
    # Per token (401152 + 4 length bytes) / 4096 ≈ 97.94 bytes = 3.06
    # bits per coordinate, against 16 for bf16.
    cfg = CacheConfig(kind="kivi", key_bits=2, value_bits=2)
    m = cache_lib.memory(cache_lib.init(cfg, 1, 1, 4096, 128))
    self.assertEqual(m["nbytes"], 401152 + 4)
    self.assertAlmostEqual(m["bits_per_coordinate"],
                           (401152 + 4) * 8 / 4096 / 256)


def _naive_kivi(x: np.ndarray, length: int, bits: int, group: int,
                window: int, keys: bool) -> tuple[np.ndarray, np.ndarray]:
  """KIVI in plain numpy for one sequence x f32[K, L, D] (dtype-rounded).

  Keys: a complete group of G tokens is quantized per channel; values: each
  token per group of G channels. Full precision: see kivi_cache's docstring.
  Returns the reconstruction and, per entry, the width of one quantization
  step where (x - min) / scale is within 1e-4 of a rounding tie (else 0):
  XLA's f32 division is not correctly rounded on CPU (it differs from
  numpy's in the last bit), so there the code may land on either side.
  """
  levels = 2 ** bits - 1
  out, tie = x.copy(), np.zeros_like(x)

  def quant(a, axis):
    lo, hi = a.min(axis, keepdims=True), a.max(axis, keepdims=True)
    mn = lo.astype(np.float16).astype(np.float32)
    sc = ((hi - lo) / levels).astype(np.float16).astype(np.float32)
    ratio = (a - mn) / np.where(sc > 0, sc, 1)
    code = np.where(sc > 0, np.clip(np.round(ratio), 0, levels), 0)
    near = np.abs(ratio - np.floor(ratio) - 0.5) < 1e-4
    return mn + sc * code, np.where(near, sc, 0.0)

  vstart = max(length - window, 0)
  if keys:
    kstart = min(length - length % group, vstart)
    for g0 in range(0, kstart, group):
      sl = slice(g0, g0 + group)
      out[:, sl], tie[:, sl] = quant(x[:, sl], 1)
    # A complete group may reach into the window: those keys stay exact.
    out[:, kstart:], tie[:, kstart:] = x[:, kstart:], 0.0
  else:
    for c0 in range(0, x.shape[-1], group):
      sl = (slice(None), slice(0, vstart), slice(c0, c0 + group))
      out[sl], tie[sl] = quant(x[sl], 2)
  return out, tie


def _assert_kivi_close(actual, expected_and_tie):
  expected, tie = expected_and_tie
  err = np.abs(np.asarray(actual) - expected)
  # Exact up to f32 rounding, or one step apart at a rounding tie.
  np.testing.assert_array_less(err, np.maximum(1e-6 + 1e-6 * np.abs(
      expected), tie * 1.001 + 1e-6))
  assert np.mean(tie > 0) < 0.02, "too many ties to test anything"


class KiviTest(parameterized.TestCase):

  @parameterized.named_parameters(
      # G, W, bits, D, S: G not dividing S (a tail group that never
      # completes) or D (a short channel group); G = 1 (no key ring).
      dict(testcase_name="g4_w3", group=4, window=3, bits=3, dim=10, cap=23),
      dict(testcase_name="g5_w7_1bit", group=5, window=7, bits=1, dim=12,
           cap=30),
      dict(testcase_name="g1_w0_8bit", group=1, window=0, bits=8, dim=8,
           cap=20),
  )
  def test_matches_numpy_model(self, group, window, bits, dim, cap):
    self._check_numpy_model(group, window, bits, dim, cap)

  def _check_numpy_model(self, group, window, bits, dim, cap,
                         prompt=(3, 7)):
    # Given a ragged prefill (lengths `prompt`, junk padding) and appends of
    # 1, 1, 3, 3, 1 tokens, after every step the cache reads exactly what
    # the numpy KIVI model computes from the whole sequence.
    cfg = CacheConfig(kind="kivi", key_bits=bits, value_bits=bits,
                      group_size=group, window=window)
    rng = np.random.default_rng(group * 100 + bits)
    kx = rng.normal(size=(2, 2, cap, dim)).astype(np.float32)
    kx[..., 1] *= 10.0                                # an outlier channel
    vx = kx * -2.0 + 1.0
    # The cache quantizes the bf16-rounded tokens, as stored in the ring.
    rounded = lambda a: np.asarray(
        jnp.asarray(a).astype(jnp.bfloat16).astype(jnp.float32))
    kr, vr = rounded(kx), rounded(vx)
    lengths, t = np.array(prompt), max(prompt)
    pad = np.arange(t)[None, None, :, None] >= lengths[:, None, None, None]
    cache = cache_lib.prefill(
        cache_lib.init(cfg, 2, 2, cap, dim), np.where(pad, 1e3, kx[:, :, :t]),
        np.where(pad, 1e3, vx[:, :, :t]), jnp.asarray(lengths))
    for step in (0, 1, 1, 3, 3, 1):
      if step:
        idx = lengths[:, None] + np.arange(step)[None, :]      # [B, T]
        take = lambda a: np.stack([a[b][:, idx[b]] for b in range(2)])
        cache = cache_lib.append(cache, take(kx), take(vx))
        lengths = lengths + step
      np.testing.assert_array_equal(cache.lengths, lengths)
      dk, dv = _numpy(cache_lib.dequantize(cache))
      for b, n in enumerate(lengths):
        _assert_kivi_close(dk[b, :, :n], _naive_kivi(
            kr[b, :, :n], n, bits, group, window, keys=True))
        _assert_kivi_close(dv[b, :, :n], _naive_kivi(
            vr[b, :, :n], n, bits, group, window, keys=False))
        np.testing.assert_array_equal(dk[b, :, n:], 0.0)

  def test_full_precision_positions(self):
    # G = 4, W = 2. At length 11: values at 9, 10 are full precision; keys
    # from min(8, 9) = 8 (the incomplete group 8..10, and the window). At 12
    # group 8..11 is complete: keys from min(12, 10) = 10. At 1: from 0.
    cfg = CacheConfig(kind="kivi", key_bits=2, value_bits=2, group_size=4,
                      window=2)
    cache = cache_lib.init(cfg, 3, 1, 16, 8)
    cache = dataclasses.replace(cache, lengths=jnp.array([11, 12, 1]))
    ks, vs = kivi_cache.full_precision_starts(cache)
    np.testing.assert_array_equal(ks, [8, 10, 0])
    np.testing.assert_array_equal(vs, [9, 10, 0])

  def test_8bit_is_close(self):
    # 8-bit uniform codes: |x̃ - x| <= scale/2 = range/510 per group, plus
    # the fp16 rounding of min and scale; values are N(0, 1), so ranges
    # of 16 channels stay below ~8: errors below ~0.02.
    cfg = CacheConfig(kind="kivi", key_bits=8, value_bits=8, group_size=16,
                      dtype="float32")
    k, v = _kv(11, 64, batch=1)
    cache = cache_lib.prefill(cache_lib.init(cfg, 1, K, 64, D), k, v,
                              jnp.array([64]))
    dk, dv = cache_lib.dequantize(cache)
    krange = jnp.max(k, 2) - jnp.min(k, 2)                      # [B, K, D]
    self.assertTrue(np.all(np.abs(dk - k) <= krange[:, :, None] / 500))
    self.assertLess(float(jnp.max(jnp.abs(dv - v))), 0.02)

  def test_fractional_bits_rejected(self):
    with self.assertRaisesRegex(ValueError, "key_bits=2.5 must be an integer"):
      CacheConfig(kind="kivi", key_bits=2.5)

  def test_wrong_kind_rejected(self):
    with self.assertRaisesRegex(ValueError, "expected 'kivi'"):
      kivi_cache.init(CacheConfig(kind="full"), 1, 1, 8, 8)

  def test_pytree_roundtrip_under_jit(self):
    # The cache is a pytree with a static config: it passes through jit.
    cfg = CacheConfig(kind="kivi", key_bits=2, value_bits=2, group_size=4)
    cache = cache_lib.init(cfg, 1, 1, 8, 8)
    out = jax.jit(lambda c: c)(cache)
    self.assertIsInstance(out, kivi_cache.KiviCache)
    self.assertEqual(out.config, cfg)
    self.assertEqual(dataclasses.replace(out, lengths=out.lengths + 1)
                     .lengths.tolist(), [1])


@pytest.mark.slow
class KiviMoreTest(parameterized.TestCase):

  @parameterized.named_parameters(
      dict(testcase_name="g4_w0", group=4, window=0, bits=2, dim=8, cap=24),
      dict(testcase_name="g1_w2", group=1, window=2, bits=4, dim=8, cap=20),
      # KIVI's G = 32: groups complete at different steps per sequence.
      dict(testcase_name="g32_w8", group=32, window=8, bits=2, dim=64,
           cap=80, prompt=(31, 62)),
  )
  def test_matches_numpy_model(self, group, window, bits, dim, cap,
                               prompt=(3, 7)):
    KiviTest._check_numpy_model(self, group, window, bits, dim, cap, prompt)


if __name__ == "__main__":
  absltest.main()
