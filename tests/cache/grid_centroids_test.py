"""Grid codebooks (CacheConfig.grid_centroids): the codebook, the quantizer
and cache options, and every reader of such a cache agreeing with the
reference (the GPU kernel's grid lookup PTX itself: prmt_lookup_test)."""

import zlib

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from turboquant_jax import cache as cache_lib
from turboquant_jax.cache import turboquant_cache
from turboquant_jax.kernels import decode_attention as attn
from turboquant_jax.kernels.decode_attention import parts
from turboquant_jax.kernels.decode_attention import prmt_lookup
from turboquant_jax.quant import codebook
from turboquant_jax.quant import turboquant


class GridCodebookTest(parameterized.TestCase):

  @parameterized.product(dim=(3, 64, 128, 1000), bits=(1, 2, 3, 4, 5, 6))
  def test_on_the_grid_sorted_and_symmetric(self, dim, bits):
    grid = codebook.grid_codebook(dim, bits)
    self.assertEqual(grid.shape, (2 ** bits,))
    self.assertTrue(np.all(np.diff(grid) > 0))
    np.testing.assert_array_equal(grid, -grid[::-1])
    # step·k for some step = m·2^e, m <= 120, and |k| <= 63.
    def on_grid(step):
      m = np.frexp(step)[0] * 128
      k = np.round(grid / step)
      return (np.all(grid == step * k) and np.all(np.abs(k) <= 63)
              and m == int(m) and m <= codebook.GRID_MAX_SIGNIFICAND)
    self.assertTrue(any(on_grid(grid[-1] / top) for top in range(1, 64)))
    np.testing.assert_array_equal(grid.astype(np.float32), grid)

  @parameterized.parameters(64, 128, 256)
  def test_costs_little_distortion(self, dim):
    # The grid's distortion over the exact codebook's, both exact
    # integrals: under 0.5% at 4 bits, 0.1% at 2-3 bits, 3% at 5.
    for bits, bound in ((2, 1e-3), (3, 1e-3), (4, 5e-3), (5, 3e-2)):
      ratio = codebook.grid_mse(dim, bits) / codebook.mse(dim, bits)
      self.assertBetween(ratio, 1.0, 1.0 + bound)

  def test_the_kernel_recognizes_every_3_and_4_bit_grid(self):
    # grid_codebook's steps are ones prmt_lookup.grid_steps accepts, at
    # any dim: else the kernel would fall back to the general lookup.
    for dim in (3, 17, 32, 50, 64, 96, 100, 128, 200, 256, 576, 1000, 4096):
      for bits in (3, 4):
        table = codebook.grid_codebook(dim, bits).astype(np.float32)
        self.assertIsNotNone(prmt_lookup.grid_steps(tuple(table)),
                             f"{dim=} {bits=}")

  def test_bad_bits(self):
    with self.assertRaisesRegex(ValueError, "at most 6 bits"):
      codebook.grid_codebook(128, 7)
    with self.assertRaisesRegex(ValueError, "bits"):
      codebook.grid_codebook(128, 0)


class GridQuantizerTest(absltest.TestCase):

  def test_quantizer_holds_the_grid(self):
    key = jax.random.key(0)
    q = turboquant.make_quantizer(key, 128, 4, grid_centroids=True)
    self.assertTrue(q.grid_centroids)
    np.testing.assert_array_equal(q.centroids,
                                  codebook.grid_codebook(128, 4))
    np.testing.assert_allclose(
        q.thresholds, (q.centroids[1:] + q.centroids[:-1]) / 2)
    prod = turboquant.make_quantizer(key, 128, 4, "prod",
                                     grid_centroids=True)
    np.testing.assert_array_equal(prod.centroids,
                                  codebook.grid_codebook(128, 3))
    x = jax.random.normal(jax.random.key(1), (4000, 128))
    exact = turboquant.make_quantizer(key, 128, 4)
    errs = [float(jnp.mean(jnp.sum(jnp.square(
        turboquant.dequantize(qq, turboquant.quantize(qq, x)) - x), -1)))
            for qq in (exact, q)]
    self.assertBetween(errs[1] / errs[0], 0.99, 1.02)

  def test_bad_options(self):
    key = jax.random.key(0)
    with self.assertRaisesRegex(ValueError, "grid_centroids=True needs a "
                                "codebook stage of 1..6 bits"):
      turboquant.make_quantizer(key, 128, 8, grid_centroids=True)
    with self.assertRaisesRegex(ValueError, "grid_centroids"):
      turboquant.make_quantizer(key, 128, 1, "qjl", grid_centroids=True)
    with self.assertRaisesRegex(ValueError, "at most 6 bits; key_bits=7"):
      cache_lib.CacheConfig(key_bits=7, grid_centroids=True)
    with self.assertRaisesRegex(ValueError, "value_bits=6.5 needs 7"):
      cache_lib.CacheConfig(value_bits=6.5, grid_centroids=True)
    with self.assertRaisesRegex(ValueError, "needs kind='turboquant'"):
      cache_lib.CacheConfig(kind="kivi", grid_centroids=True)
    with self.assertRaisesRegex(ValueError, "must be a bool"):
      cache_lib.CacheConfig(grid_centroids=1)
    cache_lib.CacheConfig(key_bits=7, key_method="prod", grid_centroids=True)


def _cache(config, dim=128, lengths=(100, 37), seed=0):
  b, kv, s = 2, 2, 128
  keys = jax.random.split(jax.random.key(seed), 3)
  k = jax.random.normal(keys[1], (b, kv, s, dim)) * 2.0
  v = jax.random.normal(keys[2], (b, kv, s, dim))
  return cache_lib.prefill(cache_lib.init(config, b, kv, s, dim,
                                          key=keys[0]),
                           k, v, jnp.array(lengths, jnp.int32))


class GridCacheTest(parameterized.TestCase):

  @parameterized.parameters(4, 3.5, 2.5)
  def test_kernels_read_the_caches_codebooks(self, bits):
    # Every part's static centroids, which the kernels look up, are the
    # quantizer's (grid) centroids; 3- and 4-bit parts take the grid
    # lookup.
    config = cache_lib.CacheConfig(key_bits=bits, value_bits=bits,
                                   grid_centroids=True)
    cache = _cache(config)
    inputs = parts.prepare(jnp.ones((2, 1, 4, 128)), cache, cache.lengths,
                           1.0)
    specs = inputs.key_specs + inputs.value_specs
    self.assertLen(specs, len(parts.cache_parts(cache)))
    for spec, (q, _) in zip(specs, parts.cache_parts(cache)):
      want = np.asarray(q.centroids).reshape(-1, 2 ** spec.bits)[0]
      np.testing.assert_array_equal(spec.centroids, want)
      self.assertEqual(prmt_lookup.grid_steps(spec.centroids) is not None,
                       spec.bits in (3, 4))

  @parameterized.named_parameters(
      ("xla", "xla", {}, 1e-5),
      ("pallas_tpu", "pallas_tpu", dict(interpret=True), 1e-5),
      ("pallas_gpu", "pallas_gpu", dict(interpret=True, splits=2), 3e-3))
  def test_attention_matches_the_reference(self, impl, options, tol):
    config = cache_lib.CacheConfig(key_bits=4, value_bits=3.5, window=2,
                                   grid_centroids=True)
    cache = _cache(config, seed=zlib.crc32(impl.encode()))
    q = jax.random.normal(jax.random.key(5), (2, 3, 8, 128))
    want = attn.chunk_attention(q, cache, cache.lengths, impl="reference")
    got = attn.chunk_attention(q, cache, cache.lengths, impl=impl, **options)
    scale = float(jnp.max(jnp.abs(want)))
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * scale)

  def test_gpu_append_kernel_equals_the_xla_append(self):
    config = cache_lib.CacheConfig(key_bits=4, value_bits=4,
                                   grid_centroids=True)
    cache = _cache(config, lengths=(5, 127))
    shape = (2, 2, 1, 128)
    k = jax.random.normal(jax.random.key(7), shape)
    v = jax.random.normal(jax.random.key(8), shape)
    fused = turboquant_cache.append(cache, k, v, impl="pallas_gpu",
                                    interpret=True)
    plain = turboquant_cache.append(cache, k, v, impl="xla")
    for a, b in zip(jax.tree.leaves(fused), jax.tree.leaves(plain)):
      np.testing.assert_allclose(np.asarray(a, np.float32),
                                 np.asarray(b, np.float32), rtol=1e-6)


if __name__ == "__main__":
  absltest.main()
