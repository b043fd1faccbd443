"""Bit packing of b-bit codes (b = 1..8) into uint8 or uint32 words.

Layout: "bit planes, split order".
- Planes: a b-bit code is cut into fields of power-of-two widths, high bits
  first (3 = 2+1, 5 = 4+1, 6 = 4+2, 7 = 4+2+1; 1, 2, 4, 8 are one plane). Each
  plane is packed on its own, so no field ever spans two words: unpacking is
  one shift and one mask per field, never a byte-straddling read.
- Split order: a plane of width w packs k = word_bits / w fields per word.
  With W = ceil(D / k) words, coordinate i sits in word i % W at slot i // W.
  Slot s of all W words therefore holds the contiguous coordinates
  [s·W, (s+1)·W): a kernel turns a row of words into k contiguous slices with
  k vector shifts, each lining up with a contiguous slice of the query; no
  lane interleaving or gather is needed.
The planes are concatenated along the last axis. Total words per vector:
sum over planes of ceil(D / (word_bits / w)); for D a multiple of 8 (uint8)
this is exactly D·b/8 bytes.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

_WORD_DTYPES = {8: jnp.uint8, 32: jnp.uint32}


def plane_widths(bits: int) -> tuple[int, ...]:
  """Power-of-two field widths of a b-bit code, most significant first."""
  if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not (
      1 <= bits <= 8):
    raise ValueError(f"{bits=} must be an integer in [1, 8]")
  return tuple(w for w in (8, 4, 2, 1) if bits & w)


def _word_bits(dtype) -> int:
  dtype = jnp.dtype(dtype)
  bits = dtype.itemsize * 8
  if bits not in _WORD_DTYPES or dtype != jnp.dtype(_WORD_DTYPES[bits]):
    raise ValueError(f"word dtype {dtype} must be uint8 or uint32")
  return bits


def plane_layout(dim: int, bits: int, dtype=jnp.uint8
                 ) -> tuple[tuple[int, int, int, int], ...]:
  """Per plane: (width, shift in the code, first word, number of words)."""
  word_bits = _word_bits(dtype)
  layout, shift, offset = [], bits, 0
  for w in plane_widths(bits):
    shift -= w
    n_words = math.ceil(dim / (word_bits // w))
    layout.append((w, shift, offset, n_words))
    offset += n_words
  return tuple(layout)


def packed_size(dim: int, bits: int, dtype=jnp.uint8) -> int:
  """Words per vector of `dim` b-bit codes."""
  return sum(n for *_, n in plane_layout(dim, bits, dtype))


def pack(codes: jax.Array, bits: int, dtype=jnp.uint8) -> jax.Array:
  """Packs codes: u8/int[..., D] with values < 2**bits -> dtype[..., P].

  Values are masked to `bits` bits (callers pass in-range codes).
  """
  dim = codes.shape[-1]
  lead = codes.shape[:-1]
  word_bits = _word_bits(dtype)
  codes = codes.astype(jnp.uint32)
  planes = []
  for w, shift, _, n_words in plane_layout(dim, bits, dtype):
    k = word_bits // w
    field = (codes >> shift) & ((1 << w) - 1)
    field = jnp.pad(field, [(0, 0)] * len(lead) + [(0, k * n_words - dim)])
    field = field.reshape(*lead, k, n_words)
    slot_shift = (jnp.arange(k, dtype=jnp.uint32) * w)[:, None]
    # Fields occupy disjoint bits, so a sum is an OR.
    planes.append(jnp.sum(field << slot_shift, axis=-2, dtype=jnp.uint32))
  return jnp.concatenate(planes, axis=-1).astype(dtype)


def unpack(packed: jax.Array, bits: int, dim: int) -> jax.Array:
  """Inverse of pack: dtype[..., P] -> u8[..., D]."""
  word_bits = _word_bits(packed.dtype)
  expected = packed_size(dim, bits, packed.dtype)
  if packed.shape[-1] != expected:
    raise ValueError(f"{packed.shape=}: expected last axis {expected} for "
                     f"{dim=}, {bits=}, {packed.dtype}")
  lead = packed.shape[:-1]
  words = packed.astype(jnp.uint32)
  codes = jnp.zeros((*lead, dim), jnp.uint32)
  for w, shift, offset, n_words in plane_layout(dim, bits, packed.dtype):
    k = word_bits // w
    plane = words[..., offset:offset + n_words]
    slot_shift = (jnp.arange(k, dtype=jnp.uint32) * w)[:, None]
    field = (plane[..., None, :] >> slot_shift) & ((1 << w) - 1)
    field = field.reshape(*lead, k * n_words)[..., :dim]
    codes = codes | (field << shift)
  return codes.astype(jnp.uint8)


def pack_signs(positive: jax.Array, dtype=jnp.uint8) -> jax.Array:
  """Packs a bool[..., M] sign pattern (True = +1) as 1-bit codes."""
  return pack(positive.astype(jnp.uint8), 1, dtype)


def unpack_signs(packed: jax.Array, dim: int) -> jax.Array:
  """Packed signs -> f32[..., M] of ±1."""
  return unpack(packed, 1, dim).astype(jnp.float32) * 2.0 - 1.0
