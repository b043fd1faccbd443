"""Centroid lookup of packed 2-, 3- and 4-bit codes by byte permutes.

Mosaic GPU, through inline PTX.

A byte of a b-bit plane (packing's layout) holds 8/b codes: field f of byte
j is the code of coordinate j + f·P (P bytes in the plane's row), so field
f of a whole [R, P] tile is coordinate chunk f. `prmt` (a byte permute)
picks 4 bytes out of 8 held in two 32-bit operands, which here are
immediates: f16 centroids split into low and high bytes. Per register pair
of the WGMMA layout (2 bytes, one from each of two adjacent columns) the
PTX reads the packed bytes as they are, with no unpacking:

- 2 bits: the 4 centroids' low and high bytes fill the two operands; per
  chunk, 4 integer ops build the selector (x, x+4, y, y+4) of the two
  columns' codes x, y and one prmt gives their f16x2: ~2.5 ops per code.
- 3 bits (a 2-bit plane of the high bits, P2 = D/4 bytes, then a 1-bit
  plane of the low bits, P1 = D/8): a prmt index is 3 bits, so the 8
  centroids' low bytes fill one operand pair and their high bytes another.
  The 2-bit plane is read as two halves of P1 columns; column j of either
  half meets column j of the 1-bit plane, whose bit 2f (first half) or
  2f + 1 (second half) is field f's low bit. Per two fields of a register
  pair, ~8 integer ops build the selector of 4 codes, 2 prmt look up their
  low and high bytes and 2 prmt interleave them: ~3 ops per code.
- 4 bits: the codebook is symmetric (c[15 - n] = -c[n]), so its 8
  non-negative values, as low-byte, high-byte and negated-high-byte
  tables, fit in six immediates; 6 integer ops turn 4 nibbles into
  magnitude indices and signs, 4 prmt look up and merge by sign, 2 prmt
  interleave into two f16x2: ~3 ops per code.

Against ~6 for shift/mask unpacking plus the f16 polynomial (counts of the
instructions written, not timings).
The PTX runs only on a GPU; in interpret mode `lookup_chunks` computes the
same f16 values with jnp (the device probe matched the 2- and 4-bit ones
bit for bit: experiments/probes/mosaic_gpu_probe.py --prmt).
"""

import jax
import jax.numpy as jnp
from jax.experimental.pallas import mosaic_gpu as plgpu
import numpy as np

BITS = (2, 3, 4)


def supports(bits: int, centroids: tuple[float, ...]) -> bool:
  """Whether a part of `bits` bits with `centroids` has a prmt lookup."""
  c = np.asarray(centroids, np.float16)
  if bits in (2, 3):
    return c.shape == (1 << bits,)
  return bits == 4 and c.shape == (16,) and bool(np.all(c[8:] == -c[7::-1]))


def _words(table_bytes: list[int]) -> list[str]:
  """Bytes as 32-bit PTX immediates, 4 a word, little-endian."""
  words = [sum(x << (8 * i) for i, x in enumerate(table_bytes[o:o + 4]))
           for o in range(0, len(table_bytes), 4)]
  return [f"0x{w:08X}" for w in words]


def _halves(centroids) -> tuple[list[int], list[int]]:
  """The f16 centroids' low bytes and high bytes."""
  h = np.asarray(centroids, np.float16).view(np.uint16).astype(int)
  return [x & 0xFF for x in h], [x >> 8 for x in h]


def ptx(bits: int, centroids: tuple[float, ...]) -> str:
  """The PTX of one register pair.

  2 and 4 bits: input (the last operand) a u32 whose low 16 bits are two
  bytes (columns j, j+1) of the plane; outputs $0.. : one f16x2 a field.
  3 bits: inputs $8, $9, $10: bytes of the 2-bit plane's first and second
  half and of the 1-bit plane (columns j, j+1 of each); outputs $0-$3 the
  first half's fields, $4-$7 the second half's.
  """
  if bits == 2:
    low, high = _halves(centroids)
    (low,), (high,) = _words(low), _words(high)
    lines = []
    for f in range(4):
      # t: code x at bits 0-1, code y at bits 8-9; t·17 | 0x4040 puts
      # x, x+4, y, y+4 in the four selector nibbles.
      lines += [f"shr.b32 t, $4, {2 * f};", "and.b32 t, t, 0x0303;",
                "mul.lo.u32 t, t, 17;", "or.b32 t, t, 0x4040;",
                f"prmt.b32 ${f}, {low}, {high}, t;"]
    return "{\n.reg .b32 t;\n" + "\n".join(lines) + "\n}"
  if bits == 3:
    return _ptx3(centroids)
  return _ptx4(centroids)


def _ptx3(centroids) -> str:
  low, high = _halves(centroids)
  l0, l1 = _words(low)
  h0, h1 = _words(high)
  lines = []
  for half, src in enumerate(("$8", "$9")):
    for f in (0, 2):
      # Selector nibbles: code of field f, column j | field f+1, column j |
      # field f, column j+1 | field f+1, column j+1; a code is its 2-bit
      # field (bits 1-2) over the 1-bit plane's bit 2f + half (bit 0).
      out = 4 * half + f
      lines += [
          f"shr.b32 x, {src}, {2 * f};", f"shr.b32 y, $10, {2 * f + half};",
          "and.b32 s, x, 0x0303;", "shl.b32 s, s, 1;",
          "and.b32 t, x, 0x0C0C;", "shl.b32 t, t, 3;", "or.b32 s, s, t;",
          "and.b32 t, y, 0x0101;", "or.b32 s, s, t;",
          "and.b32 t, y, 0x0404;", "shl.b32 t, t, 2;", "or.b32 s, s, t;",
          f"prmt.b32 lo4, {l0}, {l1}, s;", f"prmt.b32 hi4, {h0}, {h1}, s;",
          f"prmt.b32 ${out}, lo4, hi4, 0x6240;",
          f"prmt.b32 ${out + 1}, lo4, hi4, 0x7351;"]
  return ("{\n.reg .b32 x, y, s, t, lo4, hi4;\n" + "\n".join(lines)
          + "\n}")


def _ptx4(centroids) -> str:
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


def lookup_chunks(words: jax.Array, bits: int, centroids: tuple[float, ...],
                  interpret: bool) -> list[jax.Array]:
  """A part's u8 [R, P] code tile in the WGMMA layout -> the f16 centroids
  of its coordinate chunks in order (8/b chunks of [R, P] at 2 and 4 bits,
  8 of [R, D/8] at 3), each in that layout."""
  if bits == 3:
    p1 = words.shape[1] // 3
    inputs = [words[:, :p1], words[:, p1:2 * p1], words[:, 2 * p1:]]
  else:
    inputs = [words]
  fields = 8 // bits if bits != 3 else 4     # per input plane (half)
  if interpret:
    return _interpret_lookup(inputs, bits, centroids, fields)
  halves = 2 if bits == 3 else 1
  out = _device_lookup(inputs, ptx(bits, centroids), halves * fields)
  # 3 bits: first-half field f is chunk 2f, second-half field f chunk 2f + 1.
  return out if bits != 3 else [out[h * 4 + f] for f in range(4)
                                for h in range(2)]


def _interpret_lookup(inputs, bits, centroids, fields):
  """The same chunks by jnp selects (interpret mode has no PTX)."""
  table = np.asarray(centroids, np.float16)

  def select(code):
    v = jnp.full(code.shape, table[0], jnp.float16)
    for k in range(1, len(table)):
      v = jnp.where(code == k, table[k], v)
    return v
  if bits != 3:
    mask = (1 << bits) - 1
    return [select((inputs[0] >> (f * bits)) & mask) for f in range(fields)]
  first, second, low = inputs
  return [select((((plane >> (2 * f)) & 3) << 1) | ((low >> (2 * f + h)) & 1))
          for f in range(fields) for h, plane in enumerate((first, second))]


def _device_lookup(inputs, asm, outputs, int8=False):
  """Runs `asm` on every 16-bit register pair of the u8 inputs (WGMMA
  layout), giving `outputs` arrays of 32-bit registers: f16 of the inputs'
  shape (WGMMA layout), or with `int8` int8 of twice the columns
  (WGMMA_8BIT layout: 4 codes per register where the input holds 2 bytes).
  """
  # pylint: disable=g-import-not-at-top (Mosaic GPU internals, device only)
  from jax._src.lib.mlir import ir
  from jax._src.lib.mlir.dialects import arith
  from jax.experimental.mosaic import gpu as mgpu
  from jax.experimental.mosaic.gpu import utils as mgpu_utils
  r, p = inputs[0].shape
  out = (plgpu.ShapeDtypeStruct((r, 2 * p), jnp.int8,
                                layout=plgpu.Layout.WGMMA_8BIT) if int8 else
         plgpu.ShapeDtypeStruct((r, p), jnp.float16,
                                layout=plgpu.Layout.WGMMA))

  @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA,) * len(inputs),
                     return_type=(out,) * outputs)
  def lookup(ctx, *xs):
    del ctx
    i16 = ir.IntegerType.get_signless(16)
    i32 = ir.IntegerType.get_signless(32)
    vector = (ir.VectorType.get((4,), ir.IntegerType.get_signless(8)) if int8
              else ir.VectorType.get((2,), ir.F16Type.get()))
    regs = [np.empty_like(xs[0].registers) for _ in range(outputs)]
    for idx, _ in np.ndenumerate(xs[0].registers):   # 2 bytes of each input
      ws = [arith.extui(i32, mgpu_utils.bitcast(x.registers[idx], i16))
            for x in xs]
      results = mgpu_utils.inline_ptx(asm, *ws, result_types=[i32] * outputs)
      for reg, value in zip(regs, results):
        reg[idx] = mgpu_utils.bitcast(value, vector)
    layout = mgpu.WGMMA_LAYOUT_8BIT if int8 else xs[0].layout
    return tuple(mgpu.FragmentedArray(_registers=reg, _layout=layout,
                                      _is_signed=True if int8 else None)
                 for reg in regs)
  return list(lookup(*inputs))

# ------------------------------------------ 4-bit codes as int8 (tensor cores)
#
# Scores on the int8 tensor cores (the tokens kernel's key_int8 option;
# experiments/probes/mosaic_gpu_probe.py --int8 checks the block alone on
# the device; neither has run on one yet). The 16 centroids are rounded to int8 steps of max|c| / 127 and
# split by sign: a prmt in its sign-replicate mode (selector bit 3 set)
# returns 0x00 for a table byte below 0x80, so one prmt gives the positive
# codes' steps (0 for codes < 8) and one the negative codes' magnitudes (0
# for codes >= 8), 4 codes each from 2 packed bytes as they are: 1 xor and
# 2 prmt per 4 codes (the f16 lookup above: 14). Scores are then
# scale · (G_pos · q - G_neg · q) in int32 on the tensor cores.


def int8_supports(centroids) -> bool:
  """Whether the int8 lookup takes this codebook: 16 entries, the first 8
  <= 0 and the last 8 >= 0 (so the sign is the code's top bit)."""
  c = np.asarray(centroids, np.float64)
  return c.shape == (16,) and not (np.any(c[:8] > 0) or np.any(c[8:] < 0))


def int8_tables(centroids) -> tuple[float, list[int], list[int]]:
  """(scale, positive codes' steps, negative codes' magnitudes) of a
  codebook int8_supports takes."""
  if not int8_supports(centroids):
    raise ValueError("expected 16 centroids, the first 8 <= 0 and the last "
                     f"8 >= 0, got {centroids}")
  c = np.asarray(centroids, np.float64)
  scale = float(np.max(np.abs(c))) / 127
  return (scale, [int(round(x / scale)) for x in c[8:]],
          [int(round(-x / scale)) for x in c[:8]])


def int8_values(centroids) -> np.ndarray:
  """The 16 centroids as the int8 lookup represents them (in steps)."""
  _, pos, mag = int8_tables(centroids)
  return np.array([-m for m in mag] + pos, np.int32)


def int8_ptx(centroids) -> str:
  """PTX: input $2 a u32 whose low 16 bits are two packed bytes (4
  nibbles); output byte k of $0 (positive codes) and $1 (negative codes'
  magnitudes) is nibble k's int8 step."""
  _, pos, mag = int8_tables(centroids)
  p0, p1 = _words(pos)
  m0, m1 = _words(mag)
  return f"""{{
  .reg .b32 t;
  xor.b32 t, $2, 0x8888;
  prmt.b32 $0, {p0}, {p1}, t;
  prmt.b32 $1, {m0}, {m1}, $2;
  }}"""


def int8_chunk(plane_bytes: int) -> int:
  """Code bytes per int8 operand: 64 (128 columns, a 128-byte swizzle) or
  the whole plane if narrower."""
  return min(64, plane_bytes)


def int8_order(plane_bytes: int) -> np.ndarray:
  """Coordinate of each int8 column, chunk after chunk: the lookup of a
  [R, c] slice (bytes hc..hc+c-1, c = int8_chunk) of a 4-bit part's code
  tile in the WGMMA layout yields [R, 2c] in the WGMMA_8BIT layout, column
  16t + 4j + b holding nibble b % 2 of byte hc + 8t + 2j + b // 2, i.e.
  coordinate (that byte) + (b % 2)·P. Queries must be permuted alike."""
  c = int8_chunk(plane_bytes)
  k = np.arange(2 * plane_bytes)
  h, k = k // (2 * c), k % (2 * c)
  t, j, b = k // 16, (k % 16) // 4, k % 4
  return h * c + 8 * t + 2 * j + b // 2 + (b % 2) * plane_bytes


def lookup_int8(words: jax.Array, centroids, interpret: bool) -> tuple:
  """A 4-bit part's u8 [R, P] code tile (WGMMA layout) -> (G_pos, G_neg):
  int8 [R, 2P] (WGMMA_8BIT layout; columns in int8_order)."""
  if interpret:           # selects on scalars (a kernel holds no arrays)
    _, pos, mag = int8_tables(centroids)
    r, p = words.shape
    nib = jnp.stack([words & 15, words >> 4], -1).reshape(r, 2 * p)
    g_pos = jnp.zeros(nib.shape, jnp.int8)
    g_neg = jnp.zeros(nib.shape, jnp.int8)
    for code in range(8):
      g_neg = jnp.where(nib == code, jnp.int8(mag[code]), g_neg)
      g_pos = jnp.where(nib == code + 8, jnp.int8(pos[code]), g_pos)
    return g_pos, g_neg
  return tuple(_device_lookup([words], int8_ptx(centroids), 2, int8=True))

