"""TurboQuant quantizers: mse (Algorithm 1), prod (Algorithm 2) and QJL.

Shapes: D = dim, M = QJL sketch size, P = packed words, *B = leading axes.

- mse: store idx = nearest centroid of each coordinate of Π x/‖x‖ (packed b
  bits each) and a per-vector scale s. x̃ = s · Πᵀ c[idx]. Without norm
  correction s = ‖x‖; with it s = ‖x‖ / ‖c[idx]‖, so ‖x̃‖ = ‖x‖ exactly (the
  rescaling costs no extra storage: it is folded into the stored scale).
- prod: the mse stage at b-1 bits, then 1-bit QJL of the residual and its
  norm γ. The residual is sketched in the rotated domain, r' = Π x - s·c[idx]
  with S i.i.d. N(0,1): S Π has the same law as S, so this is Algorithm 2 in
  distribution, and lets kernels rotate the query once and never rotate back.
  ⟨y, x⟩ ≈ ⟨Π y, s·c[idx]⟩ + √(π/2)/M · γ · ⟨S Π y, sign(S r')⟩, unbiased.
- qjl: sign(S x) and ‖x‖ alone; ⟨y, x⟩ ≈ √(π/2)/M · ‖x‖ · ⟨S y, sign(S x)⟩.

Non-finite input: `quantize` raises a ValueError when called eagerly on
concrete arrays. Under jit/vmap it cannot raise, so a vector containing NaN
or ±Inf is stored with a NaN scale: it dequantizes to all-NaN and its inner
products are NaN, while every other vector is unaffected.
"""

import dataclasses
import enum
import math

import jax
import jax.numpy as jnp
import numpy as np

from turboquant_jax.quant import codebook as codebook_lib
from turboquant_jax.quant import packing
from turboquant_jax.quant import rotation as rotation_lib

_HIGHEST = jax.lax.Precision.HIGHEST
_NORM_DTYPES = ("float32", "float16", "bfloat16")
_QJL_SCALE = math.sqrt(math.pi / 2)


class Method(enum.StrEnum):
  MSE = "mse"      # Algorithm 1: minimum reconstruction error
  PROD = "prod"    # Algorithm 2: unbiased inner products (mse at b-1 + QJL)
  QJL = "qjl"      # the 1-bit sign sketch alone


def _static(**kw):
  return dataclasses.field(metadata=dict(static=True), **kw)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Quantizer:
  """Everything needed to quantize vectors of one dimension; a pytree.

  Attributes:
    rotation: Π (None for qjl).
    centroids: f32[2**mse_bits] sorted codebook (f32[0] when mse_bits = 0).
    thresholds: f32[2**mse_bits - 1] midpoints between centroids.
    sketch: f32[M, D] Gaussian QJL matrix (prod and qjl), else None.
    dim, bits, method, norm_dtype, norm_correction, grid_centroids: static
      configuration (grid_centroids: the centroids are
      codebook.grid_codebook's, not codebook.codebook's).
  """
  rotation: rotation_lib.Rotation | None
  centroids: jax.Array
  thresholds: jax.Array
  sketch: jax.Array | None
  dim: int = _static()
  bits: int = _static()
  method: str = _static()
  norm_dtype: str = _static(default="float32")
  norm_correction: bool = _static(default=False)
  grid_centroids: bool = _static(default=False)

  @property
  def mse_bits(self) -> int:
    """Bits per coordinate of the codebook stage."""
    return {Method.MSE: self.bits, Method.PROD: self.bits - 1,
            Method.QJL: 0}[self.method]

  @property
  def sketch_dim(self) -> int:
    return 0 if self.sketch is None else self.sketch.shape[-2]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedTensor:
  """Quantized vectors x[*B, D]; a pytree.

  Attributes:
    codes: u8[*B, P] packed centroid indices (P = 0 without an mse stage).
    norms: [*B] per-vector scale in the quantizer's norm dtype: ‖x‖, or
      ‖x‖/‖c[idx]‖ with norm correction (None for prod at 1 bit, which has
      no mse stage).
    signs: u8[*B, M/8] packed QJL signs (prod, qjl), else None.
    residual_norms: [*B] γ = ‖residual‖ (prod), else None.
    dim, bits, method: static, must match the quantizer.
  """
  codes: jax.Array
  norms: jax.Array | None
  signs: jax.Array | None
  residual_norms: jax.Array | None
  dim: int = _static()
  bits: int = _static()
  method: str = _static()

  @property
  def shape(self) -> tuple[int, ...]:
    """The leading shape *B (one vector per entry)."""
    return self.codes.shape[:-1]

  @property
  def bits_per_vector(self) -> int:
    """All bits stored per vector: codes, norms, signs, residual norms."""
    total = 0
    for arr in (self.codes, self.signs):
      if arr is not None:
        total += arr.shape[-1] * arr.dtype.itemsize * 8
    for arr in (self.norms, self.residual_norms):
      if arr is not None:
        total += arr.dtype.itemsize * 8
    return total

  @property
  def bits_per_coordinate(self) -> float:
    """bits_per_vector / dim: the honest storage rate."""
    return self.bits_per_vector / self.dim


# ----------------------------------------------------------------- building


def _check_bits(bits, method: str) -> int:
  if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
    raise ValueError(f"{bits=} must be an integer in [1, 8] for "
                     f"method={method!r}")
  if method == Method.QJL and bits != 1:
    raise ValueError(f"{bits=}: method='qjl' stores exactly 1 bit per sketch "
                     "coordinate; pass bits=1 and choose sketch_dim")
  if not 1 <= bits <= 8:
    raise ValueError(f"{bits=} must be in [1, 8]")
  return int(bits)


def make_quantizer(key: jax.Array, dim: int, bits: int, method: str = "mse",
                   *, rotation: str = "haar", norm_dtype: str = "float32",
                   norm_correction: bool = False,
                   sketch_dim: int | None = None,
                   hadamard_rounds: int = 2,
                   grid_centroids: bool = False) -> Quantizer:
  """Draws a TurboQuant quantizer (rotation and QJL sketch) from `key`.

  Args:
    key: jax.random key; the same key gives the same quantizer.
    dim: vector dimension D (>= 3 for mse and prod).
    bits: bits per coordinate, 1..8 (prod spends b-1 on the codebook and 1 on
      the QJL sign; qjl takes bits=1).
    method: "mse", "prod" or "qjl".
    rotation: "haar" (any dim) or "hadamard" (dim a power of two).
    norm_dtype: dtype of the stored per-vector norms: "float32" (default,
      exact for any input) or "float16"/"bfloat16" (smaller; float16
      overflows above 65504).
    norm_correction: rescale so the dequantized vector has the stored norm.
    sketch_dim: M, the QJL sketch size (qjl only; prod uses M = D).
    hadamard_rounds: rounds of the randomized Hadamard transform.
    grid_centroids: the codebook rounded to a uniform grid of 127 levels
      (codebook.grid_codebook: +0.24% distortion at 4 bits), which the GPU
      decode kernel looks up faster at 3 and 4 bits. Codebook stages of
      1..6 bits.

  Returns:
    A Quantizer pytree.
  """
  methods = [m.value for m in Method]
  if method not in methods:
    raise ValueError(f"{method=!r} must be one of {methods}")
  bits = _check_bits(bits, method)
  if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)):
    raise ValueError(f"{dim=} must be an integer")
  dim = int(dim)
  if norm_dtype not in _NORM_DTYPES:
    raise ValueError(f"{norm_dtype=!r} must be one of {_NORM_DTYPES}")
  mse_bits = {Method.MSE: bits, Method.PROD: bits - 1, Method.QJL: 0}[method]
  if method != Method.QJL and dim < codebook_lib.MIN_DIM:
    raise ValueError(f"{dim=} must be >= {codebook_lib.MIN_DIM} for "
                     f"method={method!r}")
  if method == Method.QJL:
    if dim < 1:
      raise ValueError(f"{dim=} must be >= 1")
    sketch_dim = dim if sketch_dim is None else sketch_dim
    if not isinstance(sketch_dim, (int, np.integer)) or sketch_dim < 1:
      raise ValueError(f"{sketch_dim=} must be a positive integer")
  elif sketch_dim is not None and sketch_dim != dim:
    raise ValueError(f"{sketch_dim=} is only configurable for method='qjl' "
                     f"(prod uses sketch_dim = dim = {dim})")
  if grid_centroids and not 1 <= mse_bits <= 6:
    raise ValueError(f"grid_centroids=True needs a codebook stage of 1..6 "
                     f"bits; {method=!r} at {bits=} has {mse_bits}")
  rot_key, sketch_key = jax.random.split(key)
  rot = None
  if method != Method.QJL:
    rot = rotation_lib.make_rotation(rot_key, dim, rotation,
                                     rounds=hadamard_rounds)
  if mse_bits:
    c = codebook_lib.codebook_table(dim, mse_bits, grid_centroids)
  else:
    c = np.zeros((0,), np.float64)
  sketch = None
  if method != Method.MSE:
    m = dim if method == Method.PROD else int(sketch_dim)
    sketch = jax.random.normal(sketch_key, (m, dim), jnp.float32)
  return Quantizer(
      rotation=rot,
      centroids=jnp.asarray(c, jnp.float32),
      thresholds=jnp.asarray((c[:-1] + c[1:]) / 2, jnp.float32),
      sketch=sketch, dim=dim, bits=bits, method=str(method),
      norm_dtype=norm_dtype, norm_correction=bool(norm_correction),
      grid_centroids=bool(grid_centroids))


# ----------------------------------------------------------------- checks


def _check_input(name: str, x, dim: int) -> None:
  """Trace-time checks on a float array whose last axis must be dim."""
  shape = getattr(x, "shape", None)
  dtype = getattr(x, "dtype", None)
  if shape is None or dtype is None:
    raise ValueError(f"{name} must be an array, got {type(x).__name__}")
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"{name}.dtype={dtype} must be a floating type "
                     "(float32, bfloat16, float16); cast integers yourself")
  if len(shape) < 1 or shape[-1] != dim:
    raise ValueError(f"{name}.shape={tuple(shape)}: expected last axis "
                     f"{dim} (the quantizer's dim)")


def _check_pair(q: Quantizer, qt: QuantizedTensor) -> None:
  if (qt.dim, qt.bits, qt.method) != (q.dim, q.bits, q.method):
    raise ValueError(
        f"QuantizedTensor (dim={qt.dim}, bits={qt.bits}, method={qt.method!r})"
        f" does not match the quantizer (dim={q.dim}, bits={q.bits}, "
        f"method={q.method!r})")


def check_finite(name: str, x) -> None:
  """Raises ValueError if a concrete array holds NaN/Inf (no-op on tracers)."""
  if isinstance(x, jax.core.Tracer):
    return
  bad = ~jnp.isfinite(jnp.asarray(x))
  if bool(jnp.any(bad)):
    first = np.argwhere(np.asarray(bad))[0]
    raise ValueError(f"{name} holds {int(jnp.sum(bad))} non-finite values "
                     f"(first at index {tuple(int(i) for i in first)}); "
                     "quantize only finite data")


# ----------------------------------------------------------------- encode


def _encode_indices(q: Quantizer, y: jax.Array) -> jax.Array:
  """Nearest-centroid index of each coordinate: f32[..., D] -> u8[..., D]."""
  if q.mse_bits <= 4:
    # Count of thresholds below y: at most 15 compares, fused elementwise.
    idx = jnp.zeros(y.shape, jnp.uint8)
    for k in range(q.thresholds.shape[0]):
      idx = idx + (y > q.thresholds[k]).astype(jnp.uint8)
    return idx
  return jnp.searchsorted(q.thresholds, y, side="left",
                          method="scan_unrolled").astype(jnp.uint8)


def _rotated_mse_part(q: Quantizer, scale: jax.Array,
                      idx: jax.Array) -> jax.Array:
  return scale[..., None] * q.centroids[idx]


def _quantize(q: Quantizer, x: jax.Array) -> QuantizedTensor:
  x = x.astype(jnp.float32)
  # Two sibling reductions of x (one pass, one kernel on a GPU): x·0 sums
  # to NaN exactly when an entry is NaN or ±inf.
  finite = jnp.isfinite(jnp.sum(x * 0.0, axis=-1))
  norm = jnp.where(finite, jnp.sqrt(jnp.sum(x * x, axis=-1)), 0.0)
  x = jnp.where(finite[..., None], x, 0.0)
  norm_dtype = jnp.dtype(q.norm_dtype)
  nan = jnp.float32(jnp.nan)
  lead = x.shape[:-1]

  if q.method == Method.QJL:
    proj = jnp.einsum("...d,md->...m", x, q.sketch, precision=_HIGHEST)
    stored = jnp.where(finite, norm, nan).astype(norm_dtype)
    return QuantizedTensor(
        codes=jnp.zeros((*lead, 0), jnp.uint8), norms=stored,
        signs=packing.pack_signs(proj >= 0), residual_norms=None,
        dim=q.dim, bits=q.bits, method=q.method)

  y = rotation_lib.apply(q.rotation, x)                 # Π x, [..., D]
  if q.mse_bits:
    unit = y / jnp.where(norm > 0, norm, 1.0)[..., None]
    idx = _encode_indices(q, unit)
    scale = norm
    if q.norm_correction:
      c_norm = jnp.sqrt(jnp.sum(jnp.square(q.centroids[idx]), axis=-1))
      scale = norm / c_norm                             # c_norm > 0 always
    stored = jnp.where(finite, scale, nan).astype(norm_dtype)
    codes = packing.pack(idx, q.mse_bits)
    # The residual is taken against what will actually be decoded.
    y_mse = _rotated_mse_part(q, jnp.where(finite, stored, 0).astype(
        jnp.float32), idx)
  else:                                                 # prod at 1 bit
    stored = None
    codes = jnp.zeros((*lead, 0), jnp.uint8)
    y_mse = jnp.zeros_like(y)
  if q.method == Method.MSE:
    return QuantizedTensor(codes=codes, norms=stored, signs=None,
                           residual_norms=None, dim=q.dim, bits=q.bits,
                           method=q.method)
  resid = y - y_mse                                     # r' = Π x - x̃_rot
  gamma = jnp.sqrt(jnp.sum(resid * resid, axis=-1))
  proj = jnp.einsum("...d,md->...m", resid, q.sketch, precision=_HIGHEST)
  return QuantizedTensor(
      codes=codes, norms=stored, signs=packing.pack_signs(proj >= 0),
      residual_norms=jnp.where(finite, gamma, nan).astype(norm_dtype),
      dim=q.dim, bits=q.bits, method=q.method)


_quantize_jit = jax.jit(_quantize)


def quantize(q: Quantizer, x: jax.Array) -> QuantizedTensor:
  """Quantizes x: f32/bf16/f16[*B, D] -> QuantizedTensor of shape *B.

  Raises ValueError (at trace time) for a non-float dtype or a last axis
  other than q.dim, and eagerly for NaN/Inf in concrete input (see the
  module docstring for the behaviour under jit).
  """
  _check_input("x", x, q.dim)
  check_finite("x", x)
  return _quantize_jit(q, x)


# ----------------------------------------------------------------- decode


def rotated_reconstruction(q: Quantizer, qt: QuantizedTensor) -> jax.Array:
  """The mse stage's reconstruction in the rotated domain, f32[*B, D]."""
  if not q.mse_bits:
    return jnp.zeros((*qt.shape, q.dim), jnp.float32)
  idx = packing.unpack(qt.codes, q.mse_bits, q.dim)
  return _rotated_mse_part(q, qt.norms.astype(jnp.float32), idx)


def _qjl_coefficient(q: Quantizer, qt: QuantizedTensor) -> jax.Array:
  """√(π/2)/M · (γ or ‖x‖): the per-vector weight of the sign sketch."""
  weight = qt.norms if q.method == Method.QJL else qt.residual_norms
  return _QJL_SCALE / q.sketch_dim * weight.astype(jnp.float32)


def _dequantize(q: Quantizer, qt: QuantizedTensor) -> jax.Array:
  if q.method != Method.MSE:
    signs = packing.unpack_signs(qt.signs, q.sketch_dim)
    back = jnp.einsum("...m,md->...d", signs, q.sketch, precision=_HIGHEST)
    back = _qjl_coefficient(q, qt)[..., None] * back
    if q.method == Method.QJL:
      return back
    y = rotated_reconstruction(q, qt) + back
  else:
    y = rotated_reconstruction(q, qt)
  marker = qt.norms if qt.norms is not None else qt.residual_norms
  nonfinite = ~jnp.isfinite(marker.astype(jnp.float32))
  return jnp.where(nonfinite[..., None], jnp.nan,
                   rotation_lib.invert(q.rotation, y))


_dequantize_jit = jax.jit(_dequantize)


def dequantize(q: Quantizer, qt: QuantizedTensor) -> jax.Array:
  """Reconstructs f32[*B, D] from a QuantizedTensor made by q."""
  _check_pair(q, qt)
  return _dequantize_jit(q, qt)


def _inner_product(q: Quantizer, qt: QuantizedTensor,
                   y: jax.Array) -> jax.Array:
  y = y.astype(jnp.float32)
  ylead = y.shape[:-1]
  y = y.reshape(-1, q.dim)                              # [Y, D]
  nb = len(qt.shape)

  def flat(a):
    return a.reshape(-1, *a.shape[nb:])

  score = jnp.zeros((y.shape[0], math.prod(qt.shape)), jnp.float32)
  if q.method == Method.QJL:
    y_rot = y
  else:
    y_rot = rotation_lib.apply(q.rotation, y)           # rotate queries once
    if q.mse_bits:
      x_rot = flat(rotated_reconstruction(q, qt))       # [N, D], no Πᵀ
      score = jnp.einsum("yd,nd->yn", y_rot, x_rot, precision=_HIGHEST)
  if q.method != Method.MSE:
    sy = jnp.einsum("yd,md->ym", y_rot, q.sketch, precision=_HIGHEST)
    signs = flat(packing.unpack_signs(qt.signs, q.sketch_dim))
    coef = flat(_qjl_coefficient(q, qt))
    score = score + coef[None, :] * jnp.einsum(
        "ym,nm->yn", sy, signs, precision=_HIGHEST)
  return score.reshape(*ylead, *qt.shape)


_inner_product_jit = jax.jit(_inner_product)


def inner_product(q: Quantizer, qt: QuantizedTensor,
                  y: jax.Array) -> jax.Array:
  """Estimates ⟨y_j, x_i⟩ from the codes, without reconstructing x.

  The queries are rotated once (⟨y, Πᵀ v⟩ = ⟨Π y, v⟩) and scored against the
  rotated-domain codebook values (plus the QJL term for prod/qjl).

  Args:
    q: the quantizer that made qt.
    qt: stored vectors, leading shape *B.
    y: queries f32[*Y, D].

  Returns:
    f32[*Y, *B] estimated inner products.
  """
  _check_pair(q, qt)
  _check_input("y", y, q.dim)
  return _inner_product_jit(q, qt, y)
