"""LongBench-E's files, prompts, truncation, scoring and summary."""

import json
import pathlib
import sys
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax.numpy as jnp
import numpy as np

# experiments/ is a top-level folder of the checkout, not part of the
# installed package: make it importable under any test runner.
_REPO = pathlib.Path(__file__).resolve().parents[2]
if str(_REPO) not in sys.path:
  sys.path.insert(0, str(_REPO))

# pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import common
from turboquant_jax.cache import CacheConfig
from turboquant_jax.eval import longbench
from turboquant_jax.model import sampling
# pylint: enable=g-import-not-at-top,wrong-import-position


def _line(**fields) -> str:
  obj = dict(input="q?", context="ctx", answers=["a"], length=100,
             dataset="x_e", language="en", all_classes=None, _id="id0")
  obj.update(fields)
  return json.dumps(obj)


class SpecTest(absltest.TestCase):

  def test_tables_cover_the_13_datasets(self):
    self.assertLen(longbench.DATASETS, 13)
    for table in (longbench.PROMPTS, longbench.MAX_NEW_TOKENS,
                  longbench.METRIC):
      self.assertEqual(set(table), set(longbench.DATASETS))
    self.assertEqual(
        sorted(d for c in longbench.CATEGORIES.values() for d in c),
        sorted(longbench.DATASETS))
    for d, template in longbench.PROMPTS.items():
      self.assertIn("{context}", template, d)

  def test_values_from_the_benchmark_config(self):
    # config/dataset2maxlen.json and dataset2prompt.json of LongBench.
    self.assertEqual(longbench.MAX_NEW_TOKENS["gov_report"], 512)
    self.assertEqual(longbench.MAX_NEW_TOKENS["qasper"], 128)
    self.assertEqual(longbench.MAX_NEW_TOKENS["samsum"], 128)
    self.assertEqual(longbench.MAX_NEW_TOKENS["passage_count"], 32)
    self.assertEqual(longbench.PROMPTS["lcc"],
                     "Please complete the code given below. \n{context}"
                     "Next line of code:\n")
    self.assertTrue(longbench.PROMPTS["qasper"].endswith(
        "Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:"))
    self.assertIn("\n\nArticle: {context}\n\n Answer the question",
                  longbench.PROMPTS["qasper"])

  def test_length_buckets(self):
    self.assertEqual([longbench.length_bucket(n)
                      for n in (0, 3999, 4000, 7999, 8000, 30000)],
                     ["0-4k", "0-4k", "4-8k", "4-8k", "8k+", "8k+"])


class FilesTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    tmp = tempfile.TemporaryDirectory()
    self.addCleanup(tmp.cleanup)
    self.dir = pathlib.Path(tmp.name)

  def _write(self, dataset, *lines):
    path = longbench.data_path(self.dir, dataset)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path

  def test_reads_the_official_format(self):
    self._write("trec", _line(_id="a", all_classes=["Entity", "Human"],
                              answers=["Entity"], length=5000), "",
                _line(_id="b", all_classes=["Entity", "Human"]))
    examples = longbench.load_examples(self.dir, "trec")
    self.assertEqual([e.id for e in examples], ["a", "b"])
    self.assertEqual(examples[0].answers, ("Entity",))
    self.assertEqual(examples[0].all_classes, ("Entity", "Human"))
    self.assertEqual(examples[0].bucket, "4-8k")
    self.assertLen(longbench.load_examples(self.dir, "trec", limit=1), 1)

  def test_missing_files_are_named(self):
    self._write("qasper", _line())
    with self.assertRaisesRegex(FileNotFoundError,
                                "2 LongBench-E file.*trec_e.jsonl, "
                                "lcc_e.jsonl"):
      longbench.check_files(self.dir, ("qasper", "trec", "lcc"))
    with self.assertRaisesRegex(FileNotFoundError, "not a directory"):
      longbench.check_files(self.dir / "nope", ("qasper",))
    with self.assertRaisesRegex(ValueError, "not a LongBench-E dataset"):
      longbench.check_files(self.dir, ("narrativeqa",))

  def test_malformed_lines_name_file_and_line(self):
    cases = [
        ("{not json", "qasper_e.jsonl:2: not valid JSON"),
        ("[1, 2]", ":2: expected a JSON object"),
        (json.dumps({"input": "", "context": ""}), r":2: missing field"),
        (_line(answers="a"), ":2: 'answers' must be a non-empty list"),
        (_line(answers=[]), ":2: 'answers' must be a non-empty list"),
        (_line(length="long"), ":2: 'length' must be an integer"),
        (_line(context=3), ":2: 'context' must be a string"),
        (_line(_id="id0"), ":2: '_id' 'id0' repeats line 1"),
    ]
    for bad, message in cases:
      self._write("qasper", _line(), bad)
      with self.assertRaisesRegex(ValueError, message):
        longbench.load_examples(self.dir, "qasper")

  def test_dataset_specific_fields(self):
    self._write("trec", _line(all_classes=None))
    with self.assertRaisesRegex(ValueError, "trec needs 'all_classes'"):
      longbench.load_examples(self.dir, "trec")
    self._write("passage_retrieval_en", _line(answers=["3"]))
    with self.assertRaisesRegex(ValueError, "'Paragraph <n>'"):
      longbench.load_examples(self.dir, "passage_retrieval_en")
    self._write("lcc", "")
    with self.assertRaisesRegex(ValueError, "holds no example"):
      longbench.load_examples(self.dir, "lcc")


def _example(dataset, context="ctx", input_="q?", answers=("a",),
             length=100, classes=None):
  return longbench.Example(dataset=dataset, id="x", input=input_,
                           context=context, answers=answers,
                           all_classes=classes, length=length)


class PromptTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tok = common.byte_tokenizer()

  def test_template_filled(self):
    text = longbench.prompt_text(_example("repobench-p", context="import a\n",
                                          input_="x = "))
    self.assertEqual(text, "Please complete the code given below. \nimport a"
                     "\nx = Next line of code:\n")
    # Braces in the data are not format fields.
    text = longbench.prompt_text(_example("lcc", context="d = {x}\n"))
    self.assertIn("d = {x}\n", text)

  def test_truncate_middle(self):
    # One token per byte: 10 tokens cut to the first and last 2.
    self.assertEqual(longbench.truncate_middle(self.tok, "abcdefghij", 4),
                     ("abij", 10))
    self.assertEqual(longbench.truncate_middle(self.tok, "abcdefghij", 5),
                     ("abij", 10))
    self.assertEqual(longbench.truncate_middle(self.tok, "abcd", 4),
                     ("abcd", 4))
    with self.assertRaisesRegex(ValueError, "max_length"):
      longbench.truncate_middle(self.tok, "abcd", 1)

  def test_chat_template_where_the_benchmark_uses_it(self):
    template = common.TINY_CHAT_TEMPLATE
    start = self.tok.token_to_id("<|im_start|>")
    ids, info = longbench.prompt_ids(_example("qasper"), self.tok, template,
                                     10_000)
    self.assertEqual(ids[0], start)
    self.assertEqual(info, dict(raw_tokens=len(
        longbench.prompt_text(_example("qasper")).encode()), truncated=False,
                                chat=True))
    for dataset in ("trec", "lcc"):
      ids, info = longbench.prompt_ids(_example(dataset), self.tok, template,
                                       10_000)
      self.assertEqual(self.tok.decode(ids),
                       longbench.prompt_text(_example(dataset)))
      self.assertFalse(info["chat"])
    # A base model: no template anywhere.
    ids, info = longbench.prompt_ids(_example("qasper"), self.tok, None, 50)
    self.assertLen(ids, 50)
    self.assertTrue(info["truncated"])
    self.assertFalse(info["chat"])

  def test_newline_id(self):
    self.assertEqual(self.tok.decode([longbench.newline_id(self.tok)]), "\n")


class ScoreTest(absltest.TestCase):

  def test_first_line_and_best_answer(self):
    # triviaqa keeps "Paris" (first line after leading newlines), which
    # equals the second answer.
    self.assertEqual(longbench.score("triviaqa", "\nParis\nLondon",
                                     ["London", "Paris"]), 1.0)
    # hotpotqa scores the whole output: [paris, london] vs [paris]: F=2/3.
    self.assertAlmostEqual(longbench.score("hotpotqa", "\nParis\nLondon",
                                           ["Paris"]), 2 / 3)
    self.assertEqual(longbench.score(
        "trec", "Location\nEntity", ["Location"], ["Entity", "Location"]),
                     1.0)
    with self.assertRaisesRegex(ValueError, "answers"):
      longbench.score("qasper", "x", "x")

  def test_summarize(self):
    rows = []
    for d in longbench.DATASETS:
      rows.append(dict(cache="full", dataset=d, bucket="0-4k", score=1.0))
      rows.append(dict(cache="full", dataset=d, bucket="8k+", score=0.5))
    rows.append(dict(cache="tq", dataset="trec", bucket="4-8k", score=0.25))
    summary = longbench.summarize(rows)
    self.assertEqual(list(summary), ["full", "tq"])
    full = summary["full"]
    self.assertEqual(full["datasets"]["lcc"], 75.0)
    self.assertEqual(full["buckets"]["lcc"],
                     {"0-4k": 100.0, "4-8k": None, "8k+": 50.0})
    self.assertEqual(full["categories"]["Few shot"], 75.0)
    self.assertEqual(full["average"], 75.0)
    self.assertEqual(full["examples"]["qasper"], 2)
    tq = summary["tq"]
    self.assertIsNone(tq["average"])                 # 1 of 13 datasets
    self.assertEqual(tq["partial_average"], 25.0)
    self.assertIsNone(tq["categories"]["Few shot"])  # triviaqa, samsum
    self.assertEqual(list(tq["datasets"]), ["trec"])


class GenerationTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.lm = common.tiny_lm(seed=0)
    cls.cfg = CacheConfig(kind="full", dtype="float32")
    cls.prompt = jnp.asarray(np.arange(40, 104, dtype=np.int32)[None])

  def _generate(self, model):
    out, n = sampling.generate(model, self.prompt, jnp.asarray([60]),
                               max_new_tokens=3, cache_configs=self.cfg,
                               stop_tokens=self.lm.stop_tokens)
    return np.asarray(out)[0, :int(n[0])].tolist()

  def test_first_token_bias(self):
    # Banning the greedy first token makes the model pick another one; a
    # zero bias is the model itself (one compiled loop for both).
    vocab = self.lm.model.config.vocab_size
    plain = self._generate(longbench.FirstTokenBias(
        self.lm.model, longbench.first_token_bias(vocab, ())))
    banned = self._generate(longbench.FirstTokenBias(
        self.lm.model, longbench.first_token_bias(vocab, (plain[0],))))
    self.assertNotEqual(banned[0], plain[0])
    bias = longbench.first_token_bias(vocab, (3, 5))
    self.assertEqual(np.flatnonzero(np.isinf(bias)).tolist(), [3, 5])
    self.assertEqual(float(np.abs(np.delete(bias, [3, 5])).max()), 0.0)

  def test_samsum_stops_at_a_newline_that_is_not_first(self):
    # A model that always prefers "\n": on samsum the first token may not
    # be a stop token, so it is another one, and the next, "\n", ends the
    # output; on triviaqa "\n" is no stop and fills all 5 tokens.
    newline = longbench.newline_id(self.lm.tokenizer)
    lm = longbench.LanguageModel(
        model=_PreferToken(self.lm.model, newline),
        tokenizer=self.lm.tokenizer, chat_template=self.lm.chat_template,
        stop_tokens=self.lm.stop_tokens, name="prefers newline")
    ex = _example("samsum", context="A: hi\nB: hello\n", input_="Summary:")
    outs = list(longbench.predict(lm, [ex, ex], self.cfg, max_length=200,
                                  max_new_tokens=5, batch_size=2,
                                  bucket=256))
    self.assertLen(outs, 2)
    for out in outs:
      self.assertEqual(out["new_tokens"], 2)
      self.assertEqual(out["max_new_tokens"], 5)
      self.assertFalse(out["chat"])
      self.assertLen(out["prediction"], 2)
      self.assertNotEqual(out["prediction"][0], "\n")
      self.assertEqual(out["prediction"][1], "\n")
    ex = _example("triviaqa")
    for out in longbench.predict(lm, [ex, ex], self.cfg, max_length=200,
                                 max_new_tokens=5, batch_size=2, bucket=256):
      self.assertEqual(out["prediction"], "\n" * 5)


class _PreferToken(nnx.Module):
  """Adds 1e4 to one token's logit at every step (tests)."""

  def __init__(self, model, token: int):
    self.model = model
    self.config = model.config
    self.token = token

  def init_caches(self, *args, **kwargs):
    return self.model.init_caches(*args, **kwargs)

  def prefill(self, tokens, caches, lengths, **kwargs):
    logits, caches = self.model.prefill(tokens, caches, lengths, **kwargs)
    return logits.at[..., self.token].add(1e4), caches

  def __call__(self, tokens, caches, lengths_before, **kwargs):
    logits, caches = self.model(tokens, caches, lengths_before, **kwargs)
    return logits.at[..., self.token].add(1e4), caches


if __name__ == "__main__":
  absltest.main()
