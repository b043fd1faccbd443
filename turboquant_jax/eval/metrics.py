"""LongBench's answer metrics, standard library only.

Each metric maps (prediction, one ground truth) to a score in [0, 1]; the
benchmark takes the maximum over an example's ground truths. They reproduce
the scores of THUDM/LongBench's `metrics.py` (the benchmark's definition),
including its quirks, without its dependencies:

- `qa_f1`: token F1 after SQuAD-style normalization (lower case, drop
  ASCII punctuation, drop the articles a/an/the, collapse whitespace).
- `rouge_l`: the "f" of "rouge-l" from `rouge.Rouge().get_scores(
  [prediction], [truth], avg=True)` (PyPI `rouge` 1.0.1), which is the
  summary-level union LCS: both texts are cut into sentences at every ".",
  sentences into words at single spaces; the LCS of each (reference
  sentence, predicted sentence) pair is traced back with that package's
  tie-breaking, and the size of the union of the LCS *word sets* is divided
  by the number of distinct words of each text (P and R; F = 2PR / (P + R +
  1e-8)). An empty side scores 0 (the package raises and LongBench catches
  it). One difference: the package traces the LCS back recursively and so
  fails (LongBench then scores 0) once a sentence pair passes Python's
  recursion limit (about 1000 words together); here the value is computed.
- `code_sim`: `fuzzywuzzy.fuzz.ratio` / 100 of the first predicted line
  without "`", "#" or "//" against the truth. fuzz.ratio without
  python-Levenshtein is round(100 * difflib.SequenceMatcher(None, a,
  b).ratio()) (Python's round: halves to even), 100 for equal strings and
  0 when one is empty; that is what `fuzz_ratio` computes. (With
  python-Levenshtein installed fuzzywuzzy uses another matcher whose ratio
  can differ by a point or so.)
- `classification`: the share of the class names found in the prediction
  that is the truth (see `classification_score` for the official quirks).
- `count` and `retrieval`: the share of the numbers in the prediction that
  equal the truth (the paragraph number, for retrieval).
"""

from collections.abc import Callable, Sequence
import collections
import difflib
import re
import string

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NUMBER = re.compile(r"\d+")
PARAGRAPH = re.compile(r"Paragraph (\d+)")


# ------------------------------------------------------------------ qa_f1


def normalize_answer(text: str) -> str:
  """Lower case, no ASCII punctuation, no articles, single spaces."""
  text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
  text = _ARTICLES.sub(" ", text)
  return " ".join(text.split())


def token_f1(prediction: Sequence[str], truth: Sequence[str]) -> float:
  """F1 of the multiset overlap of two token lists (0 if none shared)."""
  common = collections.Counter(prediction) & collections.Counter(truth)
  same = sum(common.values())
  if same == 0:
    return 0.0
  precision = same / len(prediction)
  recall = same / len(truth)
  return 2 * precision * recall / (precision + recall)


def qa_f1_score(prediction: str, truth: str, **unused) -> float:
  """Token F1 of the normalized answers (qasper, hotpotqa, triviaqa...)."""
  del unused
  return token_f1(normalize_answer(prediction).split(),
                  normalize_answer(truth).split())


# ---------------------------------------------------------------- rouge_l


def _sentences(text: str) -> list[str]:
  """`rouge`'s sentences: pieces between dots (non-empty before the
  whitespace is collapsed, so "a. . b" keeps an empty middle sentence)."""
  return [" ".join(piece.split()) for piece in text.split(".") if piece]


def _lcs_words(x: list[str], y: list[str]) -> set[str]:
  """Words of the LCS of x and y, traced back as `rouge` does.

  From the end: a match goes diagonally; otherwise up (drop x's word) if
  that keeps a strictly longer LCS than going left, else left. Different
  LCSs of the same length can hold different words, so the tie-breaking
  matters for the score.
  """
  rows, cols = len(x), len(y)
  table = [[0] * (cols + 1) for _ in range(rows + 1)]
  for i in range(1, rows + 1):
    xi, row, prev = x[i - 1], table[i], table[i - 1]
    for j in range(1, cols + 1):
      if xi == y[j - 1]:
        row[j] = prev[j - 1] + 1
      else:
        row[j] = max(prev[j], row[j - 1])
  words = set()
  i, j = rows, cols
  while i > 0 and j > 0:
    if x[i - 1] == y[j - 1]:
      words.add(x[i - 1])
      i, j = i - 1, j - 1
    elif table[i - 1][j] > table[i][j - 1]:
      i -= 1
    else:
      j -= 1
  return words


def rouge_l_score(prediction: str, truth: str, **unused) -> float:
  """ROUGE-L F as PyPI `rouge` computes it (module docstring)."""
  del unused
  hyp, ref = _sentences(prediction), _sentences(truth)
  if not hyp or not ref:
    return 0.0
  hyp_words = [s.split(" ") for s in hyp]
  ref_words = [s.split(" ") for s in ref]
  m = len({w for s in ref_words for w in s})
  n = len({w for s in hyp_words for w in s})
  union = set()
  for r in ref_words:
    for h in hyp_words:
      union |= _lcs_words(r, h)
  recall = len(union) / m
  precision = len(union) / n
  # The package's expression, term for term (same rounding).
  return 2.0 * ((precision * recall) / (precision + recall + 1e-8))


# --------------------------------------------------------------- code_sim


def fuzz_ratio(a: str, b: str) -> int:
  """fuzzywuzzy's fuzz.ratio (pure-Python matcher): an int in [0, 100]."""
  if a == b:
    return 100
  if not a or not b:
    return 0
  return int(round(100 * difflib.SequenceMatcher(None, a, b).ratio()))


def first_code_line(prediction: str) -> str:
  """The first line (leading newlines dropped) that has no "`", "#" or
  "//": LongBench skips markdown fences and comments; "" if none."""
  for line in prediction.lstrip("\n").split("\n"):
    if "`" not in line and "#" not in line and "//" not in line:
      return line
  return ""


def code_sim_score(prediction: str, truth: str, **unused) -> float:
  """Edit similarity of the predicted next line of code (lcc, repobench-p)."""
  del unused
  return fuzz_ratio(first_code_line(prediction), truth) / 100


# ------------------------------------------------- classification, counts


def classification_score(prediction: str, truth: str, *,
                         all_classes: Sequence[str], **unused) -> float:
  """1 / (number of matched classes) if the truth is among them, else 0.

  The matched classes are those whose name occurs in the prediction, after
  dropping the ones that are a proper substring of the truth. Two quirks of
  the official code are kept, since they define the published scores: the
  dropping loop removes items from the list it iterates over, so the item
  right after a dropped one is never checked; and its difflib fallback
  (closest class name when nothing matched) is unreachable (it tests
  `list != 0`), so a prediction without any class name scores 0.

  Raises:
    ValueError: all_classes is None or empty (trec needs its label set).
  """
  del unused
  if not all_classes:
    raise ValueError(f"{all_classes=}: classification needs the dataset's "
                     "class names (the 'all_classes' field)")
  matched = [name for name in all_classes if name in prediction]
  i = 0
  while i < len(matched):       # a list iterator over a list that shrinks
    name = matched[i]
    if name in truth and name != truth:
      matched.remove(name)
    i += 1
  return 1.0 / len(matched) if truth in matched else 0.0


def _number_share(prediction: str, target: str) -> float:
  numbers = _NUMBER.findall(prediction)
  if not numbers:
    return 0.0
  return sum(n == target for n in numbers) / len(numbers)


def count_score(prediction: str, truth: str, **unused) -> float:
  """Share of the numbers in the prediction equal to the count
  (passage_count); 0 without numbers."""
  del unused
  return _number_share(prediction, str(truth))


def retrieval_score(prediction: str, truth: str, **unused) -> float:
  """Share of the numbers in the prediction equal to the paragraph number
  of the truth "Paragraph N" (passage_retrieval_en).

  Raises:
    ValueError: the truth has no "Paragraph N".
  """
  del unused
  found = PARAGRAPH.findall(truth)
  if not found:
    raise ValueError(f"{truth=} must contain 'Paragraph <number>'")
  return _number_share(prediction, found[0])


METRICS: dict[str, Callable[..., float]] = {
    "qa_f1": qa_f1_score,
    "rouge_l": rouge_l_score,
    "classification": classification_score,
    "count": count_score,
    "retrieval": retrieval_score,
    "code_sim": code_sim_score,
}
