"""The specification: dequantize the cache, then plain f32 attention.

Shapes: B batch, T query tokens, H query heads, K KV heads (H = G·K),
S capacity, D head dim. Query t of sequence b sits at position
lengths[b] - T + t and attends to positions <= its own (causal).
"""

import jax
import jax.numpy as jnp

from turboquant_jax import cache as cache_lib


def validate(q, cache, lengths) -> None:
  """Trace-time checks shared by every implementation."""
  shape = getattr(q, "shape", None)
  if shape is None or len(shape) != 4:
    raise ValueError(f"q must be [batch, tokens, q_heads, head_dim], got "
                     f"shape {shape}")
  if not jnp.issubdtype(q.dtype, jnp.floating):
    raise ValueError(f"q.dtype={q.dtype} must be floating")
  b, _, h, d = shape
  if b != cache.batch:
    raise ValueError(f"q.shape={tuple(shape)}: batch {b} != the cache's "
                     f"{cache.batch}")
  if d != cache.head_dim:
    raise ValueError(f"q.shape={tuple(shape)}: head_dim {d} != the cache's "
                     f"{cache.head_dim}")
  if h % cache.kv_heads:
    raise ValueError(f"q_heads={h} must be a multiple of the cache's "
                     f"kv_heads={cache.kv_heads}")
  cache_lib.common.check_lengths(lengths, cache.batch, cache.capacity,
                                 "attention")


def causal_mask(lengths: jax.Array, tokens: int,
                capacity: int) -> jax.Array:
  """bool[B, T, S]: key position s is visible to query t."""
  lengths = jnp.minimum(lengths, capacity)
  qpos = lengths[:, None] - tokens + jnp.arange(tokens)[None, :]   # [B, T]
  return jnp.arange(capacity)[None, None, :] <= qpos[:, :, None]


def masked_softmax(scores: jax.Array, mask: jax.Array) -> jax.Array:
  """Softmax over the last axis; rows with nothing visible give zeros."""
  scores = jnp.where(mask, scores, -jnp.inf)
  top = jnp.max(scores, axis=-1, keepdims=True)
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  p = jnp.where(mask, jnp.exp(scores - top), 0.0)
  return p / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), 1e-30)


@jax.jit(static_argnames=("scale",))
def attention_reference(q: jax.Array, cache, lengths: jax.Array,
                        scale: float | None = None) -> jax.Array:
  """f32 attention of q [B, T, H, D] over the dequantized cache."""
  k, v = cache_lib.dequantize(cache)                          # [B, K, S, D]
  b, t, h, d = q.shape
  kv = k.shape[1]
  scale = d ** -0.5 if scale is None else scale
  qg = q.astype(jnp.float32).reshape(b, t, kv, h // kv, d)
  s = jnp.einsum("btkgd,bksd->bkgts", qg, k,
                 precision=jax.lax.Precision.HIGHEST) * scale
  mask = causal_mask(lengths, t, k.shape[2])[:, None, None]   # [B,1,1,T,S]
  p = masked_softmax(s, mask)
  out = jnp.einsum("bkgts,bksd->btkgd", p, v,
                   precision=jax.lax.Precision.HIGHEST)
  return out.reshape(b, t, h, d)
