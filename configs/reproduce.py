r"""The paper reproduction in one command (the README's main job).

    python -m experiments.reproduce --config=configs/reproduce.py \
        --workdir=reports/quick                       # 2 CPU cores, <= 15 min
    python -m experiments.reproduce --config=configs/reproduce.py:scale=full \
        --workdir=reports/full                        # a GPU, hours

Each part is one experiment run by its own driver's `run(config, workdir)`
with the config file and argument below and field overrides on top. Select
parts with `--config.only=distortion,needle`; point LongBench-E at local
data with `--config.longbench_data_dir=DIR` (it is skipped otherwise).
"""

import ml_collections

from configs import common

_SCALES = ("quick", "full")

# The perplexity caches of the quick report: the full cache, the paper's
# setting at 4, 3 and 2.5 bits, two levers (norm correction + centered keys
# at K4/V3 and K5/V4) and KIVI at 2 and 4 bits.
_QUICK_PPL_CACHES = ("full,tq4,tq3,tq2.5,k4v3_nc_c,k5v4_nc_c,kivi2_w32,"
                     "kivi4_w32")


def _part(module: str, config_file: str, arg: str = "",
          **overrides) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      module=module, config_file=config_file, arg=arg,
      overrides=dict(overrides)))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """arg: "scale=quick" (default; 2 CPU cores) or "scale=full"."""
  arg = common.parse_arg(arg, scale="quick")
  if arg.scale not in _SCALES:
    raise ValueError(f"{arg.scale=!r} must be one of {_SCALES}")
  quick = arg.scale == "quick"
  c = ml_collections.ConfigDict()
  c.scale = arg.scale
  c.only = ""                      # comma-separated part names, or all
  c.longbench_data_dir = ""        # a folder of LongBench-E *_e.jsonl files
  c.parts = ml_collections.ConfigDict()
  # Figures 1-3 and the quantization-time half of Table 2.
  c.parts.distortion = _part("experiments.distortion", "configs.distortion",
                             "scale=quick" if quick else "scale=full")
  # Figure 5 and the indexing-time half of Table 2 (faiss PQ, RaBitQ).
  c.parts.nn_search = _part("experiments.nn_search", "configs.nn_search",
                            "scale=quick" if quick else "scale=default")
  # Figure 4: needle in a haystack with SmolLM2 (a GPU run of the full
  # scale can point the needle config at a long-context HF model).
  c.parts.needle = _part("experiments.needle", "configs.needle",
                         "scale=quick" if quick else "scale=default")
  # Perplexity through the compressed cache (the CPU-sized stand-in for
  # Table 1's question: what does the cache cost the model?).
  if quick:
    c.parts.perplexity = _part(
        "experiments.perplexity", "configs.perplexity", "scale=default",
        num_sequences=2, sequence_length=512, only=_QUICK_PPL_CACHES)
  else:
    c.parts.perplexity = _part("experiments.perplexity",
                               "configs.perplexity", "scale=default")
  # Table 1: LongBench-E, only with local data (longbench_data_dir).
  c.parts.longbench = _part("experiments.longbench", "configs.longbench",
                            "scale=default", max_examples=3 if quick else 0)
  return c
