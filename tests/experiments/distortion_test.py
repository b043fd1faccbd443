"""End-to-end test of the distortion experiment on a tiny config.

Random data always; GloVe too when it is in the cache (else that part is
skipped: fetch it with `python -m turboquant_jax.data.fetch`).
"""

import json
import math
import pathlib
import shutil
import sys
import tempfile

from absl.testing import absltest

# configs/ and experiments/ are top-level folders of the checkout, not part
# of the installed package: make them importable under any test runner.
_REPO = pathlib.Path(__file__).resolve().parents[2]
if str(_REPO) not in sys.path:
  sys.path.insert(0, str(_REPO))

# pylint: disable=g-import-not-at-top,wrong-import-position
from configs import distortion as distortion_config
from experiments import distortion
from turboquant_jax import results
from turboquant_jax.data import glove
# pylint: enable=g-import-not-at-top,wrong-import-position

_REQUIRED = ("dataset", "dim", "method", "bits", "d_mse", "d_prod", "bias",
             "bias_se", "bits_per_coordinate", "exact_d_mse",
             "upper_bound_mse", "lower_bound_mse", "upper_bound_prod",
             "lower_bound_prod", "n_base", "n_queries", "seconds")
_HAVE_GLOVE = glove.glove_path().is_file()


def tiny_config(datasets):
  config = distortion_config.get_config()
  config.datasets = tuple(datasets)
  config.random_dim = 48
  config.n_base = 1200
  config.n_queries = 40
  config.quantizer_draws = 4
  config.bits = (1, 2, 3)
  config.hist_bits = (1, 2)
  config.hist_samples = 4000
  config.bias_bins = 8
  config.timing.dims = (32,)
  config.timing.n = 500
  config.timing.repeats = 1
  return config


def key(row):
  if row["op"] == "distortion":
    return (row["op"], row["dataset"], row["method"], row["bits"])
  return (row["op"], row["dim"])


class DistortionExperimentTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.datasets = ["random"] + (["glove"] if _HAVE_GLOVE else [])
    cls.config = tiny_config(cls.datasets)
    cls.tmp = pathlib.Path(tempfile.mkdtemp())
    cls.workdir = cls.tmp / "run"
    cls.outputs = distortion.run(cls.config, cls.workdir)
    cls.rows = results.read_rows(cls.workdir / results.RESULTS_FILE)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.tmp, ignore_errors=True)
    super().tearDownClass()

  def distortion_rows(self):
    return [r for r in self.rows if r["op"] == "distortion"]

  def test_glove_part(self):
    if not _HAVE_GLOVE:
      self.skipTest(f"GloVe is not in the cache ({glove.glove_path()}); run "
                    "`python -m turboquant_jax.data.fetch` to test it too")
    self.assertIn("glove", {r["dataset"] for r in self.rows
                            if r["op"] == "distortion"})

  def test_files_exist(self):
    names = {"config.json", "results.jsonl", "table.md"}
    for ds in self.datasets:
      names |= {f"fig1_error_hist_{ds}.png", f"fig2_bias_{ds}.png",
                f"fig3_distortion_{ds}.png"}
    for name in names:
      path = self.workdir / name
      self.assertTrue(path.is_file(), path)
      self.assertGreater(path.stat().st_size, 0, path)
    self.assertEqual({p.name for p in self.outputs}, names - {
        "config.json", "results.jsonl"})
    with open(self.workdir / "config.json") as f:
      self.assertEqual(json.load(f), results.jsonable(self.config))

  def test_one_row_per_item(self):
    c = self.config
    expected = {("distortion", ds, m, b) for ds in self.datasets
                for m in c.methods for b in c.bits}
    expected |= {("quantize_time", d) for d in c.timing.dims}
    keys = [key(r) for r in self.rows]
    self.assertLen(keys, len(expected))
    self.assertEqual(set(keys), expected)

  def test_rows_have_the_required_fields(self):
    for row in self.distortion_rows():
      for field in _REQUIRED:
        self.assertIn(field, row)
        self.assertIsNotNone(row[field], (field, row))
    timing = [r for r in self.rows if r["op"] == "quantize_time"]
    for row in timing:
      for field in ("dim", "n", "bits", "seconds", "device"):
        self.assertIn(field, row)
      self.assertEqual(row["n"], self.config.timing.n)
      self.assertGreater(row["seconds"], 0)

  def test_d_mse_matches_lloyd_max(self):
    # Given unit vectors, mse's measured D_mse is the exact Lloyd-Max value
    # (up to sampling error), for any data; prod's is (π/2 - 1/d)·D(b-1).
    for row in self.distortion_rows():
      with self.subTest(row=key(row)):
        if row["method"] == "mse":
          self.assertEqual(row["expected_d_mse"], row["exact_d_mse"])
        rel = row["d_mse"] / row["expected_d_mse"] - 1
        self.assertLess(abs(rel), 0.04 if row["method"] == "mse" else 0.08)
        self.assertBetween(row["d_mse"] if row["method"] == "mse" else
                           row["exact_d_mse"], row["lower_bound_mse"],
                           row["upper_bound_mse"])

  def test_mse_shrinks_and_prod_is_unbiased(self):
    rows = {(r["dataset"], r["method"], r["bits"]): r
            for r in self.distortion_rows()}
    for ds in self.datasets:
      # mse at 1 bit scales inner products by about 2/π; prod keeps them.
      self.assertAlmostEqual(rows[ds, "mse", 1]["ip_slope"], 2 / math.pi,
                             delta=0.04)
      for b in self.config.bits:
        self.assertAlmostEqual(rows[ds, "prod", b]["ip_slope"], 1, delta=0.1)
    # D_prod of random queries is D_mse/d (isotropic queries).
    for b in self.config.bits:
      for m in self.config.methods:
        row = rows["random", m, b]
        self.assertAlmostEqual(row["d_prod"] / row["iso_d_prod"], 1,
                               delta=0.15)

  def test_resume_does_not_duplicate_rows(self):
    workdir = self.tmp / "resumed"
    shutil.copytree(self.workdir, workdir)
    path = workdir / results.RESULTS_FILE
    lines = path.read_text().splitlines(keepends=True)
    # A run killed after some rows, mid-write of the next one.
    path.write_text("".join(lines[:-3]) + lines[-3][:20])
    (workdir / "table.md").unlink()
    distortion.run(self.config, workdir)
    rows = results.read_rows(path)
    self.assertEqual(sorted(map(key, rows)), sorted(map(key, self.rows)))
    self.assertTrue((workdir / "table.md").is_file())
    # A complete workdir: nothing to do, nothing appended.
    distortion.run(self.config, workdir)
    self.assertLen(results.read_rows(path), len(self.rows))

  def test_refuses_a_workdir_of_another_config(self):
    workdir = self.tmp / "other"
    shutil.copytree(self.workdir, workdir)
    config = tiny_config(self.datasets)
    config.n_queries = 41
    with self.assertRaisesRegex(results.ConfigMismatchError, "n_queries"):
      distortion.run(config, workdir)


if __name__ == "__main__":
  absltest.main()
