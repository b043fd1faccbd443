"""The public quantizer API: one set of functions for plain and split quantizers."""

import math

import jax
import numpy as np

from turboquant_jax.quant import split
from turboquant_jax.quant import turboquant

AnyQuantizer = turboquant.Quantizer | split.SplitQuantizer
AnyQuantized = turboquant.QuantizedTensor | split.SplitQuantizedTensor


def make_quantizer(key: jax.Array, dim: int, bits: float, method: str = "mse",
                   *, outlier_channels=None, **kwargs) -> AnyQuantizer:
  """Draws a quantizer for vectors of `dim` at `bits` per coordinate.

  Integer bits give a `Quantizer` (see turboquant.make_quantizer for the
  keyword options). Fractional bits (2.5, 3.5, ...) give a `SplitQuantizer`:
  round(frac·dim) outlier channels at ceil(bits) and the rest at floor(bits),
  so the code bits average exactly `bits`. Its outlier channels are
  `outlier_channels` if given, else 0..O-1 until set from data with
  `with_outlier_channels(q, select_outliers(x, O))`.
  """
  if isinstance(bits, (float, np.floating)) and not math.isfinite(bits):
    raise ValueError(f"{bits=} must be a finite number in [1, 8]")
  if isinstance(bits, (float, np.floating)) and not float(bits).is_integer():
    num, hi, lo = split.split_for_bits(dim, float(bits))
    channels = num if outlier_channels is None else outlier_channels
    if outlier_channels is not None and len(outlier_channels) != num:
      raise ValueError(f"{len(outlier_channels)=} outlier channels given, "
                       f"but {bits=} at {dim=} needs {num}")
    return split.make_split_quantizer(key, dim, hi, lo, channels, method,
                                      **kwargs)
  if outlier_channels is not None:
    raise ValueError("outlier_channels is only used with fractional bits")
  if isinstance(bits, (float, np.floating)) and math.isfinite(bits):
    bits = int(bits)
  return turboquant.make_quantizer(key, dim, bits, method, **kwargs)


def quantize(q: AnyQuantizer, x: jax.Array) -> AnyQuantized:
  """Quantizes x[*B, D] (float) into a QuantizedTensor of shape *B."""
  if isinstance(q, split.SplitQuantizer):
    return split.quantize(q, x)
  return turboquant.quantize(q, x)


def dequantize(q: AnyQuantizer, qt: AnyQuantized) -> jax.Array:
  """Reconstructs f32[*B, D]."""
  if isinstance(q, split.SplitQuantizer):
    return split.dequantize(q, qt)
  return turboquant.dequantize(q, qt)


def inner_product(q: AnyQuantizer, qt: AnyQuantized,
                  y: jax.Array) -> jax.Array:
  """Estimates ⟨y, x⟩ for queries y[*Y, D] against stored x: f32[*Y, *B]."""
  if isinstance(q, split.SplitQuantizer):
    return split.inner_product(q, qt, y)
  return turboquant.inner_product(q, qt, y)
