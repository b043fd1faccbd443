"""What the 4-bit centroid lookup costs the GPU kernel, and what a cheaper
one could gain: times only (the variants' values are wrong).

The 4-bit byte-permute PTX (prmt_lookup._lines4: 12 instructions a 4
codes, 8 on the ALU pipe) is swapped, for keys and values alike, for:

- "bytes7": a lookup of 7-bit integer steps k[n] (f16 1024 + k: 1 xor,
  2 prmt, 1 add, 2 prmt interleaving with the constant high byte 0x64):
  6 instructions a 4 codes, what centroids rounded to 7 bits would cost.
- "none": the packed bytes as f16 1024 + byte (2 prmt a 4 codes): no
  lookup, the floor of any lookup that starts from the packed bytes.

Device time beside cuDNN bf16, variants interleaved (each recompiled).
Run: python -m experiments.probes.lookup_floor [--shapes="((B, S, (4,)),)"]

--grid: caches whose codebooks are on the grid (CacheConfig.grid_centroids,
whose 4-bit codes the kernel looks up in 8 instructions, prmt_lookup's
grid lookup) checked against the reference on the device, then timed
against exact caches and against grid caches read by the general lookup
(prmt_lookup.GRID_LOOKUP = False: the codebook alone).

--no-max: the same question for the softmax's running max over a tile's
tokens (a reduction across the warpgroup's 4 warps): the kernel with that
max replaced by 0 (times only), with exact and with grid caches.

--no-sync: the tile's two cross-warp steps both gone (times only, grid
caches): the max as in --no-max, and the barrier between the threads'
stores of Pᵀ and the P·V wgmma that reads them (commit_smem keeps its
proxy fence, drops its bar.sync). What a kernel whose warps never wait
for each other within a tile (each warp its own softmax state over its
own tokens) could gain at most.

--lagged: pallas_gpu_tokens.LAGGED_MAX on (the default: a tile's softmax
against the running max of the tiles before it, a flagged tile redone)
against off (the exact max in every tile), exact and grid caches,
checked on the device first (both settings, 13 shapes). The lagged
variants lag at every width (EXACT_MAX_BITS emptied: 2 bits too).

--opaque: prmt_lookup.OPAQUE_TABLES on (the default: the prmt tables'
first words as registers ptxas keeps) against off (immediates, which
ptxas moves into a register for every prmt), exact and grid caches,
checked on the device first (the defaults, 6 shapes).
"""

import ast
import sys

import jax
import jax.numpy as jnp
from jax.experimental.pallas import mosaic_gpu as plgpu

from experiments import probes
from experiments.probes import decode_kernel_variants as dkv
from turboquant_jax.kernels.decode_attention import pallas_gpu_tokens
from turboquant_jax.kernels.decode_attention import prmt_lookup

_EXACT = prmt_lookup._lines4  # pylint: disable=protected-access


def _bytes7(src: str, centroids):
  """1024 + k[n], k < 128 the centroids' 7-bit steps: a selector nibble
  with bit 3 set returns its byte's sign (0 here), so one prmt gives the
  codes < 8 and 0 for the others, one (selector ^ 0x8888) the codes >= 8."""
  del centroids
  return "x, lo4, hi4, k4", [
      f"xor.b32 x, {src}, 0x8888;",
      f"prmt.b32 lo4, 0x18100800, 0x38302820, {src};",
      "prmt.b32 hi4, 0x58504840, 0x78706860, x;",
      "add.u32 k4, lo4, hi4;",
      "prmt.b32 $0, k4, 0x64646464, 0x4240;",
      "prmt.b32 $1, k4, 0x64646464, 0x4341;"]


def _none(src: str, centroids):
  del centroids
  return "k4", [f"mov.b32 k4, {src};",
                "prmt.b32 $0, k4, 0x64646464, 0x4140;",
                "prmt.b32 $1, k4, 0x64646464, 0x4341;"]


VARIANTS = {"exact": _EXACT, "bytes7": _bytes7, "none": _none}


class _GridTwin:
  """cache -> a random cache of its shape and widths with grid codebooks,
  the last one kept (one shape at a time holds the device's memory)."""

  def __init__(self):
    self.key, self.cache = None, None

  def __call__(self, c):
    key = (c.lengths.shape[0], c.capacity, c.config.key_bits)
    if key != self.key:
      self.key, self.cache = key, None
      self.cache = dkv._random_cache(  # pylint: disable=protected-access
          c.config.key_bits, *key[:2], grid=True)
    return self.cache


def grid(shapes) -> None:
  """--grid's checks and times (see the module docstring)."""
  for args, kwargs in _CHECKS:
    dkv.check(*args, mode="prmt", layout="tokens", grid=True, **kwargs)
  grid_twin = _GridTwin()

  def prepare(variant, c):
    prmt_lookup.GRID_LOOKUP = variant != "grid_general_lookup"
    return c if variant == "exact" else grid_twin(c)
  try:
    dkv._variant_rows(shapes, {v: v for v in (  # pylint: disable=protected-access
        "exact", "grid", "grid_general_lookup")}, prepare,
                      rounds=int(probes.option("rounds", "3")))
  finally:
    prmt_lookup.GRID_LOOKUP = True


class _ZeroMax:
  """jax.numpy for pallas_gpu_tokens with max(x, axis=0) -> zeros: the
  kernel without its cross-warp max (a timing probe)."""

  def __getattr__(self, name):
    return getattr(jnp, name)

  @staticmethod
  def max(x, axis=None):
    assert axis == 0, axis
    return jnp.zeros(x.shape[1:], x.dtype)


def no_max(shapes) -> None:
  """--no-max's times (see the module docstring)."""
  grid_twin = _GridTwin()

  def prepare(variant, c):
    pallas_gpu_tokens.jnp = _ZeroMax() if "no_max" in variant else jnp
    return grid_twin(c) if variant.startswith("grid") else c
  try:
    dkv._variant_rows(shapes, {v: v for v in (  # pylint: disable=protected-access
        "exact", "no_max", "grid", "grid_no_max")}, prepare,
                      rounds=int(probes.option("rounds", "3")))
  finally:
    pallas_gpu_tokens.jnp = jnp


def _fence_only():
  """commit_smem without its warpgroup barrier: the async-proxy fence."""
  # pylint: disable=g-import-not-at-top (Mosaic GPU internals, device only)
  from jax._src.lib.mlir.dialects import nvvm

  @plgpu.inline_mgpu()
  def fence(ctx):
    del ctx
    nvvm.fence_proxy(nvvm.ProxyKind.async_shared,
                     space=nvvm.SharedSpace.shared_cta)
  fence()


class _NoBarrier:
  """plgpu for pallas_gpu_tokens with commit_smem -> its fence alone."""

  def __getattr__(self, name):
    return _fence_only if name == "commit_smem" else getattr(plgpu, name)


def no_sync(shapes) -> None:
  """--no-sync's times (see the module docstring)."""
  grid_twin = _GridTwin()

  def prepare(variant, c):
    pallas_gpu_tokens.jnp = jnp if variant == "grid" else _ZeroMax()
    pallas_gpu_tokens.plgpu = (_NoBarrier() if variant == "grid_no_sync"
                               else plgpu)
    return grid_twin(c)
  try:
    dkv._variant_rows(shapes, {v: v for v in (  # pylint: disable=protected-access
        "grid", "grid_no_max", "grid_no_sync")}, prepare,
                      rounds=int(probes.option("rounds", "3")))
  finally:
    pallas_gpu_tokens.jnp, pallas_gpu_tokens.plgpu = jnp, plgpu


_CHECKS = (((128, 4, 4), {}), ((64, 8, 4), dict(lengths=(333, 1))),
           ((256, 2, 4), dict(lengths=(1024, 65))),
           ((128, 4, 3.5), dict(tokens=3)),
           ((64, 3, 3.5), dict(lengths=(1000, 333))),
           ((128, 4, 4), dict(window=5, lengths=(1000, 77))),
           ((128, 1, 4, "prod"), {}), ((128, 4, 3), {}),
           ((64, 8, 3), dict(lengths=(1000, 65))),
           ((256, 2, 3), {}), ((128, 4, 2.5), {}),
           ((64, 4, 2.5), dict(lengths=(1, 1024))))


def lagged(shapes) -> None:
  """--lagged's checks and times (see the module docstring)."""
  for setting in (True, False):
    pallas_gpu_tokens.LAGGED_MAX = setting
    jax.clear_caches()
    print("LAGGED_MAX", setting, flush=True)
    for args, kwargs in _CHECKS:
      dkv.check(*args, mode="prmt", layout="tokens", **kwargs)
    dkv.check(128, 4, 4, mode="prmt", layout="tokens", grid=True)
  grid_twin = _GridTwin()

  def prepare(variant, c):
    pallas_gpu_tokens.LAGGED_MAX = "exact_max" not in variant
    return grid_twin(c) if variant.startswith("grid") else c
  # The lagged variants lag at every width (2 bits too).
  exact_bits, pallas_gpu_tokens.EXACT_MAX_BITS = (
      pallas_gpu_tokens.EXACT_MAX_BITS, frozenset())
  try:
    dkv._variant_rows(shapes, {v: v for v in (  # pylint: disable=protected-access
        "exact_max", "lagged", "grid_exact_max", "grid_lagged")}, prepare,
                      rounds=int(probes.option("rounds", "3")))
  finally:
    pallas_gpu_tokens.LAGGED_MAX = True
    pallas_gpu_tokens.EXACT_MAX_BITS = exact_bits


def opaque(shapes) -> None:
  """--opaque's checks and times (see the module docstring)."""
  for args, kwargs in (((128, 4, 4), {}), ((64, 8, 3), dict(lengths=(1000, 65))),
                       ((128, 4, 2), {}), ((128, 4, 3.5), dict(tokens=3))):
    dkv.check(*args, mode="prmt", layout="tokens", **kwargs)
  for args, kwargs in (((128, 4, 4), {}), ((256, 2, 3), {})):
    dkv.check(*args, mode="prmt", layout="tokens", grid=True, **kwargs)
  grid_twin = _GridTwin()

  def prepare(variant, c):
    prmt_lookup.OPAQUE_TABLES = not variant.endswith("_imm")
    return grid_twin(c) if variant.startswith("grid") else c
  try:
    dkv._variant_rows(shapes, {v: v for v in (  # pylint: disable=protected-access
        "exact_imm", "exact", "grid_imm", "grid")}, prepare,
                      rounds=int(probes.option("rounds", "3")))
  finally:
    prmt_lookup.OPAQUE_TABLES = True


def main():
  shapes = ast.literal_eval(probes.option(
      "shapes", "((8, 131072, (4,)), (8, 32768, (4,)), (1, 131072, (4,)))"))
  print("jax", jax.__version__, jax.devices()[0].device_kind, flush=True)
  if "--grid" in sys.argv:
    grid(shapes)
    return
  if "--no-max" in sys.argv:
    no_max(shapes)
    return
  if "--lagged" in sys.argv:
    lagged(shapes)
    return
  if "--opaque" in sys.argv:
    opaque(shapes)
    return
  if "--no-sync" in sys.argv:
    no_sync(shapes)
    return

  def prepare(lines4, c):
    prmt_lookup._lines4 = lines4  # pylint: disable=protected-access
    return c
  try:
    dkv._variant_rows(shapes, VARIANTS, prepare,  # pylint: disable=protected-access
                      rounds=int(probes.option("rounds", "3")))
  finally:
    prmt_lookup._lines4 = _EXACT  # pylint: disable=protected-access


if __name__ == "__main__":
  main()
