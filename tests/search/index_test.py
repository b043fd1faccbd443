"""Tests of the TurboQuant index: encode, score, top-k, bit accounting."""

import dataclasses

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

import turboquant_jax as tq
from turboquant_jax import search


def _unit(rng, n, d):
  return search.normalize(rng.standard_normal((n, d)).astype(np.float32))


class IndexTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(0)
    self.base = _unit(rng, 700, 64)
    self.queries = _unit(rng, 25, 64)
    self.key = jax.random.key(3)

  def test_derived_scale_equals_the_encoders(self):
    # For unit vectors the stored scale ‖x‖/‖c[idx]‖ is a function of the
    # codes, so the index may drop it.
    q = tq.make_quantizer(self.key, 64, 3, norm_correction=True)
    qt = tq.quantize(q, jnp.asarray(self.base))
    derived = search.derived_scales(q, qt, norm_correction=True)
    np.testing.assert_allclose(derived, qt.norms, rtol=1e-5)
    plain = search.derived_scales(q, qt, norm_correction=False)
    np.testing.assert_array_equal(plain, np.ones(700, np.float32))

  @parameterized.parameters(
      dict(method="mse", nc=True), dict(method="prod", nc=False))
  def test_unit_norm_scores_match_the_library(self, method, nc):
    cfg = search.IndexConfig(bits=3, method=method, norm_correction=nc,
                             unit_norm=True)
    index = search.build(self.key, self.base, cfg, chunk=256)
    self.assertIsNone(index.codes.norms)
    q = tq.make_quantizer(self.key, 64, 3, method, norm_correction=nc)
    want = tq.inner_product(q, tq.quantize(q, jnp.asarray(self.base)),
                            jnp.asarray(self.queries))
    got = search.score(index, jnp.asarray(self.queries))
    # prod's residual norm is stored in float16 by the index.
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3)

  @parameterized.parameters(dict(chunk=256, rotations=1),
                            dict(chunk=4096, rotations=3))
  def test_chunked_search_is_the_top_k_of_all_scores(self, chunk, rotations):
    cfg = search.IndexConfig(bits=2, unit_norm=True, rotations=rotations)
    index = search.build(self.key, self.base, cfg, chunk=chunk)
    scores, ids = search.search(index, self.queries, 10, chunk=chunk)
    full = np.asarray(search.score(index, jnp.asarray(self.queries)))
    want = -np.sort(-full, axis=1)[:, :10]
    np.testing.assert_allclose(scores, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.take_along_axis(full, ids, axis=1), scores,
                               rtol=1e-5, atol=1e-6)
    self.assertEqual(ids.dtype, np.int32)
    self.assertTrue(np.all((ids >= 0) & (ids < 700)))

  def test_best_of_rotations_keeps_the_smallest_error(self):
    cfg = search.IndexConfig(bits=2, rotations=3, norm_dtype="float32")
    index = search.build(self.key, self.base, cfg, chunk=300)
    ids = np.asarray(index.ids())
    self.assertEqual(set(ids.tolist()), {0, 1, 2})    # all three get used
    err = []
    for r in range(3):
      q = index.quantizers[r]
      x_hat = tq.dequantize(q, tq.quantize(q, jnp.asarray(self.base)))
      err.append(np.sum((np.asarray(x_hat) - self.base)**2, axis=1))
    err = np.stack(err)
    chosen = np.take_along_axis(err, ids[None], 0)[0]
    np.testing.assert_allclose(chosen, err.min(0), rtol=1e-5)
    # Quantizer 0 is the one-rotation index's: R = 3 never does worse.
    one = search.build(self.key, self.base, dataclasses.replace(
        cfg, rotations=1))
    np.testing.assert_array_equal(one.quantizer.rotation.matrix,
                                  index.quantizer.rotation.matrix)
    self.assertLess(chosen.mean(), err[0].mean())

  def test_centered_unit_vectors_are_renormalized(self):
    # Unit vectors around a common direction, as real embeddings are.
    rng = np.random.default_rng(4)
    base = search.normalize(rng.standard_normal((500, 64)) + 3)
    queries = search.normalize(rng.standard_normal((20, 64)) + 3)
    cfg = search.IndexConfig(bits=2, unit_norm=True, center=True,
                             norm_dtype="float32")
    index = search.build(self.key, base, cfg)
    got = np.asarray(search.score(index, jnp.asarray(queries)))
    mean = base.mean(0)
    q = tq.make_quantizer(self.key, 64, 2, norm_correction=True)
    x_hat = mean + np.asarray(tq.dequantize(
        q, tq.quantize(q, jnp.asarray(base - mean))))
    want = queries @ search.normalize(x_hat).T
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # The renormalized scores beat the raw centered ones.
    raw = np.asarray(search.score(
        search.build(self.key, base, dataclasses.replace(cfg,
                                                         unit_norm=False)),
        jnp.asarray(queries)))
    exact = queries @ base.T
    self.assertLess(np.mean((got - exact)**2), np.mean((raw - exact)**2))

  def test_eight_bit_scales(self):
    rng = np.random.default_rng(5)
    base = rng.standard_normal((500, 64)).astype(np.float32) * rng.uniform(
        0.3, 3, (500, 1)).astype(np.float32)
    cfg = search.IndexConfig(bits=3, norm_dtype="float32")
    full = search.build(self.key, base, cfg)
    small = search.build(self.key, base, dataclasses.replace(
        cfg, scale_bits=8))
    self.assertIsNone(small.codes.norms)
    self.assertEqual(small.scale_codes.dtype, jnp.uint8)
    q = jnp.asarray(self.queries)
    a = np.asarray(search.score(full, q))
    b = np.asarray(search.score(small, q))
    # A log range of about 3 in 255 steps: relative error <= 0.6%.
    np.testing.assert_allclose(b, a, rtol=0.01, atol=1e-6)
    self.assertFalse(np.allclose(a, b, rtol=1e-6))

  def test_bits_per_coordinate_counts_what_is_stored(self):
    for cfg, want in (
        (search.IndexConfig(bits=2, unit_norm=True), 2.0),
        (search.IndexConfig(bits=4, unit_norm=True), 4.0),
        (search.IndexConfig(bits=4), 4 + 16 / 64),            # fp16 scale
        (search.IndexConfig(bits=4, norm_dtype="float32"), 4 + 32 / 64),
        (search.IndexConfig(bits=3, center=True), 3 + 16 / 64),
        # prod: 2-bit codes + 1 sign bit + fp16 residual norm.
        (search.IndexConfig(bits=3, method="prod", unit_norm=True),
         3 + 16 / 64),
        (search.IndexConfig(bits=2, unit_norm=True, rotations=4), 2 + 2 / 64),
        (search.IndexConfig(bits=3, center=True, scale_bits=8), 3 + 8 / 64),
        (search.IndexConfig(bits=2, unit_norm=True, center=True,
                            scale_bits=8, rotations=2), 2 + 9 / 64),
        (search.IndexConfig(bits=2, unit_norm=True, rotations=5),
         2 + 3 / 64)):
      index = search.build(self.key, self.base, cfg)
      self.assertAlmostEqual(search.bits_per_coordinate(index), want,
                             msg=str(cfg))
    index = search.build(self.key, self.base,
                         search.IndexConfig(bits=2, center=True))
    self.assertEqual(search.fixed_bytes(index),
                     4 * (64 * 64 + 4 + 3 + 64))  # rotation, codebook, mean

  @parameterized.parameters(
      dict(center=False, metric="ip"), dict(center=True, metric="ip"),
      dict(center=True, metric="l2"))
  def test_eight_bits_finds_the_exact_neighbours(self, center, metric):
    rng = np.random.default_rng(1)
    # Non-unit vectors with a large common offset (as in attention keys).
    base = rng.standard_normal((600, 32)).astype(np.float32) * rng.uniform(
        0.5, 2, (600, 1)).astype(np.float32) + 3
    queries = rng.standard_normal((40, 32)).astype(np.float32) + 3
    cfg = search.IndexConfig(bits=8, center=center, metric=metric,
                             norm_dtype="float32")
    index = search.build(self.key, base, cfg)
    scores, ids = search.search(index, queries, 5)
    true_ids, true_scores = search.exact_top_k(base, queries, 5, metric)
    self.assertGreaterEqual(np.mean(ids[:, 0] == true_ids[:, 0]), 0.95)
    # The estimates are close to the exact scores (in their own scale).
    scale = np.abs(true_scores).max()
    np.testing.assert_allclose(scores[:, 0], true_scores[:, 0],
                               atol=0.02 * scale)

  def test_norm_correction_ranks_better_at_two_bits(self):
    # Recall@1@1 on 2,000 random directions: norm correction should not
    # lose to the plain scale (it wins by a wide margin on real data).
    rng = np.random.default_rng(2)
    base, queries = _unit(rng, 2000, 48), _unit(rng, 300, 48)
    # Queries near base points, so the nearest neighbour is well defined.
    queries = search.normalize(base[:300] + 0.4 * queries / np.sqrt(48))
    true_ids, _ = search.exact_top_k(base, queries, 1)
    rec = {}
    for nc in (False, True):
      cfg = search.IndexConfig(bits=2, norm_correction=nc, unit_norm=True)
      _, ids = search.search(search.build(self.key, base, cfg), queries, 1)
      rec[nc] = np.mean(ids[:, 0] == true_ids[:, 0])
    self.assertGreaterEqual(rec[True], rec[False])

  def test_bad_input_raises(self):
    with self.assertRaisesRegex(ValueError, "unit_norm"):
      search.build(self.key, self.base * 2,
                   search.IndexConfig(bits=2, unit_norm=True))
    with self.assertRaisesRegex(ValueError, "renormalizes"):
      search.IndexConfig(bits=2, unit_norm=True, center=True, metric="l2")
    with self.assertRaisesRegex(ValueError, "renormalizes"):
      search.IndexConfig(bits=2, unit_norm=True, center=True, method="prod")
    with self.assertRaisesRegex(ValueError, "scale_bits"):
      search.IndexConfig(bits=2, scale_bits=4)
    with self.assertRaisesRegex(ValueError, "scale_bits=8 needs"):
      search.IndexConfig(bits=2, scale_bits=8, method="prod")
    with self.assertRaisesRegex(ValueError, "method='mse'"):
      search.IndexConfig(bits=2, method="prod", metric="l2")
    with self.assertRaisesRegex(ValueError, "method="):
      search.IndexConfig(bits=2, method="qjl")
    with self.assertRaisesRegex(ValueError, "metric="):
      search.IndexConfig(bits=2, metric="cos")
    with self.assertRaisesRegex(ValueError, "rotations="):
      search.IndexConfig(bits=2, rotations=0)
    index = search.build(self.key, self.base, search.IndexConfig(bits=2))
    with self.assertRaisesRegex(ValueError, "k="):
      search.search(index, self.queries, 0)
    with self.assertRaisesRegex(ValueError, "k="):
      search.search(index, self.queries, 701)
    with self.assertRaisesRegex(ValueError, "dim 64"):
      search.search(index, self.queries[:, :32], 3)
    with self.assertRaisesRegex(ValueError, "non-finite"):
      bad = self.base.copy()
      bad[3, 3] = np.nan
      search.build(self.key, bad, search.IndexConfig(bits=2))
    with self.assertRaisesRegex(ValueError, "float"):
      search.build(self.key, self.base.astype(np.int32),
                   search.IndexConfig(bits=2))

  def test_index_is_a_pytree(self):
    index = search.build(self.key, self.base, search.IndexConfig(bits=2))
    leaves, tree = jax.tree.flatten(index)
    again = jax.tree.unflatten(tree, leaves)
    self.assertEqual(again.config, index.config)
    self.assertEqual(dataclasses.replace(index).size, 700)


if __name__ == "__main__":
  absltest.main()
