"""Configuration of a compressed KV cache (a frozen, validated dataclass)."""

import dataclasses
import math

_KINDS = ("full", "turboquant", "kivi", "snapkv")
APPEND_IMPLS = ("auto", "pallas_gpu", "fused", "xla")


def _check_bits(name: str, bits: float) -> None:
  if isinstance(bits, bool) or not isinstance(bits, (int, float)):
    raise ValueError(f"{name}={bits!r} must be a number in [1, 8]")
  if not (math.isfinite(bits) and 1 <= bits <= 8):
    raise ValueError(f"{name}={bits!r} must be in [1, 8]")


def _check_snapkv(c) -> None:
  """The snapkv fields: validated for every kind, used by snapkv only."""
  if (isinstance(c.budget, bool) or not isinstance(c.budget, (int, float))
      or not (math.isfinite(c.budget) and 0 < c.budget <= 1)):
    raise ValueError(f"budget={c.budget!r} must be a number in (0, 1]")
  if c.budget != 1 and c.kind != "snapkv":
    raise ValueError(f"budget={c.budget} needs kind='snapkv', got "
                     f"kind={c.kind!r}")
  if c.pool not in ("max", "avg"):
    raise ValueError(f"pool={c.pool!r} must be 'max' or 'avg'")
  if (isinstance(c.pool_kernel, bool) or not isinstance(c.pool_kernel, int)
      or c.pool_kernel < 1 or c.pool_kernel % 2 == 0):
    raise ValueError(f"pool_kernel={c.pool_kernel!r} must be an odd integer "
                     ">= 1")
  if c.kind == "snapkv" and (not isinstance(c.window, int) or c.window < 1):
    raise ValueError(f"window={c.window!r}: kind='snapkv' needs an "
                     "observation window >= 1")


def _check_grid(config) -> None:
  if not isinstance(config.grid_centroids, bool):
    raise ValueError(f"grid_centroids={config.grid_centroids!r} must be a "
                     "bool")
  if not config.grid_centroids:
    return
  if config.kind != "turboquant":
    raise ValueError(f"grid_centroids=True needs kind='turboquant', got "
                     f"kind={config.kind!r}")
  stages = {"key_bits": math.ceil(config.key_bits)
                        - (config.key_method == "prod"),
            "value_bits": math.ceil(config.value_bits)}
  for name, bits in stages.items():
    if bits > 6:
      raise ValueError(f"grid_centroids=True holds codebooks of at most 6 "
                       f"bits; {name}={getattr(config, name)} needs {bits}")


@dataclasses.dataclass(frozen=True)
class CacheConfig:
  """What a KV cache stores and how.

  Attributes:
    kind: "full" (bf16/f32, no compression), "turboquant", "kivi" or
      "snapkv" (token eviction: keeps a `budget` fraction of each prompt,
      full precision; cache/snapkv_cache.py).
    key_bits, value_bits: bits per coordinate; integers 1..8, or fractional
      (2.5, 3.5, ...) through the outlier split (turboquant only).
    key_method: "mse" (default) or "prod" (QJL-corrected, unbiased scores).
    norm_correction: rescale dequantized vectors to their stored norm.
    window: most recent tokens also kept in full precision (0: every token,
      generated ones too, is read quantized, as in the paper). For snapkv:
      the observation window, the last prompt tokens whose queries vote
      for the kept tokens (always kept themselves; >= 1).
    norm_dtype: dtype of stored norms with norm_bits=16 ("float16" as in
      the paper).
    norm_bits: (turboquant only) 16: every per-vector norm (the scale, and
      the QJL residual norm of prod keys) is stored in norm_dtype; 8: as a
      uint8 code uniform in log(norm) over a per-(sequence, KV head, norm
      field) range fixed by the first write to the sequence (prefill, or an
      append into an empty sequence), widened by a margin; see
      turboquant_cache. At head dim 64 this halves the norms' 0.25
      bits/coordinate per tensor.
    key_norm_bits, value_norm_bits: (turboquant only) 8 or 16 for the keys'
      or the values' norms alone; None (default): norm_bits.
    sink: (turboquant only) the first `sink` tokens of each sequence are
      also kept in full precision (dtype) and attention reads them from
      there, as StreamingLLM's attention sinks; online (they are the first
      tokens written). Kernels do not read them: impl=None falls back to
      "xla" for such a cache.
    rotation: "haar" or "hadamard".
    group_size: KIVI's quantization group (tokens for keys, channels for
      values).
    dtype: storage dtype of full-precision tensors (full cache, window).
    center_keys: (turboquant only) subtract a per-(sequence, KV head) mean
      of the prefill keys from every key before it is stored (codes and
      window alike); the mean is stored in the cache (dtype) and counted.
      Attention is unchanged, since softmax ignores the per-query constant
      q·mean, but the quantized vectors are smaller. Without a prefill the
      mean stays zero.
    center_skip: (center_keys only) the first `center_skip` tokens of each
      prefill are left out of the key mean (they are still centered and
      stored): the first token is usually an attention sink whose key is
      unlike the others. With a prefill of at most center_skip tokens the
      mean stays zero.
    budget: (snapkv only) fraction of each prompt's tokens kept, in (0, 1]
      (the observation window included; at least `window` tokens).
    pool, pool_kernel: (snapkv only) "max" or "avg" pooling of the votes
      along the tokens, over an odd width.
    append_impl: (turboquant only) how a decode step's token is written:
      "pallas_gpu": one fused Mosaic GPU kernel (kernels/quantize_append)
      on a GPU where it supports the cache (one token, head dim a multiple
      of 64, integer bits up to 4 or the outlier split of such parts, mse,
      16/32-bit norms, no window or sink); every other append, and every
      append off a GPU, is left to XLA. "xla": always XLA. "fused": in a
      model's decode step (one token, attention impl None or "pallas_gpu",
      on a GPU) the attention kernel itself quantizes and writes the token
      (kernels.decode_attention.append_attention: one Mosaic GPU launch a
      layer instead of two);
      every other append as "pallas_gpu". "auto" (the default): "fused"
      for batch · KV heads up to decode_attention.FUSED_MAX_SEQUENCE_HEADS
      where each attention program streams at most FUSED_MAX_TILES tiles
      (decode_attention.fuses_append), else "pallas_gpu" (on the H200 the
      one launch was faster for few sequence-heads over short programs,
      slower for long ones: Llama-3.1-8B-shaped at B = 8, 32k, 13.3
      against 11.8 ms a step).
    grid_centroids: (turboquant only) every codebook is rounded to a
      uniform grid of 127 levels (quant.codebook.grid_codebook): +0.24%
      distortion at 4 bits, +0.03-0.04% at 3, none at 2; the GPU kernel
      then looks 3- and 4-bit codes up with fewer byte permutes (at 4
      bits 8 instructions a 4 codes instead of 12;
      kernels/decode_attention/README.md has the times). Codebook stages
      of at most 6 bits.
  """
  kind: str = "turboquant"
  key_bits: float = 4
  value_bits: float = 4
  key_method: str = "mse"
  norm_correction: bool = True
  window: int = 0
  norm_dtype: str = "float16"
  rotation: str = "haar"
  group_size: int = 32
  dtype: str = "bfloat16"
  center_keys: bool = False
  budget: float = 1.0
  pool: str = "max"
  pool_kernel: int = 7
  center_skip: int = 0
  norm_bits: int = 16
  key_norm_bits: int | None = None
  value_norm_bits: int | None = None
  sink: int = 0
  append_impl: str = "auto"
  grid_centroids: bool = False

  def __post_init__(self):
    if self.kind not in _KINDS:
      raise ValueError(f"kind={self.kind!r} must be one of {_KINDS}")
    _check_bits("key_bits", self.key_bits)
    _check_bits("value_bits", self.value_bits)
    _check_snapkv(self)
    if self.kind == "kivi":
      for name in ("key_bits", "value_bits"):
        if not float(getattr(self, name)).is_integer():
          raise ValueError(f"{name}={getattr(self, name)} must be an integer "
                           "for kind='kivi'")
    if self.key_method not in ("mse", "prod"):
      raise ValueError(f"key_method={self.key_method!r} must be 'mse' or "
                       "'prod'")
    if self.key_method == "prod" and self.key_bits < 2:
      raise ValueError(f"key_method='prod' needs key_bits >= 2, got "
                       f"{self.key_bits}")
    if not isinstance(self.window, int) or self.window < 0:
      raise ValueError(f"window={self.window!r} must be an integer >= 0")
    if not isinstance(self.group_size, int) or self.group_size < 1:
      raise ValueError(f"group_size={self.group_size!r} must be >= 1")
    if not isinstance(self.center_keys, bool):
      raise ValueError(f"center_keys={self.center_keys!r} must be a bool")
    if self.center_keys and self.kind != "turboquant":
      raise ValueError(f"center_keys=True needs kind='turboquant', got "
                       f"kind={self.kind!r}")
    if (isinstance(self.center_skip, bool)
        or not isinstance(self.center_skip, int) or self.center_skip < 0):
      raise ValueError(f"center_skip={self.center_skip!r} must be an integer "
                       ">= 0")
    for name in ("norm_bits", "key_norm_bits", "value_norm_bits"):
      bits = getattr(self, name)
      if bits is None and name != "norm_bits":
        continue
      if (isinstance(bits, bool) or not isinstance(bits, int)
          or bits not in (8, 16)):
        raise ValueError(f"{name}={bits!r} must be 8 or 16")
      if bits == 8 and self.kind != "turboquant":
        raise ValueError(f"{name}=8 needs kind='turboquant', got "
                         f"kind={self.kind!r}")
      if bits == 8 and self.norm_dtype != "float16":
        raise ValueError(f"norm_dtype={self.norm_dtype!r} applies to 16-bit "
                         f"norms only; leave it at 'float16' with {name}=8")
    if (isinstance(self.sink, bool) or not isinstance(self.sink, int)
        or self.sink < 0):
      raise ValueError(f"sink={self.sink!r} must be an integer >= 0")
    if self.sink and self.kind != "turboquant":
      raise ValueError(f"sink={self.sink} needs kind='turboquant', got "
                       f"kind={self.kind!r}")
    if self.append_impl not in APPEND_IMPLS:
      raise ValueError(f"append_impl={self.append_impl!r} must be one of "
                       f"{APPEND_IMPLS}")
    if self.center_skip and not self.center_keys:
      raise ValueError(f"center_skip={self.center_skip} needs "
                       "center_keys=True")
    _check_grid(self)

  def norm_bits_of(self, tensor: str) -> int:
    """8 or 16: the norm bits of "keys" or "values"."""
    if tensor not in ("keys", "values"):
      raise ValueError(f"tensor={tensor!r} must be 'keys' or 'values'")
    bits = self.key_norm_bits if tensor == "keys" else self.value_norm_bits
    return self.norm_bits if bits is None else bits
