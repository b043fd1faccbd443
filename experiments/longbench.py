r"""LongBench-E (the paper's Table 1) through compressed KV caches (issue #5).

  python -m experiments.longbench --config=configs/longbench.py \
      --config.data_dir=/path/to/longbench_e --workdir=runs/longbench

The protocol is LongBench's (see turboquant_jax/eval/longbench.py): each
example's prompt is the dataset's template, cut in the middle to
config.max_length tokens, wrapped in the model's chat template except on
the few-shot and code datasets, and continued greedily (at most the
dataset's new-token limit) by `sampling.generate` over the cache
configuration: the prompt goes through the cache's prefill and every
generated token is appended to it (quantized, for TurboQuant and KIVI), as
in the paper. Every layer's cache is built from a config.caches entry
(`layer_configs`); the caches' rotations come from config.seed.

Models: SmolLM2-135M-Instruct (its Q4_1 GGUF weights dequantized: "full"
is a full-precision KV cache, not full-precision weights), any Hugging
Face Llama / Mistral / Qwen2 checkpoint directory with its tokenizer.json
(config.model = "hf"), or a tiny random model (quick scale, tests).

Outputs in --workdir: config.json; results.jsonl, one row per (cache,
dataset, example) with the prediction and its score (a re-run skips the
examples already written); scores.json (per cache: per-dataset scores,
per length bucket, Table 1's columns and the 13-dataset average) and
table.md, both rebuilt from all rows at the end of every run.
"""

import json
import os
import pathlib
import time

from absl import app
from absl import logging
import jax
import tqdm

from experiments import common
from turboquant_jax import cache as cache_lib
from turboquant_jax import results
from turboquant_jax.cache import CacheConfig
from turboquant_jax.eval import longbench

ROW_KEY = ("cache", "dataset", "id")
TABLE_FILE = "table.md"
SCORES_FILE = "scores.json"
_CACHE_FIELDS = ("kind", "key_bits", "value_bits", "key_method",
                 "norm_correction", "window", "center_keys", "dtype",
                 "edge_layers")


# ------------------------------------------------------------------ caches


layer_configs = common.layer_configs


def kv_bits(model, configs: tuple[CacheConfig, ...], capacity: int) -> float:
  """Bits stored per cached coordinate, summed over layers (codes, norms,
  windows and KIVI's scales amortized over `capacity` tokens), as in
  experiments/perplexity.py: the paper's "KV size"."""
  caches = jax.eval_shape(lambda: model.init_caches(1, capacity, configs))
  per_token = sum(cache_lib.memory(c)["bytes_per_token"] for c in caches)
  c = model.config
  return per_token * 8 / (2 * c.n_kv_heads * c.head_dim * c.n_layers)


def cache_specs(config) -> list[dict]:
  """The config.caches entries to run (config.only, if set, in order)."""
  specs = {s["name"]: dict(s) for s in config.caches}
  if len(specs) != len(config.caches):
    raise ValueError(f"config.caches names repeat: "
                     f"{[s['name'] for s in config.caches]}")
  only = [x for x in str(config.only).split(",") if x]
  if unknown := [n for n in only if n not in specs]:
    raise ValueError(f"config.only names unknown caches {unknown}; known: "
                     f"{list(specs)}")
  return [specs[n] for n in (only or specs)]


def datasets(config) -> tuple[str, ...]:
  """config.datasets (comma-separated; empty: all 13), validated."""
  names = tuple(x.strip() for x in str(config.datasets).split(",")
                if x.strip())
  if unknown := [n for n in names if n not in longbench.DATASETS]:
    raise ValueError(f"config.datasets names unknown datasets {unknown}; "
                     f"LongBench-E has {longbench.DATASETS}")
  return names or longbench.DATASETS


# --------------------------------------------------------------------- run


def load_data(config) -> dict[str, list[longbench.Example]]:
  """Every selected dataset's examples (all files checked first)."""
  if not config.data_dir:
    raise ValueError("config.data_dir is empty: point it at a folder of "
                     "LongBench-E <dataset>_e.jsonl files")
  names = datasets(config)
  longbench.check_files(config.data_dir, names)
  return {d: longbench.load_examples(config.data_dir, d,
                                     config.max_examples) for d in names}


def run(config, workdir: str | os.PathLike, *,
        lm: longbench.LanguageModel | None = None) -> list[pathlib.Path]:
  """Runs (or resumes) the experiment into workdir; returns output paths.

  Args:
    config: the configs/longbench.py config.
    workdir: results directory (resumed if it holds this config's run).
    lm: the model to use instead of loading config.model (tests).
  """
  workdir = pathlib.Path(workdir)
  data = load_data(config)
  specs = cache_specs(config)
  writer = results.Writer(workdir, config)
  done = writer.done_keys(ROW_KEY)
  todo = [(spec, d, [ex for ex in examples
                     if (spec["name"], d, ex.id) not in done])
          for spec in specs for d, examples in data.items()]
  todo = [t for t in todo if t[2]]
  total = sum(len(t[2]) for t in todo)
  logging.info("%d of %d examples to do", total,
               len(specs) * sum(len(e) for e in data.values()))
  if todo:
    lm = lm or common.load_lm(config)
    backend = jax.default_backend()
    capacity = min(config.max_length, lm.model.config.max_seq_len)
    for spec, dataset, examples in todo:
      configs = layer_configs(lm.model.config, spec)
      bits = kv_bits(lm.model, configs, capacity)
      outputs = longbench.predict(
          lm, examples, configs, max_length=config.max_length,
          max_new_tokens=config.max_new_tokens,
          batch_size=config.batch_size, bucket=config.prompt_bucket,
          cache_key=jax.random.key(config.seed))
      bar = tqdm.tqdm(zip(examples, outputs), total=len(examples),
                      desc=f"{spec['name']}/{dataset}", unit="example")
      for ex, out in bar:
        row = dict(
            model=lm.name, cache=spec["name"],
            **{f: spec[f] for f in _CACHE_FIELDS},
            bits_per_coordinate=bits, dataset=dataset, id=ex.id,
            length=ex.length, bucket=ex.bucket,
            score=longbench.score(dataset, out["prediction"], ex.answers,
                                  ex.all_classes),
            prediction=out["prediction"], answers=list(ex.answers),
            **{k: v for k, v in out.items() if k != "prediction"},
            max_length=config.max_length, backend=backend)
        writer.write(row)
  return make_outputs(workdir, writer.rows(), config)


# ----------------------------------------------------------------- outputs


def _cell(x) -> str:
  return "-" if x is None else f"{x:.2f}"


def make_table(summary: dict, rows: list[dict], config) -> str:
  """table.md: Table 1's columns, per-dataset scores, length buckets."""
  model = rows[0]["model"] if rows else "?"
  lines = [
      "# LongBench-E through compressed KV caches",
      "",
      f"Model: {model}. Prompts cut in the middle to {config.max_length} "
      "tokens; greedy decoding, every generated token appended to the "
      "cache. KV bits: bits stored per cached coordinate at "
      f"{config.max_length} tokens (codes, norms, windows, scales). "
      "Scores are 100 x the mean over examples (qa_f1, ROUGE-L, "
      "classification, count, retrieval, code similarity); Average is the "
      "mean over the 13 datasets (\"-\": a dataset without rows).",
      ""]
  if config.max_new_tokens:
    lines += [f"**Not the benchmark**: new tokens capped at "
              f"{config.max_new_tokens}.", ""]
  cats = list(longbench.CATEGORIES)
  bits = {r["cache"]: r.get("bits_per_coordinate") for r in rows}
  lines += ["| cache | KV bits | " + " | ".join(cats) +
            " | Average | examples |", "|---|" + "---:|" * (len(cats) + 3)]
  for cache, s in summary.items():
    cells = [_cell(s["categories"][c]) for c in cats]
    lines.append(f"| `{cache}` | {_cell(bits.get(cache))} | " +
                 " | ".join(cells) + f" | {_cell(s['average'])} | "
                 f"{sum(s['examples'].values())} |")
  lines += ["", "## Per dataset", "",
            "| dataset | metric | " + " | ".join(f"`{c}`" for c in summary)
            + " |", "|---|---|" + "---:|" * len(summary)]
  for d in longbench.DATASETS:
    if not any(d in s["datasets"] for s in summary.values()):
      continue
    lines.append(f"| {d} | {longbench.METRIC[d]} | " + " | ".join(
        _cell(s["datasets"].get(d)) for s in summary.values()) + " |")
  lines.append("| **Average (13)** | | " + " | ".join(
      _cell(s["average"]) for s in summary.values()) + " |")
  lines.append("| mean of datasets run | | " + " | ".join(
      _cell(s["partial_average"]) for s in summary.values()) + " |")
  lines += ["", "## Per length bucket (words)", "",
            "| cache | dataset | " + " | ".join(longbench.LENGTH_BUCKETS)
            + " | examples |", "|---|---|" + "---:|" * 4]
  for cache, s in summary.items():
    for d, buckets in s["buckets"].items():
      lines.append(f"| `{cache}` | {d} | " + " | ".join(
          _cell(buckets[b]) for b in longbench.LENGTH_BUCKETS) +
                   f" | {s['examples'][d]} |")
  return "\n".join(lines) + "\n"


def make_outputs(workdir: pathlib.Path, rows: list[dict],
                 config) -> list[pathlib.Path]:
  """Writes scores.json and table.md from the rows; returns all paths."""
  summary = longbench.summarize(rows)
  scores = workdir / SCORES_FILE
  scores.write_text(json.dumps(
      results.jsonable(dict(summary=summary,
                            environment=results.environment(),
                            written=time.strftime("%Y-%m-%d %H:%M:%S"))),
      indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
  table = workdir / TABLE_FILE
  table.write_text(make_table(summary, rows, config), encoding="utf-8")
  for cache, s in summary.items():
    logging.info("%s: average %s (%s over the %d datasets run)", cache,
                 _cell(s["average"]), _cell(s["partial_average"]),
                 len(s["datasets"]))
  return [workdir / results.CONFIG_FILE, workdir / results.RESULTS_FILE,
          scores, table]


if __name__ == "__main__":
  common.define_flags("longbench.py")
  app.run(common.main_for(run))
