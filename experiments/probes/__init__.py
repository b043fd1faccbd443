"""Device probes: one-call scripts that check and time kernel variants."""

import sys


def option(name: str, default: str | None) -> str | None:
  """The value of `--name=value` among the command-line arguments."""
  for a in sys.argv[1:]:
    if a.startswith(f"--{name}="):
      return a.split("=", 1)[1]
  return default
