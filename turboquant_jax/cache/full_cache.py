"""The uncompressed KV cache with the same interface (the baseline)."""

import dataclasses

import jax
import jax.numpy as jnp

from turboquant_jax.cache import common
from turboquant_jax.cache.config import CacheConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FullCache(common.DenseShape):
  """keys, values: [B, K, S, D] in config.dtype; lengths: i32[B]."""
  keys: jax.Array
  values: jax.Array
  lengths: jax.Array
  config: CacheConfig = dataclasses.field(metadata=dict(static=True))


def init(config: CacheConfig, batch: int, kv_heads: int, capacity: int,
         head_dim: int, *, key: jax.Array | None = None) -> FullCache:
  """An empty full-precision cache (`key` is unused)."""
  del key
  if config.kind != "full":
    raise ValueError(f"config.kind={config.kind!r}: expected 'full'")
  common.check_dims(batch=batch, kv_heads=kv_heads, capacity=capacity,
                    head_dim=head_dim)
  z = jnp.zeros((batch, kv_heads, capacity, head_dim), jnp.dtype(config.dtype))
  return FullCache(keys=z, values=z, lengths=jnp.zeros((batch,), jnp.int32),
                   config=config)


@jax.jit
def _prefill(cache, k, v, lengths):
  pos = jnp.broadcast_to(jnp.arange(k.shape[2]), (k.shape[0], k.shape[2]))
  return dataclasses.replace(
      cache, keys=common.write_tokens(cache.keys, k, pos),
      values=common.write_tokens(cache.values, v, pos),
      lengths=lengths.astype(jnp.int32))


def prefill(cache: FullCache, k, v, lengths) -> FullCache:
  """Stores prompts k, v: [B, K, T, D] with valid lengths i32[B]."""
  common.check_prefill(cache, k, v, lengths)
  return _prefill(cache, k, v, lengths)


@jax.jit
def _append(cache, k, v):
  pos = common.append_positions(cache.lengths, k.shape[2])
  return dataclasses.replace(
      cache, keys=common.write_tokens(cache.keys, k, pos),
      values=common.write_tokens(cache.values, v, pos),
      lengths=jnp.minimum(cache.lengths + k.shape[2], cache.capacity))


def append(cache: FullCache, k, v) -> FullCache:
  """Appends k, v: [B, K, T, D]; past capacity: ValueError eagerly, dropped
  under jit."""
  common.check_append(cache, k, v)
  return _append(cache, k, v)


def dequantize(cache: FullCache) -> tuple[jax.Array, jax.Array]:
  """f32[B, K, S, D] keys and values."""
  return cache.keys.astype(jnp.float32), cache.values.astype(jnp.float32)
