"""The byte-permute lookup: its PTX, run by a small emulator of the seven
instructions it uses, and its interpret-mode stand-in equal the f16
codebook for every 4-bit code. (The PTX itself runs only on a GPU:
experiments/probes/mosaic_gpu_probe.py --prmt checks it there.)"""

import re

from absl.testing import absltest
from absl.testing import parameterized
import jax.numpy as jnp
import numpy as np

from turboquant_jax.kernels.decode_attention import prmt_lookup
from turboquant_jax.quant import codebook

_M32 = 0xFFFFFFFF


def _prmt(a: int, b: int, sel: int) -> int:
  """PTX prmt.b32 (default mode): byte k of the result is byte sel[k] of
  the 8 bytes {b, a} (0-3 from a, 4-7 from b)."""
  pool = [(a >> 8 * i) & 0xFF for i in range(4)] + [
      (b >> 8 * i) & 0xFF for i in range(4)]
  out = 0
  for k in range(4):
    s = (sel >> 4 * k) & 0xF
    assert s < 8, "sign-replicate mode is not used"
    out |= pool[s] << 8 * k
  return out


_OPS = {
    "shr.b32": lambda a, b: a >> b,
    "shl.b32": lambda a, b: (a << b) & _M32,
    "and.b32": lambda a, b: a & b,
    "or.b32": lambda a, b: a | b,
    "xor.b32": lambda a, b: a ^ b,
    "mul.lo.u32": lambda a, b: (a * b) & _M32,
    "prmt.b32": _prmt,
}


def _run_ptx(asm: str, word: int) -> tuple[int, int]:
  regs = {"$2": word}
  for line in asm.splitlines():
    line = line.strip().rstrip(";")
    if not line or line in "{}" or line.startswith(".reg"):
      continue
    op, args = line.split(None, 1)
    dst, *srcs = [x.strip() for x in args.split(",")]
    vals = [regs[x] if x in regs else int(x, 0) for x in srcs]
    regs[dst] = _OPS[op](*vals)
  return regs["$0"], regs["$1"]


class PrmtLookupTest(parameterized.TestCase):

  @parameterized.parameters(64, 128, 256)
  def test_ptx_equals_the_f16_codebook(self, dim):
    table = codebook.codebook(dim, 4)
    self.assertTrue(prmt_lookup.supports(tuple(table)))
    want = table.astype(np.float16)
    asm = prmt_lookup.ptx(tuple(table))
    self.assertEqual(set(re.findall(r"^\s*([a-z][\w.]*)\s", asm, re.M)),
                     set(_OPS))
    for word in range(1 << 16):        # every 4 codes of a register pair
      lo, hi = _run_ptx(asm, word)
      got = np.array([lo & 0xFFFF, lo >> 16, hi & 0xFFFF, hi >> 16],
                     np.uint16).view(np.float16)
      n = [(word >> 4 * k) & 15 for k in (0, 2, 1, 3)]
      np.testing.assert_array_equal(got, want[n], err_msg=f"{word=:#06x}")

  def test_stand_in_equals_the_f16_codebook(self):
    table = codebook.codebook(128, 4)
    words = jnp.arange(256, dtype=jnp.uint8).reshape(4, 64)
    lo, hi = prmt_lookup.lookup_nibbles(words, tuple(table), interpret=True)
    want = table.astype(np.float16)
    np.testing.assert_array_equal(lo, want[np.asarray(words) & 15])
    np.testing.assert_array_equal(hi, want[np.asarray(words) >> 4])

  def test_supports_only_symmetric_16_entry_codebooks(self):
    self.assertFalse(prmt_lookup.supports(tuple(codebook.codebook(128, 3))))
    skewed = list(codebook.codebook(128, 4))
    skewed[0] -= 0.01
    self.assertFalse(prmt_lookup.supports(tuple(skewed)))


if __name__ == "__main__":
  absltest.main()
