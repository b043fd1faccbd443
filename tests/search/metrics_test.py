"""Tests of exact ground truth and recall@1@k."""

from absl.testing import absltest
import numpy as np

from turboquant_jax import search


class MetricsTest(absltest.TestCase):

  def test_exact_top_k_matches_a_full_sort(self):
    rng = np.random.default_rng(0)
    base = rng.standard_normal((300, 16)).astype(np.float32)
    queries = rng.standard_normal((17, 16)).astype(np.float32)
    for metric in ("ip", "l2"):
      ids, scores = search.exact_top_k(base, queries, 7, metric, chunk=5)
      if metric == "ip":
        full = queries.astype(np.float64) @ base.T.astype(np.float64)
      else:
        full = -np.sum((queries[:, None, :].astype(np.float64)
                        - base[None].astype(np.float64))**2, -1)
      want = np.argsort(-full, axis=1, kind="stable")[:, :7]
      np.testing.assert_array_equal(ids, want)
      if metric == "ip":
        np.testing.assert_allclose(scores, np.take_along_axis(full, want, 1))

  def test_ties_go_to_the_lower_id(self):
    base = np.array([[1, 0], [0, 1], [1, 0]], np.float32)
    ids, _ = search.exact_top_k(base, np.array([[1, 0]], np.float32), 3)
    np.testing.assert_array_equal(ids, [[0, 2, 1]])

  def test_recall_at_1_at_k(self):
    ids = np.array([[5, 1, 2], [3, 4, 9], [7, 8, 0], [1, 2, 3]])
    true = np.array([5, 9, 1, 2])
    np.testing.assert_allclose(search.recall_at_1_at_k(ids, true),
                               [0.25, 0.5, 0.75])
    np.testing.assert_allclose(search.recall_at_1_at_k(ids, true, [3, 1]),
                               [0.75, 0.25])
    with self.assertRaisesRegex(ValueError, "ks must lie"):
      search.recall_at_1_at_k(ids, true, [4])
    with self.assertRaisesRegex(ValueError, "true_top1"):
      search.recall_at_1_at_k(ids, true[:2])

  def test_normalize_and_errors(self):
    x = search.normalize(np.array([[3, 4], [0, 2]], np.float32))
    np.testing.assert_allclose(x, [[0.6, 0.8], [0, 1]])
    with self.assertRaisesRegex(ValueError, "zero rows"):
      search.normalize(np.zeros((2, 3), np.float32))
    with self.assertRaisesRegex(ValueError, "metric="):
      search.exact_top_k(x, x, 1, "cosine")
    with self.assertRaisesRegex(ValueError, "k="):
      search.exact_top_k(x, x, 3)


if __name__ == "__main__":
  absltest.main()
