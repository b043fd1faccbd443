"""decode_attention / chunk_attention over any KV cache, with impl dispatch.

impl=None picks the best implementation for the backend (a Pallas kernel
where one supports the cache and shapes) and falls back to "xla"; a named
impl raises if it cannot run. "reference" is the dequantize-then-attend
specification.
"""

from typing import Literal

import jax
import jax.numpy as jnp

from turboquant_jax.kernels.decode_attention import cudnn
from turboquant_jax.kernels.decode_attention import reference
from turboquant_jax.kernels.decode_attention import xla

Impl = Literal["xla", "reference", "pallas_gpu", "pallas_tpu", "cudnn"]


def _load_impls():
  """The available implementations. Imported eagerly, at module load: the
  Pallas backends register JAX config options, which are part of jit's
  cache key, so importing them lazily would make the first jitted call
  after the import compile twice."""
  table = {"xla": xla.attention, "reference": reference.attention_reference,
           "cudnn": cudnn.attention}
  try:
    from turboquant_jax.kernels.decode_attention import pallas_tpu
    table["pallas_tpu"] = pallas_tpu.attention
  except ImportError:
    pass
  try:
    from turboquant_jax.kernels.decode_attention import pallas_gpu
    table["pallas_gpu"] = pallas_gpu.attention
  except ImportError:
    pass
  return table


_IMPLS = _load_impls()


def _impls():
  return _IMPLS


def _preferred() -> list[str]:
  backend = jax.default_backend()
  return {"gpu": ["pallas_gpu", "xla"], "tpu": ["pallas_tpu", "xla"]}.get(
      backend, ["xla"])


def chunk_attention(q: jax.Array, cache, lengths: jax.Array, *,
                    impl: Impl | None = None, scale: float | None = None,
                    **kwargs) -> jax.Array:
  """Attention of T new tokens q [B, T, H, D] over the cache (causal).

  The T tokens must already be in the cache: query t of sequence b sits at
  position lengths[b] - T + t. Returns f32[B, T, H, D].
  """
  reference.validate(q, cache, lengths)
  table = _impls()
  if impl is not None:
    if impl not in table:
      raise ValueError(f"{impl=!r} is not available here; have {list(table)}")
    return table[impl](q, cache, lengths, scale=scale, **kwargs)
  errors = []
  for name in _preferred():
    if name not in table:
      continue
    try:
      return table[name](q, cache, lengths, scale=scale, **kwargs)
    except NotImplementedError as e:
      errors.append(e)
  raise ExceptionGroup("all attention implementations failed", errors)


def decode_attention(q: jax.Array, cache, lengths: jax.Array, *,
                     impl: Impl | None = None, scale: float | None = None,
                     **kwargs) -> jax.Array:
  """One new token per sequence: q [B, H, D] -> f32[B, H, D].

  Args:
    q: queries of the token at position lengths[b] - 1 (already appended).
    cache: any cache of turboquant_jax.cache.
    lengths: i32[B] tokens to attend to per sequence.
    impl: None (best available), "xla", "reference", "pallas_gpu",
      "pallas_tpu", "cudnn" (a full bf16/f16 cache on a GPU, decode only).
    scale: softmax scale, default 1/sqrt(D).
  """
  shape = getattr(q, "shape", None)
  if shape is None or len(shape) != 3:
    raise ValueError(f"q must be [batch, q_heads, head_dim], got {shape}")
  return chunk_attention(q[:, None], cache, lengths, impl=impl, scale=scale,
                         **kwargs)[:, 0]


# append_impl="auto" fuses the append into the attention kernel up to this
# many (sequence, KV head) pairs. Measured on the H200 with SmolLM2 (3 KV
# heads, 8k context, results/decode_bench/h200_v12*): one launch was faster
# at B = 1, 4, 8 and 16 (3 to 48 pairs; +8-10% decode tokens/s at B = 1, +2%
# at 16) and slower at B = 32 (96 pairs, -4 to -5%), before kernel v7.
FUSED_MAX_SEQUENCE_HEADS = 64
# ... and where each attention program streams at most this many tiles of
# pallas_gpu.ROWS tokens. Why long programs lose is not measured; the
# fused kernel runs without options the separate one's defaults turn on
# (the approximate exp, which would change the appended token's bytes;
# values in registers). Llama-3.1-8B-shaped decode (32 layers, 8 KV heads,
# D = 128, 4 bits; results/decode_bench/h200_llama/): one launch against two,
# B = 1, 8k (3 tiles) 7.36 against 7.67 ms a step; B = 1, 16k (4 tiles)
# 7.43 against 7.40; B = 8, 8k (9 tiles) 8.17 against 8.10; 16k (17) 9.87
# against 9.40; 32k (33) 13.33 against 11.80. SmolLM2 at B = 16 (9 tiles;
# results/decode_bench/h200_v19/b16/): 2.115 against 2.021 ms a step.
FUSED_MAX_TILES = 8


def fuses_append(cache) -> bool:
  """Whether cache's append_impl asks append_attention for one launch."""
  impl = cache.config.append_impl
  if impl != "auto":
    return impl == "fused"
  if (cache.batch * cache.kv_heads > FUSED_MAX_SEQUENCE_HEADS
      or "pallas_gpu" not in _impls()):
    return False
  # pylint: disable-next=g-import-not-at-top (present: it is in the table)
  from turboquant_jax.kernels.decode_attention import pallas_gpu
  return (pallas_gpu.tiles_per_program(cache, pallas_gpu.append_splits(cache))
          <= FUSED_MAX_TILES)


def append_attention(q: jax.Array, k: jax.Array, v: jax.Array, cache, *,
                     impl: Impl | None = None, scale: float | None = None):
  """One decode token: appends k, v [B, K, 1, D] at position
  cache.lengths[b] and attends q [B, 1, H, D] over the cache, the token
  included. Returns (f32[B, 1, H, D], the updated cache).

  The same as cache_lib.append and then chunk_attention(lengths + 1). A
  TurboQuant cache whose append_impl fuses (fuses_append: "fused", or
  "auto" for a small batch), on a GPU, with impl None or "pallas_gpu", is
  appended and read by one kernel launch (pallas_gpu.append_attention)
  where that kernel supports it.
  """
  # pylint: disable-next=g-import-not-at-top (the caches import this)
  from turboquant_jax import cache as cache_lib
  table = _impls()
  if (fuses_append(cache)
      and impl in (None, "pallas_gpu") and "pallas_gpu" in table
      and (impl == "pallas_gpu" or jax.default_backend() == "gpu")):
    # pylint: disable-next=g-import-not-at-top (present: it is in table)
    from turboquant_jax.kernels.decode_attention import pallas_gpu
    if pallas_gpu.append_supported(q, cache) is None:
      return pallas_gpu.append_attention(q, k, v, cache, scale=scale)
  lengths = (cache.lengths + q.shape[1]).astype(jnp.int32)
  cache = cache_lib.append(cache, k, v)
  return chunk_attention(q, cache, lengths, impl=impl, scale=scale), cache
