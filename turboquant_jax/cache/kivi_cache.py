"""The KIVI baseline cache: uniform asymmetric integer codes, a pytree.

KIVI (Liu et al. 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for
KV Cache") quantizes each group to b-bit integers with its own minimum and
step: scale = (max - min) / (2^b - 1), code = round((x - min) / scale),
x̃ = min + scale · code. Keys are grouped PER CHANNEL over G = group_size
consecutive tokens (outlier channels get their own range); values PER TOKEN
over G consecutive channels. Codes are packed b bits each (quant.packing);
min and scale are stored in config.norm_dtype (float16 by default).

What attention reads in full precision (config.dtype) for a sequence of
length L, with W = config.window:
- values: positions p >= L - W (the last W tokens); older ones quantized.
- keys: positions p >= min(G·floor(L/G), L - W): the last W tokens, and the
  tokens of the incomplete last group, which cannot be quantized per channel
  before all G of its tokens exist. So max(L mod G, W) keys are full
  precision. (KIVI's paper flushes its key residual R = W in whole blocks,
  so it keeps L mod R full-precision keys; ours keeps at least W at every
  step, and with W = 0 only the incomplete group.)
A key group is quantized, with min/max over exactly its G tokens, in the
write that completes it; later tokens of the chunk or later appends never
change it. A tail group cut by the capacity (S not a multiple of G) never
completes and stays full precision.

Storage (all of it counted by cache.memory):
- key codes u8[B, K, Sq, P] for Sq = G·floor(S/G) positions and key
  min/scale [B, K, Sq/G, D];
- value codes u8[B, K, S, P] and value min/scale [B, K, S, ceil(D/G)];
- a full-precision residual ring of the last Rk = max(W, G - 1) keys and of
  the last W values per sequence: [B, K, Rk, D] and [B, K, W, D].
Incoming tokens are rounded to config.dtype before they are quantized, so a
group's codes do not depend on whether its tokens arrived in one chunk or
one at a time (from the ring).
"""

import dataclasses
import math

import jax
import jax.numpy as jnp

from turboquant_jax.cache import common
from turboquant_jax.cache.config import CacheConfig
from turboquant_jax.quant import packing


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KiviCache:
  """Integer-quantized keys and values of B sequences, K KV heads.

  Attributes:
    key_codes: u8[B, K, Sq, Pk] packed per-token key codes (Sq = G·⌊S/G⌋).
    key_mins, key_scales: [B, K, Sq/G, D] per (token group, channel).
    value_codes: u8[B, K, S, Pv] packed per-token value codes.
    value_mins, value_scales: [B, K, S, ceil(D/G)] per (token, channel
      group).
    residual_keys: [B, K, Rk, D] ring (slot p % Rk holds position p) of the
      last Rk = max(W, G - 1) keys in config.dtype, or None when Rk = 0.
    residual_values: [B, K, W, D] ring of the last W values, or None.
    lengths: i32[B] tokens stored per sequence.
    config: the CacheConfig (static).
  """
  key_codes: jax.Array
  key_mins: jax.Array
  key_scales: jax.Array
  value_codes: jax.Array
  value_mins: jax.Array
  value_scales: jax.Array
  residual_keys: jax.Array | None
  residual_values: jax.Array | None
  lengths: jax.Array
  config: CacheConfig = dataclasses.field(metadata=dict(static=True))

  @property
  def batch(self) -> int:
    return self.lengths.shape[0]

  @property
  def kv_heads(self) -> int:
    return self.value_codes.shape[1]

  @property
  def capacity(self) -> int:
    return self.value_codes.shape[2]

  @property
  def head_dim(self) -> int:
    return self.key_mins.shape[3]


def _key_ring_size(config: CacheConfig) -> int:
  return max(config.window, config.group_size - 1)


def init(config: CacheConfig, batch: int, kv_heads: int, capacity: int,
         head_dim: int, *, key: jax.Array | None = None) -> KiviCache:
  """An empty cache with static capacity (`key` is unused: no randomness)."""
  del key
  if config.kind != "kivi":
    raise ValueError(f"config.kind={config.kind!r}: expected 'kivi'")
  common.check_dims(batch=batch, kv_heads=kv_heads, capacity=capacity,
                    head_dim=head_dim)
  g = config.group_size
  kb, vb = int(config.key_bits), int(config.value_bits)
  meta = jnp.dtype(config.norm_dtype)
  full = jnp.dtype(config.dtype)
  lead = (batch, kv_heads)
  key_groups = capacity // g
  value_groups = math.ceil(head_dim / g)
  rk, w = _key_ring_size(config), config.window
  return KiviCache(
      key_codes=jnp.zeros((*lead, key_groups * g,
                           packing.packed_size(head_dim, kb)), jnp.uint8),
      key_mins=jnp.zeros((*lead, key_groups, head_dim), meta),
      key_scales=jnp.zeros((*lead, key_groups, head_dim), meta),
      value_codes=jnp.zeros((*lead, capacity,
                             packing.packed_size(head_dim, vb)), jnp.uint8),
      value_mins=jnp.zeros((*lead, capacity, value_groups), meta),
      value_scales=jnp.zeros((*lead, capacity, value_groups), meta),
      residual_keys=jnp.zeros((*lead, rk, head_dim), full) if rk else None,
      residual_values=jnp.zeros((*lead, w, head_dim), full) if w else None,
      lengths=jnp.zeros((batch,), jnp.int32), config=config)


# ------------------------------------------------------------ quantization


def _quantize_groups(x: jax.Array, bits: int, meta_dtype, axis: int):
  """Min/scale over `axis` of x (f32) and the integer codes of x.

  Returns codes u8 (shape of x) and min, scale in meta_dtype with `axis`
  reduced. Codes use the stored (rounded) min and scale, so decoding with
  them is exactly what the codes mean; a constant group (scale 0) gets code
  0 and decodes to its min.
  """
  levels = 2 ** bits - 1
  lo = jnp.min(x, axis=axis, keepdims=True)
  hi = jnp.max(x, axis=axis, keepdims=True)
  mn = lo.astype(meta_dtype)
  sc = ((hi - lo) / levels).astype(meta_dtype)
  mn32, sc32 = mn.astype(jnp.float32), sc.astype(jnp.float32)
  ratio = (x - mn32) / jnp.where(sc32 > 0, sc32, 1.0)
  codes = jnp.where(sc32 > 0, jnp.clip(jnp.round(ratio), 0, levels), 0)
  return (codes.astype(jnp.uint8), jnp.squeeze(mn, axis),
          jnp.squeeze(sc, axis))


def _quantize_values(x: jax.Array, bits: int, group: int, meta_dtype):
  """Per token over channel groups: x f32[B, K, T, D] -> codes, min, scale.

  Returns packed u8[B, K, T, P] and min, scale [B, K, T, ceil(D/G)].
  """
  d = x.shape[-1]
  ng = math.ceil(d / group)
  pad = ng * group - d
  # Padded channels repeat the last real one: they leave min/max unchanged.
  xp = jnp.pad(x, [(0, 0)] * 3 + [(0, pad)], mode="edge")
  codes, mn, sc = _quantize_groups(xp.reshape(*x.shape[:3], ng, group),
                                   bits, meta_dtype, axis=-1)
  codes = codes.reshape(*x.shape[:3], ng * group)[..., :d]
  return packing.pack(codes, bits), mn, sc


def _dequantize_codes(codes, bits, dim, mins, scales) -> jax.Array:
  """min + scale · code with mins/scales already broadcast to [..., D]."""
  c = packing.unpack(codes, bits, dim).astype(jnp.float32)
  return mins.astype(jnp.float32) + scales.astype(jnp.float32) * c


# ------------------------------------------------------------------ writes


def _key_blocks(cache: KiviCache, k: jax.Array, old: jax.Array,
                new: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Keys from the start of each sequence's incomplete group onwards.

  Returns e f32[B, K, N·G, D] (e[:, :, j] is the key at position
  base[b] + j, read from the ring while j < old - base, then from k),
  base i32[B] (a multiple of G) and the number N of groups spanned.
  """
  b, kv, t, d = k.shape
  g = cache.config.group_size
  base = old - old % g                                         # [B]
  r = old - base                                               # [B] < G
  ring = cache.residual_keys
  rk = _key_ring_size(cache.config)
  if g > 1:
    # The (at most G - 1) tokens of the incomplete group, from the ring.
    ring_pos = base[:, None] + jnp.arange(g - 1)[None, :]      # [B, G-1]
    idx = (ring_pos % rk)[:, None, :, None]
    head = jnp.take_along_axis(ring, idx, axis=2).astype(jnp.float32)
  else:
    head = jnp.zeros((b, kv, 0, d), jnp.float32)
  both = jnp.concatenate([head, k], axis=2)                    # [B,K,G-1+T,D]
  n = math.ceil((g - 1 + t) / g)
  j = jnp.arange(n * g)[None, :]
  src = jnp.where(j < r[:, None], j, g - 1 + j - r[:, None])   # [B, N·G]
  src = jnp.clip(src, 0, both.shape[2] - 1)
  e = jnp.take_along_axis(both, src[:, None, :, None], axis=2)
  valid = base[:, None] + j < new[:, None]                     # [B, N·G]
  return jnp.where(valid[:, None, :, None], e, 0.0), base, n


def _write(cache: KiviCache, k: jax.Array, v: jax.Array, old: jax.Array,
           count: jax.Array) -> KiviCache:
  """Writes count[b] <= T tokens of k, v [B, K, T, D] after old[b] tokens."""
  cfg = cache.config
  g, w = cfg.group_size, cfg.window
  kb, vb = int(cfg.key_bits), int(cfg.value_bits)
  meta = jnp.dtype(cfg.norm_dtype)
  full = jnp.dtype(cfg.dtype)
  b, kv, t, d = k.shape
  cap = cache.capacity
  # What the ring would hold: quantize exactly that (see module docstring).
  k = k.astype(full).astype(jnp.float32)
  v = v.astype(full).astype(jnp.float32)
  new = jnp.minimum(old + count, cap)                          # [B]
  positions = common.append_positions(old, t)                  # [B, T]
  pos = jnp.where(positions < new[:, None], positions, cap)    # drop others

  # Values: per token, any token can be quantized on arrival.
  vcodes, vmin, vsc = _quantize_values(v, vb, g, meta)
  value_codes = common.write_tokens(cache.value_codes, vcodes, pos)
  value_mins = common.write_tokens(cache.value_mins, vmin, pos)
  value_scales = common.write_tokens(cache.value_scales, vsc, pos)

  # Keys: quantize the groups this write completes, from ring + new tokens.
  e, base, n = _key_blocks(cache, k, old, new)                 # [B,K,N·G,D]
  codes, kmin, ksc = _quantize_groups(e.reshape(b, kv, n, g, d), kb, meta,
                                      axis=3)                  # [B,K,N,(G,)D]
  group = jnp.arange(n)[None, :]
  done = base[:, None] + (group + 1) * g <= new[:, None]       # [B, N]
  sq, sg = cache.key_codes.shape[2], cache.key_mins.shape[2]
  gidx = jnp.where(done, base[:, None] // g + group, sg)
  tok_done = jnp.repeat(done, g, axis=1)                       # [B, N·G]
  tidx = jnp.where(tok_done, base[:, None] + jnp.arange(n * g)[None, :], sq)
  key_codes = common.write_tokens(
      cache.key_codes, packing.pack(codes.reshape(b, kv, n * g, d), kb), tidx)
  key_mins = common.write_tokens(cache.key_mins, kmin, gidx)
  key_scales = common.write_tokens(cache.key_scales, ksc, gidx)

  rkeys, rvalues = cache.residual_keys, cache.residual_values
  if rkeys is not None:
    rkeys = common.write_tokens(
        rkeys, k, common.window_slots(positions, rkeys.shape[2], cap, new))
  if rvalues is not None:
    rvalues = common.write_tokens(
        rvalues, v, common.window_slots(positions, w, cap, new))
  return dataclasses.replace(
      cache, key_codes=key_codes, key_mins=key_mins, key_scales=key_scales,
      value_codes=value_codes, value_mins=value_mins,
      value_scales=value_scales, residual_keys=rkeys,
      residual_values=rvalues, lengths=new.astype(jnp.int32))


@jax.jit
def _prefill(cache, k, v, lengths):
  empty = jax.tree.map(jnp.zeros_like, cache)
  zeros = jnp.zeros_like(lengths, jnp.int32)
  return _write(empty, k, v, zeros, lengths.astype(jnp.int32))


def prefill(cache: KiviCache, k: jax.Array, v: jax.Array,
            lengths: jax.Array) -> KiviCache:
  """Stores the prompts' keys/values, replacing the cache's contents.

  Args:
    cache: a cache from `init`.
    k, v: [B, K, T, D] (T <= capacity); tokens at t >= lengths[b] are
      padding and are never stored (they would skew group ranges).
    lengths: i32[B] valid tokens per sequence.
  """
  common.check_prefill(cache, k, v, lengths)
  return _prefill(cache, k, v, lengths)


@jax.jit
def _append(cache, k, v):
  count = jnp.full_like(cache.lengths, k.shape[2])
  return _write(cache, k, v, cache.lengths, count)


def append(cache: KiviCache, k: jax.Array, v: jax.Array) -> KiviCache:
  """Appends T tokens to every sequence (decode: T = 1; a chunk: T > 1).

  Eagerly, appending past the capacity raises ValueError. Under jit the
  tokens that do not fit are dropped and that sequence's length stays at the
  capacity; other sequences are never affected.
  """
  common.check_append(cache, k, v)
  return _append(cache, k, v)


def full_precision_starts(cache: KiviCache) -> tuple[jax.Array, jax.Array]:
  """i32[B] first full-precision key and value position of each sequence.

  Positions in [start, length) are read from the residual rings.
  """
  g, w = cache.config.group_size, cache.config.window
  lengths = cache.lengths
  value_start = jnp.maximum(lengths - w, 0)
  key_start = jnp.minimum(lengths - lengths % g, value_start)
  return key_start, value_start


def _overlay(x: jax.Array, ring: jax.Array | None, start: jax.Array,
             lengths: jax.Array) -> jax.Array:
  """x [B, K, S, D] with positions in [start, lengths) read from the ring."""
  if ring is None:
    return x
  s = jnp.arange(x.shape[2])
  from_ring = jnp.take(ring, s % ring.shape[2], axis=2).astype(jnp.float32)
  fp = (s[None, :] >= start[:, None]) & (s[None, :] < lengths[:, None])
  return jnp.where(fp[:, None, :, None], from_ring, x)


@jax.jit
def dequantize(cache: KiviCache) -> tuple[jax.Array, jax.Array]:
  """f32[B, K, S, D] keys and values as attention reads them.

  Full-precision positions (see full_precision_starts) come from the rings;
  positions at or past a sequence's length are zero.
  """
  cfg = cache.config
  g = cfg.group_size
  d, cap = cache.head_dim, cache.capacity
  kb, vb = int(cfg.key_bits), int(cfg.value_bits)
  k = _dequantize_codes(cache.key_codes, kb, d,
                        jnp.repeat(cache.key_mins, g, axis=2),
                        jnp.repeat(cache.key_scales, g, axis=2))
  k = jnp.pad(k, [(0, 0), (0, 0), (0, cap - k.shape[2]), (0, 0)])
  v = _dequantize_codes(cache.value_codes, vb, d,
                        jnp.repeat(cache.value_mins, g, axis=3)[..., :d],
                        jnp.repeat(cache.value_scales, g, axis=3)[..., :d])
  key_start, value_start = full_precision_starts(cache)
  k = _overlay(k, cache.residual_keys, key_start, cache.lengths)
  v = _overlay(v, cache.residual_values, value_start, cache.lengths)
  live = (jnp.arange(cap)[None, :] < cache.lengths[:, None])[:, None, :,
                                                               None]
  return jnp.where(live, k, 0.0), jnp.where(live, v, 0.0)
