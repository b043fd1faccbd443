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
  non-negative values, as low-byte and high-byte tables, fit in four
  immediates; 6 integer ops turn 4 nibbles into magnitude indices and
  signs, 2 prmt look up, an OR sets the sign bits and a prmt merges by
  sign, 2 prmt interleave into two f16x2: ~3 ops per code.
  A codebook on a grid (codebook.grid_codebook: step·k, |k| <= 63) is
  looked up as bytes 64 + k instead, 7 bits, so both halves of the table
  take the sign-replicate trick: a prmt selector nibble with bit 3 set
  returns its byte's sign, 0 here, so one prmt gives codes < 8 and zeros,
  one (nibbles ^ 8) codes >= 8 and zeros; an OR joins them, 2 prmt
  interleave each byte with 0x64 (f16 1024 + 64 + k) and one f16x2
  multiply-add per 2 codes gives step·k exactly rounded, the f16
  centroid bit for bit: 8 instructions a 4 codes (2 on the FMA pipe).
  A 3-bit grid codebook likewise: one prmt of the 8 bytes 64 + k instead
  of the low- and high-byte prmt, then the same pairing and multiply-add.

Against ~6 for shift/mask unpacking plus the f16 polynomial (counts of the
instructions written, not timings). The kernel is bound by the integer
(ALU) pipe, which issues prmt, shifts and logic at half the rate of the
FMA pipe, so where a multiply-add can do an ALU instruction's work (bits
that do not overlap add as they OR) the PTX uses one (FMA_PIPE).
The PTX runs only on a GPU; in interpret mode `lookup_chunks` computes the
same f16 values with jnp (the device probe matched the 2- and 4-bit ones
bit for bit: experiments/probes/mosaic_gpu_probe.py --prmt).
"""

import re

import jax
import jax.numpy as jnp
from jax.experimental.pallas import mosaic_gpu as plgpu
import numpy as np

BITS = (2, 3, 4)
# Integer work on the FMA pipe where an IMAD can do it (a multiply-add with
# disjoint bits equals the shifts and ORs it replaces): the ALU pipe,
# which runs prmt, shifts and logic at half the issue rate, is the
# kernel's busiest (Nsight: 56-61%). ptxas 13.5 (sm_90a), ALU
# instructions a register pair: 2 bits 11 for 8 codes (session 12: 15), 4
# bits 8 for 4 codes (10; 9 if VIADD, whose pipe is undocumented, is
# ALU); 3 bits unchanged (ptxas already forms its
# multiply-adds). On the H200 (B=8, S=128k) 2 bits 0.520 ms against
# 0.584, 4 bits 0.677-0.694 against 0.698-0.711. Shifts as the high half
# of a product (IMAD.HI) made 2 bits slower (0.561): not used. False:
# session 12's PTX, for the A/B probe (decode_kernel_variants
# --lookup-pipes).
FMA_PIPE = True


# The grid lookup where a 3- or 4-bit codebook is on a grid (grid_steps);
# False: the general lookups for every codebook (for the A/B probe,
# experiments/probes/lookup_floor.py).
GRID_LOOKUP = True
_GRID_BIAS = 64        # byte = 64 + k, 1..127: the sign bit stays clear

# A prmt's table words as registers held through the kernel (opaque_tables)
# rather than immediates: SASS's PRMT takes one immediate, and ptxas moves
# the other into a register again for every prmt (77 such moves in the
# 761-instruction tile loop at 4 bits, grid codebook, ptxas 13.0); from a
# value ptxas cannot fold it keeps one register instead (708 instructions,
# 96 registers; results/kernel_bench/h200/session26/census*.txt). On the
# H200 2 bits 3% and 3 bits 1-2% faster, 4 bits unchanged (opaque.txt
# there). False: the immediates, as before session 26 (the A/B probe).
OPAQUE_TABLES = True
_PRMT_TABLES = re.compile(            # prmt d, IMM, IMM, register;
    r"(prmt\.b32\s+[^,]+,\s*)(0x[0-9A-Fa-f]+)(\s*,\s*0x[0-9A-Fa-f]+\s*,"
    r"\s*(?!0x)[^,;\s]+\s*;)")


def opaque_tables(asm: str, first: int) -> tuple[str, list[int]]:
  """`asm` with the first table word of each prmt whose two table words are
  immediates (and whose selector is not) replaced by an operand, $first,
  $first + 1, ... (one per distinct word), and those words in order: the
  caller passes them as registers ptxas cannot constant-fold
  (opaque_word_ptx), which it then keeps live instead of re-materializing
  per prmt."""
  words: list[int] = []

  def operand(m: re.Match) -> str:
    word = int(m.group(2), 16)
    if word not in words:
      words.append(word)
    return f"{m.group(1)}${first + words.index(word)}{m.group(3)}"
  return _PRMT_TABLES.sub(operand, asm), words


def opaque_word_ptx(word: int) -> str:
  """PTX of one output, $0 = `word`, or-ed with %tid.x >> 10: 0 in any
  block (at most 1024 threads), which ptxas 13.0 does not fold (it does
  fold >> 31: then the word is a constant again, re-materialized per
  prmt)."""
  return ("{\n  .reg .b32 t;\n  mov.u32 t, %tid.x;\n  shr.u32 t, t, 10;\n"
          f"  or.b32 $0, t, 0x{word:08X};\n  }}")


def grid_steps(centroids) -> tuple[float, tuple[int, ...]] | None:
  """(step, k) where 8 or 16 centroids are step·k with integers |k| <= 63
  and step = m·2^e, m <= 120 in f16's normal range (so step and
  1088·step, the lookup's multiply-add constants, are exact f16); else
  None."""
  c = np.asarray(centroids, np.float64)
  if (c.shape not in ((8,), (16,)) or not np.all(np.isfinite(c))
      or c[-1] <= 0):
    return None
  for top in range(1, 64):
    step = float(c[-1]) / top
    k = np.round(c / step)
    m = np.frexp(step)[0] * 128.0        # the significand, 64 <= m < 128
    if (np.all(c == step * k) and np.all(np.abs(k) <= 63) and m == int(m)
        and int(m) <= 120 and 2.0 ** -14 <= step
        and (1024 + _GRID_BIAS) * step < 65504):
      return step, tuple(int(x) for x in k)
  return None


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


def _tables(values) -> tuple[list[str], list[str]]:
  """The f16 values' low bytes and high bytes as PTX immediates (_words):
  the two prmt tables of a lookup."""
  h = np.asarray(values, np.float16).view(np.uint16).astype(int)
  return _words([x & 0xFF for x in h]), _words([x >> 8 for x in h])


def ptx(bits: int, centroids: tuple[float, ...]) -> str:
  """The PTX of one register pair.

  2 and 4 bits: input (the last operand) a u32 whose low 16 bits are two
  bytes (columns j, j+1) of the plane; outputs $0.. : one f16x2 a field.
  3 bits: inputs $8, $9, $10: bytes of the 2-bit plane's first and second
  half and of the 1-bit plane (columns j, j+1 of each); outputs $0-$3 the
  first half's fields, $4-$7 the second half's.
  """
  if bits == 2:
    lines = []
    for f in range(4):
      lines += _field2(f"${f}", "$4", 2 * f, centroids)
    return "{\n.reg .b32 t;\n" + "\n".join(lines) + "\n}"
  if bits == 3:
    return _ptx3(centroids)
  return _ptx4(centroids)


def _field2(out: str, src: str, shift, centroids) -> list[str]:
  """PTX lines of one 2-bit field: the f16x2 of codes (bits shift,
  shift + 1 of each of src's two low bytes) into `out`, through register
  t. t: code x at bits 0-1, code y at bits 8-9; t·17 | 0x4040 puts x,
  x+4, y, y+4 in the four selector nibbles."""
  (low,), (high,) = _tables(centroids)
  return [f"shr.b32 t, {src}, {shift};", "and.b32 t, t, 0x0303;",
          *(["mad.lo.u32 t, t, 17, 0x4040;"] if FMA_PIPE else
            ["mul.lo.u32 t, t, 17;", "or.b32 t, t, 0x4040;"]),
          f"prmt.b32 {out}, {low}, {high}, t;"]


def _ptx2_field(centroids) -> str:
  """One field of the 2-bit lookup, its shift (2f) a register operand:
  inputs $1 (two bytes in the low 16 bits, as ptx()'s) and $2 (the
  shift); output $0 the field's f16x2."""
  return ("{\n.reg .b32 t;\n" + "\n".join(
      _field2("$0", "$1", "$2", centroids)) + "\n}")


_REGS3 = "lo4, hi4, k4, v0, v1, a, b"


def _lookup3(centroids):
  """(lines to put first, table(sel, out0, out1) -> lines): the 3-bit
  lookup of the 4 codes whose selectors (3 bits each) are `sel`'s
  nibbles, into out0 (codes 0, 2: f16x2) and out1 (codes 1, 3). Exact
  codebooks: low and high bytes by 2 prmt, 2 prmt interleave them. A grid
  codebook (grid_steps): the bytes 64 + k by 1 prmt, then _grid_centroids
  (2 prmt pair them with 0x64, 2 f16x2 multiply-adds)."""
  grid = grid_steps(centroids) if GRID_LOOKUP else None
  if grid is None:
    (l0, l1), (h0, h1) = _tables(centroids)
    return [], lambda sel, out0, out1: [
        f"prmt.b32 lo4, {l0}, {l1}, {sel};",
        f"prmt.b32 hi4, {h0}, {h1}, {sel};",
        f"prmt.b32 {out0}, lo4, hi4, 0x6240;",
        f"prmt.b32 {out1}, lo4, hi4, 0x7351;"]
  step, k = grid
  t0, t1 = _words([_GRID_BIAS + x for x in k])
  return _grid_constants(step), lambda sel, out0, out1: [
      f"prmt.b32 k4, {t0}, {t1}, {sel};", *_grid_centroids(out0, out1)]


def _ptx3_two_fields(centroids) -> str:
  """Two fields of a 3-bit part whose planes come as pairs of tokens (t,
  t + 1) of one byte column each (values_registers' transposed tiles):
  inputs $2 (the 2-bit plane's pair), $3 (the 1-bit plane's), $4 and $5
  their shifts (2f, b: the first field's bits); outputs $0 that field's
  f16x2 (tokens t, t + 1), $1 the field 2 fields (4 bits) further on,
  whose low bit is 4 further on. After the shifts the two fields' 2-bit
  codes sit at bits 4k..4k+1 (k = field, token: (f, t), (f', t), (f,
  t + 1), (f', t + 1)) and their low bits at 4k: one mask each and one
  multiply-add give all four 3-bit selectors (9 instructions for 4 codes
  with the two lookups and two interleaves, as written)."""
  head, table = _lookup3(centroids)
  lines = [*head, "shr.b32 x, $2, $4;", "shr.b32 y, $3, $5;",
           "and.b32 x, x, 0x3333;", "and.b32 y, y, 0x1111;",
           "mad.lo.u32 s, x, 2, y;", *table("s", "$0", "$1")]
  return ("{\n.reg .b32 x, y, s, " + _REGS3 + ";\n" + "\n".join(lines)
          + "\n}")


def _ptx3(centroids, halves: int = 2) -> str:
  """The 3-bit lookup of ptx() (halves=2), or of the first half alone
  (halves=1: inputs $4, the half's bytes, and $5, the 1-bit plane's;
  outputs $0-$3)."""
  head, table = _lookup3(centroids)
  lines = list(head)
  outputs = 4 * halves
  low = f"${outputs + halves}"
  for half in range(halves):
    src = f"${outputs + half}"
    for f in (0, 2):
      # Selector nibbles: code of field f, column j | field f+1, column j |
      # field f, column j+1 | field f+1, column j+1; a code is its 2-bit
      # field (bits 1-2) over the 1-bit plane's bit 2f + half (bit 0).
      out = 4 * half + f
      lines += [
          f"shr.b32 x, {src}, {2 * f};", f"shr.b32 y, {low}, {2 * f + half};",
          "and.b32 s, x, 0x0303;", "shl.b32 s, s, 1;",
          "and.b32 t, x, 0x0C0C;", "shl.b32 t, t, 3;", "or.b32 s, s, t;",
          "and.b32 t, y, 0x0101;", "or.b32 s, s, t;",
          "and.b32 t, y, 0x0404;", "shl.b32 t, t, 2;", "or.b32 s, s, t;",
          *table("s", f"${out}", f"${out + 1}")]
  return ("{\n.reg .b32 x, y, s, t, " + _REGS3 + ";\n" + "\n".join(lines)
          + "\n}")


def _ptx4(centroids) -> str:
  """The 4-bit lookup of ptx(): input $2, outputs $0 (low nibbles) and $1
  (high nibbles)."""
  regs, lines = _lines4("$2", centroids)
  return "{\n  .reg .b32 " + regs + ";\n  " + "\n  ".join(lines) + "\n  }"


def _ptx4_field_pair(centroids) -> str:
  """One 4-bit field of two registers, its shift a register operand: inputs
  $2 and $3 (two bytes each in the low 16 bits, e.g. tokens t, t + 1 of
  two byte columns), $4 the field's shift s (0 or 4) and $5 = 4 - s;
  outputs $0 the field's f16x2 of $2's bytes, $1 of $3's. The field of $2
  goes to the low nibbles of a word, that of $3 to the high ones (a shift
  each and a select by mask), and ptx()'s 4-bit lookup does the four
  codes: 17 instructions for 4 codes as written (ptx(): 12)."""
  regs, lines = _lines4("w", centroids)
  return ("{\n  .reg .b32 a, b, w, " + regs + ";\n  " + "\n  ".join(
      ["shr.b32 a, $2, $4;", "shl.b32 b, $3, $5;", "and.b32 a, a, 0x0F0F;",
       "and.b32 b, b, 0xF0F0;", "or.b32 w, a, b;", *lines]) + "\n  }")


def _lines4(src: str, centroids) -> tuple[str, list[str]]:
  """(register names, PTX lines) of the 4-bit lookup of `src`'s two low
  bytes (4 nibbles) into $0 (the low nibbles' f16x2) and $1 (the high
  ones')."""
  grid = grid_steps(centroids) if GRID_LOOKUP else None
  if grid is not None:
    return _grid_lines4(src, *grid)
  (l0, l1), (h0, h1) = _tables(centroids[8:])     # the magnitudes
  # n >= 8 is +c[n] = +mag[n & 7]; n < 8 is -c[15 - n] = -mag[7 - n]. The
  # negated high bytes are the high bytes with the sign bit set: an OR, not
  # a third table lookup (whose two immediates ptxas moves into a register
  # for every prmt: one prmt and one move fewer per 4 codes). On the H200
  # no faster beyond the noise (B=8, S=128k: 0.742-0.747 ms against
  # 0.738; results/kernel_bench/h200_v7/probes.txt); kept as the simpler.
  if FMA_PIPE:
    # t: each nibble's bit 3. The magnitude index is n ^ 7 where t = 0,
    # n where t = 1: (0x7777 - 7t) ^ n, masked; the sign selector is
    # 0x3210 + 4·(1 - t) = 0x7654 - 4t; the high bytes of the magnitudes
    # are below 0x80, so adding 0x80 to each sets their sign bits. Both
    # multiply-adds run on the FMA pipe (ptxas 13.5: 8 ALU instructions a
    # 4 codes instead of 10, or 9 if the add, a VIADD, issues to the ALU:
    # NVIDIA does not say).
    return "t, m, lo4, hp4, hn4, hi4, sel", [
        f"shr.b32 t, {src}, 3;",
        "and.b32 t, t, 0x1111;",
        "mad.lo.u32 m, t, -7, 0x7777;",
        f"xor.b32 m, m, {src};",
        "and.b32 m, m, 0x7777;",
        f"prmt.b32 lo4, {l0}, {l1}, m;",
        f"prmt.b32 hp4, {h0}, {h1}, m;",
        "add.u32 hn4, hp4, 0x80808080;",
        "mad.lo.u32 sel, t, -4, 0x7654;",
        "prmt.b32 hi4, hp4, hn4, sel;",
        "prmt.b32 $0, lo4, hi4, 0x6240;",
        "prmt.b32 $1, lo4, hi4, 0x7351;"]
  return "t, u, m, lo4, hp4, hn4, hi4, sel", [
      f"shr.b32 t, {src}, 3;",
      "and.b32 t, t, 0x1111;",
      "xor.b32 u, t, 0x1111;",
      "mul.lo.u32 m, u, 7;",
      f"xor.b32 m, m, {src};",
      "and.b32 m, m, 0x7777;",
      f"prmt.b32 lo4, {l0}, {l1}, m;",
      f"prmt.b32 hp4, {h0}, {h1}, m;",
      "or.b32 hn4, hp4, 0x80808080;",
      "shl.b32 sel, u, 2;",
      "or.b32 sel, sel, 0x3210;",
      "prmt.b32 hi4, hp4, hn4, sel;",
      "prmt.b32 $0, lo4, hi4, 0x6240;",
      "prmt.b32 $1, lo4, hi4, 0x7351;"]


def _f16x2(value: float) -> str:
  """value in both halves of a 32-bit PTX immediate."""
  h = int(np.asarray(value, np.float16).view(np.uint16))
  return f"0x{h << 16 | h:08X}"


def _grid_constants(step: float) -> list[str]:
  """PTX lines setting registers a, b to the grid lookup's multiply-add
  constants: step and -(1024 + 64)·step in both f16 halves."""
  return [f"mov.b32 a, {_f16x2(step)};",
          f"mov.b32 b, {_f16x2(-(1024 + _GRID_BIAS) * step)};"]


def _grid_centroids(out0: str, out1: str) -> list[str]:
  """PTX lines from k4's 4 bytes 64 + k to the centroids step·k: bytes 0
  and 2 into out0, 1 and 3 into out1 (f16x2). f16 0x64bb is 1024 + bb;
  times step, plus b: step·k, rounded once."""
  return ["prmt.b32 v0, k4, 0x64646464, 0x4240;",
          "prmt.b32 v1, k4, 0x64646464, 0x4341;",
          f"fma.rn.f16x2 {out0}, v0, a, b;",
          f"fma.rn.f16x2 {out1}, v1, a, b;"]


def _grid_lines4(src: str, step: float, k) -> tuple[str, list[str]]:
  """_lines4 of a grid codebook (grid_steps: centroids step·k)."""
  codes = [_GRID_BIAS + x for x in k]
  (l0, l1), (h0, h1) = _words(codes[:8]), _words(codes[8:])
  return "x, lo4, hi4, k4, v0, v1, a, b", [
      *_grid_constants(step),
      f"xor.b32 x, {src}, 0x8888;",
      f"prmt.b32 lo4, {l0}, {l1}, {src};",
      f"prmt.b32 hi4, {h0}, {h1}, x;",
      "or.b32 k4, lo4, hi4;", *_grid_centroids("$0", "$1")]


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


def lookup_first_half3(plane: jax.Array, low: jax.Array,
                       centroids: tuple[float, ...],
                       interpret: bool) -> list[jax.Array]:
  """A 3-bit tile as one u8 [R, C] tile of 2-bit-plane bytes and one of
  1-bit-plane bytes (WGMMA layout, column j of each meeting) -> the f16
  centroids of its 4 fields in order: field f is the 2-bit field f of
  each byte over bit 2f of the 1-bit byte in its column (lookup_chunks'
  first half alone; a part of 32 coordinates, pallas_gpu._narrow_group)."""
  if interpret:
    return _interpret_lookup([plane, low], 3, centroids, 4)
  return _device_lookup([plane, low], _ptx3(centroids, halves=1), 4)


def lookup_field(words: jax.Array, centroids: tuple[float, ...],
                 shift) -> jax.Array:
  """One field of a 2-bit u8 tile's bytes (WGMMA layout) -> its f16
  centroids, the field chosen per thread: `shift()` builds its shift (2f,
  an i32) inside Mosaic GPU, e.g. from the warp index. Device only."""
  return _device_lookup([words], _ptx2_field(centroids), 1,
                        lambda: [shift()])[0]


def lookup_field4(words: jax.Array, centroids: tuple[float, ...],
                  shifts) -> jax.Array:
  """One field (nibble) of a 4-bit u8 tile's bytes (WGMMA layout) -> its
  f16 centroids, the field chosen per thread: `shifts()` builds its shift
  s (0 or 4) and 4 - s (i32s) inside Mosaic GPU, e.g. from the warp index.
  A thread's registers go to the PTX two at a time (_ptx4_field_pair), any
  two: a thread looks up one field in all of them. Device only."""
  return _device_lookup([words], _ptx4_field_pair(centroids), 2, shifts,
                        pairs=True)[0]


def lookup_two_fields3(high: jax.Array, low: jax.Array,
                       centroids: tuple[float, ...],
                       shifts) -> list[jax.Array]:
  """A 3-bit part's planes as u8 tiles of byte columns (WGMMA layout, each
  register two tokens of one byte: `high` the 2-bit plane's, `low` the
  1-bit plane's) -> the f16 centroids of two fields: the one whose 2-bit
  code and low bit `shifts()` (two i32 made inside Mosaic GPU, e.g. from
  the warp index) bring to bits 0-1 and 0, and the field 2 fields (4
  bits) further on in both planes. Device only."""
  return _device_lookup([high, low], _ptx3_two_fields(centroids), 2,
                        shifts)


def _interpret_lookup(inputs, bits, centroids, fields):
  """The same chunks by jnp selects (interpret mode has no PTX). 3 bits:
  inputs the 2-bit plane's halves (two, or the first alone) then the
  1-bit plane, as _ptx3's."""
  table = np.asarray(centroids, np.float16)

  def select(code):
    v = jnp.full(code.shape, table[0], jnp.float16)
    for k in range(1, len(table)):
      v = jnp.where(code == k, table[k], v)
    return v
  if bits != 3:
    mask = (1 << bits) - 1
    return [select((inputs[0] >> (f * bits)) & mask) for f in range(fields)]
  *halves, low = inputs
  return [select((((plane >> (2 * f)) & 3) << 1) | ((low >> (2 * f + h)) & 1))
          for f in range(fields) for h, plane in enumerate(halves)]


def _device_lookup(inputs, asm, outputs, operands=None, pairs=False):
  """Runs `asm` on every 16-bit register pair of the u8 inputs (WGMMA
  layout), and on `operands()` (i32s made once, inside Mosaic GPU) where
  given: its `outputs` 32-bit results, as f16x2, fill that many f16
  arrays of the inputs' shape (WGMMA layout). pairs=True (one input, two
  outputs): `asm` takes two of the input's registers at a time, in the
  order the thread holds them, and its outputs are theirs, in one array."""
  # pylint: disable=g-import-not-at-top (Mosaic GPU internals, device only)
  from jax._src.lib.mlir import ir
  from jax._src.lib.mlir.dialects import arith
  from jax.experimental.mosaic import gpu as mgpu
  from jax.experimental.mosaic.gpu import utils as mgpu_utils
  layout = plgpu.Layout.WGMMA
  out = plgpu.ShapeDtypeStruct(inputs[0].shape, jnp.float16, layout=layout)

  @plgpu.inline_mgpu(arg_types=(layout,) * len(inputs),
                     return_type=(out,) * (1 if pairs else outputs))
  def lookup(ctx, *xs):
    del ctx
    i16 = ir.IntegerType.get_signless(16)
    i32 = ir.IntegerType.get_signless(32)
    f16x2 = ir.VectorType.get((2,), ir.F16Type.get())
    extra = [] if operands is None else list(operands())
    code = asm
    if OPAQUE_TABLES:
      code, words = opaque_tables(asm, outputs + (2 if pairs else len(xs))
                                  + len(extra))
      extra += [mgpu_utils.inline_ptx(opaque_word_ptx(w), result_types=i32)
                for w in words]
    word = lambda reg: arith.extui(i32, mgpu_utils.bitcast(reg, i16))
    if pairs:
      (x,) = xs
      regs = np.empty_like(x.registers)
      flat_in, flat_out = x.registers.reshape(-1), regs.reshape(-1)
      for i in range(0, flat_in.size, 2):
        results = mgpu_utils.inline_ptx(
            code, word(flat_in[i]), word(flat_in[i + 1]), *extra,
            result_types=[i32] * outputs)
        for j, value in enumerate(results):
          flat_out[i + j] = mgpu_utils.bitcast(value, f16x2)
      regs = [regs]
    else:
      regs = [np.empty_like(xs[0].registers) for _ in range(outputs)]
      for idx, _ in np.ndenumerate(xs[0].registers):  # 2 bytes an input
        results = mgpu_utils.inline_ptx(code, *[word(x.registers[idx])
                                               for x in xs], *extra,
                                        result_types=[i32] * outputs)
        for reg, value in zip(regs, results):
          reg[idx] = mgpu_utils.bitcast(value, f16x2)
    return tuple(mgpu.FragmentedArray(_registers=reg, _layout=xs[0].layout,
                                      _is_signed=None) for reg in regs)
  return list(lookup(*inputs))
