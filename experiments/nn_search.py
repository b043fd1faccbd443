r"""Nearest-neighbour search: TurboQuant against faiss PQ and RaBitQ.

  python -m turboquant_jax.data.fetch      # GloVe, SmolLM2, Austen, once
  python -m experiments.nn_search --config=configs/nn_search.py[:scale=quick] \
      --workdir=runs/nn_search

For each data set, bit budget b and method, the base set is indexed (timed)
and the 1..k_max best candidates of every query are retrieved; recall@1@k
is the share of queries whose exact nearest neighbour (by inner product on
the stored or unit-normalized vectors; -‖q-x‖² for "l2") is among them.
Every method runs in this one process with the same threads (faiss's OpenMP
pool and XLA, pinned to config.threads cores).

Methods (configs/nn_search.py): TurboQuant as the paper has it (tq_mse,
tq_prod), with online levers (tq_mse_nc: norm correction; tq_mse_nc_c: and
mean-centering), faiss PQ (256-codeword tables, M = ceil(b·D/8)) and faiss
RaBitQ (nb_bits = b, random rotation, float queries). bits_per_coord counts
everything each method stores per vector (see turboquant_jax.search).

Index time: TurboQuant's is drawing the quantizer (QR of a D x D Gaussian)
plus encoding every vector, XLA compilation excluded (it is measured
separately on a first, untimed build of one chunk); faiss's is train() plus
add().

Outputs in --workdir: config.json, results.jsonl (op "recall": one row per
data set, bits, method and k; op "index": one per data set, bits and
method, with timings and settings; op "index_time": Table 2 timing rows),
fig5_<dataset>.png (recall@1@k against k, one panel per budget),
recall_vs_bits.png, and table.md. A re-run with the same workdir and
config skips what is done and redraws the outputs.
"""

import os

# See experiments/distortion.py: OpenBLAS's spinning thread pool made Haar
# QRs slow under contention; XLA and faiss bring their own threads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# pylint: disable=g-import-not-at-top,wrong-import-position
import collections
import pathlib
import time
import zlib

from absl import app
from absl import logging
import jax
import matplotlib
import numpy as np
import tqdm

from experiments import common
from turboquant_jax import results
from turboquant_jax import search
from turboquant_jax.data import vectors
from turboquant_jax.search import baselines

matplotlib.use("Agg")
from matplotlib import pyplot as plt
# pylint: enable=g-import-not-at-top,wrong-import-position

INDEX_KEY = ("dataset", "method", "bits")
RECALL_KEY = ("dataset", "method", "bits", "k")
TIMING_KEY = ("dim", "n", "method", "bits")
_TABLE_KS = (1, 2, 4, 8, 16, 32, 64)


def _key(seed: int, *parts) -> jax.Array:
  """A key for one named purpose: stable across runs and resumes."""
  tag = zlib.crc32("/".join(map(str, parts)).encode()) & 0x7FFFFFFF
  return jax.random.fold_in(jax.random.key(seed), tag)


def _names(value: str, known: list[str], what: str) -> set[str]:
  names = {s for s in (value or "").split(",") if s}
  unknown = names - set(known)
  if unknown:
    raise ValueError(f"config.only_{what}: unknown {sorted(unknown)}; known "
                     f"{known}")
  return names or set(known)


def set_threads(threads: int) -> int:
  """Pins this process to `threads` cores and sets faiss's pool; returns it.

  XLA's CPU client sizes its pool from the cores it may run on, so the
  pinning applies to it and to faiss alike.
  """
  avail = sorted(os.sched_getaffinity(0)) if hasattr(
      os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
  if threads <= 0 or threads > len(avail):
    threads = len(avail)
  if hasattr(os, "sched_setaffinity") and threads < len(avail):
    os.sched_setaffinity(0, avail[:threads])
  baselines.set_threads(threads)
  return threads


# ------------------------------------------------------------------ data


class Dataset:
  """Base vectors, queries and the exact nearest neighbours of one set."""

  def __init__(self, spec, seed: int):
    self.spec = spec
    self.name = spec["name"]
    base, queries, true_top1, metric = _load(spec, seed)
    self.metric = metric
    if metric == "angular":
      base, queries = search.normalize(base), search.normalize(queries)
    self.base, self.queries = base, queries
    if true_top1 is None and spec["recall"]:
      ids, _ = search.exact_top_k(base, queries, 1, metric)
      true_top1 = ids[:, 0]
    self.true_top1 = true_top1

  @property
  def dim(self) -> int:
    return self.base.shape[1]


def _load(spec, seed: int):
  """(base, queries, true top-1 ids or None, metric) for a data set spec."""
  kind, nb, nq = spec["kind"], spec["n_base"], spec["n_queries"]
  metric = spec["metric"]
  if kind == "glove":
    # pylint: disable-next=g-import-not-at-top
    from turboquant_jax.data import glove
    base, queries = glove.base_and_queries(nb, nq, seed)
    return base, queries, None, metric
  if kind == "smollm2_embeddings":
    x = vectors.unique_rows(vectors.smollm2_token_embeddings())
    return (*vectors.split_base_queries(x, nb, nq, seed), None, metric)
  if kind == "smollm2_keys":
    keys, _ = vectors.smollm2_attention_vectors(
        spec["text"], spec["layer"], spec["num_tokens"],
        spec["sequence_length"])
    x = vectors.unique_rows(keys.reshape(keys.shape[0], -1))
    return (*vectors.split_base_queries(x, nb, nq, seed), None, metric)
  if kind == "random":
    if spec["dim"] < 1:
      raise ValueError(f"dataset {spec['name']!r}: random needs dim >= 1")
    rng = np.random.default_rng([seed, spec["dim"], nb, nq])
    x = rng.standard_normal((nb + nq, spec["dim"]), np.float32)
    return x[:nb], x[nb:], None, metric
  if kind == "parquet":
    x = vectors.load_parquet_embeddings(spec["path"], spec["column"] or None,
                                        limit=nb + nq)
    return (*vectors.split_base_queries(x, nb, nq, seed), None, metric)
  if kind == "ann_hdf5":
    ds = vectors.load_ann_hdf5(spec["path"])
    if nb > ds.train.shape[0] or nq > ds.test.shape[0]:
      raise ValueError(f"dataset {spec['name']!r}: {nb=} / {nq=} exceed the "
                       f"file's {ds.train.shape[0]} / {ds.test.shape[0]}")
    true_top1 = None
    if ds.neighbors is not None and nb == ds.train.shape[0]:
      true_top1 = ds.neighbors[:nq, 0]   # the file's exact neighbours
    return ds.train[:nb], ds.test[:nq], true_top1, ds.metric
  raise ValueError(f"dataset {spec['name']!r}: unknown kind {kind!r}")


# ------------------------------------------------------------ measuring


def _tq_config(m, bits: int, metric: str) -> search.IndexConfig:
  return search.IndexConfig(
      bits=bits, method=m["tq_method"],
      norm_correction=m["norm_correction"], rotations=m["rotations"],
      unit_norm=metric == "angular", center=m["center"],
      metric="l2" if metric == "l2" else "ip", rotation=m["rotation"],
      norm_dtype=m["norm_dtype"], scale_bits=m["scale_bits"])


def build_method(m, bits: int, base: np.ndarray, metric: str, key,
                 chunk: int):
  """Builds one index.

  Returns:
    (handle, info dict with timings and bits, warm): warm is a TurboQuant
    index of the first chunk, built untimed first to compile every shape
    the timed build uses (searching it compiles the search), else None.
  """
  family = m["family"]
  faiss_metric = "l2" if metric == "l2" else "ip"
  if family == "tq":
    cfg = _tq_config(m, bits, metric)
    t0 = time.perf_counter()
    warm = search.build(key, base[:min(chunk, len(base))], cfg, chunk=chunk)
    jax.block_until_ready(warm)
    compile_s = time.perf_counter() - t0
    t0, c0 = time.perf_counter(), time.process_time()
    index = search.build(key, base, cfg, chunk=chunk)
    jax.block_until_ready(index)
    seconds = time.perf_counter() - t0
    return index, dict(
        index_seconds=seconds, index_cpu_seconds=time.process_time() - c0,
        compile_seconds=compile_s,
        bits_per_coord=search.bits_per_coordinate(index),
        fixed_bytes=search.fixed_bytes(index),
        setting=dict(method=cfg.method, norm_correction=cfg.norm_correction,
                     unit_norm=cfg.unit_norm, center=cfg.center,
                     rotations=cfg.rotations, rotation=cfg.rotation,
                     norm_dtype=cfg.norm_dtype, scale_bits=cfg.scale_bits)
    ), warm
  c0 = time.process_time()
  if family == "pq":
    fi = baselines.build_pq(base, bits, faiss_metric, m["code_bits"])
  elif family == "rabitq":
    fi = baselines.build_rabitq(base, bits, faiss_metric)
  else:
    raise ValueError(f"method {m['name']!r}: unknown family {family!r}")
  return fi, dict(index_seconds=fi.index_seconds,
                  index_cpu_seconds=time.process_time() - c0,
                  train_seconds=fi.train_seconds,
                  add_seconds=fi.add_seconds, compile_seconds=0.0,
                  bits_per_coord=fi.bits_per_coordinate,
                  fixed_bytes=fi.fixed_bytes, setting=fi.setting), None


def search_method(m, handle, queries: np.ndarray, k: int, chunk: int,
                  warm=None) -> tuple[np.ndarray, float]:
  """(ids i32[Q, k], seconds); `warm` (build_method's) compiles first."""
  if m["family"] == "tq":
    if warm is not None:
      search.search(warm, queries, min(k, warm.size), chunk=chunk)
    t0 = time.perf_counter()
    _, ids = search.search(handle, queries, k, chunk=chunk)
    return ids, time.perf_counter() - t0
  t0 = time.perf_counter()
  _, ids = baselines.search(handle, queries, k)
  return ids, time.perf_counter() - t0


def cpu_share(info: dict, threads: int) -> float:
  """CPU time / (wall time x threads) of the index build: near 1 when the
  build had its cores to itself, lower when other processes competed (or
  when it could not use every thread)."""
  return info["index_cpu_seconds"] / max(
      info["index_seconds"] * threads, 1e-12)


def supported(m, metric: str) -> bool:
  """Whether a method runs on a metric (TurboQuant prod has no l2)."""
  return not (metric == "l2" and m["family"] == "tq"
              and m["tq_method"] != "mse")


def measure(ds: Dataset, m, bits: int, config, env
            ) -> tuple[dict, list[dict]]:
  """Indexes ds.base with one method; (index row, recall rows)."""
  key = _key(config.quantizer_seed, ds.name, m["name"], bits)
  handle, info, warm = build_method(m, bits, ds.base, ds.metric, key,
                                    config.chunk)
  k = min(config.k_max, ds.base.shape[0])
  ids, search_s = search_method(m, handle, ds.queries, k, config.chunk,
                                warm)
  recall = search.recall_at_1_at_k(ids, ds.true_top1)
  common = dict(dataset=ds.name, dim=ds.dim, method=m["name"], bits=bits,
                bits_per_coord=info["bits_per_coord"],
                index_seconds=info["index_seconds"])
  recall_rows = [dict(op="recall", **common, k=i + 1, recall=r)
                 for i, r in enumerate(recall)]
  row = dict(op="index", **common, family=m["family"], group=m["group"],
             metric=ds.metric, n_base=ds.base.shape[0],
             n_queries=ds.queries.shape[0], search_seconds=search_s,
             recall_at_1=recall[0], recall_at_k_max=recall[-1],
             **{f: v for f, v in info.items() if f not in common},
             cpu_share=cpu_share(info, env["threads"]),
             threads=env["threads"], processor=env.get("processor"),
             backend=env.get("backend"), jax=env.get("jax"))
  return row, recall_rows


def timing_n(config, m) -> int:
  """Vectors to index in the timing runs for a method."""
  return int(config.timing.n_by_family.get(m["family"], config.timing.n))


def time_index(dim: int, m, config, env) -> dict:
  """Table 2: one index build on random unit vectors of dim."""
  tc = config.timing
  n = timing_n(config, m)
  rng = np.random.default_rng([config.seed, dim, n])
  x = search.normalize(rng.standard_normal((n, dim), np.float32))
  key = _key(config.quantizer_seed, "timing", dim, m["name"])
  _, info, _ = build_method(m, tc.bits, x, "angular", key, config.chunk)
  return dict(op="index_time", dataset=f"random{dim}", dim=dim, n=n,
              method=m["name"], family=m["family"], bits=tc.bits,
              **info, vectors_per_second=n / info["index_seconds"],
              cpu_share=cpu_share(info, env["threads"]),
              threads=env["threads"], processor=env.get("processor"),
              backend=env.get("backend"), jax=env.get("jax"))


# --------------------------------------------------------------- outputs

_COLORS = {"tq_mse": "tab:blue", "tq_prod": "tab:orange",
           "tq_mse_nc": "tab:green", "tq_mse_nc_c": "tab:olive",
           "tq_mse_nc_r4": "tab:cyan", "tq_mse_nc_c_r4": "tab:brown",
           "pq": "tab:red", "rabitq": "tab:purple"}
_STYLES = {"paper": "--", "ours": "-", "baseline": ":"}


def _index_rows(rows) -> dict[tuple, dict]:
  return {tuple(r[f] for f in INDEX_KEY): r for r in rows
          if r.get("op") == "index"}


def _curves(rows) -> dict[tuple, list[tuple[int, float]]]:
  curves = collections.defaultdict(dict)
  for r in rows:
    if r.get("op") == "recall":
      curves[r["dataset"], r["method"], r["bits"]][r["k"]] = r["recall"]
  return {key: sorted(v.items()) for key, v in curves.items()}


def plot_recall(workdir, rows, dataset: str,
                bits) -> pathlib.Path | None:
  """Fig. 5: recall@1@k against k, one panel per bit budget."""
  index = _index_rows(rows)
  curves = _curves(rows)
  bits = sorted({b for (d, _, b) in index if d == dataset and b in bits})
  if not bits:
    return None
  fig, axes = plt.subplots(1, len(bits), figsize=(5.2 * len(bits), 4.3),
                           squeeze=False, layout="constrained")
  for ax, b in zip(axes[0], bits):
    for (d, name, bb), row in index.items():
      if d != dataset or bb != b or (d, name, b) not in curves:
        continue
      ks, rec = zip(*curves[d, name, b])
      ax.plot(ks, rec, _STYLES.get(row["group"], "-"), marker="o", ms=2.5,
              color=_COLORS.get(name), label=(
                  f"{name} ({row['bits_per_coord']:.2f} b/coord, "
                  f"{row['index_seconds']:.2g} s)"))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k")
    ax.set_ylabel("Recall@1@k")
    ax.set_ylim(0, 1.01)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(f"{b}-bit budget", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
  any_row = next(r for r in index.values() if r["dataset"] == dataset)
  fig.suptitle(f"Fig. 5: {dataset}, d={any_row['dim']}, "
               f"{any_row['n_base']:,} base x {any_row['n_queries']:,} "
               f"queries ({any_row['metric']}); legend: bits per coordinate "
               "stored, index time", fontsize=10)
  path = pathlib.Path(workdir) / f"fig5_{dataset}.png"
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def plot_recall_vs_bits(workdir, rows) -> pathlib.Path | None:
  """Recall@1@1 and @1@8 against the bits each method really stores."""
  index = _index_rows(rows)
  datasets = sorted({d for d, _, _ in index})
  if not datasets:
    return None
  curves = {key: dict(v) for key, v in _curves(rows).items()}
  fig, axes = plt.subplots(2, len(datasets), squeeze=False,
                           figsize=(4.6 * len(datasets), 7.2),
                           layout="constrained")
  for j, d in enumerate(datasets):
    for i, k in enumerate((1, 8)):
      ax = axes[i, j]
      for name in sorted({n for dd, n, _ in index if dd == d}):
        pts = sorted((r["bits_per_coord"], curves[d, name, b].get(k))
                     for (dd, nn, b), r in index.items()
                     if dd == d and nn == name and (d, name, b) in curves)
        pts = [p for p in pts if p[1] is not None]
        if pts:
          ax.plot(*zip(*pts), marker="o", color=_COLORS.get(name),
                  label=name)
      ax.set_title(f"{d}: Recall@1@{k}", fontsize=10)
      ax.set_xlabel("bits per coordinate stored")
      ax.set_ylim(0, 1.01)
      ax.grid(True, alpha=0.3)
      ax.legend(fontsize=7)
  path = pathlib.Path(workdir) / "recall_vs_bits.png"
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def _fmt(v, spec=".3f") -> str:
  return "—" if v is None else format(v, spec)


def _points(index, curves, dataset: str, **where):
  """[(bits per coordinate, {k: recall}, row)] of matching rows, sorted."""
  out = [(r["bits_per_coord"], curves[key], r) for key, r in index.items()
         if key[0] == dataset and key in curves
         and all(r[f] == v for f, v in where.items())]
  return sorted(out, key=lambda p: p[0])


def interpolate(points, bits: float) -> dict | None:
  """A recall curve at `bits` per coordinate, linear in bits between the
  nearest settings below and above (None outside their range).

  Recall rises concavely with bits, so the chord lies below the true
  curve: interpolating our own curve understates it (conservative).
  """
  below = [p for p in points if p[0] <= bits + 1e-9]
  above = [p for p in points if p[0] >= bits - 1e-9]
  if not below or not above:
    return None
  (b0, c0, _), (b1, c1, _) = below[-1], above[0]
  w = 0.0 if b1 - b0 < 1e-9 else (bits - b0) / (b1 - b0)
  return {k: (1 - w) * c0[k] + w * c1[k] for k in c0 if k in c1}


def _share_at_least(ours: dict, theirs: dict) -> str:
  ks = [k for k in ours if k in theirs]
  wins = sum(ours[k] >= theirs[k] - 1e-12 for k in ks)
  return f"{wins}/{len(ks)}"


def verdicts(index, curves, dataset: str, bits: int) -> list[str]:
  """TurboQuant against each baseline's setting at this budget, at equal
  bits: (a) our best setting that stores no more bits than the baseline
  does, (b) each TurboQuant curve interpolated to the baseline's bits."""
  ours = _points(index, curves, dataset, family="tq")
  lines = []
  for fam in ("pq", "rabitq"):
    refs = [p for p in _points(index, curves, dataset, family=fam)
            if p[2]["bits"] == bits]
    if not refs or not ours:
      continue
    ref_bits, ref_curve, ref = refs[0]
    text = (f"vs {ref['method']} at {ref_bits:.2f} b/coord (R@1@1 "
            f"{ref_curve[1]:.3f}, index {ref['index_seconds']:.3g} s): ")
    fits = [p for p in ours if p[0] <= ref_bits + 1e-9]
    if fits:
      best_bits, best_curve, best = max(fits, key=lambda p: (p[1][1], p[0]))
      text += (f"{best['method']} {best['bits']}-bit at {best_bits:.2f} "
               f"b/coord: R@1@1 {best_curve[1]:.3f}, >= at "
               f"{_share_at_least(best_curve, ref_curve)} k, index "
               f"{best['index_seconds']:.3g} s")
    else:
      text += "no TurboQuant setting stores that few bits"
    interp = []
    for name in sorted({p[2]["method"] for p in ours}):
      curve = interpolate(_points(index, curves, dataset, method=name),
                          ref_bits)
      if curve is not None:
        interp.append((curve[1], name, curve))
    if interp:
      r1, name, curve = max(interp)
      text += (f"; {name} interpolated to {ref_bits:.2f} b/coord: R@1@1 "
               f"{r1:.3f}, >= at {_share_at_least(curve, ref_curve)} k")
    lines.append(text)
  return lines


def write_table(workdir, rows, env, bits) -> pathlib.Path:
  """table.md: recall per data set, budget and method; index times."""
  index = _index_rows(rows)
  curves = {key: dict(v) for key, v in _curves(rows).items()}
  out = ["# Nearest-neighbour search: TurboQuant against faiss", "",
         f"{env.get('processor')}, {env.get('cpus_available')} cores "
         f"available; jax {env.get('jax')} ({env.get('backend')}). "
         f"Generated {env.get('date')} from results.jsonl.", "",
         "b/coord: bits stored per vector / d (codes, scales, factors). "
         "Index s: TurboQuant = draw the quantizer + encode (XLA compile "
         "excluded, in `compile_seconds`); faiss = train + add. Search s: "
         "all queries, top-64. Recall@1@k: share of queries whose exact "
         "nearest neighbour is in the top k."]
  datasets = sorted({d for d, _, _ in index})
  for d in datasets:
    any_row = next(r for r in index.values() if r["dataset"] == d)
    out += ["", f"## {d}: d={any_row['dim']}, {any_row['n_base']:,} base, "
            f"{any_row['n_queries']:,} queries, metric {any_row['metric']}",
            ""]
    head = " | ".join(f"R@1@{k}" for k in _TABLE_KS)
    out += [f"| bits | method | b/coord | {head} | index s | search s |",
            "|---|---|---|" + "---|" * len(_TABLE_KS) + "---|---|"]
    for b in sorted({bb for dd, _, bb in index if dd == d}):
      for (dd, name, bb), r in sorted(index.items(),
                                      key=lambda kv: kv[1]["method"]):
        if dd != d or bb != b:
          continue
        c = curves.get((d, name, b), {})
        rec = " | ".join(_fmt(c.get(k)) for k in _TABLE_KS)
        out.append(f"| {b} | {name} | {r['bits_per_coord']:.3f} | {rec} | "
                   f"{r['index_seconds']:.3g} | {r['search_seconds']:.3g} |")
    out.append("")
    for b in sorted({bb for dd, _, bb in index if dd == d and bb in bits}):
      for v in verdicts(index, curves, d, b):
        out.append(f"- {b}-bit budget, {v}.")
  timing = sorted((r for r in rows if r.get("op") == "index_time"),
                  key=lambda r: (r["dim"], r["method"]))
  by_dim = collections.defaultdict(dict)
  for r in timing:
    by_dim[r["dim"], r["n"]][r["method"]] = r
  for r in index.values():
    if r["bits"] == max(bits):
      by_dim[r["dim"], r["n_base"]][r["method"]] = r
  if by_dim:
    methods = sorted({m for v in by_dim.values() for m in v})
    out += ["", "## Index time (s), Table 2 style", "",
            "Random rows: Gaussian directions at timing.bits; data-set "
            f"rows: the {max(bits)}-bit budget. The paper (its Table 2, 100k "
            "vectors, 4 bits, d = 200 / 1536 / 3072): PQ 37.04 / 239.75 / "
            "494.42 s, RaBitQ 597.25 / 2267.59 / 3957.19 s (one core), "
            "TurboQuant 0.0007 / 0.0013 / 0.0021 s (A100). In "
            "parentheses: the build's CPU share (CPU time / (wall x "
            "threads)); below 1 when other processes competed.", "",
            "| d | n | bits | " + " | ".join(methods) + " |",
            "|---|---|---|" + "---|" * len(methods)]
    for (dim, n), v in sorted(by_dim.items()):
      b = next(iter(v.values()))["bits"]
      cells = " | ".join(
          f"{v[m]['index_seconds']:.3g} ({_fmt(v[m].get('cpu_share'), '.2f')})"
          if m in v else "—" for m in methods)
      out.append(f"| {dim} | {n:,} | {b} | {cells} |")
  path = pathlib.Path(workdir) / "table.md"
  path.write_text("\n".join(out) + "\n", encoding="utf-8")
  return path


def seed_spread(workdirs, ks=(1, 8)) -> str:
  """Markdown: recall@1@k mean ± sd over runs that differ only in
  config.quantizer_seed (same data, independent rotations).

  Args:
    workdirs: run directories; each contributes one value per (data set,
      method, bits, k) that it holds.
    ks: the k columns.
  """
  values = collections.defaultdict(list)
  for wd in workdirs:
    for r in results.read_rows(pathlib.Path(wd) / results.RESULTS_FILE):
      if r.get("op") == "recall" and r["k"] in ks:
        values[r["dataset"], r["method"], r["bits"], r["k"]].append(
            r["recall"])
  keys = sorted({k[:3] for k in values})
  out = ["| data set | method | bits | "
         + " | ".join(f"R@1@{k} mean ± sd (runs)" for k in ks) + " |",
         "|---|---|---|" + "---|" * len(ks)]
  for d, m, b in keys:
    cells = []
    for k in ks:
      v = np.asarray(values.get((d, m, b, k), []), np.float64)
      sd = v.std(ddof=1) if v.size > 1 else float("nan")
      cells.append(f"{v.mean():.3f} ± {sd:.3f} ({v.size})" if v.size
                   else "—")
    out.append(f"| {d} | {m} | {b} | " + " | ".join(cells) + " |")
  return "\n".join(out) + "\n"


def make_outputs(workdir, env, bits=(2, 4)) -> list[pathlib.Path]:
  """Draws the figures and writes table.md from results.jsonl.

  Args:
    workdir: holds results.jsonl; the outputs go there.
    env: results.environment() (for the table's header).
    bits: the budgets of the Fig. 5 panels and the verdicts.
  """
  workdir = pathlib.Path(workdir)
  rows = results.read_rows(workdir / results.RESULTS_FILE)
  paths = []
  for d in sorted({r["dataset"] for r in rows if r.get("op") == "index"}):
    path = plot_recall(workdir, rows, d, bits)
    if path:
      paths.append(path)
  path = plot_recall_vs_bits(workdir, rows)
  if path:
    paths.append(path)
  paths.append(write_table(workdir, rows, env, bits))
  return paths


# ------------------------------------------------------------------ main


def run(config, workdir: str | os.PathLike) -> list[pathlib.Path]:
  """Runs (or resumes) the experiment into workdir; returns output paths."""
  workdir = pathlib.Path(workdir)
  writer = results.Writer(workdir, config)
  threads = set_threads(config.threads)
  env = dict(results.environment(), threads=threads)
  logging.info("environment: %s", env)
  ds_names = _names(config.only_datasets,
                    [d["name"] for d in config.datasets], "datasets")
  all_methods = {m["name"]: m for m in config.methods}
  m_names = _names(config.only_methods, list(all_methods), "methods")
  for name in config.timing.methods:
    if name not in all_methods:
      raise ValueError(f"config.timing.methods: unknown method {name!r}")

  done = writer.done_keys(INDEX_KEY, where=dict(op="index"))
  recall_done = writer.done_keys(RECALL_KEY, where=dict(op="recall"))
  items = []
  for spec in config.datasets:
    if spec["name"] not in ds_names or not spec["recall"]:
      continue
    for m in config.methods:
      name = m["name"]
      if name not in m_names or name in spec["skip_methods"]:
        continue
      for b in sorted(set(config.bits) | set(m["extra_bits"])):
        if (spec["name"], name, b) not in done:
          items.append(("recall", spec, m, b))
  tdone = writer.done_keys(TIMING_KEY, where=dict(op="index_time"))
  for dim in config.timing.dims:
    for name in config.timing.methods:
      if name in m_names and (dim, timing_n(config, all_methods[name]),
                              name, config.timing.bits) not in tdone:
        items.append(("index_time", dim, all_methods[name], None))
  logging.info("%d work items to do", len(items))
  loaded = None
  for item in (bar := tqdm.tqdm(items, desc="nn_search", unit="item")):
    kind, what, m, b = item
    if kind == "recall":
      bar.set_postfix_str(f"{what['name']}/{m['name']}/{b}")
      if loaded is None or loaded.name != what["name"]:
        loaded = None                       # free the previous set first
        loaded = Dataset(what, config.seed)
      if not supported(m, loaded.metric):
        logging.warning("%s does not support metric %s; skipped", m["name"],
                        loaded.metric)
        continue
      row, recall_rows = measure(loaded, m, b, config, env)
      for r in recall_rows:                 # the index row marks it done
        if tuple(r[f] for f in RECALL_KEY) not in recall_done:
          writer.write(r)
      writer.write(row)
    else:
      loaded = None
      bar.set_postfix_str(f"random{what}/{m['name']}")
      writer.write(time_index(what, m, config, env))
  return make_outputs(workdir, env, tuple(config.bits))


if __name__ == "__main__":
  common.define_flags("nn_search.py")
  app.run(common.main_for(run))
