"""Tests of the faiss baselines: shapes, honest bit counts, sanity."""

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from turboquant_jax import search
from turboquant_jax.search import baselines


class PQShapeTest(parameterized.TestCase):

  @parameterized.parameters(
      (50, 2, 13, 52), (50, 4, 25, 50), (50, 3, 19, 57), (576, 2, 144, 576),
      (576, 4, 288, 576), (192, 2, 48, 192), (3072, 4, 1536, 3072),
      (8, 16, 8, 8))
  def test_pq_shape(self, dim, bits, m, padded):
    self.assertEqual(baselines.pq_shape(dim, bits), (m, padded))
    # Never under the budget.
    self.assertGreaterEqual(8 * m / dim, min(bits, 8) - 1e-9)

  def test_pq_shape_rejects_bad_input(self):
    with self.assertRaisesRegex(ValueError, "bits"):
      baselines.pq_shape(10, 0)


class FaissTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    baselines.set_threads(1)
    rng = np.random.default_rng(0)
    self.base = search.normalize(rng.standard_normal((1000, 24)))
    # Queries near base rows, so that the nearest neighbour is clear.
    self.queries = search.normalize(
        self.base[:50] + 0.1 * rng.standard_normal((50, 24)))
    self.true, _ = search.exact_top_k(self.base, self.queries, 1)

  def test_pq(self):
    fi = baselines.build_pq(self.base, 4)       # M = 12 over pairs
    self.assertEqual(fi.setting["M"], 12)
    self.assertAlmostEqual(fi.bits_per_coordinate, 4.0)
    self.assertGreater(fi.train_seconds, 0)
    scores, ids = baselines.search(fi, self.queries, 10)
    self.assertEqual(ids.shape, (50, 10))
    self.assertTrue(np.all(np.diff(scores, axis=1) <= 1e-6))
    rec = search.recall_at_1_at_k(ids, self.true[:, 0], [1, 10])
    self.assertGreater(rec[1], 0.9)

  def test_pq_pads_odd_dims(self):
    fi = baselines.build_pq(self.base[:, :23], 2)   # M = 6 over 4 (24 dims)
    self.assertEqual((fi.setting["M"], fi.padded_dim), (6, 24))
    self.assertAlmostEqual(fi.bits_per_coordinate, 48 / 23)
    _, ids = baselines.search(fi, self.queries[:, :23], 3)
    self.assertEqual(ids.shape, (50, 3))

  def test_rabitq_counts_its_factors(self):
    for nb_bits, code_bytes in ((1, 3 + 8), (2, 3 + 8 + 3 + 12),
                                (4, 3 + 8 + 9 + 12)):
      fi = baselines.build_rabitq(self.base, nb_bits)
      self.assertEqual(fi.setting["code_bytes"], code_bytes)
      self.assertAlmostEqual(fi.bits_per_coordinate, code_bytes * 8 / 24)
    _, ids = baselines.search(fi, self.queries, 10)
    rec = search.recall_at_1_at_k(ids, self.true[:, 0], [1, 10])
    self.assertGreater(rec[1], 0.9)

  def test_l2(self):
    fi = baselines.build_pq(self.base * 3, 4, metric="l2")
    scores, ids = baselines.search(fi, self.queries * 3, 5)
    self.assertTrue(np.all(scores <= 1e-6))           # -squared distances
    true, _ = search.exact_top_k(self.base * 3, self.queries * 3, 1, "l2")
    self.assertGreater(np.mean(ids[:, 0] == true[:, 0]), 0.6)

  def test_bad_input_raises(self):
    with self.assertRaisesRegex(ValueError, "nb_bits"):
      baselines.build_rabitq(self.base, 0)
    with self.assertRaisesRegex(ValueError, "at least 256"):
      baselines.build_pq(self.base[:100], 2)
    fi = baselines.build_rabitq(self.base, 1)
    with self.assertRaisesRegex(ValueError, "dim 24"):
      baselines.search(fi, self.queries[:, :5], 3)
    with self.assertRaisesRegex(ValueError, "k="):
      baselines.search(fi, self.queries, 0)
    with self.assertRaisesRegex(ValueError, "metric="):
      baselines.build_pq(self.base, 2, metric="cos")


if __name__ == "__main__":
  absltest.main()
