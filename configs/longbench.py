r"""LongBench-E (the paper's Table 1) through compressed KV caches.

LongBench-E is not shipped here: point data_dir at a folder holding the
official `<dataset>_e.jsonl` files (from THUDM/LongBench's data.zip).

  python -m experiments.longbench --config=configs/longbench.py \
      --config.data_dir=/path/to/longbench_e --workdir=runs/longbench

  # a Hugging Face checkpoint (config.json, safetensors, tokenizer.json,
  # tokenizer_config.json) instead of SmolLM2, its context as max_length:
  python -m experiments.longbench --config=configs/longbench.py:model=hf \
      --config.hf_path=/models/Llama-3.1-8B-Instruct \
      --config.max_length=127500 --config.data_dir=... --workdir=...

`:scale=quick` is a tiny random model with a byte-level tokenizer, two
examples per dataset and four new tokens (seconds; the tests write its
data). Fields can be overridden, e.g. `--config.datasets=trec,lcc`,
`--config.only=full,tq3.5`, `--config.max_examples=20`.
"""

import ml_collections

from configs import common

_SCALES = ("default", "quick")
_MODELS = ("smollm2", "hf", "tiny")


def cache(name: str, kind: str = "turboquant", *, key_bits: float = 16,
          value_bits: float = 16, key_method: str = "mse",
          norm_correction: bool = True, window: int = 0,
          center_keys: bool = False, dtype: str = "bfloat16",
          edge_layers: int = 0, edge: dict | None = None) -> dict:
  """One cache configuration, every field spelled out (for config.json).

  The fields are those of configs/perplexity.py's `cache` (minus its
  group): kind "full", "turboquant" or "kivi"; bits per coordinate
  (fractional TurboQuant widths use the outlier split); key_method "mse"
  or "prod"; norm_correction; window (recent tokens also kept in full
  precision); center_keys; dtype of full-precision storage; the first and
  last edge_layers layers use `edge` (a dict of the same fields).
  """
  return dict(name=name, kind=kind, key_bits=key_bits, value_bits=value_bits,
              key_method=key_method, norm_correction=norm_correction,
              window=window, center_keys=center_keys, dtype=dtype,
              edge_layers=edge_layers, edge=edge or {})


def default_caches() -> tuple[dict, ...]:
  """Table 1's rows that we can build: the full cache, TurboQuant at the
  paper's 3.5 and 2.5 bits (its setting: mse keys, no norm correction, no
  window, generated tokens quantized too), KIVI at 2 and 4 bits (group 32,
  the last 32 tokens in full precision) and one lever configuration."""
  return (
      cache("full", "full"),
      cache("tq3.5", key_bits=3.5, value_bits=3.5, norm_correction=False),
      cache("tq2.5", key_bits=2.5, value_bits=2.5, norm_correction=False),
      cache("kivi2_w32", "kivi", key_bits=2, value_bits=2, window=32),
      cache("kivi4_w32", "kivi", key_bits=4, value_bits=4, window=32),
      cache("k4v3_nc_c", key_bits=4, value_bits=3, center_keys=True),
  )


def quick_caches() -> tuple[dict, ...]:
  """One of each kind, for the tests."""
  return (
      cache("full", "full"),
      cache("tq2.5", key_bits=2.5, value_bits=2.5, norm_correction=False),
      cache("kivi2_w8", "kivi", key_bits=2, value_bits=2, window=8),
  )


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The experiment config; arg "scale=default|quick,model=smollm2|hf|tiny"."""
  arg = common.parse_arg(arg, scale="default", model="")
  if arg.scale not in _SCALES:
    raise ValueError(f"{arg.scale=!r} must be one of {_SCALES}")
  quick = arg.scale == "quick"
  model = arg.model or ("tiny" if quick else "smollm2")
  if model not in _MODELS:
    raise ValueError(f"{arg.model=!r} must be one of {_MODELS}")

  config = ml_collections.ConfigDict()
  config.scale = arg.scale
  common.set_model(config, model)
  # The folder of <dataset>_e.jsonl files, and which datasets to run
  # (comma-separated; empty: all 13).
  config.data_dir = ""
  config.datasets = ""
  config.max_examples = 2 if quick else 0   # per dataset, first N (0: all)
  # The middle truncation's budget in prompt tokens (pred.py's
  # model2maxlen: 7500 for its 8k-context models, as SmolLM2 is); it must
  # leave room for the chat template and the new tokens in the context.
  config.max_length = 64 if quick else 7500
  # 0: the benchmark's per-dataset new-token limits; > 0 caps them (not
  # the benchmark; quick tests only).
  config.max_new_tokens = 4 if quick else 0
  # Prompts per generate call (1 is the benchmark's protocol; see
  # longbench.predict), and their padding to a multiple of prompt_bucket
  # tokens (each width compiles once).
  config.batch_size = 1
  config.prompt_bucket = 128 if quick else 512
  config.seed = 0                # the caches' rotations
  config.caches = quick_caches() if quick else default_caches()
  config.only = ""               # comma-separated cache names (empty: all)
  return config
