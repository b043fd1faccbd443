"""Quantize-and-append of one decode token as one Mosaic GPU kernel.

A decode step appends one token per sequence to every layer's cache. Left
to XLA, a TurboQuant append is 9 small kernels a layer (the norm, a select,
the rotation, the code search and packing, four scatters: codes and norms
of keys and values, the lengths), ~32 µs summed on the H200 at the SmolLM2
decode shape, against the bf16 cache's two scatters. Here it is one kernel
(plus one small XLA op that lays out the two rotations' columns): program
(b, k) holds the key and the value of sequence b, head k as one
f32[2, D] array, one or two coordinates of each per thread, and

  rotates them (D steps: a column of each rotation times one coordinate),
  takes the norms and the finiteness probes (warpgroup reductions),
  counts the thresholds below each unit coordinate (the code) and, for
  the norm correction, sums the chosen centroids' squares,
  packs the codes (packing.pack's layout, read back from shared memory)
  and writes bytes and stored norms at position lengths[b], then the new
  lengths.

The cache's arrays enter as mutable refs, which XLA aliases to the kernel's
outputs, so in a decode loop (cache donated or carried) the write is in
place. On the H200 (results/decode_bench/h200_v8): 4.6 µs for the kernel
and 3.0 for the column layout at B=32, 3 KV heads, D=64; 16-26% more
decode tokens/s than the XLA append. probes.txt there has the three
slower designs it replaced.

The reference is the XLA path (`turboquant_cache.append(impl="xla")`):
the same codes except for coordinates within rounding of a threshold (the
rotation and the norm are summed in another order, and the norm is taken
of Πx rather than x, equal up to rounding as Π is orthogonal); 0 bytes
differed on the H200 at D = 64, 128, 256, and with the outlier split at
D = 64 and 128.

The outlier split (fractional bits) goes through the same steps with
each tensor's two parts side by side in its row: the rotation is the
cache's folded one per KV head (split.folded_rotation: both parts'
channel gathers and rotations, outlier part first), and the norms, the
code search and the packing run per part (`Part`), each written to its
own stored tensor.

Supported: head dims a multiple of 64, keys and values of method mse at
integer bits 1-4 (each part of a split), norms stored in 16 or 32 bits, no
window or sink, one token; `supported` says why not otherwise.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from turboquant_jax.cache import turboquant_cache
from turboquant_jax.kernels.decode_attention import pallas_gpu as attention_gpu
from turboquant_jax.kernels.decode_attention import parts as kernel_parts
from turboquant_jax.quant import packing
from turboquant_jax.quant import rotation
from turboquant_jax.quant import split
from turboquant_jax.quant import turboquant

MAX_BITS = 4            # 2^b - 1 compares per coordinate


def supported(cache, tokens: int) -> str | None:
  """None if the kernel can append `tokens` tokens to `cache`, else why not.
  """
  if not isinstance(cache, turboquant_cache.TurboQuantCache):
    return f"{type(cache).__name__} is not a TurboQuantCache"
  if tokens != 1:
    return f"{tokens} tokens: the kernel appends one (a decode step)"
  c = cache.config
  if c.window or c.sink:
    return f"window={c.window}, sink={c.sink}: full-precision copies"
  if cache.key_norm_range is not None or cache.value_norm_range is not None:
    return "8-bit norms are not supported"
  if cache.head_dim % 64:
    return (f"head_dim={cache.head_dim}: the kernel needs a multiple of 64 "
            "(a key and a value fill whole warpgroup rows)")
  for name, q, t in (("keys", cache.key_quantizer, cache.keys),
                     ("values", cache.value_quantizer, cache.values)):
    for part, _ in kernel_parts.tensor_parts(q, t):
      if part.method != turboquant.Method.MSE:
        return f"{name}: method {part.method!r}; the kernel writes mse codes"
      if not 1 <= part.mse_bits <= MAX_BITS:
        return (f"{name}: {part.mse_bits} bits; the kernel handles "
                f"1-{MAX_BITS}")
  return None


@dataclasses.dataclass(frozen=True)
class Part:
  """One quantizer's share of quantize_token's f32[2, D] block: row 0 (the
  key) or 1 (the value), rotated coordinates [start, stop) (the whole row,
  or one part of the outlier split), mse codes of `bits`, with or without
  norm correction."""
  row: int
  start: int
  stop: int
  bits: int
  correction: bool


def parts_of(cache) -> tuple[Part, ...]:
  """The key's parts, then the value's, in the order the cache stores them
  (kernel_parts.cache_parts: the split's outlier part first,
  split.folded_rotation's rows [0, O))."""
  out = []
  for row, (q, t) in enumerate(((cache.key_quantizer, cache.keys),
                                (cache.value_quantizer, cache.values))):
    start = 0
    for part, _ in kernel_parts.tensor_parts(q, t):
      out.append(Part(row, start, start + part.dim, part.mse_bits,
                      bool(part.norm_correction)))
      start += part.dim
  return tuple(out)


def _pack(codes: list, dim: int, bits: int) -> list:
  """The packed bytes (packing.pack's layout) of `dim` scalar codes, as
  i32 scalars in byte order."""
  words = []
  for width, shift, _, n_words in packing.plane_layout(dim, bits):
    per_word = 8 // width
    mask = (1 << width) - 1
    for i in range(n_words):
      word = jnp.int32(0)
      for slot in range(per_word):
        j = slot * n_words + i
        if j < dim:
          word = word | (((codes[j] >> shift) & mask) << (slot * width))
      words.append(word)
  return words


def _masks(parts: tuple[Part, ...], row, col, dim: int) -> list:
  """bool[2, D] per part: where its coordinates sit in the block (row,
  col: i32[2, D], each element's row and column; col only needed where a
  part covers part of a row)."""
  masks = []
  for p in parts:
    mask = row == p.row
    if (p.start, p.stop) != (0, dim):
      mask = mask & (col >= p.start) & (col < p.stop)
    masks.append(mask)
  return masks


def _sums(masks: list, x) -> list:
  """Σ of x: f32[2, D] over each part's coordinates."""
  return [jnp.sum(jnp.where(m, x, 0.0)) for m in masks]


def _per_part(masks: list, values: list):
  """f32[2, D]: each part's scalar at its coordinates."""
  out = values[-1]
  for m, value in zip(masks[:-1], values[:-1]):
    out = jnp.where(m, value, out)
  return out


def _entry(table, k, i):
  """table[i], of head k where the table is one per KV head ([K, n])."""
  return table[k, i] if len(table.shape) == 2 else table[i]


def quantize_token(k_ref, v_ref, rot_ref, tables, codes_smem, b, k, *,
                   dim: int, parts: tuple[Part, ...],
                   norm_dtypes) -> list[tuple[list, jax.Array]]:
  """Rotates and quantizes the key and the value of sequence b, head k (one
  or two coordinates of each per thread of a warpgroup): per part (keys',
  then values'; parts_of), the packed bytes (i32 scalars in packing.pack's
  order) and the norm as stored (norm_dtypes[part]; NaN where the part's
  channels hold a non-finite input).

  rot_ref: f32[D, 2, D], rot[j, t, i] = Π_t[i, j] (column j of each
  rotation, keys' then values', contiguous), or f32[K, D, 2, D] per KV head
  (split.folded_rotation's columns). tables: per part (thresholds,
  centroids), each [n] or per KV head [K, n]. codes_smem: i32[2, D]
  scratch.
  """
  layout = plgpu.Layout.WG_STRIDED((2, dim), vec_size=min(2, dim // 64))
  def iota(axis):
    return plgpu.layout_cast(
        jax.lax.broadcasted_iota(jnp.int32, (2, dim), axis), layout)
  row = iota(0)
  col = iota(1) if any((p.start, p.stop) != (0, dim) for p in parts) else None
  is_key = row == 0
  masks = _masks(parts, row, col, dim)
  # y = Π x, f32[2, D]: row 0 the key, row 1 the value; a column of each
  # rotation times one coordinate of each input per step.
  folded = len(rot_ref.shape) == 4
  y = jnp.zeros((2, dim), jnp.float32)
  for j in range(dim):
    column = plgpu.layout_cast(rot_ref[k, j] if folded else rot_ref[j],
                               layout)
    term = column * jnp.where(is_key, k_ref[b, k, j].astype(jnp.float32),
                              v_ref[b, k, j].astype(jnp.float32))
    if folded:    # a channel reaches its own part only: 0 · inf is no NaN
      term = jnp.where(column != 0.0, term, 0.0)
    y = y + term
  # x·0 sums to NaN exactly when some coordinate is NaN or ±inf.
  probes = _sums(masks, y * 0.0)
  squares = _sums(masks, y * y)
  finite = [p == p for p in probes]
  norms = [jnp.where(f, jnp.sqrt(s), 0.0) for f, s in zip(finite, squares)]
  divisors = [jnp.where(n > 0, n, 1.0) for n in norms]
  unit = jnp.where(_per_part(masks, finite), y, 0.0) / _per_part(masks,
                                                                divisors)
  # Code = the count of thresholds below; a table with fewer thresholds is
  # padded with +inf. value: the centroid itself, for the norm correction
  # (only where a part asks for it).
  sizes = [2 ** p.bits for p in parts]
  correct = any(p.correction for p in parts)
  inf = float("inf")
  code = jnp.zeros((2, dim), jnp.int32)
  value = _per_part(masks, [_entry(cen, k, 0) for _, cen in tables]
                    ) if correct else None
  for t in range(max(sizes) - 1):
    above = unit > _per_part(masks, [
        _entry(thr, k, t) if t < n - 1 else inf
        for (thr, _), n in zip(tables, sizes)])
    code = code + above.astype(jnp.int32)
    if correct:
      value = jnp.where(above, _per_part(masks, [
          _entry(cen, k, min(t + 1, n - 1))
          for (_, cen), n in zip(tables, sizes)]), value)
  c_squares = _sums(masks, value * value) if correct else None
  codes_smem[...] = code
  plgpu.commit_smem()              # every thread reads every code below
  out = []
  for i, (p, dtype) in enumerate(zip(parts, norm_dtypes)):
    norm = norms[i]
    if p.correction:
      norm = norm / jnp.sqrt(c_squares[i])          # ‖c[idx]‖ > 0 always
    stored = jnp.where(finite[i], norm, jnp.nan).astype(dtype)
    words = _pack([codes_smem[p.row, j] for j in range(p.start, p.stop)],
                  p.stop - p.start, p.bits)
    out.append((words, stored))
  return out


def _kernel(lengths_ref, k_ref, v_ref, rot_ref, *refs, dim, parts,
            capacity):
  """Program (b, k): quantize_token, each part's bytes and norm written at
  position lengths[b], then new_lengths[b] set. refs: per part
  (thresholds, centroids), per part (codes, norms), new_lengths, the codes'
  SMEM scratch."""
  n = len(parts)
  tables = list(zip(refs[:2 * n:2], refs[1:2 * n:2]))
  stored = list(zip(refs[2 * n:4 * n:2], refs[2 * n + 1:4 * n:2]))
  new_lengths_ref, codes_smem = refs[4 * n:]
  b, k = jax.lax.axis_index("b"), jax.lax.axis_index("k")
  pos = lengths_ref[b]
  quantized = quantize_token(
      k_ref, v_ref, rot_ref, tables, codes_smem, b, k, dim=dim, parts=parts,
      norm_dtypes=[norms.dtype for _, norms in stored])
  for (words, norm), (codes_ref, norms_ref) in zip(quantized, stored):

    @pl.when(pos < capacity)       # a full sequence drops its token
    def _(words=words, norm=norm, codes_ref=codes_ref, norms_ref=norms_ref):
      for i, word in enumerate(words):
        codes_ref[b, k, pos, i] = word.astype(jnp.uint8)
      norms_ref[b, k, pos] = norm

  @pl.when(k == 0)
  def _():
    new_lengths_ref[b] = jnp.minimum(pos + 1, capacity)


def columns(kq, vq) -> jax.Array:
  """f32[D, 2, D]: [j, t, i] = Π_t[i, j] for t = keys, values."""
  return jnp.stack([rotation.as_matrix(kq.rotation).T,
                    rotation.as_matrix(vq.rotation).T], 1)


def cache_columns(cache) -> jax.Array:
  """quantize_token's rot_ref for `cache`: columns() of its rotations, or
  where a tensor is split f32[K, D, 2, D], each KV head's columns of its
  folded rotation (kept by the cache; derived where it does not keep them)
  and of the other tensor's rotation."""
  kq, vq = cache.key_quantizer, cache.value_quantizer
  is_split = [isinstance(q, split.SplitQuantizer) for q in (kq, vq)]
  if not any(is_split):
    return columns(kq, vq)

  def shared(q):                          # f32[K, D, D]: [k, j, i]
    matrix = rotation.as_matrix(q.rotation).T
    return jnp.broadcast_to(matrix, (cache.kv_heads, *matrix.shape))

  # The folded rotations as the decode kernels take them (the keys' E,
  # the values' Eᵀ): columns of E are rows of Eᵀ.
  keys = (jnp.swapaxes(kernel_parts.rotation_matrix(
      kq, cache.key_split_rotation), 1, 2) if is_split[0] else shared(kq))
  values = (kernel_parts.output_rotation(cache)[0] if is_split[1]
            else shared(vq))
  return jnp.stack([keys, values], 2)


def part_tables(cache) -> list:
  """Per part (parts_of's order): (thresholds, centroids)."""
  return [(q.thresholds, q.centroids)
          for q, _ in kernel_parts.cache_parts(cache)]


def stored_parts(cache) -> list:
  """Per part (parts_of's order): the stored QuantizedTensor."""
  return [t for _, t in kernel_parts.cache_parts(cache)]


def with_stored_parts(cache, quantized: list):
  """The cache with its parts' QuantizedTensors replaced (stored_parts'
  order)."""
  def rebuild(old, new):
    if isinstance(old, split.SplitQuantizedTensor):
      return dataclasses.replace(old, outlier=new[0], regular=new[1])
    return new[0]
  n_keys = len(kernel_parts.tensor_parts(cache.key_quantizer, cache.keys))
  return dataclasses.replace(
      cache, keys=rebuild(cache.keys, quantized[:n_keys]),
      values=rebuild(cache.values, quantized[n_keys:]))


def centered_keys(cache, k: jax.Array) -> jax.Array:
  """[B, K, D]: the token's keys as the cache quantizes them (centered
  where the cache centers keys), from k [B, K, 1, D]."""
  return turboquant_cache._center(cache, k)[:, :, 0]  # pylint: disable=protected-access


def append(cache: turboquant_cache.TurboQuantCache, k: jax.Array,
           v: jax.Array, *, interpret=None
           ) -> turboquant_cache.TurboQuantCache:
  """The cache with one more token per sequence, k, v: [B, K, 1, D].

  Like turboquant_cache.append under jit: a sequence at its capacity keeps
  its length and drops the token; others are unaffected. Jittable; raises
  NotImplementedError where `supported` says no. interpret: None runs
  Mosaic GPU's interpret mode when the backend is not a GPU.
  """
  reason = supported(cache, k.shape[2])
  if reason:
    raise NotImplementedError(reason)
  parts = parts_of(cache)
  stored = stored_parts(cache)
  refs = [jax.new_ref(a) for t in stored for a in (t.codes, t.norms)]
  kernel = plgpu.kernel(
      functools.partial(_kernel, dim=cache.head_dim, parts=parts,
                        capacity=cache.capacity),
      out_type=jax.ShapeDtypeStruct((cache.batch,), jnp.int32),
      grid=(cache.batch, cache.kv_heads),
      grid_names=("b", "k"),
      scratch_types=[plgpu.SMEM((2, cache.head_dim), jnp.int32)],
      interpret=attention_gpu.interpret_params(interpret))
  lengths = kernel(cache.lengths.astype(jnp.int32), centered_keys(cache, k),
                   v[:, :, 0], cache_columns(cache),
                   *[a for pair in part_tables(cache) for a in pair], *refs)
  written = [dataclasses.replace(t, codes=refs[2 * i][...],
                                 norms=refs[2 * i + 1][...])
             for i, t in enumerate(stored)]
  return dataclasses.replace(with_stored_parts(cache, written),
                             lengths=lengths)


append_jit = jax.jit(append, static_argnames=("interpret",))
