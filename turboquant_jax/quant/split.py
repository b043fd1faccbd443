"""Fractional bit widths by the outlier split.

The channels are partitioned into an "outlier" set and a "regular" set, and
each set gets its own independent TurboQuant quantizer (own rotation, own
norm) at its own integer bit width. E.g. the paper's "2.5-bit" head-dim-128
cache: 32 channels at 3 bits + 96 at 2 bits (2.25 code bits; 2.5 once both
fp16 norms are counted). The channel sets are data (a pytree leaf), so they
can be chosen per layer and head from the data, e.g. by `select_outliers`.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from turboquant_jax.quant import rotation
from turboquant_jax.quant import turboquant


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SplitQuantizer:
  """Two quantizers over a channel partition; a pytree.

  Attributes:
    outlier: quantizer for the outlier channels (dim = O).
    regular: quantizer for the rest (dim = D - O).
    outlier_channels: i32[O] channel indices, ascending.
    regular_channels: i32[D-O] the complement, ascending.
    dim: D.
  """
  outlier: turboquant.Quantizer
  regular: turboquant.Quantizer
  outlier_channels: jax.Array
  regular_channels: jax.Array
  dim: int = dataclasses.field(metadata=dict(static=True))

  @property
  def bits(self) -> float:
    """Code bits per coordinate, averaged over the channels."""
    o = self.outlier.dim
    return (o * self.outlier.bits + (self.dim - o) * self.regular.bits
            ) / self.dim

  @property
  def method(self) -> str:
    return self.regular.method


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SplitQuantizedTensor:
  """The two parts of split-quantized vectors x[*B, D]; a pytree."""
  outlier: turboquant.QuantizedTensor
  regular: turboquant.QuantizedTensor
  dim: int = dataclasses.field(metadata=dict(static=True))

  @property
  def shape(self) -> tuple[int, ...]:
    return self.regular.shape

  @property
  def bits_per_vector(self) -> int:
    """Everything both parts store per vector (codes, both norms, ...)."""
    return self.outlier.bits_per_vector + self.regular.bits_per_vector

  @property
  def bits_per_coordinate(self) -> float:
    return self.bits_per_vector / self.dim


def complement(channels: jax.Array, dim: int) -> jax.Array:
  """The ascending channels of range(dim) not in `channels` (jit-safe)."""
  mask = jnp.zeros((dim,), jnp.int32).at[channels].set(1)
  order = jnp.argsort(mask, stable=True)
  return order[:dim - channels.shape[0]].astype(jnp.int32)


def _check_channels(channels, dim: int) -> None:
  if isinstance(channels, jax.core.Tracer):
    return
  c = np.asarray(channels)
  if c.ndim != 1 or not np.issubdtype(c.dtype, np.integer):
    raise ValueError(f"outlier_channels must be a 1-D integer array, got "
                     f"shape {c.shape} dtype {c.dtype}")
  if c.size and (c.min() < 0 or c.max() >= dim):
    raise ValueError(f"outlier_channels must lie in [0, {dim}), got range "
                     f"[{c.min()}, {c.max()}]")
  if np.unique(c).size != c.size:
    raise ValueError("outlier_channels must not repeat a channel")


def make_split_quantizer(key: jax.Array, dim: int, outlier_bits: int,
                         regular_bits: int, outlier_channels,
                         method: str = "mse", **kwargs) -> SplitQuantizer:
  """Builds the outlier-split quantizer.

  Args:
    key: jax.random key (split into one key per part).
    dim: total dimension D.
    outlier_bits, regular_bits: integer bits of the two parts.
    outlier_channels: an int O (the channels are then 0..O-1 until replaced
      by `with_outlier_channels`), or i32[O] channel indices.
    method: "mse" or "prod" for both parts.
    **kwargs: passed to make_quantizer for both parts (norm_dtype, ...).
  """
  if isinstance(outlier_channels, (int, np.integer)):
    num = int(outlier_channels)
    channels = jnp.arange(num, dtype=jnp.int32)
  else:
    _check_channels(outlier_channels, dim)
    channels = jnp.asarray(outlier_channels, jnp.int32)
    num = channels.shape[0]
  if not 0 < num < dim:
    raise ValueError(f"number of outlier channels {num} must be in "
                     f"(0, {dim=})")
  k_out, k_reg = jax.random.split(key)
  channels = jnp.sort(channels)             # ascending, as documented
  return SplitQuantizer(
      outlier=turboquant.make_quantizer(k_out, num, outlier_bits, method,
                                        **kwargs),
      regular=turboquant.make_quantizer(k_reg, dim - num, regular_bits,
                                        method, **kwargs),
      outlier_channels=channels, regular_channels=complement(channels, dim),
      dim=dim)


def with_outlier_channels(sq: SplitQuantizer,
                          channels: jax.Array) -> SplitQuantizer:
  """The same quantizer with a new outlier channel set (same count)."""
  channels = jnp.asarray(channels)
  if channels.shape != sq.outlier_channels.shape:
    raise ValueError(f"{channels.shape=} must equal "
                     f"{sq.outlier_channels.shape} (the outlier count)")
  _check_channels(channels, sq.dim)
  channels = jnp.sort(jnp.asarray(channels, jnp.int32))
  return dataclasses.replace(sq, outlier_channels=channels,
                             regular_channels=complement(channels, sq.dim))


def folded_rotation(sq: SplitQuantizer) -> jax.Array:
  """f32[D, D] E with E x = concat(Π_o x[outliers], Π_r x[regulars]).

  Both parts' channel gathers and rotations as one matrix: rows [0, O) hold
  Π_o at the outlier columns, rows [O, D) Π_r at the regular ones. E is
  orthogonal, so Eᵀ [y_o, y_r] puts both parts' inverse rotations back at
  their channels. A decode kernel's XLA work then takes one product each
  way: not a gather and two products before the kernel, two products and
  two scatters after it.
  """
  num = sq.outlier_channels.shape[-1]
  e = jnp.zeros((sq.dim, sq.dim), jnp.float32)
  e = e.at[:num, sq.outlier_channels].set(
      rotation.as_matrix(sq.outlier.rotation))
  return e.at[num:, sq.regular_channels].set(
      rotation.as_matrix(sq.regular.rotation))


def select_outliers(x: jax.Array, num: int) -> jax.Array:
  """Top-`num` channels by L2 norm over the vectors: x[..., N, D] -> i32[..., num].

  The paper's authors pick the KV cache's outlier channels this way from the
  prefill keys, per layer and KV head. Returned ascending.
  """
  energy = jnp.sum(jnp.square(x.astype(jnp.float32)), axis=-2)
  _, idx = jax.lax.top_k(energy, num)
  return jnp.sort(idx, axis=-1).astype(jnp.int32)


def quantize(sq: SplitQuantizer, x: jax.Array) -> SplitQuantizedTensor:
  """Quantizes each channel group with its own quantizer."""
  turboquant._check_input("x", x, sq.dim)
  turboquant.check_finite("x", x)
  xo = jnp.take(x, sq.outlier_channels, axis=-1)
  xr = jnp.take(x, sq.regular_channels, axis=-1)
  return SplitQuantizedTensor(outlier=turboquant.quantize(sq.outlier, xo),
                              regular=turboquant.quantize(sq.regular, xr),
                              dim=sq.dim)


def _check_pair(sq: SplitQuantizer, sqt) -> None:
  if not isinstance(sqt, SplitQuantizedTensor) or sqt.dim != sq.dim:
    raise ValueError("expected a SplitQuantizedTensor of dim "
                     f"{sq.dim}, got {type(sqt).__name__}")


def dequantize(sq: SplitQuantizer, sqt: SplitQuantizedTensor) -> jax.Array:
  """Reassembles f32[*B, D] from both parts."""
  _check_pair(sq, sqt)
  xo = turboquant.dequantize(sq.outlier, sqt.outlier)
  xr = turboquant.dequantize(sq.regular, sqt.regular)
  out = jnp.zeros((*sqt.shape, sq.dim), jnp.float32)
  out = out.at[..., sq.outlier_channels].set(xo)
  return out.at[..., sq.regular_channels].set(xr)


def inner_product(sq: SplitQuantizer, sqt: SplitQuantizedTensor,
                  y: jax.Array) -> jax.Array:
  """Sum of both parts' estimates: y f32[*Y, D] -> f32[*Y, *B]."""
  _check_pair(sq, sqt)
  turboquant._check_input("y", y, sq.dim)
  yo = jnp.take(y, sq.outlier_channels, axis=-1)
  yr = jnp.take(y, sq.regular_channels, axis=-1)
  return (turboquant.inner_product(sq.outlier, sqt.outlier, yo)
          + turboquant.inner_product(sq.regular, sqt.regular, yr))


def split_for_bits(dim: int, bits: float) -> tuple[int, int, int]:
  """(outlier count, outlier bits, regular bits) with exactly `bits` code bits
  per coordinate on average, e.g. (64, 3, 2) for dim=128, bits=2.5."""
  if not math.isfinite(bits):
    raise ValueError(f"{bits=} must be a finite number in [1, 8]")
  lo = math.floor(bits)
  num = round((bits - lo) * dim)
  if not 0 < num < dim or not 1 <= lo < 8:
    raise ValueError(f"{bits=} cannot be split over {dim=} channels: need "
                     "1 <= bits < 8 and a fractional part that gives between "
                     "1 and dim-1 channels")
  if not math.isclose(lo + num / dim, bits, abs_tol=1e-9):
    raise ValueError(f"{bits=} is not reachable with {dim=} channels "
                     f"(nearest: {lo + num / dim})")
  return num, lo + 1, lo
