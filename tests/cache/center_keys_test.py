"""Tests of TurboQuant's key centering (CacheConfig.center_keys).

Notation: B batch, K KV heads, S capacity, T tokens, D head dim, H query
heads.
"""

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from turboquant_jax import cache as cache_lib
from turboquant_jax.cache import CacheConfig
from turboquant_jax.kernels import decode_attention

B, K, S, D, H = 2, 2, 32, 64, 4
T0 = 20      # prefill tokens


def _kv(seed: int, tokens: int, offset: float = 4.0):
  """Keys with a large common offset (as real keys have), plain values."""
  kk, kv, ko = jax.random.split(jax.random.key(seed), 3)
  mean = offset * jax.random.normal(ko, (1, K, 1, D), jnp.float32)
  k = jax.random.normal(kk, (B, K, tokens, D), jnp.float32) + mean
  v = jax.random.normal(kv, (B, K, tokens, D), jnp.float32)
  return k, v


def _filled(cfg: CacheConfig, k, v, prefill: int = T0):
  cache = cache_lib.init(cfg, B, K, S, D, key=jax.random.key(7))
  lengths = jnp.full((B,), prefill, jnp.int32)
  cache = cache_lib.prefill(cache, k[:, :, :prefill], v[:, :, :prefill],
                            lengths)
  return cache_lib.append(cache, k[:, :, prefill:], v[:, :, prefill:])


def _attend(cache, q, impl):
  lengths = cache.lengths
  return np.asarray(decode_attention.chunk_attention(q, cache, lengths,
                                                     impl=impl))


class CenterKeysTest(parameterized.TestCase):

  def test_config_validation(self):
    with self.assertRaisesRegex(ValueError, "center_keys"):
      CacheConfig(kind="kivi", key_bits=2, value_bits=2, center_keys=True)
    with self.assertRaisesRegex(ValueError, "center_keys"):
      CacheConfig(kind="turboquant", center_keys=1)
    self.assertIsNone(cache_lib.init(CacheConfig(), B, K, S, D).key_mean)

  def test_mean_is_the_prefill_mean_and_keys_are_centered(self):
    # Given keys with a common offset, the stored mean is that of the valid
    # prefill keys and the (8-bit) keys come back minus it.
    k, v = _kv(0, S)
    cfg = CacheConfig(kind="turboquant", key_bits=8, value_bits=8,
                      center_keys=True, dtype="float32")
    cache = _filled(cfg, k, v)
    want = np.asarray(k[:, :, :T0].mean(axis=2))
    np.testing.assert_allclose(np.asarray(cache.key_mean), want, atol=1e-5)
    keys, _ = cache_lib.dequantize(cache)
    np.testing.assert_allclose(np.asarray(keys),
                               np.asarray(k) - want[:, :, None, :],
                               atol=0.05)

  def test_ragged_prefill_mean_ignores_padding(self):
    k, v = _kv(1, T0)
    cfg = CacheConfig(kind="turboquant", key_bits=4, value_bits=4,
                      center_keys=True, dtype="float32")
    cache = cache_lib.init(cfg, B, K, S, D, key=jax.random.key(7))
    lengths = jnp.array([T0, 5], jnp.int32)
    cache = cache_lib.prefill(cache, k, v, lengths)
    np.testing.assert_allclose(np.asarray(cache.key_mean[1]),
                               np.asarray(k[1, :, :5].mean(axis=1)),
                               atol=1e-5)

  @parameterized.named_parameters(("xla", "xla"), ("reference", "reference"))
  def test_attention_unchanged_at_high_bits(self, impl):
    # Softmax ignores q·mean: centered 8-bit keys attend like the original
    # keys (the full cache), window included.
    k, v = _kv(2, S)
    q = jax.random.normal(jax.random.key(3), (B, 3, H, D), jnp.float32)
    full = _filled(CacheConfig(kind="full", dtype="float32"), k, v)
    want = _attend(full, q, impl)
    for window in (0, 4):
      cfg = CacheConfig(kind="turboquant", key_bits=8, value_bits=8,
                        center_keys=True, window=window, dtype="float32")
      got = _attend(_filled(cfg, k, v), q, impl)
      np.testing.assert_allclose(got, want, atol=0.02)

  def test_center_skip_validation(self):
    for bad in (-1, True, 1.0):
      with self.assertRaisesRegex(ValueError, "center_skip"):
        CacheConfig(center_keys=True, center_skip=bad)
    with self.assertRaisesRegex(ValueError, "center_skip=2 needs"):
      CacheConfig(center_skip=2)

  def test_center_skip_leaves_the_first_tokens_out_of_the_mean(self):
    # Sequence 0 has a full prefill, sequence 1 one token past the skip,
    # and a prefill of <= center_skip tokens leaves the mean at zero.
    k, v = _kv(6, T0)
    k = k.at[:, :, 0].add(50.0)          # an atypical first (sink) key
    cfg = CacheConfig(kind="turboquant", key_bits=8, value_bits=8,
                      center_keys=True, center_skip=2, dtype="float32")
    cache = cache_lib.init(cfg, B, K, S, D, key=jax.random.key(7))
    cache = cache_lib.prefill(cache, k, v, jnp.array([T0, 3], jnp.int32))
    np.testing.assert_allclose(np.asarray(cache.key_mean[0]),
                               np.asarray(k[0, :, 2:].mean(axis=1)),
                               atol=1e-5)
    np.testing.assert_allclose(np.asarray(cache.key_mean[1]),
                               np.asarray(k[1, :, 2]), atol=1e-5)
    keys, _ = cache_lib.dequantize(cache)      # every key centered, 8-bit
    want = np.asarray(k[0] - cache.key_mean[0][:, None])
    err = np.linalg.norm(np.asarray(keys[0, :, :T0]) - want, axis=-1)
    self.assertLess(float(np.max(err / np.linalg.norm(want, axis=-1))), 0.02)
    short = cache_lib.prefill(cache_lib.init(cfg, B, K, S, D), k, v,
                              jnp.array([2, 1], jnp.int32))
    np.testing.assert_array_equal(np.asarray(short.key_mean), 0.0)

  def test_centering_reduces_attention_error(self):
    # With a large common offset, 3-bit codes of the centered keys spend
    # their resolution on what softmax sees.
    k, v = _kv(4, S, offset=6.0)
    q = jax.random.normal(jax.random.key(5), (B, 3, H, D), jnp.float32)
    want = _attend(_filled(CacheConfig(kind="full", dtype="float32"), k, v),
                   q, "xla")
    err = {}
    for center in (False, True):
      cfg = CacheConfig(kind="turboquant", key_bits=3, value_bits=8,
                        center_keys=center)
      got = _attend(_filled(cfg, k, v), q, "xla")
      err[center] = float(np.sqrt(np.mean((got - want) ** 2)))
    self.assertLess(err[True], 0.5 * err[False])

  def test_memory_counts_the_mean(self):
    plain = cache_lib.init(CacheConfig(), B, K, S, D)
    centered = cache_lib.init(CacheConfig(center_keys=True), B, K, S, D)
    extra = cache_lib.memory(centered)["nbytes"] - cache_lib.memory(
        plain)["nbytes"]
    self.assertEqual(extra, B * K * D * 2)          # bfloat16 [B, K, D]
    self.assertGreater(cache_lib.memory(centered)["bytes_per_token"],
                       cache_lib.memory(plain)["bytes_per_token"])


if __name__ == "__main__":
  absltest.main()
