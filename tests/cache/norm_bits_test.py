"""8-bit log-domain norms of the TurboQuant cache (CacheConfig.norm_bits).

Notation: B batch, K KV heads, S capacity, T tokens written, D head dim,
F norm fields per tensor (one per part; prod keys add a residual norm).
"""

import math

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from turboquant_jax import cache as cache_lib
from turboquant_jax.cache import CacheConfig
from turboquant_jax.cache import common
from turboquant_jax.cache import turboquant_cache
from turboquant_jax.kernels import decode_attention as attn
from turboquant_jax.kernels.decode_attention import parts

B, K, S, D = 2, 2, 32, 64


def _kv_with_norms(seed: int, norms) -> tuple[jax.Array, jax.Array]:
  """k, v f32[B, K, T, D]: random directions with the given norms [T]."""
  kk, kv = jax.random.split(jax.random.key(seed))
  norms = jnp.asarray(norms, jnp.float32)[None, None, :, None]
  unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  shape = (B, K, norms.shape[2], D)
  return (unit(jax.random.normal(kk, shape)) * norms,
          unit(jax.random.normal(kv, shape)) * norms)


def _cfg(**kw) -> CacheConfig:
  return CacheConfig(kind="turboquant", **{"key_bits": 4, "value_bits": 4,
                                           "norm_bits": 8, **kw})


class CodeTest(absltest.TestCase):
  """common.log_range / encode_log / decode_log."""

  def test_round_trip_within_half_a_log_step(self):
    x = jnp.exp(jax.random.uniform(jax.random.key(0), (3, 500), minval=-4.0,
                                   maxval=3.0))
    rng = common.log_range(x, jnp.ones(x.shape, bool))            # [3, 2]
    # The range is the extremes widened by the margin on each side.
    np.testing.assert_allclose(
        rng, np.stack([np.log(x).min(-1) - common.LOG_MARGIN,
                       np.log(x).max(-1) + common.LOG_MARGIN], -1),
        rtol=1e-6)
    codes = common.encode_log(x, rng)
    self.assertEqual(codes.dtype, jnp.uint8)
    err = np.abs(np.log(common.decode_log(codes, rng)) - np.log(x))
    half_step = (rng[:, 1] - rng[:, 0]) / (2 * (common.LOG_LEVELS - 1))
    self.assertTrue(np.all(err <= half_step[:, None] * (1 + 1e-4) + 1e-6))
    # Not trivially: the error does reach most of half a step.
    self.assertGreater(float(err.max()), 0.8 * float(half_step.min()))

  def test_zero_nan_and_clamping(self):
    rng = jnp.array([0.0, 2.0])                        # log range [0, 2]
    x = jnp.array([0.0, jnp.nan, jnp.inf, 1e-9, 1e9, 1.0, math.e ** 2])
    codes = common.encode_log(x, rng)
    np.testing.assert_array_equal(
        codes[:5], [common.LOG_CODE_ZERO, common.LOG_CODE_NAN,
                    common.LOG_CODE_NAN, 1, common.LOG_LEVELS])
    y = np.asarray(common.decode_log(codes, rng))
    self.assertEqual(y[0], 0.0)
    self.assertTrue(np.isnan(y[1]) and np.isnan(y[2]))
    # Outside the range: clamped to its ends; the ends are exact.
    np.testing.assert_allclose(y[3:], [1.0, math.e ** 2, 1.0, math.e ** 2],
                               rtol=1e-6)

  def test_range_ignores_invalid_zero_and_nan(self):
    x = jnp.array([[0.0, 2.0, jnp.nan, 8.0, 1e6],
                   [0.0, 0.0, 0.0, 0.0, 0.0]])
    valid = jnp.array([True, True, True, True, False])   # 1e6: padding
    rng = np.asarray(common.log_range(x, valid))
    np.testing.assert_allclose(rng[0], [np.log(2.0) - common.LOG_MARGIN,
                                        np.log(8.0) + common.LOG_MARGIN],
                               rtol=1e-6, atol=1e-6)
    self.assertTrue(np.all(np.isnan(rng[1])))            # nothing to set it


class CacheTest(parameterized.TestCase):
  """The cache with 8-bit norms: storage, ranges, attention."""

  @parameterized.named_parameters(
      ("mse", dict()), ("prod_split", dict(key_bits=3.5, key_method="prod",
                                           value_bits=2.5)))
  def test_norms_are_u8_and_decode_close(self, kw):
    k, v = _kv_with_norms(0, jnp.linspace(0.5, 4.0, 12))
    lengths = jnp.array([12, 7])
    c8 = cache_lib.prefill(cache_lib.init(_cfg(**kw), B, K, S, D), k, v,
                           lengths)
    c16 = cache_lib.prefill(cache_lib.init(_cfg(norm_bits=16, **kw), B, K,
                                           S, D), k, v, lengths)
    leaves8 = turboquant_cache._norm_arrays(c8.keys) + (
        turboquant_cache._norm_arrays(c8.values))
    leaves16 = turboquant_cache._norm_arrays(c16.keys) + (
        turboquant_cache._norm_arrays(c16.values))
    self.assertTrue(all(a.dtype == jnp.uint8 for a in leaves8))
    self.assertTrue(all(a.dtype == jnp.float16 for a in leaves16))
    fields = len(turboquant_cache._norm_arrays(c8.keys))
    self.assertEqual(c8.key_norm_range.shape, (B, K, fields, 2))
    # Same codes (same quantizer); norms within the fp16 rounding plus half
    # a log step of the range (here at most log 8·4 wide: 0.7% relative).
    for a, b in zip(turboquant_cache.tensors(c8), (c16.keys, c16.values)):
      for x8, x16 in zip(turboquant_cache._norm_arrays(a),
                         turboquant_cache._norm_arrays(b)):
        x8, x16 = np.asarray(x8)[0, :, :12], np.asarray(x16, np.float32)[
            0, :, :12]
        np.testing.assert_allclose(x8, x16, rtol=8e-3)

  @parameterized.named_parameters(("decode", 1), ("chunk", 3))
  def test_attention_close_to_16bit_norms(self, tokens):
    k, v = _kv_with_norms(1, jnp.exp(jnp.linspace(-1.0, 1.0, 20)))
    q = jax.random.normal(jax.random.key(2), (B, tokens, 2 * K, D)) * 3.0
    lengths = jnp.array([20, 11])
    outs = {}
    for bits in (8, 16):
      c = cache_lib.prefill(cache_lib.init(
          _cfg(norm_bits=bits, value_bits=2.5, window=3), B, K, S, D), k, v,
                            lengths)
      for impl in ("reference", "xla", "pallas_tpu"):
        kw = dict(interpret=True, block=8) if impl == "pallas_tpu" else {}
        outs[bits, impl] = np.asarray(attn.chunk_attention(
            q, c, lengths, impl=impl, **kw))
    ref8, ref16 = outs[8, "reference"], outs[16, "reference"]
    # Every implementation reads the decoded norms (as the reference does).
    for impl in ("xla", "pallas_tpu"):
      np.testing.assert_allclose(outs[8, impl], ref8, rtol=2e-5, atol=2e-5)
    # And the outputs move by about the norms' relative error (< 1%).
    rel = np.linalg.norm(ref8 - ref16) / np.linalg.norm(ref16)
    self.assertBetween(rel, 1e-5, 1e-2)

  def test_kernel_inputs_carry_decoded_norms(self):
    k, v = _kv_with_norms(3, jnp.linspace(1.0, 3.0, 8))
    c = cache_lib.prefill(cache_lib.init(_cfg(), B, K, S, D), k, v,
                          jnp.array([8, 8]))
    inp = parts.prepare(jnp.ones((B, 1, K, D)), c, c.lengths, 0.125)
    keys, values = turboquant_cache.tensors(c)
    self.assertIsNone(parts.supported(c))
    np.testing.assert_array_equal(inp.key_norms[0], keys.norms)
    np.testing.assert_array_equal(inp.value_norms[0], values.norms)
    self.assertEqual(inp.key_norms[0].dtype, jnp.float32)

  def test_prefill_then_append_equals_prefill_at_once(self):
    # The prefill's first two tokens hold the extreme norms, the appended
    # ones lie well inside: both ways see the same range, hence the same
    # codes.
    norms = jnp.array([0.1, 10.0, 1.0, 2.0, 0.7, 1.5, 0.6, 1.8, 1.2, 0.9])
    k, v = _kv_with_norms(4, norms)
    cfg = _cfg(key_bits=3, key_method="prod", window=2)
    at_once = cache_lib.prefill(cache_lib.init(cfg, B, K, S, D), k, v,
                                jnp.array([10, 10]))
    steps = cache_lib.prefill(cache_lib.init(cfg, B, K, S, D), k[:, :, :4],
                              v[:, :, :4], jnp.array([4, 4]))
    steps = cache_lib.append(steps, k[:, :, 4:7], v[:, :, 4:7])
    for t in range(7, 10):
      steps = cache_lib.append(steps, k[:, :, t:t + 1], v[:, :, t:t + 1])
    np.testing.assert_array_equal(at_once.key_norm_range,
                                  steps.key_norm_range)
    np.testing.assert_array_equal(at_once.value_norm_range,
                                  steps.value_norm_range)
    for a, b in zip(jax.tree.leaves((at_once.keys, at_once.values)),
                    jax.tree.leaves((steps.keys, steps.values))):
      np.testing.assert_array_equal(np.asarray(a)[:, :, :10],
                                    np.asarray(b)[:, :, :10])

  def test_range_fixed_by_prefill_and_later_norms_clamp(self):
    # Without norm correction the stored scale is the norm itself.
    cfg = _cfg(norm_correction=False)
    k, v = _kv_with_norms(5, jnp.array([1.0, 2.0]))
    c = cache_lib.prefill(cache_lib.init(cfg, B, K, S, D), k, v,
                          jnp.array([2, 1]))
    rng = np.asarray(c.value_norm_range)
    # Row 1 saw one token (norm 1): a range of width 2·margin around it.
    np.testing.assert_allclose(rng[1, :, 0], [[-common.LOG_MARGIN,
                                               common.LOG_MARGIN]] * K,
                               atol=1e-5)
    np.testing.assert_allclose(rng[0, :, 0, 1],
                               math.log(2.0) + common.LOG_MARGIN, rtol=1e-6)
    # A token 100x larger is stored at the top of the range, which stays.
    big_k, big_v = _kv_with_norms(6, jnp.array([100.0]))
    c2 = cache_lib.append(c, big_k, big_v)
    np.testing.assert_array_equal(c2.value_norm_range, c.value_norm_range)
    got = np.asarray(turboquant_cache.tensors(c2)[1].norms)
    np.testing.assert_allclose(got[0, :, 2], math.exp(rng[0, 0, 0, 1]),
                               rtol=1e-5)
    np.testing.assert_allclose(got[1, :, 1], math.exp(common.LOG_MARGIN),
                               rtol=1e-5)

  def test_empty_sequence_takes_range_from_first_append(self):
    k, v = _kv_with_norms(7, jnp.array([3.0, 5.0, 4.0]))
    # No prefill at all (init, then append) and a zero-length prefill row.
    fresh = cache_lib.append(cache_lib.init(_cfg(), B, K, S, D), k, v)
    rng = np.asarray(fresh.key_norm_range)
    self.assertTrue(np.all(np.isfinite(rng)))
    scales = np.asarray(turboquant_cache._norm_arrays(
        turboquant_cache._quantize(fresh.key_quantizer, k))[0])
    np.testing.assert_allclose(
        rng[..., 0, 0], np.log(scales.min(-1)) - common.LOG_MARGIN,
        rtol=1e-6)
    part = cache_lib.prefill(cache_lib.init(_cfg(), B, K, S, D), k, v,
                             jnp.array([3, 0]))
    self.assertTrue(np.all(np.isnan(part.key_norm_range[1])))
    part = cache_lib.append(part, k, v)
    np.testing.assert_array_equal(part.key_norm_range[1],
                                  fresh.key_norm_range[1])
    # The first row kept its prefill range.
    np.testing.assert_array_equal(part.key_norm_range[0],
                                  fresh.key_norm_range[0])

  def test_zero_vectors_stay_zero(self):
    k, v = _kv_with_norms(8, jnp.array([1.0, 0.0, 2.0]))
    c = cache_lib.prefill(cache_lib.init(_cfg(), B, K, S, D), k, v,
                          jnp.array([3, 3]))
    dk, dv = cache_lib.dequantize(c)
    np.testing.assert_array_equal(dk[:, :, 1], 0.0)
    np.testing.assert_array_equal(dv[:, :, 1], 0.0)
    self.assertTrue(np.all(np.isfinite(dk[:, :, :3])))

  def test_per_tensor_bits(self):
    c = cache_lib.init(_cfg(norm_bits=16, value_norm_bits=8), B, K, S, D)
    self.assertIsNone(c.key_norm_range)
    self.assertEqual(c.keys.norms.dtype, jnp.float16)
    self.assertEqual(c.values.norms.dtype, jnp.uint8)
    c = cache_lib.init(_cfg(key_norm_bits=16), B, K, S, D)
    self.assertEqual(c.keys.norms.dtype, jnp.float16)
    self.assertEqual(c.values.norms.dtype, jnp.uint8)
    # bits/coord: 4 + 16/64 per tensor with fp16 norms, 4 + 8/64 with 8-bit
    # (plus the lengths and the ranges, a little).
    bits = [cache_lib.memory(cache_lib.init(_cfg(norm_bits=nb), 1, 1, 4096,
                                            D))["bits_per_coordinate"]
            for nb in (16, 8)]
    self.assertAlmostEqual(bits[0] - bits[1], 0.125, places=3)

  def test_bad_config(self):
    for kw, pattern in ((dict(norm_bits=12), "norm_bits=12 must be 8 or 16"),
                        (dict(norm_bits=True), "norm_bits=True"),
                        (dict(key_norm_bits=4), "key_norm_bits=4"),
                        (dict(value_norm_bits=8.0), "value_norm_bits=8.0"),
                        (dict(norm_dtype="float32"), "norm_dtype")):
      with self.subTest(**kw):
        with self.assertRaisesRegex(ValueError, pattern):
          _cfg(**kw)
    with self.assertRaisesRegex(ValueError, "norm_bits=8 needs kind"):
      CacheConfig(kind="kivi", norm_bits=8)
    with self.assertRaisesRegex(ValueError, "tensor="):
      _cfg().norm_bits_of("queries")


if __name__ == "__main__":
  absltest.main()
