"""Loads a llama-architecture GGUF file in Hugging Face form, dequantized.

`load_gguf(path)` returns the model as a Hugging Face `LlamaForCausalLM`
would see it: a `config.json`-style dict, float32 numpy weights under HF
names and layouts (`model.layers.0.self_attn.q_proj.weight` is [out, in]),
a `tokenizers.Tokenizer` rebuilt from the GGUF metadata, the special token
ids and the chat template.

RoPE layout. llama.cpp's converter permutes the rows of q_proj and k_proj
per head so that its RoPE can rotate adjacent pairs (x[2i], x[2i+1]); HF's
Llama rotates the two halves (x[i], x[i + H/2]) instead. `load_gguf` undoes
that permutation (`unpermute_qk`), so the weights it returns are correct for
the standard HF model with half-split RoPE. Loading the stored q/k rows into
a half-split model is a silent bug: perplexity 233 instead of 34 on Emma
for SmolLM2-135M.

Supported: `general.architecture == "llama"` (Llama, Mistral-style and
SmolLM GGUFs) with the GPT-2 byte-level BPE tokenizer
(`tokenizer.ggml.model == "gpt2"`); every tensor type that
`gguf.quants.dequantize` handles. Anything else raises NotImplementedError.
"""

import collections
import dataclasses
import os
import re
from typing import Any
import warnings

import gguf
import numpy as np
import tokenizers
from tokenizers import decoders
from tokenizers import models
from tokenizers import pre_tokenizers
from tokenizers import processors

# llama.cpp pre-tokenizer names whose regex is GPT-2's, or GPT-2's after
# splitting off every digit (`\p{N}` first: llama-vocab.cpp).
_GPT2_PRE = frozenset({"default", "gpt-2", "gpt2", "mpt", "olmo", "jais"})
_DIGITS_GPT2_PRE = frozenset({"smollm", "starcoder", "refact", "command-r",
                              "codeshell", "exaone", "minerva"})

# GGUF special-token keys (`tokenizer.ggml.<key>_token_id`) -> our names.
_SPECIAL_TOKEN_KEYS = {"bos": "bos_token_id", "eos": "eos_token_id",
                       "unknown": "unk_token_id", "padding": "pad_token_id",
                       "seperator": "sep_token_id", "separator":
                       "sep_token_id", "mask": "mask_token_id",
                       "eot": "eot_token_id", "eom": "eom_token_id"}

# GGUF per-layer tensor name -> HF name (under `model.layers.N.`).
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


@dataclasses.dataclass(frozen=True)
class GGUFModel:
  """A GGUF model in Hugging Face form.

  Attributes:
    hf_config: a `config.json`-style dict for `LlamaForCausalLM`, plus a
      `gguf_source` entry (file name, file type and tensor type counts: the
      weights were quantized, e.g. Q4_1, before we dequantized them).
    weights: HF name -> float32 array in HF layout ([out, in] for linear
      layers), q/k rows in HF's half-split RoPE order. No `lm_head.weight`
      when `hf_config["tie_word_embeddings"]`.
    tokenizer: the byte-level BPE tokenizer from the metadata.
    special_tokens: e.g. {"bos_token_id": 1, "eos_token_id": 2, ...}, the
      ids the metadata names.
    chat_template: the Jinja chat template (`tokenizer.chat_template`), if
      any; render it with `turboquant_jax.model.chat.apply_chat_template`.
  """
  hf_config: dict[str, Any]
  weights: dict[str, np.ndarray]
  tokenizer: tokenizers.Tokenizer
  special_tokens: dict[str, int]
  chat_template: str | None


def permute_qk(w: np.ndarray, num_heads: int) -> np.ndarray:
  """HF q/k rows -> GGUF (llama.cpp interleaved-RoPE) row order.

  Within each head of size H, HF row `s * H/2 + i` (s in {0, 1}: first or
  second half) moves to row `2 * i + s`. This is llama.cpp's
  `convert_hf_to_gguf.py` permutation, here only to test `unpermute_qk`.

  Args:
    w: [num_heads * H, ...] rows of q_proj or k_proj (or a bias).
    num_heads: query heads for q_proj, key/value heads for k_proj.
  """
  head_dim = _head_dim(w, num_heads)
  return (w.reshape(num_heads, 2, head_dim // 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def unpermute_qk(w: np.ndarray, num_heads: int) -> np.ndarray:
  """GGUF q/k rows -> HF half-split RoPE row order; inverts `permute_qk`.

  Within each head of size H, GGUF row `2 * i + s` (pair i, member s) goes
  back to HF row `s * H/2 + i`.

  Args:
    w: [num_heads * H, ...] rows of attn_q or attn_k as stored in the GGUF.
    num_heads: query heads for attn_q, key/value heads for attn_k.
  """
  head_dim = _head_dim(w, num_heads)
  return (w.reshape(num_heads, head_dim // 2, 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def _head_dim(w: np.ndarray, num_heads: int) -> int:
  if num_heads < 1 or w.ndim < 1 or w.shape[0] % (2 * num_heads):
    raise ValueError(f"{w.shape=} rows must split into {num_heads=} heads "
                     "of even size")
  return w.shape[0] // num_heads


def read_metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
  """All key/value metadata of a GGUF file as plain Python values."""
  return {key: field.contents() for key, field in reader.fields.items()
          if not key.startswith("GGUF.")}


def _get(meta: dict[str, Any], key: str, default: Any = ...) -> Any:
  if key in meta:
    return meta[key]
  if default is ...:
    raise ValueError(f"GGUF metadata lacks {key!r}")
  return default


def _f32(x: float) -> float:
  """A float32 metadata value as the decimal it was written from (1e-05)."""
  return float(str(np.float32(x)))


def hf_config_from_metadata(meta: dict[str, Any],
                            tensor_names: set[str]) -> dict[str, Any]:
  """The HF `config.json` dict of a llama GGUF from its metadata.

  Args:
    meta: from `read_metadata`.
    tensor_names: the GGUF tensor names (decides `tie_word_embeddings`).
  """
  arch = _get(meta, "general.architecture")
  if arch != "llama":
    raise NotImplementedError(f"{arch=}: only 'llama' GGUF files are "
                              "supported")
  hidden = int(_get(meta, "llama.embedding_length"))
  heads = int(_get(meta, "llama.attention.head_count"))
  kv_heads = int(_get(meta, "llama.attention.head_count_kv", heads))
  head_dim = int(_get(meta, "llama.attention.key_length", hidden // heads))
  value_dim = int(_get(meta, "llama.attention.value_length", head_dim))
  rope_dim = int(_get(meta, "llama.rope.dimension_count", head_dim))
  if value_dim != head_dim or rope_dim != head_dim:
    raise NotImplementedError(f"{head_dim=}, {value_dim=}, {rope_dim=}: only "
                              "equal key, value and RoPE dims are supported")
  if heads % kv_heads:
    raise ValueError(f"{heads=} is not a multiple of {kv_heads=}")
  if "rope_freqs.weight" in tensor_names:
    raise NotImplementedError("tensor 'rope_freqs.weight' (Llama-3.1 RoPE "
                              "frequency scaling) is not supported")
  rope_scaling = None
  scaling_type = _get(meta, "llama.rope.scaling.type", "none")
  if scaling_type == "linear":
    rope_scaling = {"rope_type": "linear", "factor": _f32(
        _get(meta, "llama.rope.scaling.factor"))}
  elif scaling_type != "none":
    raise NotImplementedError(f"rope scaling {scaling_type!r} is not "
                              "supported")
  vocab_size = meta.get("llama.vocab_size")
  if vocab_size is None:
    vocab_size = len(_get(meta, "tokenizer.ggml.tokens"))
  config = {
      "architectures": ["LlamaForCausalLM"],
      "model_type": "llama",
      "hidden_size": hidden,
      "intermediate_size": int(_get(meta, "llama.feed_forward_length")),
      "num_hidden_layers": int(_get(meta, "llama.block_count")),
      "num_attention_heads": heads,
      "num_key_value_heads": kv_heads,
      "head_dim": head_dim,
      "hidden_act": "silu",
      "rms_norm_eps": _f32(_get(meta,
                                "llama.attention.layer_norm_rms_epsilon")),
      "rope_theta": _f32(_get(meta, "llama.rope.freq_base", 10000.0)),
      "rope_scaling": rope_scaling,
      "vocab_size": int(vocab_size),
      "max_position_embeddings": int(_get(meta, "llama.context_length")),
      "tie_word_embeddings": "output.weight" not in tensor_names,
      "attention_bias": False,
      "attention_dropout": 0.0,
      "mlp_bias": False,
      "torch_dtype": "float32",
  }
  for key, name in (("bos", "bos_token_id"), ("eos", "eos_token_id"),
                    ("padding", "pad_token_id")):
    if (value := meta.get(f"tokenizer.ggml.{key}_token_id")) is not None:
      config[name] = int(value)
  return config


def _expected_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
  """HF name -> shape, for every weight the config implies."""
  d, f = config["hidden_size"], config["intermediate_size"]
  q = config["num_attention_heads"] * config["head_dim"]
  kv = config["num_key_value_heads"] * config["head_dim"]
  v = config["vocab_size"]
  shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
  if not config["tie_word_embeddings"]:
    shapes["lm_head.weight"] = (v, d)
  per_layer = {
      "input_layernorm": (d,), "post_attention_layernorm": (d,),
      "self_attn.q_proj": (q, d), "self_attn.k_proj": (kv, d),
      "self_attn.v_proj": (kv, d), "self_attn.o_proj": (d, q),
      "mlp.gate_proj": (f, d), "mlp.up_proj": (f, d),
      "mlp.down_proj": (d, f)}
  for layer in range(config["num_hidden_layers"]):
    for name, shape in per_layer.items():
      shapes[f"model.layers.{layer}.{name}.weight"] = shape
  return shapes


def hf_name(gguf_name: str) -> str:
  """The HF name of a llama GGUF tensor; ValueError if it is not one."""
  if gguf_name == "token_embd.weight":
    return "model.embed_tokens.weight"
  if gguf_name == "output_norm.weight":
    return "model.norm.weight"
  if gguf_name == "output.weight":
    return "lm_head.weight"
  if (m := _LAYER_RE.fullmatch(gguf_name)) and m[2] in _LAYER_TENSORS:
    return f"model.layers.{int(m[1])}.{_LAYER_TENSORS[m[2]]}.weight"
  raise ValueError(f"{gguf_name=} is not a llama tensor this loader knows")


def _dequantize(tensor: gguf.ReaderTensor) -> np.ndarray:
  """A tensor as float32 numpy, in numpy order (GGUF dims reversed)."""
  arr = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
  expected = tuple(int(n) for n in reversed(tensor.shape))
  if arr.shape != expected:
    raise ValueError(f"tensor {tensor.name!r} ({tensor.tensor_type.name}) "
                     f"dequantized to {arr.shape}, expected {expected} from "
                     "its GGUF dims")
  # A copy: F32 tensors are views of the reader's memory map.
  return np.array(arr, dtype=np.float32, copy=True, order="C")


def build_tokenizer(meta: dict[str, Any]
                    ) -> tuple[tokenizers.Tokenizer, dict[str, int]]:
  """The byte-level BPE tokenizer stored in a GGUF's metadata.

  Control tokens (type 3, e.g. `<|im_start|>`) become special added tokens,
  so text containing them encodes to their single ids, and user-defined
  ones (type 4) plain added tokens. If the metadata asks for BOS/EOS to be
  added, a post-processor adds them.

  Args:
    meta: from `read_metadata`.

  Returns:
    (tokenizer, special token ids such as {"bos_token_id": 1, ...}).
  """
  kind = _get(meta, "tokenizer.ggml.model")
  if kind != "gpt2":
    raise NotImplementedError(f"tokenizer.ggml.model={kind!r}: only 'gpt2' "
                              "(byte-level BPE) is supported")
  tokens = list(_get(meta, "tokenizer.ggml.tokens"))
  vocab = {tok: i for i, tok in enumerate(tokens)}
  if len(vocab) != len(tokens):
    dupes = [t for t, n in collections.Counter(tokens).items() if n > 1]
    raise ValueError(f"GGUF vocabulary has duplicate tokens {dupes[:5]}")
  merges = []
  for merge in _get(meta, "tokenizer.ggml.merges"):
    pair = tuple(merge.split(" "))
    if len(pair) != 2 or pair[0] not in vocab or pair[1] not in vocab:
      raise ValueError(f"bad BPE merge {merge!r}: expected two vocabulary "
                       "tokens separated by one space")
    merges.append(pair)
  tok = tokenizers.Tokenizer(models.BPE(vocab, merges, fuse_unk=False))
  pre = _get(meta, "tokenizer.ggml.pre", "default")
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False,
                                        use_regex=True)
  if pre in _DIGITS_GPT2_PRE:
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True), byte_level])
  else:
    if pre not in _GPT2_PRE:
      warnings.warn(f"tokenizer.ggml.pre={pre!r}: using GPT-2's "
                    "pre-tokenizer regex; token ids may differ from "
                    "llama.cpp's (text still round-trips)")
    tok.pre_tokenizer = byte_level
  tok.decoder = decoders.ByteLevel()

  types = meta.get("tokenizer.ggml.token_type")
  if types is not None:
    if len(types) != len(tokens):
      raise ValueError(f"{len(types)=} token types for {len(tokens)=} tokens")
    control = [tokenizers.AddedToken(tokens[i], special=True,
                                     normalized=False)
               for i, t in enumerate(types) if t == gguf.TokenType.CONTROL]
    user = [tokenizers.AddedToken(tokens[i], special=False, normalized=False)
            for i, t in enumerate(types)
            if t == gguf.TokenType.USER_DEFINED]
    tok.add_special_tokens(control)
    tok.add_tokens(user)
    for added in control + user:
      if tok.token_to_id(added.content) != vocab[added.content]:
        raise ValueError(f"added token {added.content!r} got id "
                         f"{tok.token_to_id(added.content)}, expected "
                         f"{vocab[added.content]}")

  special = {}
  for key, name in _SPECIAL_TOKEN_KEYS.items():
    value = meta.get(f"tokenizer.ggml.{key}_token_id")
    if value is None:
      continue
    if not 0 <= value < len(tokens):
      raise ValueError(f"tokenizer.ggml.{key}_token_id={value} is outside "
                       f"the vocabulary of {len(tokens)}")
    special[name] = int(value)

  added = []
  for flag, name in (("add_bos_token", "bos_token_id"),
                     ("add_eos_token", "eos_token_id")):
    if not meta.get(f"tokenizer.ggml.{flag}"):
      added.append(None)
    elif name not in special:
      raise ValueError(f"tokenizer.ggml.{flag} is set but {name} is not")
    else:
      added.append(tokens[special[name]])
  if added != [None, None]:
    bos, eos = ([] if t is None else [t] for t in added)
    tok.post_processor = processors.TemplateProcessing(
        single=" ".join([*bos, "$A", *eos]),
        pair=" ".join([*bos, "$A", *eos, *bos, "$B", *eos]),
        special_tokens=[(t, vocab[t]) for t in dict.fromkeys(bos + eos)])
  return tok, special


def load_gguf(path: str | os.PathLike[str]) -> GGUFModel:
  """Reads a llama GGUF file and dequantizes it into Hugging Face form.

  Args:
    path: the .gguf file.

  Returns:
    A GGUFModel: HF config dict, float32 weights under HF names (q/k rows
    un-permuted to HF's half-split RoPE order), tokenizer, special token ids
    and chat template.

  Raises:
    ValueError: a tensor is missing, unknown or of the wrong shape (the
      message names it), or the metadata is inconsistent.
    NotImplementedError: another architecture, tokenizer or RoPE scaling.
  """
  reader = gguf.GGUFReader(path)
  meta = read_metadata(reader)
  names = {t.name for t in reader.tensors}
  config = hf_config_from_metadata(meta, names)
  tokenizer, special = build_tokenizer(meta)
  if config["vocab_size"] != tokenizer.get_vocab_size():
    raise ValueError(f"llama.vocab_size={config['vocab_size']} but the "
                     f"tokenizer has {tokenizer.get_vocab_size()} tokens")
  expected = _expected_shapes(config)
  heads = config["num_attention_heads"]
  kv_heads = config["num_key_value_heads"]
  weights = {}
  for tensor in reader.tensors:
    name = hf_name(tensor.name)
    if name not in expected:
      raise ValueError(f"tensor {tensor.name!r} ({name}) does not fit the "
                       f"config ({config['num_hidden_layers']} layers)")
    arr = _dequantize(tensor)
    want = expected[name]
    if (arr.shape != want and name in ("model.embed_tokens.weight",
                                       "lm_head.weight")
        and arr.shape == want[::-1]):
      arr = np.ascontiguousarray(arr.T)   # stored [d, V]
    if arr.shape != want:
      raise ValueError(f"tensor {tensor.name!r} -> {name}: shape "
                       f"{arr.shape}, expected {want} from the metadata")
    if name.endswith("q_proj.weight"):
      arr = unpermute_qk(arr, heads)
    elif name.endswith("k_proj.weight"):
      arr = unpermute_qk(arr, kv_heads)
    weights[name] = arr
  if missing := sorted(set(expected) - set(weights)):
    raise ValueError(f"GGUF file lacks {len(missing)} tensors, e.g. "
                     f"{missing[:3]}")
  file_type = meta.get("general.file_type")
  try:
    file_type = gguf.LlamaFileType(file_type).name
  except ValueError:
    pass
  config["gguf_source"] = {
      "file": os.path.basename(os.fspath(path)),
      "name": meta.get("general.name"),
      "file_type": file_type,
      "tensor_types": dict(collections.Counter(
          t.tensor_type.name for t in reader.tensors)),
  }
  return GGUFModel(hf_config=config, weights=weights, tokenizer=tokenizer,
                   special_tokens=special,
                   chat_template=meta.get("tokenizer.chat_template"))
