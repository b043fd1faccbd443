"""How fast can a Mosaic GPU pipeline stream a 4-bit cache, doing nothing?

The decode kernels take as long with no unpacking (probe "nodeq") and at
any pipeline depth (decode_kernel_variants --stages). This probe times the
skeleton: the same grid (B, K, splits) and emit_pipeline over the same
code and norm arrays (norms f16, as the kernel reads them), with a body
that reads nothing, for several tokens per step and depths, with and
without Mosaic GPU's automatic barriers (the kernel runs without them since
session 11), with the codes moved as 16-, 128- or 256-byte TMA rows
instead of a token's 64, with a warp-specialized pipeline (a memory
warpgroup issuing the copies), and over a 3-bit cache's arrays; beside
it, XLA reading the same bytes (a sum) and the parts of
pallas_gpu.attention outside the kernel (prepare). Device time
(timing.time_loop_ms: 20 calls a jitted loop), as kernel_bench; before
session 11 this probe timed wall clock, a dispatch included (its
0.46-0.51 ms in NOTES.md). Session 12:
0.325-0.341 ms (3.3-3.4 TB/s) at B=8, S=128k, 4 bits, every step size,
depth and split count (results/kernel_bench/h200_v8/probes.txt); session
13: 0.280 ms (3.95 TB/s) as 128-byte rows, 0.525 as 16-byte rows, 0.302
warp-specialized at 4 stages, 0.30 ms for a 3-bit cache's 0.84 GB
(results/kernel_bench/h200_v9/probes.txt). The kernel now moves its codes as
128-byte rows (pallas_gpu tma_row_bytes).
Run: python -m experiments.probes.pipeline_probe
"""

import functools
import time

import jax
import jax.numpy as jnp
from jax.experimental.pallas import mosaic_gpu as plgpu

from experiments import kernel_bench
from experiments import timing
from turboquant_jax import cache as cache_lib
from turboquant_jax.kernels.decode_attention import parts

B, KV, S, D, H = 8, 8, 131072, 128, 32


def _stream_kernel(token, *refs, rows, split_len, stages, n_in,
                   warp_specialized):
  del token                   # only orders the calls of a timed loop
  ins = refs[:n_in]
  b, k = jax.lax.axis_index("b"), jax.lax.axis_index("k")
  tile0 = jax.lax.axis_index("s") * split_len // rows

  def spec(r):
    # A tile of `rows` tokens: rows·N/S of an array's N rows (codes may be
    # viewed as wider rows than a token's, `widened`).
    shape = r.shape[2:]
    box = rows * shape[0] // S
    if len(shape) == 1:
      return plgpu.BlockSpec((box,), lambda i: (tile0 + i,))
    return plgpu.BlockSpec((box, shape[1]), lambda i: (tile0 + i, 0))

  def body(idx, *tiles):
    del idx, tiles

  tiles = [r.at[b, k] for r in ins]
  if warp_specialized:
    # One warpgroup only issues the copies, one (empty) consumes them.
    plgpu.emit_pipeline_warp_specialized(
        body, grid=(split_len // rows,), memory_registers=40,
        in_specs=[spec(r) for r in ins], max_concurrent_steps=stages,
        wg_axis="wg", num_compute_wgs=1)(*tiles)
    return
  plgpu.emit_pipeline(body, grid=(split_len // rows,),
                      in_specs=[spec(r) for r in ins],
                      max_concurrent_steps=stages)(*tiles)


def widened(codes: jax.Array, width: int) -> jax.Array:
  """u8[B, K, S, P] viewed as rows of `width` bytes, [B, K, S·P/width,
  width]: the same bytes, so a tile's TMA box moves them as fewer, wider
  rows, as pallas_gpu._tma_rows gives the kernel."""
  b, k, s, p = codes.shape
  return codes.reshape(b, k, s * p // width, width)


def stream(arrays, rows, splits, stages, auto_barriers=True,
           warp_specialized=False):
  """f(token f32[1], *arrays): the pipeline over arrays (token unused);
  warp_specialized: a memory warpgroup beside the (empty) compute one
  (emit_pipeline_warp_specialized), as flash-attention kernels stream."""
  return plgpu.kernel(
      functools.partial(_stream_kernel, rows=rows, split_len=S // splits,
                        stages=stages, n_in=len(arrays),
                        warp_specialized=warp_specialized),
      out_type=jax.ShapeDtypeStruct((128,), jnp.float32),
      grid=(B, KV, splits), grid_names=("b", "k", "s"),
      num_threads=2 if warp_specialized else None,
      thread_name="wg" if warp_specialized else None,
      compiler_params=plgpu.CompilerParams(
          unsafe_no_auto_barriers=not auto_barriers))


def main():
  print("jax", jax.__version__, jax.devices()[0].device_kind, flush=True)
  cfg = cache_lib.CacheConfig(key_bits=4, value_bits=4)
  c = kernel_bench.random_cache(jax.random.key(4), cfg, B, KV, S, D)
  arrays = [c.keys.codes, c.keys.norms, c.values.codes, c.values.norms]
  nbytes = sum(a.nbytes for a in arrays)
  print(f"arrays {[(a.shape, str(a.dtype)) for a in arrays]} "
        f"{nbytes / 1e9:.3f} GB", flush=True)

  token = jnp.zeros((1,), jnp.float32)

  def report(name, fn, *args):
    """Device ms of fn(token, *args), and the rate of the arrays among
    args (all of them are read)."""
    moved = sum(a.nbytes for a in args if isinstance(a, jax.Array))
    try:
      t = timing.time_loop_ms(fn, token, *args, loops=20, warmup=2, reps=5)
      print(f"{name:<44} {t:.3f} ms  {moved / t / 1e9:.2f} TB/s",
            flush=True)
    except Exception as e:  # noqa: BLE001 - a probe reports every failure
      print(f"{name:<44} FAIL {type(e).__name__}: {str(e)[:300]}",
            flush=True)

  report("xla sum of the same bytes", lambda t, *a: t + sum(
      jnp.sum(x.astype(jnp.float32)) for x in a), *arrays)
  for rows, splits, stages in ((64, 16, 2), (64, 16, 4), (64, 32, 2),
                               (128, 16, 2), (128, 8, 4), (256, 8, 2),
                               (256, 8, 3), (512, 8, 2)):
    for barriers in (True, False):
      report(f"pipeline only rows={rows} splits={splits} stages={stages}"
             f"{'' if barriers else ' no auto barriers'}",
             stream(arrays, rows, splits, stages, barriers), *arrays)
  codes_only = [arrays[0], arrays[2]]
  report("pipeline only, codes only rows=64 splits=16 stages=2",
         stream(codes_only, 64, 16, 2, False), *codes_only)
  report("pipeline only, codes only rows=256 splits=8 stages=2",
         stream(codes_only, 256, 8, 2, False), *codes_only)
  # Does the TMA row width matter? The same bytes as 16-byte rows (how
  # parts of 24 bytes travel), and as 128- and 256-byte rows.
  for width in (16, 128, 256):
    wide = [widened(a, width) if a.ndim == 4 else a for a in arrays]
    report(f"pipeline only, codes as {width}-byte rows rows=64 splits=16",
           stream(wide, 64, 16, 2, False), *wide)
  # A memory warpgroup issuing the copies (how cuDNN-class kernels stream;
  # cuDNN bf16 reads its 4.29 GB at 4.3 TB/s on this shape).
  for rows, stages in ((64, 2), (64, 4), (128, 4)):
    report(f"warp-specialized pipeline rows={rows} splits=16 "
           f"stages={stages}",
           stream(arrays, rows, 16, stages, False, True), *arrays)
  # The floor at 3 bits (48-byte rows; 3.5x cuDNN would be ~0.285 ms).
  del arrays, wide, codes_only
  c3 = kernel_bench.random_cache(
      jax.random.key(4), cache_lib.CacheConfig(key_bits=3, value_bits=3),
      B, KV, S, D)
  arrays3 = [c3.keys.codes, c3.keys.norms, c3.values.codes, c3.values.norms]
  for rows, splits in ((64, 16), (128, 16)):
    report(f"3-bit arrays, pipeline only rows={rows} splits={splits}",
           stream(arrays3, rows, splits, 2, False), *arrays3)
  del arrays3, c3
  q = jax.random.normal(jax.random.key(0), (B, 1, H, D))
  report("prepare (XLA before the kernel; rate of q only)",
         lambda t, q, c: parts.prepare(q + t[0], c, c.lengths, 0.1).q, q, c)


if __name__ == "__main__":
  t0 = time.time()
  main()
  print(f"done in {time.time() - t0:.0f} s")
