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
  times = []
  for rep in range(warmup + reps):
    state = reset(state)
    t0 = time.perf_counter()
    state = jax.block_until_ready(step(state))
    if rep >= warmup:
      times.append((time.perf_counter() - t0) * 1e3)
  return statistics.median(times), state
