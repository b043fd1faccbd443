"""Shared test helpers; test modules import them as `import conftest`.

jax_numpy_rank_promotion='raise' is deliberately not set: the library relies
on implicit rank promotion (packing's `field << slot_shift`, the Hadamard
rotation's `x * signs`), so every test with a leading batch axis would fail.
"""

import math
import os

# Most tests build small caches eagerly, each operation its own XLA CPU
# compile (one profiled interpret-mode test: 322 compiles, 14 of its 20 s).
# LLVM at its cheapest settings took the default run from 1039-1091 s to
# 863 s on 2 cores (tests/cache and tests/quant: 177 s -> 129 s; session
# 28); the children the tests start (notebooks, sharding) inherit it.
# Read when the backend starts, so this precedes any test's first jax
# operation; a flag the caller set wins.
_FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0",
                       "--xla_llvm_disable_expensive_passes=true")
_flags = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = " ".join([_flags] + [
    f for f in _FAST_COMPILE_FLAGS if f.split("=")[0] not in _flags]).strip()

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp
import numpy as np


def random_unit_vectors(key: jax.Array, shape: tuple[int, ...],
                        dim: int) -> jax.Array:
  """f32[*shape, dim] uniform on the unit sphere (normalized Gaussians)."""
  g = jax.random.normal(key, (*shape, dim), jnp.float32)
  return g / jnp.linalg.norm(g, axis=-1, keepdims=True)


def correlated_pairs(key: jax.Array, shape: tuple[int, ...], dim: int,
                     rho) -> tuple[jax.Array, jax.Array]:
  """Unit vectors x, y of f32[*shape, dim] with <x, y> = rho exactly.

  y = rho·x + sqrt(1 - rho²)·z with z a uniform unit vector orthogonal to x;
  rho is a scalar or broadcasts against `shape`.
  """
  kx, kz = jax.random.split(key)
  x = random_unit_vectors(kx, shape, dim)
  z = jax.random.normal(kz, (*shape, dim), jnp.float32)
  z = z - jnp.sum(z * x, axis=-1, keepdims=True) * x
  z = z / jnp.linalg.norm(z, axis=-1, keepdims=True)
  rho = jnp.asarray(rho, jnp.float32)
  rho = jnp.broadcast_to(rho, shape)[..., None]
  return x, rho * x + jnp.sqrt(1 - rho * rho) * z


def mean_and_standard_error(per_cluster_means) -> tuple[float, float]:
  """Mean and its standard error from independent cluster means."""
  m = np.asarray(per_cluster_means, np.float64).ravel()
  return float(m.mean()), float(m.std(ddof=1) / math.sqrt(m.size))
