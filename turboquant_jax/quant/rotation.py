"""Random rotations from a key: Haar-random orthogonal and randomized Hadamard.

Both act on the last axis of row vectors: `apply(rot, x)` computes Π x, and
`invert(rot, y)` computes Πᵀ y, for x, y of shape [..., D].
- "haar": Π = Q·diag(sign(diag(R))) for Q, R = qr(G), G i.i.d. N(0, 1): exactly
  Haar-distributed (the sign fix removes QR's bias). O(D²) memory and time.
- "hadamard": Π = Π_r ... Π_1 with Π_i = H·diag(s_i)/√D, H the Walsh–Hadamard
  matrix and s_i random signs. O(D log D) time, O(rounds·D) memory; D must be a
  power of two. Two rounds by default: one round maps a basis vector to a flat
  ±1/√D vector, the worst input for a scalar codebook; a second round spreads it.
"""

import dataclasses
import enum
import math

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


class RotationKind(enum.StrEnum):
  HAAR = "haar"            # dense random orthogonal matrix (the paper's)
  HADAMARD = "hadamard"    # randomized fast Walsh–Hadamard transform


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Rotation:
  """A random orthogonal map of R^dim.

  Attributes:
    matrix: f32[D, D] orthogonal matrix Π (haar), else None.
    signs: f32[R, D] ±1 per Hadamard round (hadamard), else None.
    kind: which construction.
    dim: D.
  """
  matrix: jax.Array | None
  signs: jax.Array | None
  kind: str = dataclasses.field(metadata=dict(static=True))
  dim: int = dataclasses.field(metadata=dict(static=True))


def _is_power_of_two(n: int) -> bool:
  return n >= 1 and n & (n - 1) == 0


def make_rotation(key: jax.Array, dim: int, kind: str = "haar",
                  rounds: int = 2) -> Rotation:
  """Draws a rotation of R^dim from `key`; the same key gives the same one.

  Args:
    key: a jax.random key.
    dim: the dimension D.
    kind: "haar" or "hadamard" (D a power of two).
    rounds: Hadamard rounds (ignored for haar).
  """
  kinds = [k.value for k in RotationKind]
  if kind not in kinds:
    raise ValueError(f"rotation {kind=!r} must be one of {kinds}")
  if not isinstance(dim, int) or dim < 1:
    raise ValueError(f"{dim=} must be a positive integer")
  if kind == RotationKind.HADAMARD:
    if not _is_power_of_two(dim):
      raise ValueError(
          f"rotation='hadamard' needs dim to be a power of two, got {dim=}; "
          "use rotation='haar' (any dim) or pad the vectors yourself")
    if rounds < 1:
      raise ValueError(f"{rounds=} must be >= 1")
    signs = jax.random.rademacher(key, (rounds, dim), dtype=jnp.float32)
    return Rotation(matrix=None, signs=signs, kind=str(kind), dim=dim)
  g = jax.random.normal(key, (dim, dim), dtype=jnp.float32)
  q, r = jnp.linalg.qr(g)
  d = jnp.diagonal(r)
  q = q * jnp.where(d < 0, -1.0, 1.0)[None, :]
  return Rotation(matrix=q, signs=None, kind=str(kind), dim=dim)


def fwht(x: jax.Array) -> jax.Array:
  """Unnormalized fast Walsh–Hadamard transform over the last axis.

  x: [..., D] with D a power of two. Returns H x with H the Sylvester-ordered
  ±1 Hadamard matrix (H H = D·I), in log2(D) butterfly stages.
  """
  dim = x.shape[-1]
  if not _is_power_of_two(dim):
    raise ValueError(f"fwht needs a power-of-two last axis, got {x.shape=}")
  lead = x.shape[:-1]
  h = 1
  while h < dim:
    y = x.reshape(*lead, dim // (2 * h), 2, h)
    a, b = y[..., 0, :], y[..., 1, :]
    x = jnp.stack([a + b, a - b], axis=-2).reshape(*lead, dim)
    h *= 2
  return x


def apply(rot: Rotation, x: jax.Array) -> jax.Array:
  """Π x for x: f32[..., D]."""
  if rot.kind == RotationKind.HAAR:
    return jnp.einsum("...j,ij->...i", x, rot.matrix, precision=_HIGHEST)
  scale = 1.0 / math.sqrt(rot.dim)
  for i in range(rot.signs.shape[0]):
    x = fwht(x * rot.signs[i]) * scale
  return x


def invert(rot: Rotation, y: jax.Array) -> jax.Array:
  """Πᵀ y for y: f32[..., D] (the inverse rotation)."""
  if rot.kind == RotationKind.HAAR:
    return jnp.einsum("...i,ij->...j", y, rot.matrix, precision=_HIGHEST)
  scale = 1.0 / math.sqrt(rot.dim)
  for i in reversed(range(rot.signs.shape[0])):
    y = fwht(y) * scale * rot.signs[i]
  return y


def as_matrix(rot: Rotation) -> jax.Array:
  """The D x D matrix Π (for tests and kernels that prefer a matmul)."""
  if rot.matrix is not None:
    return rot.matrix
  return apply(rot, jnp.eye(rot.dim, dtype=jnp.float32)).T


def as_tiles(rot: Rotation, tile: int = 64) -> jax.Array:
  """Π as f16[G², tile, tile] (G = D / tile), tile r·G + c = Π[tile·r :
  tile·r + tile, tile·c : tile·c + tile]: the form the GPU decode kernel's
  tensor-core products read in one copy each."""
  if rot.dim % tile:
    raise ValueError(f"dim={rot.dim}: expected a multiple of {tile=}")
  g = rot.dim // tile
  return as_matrix(rot).reshape(g, tile, g, tile).transpose(0, 2, 1, 3).reshape(
      g * g, tile, tile).astype(jnp.float16)
