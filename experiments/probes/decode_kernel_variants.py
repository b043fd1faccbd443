"""Checks and times variants of the pallas_gpu decode kernel in one call.

Prints (1) the relative error against the reference on small real caches
(several head dims, GQA groups, bits, prod keys, windows, chunks) and (2) a
table of times at B=8, 32/8 heads, D=128 for each bit width, lookup mode
and split count, beside cuDNN bf16 measured in the same process.
Run: python -m experiments.probes.decode_kernel_variants [--quick|--short]
(--tokens: only the checks of layout="tokens"; --v4: those checks, then
S=128k times of layout="tokens"; --stages: times against the pipeline
depth; --rows: checks and times against the tokens per pipeline step;
--diagnose: where the time goes; --v5: the device-only options (prmt
lookup, register keys, transposed Pᵀ) checked and timed; --v6: the 3-bit
prmt lookup checked, the options timed in interleaved rounds; --norms:
f16 norms read by the kernel against f32 ones converted by XLA; --next:
skip_empty_splits checked and timed, split counts at two shapes;
--splits: split counts at the SmolLM2 decode shape in device time
(--splits1: at B=1);
--layer: append + attend of one such layer, full against TurboQuant;
--append: the fused quantize-and-append kernel checked and timed;
--rotate: combine="columns" and rotate_in_kernel checked, then timed per
layer and at B=1; --append-attention: pallas_gpu.append_attention (append
and attention in one launch) checked, then one layer timed against the two
launches it replaces; --skeleton: 8 query columns, approximate exp and no
automatic barriers checked, then timed in device time against the kernel
before them (--skeleton-checks: the checks and the defaults' time
only); --skeleton-tune: stages, splits, steps with them;
--skeleton-rows: 64- against 128-token steps at several shapes;
--compare="{'name': {options}, ...}": today's defaults and each named set
of pallas_gpu.attention options checked on 4 shapes, then timed in
interleaved rounds at B=8, S=128k, 4 and 3.5 bits or at
--shapes="((B, S, (bits, ...)[, D]), ...)"; --no-checks: times only;
--gpu-clock: those times written out and on the GPU's clock;
--split-fold: outlier-split caches with their folded rotations stored
and derived in each call, checked and timed; --split-xla: the folded
rotations' products at each einsum precision, alone and in the call;
--lookup-pipes: the lookup's PTX with integer work on the FMA pipe against
session 12's, checked and timed; --around-kernel: the XLA work around the
kernel (the splits' merge, the folded rotations, the split count) checked,
counted in kernels and timed)
"""

import ast
import dataclasses
import functools
import itertools
import sys
import time

import jax
import jax.numpy as jnp

from experiments import kernel_bench
from experiments import probes
from experiments import timing
from turboquant_jax import cache as cache_lib
from turboquant_jax.cache import turboquant_cache
from turboquant_jax.kernels import decode_attention as da
from turboquant_jax.kernels.decode_attention import pallas_gpu
from turboquant_jax.kernels.decode_attention import pallas_gpu_tokens
from turboquant_jax.kernels.decode_attention import parts
from turboquant_jax.kernels.quantize_append import pallas_gpu as quantize_append


def check(dim, groups, bits, method="mse", window=0, tokens=1, s=1024,
          lengths=(1024, 700), mode="poly", layout="queries", splits=None,
          grid=False, **kwargs):
  key = jax.random.key(dim * 7 + groups)
  b, kvh = 2, 2
  k = jax.random.normal(key, (b, kvh, s, dim)) * 2
  v = jax.random.normal(jax.random.key(2), (b, kvh, s, dim))
  cfg = cache_lib.CacheConfig(key_bits=bits, value_bits=bits,
                              key_method=method, window=window,
                              grid_centroids=grid)
  c = cache_lib.prefill(cache_lib.init(cfg, b, kvh, s, dim, key=key),
                        k, v, jnp.array(lengths, jnp.int32))
  q = jax.random.normal(jax.random.key(3), (b, tokens, kvh * groups, dim))
  ref = da.chunk_attention(q, c, c.lengths, impl="reference")
  try:
    out = da.chunk_attention(q, c, c.lengths, impl="pallas_gpu",
                             lookup_mode=mode, layout=layout, splits=splits,
                             **kwargs)
    err = float(jnp.max(jnp.abs(out - ref)) / jnp.max(jnp.abs(ref)))
    msg = f"rel err {err:.2e} {'OK' if err < 5e-3 else 'WRONG'}"
  except Exception as e:  # noqa: BLE001 - a probe reports every failure
    msg = f"FAIL {type(e).__name__}: {str(e)[:300]}"
  print(f"check D={dim:<3} G={groups} bits={bits:<3} {method:<4} w={window:<2}"
        f" T={tokens} {mode:<6} {layout:<7}{' grid' if grid else ''} {msg}",
        flush=True)


_REAL_LOOKUP = pallas_gpu.lookup
_REAL_DEQUANTIZE = pallas_gpu._dequantize_into  # pylint: disable=protected-access


def _bits_only_lookup(code, spec, mode):
  """Timing probe only (wrong values): codes to f16 by one bit operation,
  the floor of any centroid lookup that starts from the unpacked codes."""
  del spec, mode
  return jax.lax.bitcast_convert_type(code.astype(jnp.int16) | 0x6400,
                                      jnp.float16)


def _no_dequantize(*args, **kwargs):
  """Timing probe only (wrong values): leaves the K/V SMEM tiles as they
  are, so the time left is everything but unpacking and lookup."""
  del args, kwargs


def _time_variant(f, *args):
  """Median ms, or the failure.

  pallas_gpu._attention is jitted on its static arguments only, so a
  variant made by patching a module global must not find an earlier
  trace: every variant starts from empty caches.
  """
  jax.clear_caches()
  try:
    return kernel_bench.time_ms(f, *args, warmup=3, reps=20), ""
  except Exception as e:  # noqa: BLE001 - a probe reports every failure
    return None, f"FAIL {type(e).__name__}: {str(e)[:400]}"


def _interleaved(fns: dict, *args, rounds: int = 2) -> dict:
  """{name: [median ms of each round]}: every variant timed once a round,
  in turn (each compiled once: their options are static arguments), so the
  spread across rounds shows the device's noise. A variant that fails
  prints why and gets no times."""
  times = {name: [] for name in fns}
  for _ in range(rounds):
    for name, f in fns.items():
      try:
        times[name].append(kernel_bench.time_ms(f, *args, warmup=3, reps=20))
      except Exception as e:  # noqa: BLE001 - a probe reports failures
        print(f"{name} FAIL {type(e).__name__}: {str(e)[:300]}", flush=True)
  return times


def _ms(ts: list[float]) -> str:
  return " ".join(f"{t:.4f}" if t < 0.1 else f"{t:.3f}" for t in ts) + " ms"


def occupancy():
  """Programs of equal work: 128 (one per SM) against 256 and 512. Equal
  times mean 2 or 4 programs run at once on an SM, doubled times one."""
  s, d, kvh, splits = 131072, 128, 8, 16
  cfg = cache_lib.CacheConfig(key_bits=4, value_bits=4)
  for b in (1, 2, 4):
    c = kernel_bench.random_cache(jax.random.key(4), cfg, b, kvh, s, d)
    q = jax.random.normal(jax.random.key(0), (b, 32, d))
    f = jax.jit(lambda q, c: da.decode_attention(
        q, c, c.lengths, impl="pallas_gpu", splits=splits))
    t, err = _time_variant(f, q, c)
    print(f"occupancy B={b} programs={b * kvh * splits} "
          f"{t if t is None else round(t, 3)} ms {err}", flush=True)


def _cudnn_device_ms(b: int, s: int, d: int = 128) -> float:
  """cuDNN bf16 decode attention's device ms at B=b, S=s, 32/8 heads,
  D=d, separate K and V arrays (one array for both lets the value reads
  hit L2: 0.564 ms at B=8, S=128k against 1.0 with two)."""
  q, k, v = (jax.random.normal(jax.random.key(i), shape, jnp.bfloat16)
             for i, shape in ((0, (b, 1, 32, d)), (1, (b, s, 8, d)),
                              (2, (b, s, 8, d))))
  return _device_ms(lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, implementation="cudnn"), q, k, v)


def _device_timer(fn, *args, loops: int = 20):
  """fn(*args) compiled now as `loops` calls; returns a function giving
  the device ms of one call: the calls in a fori_loop timed by the wall
  clock, or with --gpu-clock written out and timed on the GPU's clock
  (timing.profiled_ms, as kernel_bench's gpu_timer: no loop iteration's
  own cost, which lands on calls of few kernels, NOTES.md session 15)."""
  gpu_clock = "--gpu-clock" in sys.argv
  compiled = timing.looped(fn, loops, unroll=gpu_clock).lower(
      *args).compile()
  if gpu_clock:
    return lambda: timing.profiled_ms(compiled, *args, warmup=2, reps=5,
                                      loops=loops)
  return lambda: timing.time_ms(compiled, *args, warmup=2, reps=5) / loops


def _device_ms(fn, *args, loops: int = 20) -> float:
  """_device_timer's time of one fn(*args) call, compiled and timed now."""
  return _device_timer(fn, *args, loops=loops)()


def _random_cache(bits, b: int = 8, s: int = 131072, d: int = 128,
                  grid: bool = False):
  """A full TurboQuant cache of random codes, 8 KV heads, D=d (grid: its
  codebooks on the grid, CacheConfig.grid_centroids)."""
  return kernel_bench.random_cache(
      jax.random.key(4), cache_lib.CacheConfig(
          key_bits=bits, value_bits=bits, grid_centroids=grid), b, 8, s, d)


def pipeline_depth():
  """Tiles in flight per program (stages) against splits and layouts, at
  B=8, S=128k: whether the kernel waits on HBM latency, not arithmetic."""
  q = jax.random.normal(jax.random.key(0), (8, 32, 128))
  for bits in (4, 3):
    c = _random_cache(bits)
    base = pallas_gpu.default_splits(c)
    runs = [("tokens", st, base) for st in (2, 3, 4, 6, 8)]
    runs += [("tokens", 4, base * 2), ("tokens", 4, base * 4),
             ("queries", 4, base), ("queries", 6, base),
             ("nodeq", 2, base), ("nodeq", 6, base)]
    if bits == 3:
      runs = runs[:5]
    for layout, stages, splits in runs:
      pallas_gpu._dequantize_into = (  # pylint: disable=protected-access
          _no_dequantize if layout == "nodeq" else _REAL_DEQUANTIZE)
      f = jax.jit(lambda q, c, layout=layout, splits=splits, stages=stages:
                  da.decode_attention(
                      q, c, c.lengths, impl="pallas_gpu", splits=splits,
                      stages=stages,
                      layout="queries" if layout == "queries" else "tokens"))
      t, err = _time_variant(f, q, c)
      print(f"bits={bits} {layout:<7} stages={stages} splits={splits:<3} "
            f"{t if t is None else round(t, 3)} ms {err}", flush=True)
    pallas_gpu._dequantize_into = _REAL_DEQUANTIZE  # pylint: disable=protected-access


def _cudnn(b, h, kvh, d, s):
  """A bf16 decode query [B, H, D] and cuDNN's median ms over bf16 K/V."""
  q = jax.random.normal(jax.random.key(0), (b, h, d), jnp.bfloat16)
  kb = jax.random.normal(jax.random.key(1), (b, s, kvh, d), jnp.bfloat16)
  vb = jax.random.normal(jax.random.key(2), (b, s, kvh, d), jnp.bfloat16)
  fn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
      q[:, None], k, v, implementation="cudnn"))
  cudnn = kernel_bench.time_ms(fn, q, kb, vb, warmup=3, reps=20)
  print(f"S={s:<7} cudnn_bf16 {cudnn:.3f} ms", flush=True)
  return q, cudnn


def tile_rows():
  """layout="tokens" with 64, 128 and 256 tokens per pipeline step:
  checks (2 splits of 512, so every size runs), then B=8, S=128k times."""
  print("jax", jax.__version__, jax.devices()[0].device_kind, flush=True)
  for rows in (128, 256):
    print(f"tile_rows={rows}", flush=True)
    for args in ((128, 4, 4), (128, 4, 3), (64, 8, 3), (128, 1, 3, "prod"),
                 (128, 4, 3.5), (256, 3, 2), (128, 4, 2.5)):
      check(*args, mode="poly16", layout="tokens", splits=2, tile_rows=rows)
    check(128, 8, 4, tokens=3, mode="poly16", layout="tokens", splits=2,
          tile_rows=rows)
    check(64, 4, 4, lengths=(1, 333), mode="poly16", layout="tokens",
          splits=2, tile_rows=rows)
  b, h, kvh, d, s = 8, 32, 8, 128, 131072
  q, cudnn = _cudnn(b, h, kvh, d, s)
  for bits in (4, 3, 2, 3.5, 2.5):
    cfg = cache_lib.CacheConfig(key_bits=bits, value_bits=bits)
    c = kernel_bench.random_cache(jax.random.key(4), cfg, b, kvh, s, d)
    base = pallas_gpu.default_splits(c)
    runs = [(64, base), (128, base), (256, base)]
    if bits == 4:
      runs += [(256, base * 2), (128, base * 2), (256, base // 2)]
    for rows, splits in runs:
      f = jax.jit(lambda q, c, splits=splits, rows=rows: da.decode_attention(
          q, c, c.lengths, impl="pallas_gpu", splits=splits, layout="tokens",
          tile_rows=rows))
      t, err = _time_variant(f, q.astype(jnp.float32), c)
      print(f"bits={bits:<3} rows={rows:<3} splits={splits:<3} "
            + (err if t is None else f"{t:.3f} ms x{cudnn / t:.2f} vs cudnn"),
            flush=True)


def diagnose():
  """What the time is spent on, at B=8, S=128k, 4 bits, 16 splits: each
  layout as it is, with codes turned to f16 by one bit operation instead of
  the centroid lookup ("bits"), and with no unpacking at all ("nodeq");
  the tokens layout also with 4 pipeline stages. (Its 64-query-column
  variant, measured once, is in results/kernel_bench/h200_v4/probes.txt.)"""
  splits = 16
  q = jax.random.normal(jax.random.key(0), (8, 32, 128))
  for bits in (4, 2):
    c = _random_cache(bits)
    runs = [(layout, v) for layout in ("tokens", "queries")
            for v in ("real", "bits", "nodeq")]
    runs += [("tokens", "stages4")]
    for layout, variant in runs if bits == 4 else runs[:3]:
      pallas_gpu.lookup = (_bits_only_lookup if variant == "bits"
                           else _REAL_LOOKUP)
      pallas_gpu._dequantize_into = (  # pylint: disable=protected-access
          _no_dequantize if variant == "nodeq" else _REAL_DEQUANTIZE)
      stages = 4 if variant == "stages4" else 2
      f = jax.jit(lambda q, c, layout=layout, stages=stages:
                  da.decode_attention(q, c, c.lengths, impl="pallas_gpu",
                                      splits=splits, layout=layout,
                                      stages=stages))
      t, err = _time_variant(f, q, c)
      print(f"bits={bits} {layout:<7} {variant:<7} splits={splits} "
            f"{t if t is None else round(t, 3)} ms {err}", flush=True)
    pallas_gpu.lookup = _REAL_LOOKUP
    pallas_gpu._dequantize_into = _REAL_DEQUANTIZE  # pylint: disable=protected-access


_V5_VARIANTS = {
    "v4": {},
    "prmt": dict(lookup_mode="prmt"),
    "key_regs": dict(key_registers=True),
    "transpose_p": dict(transpose_p=True),
    "all_three": dict(lookup_mode="prmt", key_registers=True,
                      transpose_p=True),
}


def v5():
  """The device-only options of layout="tokens" that lower but have not
  run: the byte-permute lookup, keys as a register wgmma operand, Pᵀ
  through a transposed view (V tiles with 128-byte rows). Checks each, then
  times each at B=8, S=128k (16 splits) against v4 as it is."""
  print("jax", jax.__version__, jax.devices()[0].device_kind, flush=True)
  for name, options in list(_V5_VARIANTS.items())[1:]:
    mode = options.get("lookup_mode", "poly16")
    extra = {k: v for k, v in options.items() if k != "lookup_mode"}
    print(f"variant {name}", flush=True)
    for args in ((128, 4, 4), (64, 8, 4), (128, 4, 3.5), (128, 1, 3, "prod")):
      check(*args, mode=mode, layout="tokens", **extra)
    check(128, 8, 4, tokens=3, mode=mode, layout="tokens", **extra)
  q = jax.random.normal(jax.random.key(0), (8, 32, 128))
  for bits in (4, 3, 2):
    c = _random_cache(bits)
    for name, options in _V5_VARIANTS.items():
      f = jax.jit(lambda q, c, options=options: da.decode_attention(
          q, c, c.lengths, impl="pallas_gpu", splits=16, **options))
      t, err = _time_variant(f, q, c)
      print(f"bits={bits} {name:<11} {t if t is None else round(t, 3)} ms "
            f"{err}", flush=True)


_V6_VARIANTS = {
    "v4": dict(lookup_mode="poly16", key_registers=False, transpose_p=False),
    "prmt": dict(lookup_mode="prmt", key_registers=False, transpose_p=False),
    "prmt_kr": dict(lookup_mode="prmt", key_registers=True,
                    transpose_p=False),
    "default": {},        # prmt, key_registers and transpose_p
}


def v6():
  """The 3-bit byte-permute lookup checked on the device (as the defaults,
  prmt with key_registers and transpose_p), then the variants timed at
  B=8, S=128k, 16 splits, in two interleaved rounds (static options: no
  cache clearing needed, so each variant compiles once)."""
  print("jax", jax.__version__, jax.devices()[0].device_kind, flush=True)
  for args in ((128, 4, 3), (64, 8, 3), (256, 2, 3), (64, 3, 3),
               (128, 4, 2.5), (128, 4, 3.5), (128, 1, 3, "prod")):
    check(*args, mode="prmt", layout="tokens")
  check(128, 4, 3, window=5, mode="prmt", layout="tokens")
  check(128, 8, 3, tokens=3, mode="prmt", layout="tokens")
  check(64, 4, 3, lengths=(1, 333), mode="prmt", layout="tokens")
  _, cudnn = _cudnn(8, 32, 8, 128, 131072)
  q = jax.random.normal(jax.random.key(0), (8, 32, 128))
  for bits in (3, 4, 2, 3.5, 2.5):
    c = _random_cache(bits)
    fns = {name: jax.jit(lambda q, c, options=options: da.decode_attention(
        q, c, c.lengths, impl="pallas_gpu", splits=16, **options))
           for name, options in _V6_VARIANTS.items()}
    for name, ts in _interleaved(fns, q, c).items():
      if ts:
        print(f"bits={bits:<3} {name:<8} {_ms(ts)}  x{cudnn / min(ts):.2f} "
              "vs cudnn", flush=True)


def norms():
  """Norms read by the kernel as stored (f16) against converted to f32 by
  XLA first: checks with the defaults, then both timed at B=8, S=128k
  (16 splits) in two interleaved rounds."""
  print("jax", jax.__version__, jax.devices()[0].device_kind, flush=True)
  for args in ((128, 4, 4), (64, 3, 3), (128, 1, 3, "prod"), (128, 4, 3.5)):
    check(*args, mode="prmt", layout="tokens")
  check(128, 4, 3, window=5, tokens=3, mode="prmt", layout="tokens")
  _, cudnn = _cudnn(8, 32, 8, 128, 131072)
  q = jax.random.normal(jax.random.key(0), (8, 1, 32, 128))
  scale = 128 ** -0.5

  def run(q, c, as_stored):
    inp = parts.prepare(q, c, c.lengths, scale, norms_as_stored=as_stored)
    acc, m, l = pallas_gpu_tokens.fused_attention(
        inp, splits=16, lookup_mode="prmt", key_registers=True,
        transpose_p=True)
    return parts.finish(acc, m, l, q, c, c.lengths, scale)
  for bits in (4, 3):
    c = _random_cache(bits)
    fns = {name: jax.jit(functools.partial(run, as_stored=stored))
           for name, stored in (("f16 norms", True), ("f32 norms", False))}
    for name, ts in _interleaved(fns, q, c).items():
      if ts:
        print(f"bits={bits} {name}: {_ms(ts)}  x{cudnn / min(ts):.2f} vs "
              "cudnn", flush=True)


def _partial_cache(bits, b, kvh, capacity, d, length):
  """A random cache of `capacity` tokens of which `length` are live."""
  c = kernel_bench.random_cache(
      jax.random.key(4), cache_lib.CacheConfig(key_bits=bits,
                                               value_bits=bits),
      b, kvh, capacity, d)
  return dataclasses.replace(c, lengths=jnp.full((b,), length, jnp.int32))


def next_checks():
  """The next device call's plan: skip_empty_splits checked on caches
  filled below capacity, then timed at capacity 128k with 8k live tokens
  (B=8) against it off and against cuDNN over the 8k live tokens; then
  split counts at B=8, S=128k and at the SmolLM2 decode shape (B=32, 3 KV
  heads, 9 query heads, D=64, capacity 9216), each timed twice."""
  print("jax", jax.__version__, jax.devices()[0].device_kind, flush=True)
  for args, lengths in (((128, 4, 4), (1, 700)), ((64, 3, 3), (0, 513)),
                        ((128, 1, 3, "prod"), (64, 65))):
    check(*args, mode="prmt", layout="tokens", lengths=lengths, splits=8,
          skip_empty_splits=True)
  check(128, 4, 3, window=8, tokens=3, mode="prmt", layout="tokens",
        lengths=(5, 300), splits=8, skip_empty_splits=True)
  q = jax.random.normal(jax.random.key(0), (8, 32, 128))
  _, cudnn = _cudnn(8, 32, 8, 128, 8192)
  c = _partial_cache(4, 8, 8, 131072, 128, 8192)
  fns = {skip: jax.jit(lambda q, c, skip=skip: da.decode_attention(
      q, c, c.lengths, impl="pallas_gpu", skip_empty_splits=skip))
         for skip in (False, True)}
  for skip, ts in _interleaved(fns, q, c).items():
    if ts:
      print(f"capacity 128k, 8k live, 4 bits, skip_empty_splits={skip}: "
            f"{_ms(ts)}  x{cudnn / min(ts):.2f} vs cudnn over the 8k live "
            "tokens", flush=True)
  shapes = ((8, 32, 8, 128, 131072, (16, 32, 64)),
            (32, 9, 3, 64, 9216, (8, 16, 48, 72)))
  for b, h, kvh, d, s, split_counts in shapes:
    q = jax.random.normal(jax.random.key(0), (b, h, d))
    for bits in (4, 3):
      c = _partial_cache(bits, b, kvh, s, d, s)
      fns = {n: jax.jit(lambda q, c, n=n: da.decode_attention(
          q, c, c.lengths, impl="pallas_gpu", splits=n))
             for n in split_counts}
      for n, ts in _interleaved(fns, q, c).items():
        print(f"B={b} S={s} D={d} bits={bits} splits={n}: {_ms(ts)}",
              flush=True)


def split_counts(b=32, counts4=(4, 8, 16, 24, 48), counts3=(8, 16, 48)):
  """Device time per decode-attention call (timing.time_loop_ms, 20
  calls a loop) at the SmolLM2 decode shape (batch b, 9 query / 3 KV
  heads, D=64, capacity 9216, 8192 live) for the given split counts,
  beside the full bf16 cache's xla and cudnn paths.
  """
  print("jax", jax.__version__, jax.devices()[0].device_kind, flush=True)
  h, kvh, d, cap, live = 9, 3, 64, 9216, 8192
  q = jax.random.normal(jax.random.key(0), (b, h, d), jnp.bfloat16)
  loop = lambda f, *a: timing.time_loop_ms(f, *a, loops=20, warmup=1,
                                           reps=5)
  full = cache_lib.init(cache_lib.CacheConfig(kind="full", dtype="bfloat16"),
                        b, kvh, cap, d)
  full = dataclasses.replace(full, lengths=jnp.full((b,), live, jnp.int32))
  for impl in ("xla", "cudnn"):
    t = loop(lambda q, c, impl=impl: da.decode_attention(
        q, c, c.lengths, impl=impl), q, full)
    print(f"full bf16 {impl}: {t * 1e3:.1f} us", flush=True)
  del full
  for bits, counts in ((4, counts4), (3, counts3)):
    c = _partial_cache(bits, b, kvh, cap, d, live)
    print(f"bits={bits} default splits {pallas_gpu.default_splits(c)}",
          flush=True)
    for n in counts:
      t = loop(lambda q, c, n=n: da.decode_attention(
          q, c, c.lengths, impl="pallas_gpu", splits=n), q, c)
      print(f"bits={bits} splits={n}: {t * 1e3:.1f} us", flush=True)


def layer_steps():
  """Device time of one decode layer's cache work at the SmolLM2 shape:
  append a token (XLA or the fused kernel), then attend (20 steps a jitted
  loop, the cache carried and donated so the writes are in place), full
  bf16 against TurboQuant.
  """
  print("jax", jax.__version__, jax.devices()[0].device_kind, flush=True)
  for b in (32, 1):
    _layer_steps(b)


def _layer_steps(b):
  variants = (("full", "xla", "xla", {}), ("full", "cudnn", "xla", {}),
              (4, None, "xla", {}),
              (4, None, "pallas_gpu", dict(rotate_in_kernel=False)),
              (4, None, "pallas_gpu", dict(combine="columns",
                                           rotate_in_kernel=False)),
              (4, None, "pallas_gpu", {}),
              (3, None, "pallas_gpu", dict(rotate_in_kernel=False)),
              (3, None, "pallas_gpu", dict(combine="columns",
                                           rotate_in_kernel=False)),
              (3, None, "pallas_gpu", {}))
  for bits, impl, append_impl, opts in variants:
    try:
      us = _layer_us(b, bits, impl, append_impl, opts)
      print(f"B={b} layer {bits} attention {impl} append {append_impl} "
            f"{opts}: {us:.1f} us per step", flush=True)
    except Exception as e:  # noqa: BLE001 - a probe reports failures
      print(f"layer {bits} {impl} {append_impl} FAIL {type(e).__name__}: "
            f"{str(e)[:600]}", flush=True)


def _layer_us(b, bits, impl, append_impl, opts) -> float:
  """Device µs of one SmolLM2 layer's decode cache work (append, attend)."""
  h, kvh, d, cap, live, steps = 9, 3, 64, 9216, 8172, 20
  q = jax.random.normal(jax.random.key(0), (b, h, d), jnp.bfloat16)
  k = jax.random.normal(jax.random.key(1), (b, kvh, 1, d), jnp.bfloat16)
  if bits == "full":
    c = cache_lib.init(cache_lib.CacheConfig(kind="full", dtype="bfloat16"),
                       b, kvh, cap, d)
  else:
    c = _partial_cache(bits, b, kvh, cap, d, live)
  c = jax.tree.map(jnp.copy, c)          # no leaf shares a buffer (donated)

  def body(_, carry):
    q, c = carry
    if append_impl == "fused":         # one launch: append and attend
      o, c = pallas_gpu.append_attention(q[:, None], k, k, c, **opts)
      return q + (o[0, 0, 0, 0] * 0).astype(q.dtype), c
    if append_impl == "xla":
      c = cache_lib.append(c, k, k)
    else:
      c = turboquant_cache.append(c, k, k, impl=append_impl)
    o = da.decode_attention(q, c, c.lengths, impl=impl, **opts)
    return q + (o[0, 0, 0] * 0).astype(q.dtype), c

  fn = jax.jit(lambda q, c: jax.lax.fori_loop(0, steps, body, (q, c)),
               donate_argnums=1)
  reset = lambda s: (s[0], dataclasses.replace(
      s[1], lengths=jnp.full((b,), live, jnp.int32)))
  ms, _ = timing.time_in_place_ms(lambda s: fn(*s), (q, c), reset,
                                  warmup=1, reps=5)
  return ms / steps * 1e3


_APPEND_CHECKS = ((64, 4, 4, "float16"), (128, 3, 2, "bfloat16"),
                  (256, 4, 1, "float32"), (64, 2.5, 3.5, "float16"),
                  (128, 3.5, 2.5, "bfloat16"), (64, 3.5, 4, "float32"))


def _split_cases(cases, bits_of, split_only: bool):
  """cases, or with split_only those with a fractional width."""
  return [c for c in cases if not split_only
          or any(b % 1 for b in bits_of(c))]


def fused_append(split_only: bool = False, checks_only: bool = False,
                 grid: bool = False):
  """The fused quantize-and-append kernel on the device: checked against
  the XLA path (bytes that differ, largest norm difference) on prefilled
  caches with ragged lengths, then each path's device time per append (20
  a jitted loop, in place) at the SmolLM2 shape and at B=8, D=128, of
  integer widths and of the outlier split (2.5, 3.5 bits). split_only:
  the outlier split's checks alone; checks_only: no times; grid: the
  checks' codebooks on the grid (CacheConfig.grid_centroids)."""
  print("jax", jax.__version__, jax.devices()[0].device_kind, flush=True)
  for d, kb, vb, norm_dtype in _split_cases(
      _APPEND_CHECKS, lambda c: c[1:3], split_only):
    cfg = cache_lib.CacheConfig(key_bits=kb, value_bits=vb,
                                norm_dtype=norm_dtype, grid_centroids=grid)
    c = cache_lib.init(cfg, 4, 2, 64, d, key=jax.random.key(d))
    x = jax.random.normal(jax.random.key(1), (4, 2, 64, d))
    c = cache_lib.prefill(c, x, -x, jnp.array([0, 5, 63, 64], jnp.int32))
    t = jax.random.normal(jax.random.key(2), (4, 2, 1, d), jnp.bfloat16)
    runs = {impl: jax.jit(lambda c, t, impl=impl: turboquant_cache.append(
        c, t, t * 2, impl=impl))(c, t) for impl in ("xla", "pallas_gpu")}
    try:
      pairs = list(zip(quantize_append.stored_parts(runs["xla"]),
                       quantize_append.stored_parts(runs["pallas_gpu"])))
      codes = sum(int(jnp.sum(x.codes != y.codes)) for x, y in pairs)
      norms = max(float(jnp.max(jnp.abs(x.norms.astype(jnp.float32)
                                        - y.norms.astype(jnp.float32))))
                  for x, y in pairs)
      print(f"check D={d} bits={kb}/{vb} {norm_dtype}: {codes} bytes differ, "
            f"max norm diff {norms:.2e}", flush=True)
    except Exception as e:  # noqa: BLE001 - a probe reports failures
      print(f"check D={d} FAIL {type(e).__name__}: {str(e)[:600]}",
            flush=True)
  if checks_only:
    return
  for b, kvh, d, cap in ((32, 3, 64, 9216), (8, 8, 128, 32768)):
    for bits in (4, 3, 2.5, 3.5):
      c = jax.tree.map(jnp.copy, _partial_cache(bits, b, kvh, cap, d, 100))
      t = jax.random.normal(jax.random.key(3), (b, kvh, 1, d), jnp.bfloat16)
      for impl in ("xla", "pallas_gpu"):
        def appends(c, impl=impl):
          one = lambda _, c: turboquant_cache.append(
              dataclasses.replace(c, lengths=jnp.full((b,), 100, jnp.int32)),
              t, t, impl=impl)
          return jax.lax.fori_loop(0, 20, one, c)
        fn = jax.jit(appends, donate_argnums=0)
        try:
          ms, c = timing.time_in_place_ms(fn, c, lambda c: c, warmup=1,
                                          reps=5)
          print(f"append B={b} K={kvh} D={d} bits={bits} {impl}: "
                f"{ms / 20 * 1e3:.1f} us", flush=True)
        except Exception as e:  # noqa: BLE001 - a probe reports failures
          print(f"append {impl} FAIL {type(e).__name__}: {str(e)[:600]}",
                flush=True)


def rotation_options():
  """combine="columns" and rotate_in_kernel checked against the reference
  on the device (D 64/128, GQA 3/4/8, a chunk, empty splits; prod keys and
  a window, which fall back), then B=1 attention alone with each option
  (default splits: 48 there), then --layer's times."""
  print("jax", jax.__version__, jax.devices()[0].device_kind, flush=True)
  for opts in (dict(combine="columns", rotate_in_kernel=False),
               dict(rotate_in_kernel=True)):
    print(opts, flush=True)
    for dim, groups, bits, tokens, lengths in (
        (64, 3, 4, 1, (1024, 700)), (128, 4, 3, 1, (1024, 3)),
        (64, 8, 2, 1, (1, 1000)), (128, 4, 4, 3, (700, 1024))):
      check(dim, groups, bits, tokens=tokens, lengths=lengths,
            mode="prmt", layout="tokens", splits=4, **opts)
    check(64, 4, 3, method="prod", mode="prmt", layout="tokens", **opts)
    check(64, 4, 4, window=16, mode="prmt", layout="tokens", **opts)
  b, h, kvh, d, cap, live = 1, 9, 3, 64, 9216, 8192
  q = jax.random.normal(jax.random.key(0), (b, h, d), jnp.bfloat16)
  for bits in (4, 3):
    c = _partial_cache(bits, b, kvh, cap, d, live)
    for opts in (dict(rotate_in_kernel=False),
                 dict(combine="columns", rotate_in_kernel=False),
                 dict(rotate_in_kernel=True),
                 dict(rotate_in_kernel=True, stages=3)):
      t = timing.time_loop_ms(lambda q, c, opts=opts: da.decode_attention(
          q, c, c.lengths, impl="pallas_gpu", **opts), q, c, loops=20,
                              warmup=1, reps=5)
      print(f"B=1 attention bits={bits} {opts}: {t * 1e3:.1f} us",
            flush=True)
  layer_steps()


def append_attention_checks(options: dict | None = None,
                            split_only: bool = False,
                            checks_only: bool = False, grid: bool = False):
  """pallas_gpu.append_attention on the device: output against the
  reference over the XLA-appended cache, bytes written against XLA's
  (ragged lengths: empty, mid, full), then one SmolLM2 decode layer's
  device µs, append kernel + attention kernel against the fused launch,
  two interleaved rounds at B = 1 and 32. options: append_attention's
  (e.g. auto_barriers=False): the checks use them, and the timings add
  the fused launch with them. Integer widths and the outlier split (2.5,
  3.5 bits: parts of 32 at D = 64, of 64 at D = 128). split_only: the
  split's checks alone; checks_only: no times; grid: the caches' codebooks
  on the grid (CacheConfig.grid_centroids), for the checks."""
  options = options or {}
  print("jax", jax.__version__, jax.devices()[0].device_kind, flush=True)
  for dim, groups, bits in _split_cases(
      ((64, 3, 4), (64, 3, 3), (128, 4, 4), (64, 8, 2), (64, 3, 2.5),
       (64, 8, 3.5), (128, 4, 3.5)), lambda c: c[2:], split_only):
    cap, b, kvh = 1024, 3, 2
    keys = jax.random.split(jax.random.key(int(dim + 2 * bits)), 6)
    c = cache_lib.init(cache_lib.CacheConfig(key_bits=bits, value_bits=bits,
                                             grid_centroids=grid),
                       b, kvh, cap, dim, key=keys[0])
    c = cache_lib.prefill(
        c, jax.random.normal(keys[1], (b, kvh, cap, dim)),
        jax.random.normal(keys[2], (b, kvh, cap, dim)),
        jnp.array([0, 700, cap], jnp.int32))
    q = jax.random.normal(keys[3], (b, 1, kvh * groups, dim))
    kn, vn = (jax.random.normal(x, (b, kvh, 1, dim)) for x in keys[4:])
    try:
      want_cache = jax.jit(lambda c, k, v: turboquant_cache.append(
          c, k, v, impl="xla"))(c, kn, vn)
      want = da.chunk_attention(q, want_cache, want_cache.lengths,
                                impl="reference")
      # Under jit: eagerly, a full sequence is an error (cache full).
      got, got_cache = jax.jit(functools.partial(
          pallas_gpu.append_attention, **options))(q, kn, vn, c)
      err = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
      differ = sum(int(jnp.sum(x.codes != y.codes)) for x, y in zip(
          quantize_append.stored_parts(got_cache),
          quantize_append.stored_parts(want_cache)))
      same_len = bool(jnp.all(got_cache.lengths == want_cache.lengths))
      ok = err < 5e-3 and differ <= 2 and same_len
      print(f"check D={dim} G={groups} bits={bits}: rel err {err:.2e}, "
            f"{differ} code bytes differ, lengths "
            f"{'equal' if same_len else 'DIFFER'} "
            f"{'OK' if ok else 'WRONG'}", flush=True)
    except Exception as e:  # noqa: BLE001 - a probe reports failures
      print(f"check D={dim} G={groups} bits={bits} FAIL "
            f"{type(e).__name__}: {str(e)[:600]}", flush=True)
  if checks_only:
    return
  for b in (1, 32):
    for rnd, bits in itertools.product(range(2), (4, 2.5, 3.5)):
      variants = [("pallas_gpu", {}), ("fused", {})]
      variants += [("fused", options)] if options else []
      for append_impl, opts in variants:
        try:
          us = _layer_us(b, bits, None, append_impl, opts)
          print(f"B={b} round {rnd} {bits}-bit append {append_impl} "
                f"{opts}: {us:.1f} us", flush=True)
        except Exception as e:  # noqa: BLE001 - a probe reports failures
          print(f"B={b} 4-bit append {append_impl} FAIL "
                f"{type(e).__name__}: {str(e)[:600]}", flush=True)


# The kernel before session 11 (16 query columns, the library exp, Mosaic
# GPU's automatic barriers), each change alone, and all three (today's
# defaults).
_BEFORE = dict(min_columns=16, approx_math=False, auto_barriers=True)
_SKELETON_VARIANTS = {
    "before": _BEFORE,
    "cols8": dict(_BEFORE, min_columns=8),
    "approx": dict(_BEFORE, approx_math=True),
    "nobar": dict(_BEFORE, auto_barriers=False),
    "all": {},
}


def _device_rounds(variants: dict, q, c, rounds: int = 2) -> dict:
  """{name: [device ms of each round]} of decode_attention(q, c) with each
  variant's options (_device_ms, 20 calls), the variants
  interleaved; a variant that fails prints why and gets no times."""
  times = {name: [] for name in variants}
  for _ in range(rounds):
    for name, options in variants.items():
      try:
        times[name].append(_device_ms(
            lambda q, c, options=options: da.decode_attention(
                q, c, c.lengths, impl="pallas_gpu", **options), q, c))
      except Exception as e:  # noqa: BLE001 - a probe reports failures
        print(f"{name} FAIL {type(e).__name__}: {str(e)[:300]}", flush=True)
  return times


def skeleton():
  """The per-tile work besides the lookup (NOTES.md, session 11): 8 query
  columns instead of 16, exp as ex2.approx, no automatic barriers. Checks
  "all" on many shapes (twice each, other lengths: a race shows as a
  changing error), each option alone on one, then device time at B=8,
  32/8 heads, D=128 (S=32k and 128k at 4 bits, 128k at 3, 2 and 3.5),
  variants interleaved in two rounds, beside cuDNN bf16."""
  print("jax", jax.__version__, jax.devices()[0].device_kind, flush=True)
  skeleton_checks()
  for name, options in list(_SKELETON_VARIANTS.items())[1:4]:
    print(f"alone: {name}", flush=True)
    check(128, 4, 4, mode="prmt", layout="tokens", **options)
  skeleton_times()


def skeleton_checks():
  """Today's defaults against the reference on 10 shapes, twice each with
  other lengths (a race between warps shows as a changing error)."""
  every = dict(min_columns=8, approx_math=True, auto_barriers=False)
  for lengths in ((1024, 700), (333, 1)):
    for args in ((128, 4, 4), (64, 8, 3), (256, 2, 2), (128, 3, 4),
                 (64, 1, 4), (128, 4, 3.5), (128, 4, 2.5),
                 (128, 1, 3, "prod")):
      check(*args, mode="prmt", layout="tokens", lengths=lengths, **every)
    check(128, 4, 4, window=5, mode="prmt", layout="tokens",
          lengths=lengths, **every)
    check(128, 8, 4, tokens=3, mode="prmt", layout="tokens",
          lengths=lengths, **every)


def skeleton_times(shapes=((32768, (4,)), (131072, (4, 3, 2, 3.5))),
                   variants=None):
  """Device time of the skeleton variants at B=8, 32/8 heads, D=128 for
  each (S, widths), interleaved in two rounds, beside cuDNN bf16."""
  for s, bits_list in shapes:
    cudnn = _cudnn_device_ms(8, s)
    print(f"S={s} cudnn device time {cudnn:.3f} ms", flush=True)
    q = jax.random.normal(jax.random.key(0), (8, 32, 128))
    for bits in bits_list:
      c = _random_cache(bits, 8, s)
      times = _device_rounds(variants or _SKELETON_VARIANTS, q, c)
      for name, ts in times.items():
        if ts:
          print(f"S={s} bits={bits:<3} {name:<8} {_ms(ts)}  "
                f"x{cudnn / min(ts):.2f} vs cudnn", flush=True)
      del c


def skeleton_tune():
  """With the three skeleton options on: stages, splits and 128-token
  steps at B=8, S=128k, 4 bits, device time, two interleaved rounds."""
  print("jax", jax.__version__, jax.devices()[0].device_kind, flush=True)
  variants = {"all": {}, "stages3": dict(stages=3),
              "splits32": dict(splits=32), "splits8": dict(splits=8),
              "rows128": dict(tile_rows=128),
              "nokeyregs": dict(key_registers=False)}
  q = jax.random.normal(jax.random.key(0), (8, 32, 128))
  times = _device_rounds(variants, q, _random_cache(4))
  for name, ts in times.items():
    if ts:
      print(f"S=131072 bits=4 {name:<9} {_ms(ts)}", flush=True)


def skeleton_rows():
  """With the three skeleton options on: 64- against 128-token pipeline
  steps over several batch sizes, lengths and widths (B, 32 query / 8 KV
  heads, D=128), device time, two interleaved rounds."""
  print("jax", jax.__version__, jax.devices()[0].device_kind, flush=True)
  variants = {"rows64": {}, "rows128": dict(tile_rows=128)}
  for b, s, bits_list in ((8, 32768, (4, 2)), (8, 131072, (3, 2, 3.5)),
                          (1, 131072, (4, 3.5)), (1, 16384, (4, 3.5)),
                          (32, 32768, (4,))):
    q = jax.random.normal(jax.random.key(0), (b, 32, 128))
    for bits in bits_list:
      c = _random_cache(bits, b, s)
      times = _device_rounds(variants, q, c)
      print(f"B={b:<2} S={s:<6} bits={bits:<3} " + "  ".join(
          f"{name} {_ms(ts)}" for name, ts in times.items()), flush=True)
      del c


def compare(variants: dict, shapes=((8, 131072, (4, 3.5)),),
            checks: bool = True) -> None:
  """Each named set of options (and today's defaults, "defaults") checked
  on 15 shapes (D 128/64/256, GQA 4/8/1/3/2, 4, 3, 3.5, 2, 2.5 bits, prod
  keys, a chunk of 3, the rotation outside the kernel at D = 64, the
  outlier split's parts of 32 at D = 64 with a window; a
  variant's options override a shape's), then device time for each (B,
  S, widths[, D]) of `shapes` (32/8 heads, D=128 unless given) beside
  cuDNN bf16, two interleaved rounds."""
  print("jax", jax.__version__, jax.devices()[0].device_kind, flush=True)
  variants = {"defaults": {}, **variants}
  for name, options in variants.items() if checks else ():
    print(f"checks: {name} {options}", flush=True)
    options = dict(options)
    mode = options.pop("lookup_mode", "prmt")
    for args, kwargs in (((128, 4, 4), {}), ((64, 8, 3),
                                             dict(lengths=(333, 1))),
                         ((128, 4, 3.5), dict(tokens=3)),
                         ((128, 1, 3, "prod"), {}),
                         ((64, 3, 4), dict(lengths=(1000, 65))),
                         ((128, 4, 2), dict(lengths=(512, 1000))),
                         ((128, 2, 2.5), dict(lengths=(200, 64))),
                         ((64, 4, 4), dict(rotate_in_kernel=False)),
                         ((64, 4, 2), dict(rotate_in_kernel=False,
                                           lengths=(1024, 129))),
                         ((256, 4, 2.5), dict(lengths=(700, 1024))),
                         ((256, 2, 4), dict(lengths=(1024, 333))),
                         ((256, 3, 3), dict(lengths=(65, 1024))),
                         # The outlier split at D = 64: parts of 32.
                         ((64, 3, 2.5), dict(lengths=(1000, 333))),
                         ((64, 8, 3.5), dict(lengths=(1, 1024))),
                         ((64, 2, 3.5), dict(tokens=3, window=5,
                                             lengths=(1024, 77)))):
      check(*args, mode=mode, layout="tokens", **{**kwargs, **options})
  for b, s, bits_list, *d in shapes:
    d = d[0] if d else 128
    cudnn = _cudnn_device_ms(b, s, d)
    q = jax.random.normal(jax.random.key(0), (b, 32, d))
    for bits in bits_list:
      c = _random_cache(bits, b, s, d)
      times = _device_rounds(variants, q, c)
      print(f"B={b:<2} S={s:<6} bits={bits:<3} "
            f"{f'D={d} ' if d != 128 else ''}cudnn {cudnn:.3f}  " +
            "  ".join(f"{name} {_ms(ts)} (x{cudnn / min(ts):.2f})"
                      for name, ts in times.items() if ts), flush=True)
      del c


def _variant_rows(shapes, variants: dict, prepare, rounds: int = 2) -> None:
  """Prints, for each (B, S, widths) of `shapes` (32/8 heads, D=128) and
  width, cuDNN bf16's device time and each variant's, interleaved rounds
  (kernel_bench.interleaved_rounds): prepare(value, cache) sets a variant
  up (a module global, say) and returns the cache to attend, or None to
  skip it there. Each variant is compiled once, right after its prepare
  (jit caches cleared first, so a patched global is compiled in)."""
  attend = lambda q, c: da.decode_attention(q, c, c.lengths,
                                            impl="pallas_gpu")
  loops = 20
  for b, s, bits_list in shapes:
    cudnn = _cudnn_device_ms(b, s)
    q = jax.random.normal(jax.random.key(0), (b, 32, 128))
    for bits in bits_list:
      base_cache = _random_cache(bits, b, s)
      timers = {}
      for name, value in variants.items():
        c = prepare(value, base_cache)
        if c is None:
          continue
        jax.clear_caches()
        timers[name] = _device_timer(attend, q, c, loops=loops)
      times, errors = kernel_bench.interleaved_rounds(timers, rounds)
      print(f"B={b:<2} S={s:<6} bits={bits:<3} cudnn {cudnn:.3f}  " +
            "  ".join(f"{name} {_ms(ts)} (x{cudnn / min(ts):.2f})"
                      for name, ts in times.items() if ts) +
            "".join(f"  {name} FAIL {e}" for name, e in errors.items()),
            flush=True)
      del base_cache


def split_fold(shapes=((1, 16384, (3.5, 2.5)), (1, 32768, (3.5, 2.5)),
                       (1, 65536, (3.5,)), (8, 16384, (3.5,)),
                       (8, 131072, (3.5, 2.5)))) -> None:
  """Outlier-split caches with their folded rotations stored (one XLA
  product each way, split.folded_rotation; the default) against without
  (parts.prepare / finish then derive them in each call, a scatter per
  tensor; session 12's "unfolded" times in results/kernel_bench/h200_v8/
  probes.txt were the per-part path since removed: a gather, two products
  and two scatters): checks on 4 shapes, then device time beside cuDNN
  bf16 (32/8 heads, D=128), two interleaved rounds."""
  print("jax", jax.__version__, jax.devices()[0].device_kind, flush=True)
  for args in ((128, 4, 3.5), (128, 4, 2.5), (64, 8, 3.5),
               (128, 1, 3.5, "prod")):
    check(*args, mode="prmt", layout="tokens")
  _variant_rows(shapes, {"folded": False, "unfolded": True},
                lambda unfold, c: dataclasses.replace(
                    c, key_split_rotation=None, value_split_rotation=None)
                if unfold else c)


def split_xla(shapes=((1, 16384, (3.5, 2.5)), (1, 32768, (3.5,)),
                      (8, 16384, (3.5,)))) -> None:
  """The XLA work around the kernel of an outlier-split cache: the folded
  rotations' products at each einsum precision (parts.
  SPLIT_ROTATION_PRECISION), alone and in the whole call (since session
  14 the call's products are sums up to parts.FOLDED_REDUCE_MAX_ROWS
  query rows, where the precision no longer applies); checks on 3
  shapes per precision, then device time beside cuDNN bf16 and a 4-bit
  cache (one rotation, no split), two interleaved rounds."""
  print("jax", jax.__version__, jax.devices()[0].device_kind, flush=True)
  hi = jax.lax.Precision
  precisions = {"highest": hi.HIGHEST, "high": hi.HIGH, "default": hi.DEFAULT}
  for b in (1, 8):
    qh = jax.random.normal(jax.random.key(0), (b, 8, 4, 128))
    rot = jax.random.normal(jax.random.key(1), (8, 128, 128))
    exact = jnp.einsum("bkmd,ked->bkme", qh, rot, precision=hi.HIGHEST)
    for name, p in precisions.items():
      f = lambda q, r, p=p: jnp.einsum("bkmd,ked->bkme", q, r, precision=p)
      err = float(jnp.max(jnp.abs(jax.jit(f)(qh, rot) - exact))
                  / jnp.max(jnp.abs(exact)))
      t = timing.time_loop_ms(f, qh, rot, loops=20, warmup=2, reps=5)
      print(f"einsum B={b} {name:<8} {t * 1e3:.1f} us  rel err {err:.1e}",
            flush=True)
  for name, p in precisions.items():
    parts.SPLIT_ROTATION_PRECISION = p
    jax.clear_caches()
    print(f"checks: {name}", flush=True)
    for args in ((128, 4, 3.5), (128, 4, 2.5), (128, 1, 3.5, "prod")):
      check(*args, mode="prmt", layout="tokens")

  def prepare(precision, c):
    if precision != hi.HIGHEST and c.key_split_rotation is None:
      return None                    # a 4-bit cache has no split product
    parts.SPLIT_ROTATION_PRECISION = precision
    return c
  _variant_rows([(b, s, (4, *bits)) for b, s, bits in shapes], precisions,
                prepare)
  parts.SPLIT_ROTATION_PRECISION = hi.HIGHEST


def lookup_pipes(shapes=((8, 131072, (4, 2, 3)), (32, 32768, (4, 2)),
                         (1, 16384, (4, 2)))) -> None:
  """The byte-permute lookup's PTX with integer work moved to the FMA pipe
  (prmt_lookup.FMA_PIPE, the default) against session 12's: checks of
  both on 4 shapes (2, 3, 4 bits and a split), then device time beside
  cuDNN bf16 (32/8 heads, D=128), two interleaved rounds (each variant
  recompiled: the PTX is a module constant)."""
  # pylint: disable-next=g-import-not-at-top
  from turboquant_jax.kernels.decode_attention import prmt_lookup
  print("jax", jax.__version__, jax.devices()[0].device_kind, flush=True)
  variants = {"fma": True, "alu": False}
  for name, value in variants.items():
    prmt_lookup.FMA_PIPE = value
    jax.clear_caches()
    print(f"checks: {name}", flush=True)
    for args in ((128, 4, 4), (128, 4, 2), (64, 8, 3), (128, 4, 3.5)):
      check(*args, mode="prmt", layout="tokens")

  def prepare(value, c):
    prmt_lookup.FMA_PIPE = value
    return c
  _variant_rows(shapes, variants, prepare)
  prmt_lookup.FMA_PIPE = True


def _variadic_merge(m, l, acc, d_axis):
  """parts.merge_splits as one variadic reduce whose combiner rescales
  both sides to their larger max (tried in session 14: on the H200 XLA
  materialized its broadcast inputs in kernels of their own)."""
  shape = acc.shape
  wide = lambda x: jnp.broadcast_to(jnp.expand_dims(x, d_axis), shape)

  def combine(x, y):
    (m1, l1, a1), (m2, l2, a2) = x, y
    mx = jnp.maximum(m1, m2)
    safe = jnp.where(mx == -jnp.inf, 0.0, mx)
    f1, f2 = jnp.exp(m1 - safe), jnp.exp(m2 - safe)
    return mx, l1 * f1 + l2 * f2, a1 * f1 + a2 * f2

  zero = jnp.zeros((), acc.dtype)
  m_all, l_all, a_all = jax.lax.reduce(
      (wide(m), wide(l), acc), (jnp.full((), -jnp.inf, acc.dtype), zero,
                                zero), combine, (2,))
  first = lambda x: jax.lax.index_in_dim(x, 0, d_axis - 1, keepdims=False)
  return first(m_all), first(l_all), a_all


def _one_sum_merge(m, l, acc, d_axis):
  """parts.merge_splits with the sum l carried as one more coordinate of
  acc, so that the weighted sums are one reduction after the max (two
  in all, if XLA fuses the concatenation into it)."""
  m_all = jnp.max(m, axis=2)
  m_safe = jnp.where(jnp.isfinite(m_all), m_all, 0.0)
  factor = jnp.where(jnp.isfinite(m),
                     jnp.exp(m - jnp.expand_dims(m_safe, 2)), 0.0)
  both = jnp.concatenate([acc, jnp.expand_dims(l, d_axis)], axis=d_axis)
  sums = jnp.sum(both * jnp.expand_dims(factor, d_axis), axis=2)
  d = acc.shape[d_axis]
  return (m_all, jax.lax.index_in_dim(sums, d, d_axis - 1, keepdims=False),
          jax.lax.slice_in_dim(sums, 0, d, axis=d_axis - 1))


def hlo_kernels(fn, *args) -> int:
  """Kernels XLA launches for one fn(*args) on this backend: fusions and
  custom calls (cuBLAS, Mosaic GPU) at the top level of the optimized
  HLO's entry computation."""
  text = jax.jit(fn).lower(*args).compile().as_text()
  entry = text[text.index("ENTRY"):]
  entry = entry[:entry.index("\n}")]
  return sum(1 for line in entry.splitlines()
             if " fusion(" in line or " custom-call(" in line)


# The module globals around_kernel and loop_modes vary: (module, name).
_AROUND = ((parts, "merge_splits"), (parts, "FOLDED_REDUCE_MAX_ROWS"),
           (parts, "SPLIT_ROTATION_PRECISION"),
           (pallas_gpu, "folded_query_operand"),
           (pallas_gpu_tokens, "EARLY_VALUE_LOOKUP"))


def _around_variants() -> dict:
  """{name: {global name: value}}: the work around the kernel as
  around_kernel and loop_modes vary it ("defaults": today's library
  values); _set_around sets one."""
  defaults = {name: getattr(module, name) for module, name in _AROUND}
  variants = {
      "defaults": {},
      "variadic": {"merge_splits": _variadic_merge},
      "one_sum": {"merge_splits": _one_sum_merge},
      "reduce": {"FOLDED_REDUCE_MAX_ROWS": 2**31},
      "einsum": {"FOLDED_REDUCE_MAX_ROWS": -1},  # (no operand: many rows)
      # einsums at every size by an f32-accurate algorithm cheaper than
      # HIGHEST's (3 or 6 bf16 products, or 3 TF32 ones)
      **{f"einsum_{name.lower()}": {
          "FOLDED_REDUCE_MAX_ROWS": -1,
          "SPLIT_ROTATION_PRECISION": getattr(jax.lax.DotAlgorithmPreset,
                                              name)}
         for name in ("BF16_BF16_F32_X3", "BF16_BF16_F32_X6",
                      "TF32_TF32_F32_X3")},
      "laid_out": {"folded_query_operand": lambda *args: None},
      # values_registers' lookup after Pᵀ's store also where the values
      # are unpacked during the score wgmma (overlap_values)
      "late_lookup": {"EARLY_VALUE_LOOKUP": False}}
  return {k: {**defaults, **v} for k, v in variants.items()}


def _set_around(value: dict) -> None:
  for module, name in _AROUND:
    setattr(module, name, value[name])


def around_kernel(shapes=((1, 16384, (4, 3.5, 2.5)), (1, 32768, (4, 3.5, 2.5)),
                          (8, 16384, (3.5,)), (8, 131072, (3.5,))),
                  names=None, rounds: int = 2) -> None:
  """The XLA work around the kernel (NOTES.md, session 14): the splits'
  merge as one variadic reduction ("variadic") or with l as one more
  coordinate of the accumulators ("one_sum": the max, then one weighted
  sum) against parts.merge_splits' three reductions (the default); the
  folded split rotations as multiply-and-sum reductions ("reduce") or
  HIGHEST einsums ("einsum") at every size (parts.FOLDED_REDUCE_MAX_ROWS;
  the default picks by size); a split cache's query operand laid out from
  parts.prepare's queries by a second fusion ("laid_out") against
  pallas_gpu.folded_query_operand's one fusion (the default at small
  batch); values_registers' lookup after Pᵀ's store ("late_lookup")
  against during the score wgmma where overlap_values is on (the
  default). (Session 17 also timed the kernel's epilogue waiting for its
  outputs' writes, "wait_writes": the same time to 0.1 µs; removed.)
  Checks each variant (or those in `names`) on 4 shapes, prints
  its kernel count at B=1, S=16k, then device time beside cuDNN bf16
  (32/8 heads, D=128), interleaved rounds, compiled per variant. (Session
  14's call 1 also had half the default splits, slower at B=1.)"""
  print("jax", jax.__version__, jax.devices()[0].device_kind, flush=True)
  every = _around_variants()
  variants = {k: v for k, v in every.items() if names is None
              or k in names}

  def prepare(value, c):
    _set_around(value)
    return c

  for name, value in list(variants.items()):
    prepare(value, None)
    jax.clear_caches()
    print(f"checks: {name}", flush=True)
    try:
      for args in ((128, 4, 4), (128, 4, 3.5), (128, 4, 2.5),
                   (128, 1, 3.5, "prod")):
        check(*args, mode="prmt", layout="tokens")
    except Exception as e:   # (an algorithm the backend lacks): dropped
      print(f"  {name} FAIL {type(e).__name__}: {str(e)[:200]}", flush=True)
      del variants[name]
    q = jax.random.normal(jax.random.key(0), (1, 32, 128))
    for bits in (4, 3.5):
      c = _random_cache(bits, 1, 16384)
      print(f"kernels B=1 S=16384 bits={bits} {name}: " + str(hlo_kernels(
          lambda q, c: da.decode_attention(q, c, c.lengths,
                                           impl="pallas_gpu"), q, c)),
            flush=True)
  _variant_rows(shapes, variants, prepare, rounds)
  _set_around(every["defaults"])


def loop_modes(shapes=((1, 16384, (4, 3.5)), (1, 32768, (4, 3.5)),
                        (8, 131072, (4,))),
               names=("defaults", "einsum"), rounds: int = 3) -> None:
  """What a looped call's device time measures at small batch: each call
  timed as 20 calls in a fori_loop (kernel_bench's way) and as 20 calls
  written out one after another (timing.looped's unroll), for cuDNN bf16,
  an elementwise op on the queries alone ("empty": the loop's own cost a
  call) and around_kernel's variants `names` ("einsum": every rotation
  product an einsum, as before session 15); interleaved rounds. Where the
  unrolled call is much cheaper, the loop's per-iteration cost, not the
  kernels, set the looped time."""
  print("jax", jax.__version__, jax.devices()[0].device_kind, flush=True)
  settings = _around_variants()
  attend = lambda q, c: da.decode_attention(q, c, c.lengths,
                                            impl="pallas_gpu")
  cudnn = lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, implementation="cudnn")
  loops = 20
  for args, kwargs in (((128, 4, 4), {}), ((128, 4, 3), {}),
                       ((64, 8, 2), {}), ((128, 4, 3.5), {}),
                       ((128, 4, 4), dict(tokens=3)),
                       ((128, 1, 3, "prod"), {})):
    check(*args, mode="prmt", layout="tokens", **kwargs)

  def timer(fn, *args, unroll):
    compiled = timing.looped(fn, loops, unroll).lower(*args).compile()
    return lambda: timing.time_ms(compiled, *args, warmup=2,
                                  reps=5) / loops

  for b, s, bits_list in shapes:
    q = jax.random.normal(jax.random.key(0), (b, 32, 128))
    qkv = [jax.random.normal(jax.random.key(i), shape, jnp.bfloat16)
           for i, shape in ((0, (b, 1, 32, 128)), (1, (b, s, 8, 128)),
                            (2, (b, s, 8, 128)))]
    base = {}
    for unroll in (False, True):
      mode = "unrolled" if unroll else "loop"
      base[f"cudnn/{mode}"] = timer(cudnn, *qkv, unroll=unroll)
      base[f"empty/{mode}"] = timer(lambda q: q * 2, q, unroll=unroll)
    for bits in bits_list:
      c = _random_cache(bits, b, s)
      timers = dict(base)
      for name in names:
        _set_around(settings[name])
        jax.clear_caches()
        print(f"kernels B={b} S={s} bits={bits} {name}: "
              f"{hlo_kernels(attend, q, c)}", flush=True)
        for unroll in (False, True):
          mode = "unrolled" if unroll else "loop"
          timers[f"{name}/{mode}"] = timer(attend, q, c, unroll=unroll)
      _set_around(settings["defaults"])
      times, errors = kernel_bench.interleaved_rounds(timers, rounds)
      print(f"B={b:<2} S={s:<6} bits={bits:<3} (us)", flush=True)
      for name, ts in times.items():
        if ts:
          print(f"  {name:<18} " + " ".join(f"{t * 1e3:7.1f}" for t in ts),
                flush=True)
      for name, e in errors.items():
        print(f"  {name} FAIL {e}", flush=True)
      del c


def main():
  if "--loop-modes" in sys.argv:     # [--shapes=...] [--rounds=N]
    shapes = probes.option("shapes", None)
    names = probes.option("variants", None)
    loop_modes(*([ast.literal_eval(shapes)] if shapes else []),
               **({"names": ast.literal_eval(names)} if names else {}),
               rounds=int(probes.option("rounds", "3")))
    return
  if "--around-kernel" in sys.argv:   # [--shapes=...] [--variants=(...)]
    shapes, names = probes.option("shapes", None), probes.option("variants",
                                                                 None)
    around_kernel(*([ast.literal_eval(shapes)] if shapes else []),
                  names=ast.literal_eval(names) if names else None,
                  rounds=int(probes.option("rounds", "2")))
    return
  if "--lookup-pipes" in sys.argv:
    shapes = probes.option("shapes", None)
    lookup_pipes(*([ast.literal_eval(shapes)] if shapes else []))
    return
  if "--split-xla" in sys.argv:
    split_xla()
    return
  if "--split-fold" in sys.argv:
    split_fold()
    return
  if probes.option("compare", None) is not None:
    compare(ast.literal_eval(probes.option("compare", None)),
            ast.literal_eval(probes.option("shapes",
                                           "((8, 131072, (4, 3.5)),)")),
            "--no-checks" not in sys.argv)
    return
  if "--skeleton-checks" in sys.argv:   # checks, then the defaults timed
    print("jax", jax.__version__, jax.devices()[0].device_kind, flush=True)
    skeleton_checks()
    skeleton_times(((131072, (4,)),), {"defaults": {}})
    return
  if "--skeleton-rows" in sys.argv:
    skeleton_rows()
    return
  if "--skeleton-tune" in sys.argv:
    skeleton_tune()
    return
  if "--skeleton" in sys.argv:
    skeleton()
    return
  # --split-only: the outlier split's checks alone; --checks-only: no times
  only = dict(split_only="--split-only" in sys.argv,
              checks_only="--checks-only" in sys.argv,
              grid="--grid" in sys.argv)      # grid codebooks (checks)
  if "--append-attention" in sys.argv:    # --no-barriers: that option too
    append_attention_checks(dict(auto_barriers=False)
                            if "--no-barriers" in sys.argv else None, **only)
    return
  if "--rotate" in sys.argv:
    rotation_options()
    return
  if "--append" in sys.argv:
    fused_append(**only)
    return
  if "--layer" in sys.argv:
    layer_steps()
    return
  if "--splits1" in sys.argv:      # the same at B=1
    split_counts(1, (8, 16, 24, 36, 48, 72, 144), (16, 24, 48, 72))
    return
  if "--splits" in sys.argv:
    split_counts()
    return
  if "--next" in sys.argv:
    next_checks()
    return
  if "--norms" in sys.argv:
    norms()
    return
  if "--v6" in sys.argv:
    v6()
    return
  if "--v5" in sys.argv:
    v5()
    return
  if "--diagnose" in sys.argv:
    diagnose()
    return
  if "--rows" in sys.argv:
    tile_rows()
    return
  if "--occupancy" in sys.argv:
    occupancy()
    return
  if "--stages" in sys.argv:
    pipeline_depth()
    return
  quick = "--quick" in sys.argv
  print("jax", jax.__version__, jax.devices()[0].device_kind, flush=True)
  for args in ((128, 4, 4), (128, 4, 3), (64, 8, 3), (128, 1, 3, "prod"),
               (128, 4, 3.5), (256, 3, 2)):
    check(*args, mode="poly16", layout="tokens")
  check(128, 8, 4, tokens=3, mode="poly16", layout="tokens")   # N = 32
  check(128, 4, 4, tokens=16, mode="poly16", layout="tokens")  # N = 64
  if "--tokens" in sys.argv:
    return
  if "--v4" not in sys.argv:
    _queries_checks()
    if quick:
      return
  _timings()


def _queries_checks():
  check(128, 4, 4)
  check(128, 4, 4, mode="poly16")
  check(128, 4, 3, mode="poly16")
  check(128, 4, 2, mode="poly16")
  check(128, 1, 3, method="prod", mode="poly16")
  check(64, 8, 4, lengths=(1, 333), mode="poly16")
  check(256, 3, 2, window=32, mode="poly16")
  check(64, 4, 3, mode="poly16", lengths=(1024, 77))     # 24-byte rows
  check(64, 2, 3, method="prod", mode="poly16")          # 8-byte signs
  check(128, 4, 2.5, mode="poly16")
  check(128, 4, 3.5, mode="poly16", tokens=3)
  check(128, 4, 4, mode="select")
  check(128, 4, 3)
  check(128, 4, 2)
  check(128, 1, 3, method="prod")
  check(64, 8, 4, lengths=(1, 333))
  check(256, 3, 2, window=32)
  check(128, 4, 4, tokens=4)
  check(128, 4, 3.5)


def _timings():
  b, h, kvh, d = 8, 32, 8, 128
  short = "--short" in sys.argv or "--v4" in sys.argv
  for s in ((131072,) if short else (16384, 131072)):
    q, cudnn = _cudnn(b, h, kvh, d, s)
    for bits in (4, 3, 2, 3.5, 2.5):
      cfg = cache_lib.CacheConfig(key_bits=bits, value_bits=bits)
      c = kernel_bench.random_cache(jax.random.key(4), cfg, b, kvh, s, d)
      nbytes = sum(x.nbytes for x in jax.tree.leaves((c.keys, c.values))
                   if hasattr(x, "nbytes") and x.ndim >= 3)
      base = pallas_gpu.default_splits(c)
      variants = [("poly16", base), ("tokens", base)]
      if "--v4" in sys.argv:
        variants += [("tokens", base * 2)] if bits == 4 else []
      elif bits == 4:
        variants += [("tokens", base * 2), ("tokens", base * 4)]
        variants += [("poly", base), ("bits", base), ("nodeq", base),
                     ("poly16", base * 4)]
      for mode, splits in variants:
        if s % (64 * splits) or splits < 1:
          continue
        pallas_gpu.lookup = (_bits_only_lookup if mode == "bits"
                             else _REAL_LOOKUP)
        pallas_gpu._dequantize_into = (  # pylint: disable=protected-access
            _no_dequantize if mode == "nodeq" else _REAL_DEQUANTIZE)
        f = jax.jit(lambda q, c, mode=mode, splits=splits:
                    da.decode_attention(
                        q, c, c.lengths, impl="pallas_gpu", splits=splits,
                        layout="tokens" if mode == "tokens" else "queries",
                        lookup_mode="poly" if mode == "poly" else "poly16"))
        t, err = _time_variant(f, q.astype(jnp.float32), c)
        pallas_gpu.lookup = _REAL_LOOKUP
        pallas_gpu._dequantize_into = _REAL_DEQUANTIZE  # pylint: disable=protected-access
        if t is None:
          print(f"S={s} bits={bits} {mode} splits={splits} {err}",
                flush=True)
          continue
        print(f"S={s:<7} bits={bits} {mode:<6} splits={splits:<3} "
              f"{t:.3f} ms  x{cudnn / t:.2f} vs cudnn  "
              f"{nbytes / t / 1e9:.2f} TB/s", flush=True)


if __name__ == "__main__":
  t0 = time.time()
  main()
  print(f"done in {time.time() - t0:.0f} s")
