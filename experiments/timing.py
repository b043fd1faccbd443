"""Timing of jitted calls for the benchmark drivers: wall clock, and the
GPU's own time from a profiler trace (profiled_ms)."""

import glob
import shutil
import statistics
import tempfile
import time
from typing import Any, Callable

import jax


def time_ms(fn, *args, warmup: int, reps: int) -> float:
  """Median wall time of fn(*args) in ms (each call blocked until ready)."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - t0) * 1e3)
  return statistics.median(times)


def time_in_place_ms(step: Callable[[Any], Any], state, reset: Callable[
    [Any], Any], *, warmup: int, reps: int) -> tuple[float, Any]:
  """Median ms of state = step(reset(state)), a call that donates its state
  (caches updated in place, as in a decode loop): each call gets the state
  the last one returned, reset (e.g. its lengths) so that every call does
  the same work. reset runs outside the timed region. Returns (ms, state).
  """
  times, state = in_place_times_ms(step, state, reset, warmup=warmup,
                                   reps=reps)
  return statistics.median(times), state


def in_place_times_ms(step: Callable[[Any], Any], state, reset: Callable[
    [Any], Any], *, warmup: int, reps: int) -> tuple[list[float], Any]:
  """time_in_place_ms's calls one by one: ([ms of each timed call], state).
  """
  times = []
  for rep in range(warmup + reps):
    state = reset(state)
    t0 = time.perf_counter()
    state = jax.block_until_ready(step(state))
    if rep >= warmup:
      times.append((time.perf_counter() - t0) * 1e3)
  return times, state


def time_loop_ms(fn, first: jax.Array, *rest, loops: int, warmup: int,
                 reps: int) -> float:
  """Median device time of one fn(first, *rest) call in ms: `loops` calls
  run back to back in one jitted fori_loop (looped), so a dispatch and a
  host sync (~0.1 ms on a GPU, the most of a small call's wall time) are
  paid once per `loops` calls, not once per call."""
  return time_ms(looped(fn, loops), first, *rest, warmup=warmup,
                 reps=reps) / loops


def looped(fn, loops: int, unroll: bool = False):
  """jit of `loops` calls of fn(first, *rest) in a fori_loop (with
  `unroll`, written out one after another: no loop at run time).

  Each call's input depends on the previous call's output (first plus 0
  times one output element; XLA does not fold x·0 for floats), so the
  calls can neither be hoisted out of the loop nor overlap; that adds one
  tiny elementwise kernel per call, or none where XLA fuses it into fn's
  first kernel. The data are the same every call, so inputs smaller than
  the L2 cache are read from it after the first call (as in time_ms).
  Compile it (.lower(...).compile()) to time a variant that depends on
  module state at trace time.
  """
  if loops < 1:
    raise ValueError(f"{loops=}: expected >= 1")

  def run(x, *rest):          # rest as arguments, not baked-in constants
    def one(_, x):
      out = jax.tree.leaves(fn(x, *rest))[0]
      return x + (out.reshape(-1)[0] * 0).astype(x.dtype)
    return jax.lax.fori_loop(0, loops, one, x, unroll=loops if unroll else 1)

  return jax.jit(run)


def run_spans_ms(events: list[tuple[float, float]], runs: int) -> list[float]:
  """The span of each run (first start to last end, ms) of `runs` runs of
  one executable, from its kernels' (start ns, duration ns) in any order:
  every run launches the same kernels, so the sorted events split into
  `runs` equal groups."""
  if runs < 1 or not events or len(events) % runs:
    raise ValueError(f"{len(events)} kernel events: expected a positive "
                     f"multiple of {runs=}")
  events = sorted(events)
  per_run = len(events) // runs
  spans = []
  for i in range(0, len(events), per_run):
    group = events[i:i + per_run]
    spans.append((max(s + d for s, d in group) - group[0][0]) / 1e6)
  return spans


def _gpu_kernel_events(trace_dir: str) -> list[tuple[float, float]]:
  """(start ns, duration ns) of every kernel on a GPU stream in the
  jax.profiler trace under trace_dir."""
  paths = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)
  if not paths:
    raise RuntimeError(f"no profiler trace under {trace_dir}")
  data = jax.profiler.ProfileData.from_file(paths[0])
  events = [(float(e.start_ns), float(e.duration_ns))
            for plane in data.planes if plane.name.startswith("/device:GPU")
            for line in plane.lines if line.name.startswith("Stream")
            for e in line.events]
  if not events:
    raise RuntimeError("the profiler trace holds no GPU kernels: "
                       "profiled_ms needs a GPU")
  return events


def profiled_ms(fn, *args, warmup: int, reps: int, loops: int = 1) -> float:
  """Median GPU time of one call in ms: fn(*args) run reps times under
  jax.profiler, each run's span on the GPU (its first kernel's start to
  its last kernel's end) divided by `loops` (the calls one run makes;
  timing.looped). Unlike wall clock it leaves out the host's dispatch of
  each run, which for a compiled run of many small kernels (B = 1 decode
  attention) can be as long as the GPU's work and differs between
  executables (NOTES.md, session 15)."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  trace_dir = tempfile.mkdtemp(prefix="profiled_ms_")
  try:
    jax.profiler.start_trace(trace_dir)
    try:
      for _ in range(reps):
        jax.block_until_ready(fn(*args))
    finally:
      jax.profiler.stop_trace()
    spans = run_spans_ms(_gpu_kernel_events(trace_dir), reps)
  finally:
    shutil.rmtree(trace_dir, ignore_errors=True)
  return statistics.median(spans) / loops
