"""What every experiment driver shares: its flags and its main()."""

import pathlib
from typing import Callable

from absl import app
from absl import flags
from ml_collections import config_flags

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def define_flags(config_file: str, workdir: str | None = None) -> None:
  """Defines --config (configs/<config_file>) and --workdir.

  Drivers call this only when run as a program: flags defined at import
  would clash with those of other drivers imported into one process (the
  tests, experiments/reproduce.py).

  Args:
    config_file: the default config, a file name in configs/.
    workdir: the default workdir; None makes --workdir required.
  """
  config_flags.DEFINE_config_file("config", str(CONFIGS / config_file),
                                  "Experiment config file.", lock_config=True)
  flags.DEFINE_string("workdir", workdir, "Where to write results.")


def main_for(run: Callable, report: Callable = print) -> Callable:
  """An absl main that runs run(config, workdir) and reports its return."""
  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS.workdir:
      raise app.UsageError("--workdir is required")
    out = run(flags.FLAGS.config, flags.FLAGS.workdir)
    if isinstance(out, (list, tuple)):
      for item in out:
        report(item)
    else:
      report(out)
  return main
