"""Wall-clock timing of jitted calls for the benchmark drivers."""

import statistics
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
