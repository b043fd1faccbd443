"""impl="pallas_gpu": fused attention over packed TurboQuant codes, Mosaic GPU.

Version 3: tensor cores for both products, the FlashAttention layout, f16
centroid lookup.

Grid (B, K, NS) over sequences, KV heads and sequence splits; one warpgroup
per program. A TMA pipeline streams tiles of 64 tokens of packed key and
value codes and their norms into SMEM. Per tile, the warpgroup

1. unpacks the key codes (shift + mask per contiguous coordinate chunk),
   maps them to centroids (by default an odd polynomial through the
   codebook in packed f16, see `lookup`) and stores them as f16 groups
   [64 tokens, 64 coordinates] in swizzled SMEM; the codes never exist as a
   full bf16/f16 K in HBM;
2. scores all M = T·G queries of the GQA group at once on the tensor cores:
   S[64 rows, 64 tokens] = Σ_groups Q_g · K_gᵀ (wgmma, f32 accumulation;
   query rows past M are zero padding), scaled by the key norms per token
   column; the value codes are unpacked the same way while the wgmma runs;
3. keeps an online softmax per query row (row reductions stay inside a
   warp, as in FlashAttention);
4. accumulates O_g += (P · value norms) · V_g (wgmma, all groups issued
   before the first wait), in the rotated domain.

The query is rotated once before the kernel (<q, Rᵀy> = <Rq, y>) and each
value part is rotated back once after it (parts.finish), where the splits
are merged by log-sum-exp. QJL keys (prod) add a third kind of part: their
sign bits are 1-bit codes with centroids ±1, the sketched query S·q as its
query and the residual weight as its per-token norm. Packed rows that are
not a multiple of 16 bytes (24 for 3-bit parts of 64 channels, as in 2.5
and 3.5 bits at D = 128 or 3 bits at D = 64; 8 for the signs of 64) travel
as rows of 16 bytes and are viewed back in SMEM (`_tma_rows`); the
layout="tokens" kernel moves every tile as 128-byte rows
(tma_row_bytes).

Limits (NotImplementedError -> impl=None falls back to "xla"): the
capacity a multiple of 64 · NS, at most 64 query rows (T·G), part dims a
multiple of 64, or of NARROW = 32 (the outlier split at D = 64: 2.5 and
3.5 bits) in the layout="tokens" kernel with the prmt lookup, 2-4 bit
codebooks only (no QJL sign parts of 32), a tile of at most 256 whole TMA
rows.

Speed (H200): this layout ("queries", v3) 0.4-1.1x cuDNN bf16
(results/kernel_bench/h200_v3); the default layout="tokens" (v4,
pallas_gpu_tokens.py) with its byte-permute lookup 0.47-1.44x in wall
clock over the whole grid, 1.04-1.34x at S = 128k for B = 8 and 32
(results/kernel_bench/h200_v6); kernel v7 in device time 1.06-1.65x at
2-4 bits and S >= 16k (results/kernel_bench/h200_v7); session 12's
1.17-1.75x there (h200_v8), session 13's (128-byte TMA rows)
1.11-1.73x except 3 B = 1 split cells (h200_v9), session 14's (the
lookup on the FMA pipe, per-width steps) 1.43x at 4 bits, 1.54x at 3,
1.98x at 2, B = 8, S = 128k (h200_v10); session 15's, its calls written
out rather than looped and timed on the GPU's clock, 1.47x, 1.57x and
2.06x there, 58 of 60 cells faster at S >= 16k, the other two B = 1, 16k
at 3.5 and 4 bits (0.97x, 0.98x) (h200_v12); session 17's (4-bit values
into registers, one wave at B = 1) 1.67x, 1.63x and 2.10x there, all 60
cells faster at S >= 16k (1.02-2.18x) (h200_v13); today's (session 18:
2- and 3-bit values into registers too, looked up under the score
product) 0.558 ms, 1.67x against a faster cuDNN run (0.933 ms against
0.960), 1.62x and 2.24x there, all 60 cells faster at S >= 16k
(1.01-2.35x) (results/kernel_bench/h200). NOTES.md has the measurements.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
import numpy as np

from turboquant_jax.cache import common
from turboquant_jax.cache import turboquant_cache
from turboquant_jax.kernels.decode_attention import parts
from turboquant_jax.kernels.decode_attention import prmt_lookup
from turboquant_jax.kernels.decode_attention import reference
from turboquant_jax.quant import packing
from turboquant_jax.quant import split

ROWS = 64      # tokens per tile = query rows of one warpgroup's wgmma
STAGES = 2     # default tiles in flight per program (emit_pipeline steps)
MIN_SPLIT_TILES = 3   # default_splits' shortest split where B·K is small
ONE_WAVE_MAX_HEADS = 8   # default_splits: one wave up to this many B·K
SECOND_WAVE_MIN_TOKENS = 1024   # default_splits: splits past one wave
ONE_WAVE_PROGRAMS = 132 * 4   # layout="tokens": 4 programs on each SM
TMA_ROW_BYTES = 128   # layout="tokens": codes move as 128-byte TMA rows
# layout="tokens": merge_narrow's default (the outlier split at D = 64 read
# as one group per tensor instead of two zero-padded ones). On the H200
# (GPU clock, 32/8 heads, session 21) B=8, S=128k 0.335 ms against 0.456 at
# 2.5 bits and 0.358 against 0.480 at 3.5; B=32, S=16k 0.176 against 0.236
# and 0.188 against 0.249; B=1, S=16k 0.0185 against 0.0225 and 0.0190
# against 0.0230; device checks 2.6e-4 to 1.1e-3 of the output scale.
MERGE_NARROW_DEFAULT = True

_L = plgpu.Layout


def _check(inp: parts.KernelInputs, splits: int,
           tma_row_bytes: int = 16, narrow: bool = False) -> None:
  """NotImplementedError where the kernel cannot read these inputs.
  narrow: the kernel takes codebook parts of NARROW coordinates (the
  layout="tokens" kernel with the prmt lookup, _narrow_group)."""
  cap = inp.value_codes[0].shape[2]
  if cap % (ROWS * splits):
    raise NotImplementedError(f"capacity {cap} must be a multiple of "
                              f"{ROWS} * {splits=}")
  m = inp.q[0].shape[2]
  if m > ROWS:
    raise NotImplementedError(f"{m} query rows (T·G) per KV head; the "
                              f"kernel takes at most {ROWS}")
  codes = inp.key_codes + [s for s in inp.key_signs if s is not None]
  for c in codes + inp.value_codes:
    p = c.shape[-1]
    if ROWS * p % tma_row_bytes or tma_box(ROWS, p, tma_row_bytes)[0] > 256:
      raise NotImplementedError(
          f"pallas_gpu: a tile of {ROWS} packed rows of {p} bytes is not "
          f"at most 256 whole TMA rows of {tma_row_bytes} bytes")
  for spec in _kernel_specs(inp)[0] + list(inp.value_specs):
    if spec.dim % GROUP and not (narrow and _narrow_supported(spec)):
      raise NotImplementedError(
          f"pallas_gpu: part dim {spec.dim} is not a multiple of {GROUP}"
          + (f" (parts of {NARROW}: 2-4 bit codebooks the prmt lookup "
             "supports, no QJL signs, layout='tokens' with "
             "lookup_mode='prmt')" if spec.dim == NARROW else ""))


def _kernel_specs(inp: parts.KernelInputs):
  """Key parts as the kernel sees them: codebook parts, then sign parts."""
  specs, queries, codes, norms = [], [], [], []
  for spec, q, c, n in zip(inp.key_specs, inp.q, inp.key_codes,
                           inp.key_norms):
    if spec.bits:
      specs.append(spec)
      queries.append(q)
      codes.append(c)
      norms.append(n)
  for spec, sq, signs, coef in zip(inp.key_specs, inp.sq, inp.key_signs,
                                   inp.key_coef):
    if spec.prod:
      specs.append(parts.PartSpec(dim=spec.dim, bits=1,
                                  centroids=(-1.0, 1.0)))
      queries.append(sq)
      codes.append(signs)
      norms.append(coef)
  return specs, queries, codes, norms


# ------------------------------------------------------------ lookup


def odd_polynomial(centroids: tuple[float, ...]) -> tuple[float, ...] | None:
  """Coefficients a with centroids[c] = t·Σ_i a_i t^(2i), t = (2c+1-n)/(n-1).

  A symmetric codebook of n = 2^b values is an odd function of the centred
  code, so n/2 odd powers interpolate it exactly; for b <= 4 the f32
  Horner evaluation is accurate to ~1e-7 of the largest centroid (n/2 - 1
  FMAs against 2^b - 1 selects). None if the codebook is not symmetric or
  the f32 evaluation is off by more than 1e-6 (b >= 5: equispaced
  interpolation of high degree); the kernel then uses selects.
  """
  c = np.asarray(centroids, np.float64)
  n = len(c)
  if n < 2 or np.max(np.abs(c + c[::-1])) > 1e-6 * np.max(np.abs(c)):
    return None
  t = (2 * np.arange(n) + 1 - n) / (n - 1)
  half = n // 2
  basis = np.stack([t[half:] ** (2 * i + 1) for i in range(half)], axis=1)
  coef = np.linalg.solve(basis, c[half:])
  t32 = t.astype(np.float32)
  acc = np.full(n, coef[-1], np.float32)
  for a in coef[-2::-1]:
    acc = acc * (t32 * t32) + np.float32(a)
  if np.max(np.abs(acc * t32 - c)) > 1e-6 * np.max(np.abs(c)):
    return None
  return tuple(float(a) for a in coef)


def lookup(code: jax.Array, spec: parts.PartSpec, mode: str) -> jax.Array:
  """centroids[code] by an odd polynomial or a select chain.

  mode "poly" and "select" compute in f32; "poly16" takes int16 codes and
  computes in f16 (packed f16x2 on the GPU, two coordinates an
  instruction): the code becomes the f16 1024 + code by setting the
  exponent bits (no int-to-float conversion), 1024 is subtracted exactly,
  and Horner runs in f16. Its error is at most ~1.4e-3 of the largest
  centroid for b <= 4 (D 64-256), against 2^-11 for rounding the table to
  f16; the operands of the tensor-core products are f16 either way.
  """
  if mode == "poly16":
    coef = odd_polynomial(spec.centroids)
    if coef is None:
      return parts.lookup(code, spec.centroids).astype(jnp.float16)
    n = len(spec.centroids)
    magic = jax.lax.bitcast_convert_type(
        code.astype(jnp.int16) | 0x6400, jnp.float16)      # 1024 + code
    t = (magic - 1024.0) * (2.0 / (n - 1)) + (1.0 - n) / (n - 1)
    t2 = t * t
    acc = jnp.full(code.shape, coef[-1], jnp.float16)
    for a in coef[-2::-1]:
      acc = acc * t2 + a
    return acc * t
  coef = odd_polynomial(spec.centroids) if mode == "poly" else None
  if coef is None:
    return parts.lookup(code, spec.centroids)
  n = len(spec.centroids)
  t = code.astype(jnp.float32) * (2.0 / (n - 1)) + (1.0 - n) / (n - 1)
  t2 = t * t
  acc = jnp.full(code.shape, coef[-1], jnp.float32)
  for a in coef[-2::-1]:
    acc = acc * t2 + a
  return acc * t


# ------------------------------------------------------------ the kernel


LOOKUP_MODES = ("poly16", "prmt", "poly", "select")

GROUP = 64     # coordinates per SMEM operand tile (128-byte swizzled f16)


# The one part dim below GROUP the tokens kernel reads: the outlier split's
# halves at head dim 64 (2.5 and 3.5 bits), each looked up into one column
# group whose other 32 coordinates are zero (_narrow_group).
NARROW = 32


def _groups(spec: parts.PartSpec) -> int:
  """Column groups of a part: D / 64, or 1 for a part of NARROW."""
  return -(-spec.dim // GROUP)


def mergeable(specs) -> bool:
  """Whether merge_narrow takes these parts (a tensor's, as the kernel
  sees them) as one group: two codebook parts of NARROW coordinates (the
  outlier split at D = 64; no QJL sign parts)."""
  return len(specs) == 2 and all(s.dim == NARROW and s.bits for s in specs)


def _narrow_supported(spec: parts.PartSpec) -> bool:
  """Whether _narrow_group reads this part of NARROW coordinates: a 2-,
  3- or 4-bit codebook the prmt lookup supports (not QJL signs: a token's
  4 bytes of them are no WGMMA-layout row)."""
  return (spec.dim == NARROW and spec.bits in prmt_lookup.BITS
          and prmt_lookup.supports(spec.bits, spec.centroids))


def _narrow_group(code_ref, spec, rows: int, interpret: bool) -> jax.Array:
  """A part of NARROW coordinates' code tile -> its centroids as one f16
  [R, 64] column group (WGMMA layout), coordinates 32-63 zero (their
  queries are zero too, _padded_queries; value rows past 32 are dropped
  after the kernel)."""
  zeros = plgpu.layout_cast(jnp.zeros((rows, GROUP - NARROW), jnp.float16),
                            _L.WGMMA)
  return jnp.concatenate([narrow_centroids(code_ref, spec, rows, interpret),
                          zeros], axis=1)


def narrow_centroids(code_ref, spec, rows: int,
                     interpret: bool) -> jax.Array:
  """A part of NARROW coordinates' code tile -> its centroids, f16 [R, 32]
  (WGMMA layout). 2 and 4 bits: a token's 8 or 16 bytes are a WGMMA row
  as they are. 3 bits: _narrow_planes3."""
  if spec.bits == 3:
    chunks = prmt_lookup.lookup_first_half3(
        *_narrow_planes3(code_ref, rows, interpret), spec.centroids,
        interpret)
  else:
    chunks = prmt_lookup.lookup_chunks(
        _load_tile(code_ref, rows, _row_bytes(spec), interpret), spec.bits,
        spec.centroids, interpret)
  return jnp.concatenate(chunks, axis=1)


def smem_basics(ref) -> tuple:
  """Inside an inline_mgpu body: (i16, i32, a maker of i32 constants,
  vector<2 x i8>, the SMEM ref's shared address as an i32), what the
  device-only loads of code tiles build their PTX from."""
  # pylint: disable=g-import-not-at-top (Mosaic GPU internals, device only)
  from jax._src.lib.mlir import ir
  from jax._src.lib.mlir.dialects import arith
  from jax._src.lib.mlir.dialects import llvm
  from jax.experimental.mosaic.gpu import utils as mgpu_utils
  i16 = ir.IntegerType.get_signless(16)
  i32 = ir.IntegerType.get_signless(32)
  u8x2 = ir.VectorType.get((2,), ir.IntegerType.get_signless(8))
  return (i16, i32, lambda x: arith.constant(i32, x), u8x2,
          llvm.ptrtoint(i32, mgpu_utils.memref_ptr(ref)))


def _narrow_planes3(code_ref, rows: int,
                    interpret: bool) -> tuple[jax.Array, jax.Array]:
  """A 3-bit part of NARROW coordinates (a token's 12 bytes: its 2-bit
  plane's 8, then its 1-bit plane's 4) as the two u8 [R, 8] tiles
  prmt_lookup.lookup_first_half3 reads: the 2-bit plane, and in column c
  the 1-bit plane's byte c % 4 shifted right by c // 4.

  In packing's split order coordinate 8f + c (f < 4, c < 8) is field f
  of 2-bit byte c and bit 2f + c // 4 of 1-bit byte c % 4; the lookup
  reads field f of column c with bit 2f of the second tile's column c,
  where the shift puts it. On the device each thread loads its two bytes
  of each plane (ld.shared.u16 at its row and column pair): a token's 12
  bytes are no WGMMA-layout row, and the tile lies unswizzled, a token's
  row after the previous one's, whatever the TMA rows."""
  if interpret:
    words = code_ref[...].reshape(rows, 12)
    column = jax.lax.broadcasted_iota(jnp.uint8, (rows, 8), 1)
    low = jnp.concatenate([words[:, 8:], words[:, 8:]], axis=1)
    return words[:, :8], low >> (column // 4)
  # pylint: disable=g-import-not-at-top (Mosaic GPU internals, device only)
  from jax._src.lib.mlir.dialects import arith
  from jax.experimental.mosaic import gpu as mgpu
  from jax.experimental.mosaic.gpu import utils as mgpu_utils
  out = plgpu.ShapeDtypeStruct((rows, 8), jnp.uint8, layout=_L.WGMMA)

  @plgpu.inline_mgpu(arg_types=(plgpu.RefType(),), return_type=(out, out))
  def load(ctx, ref):
    del ctx
    i16, _, c, u8x2, base = smem_basics(ref)
    thread = mgpu_utils.thread_idx()
    lane = arith.andi(thread, c(31))
    warp = arith.andi(arith.shrui(thread, c(5)), c(3))
    pair = arith.andi(lane, c(3))         # columns 2·pair, 2·pair + 1
    # WGMMA layout: register [t, j, 0, 0, h, ...] holds row 64t + 16·warp
    # + 8h + lane // 4, columns 8j + 2·pair (+ 1).
    row = arith.addi(arith.muli(warp, c(16)), arith.shrui(lane, c(2)))
    high = arith.muli(pair, c(2))                          # byte 2·pair
    low = arith.addi(c(8), arith.muli(arith.andi(pair, c(1)), c(2)))
    shift = arith.trunci(i16, arith.shrui(pair, c(1)))     # c // 4
    shape = mgpu.WGMMA_LAYOUT.registers_shape((rows, 8))
    plane, ones = np.empty(shape, object), np.empty(shape, object)
    for t in range(rows // 64):
      for h in range(2):
        start = arith.addi(base, arith.muli(
            arith.addi(row, c(64 * t + 8 * h)), c(12)))
        load16 = lambda offset: mgpu_utils.inline_ptx(
            "ld.shared.u16 $0, [$1];", arith.addi(start, offset),
            result_types=i16)
        plane[t, 0, 0, 0, h, 0, 0, 0, 0] = mgpu_utils.bitcast(load16(high),
                                                              u8x2)
        ones[t, 0, 0, 0, h, 0, 0, 0, 0] = mgpu_utils.bitcast(
            arith.shrui(load16(low), shift), u8x2)
    return tuple(mgpu.FragmentedArray(_registers=r,
                                      _layout=mgpu.WGMMA_LAYOUT,
                                      _is_signed=False) for r in (plane, ones))
  return tuple(load(code_ref))


def _group_smem(groups: int, swizzle: int = 128,
                rows: int = ROWS) -> plgpu.SMEM:
  """f16[groups, rows, 64] in the tiled, swizzled form wgmma reads.

  One wgmma reads A and B with one swizzle: a tile that meets a narrower
  operand (layout="tokens": Pᵀ of 16 or 32 columns) takes its swizzle.
  """
  return plgpu.SMEM(
      (groups, rows, GROUP), jnp.float16,
      transforms=(plgpu.TilingTransform((8, swizzle // 2)),
                  plgpu.SwizzleTransform(swizzle)))


def _in_groups(chunks: list[jax.Array]) -> list[jax.Array]:
  """Contiguous coordinate chunks [64, Dc] -> column groups [64, 64]."""
  dc = chunks[0].shape[1]
  if dc >= GROUP:
    return [c[:, o:o + GROUP] for c in chunks for o in range(0, dc, GROUP)]
  per = GROUP // dc
  return [jnp.concatenate(chunks[g:g + per], axis=1)
          for g in range(0, len(chunks), per)]


def _tma_rows(codes: jax.Array, width: int = 16) -> jax.Array:
  """u8[B, K, S, P] -> [B, K, S·P/width, width] unless P is a multiple of
  `width`.

  TMA copies rows of a multiple of 16 bytes; a tile of R packed rows of
  P bytes (24 for 3-bit parts of 64 channels, 8 for the sign bits of 64)
  is the same bytes as R·P/16 rows of 16, and the kernel views it back as
  [R, P] in SMEM (unswizzled, so the bytes lie alike). width = 128 moves
  every tile as 128-byte rows (4-bit rows of 64 bytes too): on the H200 a
  bare pipeline streamed a 4-bit cache at 3.95 TB/s as 128-byte rows
  against 3.4 as 64-byte and 2.1 as 16-byte rows (pipeline_probe,
  NOTES.md session 13). A free reshape, no copy.
  """
  b, k, s, p = codes.shape
  return codes.reshape(b, k, *tma_box(s, p, width))


def tma_box(rows: int, p: int, width: int) -> tuple[int, int]:
  """The [rows, P] packed rows as TMA moves them: as they are where P is a
  multiple of `width`, else as rows of `width` bytes."""
  return (rows, p) if p % width == 0 else (rows * p // width, width)


def _dequantize_into(code_ref, spec, pool, first: int, mode,
                     interpret: bool) -> None:
  """Unpacks a u8[R, P] tile; stores its centroids as pool[first + g]."""
  for g, group in enumerate(dequantize_groups(code_ref, spec, mode,
                                              interpret)):
    pool[first + g] = group


def dequantize_groups(code_ref, spec, mode, interpret: bool) -> list:
  """A u8[R, P] code tile -> its centroids as f16 [R, 64] column groups
  (WGMMA layout: a wgmma A operand as they are)."""
  row = _row_bytes(spec)
  rows = code_ref.shape[0] * code_ref.shape[1] // row
  if spec.dim % GROUP:
    return [_narrow_group(code_ref, spec, rows, interpret)]
  words = _load_tile(code_ref, rows, row, interpret)
  if (mode == "prmt" and spec.bits in prmt_lookup.BITS
      and prmt_lookup.supports(spec.bits, spec.centroids)):
    # Coordinate chunks looked up from the packed bytes, no unpacking.
    chunks = prmt_lookup.lookup_chunks(words, spec.bits, spec.centroids,
                                       interpret)
  else:
    mode = "poly16" if mode == "prmt" else mode
    dtype = jnp.int16 if mode == "poly16" else jnp.int32
    chunks = [lookup(c, spec, mode) for c in
              parts.unpack_chunks(words, spec.bits, spec.dim, dtype)]
  return [g.astype(jnp.float16) for g in _in_groups(chunks)]


def _load_tile(code_ref, rows: int, row: int, interpret: bool) -> jax.Array:
  """A code tile (u8 SMEM, as rows of `row` bytes or as _tma_rows' rows)
  loaded as u8 [rows, row] in the WGMMA layout."""
  if code_ref.shape == (rows, row):
    return plgpu.load(code_ref, layout=_L.WGMMA, optimized=False)
  if interpret:
    # A _tma_rows tile. Interpret mode has no rule for reshaped refs, so it
    # reshapes the loaded value instead.
    return code_ref[...].reshape(rows, row)
  return _load_viewed(code_ref, (rows, row))


def _load_viewed(code_ref, shape: tuple[int, int]) -> jax.Array:
  """A _tma_rows tile (u8, unswizzled SMEM) loaded as `shape` [R, P] in
  the WGMMA layout: the ref is viewed as [R, P] inside Mosaic GPU, where
  Pallas' reshape of the ref would run layout inference, which fails on
  rows of 32 bytes or more (it proposes swizzled tilings for them)."""
  # pylint: disable=g-import-not-at-top (Mosaic GPU internals, device only)
  from jax.experimental.mosaic import gpu as mgpu
  from jax.experimental.mosaic.gpu import utils as mgpu_utils
  out = plgpu.ShapeDtypeStruct(shape, jnp.uint8, layout=_L.WGMMA)

  @plgpu.inline_mgpu(arg_types=(plgpu.RefType(),), return_type=out)
  def load(ctx, ref):
    del ctx
    return mgpu.FragmentedArray.load_untiled(
        mgpu_utils.memref_reshape(ref, shape), layout=mgpu.WGMMA_LAYOUT,
        is_signed=False, optimized=False)
  return load(code_ref)


def _row_bytes(spec: parts.PartSpec) -> int:
  return packing.packed_size(spec.dim, spec.bits)


def _offsets(specs) -> list[int]:
  """First pool group of each part (parts laid out one after another)."""
  return list(np.cumsum([0] + [_groups(s) for s in specs])[:-1])


def _program_refs(refs, nk: int, nv: int, kv_heads: int, splits: int,
                  wait: bool = True, n_out: int | None = None):
  """Splits a kernel's refs and loads this program's queries into SMEM.

  refs: one query array [B·K·groups, rows, 64] (every key part's groups,
  part after part: one XLA fusion prepares them all; GMEM operands are
  flat: a TMA view takes at most 5 strided dims, tiling included), nk key
  code and nk key norm arrays [B, K, S(, P)], nv value code and norm
  arrays, nv output arrays [B·K·NS·groups, .., ..] (n_out where given),
  the (m, l) output,
  then the scratch: the queries' SMEM [groups, rows, 64] and a barrier.
  Returns (key codes, key norms, value codes, value norms, outputs, (m, l)
  output, the program's flat index). wait=False: the queries' copy is
  issued but not waited for (the caller waits on the barrier, refs[-1],
  before it reads them, so that the copy's latency overlaps other work).
  """
  q_ref, rest = refs[0], refs[1:]
  kc_refs, kn_refs = rest[:nk], rest[nk:2 * nk]
  vc_refs, vn_refs = rest[2 * nk:2 * nk + nv], rest[2 * nk + nv:2 * nk + 2 * nv]
  n_out = nv if n_out is None else n_out
  o_refs = rest[2 * nk + 2 * nv:2 * nk + 2 * nv + n_out]
  ml_ref = rest[2 * nk + 2 * nv + n_out]
  q_smem, barrier = refs[-2], refs[-1]
  b, k = jax.lax.axis_index("b"), jax.lax.axis_index("k")
  n = q_smem.shape[0]                        # one TMA for all key parts
  plgpu.copy_gmem_to_smem(q_ref.at[pl.ds((b * kv_heads + k) * n, n)],
                          q_smem, barrier)
  if wait:
    plgpu.barrier_wait(barrier)
  program = (b * kv_heads + k) * splits + jax.lax.axis_index("s")
  return kc_refs, kn_refs, vc_refs, vn_refs, o_refs, ml_ref, program


def _kernel(qlen_ref, qend_ref, *refs, key_specs, value_specs, groups,
            split_len, kv_heads, splits, mode, interpret, stages):
  nk, nv = len(key_specs), len(value_specs)
  (kc_refs, kn_refs, vc_refs, vn_refs, o_refs, ml_ref,
   program) = _program_refs(refs, nk, nv, kv_heads, splits)
  q_smem = refs[-2]                        # [groups of all key parts, 64, 64]
  k_first, v_first = _offsets(key_specs), _offsets(value_specs)
  b, k = jax.lax.axis_index("b"), jax.lax.axis_index("k")
  qlen = qlen_ref[b]
  qend = qend_ref[b]
  base = jax.lax.axis_index("s") * split_len

  shape = (ROWS, ROWS)
  row = plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=_L.WGMMA)
  col = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=_L.WGMMA)
  limit = qend - 1 + row // groups                    # causal limit per row

  def body(k_pool, v_pool, p_smem, idx, *tile_and_carry):
    (i,) = idx
    *tile, carry = tile_and_carry
    kc, kn = tile[:nk], tile[nk:2 * nk]
    vc, vn = tile[2 * nk:2 * nk + nv], tile[2 * nk + nv:]
    accs, m_i, l_i = carry
    for ref, spec, first in zip(kc, key_specs, k_first):
      _dequantize_into(ref, spec, k_pool, first, mode, interpret)
    plgpu.commit_smem()

    def scores(*acc_refs):
      for spec, first, acc_ref in zip(key_specs, k_first, acc_refs):
        for j in range(_groups(spec)):
          plgpu.wgmma(acc_ref, q_smem.at[first + j],
                      k_pool.at[first + j].transpose((1, 0)))
      # The values are dequantized while the tensor cores score the keys.
      for ref, spec, first in zip(vc, value_specs, v_first):
        _dequantize_into(ref, spec, v_pool, first, mode, interpret)
      plgpu.commit_smem()
      return [acc_ref[...] for acc_ref in acc_refs]

    raw = pl.run_scoped(scores, *[plgpu.ACC(shape, jnp.float32)
                                  for _ in key_specs])
    s = None
    for part, norm_ref in zip(raw, kn):
      norm = plgpu.load(norm_ref, layout=_L.WGMMA.reduce(0),
                        optimized=False).astype(jnp.float32)
      part = part * jax.lax.broadcast_in_dim(norm, shape, [1])
      s = part if s is None else s + part
    pos = base + i * ROWS + col
    s = jnp.where((pos < qlen) & (pos <= limit), s, -jnp.inf)
    m_new = jnp.maximum(m_i, jnp.max(s, axis=1))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    alpha = jnp.exp(m_i - m_safe)
    p = jnp.exp(s - jax.lax.broadcast_in_dim(m_safe, shape, [0]))
    l_new = l_i * alpha + jnp.sum(p, axis=1)
    # P (times the value norms, per part) goes through SMEM: wgmma reads
    # its A operand there, which interpret mode also supports.
    for ps, norm_ref in zip(p_smem, vn):
      norm = plgpu.load(norm_ref, layout=_L.WGMMA.reduce(0),
                        optimized=False).astype(jnp.float32)
      ps[0] = (p * jax.lax.broadcast_in_dim(norm, shape, [1])).astype(
          jnp.float16)
    plgpu.commit_smem()
    # Every P·V product is issued before the first is waited for.
    operands = [(ps, v_pool.at[first + j])
                for part_accs, first, ps in zip(accs, v_first, p_smem)
                for j in range(len(part_accs))]

    def values(*acc_refs):
      for acc_ref, (ps, vj) in zip(acc_refs, operands):
        plgpu.wgmma(acc_ref, ps.at[0], vj)
      return [acc_ref[...] for acc_ref in acc_refs]

    updates = iter(pl.run_scoped(values, *[plgpu.ACC((ROWS, GROUP),
                                                     jnp.float32)
                                           for _ in operands]))
    new_accs = tuple(
        tuple(acc * jax.lax.broadcast_in_dim(alpha, acc.shape, [0])
              + next(updates) for acc in part_accs) for part_accs in accs)
    return new_accs, m_new, l_new

  def zeros(shape, layout):
    return plgpu.layout_cast(jnp.zeros(shape, jnp.float32), layout)

  accs = tuple(tuple(zeros((ROWS, GROUP), _L.WGMMA)
                     for _ in range(_groups(s))) for s in value_specs)
  m0 = plgpu.layout_cast(jnp.full((ROWS,), -jnp.inf, jnp.float32),
                         _L.WGMMA.reduce(1))
  l0 = zeros((ROWS,), _L.WGMMA.reduce(1))
  n_tiles = split_len // ROWS
  tile0 = base // ROWS

  in_specs = _tile_specs(key_specs, value_specs, tile0)
  # SMEM is allocated in two scopes that reuse the same bytes: the tile
  # loop's (pipeline buffers, dequantized K and V, P) and the epilogue's
  # (f32 outputs). Less SMEM per program, more programs per SM: the loop
  # is latency-bound, so occupancy is what hides the latency.
  def stream(k_pool, v_pool, *p_smem):
    pipeline = plgpu.emit_pipeline(
        functools.partial(body, k_pool, v_pool, p_smem), grid=(n_tiles,),
        in_specs=in_specs, max_concurrent_steps=stages,
        init_carry=(accs, m0, l0))
    return pipeline(*[r.at[b, k] for r in kc_refs + kn_refs + vc_refs
                      + vn_refs])

  accs, m_i, l_i = pl.run_scoped(
      stream, _group_smem(sum(_groups(s) for s in key_specs)),
      _group_smem(sum(_groups(s) for s in value_specs)),
      *[_group_smem(1) for _ in range(nv)])

  _store_outputs(accs, m_i, l_i, o_refs, ml_ref, program)


def _tile_specs(key_specs, value_specs, tile0, rows: int = ROWS,
                tma_row_bytes: int = 16) -> list[plgpu.BlockSpec]:
  """Pipeline blocks of one tile of `rows` tokens: key codes, key norms,
  value codes, value norms (codes as rows of tma_row_bytes where
  `_tma_rows` cut them); tile0 counts tiles of that size."""
  def code_spec(spec):
    return plgpu.BlockSpec(tma_box(rows, _row_bytes(spec), tma_row_bytes),
                           lambda i: (tile0 + i, 0))

  norm_spec = plgpu.BlockSpec((rows,), lambda i: (tile0 + i,))
  return ([code_spec(s) for s in key_specs] + [norm_spec] * len(key_specs)
          + [code_spec(s) for s in value_specs]
          + [norm_spec] * len(value_specs))


def _store_outputs(accs, m_i, l_i, o_refs, ml_ref, program) -> None:
  """Writes the accumulators and (m, l) of one program through SMEM.

  The SMEM is scoped here, after the tile loop's scope has ended, so it
  reuses those bytes. The program waits until its copies have read the
  SMEM, not until their writes have landed: nothing in the kernel reads
  the outputs and the launch's end orders them before the next kernel (on
  the H200 waiting for the writes took the same time to 0.1 µs, session
  17).
  """
  def epilogue(ml_smem, *o_smem):
    for part_accs, smem in zip(accs, o_smem):
      for g, acc in enumerate(part_accs):
        smem[g] = acc
    ml_smem[0] = m_i
    ml_smem[1] = l_i
    plgpu.commit_smem()
    for smem, out in zip(o_smem, o_refs):
      n = smem.shape[0]
      for g in range(n):
        plgpu.copy_smem_to_gmem(smem.at[g], out.at[program * n + g])
    plgpu.copy_smem_to_gmem(ml_smem, ml_ref.at[program])
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  pl.run_scoped(epilogue, plgpu.SMEM((2, m_i.shape[0]), jnp.float32),
                *[plgpu.SMEM((len(part_accs), *part_accs[0].shape),
                             jnp.float32) for part_accs in accs])


def _query_groups(q: jax.Array, rows: int = ROWS) -> jax.Array:
  """f32[B, K, M, Dp] -> f16[B·K·Dp/64, rows, 64], queries past M zero."""
  b, kv, m, d = q.shape
  q = jnp.pad(q, ((0, 0), (0, 0), (0, rows - m), (0, 0)))
  q = q.reshape(b, kv, rows, d // GROUP, GROUP)
  q = jnp.moveaxis(q, 3, 2).reshape(b * kv * (d // GROUP), rows, GROUP)
  return q.astype(jnp.float16)


def fused_attention(inp: parts.KernelInputs, *, splits: int = 8,
                    lookup_mode: str = "poly16", stages: int = STAGES,
                    interpret=None):
  """Runs the kernel: (acc per value part [B,K,NS,M,Dp], m, l [B,K,NS,M])."""
  _check(inp, splits)
  specs, queries, codes, norms = _kernel_specs(inp)
  b, kv, m, _ = inp.q[0].shape
  cap = inp.value_codes[0].shape[2]
  split_len = cap // splits

  programs = b * kv * splits
  out_type = [jax.ShapeDtypeStruct((programs * _groups(s), ROWS, GROUP),
                                   jnp.float32) for s in inp.value_specs]
  out_type.append(jax.ShapeDtypeStruct((programs, 2, ROWS), jnp.float32))
  scratch = [_group_smem(sum(_groups(s) for s in specs)),         # queries
             plgpu.Barrier()]
  kernel = plgpu.kernel(
      functools.partial(_kernel, key_specs=tuple(specs),
                        value_specs=inp.value_specs, groups=inp.groups,
                        split_len=split_len, kv_heads=kv, splits=splits,
                        mode=lookup_mode, interpret=interpret is not None,
                        stages=stages),
      out_type=out_type, scratch_types=scratch, grid=(b, kv, splits),
      grid_names=("b", "k", "s"), interpret=interpret)
  outs = kernel(inp.qlen, inp.qpos_end,
                _query_groups(jnp.concatenate(queries, axis=-1)),
                *map(_tma_rows, codes), *norms,
                *map(_tma_rows, inp.value_codes), *inp.value_norms)
  nv = len(inp.value_specs)
  accs = []
  for o in outs[:nv]:                          # [B·K·NS·Dp/64, 64, 64]
    o = o.reshape(programs, -1, ROWS, GROUP)
    o = jnp.moveaxis(o, 1, 2)[:, :m]           # [B·K·NS, M, Dp/64, 64]
    accs.append(o.reshape(b, kv, splits, m, -1))
  ml = outs[nv][..., :m].reshape(b, kv, splits, 2, m)
  return accs, ml[:, :, :, 0], ml[:, :, :, 1]


LAYOUTS = ("queries", "tokens")


# rotate_in_kernel's default up to this head dim: its f16 rotation tiles
# take 2·D²·2 bytes of SMEM (16 KB at D=64, 64 KB at 128, where they cost
# programs per SM and more time than the XLA rotations they replace).
ROTATE_IN_KERNEL_MAX_DIM = 64


COMBINES = ("rows", "columns")


# overlap_values' default: on up to this many tiles a program (latency
# bound: the value unpacking hides under the score wgmma) or within one
# wave, off above (the key tiles' registers freed first; faster at B = 8
# and 32 on the H200).
OVERLAP_MAX_TILES = 8


@jax.jit(static_argnames=("scale", "splits", "lookup_mode", "layout",
                          "stages", "tile_rows", "key_registers",
                          "transpose_p", "skip_empty_splits", "combine",
                          "rotate_in_kernel", "min_columns", "approx_math",
                          "auto_barriers", "overlap_values", "tma_row_bytes",
                          "values_registers", "merge_narrow",
                          "interpret"))
def _attention(q, cache, lengths, scale, splits, lookup_mode, layout,
               stages, tile_rows, key_registers, transpose_p,
               skip_empty_splits, combine, rotate_in_kernel, min_columns,
               approx_math, auto_barriers, overlap_values, tma_row_bytes,
               values_registers, merge_narrow, interpret):
  # Norms as stored (f16): the kernels convert per tile.
  inp = parts.prepare(q, cache, lengths, scale, norms_as_stored=True)
  if layout == "tokens":
    # pylint: disable-next=g-import-not-at-top (it imports this module)
    from turboquant_jax.kernels.decode_attention import pallas_gpu_tokens
    run = functools.partial(pallas_gpu_tokens.fused_attention,
                            tile_rows=tile_rows, key_registers=key_registers,
                            skip_empty_splits=skip_empty_splits,
                            transpose_p=transpose_p, min_columns=min_columns,
                            approx_math=approx_math,
                            auto_barriers=auto_barriers,
                            tma_row_bytes=tma_row_bytes)
    rotate = None
    if rotate_in_kernel and _rotatable(inp, cache, merge_narrow):
      rotate = _rotate_inputs(q, cache, scale)
    else:
      n = pallas_gpu_tokens.query_columns(inp.q[0].shape[2], min_columns)
      run = functools.partial(run, queries=folded_query_operand(
          q, cache, scale, n, merge_narrow))
    if values_registers is None:     # wherever the kernel can, measured
      measured = pallas_gpu_tokens.VALUES_REGISTERS_DEFAULT
      values_registers = (
          lookup_mode == "prmt" and rotate is None
          and all(spec.dim in measured.get(spec.bits, ())
                  for spec in inp.value_specs)
          and all(pallas_gpu_tokens.registers_parts(inp.value_specs)))
    if overlap_values is None:
      overlap_values = values_registers or default_overlap_values(
          cache, splits, tile_rows)
    run = functools.partial(run, values_registers=values_registers,
                            overlap_values=overlap_values,
                            merge_narrow=merge_narrow)
    if rotate is not None or (combine == "columns" and len(
        inp.value_specs) == 1 and not cache.config.window):
      (acc,), m, l = run(inp, splits=splits, lookup_mode=lookup_mode,
                         stages=stages, interpret=interpret, columns=True,
                         rotate=rotate)
      return parts.finish_columns(acc, m, l, q, cache,
                                  rotated=rotate is not None)
  else:
    run = fused_attention
  acc, m, l = run(inp, splits=splits, lookup_mode=lookup_mode,
                  stages=stages, interpret=interpret)
  return parts.finish(acc, m, l, q, cache, lengths, scale)


def append_splits(cache) -> int:
  """append_attention's default splits: its kernel runs steps of ROWS
  tokens (decode_attention.fuses_append counts tiles by them too)."""
  return default_splits(cache, "tokens", ROWS)


def append_supported(q: jax.Array, cache) -> str | None:
  """None if append_attention can run q [B, T, H, D] over cache, else why
  not."""
  # pylint: disable-next=g-import-not-at-top (it imports this module)
  from turboquant_jax.kernels.quantize_append import pallas_gpu as qa
  return parts.supported(cache) or qa.supported(cache, q.shape[1])


def append_attention(q: jax.Array, k: jax.Array, v: jax.Array, cache, *,
                     scale: float | None = None, splits: int | None = None,
                     stages: int = STAGES,
                     rotate_in_kernel: bool | None = None,
                     auto_barriers: bool = True,
                     tma_row_bytes: int | None = None,
                     merge_narrow: bool | None = None,
                     interpret: bool | None = None):
  """One decode token in one launch: appends k, v [B, K, 1, D] to a
  TurboQuantCache at position cache.lengths[b] and attends q [B, 1, H, D]
  over the cache, that token included. Returns (f32[B, 1, H, D], the
  cache with the token), as turboquant_cache.append and then attention()
  with lengths + 1 would: eagerly a full sequence raises ValueError, under
  jit it drops its token.

  The layout="tokens" kernel with one more program per (sequence, KV
  head): it quantizes the token (quantize_append's quantize_token), writes
  it, and attends to it from its own registers while the other programs
  read the tokens already in HBM (pallas_gpu_tokens.fused_attention's
  `append`). Needs what the append kernel needs (quantize_append.
  supported: mse, integer bits up to 4 or the outlier split of such
  parts, head dim a multiple of 64, no window, sink or 8-bit norms);
  NotImplementedError otherwise. Options as
  in attention(); auto_barriers=False matched the reference on the H200
  (4 shapes: 2.1e-4 to 4.1e-4 of the output scale, every code byte equal
  to XLA's append) but is not yet timed (so on by default here).
  """
  if q.ndim != 4 or q.shape[1] != 1 or k.shape != (
      cache.batch, cache.kv_heads, 1, cache.head_dim) or v.shape != k.shape:
    raise ValueError(f"q {q.shape}, k {k.shape}, v {v.shape}: expected q "
                     f"[B, 1, H, D] and k, v [{cache.batch}, "
                     f"{cache.kv_heads}, 1, {cache.head_dim}]")
  reference.validate(q, cache, cache.lengths)
  reason = append_supported(q, cache)
  if reason:
    raise NotImplementedError(reason)
  common.check_append(cache, k, v)       # eagerly: past capacity raises
  if not isinstance(stages, int) or stages < 1:
    raise ValueError(f"{stages=!r}: expected an int >= 1")
  if tma_row_bytes not in (None, 16, 128):
    raise ValueError(f"{tma_row_bytes=!r}: expected 16 or 128")
  interpret = interpret_params(interpret)
  if splits is None:
    splits = append_splits(cache)
  if rotate_in_kernel is None:
    rotate_in_kernel = default_rotate_in_kernel(q.shape[-1], cache, splits,
                                                ROWS)
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  if merge_narrow is None:
    merge_narrow = MERGE_NARROW_DEFAULT
  return _append_attention(q, k, v, cache, scale, splits, stages,
                           bool(rotate_in_kernel), bool(auto_barriers),
                           tma_row_bytes or TMA_ROW_BYTES,
                           bool(merge_narrow), interpret)


@jax.jit(static_argnames=("scale", "splits", "stages", "rotate_in_kernel",
                          "auto_barriers", "tma_row_bytes", "merge_narrow",
                          "interpret"))
def _append_attention(q, k, v, cache, scale, splits, stages,
                      rotate_in_kernel, auto_barriers, tma_row_bytes,
                      merge_narrow, interpret):
  # pylint: disable-next=g-import-not-at-top (it imports this module)
  from turboquant_jax.kernels.decode_attention import pallas_gpu_tokens
  # pylint: disable-next=g-import-not-at-top (it imports this module)
  from turboquant_jax.kernels.quantize_append import pallas_gpu as qa
  inp = parts.prepare(q, cache, cache.lengths, scale, norms_as_stored=True)
  rotate, queries = None, None
  if rotate_in_kernel and _rotatable(inp, cache, merge_narrow):
    rotate = _rotate_inputs(q, cache, scale)
  else:                  # as attention(): a folded rotation's one product
    queries = folded_query_operand(q, cache, scale,
                                   pallas_gpu_tokens.query_columns(
                                       inp.q[0].shape[2], 8), merge_narrow)
  # One value part, or the kernel's rotation back: the accumulators as the
  # kernel writes them (columns); the outlier split's parts otherwise: as
  # rows, merged by parts.finish.
  columns = len(inp.value_specs) == 1 or rotate is not None
  result, (*arrays, lengths) = pallas_gpu_tokens.fused_attention(
      inp, splits=splits, lookup_mode="prmt", stages=stages,
      key_registers=True, transpose_p=True, skip_empty_splits=True,
      interpret=interpret, columns=columns, rotate=rotate,
      append=(cache, k, v), min_columns=8, auto_barriers=auto_barriers,
      tma_row_bytes=tma_row_bytes, queries=queries,
      merge_narrow=merge_narrow)
  acc, m, l = result
  if columns:
    out = parts.finish_columns(acc[0], m, l, q, cache,
                               rotated=rotate is not None)
  else:
    out = parts.finish(acc, m, l, q, cache, lengths, scale)
  # The kernel's arrays: key codes, key norms, value codes, value norms
  # (one per part each), into the cache's parts.
  nk, nv = len(inp.key_codes), len(inp.value_codes)
  codes = arrays[:nk] + arrays[2 * nk:2 * nk + nv]
  norms = arrays[nk:2 * nk] + arrays[2 * nk + nv:]
  written = [dataclasses.replace(t, codes=c, norms=n) for t, c, n in zip(
      qa.stored_parts(cache), codes, norms)]
  return out, dataclasses.replace(qa.with_stored_parts(cache, written),
                                  lengths=lengths)


def interpret_params(interpret) -> plgpu.InterpretGPUParams | None:
  """A kernel's interpret argument: None runs Mosaic GPU's interpret mode
  off a GPU, True always, False never (or interpret params as given)."""
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  if interpret is True:
    return plgpu.InterpretGPUParams()
  return None if interpret is False else interpret


def folded_query_operand(q: jax.Array, cache, scale: float, n: int,
                         merge_narrow: bool = False) -> jax.Array | None:
  """The tokens kernel's query operand f16[B·K·G, n, 64] for mse keys
  rotated by a split cache's folded rotations at most
  parts.FOLDED_REDUCE_MAX_ROWS query rows (B·M), computed by a product and
  a sum (parts.sums_products), else None (fused_attention then lays out
  parts.prepare's queries itself, by an einsum).

  parts.folded_queries' product and sum, with the queries padded to n
  rows first and the sum written straight into the kernel's layout
  ([b, k, g, n, 64]: the G groups of 64 rotated coordinates, outliers
  first), so that XLA needs no second fusion to pad and transpose it.
  The split at D = 64 (two parts of NARROW) only with merge_narrow: its
  one merged group is the folded product's 64 columns as they are; the
  zero-padded groups are not.
  """
  kq = cache.key_quantizer
  folded = parts.rotation_matrix(kq, cache.key_split_rotation)
  if folded is None or kq.method != "mse":
    return None
  if isinstance(kq, split.SplitQuantizer) and kq.outlier.dim % GROUP and not (
      merge_narrow and kq.outlier.dim == kq.regular.dim == NARROW):
    return None     # (parts of NARROW: fused_attention pads each part)
  b, _, _, d = q.shape
  kv = cache.kv_heads
  qh = parts.grouped_queries(q, kv)                            # [B, K, M, D]
  if not parts.sums_products(qh, folded):
    return None
  qh = jnp.pad(qh, ((0, 0), (0, 0), (0, n - qh.shape[2]), (0, 0)))
  f = folded.reshape(-1, d // GROUP, GROUP, d)           # [K or 1, G, 64, D]
  y = jnp.sum(qh[:, :, None, :, None, :] * f[None, :, :, None], axis=-1)
  return (y * scale).astype(jnp.float16).reshape(b * kv * (d // GROUP), n,
                                                  GROUP)


def _rotatable(inp: parts.KernelInputs, cache, merge_narrow: bool) -> bool:
  """Whether the tokens kernel can rotate queries and outputs itself: mse
  keys, no window, head dim <= 128 (its f16 rotation tiles, D² · 2 bytes,
  share the SMEM), each tensor one part, or with merge_narrow the outlier
  split's two parts of NARROW read as one group (its folded rotation per
  KV head, turboquant_cache.kernel_rotation_tiles)."""
  one_group = lambda specs: len(specs) == 1 or (merge_narrow
                                                and mergeable(specs))
  return (one_group(inp.key_specs) and one_group(inp.value_specs)
          and not any(s.prod for s in inp.key_specs)
          and not cache.config.window and cache.head_dim <= 128)


def _rotate_inputs(q: jax.Array, cache, scale: float) -> tuple:
  """The tokens kernel's `rotate`: the queries grouped and scaled, not
  rotated, and Π_k's and Π_v's f16 tiles ([G², 64, 64] each, or per KV
  head [K, G², 64, 64] for the split's folded rotations): the cache's
  rotation_tiles where its init made them, else laid out here (in a
  decode loop XLA repeats that every step: it does not hoist it, 84 µs a
  SmolLM2 step at B=1)."""
  tiles = cache.rotation_tiles
  if tiles is None:
    tiles = turboquant_cache.kernel_rotation_tiles(
        cache.config, cache.key_quantizer, cache.value_quantizer,
        cache.head_dim)
  return parts.grouped_queries(q, cache.kv_heads) * scale, tiles[0], tiles[1]


def default_splits(cache, layout: str = "tokens",
                   tile_rows: int | None = None) -> int:
  """Sequence splits so that B·K·NS programs fill the GPU's 132 SMs: 2
  programs per SM for layout="queries" (255 registers), 4 for "tokens"
  (v4's 145 registers; at B=8, S=128k 16 splits took 1.68 ms against 1.84
  for 8; v7 held 134, 3 at once, and 16 and 32 splits took 0.723-0.735
  ms against 0.78 for 8; today's 128 registers let 4 run at once, as
  planned), in powers of two; for "tokens" at D >= 128 up to 8 per SM
  (twice the 4 that 128 registers allow; ptxas gives values_registers
  96, room for 5 by registers, occupancy not measured) while splits keep
  SECOND_WAVE_MIN_TOKENS tokens: on the H200 (GPU clock, session 17)
  B=8, S=128k 32 splits took 0.575 ms against 0.590 for 16 at 4 bits,
  0.588 against 0.607 at 3; B=32, 32k 8 splits 0.578 against 0.593 for
  4; session 18, B=8, 32k 32 splits (1024 tokens) 0.125 / 0.166 / 0.164
  ms against 0.129 / 0.169 / 0.166 at 2 / 3 / 4 bits, but shorter splits
  lose: B=8, 16k 32 splits (512 tokens) 0.0781 / 0.100 against 0.0734 /
  0.0955 at 2 / 3 bits (0.0940 against 0.0946 at 4), B=8, 4k 32 splits
  and B=32, 4k 8 splits 3-9% slower at every width but B=32's 4 bits.
  Where that is still less than one program per SM (small B·K), any
  divisor of the capacity's tiles, each split at least MIN_SPLIT_TILES
  tiles long: at B=1, 3 KV heads, D=64, 8192 of 9216 tokens (SmolLM2's
  decode), 48 splits took 30.6 µs a call against 39.9 for 16 and 38.0
  for 144 (results/decode_bench/h200_v8/probes.txt).
  Where B·K <= ONE_WAVE_MAX_HEADS the programs fit one wave (B·K·NS <=
  528), in splits of at least two pipeline steps: at B=1, 8 KV heads,
  D=128 (GPU clock, session 17) 64 splits against 128 took 16k 0.0211 ms
  against 0.0225 at 4 bits, 0.0238 against 0.0247 at 3.5, 0.0212 against
  0.0218 at 2; 32k 0.0300 against 0.0320 at 4 bits; 4k 32 splits against
  64 0.0137 against 0.0144; but 64k 0.0516 against 0.0502 (4 bits).
  tile_rows: the kernel's pipeline step (None: default_steps'), which
  that floor of two steps counts in.
  """
  one_wave = ONE_WAVE_PROGRAMS if layout == "tokens" else 132 * 2
  target_programs = one_wave * (
      2 if layout == "tokens" and cache.head_dim >= 128 else 1)
  programs = cache.batch * cache.kv_heads
  splits = 1
  while (programs * splits < target_programs
         and cache.capacity % (ROWS * splits * 2) == 0
         and (programs * splits < one_wave or cache.capacity // (
             2 * splits) >= SECOND_WAVE_MIN_TOKENS)):
    splits *= 2
  if programs * splits >= 132:
    if programs <= ONE_WAVE_MAX_HEADS:
      rows = tile_rows or (default_steps(cache)[0] if layout == "tokens"
                           else ROWS)
      while splits > 1 and (programs * splits > one_wave
                            or cache.capacity < 2 * rows * splits):
        splits //= 2
    return splits
  tiles = cache.capacity // ROWS
  longer = [n for n in range(splits, tiles + 1)
            if tiles % n == 0 and tiles // n >= MIN_SPLIT_TILES]
  enough = [n for n in longer if programs * n >= target_programs]
  return enough[0] if enough else (longer[-1] if longer else splits)


def default_steps(cache) -> tuple[int, int]:
  """(tile_rows, stages) defaults of layout="tokens" by the cache's widths:
  128-token steps where no part is wider than 2 bits (D <= 128) or D <=
  64, 3 stages where a width is fractional (the outlier split: twice the
  TMAs a step, of smaller boxes), else 64 tokens and STAGES.
  On the H200 (B=8, S=128k,
  32/8 heads, D=128, two interleaved rounds): 2 bits 0.493-0.502 ms with
  128-token steps against 0.515-0.516 (B=32, 32k: 0.490-0.499 against
  0.523), 2.5 bits 0.640-0.660 with 3 stages against 0.684-0.697, 3.5
  bits 0.725-0.735 against 0.738-0.739; 3 and 4 bits were slower with
  either (results/kernel_bench/h200_v10/probes.txt, session 14). At D =
  64 (GPU clock, session 19) 128-token steps took 4 bits B=8, 128k 0.327
  ms against 0.377, B=32, 16k 0.167 against 0.192, B=1, 16k 0.0132
  against 0.0142; 3 bits 0.331 against 0.373 (results/kernel_bench/h200/
  probes.txt).
  """
  widths = (cache.config.key_bits, cache.config.value_bits)
  # A 128-token key tile in registers: 128 of them at D = 256, so not there.
  d = cache.head_dim
  rows = 2 * ROWS if (max(widths) <= 2 and d <= 128) or d <= 64 else ROWS
  stages = 3 if any(w != int(w) for w in widths) else STAGES
  return rows, stages


# At D <= 64 the kernel rotates by default where a program streams at most
# this many tiles; at more, XLA does: the in-kernel rotation costs a few
# percent of a long program (its tiles' SMEM, by Mosaic GPU's estimate one
# program fewer an SM for the outlier split, is not the whole cause: Π_v
# taken into Π_k's SMEM won back about half, session 23). On the
# H200 (32/8 heads, GPU clock), the outlier split (2.5 and 3.5 bits,
# session 22): in the kernel 0.0138 against 0.0193 ms at 2 tiles a program
# (B=1, 16k), 0.0344 against 0.0363 at 8 (B=1, 64k), 0.0977 against
# 0.0993 at 16 (B=8, 32k); but 0.182 against 0.179 at 32 (B=8, 64k), 0.352
# against 0.339 at 64 (B=8, 128k), 1.353 against 1.281 at 256 (B=32,
# 128k). Integer widths (session 23): 4 bits 0.0131 against 0.0160 at 2,
# 0.167 against 0.170 at 32 (B=32, 16k); but 0.326 against 0.323 at 64
# (3 bits 0.330 against 0.327) and 1.266 against 1.234 at 256.
SPLIT_ROTATE_MAX_TILES = 16
ROTATE_MAX_TILES = 32


def default_rotate_in_kernel(dim: int, cache, splits: int,
                             tile_rows: int) -> bool:
  """rotate_in_kernel's default: at head dims up to
  ROTATE_IN_KERNEL_MAX_DIM where a program streams at most
  ROTATE_MAX_TILES tiles of tile_rows tokens (SPLIT_ROTATE_MAX_TILES for
  the outlier split)."""
  if dim > ROTATE_IN_KERNEL_MAX_DIM:
    return False
  split_cache = any(isinstance(x, split.SplitQuantizer)
                    for x in (cache.key_quantizer, cache.value_quantizer))
  limit = SPLIT_ROTATE_MAX_TILES if split_cache else ROTATE_MAX_TILES
  return tiles_per_program(cache, splits, tile_rows) <= limit


def tiles_per_program(cache, splits: int, tile_rows: int = ROWS) -> int:
  """Pipeline steps of tile_rows tokens each program streams over a full
  cache split `splits` ways: what the defaults that pay per program
  (rotation, overlap, the fused append) are chosen by."""
  return cache.capacity // (splits * tile_rows)


def default_overlap_values(cache, splits: int, tile_rows: int = ROWS) -> bool:
  """overlap_values' default for layout="tokens": on where a program
  streams at most OVERLAP_MAX_TILES tiles of `tile_rows` tokens, or where
  the B·K·NS programs fit one wave (4 an SM), which does not need the
  registers that turning it off saves: at B=1, 8 KV heads, D=128, 64
  splits (GPU clock, session 18) on took 64k 0.0492 ms against 0.0515 and
  128k 0.0849 against 0.0894 at 4 bits, the same at 3.5 and 2 bits."""
  programs = cache.batch * cache.kv_heads * splits
  return (tiles_per_program(cache, splits, tile_rows) <= OVERLAP_MAX_TILES
          or programs <= ONE_WAVE_PROGRAMS)


def attention(q: jax.Array, cache, lengths: jax.Array, *,
              scale: float | None = None, splits: int | None = None,
              lookup_mode: str = "prmt", layout: str = "tokens",
              stages: int | None = None, tile_rows: int | None = None,
              key_registers: bool | None = None,
              transpose_p: bool | None = None,
              skip_empty_splits: bool | None = None,
              combine: str = "rows", rotate_in_kernel: bool | None = None,
              min_columns: int | None = None,
              approx_math: bool | None = None,
              auto_barriers: bool | None = None,
              overlap_values: bool | None = None,
              tma_row_bytes: int | None = None,
              values_registers: bool | None = None,
              merge_narrow: bool | None = None,
              interpret: bool | None = None) -> jax.Array:
  """q [B, T, H, D] over a TurboQuantCache -> f32[B, T, H, D].

  Args:
    q: the queries, T new tokens per sequence.
    cache: a TurboQuantCache (others raise NotImplementedError).
    lengths: i32[B] tokens in the cache, the T new ones included.
    scale: the softmax scale (default 1/sqrt(D)).
    splits: sequence splits per (sequence, KV head); the default fills the
      GPU.
    lookup_mode: "prmt" (the default: 2-, 3- and 4-bit parts by byte
      permutes, exact f16 centroids, prmt_lookup.py; other widths as
      poly16), "poly16" (odd polynomial through the codebook, f16; selects
      for b >= 5), "poly" (the polynomial in f32) or "select" (a chain of
      2^b - 1 selects, f32). On the H200 (B=8, S=128k, 16 splits) prmt
      took 1.17-1.30 ms at 4 bits and 1.22-1.28 at 3 against poly16's
      1.66-1.83 and 1.56-1.66 (NOTES.md).
    layout: "tokens" (kernel v4, pallas_gpu_tokens.py: tokens on the wgmma
      rows; the faster on the H200) or "queries" (kernel v3, this module).
    stages: tiles in flight per program. None: STAGES, or for
      layout="tokens" default_steps' (3 for fractional widths).
    tile_rows: tokens per pipeline step, 64, 128 or 256 (layout="tokens";
      capped by the split and by TMA's 256 rows). None: 64, or for
      layout="tokens" default_steps' (128 where no part is wider than 2
      bits or D <= 64). On the H200 (B=8, S=128k, 4 bits, 16 splits,
      kernel v4) 128 took 1.77 ms, within the spread of 64 (1.68-1.84),
      256 2.69 ms (it spills registers).
    key_registers: layout="tokens", GPU only: dequantized keys feed the
      score wgmma from registers, not through SMEM. None: on for "tokens".
    transpose_p: layout="tokens": the probabilities stored through a
      transposed view, so the V tiles keep 128-byte rows. None: on for
      "tokens". Both changed the H200 times by less than their ~±10%
      spread (experiments/probes/decode_kernel_variants.py --v5, --v6).
    skip_empty_splits: layout="tokens": a program whose sequence split
      starts past the sequence's length reads nothing and writes the empty
      softmax state, so a cache filled far below its capacity is not
      streamed whole. None: on for "tokens". On the H200 (B=8, capacity
      128k, 8k tokens live, 4 bits) 0.49-0.51 ms against 1.05-1.21 without
      it (decode_kernel_variants --next).
    combine: how XLA merges the splits' partial results: "rows" (the
      kernel's outputs transposed to [.., M, D] first, parts.finish) or
      "columns" (layout="tokens", one value part, no window: merged as the
      kernel wrote them, [.., D, N], parts.finish_columns). On the H200
      neither was faster beyond the noise (probes.txt below). Ignored
      where the kernel rotates (that merge is always "columns").
    rotate_in_kernel: layout="tokens", one mse key part, one value part,
      no window, D <= 128 (else ignored): the kernel rotates the queries
      (Π_k q) and its outputs (Π_vᵀ) itself on the tensor cores, in f16,
      and the splits merge as with combine="columns": two XLA products
      and a transpose fewer. The outlier split at D = 64 too (merge_narrow:
      one group a tensor, rotated by its folded rotation per KV head,
      the cache's rotation_tiles). None: on for "tokens" at D <= 64
      (ROTATE_IN_KERNEL_MAX_DIM) where a program streams at most
      ROTATE_MAX_TILES tiles, SPLIT_ROTATE_MAX_TILES for that split
      (default_rotate_in_kernel). On the H200 (SmolLM2 decode, 9/3 heads,
      D=64, 8192 tokens) one layer's append + attention took 40.8 µs
      against 48.4 at B=1 (3 bits: 38.7 against 47.4), and 99.2-105.1
      against 103.6-104.4 at B=32; errors against the reference 3.2e-4 to
      8.7e-4 of the output scale (results/decode_bench/h200_v8/
      probes.txt). At D=128 its rotation tiles (64 KB of SMEM) cost
      programs per SM: B=8, 32/8 heads, S=128k, 4 bits 1.002 ms against
      0.874 without (16k: 0.173 against 0.141; results/kernel_bench/
      h200_device_time/).
    min_columns: layout="tokens": 8 gives up to 8 queries per KV head (GQA
      up to 8 in decode) 8 query columns instead of 16: half the scores,
      softmax and accumulators at GQA 4. Needs transpose_p. None: 8 where
      transpose_p is on, else 16.
    approx_math: layout="tokens": the softmax's exp as ex2.approx (Mosaic
      GPU's approx_math). None: on for "tokens".
    auto_barriers: layout="tokens": Mosaic GPU's warpgroup barriers around
      every SMEM store and TMA issue; the kernel's own commit_smem barriers
      already order its tiles (pallas_gpu_tokens.fused_attention). None:
      off for "tokens". With the two options above, on the H200 (B=8,
      32/8 heads, D=128, S=128k, device time) 4 bits took 0.72-0.74 ms
      against 0.88, 2 bits 0.59-0.61 against 0.79: ptxas 133 registers
      against 158, 740 instructions a tile against 907 (NOTES.md,
      session 11).
    overlap_values: layout="tokens": unpack the value tiles while the score
      wgmma runs (True) or after it (False: the key tiles' registers are free
      by then; ptxas 104 registers against 128 at B=8, D=128, 4 bits). None:
      True where values_registers is on (the lookup into registers then runs
      under the score wgmma: B=8, S=128k, 4 bits 0.558 ms against 0.575, 2
      bits 0.416 against 0.438, session 18), else where a program streams at
      most OVERLAP_MAX_TILES tiles or the programs fit one wave
      (default_overlap_values), else False. On the H200 (device time, two
      rounds) False took B=8, S=128k 0.57-0.58 ms against 0.60 at 2 bits,
      0.63-0.64 against 0.65-0.66 at 3, 0.78-0.79 against 0.83 at 3.5, 0.70
      alike at 4; B=8, S=16k, 3.5 bits 0.145-0.154 against 0.163; but B=1,
      S=16k (2 tiles a program) 0.057-0.067 against 0.054-0.055 at 2.5 bits
      and 0.059-0.062 against 0.054 at 3.5, where a program's latency, not the
      SM's throughput, sets the time (NOTES.md, session 12).
    tma_row_bytes: layout="tokens": the TMA row of a tile's codes, 16 (a
      token's packed row as it is, or 16-byte rows where it is not a
      multiple of 16) or 128 (128-byte rows wherever a token's row is
      shorter). None: TMA_ROW_BYTES. A bare pipeline over a 4-bit cache
      (B=8, S=128k) streamed 0.280 ms as 128-byte rows against 0.327 as
      64-byte and 0.525 as 16-byte rows (pipeline_probe, NOTES.md).
    values_registers: layout="tokens", no rotate_in_kernel: each value
      part of 2 or 4 bits and 64, 128 or 256 coordinates or of 3 bits and
      128 or 256 (pallas_gpu_tokens.registers_parts; the outlier
      split's 3-bit part of 64 coordinates stays in SMEM) is read
      transposed (ldmatrix) and looked up into registers as the P·V
      product's operand, not stored to SMEM and read back by the tensor
      cores (pallas_gpu_tokens.fused_attention). None: on where every
      value part is of 2, 3 or 4 bits and 128 or 256 coordinates (one
      part at D = 128 or 256; the outlier split's two at D = 256),
      lookup_mode="prmt" and the kernel not rotating
      (pallas_gpu_tokens.VALUES_REGISTERS_DEFAULT); the rest (the outlier
      split's parts of 64 at D = 128, 2 and 4 bits at D = 64: slower or
      even where timed, session 19) only with True. At 4 bits on the
      H200 (GPU clock, session 17) B=8, S=128k 0.590 ms against
      0.641-0.643, B=32, 32k 0.593-0.595 against 0.647-0.648, B=1, 16k
      0.0230 against 0.0245;
      the same errors against the reference (6.8e-4 of the output scale);
      at 2 and 3 bits (session 18) B=8, 128k 0.438 against 0.457 and, with
      overlap_values, 0.574 against 0.588; at D = 256 (sessions 19-20)
      B=8, 128k 2 bits 0.796 against 0.968, 3.5 bits 1.091 against 1.398,
      3 bits 0.961 against 1.239, 4 bits 1.136 against 1.190.
    merge_narrow: layout="tokens": a tensor of the outlier split at D = 64
      (two parts of 32 coordinates) looked up into one 64-column group,
      each part's centroids times its tokens' norms, instead of one
      zero-padded group per part (half the tensor-core work, one Pᵀ
      store; pallas_gpu_tokens.fused_attention). The norms meet the
      centroids in f16 there: a norm above 65504 (only bf16 or f32
      stored norms hold one) overflows, where False reads it in f32.
      None: MERGE_NARROW_DEFAULT.
    interpret: None uses Mosaic GPU interpret mode when the backend is not
      a GPU.
  """
  reason = parts.supported(cache)
  if reason:
    raise NotImplementedError(reason)
  if lookup_mode not in LOOKUP_MODES:
    raise ValueError(f"{lookup_mode=!r}: expected one of {LOOKUP_MODES}")
  if layout not in LAYOUTS:
    raise ValueError(f"{layout=!r}: expected one of {LAYOUTS}")
  if combine not in COMBINES:
    raise ValueError(f"{combine=!r}: expected one of {COMBINES}")
  if stages is not None and (not isinstance(stages, int) or stages < 1):
    raise ValueError(f"{stages=!r}: expected an int >= 1")
  if tile_rows not in (None, ROWS, 2 * ROWS, 4 * ROWS) or (
      layout == "queries" and tile_rows not in (None, ROWS)):
    raise ValueError(f"{tile_rows=!r}: expected 64, 128 or 256 (64 for "
                     "layout='queries')")
  if layout == "queries" and (values_registers or merge_narrow):
    raise ValueError(f"{values_registers=}, {merge_narrow=}: options of "
                     "layout='tokens' only")
  if layout == "queries" and (key_registers or transpose_p
                              or skip_empty_splits or rotate_in_kernel
                              or min_columns not in (None, 16) or approx_math
                              or auto_barriers is False
                              or overlap_values is False
                              or tma_row_bytes not in (None, 16)):
    raise ValueError(f"{key_registers=}, {transpose_p=}, "
                     f"{skip_empty_splits=}, {rotate_in_kernel=}, "
                     f"{min_columns=}, {approx_math=}, {auto_barriers=}, "
                     f"{overlap_values=}, {tma_row_bytes=}: options of "
                     "layout='tokens' only")
  if tma_row_bytes not in (None, 16, 128):
    raise ValueError(f"{tma_row_bytes=!r}: expected 16 or 128")
  tokens = layout == "tokens"
  steps = default_steps(cache) if tokens else (ROWS, STAGES)
  tile_rows = steps[0] if tile_rows is None else tile_rows
  stages = steps[1] if stages is None else stages
  key_registers = tokens if key_registers is None else key_registers
  transpose_p = tokens if transpose_p is None else transpose_p
  skip_empty_splits = (tokens if skip_empty_splits is None
                       else skip_empty_splits)
  if min_columns is None:
    min_columns = 8 if transpose_p else 16
  approx_math = tokens if approx_math is None else approx_math
  auto_barriers = not tokens if auto_barriers is None else auto_barriers
  interpret = interpret_params(interpret)
  if splits is None:
    splits = default_splits(cache, layout, tile_rows)
  if rotate_in_kernel is None:
    rotate_in_kernel = tokens and default_rotate_in_kernel(
        q.shape[-1], cache, splits, tile_rows)
  if overlap_values is None and not tokens:
    overlap_values = True
  if tma_row_bytes is None:
    tma_row_bytes = TMA_ROW_BYTES if tokens else 16
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  return _attention(q, cache, lengths, scale, splits, lookup_mode, layout,
                    stages, tile_rows, bool(key_registers), bool(transpose_p),
                    bool(skip_empty_splits), combine, bool(rotate_in_kernel),
                    min_columns, bool(approx_math), bool(auto_barriers),
                    None if overlap_values is None else bool(overlap_values),
                    tma_row_bytes,
                    values_registers,
                    MERGE_NARROW_DEFAULT if merge_narrow is None
                    else bool(merge_narrow),
                    interpret)
