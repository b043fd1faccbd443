r"""Chat with SmolLM2-135M-Instruct through any KV cache, on the CPU.

  python -m turboquant_jax.data.fetch      # the GGUF file, once
  python -m experiments.generate --prompt "What is the capital of France?" \
      --config=configs/generate.py:cache=turboquant,key_bits=3,value_bits=2.5

The arg string sets the cache (`cache=full|turboquant|kivi`, `key_bits`,
`value_bits`, `key_method`, `window`, `edge_layers`); every field can also be
overridden as a flag after --config, e.g. `--config.temperature=0.7
--config.top_p=0.9` (absl needs --config=... first when both are given).
"""

import ml_collections

from configs import common

_ARGS = dict(cache="turboquant", key_bits=4.0, value_bits=4.0,
             key_method="mse", window=0, edge_layers=0)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The generation config; `arg` sets the cache fields of _ARGS."""
  arg = common.parse_arg(arg, **_ARGS)
  config = ml_collections.ConfigDict()

  # The cache of the middle layers: "full" (uncompressed, cache_dtype),
  # "turboquant" or "kivi". Bits may be fractional for turboquant (2.5,
  # 3.5: outlier channels at one more bit, picked from the prompt).
  config.cache = arg.cache
  config.key_bits = arg.key_bits
  config.value_bits = arg.value_bits
  config.key_method = arg.key_method    # "mse" or "prod" (turboquant)
  config.window = arg.window            # recent tokens also kept unquantized
  config.cache_dtype = "bfloat16"       # full cache and window storage
  # The first and last edge_layers layers get edge_cache instead ("full",
  # or a kind at edge_key_bits / edge_value_bits).
  config.edge_layers = arg.edge_layers
  config.edge_cache = "full"
  config.edge_key_bits = 8.0
  config.edge_value_bits = 8.0

  # Decoding. temperature 0 is greedy; top_k 0 and top_p 1 switch those
  # filters off. The reply ends at <|im_end|> / eos or max_new_tokens.
  config.max_new_tokens = 256
  config.temperature = 0.0
  config.top_k = 0
  config.top_p = 1.0
  config.seed = 0               # sampling key and the caches' rotations

  # The chat. An empty system prompt keeps the template's default one.
  config.system = ""
  # After the first (compiling) call, generate the same reply this many
  # more times and report the mean warm tokens/s (0: report the first
  # call only). Not used by --interactive.
  config.timing_repeats = 1
  return config
