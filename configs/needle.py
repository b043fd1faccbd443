r"""Needle in a haystack (the paper's Fig. 4) through compressed KV caches.

The default run: SmolLM2-135M-Instruct on the CPU, a haystack of Emma,
prompts of 500 to 4000 tokens, the needle at five depths, every cache below
(each at about a quarter of the full cache's memory, or the bits the paper
names):

  python -m turboquant_jax.data.fetch
  python -m experiments.needle --config=configs/needle.py \
      --workdir=results/needle/cpu

`:scale=quick` is a 2 x 2 grid of short prompts (SmolLM2, minutes on the
CPU); `:scale=quick,model=tiny` a random 3-layer model with a byte-level
tokenizer on a synthetic haystack (seconds; the tests). A long-context
Hugging Face checkpoint on a GPU runs the same code:

  python -m experiments.needle --config=configs/needle.py:model=hf \
      --config.hf_path=/models/Llama-3.1-8B-Instruct \
      --config.lengths=4000,8000,16000 --workdir=...

Its lengths are bounded by the model's context and by the prefill, which
materializes the [heads, T, T] attention scores of each layer (f32: 34 GB
at T = 16k with 32 heads); the paper's 104k tokens need a chunked prefill.

Fields can be overridden, e.g. `--config.only=full,snapkv25`,
`--config.depths=0,0.5,1`.
"""

import ml_collections

from configs import common

_SCALES = ("default", "quick")
_MODELS = ("smollm2", "hf", "tiny")


def cache(name: str, label: str, kind: str = "turboquant", *,
          key_bits: float = 16, value_bits: float = 16,
          norm_correction: bool = True, window: int = 0,
          group_size: int = 32, budget: float = 1.0,
          pool: str = "max", pool_kernel: int = 7,
          dtype: str = "bfloat16") -> dict:
  """One cache configuration (every field spelled out, for config.json).

  Args:
    name: unique id (the resume key, file names).
    label: how tables and figures name it.
    kind: "full", "turboquant", "kivi" or "snapkv".
    key_bits, value_bits: bits per coordinate (16: not quantized: full and
      snapkv); fractional TurboQuant widths use the outlier split.
    norm_correction: (turboquant) rescale decoded vectors to their norm.
    window: turboquant/kivi: recent tokens kept in full precision; snapkv:
      the observation window.
    group_size: KIVI's group (tokens for keys, channels for values).
    budget, pool, pool_kernel: snapkv's kept fraction of the prompt and
      its vote pooling.
    dtype: storage dtype of full-precision tensors.
  """
  return dict(name=name, label=label, kind=kind, key_bits=key_bits,
              value_bits=value_bits, norm_correction=norm_correction,
              window=window, group_size=group_size, budget=budget,
              pool=pool, pool_kernel=pool_kernel, dtype=dtype)


def default_caches(quick_window: bool = False) -> tuple[dict, ...]:
  """The full cache; TurboQuant at 4, 3 and 2.5 bits in the paper's setting
  (mse keys, no norm correction, no window: every token, generated ones
  too, read quantized); KIVI-4 and KIVI-2 (group 32, the last 32 tokens in
  bf16); SnapKV keeping 25% of each prompt (observation window 32, max
  pooling over 7 tokens). `quick_window` shrinks the windows to 8 (short
  test prompts)."""
  w = 8 if quick_window else 32
  return (
      cache("full", "Full cache (bf16)", "full"),
      cache("tq4", "TurboQuant 4-bit", key_bits=4, value_bits=4,
            norm_correction=False),
      cache("tq3", "TurboQuant 3-bit", key_bits=3, value_bits=3,
            norm_correction=False),
      cache("tq2.5", "TurboQuant 2.5-bit", key_bits=2.5, value_bits=2.5,
            norm_correction=False),
      cache("kivi4", f"KIVI-4 (window {w})", "kivi", key_bits=4,
            value_bits=4, window=w),
      cache("kivi2", f"KIVI-2 (window {w})", "kivi", key_bits=2,
            value_bits=2, window=w),
      cache("snapkv25", "SnapKV, 25% of the prompt", "snapkv", budget=0.25,
            window=w),
  )


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The experiment config; arg "scale=default|quick,model=smollm2|hf|tiny".
  """
  arg = common.parse_arg(arg, scale="default", model="")
  if arg.scale not in _SCALES:
    raise ValueError(f"{arg.scale=!r} must be one of {_SCALES}")
  model = arg.model or "smollm2"
  if model not in _MODELS:
    raise ValueError(f"{arg.model=!r} must be one of {_MODELS}")
  quick = arg.scale == "quick"
  tiny = model == "tiny"

  config = ml_collections.ConfigDict()
  config.scale = arg.scale
  common.set_model(config, model)
  # The haystack: an Austen novel (austen.BOOKS), or "synthetic" (numbered
  # filler sentences: the tests, no data needed).
  config.text = "synthetic" if tiny else "emma"
  # The grid: prompt lengths in tokens (chat template, haystack, needle and
  # question; each prompt is padded to its length, so that a length
  # compiles once per cache) and needle depths in [0, 1].
  if tiny:
    config.lengths = (384, 512)
  elif quick:
    config.lengths = (256, 512)
  else:
    config.lengths = (500, 1000, 2000, 4000)
  config.depths = (0.2, 0.8) if quick else (0.0, 0.25, 0.5, 0.75, 1.0)
  # The needle, the question (which only the needle answers) and what
  # follows the question; an empty system prompt keeps the template's.
  config.needle = ("The best thing to do in San Francisco is eat a sandwich "
                   "and sit in Dolores Park on a sunny day.")
  config.question = "What is the best thing to do in San Francisco?"
  config.instruction = ("Answer the question from the text above, in one "
                        "sentence.")
  config.system = ""
  # Greedy decoding; the reply ends at a stop token or max_new_tokens.
  config.max_new_tokens = 8 if tiny else 40
  config.seed = 0                 # the caches' rotations (and tiny weights)
  config.caches = default_caches(quick_window=tiny)
  config.only = ""                # comma-separated cache names (empty: all)
  return config
