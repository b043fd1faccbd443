"""The Pallas kernels against the reference, in interpret mode on the CPU.

Notation: B batch, T query tokens, H query heads, K KV heads, G = H / K,
S capacity, D head dim. On a TPU/GPU the same classes run compiled
(INTERPRET = False) when the backend matches.
"""

import dataclasses
from unittest import mock
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
from turboquant_jax.kernels.decode_attention import pallas_gpu
from turboquant_jax.kernels.decode_attention import pallas_gpu_tokens
from turboquant_jax.kernels.decode_attention import parts
from turboquant_jax.quant import rotation

import decode_attention_test as base


class PallasTpuInterpretTest(base.ImplTest):
  """Every ImplTest case (split bits, prod keys, window, chunks, D 64-256,
  GQA 1-8, length 1) through the TPU kernel in TPU interpret mode."""
  IMPL = "pallas_tpu"
  # A small block so that caches of 16 tokens still take several blocks
  # (and the clamped, skipped blocks past a length are exercised).
  IMPL_KWARGS = dict(interpret=True, block=8)
  RTOL = 2e-5


@pytest.mark.slow
class PallasTpuInterpretSweepTest(base.ImplSweepTest):
  IMPL = "pallas_tpu"
  IMPL_KWARGS = dict(interpret=True, block=8)
  RTOL = 2e-5


_GPU_CASES = [
    dict(testcase_name="d128_g4_b4", dim=128, groups=4, key_bits=4,
         value_bits=4, window=0, tokens=1, lengths=(100, 37)),
    dict(testcase_name="d128_g3_b3_chunk", dim=128, groups=3, key_bits=3,
         value_bits=3, window=0, tokens=3, lengths=(128, 5)),
    dict(testcase_name="d64_g1_b2_window_select", dim=64, groups=1,
         key_bits=2, value_bits=4, window=6, tokens=1, lengths=(1, 77),
         lookup_mode="select"),
    dict(testcase_name="d128_g8_b3_prod", dim=128, groups=8, key_bits=3,
         value_bits=3, window=0, tokens=1, lengths=(65, 128),
         method="prod"),
    dict(testcase_name="d256_g1_b2", dim=256, groups=1, key_bits=2,
         value_bits=2, window=0, tokens=1, lengths=(3, 64)),
    dict(testcase_name="d128_g4_b4_poly16", dim=128, groups=4, key_bits=4,
         value_bits=4, window=0, tokens=1, lengths=(100, 1),
         lookup_mode="poly16"),
    dict(testcase_name="d128_g3_b3_prod_chunk_poly16", dim=128, groups=3,
         key_bits=3, value_bits=2, window=0, tokens=2, lengths=(128, 70),
         method="prod", lookup_mode="poly16"),
    dict(testcase_name="d64_g4_b3_24byte_rows", dim=64, groups=4,
         key_bits=3, value_bits=3, window=0, tokens=1, lengths=(128, 65)),
    dict(testcase_name="d128_g4_b3.5_split", dim=128, groups=4,
         key_bits=3.5, value_bits=2.5, window=0, tokens=1,
         lengths=(90, 128)),
    dict(testcase_name="d64_g2_b3_prod_8byte_signs", dim=64, groups=2,
         key_bits=3, value_bits=4, window=3, tokens=2, lengths=(7, 120),
         method="prod"),
    dict(testcase_name="d128_g1_b6_poly16_selects", dim=128, groups=1,
         key_bits=6, value_bits=4, window=0, tokens=1, lengths=(50, 99),
         lookup_mode="poly16"),
    # "prmt": 2-, 3- and 4-bit parts by byte permutes (its interpret-mode
    # stand-in), other widths by poly16.
    dict(testcase_name="d64_g4_b3_prmt_24byte_rows", dim=64, groups=4,
         key_bits=3, value_bits=3, window=0, tokens=1, lengths=(128, 97),
         lookup_mode="prmt"),
    dict(testcase_name="d128_g4_b2_prmt", dim=128, groups=4, key_bits=2,
         value_bits=2, window=0, tokens=1, lengths=(128, 33),
         lookup_mode="prmt"),
    dict(testcase_name="d64_g4_b4_prmt", dim=64, groups=4, key_bits=4,
         value_bits=4, window=0, tokens=1, lengths=(128, 61),
         lookup_mode="prmt"),
    dict(testcase_name="d128_g2_b3.5_prmt_split", dim=128, groups=2,
         key_bits=3.5, value_bits=3, window=2, tokens=2, lengths=(9, 128),
         lookup_mode="prmt"),
]


class PallasGpuInterpretTest(parameterized.TestCase):
  """The Mosaic GPU kernel in GPU interpret mode (S = 128, two splits).

  The kernel multiplies f16 operands on the tensor cores (f32
  accumulation): queries, centroids and probabilities carry f16 rounding
  (2^-11 relative), so it agrees with the f32 reference to ~1e-3 of the
  output's scale (measured 1.4e-4 to 6.3e-4), not to 1e-5.
  """
  TOL = 3e-3

  def _cache(self, dim, key_bits, value_bits, window, lengths, seed,
             method="mse", rotation_kind="haar"):
    key = jax.random.key(seed)
    k_init, k_k, k_v = jax.random.split(key, 3)
    b, kv, s = 2, 2, 128
    cfg = CacheConfig(kind="turboquant", key_bits=key_bits,
                      value_bits=value_bits, window=window,
                      key_method=method, rotation=rotation_kind)
    k = jax.random.normal(k_k, (b, kv, s, dim)) * 2.0
    v = jax.random.normal(k_v, (b, kv, s, dim))
    return cache_lib.prefill(cache_lib.init(cfg, b, kv, s, dim, key=k_init),
                             k, v, jnp.array(lengths))

  @parameterized.named_parameters(*_GPU_CASES)
  def test_matches_reference(self, dim, groups, key_bits, value_bits, window,
                             tokens, lengths, method="mse",
                             lookup_mode="poly"):
    self._check(dim, groups, key_bits, value_bits, window, tokens, lengths,
                method, lookup_mode, "queries")

  @parameterized.named_parameters(*_GPU_CASES, dict(
      testcase_name="d128_g8_b4_chunk3_32_columns", dim=128, groups=8,
      key_bits=4, value_bits=3, window=0, tokens=3, lengths=(128, 70)))
  def test_tokens_layout_matches_reference(
      self, dim, groups, key_bits, value_bits, window, tokens, lengths,
      method="mse", lookup_mode="poly"):
    # Tokens on the wgmma rows (pallas_gpu_tokens): M = T·G queries padded
    # to 16, 32 (the extra case: 24 queries) or 64 columns.
    self._check(dim, groups, key_bits, value_bits, window, tokens, lengths,
                method, lookup_mode, "tokens")

  def _check(self, dim, groups, key_bits, value_bits, window, tokens,
             lengths, method, lookup_mode, layout):
    seed = zlib.crc32(self.id().encode())
    cache = self._cache(dim, key_bits, value_bits, window, lengths, seed,
                        method)
    q = jax.random.normal(jax.random.key(seed + 1),
                          (2, tokens, 2 * groups, dim))
    lengths = jnp.array(lengths)
    want = attn.chunk_attention(q, cache, lengths, impl="reference")
    got = attn.chunk_attention(q, cache, lengths, impl="pallas_gpu",
                               interpret=True, splits=2,
                               lookup_mode=lookup_mode, layout=layout)
    scale = float(jnp.max(jnp.abs(want)))
    np.testing.assert_allclose(got, want, rtol=self.TOL,
                               atol=self.TOL * scale)

  _PARTS_OF_32 = (
      dict(testcase_name="b2.5_gqa3", key_bits=2.5, value_bits=2.5,
           groups=3, tokens=1, lengths=(100, 37)),
      dict(testcase_name="b3.5_gqa8_length1_and_full", key_bits=3.5,
           value_bits=3.5, groups=8, tokens=1, lengths=(1, 128)),
      dict(testcase_name="k3.5_v2.5_chunk_window", key_bits=3.5,
           value_bits=2.5, groups=2, tokens=3, lengths=(128, 20), window=2),
      dict(testcase_name="k2.5_v4_mha_columns_16byte_rows", key_bits=2.5,
           value_bits=4, groups=1, tokens=1, lengths=(77, 128),
           options=dict(combine="columns", tma_row_bytes=16)),
      dict(testcase_name="k4_v3.5_128_token_steps", key_bits=4,
           value_bits=3.5, groups=4, tokens=1, lengths=(128, 65),
           options=dict(tile_rows=128, splits=1, stages=3)))

  @parameterized.named_parameters(*_PARTS_OF_32)
  @pytest.mark.slow
  def test_parts_of_32_coordinates(self, **case):
    # The outlier split at D = 64 (2.5 and 3.5 bits): two parts of 32
    # coordinates each, looked up into zero-padded column groups
    # (pallas_gpu._narrow_group; at 3 bits through _narrow_planes3): slow,
    # as merge_narrow (below, the default) reads them otherwise.
    self._check_parts_of_32(merge_narrow=False, **case)

  @parameterized.named_parameters(*_PARTS_OF_32)
  def test_parts_of_32_merged(self, **case):
    # merge_narrow: a tensor's two parts as one group, each part's
    # centroids times its norms (pallas_gpu_tokens' merged_group).
    self._check_parts_of_32(merge_narrow=True, **case)

  def _check_parts_of_32(self, key_bits, value_bits, groups, tokens,
                         lengths, merge_narrow, window=0, options=None):
    seed = zlib.crc32(self.id().encode())
    cache = self._cache(64, key_bits, value_bits, window, lengths, seed)
    q = jax.random.normal(jax.random.key(seed + 1),
                          (2, tokens, 2 * groups, 64))
    lengths = jnp.array(lengths)
    want = attn.chunk_attention(q, cache, lengths, impl="reference")
    got = attn.chunk_attention(q, cache, lengths, impl="pallas_gpu",
                               interpret=True, layout="tokens",
                               lookup_mode="prmt", merge_narrow=merge_narrow,
                               **{"splits": 2, **(options or {})})
    scale = float(jnp.max(jnp.abs(want)))
    np.testing.assert_allclose(got, want, rtol=self.TOL,
                               atol=self.TOL * scale)

  @parameterized.parameters((2.5, 2.5, 3, 1), (3.5, 4, 4, 2), (4, 3.5, 8, 1))
  def test_merged_split_rotated_in_the_kernel_per_head(self, key_bits,
                                                       value_bits, groups,
                                                       tokens):
    # Each split tensor's folded rotation per KV head (the cache's
    # rotation_tiles [2, K, 1, 64, 64]) rotates the queries and outputs in
    # the kernel (the default at D = 64): as the reference, and as XLA's
    # rotations (folded_query_operand, parts.finish) to f16 rounding; the
    # same without stored tiles (laid out at the call); with the heads'
    # tiles swapped (other outlier channels) a wrong answer.
    cache = self._cache(64, key_bits, value_bits, 0, (128, 45), tokens)
    self.assertEqual(cache.rotation_tiles.shape, (2, 2, 1, 64, 64))
    q = jax.random.normal(jax.random.key(tokens), (2, tokens, 2 * groups,
                                                   64))
    run = lambda c, rotate=True: attn.chunk_attention(
        q, c, c.lengths, impl="pallas_gpu", interpret=True, splits=2,
        rotate_in_kernel=rotate)
    want = attn.chunk_attention(q, cache, cache.lengths, impl="reference")
    scale = float(jnp.max(jnp.abs(want)))
    got = run(cache)
    np.testing.assert_allclose(got, want, rtol=self.TOL,
                               atol=self.TOL * scale)
    np.testing.assert_allclose(got, run(cache, rotate=False), rtol=2e-3,
                               atol=2e-3 * scale)
    np.testing.assert_array_equal(
        run(dataclasses.replace(cache, rotation_tiles=None)), got)
    swapped = dataclasses.replace(
        cache, rotation_tiles=cache.rotation_tiles[:, ::-1])
    self.assertGreater(float(jnp.max(jnp.abs(run(swapped) - want))),
                       0.1 * scale)

  def test_merged_parts_of_32_build_no_padded_group(self):
    # merge_narrow reads each tensor's two parts as one group: no
    # zero-padded group (_narrow_group) is built; without it, four are.
    cache = self._cache(64, 2.5, 3.5, 0, (128, 9), 0)
    q = jax.random.normal(jax.random.key(5), (2, 1, 4, 64))
    real, calls = pallas_gpu._narrow_group, []

    def counted(*args):
      calls.append(1)
      return real(*args)

    jax.clear_caches()         # every option below traced afresh
    try:
      pallas_gpu._narrow_group = counted
      for merge, padded_groups in ((True, 0), (False, 4)):
        calls.clear()
        attn.chunk_attention(q, cache, cache.lengths, impl="pallas_gpu",
                             interpret=True, splits=2, merge_narrow=merge)
        self.assertLen(calls, padded_groups, merge)
    finally:
      pallas_gpu._narrow_group = real
      jax.clear_caches()

  def test_part_dims_not_a_multiple_of_8_are_declined_by_reason(self):
    # parts.supported names the part dim (a reason, not a raise), so the
    # kernels refuse with NotImplementedError and impl=None takes "xla".
    cache = cache_lib.init(CacheConfig(key_bits=4, value_bits=4), 2, 2, 64,
                           36)
    k = jax.random.normal(jax.random.key(0), (2, 2, 64, 36))
    cache = cache_lib.prefill(cache, k, -k, jnp.array([10, 64]))
    q = jax.random.normal(jax.random.key(1), (2, 4, 36))
    self.assertIn("part dim 36", parts.supported(cache))
    self.assertIn("part dim 36", pallas_gpu.append_supported(q[:, None],
                                                             cache))
    for kernel in ("pallas_gpu", "pallas_tpu"):
      with self.assertRaisesRegex(NotImplementedError, "part dim 36"):
        attn.decode_attention(q, cache, cache.lengths, impl=kernel,
                              interpret=True)
    fallback = attn.decode_attention(q, cache, cache.lengths)
    np.testing.assert_array_equal(
        fallback, attn.decode_attention(q, cache, cache.lengths, impl="xla"))

  def test_parts_of_32_refused_elsewhere(self):
    # Parts of 32 only through the tokens kernel's prmt lookup; the
    # queries layout, the other lookups and QJL sign parts of 32 raise
    # NotImplementedError (impl=None then falls back to "xla").
    q = jnp.ones((2, 1, 4, 64))
    cache = self._cache(64, 2.5, 3.5, 0, (128, 9), 0)
    prod = self._cache(64, 3.5, 2.5, 0, (128, 9), 0, method="prod")
    for c, options in ((cache, dict(layout="queries", lookup_mode="prmt")),
                       (cache, dict(layout="tokens", lookup_mode="poly16")),
                       (prod, dict(layout="tokens", lookup_mode="prmt"))):
      with self.assertRaisesRegex(NotImplementedError, "part dim 32"):
        attn.chunk_attention(q, c, c.lengths, impl="pallas_gpu",
                             interpret=True, splits=2, **options)

  @parameterized.named_parameters(
      dict(testcase_name="d128_b4_128_token_steps", dim=128, bits=4,
           rows=128, lengths=(128, 77)),
      dict(testcase_name="d64_b3_24byte_rows_128_token_steps", dim=64,
           bits=3, rows=128, lengths=(5, 128)))
  def test_tokens_layout_longer_steps(self, dim, bits, rows, lengths):
    # tile_rows tokens per pipeline step (one split of 128 tokens; a tile
    # of 24-byte rows travels as 24 TMA rows of 128 bytes), Pᵀ through a
    # transposed view.
    cache = self._cache(dim, bits, bits, 0, lengths, rows)
    q = jax.random.normal(jax.random.key(rows), (2, 8, dim))
    want = attn.decode_attention(q, cache, cache.lengths, impl="reference")
    got = attn.decode_attention(q, cache, cache.lengths, impl="pallas_gpu",
                                interpret=True, splits=1, layout="tokens",
                                tile_rows=rows, stages=3, transpose_p=True)
    scale = float(jnp.max(jnp.abs(want)))
    np.testing.assert_allclose(got, want, rtol=self.TOL,
                               atol=self.TOL * scale)

  @parameterized.named_parameters(
      dict(testcase_name="d128_gqa4", dim=128, groups=4, tokens=1,
           lengths=(128, 77)),
      dict(testcase_name="d64_gqa3_chunk2", dim=64, groups=3, tokens=2,
           lengths=(2, 127)))
  def test_eight_query_columns(self, **case):
    self.check_eight_query_columns(**case)

  @parameterized.named_parameters(
      dict(testcase_name="d64_gqa3_length1", dim=64, groups=3, tokens=1,
           lengths=(1, 100)),
      dict(testcase_name="d64_gqa8", dim=64, groups=8, tokens=1,
           lengths=(65, 128)))
  @pytest.mark.slow   # ~5 s each in interpret mode
  def test_eight_query_columns_more(self, **case):
    self.check_eight_query_columns(**case)

  def check_eight_query_columns(self, dim, groups, tokens, lengths):
    # Up to 8 queries per KV head take 8 query columns (the default with
    # transpose_p): the kernel writes [.., D, 8] columns and agrees with
    # the reference and with 16 columns.
    cache = self._cache(dim, 4, 3, 0, lengths, dim + groups)
    q = jax.random.normal(jax.random.key(groups),
                          (2, tokens, 2 * groups, dim))
    lengths = jnp.array(lengths)
    want = attn.chunk_attention(q, cache, lengths, impl="reference")
    run = lambda **o: attn.chunk_attention(
        q, cache, lengths, impl="pallas_gpu", interpret=True, splits=2, **o)
    got = run()
    scale = float(jnp.max(jnp.abs(want)))
    np.testing.assert_allclose(got, want, rtol=self.TOL,
                               atol=self.TOL * scale)
    np.testing.assert_allclose(got, run(min_columns=16), rtol=0,
                               atol=1e-3 * scale)
    inp = parts.prepare(q, cache, lengths, dim ** -0.5)
    (acc,), _, _ = pallas_gpu_tokens.fused_attention(
        inp, splits=2, lookup_mode="prmt", transpose_p=True, min_columns=8,
        interpret=pallas_gpu.interpret_params(True), columns=True)
    self.assertEqual(acc.shape[-1], 8)

  @parameterized.named_parameters(
      dict(testcase_name="d128_b4_64byte_rows", dim=128, key_bits=4,
           value_bits=4, method="mse", rows=64),
      dict(testcase_name="d128_split_32_24_16byte_rows_128_token_steps",
           dim=128, key_bits=3.5, value_bits=2.5, method="mse", rows=128))
  def test_tma_row_widths(self, **case):
    self.check_tma_row_widths(**case)

  @parameterized.named_parameters(
      dict(testcase_name="d64_b3_24byte_rows", dim=64, key_bits=3,
           value_bits=3, method="mse", rows=64),
      dict(testcase_name="d128_b3_48byte_rows", dim=128, key_bits=3,
           value_bits=3, method="mse", rows=128),
      dict(testcase_name="d64_prod_8byte_signs", dim=64, key_bits=3,
           value_bits=4, method="prod", rows=64))
  @pytest.mark.slow   # ~6 s each in interpret mode
  def test_tma_row_widths_more(self, **case):
    self.check_tma_row_widths(**case)

  def check_tma_row_widths(self, dim, key_bits, value_bits, method, rows):
    # The codes as 128-byte TMA rows (the default) or as a token's row
    # (16-byte rows where that is not a multiple of 16): the same bytes
    # viewed back as [rows, P], so the same words reach the lookup and the
    # outputs are equal bit for bit, and equal to the reference.
    cache = self._cache(dim, key_bits, value_bits, 0, (128, 71), dim + rows,
                        method)
    q = jax.random.normal(jax.random.key(rows), (2, 8, dim))
    want = attn.decode_attention(q, cache, cache.lengths, impl="reference")
    run = lambda width: attn.decode_attention(
        q, cache, cache.lengths, impl="pallas_gpu", interpret=True,
        splits=1, tile_rows=rows, tma_row_bytes=width)
    wide = run(128)
    scale = float(jnp.max(jnp.abs(want)))
    np.testing.assert_allclose(wide, want, rtol=self.TOL,
                               atol=self.TOL * scale)
    np.testing.assert_array_equal(wide, run(16))
    np.testing.assert_array_equal(wide, run(None))

  @parameterized.named_parameters(
      dict(testcase_name="b4_gqa4", key_bits=4, groups=4, tokens=1,
           lengths=(100, 37), options={}),
      dict(testcase_name="split_keys_chunk_window_columns", key_bits=3.5,
           groups=3, tokens=2, lengths=(128, 1), window=2,
           options=dict(combine="columns")),
      dict(testcase_name="prod_keys_128_token_steps", key_bits=3,
           groups=2, tokens=1, lengths=(5, 128), method="prod",
           options=dict(tile_rows=128)),
      dict(testcase_name="v2_d128", key_bits=4, value_bits=2, groups=4,
           tokens=1, lengths=(100, 37), options={}),
      dict(testcase_name="v3_d128_window", key_bits=3, value_bits=3,
           groups=2, tokens=1, lengths=(128, 9), window=3, options={}),
      dict(testcase_name="v2_d64_chunk", key_bits=2, value_bits=2, dim=64,
           groups=3, tokens=2, lengths=(77, 128),
           options=dict(rotate_in_kernel=False)),
      # 4 bits of 64 coordinates: a nibble per warp.
      dict(testcase_name="v4_d64", key_bits=3, value_bits=4, dim=64,
           groups=4, tokens=1, lengths=(128, 50),
           options=dict(rotate_in_kernel=False)),
      # The outlier split: the 4-bit part (3.5 bits) or the 2-bit part
      # (2.5) of 64 coordinates in registers, the 3-bit part through SMEM.
      dict(testcase_name="v3_5_d128_columns", key_bits=4, value_bits=3.5,
           groups=4, tokens=1, lengths=(100, 128),
           options=dict(combine="columns")),
      dict(testcase_name="v2_5_d128_window_chunk", key_bits=2.5,
           value_bits=2.5, groups=2, tokens=3, lengths=(128, 20), window=2,
           options={}),
      # D = 256 at 3.5 bits: both parts (4 and 3 bits of 128) in registers.
      dict(testcase_name="v3_5_d256", key_bits=3, value_bits=3.5, dim=256,
           groups=1, tokens=1, lengths=(64, 101), options={}),
      # 3 bits of 256: 4 chunks of the 2-bit plane, 2 of the 1-bit one.
      dict(testcase_name="v3_d256_prod", key_bits=3, value_bits=3, dim=256,
           groups=3, tokens=1, lengths=(100, 128), method="prod",
           options={}),
      # 4 bits of 256: 8 chunks a row, each warp reads one of each half.
      dict(testcase_name="v4_d256", key_bits=2, value_bits=4, dim=256,
           groups=2, tokens=1, lengths=(128, 77), options={}),
      # And at 2.5 bits (3 and 2 bits of 128), a default at D = 256.
      dict(testcase_name="v2_5_d256_chunk", key_bits=2.5, value_bits=2.5,
           dim=256, groups=2, tokens=2, lengths=(33, 128), options={}))
  def test_values_registers(self, key_bits, groups, tokens, lengths,
                            options, window=0, method="mse", value_bits=4,
                            dim=128):
    # A value tile read transposed into registers: its coordinates come
    # out in value_rows order, put back by XLA. Interpret mode sends the
    # same order through SMEM, so the result equals the default path's and
    # the reference.
    cache = self._cache(dim, key_bits, value_bits, window, lengths,
                        zlib.crc32(self.id().encode()), method)
    q = jax.random.normal(jax.random.key(groups),
                          (2, tokens, 2 * groups, dim))
    self.check_option(q, cache, jnp.array(lengths), 2, "values_registers",
                      options, same_tol=1e-6)

  def check_option(self, q, cache, lengths, splits, option, options,
                   same_tol):
    """The kernel with `option` on agrees with the reference, and with the
    option off to same_tol of the output's scale."""
    want = attn.chunk_attention(q, cache, lengths, impl="reference")
    run = lambda on: attn.chunk_attention(
        q, cache, lengths, impl="pallas_gpu", interpret=True, splits=splits,
        **{option: on}, **options)
    got = run(True)
    scale = float(jnp.max(jnp.abs(want)))
    np.testing.assert_allclose(got, want, rtol=self.TOL,
                               atol=self.TOL * scale)
    np.testing.assert_allclose(got, run(False), rtol=0,
                               atol=same_tol * scale)

  def test_value_rows_order(self):
    # Row 16b + 8h + c holds coordinate 16b + 2c + h; the two reshapes are
    # that permutation and its inverse.
    rows = pallas_gpu_tokens.value_rows()
    self.assertEqual(sorted(rows.tolist()), list(range(128)))
    np.testing.assert_array_equal(rows[[0, 1, 8, 9, 16, 64, 72]],
                                  [0, 2, 1, 3, 16, 64, 65])
    # The (group, warp) -> (chunk, field) split that the device lookup
    # uses gives the same order: block b = 4g + w reads byte 2c + h of
    # chunk b % C of field b // C, coordinate 16·(b % C) + 2c + h + P·(b
    # // C) for P = 16·C bytes a row (a 2-bit plane of P = D / 4 at 3 bits,
    # whose 1-bit plane's bit b of byte 2c + h is coordinate 16b + 2c + h),
    # at every supported width.
    for bits, dims in pallas_gpu_tokens.VALUES_REGISTERS_PARTS.items():
      for dim in dims:
        plane_bits = 2 if bits == 3 else bits     # the 2-bit plane at 3
        p = dim * plane_bits // 8
        chunks = p // 16
        r = np.arange(dim)
        b, h, c = r // 16, r % 16 // 8, r % 8
        coords = 16 * (b % chunks) + 2 * c + h + p * (b // chunks)
        np.testing.assert_array_equal(
            pallas_gpu_tokens.value_rows(dim), coords, (bits, dim))
        if bits == 3:   # and the 1-bit plane's bit b // C1 of its chunk
          c1 = dim // 128
          np.testing.assert_array_equal(
              pallas_gpu_tokens.value_rows(dim),
              16 * (b % c1) + 2 * c + h + (dim // 8) * (b // c1), dim)
    x = jax.random.normal(jax.random.key(0), (3, 128, 2))
    y = pallas_gpu_tokens._to_value_rows(x, 1)
    np.testing.assert_array_equal(y, x[:, rows])
    np.testing.assert_array_equal(pallas_gpu_tokens._from_value_rows(y, 1),
                                  x)

  def test_values_registers_refusals(self):
    q = jnp.ones((2, 4, 128))
    for cfg, options in (((64, 4, 3), {}),          # 3 bits at D = 64
                         ((128, 4, 5), {}),         # 5 bits (poly16)
                         ((128, 4, 4), dict(rotate_in_kernel=True))):
      dim, kb, vb = cfg
      cache = self._cache(dim, kb, vb, 0, (10, 20), 0)
      with self.assertRaisesRegex(ValueError, "values_registers"):
        attn.decode_attention(q[..., :dim], cache, cache.lengths,
                              impl="pallas_gpu", interpret=True, splits=2,
                              values_registers=True, **options)
    with self.assertRaisesRegex(ValueError, "values_registers"):
      attn.decode_attention(q, cache, cache.lengths,
                            impl="pallas_gpu", layout="queries",
                            interpret=True, values_registers=True)

  def test_tma_rows_view(self):
    # _tma_rows: a token's packed row as it is where its bytes are a
    # multiple of the width, else the same bytes as rows of that width.
    codes = jnp.arange(2 * 3 * 64 * 24, dtype=jnp.int32).astype(
        jnp.uint8).reshape(2, 3, 64, 24)
    for width, shape in ((16, (2, 3, 96, 16)), (128, (2, 3, 12, 128))):
      view = pallas_gpu._tma_rows(codes, width)
      self.assertEqual(view.shape, shape)
      np.testing.assert_array_equal(view.reshape(codes.shape), codes)
    wide = jnp.zeros((1, 1, 64, 128), jnp.uint8)
    self.assertIs(pallas_gpu._tma_rows(wide, 128), wide)
    self.assertEqual(pallas_gpu._tma_rows(codes[..., :16], 16).shape,
                     (2, 3, 64, 16))

  def test_values_unpacked_after_the_scores(self):
    self.check_values_unpacked_after_the_scores(128, 3.5, 2.5, "mse")

  @pytest.mark.slow   # ~6 s each in interpret mode
  def test_values_unpacked_after_the_scores_more(self):
    self.check_values_unpacked_after_the_scores(128, 4, 4, "mse")
    self.check_values_unpacked_after_the_scores(64, 3, 2, "prod")

  def check_values_unpacked_after_the_scores(self, dim, key_bits,
                                             value_bits, method):
    # overlap_values=False unpacks the value tiles after the score wgmma
    # (one commit_smem for them and Pᵀ): the same result.
    cache = self._cache(dim, key_bits, value_bits, 0, (128, 50), dim,
                        method)
    q = jax.random.normal(jax.random.key(7), (2, 8, dim))
    want = attn.decode_attention(q, cache, cache.lengths, impl="reference")
    run = lambda **o: attn.decode_attention(
        q, cache, cache.lengths, impl="pallas_gpu", interpret=True,
        splits=2, **o)
    got = run(overlap_values=False)
    scale = float(jnp.max(jnp.abs(want)))
    np.testing.assert_allclose(got, want, rtol=self.TOL,
                               atol=self.TOL * scale)
    np.testing.assert_allclose(got, run(), rtol=1e-6, atol=1e-6 * scale)

  def _jump_case(self, tokens: int, bits: float):
    """8 tiles in one split, the token at 400 (tile 6) scoring ~40 above
    all the others (p ~ e^40 against the first tile's max: finite in f32,
    beyond f16): (run, the reference's output, its scale); run() is the
    interpret-mode kernel traced afresh (the module constants are read
    when it is traced)."""
    b, kv, s, dim, groups = 2, 2, 512, 64, 2
    keys = jax.random.split(jax.random.key(7), 4)
    q = jax.random.normal(keys[0], (b, tokens, kv * groups, dim))
    k = jax.random.normal(keys[1], (b, kv, s, dim)) * 2.0
    v = jax.random.normal(keys[2], (b, kv, s, dim))
    lead = q[:, 0, ::groups]                                # [B, K, D]
    k = k.at[:, :, 400].set(
        45 * lead / jnp.linalg.norm(lead, axis=-1, keepdims=True))
    cfg = CacheConfig(kind="turboquant", key_bits=bits, value_bits=bits)
    lengths = jnp.array([512, 450])
    cache = cache_lib.prefill(cache_lib.init(cfg, b, kv, s, dim,
                                             key=keys[3]), k, v, lengths)
    want = attn.chunk_attention(q, cache, lengths, impl="reference")

    def run():
      jax.clear_caches()
      return attn.chunk_attention(
          q, cache, lengths, impl="pallas_gpu", interpret=True, splits=1,
          lookup_mode="prmt", layout="tokens")
    return run, want, float(jnp.max(jnp.abs(want)))

  @parameterized.named_parameters(
      dict(testcase_name="decode", tokens=1, bits=4),
      dict(testcase_name="chunk_split", tokens=2, bits=3.5))
  def test_lagged_max_redoes_a_tile_whose_scores_jump(self, tokens, bits):
    # The lagged max (each tile's p against the max of the tiles before
    # it) flags the jumping tile and redoes it with its own max: the
    # output equals the reference's, as with the exact max in every tile.
    # With the flags' limits at 1e30 nothing is redone after the first
    # tile, and tile 6's f16 Pᵀ overflows: the kept tiles do read the
    # lagged max.
    run, want, scale = self._jump_case(tokens, bits)
    for lagged in (True, False):
      with mock.patch.object(pallas_gpu_tokens, "LAGGED_MAX", lagged):
        np.testing.assert_allclose(run(), want, rtol=self.TOL,
                                   atol=self.TOL * scale)
    with mock.patch.multiple(pallas_gpu_tokens, P_LIMIT=1e30,
                             PV_LIMIT=1e30):
      self.assertFalse(np.all(np.isfinite(np.asarray(run()))))

  def test_two_bit_caches_keep_the_exact_max(self):
    # Every part 2 bits (EXACT_MAX_BITS): each tile takes its exact max,
    # so the flags' limits do not matter; with 2 dropped from
    # EXACT_MAX_BITS the 1e30 limits overflow as at other widths.
    run, want, scale = self._jump_case(1, 2)
    with mock.patch.multiple(pallas_gpu_tokens, P_LIMIT=1e30,
                             PV_LIMIT=1e30):
      np.testing.assert_allclose(run(), want, rtol=self.TOL,
                                 atol=self.TOL * scale)
      with mock.patch.object(pallas_gpu_tokens, "EXACT_MAX_BITS",
                             frozenset()):
        self.assertFalse(np.all(np.isfinite(np.asarray(run()))))

  def test_lagged_max_by_width(self):
    def spec(bits):
      return parts.PartSpec(dim=64, bits=bits, centroids=())
    lagged = pallas_gpu_tokens.lagged_max
    self.assertFalse(lagged((spec(2),), (spec(2),)))
    self.assertTrue(lagged((spec(2),), (spec(3),)))     # 2.5 bits: 3 and 2
    self.assertTrue(lagged((spec(4),), (spec(4),)))
    with mock.patch.object(pallas_gpu_tokens, "LAGGED_MAX", False):
      self.assertFalse(lagged((spec(4),), (spec(4),)))

  def test_query_columns(self):
    qc = pallas_gpu_tokens.query_columns
    self.assertEqual([qc(m, 8) for m in (1, 4, 8, 9, 16, 24)],
                     [8, 8, 8, 16, 16, 32])
    self.assertEqual([qc(m) for m in (1, 8, 17, 64)], [16, 16, 32, 64])

  @parameterized.named_parameters(
      dict(testcase_name="decode", window=0, tokens=1, lengths=(1, 200)),
      dict(testcase_name="window_holds_all_of_one", window=4, tokens=1,
           lengths=(3, 200)),
      dict(testcase_name="chunk", window=0, tokens=3, lengths=(3, 300)))
  def test_tokens_layout_skips_empty_splits(self, window, tokens, lengths):
    # Capacity 512 in 4 splits of 128: splits that start past a sequence's
    # quantized length (all of them where the window holds every token)
    # write the empty state and read nothing; the result is unchanged.
    b, kv, s, dim = 2, 2, 512, 64
    key = jax.random.key(window * 10 + tokens)
    k_init, k_k, k_v, k_q = jax.random.split(key, 4)
    cfg = CacheConfig(kind="turboquant", key_bits=3, value_bits=3,
                      window=window)
    cache = cache_lib.prefill(
        cache_lib.init(cfg, b, kv, s, dim, key=k_init),
        jax.random.normal(k_k, (b, kv, s, dim)),
        jax.random.normal(k_v, (b, kv, s, dim)), jnp.array(lengths))
    q = jax.random.normal(k_q, (b, tokens, kv * 4, dim))
    lengths = jnp.array(lengths)
    want = attn.chunk_attention(q, cache, lengths, impl="reference")
    run = lambda cache, skip: attn.chunk_attention(
        q, cache, lengths, impl="pallas_gpu", interpret=True, splits=4,
        skip_empty_splits=skip)
    got = run(cache, True)
    scale = float(jnp.max(jnp.abs(want)))
    np.testing.assert_allclose(got, want, rtol=self.TOL,
                               atol=self.TOL * scale)
    np.testing.assert_allclose(got, run(cache, False), rtol=1e-6,
                               atol=1e-6)
    # NaN value norms in the splits past each quantized length: a program
    # that streams them ends with NaN accumulators (0·NaN), one that skips
    # them never sees them.
    qlen = np.maximum(np.asarray(lengths) - window, 0)
    first_empty = -(-qlen // 128) * 128                        # [B]
    past = np.arange(s)[None, None, :] >= first_empty[:, None, None]
    poisoned = dataclasses.replace(cache, values=dataclasses.replace(
        cache.values, norms=jnp.where(past, jnp.nan, cache.values.norms)))
    np.testing.assert_allclose(run(poisoned, True), got, rtol=1e-6,
                               atol=1e-6)
    self.assertTrue(np.isnan(np.asarray(run(poisoned, False))).any())

  _MERGE_CASES = (
      dict(testcase_name="d64_g3_decode_haar", dim=64, groups=3, tokens=1,
           value_bits=4, window=0, rotation="haar", lengths=(128, 37)),
      dict(testcase_name="d128_g4_chunk2_hadamard", dim=128, groups=4,
           tokens=2, value_bits=3, window=0, rotation="hadamard",
           lengths=(2, 128)))
  _MORE_MERGE_CASES = (
      dict(testcase_name="d64_g8_decode_2bit", dim=64, groups=8, tokens=1,
           value_bits=2, window=0, rotation="haar", lengths=(1, 65)),
      # Two value parts (3.5 bits), a window, prod keys: finish() as
      # before, the rotations by XLA.
      dict(testcase_name="split_values_fall_back", dim=128, groups=2,
           tokens=1, value_bits=3.5, window=0, rotation="haar",
           lengths=(128, 90)),
      dict(testcase_name="window_falls_back", dim=64, groups=2, tokens=1,
           value_bits=4, window=8, rotation="haar", lengths=(128, 9)),
      dict(testcase_name="prod_keys_fall_back", dim=64, groups=4, tokens=1,
           value_bits=2, window=0, rotation="haar", lengths=(100, 128),
           method="prod"))

  @parameterized.named_parameters(*_MERGE_CASES)
  def test_tokens_layout_merges_in_columns(self, **case):
    self.check_merges_in_columns(**case)

  @parameterized.named_parameters(*_MORE_MERGE_CASES)
  @pytest.mark.slow   # ~6 s each in interpret mode
  def test_tokens_layout_merges_in_columns_more(self, **case):
    self.check_merges_in_columns(**case)

  def check_merges_in_columns(self, dim, groups, tokens, value_bits, window,
                              rotation, lengths, method="mse"):
    # combine="columns" merges the splits in the kernel's [.., D, N]
    # layout: the same result as combine="rows" (to f32 rounding) and as
    # the reference; an empty split (length 2 of 2 splits) included.
    # rotate_in_kernel (the default): the kernel rotates queries and
    # outputs itself (f16 tiles on the tensor cores): the reference's
    # tolerance, and within 2e-3 of the output scale of XLA's rotations.
    b, kv, s = 2, 2, 128
    key = jax.random.key(dim + tokens)
    k_init, k_k, k_v, k_q = jax.random.split(key, 4)
    cfg = CacheConfig(kind="turboquant", key_bits=4, value_bits=value_bits,
                      window=window, rotation=rotation, key_method=method)
    cache = cache_lib.prefill(
        cache_lib.init(cfg, b, kv, s, dim, key=k_init),
        jax.random.normal(k_k, (b, kv, s, dim)) * 2.0,
        jax.random.normal(k_v, (b, kv, s, dim)), jnp.array(lengths))
    q = jax.random.normal(k_q, (b, tokens, kv * groups, dim))
    lengths = jnp.array(lengths)
    run = lambda **options: attn.chunk_attention(
        q, cache, lengths, impl="pallas_gpu", interpret=True, splits=2,
        **options)
    want = attn.chunk_attention(q, cache, lengths, impl="reference")
    scale = float(jnp.max(jnp.abs(want)))
    rows = run(rotate_in_kernel=False)
    for options, close in ((dict(combine="columns", rotate_in_kernel=False),
                            1e-5), (dict(rotate_in_kernel=True), 2e-3)):
      got = run(**options)
      np.testing.assert_allclose(got, want, rtol=self.TOL,
                                 atol=self.TOL * scale)
      np.testing.assert_allclose(got, rows, rtol=close, atol=close * scale)

  def test_kernel_reads_the_caches_rotation_tiles(self):
    # init keeps Π_k's and Π_v's tiles (rotation.as_tiles); the kernel
    # rotates with those: without them (laid out at the call) the same
    # output, with another rotation's tiles a wrong one.
    cache = self._cache(64, 4, 4, 0, (128, 70), 0)
    np.testing.assert_array_equal(
        cache.rotation_tiles[1],
        rotation.as_tiles(cache.value_quantizer.rotation))
    q = jax.random.normal(jax.random.key(5), (2, 8, 64))
    run = lambda c: attn.decode_attention(
        q, c, c.lengths, impl="pallas_gpu", interpret=True, splits=2,
        rotate_in_kernel=True)
    got = run(cache)
    np.testing.assert_array_equal(
        run(dataclasses.replace(cache, rotation_tiles=None)), got)
    swapped = dataclasses.replace(cache,
                                  rotation_tiles=cache.rotation_tiles[::-1])
    want = attn.decode_attention(q, cache, cache.lengths, impl="reference")
    self.assertGreater(float(jnp.max(jnp.abs(run(swapped) - want))),
                       0.1 * float(jnp.max(jnp.abs(want))))
    np.testing.assert_allclose(got, want, rtol=self.TOL,
                               atol=self.TOL * float(jnp.max(jnp.abs(want))))

  @parameterized.parameters(("float16", 16), ("bfloat16", 16),
                            ("float32", 16), ("float16", 8))
  def test_tokens_layout_reads_norms_as_stored(self, norm_dtype, norm_bits):
    # The kernels take 16-bit norms in their stored dtype (converting per
    # tile) and 8-bit ones decoded to f32 by XLA.
    b, kv, s, dim = 2, 2, 128, 64
    key = jax.random.key(norm_bits)
    k_init, k_k, k_v, k_q = jax.random.split(key, 4)
    cfg = CacheConfig(kind="turboquant", key_bits=4, value_bits=3,
                      norm_dtype=norm_dtype, norm_bits=norm_bits)
    cache = cache_lib.prefill(
        cache_lib.init(cfg, b, kv, s, dim, key=k_init),
        jax.random.normal(k_k, (b, kv, s, dim)) * 3.0,
        jax.random.normal(k_v, (b, kv, s, dim)), jnp.array([128, 45]))
    q = jax.random.normal(k_q, (b, kv * 4, dim))
    want = attn.decode_attention(q, cache, cache.lengths, impl="reference")
    got = attn.decode_attention(q, cache, cache.lengths, impl="pallas_gpu",
                                interpret=True, splits=2)
    scale = float(jnp.max(jnp.abs(want)))
    np.testing.assert_allclose(got, want, rtol=self.TOL,
                               atol=self.TOL * scale)

  def test_columns_merge_equals_a_direct_one(self):
    # parts.finish_columns against a direct split merge, with acc in the
    # original domain or rotated; an empty split (m = -inf, l = 0) and an
    # all-empty query column included.
    cache = self._cache(64, 4, 4, 0, (128, 70), 0)
    rng = np.random.default_rng(0)
    b, kv, ns, d, n = 2, 2, 3, 64, 16
    acc = rng.standard_normal((b, kv, ns, d, n)).astype(np.float32)
    m = rng.standard_normal((b, kv, ns, n)).astype(np.float32) * 5
    l = rng.uniform(0.5, 3, (b, kv, ns, n)).astype(np.float32)
    m[0, 1, 2], l[0, 1, 2], acc[0, 1, 2] = -np.inf, 0, 0
    m[1, 0, :, 3], l[1, 0, :, 3], acc[1, 0, :, :, 3] = -np.inf, 0, 0
    q = jnp.ones((b, 1, kv * 4, d))
    top = m.max(2, keepdims=True)
    w = np.where(np.isfinite(m), np.exp(m - np.where(np.isfinite(top), top,
                                                     0)), 0)
    want = (acc * w[:, :, :, None]).sum(2) / np.maximum(
        (l * w).sum(2), 1e-30)[:, :, None]               # [B, K, D, N]
    want = np.swapaxes(want, 2, 3)[:, :, :4]              # [B, K, 4, D]
    got = parts.finish_columns(acc, m, l, q, cache, rotated=True)
    np.testing.assert_allclose(np.asarray(got),
                               want.reshape(b, 1, kv * 4, d), rtol=1e-5,
                               atol=1e-6)
    got = parts.finish_columns(acc, m, l, q, cache, rotated=False)
    want = rotation.invert(cache.value_quantizer.rotation, jnp.asarray(want))
    np.testing.assert_allclose(np.asarray(got),
                               np.asarray(want).reshape(b, 1, kv * 4, d),
                               rtol=1e-5, atol=1e-5)

  def test_folded_query_operand_equals_the_laid_out_parts(self):
    # The one-fusion query operand of mse keys rotated by a split cache's
    # folded rotations equals parts.prepare's queries laid out by the
    # kernel (f16 rounding apart); a dense rotation (an integer width: its
    # products are einsums, parts.sums_products), prod keys (sign parts),
    # Hadamard rotations and more than FOLDED_REDUCE_MAX_ROWS query rows
    # get None (the laid-out path). The split at D = 64 (parts of 32) gets
    # one only with merge_narrow: its one merged group is the two parts'
    # queries side by side.
    for d, bits, b, t, g in ((128, 3.5, 2, 1, 4), (128, 3.5, 2, 3, 2),
                             (128, 2.5, 1, 2, 3), (64, 2.5, 2, 1, 4),
                             (64, 3.5, 1, 2, 3)):
      scale = d ** -0.5
      cache = self._cache(d, bits, 2.5, 0, (128, 70), 0)
      q = jax.random.normal(jax.random.key(t), (b, t, 2 * g, d))
      n = pallas_gpu_tokens.query_columns(t * g, 8)
      got = pallas_gpu.folded_query_operand(q, cache, scale, n,
                                            merge_narrow=True)
      if d == 64:
        self.assertIsNone(pallas_gpu.folded_query_operand(q, cache, scale,
                                                          n))
      inp = parts.prepare(q, cache, cache.lengths, scale)
      want = pallas_gpu._query_groups(jnp.concatenate(inp.q, axis=-1), n)
      self.assertEqual(got.shape, want.shape)
      self.assertEqual(got.dtype, jnp.float16)
      np.testing.assert_allclose(np.asarray(got, np.float32),
                                 np.asarray(want, np.float32),
                                 rtol=2e-3, atol=2e-3)
    scale = 128 ** -0.5
    none = lambda c, b=2: pallas_gpu.folded_query_operand(
        jnp.ones((b, 1, 8, 128)), c, scale, 8)
    self.assertIsNone(none(self._cache(128, 3.5, 2.5, 0, (128, 70), 0,
                                       method="prod")))
    self.assertIsNone(none(self._cache(128, 4, 4, 0, (128, 70), 0,
                                       rotation_kind="hadamard")))
    for bits in (4, 3):                  # dense rotations: at any size
      self.assertIsNone(none(self._cache(128, bits, 2.5, 0, (128, 70), 0),
                             1))
    split = self._cache(128, 3.5, 2.5, 0, (128, 70), 0)
    self.assertIsNotNone(none(split, parts.FOLDED_REDUCE_MAX_ROWS // 4))
    self.assertIsNone(none(split, parts.FOLDED_REDUCE_MAX_ROWS // 4 + 1))
    # An operand of the wrong shape is refused by name.
    inp = parts.prepare(jnp.ones((2, 1, 8, 128)), split, split.lengths,
                        scale, norms_as_stored=True)
    with self.assertRaisesRegex(ValueError, "queries"):
      pallas_gpu_tokens.fused_attention(
          inp, splits=2, interpret=pallas_gpu.interpret_params(True),
          queries=jnp.zeros((4, 8, 64), jnp.float16))

  def test_default_rotate_in_kernel(self):
    # In the kernel at D <= 64 where a program streams at most
    # ROTATE_MAX_TILES tiles, SPLIT_ROTATE_MAX_TILES for the outlier split
    # (tiles of 128 tokens: B=1, 16k 2 in each of 64 splits; B=8, 32k 16;
    # B=32, 16k 32; B=8, 64k 32; B=8, 128k 64; B=32, 128k 256).
    def rotates(bits, b, s, d=64):
      cache = jax.eval_shape(lambda: cache_lib.init(
          CacheConfig(key_bits=bits, value_bits=bits), b, 8, s, d))
      splits = pallas_gpu.default_splits(cache, "tokens", 128)
      return pallas_gpu.default_rotate_in_kernel(d, cache, splits, 128)
    self.assertTrue(rotates(2.5, 1, 16384))
    self.assertTrue(rotates(3.5, 8, 32768))
    self.assertFalse(rotates(2.5, 8, 65536))
    self.assertFalse(rotates(3.5, 32, 131072))
    self.assertTrue(rotates(4, 1, 16384))
    self.assertTrue(rotates(3, 32, 16384))
    self.assertFalse(rotates(4, 8, 131072))
    self.assertFalse(rotates(2, 32, 131072))
    self.assertFalse(rotates(4, 1, 16384, d=128))

  def test_step_rows_and_default_splits(self):
    # The caches' shapes only: the rules read nothing else.
    shaped = lambda *args: jax.eval_shape(lambda: cache_lib.init(*args))
    step_rows = pallas_gpu_tokens.step_rows
    self.assertEqual(step_rows(128, [64, 64]), 64)
    self.assertEqual(step_rows(1024, [64, 2], 256), 256)
    self.assertEqual(step_rows(384, [64], 256), 128)
    self.assertEqual(step_rows(1024, [24], 256), 128)
    self.assertEqual(step_rows(64, [64], 256), 64)
    # B·K·NS programs: up to 8 per SM of 132 for "tokens" at D >= 128 (4
    # at D = 64), 2 for "queries".
    cache = shaped(CacheConfig(key_bits=4), 8, 8, 131072, 128)
    self.assertEqual(pallas_gpu.default_splits(cache, "tokens"), 32)
    self.assertEqual(pallas_gpu.default_splits(cache, "queries"), 8)
    cache = shaped(CacheConfig(key_bits=4), 32, 8, 32768, 128)
    self.assertEqual(pallas_gpu.default_splits(cache, "tokens"), 8)
    cache = shaped(CacheConfig(key_bits=4), 8, 8, 131072, 64)
    self.assertEqual(pallas_gpu.default_splits(cache, "tokens"), 16)
    small = shaped(CacheConfig(key_bits=4), 1, 2, 192, 64)
    self.assertEqual(pallas_gpu.default_splits(small), 1)
    # Under one program per SM in powers of two (B=1, 3 KV heads: 16
    # splits, 48 programs): the largest divisor of the 144 tiles that
    # leaves each split MIN_SPLIT_TILES (3) tiles.
    smol = lambda b: shaped(CacheConfig(key_bits=4), b, 3, 9216, 64)
    self.assertEqual(pallas_gpu.default_splits(smol(1)), 48)
    self.assertEqual(pallas_gpu.default_splits(smol(32)), 8)
    self.assertEqual(pallas_gpu.default_splits(smol(4)), 16)  # 192 programs
    # Up to ONE_WAVE_MAX_HEADS sequence-heads: one wave (<= 528 programs)
    # of splits at least two pipeline steps long (128 tokens at 2 bits).
    one = lambda s, bits=4: shaped(
        CacheConfig(key_bits=bits, value_bits=bits), 1, 8, s, 128)
    self.assertEqual(pallas_gpu.default_splits(one(16384)), 64)
    self.assertEqual(pallas_gpu.default_splits(one(131072)), 64)
    self.assertEqual(pallas_gpu.default_splits(one(4096)), 32)
    self.assertEqual(pallas_gpu.default_splits(one(4096, 2)), 16)
    self.assertEqual(pallas_gpu.default_splits(one(4096), "queries"), 32)
    # The floor counts the steps the kernel runs: 128 tokens at D = 64 by
    # default, 64 in append_attention's kernel (tile_rows=64).
    at64 = shaped(CacheConfig(key_bits=4), 1, 3, 16384, 64)
    self.assertEqual(pallas_gpu.default_splits(at64), 64)
    self.assertEqual(pallas_gpu.default_splits(at64, "tokens", 64), 128)
    # Past one wave (528) only while splits keep 1024 tokens.
    split = lambda b, s: pallas_gpu.default_splits(
        shaped(CacheConfig(key_bits=4), b, 8, s, 128))
    self.assertEqual([split(8, s) for s in (4096, 16384, 32768, 65536)],
                     [16, 16, 32, 32])
    self.assertEqual([split(32, s) for s in (4096, 8192, 16384)], [4, 8, 8])
    self.assertEqual(split(2, 16384), 64)

  def test_default_steps(self):
    # 128-token steps where every part is 2 bits or less (D <= 128) or D
    # <= 64, 3 stages for a fractional width, else 64 tokens and STAGES.
    steps = lambda kb, vb, d=128: pallas_gpu.default_steps(jax.eval_shape(
        lambda: cache_lib.init(CacheConfig(key_bits=kb, value_bits=vb), 1,
                               2, 1024, d)))
    stages = pallas_gpu.STAGES
    self.assertEqual(steps(2, 2), (128, stages))
    self.assertEqual(steps(2, 1, 64), (128, stages))
    self.assertEqual(steps(2, 2, 256), (64, stages))
    self.assertEqual(steps(2, 3), (64, stages))
    self.assertEqual(steps(4, 4), (64, stages))
    self.assertEqual(steps(2.5, 2.5), (64, 3))
    self.assertEqual(steps(4, 3.5), (64, 3))
    self.assertEqual(steps(4, 4, 64), (128, stages))
    self.assertEqual(steps(3, 4, 64), (128, stages))
    self.assertEqual(steps(4, 4, 256), (64, stages))

  def test_default_overlap_values(self):
    # Unpacking V under the score wgmma where a program streams few tiles
    # (B = 1, S = 16k: 64 splits of 4 tiles) or the programs fit one wave
    # (B = 1, S = 64k and 128k: 512 programs), after it where each streams
    # many past one wave (B = 8, S = 128k: 32 splits of 64 tiles;
    # 128-token steps: 32; B = 2, 64k: 64 splits of 16 tiles).
    shape = lambda b, s: jax.eval_shape(
        lambda: cache_lib.init(CacheConfig(key_bits=4), b, 8, s, 128))
    for b, s, rows, want in ((1, 16384, 64, True), (1, 65536, 64, True),
                             (1, 32768, 64, True), (2, 65536, 64, False),
                             (8, 131072, 64, False), (8, 131072, 128, False),
                             (1, 131072, 64, True)):
      cache = shape(b, s)
      splits = pallas_gpu.default_splits(cache)
      self.assertEqual(
          pallas_gpu.default_overlap_values(cache, splits, rows), want,
          (b, s, rows, splits))

  def test_unsupported_raises_not_implemented(self):
    # QJL sign parts of 32 channels (prod keys at 2.5 bits, D = 64) and
    # more than 64 query rows: NotImplementedError, which lets impl=None
    # fall back to "xla".
    cache = cache_lib.init(CacheConfig(key_bits=2.5, key_method="prod"), 2,
                           2, 128, 64)
    with self.assertRaisesRegex(NotImplementedError, "part dim 32"):
      attn.decode_attention(jnp.ones((2, 4, 64)), cache, jnp.array([3, 4]),
                            impl="pallas_gpu", interpret=True)
    cache = cache_lib.init(CacheConfig(key_bits=4), 2, 2, 128, 64)
    with self.assertRaisesRegex(NotImplementedError, "query rows"):
      attn.chunk_attention(jnp.ones((2, 9, 16, 64)), cache,
                           jnp.array([30, 40]), impl="pallas_gpu",
                           interpret=True)
    cache = cache_lib.init(CacheConfig(kind="full"), 2, 2, 128, 64)
    with self.assertRaisesRegex(NotImplementedError, "not a TurboQuantCache"):
      attn.decode_attention(jnp.ones((2, 4, 64)), cache, jnp.array([3, 4]),
                            impl="pallas_gpu", interpret=True)

  def test_bad_lookup_mode_layout_stages_and_tile_rows(self):
    cache = cache_lib.init(CacheConfig(key_bits=4), 2, 2, 128, 64)
    for kwargs, name in ((dict(stages=0), "stages"),
                         (dict(tile_rows=96), "tile_rows"),
                         (dict(tile_rows=128, layout="queries"), "tile_rows"),
                         (dict(transpose_p=True, layout="queries"),
                          "transpose_p"),
                         (dict(approx_math=True, layout="queries"),
                          "approx_math"),
                         (dict(overlap_values=False, layout="queries"),
                          "overlap_values"),
                         (dict(min_columns=8, transpose_p=False),
                          "min_columns"),
                         (dict(min_columns=12), "min_columns"),
                         (dict(tma_row_bytes=64), "tma_row_bytes"),
                         (dict(tma_row_bytes=128, layout="queries"),
                          "tma_row_bytes")):
      with self.assertRaisesRegex(ValueError, name):
        attn.decode_attention(jnp.ones((2, 4, 64)), cache, jnp.array([3, 4]),
                              impl="pallas_gpu", **kwargs)
    with self.assertRaisesRegex(ValueError, "lookup_mode"):
      attn.decode_attention(jnp.ones((2, 4, 64)), cache, jnp.array([3, 4]),
                            impl="pallas_gpu", lookup_mode="gather")
    with self.assertRaisesRegex(ValueError, "layout"):
      attn.decode_attention(jnp.ones((2, 4, 64)), cache, jnp.array([3, 4]),
                            impl="pallas_gpu", layout="columns")


class CentroidLookupTest(parameterized.TestCase):
  """The kernel's gather-free lookups equal the codebook."""

  @parameterized.parameters(*[(d, b) for d in (64, 128, 256)
                              for b in range(1, 9)])
  def test_polynomial_and_selects_equal_the_table(self, dim, bits):
    from turboquant_jax.kernels.decode_attention import pallas_gpu
    from turboquant_jax.quant import codebook
    table = codebook.codebook(dim, bits).astype(np.float32)
    spec = parts.PartSpec(dim=dim, bits=bits,
                          centroids=tuple(float(c) for c in table))
    poly = pallas_gpu.odd_polynomial(spec.centroids)
    # Exact in f32 up to 4 bits; wider codebooks use the select chain.
    self.assertEqual(poly is not None, bits <= 4)
    code = jnp.arange(2 ** bits)[None, :]
    for mode in ("poly", "select"):
      got = np.asarray(pallas_gpu.lookup(code, spec, mode))[0]
      np.testing.assert_allclose(got, table, rtol=0,
                                 atol=1e-6 * np.abs(table).max())
    # f16: Horner in f16 up to 4 bits (measured <= 1.4e-3 of the largest
    # centroid), f16-rounded selects above.
    got = pallas_gpu.lookup(code.astype(jnp.int16), spec, "poly16")
    self.assertEqual(got.dtype, jnp.float16)
    np.testing.assert_allclose(np.asarray(got, np.float32)[0], table, rtol=0,
                               atol=(2e-3 if bits <= 4 else 5e-4)
                               * np.abs(table).max())

  def test_asymmetric_codebook_falls_back_to_selects(self):
    from turboquant_jax.kernels.decode_attention import pallas_gpu
    self.assertIsNone(pallas_gpu.odd_polynomial((-1.0, 0.5, 1.0, 2.0)))


class UnpackChunksTest(parameterized.TestCase):
  """The in-kernel unpacking equals packing.unpack, chunk by chunk."""

  @parameterized.parameters(*[(b, d) for b in range(1, 9)
                              for d in (8, 64, 128)])
  def test_chunks_equal_unpack(self, bits, dim):
    from turboquant_jax.quant import packing
    codes = jax.random.randint(jax.random.key(bits * 1000 + dim), (5, dim),
                               0, 2 ** bits)
    words = packing.pack(codes, bits)
    chunks = parts.unpack_chunks(words, bits, dim)
    self.assertLen(chunks, parts.chunk_count(bits))
    np.testing.assert_array_equal(np.concatenate(chunks, axis=1), codes)

  def test_lookup_is_the_table(self):
    table = (-1.5, -0.25, 0.25, 1.5)
    code = jnp.array([[0, 1, 2, 3, 3, 0]])
    np.testing.assert_array_equal(parts.lookup(code, table),
                                  np.array(table)[np.asarray(code)])


if __name__ == "__main__":
  absltest.main()
