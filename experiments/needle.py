r"""Needle in a haystack (the paper's Fig. 4) through compressed KV caches.

  python -m turboquant_jax.data.fetch      # Austen + SmolLM2, once
  python -m experiments.needle --config=configs/needle.py \
      --workdir=results/needle/cpu

Protocol (turboquant_jax/eval/needle.py builds the prompts and scores).
For each prompt length L and depth d of the grid, the needle sentence is
hidden in the first sentences of the haystack (an Austen novel) on the
sentence boundary at or before depth d of the haystack's tokens, and the
question follows; the chat prompt is the longest one of at most L tokens,
padded to L (one compilation per length and cache). For each cache
configuration, every layer gets that cache; `sampling.generate` prefills
the prompt through it (the cache's prefill: TurboQuant and KIVI store the
prompt quantized and the prompt's own queries read it back so; SnapKV
attends in full, then evicts 75% of the prompt, per layer and KV head)
and decodes greedily up to max_new_tokens, every generated token appended
to the cache and read back through it. score = recall of the needle's
answer words in the reply (eval/needle.py).

Memory: each row's memory_fraction is the cache's bytes after the prefill
of an L-token prompt, over the bf16 full cache's, summed over layers,
from `cache.memory` (codes, norms, KIVI's scales and bf16 windows, the
kept tokens of SnapKV, lengths); fixed_bytes (rotations, codebooks and
outlier indices, which do not grow with the cache) are left out of the
fraction and reported apart.

Outputs in --workdir: config.json, results.jsonl (one row per cache,
length and depth; a re-run resumes), table.md, heatmap_<cache>.png per
cache and heatmaps.png with all of them.
"""

from collections.abc import Sequence
import os
import pathlib
import time

from absl import app
from absl import logging
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import tqdm

from experiments import common
from turboquant_jax import cache as cache_lib
from turboquant_jax import results
from turboquant_jax.cache import CacheConfig
from turboquant_jax.eval import needle
from turboquant_jax.model import sampling

matplotlib.use("Agg")
from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

ROW_KEY = ("cache", "length", "depth")
TABLE_FILE = "table.md"
FIGURE_FILE = "heatmaps.png"


# ----------------------------------------------------------- model, text


def synthetic_text(sentences: int = 400) -> str:
  """A filler haystack of numbered sentences in short paragraphs (tests)."""
  lines = [f"Line {i} of the filler text says nothing at all."
           for i in range(sentences)]
  paragraphs = [" ".join(lines[i:i + 4]) for i in range(0, len(lines), 4)]
  return "\n\n".join(paragraphs) + "\n"


def load_sentences(config) -> list[needle.Sentence]:
  """The haystack's sentences (config.text)."""
  if config.text == "synthetic":
    return needle.haystack_sentences(synthetic_text())
  # pylint: disable-next=g-import-not-at-top
  from turboquant_jax.data import austen
  return needle.haystack_sentences(austen.load_book(config.text))


def needle_of(config) -> needle.Needle:
  """The config's needle sentence and question."""
  return needle.Needle(sentence=config.needle, question=config.question)


def build_prompts(lm, config) -> dict[tuple[int, float],
                                      needle.NeedlePrompt]:
  """(length, depth) -> the prompt, for the whole grid."""
  if not lm.chat_template:
    raise ValueError(f"{lm.name} has no chat template: the needle test "
                     "asks a chat model")
  nd = needle_of(config)
  render = needle.chat_renderer(lm.chat_template, nd,
                                instruction=config.instruction,
                                system=config.system or None)
  sentences = load_sentences(config)
  return {(length, depth): needle.build_prompt(
      lm.tokenizer, render, sentences, nd, length=length, depth=depth)
          for length in config.lengths for depth in config.depths}


# ------------------------------------------------------------------ caches


def cache_config(spec) -> CacheConfig:
  """The CacheConfig of a config.caches entry."""
  kind = spec["kind"]
  kw = dict(kind=kind, dtype=spec["dtype"])
  if kind in ("turboquant", "kivi"):
    kw.update(key_bits=spec["key_bits"], value_bits=spec["value_bits"],
              window=spec["window"], group_size=spec["group_size"])
  if kind == "turboquant":
    kw["norm_correction"] = spec["norm_correction"]
  if kind == "snapkv":
    kw.update(window=spec["window"], budget=spec["budget"],
              pool=spec["pool"], pool_kernel=spec["pool_kernel"])
  return CacheConfig(**kw)


def cache_specs(config) -> list[dict]:
  """config.caches, restricted to config.only."""
  specs = [dict(s) for s in config.caches]
  names = [s["name"] for s in specs]
  if len(set(names)) != len(names):
    raise ValueError(f"cache names repeat: {names}")
  only = [x for x in str(config.only).split(",") if x]
  if unknown := sorted(set(only) - set(names)):
    raise ValueError(f"config.only names unknown caches {unknown}; known: "
                     f"{names}")
  return [s for s in specs if not only or s["name"] in only]


def prompt_memory(model_config, cfg: CacheConfig, length: int,
                  key: jax.Array) -> dict[str, int]:
  """Bytes of every layer's cache after the prefill of `length` tokens
  (capacity = length), measured on shapes only (jax.eval_shape)."""
  c = model_config
  shape = (1, c.n_kv_heads, length, c.head_dim)
  kv = jax.ShapeDtypeStruct(shape, jnp.float32)
  q = jax.ShapeDtypeStruct((1, c.n_heads, length, c.head_dim), jnp.float32)
  lengths = jax.ShapeDtypeStruct((1,), jnp.int32)

  def one(k, v, q, lengths):
    cache = cache_lib.init(cfg, 1, c.n_kv_heads, length, c.head_dim, key=key)
    return cache_lib.prefill(cache, k, v, lengths, queries=q)

  mem = cache_lib.memory(jax.eval_shape(one, kv, kv, q, lengths))
  return dict(kv_bytes=c.n_layers * (mem["nbytes"] - mem["fixed_nbytes"]),
              fixed_bytes=c.n_layers * mem["fixed_nbytes"])


def answer(lm, prompt: needle.NeedlePrompt, length: int, cfg: CacheConfig,
           config) -> tuple[str, int]:
  """The greedy reply to a prompt padded to `length` tokens."""
  ids = np.zeros((1, length), np.int32)
  ids[0, :len(prompt.ids)] = prompt.ids
  out, n = sampling.generate(
      lm.model, jnp.asarray(ids), jnp.asarray([len(prompt.ids)], jnp.int32),
      max_new_tokens=config.max_new_tokens, cache_configs=cfg,
      stop_tokens=lm.stop_tokens, cache_key=jax.random.key(config.seed))
  new = np.asarray(out[0, :int(n[0])]).tolist()
  stops = set(lm.stop_tokens)
  text_ids = [i for i in new if i not in stops]
  return lm.tokenizer.decode(text_ids, skip_special_tokens=True), len(new)


# ------------------------------------------------------------------- run


def run(config, workdir: str | os.PathLike, *,
        lm=None) -> list[pathlib.Path]:
  """Runs (or resumes) the grid into workdir; returns the output paths.

  Args:
    config: configs/needle.py's config.
    workdir: where to write (config.json, results.jsonl, tables, plots).
    lm: a loaded LanguageModel to use instead of common.load_lm(config).
  """
  workdir = pathlib.Path(workdir)
  writer = results.Writer(workdir, config)
  specs = cache_specs(config)
  for d in config.depths:
    if not 0 <= d <= 1:
      raise ValueError(f"config.depths has {d}: depths must lie in [0, 1]")
  done = writer.done_keys(ROW_KEY)
  todo = [(s, length, depth) for s in specs for length in config.lengths
          for depth in config.depths
          if (s["name"], length, depth) not in done]
  logging.info("%d of %d grid cells to do", len(todo),
               len(specs) * len(config.lengths) * len(config.depths))
  if todo:
    lm = lm or common.load_lm(config)
    prompts = build_prompts(lm, config)
    nd = needle_of(config)
    key = jax.random.key(config.seed)
    full = {length: prompt_memory(lm.model.config,
                                  CacheConfig(kind="full"), length, key)
            for length in config.lengths}
    memory = {}
    bar = tqdm.tqdm(todo, desc="needle", unit="prompt")
    for spec, length, depth in bar:
      bar.set_postfix_str(f"{spec['name']} L={length} d={depth:g}")
      cfg = cache_config(spec)
      if (spec["name"], length) not in memory:
        memory[spec["name"], length] = prompt_memory(lm.model.config, cfg,
                                                     length, key)
      mem = memory[spec["name"], length]
      prompt = prompts[length, depth]
      start = time.perf_counter()
      text, n_new = answer(lm, prompt, length, cfg, config)
      seconds = time.perf_counter() - start
      writer.write(dict(
          model=lm.name, text=config.text, cache=spec["name"],
          label=spec["label"], kind=spec["kind"],
          key_bits=spec["key_bits"], value_bits=spec["value_bits"],
          window=spec["window"], budget=spec["budget"],
          length=length, depth=depth, prompt_tokens=len(prompt.ids),
          actual_depth=prompt.actual_depth,
          haystack_sentences=prompt.haystack_sentences,
          score=needle.score(text, nd), answer=text, new_tokens=n_new,
          memory_fraction=mem["kv_bytes"] / full[length]["kv_bytes"],
          kv_bytes=mem["kv_bytes"], fixed_bytes=mem["fixed_bytes"],
          seconds=seconds, backend=jax.default_backend()))
  return make_outputs(workdir, writer.rows(), config)


# ------------------------------------------------------- table and plots


def _grid(rows: Sequence[dict], name: str, config) -> np.ndarray:
  """f64[depths, lengths] scores of one cache (NaN: missing)."""
  out = np.full((len(config.depths), len(config.lengths)), np.nan)
  for r in rows:
    if r["cache"] != name:
      continue
    if r["depth"] in config.depths and r["length"] in config.lengths:
      out[list(config.depths).index(r["depth"]),
          list(config.lengths).index(r["length"])] = r["score"]
  return out


def _memory_text(rows: Sequence[dict], name: str) -> str:
  fr = sorted({round(100 * r["memory_fraction"], 1) for r in rows
               if r["cache"] == name})
  if not fr:
    return "—"
  return f"{fr[0]:.1f}" if fr[0] == fr[-1] else f"{fr[0]:.1f}–{fr[-1]:.1f}"


def make_table(rows: Sequence[dict], config) -> str:
  """Markdown: mean score per cache, overall and per length; memory."""
  specs = cache_specs(config)
  lengths = list(config.lengths)
  head = ("| cache | memory (% of full) | mean score | score = 1 | "
          + " | ".join(f"L={n}" for n in lengths) + " |")
  lines = [head, "|" + "---|" * (4 + len(lengths))]
  for s in specs:
    grid = _grid(rows, s["name"], config)
    cells = grid[np.isfinite(grid)]
    if not cells.size:
      continue
    per_length = [np.nanmean(grid[:, j]) if np.isfinite(grid[:, j]).any()
                  else np.nan for j in range(len(lengths))]
    lines.append(
        f"| {s['label']} | {_memory_text(rows, s['name'])} | "
        f"{cells.mean():.3f} | {np.mean(cells == 1):.0%} | "
        + " | ".join("—" if np.isnan(x) else f"{x:.3f}" for x in per_length)
        + " |")
  return "\n".join(lines) + "\n"


def _draw(ax, grid: np.ndarray, config, title: str, *, xlabel: bool = True,
          ylabel: bool = True):
  image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto",
                    origin="upper")
  ax.set_xticks(range(len(config.lengths)),
                [str(n) for n in config.lengths], fontsize=8)
  ax.set_yticks(range(len(config.depths)),
                [f"{100 * d:.0f}%" for d in config.depths], fontsize=8)
  if xlabel:
    ax.set_xlabel("prompt tokens", fontsize=8)
  if ylabel:
    ax.set_ylabel("needle depth", fontsize=8)
  ax.set_title(title, fontsize=8)
  for (i, j), x in np.ndenumerate(grid):
    if np.isfinite(x):
      ax.text(j, i, f"{x:.2f}", ha="center", va="center", fontsize=7)
  return image


def _title(rows: Sequence[dict], spec: dict, config) -> str:
  grid = _grid(rows, spec["name"], config)
  return (f"{spec['label']}\nmean {np.nanmean(grid):.3f}, memory "
          f"{_memory_text(rows, spec['name'])}% of full")


def make_outputs(workdir: pathlib.Path, rows: Sequence[dict],
                 config) -> list[pathlib.Path]:
  """table.md, one heatmap per cache and the combined figure."""
  specs = [s for s in cache_specs(config)
           if any(r["cache"] == s["name"] for r in rows)]
  paths = []
  table = workdir / TABLE_FILE
  table.write_text(make_table(rows, config), encoding="utf-8")
  paths.append(table)
  width = 0.75 * len(config.lengths) + 1.6
  height = 0.35 * len(config.depths) + 1.6
  for s in specs:
    fig, ax = plt.subplots(figsize=(width + 1.0, height),
                           layout="constrained")
    image = _draw(ax, _grid(rows, s["name"], config), config,
                  _title(rows, s, config))
    fig.colorbar(image, ax=ax, label="score")
    path = workdir / f"heatmap_{s['name']}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
  if specs:
    cols = min(4, len(specs))
    nrows = -(-len(specs) // cols)
    fig, axes = plt.subplots(nrows, cols, squeeze=False, layout="constrained",
                             figsize=(cols * width + 1.0, nrows * height + 0.4))
    image = None
    for i, (ax, s) in enumerate(zip(axes.flat, specs)):
      image = _draw(ax, _grid(rows, s["name"], config), config,
                    _title(rows, s, config),
                    xlabel=i + cols >= len(specs), ylabel=i % cols == 0)
    for ax in list(axes.flat)[len(specs):]:
      ax.axis("off")
    fig.colorbar(image, ax=axes, label="score", shrink=0.8)
    fig.suptitle(f"Needle in a haystack: {rows[0]['model']}", fontsize=10)
    path = workdir / FIGURE_FILE
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
  return paths


if __name__ == "__main__":
  common.define_flags("needle.py")
  app.run(common.main_for(run))
