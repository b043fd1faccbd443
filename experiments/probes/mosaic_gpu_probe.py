"""Probes which Mosaic GPU features a faster decode kernel can rely on.

Each probe is a tiny plgpu.kernel checked against numpy; the script prints
OK or the error, so one device call answers several design questions.
Run: python -m experiments.probes.mosaic_gpu_probe [--interpret]
[--v4|--prmt|--launch] (--v4: only the probes of the transposed layout of
kernel v4; --prmt: only the byte-permute centroid lookup, device only;
--launch: what a Mosaic GPU launch costs inside a jitted loop.)
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
  return np.asarray(make_kernel(body, x, y, out_shape, out_dtype)(x, y))


def make_kernel(body, x, y, out_shape, out_dtype, unused_smem_kb: int = 0):
  """The plgpu.kernel of run_kernel: f(x, y) -> body's array, via SMEM
  (plus `unused_smem_kb` KB of shared memory it asks for and never uses)."""
  def kernel(x_gmem, y_gmem, o_gmem, x_smem, y_smem, o_smem, bar, *unused):
    del unused
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
                                  plgpu.Barrier()]
                   + ([plgpu.SMEM((unused_smem_kb * 256,), jnp.float32)]
                      if unused_smem_kb else []),
                   interpret=INTERPRET)
  return f


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


# ---- The transposed decode layout (kernel v4 plan, NOTES.md): tokens as
# the wgmma M dimension, the few queries of a GQA group as N (8 or 16).


def _f16_tile(rows: int, cols: int = 64) -> plgpu.SMEM:
  """f16 [rows, cols] in the tiled, swizzled form wgmma reads."""
  swizzle = min(128, 2 * cols)
  return plgpu.SMEM((rows, cols), jnp.float16,
                    transforms=(plgpu.TilingTransform((8, swizzle // 2)),
                                plgpu.SwizzleTransform(swizzle)))


def _transposed_kernel(body, n, out_rows, *operands):
  """Copies f16 operands (a [64, 64] tile each, then one [n, 64]) to SMEM,
  runs body(*smem) -> f32[out_rows, n], stores and returns it."""
  def kernel(*refs):
    k = len(operands)
    gmem, out, smem = refs[:k], refs[k], refs[k + 1:2 * k + 1]
    o_smem, bar = refs[2 * k + 1:]
    for src, dst in zip(gmem, smem):
      plgpu.copy_gmem_to_smem(src, dst, bar)
      plgpu.barrier_wait(bar)
    o_smem[...] = body(*smem)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, out)
    plgpu.wait_smem_to_gmem(0)
  scratch = [_f16_tile(x.shape[0]) for x in operands]
  f = plgpu.kernel(
      kernel, out_type=jax.ShapeDtypeStruct((out_rows, n), jnp.float32),
      scratch_types=scratch + [plgpu.SMEM((out_rows, n), jnp.float32),
                               plgpu.Barrier()], interpret=INTERPRET)
  return np.asarray(f(*[jnp.asarray(x, jnp.float16) for x in operands]))


k_tile = rng.standard_normal((64, 64)).astype(np.float16)    # [tok, dim]
v_tile = rng.standard_normal((64, 64)).astype(np.float16)


def _q_tile(n):
  return rng.standard_normal((n, 64)).astype(np.float16)    # [query, dim]


def _softmax_t(s):
  """Softmax over tokens (axis 0) of a [tok, query] score tile."""
  p = np.exp(s - s.max(0))
  return p / p.sum(0)


def wgmma_scores_t(n, q):
  """Sᵀ[64 tok, n] = K · Qᵀ: K from SMEM as A, Q [n, 64] transposed as B."""
  def body(k_smem, q_smem):
    def scores(acc):
      plgpu.wgmma(acc, k_smem, q_smem.transpose((1, 0)))
      return acc[...]
    return pl.run_scoped(scores, plgpu.ACC((64, n), jnp.float32))
  return _transposed_kernel(body, n, 64, k_tile, q)


def wgmma_column_softmax(n, q):
  """Sᵀ as above, then max and sum over tokens (axis 0, across warps)."""
  def body(k_smem, q_smem):
    def scores(acc):
      plgpu.wgmma(acc, k_smem, q_smem.transpose((1, 0)))
      return acc[...]
    s = pl.run_scoped(scores, plgpu.ACC((64, n), jnp.float32))
    m = jnp.max(s, axis=0)                                     # [n]
    p = jnp.exp(s - jax.lax.broadcast_in_dim(m, s.shape, [1]))
    l = jnp.sum(p, axis=0)
    return p / jax.lax.broadcast_in_dim(l, s.shape, [1])
  return _transposed_kernel(body, n, 64, k_tile, q)


def wgmma_values_t(n, q):
  """Oᵀ[64 dim, n] = Vᵀ · Pᵀ: V [tok, dim] transposed as A (from SMEM), Pᵀ
  [64 tok, n] written by the threads to SMEM as B."""
  def body(k_smem, v_smem, q_smem):
    def scores(acc):
      plgpu.wgmma(acc, k_smem, q_smem.transpose((1, 0)))
      return acc[...]
    s = pl.run_scoped(scores, plgpu.ACC((64, n), jnp.float32))
    p = jnp.exp(s - jax.lax.broadcast_in_dim(jnp.max(s, axis=0), s.shape,
                                             [1]))
    def values(p_smem):
      p_smem[...] = p.astype(jnp.float16)
      plgpu.commit_smem()
      def mma(acc):
        plgpu.wgmma(acc, v_smem.transpose((1, 0)), p_smem)
        return acc[...]
      return pl.run_scoped(mma, plgpu.ACC((64, n), jnp.float32))
    return pl.run_scoped(values, _f16_tile(64, n))
  return _transposed_kernel(body, n, 64, k_tile, v_tile, q)


def wgmma_register_a(n, q):
  """Sᵀ with K as a register A operand (WGMMA layout, f16): no K SMEM
  store per tile. Interpret mode takes A only from SMEM."""
  def body(k_smem, q_smem):
    a = plgpu.load(k_smem, layout=L.WGMMA, optimized=False) * 1.0
    def scores(acc):
      plgpu.wgmma(acc, a, q_smem.transpose((1, 0)))
      return acc[...]
    return pl.run_scoped(scores, plgpu.ACC((64, n), jnp.float32))
  return _transposed_kernel(body, n, 64, k_tile, q)


def transposed_layout_probes():
  kf, vf = k_tile.astype(np.float32), v_tile.astype(np.float32)
  for n in (8, 16, 64):
    q = _q_tile(n)
    s = kf @ q.astype(np.float32).T                            # [tok, n]
    probe(f"v4: wgmma K·Qᵀ, N={n}", lambda: wgmma_scores_t(n, q), s,
          tol=1e-2)
    probe(f"v4: softmax over tokens (axis 0), N={n}",
          lambda: wgmma_column_softmax(n, q), _softmax_t(s), tol=1e-2)
    p = np.exp(s - s.max(0)).astype(np.float16).astype(np.float32)
    probe(f"v4: wgmma Vᵀ·Pᵀ (A transposed), N={n}",
          lambda: wgmma_values_t(n, q), vf.T @ p, tol=1e-2)
    if INTERPRET is None:
      probe(f"v4: register A operand, N={n}",
            lambda: wgmma_register_a(n, q), s, tol=1e-2)


# ---- The 4-bit centroid lookup by byte permutes (prmt_lookup.py).


def prmt_lookup_probe():
  # pylint: disable=g-import-not-at-top
  from turboquant_jax.kernels.decode_attention import prmt_lookup
  from turboquant_jax.quant import codebook
  cb = codebook.codebook(128, 4).astype(np.float32)

  def lookup(w, c):
    return prmt_lookup.lookup_chunks(w, 4, tuple(c), interpret=False)
  def body(x, y):
    del y
    w = plgpu.load(x, layout=L.WGMMA, optimized=False)
    lo, hi = lookup(w, cb)
    return (lo.astype(jnp.float32) + 1000.0 * hi.astype(jnp.float32))
  cb16 = cb.astype(np.float16).astype(np.float32)
  want = cb16[codes & 15] + 1000.0 * cb16[codes >> 4]
  probe("prmt 4-bit lookup (both nibbles)",
        lambda: run_kernel(body, jnp.asarray(codes), (64, 64), jnp.float32),
        want, tol=1e-5)
  cb2 = codebook.codebook(128, 2).astype(np.float16).astype(np.float32)

  def body2(x, y):
    del y
    w = plgpu.load(x, layout=L.WGMMA, optimized=False)
    f = prmt_lookup.lookup_chunks(w, 2, tuple(cb2), interpret=False)
    return jnp.concatenate([v.astype(jnp.float32) for v in f], axis=1)
  probe("prmt 2-bit lookup (four fields)",
        lambda: run_kernel(body2, jnp.asarray(codes), (64, 256),
                           jnp.float32),
        np.concatenate([cb2[(codes >> (2 * i)) & 3] for i in range(4)],
                       axis=1), tol=1e-6)
  probe("prmt 4-bit lookup (low nibbles)",
        lambda: run_kernel(
            lambda x, y: lookup(plgpu.load(x, layout=L.WGMMA,
                                                optimized=False),
                                     cb)[0].astype(jnp.float32),
            jnp.asarray(codes), (64, 64), jnp.float32),
        cb16[codes & 15], tol=1e-6)


def launch_probe():
  """Device µs per iteration of a jitted 200-iteration loop whose body is
  10 small XLA steps (a reduction and an add, ~2 kernels each), alone and
  each after a tiny Mosaic GPU kernel: the difference / 10 is what one
  Mosaic GPU launch adds inside a loop (~1-2 µs for a kernel inside XLA's
  CUDA graphs; several more for one launched from the host between them).
  The loop itself costs ~15 µs an iteration (its predicate goes to the
  host), hence the 10 steps. The kernel's shared memory is swept (three
  f32 [rows, 128] buffers), and at 8 rows the shared memory asked for
  but not used (+unused KB): whether the cost follows the bytes moved
  or the shared memory the SM must set aside (its carveout switched
  between XLA's kernels and a Mosaic GPU kernel)."""
  # pylint: disable=g-import-not-at-top
  from experiments import timing
  for rows, unused in ((0, 0), (8, 0), (64, 0), (128, 0), (8, 84),
                       (8, 180)):
    x = jnp.ones((max(rows, 8), 128), jnp.float32)
    kern = make_kernel(lambda a, b: a[...] * 0.5, x, x, x.shape,
                       jnp.float32, unused_smem_kb=unused)

    def xla_steps(x, kern=kern, mosaic=rows > 0):
      for _ in range(10):
        x = kern(x, x) if mosaic else x
        x = x + jnp.sum(x) * 1e-6
      return x

    us = timing.time_loop_ms(xla_steps, x, loops=200, warmup=2,
                             reps=10) * 1e3
    name = ("10 XLA steps" if rows == 0 else
            f"10 x (Mosaic GPU kernel, {3 * rows // 2} KB SMEM"
            + (f" +{unused} unused" if unused else "") + ", + XLA step)")
    print(f"{name:<52} {us:.2f} us an iteration", flush=True)


def main():
  print("jax", jax.__version__, jax.devices()[0].device_kind)
  if "--launch" in sys.argv:
    launch_probe()
    return
  if "--prmt" in sys.argv:
    prmt_lookup_probe()
    return
  transposed_layout_probes()
  if "--v4" in sys.argv:
    return
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
