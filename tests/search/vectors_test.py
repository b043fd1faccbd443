"""Tests of the vector-set loaders on small files the tests write."""

import pathlib
import tempfile

from absl.testing import absltest
from flax import nnx
import h5py
import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from turboquant_jax import model as model_lib
from turboquant_jax.cache.config import CacheConfig
from turboquant_jax.data import vectors


class _TmpTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.tmp = pathlib.Path(
        self.enter_context(tempfile.TemporaryDirectory()))
    self.rng = np.random.default_rng(0)


class AnnHdf5Test(_TmpTest):

  def write(self, name="x.hdf5", distance="angular", **over):
    data = dict(train=self.rng.standard_normal((40, 6)).astype(np.float32),
                test=self.rng.standard_normal((5, 6)).astype(np.float32),
                neighbors=self.rng.integers(0, 40, (5, 10)).astype(np.int32),
                distances=self.rng.random((5, 10)).astype(np.float32))
    data.update(over)
    path = self.tmp / name
    with h5py.File(path, "w") as f:
      if distance is not None:
        f.attrs["distance"] = distance
      for k, v in data.items():
        if v is not None:
          f.create_dataset(k, data=v)
    return path, data

  def test_reads_the_standard_layout(self):
    for distance, metric in (("angular", "angular"), ("euclidean", "l2"),
                             ("dot", "ip")):
      path, data = self.write(distance=distance)
      ds = vectors.load_ann_hdf5(path)
      self.assertEqual(ds.metric, metric)
      np.testing.assert_array_equal(ds.train, data["train"])
      np.testing.assert_array_equal(ds.test, data["test"])
      np.testing.assert_array_equal(ds.neighbors, data["neighbors"])
      np.testing.assert_array_equal(ds.distances, data["distances"])
      self.assertEqual(ds.dim, 6)

  def test_float64_train_and_no_neighbours(self):
    path, data = self.write(
        train=self.rng.standard_normal((40, 6)), neighbors=None,
        distances=None)
    ds = vectors.load_ann_hdf5(path)
    self.assertEqual(ds.train.dtype, np.float32)
    np.testing.assert_allclose(ds.train, data["train"], rtol=1e-6)
    self.assertIsNone(ds.neighbors)

  def test_errors(self):
    with self.assertRaises(FileNotFoundError):
      vectors.load_ann_hdf5(self.tmp / "missing.hdf5")
    path, _ = self.write(distance=None)
    with self.assertRaisesRegex(ValueError, "distance"):
      vectors.load_ann_hdf5(path)
    self.assertEqual(vectors.load_ann_hdf5(path, metric="ip").metric, "ip")
    path, _ = self.write(distance="hamming")
    with self.assertRaisesRegex(ValueError, "metric"):
      vectors.load_ann_hdf5(path)
    path, _ = self.write(test=np.zeros((5, 7), np.float32))
    with self.assertRaisesRegex(ValueError, "dim 7"):
      vectors.load_ann_hdf5(path)
    path, _ = self.write(neighbors=np.full((5, 3), 40, np.int32))
    with self.assertRaisesRegex(ValueError, "outside"):
      vectors.load_ann_hdf5(path)
    with h5py.File(self.tmp / "bad.hdf5", "w") as f:
      f.create_dataset("base", data=np.zeros((3, 2)))
    with self.assertRaisesRegex(ValueError, "train"):
      vectors.load_ann_hdf5(self.tmp / "bad.hdf5")


class ParquetTest(_TmpTest):

  def write(self, name, emb, fixed=False, extra=True):
    if fixed:
      col = pa.FixedSizeListArray.from_arrays(
          pa.array(emb.reshape(-1), pa.float32()), emb.shape[1])
    else:
      col = pa.array([list(map(float, r)) for r in emb],
                     pa.list_(pa.float64()))
    cols = {"embedding": col}
    if extra:
      cols["title"] = pa.array([f"t{i}" for i in range(len(emb))])
      cols["ids"] = pa.array([[i, i] for i in range(len(emb))],
                             pa.list_(pa.int64()))
    path = self.tmp / name
    pq.write_table(pa.table(cols), path)
    return path

  def test_reads_one_file_and_picks_the_column(self):
    emb = self.rng.standard_normal((12, 5)).astype(np.float32)
    for fixed in (False, True):
      path = self.write(f"a{fixed}.parquet", emb, fixed=fixed)
      np.testing.assert_allclose(vectors.load_parquet_embeddings(path), emb,
                                 rtol=1e-6)
      np.testing.assert_allclose(
          vectors.load_parquet_embeddings(path, "embedding", limit=4),
          emb[:4], rtol=1e-6)

  def test_reads_a_directory_in_name_order(self):
    a = self.rng.standard_normal((7, 3)).astype(np.float32)
    b = self.rng.standard_normal((5, 3)).astype(np.float32)
    sub = self.tmp / "dir"
    sub.mkdir()
    self.write("dir/part-1.parquet", b)
    self.write("dir/part-0.parquet", a)
    got = vectors.load_parquet_embeddings(sub)
    np.testing.assert_allclose(got, np.concatenate([a, b]), rtol=1e-6)
    got = vectors.load_parquet_embeddings(str(sub / "part-*.parquet"),
                                          limit=9)
    np.testing.assert_allclose(got, np.concatenate([a, b])[:9], rtol=1e-6)

  def test_errors(self):
    emb = self.rng.standard_normal((4, 3)).astype(np.float32)
    path = self.write("e.parquet", emb)
    with self.assertRaisesRegex(ValueError, "no column 'vec'"):
      vectors.load_parquet_embeddings(path, "vec")
    with self.assertRaisesRegex(ValueError, "expected a list of floats"):
      vectors.load_parquet_embeddings(path, "title")
    with self.assertRaises(FileNotFoundError):
      vectors.load_parquet_embeddings(self.tmp / "none.parquet")
    with self.assertRaisesRegex(ValueError, "limit"):
      vectors.load_parquet_embeddings(path, limit=0)
    ragged = self.tmp / "ragged.parquet"
    pq.write_table(pa.table({"e": pa.array([[1.0, 2.0], [3.0]])}), ragged)
    with self.assertRaisesRegex(ValueError, "lengths"):
      vectors.load_parquet_embeddings(ragged)
    two = self.tmp / "two.parquet"
    pq.write_table(pa.table({"a": pa.array([[1.0]]),
                             "b": pa.array([[2.0]])}), two)
    with self.assertRaisesRegex(ValueError, "cannot pick"):
      vectors.load_parquet_embeddings(two)


class SplitTest(absltest.TestCase):

  def test_split_is_disjoint_and_seeded(self):
    x = np.arange(100, dtype=np.float32)[:, None] * np.ones((1, 3))
    base, queries = vectors.split_base_queries(x, 60, 30, seed=1)
    self.assertEqual((base.shape, queries.shape), ((60, 3), (30, 3)))
    self.assertEmpty(set(base[:, 0]) & set(queries[:, 0]))
    again, _ = vectors.split_base_queries(x, 60, 30, seed=1)
    np.testing.assert_array_equal(base, again)
    with self.assertRaisesRegex(ValueError, "at most"):
      vectors.split_base_queries(x, 90, 11)

  def test_unique_rows_keeps_first_occurrences_in_order(self):
    x = np.array([[3, 1], [1, 2], [3, 1], [0, 0], [1, 2]], np.float32)
    np.testing.assert_array_equal(vectors.unique_rows(x),
                                  [[3, 1], [1, 2], [0, 0]])


class AttentionVectorsTest(absltest.TestCase):

  def test_keys_are_what_the_kv_cache_stores(self):
    mc = model_lib.ModelConfig(vocab_size=61, d_model=32, n_layers=2,
                               n_heads=4, n_kv_heads=2, head_dim=16,
                               ffn_dim=48, max_seq_len=64)
    model = model_lib.Transformer(mc, rngs=nnx.Rngs(0))
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (2, 24), 0,
                                           61))
    caches = model.init_caches(2, 24, CacheConfig(kind="full",
                                                  dtype="float32"))
    _, caches = model_lib.forward_prefill(model, tokens, caches,
                                          np.array([24, 24]))
    keys, queries = vectors.attention_vectors(model, tokens, 1)
    self.assertEqual(keys.shape, (2, 24, 2, 16))
    self.assertEqual(queries.shape, (2, 24, 4, 16))
    np.testing.assert_allclose(
        keys, np.swapaxes(np.asarray(caches[1].keys), 1, 2),
        rtol=1e-4, atol=1e-5)
    with self.assertRaisesRegex(ValueError, "layer"):
      vectors.attention_vectors(model, tokens, 2)


if __name__ == "__main__":
  absltest.main()
