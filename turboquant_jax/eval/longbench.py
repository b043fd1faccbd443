r"""LongBench-E: the 13 English datasets, their prompts, generation and scores.

LongBench-E (Bai et al., 2023; THUDM/LongBench) is LongBench's subset with
length-balanced examples, read here from local JSONL files in the official
format, one `<dataset>_e.jsonl` per dataset (one JSON object per line with
"input", "context", "answers", "length", "all_classes", "_id"):

    examples = load_examples(data_dir, "qasper")
    ids, info = prompt_ids(examples[0], tokenizer, chat_template, 7500)
    for ex, out in zip(batch, predict(lm, batch, configs, max_length=7500)):
      score(ex.dataset, out["prediction"], ex.answers, ex.all_classes)

The protocol is the benchmark's (`pred.py`, `eval.py` and the `config/`
files of THUDM/LongBench):
- the prompt is the dataset's template (PROMPTS) filled with the example's
  context and input;
- a prompt longer than max_length tokens (counted as the tokenizer encodes
  it, special tokens included) is cut in the middle: the text of its first
  and last max_length/2 tokens, each decoded without special tokens;
- chat models get the chat template, except on trec, triviaqa, samsum, lcc
  and repobench-p (few-shot and code completion, NO_CHAT_TEMPLATE);
- greedy decoding of at most MAX_NEW_TOKENS[dataset] tokens; samsum also
  stops at a newline token, which (like eos) may not be the first token
  (pred.py's min_length);
- trec, triviaqa and samsum keep only the first line of the output;
- an example's score is the best over its answers of the dataset's metric
  (METRIC, `turboquant_jax.eval.metrics`); a dataset's score is 100 x the
  mean over its examples, also reported per length bucket (LENGTH_BUCKETS:
  the "length" field, in words, < 4000, < 8000, else; LongBench's
  eval.py reports only these for LongBench-E, rounded), and the paper's
  "Average" is the mean of the 13 dataset scores.

Where this differs from running pred.py on a Hugging Face model: text is
decoded by `tokenizers` (no transformers clean_up_tokenization_spaces);
the chat template is the model's own Jinja template (pred.py hard-codes a
few models' formats) and its ids are not re-tokenized with another BOS;
generation stops at the eos and turn-end tokens of chat models
(`sampling.chat_stop_tokens`) on every dataset.
"""

from collections.abc import Iterator, Mapping, Sequence
import dataclasses
import json
import os
import pathlib
import time
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from turboquant_jax.cache.config import CacheConfig
from turboquant_jax.eval import metrics
from turboquant_jax.model import sampling

DATASETS = ("qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "gov_report",
            "multi_news", "trec", "triviaqa", "samsum", "passage_count",
            "passage_retrieval_en", "lcc", "repobench-p")

# The paper's Table 1 columns.
CATEGORIES = {
    "SingleQA": ("qasper", "multifieldqa_en"),
    "MultiQA": ("hotpotqa", "2wikimqa"),
    "Summarization": ("gov_report", "multi_news"),
    "Few shot": ("trec", "triviaqa", "samsum"),
    "Synthetic": ("passage_count", "passage_retrieval_en"),
    "Code": ("lcc", "repobench-p"),
}

# config/dataset2prompt.json of THUDM/LongBench (the benchmark's spec).
PROMPTS = {
    "qasper": (
        "You are given a scientific article and a question. Answer the "
        "question as concisely as you can, using a single phrase or sentence "
        "if possible. If the question cannot be answered based on the "
        "information in the article, write \"unanswerable\". If the question "
        "is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". "
        "Do not provide any explanation.\n\nArticle: {context}\n\n Answer the "
        "question based on the above article as concisely as you can, using "
        "a single phrase or sentence if possible. If the question cannot be "
        "answered based on the information in the article, write "
        "\"unanswerable\". If the question is a yes/no question, answer "
        "\"yes\", \"no\", or \"unanswerable\". Do not provide any "
        "explanation.\n\nQuestion: {input}\n\nAnswer:"),
    "multifieldqa_en": (
        "Read the following text and answer briefly.\n\n{context}\n\nNow, "
        "answer the following question based on the above text, only give "
        "me the answer and do not output any other words.\n\nQuestion: "
        "{input}\nAnswer:"),
    "hotpotqa": (
        "Answer the question based on the given passages. Only give me the "
        "answer and do not output any other words.\n\nThe following are "
        "given passages.\n{context}\n\nAnswer the question based on the "
        "given passages. Only give me the answer and do not output any other "
        "words.\n\nQuestion: {input}\nAnswer:"),
    "2wikimqa": (
        "Answer the question based on the given passages. Only give me the "
        "answer and do not output any other words.\n\nThe following are "
        "given passages.\n{context}\n\nAnswer the question based on the "
        "given passages. Only give me the answer and do not output any other "
        "words.\n\nQuestion: {input}\nAnswer:"),
    "gov_report": (
        "You are given a report by a government agency. Write a one-page "
        "summary of the report.\n\nReport:\n{context}\n\nNow, write a "
        "one-page summary of the report.\n\nSummary:"),
    "multi_news": (
        "You are given several news passages. Write a one-page summary of "
        "all news. \n\nNews:\n{context}\n\nNow, write a one-page summary of "
        "all the news.\n\nSummary:"),
    "trec": (
        "Please determine the type of the question below. Here are some "
        "examples of questions.\n\n{context}\n{input}"),
    "triviaqa": (
        "Answer the question based on the given passage. Only give me the "
        "answer and do not output any other words. The following are some "
        "examples.\n\n{context}\n\n{input}"),
    "samsum": (
        "Summarize the dialogue into a few short sentences. The following "
        "are some examples.\n\n{context}\n\n{input}"),
    "passage_count": (
        "There are some paragraphs below sourced from Wikipedia. Some of "
        "them may be duplicates. Please carefully read these paragraphs and "
        "determine how many unique paragraphs there are after removing "
        "duplicates. In other words, how many non-repeating paragraphs are "
        "there in total?\n\n{context}\n\nPlease enter the final count of "
        "unique paragraphs after removing duplicates. The output format "
        "should only contain the number, such as 1, 2, 3, and so on.\n\nThe "
        "final answer is: "),
    "passage_retrieval_en": (
        "Here are 30 paragraphs from Wikipedia, along with an abstract. "
        "Please determine which paragraph the abstract is from.\n\n{context}"
        "\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the "
        "number of the paragraph that the abstract is from. The answer "
        "format must be like \"Paragraph 1\", \"Paragraph 2\", etc.\n\nThe "
        "answer is: "),
    "lcc": "Please complete the code given below. \n{context}Next line of "
           "code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}"
                   "Next line of code:\n",
}

# config/dataset2maxlen.json: generated tokens at most.
MAX_NEW_TOKENS = {
    "qasper": 128, "multifieldqa_en": 64, "hotpotqa": 32, "2wikimqa": 32,
    "gov_report": 512, "multi_news": 512, "trec": 64, "triviaqa": 32,
    "samsum": 128, "passage_count": 32, "passage_retrieval_en": 32,
    "lcc": 64, "repobench-p": 64,
}

# eval.py's dataset2metric.
METRIC = {
    "qasper": "qa_f1", "multifieldqa_en": "qa_f1", "hotpotqa": "qa_f1",
    "2wikimqa": "qa_f1", "gov_report": "rouge_l", "multi_news": "rouge_l",
    "trec": "classification", "triviaqa": "qa_f1", "samsum": "rouge_l",
    "passage_count": "count", "passage_retrieval_en": "retrieval",
    "lcc": "code_sim", "repobench-p": "code_sim",
}

# pred.py: chat models "are better off without build prompts on these".
NO_CHAT_TEMPLATE = frozenset({"trec", "triviaqa", "samsum", "lcc",
                              "repobench-p"})
# eval.py: only the first line of the output is scored.
FIRST_LINE = frozenset({"trec", "triviaqa", "samsum"})
# pred.py: samsum also stops at "\n", which may not be the first token.
NEWLINE_STOP = frozenset({"samsum"})

LENGTH_BUCKETS = ("0-4k", "4-8k", "8k+")


def _check_dataset(dataset: str) -> None:
  if dataset not in DATASETS:
    raise ValueError(f"{dataset=!r} is not a LongBench-E dataset; expected "
                     f"one of {DATASETS}")


def length_bucket(length: int) -> str:
  """LongBench-E's bucket of an example's "length" (words)."""
  if length < 4000:
    return "0-4k"
  return "4-8k" if length < 8000 else "8k+"


# ------------------------------------------------------------------ data


@dataclasses.dataclass(frozen=True)
class Example:
  """One LongBench-E example (the fields of its JSONL line we use)."""
  dataset: str
  id: str                      # "_id"
  input: str
  context: str
  answers: tuple[str, ...]
  all_classes: tuple[str, ...] | None
  length: int                  # words, for the length buckets

  @property
  def bucket(self) -> str:
    return length_bucket(self.length)


def data_path(data_dir: str | os.PathLike, dataset: str) -> pathlib.Path:
  """Where a dataset's file lives: data_dir/<dataset>_e.jsonl."""
  return pathlib.Path(data_dir).expanduser() / f"{dataset}_e.jsonl"


def check_files(data_dir: str | os.PathLike,
                datasets: Sequence[str] = DATASETS) -> None:
  """Raises FileNotFoundError naming every missing file (and ValueError on
  an unknown dataset name)."""
  for d in datasets:
    _check_dataset(d)
  root = pathlib.Path(data_dir).expanduser()
  if not root.is_dir():
    raise FileNotFoundError(f"{data_dir=!s} is not a directory; it should "
                            "hold LongBench-E's <dataset>_e.jsonl files")
  missing = [data_path(root, d).name for d in datasets
             if not data_path(root, d).is_file()]
  if missing:
    raise FileNotFoundError(f"{root} lacks {len(missing)} LongBench-E "
                            f"file(s): {', '.join(missing)}")


def _string_list(value: Any) -> bool:
  return isinstance(value, list) and all(isinstance(v, str) for v in value)


def parse_example(dataset: str, obj: Any, where: str) -> Example:
  """An Example from one decoded JSONL line; `where` prefixes errors."""
  if not isinstance(obj, dict):
    raise ValueError(f"{where}: expected a JSON object, got "
                     f"{type(obj).__name__}")
  if missing := [k for k in ("_id", "input", "context", "answers", "length")
                 if k not in obj]:
    raise ValueError(f"{where}: missing field(s) {missing}")
  for key in ("_id", "input", "context"):
    if not isinstance(obj[key], str):
      raise ValueError(f"{where}: {key!r} must be a string, got "
                       f"{obj[key]!r:.80}")
  if not obj["_id"]:
    raise ValueError(f"{where}: '_id' is empty")
  if not _string_list(obj["answers"]) or not obj["answers"]:
    raise ValueError(f"{where}: 'answers' must be a non-empty list of "
                     f"strings, got {obj['answers']!r:.80}")
  length = obj["length"]
  if isinstance(length, bool) or not isinstance(length, int) or length < 0:
    raise ValueError(f"{where}: 'length' must be an integer >= 0, got "
                     f"{length!r}")
  classes = obj.get("all_classes")
  if classes is not None and not _string_list(classes):
    raise ValueError(f"{where}: 'all_classes' must be null or a list of "
                     f"strings, got {classes!r:.80}")
  if METRIC[dataset] == "classification" and not classes:
    raise ValueError(f"{where}: {dataset} needs 'all_classes' (its label "
                     "names)")
  if METRIC[dataset] == "retrieval":
    for answer in obj["answers"]:
      if not metrics.PARAGRAPH.search(answer):
        raise ValueError(f"{where}: {dataset} answers must read "
                         f"'Paragraph <n>', got {answer!r:.80}")
  return Example(dataset=dataset, id=obj["_id"], input=obj["input"],
                 context=obj["context"], answers=tuple(obj["answers"]),
                 all_classes=None if classes is None else tuple(classes),
                 length=length)


def load_examples(data_dir: str | os.PathLike, dataset: str,
                  limit: int = 0) -> list[Example]:
  """The examples of data_dir/<dataset>_e.jsonl, in file order.

  Args:
    data_dir: the folder of LongBench-E files.
    dataset: one of DATASETS.
    limit: keep the first `limit` examples (0: all).

  Raises:
    FileNotFoundError: the file is missing.
    ValueError: a line is not JSON, lacks a field or has a wrong type
      (the message gives path:line), two lines share an "_id", or the file
      holds no example.
  """
  _check_dataset(dataset)
  path = data_path(data_dir, dataset)
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found (LongBench-E's {dataset} "
                            "file)")
  examples, seen = [], {}
  with open(path, encoding="utf-8") as f:
    for num, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path}:{num}"
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg} at column "
                         f"{e.colno})") from e
      ex = parse_example(dataset, obj, where)
      if ex.id in seen:
        raise ValueError(f"{where}: '_id' {ex.id!r} repeats line "
                         f"{seen[ex.id]}")
      seen[ex.id] = num
      examples.append(ex)
      if limit and len(examples) == limit:
        break
  if not examples:
    raise ValueError(f"{path} holds no example")
  return examples


# --------------------------------------------------------------- prompts


def prompt_text(example: Example) -> str:
  """The dataset's template filled with the example's context and input."""
  return PROMPTS[example.dataset].format(context=example.context,
                                         input=example.input)


def truncate_middle(tokenizer, text: str, max_length: int
                    ) -> tuple[str, int]:
  """(text, its token count) with the middle cut if it has > max_length
  tokens: the decoded first and last max_length // 2 tokens, joined.

  Tokens are counted as `tokenizer.encode(text)` gives them (with the
  special tokens the tokenizer adds, e.g. a BOS), as pred.py counts them.
  """
  if isinstance(max_length, bool) or not isinstance(max_length, int) or (
      max_length < 2):
    raise ValueError(f"{max_length=} must be an integer >= 2")
  ids = tokenizer.encode(text).ids
  if len(ids) <= max_length:
    return text, len(ids)
  half = max_length // 2
  return (tokenizer.decode(ids[:half], skip_special_tokens=True)
          + tokenizer.decode(ids[-half:], skip_special_tokens=True),
          len(ids))


def prompt_ids(example: Example, tokenizer, chat_template: str | None,
               max_length: int) -> tuple[list[int], dict[str, Any]]:
  """The model's input ids for an example, and facts about them.

  Args:
    example: the example.
    tokenizer: a `tokenizers.Tokenizer`.
    chat_template: the model's Jinja chat template; None for a base model
      (no template on any dataset).
    max_length: the middle truncation's token budget (the raw prompt's).

  Returns:
    (ids, {"raw_tokens": the untruncated prompt's token count,
    "truncated": bool, "chat": whether the template was applied}).
  """
  text, raw = truncate_middle(tokenizer, prompt_text(example), max_length)
  chat = chat_template is not None and example.dataset not in NO_CHAT_TEMPLATE
  if chat:
    ids = sampling.chat_prompt_ids(tokenizer, chat_template,
                                   [{"role": "user", "content": text}])
  else:
    ids = list(tokenizer.encode(text).ids)
  return ids, dict(raw_tokens=raw, truncated=raw > max_length, chat=chat)


def newline_id(tokenizer) -> int:
  """pred.py's newline stop: the last id of "\\n" encoded alone."""
  ids = tokenizer.encode("\n", add_special_tokens=False).ids
  if not ids:
    raise ValueError("the tokenizer encodes '\\n' to no token")
  return int(ids[-1])


# --------------------------------------------------------------- scoring


def postprocess(dataset: str, prediction: str) -> str:
  """The scored part of an output: the first line for FIRST_LINE datasets
  (after leading newlines), else all of it."""
  if dataset in FIRST_LINE:
    return prediction.lstrip("\n").split("\n")[0]
  return prediction


def score(dataset: str, prediction: str, answers: Sequence[str],
          all_classes: Sequence[str] | None = None) -> float:
  """An example's score in [0, 1]: the best over its answers."""
  _check_dataset(dataset)
  if isinstance(answers, str) or not answers:
    raise ValueError(f"{answers=!r} must be a non-empty list of strings")
  metric = metrics.METRICS[METRIC[dataset]]
  text = postprocess(dataset, prediction)
  best = 0.0
  for answer in answers:
    best = max(best, metric(text, answer, all_classes=all_classes))
  return float(best)


def summarize(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict]:
  """Scores per cache from per-example rows (fields cache, dataset, bucket,
  score in [0, 1]), in first-seen order of the caches.

  Returns:
    {cache: {"datasets": {dataset: 100 x mean score}, "buckets": {dataset:
    {bucket: 100 x mean, or None if empty}}, "examples": {dataset: n},
    "categories": {Table 1 column: mean of its datasets' scores, or None
    if one is missing}, "average": the mean over the 13 datasets (None
    unless all 13 have rows), "partial_average": the mean over the
    datasets present}}. Datasets are in DATASETS order.
  """
  grouped: dict[str, dict[str, list]] = {}
  for row in rows:
    grouped.setdefault(row["cache"], {}).setdefault(row["dataset"],
                                                    []).append(row)
  out = {}
  for cache, by_dataset in grouped.items():
    datasets, buckets, counts = {}, {}, {}
    for d in DATASETS:
      if d not in by_dataset:
        continue
      got = by_dataset[d]
      datasets[d] = 100 * float(np.mean([r["score"] for r in got]))
      counts[d] = len(got)
      buckets[d] = {}
      for b in LENGTH_BUCKETS:
        s = [r["score"] for r in got if r["bucket"] == b]
        buckets[d][b] = 100 * float(np.mean(s)) if s else None
    categories = {
        name: (float(np.mean([datasets[d] for d in members]))
               if all(d in datasets for d in members) else None)
        for name, members in CATEGORIES.items()}
    complete = all(d in datasets for d in DATASETS)
    out[cache] = dict(
        datasets=datasets, buckets=buckets, examples=counts,
        categories=categories,
        average=float(np.mean(list(datasets.values()))) if complete
        else None,
        partial_average=float(np.mean(list(datasets.values())))
        if datasets else None)
  return out


# ------------------------------------------------------------ generation


@dataclasses.dataclass(frozen=True)
class LanguageModel:
  """A model with what it takes to prompt it.

  Attributes:
    model: the Transformer.
    tokenizer: its `tokenizers.Tokenizer`.
    chat_template: its Jinja chat template (None: a base model).
    stop_tokens: ids that end generation (eos, turn ends).
    name: for the results.
  """
  model: Any
  tokenizer: Any
  chat_template: str | None
  stop_tokens: tuple[int, ...]
  name: str


class FirstTokenBias(nnx.Module):
  """A model whose prefill logits at each prompt's last position get a bias.

  `sampling.generate` samples the first new token from exactly those
  logits and every later one from a decode step, so a bias of -inf on the
  stop tokens is Hugging Face's min_length = prompt + 1 (pred.py's samsum
  setting: the first token may not end the output), and a zero bias
  changes nothing. The bias is data, not structure: every dataset shares
  one compiled generation loop.
  """

  def __init__(self, model, bias: np.ndarray | jax.Array):
    """Wraps `model` (a Transformer); bias is f32[V] (first_token_bias)."""
    self.model = model
    self.config = model.config
    self.bias = nnx.Variable(jnp.asarray(bias, jnp.float32))

  def init_caches(self, *args, **kwargs):
    return self.model.init_caches(*args, **kwargs)

  def prefill(self, tokens, caches, lengths, **kwargs):
    logits, caches = self.model.prefill(tokens, caches, lengths, **kwargs)
    if kwargs.get("last_only"):
      return logits.at[:, 0].add(self.bias[...]), caches
    rows = jnp.arange(tokens.shape[0])
    logits = logits.at[rows, lengths - 1].add(self.bias[...])
    return logits, caches

  def __call__(self, tokens, caches, lengths_before, **kwargs):
    return self.model(tokens, caches, lengths_before, **kwargs)


def first_token_bias(vocab_size: int, banned: Sequence[int]) -> np.ndarray:
  """f32[V]: -inf at the banned ids, 0 elsewhere."""
  bias = np.zeros((vocab_size,), np.float32)
  bias[list(banned)] = -np.inf
  return bias


def _padded_length(longest: int, bucket: int, max_new: int,
                   max_seq_len: int) -> int:
  """Prompt width: longest rounded up to a multiple of bucket (fewer
  compilations), within the model's context."""
  if longest + max_new > max_seq_len:
    raise ValueError(
        f"a prompt of {longest} tokens + {max_new} new tokens exceeds the "
        f"model's max_seq_len={max_seq_len}: lower max_length (the middle "
        "truncation's budget)")
  return min(-(-longest // bucket) * bucket, max_seq_len - max_new)


def predict(lm: LanguageModel, examples: Sequence[Example],
            cache_configs: CacheConfig | Sequence[CacheConfig], *,
            max_length: int, max_new_tokens: int = 0, batch_size: int = 1,
            bucket: int = 256, cache_key: jax.Array | None = None,
            impl: str | None = None) -> Iterator[dict[str, Any]]:
  """Greedy predictions for examples of one dataset, in order.

  Args:
    lm: the model.
    examples: examples of a single dataset.
    cache_configs: one CacheConfig or one per layer.
    max_length: the middle truncation's budget (prompt_ids).
    max_new_tokens: 0 for the benchmark's MAX_NEW_TOKENS[dataset], else
      this many at most (a cap for quick tests; not the benchmark).
    batch_size: prompts per generate call. 1 is the benchmark's protocol;
      with more, fractional TurboQuant widths pick their outlier channels
      from all the batch's prompts together.
    bucket: prompts are padded to a multiple of this many tokens.
    cache_key: the caches' rotations (None: jax.random.key(0)).
    impl: decode_attention implementation (None: best available).

  Yields:
    Per example: {"prediction": the decoded output (special tokens
    dropped), "new_tokens", "prompt_tokens", "raw_tokens", "truncated",
    "chat", "max_new_tokens", "seconds" (its batch's wall time / batch
    size)}.
  """
  if not examples:
    return
  dataset = examples[0].dataset
  if any(ex.dataset != dataset for ex in examples):
    raise ValueError("examples must come from one dataset, got "
                     f"{sorted({ex.dataset for ex in examples})}")
  for name, value in (("batch_size", batch_size), ("bucket", bucket)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"{name}={value!r} must be an integer >= 1")
  if (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int)
      or max_new_tokens < 0):
    raise ValueError(f"{max_new_tokens=} must be an integer >= 0")
  max_new = max_new_tokens or MAX_NEW_TOKENS[dataset]
  stops = tuple(lm.stop_tokens)
  if dataset in NEWLINE_STOP:
    stops = tuple(dict.fromkeys(stops + (newline_id(lm.tokenizer),)))
  model = FirstTokenBias(lm.model, first_token_bias(
      lm.model.config.vocab_size, stops if dataset in NEWLINE_STOP else ()))
  max_seq_len = lm.model.config.max_seq_len
  for start in range(0, len(examples), batch_size):
    batch = examples[start:start + batch_size]
    begin = time.perf_counter()
    prompts = [prompt_ids(ex, lm.tokenizer, lm.chat_template, max_length)
               for ex in batch]
    longest = max(len(ids) for ids, _ in prompts)
    width = _padded_length(longest, bucket, max_new, max_seq_len)
    tokens = np.zeros((len(batch), width), np.int32)
    for b, (ids, _) in enumerate(prompts):
      tokens[b, :len(ids)] = ids
    lengths = np.asarray([len(ids) for ids, _ in prompts], np.int32)
    out, n_new = sampling.generate(
        model, jnp.asarray(tokens), jnp.asarray(lengths),
        max_new_tokens=max_new, cache_configs=cache_configs,
        stop_tokens=stops, cache_key=cache_key, impl=impl)
    out, n_new = np.asarray(out), np.asarray(n_new)
    seconds = (time.perf_counter() - begin) / len(batch)
    for b, (ids, info) in enumerate(prompts):
      new = out[b, :n_new[b]].tolist()
      yield dict(prediction=lm.tokenizer.decode(new, skip_special_tokens=True),
                 new_tokens=int(n_new[b]), prompt_tokens=len(ids),
                 max_new_tokens=max_new, seconds=seconds, **info)

