"""Saves and restores pytrees of arrays (e.g. an nnx.State) with orbax."""

import os
import pathlib
from typing import Any

import orbax.checkpoint as ocp


def save(path: str | os.PathLike[str], state: Any) -> None:
  """Writes `state` (a pytree of arrays) to the directory `path`.

  An existing checkpoint there is replaced. Orbax writes to a temporary
  directory and renames it when done, so `path` exists only when complete.
  """
  path = pathlib.Path(path).expanduser().resolve()  # orbax wants absolute
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, state, force=True)
    ckptr.wait_until_finished()


def restore(path: str | os.PathLike[str], abstract_state: Any) -> Any:
  """Reads the checkpoint at `path` into the structure of `abstract_state`.

  Args:
    path: a directory written by `save`.
    abstract_state: the same pytree with jax.ShapeDtypeStruct leaves (e.g.
      nnx.split(nnx.eval_shape(...))[1]); shapes and dtypes must match.

  Returns:
    The restored pytree.
  """
  path = pathlib.Path(path).expanduser().resolve()
  if not path.is_dir():
    raise FileNotFoundError(f"no checkpoint at {path}")
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(path, abstract_state)
