r"""Distortion experiment: the paper's Figures 1-3 and Table 2 timing shapes.

Quick run (the default; under 2 minutes on 2 otherwise idle CPU cores):

  python -m turboquant_jax.data.fetch
  python -m experiments.distortion --config=configs/distortion.py \
      --workdir=runs/distortion

The paper's scale (100k base vectors, 1k queries):

  python -m experiments.distortion --config=configs/distortion.py:scale=full \
      --workdir=runs/distortion_full

Any field can be overridden, e.g. `--config.datasets=random,` or
`--config.n_base=50000`.
"""

import ml_collections

from configs import common

# n_base, n_queries, timing repeats per scale.
_SCALES = {
    "quick": dict(n_base=10_000, n_queries=500, timing_repeats=3),
    "full": dict(n_base=100_000, n_queries=1_000, timing_repeats=5),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The experiment config; arg "scale=quick" (default) or "scale=full"."""
  arg = common.parse_arg(arg, scale="quick")
  if arg.scale not in _SCALES:
    raise ValueError(f"{arg.scale=!r} must be one of {sorted(_SCALES)}")
  scale = _SCALES[arg.scale]

  config = ml_collections.ConfigDict()
  config.scale = arg.scale
  config.seed = 0

  # "random": uniform unit vectors in R^random_dim (base and queries drawn
  # independently). "glove": GloVe 6B 50-d, base and held-out query rows,
  # each normalized to unit norm.
  config.datasets = ("random", "glove")
  config.random_dim = 1536            # the paper's OpenAI3 dimension
  config.n_base = scale["n_base"]
  config.n_queries = scale["n_queries"]

  config.methods = ("mse", "prod")
  config.bits = (1, 2, 3, 4, 5)
  config.rotation = "haar"
  config.norm_correction = False      # the paper's quantizer: no rescaling
  # The base set is split into this many equal blocks, each quantized by an
  # independent quantizer draw (rotation, sketch); standard errors are over
  # the draws. n_base must be a multiple of it.
  config.quantizer_draws = 10

  # Figures. Fig. 1: error histograms at hist_bits over about hist_samples
  # uniformly drawn (query, base) pairs. Fig. 2: mean error against the true
  # inner product at bias_bits, in bias_bins equal-count bins.
  config.hist_bits = (1, 2, 3, 4)
  config.hist_samples = 50_000
  config.bias_bits = 2
  config.bias_bins = 20

  # Table 2 shapes: time to quantize `n` vectors at `bits`, jit-compiled
  # ahead of the clock, median of `repeats`. chunk = 0: all n at once;
  # otherwise n is quantized in chunks of `chunk` (all of them timed).
  config.timing = ml_collections.ConfigDict()
  config.timing.dims = (200, 1536, 3072)
  config.timing.n = 100_000
  config.timing.bits = 4
  config.timing.method = "mse"
  config.timing.repeats = scale["timing_repeats"]
  config.timing.chunk = 0
  return config
