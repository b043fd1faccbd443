"""KV caches behind one protocol: init, prefill, append, dequantize, memory.

    cfg = CacheConfig(kind="turboquant", key_bits=4, value_bits=2.5)
    cache = init(cfg, batch, kv_heads, capacity, head_dim, key=key)
    cache = prefill(cache, k, v, lengths)     # k, v: [B, K, T, D]
    cache = append(cache, k1, v1)             # [B, K, 1, D] per decode step
"""

import importlib

import jax

from turboquant_jax.cache import common
from turboquant_jax.cache.config import CacheConfig

_MODULES = {"full": "turboquant_jax.cache.full_cache",
            "turboquant": "turboquant_jax.cache.turboquant_cache",
            "kivi": "turboquant_jax.cache.kivi_cache",
            "snapkv": "turboquant_jax.cache.snapkv_cache"}
# Kinds whose prefill selects tokens from the prompt's attention and so
# takes the prompt's queries.
_NEEDS_QUERIES = ("snapkv",)


def _module(kind: str):
  if kind not in _MODULES:
    raise ValueError(f"cache kind={kind!r} must be one of {list(_MODULES)}")
  return importlib.import_module(_MODULES[kind])


def init(config: CacheConfig, batch: int, kv_heads: int, capacity: int,
         head_dim: int, *, key: jax.Array | None = None):
  """An empty cache of `config.kind` with a static capacity."""
  return _module(config.kind).init(config, batch, kv_heads, capacity,
                                   head_dim, key=key)


def prefill(cache, k: jax.Array, v: jax.Array, lengths: jax.Array, *,
            queries: jax.Array | None = None):
  """Stores prompts k, v: [B, K, T, D] with lengths i32[B] (replaces).

  queries: [B, N, T, D], the prompts' queries after RoPE; used only by the
  kinds that select tokens by attention (snapkv, where they are required),
  ignored by the others.
  """
  kind = cache.config.kind
  if kind in _NEEDS_QUERIES:
    return _module(kind).prefill(cache, k, v, lengths, queries=queries)
  return _module(kind).prefill(cache, k, v, lengths)


def append(cache, k: jax.Array, v: jax.Array):
  """Appends T new tokens k, v: [B, K, T, D] to every sequence."""
  return _module(cache.config.kind).append(cache, k, v)


def dequantize(cache) -> tuple[jax.Array, jax.Array]:
  """f32[B, K, S, D] keys and values, as attention reads them."""
  return _module(cache.config.kind).dequantize(cache)


def _fixed_leaves(cache) -> list:
  """What a cache holds that is fixed for its life (or set once by
  prefill): the quantizers and the rotations' kernel forms."""
  return [getattr(cache, name) for name in ("key_quantizer",
                                            "value_quantizer",
                                            "rotation_tiles",
                                            "key_split_rotation",
                                            "value_split_rotation")
          if getattr(cache, name, None) is not None]


def memory(cache) -> dict[str, float]:
  """Exact storage accounting.

  Returns:
    nbytes: every array the cache holds (codes, norms, windows, lengths,
      rotations, sketches, codebooks, outlier channel indices).
    fixed_nbytes: the part that does not grow with capacity or batch
      (quantizer matrices and their kernel forms: tiles, folded split
      rotations; codebooks, outlier indices).
    bytes_per_token: (nbytes - fixed_nbytes) / (batch * capacity): keys and
      values of all KV heads of one token, norms, window share included.
    bits_per_coordinate: bytes_per_token * 8 / (2 * kv_heads * head_dim).
    compression_ratio: a bf16 cache's bytes per token over ours.
  """
  total = common.nbytes(cache)
  fixed = common.nbytes(_fixed_leaves(cache))
  tokens = cache.batch * cache.capacity
  per_token = (total - fixed) / tokens
  coords = 2 * cache.kv_heads * cache.head_dim
  return dict(nbytes=total, fixed_nbytes=fixed, bytes_per_token=per_token,
              bits_per_coordinate=per_token * 8 / coords,
              compression_ratio=coords * 2 / per_token)
