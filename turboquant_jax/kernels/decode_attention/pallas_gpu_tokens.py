"""pallas_gpu with layout="tokens": tokens as the wgmma M dimension (v4).

The default kernel (pallas_gpu.py, layout="queries") puts the M = T·G
queries of a GQA group on the 64 rows of every wgmma and pads them: at
G = 4 in decode, 60 of 64 rows of the scores, the softmax and the output
accumulators are padding, and 255 registers per thread leave 2 programs per
SM (NOTES.md). Here the roles swap, per 64-token tile:

  Sᵀ[64 tokens, N] = Σ_groups K_g · Q_gᵀ      (K dequantized into SMEM: A)
  online softmax per query column (max over tokens across the warps; the
    running sum kept per element and reduced once at the end)
  Oᵀ_g[64 coords, N] += V_gᵀ · (Pᵀ · value norms)  (A = the V tile read
    transposed from SMEM, B = Pᵀ written by the threads)

with N = M rounded up to 16 (a B operand of 16-bit elements needs rows of
at least 32 bytes). At G = 4 that is 16 columns instead of 64 rows: a
quarter of the softmax and of the accumulator registers. Everything else
(TMA pipeline, unpacking, centroid lookup, codes viewed from wider TMA
rows, prod keys as sign parts, the XLA work before and after) is
pallas_gpu's.

With `rotate` (pallas_gpu's rotate_in_kernel: possible for one mse key
part, one value part, no window, D <= 128; the default at D <= 64) the
kernel also takes the queries unrotated and the two rotations (f16 64 x 64
tiles, `rotation.as_tiles`, made once by the cache's init, both fetched by
TMA as the program starts, so the loads overlap the queries'): before the
tiles, Q_rotᵀ = Π_k ·
Qᵀ (one wgmma per tile pair, written back into the queries' SMEM); after
them, Oᵀ = Π_vᵀ · Oᵀ_rot, so what it writes is in the original domain and
XLA only merges the splits. At B = 1 that took a SmolLM2 decode layer from
48.4 to 40.8 µs on the H200 (results/decode_bench/h200_v8/probes.txt); at
D = 128 the 64 KB of rotation tiles cost more than they save (B=8, S=128k,
4 bits: 1.002 ms against 0.874, results/kernel_bench/h200_device_time/).

With `append` (pallas_gpu.append_attention: a decode token not yet in the
cache) each (sequence, KV head) gets one more program, which quantizes the
token as the append kernel does (quantize_append.quantize_token), writes
it at position lengths[b] and attends to it alone (row 0 of a tile built
in SMEM), while the others read the tokens before it: one launch a layer
instead of two. On the H200 (SmolLM2, 3 KV heads) +2 to +10% decode
tokens/s at B = 1 to 16, -4 to -5% at B = 32 (results/decode_bench/
h200_v12*, before kernel v7); over long programs it loses (Llama-3.1-8B-
shaped, B = 8, 32k: 13.3 against 11.8 ms a step, results/decode_bench/
h200_llama/; SmolLM2 at B = 16, 9 tiles a program, now -4.4%, h200_v19/
b16/): append_impl="auto" uses it for few sequence-heads over short
programs.

A wgmma reads A and B with one swizzle, so the V tiles are stored with
Pᵀ's (32 bytes for 16 columns, 64 for 32, 128 for 64), unless Pᵀ goes
through a transposed view (transpose_p).

With values_registers (the default where every value part is of 2, 3 or 4
bits and 128 or 256 coordinates; the other parts registers_parts takes only
when asked: slower or even where timed) no V tile goes through SMEM as f16:
the codes' tile is read transposed by ldmatrix (a lane gets tokens t, t + 1
of a byte column, the byte-permute lookup's input as it is) and looked up
straight into the P·V wgmma's register A operand, while the score wgmma runs
where overlap_values is on (by default wherever the values are in
registers); its output coordinates come in value_rows order, which XLA puts
back. On the H200 (session 17) B=8, S=128k, 4 bits 0.590 ms against
0.641-0.643, B=1, 16k 0.0225 against 0.0245 (0.0229 with the lookup after
Pᵀ's store); ptxas 96 registers against 128; with the lookup under the score
wgmma at B=8 too (session 18) 0.558 ms, 2 bits 0.416 against 0.457, 3 bits
0.574 against 0.588 (0.601 in registers without the overlap); at D = 256
(session 19) 2 bits 0.796 against 0.968, 3.5 bits 1.091 against 1.398,
(session 20) 3 bits 0.961 against 1.239, 4 bits 1.136 against 1.190.

Status: the default layout. On the H200 (B=8, S=128k, 4 bits) it took
1.68-1.84 ms against 2.15-2.25 for layout="queries" (145 registers against
255) with the poly16 lookup; with the byte-permute lookup, keys from
registers and the transposed Pᵀ 1.16-1.22 ms, 1.15x cuDNN bf16; with 8
query columns, ex2.approx and no automatic barriers (v7, the defaults
since session 11) 0.73 ms in device time, 1.35x cuDNN bf16 (133 registers,
740 instructions a tile; results/kernel_bench/h200_v7); with no causal
mask for one query token (128 registers: 4 programs per SM) and the
values unpacked after the score product on long splits (overlap_values)
0.70 ms, 1.42x (results/kernel_bench/h200_v8); with the codes moved as
128-byte TMA rows (tma_row_bytes, session 13) 0.695 ms, 1.42x, 3 bits
0.636 ms, 1.55x (results/kernel_bench/h200_v9); with the lookup's
integer work on the FMA pipe where a multiply-add does it and per-width
pipeline steps (session 14) 0.686 ms, 1.43x, 3 bits 1.54x, 2 bits 0.497
ms, 1.98x (results/kernel_bench/h200_v10; session 15's grid, calls
written out and timed on the GPU's clock: 0.654 ms, 1.47x,
results/kernel_bench/h200_v12); with the 4-bit value tile looked up into
the P·V wgmma's registers (values_registers) and 32 splits (session 17)
0.575 ms, 1.67x (results/kernel_bench/h200_v13); looked up under the
score wgmma (session 18) 0.558 ms, 1.67x against a faster cuDNN run
(results/kernel_bench/h200_v14); with the rotations around it as
einsums, the lagged max and the prmt tables kept in registers (sessions
24-26) 0.532 ms, 1.80x (results/kernel_bench/h200; 0.459 ms, 2.09x with
grid codebooks, results/kernel_bench/h200_grid). The pipeline streaming the
same bytes with no work takes 0.33-0.34 ms in device time as a token's
64-byte rows, 0.28 as 128-byte rows (experiments/probes/pipeline_probe.py,
NOTES.md).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
import numpy as np

from turboquant_jax.kernels.decode_attention import pallas_gpu as base
from turboquant_jax.kernels.decode_attention import parts
from turboquant_jax.kernels.decode_attention import prmt_lookup
from turboquant_jax.kernels.quantize_append import pallas_gpu as append_gpu

ROWS, GROUP = base.ROWS, base.GROUP
# values_registers with overlap_values: the value tile is looked up into
# registers while the score wgmma runs (True), or after Pᵀ is stored (False,
# as without overlap_values: fewer registers live through the softmax).
EARLY_VALUE_LOOKUP = True
# The softmax's reference max lags by a tile: a tile's p = exp(s - m) uses
# the running max m of the tiles before it, known to every thread, so no
# cross-warp max stands between the scores and Pᵀ's store. Each warp flags
# (vote, one SMEM word) a p above P_LIMIT, a p times a value norm above
# PV_LIMIT (Pᵀ is f16) or a NaN (the first tile: m = -inf); the flags are
# read after the barrier that Pᵀ's store needs anyway, and a flagged tile
# is redone with its exact max (the old path, its two cross-warp steps).
# False: the exact max in every tile. Any m common to a tile's threads
# gives the same softmax: the split's (m, l) and accumulators all refer
# to it.
LAGGED_MAX = True
P_LIMIT = 2.0 ** 20
PV_LIMIT = 2.0 ** 15
# Widths that keep the exact max with LAGGED_MAX on, where every key and
# value part has one of them: at 2 bits the lagged max measured 1-2%
# slower on the H200 (session 28, B = 8, 128k 0.437 against 0.444-0.445
# ms; B = 32, 32k 0.437-0.440 against 0.446-0.452).
EXACT_MAX_BITS = frozenset({2})


def lagged_max(key_specs, value_specs) -> bool:
  """Whether a kernel over these parts uses the lagged max: LAGGED_MAX,
  unless every part's width is in EXACT_MAX_BITS."""
  return LAGGED_MAX and not all(
      spec.bits in EXACT_MAX_BITS for spec in (*key_specs, *value_specs))


_L = plgpu.Layout


def query_columns(m: int, minimum: int = 16) -> int:
  """N: the M query columns rounded up to a multiple of 16 (at most 64), or
  `minimum` = 8 columns where M <= 8 (a B operand of 16-byte rows: only
  through transpose_p's views, whose rows are 128 bytes)."""
  if minimum == 8 and m <= 8:
    return 8
  return max(16, -(-m // 16) * 16)


def _columns_smem(groups: int, n: int) -> plgpu.SMEM:
  """f16[groups, n, 64]: queries as rows of 64 coordinates (read as Qᵀ)."""
  return plgpu.SMEM((groups, n, GROUP), jnp.float16,
                    transforms=(plgpu.TilingTransform((8, GROUP)),
                                plgpu.SwizzleTransform(128)))


def _swizzle(n: int) -> int:
  """The swizzle of Pᵀ's rows of 2n bytes, and so of the V tiles read with
  it (a wgmma reads A and B with one swizzle)."""
  return min(128, 2 * n)


def step_rows(split_len: int, row_bytes: list[int],
              wanted: int = ROWS, tma_row_bytes: int = 16) -> int:
  """Tokens per pipeline step: `wanted`, or less where the split is
  shorter or a TMA box would pass 256 rows (codes cut into rows of
  tma_row_bytes)."""
  rows = wanted
  while rows > ROWS and (split_len % rows or any(
      base.tma_box(rows, p, tma_row_bytes)[0] > 256 for p in row_bytes)):
    rows //= 2
  return rows


def _p_smem(n: int, rows: int, transpose_p: bool) -> plgpu.SMEM:
  """Pᵀ, the B operand of Vᵀ·Pᵀ: f16[rows tokens, n] (rows of 2n bytes),
  or with transpose_p f16[n, rows tokens] (128-byte swizzle, written and
  read through a transposed view)."""
  if transpose_p:
    return plgpu.SMEM((n, rows), jnp.float16,
                      transforms=(plgpu.TilingTransform((8, GROUP)),
                                  plgpu.SwizzleTransform(128)))
  return plgpu.SMEM((rows, n), jnp.float16,
                    transforms=(plgpu.TilingTransform((8, _swizzle(n) // 2)),
                                plgpu.SwizzleTransform(_swizzle(n))))


def _rotation_smem(groups: int) -> list:
  """Scratch of rotate: f16[2·groups², 64, 64], Π_k's then Π_v's 64 x 64
  tiles (rotation.as_tiles, wgmma's form), and one barrier per tile."""
  return [plgpu.SMEM((2 * groups * groups, GROUP, GROUP), jnp.float16,
                     transforms=(plgpu.TilingTransform((8, GROUP)),
                                 plgpu.SwizzleTransform(128))),
          plgpu.Barrier(num_barriers=2 * groups * groups)]


def _fetch_rotations(key_rot, value_rot, tiles, barriers) -> None:
  """Starts the TMAs of both rotations' tiles (GMEM f16 [G², 64, 64] each,
  or [K, G², 64, 64] per KV head: the program's head's) into tiles
  [2·G², 64, 64]; barriers[t] completes when tile t has landed. Issued
  first thing, so the loads overlap the queries' and the tiles'."""
  count = key_rot.shape[-3]
  for i, rot in enumerate((key_rot, value_rot)):
    if rot.ndim == 4:
      rot = rot.at[jax.lax.axis_index("k")]
    for t in range(count):
      plgpu.copy_gmem_to_smem(rot.at[t], tiles.at[i * count + t],
                              barriers.at[i * count + t])


def _rotation(tiles, barriers, which: int, groups: int):
  """Π_k's (which = 0) or Π_v's (1) tiles, once their TMAs have landed: a
  [G², 64, 64] view."""
  count = groups * groups
  for t in range(count):
    plgpu.barrier_wait(barriers.at[which * count + t])
  return tiles.at[pl.ds(which * count, count)]


def _rotate_columns(tiles, columns, groups: int, n: int,
                    transposed: bool) -> list:
  """Π·X (or Πᵀ·X with `transposed`) for X the [D, n] columns held as
  `columns`[g]: f16 [n, 64] tiles (rows of 64 coordinates). Returns the
  result's 64-coordinate groups, f32 [64, n] each (WGMMA layout)."""
  out = []
  for j in range(groups):
    def product(acc_ref, j=j):
      for i in range(groups):
        tile = (tiles.at[i * groups + j].transpose((1, 0)) if transposed
                else tiles.at[j * groups + i])
        plgpu.wgmma(acc_ref, tile, columns.at[i].transpose((1, 0)))
      return acc_ref[...]
    out.append(pl.run_scoped(product, plgpu.ACC((GROUP, n), jnp.float32)))
  return out


def _rotate_queries(tiles, q_smem, groups: int, n: int) -> None:
  """q_smem (the queries as given, f16 [groups, n, 64]) <- Π_k q (tiles:
  Π_k's, f16 [groups², 64, 64])."""
  rotated = _rotate_columns(tiles, q_smem, groups, n, transposed=False)
  for j, part in enumerate(rotated):     # every product read q_smem
    q_smem.at[j].transpose((1, 0))[...] = part.astype(jnp.float16)
  plgpu.commit_smem()


def _rotate_back(tiles, accs, n: int) -> tuple:
  """Πᵀ·acc for one value part's accumulator groups (f32 [64, n] each;
  tiles: Π_v's, f16 [groups², 64, 64])."""
  groups = len(accs)

  def rotate(columns):
    for i, acc in enumerate(accs):
      columns.at[i].transpose((1, 0))[...] = acc.astype(jnp.float16)
    plgpu.commit_smem()
    return tuple(_rotate_columns(tiles, columns, groups, n,
                                 transposed=True))
  return pl.run_scoped(rotate, _columns_smem(groups, n))


def value_rows(dim: int = 2 * GROUP) -> np.ndarray:
  """values_registers' output order: row r of a value part's accumulators
  holds coordinate value_rows()[r]. Row block b = 4g + w (16 rows: group
  g's rows of warp w) holds coordinate block b, and its row 8h + c holds
  coordinate 2c + h of the block: _transposed_codes gives lane row c a b16
  column, byte columns 2c (h = 0) and 2c + 1 (h = 1) of its warp's chunk,
  and the field that the warp looks up for group g is that block's
  (_registers_lookup)."""
  r = np.arange(dim)
  return 16 * (r // 16) + 2 * (r % 8) + r % 16 // 8


def _to_value_rows(x: jax.Array, axis: int) -> jax.Array:
  """x's coordinates (along `axis`) in value_rows order: in each 16,
  position 8h + c takes coordinate 2c + h."""
  shape = x.shape
  x = x.reshape(*shape[:axis], shape[axis] // 16, 8, 2, *shape[axis + 1:])
  return jnp.swapaxes(x, axis + 1, axis + 2).reshape(shape)


def _from_value_rows(x: jax.Array, axis: int) -> jax.Array:
  """_to_value_rows' inverse."""
  shape = x.shape
  x = x.reshape(*shape[:axis], shape[axis] // 16, 2, 8, *shape[axis + 1:])
  return jnp.swapaxes(x, axis + 1, axis + 2).reshape(shape)


# values_registers' parts, {bits: part dims}: a token's packed row of P bytes is
# C = P / 16 chunks of 16 bytes, each warp reads one of them (the rows of an
# ldmatrix block), or one of each half (C = 8: 4 bits, D = 256), and every
# (chunk, field) pair must fall to one (group, warp): C <= 4 or 8 (3 bits: a
# chunk of each plane, _registers_lookup; at 3 bits and 64 coordinates a token's
# 24 bytes are not 16-byte aligned for ldmatrix). The outlier split's parts (2.5
# and 3.5 bits: 64 coordinates each at D = 128) go to registers where their
# width and dim are here, the others through SMEM. Their default
# (values_registers=None), {bits: head dims}, on where every value part is here:
# the parts measured faster on the H200 (GPU clock, session 18, D = 128: 2 bits
# B=8, 128k 0.438 ms against 0.457, B=32, 32k 0.440 against 0.460, B=1, 16k
# 0.0191 against 0.0211; 3 bits with overlap_values, which it needs there, B=8,
# 128k 0.574 against 0.588, B=8, 16k 0.0926 against 0.0955, B=32, 4k 0.0951
# against 0.0984, B=1, 64k 0.0496 against 0.0536; session 19, D = 256, parts of
# 128: 2 bits B=8, 128k 0.796 against 0.968, B=1, 16k 0.0282 against 0.0325; 3.5
# bits 1.091 against 1.398 and 0.0369 against 0.0401; 2.5 bits B=8, 128k 0.986
# against 1.094; session 20, D = 256: 3 bits B=8, 128k 0.961 against 1.239, B=1,
# 16k 0.0303 against 0.0355; 4 bits 1.136 against 1.190 and 0.0340 against
# 0.0350). Measured slower, so not in it: the outlier split's parts of 64 at D =
# 128 (3.5 bits B=8, 128k 0.678 against 0.672; 2.5 bits 0.600 against 0.594), 4
# bits at D = 64 (B=8, 128k 0.387 against 0.370 without the in-kernel rotation
# it needs off; at B=1, 16k that rotation saves 16-19%).
VALUES_REGISTERS_PARTS = {4: (64, 128, 256), 3: (128, 256), 2: (64, 128, 256)}
VALUES_REGISTERS_DEFAULT = {4: (128, 256), 3: (128, 256), 2: (128, 256)}


def registers_parts(value_specs) -> tuple[bool, ...]:
  """Per value part, whether values_registers looks it up into registers:
  a width and dim of VALUES_REGISTERS_PARTS, centroids the prmt lookup
  supports."""
  return tuple(spec.dim in VALUES_REGISTERS_PARTS.get(spec.bits, ())
               and prmt_lookup.supports(spec.bits, spec.centroids)
               for spec in value_specs)


def values_registers_supported(value_specs, rotate: bool, append) -> str:
  """Why values_registers cannot run on these parts ('' if it can): a
  value part of VALUES_REGISTERS_PARTS' widths and dims with centroids the
  prmt lookup supports (registers_parts), no rotation in the kernel (its
  rotation back reads the natural order), no append."""
  if not any(registers_parts(value_specs)):
    widths = "; ".join(f"{bits} bits and {', '.join(map(str, dims))}"
                       for bits, dims in VALUES_REGISTERS_PARTS.items())
    return (f"a value part of these widths and coordinates ({widths}) "
            "with centroids the prmt lookup supports")
  if rotate or append is not None:
    return "no rotate_in_kernel, no append"
  return ""


def _transposed_codes(code_ref, rows: int, row_bytes: int,
                      chunks: int | None = None,
                      offset: int = 0) -> jax.Array:
  """A value tile (u8 SMEM, a token's row_bytes after the previous
  token's, in whatever TMA rows) as u8 [64, rows] in the WGMMA layout:
  warp w's 16 rows are the bytes offset + 16·(w % C) + (0..15) of each
  row, C = `chunks` (default row_bytes / 16: the whole row); row 16w +
  8h + c is byte 2c + h of that chunk, column token t; each register the
  pair (t, t + 1) of one byte column, the byte-permute lookup's input, so
  the looked-up fields are Vᵀ's A operands as they are. Two tokens' b16
  columns per lane by ldmatrix.x4.trans (8 tokens x 8 b16 columns a
  matrix), then one prmt (0x3120) splits each register into byte column
  2c's pair (low half) and 2c + 1's (high half)."""
  # pylint: disable=g-import-not-at-top (Mosaic GPU internals, device only)
  from jax._src.lib.mlir.dialects import arith
  from jax.experimental.mosaic import gpu as mgpu
  from jax.experimental.mosaic.gpu import utils as mgpu_utils
  out = plgpu.ShapeDtypeStruct((2 * 32, rows), jnp.uint8, layout=_L.WGMMA)

  @plgpu.inline_mgpu(arg_types=(plgpu.RefType(),), return_type=out)
  def load(ctx, ref):
    del ctx
    i16, i32, c, u8x2, address = base.smem_basics(ref)
    lane = arith.andi(mgpu_utils.thread_idx(), c(31))
    warp = _warp_index()
    # Lane l addresses row l % 8 of matrix l // 8 of quad q: token
    # 32q + 8·(l // 8) + l % 8 = 32q + l, chunk w % C.
    chunk = arith.andi(warp, c((chunks or row_bytes // 16) - 1))
    lane_base = arith.addi(address, arith.addi(
        arith.muli(lane, c(row_bytes)),
        arith.addi(arith.muli(chunk, c(16)), c(offset))))
    regs = np.empty(mgpu.WGMMA_LAYOUT.registers_shape((64, rows)), object)
    for quad in range(rows // 32):       # 4 token blocks of 8 an ldmatrix
      addr = arith.addi(lane_base, c(quad * 32 * row_bytes))
      words = mgpu_utils.inline_ptx(
          "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 "
          "{$0, $1, $2, $3}, [$4];", addr, result_types=[i32] * 4)
      for m, word in enumerate(words):
        pairs = mgpu_utils.inline_ptx("prmt.b32 $0, $1, 0, 0x3120;", word,
                                      result_types=i32)
        for half in range(2):
          bits = arith.trunci(i16, arith.shrui(pairs, c(16 * half)))
          regs[0, 4 * quad + m, 0, 0, half, 0, 0, 0, 0] = (
              mgpu_utils.bitcast(bits, u8x2))
    return mgpu.FragmentedArray(_registers=regs, _layout=mgpu.WGMMA_LAYOUT,
                                _is_signed=False)
  return load(code_ref)


def _warp_index():
  """The thread's warp in its warpgroup (0-3): an i32 made inside Mosaic
  GPU, uniform over the warp."""
  # pylint: disable=g-import-not-at-top (Mosaic GPU internals, device only)
  from jax._src.lib.mlir import ir
  from jax._src.lib.mlir.dialects import arith
  from jax.experimental.mosaic.gpu import utils as mgpu_utils
  i32 = ir.IntegerType.get_signless(32)
  return arith.andi(arith.shrui(mgpu_utils.thread_idx(),
                                arith.constant(i32, 5)),
                    arith.constant(i32, 3))


def _warp_field_shift(first_block: int, chunks: int, bits: int = 2):
  """The shift (b·f) of the b-bit field that warp w looks up for the group
  whose first row block is first_block: f = (first_block + w) // chunks
  (value_rows' blocks). An i32, warp-uniform."""
  # pylint: disable=g-import-not-at-top (Mosaic GPU internals, device only)
  from jax._src.lib.mlir import ir
  from jax._src.lib.mlir.dialects import arith
  c = lambda x: arith.constant(ir.IntegerType.get_signless(32), x)
  field = arith.shrui(arith.addi(_warp_index(), c(first_block)),
                      c(chunks.bit_length() - 1))
  return arith.shli(field, c(bits.bit_length() - 1))


def _warp_nibble_shifts(first_block: int, chunks: int) -> list:
  """The shifts of the 4-bit field that warp w looks up for the group
  whose first row block is first_block: s = 4f and 4 - s
  (prmt_lookup.lookup_field4)."""
  # pylint: disable=g-import-not-at-top (Mosaic GPU internals, device only)
  from jax._src.lib.mlir import ir
  from jax._src.lib.mlir.dialects import arith
  shift = _warp_field_shift(first_block, chunks, 4)
  four = arith.constant(ir.IntegerType.get_signless(32), 4)
  return [shift, arith.subi(four, shift)]


def _warp_shifts3(first_block: int, high_chunks: int,
                  low_chunks: int) -> list:
  """The shifts of a 3-bit part's group whose first row block is
  first_block, for warp w: block b = first_block + w, field b // C2 of the
  2-bit plane (C2 = high_chunks) and bit b // C1 of the 1-bit plane (C1 =
  low_chunks); the group G/2 further on is 2 fields and 4 bits further on
  (lookup_two_fields3)."""
  return [_warp_field_shift(first_block, high_chunks),
          _warp_field_shift(first_block, low_chunks, 1)]


def _registers_lookup(code_ref, spec, rows: int) -> list[jax.Array]:
  """values_registers' Vᵀ operands of one value part: per group, f16 [64,
  rows] in the WGMMA layout and value_rows order. Where a row has 4
  chunks (4 bits, D = 128; 2 bits, D = 256) warp w reads chunk w and
  group g is field g of every byte (the whole lookup); where it has 8 (4
  bits, D = 256) warp w reads chunk w of each half, and group g is field
  g // 2 of half g % 2 (block 4g + w: chunk (4g + w) % 8, field (4g + w)
  // 8); with fewer (2 bits, D = 64, 128; 4 bits, D = 64) warps share a
  chunk and each looks up its own field (D: the part's coordinates). At 3
  bits (a 2-bit plane of C2 = D / 64 chunks, then a 1-bit plane of C1 =
  D / 128) warp w reads chunk w % C of each plane: coordinate 16b + e
  (block b = 4g + w) is field b // C2 of byte 16·(b % C2) + e of the one
  and bit b // C1 of byte 16·(b % C1) + e of the other; group g + G/2's
  field and bit are 2 and 4 further on than group g's (G groups), one
  lookup_two_fields3 for both."""
  row_bytes = base._row_bytes(spec)
  if spec.bits == 3:     # the planes' chunks: C2 = D / 64, C1 = D / 128
    c2, c1 = row_bytes * 2 // 3 // 16, row_bytes // 3 // 16
    high = _transposed_codes(code_ref, rows, row_bytes, chunks=c2)
    low = _transposed_codes(code_ref, rows, row_bytes, chunks=c1,
                            offset=row_bytes * 2 // 3)
    half = base._groups(spec) // 2     # group g + half: 2 fields further
    pairs = [prmt_lookup.lookup_two_fields3(
        high, low, spec.centroids,
        functools.partial(_warp_shifts3, 4 * g, c2, c1)) for g in range(half)]
    return [pairs[g % half][g // half] for g in range(2 * half)]
  chunks = row_bytes // 16
  if chunks == 8:      # 4 bits, D = 256: warp w reads chunk w of each half
    halves = [prmt_lookup.lookup_chunks(
        _transposed_codes(code_ref, rows, row_bytes, chunks=4,
                          offset=row_bytes // 2 * i),
        spec.bits, spec.centroids, interpret=False) for i in range(2)]
    return [halves[g % 2][g // 2] for g in range(4)]   # block 4g + w
  codes = _transposed_codes(code_ref, rows, row_bytes)
  if chunks == 4:
    return prmt_lookup.lookup_chunks(codes, spec.bits, spec.centroids,
                                     interpret=False)
  lookup, shifts = ((prmt_lookup.lookup_field4, _warp_nibble_shifts)
                    if spec.bits == 4 else
                    (prmt_lookup.lookup_field, _warp_field_shift))
  return [lookup(codes, spec.centroids,
                 functools.partial(shifts, 4 * g, chunks))
          for g in range(base._groups(spec))]


def _flag_warps(excess: jax.Array, flags, interpret: bool) -> None:
  """flags[w] = 1 where warp w holds an element of `excess` (f32 [rows,
  n], WGMMA layout) above 1 or NaN, else 0: a vote over the warp, one
  store (LAGGED_MAX's flags; to be read after a barrier). In interpret
  mode (no warps) flags[0] is the whole tile's answer, flags[1:] 0."""
  if interpret:
    flags[0] = jnp.any(jnp.logical_not(excess <= 1.0)).astype(jnp.int32)
    for w in range(1, 4):
      flags[w] = jnp.int32(0)
    return
  # pylint: disable=g-import-not-at-top (Mosaic GPU internals, device only)
  from jax._src.lib.mlir import ir
  from jax._src.lib.mlir.dialects import arith
  from jax._src.lib.mlir.dialects import vector
  from jax.experimental.mosaic.gpu import utils as mgpu_utils

  @plgpu.inline_mgpu(arg_types=(_L.WGMMA, plgpu.RefType()))
  def flag(ctx, x, ref):
    del ctx
    _, i32, c, _, address = base.smem_basics(ref)
    f32 = ir.F32Type.get()
    worst = None
    for reg in x.registers.flat:
      for j in range(ir.VectorType(reg.type).shape[0]):
        v = vector.extract(reg, dynamic_position=[], static_position=[j])
        worst = v if worst is None else arith.maximumf(worst, v)
    bad = arith.extui(i32, arith.cmpf(arith.CmpFPredicate.UGT, worst,
                                      arith.constant(f32, 1.0)))
    warp_bad = mgpu_utils.inline_ptx(
        "{\n  .reg .pred p, q;\n  setp.ne.u32 p, $1, 0;\n"
        "  vote.sync.any.pred q, p, 0xffffffff;\n  selp.u32 $0, 1, 0, q;\n  }",
        bad, result_types=i32, convergent=True)
    # Every lane writes the warp's (equal) word.
    mgpu_utils.inline_ptx(
        "st.shared.u32 [$0], $1;",
        arith.addi(address, arith.muli(_warp_index(), c(4))), warp_bad,
        has_side_effects=True)
  flag(excess, flags)


def _zeros(shape: tuple[int, ...]) -> jax.Array:
  """f32 zeros in the WGMMA layout (accumulators, running sums)."""
  return plgpu.layout_cast(jnp.zeros(shape, jnp.float32), _L.WGMMA)


def _empty_state(value_groups: list[int], n: int) -> tuple:
  """The softmax state of no tokens: zero accumulators [64, n] per value
  part group and m = -inf [n] (a WGMMA row vector)."""
  accs = tuple(tuple(_zeros((GROUP, n)) for _ in range(g))
               for g in value_groups)
  m0 = plgpu.layout_cast(jnp.full((n,), -jnp.inf, jnp.float32),
                         _L.WGMMA.reduce(0))
  return accs, m0


def _kernel(lengths_ref, *refs, key_specs, value_specs, groups, split_len,
            kv_heads, splits, mode, interpret, n, rows, stages,
            key_registers, transpose_p, skip_empty_splits, window, tokens,
            rotate, append, overlap_values, tma_row_bytes,
            values_registers, merged=(False, False)):
  nk, nv = len(key_specs), len(value_specs)
  # merged: the keys' (values') two parts of NARROW coordinates as one
  # group (merged_group): one score product (one Pᵀ, one P·V product and
  # one output) instead of one per part.
  merge_keys, merge_values = merged
  lagged = lagged_max(key_specs, value_specs)
  n_scores, n_out = (1 if merge_keys else nk), (1 if merge_values else nv)
  # The value parts read in value_rows order (values_registers), and those
  # of them looked up into registers: on the device (interpret mode sends
  # the same order through SMEM).
  reordered = registers_parts(value_specs) if values_registers else (
      (False,) * nv)
  registers = tuple(r and not interpret for r in reordered)
  # The scratch at the end: with rotate the rotations' tiles and their
  # barriers (one a tile), then the queries' SMEM (all key parts), a
  # barrier.
  scratch_count = 2 + (2 if rotate else 0)
  if rotate:              # Π_k, Π_v tiles (rotation.as_tiles): the queries
    (key_rot, value_rot), refs = refs[:2], refs[2:]   # come unrotated
    rot_tiles, rot_barriers = refs[-scratch_count:-2]
    _fetch_rotations(key_rot, value_rot, rot_tiles, rot_barriers)
  if append:              # the token's k, v, rotation columns, per part
    n_in = 3 + 2 * len(append)          # its thresholds and centroids
    append_in, refs = refs[:n_in], refs[n_in:]
  (kc_refs, kn_refs, vc_refs, vn_refs, o_refs, ml_ref,
   program) = base._program_refs(refs, nk, nv, kv_heads,
                                 splits + bool(append), wait=False,
                                 n_out=n_out)
  q_smem = refs[-2]                  # [groups of all key parts, N, 64]
  # The queries' copy is waited for where they are first read: with
  # rotate right away, else in the first tile's body (after the
  # pipeline has issued its first tiles' copies, so both latencies
  # overlap: a program's start at small batch) or before an empty
  # program's exit (no program leaves with a copy in flight).
  queries_ready = functools.partial(plgpu.barrier_wait, refs[-1])
  if rotate:
    queries_ready()
    groups_k = base._groups(key_specs[0])
    _rotate_queries(_rotation(rot_tiles, rot_barriers, 0, groups_k),
                    q_smem, groups_k, n)
  k_first = [0] if merge_keys else base._offsets(key_specs)
  # The value pool's groups: the parts not in registers, one after another.
  v_groups = [1] if merge_values else [0 if r else base._groups(s)
                                       for s, r in zip(value_specs,
                                                       registers)]
  v_first = list(np.cumsum([0] + v_groups)[:-1])
  b, k = jax.lax.axis_index("b"), jax.lax.axis_index("k")
  split, capacity = jax.lax.axis_index("s"), split_len * splits
  first_pos = split * split_len
  if append:
    # lengths hold the tokens before this one, which goes to position
    # old (dropped when the sequence is full). The splits read the `old`
    # tokens already in HBM; program s = splits appends the new one and
    # attends to it alone, from its own registers (row 0 of a tile).
    old = lengths_ref[b]
    is_new = split == splits
    qlen = jnp.where(is_new, old + 1, jnp.minimum(old, capacity))
    qend = jnp.minimum(old + 1, capacity)
    first_pos = jnp.where(is_new, old, first_pos)
  else:
    # From the lengths as given: no XLA launch to clamp them.
    qlen, qend = parts.positions(lengths_ref[b], capacity, window, tokens)

  shape = (rows, n)                                   # [tokens, queries]
  token = plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=_L.WGMMA)
  limit = None
  if tokens > 1:
    # Query m may see up to qend - 1 + m // G. With one query token every
    # position below qlen (<= qend) is visible: no causal mask to build.
    query = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=_L.WGMMA)
    limit = qend - 1 + query // groups

  def token_norms(norm_ref, dtype, columns: int):
    """A [rows] norm tile in `dtype` broadcast along `columns` columns."""
    norm = plgpu.load(norm_ref, layout=_L.WGMMA.reduce(1),
                      optimized=False).astype(dtype)
    return jax.lax.broadcast_in_dim(norm, (rows, columns), [0])

  def per_token(norm_ref):
    """A [rows] norm tile broadcast along the query columns."""
    return token_norms(norm_ref, jnp.float32, n)

  def per_query(x, rows):
    """An [n] vector broadcast along `rows` rows."""
    return jax.lax.broadcast_in_dim(x, (rows, n), [1])

  def merged_group(code_refs, norm_refs, specs) -> jax.Array:
    """A tensor's two parts of NARROW coordinates as one f16 [rows, 64]
    group (WGMMA layout), each part's centroids times its tokens' norms:
    the split's rotated coordinates in order (outliers first), which one
    product reads against the queries' (or Pᵀ) with no norm to apply."""
    return jnp.concatenate([
        base.narrow_centroids(ref, spec, rows, interpret)
        * token_norms(norm_ref, jnp.float16, base.NARROW)
        for ref, norm_ref, spec in zip(code_refs, norm_refs, specs)], axis=1)

  def body(k_pool, v_pool, p_smem, flag_smem, idx, *tile_and_carry):
    (i,) = idx
    *tile, carry = tile_and_carry
    if not rotate:                    # the first tile reads the queries
      if isinstance(i, int):
        if i == 0:
          queries_ready()
      else:
        pl.when(i == 0)(queries_ready)
    kc, kn = tile[:nk], tile[nk:2 * nk]
    vc, vn = tile[2 * nk:2 * nk + nv], tile[2 * nk + nv:]
    accs, m_i, l_i = carry
    if merge_keys:
      group = merged_group(kc, kn, key_specs)
      if key_registers:
        k_tiles = [[group]]
      else:
        k_pool[0] = group
        plgpu.commit_smem()
        k_tiles = [[k_pool.at[0]]]
    elif key_registers:     # K stays in registers: the wgmma's A operand
      k_tiles = [base.dequantize_groups(ref, spec, mode, interpret)
                 for ref, spec in zip(kc, key_specs)]
    else:
      for ref, spec, first in zip(kc, key_specs, k_first):
        base._dequantize_into(ref, spec, k_pool, first, mode, interpret)
      plgpu.commit_smem()
      k_tiles = [[k_pool.at[first + j] for j in range(base._groups(spec))]
                 for spec, first in zip(key_specs, k_first)]

    def lookup_values() -> list:
      # Per value part in registers, Vᵀ's fields (the P·V wgmma's A
      # operands), looked up from the code tile read transposed: no value
      # tile through SMEM; None for the other parts.
      return [_registers_lookup(ref, spec, rows) if r else None
              for ref, spec, r in zip(vc, value_specs, registers)]

    def unpack_values() -> list | None:
      """The value tiles of the parts not in registers into the value pool
      (a commit_smem to follow), then those in registers as Vᵀ's fields
      if looked up now (else None: after Pᵀ's store)."""
      if merge_values:
        v_pool[0] = merged_group(vc, vn, value_specs)
        return None
      for ref, spec, first, r, order in zip(vc, value_specs, v_first,
                                            registers, reordered):
        if r:
          continue
        if order:             # interpret mode: the same order through SMEM
          groups_v = base.dequantize_groups(ref, spec, mode, interpret)
          whole = _to_value_rows(jnp.concatenate(groups_v, axis=1), 1)
          for g in range(len(groups_v)):
            v_pool[first + g] = whole[:, g * GROUP:(g + 1) * GROUP]
        else:
          base._dequantize_into(ref, spec, v_pool, first, mode, interpret)
      early = any(registers) and overlap_values and EARLY_VALUE_LOOKUP
      return lookup_values() if early else None

    def scores(*acc_refs):
      for tiles, first, acc_ref in zip(k_tiles, k_first, acc_refs):
        for j, k_tile in enumerate(tiles):
          plgpu.wgmma(acc_ref, k_tile,
                      q_smem.at[first + j].transpose((1, 0)))
      fields = None
      if overlap_values:
        # The values are unpacked while the tensor cores score the keys.
        fields = unpack_values()
        if not all(registers):          # (registers need no fence)
          plgpu.commit_smem()
      return [acc_ref[...] for acc_ref in acc_refs], fields

    raw, value_fields = pl.run_scoped(
        scores, *[plgpu.ACC(shape, jnp.float32) for _ in range(n_scores)])
    if not overlap_values:
      # After the score wgmma: the key tiles (registers) are dead by now,
      # and one commit_smem below covers the value and Pᵀ stores.
      unpack_values()
    if merge_keys:                            # the keys carry their norms
      s = raw[0]
    else:
      s = raw[0] * per_token(kn[0])
      for part, norm_ref in zip(raw[1:], kn[1:]):
        s = s + part * per_token(norm_ref)
    pos = first_pos + i * rows + token
    visible = pos < qlen
    if limit is not None:
      visible = visible & (pos <= limit)
    s = jnp.where(visible, s, -jnp.inf)
    if transpose_p:
      p_smem = [ps.transpose((1, 0)) for ps in p_smem]   # [rows, n] views

    def store_p(p) -> list[jax.Array]:
      """Pᵀ (times each value part's norms, unless the values carry them)
      into SMEM as f16; the f32 values stored, per part."""
      pvs = [p] if merge_values else [p * per_token(r) for r in vn]
      for ps, pv in zip(p_smem, pvs):
        ps[...] = pv.astype(jnp.float16)
      return pvs

    def exact_max():
      m_new = jnp.maximum(m_i, jnp.max(s, axis=0))              # [n]
      m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
      alpha = jnp.exp(m_i - m_safe)
      p = jnp.exp(s - per_query(m_safe, rows))
      # The running sum stays per element: one cross-warp sum at the end.
      l_new = l_i * per_query(alpha, rows) + p
      store_p(p)
      plgpu.commit_smem()
      return m_new, alpha, l_new

    if lagged:
      p = jnp.exp(s - per_query(m_i, rows))
      excess = p * (1.0 / P_LIMIT)
      for pv in store_p(p):
        excess = jnp.maximum(excess, pv * (1.0 / PV_LIMIT))
      flags = flag_smem.at[i % 2]    # two slots: no warp overwrites a
      _flag_warps(excess, flags, interpret)   # slot another may still read
      plgpu.commit_smem()
      redo = (flags[0] | flags[1] | flags[2] | flags[3]) != 0
      m_new, alpha, l_new = jax.lax.cond(
          redo, exact_max, lambda: (m_i, jnp.ones_like(m_i), l_i + p))
    else:
      m_new, alpha, l_new = exact_max()
    if any(registers) and value_fields is None:
      value_fields = lookup_values()
    operands = [
        (value_fields[part][j] if registers[part]
         else v_pool.at[first + j].transpose((1, 0)), ps)
        for part, (part_accs, first, ps) in enumerate(zip(accs, v_first,
                                                          p_smem))
        for j in range(len(part_accs))]

    def values(*acc_refs):
      for acc_ref, (vt, ps) in zip(acc_refs, operands):
        plgpu.wgmma(acc_ref, vt, ps)
      return [acc_ref[...] for acc_ref in acc_refs]

    updates = iter(pl.run_scoped(values, *[plgpu.ACC((GROUP, n), jnp.float32)
                                           for _ in operands]))
    new_accs = tuple(
        tuple(acc * per_query(alpha, GROUP) + next(updates)
              for acc in part_accs) for part_accs in accs)
    return new_accs, m_new, l_new

  accs, m0 = _empty_state([1] if merge_values else [
      base._groups(s) for s in value_specs], n)
  n_tiles = split_len // rows
  tile0 = first_pos // rows

  in_specs = base._tile_specs(key_specs, value_specs, tile0, rows,
                              tma_row_bytes)

  def stream(*smem):
    k_pool, v_pool, p_smem, flag_smem = pools(smem)
    pipeline = plgpu.emit_pipeline(
        functools.partial(body, k_pool, v_pool, p_smem, flag_smem),
        grid=(n_tiles,),
        in_specs=in_specs, max_concurrent_steps=stages,
        init_carry=(accs, m0, _zeros(shape)))
    return pipeline(*[r.at[b, k] for r in kc_refs + kn_refs + vc_refs
                      + vn_refs])

  # The dequantized tiles' SMEM: none for keys in registers, nor for
  # values read into registers (on the device).
  k_pool = [] if key_registers else [base._group_smem(
      1 if merge_keys else sum(base._groups(s) for s in key_specs),
      rows=rows)]
  v_pool = [base._group_smem(sum(v_groups),
                             128 if transpose_p else _swizzle(n), rows)
            ] if sum(v_groups) else []

  def scratch():
    """SMEM of the tile body: the pools above, Pᵀ per value part, then
    LAGGED_MAX's warp flags (two slots of 4)."""
    return [*k_pool, *v_pool,
            *[_p_smem(n, rows, transpose_p) for _ in range(n_out)],
            plgpu.SMEM((2, 4), jnp.int32)]

  def pools(smem) -> tuple:
    """scratch()'s refs as (key pool or None, value pool or None, Pᵀs,
    flags)."""
    smem = list(smem)
    key = smem.pop(0) if k_pool else None
    value = smem.pop(0) if v_pool else None
    return key, value, smem[:-1], smem[-1]

  def attend():
    accs_out, m_i, l_i = pl.run_scoped(stream, *scratch())
    # What follows reuses the loop's SMEM: every warp past its last tile
    # first (without auto_barriers nothing else orders that; once a
    # program).
    plgpu.commit_smem()
    if rotate:            # the outputs leave in the original domain
      accs_out = (_rotate_back(
          _rotation(rot_tiles, rot_barriers, 1, groups_k), accs_out[0], n),)
    base._store_outputs(accs_out, m_i, jnp.sum(l_i, axis=0), o_refs,
                        ml_ref, program)

  def empty():
    if not rotate:
      queries_ready()
    if rotate:            # no program leaves with a TMA in flight
      _rotation(rot_tiles, rot_barriers, 1, groups_k)
    base._store_outputs(accs, m0, jnp.sum(_zeros(shape), axis=0), o_refs,
                        ml_ref, program)

  def attend_new():
    """Program s = splits: quantize_token, written at position `old`, then
    attention to that token alone: its codes and norms as row 0 of a tile
    in SMEM (the other rows' norms zero, their scores masked), through the
    same body as every tile."""
    k_new, v_new, columns, *flat = append_in
    dim = append[-1].stop                # the head dim
    norm_refs = (*kn_refs, *vn_refs)
    quantized = pl.run_scoped(
        lambda codes_smem: append_gpu.quantize_token(
            k_new, v_new, columns, list(zip(flat[::2], flat[1::2])),
            codes_smem, b, k, dim=dim, parts=append,
            norm_dtypes=tuple(r.dtype for r in norm_refs)),
        plgpu.SMEM((2, dim), jnp.int32))
    plgpu.commit_smem()     # one_tile's scope reuses codes_smem's bytes
    # Per part (keys', then values'; the outlier split's outlier part
    # first): its bytes, norm, HBM refs and spec.
    written = [(words, norm, code_ref, norm_ref, spec)
               for (words, norm), code_ref, norm_ref, spec in zip(
                   quantized, (*kc_refs, *vc_refs), norm_refs,
                   (*key_specs, *value_specs))]
    appended = old < capacity

    @pl.when(appended)
    def _():
      for words, norm, code_ref, norm_ref, spec in written:
        p = base._row_bytes(spec)
        for i, word in enumerate(words):
          _store_byte(code_ref.at[b, k], old, i, p, word)
        norm_ref[b, k, old] = norm

    @pl.when(k == 0)
    def _():
      # The new lengths: the last output, before the scratch.
      refs[-1 - scratch_count][b] = jnp.minimum(old + 1, capacity)

    def one_tile(*smem):
      head, tile = smem[:-2 * nk - 2 * nv], smem[-2 * nk - 2 * nv:]
      k_pool, v_pool, p_smem, flag_smem = pools(head)
      for (words, norm, _, _, spec), code_t, norm_t in zip(
          written, tile[::2], tile[1::2]):
        p = base._row_bytes(spec)
        for i, word in enumerate(words):
          _store_byte(code_t, 0, i, p, word)
        norm_t[0] = norm
        for r in range(1, rows):      # finite norms: masked rows weigh 0
          norm_t[r] = jnp.zeros((), norm_t.dtype)
      plgpu.commit_smem()
      codes_t, norms_t = tile[::2], tile[1::2]     # body's order below
      return body(k_pool, v_pool, p_smem, flag_smem, (0,), *codes_t[:nk],
                  *norms_t[:nk], *codes_t[nk:], *norms_t[nk:],
                  (accs, m0, _zeros(shape)))

    def attend_one():
      block = lambda spec: base._tile_specs((spec,), (), 0, rows,
                                            tma_row_bytes)[0]
      tile = []
      for spec, norm_ref in zip((*key_specs, *value_specs), norm_refs):
        tile += [plgpu.SMEM(block(spec).block_shape, jnp.uint8),
                 plgpu.SMEM((rows,), norm_ref.dtype)]
      accs_out, m_i, l_i = pl.run_scoped(one_tile, *scratch(), *tile)
      plgpu.commit_smem()   # as in attend(): the epilogue reuses the SMEM
      if rotate:
        accs_out = (_rotate_back(
            _rotation(rot_tiles, rot_barriers, 1, groups_k), accs_out[0],
            n),)
      base._store_outputs(accs_out, m_i, jnp.sum(l_i, axis=0), o_refs,
                          ml_ref, program)

    pl.when(appended)(attend_one)
    pl.when(jnp.logical_not(appended))(empty)

  def splits_part():
    if not skip_empty_splits:
      attend()
      return
    # A split that starts at or past the quantized length has nothing to
    # read: it writes the empty state (m = -inf, l = 0, zero accumulators,
    # which finish() weighs by 0) without streaming its tiles.
    live = first_pos < qlen
    pl.when(live)(attend)
    pl.when(jnp.logical_not(live))(empty)

  if not append:
    splits_part()
    return
  pl.when(is_new)(attend_new)
  pl.when(jnp.logical_not(is_new))(splits_part)


def _store_byte(code_ref, token, i: int, row_bytes: int, word) -> None:
  """Byte i of a token's packed row into code_ref [S, P], or into its
  view as rows of W bytes [S·P/W, W] (`base._tma_rows`)."""
  width = code_ref.shape[-1]
  if width == row_bytes:
    code_ref[token, i] = word.astype(jnp.uint8)
  else:
    flat = token * row_bytes + i
    code_ref[flat // width, flat % width] = word.astype(jnp.uint8)


def fused_attention(inp: parts.KernelInputs, *, splits: int = 8,
                    lookup_mode: str = "poly16", stages: int = base.STAGES,
                    tile_rows: int = ROWS, key_registers: bool = False,
                    transpose_p: bool = False,
                    skip_empty_splits: bool = False, interpret=None,
                    columns: bool = False, rotate=None, append=None,
                    min_columns: int = 16, approx_math: bool = False,
                    auto_barriers: bool = True, overlap_values: bool = True,
                    tma_row_bytes: int = 16, queries=None,
                    values_registers: bool = False,
                    merge_narrow: bool = False):
  """Runs the kernel: (acc per value part [B,K,NS,M,Dp], m, l [B,K,NS,M]),
  or with `columns` as the kernel wrote them: acc [B,K,NS,Dp,N], m, l
  [B,K,NS,N] (all N query columns, no transpose).

  append: None, or (cache, k, v [B, K, 1, D]) for a decode step whose
  token is not in the cache yet (inp.lengths: the tokens before it; mse
  keys, quantize_append.supported; the outlier split too): the kernel also
  quantizes the token and writes it at position lengths[b] (program s =
  NS of each (b, k), quantize_append's quantize_token), and that program
  attends to the token alone, so the outputs hold NS + 1 splits. One
  launch instead of the append kernel's and this one's. Returns
  (the above, (key codes, key norms, value codes, value norms per part,
  lengths) of the cache with the token written).

  rotate: None, or (q f32[B, K, M, D] scaled but not rotated, Π_k's and
  Π_v's f16 [G², 64, 64] tiles from rotation.as_tiles, or [K, G², 64, 64]
  per KV head) for one mse key group and one value group, D <= 128: the
  kernel rotates the queries itself (Π_k q, once per program, on the
  tensor cores in f16) and rotates its accumulators back (Π_vᵀ) before
  writing them, so XLA does neither product. The outlier split at D = 64
  with merge_narrow: each tensor's folded rotation (both parts' channel
  gathers and rotations, turboquant_cache.kernel_rotation_tiles) takes
  the place of Π, and the one value output is D coordinates in order.

  key_registers: the dequantized key tiles feed the score wgmma from
  registers instead of through SMEM (a store and a fence fewer per tile).
  Device only: interpret mode's wgmma takes A from SMEM, so there it is
  ignored. transpose_p: Pᵀ written through a transposed view of P [n,
  rows] with 128-byte rows, so the V tiles keep 128-byte rows too (instead
  of taking Pᵀ's 2n-byte rows). skip_empty_splits: programs whose split
  starts at or past the sequence's quantized length write the empty state
  and read nothing (a cache filled far below its capacity otherwise
  streams every tile of the capacity, masked).

  min_columns: 8 lets M <= 8 queries take 8 query columns instead of 16
  (needs transpose_p): half the score, softmax and accumulator work at
  GQA 4. approx_math: exp as ex2.approx (Mosaic GPU's approx_math; not
  with `append`, whose quantization must equal XLA's bit for bit).
  auto_barriers=False: Mosaic GPU's unsafe_no_auto_barriers (no warpgroup
  barrier around every SMEM store and TMA issue); safe here because every
  tile's reads of its pipeline slot end before the tile's last
  commit_smem (a fence and a barrier), which the next TMA into that slot
  follows, and a commit_smem separates every scope from the next one that
  reuses its bytes (with `append` too: quantize_token orders its own
  codes by one).
  overlap_values=False: the value tiles are unpacked after the score
  wgmma has finished instead of while it runs, so the key tiles held in
  registers for it are dead by then (ptxas on the H200, B=8, D=128, 4
  bits: 104 registers against 128 with the overlap), and one commit_smem
  a tile fewer. pallas_gpu.attention's default takes it where a program
  streams more than OVERLAP_MAX_TILES tiles.
  tma_row_bytes: 16 moves a token's packed row as it is where its bytes
  are a multiple of 16 and as 16-byte rows otherwise; 128 moves every tile
  as 128-byte rows where a token's row is not a multiple of 128
  (`base._tma_rows`: the same bytes, viewed back as [rows, P] in SMEM).
  queries: the kernel's query operand f16[B·K·G, N, 64] (every key part's
  groups, N = query_columns) made by the caller
  (pallas_gpu.folded_query_operand), or None: laid out here from inp.q,
  a part of base.NARROW coordinates (the outlier split at D = 64, with
  lookup_mode="prmt") padded with zeros to one group, as its keys and
  values are looked up (base._narrow_group).
  values_registers: the tile of each value part that can
  (registers_parts: a width and dim of VALUES_REGISTERS_PARTS) is read
  transposed (ldmatrix) and looked up into registers, the P·V wgmma's A
  operand, so no tile of it goes through SMEM; its outputs' coordinates
  come in value_rows order, put back here.
  The other parts (the outlier split's 3-bit part of 64 coordinates)
  still go through SMEM. Interpret mode (whose wgmma takes no register
  operand) sends the same order through SMEM.
  merge_narrow: a tensor split into two parts of base.NARROW coordinates
  (the outlier split at D = 64) is looked up into one 64-column group,
  each part's centroids times its tokens' norms (the kernel's
  merged_group), instead of one zero-padded group per part: keys, one
  score product over unpadded queries; values, one Pᵀ, one P·V product,
  one output (cut into the parts' accumulators here).
  """
  if min_columns not in (8, 16) or (min_columns == 8 and not transpose_p):
    raise ValueError(f"{min_columns=}, {transpose_p=}: expected 16, or 8 "
                     "with transpose_p")
  if append is not None and approx_math:
    raise ValueError("approx_math: not with append")
  if tma_row_bytes not in (16, 128):
    raise ValueError(f"{tma_row_bytes=}: expected 16 or 128")
  base._check(inp, splits, tma_row_bytes, narrow=lookup_mode == "prmt")
  if values_registers:
    reason = values_registers_supported(inp.value_specs, rotate is not None,
                                        append)
    if reason:
      raise ValueError(f"{values_registers=}: needs {reason}")
  specs, q_parts, codes, norms = base._kernel_specs(inp)
  merge_keys = merge_narrow and base.mergeable(specs)
  merge_values = merge_narrow and base.mergeable(inp.value_specs)
  b, kv, m, _ = inp.q[0].shape
  n = query_columns(m, min_columns)
  cap = inp.value_codes[0].shape[2]
  rows = step_rows(cap // splits, [c.shape[-1] for c in codes
                                   + list(inp.value_codes)], tile_rows,
                   tma_row_bytes)
  out_splits = splits + (append is not None)
  programs = b * kv * out_splits
  out_groups = [1] if merge_values else [base._groups(s)
                                         for s in inp.value_specs]
  out_type = [jax.ShapeDtypeStruct((programs * g, GROUP, n), jnp.float32)
              for g in out_groups]
  out_type.append(jax.ShapeDtypeStruct((programs, 2, n), jnp.float32))
  append_in, append_specs, code_arrays = [], None, [
      *[base._tma_rows(c, tma_row_bytes) for c in codes], *norms,
      *[base._tma_rows(c, tma_row_bytes) for c in inp.value_codes],
      *inp.value_norms]
  if append is not None:
    cache, k_new, v_new = append
    append_specs = append_gpu.parts_of(cache)
    append_in = [append_gpu.centered_keys(cache, k_new),
                 v_new[:, :, 0], append_gpu.cache_columns(cache),
                 *[a for pair in append_gpu.part_tables(cache)
                   for a in pair]]
    # Written in place: refs that XLA aliases to the kernel's outputs.
    code_arrays = [jax.new_ref(a) for a in code_arrays]
    out_type.append(jax.ShapeDtypeStruct((b,), jnp.int32))   # new lengths
  key_groups = 1 if merge_keys else sum(base._groups(s) for s in specs)
  scratch = [_columns_smem(key_groups, n), plgpu.Barrier()]
  if rotate is not None:  # Π_k and Π_v tiles, fetched at the start
    groups = base._groups(specs[0])
    scratch = _rotation_smem(groups) + scratch
  kernel = plgpu.kernel(
      functools.partial(_kernel, key_specs=tuple(specs),
                        value_specs=inp.value_specs, groups=inp.groups,
                        split_len=cap // splits, kv_heads=kv, splits=splits,
                        mode=lookup_mode, interpret=interpret is not None,
                        n=n, rows=rows, stages=stages,
                        key_registers=key_registers and interpret is None,
                        transpose_p=transpose_p,
                        skip_empty_splits=skip_empty_splits,
                        window=inp.window, tokens=inp.tokens,
                        rotate=rotate is not None, append=append_specs,
                        overlap_values=overlap_values,
                        tma_row_bytes=tma_row_bytes,
                        values_registers=values_registers,
                        merged=(merge_keys, merge_values)),
      out_type=out_type, scratch_types=scratch,
      grid=(b, kv, out_splits), grid_names=("b", "k", "s"),
      compiler_params=plgpu.CompilerParams(
          approx_math=approx_math,
          unsafe_no_auto_barriers=not auto_barriers),
      interpret=interpret)
  rotations = []
  if rotate is not None:
    q_raw, *rotations = rotate
    q_parts = [q_raw]
  if queries is None:
    queries = base._query_groups(jnp.concatenate(
        q_parts if merge_keys else [_padded_queries(q, s)
                                    for q, s in zip(q_parts, specs)],
        axis=-1), n)
  elif queries.shape != (b * kv * key_groups, n, GROUP):
    raise ValueError(f"queries {queries.shape}: expected "
                     f"[{b * kv} x key groups, {n}, {GROUP}]")
  outs = kernel(inp.lengths, *rotations, *append_in, queries, *code_arrays)
  nv = 1 if merge_values else len(inp.value_specs)
  written = None
  if append is not None:
    stored = [r[...].reshape(a.shape) for r, a in zip(
        code_arrays, [*codes, *norms, *inp.value_codes, *inp.value_norms])]
    written, outs = (*stored, outs[-1]), outs[:-1]
  result = _split_outputs(outs, nv, (b, kv, out_splits), m, n, columns)
  if merge_values and rotate is None:   # the group holds both parts
    (acc,), m_out, l_out = result
    cut = inp.value_specs[0].dim
    result = ([acc[..., :cut, :], acc[..., cut:, :]] if columns
              else [acc[..., :cut], acc[..., cut:]], m_out, l_out)
  elif not merge_values and any(s.dim % GROUP
                                for s in inp.value_specs):   # parts of NARROW
    accs, m_out, l_out = result
    result = ([a[..., :s.dim, :] if columns else a[..., :s.dim]
               for a, s in zip(accs, inp.value_specs)], m_out, l_out)
  if values_registers:    # coordinates back in order
    accs, m_out, l_out = result
    result = ([_from_value_rows(a, 3 if columns else 4) if r else a
               for a, r in zip(accs, registers_parts(inp.value_specs))],
              m_out, l_out)
  return result if written is None else (result, written)


def _padded_queries(q: jax.Array, spec: parts.PartSpec) -> jax.Array:
  """A key part's queries [B, K, M, Dp] with zeros up to its column
  groups' 64·groups coordinates (a part of NARROW: the zero coordinates
  its looked-up keys carry)."""
  pad = GROUP * base._groups(spec) - spec.dim
  return jnp.pad(q, ((0, 0),) * 3 + ((0, pad),)) if pad else q


def _split_outputs(outs, nv: int, grid: tuple[int, int, int], m: int,
                   n: int, columns: bool):
  """The kernel's outputs as (acc per value part, m, l): [B,K,NS,M,Dp] and
  [B,K,NS,M], or with `columns` [B,K,NS,Dp,N] and [B,K,NS,N]."""
  if columns:
    ml = outs[nv].reshape(*grid, 2, n)
    return ([o.reshape(*grid, -1, n) for o in outs[:nv]],
            ml[:, :, :, 0], ml[:, :, :, 1])
  accs = []
  for o in outs[:nv]:                          # [B·K·NS·Dp/64, 64, N]
    o = o.reshape(grid[0] * grid[1] * grid[2], -1, GROUP, n)[..., :m]
    o = jnp.moveaxis(o, 3, 1)                  # [B·K·NS, M, Dp/64, 64]
    accs.append(o.reshape(*grid, m, -1))
  ml = outs[nv][..., :m].reshape(*grid, 2, m)
  return accs, ml[:, :, :, 0], ml[:, :, :, 1]
