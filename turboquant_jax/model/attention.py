"""Grouped-query attention that reads (and writes) an explicit KV cache.

Shapes: B batch, T new tokens, N query heads, K KV heads, H head dim,
D model dim, S cache capacity.

The T new keys and values are written into the layer's cache first (any
kind of turboquant_jax.cache), then every query attends over the cache with
`chunk_attention`, so the prompt's own tokens are also read back compressed.

Token eviction (a snapkv cache) differs in two ways: its prefill gets the
prompt's queries (to choose the tokens it keeps) and the prompt attends to
itself in full (in the cache's dtype), as SnapKV computes the prefill
before it evicts; afterwards queries attend to the cache's `slots` (the
kept and appended tokens), while RoPE positions still count every token
seen (`lengths_before`), so a kept token keeps its original position.
"""

from flax import nnx
import jax
import jax.numpy as jnp

from turboquant_jax import cache as cache_lib
from turboquant_jax.cache import snapkv_cache
from turboquant_jax.kernels import decode_attention
from turboquant_jax.model import config as config_lib
from turboquant_jax.model import layers

_HI = jax.lax.Precision.HIGHEST


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """Plain causal GQA: q [B, T, N, H], k, v [B, T, K, H] -> f32[B, T, N, H]."""
  b, t, n, h = q.shape
  kv = k.shape[2]
  qg = q.astype(jnp.float32).reshape(b, t, kv, n // kv, h)
  s = jnp.einsum("btkgh,bskh->bkgts", qg, k.astype(jnp.float32),
                 precision=_HI) * h ** -0.5
  mask = jnp.tril(jnp.ones((t, t), bool))
  s = jnp.where(mask, s, -jnp.inf)
  p = jax.nn.softmax(s, axis=-1)
  out = jnp.einsum("bkgts,bskh->btkgh", p, v.astype(jnp.float32),
                   precision=_HI)
  return out.reshape(b, t, n, h)


class Attention(nnx.Module):
  """q/k/v/o projections, RoPE at absolute positions, attention over a cache.
  """

  def __init__(self, config: config_lib.ModelConfig, *, rngs: nnx.Rngs):
    c = config
    dt = jnp.dtype(c.dtype)
    kw = dict(dtype=dt, param_dtype=dt, rngs=rngs)
    self.config = c
    self.q_proj = nnx.Linear(c.d_model, c.n_heads * c.head_dim,
                             use_bias=c.attn_bias, **kw)
    self.k_proj = nnx.Linear(c.d_model, c.n_kv_heads * c.head_dim,
                             use_bias=c.attn_bias, **kw)
    self.v_proj = nnx.Linear(c.d_model, c.n_kv_heads * c.head_dim,
                             use_bias=c.attn_bias, **kw)
    self.o_proj = nnx.Linear(c.n_heads * c.head_dim, c.d_model,
                             use_bias=c.out_bias, **kw)

  def _qkv(self, x: jax.Array, positions: jax.Array):
    """x [B, T, D] -> rotated q [B, T, N, H], k [B, T, K, H], v."""
    c = self.config
    b, t, _ = x.shape
    q = self.q_proj(x).reshape(b, t, c.n_heads, c.head_dim)
    k = self.k_proj(x).reshape(b, t, c.n_kv_heads, c.head_dim)
    v = self.v_proj(x).reshape(b, t, c.n_kv_heads, c.head_dim)
    inv_freq = layers.rope_frequencies(c.head_dim, c.rope_theta,
                                       c.rope_scaling)
    q = layers.apply_rope(q, positions, inv_freq, c.rope_style)
    k = layers.apply_rope(k, positions, inv_freq, c.rope_style)
    return q, k, v

  def _out(self, o: jax.Array) -> jax.Array:
    b, t = o.shape[:2]
    return self.o_proj(o.astype(jnp.dtype(self.config.dtype)).reshape(b, t,
                                                                      -1))

  def __call__(self, x: jax.Array, cache, lengths_before: jax.Array, *,
               prefill_lengths: jax.Array | None = None,
               impl: decode_attention.Impl | None = None):
    """Appends the T new tokens to `cache` and attends over it.

    Args:
      x: [B, T, D] inputs of the new tokens.
      cache: this layer's cache; its lengths must equal lengths_before.
      lengths_before: i32[B] tokens already in the cache; token t sits at
        position lengths_before[b] + t.
      prefill_lengths: None to append. Otherwise i32[B] valid tokens of a
        right-padded prompt: the cache's contents are replaced through
        cache.prefill (which also picks the outlier channels of fractional-
        bit TurboQuant caches), lengths_before must be zeros, and outputs at
        padded positions t >= prefill_lengths[b] are meaningless.
      impl: the chunk_attention implementation (None: best available).

    Returns:
      (out [B, T, D], the updated cache).
    """
    t = x.shape[1]
    positions = (lengths_before[:, None]
                 + jnp.arange(t, dtype=lengths_before.dtype)[None, :])
    q, k, v = self._qkv(x, positions)
    k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)       # [B, K, T, H]
    evicts = isinstance(cache, snapkv_cache.SnapKVCache)
    if prefill_lengths is None and t == 1 and not evicts:
      # One decode token: append and attend in one call (one kernel where
      # the cache's append_impl fuses and a GPU kernel fits).
      o, cache = decode_attention.append_attention(q, k, v, cache, impl=impl)
      return self._out(o), cache
    if prefill_lengths is None:
      cache = cache_lib.append(cache, k, v)
      # An evicting cache holds fewer slots than tokens seen.
      lengths = cache.slots if evicts else lengths_before + t
    else:
      cache = cache_lib.prefill(cache, k, v, prefill_lengths,
                                queries=jnp.swapaxes(q, 1, 2))
      if evicts:   # the prompt attends to all of itself, then is evicted
        dt = cache.keys.dtype
        o = causal_attention(q, jnp.swapaxes(k, 1, 2).astype(dt),
                             jnp.swapaxes(v, 1, 2).astype(dt))
        return self._out(o), cache
      # Query t sits at position t (padding comes after the valid tokens).
      lengths = jnp.full_like(prefill_lengths, t)
    o = decode_attention.chunk_attention(q, cache, lengths.astype(jnp.int32),
                                         impl=impl)
    return self._out(o), cache

  def forward_no_cache(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    """Plain causal attention of x [B, T, D] at positions i32[B, T]."""
    q, k, v = self._qkv(x, positions)
    return self._out(causal_attention(q, k, v))
