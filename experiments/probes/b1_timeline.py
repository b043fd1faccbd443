"""Where a B=1 decode-attention call's time goes, kernel by kernel.

PyTorch's profiler (CUPTI, process-wide) records every GPU kernel JAX
launches, with start and end times, so a run of 20 calls written out
(timing.looped's unroll) shows each kernel's duration and the idle gaps
between kernels, which Nsight Compute (kernels one at a time, caches
flushed) cannot. Prints, per case, each kernel's median duration and
count a call, and a call's span (the run's first start to last end, over
the calls) against the kernels' busy time: the difference is idle GPU.
Device only; needs torch. (jax.profiler, timing.profiled_ms, cannot
trace in the same process after torch's profiler: CUPTI takes one
subscriber.)

    python3 -m experiments.probes.b1_timeline [--seq=16384] [--bits=4,3.5]
        [--batch=1] [--dim=128] [--heads=32,8] [--append]

--append: pallas_gpu.append_attention (a new token appended and attended
in one launch, at length S - 64 of capacity S) instead of decode_attention.
"""

import collections
import dataclasses
import json
import statistics
import sys
import tempfile

import jax
import jax.numpy as jnp

from experiments import kernel_bench
from experiments import probes
from experiments import timing
from turboquant_jax import cache as cache_lib
from turboquant_jax.kernels import decode_attention as da
from turboquant_jax.kernels.decode_attention import pallas_gpu

LOOPS = 20


def _events(compiled, *args) -> list[tuple[str, float, float]]:
  """(name, start µs, duration µs) of every GPU kernel of one run."""
  # pylint: disable-next=g-import-not-at-top (device only)
  import torch
  jax.block_until_ready(compiled(*args))
  with torch.profiler.profile(
      activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
    jax.block_until_ready(compiled(*args))
  with tempfile.NamedTemporaryFile(suffix=".json") as f:
    prof.export_chrome_trace(f.name)
    with open(f.name) as written:
      trace = json.load(written)
  kernels = [e for e in trace["traceEvents"]
             if e.get("cat") in ("kernel", "gpu_memset", "gpu_memcpy")]
  return sorted((e["name"], float(e["ts"]), float(e["dur"]))
                for e in kernels)


def _report(name: str, events) -> None:
  """Per kernel name: how many a call, median µs; the run's span a call
  (first kernel's start to last kernel's end, over LOOPS) and the GPU's
  busy time a call."""
  events = sorted(events, key=lambda e: e[1])
  span = (events[-1][1] + events[-1][2] - events[0][1]) / LOOPS
  busy = sum(e[2] for e in events) / LOOPS
  print(f"== {name}: {len(events) / LOOPS:.2f} kernels a call, span "
        f"{span:.1f} us a call, busy {busy:.1f} us a call", flush=True)
  by_name = collections.defaultdict(list)
  for n, _, dur in events:
    by_name[n].append(dur)
  first = {}
  for n, start, _ in events:
    first.setdefault(n, start)
  for n in sorted(by_name, key=first.get):
    durs = by_name[n]
    print(f"  {n[:64]:<64} x{len(durs) / LOOPS:<5.2f} "
          f"{statistics.median(durs):6.1f} us", flush=True)


def main():
  print("jax", jax.__version__, jax.devices()[0].device_kind, flush=True)
  s = int(probes.option("seq", "16384"))
  bits_list = [float(x) if "." in x else int(x)
               for x in probes.option("bits", "4,3.5").split(",")]
  b = int(probes.option("batch", "1"))
  d = int(probes.option("dim", "128"))
  h, kv = (int(x) for x in probes.option("heads", "32,8").split(","))
  q, k, v = (jax.random.normal(jax.random.key(i), shape, jnp.bfloat16)
             for i, shape in ((0, (b, 1, h, d)), (1, (b, s, kv, d)),
                              (2, (b, s, kv, d))))
  cudnn = lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, implementation="cudnn")
  cases = {"cudnn": (cudnn, (q, k, v))}
  qf = jax.random.normal(jax.random.key(0), (b, h, d))
  new = jax.random.normal(jax.random.key(5), (2, b, kv, 1, d))
  for bits in bits_list:
    c = kernel_bench.random_cache(
        jax.random.key(4), cache_lib.CacheConfig(key_bits=bits,
                                                 value_bits=bits), b, kv, s, d)
    if "--append" in sys.argv:
      c = dataclasses.replace(c, lengths=c.lengths - 64)
      cases[f"tq{bits}"] = (lambda q, c: pallas_gpu.append_attention(
          q[:, None], new[0], new[1], c)[0], (qf, c))
    else:
      cases[f"tq{bits}"] = (lambda q, c: da.decode_attention(
          q, c, c.lengths, impl="pallas_gpu"), (qf, c))
  for name, (fn, args) in cases.items():
    compiled = timing.looped(fn, LOOPS, unroll=True).lower(*args).compile()
    events = _events(compiled, *args)
    _report(name, events)
    ms = timing.time_ms(compiled, *args, warmup=2, reps=10) / LOOPS
    print(f"  wall per call {ms * 1e3:.1f} us", flush=True)


if __name__ == "__main__":
  main()
