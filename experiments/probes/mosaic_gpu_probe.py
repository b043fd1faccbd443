"""Probes which Mosaic GPU features a faster decode kernel can rely on.

Each probe is a tiny plgpu.kernel checked against numpy; the script prints
OK or the error, so one device call answers several design questions.
Run: python -m experiments.probes.mosaic_gpu_probe [--interpret]
"""

import sys
import traceback

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
import numpy as np

INTERPRET = plgpu.InterpretGPUParams() if "--interpret" in sys.argv else None
L = plgpu.Layout


def run_kernel(body, x, out_shape, out_dtype, y=None):
  """body(x_smem, y_smem) -> array; stored and returned."""
  y = jnp.zeros((8, 128), jnp.float32) if y is None else y
  def kernel(x_gmem, y_gmem, o_gmem, x_smem, y_smem, o_smem, bar):
    plgpu.copy_gmem_to_smem(x_gmem, x_smem, bar)
    plgpu.barrier_wait(bar)
    plgpu.copy_gmem_to_smem(y_gmem, y_smem, bar)
    plgpu.barrier_wait(bar)
    o_smem[...] = body(x_smem, y_smem)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_gmem)
    plgpu.wait_smem_to_gmem(0)
  f = plgpu.kernel(kernel, out_type=jax.ShapeDtypeStruct(out_shape, out_dtype),
                   scratch_types=[plgpu.SMEM(x.shape, x.dtype),
                                  plgpu.SMEM(y.shape, y.dtype),
                                  plgpu.SMEM(out_shape, out_dtype),
                                  plgpu.Barrier()],
                   interpret=INTERPRET)
  return np.asarray(f(x, y))


rng = np.random.default_rng(0)
codes = rng.integers(0, 256, (64, 64), dtype=np.uint8)
qt = rng.standard_normal((64, 16)).astype(np.float32)
table = np.linspace(-2, 2, 16).astype(np.float32)


def probe(name, fn, want, tol=2e-2):
  try:
    got = fn()
    err = float(np.max(np.abs(got - want)) / (np.max(np.abs(want)) + 1e-9))
    print(f"{name:<44} {'OK' if err < tol else 'WRONG'} rel err {err:.2e}")
  except Exception as e:
    msg = "".join(traceback.format_exception_only(type(e), e)).strip()
    print(f"{name:<44} FAIL {msg[:400]}")


def lhs_u8_mma():
  # codes & 15 as bf16 [64, 64] (MMA lhs) @ qt [64, 16] -> [64, 16]
  qtj = jnp.asarray(qt, jnp.bfloat16)
  def body(x, y):
    a = plgpu.load(x, layout=L.MMA_LHS(jnp.bfloat16), optimized=False)
    a = (a & 15).astype(jnp.bfloat16)
    b = plgpu.load(y, layout=L.MMA_RHS(jnp.bfloat16), optimized=False)
    acc = plgpu.layout_cast(jnp.zeros((64, 16), jnp.float32),
                            L.MMA_ACC(jnp.bfloat16))
    return plgpu.mma(acc, a, b)
  return run_kernel(body, jnp.asarray(codes), (64, 16), jnp.float32, qtj)


def lhs_lookup_mma():
  qtj = jnp.asarray(qt, jnp.bfloat16)
  def body(x, y):
    a = plgpu.load(x, layout=L.MMA_LHS(jnp.bfloat16), optimized=False)
    idx = (a & 15).astype(jnp.int32)
    v = jnp.full(idx.shape, table[0], jnp.float32)
    for k in range(1, 16):
      v = jnp.where(idx == k, jnp.float32(table[k]), v)
    b = plgpu.load(y, layout=L.MMA_RHS(jnp.bfloat16), optimized=False)
    acc = plgpu.layout_cast(jnp.zeros((64, 16), jnp.float32),
                            L.MMA_ACC(jnp.bfloat16))
    return plgpu.mma(acc, v.astype(jnp.bfloat16), b)
  return run_kernel(body, jnp.asarray(codes), (64, 16), jnp.float32, qtj)


def transposed_load():
  def body(x, y):
    a = plgpu.load(x.transpose((1, 0)),
                   layout=L.MMA_LHS(jnp.bfloat16), optimized=False)
    return (a & 15).astype(jnp.float32)
  return run_kernel(body, jnp.asarray(codes), (64, 64), jnp.float32)


def acc_axis0_max():
  qtj = jnp.asarray(qt, jnp.float32)
  def body(x, y):
    a = plgpu.load(x, layout=L.MMA_ACC(jnp.bfloat16), optimized=False)
    m = jnp.max(a, axis=0)                                    # [16]
    return a - jax.lax.broadcast_in_dim(m, a.shape, [1])
  return run_kernel(body, qtj, (64, 16), jnp.float32)


def acc_row_vector_load():
  # A [64] vector loaded in the layout of an MMA acc's rows, broadcast along
  # the columns (per-token norms scaling a [64 tok, 16 q] score tile).
  qtj = jnp.asarray(qt, jnp.float32)
  def body(x, y):
    a = plgpu.load(x, layout=L.MMA_ACC(jnp.bfloat16), optimized=False)
    n = plgpu.load(y.at[0, pl.ds(0, 64)],
                   layout=L.MMA_ACC(jnp.bfloat16).reduce(1), optimized=False)
    return a * jax.lax.broadcast_in_dim(n, a.shape, [0])
  y = jnp.asarray(np.tile(np.arange(128, dtype=np.float32), (8, 1)))
  return run_kernel(body, qtj, (64, 16), jnp.float32, y)


def store_transposed_view():
  # Writes an MMA acc [64, 16] into a transposed SMEM view, reads [16, 64].
  def kernel(x_gmem, o_gmem, x_smem, t_smem, bar):
    plgpu.copy_gmem_to_smem(x_gmem, x_smem, bar)
    plgpu.barrier_wait(bar)
    a = plgpu.load(x_smem, layout=L.MMA_ACC(jnp.bfloat16), optimized=False)
    t_smem.transpose((1, 0))[...] = a
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(t_smem, o_gmem)
    plgpu.wait_smem_to_gmem(0)
  f = plgpu.kernel(kernel, out_type=jax.ShapeDtypeStruct((16, 64), jnp.float32),
                   scratch_types=[plgpu.SMEM((64, 16), jnp.float32),
                                  plgpu.SMEM((16, 64), jnp.float32),
                                  plgpu.Barrier()], interpret=INTERPRET)
  return np.asarray(f(jnp.asarray(qt)))


def row_store_then_lhs_load():
  # Stores 16 WGMMA-row vectors into SMEM, then reads them as an MMA lhs.
  def kernel(x_gmem, o_gmem, x_smem, p_smem, o_smem, bar):
    plgpu.copy_gmem_to_smem(x_gmem, x_smem, bar)
    plgpu.barrier_wait(bar)
    for g in range(16):
      v = plgpu.load(x_smem.at[g], layout=L.WGMMA.reduce(1), optimized=False)
      p_smem[g] = (v * 2.0).astype(jnp.bfloat16)
    plgpu.commit_smem()
    a = plgpu.load(p_smem, layout=L.MMA_LHS(jnp.bfloat16, m_warps=1),
                   optimized=False)
    o_smem[...] = a.astype(jnp.float32)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_gmem)
    plgpu.wait_smem_to_gmem(0)
  x = jnp.asarray(rng.standard_normal((16, 64)), jnp.float32)
  f = plgpu.kernel(kernel, out_type=jax.ShapeDtypeStruct((16, 64), jnp.float32),
                   scratch_types=[plgpu.SMEM((16, 64), jnp.float32),
                                  plgpu.SMEM((16, 64), jnp.bfloat16),
                                  plgpu.SMEM((16, 64), jnp.float32),
                                  plgpu.Barrier()],
                   interpret=INTERPRET)
  return np.asarray(f(x)), np.asarray(x) * 2


def main():
  print("jax", jax.__version__, jax.devices()[0].device_kind)
  want_mma = (codes & 15).astype(np.float32) @ qt
  probe("u8 load as MMA lhs + mask + mma", lhs_u8_mma, want_mma)
  probe("u8 load + select-chain lookup + mma", lhs_lookup_mma,
        table[codes & 15] @ qt)
  probe("transposed SMEM view load (lhs)", transposed_load,
        (codes.T & 15).astype(np.float32))
  probe("max over axis 0 of an MMA acc", acc_axis0_max, qt - qt.max(0))
  probe("[64] row vector in MMA acc rows layout", acc_row_vector_load,
        qt * np.arange(64, dtype=np.float32)[:, None])
  probe("store MMA acc into a transposed SMEM view", store_transposed_view,
        qt.T)
  try:
    got, want = row_store_then_lhs_load()
    err = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
    print(f"{'row vectors -> SMEM -> MMA lhs load':<44} "
          f"{'OK' if err < 2e-2 else 'WRONG'} rel err {err:.2e}")
  except Exception as e:
    msg = "".join(traceback.format_exception_only(type(e), e)).strip()
    print(f"{'row vectors -> SMEM -> MMA lhs load':<44} FAIL {msg[:400]}")


if __name__ == "__main__":
  main()
