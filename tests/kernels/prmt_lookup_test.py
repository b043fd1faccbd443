"""The byte-permute lookup: its PTX (both FMA_PIPE variants), run by a
small emulator of the nine instructions it uses, and its interpret-mode
stand-in equal the f16 codebook for every pair of packed bytes, at 2, 3
and 4 bits. (The PTX itself
runs only on a GPU: experiments/probes/mosaic_gpu_probe.py --prmt checks it
there.)"""

import re
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import jax.numpy as jnp
import numpy as np

from turboquant_jax.kernels.decode_attention import prmt_lookup
from turboquant_jax.quant import codebook
from turboquant_jax.quant import packing

_M32 = 0xFFFFFFFF


def _prmt(a: int, b: int, sel: int) -> int:
  """PTX prmt.b32 (default mode): byte k of the result is byte sel[k] & 7
  of the 8 bytes {b, a} (0-3 from a, 4-7 from b), or, where sel[k] has bit
  3 set, that byte's sign bit replicated (0x00 or 0xFF)."""
  pool = [(a >> 8 * i) & 0xFF for i in range(4)] + [
      (b >> 8 * i) & 0xFF for i in range(4)]
  out = 0
  for k in range(4):
    s = (sel >> 4 * k) & 0xF
    byte = pool[s & 7]
    if s & 8:
      byte = 0xFF if byte & 0x80 else 0
    out |= byte << 8 * k
  return out


def _fma_f16x2(a: int, b: int, c: int) -> int:
  """PTX fma.rn.f16x2: per half a·b + c, rounded once (float64 holds the
  exact product and, at these magnitudes, the exact sum)."""
  x, y, z = (_f16_pair(r).astype(np.float64) for r in (a, b, c))
  halves = (x * y + z).astype(np.float16).view(np.uint16).astype(int)
  return int(halves[0]) | int(halves[1]) << 16


_OPS = {
    "shr.b32": lambda a, b: a >> b,
    "shl.b32": lambda a, b: (a << b) & _M32,
    "and.b32": lambda a, b: a & b,
    "or.b32": lambda a, b: a | b,
    "xor.b32": lambda a, b: a ^ b,
    "mul.lo.u32": lambda a, b: (a * b) & _M32,
    "mad.lo.u32": lambda a, b, c: (a * b + c) & _M32,
    "add.u32": lambda a, b: (a + b) & _M32,
    "prmt.b32": _prmt,
    "mov.b32": lambda a: a,
    "fma.rn.f16x2": _fma_f16x2,
}


def _run_ptx(asm: str, words: tuple[int, ...], outputs: int) -> list[int]:
  regs = {f"${outputs + i}": w for i, w in enumerate(words)}
  for line in asm.splitlines():
    line = line.strip().rstrip(";")
    if not line or line in "{}" or line.startswith(".reg"):
      continue
    op, args = line.split(None, 1)
    dst, *srcs = [x.strip() for x in args.split(",")]
    vals = [regs[x] if x in regs else int(x, 0) for x in srcs]
    regs[dst] = _OPS[op](*vals)
  return [regs[f"${i}"] for i in range(outputs)]


def _f16_pair(reg: int) -> np.ndarray:
  """A 32-bit result as its two f16 halves (low first)."""
  return np.array([reg & 0xFFFF, reg >> 16], np.uint16).view(np.float16)


def _table(dim: int, bits: int, grid: bool) -> np.ndarray:
  """The exact codebook, or the grid one as f32 (as a kernel's spec)."""
  return (codebook.grid_codebook(dim, bits).astype(np.float32) if grid
          else codebook.codebook(dim, bits))


class PrmtLookupTest(parameterized.TestCase):

  def assert_emulated(self, asm: str) -> None:
    """Every instruction of `asm` is one the emulator runs."""
    self.assertLessEqual(
        set(re.findall(r"^\s*([a-z][\w.]*)\s", asm, re.M)), set(_OPS))

  # Every pair of packed bytes at D = 128; every 7th at D = 64 and 256
  # (the same PTX with other constants).
  @parameterized.parameters((128, 2, 1, True), (128, 4, 1, True),
                            (64, 4, 7, True), (256, 2, 7, True),
                            (128, 2, 3, False), (128, 4, 3, False))
  def test_ptx_equals_the_f16_codebook(self, dim, bits, stride, fma_pipe):
    table = codebook.codebook(dim, bits)
    self.assertTrue(prmt_lookup.supports(bits, tuple(table)))
    want = table.astype(np.float16)
    with mock.patch.object(prmt_lookup, "FMA_PIPE", fma_pipe):
      asm = prmt_lookup.ptx(bits, tuple(table))
    self.assertEqual("mad.lo" in asm, fma_pipe)
    self.assert_emulated(asm)
    fields, mask = 8 // bits, (1 << bits) - 1
    for word in range(0, 1 << 16, stride):
      out = _run_ptx(asm, (word,), fields)
      for f, reg in enumerate(out):    # field f of bytes j and j + 1
        got = _f16_pair(reg)
        codes = [(word >> (8 * j + bits * f)) & mask for j in (0, 1)]
        np.testing.assert_array_equal(got, want[codes],
                                      err_msg=f"{word=:#06x} {f=}")

  @parameterized.parameters((128, 1), (64, 5), (256, 5), (4096, 11),
                            (32, 7))
  def test_grid_ptx_equals_the_f16_grid_codebook(self, dim, stride):
    # A 4-bit grid codebook (f32, as the kernel's spec holds it) takes the
    # 8-instruction lookup, and every 4 codes come out as the f16
    # codebook; the same PTX for value tiles (_ptx4_field_pair).
    table = codebook.grid_codebook(dim, 4).astype(np.float32)
    self.assertIsNotNone(prmt_lookup.grid_steps(tuple(table)))
    want = table.astype(np.float16)
    asm = prmt_lookup.ptx(4, tuple(table))
    self.assertIn("fma.rn.f16x2", asm)
    self.assertLen(re.findall(r"^\s*[a-z][\w.]*\s", asm, re.M),
                   10)                                      # 8 + 2 moves
    self.assert_emulated(asm)
    for word in range(0, 1 << 16, stride):
      out = _run_ptx(asm, (word,), 2)
      for f, reg in enumerate(out):
        codes = [(word >> (8 * j + 4 * f)) & 15 for j in (0, 1)]
        np.testing.assert_array_equal(_f16_pair(reg), want[codes],
                                      err_msg=f"{word=:#06x} {f=}")
    pair = prmt_lookup._ptx4_field_pair(tuple(table))
    self.assertIn("fma.rn.f16x2", pair)
    for a, b in np.random.default_rng(5).integers(0, 1 << 16,
                                                  (500, 2)).tolist():
      for sh in (0, 4):
        for word, reg in zip((a, b), _run_ptx(pair, (a, b, sh, 4 - sh), 2)):
          codes = [(word >> (8 * j + sh)) & 15 for j in (0, 1)]
          np.testing.assert_array_equal(_f16_pair(reg), want[codes])

  def test_grid_steps_finds_only_grids(self):
    grid = codebook.grid_codebook(128, 4)
    step, k = prmt_lookup.grid_steps(tuple(grid))
    np.testing.assert_array_equal(step * np.asarray(k), grid)
    self.assertLessEqual(max(map(abs, k)), 63)
    self.assertIsNone(prmt_lookup.grid_steps(tuple(codebook.codebook(128,
                                                                       4))))
    # Off the grid by one f32 step; a step whose 1088 multiple f16 cannot
    # hold (significand 127 > 120); |k| beyond 63; 8 centroids.
    nudged = np.array(grid, np.float32)
    nudged[3] = np.nextafter(nudged[3], np.float32(0))
    self.assertIsNone(prmt_lookup.grid_steps(tuple(nudged)))
    self.assertIsNone(prmt_lookup.grid_steps(
        tuple(127 / 1024 * np.arange(-15, 17, 2))))
    self.assertIsNone(prmt_lookup.grid_steps(
        tuple(2.0 ** -8 * np.concatenate([-np.arange(64, 72)[::-1],
                                          np.arange(64, 72)]))))
    self.assertIsNone(prmt_lookup.grid_steps(tuple(grid[6:10])))
    self.assertIsNotNone(prmt_lookup.grid_steps(
        tuple(codebook.grid_codebook(128, 3))))
    with mock.patch.object(prmt_lookup, "GRID_LOOKUP", False):
      self.assertNotIn("fma", prmt_lookup.ptx(4, tuple(grid)))

  @parameterized.parameters((128, 4000, False), (64, 1000, False),
                            (256, 1000, False), (128, 4000, True),
                            (64, 1000, True))
  def test_3_bit_ptx_equals_the_f16_codebook(self, dim, cases, grid):
    # Random byte pairs of the two 2-bit halves and the 1-bit plane (each
    # of the 8 codes appears ~500 times per field and column at D = 128);
    # grid: a grid codebook, looked up as bytes and a multiply-add.
    table = _table(dim, 3, grid)
    self.assertTrue(prmt_lookup.supports(3, tuple(table)))
    want = table.astype(np.float16)
    asm = prmt_lookup.ptx(3, tuple(table))
    self.assertEqual("fma.rn.f16x2" in asm, grid)
    self.assert_emulated(asm)
    words = np.random.default_rng(dim).integers(0, 1 << 16, (cases, 3))
    for first, second, low in words.tolist():
      out = _run_ptx(asm, (first, second, low), 8)
      for h, plane in enumerate((first, second)):
        for f in range(4):
          reg = out[4 * h + f]
          got = _f16_pair(reg)
          codes = [(((plane >> (8 * j + 2 * f)) & 3) << 1)
                   | ((low >> (8 * j + 2 * f + h)) & 1) for j in (0, 1)]
          np.testing.assert_array_equal(
              got, want[codes], err_msg=f"{first=:#x} {second=:#x} {low=:#x}")

  @parameterized.parameters(False, True)
  def test_3_bit_first_half_ptx_equals_the_f16_codebook(self, grid):
    # The first half alone (a part of 32 coordinates, lookup_first_half3):
    # inputs the 2-bit plane's bytes and the 1-bit plane's, outputs the 4
    # fields, field f's low bit being bit 2f of the 1-bit byte.
    table = _table(32, 3, grid)
    want = table.astype(np.float16)
    asm = prmt_lookup._ptx3(tuple(table), halves=1)
    self.assertEqual("fma.rn.f16x2" in asm, grid)
    self.assert_emulated(asm)
    words = np.random.default_rng(32).integers(0, 1 << 16, (2000, 2))
    for plane, low in words.tolist():
      out = _run_ptx(asm, (plane, low), 4)
      for f, reg in enumerate(out):
        codes = [(((plane >> (8 * j + 2 * f)) & 3) << 1)
                 | ((low >> (8 * j + 2 * f)) & 1) for j in (0, 1)]
        np.testing.assert_array_equal(_f16_pair(reg), want[codes],
                                      err_msg=f"{plane=:#x} {low=:#x}")

  def test_2_bit_field_ptx_takes_its_shift_from_a_register(self):
    # values_registers' 2-bit lookup of one field, chosen by warp: the
    # shift (2f) is an operand, every field of every 13th byte pair.
    table = codebook.codebook(128, 2)
    want = table.astype(np.float16)
    asm = prmt_lookup._ptx2_field(tuple(table))
    self.assert_emulated(asm)
    for word in range(0, 1 << 16, 13):
      for f in range(4):
        (reg,) = _run_ptx(asm, (word, 2 * f), 1)
        got = _f16_pair(reg)
        codes = [(word >> (8 * j + 2 * f)) & 3 for j in (0, 1)]
        np.testing.assert_array_equal(got, want[codes],
                                      err_msg=f"{word=:#06x} {f=}")

  @parameterized.parameters(True, False)
  def test_4_bit_field_pair_ptx_takes_its_shift_from_a_register(self,
                                                               fma_pipe):
    # values_registers at 4 bits, 64 coordinates: a warp's one nibble
    # (shift s = 0 or 4, and 4 - s) of two registers' two bytes each.
    table = codebook.codebook(64, 4)
    want = table.astype(np.float16)
    with mock.patch.object(prmt_lookup, "FMA_PIPE", fma_pipe):
      asm = prmt_lookup._ptx4_field_pair(tuple(table))
    self.assert_emulated(asm)
    words = np.random.default_rng(4).integers(0, 1 << 16, (2000, 2))
    for a, b in words.tolist():
      for s in (0, 4):
        out = _run_ptx(asm, (a, b, s, 4 - s), 2)
        for word, reg in zip((a, b), out):
          codes = [(word >> (8 * j + s)) & 15 for j in (0, 1)]
          np.testing.assert_array_equal(_f16_pair(reg), want[codes],
                                        err_msg=f"{a=:#x} {b=:#x} {s=}")

  @parameterized.parameters(False, True)
  def test_3_bit_two_fields_ptx_on_transposed_pairs(self, grid):
    # values_registers at 3 bits, D = 128: each input holds tokens t, t + 1
    # of one byte column of a plane; warp w shifts the 2-bit plane by
    # 2·(w // 2) and the 1-bit plane by w, and gets group g's field 2g +
    # w // 2 with low bit 4g + w (pallas_gpu_tokens._warp_shifts3).
    table = _table(128, 3, grid)
    want = table.astype(np.float16)
    asm = prmt_lookup._ptx3_two_fields(tuple(table))
    self.assertEqual("fma.rn.f16x2" in asm, grid)
    self.assert_emulated(asm)
    words = np.random.default_rng(3).integers(0, 1 << 16, (1000, 2))
    for high, low in words.tolist():
      for w in range(4):
        out = _run_ptx(asm, (high, low, 2 * (w // 2), w), 2)
        for g, reg in enumerate(out):
          got = _f16_pair(reg)
          f, bit = 2 * g + w // 2, 4 * g + w
          codes = [(((high >> (8 * j + 2 * f)) & 3) << 1)
                   | ((low >> (8 * j + bit)) & 1) for j in (0, 1)]
          np.testing.assert_array_equal(
              got, want[codes], err_msg=f"{high=:#x} {low=:#x} {w=}")

  @parameterized.parameters(2, 3, 4)
  def test_stand_in_equals_unpacked_codes(self, bits):
    # Packed by packing.pack, looked up chunk by chunk: the chunks in
    # order are the codebook at the packed codes.
    dim = 128
    table = codebook.codebook(dim, bits)
    codes = np.random.default_rng(bits).integers(0, 1 << bits, (8, dim))
    words = packing.pack(jnp.asarray(codes, jnp.uint8), bits)
    chunks = prmt_lookup.lookup_chunks(words, bits, tuple(table),
                                       interpret=True)
    self.assertLen(chunks, 8 // bits if bits != 3 else 8)
    np.testing.assert_array_equal(np.concatenate(chunks, axis=1),
                                  table.astype(np.float16)[codes])

  @parameterized.parameters(
      (2, False, 1, 4), (3, False, 3, 8), (3, True, 3, 8), (4, False, 1, 2),
      (4, True, 1, 2))
  def test_opaque_tables_compute_the_same_lookup(self, bits, grid, inputs,
                                                 outputs):
    # Every prmt with two immediate tables and a register selector takes
    # its first table from an operand; fed those words, the PTX gives what
    # the immediates gave, on random inputs. The words come from
    # opaque_word_ptx, which is the word for any thread index.
    table = tuple(_table(128, bits, grid))
    asm = prmt_lookup.ptx(bits, table)
    code, words = prmt_lookup.opaque_tables(asm, outputs + inputs)
    self.assertNotEqual(code, asm)
    self.assertIsNone(prmt_lookup._PRMT_TABLES.search(code))
    self.assertLen(words, len(set(words)))
    self.assertEqual(code.count("prmt"), asm.count("prmt"))
    ops = dict(_OPS, **{"mov.u32": lambda a: a, "shr.u32": lambda a, b: a >> b})
    for w in words:
      for tid in (0, 77, 127, 1023):
        lines = prmt_lookup.opaque_word_ptx(w).replace("%tid.x", str(tid))
        with mock.patch.dict(_OPS, ops):
          self.assertEqual(_run_ptx(lines, (), 1), [w])
    rng = np.random.default_rng(bits)
    for x in rng.integers(0, 1 << 16, (300, inputs)).tolist():
      self.assertEqual(_run_ptx(code, (*x, *words), outputs),
                       _run_ptx(asm, tuple(x), outputs))

  def test_opaque_tables_leave_other_prmts(self):
    # An immediate selector, a register table: nothing to replace.
    asm = ("prmt.b32 v0, k4, 0x64646464, 0x4240;\n"
           "prmt.b32 $0, 0x01020304, 0x05060708, 0x3210;")
    self.assertEqual(prmt_lookup.opaque_tables(asm, 2), (asm, []))

  def test_supports_2_and_3_bits_and_symmetric_4_bits(self):
    self.assertTrue(prmt_lookup.supports(3, tuple(codebook.codebook(128, 3))))
    self.assertFalse(prmt_lookup.supports(5, tuple(codebook.codebook(128, 5))))
    skewed = list(codebook.codebook(128, 4))
    skewed[0] -= 0.01
    self.assertFalse(prmt_lookup.supports(4, tuple(skewed)))
    self.assertTrue(prmt_lookup.supports(2, (-1.0, 0.0, 0.5, 2.0)))


if __name__ == "__main__":
  absltest.main()
