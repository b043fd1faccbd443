r"""Distortion experiment: the paper's Figures 1-3 and Table 2 shapes.

  python -m turboquant_jax.data.fetch      # GloVe, once
  python -m experiments.distortion --config=configs/distortion.py[:scale=full] \
      --workdir=runs/distortion

Data sets (each vector normalized to unit norm, so the theory applies as is):
- random: base and queries drawn independently and uniformly on S^{d-1}.
- glove: GloVe 6B 50-d; disjoint random rows for base and queries, each
  normalized to unit norm (the raw norms run from 0.05 to 14).

For each data set, method (mse, prod) and bit width b, the base set is
quantized and we measure
- D_mse  = mean over base vectors of ‖x - x̃‖² (x̃ = dequantize),
- D_prod = mean over (query, base) pairs of (⟨y, x⟩ - est)², est from
  `tq.inner_product` on the codes (queries are unit norm),
- bias = mean of est - ⟨y, x⟩, and the least-squares slope of est on
  ⟨y, x⟩ (2/π for mse at b = 1 in high dimension, 1 for prod),
beside the theory: exact Lloyd-Max D_mse, the paper's bounds, and our
predictions for prod (derivation in `_theory`). The base set is split into
`quantizer_draws` blocks, each quantized with an independent rotation (and
sketch); standard errors (`*_se`) are over these draws (see `_Dataset`).

Timing (the paper's Table 2 shapes): wall time of `jax.jit(tq.quantize)`,
compiled ahead of the clock, on timing.n random vectors at each of
timing.dims, median of timing.repeats runs (all vectors every run).

Outputs in --workdir: config.json, results.jsonl (one row per data set,
method and bits, and one per timing shape), arrays/*.npz (error samples and
binned errors for the figures), fig1_error_hist_<ds>.png,
fig2_bias_<ds>.png, fig3_distortion_<ds>.png and table.md. A re-run with
the same workdir and config skips the rows already written and redraws the
figures and table.
"""

import os

# Haar rotations reach LAPACK (scipy's OpenBLAS) through jnp.linalg.qr. With
# OpenBLAS's default thread pool, a d=1536 QR took 3-29 s instead of 0.7 s
# whenever other processes were using the cores (its threads spin-wait); one
# thread costs little on an idle machine. OpenBLAS reads this when it loads,
# i.e. on the first import of scipy.linalg (turboquant_jax imports it).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# pylint: disable=g-import-not-at-top,wrong-import-position
import dataclasses
import functools
import math
import pathlib
import statistics
import time
import zlib

from absl import app
from absl import logging
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import tqdm

from experiments import common
import turboquant_jax as tq
from turboquant_jax import results
from turboquant_jax.data import glove

matplotlib.use("Agg")
from matplotlib import pyplot as plt
# pylint: enable=g-import-not-at-top,wrong-import-position


_HIGHEST = jax.lax.Precision.HIGHEST
DISTORTION_KEY = ("dataset", "method", "bits")
TIMING_KEY = ("dim", "n", "bits", "method")

# PAPER.md §2: the paper's D_mse and d·D_prod for b = 1..4 (d = 1536).
PAPER_D_MSE = {1: 0.36, 2: 0.117, 3: 0.03, 4: 0.009}
PAPER_D_PROD_TIMES_DIM = {1: 1.571, 2: 0.571, 3: 0.185, 4: 0.054}
# PAPER.md §3, Table 2: seconds to quantize 100k vectors at 4 bits.
PAPER_TIME_A100 = {200: 0.0007, 1536: 0.0013, 3072: 0.0021}
AUTHORS_RERUN_A100 = {200: 0.011, 1536: 0.114, 3072: 0.276}
_METHOD_LABEL = {"mse": "TurboQuant_mse", "prod": "TurboQuant_prod"}
_METHOD_COLOR = {"mse": "tab:blue", "prod": "tab:orange"}


# ------------------------------------------------------------------ data


def _normalize(x: np.ndarray) -> np.ndarray:
  norm = np.linalg.norm(x, axis=-1, keepdims=True)
  if np.any(norm == 0):
    raise ValueError("a zero vector cannot be normalized")
  return (x / norm).astype(np.float32)


def _key(seed: int, *parts) -> jax.Array:
  """A key for one named purpose: stable across runs and resumes."""
  tag = zlib.crc32("/".join(map(str, parts)).encode()) & 0x7FFFFFFF
  return jax.random.fold_in(jax.random.key(seed), tag)


def load_dataset(name: str, config) -> tuple[np.ndarray, np.ndarray]:
  """Unit-norm (base f32[N, D], queries f32[Q, D]) for a data set name."""
  if name == "random":
    d = config.random_dim
    base = jax.random.normal(_key(config.seed, "random", "base"),
                             (config.n_base, d), jnp.float32)
    queries = jax.random.normal(_key(config.seed, "random", "queries"),
                                (config.n_queries, d), jnp.float32)
    return _normalize(np.asarray(base)), _normalize(np.asarray(queries))
  if name == "glove":
    base, queries = glove.base_and_queries(config.n_base, config.n_queries,
                                           config.seed)
    return _normalize(base), _normalize(queries)
  raise ValueError(f"unknown dataset {name=!r}; known: 'random', 'glove'")


# ---------------------------------------------------------------- theory


def _theory(dim: int, method: str, bits: int) -> dict[str, float]:
  """Exact and bound values for one row.

  exact_d_mse: Lloyd-Max D_mse(d, b), what TurboQuant_mse should measure.
  expected_d_mse: for mse, the same; for prod, (π/2 - 1/d)·D_mse(d, b-1)
    (D_mse(d, 0) = 1): the QJL reconstruction r̃ of the residual r has
    E⟨r, r̃⟩ = ‖r‖² and E‖r̃‖² = (π/2 + 1 - 1/d)‖r‖², so
    E‖r - r̃‖² = (π/2 - 1/d)‖r‖²; this holds for any data.
  iso_d_prod: expected_d_mse / d, the D_prod of unit queries drawn
    independently of the data and quantizer (E⟨y, e⟩² = E‖e‖²/d for an
    isotropic y). Exact in expectation for the random data set; for GloVe
    the queries are correlated with the base vectors, so it is only a
    reference point there.
  The bounds are the paper's: √3π/2·4^-b ≥ D_mse ≥ 4^-b and
    √3π²/d·4^-b ≥ D_prod ≥ 1/d·4^-b (unit query).
  """
  exact = tq.codebook_mse(dim, bits)
  if method == "mse":
    expected = exact
  else:
    prev = 1.0 if bits == 1 else tq.codebook_mse(dim, bits - 1)
    expected = (math.pi / 2 - 1 / dim) * prev
  return dict(
      exact_d_mse=exact,
      expected_d_mse=expected,
      iso_d_prod=expected / dim,
      upper_bound_mse=math.sqrt(3) * math.pi / 2 * 4.0**-bits,
      lower_bound_mse=4.0**-bits,
      upper_bound_prod=math.sqrt(3) * math.pi**2 / dim * 4.0**-bits,
      lower_bound_prod=4.0**-bits / dim)


# ------------------------------------------------------------- measuring


@functools.partial(jax.jit, static_argnames=("nbins",))
def _block_stats(x, x_hat, est, y, inner_edges, *, nbins):
  """Sums over one block of base vectors x and all queries y.

  Returns:
    (sums, bins, true, err): per base vector, ‖x - x̃‖² and the sums over
    the queries of err, err², est·true and true²; f32[4, nbins] count,
    Σ err, Σ err², Σ true per bin of the true inner product; and the
    [Q, block] pair arrays.
  """
  true = jnp.einsum("qd,nd->qn", y, x, precision=_HIGHEST)
  err = est - true
  # Per base vector (sums over the queries); totalled in float64 by the
  # caller.
  sums = dict(x_err=jnp.sum(jnp.square(x - x_hat), axis=-1),
              err=jnp.sum(err, axis=0), err_sq=jnp.sum(jnp.square(err), axis=0),
              est_true=jnp.sum(est * true, axis=0),
              true_sq=jnp.sum(jnp.square(true), axis=0))
  idx = jnp.searchsorted(inner_edges, true.ravel(), side="right")
  vals = jnp.stack([jnp.ones_like(true), err, jnp.square(err), true])
  bins = jax.ops.segment_sum(vals.reshape(4, -1).T, idx,
                             num_segments=nbins).T
  return sums, bins, true, err


class _Dataset:
  """A loaded data set, its quantizer draws, and what its rows share.

  The base set is split into `quantizer_draws` equal blocks; block k is
  quantized with draw k's rotation Π_k (and QJL sketch S_k), so the
  standard errors over blocks include the randomness of the quantizer, over
  which the paper's guarantees (and prod's unbiasedness) hold. One draw per
  row would hide it: data with a common direction (GloVe) gives errors that
  are correlated across all pairs through the one Π and S. The draws are
  shared by every (method, bits) row of the data set (common random
  numbers), so rows differ by the method, not by the draw.
  """

  def __init__(self, name: str, config):
    self.name = name
    base, queries = load_dataset(name, config)
    n, self.dim = base.shape
    self.draws = config.quantizer_draws
    if n % self.draws:
      raise ValueError(f"{config.n_base=} must be a multiple of "
                       f"{config.quantizer_draws=}")
    self.block = n // self.draws
    self.base = jnp.asarray(base)
    self.queries = jnp.asarray(queries)
    self.rotations, self.sketches = [], []
    for k in range(self.draws):
      key = _key(config.seed, name, "draw", k)
      self.rotations.append(tq.make_rotation(
          jax.random.fold_in(key, 0), self.dim, config.rotation))
      # prod's S: i.i.d. N(0, 1), M = D (as turboquant.make_quantizer).
      self.sketches.append(jax.random.normal(
          jax.random.fold_in(key, 1), (self.dim, self.dim), jnp.float32))
    # Equal-count bins of the true inner product, from the first block.
    first = np.asarray(jnp.einsum(
        "qd,nd->qn", self.queries, self.base[:self.block],
        precision=_HIGHEST))
    edges = np.quantile(first, np.linspace(0, 1, config.bias_bins + 1))
    self.inner_edges = edges[1:-1]
    # Fig. 1 pairs: the same uniform random (query, base) pairs in each
    # block for every row, about hist_samples in all.
    rng = np.random.default_rng(config.seed)
    per_block = min(math.ceil(config.hist_samples / self.draws),
                    self.block * queries.shape[0])
    self.hist_idx = [np.sort(rng.choice(self.block * queries.shape[0],
                                        per_block, replace=False))
                     for _ in range(self.draws)]
    # Mean ⟨y, x⟩ over all pairs (bilinear, so from the two means).
    self.mean_true_ip = float(self.queries.mean(0) @ self.base.mean(0))

  def quantizer(self, template: tq.Quantizer, k: int) -> tq.Quantizer:
    """`template` (codebook, bits, method) with draw k's Π and S."""
    return dataclasses.replace(
        template, rotation=self.rotations[k],
        sketch=None if template.sketch is None else self.sketches[k])


def _se(per_draw: np.ndarray) -> float:
  """Standard error of the mean of independent per-draw values."""
  if per_draw.size < 2:
    return float("nan")
  return float(per_draw.std(ddof=1) / math.sqrt(per_draw.size))


def measure(ds: _Dataset, method: str, bits: int, config
            ) -> tuple[dict, dict[str, np.ndarray]]:
  """Quantizes ds.base (block k with draw k) and measures the errors.

  Returns:
    (row, arrays): the results row, and the arrays the figures need.
  """
  start = time.perf_counter()
  n, d = ds.base.shape
  n_q = ds.queries.shape[0]
  template = tq.make_quantizer(_key(config.seed, ds.name, method, bits), d,
                               bits, method, rotation=config.rotation,
                               norm_correction=config.norm_correction)
  want_hist = bits in config.hist_bits
  want_bias = bits == config.bias_bits
  nbins = config.bias_bins
  sums = {}                                   # name -> [draws] totals
  hist = []
  bins = np.zeros((ds.draws, 4, nbins))       # count, Σ err, Σ err², Σ true
  bpc = None
  for k in range(ds.draws):
    q = ds.quantizer(template, k)
    x = ds.base[k * ds.block:(k + 1) * ds.block]
    qt = tq.quantize(q, x)
    bpc = qt.bits_per_coordinate
    est = tq.inner_product(q, qt, ds.queries)           # [Q, block]
    block_sums, block_bins, _, err = _block_stats(
        x, tq.dequantize(q, qt), est, ds.queries,
        jnp.asarray(ds.inner_edges, jnp.float32), nbins=nbins)
    for name, v in block_sums.items():
      sums.setdefault(name, []).append(np.sum(np.asarray(v, np.float64)))
    if want_hist:
      hist.append(np.asarray(err).ravel()[ds.hist_idx[k]])
    if want_bias:
      bins[k] = np.asarray(block_bins, np.float64)
  sums = {name: np.array(v) for name, v in sums.items()}
  block_pairs = ds.block * n_q
  d_prod = sums["err_sq"].sum() / (n * n_q)
  row = dict(
      op="distortion", dataset=ds.name, dim=d, method=method, bits=bits,
      bits_per_coordinate=bpc, n_base=n, n_queries=n_q,
      quantizer_draws=ds.draws,
      d_mse=sums["x_err"].sum() / n,
      d_mse_se=_se(sums["x_err"] / ds.block),
      d_prod=d_prod, d_prod_se=_se(sums["err_sq"] / block_pairs),
      d_prod_times_dim=d_prod * d,
      bias=sums["err"].sum() / (n * n_q),
      bias_se=_se(sums["err"] / block_pairs),
      ip_slope=sums["est_true"].sum() / sums["true_sq"].sum(),
      mean_true_ip=ds.mean_true_ip,
      **_theory(d, method, bits),
      rotation=config.rotation, norm_correction=config.norm_correction)
  arrays = {}
  if want_hist:
    # float16 (3 significant digits) is plenty for a histogram, and halves
    # the files kept in the workdir.
    arrays["hist_err"] = np.concatenate(hist).astype(np.float16)
  if want_bias:
    arrays["bins"] = bins
  row["seconds"] = time.perf_counter() - start
  return row, arrays


def timing_inputs(config) -> np.ndarray:
  """f32[n, max(dims)] i.i.d. N(0, 1): one matrix for every timing shape.

  The first d columns of an i.i.d. Gaussian matrix are i.i.d. Gaussian, so
  each dimension slices it (numpy's generator is several times faster than
  jax.random.normal on CPU, which matters at 100k x 3072).
  """
  tc = config.timing
  rng = np.random.default_rng([config.seed, 1])
  return rng.standard_normal((tc.n, max(tc.dims)), dtype=np.float32)


def time_quantize(dim: int, config, env: dict,
                  inputs: np.ndarray | None = None) -> dict:
  """Wall time to quantize timing.n random vectors (jit, compiled first).

  Args:
    dim: the vector dimension.
    config: the experiment config (its `timing` block).
    env: `results.environment()`, for the device fields.
    inputs: `timing_inputs(config)`, to share between dimensions.
  """
  tc = config.timing
  key = _key(config.seed, "timing", dim)
  q = tq.make_quantizer(key, dim, tc.bits, tc.method,
                        rotation=config.rotation,
                        norm_correction=config.norm_correction)
  if inputs is None:
    inputs = timing_inputs(config)
  chunk = tc.chunk or tc.n
  xs = [jnp.asarray(inputs[lo:lo + chunk, :dim])
        for lo in range(0, tc.n, chunk)]
  jax.block_until_ready(xs)
  sizes = [x.shape[0] for x in xs]
  fn = jax.jit(tq.quantize)
  t0 = time.perf_counter()
  compiled = {s: fn.lower(q, x).compile() for s, x in zip(sizes, xs)}
  compile_seconds = time.perf_counter() - t0
  times = []
  cpu0 = time.process_time()
  for _ in range(tc.repeats):
    t0 = time.perf_counter()
    out = [compiled[x.shape[0]](q, x) for x in xs]
    jax.block_until_ready(out)
    times.append(time.perf_counter() - t0)
    del out
  cores = env.get("cpus_available") or os.cpu_count()
  # The share of the machine's cores this process got while timed: near 1
  # when it ran alone (XLA uses every core), lower when others competed.
  cpu_share = (time.process_time() - cpu0) / (sum(times) * cores)
  seconds = statistics.median(times)
  return dict(
      op="quantize_time", dim=dim, n=tc.n, bits=tc.bits, method=tc.method,
      rotation=config.rotation, chunk=chunk, repeats=tc.repeats,
      seconds=seconds, seconds_min=min(times), seconds_all=times,
      vectors_per_second=tc.n / seconds, compile_seconds=compile_seconds,
      device=env.get("device"), processor=env.get("processor"),
      backend=env.get("backend"), cpu_count=env.get("cpus_available"),
      jax=env.get("jax"), cpu_share=cpu_share)


# --------------------------------------------------------------- outputs


def _arrays_path(workdir: pathlib.Path, dataset: str, method: str,
                 bits: int) -> pathlib.Path:
  return workdir / "arrays" / f"{dataset}_{method}_b{bits}.npz"


def _save_arrays(path: pathlib.Path, arrays: dict[str, np.ndarray]) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  with open(tmp, "wb") as f:
    np.savez(f, **arrays)
  os.replace(tmp, path)


def _load_arrays(path: pathlib.Path) -> dict[str, np.ndarray] | None:
  if not path.is_file():
    return None
  with np.load(path) as data:
    return {k: data[k] for k in data.files}


def _scaled(values: np.ndarray, label: str) -> tuple[float, str]:
  """A power-of-ten factor that brings values near 1, and the axis label."""
  top = float(np.max(np.abs(values))) if np.size(values) else 0.0
  power = math.floor(math.log10(top)) if top > 0 else 0
  if -1 <= power <= 1:
    return 1.0, label
  return 10.0**-power, f"{label} ($\\times 10^{{{power}}}$)"


def _dataset_title(name: str, dim: int, n: int, n_q: int) -> str:
  what = {"random": "random unit vectors",
          "glove": "GloVe 6B (normalized)"}.get(name, name)
  return f"{what}, d={dim}, {n:,} base x {n_q:,} queries"


def plot_histograms(workdir, rows, dataset, config) -> pathlib.Path | None:
  """Fig. 1: inner-product error histograms, methods x hist_bits."""
  methods = [m for m in ("prod", "mse") if m in config.methods]
  bits = [b for b in config.hist_bits if b in config.bits]
  data = {(m, b): _load_arrays(_arrays_path(workdir, dataset, m, b))
          for m in methods for b in bits}
  if not bits or any(v is None or "hist_err" not in v for v in data.values()):
    return None
  row = rows[(dataset, methods[0], bits[0])]
  fig, axes = plt.subplots(len(methods), len(bits), squeeze=False,
                           figsize=(3.4 * len(bits), 3.0 * len(methods)),
                           sharex="col", layout="constrained")
  for j, b in enumerate(bits):
    lim = max(float(np.quantile(np.abs(data[m, b]["hist_err"].astype(
        np.float64)), 0.999)) for m in methods)
    for i, m in enumerate(methods):
      err = data[m, b]["hist_err"].astype(np.float64)
      ax = axes[i, j]
      ax.hist(err, bins=np.linspace(-lim, lim, 81), density=True,
              color=_METHOD_COLOR[m], alpha=0.8)
      ax.axvline(0, color="k", lw=0.8)
      ax.axvline(err.mean(), color="k", lw=1, ls="--")
      ax.set_title(f"{_METHOD_LABEL[m]}, b={b}", fontsize=10)
      ax.text(0.03, 0.95, f"mean {err.mean():+.2e}\nsd {err.std():.2e}",
              transform=ax.transAxes, va="top", fontsize=8)
      ax.set_yticks([])
      if i == len(methods) - 1:
        ax.set_xlabel("est − ⟨y, x⟩")
      ax.ticklabel_format(axis="x", style="sci", scilimits=(-2, 2))
    axes[0, j].set_xlim(-lim, lim)
  axes[0, 0].set_ylabel("density")
  axes[-1, 0].set_ylabel("density")
  n_pairs = data[methods[0], bits[0]]["hist_err"].size
  fig.suptitle("Fig. 1: inner-product error, " + _dataset_title(
      dataset, row["dim"], row["n_base"], row["n_queries"])
               + f"\n({n_pairs:,} random pairs per panel; dashed: mean)",
               fontsize=11)
  path = pathlib.Path(workdir) / f"fig1_error_hist_{dataset}.png"
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def plot_bias(workdir, rows, dataset, config) -> pathlib.Path | None:
  """Fig. 2: mean error and its spread against the true inner product."""
  b = config.bias_bits
  methods = [m for m in config.methods if (dataset, m, b) in rows]
  data = {m: _load_arrays(_arrays_path(workdir, dataset, m, b))
          for m in methods}
  if not methods or any(v is None or "bins" not in v for v in data.values()):
    return None
  row = rows[(dataset, methods[0], b)]
  curves = {}
  for m in methods:
    bins = data[m]["bins"]                  # [draws, 4, nbins]
    count, err, err_sq, true = bins.sum(0)
    ok = count > 1
    mean = err[ok] / count[ok]
    # s.e. over the independent quantizer draws (one bin mean per draw).
    per_draw = bins[:, 1, ok] / np.maximum(bins[:, 0, ok], 1)
    curves[m] = dict(
        x=true[ok] / count[ok], mean=mean,
        se=per_draw.std(axis=0, ddof=1) / math.sqrt(bins.shape[0]),
        sd=np.sqrt(np.maximum(err_sq[ok] / count[ok] - mean**2, 0)))
  cat = lambda k: np.concatenate([c[k] for c in curves.values()])
  xs, x_label = _scaled(cat("x"), "⟨y, x⟩ (bin average)")
  ms, mean_label = _scaled(cat("mean"), "mean error (bias)")
  ss, sd_label = _scaled(cat("sd"), "error standard deviation")
  fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 4.2),
                                 layout="constrained")
  for m, c in curves.items():
    slope = rows[dataset, m, b]["ip_slope"]
    ax0.errorbar(c["x"] * xs, c["mean"] * ms, yerr=2 * c["se"] * ms,
                 marker="o", ms=3, capsize=2, color=_METHOD_COLOR[m],
                 label=f"{_METHOD_LABEL[m]} (slope {slope:.3f})")
    ax1.plot(c["x"] * xs, c["sd"] * ss, marker="o", ms=3,
             color=_METHOD_COLOR[m], label=_METHOD_LABEL[m])
  ax0.axhline(0, color="k", lw=0.8)
  ax0.set_xlabel(x_label)
  ax0.set_ylabel(mean_label)
  ax0.set_title(f"mean error at b={b} (bars: ±2 s.e. over "
                f"{data[methods[0]]['bins'].shape[0]} quantizer draws)",
                fontsize=10)
  ax0.legend(fontsize=8)
  ax1.set_xlabel(x_label)
  ax1.set_ylabel(sd_label)
  ax1.set_ylim(bottom=0)
  ax1.set_title(f"standard deviation of the error at b={b}", fontsize=10)
  ax1.legend(fontsize=8)
  fig.suptitle("Fig. 2: inner-product error against ⟨y, x⟩ "
               f"({config.bias_bins} equal-count bins)\n" + _dataset_title(
                   dataset, row["dim"], row["n_base"], row["n_queries"]),
               fontsize=10)
  path = pathlib.Path(workdir) / f"fig2_bias_{dataset}.png"
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def plot_distortion(workdir, rows, dataset, config) -> pathlib.Path | None:
  """Fig. 3: D_mse and D_prod against b, log scale, with the bounds."""
  bits = [b for b in config.bits
          if all((dataset, m, b) in rows for m in config.methods)]
  if not bits:
    return None
  first = rows[(dataset, config.methods[0], bits[0])]
  d = first["dim"]
  fine = np.linspace(min(bits), max(bits), 50)
  fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4.6),
                                 layout="constrained")
  for ax, field, upper, lower, ulabel, llabel in (
      (ax0, "d_mse", math.sqrt(3) * math.pi / 2, 1.0,
       "paper's upper bound √3π/2·4^-b (mse)",
       "lower bound 4^-b (any quantizer)"),
      (ax1, "d_prod", math.sqrt(3) * math.pi**2 / d, 1.0 / d,
       "paper's upper bound √3π²/d·4^-b (prod)",
       "lower bound 4^-b/d (any quantizer)")):
    ax.plot(fine, upper * 4.0**-fine, "k--", lw=1, label=ulabel)
    ax.plot(fine, lower * 4.0**-fine, "k:", lw=1, label=llabel)
    for m in config.methods:
      ax.plot(bits, [rows[dataset, m, b][field] for b in bits], marker="o",
              color=_METHOD_COLOR[m], label=f"{_METHOD_LABEL[m]} (measured)")
    ax.set_yscale("log")
    ax.set_xticks(bits)
    ax.set_xlabel("bits per coordinate b")
    ax.grid(True, which="both", alpha=0.3)
  mse_bits = [b for b in bits if "mse" in config.methods]
  ax0.plot(mse_bits, [rows[dataset, "mse", b]["exact_d_mse"]
                      for b in mse_bits], "x", color="tab:green", ms=9,
           label=f"exact Lloyd–Max D_mse(d={d}, b)")
  paper = [b for b in bits if b in PAPER_D_MSE]
  ax0.plot(paper, [PAPER_D_MSE[b] for b in paper], "+", color="tab:red",
           ms=10, label="paper's D_mse (d=1536)")
  ax1.plot(paper, [PAPER_D_PROD_TIMES_DIM[b] / d for b in paper], "+",
           color="tab:red", ms=10, label=f"paper's d·D_prod, divided by {d}")
  ax0.set_ylabel("D_mse = E‖x − x̃‖²")
  ax1.set_ylabel("D_prod = E(⟨y,x⟩ − est)²")
  ax0.set_title("reconstruction error", fontsize=10)
  ax1.set_title("inner-product error (unit queries)", fontsize=10)
  ax0.legend(fontsize=7)
  ax1.legend(fontsize=7)
  fig.suptitle("Fig. 3: distortion against bit width, " + _dataset_title(
      dataset, d, first["n_base"], first["n_queries"]), fontsize=10)
  path = pathlib.Path(workdir) / f"fig3_distortion_{dataset}.png"
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def _fmt(v, spec=".4g") -> str:
  return "—" if v is None else format(v, spec)


def write_table(workdir, all_rows, config, env) -> pathlib.Path:
  """table.md: ours beside the paper's values, bounds, and the timings."""
  rows = _distortion_rows(all_rows)
  out = [
      "# Distortion: ours against the paper",
      "",
      f"Config scale `{config.scale}`; {env.get('processor')}, "
      f"{env.get('cpus_available')} CPU cores, jax {env.get('jax')} "
      f"({env.get('backend')}). Generated {env.get('date')} from "
      "results.jsonl.",
      "",
      "Paper values: PAPER.md §2 (the paper's d = 1536 OpenAI3 embeddings; "
      "its D_mse values are its rounded Lloyd–Max figures, its d·D_prod ≈ "
      "π/2·D_mse(b−1)). Ours use unit-norm vectors. `exact` is the "
      "Lloyd–Max D_mse at our d (`tq.codebook_mse`). `expected` for prod "
      "is (π/2 − 1/d)·D_mse(b−1). `iso` is D_prod for queries independent of "
      "the data (exact in expectation for random data; a reference only "
      "for GloVe, whose queries correlate with the base set). Bias: mean "
      "of est − ⟨y,x⟩ ± s.e. over the independent quantizer draws (each "
      "draw quantizes its own block of the base set); slope: least "
      "squares of est on ⟨y,x⟩.",
  ]
  for ds in config.datasets:
    have = [b for b in config.bits if (ds, "mse", b) in rows
            or (ds, "prod", b) in rows]
    if not have:
      continue
    any_row = next(rows[k] for k in rows if k[0] == ds)
    d = any_row["dim"]
    out += ["", f"## {ds}: " + _dataset_title(
        ds, d, any_row["n_base"], any_row["n_queries"]), "",
            "### D_mse = E‖x − x̃‖²", "",
            "| b | mse (ours) | paper | exact Lloyd–Max | prod (ours) | "
            "prod expected | upper √3π/2·4^-b | lower 4^-b |",
            "|---|---|---|---|---|---|---|---|"]
    for b in have:
      m, p = rows.get((ds, "mse", b)), rows.get((ds, "prod", b))
      t = m or p
      out.append(
          f"| {b} | {_fmt(m and m['d_mse'])} | "
          f"{_fmt(PAPER_D_MSE.get(b))} | {_fmt(t['exact_d_mse'])} | "
          f"{_fmt(p and p['d_mse'])} | {_fmt(p and p['expected_d_mse'])} | "
          f"{_fmt(t['upper_bound_mse'])} | {_fmt(t['lower_bound_mse'])} |")
    out += ["", "### d·D_prod = d·E(⟨y,x⟩ − est)², unit queries", "",
            "| b | prod (ours) | paper | prod iso | mse (ours) | mse iso | "
            "upper √3π²·4^-b | lower 4^-b | bias prod | bias mse | "
            "slope prod | slope mse |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for b in have:
      m, p = rows.get((ds, "mse", b)), rows.get((ds, "prod", b))
      t = m or p

      def bias(r):
        if r is None:
          return "—"
        return f"{r['bias']:+.2e} ± {r['bias_se']:.1e}"

      out.append(
          f"| {b} | {_fmt(p and p['d_prod_times_dim'])} | "
          f"{_fmt(PAPER_D_PROD_TIMES_DIM.get(b))} | "
          f"{_fmt(p and p['iso_d_prod'] * d)} | "
          f"{_fmt(m and m['d_prod_times_dim'])} | "
          f"{_fmt(m and m['iso_d_prod'] * d)} | "
          f"{_fmt(t['upper_bound_prod'] * d)} | "
          f"{_fmt(t['lower_bound_prod'] * d)} | {bias(p)} | {bias(m)} | "
          f"{_fmt(p and p['ip_slope'], '.4f')} | "
          f"{_fmt(m and m['ip_slope'], '.4f')} |")
  timing = sorted((r for r in all_rows if r.get("op") == "quantize_time"),
                  key=lambda r: r["dim"])
  if timing:
    r0 = timing[0]
    out += [
        "", f"## Time to quantize {r0['n']:,} vectors at {r0['bits']} bits "
        f"(method {r0['method']}, {r0['rotation']} rotation)", "",
        "| d | ours (s) | ours, vectors/s | CPU share | paper "
        "TurboQuant, A100 (s, claimed) | authors' re-run, A100 (s) |",
        "|---|---|---|---|---|---|"]
    for r in timing:
      out.append(
          f"| {r['dim']} | {r['seconds']:.3f} | "
          f"{r['vectors_per_second']:,.0f} | "
          f"{_fmt(r.get('cpu_share'), '.2f')} | "
          f"{_fmt(PAPER_TIME_A100.get(r['dim']))} | "
          f"{_fmt(AUTHORS_RERUN_A100.get(r['dim']))} |")
    chunked = any(r["chunk"] < r["n"] for r in timing)
    out += ["", f"Ours: {r0['cpu_count']} CPU cores ({r0['processor']}), "
            f"jax {r0['jax']} on {r0['backend']}, no GPU: not comparable to "
            "an A100. `jax.jit(tq.quantize)` compiled ahead of the clock "
            "(compile time excluded), inputs already in memory, "
            "`block_until_ready`, median of "
            f"{r0['repeats']} runs over all {r0['n']:,} vectors"
            + (", quantized in chunks" if chunked else " in one call")
            + ". The dense Haar rotation (a d×d matmul per vector) "
            "dominates the cost. Paper's Table 2 also lists PQ "
            "37.04 / 239.75 / 494.42 s and RaBitQ 597.25 / 2267.59 / "
            "3957.19 s (RaBitQ on one CPU core)."]
  path = pathlib.Path(workdir) / "table.md"
  path.write_text("\n".join(out) + "\n", encoding="utf-8")
  return path


def _distortion_rows(all_rows) -> dict[tuple, dict]:
  return {tuple(r[k] for k in DISTORTION_KEY): r for r in all_rows
          if r.get("op") == "distortion"}


def make_outputs(workdir, config, env) -> list[pathlib.Path]:
  """Draws every figure and writes table.md from results.jsonl + arrays."""
  workdir = pathlib.Path(workdir)
  all_rows = results.read_rows(workdir / results.RESULTS_FILE)
  rows = _distortion_rows(all_rows)
  paths = []
  for ds in config.datasets:
    for plot in (plot_histograms, plot_bias, plot_distortion):
      path = plot(workdir, rows, ds, config)
      if path is None:
        logging.warning("%s: not enough results for %s", ds, plot.__name__)
      else:
        paths.append(path)
  paths.append(write_table(workdir, all_rows, config, env))
  return paths


# ------------------------------------------------------------------ main


def run(config, workdir: str | os.PathLike) -> list[pathlib.Path]:
  """Runs (or resumes) the experiment into workdir; returns output paths."""
  workdir = pathlib.Path(workdir)
  writer = results.Writer(workdir, config)
  env = results.environment()
  logging.info("environment: %s", env)
  done = writer.done_keys(DISTORTION_KEY, where=dict(op="distortion"))
  items = [("distortion", ds, m, b) for ds in config.datasets
           for m in config.methods for b in config.bits
           if (ds, m, b) not in done]
  if any(item[1] == "glove" for item in items):
    glove.load_glove()       # fail now, with the setup command, if missing
  tc = config.timing
  done = writer.done_keys(TIMING_KEY, where=dict(op="quantize_time"))
  items += [("quantize_time", d) for d in tc.dims
            if (d, tc.n, tc.bits, tc.method) not in done]
  logging.info("%d work items to do", len(items))
  loaded = inputs = None
  for item in (bar := tqdm.tqdm(items, desc="distortion", unit="item")):
    bar.set_postfix_str("/".join(map(str, item[1:])))
    if item[0] == "distortion":
      _, ds, method, bits = item
      if loaded is None or loaded.name != ds:
        loaded = None        # free the previous data set first
        loaded = _Dataset(ds, config)
      row, arrays = measure(loaded, method, bits, config)
      if arrays:             # arrays before the row: a row implies them
        _save_arrays(_arrays_path(workdir, ds, method, bits), arrays)
    else:
      loaded = None
      if inputs is None:
        inputs = timing_inputs(config)
      row = time_quantize(item[1], config, env, inputs)
    writer.write(row)
  return make_outputs(workdir, config, env)


if __name__ == "__main__":
  common.define_flags("distortion.py")
  app.run(common.main_for(run))
