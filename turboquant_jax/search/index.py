"""TurboQuant as a nearest-neighbour index: encode, score, top-k.

Shapes: N base vectors, Q queries, D dim, C base rows per chunk, K results.

    config = IndexConfig(bits=4, norm_correction=True, unit_norm=True)
    index = build(jax.random.key(0), base, config)   # base f32[N, D]
    scores, ids = search(index, queries, k=64)       # f32[Q, 64], i32[Q, 64]
    bits_per_coordinate(index)                        # everything stored / D

The quantizer is the library's (`tq.make_quantizer`, `tq.quantize`,
`tq.inner_product`): queries are scored against the codes in the rotated
domain, never dequantized. What the index adds, all online (no training):
- unit_norm: for unit vectors (angular search) no per-vector scale is
  stored. The scale is derived from the codes when scoring: 1 (plain), or
  1/‖c[idx]‖ with norm correction, since ‖x‖ = 1. So the index stores
  exactly bits·D bits per vector (mse).
- norm_correction (the EDEN-style rescaling, `tq.make_quantizer`'s
  option): x̃ = ‖x‖·Πᵀĉ with ĉ = c[idx]/‖c[idx]‖, i.e. the score is
  ‖x‖·cos(Πq, c[idx])·‖q‖. Without it, vectors whose codes happen to be long
  are ranked too high; this is most of the gap to PQ on real data.
- center: quantize r = x - μ, μ the base mean (D floats, stored once);
  ⟨q, x⟩ = ⟨q, r⟩ + ⟨q, μ⟩, and a smaller residual means smaller errors.
  The residual's scale is stored. With unit_norm too (angular data), the
  reconstruction μ + r̃ is rescaled to the known norm 1 when scoring,
  score = ⟨q, μ + r̃⟩ / ‖μ + r̃‖ (‖μ + r̃‖² = ‖μ‖² + 2⟨μ, r̃⟩ + ‖r̃‖², all
  from the codes): no radial error. This is the strongest lever on real
  embeddings (large common component).
- scale_bits = 8: the stored scale is quantized to 8 bits, uniformly in
  log between the base set's extremes (2 floats per index), instead of a
  16-bit float; its relative error (< 0.5% for a 3x range) is far below
  the codes'.
- rotations = R > 1: R independent quantizers encode every vector and the
  one with the smallest error ‖x - x̃‖ is kept, at ceil(log2 R) more bits
  per vector (its id, bit-packed): bits go where a rotation left the most
  error. Encoding and scoring cost R times as much.
- Stored scales in float16 (the KV cache's choice) rather than float32.
Bits per coordinate count every per-vector array kept (codes, QJL signs,
stored scales, rotation ids); the rotations, codebook and mean are per
index, not per vector (`fixed_bytes`).
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

import turboquant_jax as tq
from turboquant_jax.search import metrics

_UNIT_TOLERANCE = 1e-3
DEFAULT_CHUNK = 16384


@dataclasses.dataclass(frozen=True)
class IndexConfig:
  """How a TurboQuant index encodes and scores.

  Attributes:
    bits: bits per coordinate of the quantizer (1..8).
    method: "mse" (Algorithm 1) or "prod" (Algorithm 2: mse at bits-1 plus
      a 1-bit QJL sketch of the residual; unbiased inner products).
    norm_correction: store ‖x‖/‖c[idx]‖ instead of ‖x‖ (see module doc).
    unit_norm: the base vectors are unit norm (checked): no scale is stored
      (without center), the reconstruction is renormalized (with center).
    center: subtract the base mean before quantizing.
    rotations: R, independent quantizers to choose from per vector.
    metric: "ip" (and "angular", which is ip on unit vectors) or "l2".
    rotation: "haar" or "hadamard" (D a power of two).
    norm_dtype: dtype of stored per-vector scales (scale_bits = 0).
    scale_bits: 0 (scales in norm_dtype) or 8 (log-quantized, mse only).
  """
  bits: int
  method: str = "mse"
  norm_correction: bool = True
  unit_norm: bool = False
  center: bool = False
  rotations: int = 1
  metric: str = "ip"
  rotation: str = "haar"
  norm_dtype: str = "float16"
  scale_bits: int = 0

  def __post_init__(self):
    if self.method not in ("mse", "prod"):
      raise ValueError(f"method={self.method!r} must be 'mse' or 'prod'")
    metrics.check_metric(self.metric)
    if self.unit_norm and self.center and (self.metric != "ip"
                                           or self.method != "mse"):
      raise ValueError("unit_norm=True with center=True renormalizes the "
                       "reconstruction and needs metric='ip' (unit vectors "
                       "rank the same under l2) and method='mse' (the norm "
                       "of a prod reconstruction is not stored)")
    if self.scale_bits not in (0, 8):
      raise ValueError(f"scale_bits={self.scale_bits!r} must be 0 or 8")
    if self.scale_bits and self.method != "mse":
      raise ValueError("scale_bits=8 needs method='mse' (prod's residual is "
                       "taken against the unquantized scale)")
    if self.metric == "l2" and self.method != "mse":
      raise ValueError("metric='l2' needs method='mse' (the squared norm of "
                       "a prod reconstruction is not stored)")
    if (isinstance(self.rotations, bool)
        or not isinstance(self.rotations, (int, np.integer))
        or not 1 <= self.rotations <= 256):
      raise ValueError(f"rotations={self.rotations!r} must be an integer in "
                       "[1, 256]")

  @property
  def stores_scale(self) -> bool:
    """Whether a per-vector scale is kept (else derived from the codes)."""
    return self.center or not self.unit_norm

  @property
  def id_bits(self) -> int:
    """Bits of the per-vector rotation id (0 for one rotation)."""
    return math.ceil(math.log2(self.rotations)) if self.rotations > 1 else 0


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Index:
  """An encoded base set; a pytree.

  Attributes:
    quantizers: the R TurboQuant quantizers (rotation, codebook, sketch).
    codes: the QuantizedTensor of shape [N]; its `norms` is None when no
      scale is stored or the scale is in `scale_codes`.
    rotation_ids: u8[P] the quantizer of each vector, id_bits each, packed
      (`tq.pack` over all N), or None for one rotation.
    mean: f32[D] subtracted before encoding (config.center), else None.
    scale_codes: u8[N] 8-bit scales (config.scale_bits = 8), else None.
    scale_range: f32[2] log of the smallest and largest scale, else None.
    config: static.
  """
  quantizers: tuple[tq.Quantizer, ...]
  codes: tq.QuantizedTensor
  rotation_ids: jax.Array | None
  mean: jax.Array | None
  scale_codes: jax.Array | None
  scale_range: jax.Array | None
  config: IndexConfig = dataclasses.field(metadata=dict(static=True))

  @property
  def quantizer(self) -> tq.Quantizer:
    return self.quantizers[0]

  @property
  def size(self) -> int:
    return self.codes.shape[0]

  @property
  def dim(self) -> int:
    return self.quantizer.dim

  def ids(self) -> jax.Array:
    """u8[N]: which quantizer encoded each vector."""
    if self.rotation_ids is None:
      return jnp.zeros((self.size,), jnp.uint8)
    return tq.unpack(self.rotation_ids[None], self.config.id_bits,
                     self.size)[0]


def _slice(tree, start: int, stop: int, size: int):
  """Rows [start, stop) of every leaf, zero-padded to `size` rows."""
  def one(a):
    part = a[start:stop]
    pad = size - part.shape[0]
    if pad:
      part = jnp.pad(part, [(0, pad)] + [(0, 0)] * (part.ndim - 1))
    return part
  return jax.tree.map(one, tree)


def _concat(parts, n: int):
  return jax.tree.map(lambda *a: jnp.concatenate(a)[:n], *parts)


def _quantizer_keys(key: jax.Array, rotations: int) -> list[jax.Array]:
  # Quantizer 0 uses `key` itself: one rotation is the plain index.
  return [key] + [jax.random.fold_in(key, r) for r in range(1, rotations)]


@jax.jit
def _pick(x, candidates, decoded):
  """Per vector, the candidate encoding with the smallest ‖x - x̃‖².

  candidates: a QuantizedTensor pytree with leaves stacked [R, C, ...];
  decoded: f32[R, C, D]. Returns (codes [C], ids u8[C]).
  """
  err = jnp.sum(jnp.square(decoded - x[None]), axis=-1)       # [R, C]
  best = jnp.argmin(err, axis=0)
  def take(a):
    idx = best.reshape((1, -1) + (1,) * (a.ndim - 2))
    return jnp.take_along_axis(a, idx, axis=0)[0]
  return jax.tree.map(take, candidates), best.astype(jnp.uint8)


def build(key: jax.Array, base, config: IndexConfig, *,
          chunk: int = DEFAULT_CHUNK) -> Index:
  """Draws the quantizer(s) from `key` and encodes the base vectors.

  Args:
    key: jax.random key (rotations, QJL sketches).
    base: f32[N, D] vectors to index.
    config: the IndexConfig.
    chunk: rows per encode call (one compiled shape; the last chunk is
      padded).

  Raises:
    ValueError: base is not a finite float matrix, or config.unit_norm and
      some row's norm is not 1 (to 1e-3).
  """
  base = metrics.check_vectors("base", base)
  n, dim = base.shape
  if config.unit_norm:
    norms = np.linalg.norm(base, axis=1)
    worst = float(np.max(np.abs(norms - 1)))
    if worst > _UNIT_TOLERANCE:
      raise ValueError(f"config.unit_norm=True but base row norms deviate "
                       f"from 1 by up to {worst:.3g}; normalize the vectors "
                       "(metrics.normalize) or set unit_norm=False")
  x = jnp.asarray(base)
  mean = None
  if config.center:
    mean = jnp.mean(x, axis=0)
    x = x - mean
  # Scales that are dropped (derived when scoring) or re-quantized below
  # are encoded in float32, so that scoring sees what the encoder used.
  norm_dtype = config.norm_dtype
  if not config.stores_scale or config.scale_bits:
    norm_dtype = "float32"
  quantizers = tuple(
      tq.make_quantizer(
          k, dim, config.bits, config.method, rotation=config.rotation,
          norm_dtype=norm_dtype, norm_correction=config.norm_correction)
      for k in _quantizer_keys(key, config.rotations))
  chunk = max(1, min(chunk, n))
  parts, ids = [], []
  for start in range(0, n, chunk):
    xc = _slice(x, start, min(start + chunk, n), chunk)
    cands = [tq.quantize(q, xc) for q in quantizers]
    if len(quantizers) == 1:
      parts.append(cands[0])
      continue
    decoded = jnp.stack([tq.dequantize(q, c)
                         for q, c in zip(quantizers, cands)])
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *cands)
    codes, best = _pick(xc, stacked, decoded)
    parts.append(codes)
    ids.append(best)
  codes = _concat(parts, n)
  rotation_ids = None
  if ids:
    rotation_ids = tq.pack(jnp.concatenate(ids)[:n][None],
                           config.id_bits)[0]
  scale_codes = scale_range = None
  if not config.stores_scale:
    gamma = codes.residual_norms
    if gamma is not None:
      gamma = gamma.astype(config.norm_dtype)
    codes = dataclasses.replace(codes, norms=None, residual_norms=gamma)
  elif config.scale_bits and codes.norms is not None:
    scale_codes, scale_range = _quantize_scales(codes.norms)
    codes = dataclasses.replace(codes, norms=None)
  return Index(quantizers=quantizers, codes=codes, rotation_ids=rotation_ids,
               mean=mean, scale_codes=scale_codes, scale_range=scale_range,
               config=config)


def _quantize_scales(scales: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Scales f32[N] -> (u8[N], f32[2] log range), uniform in log."""
  logs = jnp.log(jnp.maximum(scales.astype(jnp.float32), 1e-30))
  lo, hi = jnp.min(logs), jnp.max(logs)
  hi = jnp.maximum(hi, lo + 1e-6)
  codes = jnp.round((logs - lo) / (hi - lo) * 255).astype(jnp.uint8)
  return codes, jnp.stack([lo, hi])


def _dequantize_scales(codes: jax.Array, log_range: jax.Array) -> jax.Array:
  lo, hi = log_range[0], log_range[1]
  return jnp.exp(lo + codes.astype(jnp.float32) / 255 * (hi - lo))


def bits_per_coordinate(index: Index) -> float:
  """Bits stored per vector (codes, signs, scales, rotation id) / D."""
  scale_bits = 8 if index.scale_codes is not None else 0
  return (index.codes.bits_per_vector + index.config.id_bits
          + scale_bits) / index.dim


def fixed_bytes(index: Index) -> int:
  """Bytes stored once per index: rotations, codebooks, sketches, mean."""
  leaves = jax.tree.leaves((index.quantizers, index.mean, index.scale_range))
  return int(sum(a.size * a.dtype.itemsize for a in leaves))


def derived_scales(quantizer: tq.Quantizer, codes: tq.QuantizedTensor,
                   norm_correction: bool) -> jax.Array:
  """The scale of unit vectors, from their codes alone: f32[*B].

  1 without norm correction; 1/‖c[idx]‖ with it (the encoder's ‖x‖/‖c[idx]‖
  at ‖x‖ = 1). Only meaningful for an mse stage (mse_bits > 0).
  """
  ones = jnp.ones(codes.shape, jnp.float32)
  if not norm_correction or not quantizer.mse_bits:
    return ones
  idx = tq.unpack(codes.codes, quantizer.mse_bits, quantizer.dim)
  c = quantizer.centroids[idx]
  return 1.0 / jnp.sqrt(jnp.sum(c * c, axis=-1))


def _full_codes(quantizer, codes, scale_codes, scale_range,
                config: IndexConfig) -> tq.QuantizedTensor:
  """Codes with the scales the library expects (derived if not stored)."""
  if not quantizer.mse_bits:
    return codes
  if scale_codes is not None:
    return dataclasses.replace(
        codes, norms=_dequantize_scales(scale_codes, scale_range))
  if config.stores_scale:
    return codes
  scale = derived_scales(quantizer, codes, config.norm_correction)
  return dataclasses.replace(codes, norms=scale)


def _inner(quantizers, full, ids, queries):
  """⟨queries, x̃⟩ f32[Q, C], each vector scored with its own quantizer."""
  s = tq.inner_product(quantizers[0], full, queries)
  for r, q in enumerate(quantizers[1:], 1):
    s = jnp.where(ids[None, :] == r, tq.inner_product(q, full, queries), s)
  return s


def _scores(quantizers, codes, ids, mean, scale_codes, scale_range, queries,
            config: IndexConfig):
  """Estimated similarities f32[Q, C] (higher is nearer).

  ids: u8[C] quantizer of each vector (all zeros for one rotation).
  """
  full = _full_codes(quantizers[0], codes, scale_codes, scale_range, config)
  if config.unit_norm and mean is not None:
    # x̂ = (μ + r̃) / ‖μ + r̃‖: the known unit norm, restored.
    both = _inner(quantizers, full, ids,
                  jnp.concatenate([queries, mean[None]]))
    s, mu_r = both[:-1], both[-1]
    idx = tq.unpack(full.codes, quantizers[0].mse_bits, quantizers[0].dim)
    c = quantizers[0].centroids[idx]
    r_sq = full.norms.astype(jnp.float32) ** 2 * jnp.sum(c * c, axis=-1)
    norm = jnp.sqrt(jnp.maximum(jnp.sum(mean * mean) + 2 * mu_r + r_sq,
                                1e-12))
    return (s + (queries @ mean)[:, None]) / norm[None, :]
  offset = 0.0
  if config.metric == "l2":
    # 2⟨q, x⟩ - ‖x‖² = ‖q‖² - ‖q - x‖², from the centered q - μ, x - μ.
    if mean is not None:
      centered = queries - mean
      offset = (jnp.sum(queries * queries, axis=-1)
                - jnp.sum(centered * centered, axis=-1))[:, None]
      queries = centered
    # ‖x̃‖² = scale²·‖c[idx]‖² (= ‖x‖² with norm correction).
    idx = tq.unpack(full.codes, quantizers[0].mse_bits, quantizers[0].dim)
    c = quantizers[0].centroids[idx]
    sq = full.norms.astype(jnp.float32) ** 2 * jnp.sum(c * c, axis=-1)
    offset = offset - sq[None, :]
    scale = 2.0
  else:
    if mean is not None:
      offset = (queries @ mean)[:, None]
    scale = 1.0
  return scale * _inner(quantizers, full, ids, queries) + offset


@jax.jit
def score(index: Index, queries: jax.Array) -> jax.Array:
  """Estimated similarities of queries f32[Q, D] to every base vector:
  f32[Q, N] (inner products; for "l2", 2⟨q, x⟩ - ‖x‖²)."""
  return _scores(index.quantizers, index.codes, index.ids(), index.mean,
                 index.scale_codes, index.scale_range, queries, index.config)


@jax.jit(static_argnames=("k", "config"))
def _chunk_top_k(quantizers, codes, ids, valid, mean, scale_codes,
                 scale_range, queries, k: int, config: IndexConfig):
  s = _scores(quantizers, codes, ids, mean, scale_codes, scale_range,
              queries, config)
  s = jnp.where(valid[None, :], s, -jnp.inf)
  return jax.lax.top_k(s, k)


@jax.jit
def _merge(best_s, best_i, new_s, new_i):
  s = jnp.concatenate([best_s, new_s], axis=1)
  i = jnp.concatenate([best_i, new_i], axis=1)
  top, pos = jax.lax.top_k(s, best_s.shape[1])
  return top, jnp.take_along_axis(i, pos, axis=1)


def search(index: Index, queries, k: int, *, chunk: int = DEFAULT_CHUNK
           ) -> tuple[np.ndarray, np.ndarray]:
  """The k best base rows per query by estimated similarity.

  Args:
    index: from `build`.
    queries: f32[Q, D] (unit vectors for angular search).
    k: results per query, 1..N.
    chunk: base rows scored per call (bounds memory at Q x chunk floats).

  Returns:
    (scores f32[Q, k], ids i32[Q, k]), best first.
  """
  queries = metrics.check_vectors("queries", queries, index.dim)
  n = index.size
  if not isinstance(k, (int, np.integer)) or not 1 <= k <= n:
    raise ValueError(f"{k=} must be an integer in [1, N={n}]")
  chunk = max(k, min(chunk, n))
  q = jnp.asarray(queries)
  all_ids = index.ids()
  best_s = best_i = None
  for start in range(0, n, chunk):
    stop = min(start + chunk, n)
    part, ids, scales = _slice((index.codes, all_ids, index.scale_codes),
                               start, stop, chunk)
    valid = jnp.arange(chunk) < stop - start
    s, i = _chunk_top_k(index.quantizers, part, ids, valid, index.mean,
                        scales, index.scale_range, q, int(k), index.config)
    i = i.astype(jnp.int32) + start
    if best_s is None:
      best_s, best_i = s, i
    else:
      best_s, best_i = _merge(best_s, best_i, s, i)
  return np.asarray(best_s), np.asarray(best_i)
