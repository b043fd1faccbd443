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
"""

import dataclasses

import jax
import jax.numpy as jnp

from turboquant_jax.cache import common
from turboquant_jax.cache.config import CacheConfig
from turboquant_jax.quant import api
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
                    config: CacheConfig):
  kwargs = dict(norm_dtype=config.norm_dtype,
                norm_correction=config.norm_correction,
                rotation=config.rotation)
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
                       config.key_method, config)
  vq = _make_quantizer(v_key, kv_heads, head_dim, config.value_bits, "mse",
                       config)
  zeros = jnp.zeros((batch, kv_heads, capacity, head_dim), jnp.float32)
  keys = jax.eval_shape(_quantize, kq, zeros)
  values = jax.eval_shape(_quantize, vq, zeros)
  empty = lambda s: jnp.zeros(s.shape, s.dtype)
  window = None
  if config.window:
    window = jnp.zeros((batch, kv_heads, config.window, head_dim),
                       jnp.dtype(config.dtype))
  key_mean = None
  if config.center_keys:
    key_mean = jnp.zeros((batch, kv_heads, head_dim), jnp.dtype(config.dtype))
  return TurboQuantCache(
      keys=jax.tree.map(empty, keys), values=jax.tree.map(empty, values),
      key_quantizer=kq, value_quantizer=vq, window_keys=window,
      window_values=window, lengths=jnp.zeros((batch,), jnp.int32),
      config=config, key_mean=key_mean)


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
  keys = common.write_tree(cache.keys, _quantize(cache.key_quantizer, k),
                           positions)
  values = common.write_tree(cache.values,
                             _quantize(cache.value_quantizer, v), positions)
  wk, wv = cache.window_keys, cache.window_values
  if cache.config.window:
    slots = common.window_slots(positions, cache.config.window,
                                cache.capacity, ends)
    wk = common.write_tokens(wk, k, slots)
    wv = common.write_tokens(wv, v, slots)
  return dataclasses.replace(cache, keys=keys, values=values, window_keys=wk,
                             window_values=wv)


@jax.jit
def _prefill(cache, k, v, lengths):
  if cache.key_mean is not None:
    cache = dataclasses.replace(cache, key_mean=_prefill_mean(
        k, lengths, cache.key_mean.dtype, cache.config.center_skip))
    k = _center(cache, k)
  cache = dataclasses.replace(
      cache, key_quantizer=_select_outliers(cache.key_quantizer, k, lengths),
      value_quantizer=_select_outliers(cache.value_quantizer, v, lengths))
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


def append(cache: TurboQuantCache, k: jax.Array,
           v: jax.Array) -> TurboQuantCache:
  """Appends T tokens to every sequence (decode: T = 1; a chunk: T > 1).

  Eagerly, appending past the capacity raises ValueError. Under jit the
  tokens that do not fit are dropped and that sequence's length stays at the
  capacity; other sequences are never affected.
  """
  common.check_append(cache, k, v)
  return _append(cache, k, v)


@jax.jit
def dequantize(cache: TurboQuantCache) -> tuple[jax.Array, jax.Array]:
  """f32[B, K, S, D] keys and values as attention sees them.

  Positions held by the full-precision window come from the window. With
  config.center_keys the keys are the centered ones (minus key_mean).
  """
  k = _dequantize(cache.key_quantizer, cache.keys)
  v = _dequantize(cache.value_quantizer, cache.values)
  if cache.config.window:
    pos = common.window_positions(cache.lengths, cache.config.window)
    pos = jnp.where(pos >= 0, pos, cache.capacity)        # empty slot: drop
    k = common.write_tokens(k, cache.window_keys.astype(jnp.float32), pos)
    v = common.write_tokens(v, cache.window_values.astype(jnp.float32), pos)
  return k, v


def token_nbytes(cache: TurboQuantCache) -> int:
  """Bytes stored per token position (all heads, keys and values)."""
  per_token = 0
  for tree in (cache.keys, cache.values):
    for leaf in jax.tree.leaves(tree):
      per_token += leaf.size * leaf.dtype.itemsize // (cache.batch
                                                       * cache.capacity)
  return per_token
