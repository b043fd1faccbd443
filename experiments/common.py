"""What every experiment driver shares: its flags and its main()."""

import pathlib
from typing import Callable

from absl import app
from absl import flags
from ml_collections import config_flags

from turboquant_jax.cache import CacheConfig
from turboquant_jax.model import config as model_config_lib

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


def cache_config(fields) -> CacheConfig:
  """A CacheConfig from a config.caches entry (or its `edge` entry), the
  dicts that configs/perplexity.py's `cache()` spells out."""
  kind = fields["kind"]
  kw = dict(kind=kind, dtype=fields.get("dtype", "bfloat16"))
  if kind != "full":
    kw.update(key_bits=fields["key_bits"], value_bits=fields["value_bits"],
              key_method=fields.get("key_method", "mse"),
              norm_correction=fields.get("norm_correction", True),
              window=fields.get("window", 0))
  if fields.get("center_keys", False):
    kw.update(center_keys=True, center_skip=fields.get("center_skip", 0))
  return CacheConfig(**kw)


def layer_configs(model_config, spec) -> tuple[CacheConfig, ...]:
  """One CacheConfig per layer for a config.caches entry."""
  edge = cache_config(spec["edge"]) if spec["edge_layers"] else None
  return model_config_lib.layer_cache_configs(
      model_config, cache_config(spec), edge_layers=spec["edge_layers"],
      edge=edge)
