"""What a fused kernel reads, prepared by XLA, and how its output is finished.

A TurboQuant cache is cut into "parts": one per quantizer (two for the
outlier split). Before a kernel runs, XLA rotates each key part's queries
once (and folds in the softmax scale); the kernel then streams packed codes
and norms, keeps an online softmax, and accumulates each value part in its
rotation's domain. After it, XLA rotates each value part back once, puts
split channels in place, and merges the full-precision window (if any) by
log-sum-exp. Kernels never see a full-precision key or value.

Shapes: B batch, K KV heads, M = T·G queries per KV head, S capacity,
P packed words, Dp a part's dimension, NS sequence splits.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from turboquant_jax.cache import common
from turboquant_jax.cache import turboquant_cache
from turboquant_jax.quant import codebook
from turboquant_jax.quant import packing
from turboquant_jax.quant import rotation
from turboquant_jax.quant import split
from turboquant_jax.quant import turboquant

_HI = jax.lax.Precision.HIGHEST
# The rotation matrices' products (prepare, finish; folded_queries above
# FOLDED_REDUCE_MAX_ROWS rows): f32 on the GPU at HIGHEST. A module
# constant so that decode_kernel_variants --split-xla can time the other
# precisions (its variants clear jit caches).
SPLIT_ROTATION_PRECISION = _HI


@dataclasses.dataclass(frozen=True)
class PartSpec:
  """Static description of one quantized part."""
  dim: int                      # Dp
  bits: int                     # codebook bits (0: none, prod at 1 bit)
  centroids: tuple[float, ...]  # 2**bits values (f32-rounded)
  prod: bool = False            # keys with a QJL residual stage


@dataclasses.dataclass(frozen=True)
class KernelInputs:
  """Arrays a kernel reads; specs are static.

  q: per key part f32[B, K, M, Dp], rotated and scaled.
  sq: per key part f32[B, K, M, Dp] = S·(rotated q)·scale (prod) or None.
  key_codes / value_codes: u8[B, K, S, P] per part.
  key_norms / value_norms: [B, K, S] per part (scale; 0 for prod at 1
    bit): f32, decoded from the cache's u8 codes where its norms are 8-bit,
    or as stored (f16 by default) with prepare(norms_as_stored=True).
  key_signs: u8[B, K, S, Dp/8] (prod) or None; key_coef: f32[B, K, S] the
    QJL weight √(π/2)/Dp·γ (prod) or None.
  qlen: i32[B] quantized positions to read (length minus the window).
  qpos_end: i32[B] the first query's position + 1 (causal limit of query 0
    is qpos_end - 1; query m's is that + m // G).
  lengths: i32[B] as given (a kernel may derive qlen and qpos_end itself,
    `positions`, and spare XLA a launch); window: the cache's W.
  """
  q: list[jax.Array]
  sq: list[jax.Array | None]
  key_codes: list[jax.Array]
  key_norms: list[jax.Array]
  key_signs: list[jax.Array | None]
  key_coef: list[jax.Array | None]
  value_codes: list[jax.Array]
  value_norms: list[jax.Array]
  qlen: jax.Array
  qpos_end: jax.Array
  key_specs: tuple[PartSpec, ...]
  value_specs: tuple[PartSpec, ...]
  groups: int                   # G
  tokens: int                   # T
  lengths: jax.Array
  window: int


def grouped_queries(q: jax.Array, kv_heads: int) -> jax.Array:
  """q [B, T, H, D] -> f32[B, K, T·G, D]: each KV head's queries, token
  major (row m is token m // G, query head m % G of the group)."""
  b, t, h, d = q.shape
  q = q.astype(jnp.float32).reshape(b, t, kv_heads, h // kv_heads, d)
  return jnp.moveaxis(q, 1, 2).reshape(b, kv_heads, t * (h // kv_heads), d)


def ungrouped(out: jax.Array, tokens: int) -> jax.Array:
  """grouped_queries' inverse: f32[B, K, T·G, D] -> f32[B, T, H, D]."""
  b, kv, _, d = out.shape
  out = out.reshape(b, kv, tokens, -1, d)
  return jnp.moveaxis(out, 2, 1).reshape(b, tokens, -1, d)


def merge_splits(m: jax.Array, l: jax.Array, acc: jax.Array,
                 d_axis: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The sequence splits' softmax states merged: their log-sum-exp
  combination, an empty split (m = -inf) weighing 0.

  m, l: f32[B, K, NS, ...] each split's running max and sum; acc: f32[B,
  K, NS, ...] its unnormalized accumulator, m's shape with a coordinate
  axis inserted at d_axis. Returns (m, l, acc) of all splits together
  (axis 2 gone). Three XLA reductions (the max, then the weighted sums):
  one variadic reduce with a rescaling combiner was tried and took longer
  on the H200 (XLA materialized its broadcast inputs: B=1, S=16k, 4 bits,
  13.3 µs of merge kernels against 8.6; NOTES.md, session 14).
  """
  m_all = jnp.max(m, axis=2)
  m_safe = jnp.where(jnp.isfinite(m_all), m_all, 0.0)
  factor = jnp.where(jnp.isfinite(m),
                     jnp.exp(m - jnp.expand_dims(m_safe, 2)), 0.0)
  return (m_all, jnp.sum(l * factor, axis=2),
          jnp.sum(acc * jnp.expand_dims(factor, d_axis), axis=2))


def positions(lengths, capacity: int, window: int, tokens: int):
  """(qlen, qpos_end) of KernelInputs from the given lengths (arrays or
  scalars, inside a kernel too)."""
  lengths = jnp.minimum(lengths, capacity)
  return jnp.maximum(lengths - window, 0), lengths - tokens + 1


def _spec(q: turboquant.Quantizer) -> PartSpec:
  c = (codebook.codebook_table(q.dim, q.mse_bits, q.grid_centroids)
       .astype(np.float32)
       if q.mse_bits else np.zeros((0,), np.float32))
  return PartSpec(dim=q.dim, bits=q.mse_bits,
                  centroids=tuple(float(x) for x in c),
                  prod=q.method == turboquant.Method.PROD)


def tensor_parts(q, qt):
  """[(quantizer, tensor)] of a plain or split pair (outliers first)."""
  if isinstance(q, split.SplitQuantizer):
    return [(q.outlier, qt.outlier), (q.regular, qt.regular)]
  return [(q, qt)]


def cache_parts(cache) -> list:
  """tensor_parts of a cache's keys, then of its values."""
  return (tensor_parts(cache.key_quantizer, cache.keys)
          + tensor_parts(cache.value_quantizer, cache.values))


def rotation_matrix(quantizer, stored) -> jax.Array | None:
  """The one matrix that rotates a tensor's queries (and back), f32[K or
  1, D, D]: a split tensor's folded rotations per KV head (`stored`, the
  cache's key_split_rotation, or made here, a scatter each call, for a
  cache built without it; the values' stored form is transposed:
  output_rotation), a plain tensor's dense (haar) rotation shared by all
  heads, or None (Hadamard)."""
  if isinstance(quantizer, split.SplitQuantizer):
    return (stored if stored is not None
            else turboquant_cache.split_rotation(quantizer))
  matrix = quantizer.rotation.matrix
  return None if matrix is None else matrix[None]


def supported(cache) -> str | None:
  """None if kernels can read this cache, else the reason they cannot."""
  if not isinstance(cache, turboquant_cache.TurboQuantCache):
    return f"{type(cache).__name__} is not a TurboQuantCache"
  if cache.config.sink:
    return (f"sink={cache.config.sink}: kernels do not read the "
            "full-precision sink tokens")
  for q, _ in cache_parts(cache):
    if q.dim % 8:
      return f"part dim {q.dim}: kernels need a multiple of 8"
  return None


def prepare(q: jax.Array, cache, lengths: jax.Array, scale: float,
            norms_as_stored: bool = False) -> KernelInputs:
  """q [B, T, H, D] and a TurboQuantCache -> KernelInputs.

  norms_as_stored: pass 16-bit norms to the kernel in their stored dtype
  (a kernel that converts per tile saves a pass over every norm); 8-bit
  norm codes are decoded to f32 either way.
  """
  _, t, h, _ = q.shape
  kv, cap, w = cache.kv_heads, cache.capacity, cache.config.window
  g = h // kv
  qh = grouped_queries(q, kv)                                 # [B, K, M, D]
  given = lengths.astype(jnp.int32)
  qs, sqs, kcodes, knorms, ksigns, kcoefs, kspecs = [], [], [], [], [], [], []
  stacked = isinstance(cache.key_quantizer, split.SplitQuantizer)
  # 8-bit norm codes are decoded here, by XLA, to f32.
  keys, values = turboquant_cache.tensors(cache)
  as_norms = lambda x: x if norms_as_stored else x.astype(jnp.float32)
  folded = rotation_matrix(cache.key_quantizer, cache.key_split_rotation)
  if folded is not None:
    # Every part's gathers and rotations in one product (outliers first).
    y_all = folded_queries(qh, folded) * scale
  offset = 0
  for kq, kqt in tensor_parts(cache.key_quantizer, keys):
    if folded is not None:
      y_rot = y_all[..., offset:offset + kq.dim]
      offset += kq.dim
    else:
      y_rot = rotation.apply(kq.rotation, qh) * scale
    spec = _spec(kq)
    qs.append(y_rot)
    kcodes.append(kqt.codes)
    knorms.append(as_norms(kqt.norms) if kqt.norms is not None
                  else jnp.zeros(kqt.shape, jnp.float32))
    if spec.prod:
      sk = kq.sketch
      sqs.append(jnp.einsum("bkmd,kjd->bkmj" if stacked else "bkmd,jd->bkmj",
                            y_rot, sk, precision=_HI))
      ksigns.append(kqt.signs)
      kcoefs.append(np.sqrt(np.pi / 2) / spec.dim
                    * kqt.residual_norms.astype(jnp.float32))
    else:
      sqs.append(None)
      ksigns.append(None)
      kcoefs.append(None)
    kspecs.append(spec)
  vcodes, vnorms, vspecs = [], [], []
  for vq, vqt in tensor_parts(cache.value_quantizer, values):
    vcodes.append(vqt.codes)
    vnorms.append(as_norms(vqt.norms))
    vspecs.append(_spec(vq))
  qlen, qpos_end = positions(given, cap, w, t)
  return KernelInputs(
      q=qs, sq=sqs, key_codes=kcodes, key_norms=knorms, key_signs=ksigns,
      key_coef=kcoefs, value_codes=vcodes, value_norms=vnorms,
      qlen=qlen, qpos_end=qpos_end, key_specs=tuple(kspecs),
      value_specs=tuple(vspecs), groups=g, tokens=t, lengths=given,
      window=w)


# Up to this many query rows (B·M) a split tensor's folded products are
# multiply-and-sum reductions (exact f32, one XLA loop fusion) rather than
# HIGHEST einsums (a gemm fusion whose f32 emulation dominates tiny
# products).
FOLDED_REDUCE_MAX_ROWS = 64


def sums_products(x: jax.Array, folded: jax.Array) -> bool:
  """Whether the products of x [B, K, M, ...] with `folded` [K or 1, D, D]
  (rotation_matrix) are multiply-and-sum reductions rather than einsums:
  per-head matrices (the outlier split's) at B·M <= FOLDED_REDUCE_MAX_ROWS.

  A dense rotation shared by the heads is always an einsum: inside a
  Llama-3.1-8B-shaped decode loop (H200, session 24, step_trace) XLA laid
  that loop-carried [D, D] matrix out transposed and each reduction took
  16.5 µs at B = 8 (1.09 ms of a 10.6 ms step's kernels, two a layer);
  as einsums the step's kernels took 9.73 ms (B = 1: 7.14 -> 6.93). Alone
  (decode_kernel_variants --around-kernel) the einsum was as fast or
  faster too: B = 8, 32k 0.172-0.177 ms against 0.176-0.178.
  """
  return (folded.shape[0] > 1
          and x.shape[0] * x.shape[2] <= FOLDED_REDUCE_MAX_ROWS)


def folded_queries(qh: jax.Array, folded: jax.Array) -> jax.Array:
  """f32[B, K, M, D] through rotation_matrix's f32[K or 1, D, D]: every
  part's rotated queries side by side (outliers first).

  A split tensor's at most FOLDED_REDUCE_MAX_ROWS rows (decode at small
  B) as a product and a sum over D (sums_products): on the H200 (B=1,
  S=16k, 3.5 bits, Nsight) the einsum took 8.1 µs and this 3.6, the
  rotation back 5.1 against 3.3 (NOTES.md, session 14). A dense
  rotation's einsum at B=1 lowered to a split-K gemm and a reduction, two
  kernels (session 15), yet inside a decode loop it still beat the
  reduction (sums_products).
  """
  if sums_products(qh, folded):
    return jnp.sum(qh[..., None, :] * folded[None, :, None], axis=-1)
  return jnp.einsum("bkmd,ked->bkme", qh, folded,
                    precision=SPLIT_ROTATION_PRECISION)


def folded_outputs(merged: jax.Array, folded: jax.Array,
                   transposed: bool = False) -> jax.Array:
  """folded_queries' inverse: f32[B, K, M, D] in the parts' rotated
  domains (side by side) back to the original channels. transposed:
  `folded` is given as its transpose per head ([K, channels, rotated], a
  split cache's value_split_rotation), so that the sum runs along its
  rows."""
  if transposed:
    if sums_products(merged, folded):
      return jnp.sum(merged[..., None, :] * folded[None, :, None], axis=-1)
    return jnp.einsum("bkme,kde->bkmd", merged, folded,
                      precision=SPLIT_ROTATION_PRECISION)
  if sums_products(merged, folded):
    return jnp.sum(merged[..., :, None] * folded[None, :, None], axis=-2)
  return jnp.einsum("bkme,ked->bkmd", merged, folded,
                    precision=SPLIT_ROTATION_PRECISION)


def output_rotation(cache) -> tuple[jax.Array | None, bool]:
  """(the matrix that rotates the value parts' merged outputs back,
  whether it is transposed) for folded_outputs: a split cache's
  value_split_rotation as stored (transposed; made here, a scatter each
  call, for a cache built without it), else rotation_matrix's dense
  rotation or None (Hadamard)."""
  vq = cache.value_quantizer
  if isinstance(vq, split.SplitQuantizer):
    stored = cache.value_split_rotation
    return (stored if stored is not None else
            turboquant_cache.split_rotation(vq, transposed=True)), True
  return rotation_matrix(vq, None), False


def finish(acc: list[jax.Array], m: jax.Array, l: jax.Array, q: jax.Array,
           cache, lengths: jax.Array, scale: float) -> jax.Array:
  """Merges a kernel's partial softmax state into f32[B, T, H, D].

  acc: per value part f32[B, K, NS, M, Dp] (unnormalized, rotated domain);
  m, l: f32[B, K, NS, M] running max and sum of each sequence split.
  """
  _, t, h, _ = q.shape
  kv, cap, w = cache.kv_heads, cache.capacity, cache.config.window
  g = h // kv
  # Per value part (the max and weights are common: XLA computes them
  # once); concatenated after the merge, which XLA fuses.
  merges = [merge_splits(m, l, a, 4) for a in acc]
  m_s, denom = merges[0][:2]
  a = [mg[2] for mg in merges]
  if w:
    qh = grouped_queries(q, kv)
    lens = jnp.minimum(lengths, cap)
    wpos = common.window_positions(lens, w)                   # [B, W]
    qpos = jnp.repeat(lens[:, None] - t + jnp.arange(t)[None, :], g, axis=1)
    valid = (wpos[:, None, None, :] >= 0) & (
        wpos[:, None, None, :] <= qpos[:, None, :, None])
    sw = jnp.einsum("bkmd,bkwd->bkmw", qh,
                    cache.window_keys.astype(jnp.float32),
                    precision=_HI) * scale
    sw = jnp.where(valid, sw, -jnp.inf)
    m_all = jnp.maximum(m_s, jnp.max(sw, axis=-1))
    m_safe = jnp.where(jnp.isfinite(m_all), m_all, 0.0)
    factor = jnp.where(jnp.isfinite(m_s), jnp.exp(m_s - m_safe), 0.0)
    pw = jnp.where(valid, jnp.exp(sw - m_safe[..., None]), 0.0)
    denom = denom * factor + jnp.sum(pw, axis=-1)
    a = [x * factor[..., None] for x in a]
  inv = (1.0 / jnp.maximum(denom, 1e-30))[..., None]
  # Normalized before the rotation back (linear): the product comes last.
  merged = jnp.concatenate([x * inv for x in a], axis=-1)     # [B, K, M, D]
  folded, transposed = output_rotation(cache)
  if folded is not None:
    # Every part's rotation back and scatter as one product (Eᵀ).
    out = folded_outputs(merged, folded, transposed)
  else:
    out = rotation.invert(cache.value_quantizer.rotation, merged)
  if w:
    out = out + jnp.einsum("bkmw,bkwd->bkmd", pw * inv,
                           cache.window_values.astype(jnp.float32),
                           precision=_HI)
  return ungrouped(out, t)


def finish_columns(acc: jax.Array, m: jax.Array, l: jax.Array, q: jax.Array,
                   cache, rotated: bool = False) -> jax.Array:
  """finish() for one value part and no window, merged in the layout the
  GPU kernel writes: acc f32[B, K, NS, Dp, N], m, l f32[B, K, NS, N] (N >=
  M query columns). The merge reads acc as it lies (no transpose), the
  rotation back contracts Dp, and the division by the softmax sum comes
  last: fewer XLA launches than finish() is the aim.
  rotated: acc is already in the original domain (the kernel rotated it).
  """
  _, denom, a = merge_splits(m, l, acc, 3)                    # [B,K,Dp,N]
  denom = jnp.maximum(denom, 1e-30)                            # [B, K, N]
  if rotated:
    out = jnp.swapaxes(a, 2, 3)                                # [B,K,N,D]
  elif (rot := cache.value_quantizer.rotation).matrix is not None:
    out = jnp.einsum("bkin,ij->bknj", a, rot.matrix, precision=_HI)
  else:
    out = rotation.invert(rot, jnp.swapaxes(a, 2, 3))          # [B,K,N,D]
  t, m_rows = q.shape[1], q.shape[1] * q.shape[2] // cache.kv_heads
  out = out[:, :, :m_rows] / denom[:, :, :m_rows, None]
  return ungrouped(out, t)


# ------------------------------------------------- in-kernel code unpacking


def chunk_count(bits: int) -> int:
  """Contiguous coordinate chunks a row of uint8 words unpacks into."""
  return 8 // min(packing.plane_widths(bits))


def unpack_chunks(words: jax.Array, bits: int, dim: int,
                  dtype=jnp.int32) -> list[jax.Array]:
  """Packed u8/i32 rows [N, P] -> chunk_count(bits) code arrays [N, Dc].

  Chunk j holds coordinates [j·Dc, (j+1)·Dc), Dc = dim / chunk_count: every
  plane's field for those coordinates is one static slice of words, one
  shift and one mask (see packing's layout), so this lowers to plain vector
  ops in any kernel language. dtype: the integer type to compute in (int16
  lets a GPU kernel build f16 values from the codes by bit operations).
  """
  n = chunk_count(bits)
  dc = dim // n
  words = words.astype(dtype)
  chunks = []
  for j in range(n):
    code = None
    for w, shift, offset, n_words in packing.plane_layout(dim, bits):
      per_slot = n_words                        # coordinates per slot
      slot, start = divmod(j * dc, per_slot)
      field = (words[:, offset + start:offset + start + dc]
               >> (slot * w)) & ((1 << w) - 1)
      field = field << shift if shift else field
      code = field if code is None else code | field
    chunks.append(code)
  return chunks


def lookup(code: jax.Array, centroids: tuple[float, ...]) -> jax.Array:
  """centroids[code] without a gather: a chain of selects (f32)."""
  out = jnp.full(code.shape, centroids[0], jnp.float32)
  for k in range(1, len(centroids)):
    out = jnp.where(code == k, jnp.float32(centroids[k]), out)
  return out
