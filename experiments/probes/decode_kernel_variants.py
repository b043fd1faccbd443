"""Checks and times variants of the pallas_gpu decode kernel in one call.

Prints (1) the relative error against the reference on small real caches
(several head dims, GQA groups, bits, prod keys, windows, chunks) and (2) a
table of times at B=8, 32/8 heads, D=128 for each bit width, lookup mode
and split count, beside cuDNN bf16 measured in the same process.
Run: python -m experiments.probes.decode_kernel_variants [--quick]
"""

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import kernel_bench
from turboquant_jax import cache as cache_lib
from turboquant_jax.kernels import decode_attention as da
from turboquant_jax.kernels.decode_attention import pallas_gpu


def check(dim, groups, bits, method="mse", window=0, tokens=1, s=1024,
          lengths=(1024, 700), mode="poly"):
  key = jax.random.key(dim * 7 + groups)
  b, kvh = 2, 2
  k = jax.random.normal(key, (b, kvh, s, dim)) * 2
  v = jax.random.normal(jax.random.key(2), (b, kvh, s, dim))
  cfg = cache_lib.CacheConfig(key_bits=bits, value_bits=bits,
                              key_method=method, window=window)
  c = cache_lib.prefill(cache_lib.init(cfg, b, kvh, s, dim, key=key),
                        k, v, jnp.array(lengths, jnp.int32))
  q = jax.random.normal(jax.random.key(3), (b, tokens, kvh * groups, dim))
  ref = da.chunk_attention(q, c, c.lengths, impl="reference")
  try:
    out = da.chunk_attention(q, c, c.lengths, impl="pallas_gpu",
                             lookup_mode=mode)
    err = float(jnp.max(jnp.abs(out - ref)) / jnp.max(jnp.abs(ref)))
    msg = f"rel err {err:.2e} {'OK' if err < 5e-3 else 'WRONG'}"
  except Exception as e:  # noqa: BLE001 - a probe reports every failure
    msg = f"FAIL {type(e).__name__}: {str(e)[:300]}"
  print(f"check D={dim:<3} G={groups} bits={bits:<3} {method:<4} w={window:<2}"
        f" T={tokens} {mode:<6} {msg}", flush=True)


def main():
  quick = "--quick" in sys.argv
  print("jax", jax.__version__, jax.devices()[0].device_kind, flush=True)
  check(128, 4, 4)
  check(128, 4, 4, mode="select")
  check(128, 4, 3)
  check(128, 4, 2)
  check(128, 1, 3, method="prod")
  check(64, 8, 4, lengths=(1, 333))
  check(256, 3, 2, window=32)
  check(128, 4, 4, tokens=4)
  check(128, 4, 3.5)
  if quick:
    return
  b, h, kvh, d = 8, 32, 8, 128
  for s in ((131072,) if "--short" in sys.argv else (16384, 131072)):
    q = jax.random.normal(jax.random.key(0), (b, h, d), jnp.bfloat16)
    kb = jax.random.normal(jax.random.key(1), (b, s, kvh, d), jnp.bfloat16)
    vb = jax.random.normal(jax.random.key(2), (b, s, kvh, d), jnp.bfloat16)
    fn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
        q[:, None], k, v, implementation="cudnn"))
    cudnn = kernel_bench.time_ms(fn, q, kb, vb, warmup=3, reps=20)
    del kb, vb
    print(f"S={s:<7} cudnn_bf16 {cudnn:.3f} ms", flush=True)
    for bits in (4, 3, 2):
      cfg = cache_lib.CacheConfig(key_bits=bits, value_bits=bits)
      c = kernel_bench.random_cache(jax.random.key(4), cfg, b, kvh, s, d)
      nbytes = sum(x.nbytes for x in jax.tree.leaves((c.keys, c.values))
                   if hasattr(x, "nbytes") and x.ndim >= 3)
      base = pallas_gpu.default_splits(c)
      for mode in ("poly", "select"):
        for splits in ((base, base * 2) if mode == "poly" else (base,)):
          if s % (64 * splits):
            continue
          f = jax.jit(lambda q, c, mode=mode, splits=splits:
                      da.decode_attention(q, c, c.lengths, impl="pallas_gpu",
                                          lookup_mode=mode, splits=splits))
          try:
            t = kernel_bench.time_ms(f, q.astype(jnp.float32), c, warmup=3,
                                     reps=20)
            print(f"S={s:<7} bits={bits} {mode:<6} splits={splits:<3} "
                  f"{t:.3f} ms  x{cudnn / t:.2f} vs cudnn  "
                  f"{nbytes / t / 1e9:.2f} TB/s", flush=True)
          except Exception as e:  # noqa: BLE001
            print(f"S={s} bits={bits} {mode} splits={splits} FAIL "
                  f"{type(e).__name__}: {str(e)[:400]}", flush=True)


if __name__ == "__main__":
  t0 = time.time()
  main()
  print(f"done in {time.time() - t0:.0f} s")
