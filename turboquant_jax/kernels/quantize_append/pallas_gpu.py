"""Quantize-and-append of one decode token as one Mosaic GPU kernel.

A decode step appends one token per sequence to every layer's cache. Left
to XLA, a TurboQuant append is about ten small kernels a layer (the norm,
the rotation, the code search and packing, then four scatters: codes and
norms of keys and values) against the bf16 cache's two scatters; on the
H200 at the SmolLM2 shape that is ~18 µs a layer, about the whole gap
between the two caches' decode speed (results/decode_bench/h200_v7). Here XLA
rotates the new keys and values (Π x, one batched product) and one kernel
does the rest: program (b, k, tensor) takes the rotated vector, its norm,
each coordinate's nearest centroid, the packed bytes and the stored norm,
and writes them at position lengths[b] of the cache. The cache's arrays
enter as mutable refs, which XLA aliases to the kernel's outputs, so in a
decode loop (cache donated, or carried) the write is in place.

A program's work is a few thousand scalar instructions, done alike by
every thread of its warpgroup (a vector of D <= 256 codes needs no
per-thread layout); it should cost about a launch (not yet measured: the
kernel has not run on a GPU; experiments/probes/decode_kernel_variants.py
--append checks and times it there).

The reference is the XLA path (`turboquant_cache.append(impl="xla")`):
the same codes except for coordinates within rounding of a threshold (the
norm is summed in another order, and taken of Πx rather than x, equal up
to rounding as Π is orthogonal).

Supported: keys and values of method mse at integer bits 1-4, norms stored
in 16 or 32 bits, no window, sink or outlier split, one token; `supported`
says why not otherwise.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from turboquant_jax.cache import turboquant_cache
from turboquant_jax.quant import packing
from turboquant_jax.quant import rotation
from turboquant_jax.quant import turboquant

MAX_BITS = 4            # 2^b - 1 scalar compares a coordinate


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


def _encode_write(b, k, pos, y_ref, tensor, table_ref, codes_ref, norms_ref,
                  *, dim: int, bits: int, correction: bool, capacity: int):
  """Quantizes y[tensor, b, k] (rotated, f32[D]) and writes its bytes and
  norm at position `pos` of sequence b, head k (nothing at pos >= capacity).

  table_ref: f32[2^b - 1 + 2^b], the thresholds then the centroids.
  """
  n = 2 ** bits
  thresholds = [table_ref[i] for i in range(n - 1)]
  centroids = [table_ref[n - 1 + i] for i in range(n)]
  ys = [y_ref[tensor, b, k, j] for j in range(dim)]
  squares, probe = ys[0] * ys[0], ys[0] * 0.0
  for y in ys[1:]:
    squares = squares + y * y
    probe = probe + y * 0.0           # NaN iff some coordinate is not finite
  finite = probe == probe
  norm = jnp.where(finite, jnp.sqrt(squares), 0.0)
  divisor = jnp.where(norm > 0, norm, 1.0)
  codes, c_squares = [], 0.0
  for y in ys:
    unit = jnp.where(finite, y, 0.0) / divisor
    code, value = jnp.int32(0), centroids[0]
    for t in range(n - 1):
      above = unit > thresholds[t]
      code = code + above.astype(jnp.int32)
      if correction:          # the centroid itself, for the norm correction
        value = jnp.where(above, centroids[t + 1], value)
    codes.append(code)
    if correction:
      c_squares = c_squares + value * value
  scale = norm / jnp.sqrt(c_squares) if correction else norm
  stored = jnp.where(finite, scale, jnp.nan).astype(norms_ref.dtype)
  words = _pack(codes, dim, bits)

  @pl.when(pos < capacity)
  def _():
    for i, word in enumerate(words):
      codes_ref[b, k, pos, i] = word.astype(jnp.uint8)
    norms_ref[b, k, pos] = stored


def _kernel(lengths_ref, y_ref, k_table, v_table, k_codes, k_norms,
            v_codes, v_norms, *, key_spec, value_spec, capacity):
  b, k = jax.lax.axis_index("b"), jax.lax.axis_index("k")
  tensor = jax.lax.axis_index("t")
  pos = lengths_ref[b]
  for index, (table, codes, norms, spec) in enumerate((
      (k_table, k_codes, k_norms, key_spec),
      (v_table, v_codes, v_norms, value_spec))):
    pl.when(tensor == index)(functools.partial(
        _encode_write, b, k, pos, y_ref, index, table, codes, norms,
        capacity=capacity, **spec))


def _rotated(kq, vq, keys: jax.Array, values: jax.Array) -> jax.Array:
  """f32[2, B, K, D]: Π_k keys and Π_v values, one batched product when
  both rotations are matrices (one launch, not two)."""
  if kq.rotation.matrix is not None and vq.rotation.matrix is not None:
    return jnp.einsum("tbkj,tij->tbki", jnp.stack([keys, values]),
                      jnp.stack([kq.rotation.matrix, vq.rotation.matrix]),
                      precision=jax.lax.Precision.HIGHEST)
  return jnp.stack([rotation.apply(kq.rotation, keys),
                    rotation.apply(vq.rotation, values)])


def _spec(q: turboquant.Quantizer) -> dict:
  return dict(dim=q.dim, bits=q.mse_bits, correction=q.norm_correction)


def _interpret_params(interpret):
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  if interpret is True:
    return plgpu.InterpretGPUParams()
  return None if interpret is False else interpret


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
  keys = turboquant_cache._center(cache, k)[:, :, 0]  # pylint: disable=protected-access
  y = _rotated(kq, vq, keys.astype(jnp.float32),
               v[:, :, 0].astype(jnp.float32))
  tables = [jnp.concatenate([q.thresholds, q.centroids]) for q in (kq, vq)]
  refs = [jax.new_ref(a) for a in (cache.keys.codes, cache.keys.norms,
                                   cache.values.codes, cache.values.norms)]
  kernel = plgpu.kernel(
      functools.partial(_kernel, key_spec=_spec(kq), value_spec=_spec(vq),
                        capacity=cache.capacity),
      out_type=(), grid=(cache.batch, cache.kv_heads, 2),
      grid_names=("b", "k", "t"), interpret=_interpret_params(interpret))
  kernel(cache.lengths.astype(jnp.int32), y, *tables, *refs)
  k_codes, k_norms, v_codes, v_norms = (r[...] for r in refs)
  return dataclasses.replace(
      cache,
      keys=dataclasses.replace(cache.keys, codes=k_codes, norms=k_norms),
      values=dataclasses.replace(cache.values, codes=v_codes, norms=v_norms),
      lengths=jnp.minimum(cache.lengths + 1, cache.capacity))


append_jit = jax.jit(append, static_argnames=("interpret",))
