"""Helpers shared by the config files."""

import ml_collections


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """big_vision's `parse_arg`: "a=1,b" -> ConfigDict(a=1, b=True), typed.

  The config-file argument (`--config=configs/x.py:scale=quick,seed=1`)
  may set only the keys given as defaults; values take their defaults' type.
  """
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"unknown config arg {key!r}; known: {sorted(defaults)}")
    kind = type(defaults[key])
    if kind is bool:
      out[key] = value.lower() in ("", "1", "true", "yes")
    else:
      out[key] = kind(value)
  return out


def set_model(config: ml_collections.ConfigDict, model: str) -> None:
  """The language-model fields that experiments.common.load_lm reads.

  model: "smollm2" (SmolLM2-135M-Instruct, Q4_1 GGUF weights dequantized;
  8192 context), "hf" (the Hugging Face checkpoint directory hf_path) or
  "tiny" (a random 3-layer model with a byte-level tokenizer: the tests).
  """
  config.model = model
  config.hf_path = ""
  config.hf_cache_dir = ""        # keep the converted weights here (orbax)
  config.dtype = "float32"        # model weights and compute
