"""A SnapKV-style token-eviction cache: keep the prompt tokens that matter.

SnapKV (Li et al. 2024, "SnapKV: LLM Knows What You are Looking for Before
Generation") keeps a fraction of each prompt's tokens, in full precision,
chosen once, at the end of the prefill, per layer and KV head:
1. The last W prompt queries (the observation window, W = config.window)
   attend over the prompt (causal softmax, scale 1/sqrt(D)); the attention
   each earlier token p < L - W receives is summed over those W queries and
   over the G query heads that share the KV head (GQA): a vote v[p].
2. The votes are smoothed along the tokens by a 1-D pool of odd width
   config.pool_kernel ("max" or "avg", zero padding, stride 1; tokens of
   the window count as 0), so that a selected token brings its neighbours.
3. The n = keep - W tokens with the highest pooled votes (ties: the earlier
   token) and the W window tokens are kept, in prompt order; everything
   else is evicted. keep = min(L, max(W, ceil(config.budget * L))), the
   budget read as the nearest fraction with denominator <= 1000.
Tokens generated afterwards are appended and never evicted.

Positions. Keys are stored after RoPE, so a kept token keeps its original
position; the model gives new tokens positions from `lengths` (the tokens
seen, prompt included), while attention reads `slots` (the tokens stored,
in slots 0..slots-1); the two differ by the evicted count.

Storage, exact: after the prefill of a [B, K, T, D] prompt into a cache
initialized with capacity S, keys and values are [B, K, T', D] with
T' = keep(T) + S - T in config.dtype: each sequence's kept prompt tokens,
then room for the S - T tokens that may still be appended; plus lengths
and slots i32[B]. (`init` allocates S slots, used as they are if tokens are
appended without a prefill.) The selection needs the prompt's queries:
`prefill(..., queries=)`, which the model's attention passes.
"""

import dataclasses
import fractions

import jax
import jax.numpy as jnp

from turboquant_jax.cache import common
from turboquant_jax.cache.config import CacheConfig

_HI = jax.lax.Precision.HIGHEST


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SnapKVCache(common.DenseShape):
  """The kept tokens of B sequences, K KV heads.

  Attributes:
    keys, values: [B, K, S, D] in config.dtype; slot s < slots[b] holds a
      kept (or appended) token, keys after RoPE; per head, a different set.
    lengths: i32[B] tokens seen (the position of the next token).
    slots: i32[B] slots in use (the same for every head).
    config: the CacheConfig (static).
  """
  keys: jax.Array
  values: jax.Array
  lengths: jax.Array
  slots: jax.Array
  config: CacheConfig = dataclasses.field(metadata=dict(static=True))


def init(config: CacheConfig, batch: int, kv_heads: int, capacity: int,
         head_dim: int, *, key: jax.Array | None = None) -> SnapKVCache:
  """An empty cache with room for `capacity` tokens (`key` is unused)."""
  del key
  if config.kind != "snapkv":
    raise ValueError(f"config.kind={config.kind!r}: expected 'snapkv'")
  common.check_dims(batch=batch, kv_heads=kv_heads, capacity=capacity,
                    head_dim=head_dim)
  z = jnp.zeros((batch, kv_heads, capacity, head_dim), jnp.dtype(config.dtype))
  zeros = jnp.zeros((batch,), jnp.int32)
  return SnapKVCache(keys=z, values=z, lengths=zeros, slots=zeros,
                     config=config)


def _budget_fraction(budget: float) -> tuple[int, int]:
  """budget as num/den (den <= 1000), so that ceil(budget·L) is computed
  exactly in int32, the same in Python and under jit (0.3·30 is 9, where
  float32 gives 9.0000004 and float64 8.999999999999998)."""
  f = fractions.Fraction(budget).limit_denominator(1000)
  return f.numerator, f.denominator


def kept_tokens(config: CacheConfig, length: int) -> int:
  """How many of a `length`-token prompt's tokens are kept (per head)."""
  num, den = _budget_fraction(config.budget)
  return min(length, max(config.window, -(-length * num // den)))


def pool(votes: jax.Array, kernel: int, kind: str) -> jax.Array:
  """1-D pooling of f32[..., T] along T: width `kernel` (odd), stride 1,
  zero padding ("avg" divides by `kernel`, as PyTorch's avg_pool1d)."""
  if kernel == 1:
    return votes
  ndim = votes.ndim
  pad = [(0, 0)] * (ndim - 1) + [(kernel // 2, kernel // 2)]
  votes = jnp.pad(votes, pad)
  dims, strides = (1,) * (ndim - 1) + (kernel,), (1,) * ndim
  if kind == "max":
    return jax.lax.reduce_window(votes, -jnp.inf, jax.lax.max, dims, strides,
                                 "VALID")
  return jax.lax.reduce_window(votes, 0.0, jax.lax.add, dims, strides,
                               "VALID") / kernel


def pooled_votes(config: CacheConfig, q: jax.Array, k: jax.Array,
                 lengths: jax.Array) -> jax.Array:
  """Steps 1-2 of the module docstring: f32[B, K, T] pooled votes.

  Args:
    config: the cache config (window, pool, pool_kernel).
    q: [B, N, T, D] the prompt's queries after RoPE (N = G·K heads).
    k: [B, K, T, D] its keys after RoPE.
    lengths: i32[B] valid prompt tokens (right padding after them).

  Returns:
    The pooled votes; -inf at tokens that are not candidates (the window,
    padding).
  """
  b, n, t, d = q.shape
  kv = k.shape[1]
  w = min(config.window, t)
  qpos = lengths[:, None] - w + jnp.arange(w)[None, :]             # [B, W]
  qw = jnp.take_along_axis(q, jnp.maximum(qpos, 0)[:, None, :, None],
                           axis=2).astype(jnp.float32)          # [B, N, W, D]
  qw = qw.reshape(b, kv, n // kv, w, d)
  s = jnp.einsum("bkgwd,bktd->bkgwt", qw, k.astype(jnp.float32),
                 precision=_HI) * d ** -0.5
  visible = ((jnp.arange(t)[None, None, :] <= qpos[:, :, None])
             & (qpos[:, :, None] >= 0))                         # [B, W, T]
  visible = visible[:, None, None]
  s = jnp.where(visible, s, -jnp.inf)
  top = jnp.max(s, axis=-1, keepdims=True)
  p = jnp.where(visible, jnp.exp(s - jnp.where(jnp.isfinite(top), top, 0.0)),
                0.0)
  p = p / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), 1e-30)
  votes = jnp.sum(p, axis=(2, 3))                                # [B, K, T]
  window_start = lengths - jnp.minimum(config.window, lengths)   # [B]
  candidate = jnp.arange(t)[None, None, :] < window_start[:, None, None]
  votes = pool(jnp.where(candidate, votes, 0.0), config.pool_kernel,
               config.pool)
  return jnp.where(candidate, votes, -jnp.inf)


def select(config: CacheConfig, votes: jax.Array,
           lengths: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Step 3: which prompt tokens each head keeps.

  Args:
    config: the cache config (budget, window).
    votes: f32[B, K, T] pooled votes (-inf: not a candidate).
    lengths: i32[B] valid prompt tokens.

  Returns:
    (positions i32[B, K, keep(T)]: the kept tokens in prompt order, then
    filler (0) past each sequence's count; counts i32[B]: kept tokens).
  """
  t = votes.shape[-1]
  keep_t = kept_tokens(config, t)
  w_t = min(config.window, t)
  w = jnp.minimum(config.window, lengths)                        # [B]
  num, den = _budget_fraction(config.budget)
  budget = (lengths * num + den - 1) // den                      # ceil
  counts = jnp.minimum(lengths, jnp.maximum(config.window, budget))
  n_top = keep_t - w_t
  parts = []
  if n_top:
    _, top = jax.lax.top_k(votes, n_top)           # ties: the lower index
    chosen = jnp.arange(n_top)[None, None, :] < (counts - w)[:, None, None]
    parts.append(jnp.where(chosen, top, t))
  if w_t:
    wpos = lengths[:, None] - w_t + jnp.arange(w_t)[None, :]     # [B, W]
    wpos = jnp.where(wpos >= lengths[:, None] - w[:, None], wpos, t)
    parts.append(jnp.broadcast_to(wpos[:, None, :],
                                  (*votes.shape[:2], w_t)))
  positions = jnp.sort(jnp.concatenate(parts, axis=-1), axis=-1)
  return jnp.where(positions < t, positions, 0).astype(jnp.int32), counts


@jax.jit
def _prefill(cache, k, v, lengths, queries):
  b, kv, t, d = k.shape
  dt = cache.keys.dtype
  k, v = k.astype(dt), v.astype(dt)
  votes = pooled_votes(cache.config, queries, k, lengths)
  positions, counts = select(cache.config, votes, lengths)
  idx = positions[..., None]
  kept_k = jnp.take_along_axis(k, idx, axis=2)
  kept_v = jnp.take_along_axis(v, idx, axis=2)
  room = jnp.zeros((b, kv, cache.capacity - t, d), dt)
  return dataclasses.replace(
      cache, keys=jnp.concatenate([kept_k, room], axis=2),
      values=jnp.concatenate([kept_v, room], axis=2),
      lengths=lengths.astype(jnp.int32), slots=counts)


def prefill(cache: SnapKVCache, k, v, lengths, *,
            queries: jax.Array | None = None) -> SnapKVCache:
  """Keeps the selected tokens of prompts k, v: [B, K, T, D] (replaces).

  Args:
    cache: a SnapKVCache of capacity S >= T.
    k, v: [B, K, T, D] the prompts' keys (after RoPE) and values.
    lengths: i32[B] valid tokens per prompt.
    queries: [B, N, T, D] the prompts' queries after RoPE, N a multiple of
      K (the model's attention passes them).

  Returns:
    A cache of capacity keep(T) + S - T (module docstring).
  """
  common.check_prefill(cache, k, v, lengths)
  if queries is None:
    raise ValueError("a snapkv cache selects tokens by their attention: "
                     "prefill needs queries=[B, N, T, D] (the prompt's "
                     "queries after RoPE)")
  shape = tuple(getattr(queries, "shape", ()))
  if (len(shape) != 4 or shape[0] != k.shape[0] or shape[1] % k.shape[1]
      or shape[2:] != k.shape[2:]):
    raise ValueError(f"queries.shape={shape}: expected [{k.shape[0]}, N, "
                     f"{k.shape[2]}, {k.shape[3]}] with N a multiple of "
                     f"kv_heads={k.shape[1]}")
  if not jnp.issubdtype(queries.dtype, jnp.floating):
    raise ValueError(f"queries.dtype={queries.dtype} must be floating")
  return _prefill(cache, k, v, lengths, queries)


@jax.jit
def _append(cache, k, v):
  pos = common.append_positions(cache.slots, k.shape[2])
  t = k.shape[2]
  return dataclasses.replace(
      cache, keys=common.write_tokens(cache.keys, k, pos),
      values=common.write_tokens(cache.values, v, pos),
      lengths=cache.lengths + t,
      slots=jnp.minimum(cache.slots + t, cache.capacity))


def append(cache: SnapKVCache, k, v) -> SnapKVCache:
  """Appends k, v: [B, K, T, D] after the kept tokens; past capacity:
  ValueError eagerly, dropped under jit."""
  common.check_kv("k", k, cache.batch, cache.kv_heads, cache.head_dim)
  common.check_kv("v", v, cache.batch, cache.kv_heads, cache.head_dim)
  if k.shape != v.shape:
    raise ValueError(f"{k.shape=} != {v.shape=}")
  if not isinstance(cache.slots, jax.core.Tracer):
    common.check_lengths(cache.slots + k.shape[2], cache.batch,
                         cache.capacity, f"append of {k.shape[2]} tokens")
  return _append(cache, k, v)


def dequantize(cache: SnapKVCache) -> tuple[jax.Array, jax.Array]:
  """f32[B, K, S, D] keys and values of the slots (attention reads the
  first `slots` of them)."""
  return cache.keys.astype(jnp.float32), cache.values.astype(jnp.float32)
