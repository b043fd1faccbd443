"""Centroid lookup of packed 4-bit codes by byte permutes (Mosaic GPU).

A byte of a 4-bit part holds two codes: the low nibble of coordinate j,
the high nibble of coordinate j + P (P bytes per row; packing's layout).
The codebook is symmetric (c[15 - n] = -c[n]), so its 8 non-negative f16
values, split into low and high bytes, fit in four 32-bit immediates, and
one `prmt` (a byte permute) looks up four codes at once. Per 32-bit word
of 4 codes (two bytes of the WGMMA layout's register pair): 6 integer ops
turn the nibbles into magnitude indices and signs, 4 prmt look up the low
bytes, the high bytes and their negatives and merge them by sign, 2 prmt
interleave them into two f16x2 registers: ~3 ops per code, against ~6 for
unpacking plus the f16 polynomial, and no unpacking at all.

The PTX runs only on a GPU; in interpret mode `lookup_nibbles` computes the
same f16 values with jnp (the device probe matched them bit for bit:
experiments/probes/mosaic_gpu_probe.py --prmt).
"""

import jax
import jax.numpy as jnp
from jax.experimental.pallas import mosaic_gpu as plgpu
import numpy as np


def supports(centroids: tuple[float, ...]) -> bool:
  """Whether `centroids` is a symmetric 16-entry codebook."""
  c = np.asarray(centroids, np.float16)
  return c.shape == (16,) and bool(np.all(c[8:] == -c[7::-1]))


def ptx(centroids: tuple[float, ...]) -> str:
  """$2: u32 with 4 codes in its low nibbles -> $0, $1: f16x2 of nibbles
  (0, 2) and (1, 3). Code n >= 8 is +c[n]; n < 8 is -c[15 - n], so the 8
  magnitudes c[8:] are indexed by n & 7 or 7 - n."""
  mags = np.asarray(centroids[8:], np.float16).view(np.uint16).astype(int)
  low, high = [m & 0xFF for m in mags], [m >> 8 for m in mags]
  neg = [h | 0x80 for h in high]

  def words(b):
    return tuple(f"0x{sum(x << (8 * i) for i, x in enumerate(q)):08X}"
                 for q in (b[:4], b[4:]))
  (l0, l1), (h0, h1), (n0, n1) = words(low), words(high), words(neg)
  return f"""{{
  .reg .b32 t, u, m, lo4, hp4, hn4, hi4, sel;
  shr.b32 t, $2, 3;
  and.b32 t, t, 0x1111;
  xor.b32 u, t, 0x1111;
  mul.lo.u32 m, u, 7;
  xor.b32 m, m, $2;
  and.b32 m, m, 0x7777;
  prmt.b32 lo4, {l0}, {l1}, m;
  prmt.b32 hp4, {h0}, {h1}, m;
  prmt.b32 hn4, {n0}, {n1}, m;
  shl.b32 sel, u, 2;
  or.b32 sel, sel, 0x3210;
  prmt.b32 hi4, hp4, hn4, sel;
  prmt.b32 $0, lo4, hi4, 0x6240;
  prmt.b32 $1, lo4, hi4, 0x7351;
  }}"""


def lookup_nibbles(words: jax.Array, centroids: tuple[float, ...],
                   interpret: bool) -> tuple[jax.Array, jax.Array]:
  """u8 [R, P] in the WGMMA layout -> f16 (centroids[low nibbles],
  centroids[high nibbles]), each [R, P] in the same layout."""
  if interpret:
    table = np.asarray(centroids, np.float16)
    lut = [jnp.full(words.shape, table[0], jnp.float16)] * 2
    codes = (words & 15, words >> 4)
    for k in range(1, 16):
      lut = [jnp.where(c == k, table[k], v) for c, v in zip(codes, lut)]
    return lut[0], lut[1]
  return _device_lookup(words, ptx(centroids))


def _device_lookup(words, asm):
  # pylint: disable=g-import-not-at-top (Mosaic GPU internals, device only)
  from jax._src.lib.mlir import ir
  from jax._src.lib.mlir.dialects import arith
  from jax.experimental.mosaic import gpu as mgpu
  from jax.experimental.mosaic.gpu import utils as mgpu_utils
  layout = plgpu.Layout.WGMMA
  out = plgpu.ShapeDtypeStruct(words.shape, jnp.float16, layout=layout)

  @plgpu.inline_mgpu(arg_types=(layout,), return_type=(out, out))
  def lookup(ctx, x):
    del ctx
    i16 = ir.IntegerType.get_signless(16)
    i32 = ir.IntegerType.get_signless(32)
    f16x2 = ir.VectorType.get((2,), ir.F16Type.get())
    low, high = np.empty_like(x.registers), np.empty_like(x.registers)
    for idx, reg in np.ndenumerate(x.registers):   # 2 bytes = 4 codes
      w = arith.extui(i32, mgpu_utils.bitcast(reg, i16))
      a, b = mgpu_utils.inline_ptx(asm, w, result_types=[i32, i32])
      low[idx] = mgpu_utils.bitcast(a, f16x2)
      high[idx] = mgpu_utils.bitcast(b, f16x2)
    return tuple(mgpu.FragmentedArray(_registers=r, _layout=x.layout,
                                      _is_signed=None) for r in (low, high))
  return lookup(words)
