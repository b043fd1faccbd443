"""Tests of the LongBench-E driver on a tiny random model and fixture files.

The fixture holds every one of the 13 datasets (so every metric) in the
official JSONL format, three examples each in the three length buckets;
the quick config takes the first two.
"""

import json
import pathlib
import shutil
import sys
import tempfile
from unittest import mock

from absl.testing import absltest
import numpy as np

# configs/ and experiments/ are top-level folders of the checkout, not part
# of the installed package: make them importable under any test runner.
_REPO = pathlib.Path(__file__).resolve().parents[2]
if str(_REPO) not in sys.path:
  sys.path.insert(0, str(_REPO))

# pylint: disable=g-import-not-at-top,wrong-import-position
from configs import longbench as longbench_config
from experiments import common
from experiments import longbench as longbench_exp
from turboquant_jax import results
from turboquant_jax.eval import longbench
# pylint: enable=g-import-not-at-top,wrong-import-position

_ANSWERS = {
    "qa_f1": ["Paris", "the city of Paris"],
    "rouge_l": ["The report reviews the budget. It finds a deficit."],
    "classification": ["Location"],
    "count": ["3"],
    "retrieval": ["Paragraph 2"],
    "code_sim": ["return x + 1"],
}
_CLASSES = ["Abbreviation", "Entity", "Description", "Human", "Location",
            "Numeric value"]


def write_fixture(data_dir: pathlib.Path) -> None:
  """Three examples per dataset, lengths in the three buckets."""
  data_dir.mkdir(parents=True, exist_ok=True)
  for dataset in longbench.DATASETS:
    lines = []
    for i, length in enumerate((1200, 5000, 9000)):
      code = longbench.METRIC[dataset] == "code_sim"
      context = ("def f(x):\n    y = x\n" * (3 + 10 * i) if code else
                 "Paragraph 1: Paris is the capital of France. " * (3 + 10 * i))
      lines.append(json.dumps(dict(
          input="def g(x):\n    " if code else f"Where is {{it}} {i}?",
          context=context, answers=_ANSWERS[longbench.METRIC[dataset]],
          length=length, dataset=f"{dataset}_e", language="en",
          all_classes=_CLASSES if dataset == "trec" else None,
          _id=f"{dataset}-{i}")))
    longbench.data_path(data_dir, dataset).write_text("\n".join(lines) + "\n")


def quick_config(data_dir):
  config = longbench_config.get_config("scale=quick")
  config.data_dir = str(data_dir)
  return config


class EndToEndTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = pathlib.Path(tempfile.mkdtemp())
    write_fixture(cls.tmp / "data")
    cls.config = quick_config(cls.tmp / "data")
    cls.lm = common.load_lm(cls.config)
    cls.workdir = cls.tmp / "run"
    cls.paths = longbench_exp.run(cls.config, cls.workdir, lm=cls.lm)
    cls.rows = results.read_rows(cls.workdir / results.RESULTS_FILE)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.tmp, ignore_errors=True)
    super().tearDownClass()

  def test_one_row_per_cache_dataset_example(self):
    caches = [s["name"] for s in self.config.caches]
    want = [(c, d, f"{d}-{i}") for c in caches for d in longbench.DATASETS
            for i in range(2)]
    self.assertEqual([(r["cache"], r["dataset"], r["id"]) for r in self.rows],
                     want)
    for row in self.rows:
      self.assertEqual(row["score"], longbench.score(
          row["dataset"], row["prediction"], row["answers"],
          _CLASSES if row["dataset"] == "trec" else None))
      self.assertEqual(row["bucket"], longbench.length_bucket(row["length"]))
      self.assertBetween(row["new_tokens"], 1, self.config.max_new_tokens)
      self.assertEqual(row["max_new_tokens"], self.config.max_new_tokens)
      # Every fixture prompt is longer than the quick max_length (64).
      self.assertTrue(row["truncated"])
      self.assertEqual(row["chat"],
                       row["dataset"] not in longbench.NO_CHAT_TEMPLATE)
      self.assertLessEqual(row["prompt_tokens"], 64 + 40)   # + the template
    by = {(r["cache"], r["id"]): r for r in self.rows}
    self.assertEqual(by["kivi2_w8", "trec-0"]["kind"], "kivi")
    self.assertEqual(by["tq2.5", "lcc-1"]["key_bits"], 2.5)
    self.assertEqual({r["bucket"] for r in self.rows}, {"0-4k", "4-8k"})
    # bf16; head dim 32 at 2.5 bits: the codes plus two fp16 norms (one
    # per part of the outlier split) per 32 coordinates = 3.5 bits.
    self.assertAlmostEqual(by["full", "qasper-0"]["bits_per_coordinate"], 16,
                           delta=0.05)
    self.assertAlmostEqual(by["tq2.5", "qasper-0"]["bits_per_coordinate"],
                           3.5, delta=0.05)
    self.assertBetween(by["kivi2_w8", "qasper-0"]["bits_per_coordinate"], 2,
                       16)

  def test_scores_and_table(self):
    for path in self.paths:
      self.assertTrue(path.is_file(), path)
    scores = json.loads((self.workdir / longbench_exp.SCORES_FILE)
                        .read_text())["summary"]
    self.assertEqual(list(scores), [s["name"] for s in self.config.caches])
    for cache, s in scores.items():
      per_dataset = [100 * np.mean([r["score"] for r in self.rows
                                    if r["cache"] == cache
                                    and r["dataset"] == d])
                     for d in longbench.DATASETS]
      self.assertAlmostEqual(s["average"], np.mean(per_dataset), places=9)
      self.assertEqual(sum(s["examples"].values()), 26)
    table = (self.workdir / longbench_exp.TABLE_FILE).read_text()
    for text in ("| `full` | 16.0", "| `kivi2_w8` |", "Average",
                 "passage_count",
                 "Not the benchmark", "| 0-4k |"):
      self.assertIn(text, table)

  def test_resume_redoes_only_missing_examples(self):
    workdir = self.tmp / "resumed"
    shutil.copytree(self.workdir, workdir)
    path = workdir / results.RESULTS_FILE
    lines = path.read_text().splitlines(keepends=True)
    # Killed mid-write of the last row, two rows before it never written.
    path.write_text("".join(lines[:-3]) + lines[-1][:25])
    real = longbench.predict
    with mock.patch.object(longbench, "predict", side_effect=real) as pred:
      longbench_exp.run(self.config, workdir, lm=self.lm)
    asked = [ex.id for call in pred.call_args_list for ex in call.args[1]]
    self.assertEqual(asked, [r["id"] for r in self.rows[-3:]])
    rows = results.read_rows(path)
    self.assertEqual([(r["cache"], r["id"]) for r in rows],
                     [(r["cache"], r["id"]) for r in self.rows])
    # Greedy decoding with the same rotations: the same predictions.
    self.assertEqual([r["prediction"] for r in rows[-3:]],
                     [r["prediction"] for r in self.rows[-3:]])
    with mock.patch.object(longbench, "predict") as pred:
      longbench_exp.run(self.config, workdir, lm=self.lm)
    pred.assert_not_called()
    self.assertLen(results.read_rows(path), len(self.rows))


class ConfigTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    tmp = tempfile.TemporaryDirectory()
    self.addCleanup(tmp.cleanup)
    self.tmp = pathlib.Path(tmp.name)
    write_fixture(self.tmp / "data")

  def test_configs(self):
    config = longbench_config.get_config()
    self.assertEqual((config.model, config.max_length, config.max_new_tokens),
                     ("smollm2", 7500, 0))
    self.assertEqual(longbench_config.get_config("model=hf").model, "hf")
    with self.assertRaisesRegex(ValueError, "unknown config arg"):
      longbench_config.get_config("bits=3")
    with self.assertRaisesRegex(ValueError, "must be one of"):
      longbench_config.get_config("model=gpt")

  def test_bad_config_fails_before_loading_the_model(self):
    config = quick_config(self.tmp / "data")
    cases = [
        (dict(data_dir=""), ValueError, "config.data_dir is empty"),
        (dict(datasets="trec,narrativeqa"), ValueError,
         r"unknown datasets \['narrativeqa'\]"),
        (dict(only="full,tq9"), ValueError, r"unknown caches \['tq9'\]"),
        (dict(data_dir=str(self.tmp)), FileNotFoundError,
         "lacks 13 LongBench-E file"),
    ]
    for fields, error, message in cases:
      bad = quick_config(self.tmp / "data")
      bad.update(fields)
      with mock.patch.object(common, "load_lm") as load, \
          self.assertRaisesRegex(error, message):
        longbench_exp.run(bad, self.tmp / "run")
      load.assert_not_called()
    (self.tmp / "data" / "lcc_e.jsonl").write_text("{}\n")
    with self.assertRaisesRegex(ValueError, "lcc_e.jsonl:1: missing field"):
      longbench_exp.run(config, self.tmp / "run2")

  def test_subsets(self):
    config = quick_config(self.tmp / "data")
    config.datasets = "lcc, trec"
    config.only = "tq2.5,full"
    self.assertEqual(longbench_exp.datasets(config), ("lcc", "trec"))
    self.assertEqual([s["name"] for s in longbench_exp.cache_specs(config)],
                     ["tq2.5", "full"])
    self.assertEqual(list(longbench_exp.load_data(config)), ["lcc", "trec"])

  def test_layer_configs(self):
    model_config = common.tiny_lm().model.config
    spec = longbench_config.cache("x", key_bits=4, value_bits=2,
                                  center_keys=True, edge_layers=1,
                                  edge=dict(kind="full"))
    configs = longbench_exp.layer_configs(model_config, spec)
    self.assertEqual([c.kind for c in configs],
                     ["full", "turboquant", "full"])
    self.assertEqual((configs[1].key_bits, configs[1].value_bits), (4, 2))
    self.assertTrue(configs[1].center_keys)
    (kivi,) = set(longbench_exp.layer_configs(
        model_config, longbench_config.cache("k", "kivi", key_bits=2,
                                             value_bits=2, window=8)))
    self.assertEqual((kivi.kind, kivi.window), ("kivi", 8))


class HfTokenizerTest(absltest.TestCase):

  def test_reads_tokenizer_template_and_stops(self):
    with tempfile.TemporaryDirectory() as tmp:
      path = pathlib.Path(tmp)
      common.byte_tokenizer().save(str(path / "tokenizer.json"))
      (path / "tokenizer_config.json").write_text(json.dumps(dict(
          chat_template=[dict(name="tool_use", template="T"),
                         dict(name="default", template="D")])))
      (path / "generation_config.json").write_text(json.dumps(dict(
          eos_token_id=[256, 1])))
      tok, template, stops = common.hf_tokenizer(path)
      self.assertEqual(tok.decode(tok.encode("héllo").ids), "héllo")
      self.assertEqual(template, "D")
      # eos ids first, then the vocabulary's <|im_end|> (258).
      self.assertEqual(stops, (256, 1, 258))
      (path / "tokenizer.json").unlink()
      with self.assertRaisesRegex(FileNotFoundError, "tokenizer.json"):
        common.hf_tokenizer(path)

  def test_hf_model_needs_a_path(self):
    config = longbench_config.get_config("model=hf")
    with self.assertRaisesRegex(ValueError, "config.hf_path"):
      common.load_lm(config)


if __name__ == "__main__":
  absltest.main()
