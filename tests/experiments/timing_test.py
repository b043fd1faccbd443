"""experiments.timing: the loop timer runs fn as often as it says."""

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np

from experiments import timing


class TimeLoopTest(absltest.TestCase):

  def test_runs_fn_loops_times_per_timed_call_on_changing_inputs(self):
    seen = []

    def fn(x, w):
      jax.debug.callback(lambda v: seen.append(np.asarray(v)), x)
      return jnp.tanh(x @ w)

    x, w = jnp.ones((4, 4)), jnp.full((4, 4), 0.1)
    ms = timing.time_loop_ms(fn, x, w, loops=3, warmup=1, reps=2)
    self.assertGreater(ms, 0)
    self.assertLen(seen, 3 * (1 + 2))
    # Every call reads the inputs it was given (x + 0, the dependency).
    for v in seen:
      np.testing.assert_array_equal(v, np.ones((4, 4)))

  def test_unrolled_runs_the_calls_without_a_loop(self):
    seen = []

    def fn(x):
      jax.debug.callback(lambda v: seen.append(np.asarray(v)), x)
      return x * 2

    x = jnp.ones(3)
    looped = timing.looped(fn, 4, unroll=True)
    self.assertNotIn("while", looped.lower(x).compile().as_text())
    self.assertIn("while", timing.looped(fn, 4).lower(x).compile().as_text())
    np.testing.assert_array_equal(looped(x), x)   # x + 0·out, four times
    self.assertLen(seen, 4)

  def test_run_spans_split_the_runs_kernels(self):
    # Two runs of two kernels each, given out of order (ns): each run's
    # span is its first start to its last end.
    events = [(120e3, 30e3), (0, 10e3), (100e3, 1e3), (5e3, 10e3)]
    np.testing.assert_allclose(timing.run_spans_ms(events, 2), [0.015, 0.05])
    with self.assertRaisesRegex(ValueError, "multiple of runs=2"):
      timing.run_spans_ms(events[:3], 2)

  def test_profiled_ms_needs_gpu_kernels(self):
    if jax.default_backend() == "gpu":
      self.skipTest("on a GPU the trace has kernels")
    with self.assertRaisesRegex(RuntimeError, "needs a GPU"):
      timing.profiled_ms(lambda x: x * 2, jnp.ones(3), warmup=1, reps=2)

  def test_rejects_no_loops(self):
    with self.assertRaisesRegex(ValueError, "loops"):
      timing.time_loop_ms(lambda x: x, jnp.ones(2), loops=0, warmup=0,
                          reps=1)


if __name__ == "__main__":
  absltest.main()
