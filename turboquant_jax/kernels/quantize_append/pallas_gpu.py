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
differed on the H200 at D = 64, 128, 256.

Supported: head dims a multiple of 64, keys and values of method mse at
integer bits 1-4, norms stored in 16 or 32 bits, no window, sink or outlier
split, one token; `supported` says why not otherwise.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from turboquant_jax.cache import turboquant_cache
from turboquant_jax.kernels.decode_attention import pallas_gpu as attention_gpu
from turboquant_jax.quant import packing
from turboquant_jax.quant import rotation
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
  if cache.is_split:
    return (f"key_bits={c.key_bits}, value_bits={c.value_bits}: fractional "
            "bits (the outlier split) are not supported")
  if c.window or c.sink:
    return f"window={c.window}, sink={c.sink}: full-precision copies"
  if cache.key_norm_range is not None or cache.value_norm_range is not None:
    return "8-bit norms are not supported"
  if cache.head_dim % 64:
    return (f"head_dim={cache.head_dim}: the kernel needs a multiple of 64 "
            "(a key and a value fill whole warpgroup rows)")
  for name, q in (("keys", cache.key_quantizer),
                  ("values", cache.value_quantizer)):
    if q.method != turboquant.Method.MSE:
      return f"{name}: method {q.method!r}; the kernel writes mse codes"
    if not 1 <= q.mse_bits <= MAX_BITS:
      return f"{name}: {q.mse_bits} bits; the kernel handles 1-{MAX_BITS}"
  return None


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


def _split_sums(is_key, x) -> tuple:
  """(Σ over the keys' row, Σ over the values' row) of x: f32[2, D]."""
  return (jnp.sum(jnp.where(is_key, x, 0.0)),
          jnp.sum(jnp.where(is_key, 0.0, x)))


def _per_row(is_key, key_value, value_value):
  """f32[2, D]: the keys' scalar on row 0, the values' on row 1."""
  return jnp.where(is_key, key_value, value_value)


def quantize_token(k_ref, v_ref, rot_ref, k_thr, k_cen, v_thr, v_cen,
                   codes_smem, b, k, *, dim: int, key_spec: dict,
                   value_spec: dict,
                   norm_dtypes) -> list[tuple[list, jax.Array]]:
  """Rotates and quantizes the key and the value of sequence b, head k (one
  or two coordinates of each per thread of a warpgroup): per tensor (keys,
  values), the packed bytes (i32 scalars in packing.pack's order) and the
  norm as stored (norm_dtypes[0 or 1]; NaN for a non-finite input).

  rot_ref: f32[D, 2, D], rot[j, t, i] = Π_t[i, j] (column j of each
  rotation, keys' then values', contiguous). codes_smem: i32[2, D] scratch.
  """
  layout = plgpu.Layout.WG_STRIDED((2, dim), vec_size=min(2, dim // 64))
  is_key = plgpu.layout_cast(
      jax.lax.broadcasted_iota(jnp.int32, (2, dim), 0), layout) == 0
  # y = Π x, f32[2, D]: row 0 the key, row 1 the value; a column of each
  # rotation times one coordinate of each input per step.
  y = jnp.zeros((2, dim), jnp.float32)
  for j in range(dim):
    column = plgpu.layout_cast(rot_ref[j], layout)
    y = y + column * _per_row(is_key, k_ref[b, k, j].astype(jnp.float32),
                              v_ref[b, k, j].astype(jnp.float32))
  # x·0 sums to NaN exactly when some coordinate is NaN or ±inf.
  probes = _split_sums(is_key, y * 0.0)
  squares = _split_sums(is_key, y * y)
  finite = [p == p for p in probes]
  norms = [jnp.where(f, jnp.sqrt(s), 0.0) for f, s in zip(finite, squares)]
  divisors = [jnp.where(n > 0, n, 1.0) for n in norms]
  unit = jnp.where(_per_row(is_key, finite[0], finite[1]), y, 0.0) / (
      _per_row(is_key, divisors[0], divisors[1]))
  # Code = the count of thresholds below; a table with fewer thresholds is
  # padded with +inf. value: the centroid itself, for the norm correction
  # (only where a tensor asks for it).
  n_k, n_v = 2 ** key_spec["bits"], 2 ** value_spec["bits"]
  correct = key_spec["correction"] or value_spec["correction"]
  inf = float("inf")
  code = jnp.zeros((2, dim), jnp.int32)
  value = _per_row(is_key, k_cen[0], v_cen[0]) if correct else None
  for t in range(max(n_k, n_v) - 1):
    above = unit > _per_row(is_key, k_thr[t] if t < n_k - 1 else inf,
                            v_thr[t] if t < n_v - 1 else inf)
    code = code + above.astype(jnp.int32)
    if correct:
      value = jnp.where(above, _per_row(
          is_key, k_cen[min(t + 1, n_k - 1)], v_cen[min(t + 1, n_v - 1)]),
                        value)
  c_squares = _split_sums(is_key, value * value) if correct else None
  codes_smem[...] = code
  plgpu.commit_smem()              # every thread reads every code below
  out = []
  for row, (part, dtype) in enumerate(zip((key_spec, value_spec),
                                          norm_dtypes)):
    norm = norms[row]
    if part["correction"]:
      norm = norm / jnp.sqrt(c_squares[row])       # ‖c[idx]‖ > 0 always
    stored = jnp.where(finite[row], norm, jnp.nan).astype(dtype)
    words = _pack([codes_smem[row, j] for j in range(dim)], dim,
                  part["bits"])
    out.append((words, stored))
  return out


def _kernel(lengths_ref, k_ref, v_ref, rot_ref, k_thr, k_cen, v_thr, v_cen,
            k_codes, k_norms, v_codes, v_norms, new_lengths_ref, codes_smem,
            *, dim, key_spec, value_spec, capacity):
  """Program (b, k): quantize_token, its bytes and norms written at
  position lengths[b], then new_lengths[b] set."""
  b, k = jax.lax.axis_index("b"), jax.lax.axis_index("k")
  pos = lengths_ref[b]
  quantized = quantize_token(
      k_ref, v_ref, rot_ref, k_thr, k_cen, v_thr, v_cen, codes_smem, b, k,
      dim=dim, key_spec=key_spec, value_spec=value_spec,
      norm_dtypes=(k_norms.dtype, v_norms.dtype))
  for (words, stored), codes_ref, norms_ref in zip(
      quantized, (k_codes, v_codes), (k_norms, v_norms)):

    @pl.when(pos < capacity)       # a full sequence drops its token
    def _(words=words, stored=stored, codes_ref=codes_ref,
          norms_ref=norms_ref):
      for i, word in enumerate(words):
        codes_ref[b, k, pos, i] = word.astype(jnp.uint8)
      norms_ref[b, k, pos] = stored

  @pl.when(k == 0)
  def _():
    new_lengths_ref[b] = jnp.minimum(pos + 1, capacity)


def columns(kq, vq) -> jax.Array:
  """f32[D, 2, D]: [j, t, i] = Π_t[i, j] for t = keys, values."""
  return jnp.stack([rotation.as_matrix(kq.rotation).T,
                    rotation.as_matrix(vq.rotation).T], 1)


def spec(q: turboquant.Quantizer) -> dict:
  """quantize_token's static description of a quantizer."""
  return dict(dim=q.dim, bits=q.mse_bits, correction=q.norm_correction)


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
  kq, vq = cache.key_quantizer, cache.value_quantizer
  keys = centered_keys(cache, k)
  tables = (kq.thresholds, kq.centroids, vq.thresholds, vq.centroids)
  refs = [jax.new_ref(a) for a in (cache.keys.codes, cache.keys.norms,
                                   cache.values.codes, cache.values.norms)]
  kernel = plgpu.kernel(
      functools.partial(_kernel, dim=cache.head_dim, key_spec=spec(kq),
                        value_spec=spec(vq), capacity=cache.capacity),
      out_type=jax.ShapeDtypeStruct((cache.batch,), jnp.int32),
      grid=(cache.batch, cache.kv_heads),
      grid_names=("b", "k"),
      scratch_types=[plgpu.SMEM((2, cache.head_dim), jnp.int32)],
      interpret=attention_gpu.interpret_params(interpret))
  lengths = kernel(cache.lengths.astype(jnp.int32), keys, v[:, :, 0],
                   columns(kq, vq), *tables, *refs)
  k_codes, k_norms, v_codes, v_norms = (r[...] for r in refs)
  return dataclasses.replace(
      cache,
      keys=dataclasses.replace(cache.keys, codes=k_codes, norms=k_norms),
      values=dataclasses.replace(cache.values, codes=v_codes, norms=v_norms),
      lengths=lengths)


append_jit = jax.jit(append, static_argnames=("interpret",))
