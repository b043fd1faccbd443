"""The fused quantize-and-append kernel against the XLA write path.

kernels/quantize_append/pallas_gpu.py in Mosaic GPU interpret mode on the
CPU: fresh random caches and tokens of several shapes, widths, norm dtypes
and rotations, ragged lengths (empty, mid, at capacity), non-finite tokens;
its reference is turboquant_cache.append(impl="xla"). The D = 128 / 256
cases and the three-step decode are marked slow (15-40 s each in
interpret mode); `pytest -m slow` runs them.
"""

import dataclasses

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from turboquant_jax import cache as cache_lib
from turboquant_jax.cache import turboquant_cache
from turboquant_jax.kernels.quantize_append import pallas_gpu


def _cache(seed, dim, capacity=24, batch=4, heads=1, **config):
  """A prefilled cache whose sequences hold 0, 7, capacity - 1 and capacity
  tokens (the last one full: its append is dropped)."""
  cfg = cache_lib.CacheConfig(**config)
  keys = jax.random.split(jax.random.key(seed), 3)
  c = cache_lib.init(cfg, batch, heads, capacity, dim, key=keys[0])
  k = jax.random.normal(keys[1], (batch, heads, capacity, dim))
  v = jax.random.normal(keys[2], (batch, heads, capacity, dim))
  lengths = jnp.array([0, 7, capacity - 1, capacity][:batch], jnp.int32)
  return cache_lib.prefill(c, k, v, lengths)


def _token(seed, cache, dtype=jnp.bfloat16):
  shape = (cache.batch, cache.kv_heads, 1, cache.head_dim)
  k1, k2 = jax.random.split(jax.random.key(seed + 100))
  return (jax.random.normal(k1, shape, dtype),
          3.0 * jax.random.normal(k2, shape, dtype))


# Under jit, as in a decode loop: a sequence at its capacity drops the token
# (eagerly, that append would raise).
@jax.jit
def _fused(cache, k, v):
  return turboquant_cache.append(cache, k, v, impl="pallas_gpu",
                                 interpret=True)


@jax.jit
def _xla(cache, k, v):
  return turboquant_cache.append(cache, k, v, impl="xla")


def _stored(cache) -> list[np.ndarray]:
  return [np.asarray(a, np.float32) if a.dtype != np.uint8 else np.asarray(a)
          for a in (cache.keys.codes, cache.keys.norms, cache.values.codes,
                    cache.values.norms)]


class FusedAppendTest(parameterized.TestCase):

  def assert_same_append(self, ours, ref, before):
    np.testing.assert_array_equal(ours.lengths, ref.lengths)
    written = np.zeros((ref.batch, ref.capacity), bool)
    pos = np.asarray(before.lengths)
    for b in range(ref.batch):
      if pos[b] < ref.capacity:
        written[b, pos[b]] = True
    written = np.broadcast_to(written[:, None, :], (
        ref.batch, ref.kv_heads, ref.capacity))          # [B, K, S]
    for got, want, old in zip(_stored(ours), _stored(ref), _stored(before)):
      # Nothing but the appended position changes, in any sequence.
      np.testing.assert_array_equal(got[~written], old[~written])
      new_got, new_want = got[written], want[written]
      if got.dtype == np.uint8:
        # Equal codes but for a coordinate within rounding of a threshold
        # (the norms are summed in another order): at most one byte.
        self.assertLessEqual(np.sum(new_got != new_want), 1)
      else:
        np.testing.assert_allclose(new_got, new_want, rtol=8e-3,
                                   equal_nan=True)

  def check_equal_to_xla(self, dim, kb, vb, norm_dtype, correction,
                         centered, rot):
    seed = dim + 10 * kb + vb
    cache = _cache(seed, dim, heads=2, key_bits=kb, value_bits=vb,
                   norm_dtype=norm_dtype, norm_correction=correction,
                   center_keys=centered, rotation=rot)
    k, v = _token(seed, cache)
    self.assert_same_append(_fused(cache, k, v), _xla(cache, k, v), cache)

  @parameterized.parameters(
      # dim, key bits, value bits, norm dtype, correction, centered, rotation
      (64, 4, 3, "float16", True, False, "haar"),
      (64, 3, 2, "bfloat16", False, True, "hadamard"),
  )
  def test_equals_the_xla_path(self, *case):
    self.check_equal_to_xla(*case)

  @pytest.mark.slow
  def test_wider_heads_equal_the_xla_path(self):
    for case in ((128, 2, 4, "bfloat16", False, False, "hadamard"),
                 (256, 1, 3, "float32", True, True, "haar")):
      self.check_equal_to_xla(*case)

  @pytest.mark.slow
  def test_token_by_token_equals_the_xla_path(self):
    cache = _cache(3, 64, key_bits=4, value_bits=4)
    cache = dataclasses.replace(cache, lengths=jnp.array([0, 3, 10, 20],
                                                         jnp.int32))
    ours = ref = cache
    for step in range(3):
      k, v = _token(step, cache, jnp.float32)
      before = ours
      ours, ref = _fused(ours, k, v), _xla(ref, k, v)
      self.assert_same_append(ours, ref, before)
    k_ours, v_ours = cache_lib.dequantize(ours)
    k_ref, v_ref = cache_lib.dequantize(ref)
    np.testing.assert_allclose(k_ours, k_ref, atol=2e-2)
    np.testing.assert_allclose(v_ours, v_ref, atol=6e-2)

  def test_in_a_donated_decode_loop(self):
    # As in generation: the cache carried through a fori_loop, donated.
    cache = cache_lib.init(cache_lib.CacheConfig(key_bits=4, value_bits=3),
                           2, 1, 16, 64, key=jax.random.key(0))
    tokens = jax.random.normal(jax.random.key(1), (5, 2, 1, 1, 64))

    def run(impl):
      body = lambda i, c: turboquant_cache.append(
          c, tokens[i], 2 * tokens[i], impl=impl,
          interpret=True if impl == "pallas_gpu" else None)
      return jax.jit(lambda c: jax.lax.fori_loop(0, 5, body, c),
                     donate_argnums=0)(jax.tree.map(jnp.copy, cache))

    ours, ref = run("pallas_gpu"), run("xla")
    np.testing.assert_array_equal(ours.lengths, [5, 5])
    for got, want in zip(_stored(ours), _stored(ref)):
      self.assertLessEqual(np.sum(~np.isclose(got, want, rtol=1e-3)), 1)

  def test_non_finite_token_stores_nan_norm_and_spares_the_rest(self):
    cache = _cache(5, 64, key_bits=4, value_bits=3)
    k, v = _token(5, cache, jnp.float32)
    k = k.at[1, 0, 0, 3].set(jnp.nan).at[2, 0, 0, 0].set(jnp.inf)
    ours, ref = _fused(cache, k, v), _xla(cache, k, v)
    self.assert_same_append(ours, ref, cache)
    self.assertTrue(np.isnan(np.float32(ours.keys.norms[1, 0, 7])))
    self.assertTrue(np.isnan(np.float32(ours.keys.norms[2, 0, 23])))
    self.assertTrue(np.isfinite(np.float32(ours.values.norms[1, 0, 7])))
    self.assertTrue(np.isfinite(np.float32(ours.keys.norms[0, 0, 0])))

  @parameterized.named_parameters(
      ("split", dict(key_bits=3.5), 1, "fractional"),
      ("window", dict(window=4), 1, "window"),
      ("sink", dict(sink=2), 1, "sink"),
      ("prod", dict(key_method="prod", key_bits=3), 1, "method"),
      ("wide", dict(value_bits=5), 1, "5 bits"),
      ("norm8", dict(norm_bits=8), 1, "8-bit"),
      ("chunk", dict(), 2, "2 tokens"),
  )
  def test_unsupported_raises(self, config, tokens, match):
    cache = _cache(7, 64, **config)
    k = jnp.ones((cache.batch, cache.kv_heads, tokens, 64))
    with self.assertRaisesRegex(NotImplementedError, match):
      _fused(dataclasses.replace(cache, lengths=jnp.zeros_like(
          cache.lengths)), k, k)

  def test_head_dim_not_a_multiple_of_64_is_unsupported(self):
    cache = _cache(7, 96)
    k = jnp.ones((cache.batch, cache.kv_heads, 1, 96))
    with self.assertRaisesRegex(NotImplementedError, "multiple of 64"):
      _fused(cache, k, k)

  def test_default_config_falls_back_to_xla_off_a_gpu(self):
    self.assertEqual(cache_lib.CacheConfig().append_impl, "pallas_gpu")
    cache = _cache(9, 64)
    k, v = _token(9, cache)
    if jax.default_backend() == "gpu":
      self.skipTest("on a GPU the config picks the kernel")
    got = jax.jit(cache_lib.append)(cache, k, v)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(_xla(cache, k, v))):
      np.testing.assert_array_equal(a, b)

  def test_bad_impl_and_config(self):
    cache = _cache(9, 64, batch=2)
    k = jnp.ones((cache.batch, cache.kv_heads, 1, 64))
    with self.assertRaisesRegex(ValueError, "impl"):
      turboquant_cache.append(cache, k, k, impl="cuda")
    with self.assertRaisesRegex(ValueError, "append_impl"):
      cache_lib.CacheConfig(append_impl="triton")
    # Other kinds ignore the field (their append is XLA's).
    self.assertEqual(cache_lib.CacheConfig(kind="full").append_impl,
                     "pallas_gpu")

  def test_supported_names_the_reason(self):
    self.assertIsNone(pallas_gpu.supported(_cache(1, 64), 1))
    self.assertIn("not a TurboQuantCache", pallas_gpu.supported(
        cache_lib.init(cache_lib.CacheConfig(kind="full"), 1, 1, 8, 64), 1))


if __name__ == "__main__":
  absltest.main()
