"""Exact ground truth and recall for nearest-neighbour search.

Similarity is the inner product (the paper's measure, and the score the
quantizers estimate); "angular" data are unit-normalized first, so it is the
cosine. "l2" ranks by -‖q - x‖².

Recall@1@k (the paper's Fig. 5): the fraction of queries whose true nearest
neighbour (top-1 by exact similarity) is among the k best candidates a
method returns.
"""

import numpy as np


def check_vectors(name: str, x, dim: int | None = None) -> np.ndarray:
  """x as f32 [rows, dim] (contiguous), or a ValueError naming `name`: not
  a 2-D float array, the wrong dim, no rows, or non-finite values."""
  x = np.asarray(x)
  if x.ndim != 2 or not np.issubdtype(x.dtype, np.floating):
    raise ValueError(f"{name} must be a float [rows, dim] array, got "
                     f"{x.dtype}{list(x.shape)}")
  if dim is not None and x.shape[1] != dim:
    raise ValueError(f"{name}.shape={x.shape}: expected dim {dim}")
  if x.shape[0] < 1:
    raise ValueError(f"{name} is empty")
  if not np.all(np.isfinite(x)):
    raise ValueError(f"{name} holds non-finite values")
  return np.ascontiguousarray(x, np.float32)

METRICS = ("ip", "angular", "l2")


def check_metric(metric: str) -> str:
  if metric not in METRICS:
    raise ValueError(f"{metric=!r} must be one of {METRICS}")
  return metric


def normalize(x: np.ndarray) -> np.ndarray:
  """Rows scaled to unit norm (f32). Raises ValueError on a zero row."""
  x = np.asarray(x, np.float32)
  norm = np.linalg.norm(x, axis=-1, keepdims=True)
  if np.any(norm == 0):
    raise ValueError(f"x holds {int(np.sum(norm == 0))} zero rows, which "
                     "have no direction; drop them before normalizing")
  return x / norm


def exact_scores(base: np.ndarray, queries: np.ndarray,
                 metric: str = "ip") -> np.ndarray:
  """Exact similarities f32[Q, N] (higher is nearer), computed in float64.

  For "angular", pass unit vectors (see `normalize`); it is then "ip".
  """
  check_metric(metric)
  b = np.asarray(base, np.float64)
  q = np.asarray(queries, np.float64)
  s = q @ b.T
  if metric == "l2":
    s = 2 * s - np.sum(b * b, axis=1)[None, :]   # -‖q-x‖² + ‖q‖²
  return s


def exact_top_k(base: np.ndarray, queries: np.ndarray, k: int,
                metric: str = "ip", chunk: int = 256
                ) -> tuple[np.ndarray, np.ndarray]:
  """Exact k nearest base rows per query, best first.

  Args:
    base: f32[N, D].
    queries: f32[Q, D].
    k: neighbours per query (<= N).
    metric: "ip", "angular" (unit vectors expected) or "l2".
    chunk: queries per block (bounds memory at chunk x N float64).

  Returns:
    (ids i32[Q, k], scores f64[Q, k]); ties broken by lower id.
  """
  base = np.asarray(base)
  queries = np.asarray(queries)
  if base.ndim != 2 or queries.ndim != 2 or base.shape[1] != queries.shape[1]:
    raise ValueError(f"base.shape={base.shape} and queries.shape="
                     f"{queries.shape} must be [N, D] and [Q, D]")
  if not 1 <= k <= base.shape[0]:
    raise ValueError(f"{k=} must be in [1, N={base.shape[0]}]")
  ids, scores = [], []
  for start in range(0, queries.shape[0], chunk):
    s = exact_scores(base, queries[start:start + chunk], metric)
    part = np.argpartition(-s, k - 1, axis=1)[:, :k] if k < s.shape[1] else (
        np.broadcast_to(np.arange(s.shape[1]), s.shape))
    ps = np.take_along_axis(s, part, axis=1)
    order = np.lexsort((part, -ps), axis=1)         # score desc, then id
    ids.append(np.take_along_axis(part, order, axis=1))
    scores.append(np.take_along_axis(ps, order, axis=1))
  return (np.concatenate(ids).astype(np.int32), np.concatenate(scores))


def recall_at_1_at_k(ids: np.ndarray, true_top1: np.ndarray,
                     ks=None) -> np.ndarray:
  """Recall@1@k for each k: the share of queries whose true top-1 id is
  among the first k returned ids.

  Args:
    ids: int[Q, K] returned candidates per query, best first.
    true_top1: int[Q] the exact nearest neighbour of each query.
    ks: the k values (each in 1..K); default 1..K.

  Returns:
    f64[len(ks)], non-decreasing in k.
  """
  ids = np.asarray(ids)
  true_top1 = np.asarray(true_top1)
  if ids.ndim != 2 or true_top1.shape != ids.shape[:1]:
    raise ValueError(f"ids.shape={ids.shape} must be [Q, K] and "
                     f"true_top1.shape={true_top1.shape} must be [Q]")
  big_k = ids.shape[1]
  ks = np.arange(1, big_k + 1) if ks is None else np.asarray(ks)
  if ks.size and (ks.min() < 1 or ks.max() > big_k):
    raise ValueError(f"ks must lie in [1, {big_k}], got {ks.tolist()}")
  hit = ids == true_top1[:, None]
  # Rank of the true neighbour among the returned ids (K if absent).
  rank = np.where(hit.any(axis=1), hit.argmax(axis=1), big_k)
  return np.array([np.mean(rank < k) for k in ks], np.float64)
