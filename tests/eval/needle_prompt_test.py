"""Tests of the needle-in-a-haystack prompts and score (no model)."""

import dataclasses

from absl.testing import absltest
from absl.testing import parameterized

from turboquant_jax.eval import needle


@dataclasses.dataclass(frozen=True)
class _Encoding:
  ids: list[int]


class WordTokenizer:
  """One token per whitespace-separated word (ids: hash buckets), so that
  token counts can be worked out by hand."""

  def encode(self, text: str, add_special_tokens: bool = False):
    del add_special_tokens
    return _Encoding([hash(w) % 1000 for w in text.split()])


def _render(context: str) -> str:
  # 13 words around the context: "<user>", "Q:", the question's 10 words,
  # "<assistant>".
  return f"<user> {context} Q: {needle.NEEDLE.question} <assistant>"


def _haystack(n: int) -> list[needle.Sentence]:
  # Sentence i has i % 3 + 2 words ("s<i>" then fillers).
  return [needle.Sentence(" ".join([f"s{i}"] + ["w"] * (i % 3 + 1)),
                          "\n\n" if i % 4 == 3 else " ")
          for i in range(n)]


def _words(text: str) -> int:
  return len(text.split())


class ScoreTest(parameterized.TestCase):

  def test_answer_words_of_the_default_needle(self):
    # Needle words minus stopwords minus the question's words.
    self.assertEqual(needle.NEEDLE.answer_words,
                     ("eat", "sandwich", "sit", "dolores", "park", "sunny",
                      "day"))

  @parameterized.named_parameters(
      ("exact", "The best thing to do in San Francisco is eat a sandwich "
                "and sit in Dolores Park on a sunny day.", 1.0),
      ("case_and_punctuation", "EAT a sandwich; sit in dolores-park, "
                               "sunny DAY!", 1.0),
      ("partial", "a sandwich in Dolores Park", 3 / 7),
      ("echo_of_the_question", "The best thing to do in San Francisco is",
       0.0),
      ("empty", "", 0.0),
      ("inside_a_longer_word_does_not_count", "sandwiches parking", 0.0),
  )
  def test_score(self, answer, want):
    self.assertAlmostEqual(needle.score(answer), want)

  def test_needle_without_answer_words_raises(self):
    with self.assertRaisesRegex(ValueError, "nothing to score"):
      needle.Needle(sentence="What is it?", question="What is it?")


class HaystackTest(absltest.TestCase):

  def test_split_sentences(self):
    text = ('Mr. Knightley came in.  "Is it you?" cried she. She smiled! '
            'E. Smith wrote it... \n and then? Nobody knew.')
    self.assertEqual(needle.split_sentences(text), [
        "Mr. Knightley came in.", '"Is it you?" cried she.', "She smiled!",
        "E. Smith wrote it... and then?", "Nobody knew."])

  def test_haystack_sentences_drop_headings_and_keep_paragraphs(self):
    text = ("EMMA\n\nBy Jane Austen\n\nCHAPTER I\n\n"
            "First one. Second\none.\n\nThird one.\n\nCHAPTER II\n\n"
            "Fourth one.\n")
    got = needle.haystack_sentences(text)
    self.assertEqual(got, [needle.Sentence("First one."),
                           needle.Sentence("Second one.", "\n\n"),
                           needle.Sentence("Third one.", "\n\n"),
                           needle.Sentence("Fourth one.", "\n\n")])
    self.assertEqual(needle.join(got[:2]), "First one. Second one.")

  def test_insert(self):
    s = _haystack(3)
    got = needle.insert(s, needle.NEEDLE, 1)
    self.assertEqual(got[1].text, needle.NEEDLE.sentence)
    self.assertEqual(got[0], s[0])
    self.assertEqual(got[2:], s[1:])
    with self.assertRaisesRegex(ValueError, "index"):
      needle.insert(s, needle.NEEDLE, 4)


class BuildPromptTest(parameterized.TestCase):

  def _build(self, length, depth, n=200):
    return needle.build_prompt(WordTokenizer(), _render, _haystack(n),
                               needle.NEEDLE, length=length, depth=depth)

  @parameterized.parameters(60, 61, 62, 63, 100)
  def test_longest_prompt_that_fits(self, length):
    # The needle has 21 words, the template 13: the haystack gets the
    # longest prefix of sentences with at most length - 34 words.
    p = self._build(length, 0.5)
    self.assertLessEqual(len(p.ids), length)
    sizes = [i % 3 + 2 for i in range(200)]
    m = p.haystack_sentences
    self.assertLessEqual(sum(sizes[:m]) + 34, length)
    self.assertGreater(sum(sizes[:m + 1]) + 34, length)
    self.assertEqual(len(p.ids), sum(sizes[:m]) + 34)

  @parameterized.parameters(0.0, 0.3, 0.5, 0.77, 1.0)
  def test_needle_on_the_last_boundary_before_the_depth(self, depth):
    p = self._build(100, depth)
    sizes = [i % 3 + 2 for i in range(p.haystack_sentences)]
    before = sum(sizes[:p.needle_index])
    self.assertLessEqual(before, depth * sum(sizes))
    if p.needle_index < p.haystack_sentences:
      self.assertGreater(before + sizes[p.needle_index], depth * sum(sizes))
    self.assertAlmostEqual(p.actual_depth, before / sum(sizes))

  def test_prompt_text(self):
    # The needle comes after sentence s<j-1> and before s<j>, once.
    p = needle.build_prompt(WordTokenizer(), _render, _haystack(200),
                            needle.NEEDLE, length=100, depth=0.5)
    text = _render(needle.join(needle.insert(
        _haystack(200)[:p.haystack_sentences], needle.NEEDLE,
        p.needle_index)))
    self.assertEqual(len(p.ids), _words(text))
    self.assertEqual(text.count(needle.NEEDLE.sentence), 1)
    after = text.split(needle.NEEDLE.sentence)[1].split()
    self.assertEqual(after[0], f"s{p.needle_index}")

  @parameterized.named_parameters(
      ("depth", dict(length=100, depth=1.5), "depth"),
      ("length_too_small", dict(length=30, depth=0.5), "length"),
      ("length_not_int", dict(length=100.0, depth=0.5), "length"),
      ("haystack_too_short", dict(length=1000, depth=0.5, n=10),
       "too short"),
  )
  def test_bad_arguments_raise(self, kw, message):
    with self.assertRaisesRegex(ValueError, message):
      self._build(**kw)

  def test_chat_renderer(self):
    template = ("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n"
                "{% endfor %}{% if add_generation_prompt %}[assistant]"
                "{% endif %}")
    render = needle.chat_renderer(template, instruction="Be brief.",
                                  system="Sys.")
    self.assertEqual(render("Text."), (
        "[system] Sys.\n[user] Text.\n\nWhat is the best thing to do in San "
        "Francisco? Be brief.\n[assistant]"))


if __name__ == "__main__":
  absltest.main()
