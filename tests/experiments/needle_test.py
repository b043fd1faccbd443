"""Tests of the needle-in-a-haystack driver on a tiny random model.

The model knows nothing, so scores are not checked: the pipeline (prompts
of the grid's lengths, generation through every kind of cache, memory
accounting, rows, table, figures) and resuming are.
"""

import json
import pathlib
import sys
import tempfile
from unittest import mock

from absl.testing import absltest
import jax

# configs/ and experiments/ are top-level folders of the checkout, not part
# of the installed package: make them importable under any test runner.
_REPO = pathlib.Path(__file__).resolve().parents[2]
if str(_REPO) not in sys.path:
  sys.path.insert(0, str(_REPO))

# pylint: disable=g-import-not-at-top,wrong-import-position
from configs import needle as needle_config
from experiments import common
from experiments import needle
from turboquant_jax import results
from turboquant_jax.cache import CacheConfig
# pylint: enable=g-import-not-at-top,wrong-import-position

_REQUIRED = ("model", "cache", "kind", "key_bits", "value_bits", "length",
             "depth", "score", "answer", "prompt_tokens", "actual_depth",
             "memory_fraction", "kv_bytes", "new_tokens")


def _config(only: str = "full,snapkv25"):
  config = needle_config.get_config("scale=quick,model=tiny")
  config.lengths = (384,)
  config.depths = (0.0, 1.0)
  config.max_new_tokens = 3
  config.only = only
  return config


class DriverTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.lm = common.load_lm(_config())

  def test_runs_writes_and_resumes(self):
    config = _config()
    with tempfile.TemporaryDirectory() as tmp:
      paths = needle.run(config, tmp, lm=self.lm)
      rows = results.read_rows(pathlib.Path(tmp) / results.RESULTS_FILE)
      self.assertLen(rows, 4)                       # 2 caches x 1 x 2
      self.assertEqual({(r["cache"], r["depth"]) for r in rows},
                       {(c, d) for c in ("full", "snapkv25")
                        for d in (0.0, 1.0)})
      for r in rows:
        for field in _REQUIRED:
          self.assertIn(field, r)
        self.assertBetween(r["score"], 0.0, 1.0)
        self.assertBetween(r["prompt_tokens"], 300, 384)
        self.assertBetween(r["new_tokens"], 1, 3)
      depth = {r["depth"]: r["actual_depth"] for r in rows}
      self.assertEqual(depth[0.0], 0.0)
      self.assertEqual(depth[1.0], 1.0)
      mem = {r["cache"]: r["memory_fraction"] for r in rows}
      self.assertEqual(mem["full"], 1.0)
      # 96 of 384 bf16 slots, plus lengths and slots (8 bytes) against
      # lengths (4 bytes).
      per_token = 2 * 2 * 32 * 2                    # K=2, D=32, k and v
      self.assertAlmostEqual(mem["snapkv25"],
                             (96 * per_token + 8) / (384 * per_token + 4))
      names = {p.name for p in paths}
      self.assertContainsSubset({"table.md", "heatmaps.png",
                                 "heatmap_full.png",
                                 "heatmap_snapkv25.png"}, names)
      table = (pathlib.Path(tmp) / "table.md").read_text()
      self.assertIn("SnapKV, 25% of the prompt", table)

      # A run killed after its first row: the re-run does only the rest.
      results_path = pathlib.Path(tmp) / results.RESULTS_FILE
      lines = results_path.read_text().splitlines(keepends=True)
      results_path.write_text(lines[0])
      with mock.patch.object(needle, "answer",
                             wraps=needle.answer) as answer:
        needle.run(config, tmp, lm=self.lm)
      self.assertEqual(answer.call_count, 3)
      again = results.read_rows(results_path)
      self.assertEqual(json.dumps(again[0]), json.dumps(rows[0]))
      self.assertEqual(sorted((r["cache"], r["depth"]) for r in again),
                       sorted((r["cache"], r["depth"]) for r in rows))
      # Nothing left: nothing generated, the outputs redrawn.
      with mock.patch.object(needle, "answer",
                             side_effect=AssertionError("ran")):
        needle.run(config, tmp, lm=self.lm)

  def test_memory_of_every_kind(self):
    # Per token, at head dim 32: TurboQuant b bits + a float16 norm per
    # vector (16/32 bits per coordinate); the full cache bf16.
    mc = self.lm.model.config
    key = jax.random.key(0)
    full = needle.prompt_memory(mc, CacheConfig(kind="full"), 256, key)
    coords = 2 * mc.n_layers * mc.n_kv_heads * mc.head_dim * 256
    self.assertEqual(full["kv_bytes"], 2 * coords + 4 * mc.n_layers)
    for spec in needle_config.default_caches(quick_window=True):
      mem = needle.prompt_memory(mc, needle.cache_config(spec), 256, key)
      frac = mem["kv_bytes"] / full["kv_bytes"]
      if spec["kind"] == "turboquant" and spec["key_bits"] in (3, 4):
        self.assertAlmostEqual(frac, (spec["key_bits"] + 0.5) / 16,
                               places=3)
        self.assertGreater(mem["fixed_bytes"], 0)
      if spec["kind"] == "snapkv":
        self.assertAlmostEqual(frac, 0.25, places=3)
      self.assertLess(frac, 1.0 if spec["kind"] != "full" else 1.01)

  def test_bad_config_raises(self):
    config = _config(only="full,nope")
    with tempfile.TemporaryDirectory() as tmp:
      with self.assertRaisesRegex(ValueError, "nope"):
        needle.run(config, tmp, lm=self.lm)
    config = _config()
    config.depths = (1.5,)
    with tempfile.TemporaryDirectory() as tmp:
      with self.assertRaisesRegex(ValueError, "depths"):
        needle.run(config, tmp, lm=self.lm)


if __name__ == "__main__":
  absltest.main()
