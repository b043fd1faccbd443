"""LongBench's metrics against values worked out by hand (in the comments)."""

from absl.testing import absltest
from absl.testing import parameterized

from turboquant_jax.eval import metrics


class QaF1Test(parameterized.TestCase):

  def test_normalization(self):
    # lower -> drop punctuation ("cat's" -> "cats") -> drop articles ->
    # single spaces.
    self.assertEqual(metrics.normalize_answer("The Cat's hat,  an apple!"),
                     "cats hat apple")
    # "a" inside a word stays; "A" alone is an article.
    self.assertEqual(metrics.normalize_answer("A banana"), "banana")

  @parameterized.named_parameters(
      # [cat, sat] vs [cat, sat, down]: 2 shared, P = 1, R = 2/3, F = 0.8.
      ("partial", "The cat sat.", "a cat sat down", 0.8),
      # [cat, cat, dog] vs [cat]: multiset overlap 1, P = 1/3, R = 1,
      # F = 2 * (1/3) / (4/3) = 0.5.
      ("repeats", "cat cat dog", "cat", 0.5),
      ("none", "dog", "cat", 0.0),
      # Only an article: no tokens left.
      ("empty_after_normalization", "the", "the", 0.0),
      ("exact", "Paris", "paris", 1.0),
  )
  def test_values(self, prediction, truth, want):
    self.assertAlmostEqual(metrics.qa_f1_score(prediction, truth), want)


class RougeLTest(absltest.TestCase):

  def test_one_sentence(self):
    # Distinct words 5 and 5; LCS "the cat on the mat", whose word set
    # {the, cat, on, mat} has 4: P = R = 4/5, F = 2 PR / (P + R + 1e-8).
    got = metrics.rouge_l_score("the cat sat on the mat",
                                "the cat lay on the mat")
    self.assertAlmostEqual(got, 2 * 0.64 / (1.6 + 1e-8), places=12)

  def test_summary_level_union_over_sentences(self):
    # Sentences [a b], [c d] against [c d], [a b]: each reference sentence
    # finds its match, union {a, b, c, d} over 4 distinct words each side:
    # F = 1 (up to the 1e-8); a flat LCS of "a b c d" vs "c d a b" would
    # give 2 of 4 (F = 0.5).
    got = metrics.rouge_l_score("a b. c d", "c d. a b")
    self.assertAlmostEqual(got, 2 * 1 / (2 + 1e-8), places=12)

  def test_lcs_tie_breaking(self):
    # Reference sentences [a b] and [b], prediction [b a]. LCS([a b], [b a])
    # has length 1: "a" or "b". Tracing back from the end, x = [a b] and
    # y = [b a] differ at the last words; up and left both keep length 1,
    # and a tie goes left, to (b, b): the LCS is {b}. With [b] it is {b}
    # again, so the union is {b}: 1 of 2 distinct words each side, F = 0.5
    # (picking "a" would have given F = 1).
    got = metrics.rouge_l_score("b a", "a b. b")
    self.assertAlmostEqual(got, 2 * 0.25 / (1 + 1e-8), places=12)

  def test_no_sentence_scores_zero(self):
    self.assertEqual(metrics.rouge_l_score("", "a summary"), 0.0)
    self.assertEqual(metrics.rouge_l_score("...", "a summary"), 0.0)
    self.assertEqual(metrics.rouge_l_score("a summary", ""), 0.0)

  def test_long_sentences_do_not_recurse(self):
    text = " ".join(f"w{i}" for i in range(1100))
    self.assertAlmostEqual(metrics.rouge_l_score(text, text), 1.0, places=6)


class CodeSimTest(absltest.TestCase):

  def test_fuzz_ratio(self):
    # difflib: "abc" matches, 2 * 3 / 8 = 0.75.
    self.assertEqual(metrics.fuzz_ratio("abcd", "abce"), 75)
    # One matching char of 16: 12.5, which rounds half to even: 12.
    self.assertEqual(metrics.fuzz_ratio("abcdefgh", "aijklmno"), 12)
    self.assertEqual(metrics.fuzz_ratio("", ""), 100)
    self.assertEqual(metrics.fuzz_ratio("abc", ""), 0)

  def test_first_code_line(self):
    self.assertEqual(metrics.first_code_line(
        "\n\n```python\n# add one\nreturn x + 1\nfoo"), "return x + 1")
    self.assertEqual(metrics.first_code_line("// c\nint y;"), "int y;")
    self.assertEqual(metrics.first_code_line("```\n# only comments"), "")

  def test_score(self):
    self.assertEqual(metrics.code_sim_score("```\nreturn x + 1\n",
                                            "return x + 1"), 1.0)
    self.assertEqual(metrics.code_sim_score("abcd\n", "abce"), 0.75)
    self.assertEqual(metrics.code_sim_score("# nothing", "x = 1"), 0.0)


class ClassificationTest(parameterized.TestCase):

  @parameterized.named_parameters(
      # "Human" is a proper substring of the truth: dropped; 1 match left.
      ("substring_dropped", ["Human", "Human being", "Location"],
       "Human being", "Human being", 1.0),
      # Matches [Hu, Human, Human being]; dropping "Hu" shifts the list,
      # so the official loop never looks at "Human": 2 matches, 1/2.
      ("item_after_a_drop_is_kept", ["Hu", "Human", "Human being"],
       "Human being", "Human being", 0.5),
      ("two_classes_named", ["Entity", "Location"], "Entity or Location",
       "Location", 0.5),
      ("wrong_class", ["Entity", "Location"], "Entity", "Location", 0.0),
      # Nothing matched: 0, not the closest class by difflib.
      ("no_class", ["Entity", "Location"], "Locatoin", "Location", 0.0),
  )
  def test_values(self, classes, prediction, truth, want):
    self.assertEqual(metrics.classification_score(
        prediction, truth, all_classes=classes), want)

  def test_needs_classes(self):
    with self.assertRaisesRegex(ValueError, "all_classes"):
      metrics.classification_score("x", "y", all_classes=None)


class NumberTest(absltest.TestCase):

  def test_count(self):
    # Numbers [4, 5]: one equals 4.
    self.assertEqual(metrics.count_score("4 paragraphs, not 5", "4"), 0.5)
    self.assertEqual(metrics.count_score("12", "2"), 0.0)
    self.assertEqual(metrics.count_score("four", "4"), 0.0)

  def test_retrieval(self):
    self.assertEqual(metrics.retrieval_score("Paragraph 3", "Paragraph 3"),
                     1.0)
    # Numbers [3, 13]: one equals 3.
    self.assertEqual(metrics.retrieval_score("Paragraph 3 or Paragraph 13",
                                             "Paragraph 3"), 0.5)
    with self.assertRaisesRegex(ValueError, "Paragraph"):
      metrics.retrieval_score("3", "3")


if __name__ == "__main__":
  absltest.main()
