"""RMSNorm, rotary position embedding (two conventions), SwiGLU MLP.

Shapes: B batch, T tokens, N heads, H head dim, D model dim, F ffn dim.

RoPE conventions. "half" (Hugging Face) rotates the pairs
(x[i], x[i + H/2]); "interleaved" (Meta's original code, llama.cpp, GGUF)
rotates (x[2i], x[2i+1]), both by angle pos · inv_freq[i]. llama.cpp's
converter permutes the rows of q_proj and k_proj per head
(`permute_for_interleaved`) so that the interleaved rotation of the permuted
projections equals the half-split rotation of the HF ones, up to the same
permutation of the head's coordinates (which q·k does not see).
"""

import math

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from turboquant_jax.model import config as config_lib


class RMSNorm(nnx.Module):
  """x / rms(x) · scale, normalized in float32 (as Hugging Face's Llama)."""

  def __init__(self, dim: int, *, eps: float = 1e-6,
               dtype: str = "float32"):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), jnp.dtype(dtype)))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    var = jnp.mean(x32 * x32, axis=-1, keepdims=True)
    y = (x32 * jax.lax.rsqrt(var + self.eps)).astype(x.dtype)
    return self.scale[...] * y


def rope_frequencies(head_dim: int, theta: float,
                     scaling: config_lib.RopeScaling | None = None
                     ) -> np.ndarray:
  """f32[H/2] inverse frequencies, with Llama-3.1 scaling if given.

  Computed in float64 (a trace-time constant) and rounded once.
  """
  inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64)
                        / head_dim)
  if scaling is not None:
    old = scaling.original_max_position_embeddings
    low_wavelen = old / scaling.low_freq_factor
    high_wavelen = old / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / scaling.factor, inv)
    smooth = ((old / wavelen - scaling.low_freq_factor)
              / (scaling.high_freq_factor - scaling.low_freq_factor))
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    inv = np.where(medium, smoothed, scaled)
  return inv.astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq,
               style: str = "half") -> jax.Array:
  """Rotates x [B, T, N, H] at absolute positions i32[B, T].

  Args:
    x: queries or keys.
    positions: the absolute position of each token.
    inv_freq: f32[H/2] from rope_frequencies.
    style: "half" (pairs (i, i + H/2)) or "interleaved" (pairs (2i, 2i+1)).

  Returns:
    x rotated, in x's dtype (the rotation itself runs in float32).
  """
  if style not in config_lib.ROPE_STYLES:
    raise ValueError(f"{style=} must be one of {config_lib.ROPE_STYLES}")
  angle = (positions.astype(jnp.float32)[..., None]
           * jnp.asarray(inv_freq, jnp.float32))            # [B, T, H/2]
  cos = jnp.cos(angle)[:, :, None, :]
  sin = jnp.sin(angle)[:, :, None, :]
  xf = x.astype(jnp.float32)
  if style == "half":
    x1, x2 = jnp.split(xf, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin],
                          axis=-1)
  else:
    pairs = xf.reshape(*xf.shape[:-1], -1, 2)
    x1, x2 = pairs[..., 0], pairs[..., 1]
    out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin],
                    axis=-1).reshape(xf.shape)
  return out.astype(x.dtype)


def _check_rows(w, n_heads: int) -> int:
  rows = w.shape[0] if getattr(w, "ndim", 0) else None
  if rows is None or n_heads < 1 or rows % (2 * n_heads):
    raise ValueError(f"w.shape={getattr(w, 'shape', None)}: the leading axis "
                     f"must be {n_heads=} times an even head_dim")
  return rows // n_heads


def permute_for_interleaved(w, n_heads: int):
  """HF (half-split) q/k rows -> interleaved order (llama.cpp's permute).

  Within each head, row i of the first half goes to 2i and row i of the
  second half to 2i + 1, so that interleaved RoPE on the permuted projection
  equals half-split RoPE on the original (coordinates permuted alike).

  Args:
    w: q_proj or k_proj weight in HF layout [n_heads * H, ...] (output rows
      first), or its bias [n_heads * H]; numpy or jax.
    n_heads: heads of that projection (num_key_value_heads for k_proj).

  Returns:
    The permuted array, same shape and type.
  """
  h = _check_rows(w, n_heads)
  return (w.reshape(n_heads, 2, h // 2, *w.shape[1:]).swapaxes(1, 2)
          .reshape(w.shape))


def unpermute_from_interleaved(w, n_heads: int):
  """The inverse of permute_for_interleaved (GGUF rows -> HF rows)."""
  h = _check_rows(w, n_heads)
  return (w.reshape(n_heads, h // 2, 2, *w.shape[1:]).swapaxes(1, 2)
          .reshape(w.shape))


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) · up(x))."""

  def __init__(self, d_model: int, ffn_dim: int, *, dtype: str = "float32",
               rngs: nnx.Rngs):
    kw = dict(use_bias=False, dtype=jnp.dtype(dtype),
              param_dtype=jnp.dtype(dtype), rngs=rngs)
    self.gate_proj = nnx.Linear(d_model, ffn_dim, **kw)
    self.up_proj = nnx.Linear(d_model, ffn_dim, **kw)
    self.down_proj = nnx.Linear(ffn_dim, d_model, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))
