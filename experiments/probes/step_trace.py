"""Every kernel of a real SmolLM2 decode step, from a profiler trace.

Nsight Compute lists kernels of one layer's cache work outside the model
(ncu_probe); what a decode loop really launches can differ (XLA fuses the
cache's small ops with the model's, hoists loop invariants). This probe
runs decode_bench's jitted loop (same model, caches, donation) once under
`jax.profiler` and reads the trace back with `jax.profiler.ProfileData`:
per cache, the kernels per step, their summed device time per step, the
step's span (busy time plus gaps between launches), and the kernels that
take the most time, names without their numeric suffixes.

    python -m experiments.probes.step_trace [--batch=1] [--steps=8]
        [--caches=full-bf16,tq4]   (names from configs/decode_bench.py)
        [--model=llama3_8b]   (decode_bench's Llama-3.1-8B shape and
                               context; its caches are named cudnn-bf16,
                               tq4, tq3, tq2.5)
        [--hlo]   (instead: the loop's optimized HLO, written to $OUT, and
                   its Mosaic GPU calls and copies per computation)
        [--products=sum,einsum,einsum_x3]   (the rotations' products around
            the kernel, each traced: "sum", the library's rule (multiply-
            and-sum where parts.sums_products says so; before session 24
            also a dense rotation's at few query rows); einsums at HIGHEST;
            einsums as 3 bf16 products, BF16_BF16_F32_X3)

Besides the kernels' own time it prints the idle time before each kind of
kernel (from the previous kernel's end to its start, summed per step) and
the host's busiest calls per step: where a step's wall time that no
kernel fills goes (a launch gap that only some kernels pay, or host work
such as command-buffer updates the GPU waits on).
"""

import collections
import dataclasses
import glob
import itertools
import os
import re
import sys
import tempfile

import jax
from flax import nnx

from configs import decode_bench as decode_bench_config
from experiments import decode_bench
from experiments import probes
from turboquant_jax import model as model_lib
from turboquant_jax.kernels.decode_attention import parts

# --products: (parts.FOLDED_REDUCE_MAX_ROWS, parts.SPLIT_ROTATION_PRECISION)
PRODUCTS = {
    "sum": (parts.FOLDED_REDUCE_MAX_ROWS, parts.SPLIT_ROTATION_PRECISION),
    "einsum": (-1, jax.lax.Precision.HIGHEST),
    "einsum_x3": (-1, jax.lax.DotAlgorithmPreset.BF16_BF16_F32_X3)}


@dataclasses.dataclass
class StepKernels:
  """Kernels of `steps` decode steps on the device's kernel lines."""
  launches: int
  busy_us: float                       # summed kernel durations
  span_us: float                       # first start to last end
  by_name: dict[str, tuple[int, float]]  # name -> (launches, summed us)


def kernel_name(name: str) -> str:
  """A kernel's name without the numeric suffixes XLA numbers fusions
  with (loop_pad_fusion_12 -> loop_pad_fusion)."""
  return re.sub(r"([._]\d+)+$", "", name)


def _newest_trace(trace_dir: str) -> jax.profiler.ProfileData:
  """The newest .xplane.pb under trace_dir, read."""
  files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"),
                           recursive=True), key=os.path.getmtime)
  if not files:
    raise FileNotFoundError(f"no .xplane.pb under {trace_dir}")
  return jax.profiler.ProfileData.from_file(files[-1])


def _device_plane(trace_dir: str):
  """The first device plane (the host CPU plane without one) of the
  newest .xplane.pb under trace_dir."""
  data = _newest_trace(trace_dir)
  planes = ([p for p in data.planes if p.name.startswith("/device:")]
            or [p for p in data.planes if p.name == "/host:CPU"])
  if not planes:
    raise ValueError("the trace has no device or CPU plane: "
                     f"{[p.name for p in data.planes]}")
  return planes[0]


def line_names(trace_dir: str) -> dict[str, int]:
  """{line name: events} of that plane: what the kernel lines were."""
  return {ln.name: len(list(ln.events))
          for ln in _device_plane(trace_dir).lines}


def kernel_events(trace_dir: str) -> list[tuple[str, float, float]]:
  """(name, start_ns, duration_ns) of every event on the first device
  plane's kernel lines ("Stream ..."; all its lines if none is named so),
  read from the newest .xplane.pb under trace_dir. Without a device (a
  CPU smoke run) the host plane's events stand in: host calls, not
  kernels."""
  lines = list(_device_plane(trace_dir).lines)
  streams = [ln for ln in lines if ln.name.startswith("Stream")] or lines
  return [(e.name, e.start_ns, e.duration_ns)
          for ln in streams for e in ln.events]


def host_events(trace_dir: str) -> list[tuple[str, float, float]]:
  """(name, start_ns, duration_ns) of every event on the host CPU plane
  of the newest .xplane.pb under trace_dir (XLA's thunks, CUDA driver
  calls, Python)."""
  plane = _newest_trace(trace_dir).find_plane_with_name("/host:CPU")
  if plane is None:
    return []
  return [(e.name, e.start_ns, e.duration_ns)
          for ln in plane.lines for e in ln.events]


def gaps_before(events, steps: int) -> dict[str, tuple[float, float]]:
  """{kernel name: (launches, summed idle us)} per step: for each kernel,
  the time from the latest end of the kernels before it to its start
  (0 where it overlaps them)."""
  gaps = collections.defaultdict(lambda: [0, 0.0])
  end = None
  for name, start, dur in sorted(events, key=lambda e: e[1]):
    entry = gaps[kernel_name(name)]
    entry[0] += 1
    if end is not None:
      entry[1] += max(0.0, start - end) / 1e3
    end = start + dur if end is None else max(end, start + dur)
  return {k: (v[0] / steps, v[1] / steps) for k, v in gaps.items()}


def summarize(events, steps: int) -> StepKernels:
  """Per-step counts and times of the kernel events of `steps` steps."""
  if not events:
    return StepKernels(0, 0.0, 0.0, {})
  by_name = collections.defaultdict(lambda: [0, 0.0])
  for name, _, dur in events:
    entry = by_name[kernel_name(name)]
    entry[0] += 1
    entry[1] += dur / 1e3
  start = min(s for _, s, _ in events)
  end = max(s + d for _, s, d in events)
  return StepKernels(
      launches=round(len(events) / steps),
      busy_us=sum(d for _, _, d in events) / 1e3 / steps,
      span_us=(end - start) / 1e3 / steps,
      by_name={k: (v[0] / steps, v[1] / steps) for k, v in by_name.items()})


_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$")


def hlo_census(hlo: str) -> list[tuple[str, int, int, int]]:
  """(computation, instructions, Mosaic GPU custom calls, copies) of each
  computation of an optimized HLO module that has a Mosaic GPU call or a
  copy: in a decode loop's body, the kernels and the buffer copies (e.g.
  into the loop carry) that each step pays."""
  found, name, counts = [], None, None
  for line in hlo.splitlines():
    head = _COMPUTATION.match(line)
    if head:
      name, counts = head.group(1), [0, 0, 0]
    elif line.startswith("}") and name is not None:
      if counts[1] or counts[2]:
        found.append((name, *counts))
      name = None
    elif name is not None and " = " in line:
      counts[0] += 1
      counts[1] += 'custom_call_target="mosaic_gpu' in line
      counts[2] += bool(re.search(r"\scopy\(", line))
  return found


def compiled_hlo(name: str, batch: int, steps: int, model_name: str) -> str:
  """decode_bench's loop for cache `name`, compiled; its optimized HLO."""
  model, tokens, caches, lengths, impl = _loop_inputs(name, batch,
                                                      model_name)
  return decode_bench.decode_steps.lower(
      model, tokens, caches, lengths, impl=impl,
      steps=steps).compile().as_text()


def _loop_inputs(name: str, batch: int, model_name: str):
  config = decode_bench_config.get_config(
      f"model={model_name},"
      + ("scale=full" if jax.default_backend() == "gpu" else "scale=cpu"))
  row = {c[0]: c for c in config.caches}[name]
  _, kind, kb, vb, impl, append_impl, *options = row
  shape, _ = decode_bench.model_config(config)
  model = model_lib.Transformer(shape, rngs=nnx.Rngs(config.seed))
  tokens, caches = decode_bench.filled_caches(model, config, batch, kind, kb,
                                              vb, append_impl, *options)
  lengths = jax.numpy.copy(caches[0].lengths)   # the caches are donated
  return model, tokens, caches, lengths, impl


def trace_steps(name: str, batch: int, steps: int, model_name: str):
  """Runs decode_bench's loop for cache `name` once (after a warm-up)
  under the profiler; the kernels of its steps (StepKernels), the idle
  time before each kind (gaps_before) and the host's calls (StepKernels
  of the host plane's events)."""
  model, tokens, caches, lengths, impl = _loop_inputs(name, batch,
                                                      model_name)
  run = lambda tokens, caches: decode_bench.decode_steps(
      model, tokens, caches, lengths, impl=impl, steps=steps)
  tokens, caches = jax.block_until_ready(run(tokens, caches))
  caches = tuple(dataclasses.replace(c, lengths=jax.numpy.copy(lengths))
                 for c in caches)
  with tempfile.TemporaryDirectory() as tmp:
    jax.profiler.start_trace(tmp)
    jax.block_until_ready(run(tokens, caches))
    jax.profiler.stop_trace()
    print(f"{name}: trace lines {line_names(tmp)}", flush=True)
    kernels = kernel_events(tmp)
    return (summarize(kernels, steps), gaps_before(kernels, steps),
            summarize(host_events(tmp), steps))


def _print_top(by_name: dict[str, tuple[float, float]], n: int):
  """The n names with the most summed us: us, launches, name."""
  for kname, (count, us) in sorted(by_name.items(),
                                   key=lambda kv: -kv[1][1])[:n]:
    print(f"  {us:8.1f} us  {count:6.1f} x  {kname[:90]}")


def main():
  batch = int(probes.option("batch", "1"))
  steps = int(probes.option("steps", "8"))
  names = probes.option("caches", "full-bf16,tq4").split(",")
  model_name = probes.option("model", "smollm2")
  print("jax", jax.__version__, jax.devices()[0].device_kind, model_name,
        f"B={batch}", f"{steps} steps", flush=True)
  products_list = probes.option("products", "sum").split(",")
  unknown = sorted(set(products_list) - set(PRODUCTS))
  if unknown:
    raise ValueError(f"--products: {unknown} not among {sorted(PRODUCTS)}")
  for name, products in itertools.product(names, products_list):
    parts.FOLDED_REDUCE_MAX_ROWS, parts.SPLIT_ROTATION_PRECISION = \
        PRODUCTS[products]
    jax.clear_caches()
    shown = name if products == "sum" else f"{name}-{products}"
    if "--hlo" in sys.argv:
      hlo = compiled_hlo(name, batch, steps, model_name)
      if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], f"{shown}.hlo.txt"),
                  "w") as f:
          f.write(hlo)
      print(f"\n{shown}: computation, instructions, Mosaic GPU calls, "
            f"copies")
      for row in hlo_census(hlo):
        print("  ", *row)
      continue
    k, gaps, host = trace_steps(name, batch, steps, model_name)
    print(f"\n{shown}: {k.launches} kernels a step, busy {k.busy_us:.1f} us, "
          f"span {k.span_us:.1f} us a step", flush=True)
    _print_top(k.by_name, 25)
    print(f"{shown}: idle before each kind of kernel, per step "
          f"(total {sum(g for _, g in gaps.values()):.1f} us)")
    _print_top(gaps, 12)
    print(f"{shown}: host calls, summed per step")
    _print_top(host.by_name, 15)


if __name__ == "__main__":
  main()
