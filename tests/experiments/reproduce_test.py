"""experiments/reproduce.py: parts run through their drivers, resume, report."""

import json
import pathlib
import shutil
import tempfile

from absl.testing import absltest
import ml_collections

from configs import reproduce as reproduce_config
from experiments import reproduce


def _tiny_config(tmp: pathlib.Path) -> ml_collections.ConfigDict:
  """The quick report restricted to two fast parts on tiny settings."""
  c = reproduce_config.get_config("scale=quick")
  c.only = "perplexity,longbench"
  c.parts.perplexity = reproduce_config._part(
      "experiments.perplexity", "configs.perplexity", "scale=quick")
  return c


class ReproduceTest(absltest.TestCase):

  def _tmp(self) -> pathlib.Path:
    path = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, path, ignore_errors=True)
    return pathlib.Path(path)

  def test_config_scales_and_parts(self):
    for scale in ("quick", "full"):
      c = reproduce_config.get_config(f"scale={scale}")
      self.assertEqual(
          set(c.parts), {"distortion", "nn_search", "needle", "perplexity",
                         "longbench"})
      for name in c.parts:                 # every part's config builds
        reproduce.part_config(c.parts[name])
    with self.assertRaisesRegex(ValueError, "scale"):
      reproduce_config.get_config("scale=huge")

  def test_bad_selection_and_override(self):
    c = reproduce_config.get_config()
    c.only = "needle,tables"
    with self.assertRaisesRegex(ValueError, "unknown parts.*tables"):
      reproduce.selected_parts(c)
    part = reproduce_config._part("experiments.needle", "configs.needle",
                                  "scale=quick", no_such_field=1)
    with self.assertRaisesRegex(ValueError, "no_such_field"):
      reproduce.part_config(part)

  def test_runs_resumes_and_reports(self):
    tmp = self._tmp()
    config = _tiny_config(tmp)
    report = reproduce.run(config, tmp)
    text = report.read_text()
    self.assertIn("## perplexity", text)
    self.assertIn("LongBench-E is not available", text)   # no data: skipped
    done = json.loads((tmp / "runs/perplexity/DONE").read_text())
    self.assertEqual(done["status"], "done")
    self.assertIn("configs/perplexity.py:scale=quick", done["command"])
    rows = (tmp / "runs/perplexity/results.jsonl").read_text()
    # A second run finds the part done and does not run it again.
    reproduce.run(config, tmp)
    self.assertEqual((tmp / "runs/perplexity/results.jsonl").read_text(), rows)
    self.assertTrue((tmp / "environment.json").exists())

  def test_a_different_config_is_refused(self):
    tmp = self._tmp()
    config = _tiny_config(tmp)
    config.only = "longbench"
    reproduce.run(config, tmp)
    config.scale = "full"
    with self.assertRaisesRegex(ValueError, "different config"):
      reproduce.run(config, tmp)


if __name__ == "__main__":
  absltest.main()
