"""Where fetched data lives: one git-ignored cache directory.

The rule, first match wins:
1. $TURBOQUANT_CACHE, if set (created if missing).
2. `<repo>/.cache` when the package sits in a source checkout, i.e. the
   directory above `turboquant_jax/` holds `pyproject.toml` (this is the case
   for `pip install -e .`; `.cache/` is in .gitignore).
3. `$XDG_CACHE_HOME/turboquant_jax`, else `~/.cache/turboquant_jax` (a
   regular, non-editable install, where the package's parent is
   site-packages).
"""

import os
import pathlib

ENV_VAR = "TURBOQUANT_CACHE"
SETUP_COMMAND = "python -m turboquant_jax.data.fetch"


def _checkout_root() -> pathlib.Path | None:
  """The source checkout holding this package, or None if installed."""
  root = pathlib.Path(__file__).resolve().parents[2]
  return root if (root / "pyproject.toml").is_file() else None


def cache_dir(create: bool = True) -> pathlib.Path:
  """The data cache directory (see the module docstring for the rule).

  Args:
    create: make the directory if it does not exist yet.
  """
  env = os.environ.get(ENV_VAR)
  if env:
    path = pathlib.Path(env).expanduser()
  elif (root := _checkout_root()) is not None:
    path = root / ".cache"
  else:
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = pathlib.Path(xdg) if xdg else pathlib.Path.home() / ".cache"
    path = base / "turboquant_jax"
  if create:
    path.mkdir(parents=True, exist_ok=True)
  return path
