"""Needle in a haystack: a sentence hidden in a long text, then asked for.

The haystack is real prose (a novel from `turboquant_jax.data.austen`), cut
into sentences; the needle is one more sentence, inserted on a sentence
boundary at a chosen depth (0: before the first sentence, 1: after the
last); the prompt is the model's chat template around the haystack and a
question that only the needle answers. The default needle and question are
the usual ones (G. Kamradt's test, also used for SnapKV and the TurboQuant
paper's Fig. 4):

    needle:   The best thing to do in San Francisco is eat a sandwich and
              sit in Dolores Park on a sunny day.
    question: What is the best thing to do in San Francisco?

Score (in [0, 1]): recall of the needle's answer words in the reply.
`words(text)` lowercases, turns every character that is not a letter or a
digit into a space and splits; the answer words are the needle's distinct
words minus STOPWORDS minus the question's words (which a reply can echo
without having read the needle): for the default needle, eat, sandwich,
sit, dolores, park, sunny, day. score = |answer words found among the
reply's words| / |answer words|. So an exact reply scores 1, "a sandwich
in Dolores Park" 3/7, an echo of the question 0.

    sentences = needle.haystack_sentences(austen.load_book("emma"))
    render = needle.chat_renderer(tokenizer, chat_template, needle.NEEDLE)
    prompt = needle.build_prompt(tokenizer, render, sentences,
                                 needle.NEEDLE, length=2000, depth=0.5)
    ... generate from prompt.ids ...
    needle.score(reply_text, needle.NEEDLE)
"""

from collections.abc import Callable
from collections.abc import Sequence
import dataclasses
import re

from turboquant_jax.model import chat

# Function words, never counted as answer words.
STOPWORDS = frozenset("""
a an the and or but if of to in on at by for with from as into onto over
under about is are was were be been being am do does did doing have has
had it its this that these those there here what which who whom whose when
where why how i you he she we they me him her us them my your his our
their not no so than then too very can will would should could may might
must shall just also
""".split())

# Words before a period that do not end a sentence.
_ABBREVIATIONS = frozenset(("mr", "mrs", "ms", "dr", "st", "messrs", "col",
                            "capt", "gen", "rev", "esq", "no"))


def words(text: str) -> list[str]:
  """Lowercased words of text, punctuation stripped (see the module doc)."""
  return "".join(c if c.isalnum() else " " for c in text.lower()).split()


@dataclasses.dataclass(frozen=True)
class Needle:
  """A fact to hide and the question that asks for it."""
  sentence: str
  question: str

  def __post_init__(self):
    if not self.answer_words:
      raise ValueError(f"needle sentence={self.sentence!r} has no words "
                       "that are neither stopwords nor in the question "
                       f"{self.question!r}: nothing to score")

  @property
  def answer_words(self) -> tuple[str, ...]:
    """The words the score looks for, in the needle's order."""
    skip = STOPWORDS | set(words(self.question))
    return tuple(dict.fromkeys(w for w in words(self.sentence)
                               if w not in skip))


NEEDLE = Needle(
    sentence=("The best thing to do in San Francisco is eat a sandwich and "
              "sit in Dolores Park on a sunny day."),
    question="What is the best thing to do in San Francisco?")

DEFAULT_INSTRUCTION = ("Answer the question from the text above, in one "
                       "sentence.")


def score(answer: str, needle: Needle = NEEDLE) -> float:
  """Recall of needle.answer_words among the answer's words, in [0, 1]."""
  found = set(words(answer))
  want = needle.answer_words
  return sum(w in found for w in want) / len(want)


# ---------------------------------------------------------------- haystack


@dataclasses.dataclass(frozen=True)
class Sentence:
  """One sentence and what follows it: " " or "\\n\\n" (paragraph end)."""
  text: str
  sep: str = " "


def _is_heading(line: str) -> bool:
  """Title, VOLUME and CHAPTER lines: no lowercase letter at all."""
  return not any(c.islower() for c in line)


def split_sentences(paragraph: str) -> list[str]:
  """Sentences of one paragraph (whitespace collapsed).

  A sentence ends at ., ! or ? (plus closing quotes or brackets) followed
  by whitespace and an uppercase letter or an opening quote; a period after
  an abbreviation such as Mr or Mrs does not end one.
  """
  text = " ".join(paragraph.split())
  out, start = [], 0
  pattern = r"[.!?][\"'\u201d\u2019)\]_]*(?=\s+[\"'\u201c\u2018(_]*[A-Z])"
  for m in re.finditer(pattern, text):
    if text[m.start()] == ".":
      word = re.search(r"(\w+)$", text[start:m.start()])
      if word and (word.group(1).lower() in _ABBREVIATIONS
                   or len(word.group(1)) == 1 and word.group(1).isupper()):
        continue   # "Mr. Knightley", "E. Smith"
    out.append(text[start:m.end()].strip())
    start = m.end()
  if rest := text[start:].strip():
    out.append(rest)
  return out


def haystack_sentences(text: str) -> list[Sentence]:
  """A book's sentences in order: headings dropped, paragraphs kept.

  Args:
    text: lines of prose, paragraphs separated by blank lines (as
      `austen.load_book` returns them); what precedes the first CHAPTER
      heading, if there is one (title, author), is dropped.
  """
  lines = text.splitlines()
  chapters = [i for i, line in enumerate(lines)
              if line.strip().startswith("CHAPTER") and _is_heading(line)]
  if chapters:
    lines = lines[chapters[0]:]
  paragraphs, current = [], []
  for line in lines:
    if not line.strip() or _is_heading(line):
      if current:
        paragraphs.append(" ".join(current))
        current = []
    else:
      current.append(line.strip())
  if current:
    paragraphs.append(" ".join(current))
  out = []
  for paragraph in paragraphs:
    parts = split_sentences(paragraph)
    out += [Sentence(s) for s in parts[:-1]] + [Sentence(parts[-1], "\n\n")]
  return out


def join(sentences: Sequence[Sentence]) -> str:
  """The text of consecutive sentences (no trailing separator)."""
  return "".join(s.text + s.sep for s in sentences).rstrip()


def insert(sentences: Sequence[Sentence], needle: Needle,
           index: int) -> list[Sentence]:
  """The sentences with the needle inserted before sentences[index]."""
  if not 0 <= index <= len(sentences):
    raise ValueError(f"{index=} must be in [0, {len(sentences)}]")
  return [*sentences[:index], Sentence(needle.sentence),
          *sentences[index:]]


# ------------------------------------------------------------------ prompt


def chat_renderer(chat_template: str, needle: Needle = NEEDLE, *,
                  instruction: str = DEFAULT_INSTRUCTION,
                  system: str | None = None) -> Callable[[str], str]:
  """context -> the chat prompt text (ending with the assistant's turn).

  The user message is the context, a blank line, the question and the
  instruction; `system`, if given, is a system message first (else the
  template's default, if any).
  """
  def render(context: str) -> str:
    user = f"{context}\n\n{needle.question} {instruction}".rstrip()
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": user})
    return chat.apply_chat_template(chat_template, messages,
                                    add_generation_prompt=True)
  return render


@dataclasses.dataclass(frozen=True)
class NeedlePrompt:
  """A built prompt.

  Attributes:
    ids: its token ids (len(ids) <= the requested length).
    depth: the requested depth.
    actual_depth: haystack tokens before the needle / haystack tokens
      (the needle sits on a sentence boundary, at or before the request).
    haystack_sentences: sentences of the haystack used (needle excluded).
    needle_index: sentences before the needle.
  """
  ids: list[int]
  depth: float
  actual_depth: float
  haystack_sentences: int
  needle_index: int


def _encode(tokenizer, text: str) -> list[int]:
  return list(tokenizer.encode(text, add_special_tokens=False).ids)


def build_prompt(tokenizer, render: Callable[[str], str],
                 sentences: Sequence[Sentence], needle: Needle, *,
                 length: int, depth: float) -> NeedlePrompt:
  """The longest prompt of at most `length` tokens with the needle at `depth`.

  The haystack is sentences[:m] for the largest m that fits; the needle
  goes on the last sentence boundary at or before depth · (the haystack's
  tokens), counting each sentence's tokens on its own (with its leading
  space); the whole prompt is then tokenized to check the length.

  Args:
    tokenizer: has encode(text, add_special_tokens=False).ids.
    render: context text -> prompt text (`chat_renderer`).
    sentences: the haystack, in order (`haystack_sentences`).
    needle: what to hide.
    length: the most tokens the prompt may have.
    depth: in [0, 1].

  Raises:
    ValueError: depth outside [0, 1], or `length` too small for even the
      needle and the question, or too few sentences to fill it.
  """
  if not 0 <= depth <= 1:
    raise ValueError(f"{depth=} must be in [0, 1]")
  if isinstance(length, bool) or not isinstance(length, int) or length < 1:
    raise ValueError(f"{length=} must be a positive integer")
  overhead = len(_encode(tokenizer, render(needle.sentence)))
  if overhead > length:
    raise ValueError(f"{length=} is shorter than the prompt without a "
                     f"haystack ({overhead} tokens)")
  offsets = [0]       # tokens of sentences[:i], far enough to fill length
  for s in sentences:
    if offsets[-1] > length:
      break
    offsets.append(offsets[-1] + len(_encode(tokenizer, " " + s.text)))

  def attempt(m):
    target = depth * offsets[m]
    j = max(i for i in range(m + 1) if offsets[i] <= target + 1e-9)
    context = join(insert(sentences[:m], needle, j))
    ids = _encode(tokenizer, render(context))
    actual = offsets[j] / offsets[m] if offsets[m] else depth
    return NeedlePrompt(ids=ids, depth=depth, actual_depth=actual,
                        haystack_sentences=m, needle_index=j)

  m = sum(1 for o in offsets[1:] if o <= length - overhead)
  best = attempt(m)
  while len(best.ids) > length and m > 0:        # estimate too long
    m -= 1
    best = attempt(m)
  while m < len(offsets) - 1:                    # room for one more?
    more = attempt(m + 1)
    if len(more.ids) > length:
      break
    m, best = m + 1, more
  if m == len(sentences) and len(best.ids) < length:
    raise ValueError(f"the haystack ({len(sentences)} sentences, about "
                     f"{offsets[-1]} tokens) is too short for {length=}")
  return best
