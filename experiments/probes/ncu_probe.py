"""Runs decode attention once inside a CUDA profiler range, for Nsight Compute.

Under `ncu --profile-from-start off` only the kernels launched between
cuProfilerStart and cuProfilerStop are profiled: here one call of the named
case after warm-up, so every kernel of that call (the Pallas kernel and the
XLA work around it) gets its duration, throughput and stall reasons.

    ncu --profile-from-start off --section SpeedOfLight ... \
        python3 -m experiments.probes.ncu_probe kernel4   # B=8 S=32k 4-bit
    cases: kernel4, kernel3 (pallas_gpu), cudnn (bf16), b1_split,
    b1_kernel4, cudnn_b1 (B=1, S=16k: 3.5 bits, 4 bits, cuDNN bf16),
    smol_tq, smol_full
    (one SmolLM2-shaped decode layer at B=32: attention and append;
    smol_tq_b1, smol_full_b1 the same at B=1),
    append_xla, append_fused (one donated 4-bit append at that shape,
    printing its optimized HLO); --options="{...}": keyword options of
    pallas_gpu.attention for the pallas_gpu cases; --products=reduce or
    einsum: a split cache's folded rotations as multiply-and-sum
    reductions or as einsums at every size (parts.FOLDED_REDUCE_MAX_ROWS;
    by default the library's choice by size); --hlo: print the case's
    optimized HLO first
"""

import ast
import ctypes
import dataclasses
import sys

import jax
import jax.numpy as jnp

from experiments import kernel_bench
from experiments import probes
from turboquant_jax import cache as cache_lib
from turboquant_jax.cache import turboquant_cache
from turboquant_jax.kernels import decode_attention as da
from turboquant_jax.kernels.decode_attention import parts


def _profiled(fn, *args):
  """fn(*args) after two warm-up calls, the last one between
  cuProfilerStart and cuProfilerStop."""
  if "--hlo" in sys.argv:
    print(fn.lower(*args).compile().as_text(), flush=True)
  cuda = ctypes.CDLL("libcuda.so.1")
  for _ in range(2):
    jax.block_until_ready(fn(*args))
  cuda.cuProfilerStart()
  jax.block_until_ready(fn(*args))
  cuda.cuProfilerStop()


def _kernel(bits, b=8, h=32, kvh=8, d=128, s=32768):
  options = ast.literal_eval(probes.option("options", "{}"))
  products = probes.option("products", None)   # else the library's choice
  if products is not None:
    parts.FOLDED_REDUCE_MAX_ROWS = {"reduce": 2**31, "einsum": -1}[products]
  cfg = cache_lib.CacheConfig(key_bits=bits, value_bits=bits)
  c = kernel_bench.random_cache(jax.random.key(4), cfg, b, kvh, s, d)
  q = jax.random.normal(jax.random.key(0), (b, h, d))
  _profiled(jax.jit(lambda q, c: da.decode_attention(
      q, c, c.lengths, impl="pallas_gpu", **options)), q, c)


def _cudnn(b=8, h=32, kvh=8, d=128, s=131072):
  q = jax.random.normal(jax.random.key(0), (b, 1, h, d), jnp.bfloat16)
  k = jax.random.normal(jax.random.key(1), (b, s, kvh, d), jnp.bfloat16)
  v = jax.random.normal(jax.random.key(2), (b, s, kvh, d), jnp.bfloat16)
  _profiled(jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, implementation="cudnn")), q, k, v)


def _smol(kind, b=32, h=9, kvh=3, d=64, s=9216, live=8192):
  """One decode layer's cache work at the SmolLM2 shape: append one token,
  then attend (impl=None). The cache is not donated here (decode_bench
  donates it), so XLA may copy it before writing; ncu lists kernels, not
  such copies."""
  if kind == "full":
    cfg = cache_lib.CacheConfig(kind="full", dtype="bfloat16")
  else:
    cfg = cache_lib.CacheConfig(key_bits=4, value_bits=4)
  c = cache_lib.init(cfg, b, kvh, s, d, key=jax.random.key(0))
  c = dataclasses.replace(c, lengths=jnp.full((b,), live, jnp.int32))
  q = jax.random.normal(jax.random.key(1), (b, h, d), jnp.bfloat16)
  k = jax.random.normal(jax.random.key(2), (b, kvh, 1, d), jnp.bfloat16)

  @jax.jit
  def layer(q, c, k):
    c = cache_lib.append(c, k, k)
    return da.decode_attention(q, c, c.lengths), c

  _profiled(layer, q, c, k)


def _append(impl, b=32, kvh=3, d=64, s=9216, live=8192):
  """One donated TurboQuant 4-bit append at the SmolLM2 shape (XLA or the
  fused kernel), the cache fed back between calls: its kernels alone."""
  cfg = cache_lib.CacheConfig(key_bits=4, value_bits=4)
  c = cache_lib.init(cfg, b, kvh, s, d, key=jax.random.key(0))
  c = dataclasses.replace(c, lengths=jnp.full((b,), live, jnp.int32))
  k = jax.random.normal(jax.random.key(2), (b, kvh, 1, d), jnp.bfloat16)
  fn = jax.jit(lambda c, k: turboquant_cache.append(c, k, k, impl=impl),
               donate_argnums=0)
  cuda = ctypes.CDLL("libcuda.so.1")
  for _ in range(2):
    c = jax.block_until_ready(fn(c, k))
  print(fn.lower(c, k).compile().as_text(), flush=True)
  cuda.cuProfilerStart()
  c = jax.block_until_ready(fn(c, k))
  cuda.cuProfilerStop()


def main():
  case = sys.argv[1] if len(sys.argv) > 1 else "kernel4"
  {"kernel4": lambda: _kernel(4), "kernel3": lambda: _kernel(3),
   # B=1, S=16k: the outlier-split width (two parts) slower than cuDNN
   # where 4 bits is faster (results/kernel_bench/h200_v7): every kernel
   # of one call, XLA's included.
   "b1_split": lambda: _kernel(3.5, b=1, s=16384),
   "b1_kernel4": lambda: _kernel(4, b=1, s=16384),
   "cudnn_b1": lambda: _cudnn(b=1, s=16384),
   "cudnn": _cudnn, "smol_tq": lambda: _smol("tq"),
   "smol_full": lambda: _smol("full"),
   "smol_tq_b1": lambda: _smol("tq", b=1),
   "smol_full_b1": lambda: _smol("full", b=1),
   "append_xla": lambda: _append("xla"),
   "append_fused": lambda: _append("pallas_gpu")}[case]()


if __name__ == "__main__":
  main()
