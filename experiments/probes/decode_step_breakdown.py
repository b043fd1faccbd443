"""Where a SmolLM2 decode step spends its time: full vs TurboQuant cache.

decode_bench measures whole steps; this probe (1) counts the kernels XLA
launches per step (the optimized HLO's top-level instructions that become
GPU launches: fusions, custom calls such as cuBLAS and the Pallas kernel,
copies, scatters), per cache (written to $OUT when set), and (2) times one
layer's pieces: quantize-and-append and decode attention (kernel options
too), and both for the full bf16 cache, each over 8 distinct layer caches
in one call (no re-reads from L2).

Run: python -m experiments.probes.decode_step_breakdown [--batch=N]
(B=1 by default; on a CPU a smoke run at 192 tokens, XLA paths only)
"""

import collections
import functools
import os
import re
import time

import jax
import jax.numpy as jnp
from flax import nnx

from experiments import decode_bench
from experiments import probes
from experiments import timing
from turboquant_jax import cache as cache_lib
from turboquant_jax import model as model_lib
from turboquant_jax.kernels import decode_attention as da

_LAUNCHES = ("fusion", "custom-call", "copy", "scatter", "dynamic-update-slice",
             "gather", "reduce", "dot", "convolution", "sort", "transpose")


def launch_counts(hlo: str) -> collections.Counter:
  """Opcodes of the instructions in non-fused computations of an optimized
  HLO module (those that launch kernels), counted."""
  counts = collections.Counter()
  fused = False
  for line in hlo.splitlines():
    head = re.match(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
    if head:
      name = head.group(2)
      fused = "fused" in name or "region" in name or "wrapped" in name
      continue
    m = re.search(r"=\s*[\w\[\]{},:\s()\d./]*?\s([a-z][\w\-]*)\(", line)
    if m and not fused and m.group(1) in _LAUNCHES:
      counts[m.group(1)] += 1
  return counts


def _cache_config(name):
  if name == "full":
    return cache_lib.CacheConfig(kind="full", dtype="bfloat16")
  return cache_lib.CacheConfig(kind="turboquant", key_bits=4, value_bits=4)


def main():
  batch = int(probes.option("batch", "1"))
  print("jax", jax.__version__, jax.devices()[0].device_kind, flush=True)
  cfg = decode_bench.SMOLLM2
  model = model_lib.Transformer(cfg, rngs=nnx.Rngs(0))
  gpu = jax.default_backend() == "gpu"
  context, capacity = (8192, 9216) if gpu else (192, 256)   # CPU: a smoke run
  tokens = jnp.zeros((batch, 1), jnp.int32)
  for name, impl in (("full", "xla"), ("tq4", None), ("tq4", "xla")):
    caches = model.init_caches(batch, capacity, _cache_config(name),
                               jax.random.key(1))
    caches = tuple(decode_bench._filled(c, jax.random.key(i), context)  # pylint: disable=protected-access
                   for i, c in enumerate(caches))
    lengths = caches[0].lengths
    compiled = decode_bench.decode_steps.lower(
        model, tokens, caches, lengths, impl=impl, steps=1).compile()
    hlo = compiled.as_text()
    counts = launch_counts(hlo)
    if os.environ.get("OUT"):
      with open(os.path.join(os.environ["OUT"],
                             f"hlo_b{batch}_{name}_{impl}.txt"), "w") as f:
        f.write(hlo)
    print(f"B={batch} {name} impl={impl}: launches per step "
          f"{sum(counts.values())} {dict(counts.most_common())}", flush=True)

  # One layer's pieces over 8 distinct layer caches in one jitted call (so
  # that, as in the model, no cache is re-read from L2), per layer.
  layers = 8
  k = jax.random.normal(jax.random.key(5), (batch, 3, 1, 64), jnp.bfloat16)
  q = jax.random.normal(jax.random.key(6), (batch, 9, 64), jnp.bfloat16)
  for name in ("full", "tq4"):
    caches = tuple(decode_bench._filled(  # pylint: disable=protected-access
        cache_lib.init(_cache_config(name), batch, 3, capacity, 64,
                       key=jax.random.key(1)), jax.random.key(2 + i), context)
                   for i in range(layers))
    variants = [("xla", {})]
    if gpu and name == "full":
      variants.append(("cudnn", {}))
    if gpu and name == "tq4":
      variants = [("pallas_gpu", {}), ("pallas_gpu", dict(tile_rows=128)),
                  ("pallas_gpu", dict(tile_rows=256)),
                  ("pallas_gpu", dict(splits=4)),
                  ("pallas_gpu", dict(splits=16)),
                  ("pallas_gpu", dict(splits=48)),
                  ("pallas_gpu", dict(stages=3)), ("xla", {})]
    for impl, options in variants:
      if impl == "cudnn":    # keys pre-transposed to [B, S, K, D], once
        kbs = [jnp.swapaxes(c.keys[..., :context, :], 1, 2) for c in caches]
        fn = jax.jit(lambda q: functools.reduce(
            lambda acc, kb: acc + jax.nn.dot_product_attention(
                acc[:, None], kb, kb, implementation="cudnn")[:, 0], kbs, q))
        args = (q,)
      else:
        fn = jax.jit(lambda q, cs, impl=impl, options=options:
                     functools.reduce(
                         lambda acc, c: acc + da.decode_attention(
                             acc, c, c.lengths, impl=impl,
                             **options).astype(acc.dtype), cs, q))
        args = (q, caches)
      try:
        ms = timing.time_ms(fn, *args, warmup=3, reps=20 if gpu else 1)
        print(f"B={batch} {name} attention impl={impl} {options}: "
              f"{ms * 1e3 / layers:.1f} us per layer", flush=True)
      except Exception as e:  # noqa: BLE001 - a probe reports failures
        print(f"B={batch} {name} attention impl={impl} {options}: FAIL "
              f"{type(e).__name__}: {str(e)[:200]}", flush=True)

    # Donated, as in decode: one token appended to each cache per call.
    appends = jax.jit(lambda cs: tuple(cache_lib.append(c, k, k) for c in cs),
                      donate_argnums=0)
    ms, _ = timing.time_in_place_ms(appends, caches, lambda c: c, warmup=3,
                                    reps=20 if gpu else 1)
    print(f"B={batch} {name} append: {ms * 1e3 / layers:.1f} us per layer",
          flush=True)


if __name__ == "__main__":
  t0 = time.time()
  main()
  print(f"done in {time.time() - t0:.0f} s")
