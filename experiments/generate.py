r"""Chat with SmolLM2-135M-Instruct through any KV cache configuration.

  python -m turboquant_jax.data.fetch      # the GGUF file, once
  python -m experiments.generate --prompt "What is the capital of France?" \
      [--config=configs/generate.py:cache=turboquant,key_bits=3,value_bits=2.5]
  python -m experiments.generate --interactive    # multi-turn, reads stdin

Runs on the CPU (or whatever JAX backend is present). The prompt is rendered
with the model's own ChatML template; the reply ends at <|im_end|> / eos or
config.max_new_tokens. Every generated token is appended to the cache and
read back through it (quantized for turboquant and kivi, as in the paper).

Printed: the reply, tokens/s (the first call includes jit compilation;
then config.timing_repeats warm runs), and the cache's memory: layer 0's
`turboquant_jax.cache.memory` and the bytes per token summed over layers.
With --workdir, config.json and one results.jsonl row per reply are written
as well. The weights are SmolLM2's 4-bit (Q4_1) GGUF weights, dequantized:
"full" means a full-precision KV cache, not full-precision weights.
"""

import dataclasses
import pathlib
import sys
import time
from typing import Any, Callable

from absl import app
from absl import flags
import jax
import ml_collections
from ml_collections import config_flags
import numpy as np

from turboquant_jax import cache as cache_lib
from turboquant_jax import results
from turboquant_jax.cache.config import CacheConfig
from turboquant_jax.model import config as config_lib
from turboquant_jax.model import hf
from turboquant_jax.model import sampling

_DEFAULT_CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / (
    "generate.py")
def define_flags() -> None:
  """Defines the flags; called only when run as a program (flags defined
  at import would clash with other experiment modules in one process)."""
  config_flags.DEFINE_config_file(
      "config", str(_DEFAULT_CONFIG), "Generation config file.",
      lock_config=True)
  flags.DEFINE_string("prompt", None, "The user message.")
  flags.DEFINE_bool(
      "interactive", False, "Multi-turn chat: read user messages from stdin "
      "until EOF or an empty line.")
  flags.DEFINE_string(
      "workdir", None, "If set, write config.json and results.jsonl here.")


@dataclasses.dataclass(frozen=True)
class Chatbot:
  """A model and what it takes to chat with it."""
  model: Any                    # model.Transformer
  tokenizer: Any                # tokenizers.Tokenizer
  chat_template: str
  stop_tokens: tuple[int, ...]
  name: str = "SmolLM2-135M-Instruct (Q4_1 weights, dequantized)"


def load_smollm2() -> Chatbot:
  """SmolLM2-135M-Instruct from the data cache, as a Chatbot."""
  # pylint: disable-next=g-import-not-at-top
  from turboquant_jax.data import smollm2
  g = smollm2.load_smollm2()
  model_config = config_lib.ModelConfig.from_hf_config(g.hf_config)
  model = hf.from_hf_tensors(model_config, g.weights)
  return Chatbot(model=model, tokenizer=g.tokenizer,
                 chat_template=g.chat_template,
                 stop_tokens=sampling.chat_stop_tokens(g.tokenizer,
                                                       g.special_tokens))


def cache_configs(config: ml_collections.ConfigDict,
                  model_config: config_lib.ModelConfig
                  ) -> tuple[CacheConfig, ...]:
  """One CacheConfig per layer from the config's cache fields."""
  base = CacheConfig(kind=config.cache, key_bits=config.key_bits,
                     value_bits=config.value_bits,
                     key_method=config.key_method, window=config.window,
                     dtype=config.cache_dtype)
  edge = None
  if config.edge_layers:
    if config.edge_cache == "full":
      edge = CacheConfig(kind="full", dtype=config.cache_dtype)
    else:
      edge = CacheConfig(
          kind=config.edge_cache, key_bits=config.edge_key_bits,
          value_bits=config.edge_value_bits,
          key_method=(config.key_method if config.edge_cache == "turboquant"
                      else "mse"),
          window=config.window, dtype=config.cache_dtype)
  return config_lib.layer_cache_configs(model_config, base,
                                        edge_layers=config.edge_layers,
                                        edge=edge)


def cache_memory(model, configs: tuple[CacheConfig, ...],
                 capacity: int) -> dict[str, Any]:
  """Layer 0's cache.memory and bytes per token summed over the layers."""
  caches = jax.eval_shape(lambda: model.init_caches(1, capacity, configs))
  per_layer = [cache_lib.memory(c) for c in caches]
  c = model.config
  total = sum(m["bytes_per_token"] for m in per_layer)
  bf16 = 2 * c.n_layers * c.n_kv_heads * c.head_dim * 2
  return dict(layer0=per_layer[0], bytes_per_token=total,
              bf16_bytes_per_token=bf16, compression_ratio=bf16 / total)


def _describe(configs: tuple[CacheConfig, ...]) -> str:
  def one(c):
    if c.kind == "full":
      return f"full ({c.dtype})"
    extra = f", {c.key_method} keys" if c.kind == "turboquant" else ""
    extra += f", window {c.window}" if c.window else ""
    return f"{c.kind} K{c.key_bits:g}/V{c.value_bits:g} bits{extra}"
  runs, prev = [], None
  for i, c in enumerate(configs):
    if c != prev:
      runs.append([i, i, c])
      prev = c
    else:
      runs[-1][1] = i
  return "; ".join(f"layers {a}-{b}: {one(c)}" for a, b, c in runs)


def _generate_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
  key = jax.random.key(config.seed)
  sample_key, cache_key = jax.random.split(key)
  return dict(max_new_tokens=config.max_new_tokens,
              temperature=float(config.temperature),
              top_k=config.top_k or None,
              top_p=None if config.top_p >= 1 else float(config.top_p),
              key=sample_key if config.temperature else None,
              cache_key=cache_key)


def reply(bot: Chatbot, messages: list[dict[str, str]],
          config: ml_collections.ConfigDict,
          configs: tuple[CacheConfig, ...]) -> tuple[str, int, float]:
  """(reply text, generated tokens, seconds) of one generate call."""
  start = time.perf_counter()
  text, ids = sampling.chat_reply(
      bot.model, bot.tokenizer, bot.chat_template, messages,
      stop_tokens=bot.stop_tokens, cache_configs=configs,
      **_generate_kwargs(config))
  return text, len(ids), time.perf_counter() - start


def _messages(config, history, prompt):
  system = [{"role": "system", "content": config.system}] if (
      config.system) else []
  return system + history + [{"role": "user", "content": prompt}]


def _capacity(bot: Chatbot, messages, config) -> int:
  n = len(sampling.chat_prompt_ids(bot.tokenizer, bot.chat_template,
                                   messages))
  bucket = sampling.CHAT_BUCKET
  return -(-n // bucket) * bucket + config.max_new_tokens


def run(config: ml_collections.ConfigDict, prompt: str,
        workdir: str | None = None, *, bot: Chatbot | None = None,
        echo: Callable[[str], None] = print) -> dict[str, Any]:
  """One reply to `prompt`, timed; returns (and writes) its results row."""
  bot = bot or load_smollm2()
  configs = cache_configs(config, bot.model.config)
  messages = _messages(config, [], prompt)
  text, n, first_s = reply(bot, messages, config, configs)
  warm = [reply(bot, messages, config, configs)[2]
          for _ in range(config.timing_repeats)]
  mem = cache_memory(bot.model, configs, _capacity(bot, messages, config))
  row = dict(model=bot.name, cache=_describe(configs), prompt=prompt,
             reply=text, new_tokens=n, first_call_s=first_s,
             warm_s=float(np.mean(warm)) if warm else None,
             tokens_per_s=n / float(np.mean(warm)) if warm else n / first_s,
             backend=jax.default_backend(), memory=mem)
  echo(f"cache: {row['cache']}")
  echo(f"user: {prompt}")
  echo(f"assistant: {text}")
  warm_note = (f"; warm: {row['warm_s']:.2f} s = {row['tokens_per_s']:.1f} "
               f"tokens/s (mean of {len(warm)})" if warm else "")
  echo(f"[{n} tokens; first call {first_s:.2f} s incl. compile = "
       f"{n / first_s:.1f} tokens/s{warm_note}; {jax.default_backend()}]")
  echo(_memory_line(mem))
  if workdir:
    results.Writer(workdir, config).write(row)
  return row


def _memory_line(mem: dict[str, Any]) -> str:
  l0 = mem["layer0"]
  return (f"[cache memory: layer 0 {l0['bytes_per_token']:.1f} B/token "
          f"({l0['bits_per_coordinate']:.2f} bits/coordinate, "
          f"{l0['compression_ratio']:.2f}x vs bf16), "
          f"{l0['nbytes'] / 2**10:.1f} KiB allocated "
          f"({l0['fixed_nbytes'] / 2**10:.1f} KiB fixed); all layers "
          f"{mem['bytes_per_token']:.0f} B/token "
          f"({mem['compression_ratio']:.2f}x vs bf16's "
          f"{mem['bf16_bytes_per_token']} B/token)]")


def interactive(config: ml_collections.ConfigDict, *,
                bot: Chatbot | None = None, read=input,
                echo: Callable[[str], None] = print) -> list[dict[str, str]]:
  """A multi-turn chat on stdin; returns the conversation."""
  bot = bot or load_smollm2()
  configs = cache_configs(config, bot.model.config)
  echo(f"{bot.name}; cache: {_describe(configs)}")
  echo("Empty line or EOF ends the chat. The first reply (and each longer "
       f"prompt bucket of {sampling.CHAT_BUCKET} tokens) compiles first.")
  history = []
  while True:
    try:
      prompt = read("user> ")
    except EOFError:
      echo("")
      break
    if not prompt.strip():
      break
    messages = _messages(config, history, prompt)
    text, n, seconds = reply(bot, messages, config, configs)
    echo(f"assistant> {text}")
    mem = cache_memory(bot.model, configs, _capacity(bot, messages, config))
    echo(f"[{n} tokens in {seconds:.2f} s = {n / seconds:.1f} tokens/s; "
         f"all layers {mem['bytes_per_token']:.0f} B/token, "
         f"{mem['compression_ratio']:.2f}x vs bf16]")
    history += [{"role": "user", "content": prompt},
                {"role": "assistant", "content": text}]
  return history


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  config = flags.FLAGS.config
  if flags.FLAGS.interactive:
    interactive(config)
    return
  if not flags.FLAGS.prompt:
    raise app.UsageError("pass --prompt \"...\" or --interactive")
  run(config, flags.FLAGS.prompt, flags.FLAGS.workdir)
  sys.stdout.flush()


if __name__ == "__main__":
  define_flags()
  app.run(main)
