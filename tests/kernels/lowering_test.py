"""The Pallas kernels lower for their devices, on the CPU.

jax lowers a jitted function for another platform without its device
(`lower(lowering_platforms=(...))`; for TPU inside an abstract mesh that
names the chip). For a Mosaic GPU kernel that runs Pallas' lowering and
Mosaic GPU's layout inference, which is where device runs failed before
("Failed to infer a possible set of layouts"); it covers the paths
interpret mode cannot (byte-permute lookup through inline PTX, keys as a
register wgmma operand) and every layout option. For the Mosaic TPU kernel
it checks the TPU block-shape rules that interpret mode does not enforce.
The fused quantize-and-append kernel lowers likewise.
What only a device checks: the backend compilers, and the numbers
(experiments/probes).
"""

import dataclasses
import functools
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import jax
from jax._src import mesh as mesh_lib  # AbstractDevice: no public path yet
import jax.numpy as jnp
import pytest

from turboquant_jax import cache as cache_lib
from turboquant_jax.cache import turboquant_cache
from turboquant_jax.kernels import decode_attention as attn
from turboquant_jax.kernels.decode_attention import pallas_gpu
from turboquant_jax.kernels.decode_attention import pallas_gpu_tokens
from turboquant_jax.kernels.decode_attention import prmt_lookup

_SHAPES = [
    # (head dim, key bits, value bits, GQA group, query tokens, key method)
    (128, 4, 4, 4, 1, "mse"),
    (64, 3, 3, 8, 1, "mse"),          # 24-byte rows
    (256, 2, 2, 3, 1, "mse"),
    (128, 3.5, 2.5, 4, 1, "mse"),     # outlier split: 4+3 and 3+2 bit parts
    (128, 3, 4, 1, 2, "prod"),        # QJL sign parts
    (64, 4, 4, 8, 3, "mse"),          # 24 query columns -> N = 32
    (128, 4, 3, 4, 16, "mse"),        # 64 query columns
]
_OPTIONS = [
    dict(),
    dict(layout="queries"),
    dict(lookup_mode="prmt"),
    dict(key_registers=True),
    dict(lookup_mode="prmt", key_registers=True, tile_rows=128),
    dict(tile_rows=256, stages=3),
    dict(transpose_p=True, key_registers=True, lookup_mode="prmt"),
    dict(skip_empty_splits=True),
    dict(combine="columns"),
    dict(rotate_in_kernel=False),      # the default at D <= 64 where a
    dict(rotate_in_kernel=True),       # cache allows it
    # Before session 11's defaults: 16 query columns, the library exp,
    # Mosaic GPU's automatic barriers.
    dict(min_columns=16, approx_math=False, auto_barriers=True),
    dict(overlap_values=False),
    # Codes as a token's row (16-byte rows where it is not a multiple of
    # 16), the layout before session 13's 128-byte rows.
    dict(tma_row_bytes=16),
    # The value tile through SMEM where it would be read into registers.
    dict(values_registers=False),
]


def _inputs(dim, key_bits, value_bits, groups, tokens, method,
            capacity=1024, window=0, grid=False):
  """(q [2, T, 2·G, D], an empty TurboQuant cache of 2 KV heads; grid: its
  codebooks on the grid, CacheConfig.grid_centroids)."""
  cfg = cache_lib.CacheConfig(key_bits=key_bits, value_bits=value_bits,
                              key_method=method, window=window,
                              grid_centroids=grid)
  return (jnp.ones((2, tokens, 2 * groups, dim)),
          cache_lib.init(cfg, 2, 2, capacity, dim))


def _jitted(impl, **options):
  return jax.jit(lambda q, c: attn.chunk_attention(
      q, c, c.lengths, impl=impl, interpret=False, **options))


def _lower(*shape, **options):
  return _jitted("pallas_gpu", **options).trace(*_inputs(*shape)).lower(
      lowering_platforms=("cuda",))


def _lower_tpu(chip, *shape, capacity=1024, window=0, **options):
  inputs = _inputs(*shape, capacity=capacity, window=window)
  mesh = jax.sharding.AbstractMesh(
      (1,), ("x",), abstract_device=mesh_lib.AbstractDevice(
          device_kind=chip, num_cores=1, platform="tpu"))
  with jax.sharding.use_abstract_mesh(mesh):
    return _jitted("pallas_tpu", **options).trace(*inputs).lower(
        lowering_platforms=("tpu",))


class GpuLoweringTest(parameterized.TestCase):

  @parameterized.parameters(*[(s, o) for s in _SHAPES for o in _OPTIONS])
  def test_lowers_for_cuda(self, shape, options):
    if options.get("layout") == "queries" and shape[3] * shape[4] > 64:
      self.skipTest("more than 64 query rows")
    text = _lower(*shape, **options).as_text()
    self.assertIn("mosaic_gpu", text)

  @parameterized.parameters(
      ((128, 4, 4, 4, 1, "mse"), {}),
      ((64, 4, 4, 8, 1, "mse"), dict(rotate_in_kernel=False)),
      ((128, 3.5, 4, 4, 3, "mse"), dict(values_registers=False)),
      ((256, 4, 2.5, 2, 1, "mse"), {}),
      ((128, 3, 3, 4, 1, "mse"), {}),
      ((128, 3, 3, 4, 2, "mse"), dict(values_registers=False)),
      ((64, 3.5, 2.5, 4, 1, "mse"), {}))          # parts of 32
  def test_grid_lookup_lowers(self, shape, options):
    # A grid cache's 3- and 4-bit parts take the grid lookup's PTX (an
    # f16x2 multiply-add per 2 codes), keys and values, in every read
    # path.
    text = _jitted("pallas_gpu", **options).trace(
        *_inputs(*shape, grid=True)).lower(
            lowering_platforms=("cuda",)).as_text()
    self.assertIn("fma.rn.f16x2", text)
    plain = _lower(*shape, **options).as_text()
    self.assertNotIn("fma.rn.f16x2", plain)

  @parameterized.parameters(
      ((128, 4, 4, 4, 1, "mse"), False), ((128, 4, 4, 4, 1, "mse"), True),
      ((128, 3, 3, 4, 1, "mse"), False), ((128, 3, 3, 4, 1, "mse"), True),
      ((128, 2, 2, 4, 1, "mse"), False), ((64, 3.5, 2.5, 4, 1, "mse"), True))
  def test_lookup_tables_reach_ptxas_opaque(self, shape, grid):
    # No prmt of the lowered kernel has both table words as immediates
    # (ptxas would re-materialize one per prmt): the first is a register
    # made from %tid.x (prmt_lookup.opaque_tables); with OPAQUE_TABLES off,
    # the immediates are back.
    def lowered():
      return _jitted("pallas_gpu").trace(*_inputs(*shape, grid=grid)).lower(
          lowering_platforms=("cuda",)).as_text().replace("\\0A", "\n")
    text = lowered()
    self.assertIn("%tid.x", text)
    self.assertEmpty(prmt_lookup._PRMT_TABLES.findall(text))
    with mock.patch.object(prmt_lookup, "OPAQUE_TABLES", False):
      text = lowered()
    self.assertNotIn("%tid.x", text)
    self.assertNotEmpty(prmt_lookup._PRMT_TABLES.findall(text))

  @parameterized.parameters(
      ((128, 4, 4, 4, 1, "mse"), {}),
      ((128, 3.5, 4, 1, 2, "prod"), dict(overlap_values=False)),
      ((128, 4, 4, 4, 16, "mse"), dict(tile_rows=128, combine="columns")),
      ((128, 4, 2, 4, 1, "mse"), {}),      # 2 bits: a field per warp
      ((128, 3, 3, 4, 2, "mse"), {}),      # 3 bits: two planes' chunks
      ((64, 2, 2, 3, 2, "mse"), dict(rotate_in_kernel=False)),
      ((256, 2, 2, 2, 1, "mse"), {}),      # 2 bits, 4 chunks: every field
      ((64, 4, 4, 4, 1, "mse"), dict(rotate_in_kernel=False)),  # a nibble
      ((128, 4, 3.5, 4, 1, "mse"), {}),    # the 4-bit part of 64
      ((128, 2.5, 2.5, 4, 2, "mse"), {}),  # the 2-bit part of 64
      ((256, 3, 3.5, 2, 1, "mse"), dict(overlap_values=False)),  # both
      ((256, 4, 4, 2, 1, "mse"), {}),      # 4 bits, 8 chunks: two halves
      ((256, 3, 3, 2, 1, "mse"), {}))      # 3 bits: 4 + 2 chunks
  def test_values_in_registers_lowers(self, shape, options):
    # values_registers: the value tile read transposed by ldmatrix (device
    # only) into the P·V wgmma's register operand.
    text = _lower(*shape, values_registers=True, **options).as_text()
    self.assertIn("ldmatrix", text)

  @parameterized.parameters(
      ((64, 2.5, 2.5, 3, 1, "mse"), {}),
      ((64, 3.5, 3.5, 8, 1, "mse"), dict(tile_rows=128)),
      ((64, 3.5, 2.5, 2, 3, "mse"), dict(key_registers=False,
                                         combine="columns",
                                         tma_row_bytes=16)),
      # A tensor's two parts as one group (merge_narrow), either setting.
      ((64, 2.5, 3.5, 4, 1, "mse"), dict(merge_narrow=True)),
      ((64, 3.5, 3.5, 3, 1, "mse"), dict(merge_narrow=False)),
      ((64, 3.5, 2.5, 2, 3, "mse"), dict(merge_narrow=True,
                                         key_registers=False,
                                         tile_rows=128)),
      # Merged, rotated by XLA instead of the kernel.
      ((64, 2.5, 2.5, 3, 1, "mse"), dict(rotate_in_kernel=False)))
  def test_parts_of_32_lower(self, shape, options):
    # The outlier split at D = 64: parts of 32 coordinates, the 3-bit one
    # loaded by each thread's own 16-bit shared loads (device only).
    text = _lower(*shape, **options).as_text()
    self.assertIn("mosaic_gpu", text)
    self.assertIn("ld.shared.u16", text)

  def test_values_in_registers_by_default_where_they_can(self):
    # values_registers=None (the default): on where every value part is of
    # 2, 3 or 4 bits and 128 or 256 coordinates (VALUES_REGISTERS_DEFAULT),
    # with the prmt lookup and no rotation in the kernel.
    for shape, options, on in (
        ((128, 4, 4, 4, 1, "mse"), {}, True),
        ((128, 3, 4, 1, 2, "prod"), {}, True),
        ((128, 4, 3, 4, 1, "mse"), {}, True),
        ((128, 4, 2, 4, 1, "mse"), {}, True),
        ((128, 4, 3.5, 4, 1, "mse"), {}, False),  # parts of 64: slower
        ((128, 4, 2.5, 4, 1, "mse"), {}, False),
        ((256, 4, 2.5, 2, 1, "mse"), {}, True),   # parts of 128
        ((256, 4, 3.5, 2, 1, "mse"), {}, True),
        ((256, 2, 2, 2, 1, "mse"), {}, True),
        ((256, 2, 4, 2, 1, "mse"), {}, True),    # 8 chunks a row
        ((256, 2, 3, 2, 1, "mse"), {}, True),    # a chunk of each plane
        ((256, 3, 3, 1, 2, "prod"), {}, True),
        ((64, 4, 4, 4, 1, "mse"), {}, False),
        ((64, 2, 2, 4, 1, "mse"), dict(rotate_in_kernel=False), False),
        ((128, 4, 4, 4, 1, "mse"), dict(rotate_in_kernel=True), False),
        ((128, 4, 4, 4, 1, "mse"), dict(lookup_mode="poly16"), False)):
      text = _lower(*shape, **options).as_text()
      self.assertEqual("ldmatrix" in text, on, (shape, options))

  def test_overlap_values_by_default_with_values_in_registers(self):
    # overlap_values=None: on wherever values_registers is, whatever
    # default_overlap_values says (here made to say off, as it does for
    # long splits past one wave); where the value tile goes through SMEM,
    # default_overlap_values' answer.
    for shape, registers, overlap in (((128, 4, 4, 4, 1, "mse"), True, True),
                                      ((128, 4, 3, 4, 1, "mse"), True, True),
                                      ((128, 4, 2, 4, 1, "mse"), True, True),
                                      ((256, 4, 3.5, 2, 1, "mse"), True,
                                       True),
                                      ((128, 4, 3.5, 4, 1, "mse"), False,
                                       False)):
      pallas_gpu._attention.clear_cache()   # trace again under the mocks
      with mock.patch.object(pallas_gpu, "default_overlap_values",
                             return_value=False), mock.patch.object(
                                 pallas_gpu_tokens, "fused_attention",
                                 wraps=pallas_gpu_tokens.fused_attention
                             ) as kernel:
        _lower(*shape)
      got = {k: kernel.call_args.kwargs[k]
             for k in ("values_registers", "overlap_values")}
      self.assertEqual(got, dict(values_registers=registers,
                                 overlap_values=overlap), shape)

  def test_pipeline_probe_lowers(self):
    # experiments/probes/pipeline_probe: the bare TMA pipeline over the
    # cache's arrays, with and without automatic barriers (device only).
    # pylint: disable-next=g-import-not-at-top
    from experiments.probes import pipeline_probe as pp
    arrays = [jax.ShapeDtypeStruct((pp.B, pp.KV, pp.S, 64), jnp.uint8),
              jax.ShapeDtypeStruct((pp.B, pp.KV, pp.S), jnp.float16)] * 2
    token = jax.ShapeDtypeStruct((1,), jnp.float32)
    texts = [jax.jit(pp.stream(arrays, 64, 16, 2, barriers)).trace(
        token, *arrays).lower(lowering_platforms=("cuda",)).as_text()
             for barriers in (True, False)]
    self.assertIn("mosaic_gpu", texts[1])
    self.assertGreater(len(texts[0]), len(texts[1]))
    # The codes as wider (or 16-byte) TMA rows: the same tokens a tile.
    for width in (16, 256):
      wide = [jax.eval_shape(functools.partial(pp.widened, width=width), a)
              if len(a.shape) == 4 else a for a in arrays]
      self.assertEqual(wide[0].shape, (pp.B, pp.KV, pp.S * 64 // width,
                                       width))
      text = jax.jit(pp.stream(wide, 64, 16, 2, False)).trace(
          token, *wide).lower(lowering_platforms=("cuda",)).as_text()
      self.assertIn("mosaic_gpu", text)
    # And with a memory warpgroup beside the compute one.
    text = jax.jit(pp.stream(arrays, 64, 16, 4, False, True)).trace(
        token, *arrays).lower(lowering_platforms=("cuda",)).as_text()
    self.assertIn("mosaic_gpu", text)

  def test_math_and_barrier_options_reach_the_kernel(self):
    # approx_math (the default for layout="tokens") puts ex2.approx in the
    # Mosaic GPU module; auto_barriers=True adds a warpgroup barrier around
    # every SMEM store and TMA issue (more ops: a longer module; its
    # strings are interned, so bar.sync itself is listed once either way).
    shape = (128, 4, 4, 4, 1, "mse")
    text = lambda **o: _lower(*shape, **o).as_text()
    default = text()
    self.assertIn("ex2.approx", default)
    self.assertNotIn("ex2.approx", text(approx_math=False))
    self.assertGreater(len(text(auto_barriers=True)), len(default) + 1000)

  @parameterized.parameters(64, 128)
  def test_rotation_in_kernel_leaves_xla_no_product(self, dim):
    # The queries' rotation and the outputs' rotation back are the
    # kernel's (wgmma on f16 tiles): no dot_general is left to XLA, where
    # the path without it has two. It is the default up to D = 64 only
    # (at 128 its SMEM cost more than it saved on the H200). A dense
    # rotation's products are einsums at any number of query rows
    # (parts.sums_products).
    shape = (dim, 4, 3, 4, 1, "mse")
    count = lambda **o: _lower(*shape, **o).as_text().count(
        "stablehlo.dot_general")
    jax.clear_caches()              # pallas_gpu._attention traced anew
    self.assertEqual(count(rotate_in_kernel=False), 2)
    self.assertEqual(count(rotate_in_kernel=True), 0)
    self.assertEqual(count(), 0 if dim <= 64 else 2)

  def test_merged_split_rotates_in_the_kernel(self):
    # The split at D = 64, each tensor's parts as one group: the kernel
    # rotates queries and outputs by the folded rotations' tiles the cache
    # holds, so XLA has no product and no 64 x 64 f16 convert left; rotated
    # by XLA, the queries' product and the outputs' remain.
    q, cache = _inputs(64, 2.5, 3.5, 3, 1, "mse")
    f = lambda **o: _jitted("pallas_gpu", **o).trace(q, cache).lower(
        lowering_platforms=("cuda",)).as_text()
    text = f()
    self.assertEqual(text.count("stablehlo.custom_call @mosaic_gpu"), 1)
    self.assertNotIn("stablehlo.dot_general", text)
    self.assertFalse(any("stablehlo.convert" in line and "x64x64xf16>" in line
                         for line in text.splitlines()))
    xla = f(rotate_in_kernel=False)
    self.assertTrue("stablehlo.dot_general" in xla
                    or "stablehlo.reduce" in xla)

  def test_rotation_tiles_come_from_the_cache(self):
    # init keeps the rotations as the kernel's f16 tiles: the kernel call
    # converts nothing to f16 itself; a cache without them (made some
    # other way) has them laid out at the call (two converts).
    q, cache = _inputs(64, 4, 3, 4, 1, "mse")
    f = _jitted("pallas_gpu")
    count = lambda c: sum(
        "stablehlo.convert" in line and "x64x64xf16>" in line
        for line in f.trace(q, c).lower(
            lowering_platforms=("cuda",)).as_text().splitlines())
    self.assertIsNotNone(cache.rotation_tiles)
    self.assertEqual(count(cache), 0)
    self.assertEqual(count(dataclasses.replace(cache, rotation_tiles=None)),
                     2)

  @parameterized.parameters(("bfloat16", 16), ("float32", 16),
                            ("float16", 8))
  def test_norms_of_every_dtype_lower(self, norm_dtype, norm_bits):
    # Norms reach the kernel as stored (bf16, f32) or decoded (8-bit: f32).
    cfg = cache_lib.CacheConfig(key_bits=4, value_bits=3,
                                norm_dtype=norm_dtype, norm_bits=norm_bits)
    cache = cache_lib.init(cfg, 2, 2, 1024, 128)
    text = _jitted("pallas_gpu").trace(jnp.ones((2, 1, 8, 128)), cache).lower(
        lowering_platforms=("cuda",)).as_text()
    self.assertIn("mosaic_gpu", text)

  @parameterized.parameters((128, 4, 4, "float16"), (64, 3, 2, "bfloat16"),
                            (64, 2.5, 3.5, "float16"))     # both split
  def test_fused_append_lowers(self, *case):
    self.check_fused_append_lowers(*case)

  @pytest.mark.slow
  def test_fused_append_lowers_at_other_widths(self):
    for case in ((256, 1, 4, "float32"), (128, 2, 3, "float16"),
                 (128, 3.5, 4, "bfloat16")):          # the keys split
      self.check_fused_append_lowers(*case)

  def check_fused_append_lowers(self, dim, key_bits, value_bits, norm_dtype):
    cfg = cache_lib.CacheConfig(key_bits=key_bits, value_bits=value_bits,
                                norm_dtype=norm_dtype)
    cache = cache_lib.init(cfg, 2, 3, 64, dim)
    token = jnp.ones((2, 3, 1, dim), jnp.bfloat16)
    fn = jax.jit(lambda c, k: turboquant_cache.append(
        c, k, k, impl="pallas_gpu", interpret=False))
    text = fn.trace(cache, token).lower(lowering_platforms=("cuda",)).as_text()
    self.assertIn("mosaic_gpu", text)
    # The cache's codes and norms (of each part of a split tensor) are
    # aliased to the kernel's outputs (written in place where XLA can
    # donate them).
    n_parts = sum(1 + (bits % 1 != 0) for bits in (key_bits, value_bits))
    self.assertEqual(text.count("stablehlo.output_operand_alias<"),
                     2 * n_parts)
    # Rotation, quantization and the write are the kernel's: XLA has no
    # product and no scatter left (only the rotations' column layout).
    self.assertNotIn("stablehlo.scatter", text)
    self.assertNotIn("stablehlo.dot_general", text)

  @parameterized.parameters((64, 4, 4, 3, {}), (64, 3, 3, 8, {}),
                            (128, 4, 2, 4, {}),
                            (64, 4, 4, 3, dict(rotate_in_kernel=False)),
                            (64, 4, 4, 3, dict(auto_barriers=False)),
                            (64, 3, 3, 8, dict(tma_row_bytes=16)),
                            (64, 2.5, 3.5, 3, {}),        # parts of 32
                            (64, 3.5, 2.5, 3, dict(merge_narrow=False)))
  def test_append_attention_lowers(self, dim, key_bits, value_bits, groups,
                                   options):
    self.check_append_attention_lowers(dim, key_bits, value_bits, groups,
                                       options)

  @pytest.mark.slow
  def test_append_attention_lowers_with_split_keys_at_d128(self):
    self.check_append_attention_lowers(128, 3.5, 4, 4, {})

  def check_append_attention_lowers(self, dim, key_bits, value_bits, groups,
                                    options):
    # One kernel: the append program's scalar writes (24-byte rows through
    # their 128-byte view at 3 bits, or 16-byte with tma_row_bytes=16) and
    # its one-token tile next to the splits' pipeline.
    cfg = cache_lib.CacheConfig(key_bits=key_bits, value_bits=value_bits)
    cache = cache_lib.init(cfg, 2, 2, 1024, dim)
    token = jnp.ones((2, 2, 1, dim), jnp.bfloat16)
    q = jnp.ones((2, 1, 2 * groups, dim), jnp.bfloat16)
    fn = jax.jit(lambda q, c, k: pallas_gpu.append_attention(
        q, k, k, c, interpret=False, **options))
    text = fn.trace(q, cache, token).lower(
        lowering_platforms=("cuda",)).as_text()
    self.assertEqual(text.count("stablehlo.custom_call @mosaic_gpu"), 1)
    # The cache's codes and norms (of each part of a split tensor) are
    # aliased to the kernel's outputs.
    n_parts = sum(1 + (bits % 1 != 0) for bits in (key_bits, value_bits))
    self.assertEqual(text.count("stablehlo.output_operand_alias<"),
                     2 * n_parts)
    self.assertNotIn("stablehlo.scatter", text)

  def test_mismatched_wgmma_swizzles_fail_to_lower(self):
    # The check has teeth: V tiles with 128-byte rows against a 32-byte Pᵀ
    # (the first v4 layout, which failed on the H200; transpose_p, now on
    # by default, gives Pᵀ 128-byte rows too) do not lower.
    group_smem = pallas_gpu._group_smem
    jax.clear_caches()
    try:
      pallas_gpu._group_smem = (
          lambda groups, swizzle=128, rows=64: group_smem(groups, 128, rows))
      with self.assertRaisesRegex(ValueError, "infer a possible set of"):
        _lower(128, 4, 4, 4, 1, "mse", transpose_p=False,
               values_registers=False)   # V tiles through SMEM
    finally:
      pallas_gpu._group_smem = group_smem
      jax.clear_caches()
    self.assertIs(pallas_gpu_tokens.base._group_smem, group_smem)


class TpuLoweringTest(parameterized.TestCase):

  @parameterized.parameters(*[(chip, s) for chip in ("TPU v5e", "TPU v6e")
                              for s in _SHAPES])
  def test_lowers_for_tpu(self, chip, shape):
    text = _lower_tpu(chip, *shape).as_text()
    self.assertIn("tpu_custom_call", text)

  @parameterized.parameters(200, 1000, 4096)
  def test_capacities_and_window_lower(self, capacity):
    # The default block (256 tokens, or the whole capacity below that)
    # keeps the last block dims TPU-legal for any capacity.
    _lower_tpu("TPU v5e", 128, 3.5, 4, 4, 2, "prod", capacity=capacity,
               window=5)

  def test_block_not_a_multiple_of_128_is_refused(self):
    # The interpret-mode tests use 8-token blocks; a TPU does not take them.
    with self.assertRaisesRegex(ValueError, "block"):
      _lower_tpu("TPU v5e", 128, 4, 4, 4, 1, "mse", block=100)


if __name__ == "__main__":
  absltest.main()
