"""Tests of decode/chunk attention: the reference, then every impl against it.

Notation: B batch, T query tokens, H query heads, K KV heads, G = H / K query
heads per KV head, S capacity, D head dim.
"""

import dataclasses
import zlib

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from turboquant_jax import cache as cache_lib
from turboquant_jax.cache import CacheConfig
from turboquant_jax.kernels import decode_attention as attn
from turboquant_jax.kernels.decode_attention import parts
from turboquant_jax.kernels.decode_attention import reference
from turboquant_jax.quant import rotation
from turboquant_jax.quant import split
from turboquant_jax.quant import turboquant

LN3 = float(np.log(3.0))


def _full_cache(k, v, lengths):
  """A float32 full cache holding k, v [B, K, S, D] (capacity S)."""
  k, v = np.asarray(k, np.float32), np.asarray(v, np.float32)
  b, kv, s, d = k.shape
  cache = cache_lib.init(CacheConfig(kind="full", dtype="float32"), b, kv, s,
                         d)
  return cache_lib.prefill(cache, jnp.asarray(k, jnp.float32),
                           jnp.asarray(v, jnp.float32),
                           jnp.asarray(lengths, jnp.int32))


def _numpy_attention(q, k, v, lengths, scale=None):
  """Plain loops: q [B, T, H, D], k, v [B, K, S, D] -> [B, T, H, D]."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  b, t, h, d = q.shape
  g = h // k.shape[1]
  scale = d ** -0.5 if scale is None else scale
  out = np.zeros((b, t, h, d))
  for i in range(b):
    for j in range(t):
      pos = int(lengths[i]) - t + j                  # the query's position
      if pos < 0:
        continue
      for n in range(h):
        s = k[i, n // g, :pos + 1] @ q[i, j, n] * scale
        p = np.exp(s - s.max())
        out[i, j, n] = (p / p.sum()) @ v[i, n // g, :pos + 1]
  return out


class ReferenceTest(parameterized.TestCase):

  def test_hand_computed_decode(self):
    # One sequence, one KV head, D = 2, two live tokens and one junk slot:
    #   k0 = [1, 0], k1 = [0, 1], v0 = [1, 2], v1 = [3, 4].
    # Query head 0: q = [√2·ln3, 0]; with scale 1/√2 the scores are
    #   [ln3, 0] -> softmax [3/4, 1/4] -> 3/4·[1, 2] + 1/4·[3, 4] = [1.5, 2.5].
    # Query head 1 (same KV head, GQA): q = [0, √2·ln3] -> scores [0, ln3]
    #   -> [1/4, 3/4] -> [2.5, 3.5].
    k = [[[[1, 0], [0, 1], [100, 100]]]]
    v = [[[[1, 2], [3, 4], [-50, -50]]]]
    cache = _full_cache(k, v, [2])
    r2 = np.sqrt(2.0) * LN3
    q = jnp.array([[[r2, 0.0], [0.0, r2]]])                   # [B, H, D]
    out = attn.decode_attention(q, cache, jnp.array([2]), impl="reference")
    np.testing.assert_allclose(out, [[[1.5, 2.5], [2.5, 3.5]]], rtol=1e-6)
    # An explicit scale = 1 with q = [ln3, 0] gives the same scores.
    out = attn.decode_attention(jnp.array([[[LN3, 0.0]]]), cache,
                                jnp.array([2]), impl="reference", scale=1.0)
    np.testing.assert_allclose(out, [[[1.5, 2.5]]], rtol=1e-6)

  def test_hand_computed_chunk_is_causal(self):
    # The same cache; T = 2 queries at positions 0 and 1 (length 2).
    # Query 0 sees only k0: softmax of one score is 1 -> v0 = [1, 2].
    # Query 1 sees k0, k1: [1.5, 2.5] as above.
    k = [[[[1, 0], [0, 1], [100, 100]]]]
    v = [[[[1, 2], [3, 4], [-50, -50]]]]
    cache = _full_cache(k, v, [2])
    r2 = np.sqrt(2.0) * LN3
    q = jnp.array([[[[r2, 0.0]], [[r2, 0.0]]]])               # [B, T, H, D]
    out = attn.chunk_attention(q, cache, jnp.array([2]), impl="reference")
    np.testing.assert_allclose(out, [[[[1.0, 2.0]], [[1.5, 2.5]]]],
                               rtol=1e-6)
    # Length 0: nothing is visible, the output is zero (not NaN).
    out = attn.decode_attention(q[:, 0], cache, jnp.array([0]),
                                impl="reference")
    np.testing.assert_array_equal(out, [[[0.0, 0.0]]])

  @parameterized.named_parameters(
      dict(testcase_name="decode_mha", t=1, g=1),
      dict(testcase_name="chunk_gqa3", t=3, g=3),
  )
  def test_against_numpy(self, t, g):
    # Random full-precision cache, ragged lengths [7, 11] of S = 11.
    rng = np.random.default_rng(t * 10 + g)
    b, kv, s, d = 2, 2, 11, 16
    k = rng.normal(size=(b, kv, s, d)) * 2.0
    v = rng.normal(size=(b, kv, s, d))
    q = rng.normal(size=(b, t, kv * g, d))
    lengths = np.array([7, 11])
    cache = _full_cache(k, v, lengths)
    out = attn.chunk_attention(jnp.asarray(q, jnp.float32), cache,
                               jnp.asarray(lengths), impl="reference")
    np.testing.assert_allclose(out, _numpy_attention(q, k, v, lengths),
                               rtol=1e-5, atol=1e-6)

  @parameterized.named_parameters(
      dict(testcase_name="f32_decode", t=1, g=3, dtype="float32",
           q_dtype=jnp.float32, tol=1e-5),
      dict(testcase_name="f32_chunk", t=4, g=2, dtype="float32",
           q_dtype=jnp.float32, tol=1e-5),
      # A bf16 model over a bf16 cache (on a GPU the query and the
      # probabilities stay bf16, relative rounding 2^-9; f32 on a CPU).
      dict(testcase_name="bf16_decode", t=1, g=4, dtype="bfloat16",
           q_dtype=jnp.bfloat16, tol=2e-2),
      dict(testcase_name="bf16_cache_f32_query", t=2, g=1, dtype="bfloat16",
           q_dtype=jnp.float32, tol=1e-5),
  )
  def test_xla_reads_a_full_cache_in_its_dtype(self, t, g, dtype, q_dtype,
                                               tol):
    # Ragged lengths [5, 13] of S = 16, against plain loops over the keys
    # and values as the cache stores them.
    rng = np.random.default_rng(t * 7 + g)
    b, kv, s, d = 2, 2, 16, 32
    k = rng.normal(size=(b, kv, s, d)) * 2.0
    v = rng.normal(size=(b, kv, s, d))
    q = jnp.asarray(rng.normal(size=(b, t, kv * g, d)), q_dtype)
    lengths = np.array([5, 13])
    cache = cache_lib.prefill(
        cache_lib.init(CacheConfig(kind="full", dtype=dtype), b, kv, s, d),
        jnp.asarray(k, jnp.float32), jnp.asarray(v, jnp.float32),
        jnp.asarray(lengths, jnp.int32))
    got = attn.chunk_attention(q, cache, jnp.asarray(lengths), impl="xla")
    self.assertEqual(got.dtype, jnp.float32)
    stored = lambda x: np.asarray(x, np.float32)
    want = _numpy_attention(stored(q), stored(cache.keys),
                            stored(cache.values), lengths)
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)

  def test_cudnn_refuses_what_it_cannot_run(self):
    # impl="cudnn" (a GPU-only baseline) raises NotImplementedError, with
    # the reason, off a GPU, for other caches and for chunks.
    full = cache_lib.init(CacheConfig(kind="full"), 2, 2, 16, 32)
    f32 = cache_lib.init(CacheConfig(kind="full", dtype="float32"), 2, 2,
                         16, 32)
    tq = cache_lib.init(CacheConfig(key_bits=4), 2, 2, 16, 32)
    lengths = jnp.array([3, 5])
    cases = [(full, 1, "GPU" if jax.default_backend() != "gpu" else None),
             (tq, 1, "FullCache"), (full, 2, "decode only"),
             (f32, 1, "bf16/f16")]
    for cache, tokens, why in cases:
      if why is None:
        continue
      with self.assertRaisesRegex(NotImplementedError, why):
        attn.chunk_attention(jnp.ones((2, tokens, 4, 32)), cache, lengths,
                             impl="cudnn")

  def test_kivi_reads_its_dequantized_cache(self):
    # KIVI has no fused impl: every impl must equal attention over what
    # kivi dequantize returns (full precision where KIVI keeps it).
    cfg = CacheConfig(kind="kivi", key_bits=2, value_bits=2, group_size=4,
                      window=3)
    rng = np.random.default_rng(5)
    b, kv, s, d, g = 2, 2, 16, 32, 2
    k = jnp.asarray(rng.normal(size=(b, kv, 12, d)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, kv, 12, d)), jnp.float32)
    lengths = jnp.array([9, 12])
    cache = cache_lib.prefill(cache_lib.init(cfg, b, kv, s, d), k, v,
                              lengths)
    q = jnp.asarray(rng.normal(size=(b, 3, kv * g, d)), jnp.float32)
    dk, dv = cache_lib.dequantize(cache)
    want = _numpy_attention(q, dk, dv, lengths)
    for impl in ("reference", "xla", None):
      out = attn.chunk_attention(q, cache, lengths, impl=impl)
      np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6,
                                 err_msg=f"{impl=}")
    # And it is a real approximation at 2 bits: not the exact attention.
    exact = _numpy_attention(q, k, v, lengths)
    self.assertGreater(np.abs(want - exact).max(), 1e-3)

  def test_errors(self):
    cache = _full_cache(np.zeros((2, 2, 8, 16)), np.zeros((2, 2, 8, 16)),
                        [3, 8])
    lengths = jnp.array([3, 8])
    with self.assertRaisesRegex(ValueError, "head_dim 32"):
      attn.decode_attention(jnp.zeros((2, 4, 32)), cache, lengths)
    with self.assertRaisesRegex(ValueError, "q_heads=3 must be a multiple"):
      attn.decode_attention(jnp.zeros((2, 3, 16)), cache, lengths)
    with self.assertRaisesRegex(ValueError, "batch 1"):
      attn.decode_attention(jnp.zeros((1, 4, 16)), cache, lengths[:1])
    with self.assertRaisesRegex(ValueError, "capacity is 8"):
      attn.decode_attention(jnp.zeros((2, 4, 16)), cache, jnp.array([3, 9]))
    with self.assertRaisesRegex(ValueError, "capacity"):
      attn.chunk_attention(jnp.zeros((2, 1, 4, 16)), cache,
                           jnp.array([-1, 2]), impl="reference")
    with self.assertRaisesRegex(ValueError, r"q must be \[batch, q_heads"):
      attn.decode_attention(jnp.zeros((2, 1, 4, 16)), cache, lengths)
    with self.assertRaisesRegex(ValueError, "tokens, q_heads"):
      attn.chunk_attention(jnp.zeros((2, 4, 16)), cache, lengths)
    with self.assertRaisesRegex(ValueError, "not available"):
      attn.decode_attention(jnp.zeros((2, 4, 16)), cache, lengths,
                            impl="cuda")


# Base: D = 128, G = 4 query heads per KV head, 3-bit mse keys and values,
# no window, decode (T = 1), lengths [5, 13] in S = 16. Each case changes a
# few of these.
_BASE = dict(dim=128, groups=4, key_bits=3, value_bits=3, method="mse",
             window=0, tokens=1, lengths=(5, 13), norm_bits=16)


def _case(name, **changes):
  return dict(testcase_name=name, **{**_BASE, **changes})


_CASES = [
    _case("base"),
    _case("dim64_mha", dim=64, groups=1),
    _case("dim256_gqa8_bits4_2", dim=256, groups=8, key_bits=4,
          value_bits=2),
    _case("gqa3_bits2", groups=3, key_bits=2, value_bits=2),
    _case("bits2.5", key_bits=2.5, value_bits=2.5),
    _case("bits3.5_chunk", key_bits=3.5, value_bits=3.5, tokens=3),
    _case("prod", method="prod"),
    _case("window_chunk", window=4, tokens=3),
    _case("length1_and_full", lengths=(1, 16)),
    # Everything at once: split prod keys, a window, a chunk, GQA 3, D 64.
    _case("all", dim=64, groups=3, key_bits=2.5, value_bits=3.5,
          method="prod", window=5, tokens=3, lengths=(3, 14)),
    # 8-bit log norms (decoded before the kernel): plain, and split prod
    # keys with a window and a chunk.
    _case("norm8", norm_bits=8),
    _case("norm8_all", dim=64, groups=3, key_bits=2.5, value_bits=3.5,
          method="prod", window=5, tokens=3, lengths=(3, 14), norm_bits=8),
]

_SLOW_CASES = [
    _case(f"d{d}_g{g}_b{bits}_{m}_w{w}_t{t}", dim=d, groups=g, key_bits=bits,
          value_bits=bits, method=m, window=w, tokens=t, lengths=(t, 11))
    for d, g in ((64, 1), (128, 4), (256, 8), (128, 3))
    for bits in (2, 3, 4, 2.5, 3.5)
    for m in ("mse", "prod")
    for w in (0, 4)
    for t in (1, 3)
]


class ImplTest(parameterized.TestCase):
  """An impl against the reference on the same TurboQuant caches.

  Subclass with IMPL (and IMPL_KWARGS, e.g. interpret mode) for a kernel.
  Both sides compute in f32; the impl reorders sums (rotated domain, online
  softmax), so they agree to about 1e-5 relative.
  """
  IMPL = "xla"
  IMPL_KWARGS = {}
  RTOL = 1e-5

  def _compare(self, dim, groups, key_bits, value_bits, method, window,
               tokens, lengths, norm_bits=16):
    # Fresh inputs per test, seeded by the test's name (reproducible).
    key = jax.random.key(zlib.crc32(self.id().encode()))
    k_init, k_k, k_v, k_q = jax.random.split(key, 4)
    b, kv, s = 2, 2, 16
    cfg = CacheConfig(kind="turboquant", key_bits=key_bits,
                      value_bits=value_bits, key_method=method,
                      window=window, norm_bits=norm_bits)
    k = jax.random.normal(k_k, (b, kv, s, dim)) * 2.0
    v = jax.random.normal(k_v, (b, kv, s, dim))
    lengths = jnp.array(lengths)
    cache = cache_lib.prefill(
        cache_lib.init(cfg, b, kv, s, dim, key=k_init), k, v, lengths)
    q = jax.random.normal(k_q, (b, tokens, kv * groups, dim))
    if tokens == 1:
      want = attn.decode_attention(q[:, 0], cache, lengths, impl="reference")
      got = attn.decode_attention(q[:, 0], cache, lengths, impl=self.IMPL,
                                  **self.IMPL_KWARGS)
    else:
      want = attn.chunk_attention(q, cache, lengths, impl="reference")
      got = attn.chunk_attention(q, cache, lengths, impl=self.IMPL,
                                 **self.IMPL_KWARGS)
    self.assertEqual(got.shape, want.shape)
    self.assertEqual(got.dtype, jnp.float32)
    # Outputs are softmax averages of values of size ~1: an absolute floor
    # of RTOL covers entries that happen to be near 0.
    np.testing.assert_allclose(got, want, rtol=self.RTOL, atol=self.RTOL)

  @parameterized.named_parameters(*_CASES)
  def test_matches_reference(self, **case):
    self._compare(**case)

  def test_8bit_is_close_to_full_precision(self):
    # 8-bit keys have relative error ‖k̃ - k‖/‖k‖ ≈ √(4.2e-5) ≈ 6.5e-3
    # (PAPER.md §2) in a random direction, so a score q·k/√D moves by about
    # 6.5e-3·‖q‖‖k‖/D ≈ 6.5e-3 (unit-variance q, k); probabilities move by
    # that relatively, and values carry the same 6.5e-3 error: the output
    # is off by ~1e-2 of its norm (measured 8.7e-3; 2 bits: 0.47).
    key = jax.random.key(7)
    k_k, k_v, k_q = jax.random.split(key, 3)
    b, kv, s, d = 2, 2, 16, 128
    k = jax.random.normal(k_k, (b, kv, s, d))
    v = jax.random.normal(k_v, (b, kv, s, d))
    q = jax.random.normal(k_q, (b, kv * 2, d))
    lengths = jnp.array([9, 16])
    exact = attn.decode_attention(q, _full_cache(k, v, lengths), lengths,
                                  impl="reference")
    cfg = CacheConfig(kind="turboquant", key_bits=8, value_bits=8)
    cache = cache_lib.prefill(cache_lib.init(cfg, b, kv, s, d), k, v, lengths)
    out = attn.decode_attention(q, cache, lengths, impl=self.IMPL,
                                **self.IMPL_KWARGS)
    err = float(jnp.linalg.norm(out - exact) / jnp.linalg.norm(exact))
    self.assertLess(err, 2e-2)

  def test_errors(self):
    # Lengths beyond the capacity (eager), head dim and GQA mismatches.
    cfg = CacheConfig(kind="turboquant", key_bits=3, value_bits=3)
    cache = cache_lib.init(cfg, 2, 2, 8, 64)
    with self.assertRaisesRegex(ValueError, "capacity is 8"):
      attn.decode_attention(jnp.zeros((2, 4, 64)), cache,
                            jnp.array([1, 9]), impl=self.IMPL,
                            **self.IMPL_KWARGS)
    with self.assertRaisesRegex(ValueError, "head_dim 32"):
      attn.decode_attention(jnp.zeros((2, 4, 32)), cache,
                            jnp.array([1, 1]), impl=self.IMPL,
                            **self.IMPL_KWARGS)
    with self.assertRaisesRegex(ValueError, "q_heads=5"):
      attn.decode_attention(jnp.zeros((2, 5, 64)), cache,
                            jnp.array([1, 1]), impl=self.IMPL,
                            **self.IMPL_KWARGS)


class FoldedSplitRotationTest(parameterized.TestCase):
  """parts.prepare / parts.finish over a split cache's stored folded
  rotations (one product each way) equal the same with them derived in the
  call (a cache built without them), and the prepared queries are each
  part's channels rotated by its own rotation (the definition). The
  merge's result against the reference: ImplTest's split cases."""

  @parameterized.parameters((2.5, 3.5, "prod"), (3.5, 4, "mse"),
                            (3, 2.5, "mse"))
  def test_equal_without_them(self, key_bits, value_bits, method):
    # Given a split cache with a window and a 3-token chunk of queries.
    b, kv, s, d, g, t = 2, 2, 16, 64, 3, 3
    cfg = CacheConfig(kind="turboquant", key_bits=key_bits,
                      value_bits=value_bits, key_method=method, window=4)
    keys = jax.random.split(jax.random.key(11), 6)
    k = jax.random.normal(keys[0], (b, kv, s, d)) * 2.0
    v = jax.random.normal(keys[1], (b, kv, s, d))
    lengths = jnp.array([16, 9])
    folded = cache_lib.prefill(cache_lib.init(cfg, b, kv, s, d), k, v,
                               lengths)
    plain = dataclasses.replace(folded, key_split_rotation=None,
                                value_split_rotation=None)
    q = jax.random.normal(keys[2], (b, t, kv * g, d))
    # Then the kernels' inputs agree part by part.
    a, z = (parts.prepare(q, c, lengths, 0.125) for c in (folded, plain))
    for x, y in zip(a.q + [u for u in a.sq if u is not None],
                    z.q + [u for u in z.sq if u is not None]):
      np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)
    kq = folded.key_quantizer
    if isinstance(kq, split.SplitQuantizer):
      qh = parts.grouped_queries(q, kv)                     # [B, K, M, D]
      for got_part, part, ch in ((a.q[0], kq.outlier, kq.outlier_channels),
                                 (a.q[1], kq.regular, kq.regular_channels)):
        want_part = jax.vmap(
            lambda p, y, c: rotation.apply(p.rotation, jnp.take(y, c, -1)),
            in_axes=(0, 1, 0), out_axes=1)(part, qh, ch) * 0.125
        np.testing.assert_allclose(got_part, want_part, rtol=1e-5,
                                   atol=1e-5)
    # And so do the merged outputs of the same partial softmax state.
    ns, m = 4, t * g
    acc = [jax.random.normal(keys[3 + i], (b, kv, ns, m, spec.dim))
           for i, spec in enumerate(a.value_specs)]
    mx = jax.random.normal(keys[5], (b, kv, ns, m))
    l = jnp.exp(mx) + 1.0
    got, want = (parts.finish(acc, mx, l, q, c, lengths, 0.125)
                 for c in (folded, plain))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


  @parameterized.parameters(1, 40)      # 3 and 120 query rows (B·M)
  def test_products_equal_numpy(self, b):
    # The folded products (multiply-and-sum up to FOLDED_REDUCE_MAX_ROWS
    # rows of per-head matrices, einsums above and for one dense matrix)
    # are y = F q and its transpose, per KV head.
    rng = np.random.default_rng(b)
    qh = rng.normal(size=(b, 2, 3, 16)).astype(np.float32)
    f = rng.normal(size=(2, 16, 16)).astype(np.float32)
    self.assertEqual(parts.sums_products(jnp.asarray(qh), jnp.asarray(f)),
                     b == 1)
    self.assertFalse(parts.sums_products(jnp.asarray(qh),
                                         jnp.asarray(f[:1])))
    np.testing.assert_allclose(
        parts.folded_queries(jnp.asarray(qh), jnp.asarray(f)),
        np.einsum("bkmd,ked->bkme", qh, f), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        parts.folded_outputs(jnp.asarray(qh), jnp.asarray(f)),
        np.einsum("bkme,ked->bkmd", qh, f), rtol=1e-5, atol=1e-5)
    # The same product from the matrix stored transposed per head (a
    # split cache's value_split_rotation).
    np.testing.assert_allclose(
        parts.folded_outputs(jnp.asarray(qh),
                             jnp.asarray(np.swapaxes(f, 1, 2)),
                             transposed=True),
        np.einsum("bkme,ked->bkmd", qh, f), rtol=1e-5, atol=1e-5)

  @parameterized.parameters(1, 40)
  def test_a_dense_rotation_through_the_folded_products(self, b):
    # A plain tensor's dense rotation is its rotation_matrix (one for all
    # heads), whose folded products (multiply-and-sum at few query rows,
    # einsums above) are Π q and Πᵀ y; a Hadamard rotation has none.
    quantizer = turboquant.make_quantizer(jax.random.key(b), 16, 4)
    rot = quantizer.rotation
    f = parts.rotation_matrix(quantizer, None)
    self.assertEqual(f.shape, (1, 16, 16))
    qh = jax.random.normal(jax.random.key(2), (b, 2, 3, 16))
    np.testing.assert_allclose(parts.folded_queries(qh, f),
                               rotation.apply(rot, qh), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(parts.folded_outputs(qh, f),
                               rotation.invert(rot, qh), rtol=1e-5, atol=1e-5)
    hadamard = turboquant.make_quantizer(jax.random.key(b), 16, 4,
                                         rotation="hadamard")
    self.assertIsNone(parts.rotation_matrix(hadamard, None))


class MergeSplitsTest(parameterized.TestCase):
  """parts.merge_splits (one variadic reduction) equals the definition:
  every split's state rescaled to the overall max and summed, an empty
  split (m = -inf, l = 0) weighing nothing, in both layouts it reads."""

  @parameterized.parameters((4, 3, 2), (4, 1, 3), (3, 16, 4), (4, 7, 3))
  def test_equals_numpy(self, d_axis, ns, empty):
    # Given random split states, `empty` of them empty for some rows, and
    # one query row empty in every split.
    b, kv, m, d = 2, 3, 5, 8
    rng = np.random.default_rng(ns * 10 + d_axis)
    mx = rng.normal(size=(b, kv, ns, m)).astype(np.float32) * 4
    l = (np.exp(rng.normal(size=mx.shape)) + 0.5).astype(np.float32)
    mx[:, :, :min(empty, ns) - 1, 1] = -np.inf
    mx[:, :, :, 0] = -np.inf
    l[np.isinf(mx)] = 0.0
    acc = rng.normal(size=(b, kv, ns, m, d)).astype(np.float32)
    acc[np.isinf(mx)] = 0.0
    if d_axis == 3:                      # the kernel's columns: [.., D, M]
      acc = np.swapaxes(acc, 3, 4)
    # When merged.
    got_m, got_l, got_a = parts.merge_splits(jnp.asarray(mx), jnp.asarray(l),
                                             jnp.asarray(acc), d_axis)
    # Then it is the log-sum-exp combination.
    top = mx.max(axis=2)
    safe = np.where(np.isfinite(top), top, 0.0)
    w = np.where(np.isfinite(mx), np.exp(mx - safe[:, :, None]), 0.0)
    np.testing.assert_array_equal(got_m, top)
    np.testing.assert_allclose(got_l, (l * w).sum(2), rtol=1e-5, atol=1e-6)
    want_a = (acc * np.expand_dims(w, d_axis)).sum(2)
    np.testing.assert_allclose(got_a, want_a, rtol=1e-5, atol=1e-5)
    self.assertTrue(np.all(np.isfinite(got_a)))


@pytest.mark.slow
class ImplSweepTest(parameterized.TestCase):
  """The larger product of head dims, GQA, bits, methods, window, T."""
  IMPL = "xla"
  IMPL_KWARGS = {}
  RTOL = 1e-5

  @parameterized.named_parameters(*_SLOW_CASES)
  def test_matches_reference(self, **case):
    ImplTest._compare(self, **case)


if __name__ == "__main__":
  absltest.main()
