"""faiss baselines: product quantization and RaBitQ, with honest bit counts.

- PQ (`build_pq`): faiss IndexPQ with 2^8 = 256-codeword tables, as in the
  paper. A budget of b bits per coordinate takes M = ceil(b·D/8)
  subquantizers of ceil(D/M) coordinates (D is zero-padded to a multiple of
  M, which changes no inner product); it stores M bytes per vector, i.e.
  8M/D bits per coordinate (>= b: the budget is never undercut).
- RaBitQ (`build_rabitq`): faiss IndexRaBitQ with nb_bits per coordinate
  (1 sign bit + nb_bits-1 extended bits), behind the random rotation RaBitQ
  assumes (faiss leaves it to an IndexPreTransform: factory "RR,RaBitQ<b>").
  Each vector also stores float factors (8 bytes, plus 12 more when
  nb_bits > 1), which cost 2.6-3.2 bits per coordinate at D = 50 and far
  less at large D; `bits_per_coordinate` counts them (code_size·8/D).
  Queries are not quantized (qb = 0: exact float queries, the most
  accurate setting).

faiss is imported lazily, so the rest of the package works without it.
"""

import dataclasses
import math
import os
import time
from typing import Any

import numpy as np

from turboquant_jax.search import metrics


def _faiss():
  # faiss's OpenMP threads spin-wait at barriers by default. When other
  # processes share the cores that made PQ training 8x slower (64 s instead
  # of 8 s at d=256, M=128, 2 threads); passive waiting costs little on an
  # idle machine. libgomp reads this once, when faiss first loads.
  os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
  try:
    import faiss   # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("the faiss baselines need faiss-cpu "
                      "(pip install faiss-cpu==1.15.1)") from e
  return faiss


def set_threads(n: int) -> None:
  """faiss's OpenMP thread count."""
  _faiss().omp_set_num_threads(int(n))


@dataclasses.dataclass
class FaissIndex:
  """A trained and filled faiss index.

  Attributes:
    index: the faiss index.
    name: "pq" or "rabitq".
    dim: D of the input vectors.
    padded_dim: D after zero padding (PQ), else D.
    bits_per_coordinate: bytes stored per vector · 8 / D.
    setting: the method's parameters (M and code bits, or nb_bits).
    train_seconds, add_seconds: wall time of train() and add().
    fixed_bytes: stored once per index (PQ codebooks, RaBitQ rotation and
      centre).
    metric: "ip"/"angular" or "l2".
  """
  index: Any
  name: str
  dim: int
  padded_dim: int
  bits_per_coordinate: float
  setting: dict[str, Any]
  train_seconds: float
  add_seconds: float
  fixed_bytes: int
  metric: str

  @property
  def index_seconds(self) -> float:
    return self.train_seconds + self.add_seconds


def pq_shape(dim: int, bits: float, code_bits: int = 8) -> tuple[int, int]:
  """(M, padded D) of a PQ spending at least `bits` per coordinate.

  M = ceil(bits·D / code_bits) (at most D) subquantizers over ceil(D / M)
  coordinates each.
  """
  if dim < 1 or bits <= 0 or not 1 <= code_bits <= 16:
    raise ValueError(f"{dim=}, {bits=}, {code_bits=}: need dim >= 1, "
                     "bits > 0 and code_bits in 1..16")
  m = min(dim, max(1, math.ceil(bits * dim / code_bits - 1e-9)))
  return m, m * math.ceil(dim / m)


def _faiss_metric(metric: str):
  metrics.check_metric(metric)
  faiss = _faiss()
  return faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT


def _pad(x: np.ndarray, padded_dim: int) -> np.ndarray:
  x = np.ascontiguousarray(x, np.float32)
  if x.shape[1] == padded_dim:
    return x
  return np.ascontiguousarray(np.pad(x, ((0, 0), (0, padded_dim - x.shape[1]))))


def _train_add(index, x: np.ndarray) -> tuple[float, float]:
  t0 = time.perf_counter()
  index.train(x)
  t1 = time.perf_counter()
  index.add(x)
  return t1 - t0, time.perf_counter() - t1


def build_pq(base, bits: float, metric: str = "ip",
             code_bits: int = 8) -> FaissIndex:
  """faiss IndexPQ at >= `bits` per coordinate (see the module doc)."""
  base = metrics.check_vectors("base", base)
  dim = base.shape[1]
  m, padded = pq_shape(dim, bits, code_bits)
  if base.shape[0] < 2**code_bits:
    raise ValueError(f"PQ with {code_bits}-bit codes needs at least "
                     f"{2**code_bits} base vectors to train, got "
                     f"{base.shape[0]}")
  index = _faiss().IndexPQ(padded, m, code_bits, _faiss_metric(metric))
  # Only silences faiss's "please provide at least 39 x 256 training
  # points" warning (printed once per subquantizer on small sets).
  index.pq.cp.min_points_per_centroid = 1
  train_s, add_s = _train_add(index, _pad(base, padded))
  return FaissIndex(
      index=index, name="pq", dim=dim, padded_dim=padded,
      bits_per_coordinate=index.code_size * 8 / dim,
      setting=dict(M=m, code_bits=code_bits, dsub=padded // m),
      train_seconds=train_s, add_seconds=add_s,
      fixed_bytes=4 * padded * 2**code_bits, metric=metric)


def build_rabitq(base, nb_bits: int, metric: str = "ip",
                 rotate: bool = True) -> FaissIndex:
  """faiss RaBitQ with nb_bits per coordinate, queries in float (qb = 0)."""
  base = metrics.check_vectors("base", base)
  if not isinstance(nb_bits, (int, np.integer)) or not 1 <= nb_bits <= 9:
    raise ValueError(f"{nb_bits=} must be an integer in [1, 9]")
  dim = base.shape[1]
  faiss = _faiss()
  spec = f"{'RR,' if rotate else ''}RaBitQ{nb_bits if nb_bits > 1 else ''}"
  index = faiss.index_factory(dim, spec, _faiss_metric(metric))
  inner = faiss.downcast_index(
      index.index if rotate else index)   # the IndexRaBitQ
  inner.qb = 0
  train_s, add_s = _train_add(index, base)
  fixed = 4 * dim + (4 * dim * dim if rotate else 0)
  return FaissIndex(
      index=index, name="rabitq", dim=dim, padded_dim=dim,
      bits_per_coordinate=inner.code_size * 8 / dim,
      setting=dict(nb_bits=int(nb_bits), qb=0, rotate=rotate,
                   code_bytes=int(inner.code_size)),
      train_seconds=train_s, add_seconds=add_s, fixed_bytes=fixed,
      metric=metric)


def search(fi: FaissIndex, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
  """(scores f32[Q, k], ids i32[Q, k]), best first (scores: higher nearer)."""
  queries = metrics.check_vectors("queries", queries, fi.dim)
  if not isinstance(k, (int, np.integer)) or not 1 <= k <= fi.index.ntotal:
    raise ValueError(f"{k=} must be an integer in [1, {fi.index.ntotal}]")
  dist, ids = fi.index.search(_pad(queries, fi.padded_dim), int(k))
  scores = -dist if fi.metric == "l2" else dist
  return scores.astype(np.float32), ids.astype(np.int32)
