"""Lloyd–Max codebooks for one coordinate of a random unit vector.

After a Haar rotation, each coordinate t of a unit vector in R^d has density
  f(t) = Γ(d/2) / (√π Γ((d-1)/2)) · (1 - t²)^((d-3)/2)   on [-1, 1],
i.e. (t+1)/2 ~ Beta((d-1)/2, (d-1)/2). The optimal scalar quantizer for f
(continuous 1-D k-means) is found by Lloyd iterations polished with Newton's
method on the centroid condition c_i = E[t | cell i], using closed forms for
the cell masses (regularized incomplete beta) and first moments
(∫ t f(t) dt = -C/(d-1) · (1-t²)^((d-1)/2)). Results are exact to ~1e-12
(relative to the 1/√d scale), deterministic, and cached.

Everything here is numpy/scipy: codebooks are static data for the JAX code.
"""

import functools
import importlib.resources
import math
from typing import Callable, NamedTuple

import numpy as np
from scipy import special

MIN_BITS, MAX_BITS = 1, 8
MIN_DIM = 3
_TOL = 1e-10   # convergence, in units of the coordinate scale 1/√d
_TABLE_FILE = "codebook_table.npz"
# (dim, bits) pairs shipped in _TABLE_FILE; anything else is solved on demand.
TABLE_DIMS = (3, 50, 64, 96, 128, 200, 256, 512, 576, 768, 1024, 1536, 2048,
              3072, 4096)


class _Law(NamedTuple):
  """A symmetric 1-D density with the integrals Lloyd–Max needs."""
  lo: float                                  # support
  hi: float
  second_moment: float                       # E[t²]
  pdf: Callable[[np.ndarray], np.ndarray]
  cdf: Callable[[np.ndarray], np.ndarray]    # P(T <= t)
  sf: Callable[[np.ndarray], np.ndarray]     # P(T > t), accurate in the tail
  first_moment: Callable[[np.ndarray], np.ndarray]   # ∫_{lo}^{t} u f(u) du
  quantile: Callable[[np.ndarray], np.ndarray]


def _validate(dim: int | None, bits: int) -> None:
  if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
    raise ValueError(f"{bits=} must be an integer in [{MIN_BITS}, {MAX_BITS}]")
  if not MIN_BITS <= bits <= MAX_BITS:
    raise ValueError(f"{bits=} must be in [{MIN_BITS}, {MAX_BITS}]")
  if dim is not None:
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)):
      raise ValueError(f"{dim=} must be an integer >= {MIN_DIM}")
    if dim < MIN_DIM:
      raise ValueError(f"{dim=} must be >= {MIN_DIM} (the coordinate density "
                       "is unbounded at d=2 and degenerate at d=1)")


def sphere_law(dim: int) -> _Law:
  """The law of one coordinate of a uniform random unit vector in R^dim."""
  a = (dim - 1) / 2.0
  log_c = (special.gammaln(dim / 2.0) - 0.5 * math.log(math.pi)
           - special.gammaln(a))

  def pdf(t):
    t = np.asarray(t, np.float64)
    inside = np.abs(t) < 1
    safe = np.where(inside, t, 0.0)
    val = np.exp(log_c + (dim - 3) / 2.0 * np.log1p(-safe * safe))
    if dim == 3:   # uniform: the density is 1/2 on the closed interval
      return np.where(np.abs(t) <= 1, val, 0.0)
    return np.where(inside, val, 0.0)

  def first_moment(t):
    t = np.clip(np.asarray(t, np.float64), -1.0, 1.0)
    with np.errstate(divide="ignore"):   # log(0) = -inf at t = ±1 is exact
      return -np.exp(log_c - math.log(dim - 1)
                     + (dim - 1) / 2.0 * np.log1p(-t * t))

  return _Law(
      lo=-1.0, hi=1.0, second_moment=1.0 / dim, pdf=pdf,
      cdf=lambda t: special.betainc(a, a, (np.clip(t, -1, 1) + 1) / 2),
      sf=lambda t: special.betainc(a, a, (1 - np.clip(t, -1, 1)) / 2),
      first_moment=first_moment,
      quantile=lambda p: 2 * special.betaincinv(a, a, p) - 1)


def gaussian_law() -> _Law:
  """The standard normal law: the d → ∞ limit of √d · (a sphere coordinate)."""
  return _Law(
      lo=-np.inf, hi=np.inf, second_moment=1.0,
      pdf=lambda t: np.exp(-0.5 * np.square(t)) / math.sqrt(2 * math.pi),
      cdf=special.ndtr, sf=lambda t: special.ndtr(-np.asarray(t)),
      first_moment=lambda t: -np.exp(-0.5 * np.square(t))
      / math.sqrt(2 * math.pi),
      quantile=special.ndtri)


def _cells(law: _Law, c: np.ndarray):
  """Boundaries, masses and conditional means of the cells of centroids c."""
  mid = (c[:-1] + c[1:]) / 2
  lo = np.concatenate([[law.lo], mid])
  hi = np.concatenate([mid, [law.hi]])
  # Upper-half cells from the survival function: no cancellation in the tail.
  mass = np.where(lo >= 0, law.sf(lo) - law.sf(hi), law.cdf(hi) - law.cdf(lo))
  moment = law.first_moment(hi) - law.first_moment(lo)
  return lo, hi, mass, moment / mass


def _newton_direction(law: _Law, c: np.ndarray) -> np.ndarray:
  """Newton direction for G(c) = c - E[t | cell(c)] (tridiagonal Jacobian)."""
  lo, hi, mass, mean = _cells(law, c)
  n = c.size
  # d mean_i / d hi_i = f(hi)(hi - mean)/P; d mean_i / d lo_i = f(lo)(mean-lo)/P
  d_hi = np.where(np.isfinite(hi), law.pdf(hi) * (np.nan_to_num(hi) - mean),
                  0.0) / mass
  d_lo = np.where(np.isfinite(lo), law.pdf(lo) * (mean - np.nan_to_num(lo)),
                  0.0) / mass
  jac = np.eye(n)
  for i in range(n):   # boundary hi_i = (c_i + c_{i+1})/2, lo_i = (c_{i-1}+c_i)/2
    if i + 1 < n:
      jac[i, i] -= d_hi[i] / 2
      jac[i, i + 1] -= d_hi[i] / 2
    if i > 0:
      jac[i, i] -= d_lo[i] / 2
      jac[i, i - 1] -= d_lo[i] / 2
  return np.linalg.solve(jac, c - mean)


def _symmetrize(c: np.ndarray) -> np.ndarray:
  c = np.sort(c)
  return (c - c[::-1]) / 2


def lloyd_max(law: _Law, bits: int, scale: float = 1.0,
              tol: float = _TOL) -> np.ndarray:
  """Solves the 2**bits-level Lloyd–Max quantizer of `law` (float64, sorted).

  Args:
    law: the density.
    bits: 1..8.
    scale: the law's natural scale; convergence is judged in units of it.
    tol: stop when max |c - E[t|cell]| < tol * scale.
  """
  n = 2 ** bits
  c = law.quantile((np.arange(n) + 0.5) / n)
  c = _symmetrize(np.clip(c, -0.999999 * abs(law.lo), 0.999999 * abs(law.lo))
                  if np.isfinite(law.lo) else c)
  for _ in range(20):                       # a few plain Lloyd steps
    c = _symmetrize(_cells(law, c)[3])
  def residual_of(c):
    ok = np.all(np.diff(c) > 0) and (not np.isfinite(law.lo)
                                     or np.all(np.abs(c) < law.hi))
    return np.max(np.abs(c - _cells(law, c)[3])) if ok else np.inf

  for _ in range(200):                      # then damped Newton, quadratic
    residual = residual_of(c)
    if residual < tol * scale:
      return c
    step = _newton_direction(law, c)
    for alpha in 0.5 ** np.arange(12):
      new = _symmetrize(c - alpha * step)
      if residual_of(new) < residual:
        c = new
        break
    else:                                   # Newton failed: one Lloyd step
      c = _symmetrize(_cells(law, c)[3])
  residual = np.max(np.abs(c - _cells(law, c)[3]))
  if residual >= tol * scale:
    raise RuntimeError(f"Lloyd–Max did not converge: {residual=}, {bits=}")
  return c


def codebook_mse(law: _Law, c: np.ndarray) -> float:
  """E[(t - Q(t))²] for nearest-centroid quantization of `law` with c."""
  _, _, mass, mean = _cells(law, np.asarray(c, np.float64))
  # ∫ (t - c_i)² f over cell i = E[t² ; i] - 2 c_i M_i + c_i² P_i.
  return float(law.second_moment
               - np.sum(2 * c * mean * mass - c * c * mass))


@functools.cache
def _shipped_table() -> dict[tuple[int, int], np.ndarray]:
  try:
    ref = importlib.resources.files(__package__).joinpath(_TABLE_FILE)
    with ref.open("rb") as f, np.load(f) as data:
      return {(int(k.split("_")[0][1:]), int(k.split("_")[1][1:])): data[k]
              for k in data.files}
  except FileNotFoundError:
    return {}


def solve_codebook(dim: int, bits: int) -> np.ndarray:
  """Solves the exact-density codebook from scratch (float64, no caching)."""
  _validate(dim, bits)
  return lloyd_max(sphere_law(int(dim)), int(bits), scale=1 / math.sqrt(dim))


@functools.cache
def _codebook64(dim: int, bits: int) -> np.ndarray:
  table = _shipped_table()
  c = table.get((dim, bits))
  if c is None:
    c = solve_codebook(dim, bits)
  c = np.array(c, np.float64)
  c.setflags(write=False)
  return c


def codebook(dim: int, bits: int) -> np.ndarray:
  """Sorted 2**bits Lloyd–Max centroids for a coordinate of a unit vector.

  Args:
    dim: the vector dimension d >= 3 (the density depends on it).
    bits: bits per coordinate, 1..8.

  Returns:
    float64[2**bits], symmetric about 0, values ~ 1/√dim. Read-only: the same
    cached array is returned on every call.
  """
  _validate(dim, bits)
  return _codebook64(int(dim), int(bits))


# Grid codebooks: centroids step·k with integer |k| <= GRID_MAX_STEP (127
# levels) and step = m·2^e, 64 <= m <= GRID_MAX_SIGNIFICAND (a 7-bit
# significand), so that step, 1088·step
# (17m fits f16's 11 bits) and every step·k are exact in f16 and f32: the GPU
# kernel looks a 3- or 4-bit grid code up as the byte 64 + k and one f16
# multiply-add (kernels/decode_attention/prmt_lookup.py).
GRID_MAX_STEP = 63
GRID_MAX_SIGNIFICAND = 120


@functools.cache
def _grid_codebook64(dim: int, bits: int) -> np.ndarray:
  c = codebook(dim, bits)
  law = sphere_law(dim)
  top = float(c[-1])
  best, best_mse = None, np.inf
  # Steps from 0.7x to 1.6x the one that puts the largest centroid on the
  # last level (the largest may be clipped there); the distortion picks.
  for e in range(int(math.floor(math.log2(top / GRID_MAX_STEP))) - 8,
                 int(math.floor(math.log2(top / GRID_MAX_STEP))) + 2):
    for m in range(64, GRID_MAX_SIGNIFICAND + 1):   # 7-bit significands
      step = m * 2.0 ** e
      if not 0.7 <= step * GRID_MAX_STEP / top <= 1.6:
        continue
      k = np.clip(np.round(c / step), -GRID_MAX_STEP, GRID_MAX_STEP)
      if np.any(np.diff(k) <= 0):
        continue
      err = codebook_mse(law, step * k)
      if err < best_mse:
        best, best_mse = step * k, err
  if best is None:
    raise ValueError(f"no grid of {2 * GRID_MAX_STEP + 1} levels holds the "
                     f"{2 ** bits} centroids at {dim=}")
  best.setflags(write=False)
  return best


def grid_codebook(dim: int, bits: int) -> np.ndarray:
  """codebook(dim, bits) rounded to a uniform grid of 127 levels.

  Centroids step·k, integer |k| <= 63, step = m·2^e (m <= 120), the step
  chosen for the least distortion; still symmetric and sorted. At 4 bits
  the GPU decode kernel looks these up in 8 instructions a 4 codes instead
  of 12, at 3 bits with one byte permute fewer (prmt_lookup). Costs a
  little distortion (grid_mse).
  bits: 1..6 (2**bits distinct levels must fit 127).
  """
  _validate(dim, bits)
  if bits > 6:
    raise ValueError(f"{bits=}: a grid of 127 levels holds codebooks of at "
                     "most 6 bits")
  return _grid_codebook64(int(dim), int(bits))


def codebook_table(dim: int, bits: int, grid: bool = False) -> np.ndarray:
  """grid_codebook(dim, bits) where `grid`, else codebook(dim, bits): the
  centroids a quantizer holds (Quantizer.grid_centroids)."""
  return (grid_codebook if grid else codebook)(dim, bits)


def grid_mse(dim: int, bits: int) -> float:
  """mse(dim, bits) of grid_codebook: nearest grid centroid, Haar rotation."""
  return dim * codebook_mse(sphere_law(dim), grid_codebook(dim, bits))


def boundaries(dim: int, bits: int) -> np.ndarray:
  """The 2**bits - 1 decision thresholds: midpoints of adjacent centroids."""
  c = codebook(dim, bits)
  return (c[:-1] + c[1:]) / 2


def mse(dim: int, bits: int) -> float:
  """D_mse(d, b): expected ‖x - x̃‖² for a unit x with Haar rotation.

  This is dim × the per-coordinate error of the exact codebook.
  """
  return dim * codebook_mse(sphere_law(dim), codebook(dim, bits))


@functools.cache
def gaussian_codebook(bits: int) -> np.ndarray:
  """Lloyd–Max centroids for N(0, 1): the d → ∞ limit, in units of 1/√d."""
  _validate(None, bits)
  c = lloyd_max(gaussian_law(), int(bits))
  c.setflags(write=False)
  return c


def gaussian_mse(bits: int) -> float:
  """D_mse in the d → ∞ limit (per unit vector = per N(0,1) coordinate)."""
  return codebook_mse(gaussian_law(), gaussian_codebook(bits))


# The values printed in the TurboQuant paper (arXiv 2504.19874, Sec. 3.1), in
# units of 1/√d: b=1 gives ±√(2/π), b=2 gives ±0.453, ±1.51. The paper prints
# no larger tables; these are kept to compare against our exact ones.
_PUBLISHED = {1: (-math.sqrt(2 / math.pi), math.sqrt(2 / math.pi)),
              2: (-1.51, -0.453, 0.453, 1.51)}


def published_codebook(dim: int, bits: int) -> np.ndarray:
  """The codebook values printed in the paper, scaled to dimension dim."""
  _validate(dim, bits)
  if bits not in _PUBLISHED:
    raise ValueError(f"{bits=}: the paper prints codebooks for bits "
                     f"{sorted(_PUBLISHED)} only")
  return np.asarray(_PUBLISHED[bits]) / math.sqrt(dim)


def write_table(path: str) -> None:
  """Solves every (dim, bits) in TABLE_DIMS x 1..8 and saves them as npz."""
  arrays = {f"d{d}_b{b}": solve_codebook(d, b)
            for d in TABLE_DIMS for b in range(MIN_BITS, MAX_BITS + 1)}
  np.savez(path, **arrays)


if __name__ == "__main__":
  import pathlib
  out = pathlib.Path(__file__).with_name(_TABLE_FILE)
  write_table(str(out))
  print(f"wrote {out}")
