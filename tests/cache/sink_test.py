"""Attention-sink tokens of the TurboQuant cache (CacheConfig.sink).

Notation: B batch, K KV heads, S capacity, T tokens, D head dim, N sink
tokens, W window.
"""

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from turboquant_jax import cache as cache_lib
from turboquant_jax.cache import CacheConfig
from turboquant_jax.kernels import decode_attention as attn
from turboquant_jax.kernels.decode_attention import parts

B, K, S, D = 2, 2, 24, 64


def _kv(seed: int, tokens: int) -> tuple[jax.Array, jax.Array]:
  kk, kv = jax.random.split(jax.random.key(seed))
  return (jax.random.normal(kk, (B, K, tokens, D)) * 2.0,
          jax.random.normal(kv, (B, K, tokens, D)))


def _cfg(**kw) -> CacheConfig:
  return CacheConfig(kind="turboquant", **{"key_bits": 2, "value_bits": 2,
                                           "sink": 3, "dtype": "float32",
                                           **kw})


class SinkTest(parameterized.TestCase):

  @parameterized.named_parameters(("no_window", 0), ("window", 4))
  def test_first_tokens_read_exactly_after_appends(self, window):
    k, v = _kv(0, 14)
    c = cache_lib.prefill(cache_lib.init(_cfg(window=window), B, K, S, D),
                          k[:, :, :5], v[:, :, :5], jnp.array([5, 2]))
    for t in range(5, 14, 3):
      c = cache_lib.append(c, k[:, :, t:t + 3], v[:, :, t:t + 3])
    dk, dv = cache_lib.dequantize(c)
    # Row 0: positions 0..2 are tokens 0..2; row 1 (prefill of 2): tokens
    # 0, 1 and its first appended token 5.
    np.testing.assert_array_equal(dk[0, :, :3], k[0, :, :3])
    np.testing.assert_array_equal(dv[0, :, :3], v[0, :, :3])
    np.testing.assert_array_equal(dv[1, :, 2], v[1, :, 5])
    # Position 3 (neither sink nor window) is quantized at 2 bits.
    self.assertGreater(float(jnp.abs(dv[0, :, 3] - v[0, :, 3]).max()), 0.05)
    mem = cache_lib.memory(c)
    base = cache_lib.memory(cache_lib.init(_cfg(window=window, sink=0), B, K,
                                           S, D))
    # Sink keys and values: 2 · B·K·N·D · 4 bytes (float32).
    self.assertEqual(mem["nbytes"] - base["nbytes"], 2 * B * K * 3 * D * 4)

  @parameterized.named_parameters(
      ("decode", dict(), 1, (9, 2)),
      ("chunk_window", dict(window=4), 3, (12, 4)),
      ("overlap_norm8", dict(window=6, norm_bits=8, key_bits=3.5,
                             key_method="prod"), 2, (7, 3)),
      ("short", dict(window=2, sink=5), 1, (1, 3)))
  def test_xla_matches_reference(self, kw, tokens, lengths):
    k, v = _kv(1, 12)
    lengths = jnp.array(lengths)
    c = cache_lib.prefill(cache_lib.init(_cfg(**kw), B, K, S, D), k, v,
                          lengths)
    q = jax.random.normal(jax.random.key(2), (B, tokens, 2 * K, D))
    want = attn.chunk_attention(q, c, lengths, impl="reference")
    got = attn.chunk_attention(q, c, lengths, impl="xla")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # The sink changes the result (it is read, not ignored).
    c0 = cache_lib.prefill(cache_lib.init(_cfg(**{**kw, "sink": 0}), B, K,
                                          S, D), k, v, lengths)
    other = attn.chunk_attention(q, c0, lengths, impl="xla")
    self.assertGreater(float(jnp.abs(other - got).max()), 1e-3)

  def test_kernels_decline_and_default_falls_back(self):
    k, v = _kv(3, 8)
    c = cache_lib.prefill(cache_lib.init(_cfg(), B, K, S, D), k, v,
                          jnp.array([8, 5]))
    self.assertIn("sink=3", parts.supported(c))
    q = jax.random.normal(jax.random.key(4), (B, 2 * K, D))
    with self.assertRaisesRegex(NotImplementedError, "sink"):
      attn.decode_attention(q, c, c.lengths, impl="pallas_tpu",
                            interpret=True)
    np.testing.assert_array_equal(
        attn.decode_attention(q, c, c.lengths),
        attn.decode_attention(q, c, c.lengths, impl="xla"))

  def test_bad_config(self):
    for kw, pattern in ((dict(sink=-1), "sink=-1"),
                        (dict(sink=True), "sink=True"),
                        (dict(sink=2.0), "sink=2.0")):
      with self.subTest(**kw):
        with self.assertRaisesRegex(ValueError, pattern):
          _cfg(**kw)
    with self.assertRaisesRegex(ValueError, "sink=2 needs kind"):
      CacheConfig(kind="kivi", sink=2)


if __name__ == "__main__":
  absltest.main()
