"""The TurboQuant KV cache: packed codes + norms per token, a pytree.

Keys and values are stored as QuantizedTensors of shape [B, K, S] (packed
codes u8[B, K, S, P], norms f16[B, K, S], and for prod keys the QJL signs and
residual norms). Integer bit widths share one quantizer (one rotation) across
heads; fractional widths use the outlier split with one SplitQuantizer per KV
head (leaves stacked on a leading K axis), whose outlier channels are the
top-O channels by L2 norm of that head's prefill keys (values: prefill
values), fixed afterwards. An optional ring of the last W tokens is also kept
in full precision; attention reads those positions from the ring. With
config.center_keys, every key is stored minus a per-(sequence, head) mean of
the prefill keys (kept in `key_mean`; the first config.center_skip tokens
left out of it): softmax ignores q·mean.

With 8-bit norms (config.norm_bits = 8, or per tensor key_norm_bits /
value_norm_bits) every norm field (the scale of each part, and the
QJL residual norm of prod keys) is stored as a u8 code uniform in log(norm)
(common.encode_log) over a range per (sequence, KV head, field) kept in
`key_norm_range` / `value_norm_range`. The range is set by a sequence's
first write: the prefill's valid tokens (or, for a sequence with an empty
prefill or none, its first appended chunk), widened by common.LOG_MARGIN on
each side; later norms outside it clamp to its ends. Online and
calibration-free, like the outlier channels. `tensors` decodes the norms
for attention.

With config.sink = N the first N tokens of each sequence are also kept in
full precision (`sink_keys` / `sink_values`) and read from there; a
position in both the sink and the window is read from the sink.
"""

import dataclasses

import jax
import jax.numpy as jnp

from turboquant_jax.cache import common
from turboquant_jax.cache.config import CacheConfig
from turboquant_jax.quant import api
from turboquant_jax.quant import rotation
from turboquant_jax.quant import split
from turboquant_jax.quant import turboquant


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TurboQuantCache:
  """Compressed keys and values of B sequences, K KV heads, capacity S.

  Attributes:
    keys, values: QuantizedTensor or SplitQuantizedTensor, shape [B, K, S].
    key_quantizer, value_quantizer: Quantizer (shared by all heads) or
      SplitQuantizer with leaves stacked over K.
    window_keys, window_values: [B, K, W, D] full-precision ring, or None.
    lengths: i32[B] tokens stored per sequence.
    config: the CacheConfig (static).
    key_mean: [B, K, D] (config.dtype) subtracted from every key before it
      is stored, set by prefill (config.center_keys), else None.
    key_norm_range, value_norm_range: f32[B, K, F, 2] (lo, hi) of log(norm)
      per norm field (F: one per part, two for prod keys) where that
      tensor's norms are 8-bit (NaN until the sequence's first write), else
      None.
    sink_keys, sink_values: [B, K, N, D] (config.dtype) the first N =
      config.sink tokens (keys centered like the codes), or None.
    rotation_tiles: f16[2, G², 64, 64], Π_k's and Π_v's tiles (G = D / 64,
      rotation.as_tiles) as the GPU decode kernel reads them where it
      rotates queries and outputs itself, made once by init (integer bits,
      mse keys, no window, D a multiple of 64 up to 128), else None; for
      the outlier split at D = 64 with parts of 32, f16[2, K, 1, 64, 64]:
      the folded rotations per KV head (kernel_rotation_tiles), made again
      by prefill. Fixed
      for the cache's life like the rotations: kept here because XLA does
      not hoist laying them out from a decode loop (two converts a layer
      every step, 84 µs of a SmolLM2 step at B = 1 on the H200).
    key_split_rotation, value_split_rotation: f32[K, D, D] per KV head,
      split.folded_rotation of that tensor's SplitQuantizer (both parts'
      channel gathers and rotations as one matrix) where its bits are
      fractional, else None; the values' transposed (channels first), the
      form the rotation back reads row by row (stored untransposed, XLA
      transposed it in a kernel of its own every decode step on the H200).
      Made by init and again by prefill (which
      chooses the outlier channels); the decode kernels' XLA work then
      rotates queries and outputs by one product each (parts.prepare,
      parts.finish): not a gather and two products before the kernel, two
      products and two scatters after it. Derivable from the quantizers
      (parts does so for a cache without them); kept, like rotation_tiles,
      so that a decode step does not rebuild them (stored against derived
      not yet timed).
  """
  keys: api.AnyQuantized
  values: api.AnyQuantized
  key_quantizer: api.AnyQuantizer
  value_quantizer: api.AnyQuantizer
  window_keys: jax.Array | None
  window_values: jax.Array | None
  lengths: jax.Array
  config: CacheConfig = dataclasses.field(metadata=dict(static=True))
  key_mean: jax.Array | None = None
  key_norm_range: jax.Array | None = None
  value_norm_range: jax.Array | None = None
  sink_keys: jax.Array | None = None
  sink_values: jax.Array | None = None
  rotation_tiles: jax.Array | None = None
  key_split_rotation: jax.Array | None = None
  value_split_rotation: jax.Array | None = None

  @property
  def batch(self) -> int:
    return self.lengths.shape[0]

  @property
  def kv_heads(self) -> int:
    return self.keys.shape[1]

  @property
  def capacity(self) -> int:
    return self.keys.shape[2]

  @property
  def head_dim(self) -> int:
    return self.keys.dim

  @property
  def is_split(self) -> bool:
    return isinstance(self.key_quantizer, split.SplitQuantizer)


def _make_quantizer(key, heads: int, dim: int, bits: float, method: str,
                    config: CacheConfig, norm_bits: int):
  # 8-bit norms are coded from the exact (float32) ones.
  norm_dtype = "float32" if norm_bits == 8 else config.norm_dtype
  kwargs = dict(norm_dtype=norm_dtype,
                norm_correction=config.norm_correction,
                rotation=config.rotation,
                **({"grid_centroids": True} if config.grid_centroids else {}))
  if float(bits).is_integer():
    return api.make_quantizer(key, dim, int(bits), method, **kwargs)
  num, hi, lo = split.split_for_bits(dim, float(bits))
  return jax.vmap(lambda k: split.make_split_quantizer(
      k, dim, hi, lo, num, method, **kwargs))(jax.random.split(key, heads))


def _quantize(q, x: jax.Array):
  """Quantizes x[B, K, T, D] with a shared or a per-head quantizer."""
  if isinstance(q, split.SplitQuantizer):
    return jax.vmap(split.quantize, in_axes=(0, 1), out_axes=1)(q, x)
  return turboquant._quantize(q, x)


def _dequantize(q, qt) -> jax.Array:
  if isinstance(q, split.SplitQuantizer):
    return jax.vmap(split.dequantize, in_axes=(0, 1), out_axes=1)(q, qt)
  return turboquant._dequantize(q, qt)


def _norm_arrays(qt) -> list:
  """The per-vector norm fields of a (split) quantized tensor, in a fixed
  order: [outlier part's, regular part's]; per part scale, residual norm."""
  if isinstance(qt, split.SplitQuantizedTensor):
    return _norm_arrays(qt.outlier) + _norm_arrays(qt.regular)
  return [a for a in (qt.norms, qt.residual_norms) if a is not None]


def _with_norms(qt, arrays: list):
  """qt with its norm fields replaced by `arrays` (order of _norm_arrays)."""
  if isinstance(qt, split.SplitQuantizedTensor):
    n = len(_norm_arrays(qt.outlier))
    return dataclasses.replace(qt, outlier=_with_norms(qt.outlier,
                                                       arrays[:n]),
                               regular=_with_norms(qt.regular, arrays[n:]))
  it = iter(arrays)
  return dataclasses.replace(
      qt, norms=None if qt.norms is None else next(it),
      residual_norms=None if qt.residual_norms is None else next(it))


def _encode_norms(qt, rng: jax.Array, valid: jax.Array):
  """(qt with u8 norm codes, range) for tokens qt [B, K, T] being written.

  rng: f32[B, K, F, 2]; a sequence whose range is unset (NaN) takes it
  from this write's valid tokens (valid: bool[B, T]).
  """
  norms = _norm_arrays(qt)
  new = jnp.stack([common.log_range(n, valid[:, None, :]) for n in norms],
                  axis=2)
  rng = jnp.where(jnp.isnan(rng), new, rng)
  codes = [common.encode_log(n, rng[:, :, f]) for f, n in enumerate(norms)]
  return _with_norms(qt, codes), rng


def _decode_norms(qt, rng: jax.Array):
  return _with_norms(qt, [common.decode_log(c, rng[:, :, f])
                          for f, c in enumerate(_norm_arrays(qt))])


def tensors(cache: TurboQuantCache) -> tuple[api.AnyQuantized,
                                              api.AnyQuantized]:
  """(keys, values) [B, K, S] as attention reads them: 8-bit norms decoded
  to f32 (the codes unchanged); 16-bit ones as stored."""
  return tuple(qt if rng is None else _decode_norms(qt, rng) for qt, rng in (
      (cache.keys, cache.key_norm_range),
      (cache.values, cache.value_norm_range)))


def init(config: CacheConfig, batch: int, kv_heads: int, capacity: int,
         head_dim: int, *, key: jax.Array | None = None) -> TurboQuantCache:
  """An empty cache with static capacity; `key` draws the rotations."""
  if config.kind != "turboquant":
    raise ValueError(f"config.kind={config.kind!r}: expected 'turboquant'")
  common.check_dims(batch=batch, kv_heads=kv_heads, capacity=capacity,
                    head_dim=head_dim)
  key = jax.random.key(0) if key is None else key
  k_key, v_key = jax.random.split(key)
  kq = _make_quantizer(k_key, kv_heads, head_dim, config.key_bits,
                       config.key_method, config, config.norm_bits_of("keys"))
  vq = _make_quantizer(v_key, kv_heads, head_dim, config.value_bits, "mse",
                       config, config.norm_bits_of("values"))
  zeros = jnp.zeros((batch, kv_heads, capacity, head_dim), jnp.float32)
  stored, ranges = [], []
  for tensor, q in (("keys", kq), ("values", vq)):
    qt = jax.eval_shape(_quantize, q, zeros)
    rng = None
    if config.norm_bits_of(tensor) == 8:
      rng = jnp.full((batch, kv_heads, len(_norm_arrays(qt)), 2), jnp.nan,
                     jnp.float32)
      qt = _with_norms(qt, [jax.ShapeDtypeStruct(a.shape, jnp.uint8)
                            for a in _norm_arrays(qt)])
    stored.append(qt)
    ranges.append(rng)
  keys, values = stored
  empty = lambda s: jnp.zeros(s.shape, s.dtype)
  window = None
  if config.window:
    window = jnp.zeros((batch, kv_heads, config.window, head_dim),
                       jnp.dtype(config.dtype))
  sink = None
  if config.sink:
    sink = jnp.zeros((batch, kv_heads, config.sink, head_dim),
                     jnp.dtype(config.dtype))
  key_mean = None
  if config.center_keys:
    key_mean = jnp.zeros((batch, kv_heads, head_dim), jnp.dtype(config.dtype))
  return TurboQuantCache(
      keys=jax.tree.map(empty, keys), values=jax.tree.map(empty, values),
      key_quantizer=kq, value_quantizer=vq, window_keys=window,
      window_values=window, lengths=jnp.zeros((batch,), jnp.int32),
      config=config, key_mean=key_mean, key_norm_range=ranges[0],
      value_norm_range=ranges[1], sink_keys=sink, sink_values=sink,
      rotation_tiles=kernel_rotation_tiles(config, kq, vq, head_dim),
      key_split_rotation=split_rotation(kq),
      value_split_rotation=split_rotation(vq, transposed=True))


def split_rotation(q, transposed: bool = False) -> jax.Array | None:
  """f32[K, D, D]: split.folded_rotation per KV head (the form init and
  prefill keep as key_split_rotation), or with `transposed` its transpose
  per head (value_split_rotation), or None for a quantizer shared by all
  heads (integer bits)."""
  if not isinstance(q, split.SplitQuantizer):
    return None
  folded = jax.vmap(split.folded_rotation)(q)
  return jnp.swapaxes(folded, 1, 2) if transposed else folded


# The largest head dim whose rotations init lays out as rotation_tiles (the
# GPU kernel rotates in-kernel up to 128; its f16 tiles take 2·D²·2 bytes).
_TILED_MAX_DIM = 128


def kernel_rotation_tiles(config: CacheConfig, kq, vq,
                          head_dim: int) -> jax.Array | None:
  """rotation_tiles: Π_k's and Π_v's f16 64 x 64 tiles (rotation.as_tiles)
  where the GPU decode kernel can rotate this cache's queries and outputs
  itself (mse keys, no window, D a multiple of 64 up to 128), else None.

  Integer bits: f16[2, G², 64, 64], shared by all heads. The outlier
  split at D = 64 with parts of 32 coordinates (2.5, 3.5 bits; the kernel
  reads both parts as one group, pallas_gpu's merge_narrow): f16[2, K, 1,
  64, 64] per KV head, a split tensor's folded rotation (split.
  folded_rotation, rows [0, 32) its outlier part's), a shared one
  broadcast. Other splits: None.
  """
  if (config.key_method != "mse" or config.window or head_dim % 64
      or head_dim > _TILED_MAX_DIM):
    return None
  pair = (kq, vq)
  splits = [q for q in pair if isinstance(q, split.SplitQuantizer)]
  if not splits:
    return jnp.stack([rotation.as_tiles(q.rotation) for q in pair])
  if head_dim != 64 or any(q.outlier.dim != q.regular.dim for q in splits):
    return None
  heads = splits[0].outlier_channels.shape[0]
  return jnp.stack([
      split_rotation(q) if isinstance(q, split.SplitQuantizer)
      else jnp.broadcast_to(rotation.as_matrix(q.rotation),
                            (heads, head_dim, head_dim))
      for q in pair]).astype(jnp.float16)[:, :, None]


def _select_outliers(q, x: jax.Array, lengths: jax.Array):
  """Per-head top-O channels of x[B, K, T, D] over valid tokens."""
  if not isinstance(q, split.SplitQuantizer):
    return q
  valid = jnp.arange(x.shape[2])[None, :] < lengths[:, None]       # [B, T]
  xm = jnp.where(valid[:, None, :, None], x.astype(jnp.float32), 0.0)
  per_head = jnp.swapaxes(xm, 0, 1).reshape(x.shape[1], -1, x.shape[3])
  num = q.outlier_channels.shape[-1]
  channels = split.select_outliers(per_head, num)                  # [K, O]
  return jax.vmap(split.with_outlier_channels)(q, channels)


def _center(cache: TurboQuantCache, k: jax.Array) -> jax.Array:
  """Keys [B, K, T, D] minus the stored mean (unchanged without one)."""
  if cache.key_mean is None:
    return k
  return k.astype(jnp.float32) - cache.key_mean.astype(
      jnp.float32)[:, :, None, :]


def _prefill_mean(k: jax.Array, lengths: jax.Array, dtype,
                  skip: int = 0) -> jax.Array:
  """[B, K, D] mean of the valid prefill keys at positions >= skip (zero
  where there are none)."""
  pos = jnp.arange(k.shape[2])[None, :]
  valid = (pos >= skip) & (pos < lengths[:, None])                 # [B, T]
  total = jnp.sum(jnp.where(valid[:, None, :, None], k.astype(jnp.float32),
                            0.0), axis=2)
  count = jnp.maximum(lengths - skip, 1).astype(jnp.float32)[:, None, None]
  return (total / count).astype(dtype)


def _write(cache: TurboQuantCache, k, v, positions,
           ends) -> TurboQuantCache:
  new_k = _quantize(cache.key_quantizer, k)
  new_v = _quantize(cache.value_quantizer, v)
  valid = positions < ends[:, None]                                # [B, T]
  k_rng, v_rng = cache.key_norm_range, cache.value_norm_range
  if k_rng is not None:
    new_k, k_rng = _encode_norms(new_k, k_rng, valid)
  if v_rng is not None:
    new_v, v_rng = _encode_norms(new_v, v_rng, valid)
  cache = dataclasses.replace(cache, key_norm_range=k_rng,
                              value_norm_range=v_rng)
  keys = common.write_tree(cache.keys, new_k, positions)
  values = common.write_tree(cache.values, new_v, positions)
  wk, wv = cache.window_keys, cache.window_values
  if cache.config.window:
    slots = common.window_slots(positions, cache.config.window,
                                cache.capacity, ends)
    wk = common.write_tokens(wk, k, slots)
    wv = common.write_tokens(wv, v, slots)
  sk, sv = cache.sink_keys, cache.sink_values
  if cache.config.sink:       # slot p for position p < N (padding dropped)
    n = cache.config.sink
    slots = jnp.where((positions < n) & (positions < ends[:, None]),
                      positions, n)
    sk = common.write_tokens(sk, k, slots)
    sv = common.write_tokens(sv, v, slots)
  return dataclasses.replace(cache, keys=keys, values=values, window_keys=wk,
                             window_values=wv, sink_keys=sk, sink_values=sv)


@jax.jit
def _prefill(cache, k, v, lengths):
  # A prefill replaces the contents: 8-bit norms take new ranges from it.
  unset = lambda r: None if r is None else jnp.full_like(r, jnp.nan)
  cache = dataclasses.replace(cache,
                              key_norm_range=unset(cache.key_norm_range),
                              value_norm_range=unset(cache.value_norm_range))
  if cache.key_mean is not None:
    cache = dataclasses.replace(cache, key_mean=_prefill_mean(
        k, lengths, cache.key_mean.dtype, cache.config.center_skip))
    k = _center(cache, k)
  kq = _select_outliers(cache.key_quantizer, k, lengths)
  vq = _select_outliers(cache.value_quantizer, v, lengths)
  cache = dataclasses.replace(
      cache, key_quantizer=kq, value_quantizer=vq,
      key_split_rotation=split_rotation(kq),
      value_split_rotation=split_rotation(vq, transposed=True))
  if cache.rotation_tiles is not None:     # they follow the quantizers
    cache = dataclasses.replace(cache, rotation_tiles=kernel_rotation_tiles(
        cache.config, kq, vq, cache.head_dim))
  positions = jnp.broadcast_to(jnp.arange(k.shape[2]), (k.shape[0],
                                                        k.shape[2]))
  # Padding tokens past a sequence's length are never read (masked), and a
  # later append overwrites them.
  cache = _write(cache, k, v, positions, lengths)
  return dataclasses.replace(cache, lengths=lengths.astype(jnp.int32))


def prefill(cache: TurboQuantCache, k: jax.Array, v: jax.Array,
            lengths: jax.Array) -> TurboQuantCache:
  """Stores the prompts' keys/values, replacing the cache's contents.

  Args:
    cache: a cache from `init`.
    k, v: [B, K, T, D] (T <= capacity); tokens at t >= lengths[b] are padding.
    lengths: i32[B] valid tokens per sequence.
  """
  common.check_prefill(cache, k, v, lengths)
  return _prefill(cache, k, v, lengths)


@jax.jit
def _append(cache, k, v):
  positions = common.append_positions(cache.lengths, k.shape[2])
  ends = jnp.minimum(cache.lengths + k.shape[2], cache.capacity)
  cache = _write(cache, _center(cache, k), v, positions, ends)
  return dataclasses.replace(cache, lengths=ends)


def append(cache: TurboQuantCache, k: jax.Array, v: jax.Array, *,
           impl: str | None = None,
           interpret: bool | None = None) -> TurboQuantCache:
  """Appends T tokens to every sequence (decode: T = 1; a chunk: T > 1).

  Eagerly, appending past the capacity raises ValueError. Under jit the
  tokens that do not fit are dropped and that sequence's length stays at the
  capacity; other sequences are never affected.

  impl: "xla" (rotate, quantize, pack and scatter by XLA), "pallas_gpu"
  (one fused kernel, kernels/quantize_append; NotImplementedError where it
  does not support the cache; interpret: None runs its interpret mode off a
  GPU), or None: config.append_impl, where "pallas_gpu" falls back to
  "xla" off a GPU and for caches or chunks the kernel does not support.
  """
  common.check_append(cache, k, v)
  if impl not in (None, "xla", "pallas_gpu"):
    raise ValueError(f"{impl=!r} must be None, 'xla' or 'pallas_gpu'")
  if (impl or cache.config.append_impl) == "xla":
    return _append(cache, k, v)
  # pylint: disable-next=g-import-not-at-top (the kernel imports this module)
  from turboquant_jax.kernels.quantize_append import pallas_gpu
  if impl is None and (jax.default_backend() != "gpu"
                       or pallas_gpu.supported(cache, k.shape[2])):
    return _append(cache, k, v)
  return pallas_gpu.append_jit(cache, k, v, interpret=interpret)


@jax.jit
def dequantize(cache: TurboQuantCache) -> tuple[jax.Array, jax.Array]:
  """f32[B, K, S, D] keys and values as attention sees them.

  Positions held by the full-precision window or sink come from there. With
  config.center_keys the keys are the centered ones (minus key_mean).
  """
  keys, values = tensors(cache)
  k = _dequantize(cache.key_quantizer, keys)
  v = _dequantize(cache.value_quantizer, values)
  if cache.config.window:
    pos = common.window_positions(cache.lengths, cache.config.window)
    pos = jnp.where(pos >= 0, pos, cache.capacity)        # empty slot: drop
    k = common.write_tokens(k, cache.window_keys.astype(jnp.float32), pos)
    v = common.write_tokens(v, cache.window_values.astype(jnp.float32), pos)
  if cache.config.sink:                       # after the window: sink wins
    pos = common.sink_positions(cache.lengths, cache.config.sink)
    pos = jnp.where(pos >= 0, pos, cache.capacity)
    k = common.write_tokens(k, cache.sink_keys.astype(jnp.float32), pos)
    v = common.write_tokens(v, cache.sink_values.astype(jnp.float32), pos)
  return k, v


def token_nbytes(cache: TurboQuantCache) -> int:
  """Bytes stored per token position (all heads, keys and values)."""
  per_token = 0
  for tree in (cache.keys, cache.values):
    for leaf in jax.tree.leaves(tree):
      per_token += leaf.size * leaf.dtype.itemsize // (cache.batch
                                                       * cache.capacity)
  return per_token
