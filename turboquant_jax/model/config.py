"""ModelConfig (a frozen, validated dataclass), HF config parsing, cache policy.

`ModelConfig.from_hf_config` reads a Hugging Face `config.json` dict of the
Llama, Mistral and Qwen2 families; `layer_cache_configs` picks a CacheConfig
per layer (e.g. the first and last layers at higher bits).
"""

from collections.abc import Mapping
import dataclasses
import math
from typing import Any

from turboquant_jax.cache.config import CacheConfig

ROPE_STYLES = ("half", "interleaved")
DTYPES = ("float32", "bfloat16")

# HF `architectures` entry -> its `model_type`.
HF_ARCHITECTURES = {"LlamaForCausalLM": "llama",
                    "MistralForCausalLM": "mistral",
                    "Qwen2ForCausalLM": "qwen2"}


def _check_int(name: str, value: Any, minimum: int = 1) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")


def _check_positive(name: str, value: Any) -> None:
  if (isinstance(value, bool) or not isinstance(value, (int, float))
      or not math.isfinite(value) or value <= 0):
    raise ValueError(f"{name}={value!r} must be a finite number > 0")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama-3.1 RoPE frequency scaling (HF `rope_type="llama3"`).

  Wavelengths longer than original_max_position_embeddings / low_freq_factor
  are stretched by `factor`, those shorter than ... / high_freq_factor are
  kept, and the band between is interpolated smoothly.
  """
  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192

  def __post_init__(self):
    for name in ("factor", "low_freq_factor", "high_freq_factor"):
      _check_positive(name, getattr(self, name))
    _check_int("original_max_position_embeddings",
               self.original_max_position_embeddings)
    if self.high_freq_factor <= self.low_freq_factor:
      raise ValueError(f"{self.high_freq_factor=} must be > "
                       f"{self.low_freq_factor=}")

  def __getitem__(self, name: str):
    """Dict-like read access, as HF's rope_scaling["factor"]."""
    if name not in self.keys():
      raise KeyError(name)
    return getattr(self, name)

  def keys(self) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(self))

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "RopeScaling":
    """From a mapping with (at least) the four field names."""
    names = [f.name for f in dataclasses.fields(cls)]
    missing = [n for n in names if n not in d]
    if missing:
      raise ValueError(f"rope scaling {dict(d)!r} lacks {missing}")
    return cls(**{n: d[n] for n in names})


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A decoder-only transformer: RMSNorm, RoPE, GQA, SwiGLU.

  Attributes:
    vocab_size: number of token ids.
    d_model: residual width.
    n_layers: number of decoder blocks.
    n_heads, n_kv_heads: query heads and key/value heads (GQA: n_heads is a
      multiple of n_kv_heads).
    head_dim: width of one head (even, for RoPE).
    ffn_dim: hidden width of the SwiGLU MLP.
    rms_eps: RMSNorm epsilon.
    rope_theta: RoPE base wavelength.
    rope_style: "half" rotates (x[i], x[i + head_dim/2]) as Hugging Face
      does; "interleaved" rotates (x[2i], x[2i+1]) as llama.cpp / Meta's
      original code does (see layers.permute_for_interleaved).
    rope_scaling: Llama-3.1 frequency scaling, or None. A mapping is
      converted to RopeScaling.
    tie_embeddings: the output projection is the transposed embedding.
    attn_bias: biases on the q, k, v projections (Qwen2).
    out_bias: a bias on the output projection (Llama attention_bias=True).
    max_seq_len: longest sequence the model is exact for (caches of a larger
      capacity are refused).
    dtype: parameter and activation dtype, "float32" or "bfloat16";
      attention softmax and logits are float32 either way.
  """
  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  head_dim: int
  ffn_dim: int
  rms_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_style: str = "half"
  rope_scaling: RopeScaling | None = None
  tie_embeddings: bool = False
  attn_bias: bool = False
  out_bias: bool = False
  max_seq_len: int = 4096
  dtype: str = "float32"

  def __post_init__(self):
    for name in ("vocab_size", "d_model", "n_layers", "n_heads",
                 "n_kv_heads", "head_dim", "ffn_dim", "max_seq_len"):
      _check_int(name, getattr(self, name))
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f"{self.n_heads=} must be a multiple of "
                       f"{self.n_kv_heads=}")
    if self.head_dim % 2:
      raise ValueError(f"{self.head_dim=} must be even (RoPE rotates pairs)")
    _check_positive("rms_eps", self.rms_eps)
    _check_positive("rope_theta", self.rope_theta)
    if self.rope_style not in ROPE_STYLES:
      raise ValueError(f"rope_style={self.rope_style!r} must be one of "
                       f"{ROPE_STYLES}")
    if isinstance(self.rope_scaling, Mapping):
      object.__setattr__(self, "rope_scaling",
                         RopeScaling.from_dict(self.rope_scaling))
    if not (self.rope_scaling is None
            or isinstance(self.rope_scaling, RopeScaling)):
      raise ValueError(f"rope_scaling={self.rope_scaling!r} must be None, a "
                       "RopeScaling or a mapping of its fields")
    for name in ("tie_embeddings", "attn_bias", "out_bias"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"{name}={getattr(self, name)!r} must be a bool")
    if self.dtype not in DTYPES:
      raise ValueError(f"dtype={self.dtype!r} must be one of {DTYPES}")

  @classmethod
  def from_hf_config(cls, hf: Mapping[str, Any], *, dtype: str | None = None,
                     source: str = "config.json") -> "ModelConfig":
    """Reads a Hugging Face config of LlamaForCausalLM, MistralForCausalLM or
    Qwen2ForCausalLM.

    Both the transformers-4 fields (`rope_theta`, `rope_scaling`) and the
    transformers-5 `rope_parameters` dict are understood. Mistral's (or an
    enabled Qwen2) `sliding_window` is not implemented: max_seq_len is capped
    at it, so the model is exact for every sequence it accepts.

    Args:
      hf: the parsed config.json.
      dtype: "float32" or "bfloat16"; None takes bfloat16 when the
        checkpoint's `torch_dtype`/`dtype` is bfloat16 or float16, else
        float32.
      source: the file name used in error messages.

    Raises:
      ValueError: unsupported architecture, activation or RoPE type, or
        fields that disagree; the message names `source` and the field.
    """
    return _from_hf_config(cls, hf, dtype, source)


def _from_hf_config(cls, hf, dtype, source) -> ModelConfig:
  def err(field, msg):
    return ValueError(f"{source}: {field}={hf.get(field)!r} {msg}")

  def need(field):
    if field not in hf or hf[field] is None:
      raise ValueError(f"{source}: missing required field {field!r}")
    return hf[field]

  archs = hf.get("architectures")
  model_type = hf.get("model_type")
  supported = sorted(HF_ARCHITECTURES)
  if archs:
    if isinstance(archs, str):
      archs = [archs]
    known = [a for a in archs if a in HF_ARCHITECTURES]
    if not known:
      raise err("architectures", f"is not supported; expected one of "
                f"{supported}")
    family = HF_ARCHITECTURES[known[0]]
    if model_type is not None and model_type != family:
      raise err("model_type", f"disagrees with architectures={archs!r} "
                f"(expected {family!r})")
  elif model_type in HF_ARCHITECTURES.values():
    family = model_type
  else:
    raise err("model_type", f"is not supported (and no architectures "
              f"field); expected one of {sorted(HF_ARCHITECTURES.values())}")

  d_model = need("hidden_size")
  n_heads = need("num_attention_heads")
  n_layers = need("num_hidden_layers")
  n_kv = hf.get("num_key_value_heads") or n_heads
  for field, value in (("hidden_size", d_model),
                       ("num_attention_heads", n_heads),
                       ("num_hidden_layers", n_layers),
                       ("num_key_value_heads", n_kv),
                       ("vocab_size", need("vocab_size")),
                       ("intermediate_size", need("intermediate_size"))):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"{source}: {field}={value!r} must be a positive "
                       "integer")
  head_dim = hf.get("head_dim")
  if head_dim is None:
    if d_model % n_heads:
      raise err("hidden_size", f"is not a multiple of num_attention_heads="
                f"{n_heads} (and head_dim is not given)")
    head_dim = d_model // n_heads
  if n_heads % n_kv:
    raise err("num_attention_heads", f"is not a multiple of "
              f"num_key_value_heads={n_kv}")
  if not isinstance(head_dim, int) or head_dim < 2 or head_dim % 2:
    raise err("head_dim", "must be an even positive integer")

  act = hf.get("hidden_act", "silu")
  if act not in ("silu", "swish"):
    raise err("hidden_act", "is not supported; only 'silu' (SwiGLU)")
  if hf.get("mlp_bias"):
    raise err("mlp_bias", "is not supported")

  theta, scaling = _rope(hf, source)

  if family == "qwen2":
    attn_bias, out_bias = True, False
  else:
    attn_bias = out_bias = bool(hf.get("attention_bias", False))

  max_len = hf.get("max_position_embeddings", 4096)
  window = hf.get("sliding_window")
  if family == "qwen2":
    layers_sliding = (hf.get("use_sliding_window", False)
                      and hf.get("max_window_layers", n_layers) < n_layers)
    if not layers_sliding:
      window = None
  if window is not None and window < max_len:
    max_len = window

  if dtype is None:
    stored = hf.get("torch_dtype", hf.get("dtype"))
    dtype = "bfloat16" if stored in ("bfloat16", "float16") else "float32"
  try:
    return cls(vocab_size=hf["vocab_size"], d_model=d_model,
               n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv,
               head_dim=head_dim, ffn_dim=hf["intermediate_size"],
               rms_eps=float(hf.get("rms_norm_eps", 1e-6)),
               rope_theta=float(theta), rope_style="half",
               rope_scaling=scaling,
               tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
               attn_bias=attn_bias, out_bias=out_bias, max_seq_len=max_len,
               dtype=dtype)
  except ValueError as e:
    raise ValueError(f"{source}: {e}") from e


def _rope(hf: Mapping[str, Any], source: str):
  """(theta, RopeScaling | None) from either HF rope convention."""
  params = hf.get("rope_parameters")
  field = "rope_parameters"
  if params is None:
    params = dict(hf.get("rope_scaling") or {})
    field = "rope_scaling"
  elif not isinstance(params, Mapping):
    raise ValueError(f"{source}: rope_parameters={params!r} must be a dict")
  elif any(isinstance(v, Mapping) for v in params.values()):
    raise ValueError(f"{source}: rope_parameters={params!r}: per-layer RoPE "
                     "parameters are not supported")
  theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
  kind = params.get("rope_type", params.get("type", "default"))
  if params.get("partial_rotary_factor", hf.get("partial_rotary_factor",
                                                1.0)) != 1.0:
    raise ValueError(f"{source}: partial_rotary_factor is not supported")
  if kind == "default":
    return theta, None
  if kind != "llama3":
    raise ValueError(f"{source}: {field}.rope_type={kind!r} is not "
                     "supported; expected 'default' or 'llama3'")
  d = dict(params)
  d.setdefault("original_max_position_embeddings",
               hf.get("max_position_embeddings"))
  try:
    return theta, RopeScaling.from_dict(d)
  except ValueError as e:
    raise ValueError(f"{source}: {field}: {e}") from e


def layer_cache_configs(model_config: ModelConfig, base: CacheConfig, *,
                        edge_layers: int = 0,
                        edge: CacheConfig | None = None
                        ) -> tuple[CacheConfig, ...]:
  """One CacheConfig per layer: `edge` for the first and last `edge_layers`.

  Keys and values at different bits come from the CacheConfig itself
  (key_bits, value_bits); the kinds may differ between layers too.

  Args:
    model_config: gives n_layers.
    base: the config of the middle layers.
    edge_layers: how many layers at each end get `edge`.
    edge: the config of the edge layers (required if edge_layers > 0).

  Returns:
    A tuple of n_layers CacheConfigs.
  """
  n = model_config.n_layers
  if not isinstance(base, CacheConfig):
    raise ValueError(f"base={base!r} must be a CacheConfig")
  _check_int("edge_layers", edge_layers, minimum=0)
  if edge_layers > n:
    raise ValueError(f"{edge_layers=} must be <= n_layers={n}")
  if edge_layers and not isinstance(edge, CacheConfig):
    raise ValueError(f"{edge_layers=} needs edge= a CacheConfig, got "
                     f"{edge!r}")
  return tuple(edge if (i < edge_layers or i >= n - edge_layers) else base
               for i in range(n))
