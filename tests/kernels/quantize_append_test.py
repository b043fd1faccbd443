"""The fused quantize-and-append kernel against the XLA write path.

kernels/quantize_append/pallas_gpu.py in Mosaic GPU interpret mode on the
CPU: fresh random caches and tokens of several shapes, widths, norm dtypes
and rotations, ragged lengths (empty, mid, at capacity), non-finite tokens;
its reference is turboquant_cache.append(impl="xla"). The D = 128 / 256
cases and the three-step decode are marked slow (15-40 s each in
interpret mode); `pytest -m slow` runs them.
"""

import dataclasses
import functools

from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from turboquant_jax import cache as cache_lib
from turboquant_jax.cache import turboquant_cache
from turboquant_jax.kernels import decode_attention as attention
from turboquant_jax.kernels.decode_attention import pallas_gpu as attention_gpu
from turboquant_jax.kernels.decode_attention import pallas_gpu_tokens
from turboquant_jax.kernels.decode_attention import parts
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
  """Codes and norms of every stored part (both of a split tensor's)."""
  arrays = [a for t in pallas_gpu.stored_parts(cache)
            for a in (t.codes, t.norms)]
  return [np.asarray(a, np.float32) if a.dtype != np.uint8 else np.asarray(a)
          for a in arrays]


def assert_same_append(ours, ref, before):
  """ours wrote what ref wrote (the appended position), nothing else."""
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
      assert np.sum(new_got != new_want) <= 1, "more than one byte differs"
    else:
      np.testing.assert_allclose(new_got, new_want, rtol=8e-3,
                                 equal_nan=True)


class FusedAppendTest(parameterized.TestCase):

  def check_equal_to_xla(self, dim, kb, vb, norm_dtype, correction,
                         centered, rot):
    seed = int(dim + 10 * kb + vb)
    cache = _cache(seed, dim, heads=2, key_bits=kb, value_bits=vb,
                   norm_dtype=norm_dtype, norm_correction=correction,
                   center_keys=centered, rotation=rot)
    k, v = _token(seed, cache)
    assert_same_append(_fused(cache, k, v), _xla(cache, k, v), cache)

  @parameterized.parameters(
      # dim, key bits, value bits, norm dtype, correction, centered, rotation
      (64, 4, 3, "float16", True, False, "haar"),
      (64, 3, 2, "bfloat16", False, True, "hadamard"),
  )
  def test_equals_the_xla_path(self, *case):
    self.check_equal_to_xla(*case)

  @parameterized.named_parameters(
      # The outlier split: parts of 32 (D = 64), of other widths on each
      # tensor (key 3.5 and value 2.25 bits: 32 / 32 and 16 / 48).
      ("2.5", 64, 2.5, 2.5, "float16", True, False, "hadamard"),
      ("3.5_2.25", 64, 3.5, 2.25, "bfloat16", False, True, "haar"),
      ("3.5_4", 64, 3.5, 4, "float32", True, False, "hadamard"),
  )
  def test_outlier_split_equals_the_xla_path(self, *case):
    self.check_equal_to_xla(*case)

  @pytest.mark.slow
  def test_wider_split_heads_equal_the_xla_path(self):
    self.check_equal_to_xla(128, 2.5, 3.5, "float16", False, False, "haar")

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
      assert_same_append(ours, ref, before)
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
    assert_same_append(ours, ref, cache)
    self.assertTrue(np.isnan(np.float32(ours.keys.norms[1, 0, 7])))
    self.assertTrue(np.isnan(np.float32(ours.keys.norms[2, 0, 23])))
    self.assertTrue(np.isfinite(np.float32(ours.values.norms[1, 0, 7])))
    self.assertTrue(np.isfinite(np.float32(ours.keys.norms[0, 0, 0])))

  def test_non_finite_channel_spares_the_other_part(self):
    # A NaN in an outlier channel of the split: that part's norm is NaN,
    # the regular part's finite, as XLA stores them.
    cache = _cache(6, 64, key_bits=3.5, value_bits=2.5)
    k, v = _token(6, cache, jnp.float32)
    outlier = int(cache.key_quantizer.outlier_channels[0, 0])
    regular = int(cache.key_quantizer.regular_channels[0, 0])
    k = k.at[1, 0, 0, outlier].set(jnp.nan).at[2, 0, 0, regular].set(
        -jnp.inf)
    ours, ref = _fused(cache, k, v), _xla(cache, k, v)
    assert_same_append(ours, ref, cache)
    keys = ours.keys
    self.assertTrue(np.isnan(np.float32(keys.outlier.norms[1, 0, 7])))
    self.assertTrue(np.isfinite(np.float32(keys.regular.norms[1, 0, 7])))
    self.assertTrue(np.isfinite(np.float32(keys.outlier.norms[2, 0, 23])))
    self.assertTrue(np.isnan(np.float32(keys.regular.norms[2, 0, 23])))

  @parameterized.named_parameters(
      ("split_window", dict(key_bits=3.5, window=2), 1, "window"),
      ("split_prod", dict(key_method="prod", key_bits=2.5), 1, "method"),
      ("split_wide", dict(value_bits=4.5), 1, "5 bits"),
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
    self.assertEqual(cache_lib.CacheConfig().append_impl, "auto")
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
    self.assertEqual(cache_lib.CacheConfig(kind="full").append_impl, "auto")

  def test_supported_names_the_reason(self):
    self.assertIsNone(pallas_gpu.supported(_cache(1, 64), 1))
    self.assertIn("not a TurboQuantCache", pallas_gpu.supported(
        cache_lib.init(cache_lib.CacheConfig(kind="full"), 1, 1, 8, 64), 1))




# ---- The token appended by the attention kernel itself (append_impl
# "fused"): pallas_gpu.append_attention in interpret mode.


@jax.jit
def _append_then_attend(q, cache, k, v):
  """The reference: XLA's append, then the dequantize-and-attend spec."""
  cache = _xla(cache, k, v)
  return attention.chunk_attention(q, cache, cache.lengths,
                                   impl="reference"), cache


class AppendAttentionTest(parameterized.TestCase):

  def check(self, dim, bits, groups, capacity=128, value_bits=None,
            cache_options=None, **options):
    seed = int(dim + bits + groups)
    cache = _cache(seed, dim, capacity=capacity, heads=2, key_bits=bits,
                   value_bits=value_bits or bits, **(cache_options or {}))
    k, v = _token(seed, cache)
    q = jax.random.normal(jax.random.key(seed + 7),
                          (cache.batch, 1, 2 * groups, dim))
    out, ours = jax.jit(lambda q, c, k, v: attention_gpu.append_attention(
        q, k, v, c, splits=2, interpret=True, **options))(q, cache, k, v)
    want, ref = _append_then_attend(q, cache, k, v)
    assert_same_append(ours, ref, cache)
    # Sequence 0 held nothing before: its output is the new token's value
    # alone, which only the appending program contributes.
    scale = float(jnp.max(jnp.abs(want)))
    np.testing.assert_allclose(out, want, atol=2e-3 * scale)

  @parameterized.parameters(
      (64, 4, 3, {}),                                # rotated in the kernel
      (64, 3, 8, {}),                                # 24-byte rows
      (64, 2, 1, dict(rotate_in_kernel=False)),      # XLA rotates
      (64, 4, 4, dict(auto_barriers=False)),         # (and on the H200)
      (64, 3, 2, dict(tma_row_bytes=16)),            # 24-byte rows as 16s
  )
  def test_equals_append_then_attend(self, dim, bits, groups, options):
    self.check(dim, bits, groups, **options)

  @parameterized.named_parameters(
      # The outlier split: parts of 32, each tensor's parts as one group
      # (merge_narrow, the default) rotated in the kernel by its folded
      # rotation per head (the default at D = 64) or by XLA; keys split
      # and values not.
      ("2.5", 64, 2.5, 4, {}),
      ("2.5_xla_rotates", 64, 2.5, 3, dict(rotate_in_kernel=False)),
      ("3.5_keys", 64, 3.5, 2, dict(value_bits=4)),
  )
  def test_outlier_split_equals_append_then_attend(self, dim, bits, groups,
                                                   options):
    self.check(dim, bits, groups, **options)

  @parameterized.parameters((64, 4, 4), (64, 3.5, 3))
  def test_grid_codebooks_equal_append_then_attend(self, dim, bits, groups):
    # CacheConfig.grid_centroids: the kernel quantizes by the grid's
    # thresholds and reads the grid's centroids, as XLA and the reference.
    self.check(dim, bits, groups, cache_options=dict(grid_centroids=True))

  @pytest.mark.slow
  def test_outlier_split_in_zero_padded_groups(self):
    self.check(64, 3.5, 2, merge_narrow=False)    # an option off by default

  @pytest.mark.slow
  def test_outlier_split_with_16_byte_tma_rows(self):
    self.check(64, 3.5, 3, tma_row_bytes=16)    # a 3-bit part's 12-byte rows

  @pytest.mark.slow
  def test_wider_heads(self):
    self.check(128, 4, 4)
    self.check(256, 3, 2, capacity=256)
    self.check(128, 2.5, 4)                        # parts of 64

  def test_auto_fuses_up_to_a_number_of_sequence_heads_and_tiles(self):
    limit = attention.FUSED_MAX_SEQUENCE_HEADS
    for impl, batch, heads, fuses in (
        ("auto", limit // 2, 2, True), ("auto", limit // 2 + 1, 2, False),
        ("auto", limit, 1, True), ("fused", limit + 1, 1, True),
        ("pallas_gpu", 1, 1, False), ("xla", 1, 1, False)):
      cache = cache_lib.init(cache_lib.CacheConfig(append_impl=impl), batch,
                             heads, 64, 64)
      self.assertEqual(attention.fuses_append(cache), fuses,
                       (impl, batch, heads))
    # "auto" also only where each attention program streams at most
    # FUSED_MAX_TILES tiles: 8 KV heads, D = 128, B = 1 over 9216 tokens (48
    # splits of 3 tiles) fuses; B = 8 over 9216 (16 splits of 9) does not;
    # "fused" always does.
    for impl, batch, fuses in (("auto", 1, True), ("auto", 8, False),
                               ("fused", 8, True)):
      cache = jax.eval_shape(functools.partial(
          cache_lib.init, cache_lib.CacheConfig(append_impl=impl), batch, 8,
          9216, 128))
      self.assertEqual(attention.fuses_append(cache), fuses, (impl, batch))

  def test_dispatch_fuses_only_when_asked(self):
    # decode_attention.append_attention: a cache whose append_impl fuses
    # (fuses_append: here "auto", the default, at few sequence-heads over
    # short programs) and impl="pallas_gpu" goes through the one-launch
    # kernel; other caches take the append and then the attention, with the
    # same result.
    # (run: the result checked too; else traced only, the route counted:
    # the interpret-mode kernels of those routes are tested elsewhere)
    for config, fuses, run in ((dict(append_impl="auto"), True, True),
                               (dict(append_impl="auto", key_bits=2.5,
                                     value_bits=3.5), True, False),
                               (dict(append_impl="pallas_gpu"), False, False),
                               (dict(append_impl="xla"), False, True),
                               (dict(kind="full"), False, True)):
      cache = _cache(11, 64, capacity=128, heads=2, **config)
      k, v = _token(11, cache)
      q = jax.random.normal(jax.random.key(12), (cache.batch, 1, 6, 64))
      calls = []
      real = attention_gpu.append_attention

      def spy(*args, real=real, calls=calls, **kw):
        calls.append(1)
        return real(*args, interpret=True, **kw)

      # Under jit, as in a decode loop: the full sequence drops its token.
      step = jax.jit(lambda q, k, v, c: attention.append_attention(
          q, k, v, c, impl="pallas_gpu" if "append_impl" in config
          else "xla"))
      with mock.patch.object(attention_gpu, "append_attention", spy):
        if not run:
          jax.eval_shape(step, q, k, v, cache)
          self.assertLen(calls, fuses, config)
          continue
        out, got = step(q, k, v, cache)
      self.assertLen(calls, fuses, config)
      want_cache = jax.jit(cache_lib.append)(cache, k, v) if config.get(
          "kind") == "full" else _xla(cache, k, v)
      np.testing.assert_array_equal(got.lengths, want_cache.lengths)
      want = attention.chunk_attention(q, want_cache, want_cache.lengths,
                                       impl="reference")
      np.testing.assert_allclose(out, want, atol=3e-3 * float(
          jnp.max(jnp.abs(want))))

  def test_bad_input(self):
    cache = _cache(13, 64, capacity=128, heads=2)
    k, v = _token(13, cache)
    with self.assertRaisesRegex(ValueError, "cache full"):   # eagerly
      attention_gpu.append_attention(jnp.ones((4, 1, 4, 64)), k, v, cache)
    with self.assertRaisesRegex(ValueError, "multiple of"):
      attention_gpu.append_attention(jnp.ones((4, 1, 3, 64)), k, v, cache)
    with self.assertRaisesRegex(ValueError, "expected q"):
      attention_gpu.append_attention(jnp.ones((4, 2, 4, 64)), k, v, cache)
    with self.assertRaisesRegex(ValueError, "expected q"):
      attention_gpu.append_attention(jnp.ones((4, 1, 4, 64)), k[:, :1], v,
                                     cache)
    empty = dataclasses.replace(cache, lengths=jnp.zeros_like(cache.lengths))
    with self.assertRaisesRegex(ValueError, "tma_row_bytes"):
      attention_gpu.append_attention(jnp.ones((4, 1, 4, 64)), k, v, empty,
                                     tma_row_bytes=32)
    split_prod = _cache(13, 64, capacity=128, key_bits=3.5,
                        key_method="prod")
    with self.assertRaisesRegex(NotImplementedError, "method"):
      attention_gpu.append_attention(jnp.ones((4, 1, 2, 64)), k[:, :1],
                                     v[:, :1], split_prod)
    # The appending program's quantization must equal XLA's bit for bit:
    # no approximate math.
    q = jnp.ones((4, 1, 4, 64))
    inp = parts.prepare(q, cache, cache.lengths, 0.125)
    with self.assertRaisesRegex(ValueError, "not with append"):
      pallas_gpu_tokens.fused_attention(
          inp, splits=2, transpose_p=True, append=(cache, k, v),
          interpret=attention_gpu.interpret_params(True), approx_math=True)


if __name__ == "__main__":
  absltest.main()
