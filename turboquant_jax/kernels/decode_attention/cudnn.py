"""impl="cudnn": decode attention over a full bf16/f16 cache by cuDNN.

A full-precision baseline on an NVIDIA GPU. A FullCache keeps
keys and values as [B, K, S, D], which is cuDNN's BNTH layout, so they are
read in place (jax.nn.dot_product_attention takes BTNH only, which would
cost a transpose of the whole cache per call); per-sequence lengths are a
padding mask. Decode only (one query token): a chunk's causal mask ends at
each sequence's length, which cuDNN's top-left causal mask does not
express. impl=None does not pick it. On the H200 (SmolLM2 shape, B=32,
8k tokens) 87.4 µs a call against 91.5 for impl="xla"
(results/decode_bench/h200_v7/probes.txt), and the whole decode step
10234 tok/s against 9340 (h200_v7/results.jsonl).
"""

import jax
import jax.numpy as jnp

from turboquant_jax.cache import full_cache


def attention(q: jax.Array, cache, lengths: jax.Array,
              scale: float | None = None) -> jax.Array:
  """q [B, 1, H, D] over a FullCache -> f32[B, 1, H, D].

  Raises NotImplementedError off a GPU, for other caches, for more than one
  query token and for caches stored in neither bfloat16 nor float16.
  """
  if not isinstance(cache, full_cache.FullCache):
    raise NotImplementedError(f"impl='cudnn' reads a FullCache, not "
                              f"{type(cache).__name__}")
  b, t, _, d = q.shape
  if t != 1:
    raise NotImplementedError(f"impl='cudnn' is decode only: {t} query "
                              "tokens")
  dt = cache.keys.dtype
  if dt not in (jnp.bfloat16, jnp.float16):
    raise NotImplementedError(f"impl='cudnn' needs a bf16/f16 cache, not {dt}")
  if jax.default_backend() != "gpu":
    raise NotImplementedError("impl='cudnn' needs an NVIDIA GPU")
  # pylint: disable-next=g-import-not-at-top (GPU only; BNTH has no public API)
  from jax._src.cudnn import fused_attention_stablehlo as fused
  lengths = jnp.minimum(lengths, cache.capacity).astype(jnp.int32)
  out = fused.dot_product_attention(
      jnp.swapaxes(q.astype(dt), 1, 2), cache.keys, cache.values,
      q_seqlen=jnp.ones((b,), jnp.int32), kv_seqlen=jnp.maximum(lengths, 1),
      scale=d ** -0.5 if scale is None else scale,
      mask_type=fused.MaskType.PADDING, qkv_layout="BNTH")
  out = jnp.swapaxes(out, 1, 2).astype(jnp.float32)           # [B, 1, H, D]
  # An empty sequence attends to nothing: zeros, as the reference gives.
  return jnp.where((lengths > 0)[:, None, None, None], out, 0.0)
