"""Helpers shared by every KV cache: validation, token writes, masks.

Shapes: B batch, K KV heads, S capacity, T new tokens, D head dim, W window.
"""

import jax
import jax.numpy as jnp


def check_kv(name: str, x, batch: int, heads: int, head_dim: int) -> None:
  """Trace-time check that x is a float [B, K, T, D] matching the cache."""
  shape = getattr(x, "shape", None)
  dtype = getattr(x, "dtype", None)
  if shape is None or len(shape) != 4:
    raise ValueError(f"{name} must be [batch, kv_heads, tokens, head_dim], "
                     f"got shape {shape}")
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"{name}.dtype={dtype} must be floating")
  b, k, _, d = shape
  if (b, k, d) != (batch, heads, head_dim):
    raise ValueError(f"{name}.shape={tuple(shape)}: expected "
                     f"[{batch}, {heads}, T, {head_dim}] (batch, kv_heads, "
                     "tokens, head_dim of the cache)")


def check_lengths(lengths, batch: int, capacity: int, what: str) -> None:
  """Checks i32[B] lengths; raises eagerly when they exceed the capacity."""
  shape = getattr(lengths, "shape", None)
  if shape != (batch,):
    raise ValueError(f"lengths.shape={shape}: expected ({batch},)")
  if not jnp.issubdtype(lengths.dtype, jnp.integer):
    raise ValueError(f"lengths.dtype={lengths.dtype} must be an integer type")
  if isinstance(lengths, jax.core.Tracer):
    return
  worst = int(jnp.max(lengths)) if batch else 0
  if worst > capacity or (batch and int(jnp.min(lengths)) < 0):
    raise ValueError(f"{what}: lengths reach {worst} but the cache capacity "
                     f"is {capacity} (cache full), or a length is negative")


def write_tokens(buf: jax.Array, new: jax.Array,
                 positions: jax.Array) -> jax.Array:
  """Writes new[b, :, t] into buf[b, :, positions[b, t]].

  buf: [B, K, S, ...]; new: [B, K, T, ...]; positions: i32[B, T].
  Positions outside [0, S) are dropped: a sequence past its capacity loses
  its own excess tokens and never touches another sequence's slots.
  """
  b = jnp.arange(buf.shape[0])[:, None]
  return buf.at[b, :, positions].set(
      jnp.swapaxes(new, 1, 2).astype(buf.dtype), mode="drop")


def write_tree(buf, new, positions: jax.Array):
  """write_tokens over matching pytrees (e.g. two QuantizedTensors)."""
  return jax.tree.map(lambda a, b: write_tokens(a, b, positions), buf, new)


def append_positions(lengths: jax.Array, tokens: int) -> jax.Array:
  """i32[B, T]: where T appended tokens go."""
  return lengths[:, None] + jnp.arange(tokens, dtype=lengths.dtype)[None, :]


def window_slots(positions: jax.Array, window: int, capacity: int,
                 ends: jax.Array) -> jax.Array:
  """Ring slot p % W of each position among the last W of its sequence.

  positions: i32[B, T]; ends: i32[B] the sequence lengths after the write.
  Every other position gets W (dropped): padding past a prompt's length
  (which would otherwise overwrite live ring slots), tokens past capacity,
  and tokens that a later token of the same write replaces (so no slot is
  scattered twice, whose winner XLA leaves unspecified).
  """
  keep = ((positions < ends[:, None]) & (positions >= ends[:, None] - window)
          & (positions < capacity))
  return jnp.where(keep, positions % window, window)


def sink_positions(lengths: jax.Array, sink: int) -> jax.Array:
  """i32[B, N]: the token position held by each sink slot (-1 if none):
  slot n holds position n once the sequence has more than n tokens."""
  n = jnp.arange(sink)[None, :]
  return jnp.where(n < lengths[:, None], n, -1)


def window_positions(lengths: jax.Array, window: int) -> jax.Array:
  """i32[B, W]: the token position held by each ring slot (-1 if none).

  Slot w holds the latest position p < length with p % W == w.
  """
  w = jnp.arange(window)[None, :]
  last = lengths[:, None] - 1
  p = last - jnp.mod(last - w, window)
  return jnp.where(p >= 0, p, -1)


def nbytes(tree) -> int:
  """Total bytes of all array leaves."""
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)
             if hasattr(x, "dtype"))


def check_dims(**dims: int) -> None:
  """init arguments: each must be a positive integer (named in the error)."""
  for name, val in dims.items():
    if not isinstance(val, int) or val < 1:
      raise ValueError(f"{name}={val!r} must be a positive integer")


def check_prefill(cache, k, v, lengths) -> None:
  """Checks prefill(cache, k, v, lengths) arguments (any cache kind)."""
  check_kv("k", k, cache.batch, cache.kv_heads, cache.head_dim)
  check_kv("v", v, cache.batch, cache.kv_heads, cache.head_dim)
  if k.shape != v.shape:
    raise ValueError(f"{k.shape=} != {v.shape=}")
  if k.shape[2] > cache.capacity:
    raise ValueError(f"prefill of {k.shape[2]} tokens exceeds the cache "
                     f"capacity {cache.capacity} (cache full)")
  check_lengths(lengths, cache.batch, k.shape[2], "prefill")


def check_append(cache, k, v) -> None:
  """Checks append(cache, k, v); eagerly, appending past capacity raises."""
  check_kv("k", k, cache.batch, cache.kv_heads, cache.head_dim)
  check_kv("v", v, cache.batch, cache.kv_heads, cache.head_dim)
  if k.shape != v.shape:
    raise ValueError(f"{k.shape=} != {v.shape=}")
  if not isinstance(cache.lengths, jax.core.Tracer):
    check_lengths(cache.lengths + k.shape[2], cache.batch, cache.capacity,
                  f"append of {k.shape[2]} tokens")


# ------------------------------------------------- 8-bit log-domain norms
# Code 0 is an exact zero norm, 255 a non-finite one (decodes to NaN, so a
# NaN vector stays NaN as with float norms), 1..254 a uniform grid in
# log(norm) over [lo, hi]; norms outside the range clamp to its ends.
LOG_CODE_ZERO = 0
LOG_CODE_NAN = 255
LOG_LEVELS = 254
# The range measured on a sequence's first write is widened by this much on
# each side (a factor of 2), so later tokens rarely clamp. (SmolLM2, 32
# prefill tokens of Emma: no later key or value norm fell outside. Clamping
# is costly, a margin of 1.25x gave K5/V4 +4.9% perplexity; a wider margin
# costs resolution: 4x +1.57%, 2x +1.44%, fp16 norms +0.95%.)
LOG_MARGIN = float(jnp.log(2.0))


def log_range(norms: jax.Array, valid: jax.Array) -> jax.Array:
  """f32[..., 2] (lo, hi) of log(norm) over valid positive finite norms.

  norms: [..., T]; valid: bool broadcastable to norms. The extremes are
  widened by LOG_MARGIN; NaN where no norm qualifies (range not set).
  """
  x = norms.astype(jnp.float32)
  ok = valid & jnp.isfinite(x) & (x > 0)
  logs = jnp.log(jnp.where(ok, x, 1.0))
  lo = jnp.min(jnp.where(ok, logs, jnp.inf), axis=-1)
  hi = jnp.max(jnp.where(ok, logs, -jnp.inf), axis=-1)
  rng = jnp.stack([lo - LOG_MARGIN, hi + LOG_MARGIN], axis=-1)
  return jnp.where(jnp.any(ok, axis=-1)[..., None], rng, jnp.nan)


def encode_log(norms: jax.Array, rng: jax.Array) -> jax.Array:
  """u8 codes of norms [..., T] on the grid of rng f32[..., 2] (module
  note above). The rounding error in log(norm) is at most half a step,
  (hi - lo) / (2 * (LOG_LEVELS - 1)), inside the range."""
  x = norms.astype(jnp.float32)
  lo, hi = rng[..., :1], rng[..., 1:]
  t = (jnp.log(jnp.where(x > 0, x, 1.0)) - lo) / (hi - lo)
  t = jnp.where(jnp.isfinite(t), t, 0.0)      # unset range: never reached
  code = 1 + jnp.round(jnp.clip(t, 0.0, 1.0) * (LOG_LEVELS - 1))
  code = jnp.where(x > 0, code, LOG_CODE_ZERO)
  code = jnp.where(jnp.isfinite(x), code, LOG_CODE_NAN)
  return code.astype(jnp.uint8)


def decode_log(codes: jax.Array, rng: jax.Array) -> jax.Array:
  """f32 norms [..., S] of u8 codes on the grid of rng f32[..., 2]."""
  lo, hi = rng[..., :1], rng[..., 1:]
  c = codes.astype(jnp.float32)
  x = jnp.exp(lo + (c - 1) * (hi - lo) / (LOG_LEVELS - 1))
  x = jnp.where(codes == LOG_CODE_ZERO, 0.0, x)
  return jnp.where(codes == LOG_CODE_NAN, jnp.nan, x)


class DenseShape:
  """batch, kv_heads, capacity, head_dim of a cache whose `keys` is a
  dense [B, K, S, D] array (the full and SnapKV caches)."""
  keys: jax.Array

  @property
  def batch(self) -> int:
    return self.keys.shape[0]

  @property
  def kv_heads(self) -> int:
    return self.keys.shape[1]

  @property
  def capacity(self) -> int:
    return self.keys.shape[2]

  @property
  def head_dim(self) -> int:
    return self.keys.shape[3]
