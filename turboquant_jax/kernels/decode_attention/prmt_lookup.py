"""Centroid lookup of packed 2- and 4-bit codes by byte permutes (Mosaic GPU).

A byte of a b-bit part (one plane of b bits; packing's layout) holds 8/b
codes: field f of byte j is the code of coordinate j + f·P (P bytes per
row), so field f of a whole [R, P] tile is coordinate chunk f. `prmt` (a
byte permute) picks 4 bytes out of 8 held in two 32-bit operands, which
here are immediates: f16 centroids split into low and high bytes. Per
register pair of the WGMMA layout (2 bytes, one from each of two adjacent
columns) the PTX reads the packed bytes as they are, with no unpacking:

- 2 bits: the 4 centroids' low and high bytes fill the two operands; per
  chunk, 4 integer ops build the selector (x, x+4, y, y+4) of the two
  columns' codes x, y and one prmt gives their f16x2: ~2.5 ops per code.
- 4 bits: the codebook is symmetric (c[15 - n] = -c[n]), so its 8
  non-negative values, as low-byte, high-byte and negated-high-byte
  tables, fit in six immediates; 6 integer ops turn 4 nibbles into
  magnitude indices and signs, 4 prmt look up and merge by sign, 2 prmt
  interleave into two f16x2: ~3 ops per code.

Against ~6 for shift/mask unpacking plus the f16 polynomial (counts of the
instructions written, not timings).
The PTX runs only on a GPU; in interpret mode `lookup_fields` computes the
same f16 values with jnp (the device probe matched the 4-bit one bit for
bit: experiments/probes/mosaic_gpu_probe.py --prmt).
"""

import jax
import jax.numpy as jnp
from jax.experimental.pallas import mosaic_gpu as plgpu
import numpy as np

BITS = (2, 4)


def supports(bits: int, centroids: tuple[float, ...]) -> bool:
  """Whether a part of `bits` bits with `centroids` has a prmt lookup."""
  c = np.asarray(centroids, np.float16)
  if bits == 2:
    return c.shape == (4,)
  return bits == 4 and c.shape == (16,) and bool(np.all(c[8:] == -c[7::-1]))


def _words(table_bytes: list[int]) -> list[str]:
  """Bytes as 32-bit PTX immediates, 4 a word, little-endian."""
  words = [sum(x << (8 * i) for i, x in enumerate(table_bytes[o:o + 4]))
           for o in range(0, len(table_bytes), 4)]
  return [f"0x{w:08X}" for w in words]


def ptx(bits: int, centroids: tuple[float, ...]) -> str:
  """The PTX of one register pair. Input: the last operand, a u32 whose
  low 16 bits are two bytes (columns j, j+1). Outputs $0.. : one f16x2 a
  chunk (field), holding columns (j, j+1)."""
  if bits == 2:
    h = np.asarray(centroids, np.float16).view(np.uint16).astype(int)
    (low,), (high,) = _words([x & 0xFF for x in h]), _words([x >> 8 for x in h])
    lines = []
    for f in range(4):
      # t: code x at bits 0-1, code y at bits 8-9; t·17 | 0x4040 puts
      # x, x+4, y, y+4 in the four selector nibbles.
      lines += [f"shr.b32 t, $4, {2 * f};", "and.b32 t, t, 0x0303;",
                "mul.lo.u32 t, t, 17;", "or.b32 t, t, 0x4040;",
                f"prmt.b32 ${f}, {low}, {high}, t;"]
    return "{\n.reg .b32 t;\n" + "\n".join(lines) + "\n}"
  mags = np.asarray(centroids[8:], np.float16).view(np.uint16).astype(int)
  high = [m >> 8 for m in mags]
  l0, l1 = _words([m & 0xFF for m in mags])
  h0, h1 = _words(high)
  n0, n1 = _words([x | 0x80 for x in high])
  # n >= 8 is +c[n] = +mag[n & 7]; n < 8 is -c[15 - n] = -mag[7 - n].
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


def lookup_fields(words: jax.Array, bits: int, centroids: tuple[float, ...],
                  interpret: bool) -> list[jax.Array]:
  """u8 [R, P] in the WGMMA layout -> f16 centroids of field f (bits
  [f·b, (f+1)·b) of every byte) for f < 8/b, each [R, P] in that layout."""
  if interpret:
    table = np.asarray(centroids, np.float16)
    mask = (1 << bits) - 1
    out = []
    for f in range(8 // bits):
      code = (words >> (f * bits)) & mask
      v = jnp.full(words.shape, table[0], jnp.float16)
      for k in range(1, len(table)):
        v = jnp.where(code == k, table[k], v)
      out.append(v)
    return out
  return _device_lookup(words, ptx(bits, centroids), 8 // bits)


def _device_lookup(words, asm, fields):
  # pylint: disable=g-import-not-at-top (Mosaic GPU internals, device only)
  from jax._src.lib.mlir import ir
  from jax._src.lib.mlir.dialects import arith
  from jax.experimental.mosaic import gpu as mgpu
  from jax.experimental.mosaic.gpu import utils as mgpu_utils
  layout = plgpu.Layout.WGMMA
  out = plgpu.ShapeDtypeStruct(words.shape, jnp.float16, layout=layout)

  @plgpu.inline_mgpu(arg_types=(layout,), return_type=(out,) * fields)
  def lookup(ctx, x):
    del ctx
    i16 = ir.IntegerType.get_signless(16)
    i32 = ir.IntegerType.get_signless(32)
    f16x2 = ir.VectorType.get((2,), ir.F16Type.get())
    regs = [np.empty_like(x.registers) for _ in range(fields)]
    for idx, reg in np.ndenumerate(x.registers):   # 2 bytes
      w = arith.extui(i32, mgpu_utils.bitcast(reg, i16))
      results = mgpu_utils.inline_ptx(asm, w, result_types=[i32] * fields)
      for r, value in zip(regs, results):
        r[idx] = mgpu_utils.bitcast(value, f16x2)
    return tuple(mgpu.FragmentedArray(_registers=r, _layout=x.layout,
                                      _is_signed=None) for r in regs)
  return list(lookup(words))
