"""What every experiment driver shares: its flags and its main(), cache
configs from config entries, and the language models (`load_lm`)."""

import json
import os
import pathlib
from typing import Callable

from absl import app
from absl import flags
from flax import nnx
from ml_collections import config_flags
import tokenizers
from tokenizers import decoders
from tokenizers import models
from tokenizers import pre_tokenizers

from turboquant_jax.cache import CacheConfig
from turboquant_jax.eval import longbench
from turboquant_jax.model import config as model_config_lib
from turboquant_jax.model import hf
from turboquant_jax.model import sampling
from turboquant_jax.model import transformer

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
  kw = dict(kind=kind, dtype=fields.get("dtype", "bfloat16"),
            key_norm_bits=fields.get("key_norm_bits", 16),
            value_norm_bits=fields.get("value_norm_bits", 16))
  if kind != "full":
    kw.update(key_bits=fields["key_bits"], value_bits=fields["value_bits"],
              key_method=fields.get("key_method", "mse"),
              norm_correction=fields.get("norm_correction", True),
              window=fields.get("window", 0))
  if fields.get("sink", 0):
    kw.update(sink=fields["sink"])
  if fields.get("center_keys", False):
    kw.update(center_keys=True, center_skip=fields.get("center_skip", 0))
  if fields.get("grid_centroids", False):
    kw.update(grid_centroids=True)
  return CacheConfig(**kw)


def layer_configs(model_config, spec) -> tuple[CacheConfig, ...]:
  """One CacheConfig per layer for a config.caches entry."""
  edge = cache_config(spec["edge"]) if spec["edge_layers"] else None
  return model_config_lib.layer_cache_configs(
      model_config, cache_config(spec), edge_layers=spec["edge_layers"],
      edge=edge)


# ------------------------------------------------------------------ models
# The language models of the generation experiments (LongBench-E, needle).

_TINY_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}")


def byte_tokenizer() -> tokenizers.Tokenizer:
  """One token per UTF-8 byte (ids 0-255) plus ChatML's special tokens
  (256-258): text round-trips exactly, as with a real byte-level BPE."""
  alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
  vocab = {ch: i for i, ch in enumerate(alphabet)}
  tok = tokenizers.Tokenizer(models.BPE(vocab, [], fuse_unk=False))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens([tokenizers.AddedToken(t, special=True,
                                                normalized=False)
                          for t in _TINY_SPECIALS])
  return tok


def tiny_lm(seed: int = 0) -> longbench.LanguageModel:
  """The tests' model: 3 random layers over the byte tokenizer, ChatML."""
  tok = byte_tokenizer()
  mc = model_config_lib.ModelConfig(
      vocab_size=tok.get_vocab_size(), d_model=64, n_layers=3, n_heads=4,
      n_kv_heads=2, head_dim=32, ffn_dim=96, max_seq_len=1024)
  model = transformer.Transformer(mc, rngs=nnx.Rngs(seed))
  stops = tuple(tok.token_to_id(t) for t in ("<|endoftext|>", "<|im_end|>"))
  return longbench.LanguageModel(model=model, tokenizer=tok,
                                 chat_template=TINY_CHAT_TEMPLATE,
                                 stop_tokens=stops,
                                 name="tiny random model (tests)")


def _smollm2(dtype: str) -> longbench.LanguageModel:
  # pylint: disable-next=g-import-not-at-top
  from turboquant_jax.data import smollm2
  g = smollm2.load_smollm2()
  mc = model_config_lib.ModelConfig.from_hf_config(g.hf_config, dtype=dtype)
  return longbench.LanguageModel(
      model=hf.from_hf_tensors(mc, g.weights), tokenizer=g.tokenizer,
      chat_template=g.chat_template,
      stop_tokens=sampling.chat_stop_tokens(g.tokenizer, g.special_tokens),
      name="SmolLM2-135M-Instruct (Q4_1 weights dequantized)")


def _read_json(path: pathlib.Path) -> dict:
  if not path.is_file():
    return {}
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def hf_tokenizer(path: str | os.PathLike
                 ) -> tuple[tokenizers.Tokenizer, str | None, tuple[int, ...]]:
  """(tokenizer, chat template or None, stop ids) of a HF model directory.

  Reads tokenizer.json; the chat template from tokenizer_config.json
  ("chat_template": a string, or a list whose "default" entry is used) or
  chat_template.jinja; the stop ids are generation_config.json's (else
  config.json's) eos_token_id(s) plus the template's turn-end tokens the
  vocabulary has (<|im_end|>, <|eot_id|>, <|end|>, <end_of_turn>).
  """
  path = pathlib.Path(path).expanduser()
  file = path / "tokenizer.json"
  if not file.is_file():
    raise FileNotFoundError(f"{file} not found: config.hf_path needs the "
                            "model's fast tokenizer (tokenizer.json)")
  tok = tokenizers.Tokenizer.from_file(str(file))
  template = _read_json(path / "tokenizer_config.json").get("chat_template")
  if isinstance(template, list):
    named = {t.get("name"): t.get("template") for t in template}
    template = named.get("default")
  if template is None and (path / "chat_template.jinja").is_file():
    template = (path / "chat_template.jinja").read_text(encoding="utf-8")
  eos = _read_json(path / "generation_config.json").get("eos_token_id")
  if eos is None:
    eos = _read_json(path / "config.json").get("eos_token_id")
  eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
  turn_ends = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")
  stops = sampling.chat_stop_tokens(
      tok, {"eos_token_id": eos[0]} if eos else {}, turn_ends)
  return tok, template, tuple(dict.fromkeys(tuple(eos) + stops))


def load_lm(config) -> longbench.LanguageModel:
  """The model config.model names."""
  if config.model == "tiny":
    return tiny_lm(config.seed)
  if config.model == "smollm2":
    return _smollm2(config.dtype)
  if config.model != "hf":
    raise ValueError(f"config.model={config.model!r} must be 'smollm2', "
                     "'hf' or 'tiny'")
  if not config.hf_path:
    raise ValueError("config.model='hf' needs config.hf_path (a Hugging "
                     "Face checkpoint directory)")
  model = hf.load_hf(config.hf_path, config.hf_cache_dir or None,
                     dtype=config.dtype or None)
  tok, template, stops = hf_tokenizer(config.hf_path)
  return longbench.LanguageModel(
      model=model, tokenizer=tok, chat_template=template, stop_tokens=stops,
      name=pathlib.Path(config.hf_path).expanduser().resolve().name)
