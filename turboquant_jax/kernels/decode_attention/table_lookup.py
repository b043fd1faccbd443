"""Centroid lookup of 4-bit codes from a byte-indexed table in SMEM.

Mosaic GPU, through inline PTX; the kernel's lookup_mode="table".

A byte of a 4-bit plane holds the codes of two coordinates (field 0: j,
field 1: j + P). A table of 256 f16 pairs, entry e = (c[e & 15], c[e >> 4]),
gives both centroids of a byte with one shared-memory load, so per register
pair of the WGMMA layout (bytes j and j + 1) the PTX spends 2 integer ops
to isolate the bytes, 2 multiply-adds (the FMA pipe) for their addresses, 2
loads and 2 prmt to regroup the four halves into the two chunks' f16x2:
4 instructions of the ALU pipe against prmt_lookup's 8 for the same 4
codes. The ALU pipe is the kernel's busiest (NOTES.md, session 13); the
price is shared-memory bandwidth (a 4-byte load per 2 codes) and 32 KB of
SMEM a program.

The table is replicated once per lane: entry e of lane l is word 32·e + l,
so whatever bytes the 32 lanes of a warp hold, they read 32 different
banks and a load is one shared-memory wavefront (one copy shared by all
lanes would conflict about 3-4 ways on random codes).
"""

import jax
import jax.numpy as jnp
from jax.experimental.pallas import mosaic_gpu as plgpu
import numpy as np

LANES = 32
ENTRIES = 256


def supports(bits: int, centroids: tuple[float, ...]) -> bool:
  """Whether a part of `bits` bits with `centroids` can use a table."""
  return bits == 4 and len(centroids) == 16


def table(centroids: tuple[float, ...]) -> np.ndarray:
  """u32[256, 32]: entry e (row), one copy a lane (column): the f16 pair
  (c[e & 15] in the low half, c[e >> 4] in the high half)."""
  if len(centroids) != 16:
    raise ValueError(f"{len(centroids)} centroids: expected 16 (4 bits)")
  h = np.asarray(centroids, np.float16).view(np.uint16).astype(np.uint32)
  e = np.arange(ENTRIES)
  words = h[e & 15] | (h[e >> 4] << 16)
  return np.repeat(words[:, None], LANES, axis=1)


PTX = """{
  .reg .b32 b0, b1, a0, a1, t0, t1;
  and.b32 b0, $2, 0xFF;
  shr.b32 b1, $2, 8;
  mad.lo.u32 a0, b0, 128, $3;
  mad.lo.u32 a1, b1, 128, $3;
  ld.shared.b32 t0, [a0];
  ld.shared.b32 t1, [a1];
  prmt.b32 $0, t0, t1, 0x5410;
  prmt.b32 $1, t0, t1, 0x7632;
}"""
"""One register pair: $2 holds bytes j, j + 1 in its low 16 bits, $3 the
table's shared-memory address plus 4·lane; $0 = (field 0 of j, of j + 1),
$1 = (field 1 of j, of j + 1), as f16x2."""


def lookup_chunks(words: jax.Array, table_ref, interpret: bool
                  ) -> list[jax.Array]:
  """A 4-bit part's u8 [R, P] code tile (WGMMA layout) -> its 2 coordinate
  chunks' f16 centroids [R, P] (WGMMA layout), read from `table_ref`
  (SMEM u32[256, 32], `table`'s)."""
  if interpret:
    # Interpret mode has no PTX: the same reads by a gather, each column
    # from another lane's copy, so every copy of the table is read.
    tbl = table_ref[...]
    lane = jax.lax.broadcasted_iota(jnp.int32, words.shape, 1) % LANES
    entry = tbl[words.astype(jnp.int32), lane]
    halves = [entry & 0xFFFF, entry >> 16]
    return [jax.lax.bitcast_convert_type(h.astype(jnp.uint16), jnp.float16)
            for h in halves]
  return _device_lookup(words, table_ref)


def _device_lookup(words, table_ref):
  # pylint: disable=g-import-not-at-top (Mosaic GPU internals, device only)
  from jax._src.lib.mlir import ir
  from jax._src.lib.mlir.dialects import arith
  from jax._src.lib.mlir.dialects import llvm
  from jax.experimental.mosaic import gpu as mgpu
  from jax.experimental.mosaic.gpu import utils as mgpu_utils
  layout = plgpu.Layout.WGMMA
  out = plgpu.ShapeDtypeStruct(words.shape, jnp.float16, layout=layout)

  @plgpu.inline_mgpu(arg_types=(layout, plgpu.RefType()),
                     return_type=(out, out))
  def lookup(ctx, x, ref):
    del ctx
    i16 = ir.IntegerType.get_signless(16)
    i32 = ir.IntegerType.get_signless(32)
    f16x2 = ir.VectorType.get((2,), ir.F16Type.get())
    address = llvm.ptrtoint(i32, mgpu_utils.memref_ptr(ref))
    lane = mgpu_utils.inline_ptx("mov.u32 $0, %laneid;", result_types=i32)
    base = arith.addi(address,
                      arith.muli(lane, arith.constant(i32, 4)))
    regs = [np.empty_like(x.registers) for _ in range(2)]
    for idx, _ in np.ndenumerate(x.registers):
      w = arith.extui(i32, mgpu_utils.bitcast(x.registers[idx], i16))
      results = mgpu_utils.inline_ptx(PTX, w, base,
                                      result_types=[i32, i32])
      for reg, value in zip(regs, results):
        reg[idx] = mgpu_utils.bitcast(value, f16x2)
    return tuple(mgpu.FragmentedArray(_registers=r, _layout=x.layout,
                                      _is_signed=None) for r in regs)
  return list(lookup(words, table_ref))
