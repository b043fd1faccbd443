"""End-to-end test of the nearest-neighbour experiment on tiny data.

Random vectors, an ann-benchmarks HDF5 file and a parquet file, all written
here; no network and no cached data needed.
"""

import collections
import pathlib
import sys
import tempfile

from absl.testing import absltest
import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

_REPO = pathlib.Path(__file__).resolve().parents[2]
if str(_REPO) not in sys.path:
  sys.path.insert(0, str(_REPO))

# pylint: disable=g-import-not-at-top,wrong-import-position
from configs import nn_search as nn_config
from experiments import nn_search
from turboquant_jax import results
from turboquant_jax import search
# pylint: enable=g-import-not-at-top,wrong-import-position

_REQUIRED = ("dataset", "dim", "method", "bits", "k", "recall",
             "index_seconds", "bits_per_coord")


def _write_files(tmp: pathlib.Path) -> tuple[str, str]:
  rng = np.random.default_rng(0)
  train = rng.standard_normal((400, 16)).astype(np.float32)
  test = train[:20] + 0.3 * rng.standard_normal((20, 16)).astype(np.float32)
  ids, _ = search.exact_top_k(train, test, 5, "l2")
  hdf5 = tmp / "tiny-16-euclidean.hdf5"
  with h5py.File(hdf5, "w") as f:
    f.attrs["distance"] = "euclidean"
    f.create_dataset("train", data=train)
    f.create_dataset("test", data=test)
    f.create_dataset("neighbors", data=ids)
  emb = rng.standard_normal((330, 20)).astype(np.float32)
  parquet = tmp / "emb.parquet"
  pq.write_table(pa.table({"title": [str(i) for i in range(330)],
                           "vec": pa.array(list(emb), pa.list_(
                               pa.float32()))}), parquet)
  return str(hdf5), str(parquet)


def tiny_config(hdf5: str, parquet: str):
  config = nn_config.get_config("scale=quick")
  ds = nn_config.dataset
  config.datasets = (
      ds("rand", "random", n_base=300, n_queries=20, dim=24),
      ds("ann", "ann_hdf5", n_base=400, n_queries=20, path=hdf5),
      ds("pq_emb", "parquet", n_base=300, n_queries=30, path=parquet,
         metric="ip"),
  )
  config.bits = (2,)
  config.k_max = 8
  config.methods = tuple(
      dict(m, extra_bits=(3,) if m["name"] in ("tq_mse_nc", "rabitq") else ())
      for m in config.methods)
  config.timing.dims = (32,)
  config.timing.n = 300
  config.timing.n_by_family = {"pq": 260}
  config.timing.methods = ("tq_mse_nc", "pq")
  return config


class NNSearchExperimentTest(absltest.TestCase):

  def test_runs_resumes_and_reports(self):
    with tempfile.TemporaryDirectory() as tmp:
      tmp = pathlib.Path(tmp)
      config = tiny_config(*_write_files(tmp))
      workdir = tmp / "run"
      paths = nn_search.run(config, workdir)
      names = {p.name for p in paths}
      self.assertTrue({"fig5_rand.png", "fig5_ann.png", "fig5_pq_emb.png",
                       "recall_vs_bits.png", "table.md"} <= names, names)
      rows = results.read_rows(workdir / results.RESULTS_FILE)
      recall = [r for r in rows if r["op"] == "recall"]
      index = [r for r in rows if r["op"] == "index"]
      timing = [r for r in rows if r["op"] == "index_time"]
      for r in recall:
        for f in _REQUIRED:
          self.assertIn(f, r)
      # Every (data set, method, budget) has k = 1..8, non-decreasing.
      curves = collections.defaultdict(list)
      for r in recall:
        curves[r["dataset"], r["method"], r["bits"]].append(
            (r["k"], r["recall"]))
      self.assertLen(curves, len(index))
      for key, curve in curves.items():
        ks, rec = zip(*sorted(curve))
        self.assertEqual(ks, tuple(range(1, 9)), key)
        self.assertTrue(all(0 <= a <= b <= 1 for a, b in zip(rec, rec[1:])),
                        key)
      by = {(r["dataset"], r["method"], r["bits"]): r for r in index}
      # prod has no l2 scoring: skipped on the euclidean file.
      self.assertNotIn(("ann", "tq_prod", 2), by)
      self.assertIn(("rand", "tq_prod", 2), by)
      self.assertIn(("rand", "tq_mse_nc", 3), by)      # extra budget
      self.assertNotIn(("rand", "tq_mse", 3), by)
      self.assertEqual(by["ann", "pq", 2]["metric"], "l2")
      # Honest bits: unit vectors store no scale, raw ones an fp16 one.
      self.assertAlmostEqual(by["rand", "tq_mse_nc", 2]["bits_per_coord"], 2)
      self.assertAlmostEqual(by["pq_emb", "tq_mse_nc", 2]["bits_per_coord"],
                             2 + 16 / 20)
      self.assertAlmostEqual(by["rand", "pq", 2]["bits_per_coord"], 2)
      self.assertAlmostEqual(by["ann", "pq", 2]["bits_per_coord"], 2)
      self.assertGreater(by["rand", "rabitq", 2]["bits_per_coord"], 2)
      # At 8 candidates of 400 on this easy set, every method finds most.
      self.assertGreater(by["ann", "tq_mse_nc", 2]["recall_at_k_max"], 0.8)
      self.assertEqual({(r["method"], r["n"]) for r in timing},
                       {("tq_mse_nc", 300), ("pq", 260)})
      table = (workdir / "table.md").read_text()
      self.assertIn("## rand: d=24", table)
      self.assertIn("- 2-bit budget, vs pq at 2.00 b/coord", table)
      self.assertIn("Index time", table)

      # A second run does nothing new and redraws the outputs.
      n_lines = len(rows)
      nn_search.run(config, workdir)
      self.assertLen(results.read_rows(workdir / results.RESULTS_FILE),
                     n_lines)

      # A run killed mid-item (recall rows written, index row not) is
      # completed without duplicate rows.
      path = workdir / results.RESULTS_FILE
      lines = path.read_text().splitlines(keepends=True)
      last_index = max(i for i, l in enumerate(lines) if '"index"' in l)
      path.write_text("".join(lines[:last_index - 3] + lines[last_index + 1:]))
      nn_search.run(config, workdir)
      rows = results.read_rows(path)
      keys = [tuple(r[f] for f in nn_search.RECALL_KEY) for r in rows
              if r["op"] == "recall"]
      self.assertLen(set(keys), len(keys))
      self.assertLen(rows, n_lines)

      # Another rotation seed on the same data, and the spread over both.
      config.quantizer_seed = 1
      config.only_methods = "tq_mse_nc"
      config.only_datasets = "rand"
      config.timing.dims = ()
      nn_search.run(config, tmp / "seed1")
      spread = nn_search.seed_spread([workdir, tmp / "seed1"])
      self.assertIn("| rand | tq_mse_nc | 2 | ", spread)
      self.assertIn("(2) |", spread)
      self.assertIn("| rand | pq | 2 | ", spread)
      self.assertIn("± nan (1)", spread)

      config.k_max = 4
      with self.assertRaises(results.ConfigMismatchError):
        nn_search.run(config, tmp / "seed1")

  def test_configs(self):
    for scale in ("quick", "default"):
      config = nn_config.get_config(f"scale={scale}")
      names = [d["name"] for d in config.datasets]
      self.assertEqual(names, ["glove", "smollm2_embeddings",
                               "smollm2_keys"])
      self.assertEqual(tuple(config.bits), (2, 4))
    with self.assertRaisesRegex(ValueError, "scale"):
      nn_config.get_config("scale=huge")
    with self.assertRaisesRegex(ValueError, "unknown config arg"):
      nn_config.get_config("size=1")

  def test_unknown_names_raise(self):
    config = nn_config.get_config("scale=quick")
    config.only_methods = "tq_mse,nope"
    with tempfile.TemporaryDirectory() as tmp:
      with self.assertRaisesRegex(ValueError, "nope"):
        nn_search.run(config, tmp)


if __name__ == "__main__":
  absltest.main()
