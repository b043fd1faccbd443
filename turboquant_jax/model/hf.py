"""Loads Hugging Face checkpoints (Llama, Mistral, Qwen2) into the NNX model.

A directory holds `config.json` and the weights as `model.safetensors`, or
as shards listed in `model.safetensors.index.json`. `load_hf(path,
cache_dir)` converts them once and, given a cache directory, keeps the
converted parameters as an orbax checkpoint that later loads restore
directly (into `nnx.eval_shape` of the model, so nothing is initialized
twice). `from_hf_tensors` converts any mapping of HF-named arrays (the GGUF
loader's output, for instance).

Every problem with the input raises an error that names the file and the
field or tensor: a missing shard, a missing tensor, a shape that disagrees
with config.json, an unsupported architecture.
"""

import collections
from collections.abc import Iterator, Mapping
import hashlib
import json
import os
import pathlib
import re
import struct
from typing import Any

from flax import nnx
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from turboquant_jax import checkpoint
from turboquant_jax.model import config as config_lib
from turboquant_jax.model import transformer

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# Bump when the conversion changes, so stale orbax copies are not reused.
_FORMAT_VERSION = 1

# Tensors that may be present and are not needed (old rotary buffers).
_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")

_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")

# safetensors dtype -> numpy dtype (BF16 through ml_dtypes, which numpy and
# the safetensors numpy API lack).
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
           "BF16": ml_dtypes.bfloat16}

PathLike = str | os.PathLike[str]


def read_config(path: PathLike, *, dtype: str | None = None
                ) -> tuple[dict[str, Any], config_lib.ModelConfig]:
  """Parses `<path>/config.json` -> (the raw dict, its ModelConfig)."""
  file = pathlib.Path(path) / CONFIG_FILE
  if not file.is_file():
    raise FileNotFoundError(f"{file} not found: a Hugging Face model "
                            f"directory needs {CONFIG_FILE}")
  try:
    raw = json.loads(file.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{file}: not valid JSON ({e})") from e
  if not isinstance(raw, dict):
    raise ValueError(f"{file}: expected a JSON object")
  return raw, config_lib.ModelConfig.from_hf_config(raw, dtype=dtype,
                                                    source=str(file))


def _read_header(file: pathlib.Path) -> tuple[dict[str, Any], int]:
  """(tensor table, byte offset of the data) of a .safetensors file."""
  size = file.stat().st_size
  with open(file, "rb") as f:
    head = f.read(8)
    n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
    if n is None or 8 + n > size:
      raise ValueError(f"{file}: not a safetensors file (bad header)")
    try:
      table = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ValueError(f"{file}: not a safetensors file ({e})") from e
  table.pop("__metadata__", None)
  return table, 8 + n


class SafetensorsTensors(Mapping):
  """Lazy HF-name -> numpy array view of a directory's safetensors files.

  Uses `model.safetensors.index.json` when present, else `model.safetensors`,
  else every other `*.safetensors` file except Mistral's
  `consolidated*.safetensors` (a different naming scheme).
  """

  def __init__(self, path: PathLike):
    self.path = pathlib.Path(path)
    self._where: dict[str, pathlib.Path] = {}
    self._info: dict[str, tuple[dict[str, Any], int]] = {}
    self.files = self._files()
    for file in self.files:
      table, start = _read_header(file)
      for name, info in table.items():
        self._where[name] = file
        self._info[name] = (info, start)
    if self.index is not None:
      self._check_index()

  def _files(self) -> list[pathlib.Path]:
    index = self.path / INDEX_FILE
    self.index = None
    if index.is_file():
      try:
        self.index = json.loads(index.read_text())["weight_map"]
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{index}: expected a JSON object with a "
                         f"'weight_map' ({e!r})") from e
      by_file = collections.defaultdict(list)
      for name, shard in self.index.items():
        by_file[shard].append(name)
      for shard, names in by_file.items():
        if not (self.path / shard).is_file():
          raise FileNotFoundError(
              f"{index}: shard {shard!r} is missing from {self.path} (it "
              f"holds {len(names)} tensors, e.g. {names[0]!r})")
      return [self.path / shard for shard in sorted(by_file)]
    if (self.path / SINGLE_FILE).is_file():
      return [self.path / SINGLE_FILE]
    files = sorted(f for f in self.path.glob("*.safetensors")
                   if not f.name.startswith("consolidated"))
    if not files:
      raise FileNotFoundError(
          f"{self.path}: no {SINGLE_FILE}, {INDEX_FILE} or other "
          "*.safetensors file (pytorch_model.bin checkpoints are not "
          "supported; re-save with safe_serialization=True)")
    return files

  def _check_index(self) -> None:
    index = self.path / INDEX_FILE
    for name, shard in self.index.items():
      if self._where.get(name) != self.path / shard:
        raise ValueError(f"{index}: tensor {name!r} is listed in shard "
                         f"{shard!r}, which does not hold it")

  def where(self, name: str) -> str:
    """The file holding `name` (or the index / directory, for errors)."""
    if name in self._where:
      return str(self._where[name])
    if self.index is not None:
      return str(self.path / INDEX_FILE)
    return ", ".join(str(f) for f in self.files)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._info[name][0]["shape"])

  def __getitem__(self, name: str) -> np.ndarray:
    file = self._where[name]
    info, start = self._info[name]
    kind = info["dtype"]
    if kind not in _DTYPES:
      raise ValueError(f"{file}: tensor {name!r} has dtype {kind}; supported: "
                       f"{sorted(_DTYPES)}")
    if kind != "BF16":
      # Imported here: the model package must import where safetensors is
      # not installed (the accelerator image).
      import safetensors  # pylint: disable=g-import-not-at-top
      with safetensors.safe_open(file, framework="np") as f:
        return f.get_tensor(name)
    begin, end = info["data_offsets"]
    raw = np.memmap(file, dtype=np.uint8, mode="r", offset=start + begin,
                    shape=(end - begin,))
    return raw.view(ml_dtypes.bfloat16).reshape(info["shape"])

  def __iter__(self) -> Iterator[str]:
    return iter(self._where)

  def __len__(self) -> int:
    return len(self._where)


def hf_tensor_shapes(config: config_lib.ModelConfig
                     ) -> dict[str, tuple[tuple[int, ...], str]]:
  """HF tensor name -> (expected shape, the config.json fields behind it)."""
  c = config
  d, v, f = c.d_model, c.vocab_size, c.ffn_dim
  qd, kd = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
  q_why = "num_attention_heads*head_dim"
  kv_why = "num_key_value_heads*head_dim"
  out = {"model.embed_tokens.weight": ((v, d), "(vocab_size, hidden_size)")}
  for i in range(c.n_layers):
    p = f"model.layers.{i}."
    out[p + "input_layernorm.weight"] = ((d,), "(hidden_size,)")
    out[p + "post_attention_layernorm.weight"] = ((d,), "(hidden_size,)")
    a = p + "self_attn."
    out[a + "q_proj.weight"] = ((qd, d), f"({q_why}, hidden_size)")
    out[a + "k_proj.weight"] = ((kd, d), f"({kv_why}, hidden_size)")
    out[a + "v_proj.weight"] = ((kd, d), f"({kv_why}, hidden_size)")
    out[a + "o_proj.weight"] = ((d, qd), f"(hidden_size, {q_why})")
    if c.attn_bias:
      out[a + "q_proj.bias"] = ((qd,), f"({q_why},)")
      out[a + "k_proj.bias"] = ((kd,), f"({kv_why},)")
      out[a + "v_proj.bias"] = ((kd,), f"({kv_why},)")
    if c.out_bias:
      out[a + "o_proj.bias"] = ((d,), "(hidden_size,)")
    m = p + "mlp."
    out[m + "gate_proj.weight"] = ((f, d), "(intermediate_size, hidden_size)")
    out[m + "up_proj.weight"] = ((f, d), "(intermediate_size, hidden_size)")
    out[m + "down_proj.weight"] = ((d, f), "(hidden_size, intermediate_size)")
  out["model.norm.weight"] = ((d,), "(hidden_size,)")
  if not c.tie_embeddings:
    out["lm_head.weight"] = ((v, d), "(vocab_size, hidden_size)")
  return out


def _target(name: str) -> tuple[tuple[Any, ...], bool]:
  """HF name -> (path in the model's pure state dict, transpose?)."""
  if name == "model.embed_tokens.weight":
    return ("embed", "embedding"), False
  if name == "model.norm.weight":
    return ("norm", "scale"), False
  if name == "lm_head.weight":
    return ("lm_head", "kernel"), True
  i, rest = _LAYER.fullmatch(name).groups()
  block = ("blocks", int(i))
  if rest == "input_layernorm.weight":
    return block + ("input_norm", "scale"), False
  if rest == "post_attention_layernorm.weight":
    return block + ("post_attn_norm", "scale"), False
  module, proj, kind = rest.split(".")
  module = "attn" if module == "self_attn" else "mlp"
  if kind == "weight":
    return block + (module, proj, "kernel"), True
  return block + (module, proj, "bias"), False


def _unexpected(name: str, config: config_lib.ModelConfig) -> str | None:
  """Why a tensor not in hf_tensor_shapes disagrees with the config."""
  if _IGNORED.fullmatch(name):
    return None
  if name == "lm_head.weight" and config.tie_embeddings:
    return None  # Tied: the embedding is the head (as in transformers).
  m = _LAYER.fullmatch(name)
  if m and int(m[1]) >= config.n_layers:
    return f"num_hidden_layers={config.n_layers}"
  if name.endswith("o_proj.bias"):
    return f"attention_bias={config.out_bias}"
  if name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
    return "attention_bias=false"
  if name.startswith("model.") or name.startswith("lm_head"):
    return "the architecture (an unknown tensor)"
  return None


def from_hf_tensors(config: config_lib.ModelConfig,
                    tensors: Mapping[str, Any], *,
                    source: str = "the checkpoint"
                    ) -> transformer.Transformer:
  """Builds the model from HF-named tensors ([out, in] layouts).

  Args:
    config: the ModelConfig (e.g. ModelConfig.from_hf_config).
    tensors: HF name -> numpy-compatible array; a SafetensorsTensors or a
      plain dict. Arrays are cast to config.dtype.
    source: the file named in errors when `tensors` has no `where` method
      (as SafetensorsTensors has).

  Returns:
    A Transformer holding the converted parameters.

  Raises:
    ValueError: a tensor is missing, has the wrong shape, or is present but
      unexpected under config (more layers, biases); the message names the
      file, the tensor and the config.json field.
  """
  where = getattr(tensors, "where", lambda _: source)
  expected = hf_tensor_shapes(config)
  for name in tensors:
    if name not in expected and (why := _unexpected(name, config)):
      raise ValueError(f"{where(name)}: unexpected tensor {name!r}: "
                       f"config.json says {why}")
  abstract = nnx.eval_shape(
      lambda: transformer.Transformer(config, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  dtype = jnp.dtype(config.dtype)
  pure: dict[Any, Any] = {}
  for name, (shape, why) in expected.items():
    if name not in tensors:
      hint = (" (config.json tie_word_embeddings=false)"
              if name == "lm_head.weight" else "")
      raise ValueError(f"{where(name)}: missing tensor {name!r}{hint}")
    got = tuple(getattr(tensors, "shape", lambda n: None)(name)
                or np.shape(tensors[name]))
    if got != shape:
      raise ValueError(f"{where(name)}: tensor {name!r} has shape {got}, "
                       f"expected {shape} = {why} from config.json")
    arr = np.asarray(tensors[name])
    path, transpose = _target(name)
    node = pure
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = jnp.asarray(arr.T if transpose else arr, dtype)
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graphdef, state)


def _fingerprint(path: pathlib.Path, files: list[pathlib.Path],
                 config: config_lib.ModelConfig) -> str:
  h = hashlib.sha256(f"v{_FORMAT_VERSION} {config!r}".encode())
  for name in (CONFIG_FILE, INDEX_FILE):
    if (path / name).is_file():
      h.update((path / name).read_bytes())
  for f in files:
    st = f.stat()
    h.update(f"{f.name} {st.st_size} {st.st_mtime_ns}".encode())
  return h.hexdigest()[:16]


def _checkpoint_dir(path: pathlib.Path, cache_dir: PathLike,
                    tensors: SafetensorsTensors,
                    config: config_lib.ModelConfig) -> pathlib.Path:
  key = _fingerprint(path, tensors.files, config)
  return (pathlib.Path(cache_dir).expanduser().resolve()
          / f"{path.resolve().name}-{config.dtype}-{key}")


def load_hf(path: PathLike, cache_dir: PathLike | None = None, *,
            dtype: str | None = None) -> transformer.Transformer:
  """Loads a Hugging Face Llama / Mistral / Qwen2 directory.

  Args:
    path: a directory with config.json and safetensors weights (one file, or
      shards with model.safetensors.index.json).
    cache_dir: where to keep the converted parameters as an orbax checkpoint
      (one subdirectory per model, keyed by the files' names, sizes, mtimes,
      config and dtype); a later load restores it instead of converting.
      None: no copy is kept.
    dtype: "float32" or "bfloat16"; None follows config.json's torch_dtype
      (bfloat16 for bfloat16/float16 checkpoints, else float32).

  Returns:
    The Transformer (its ModelConfig is model.config).
  """
  path = pathlib.Path(path).expanduser()
  if not path.is_dir():
    raise FileNotFoundError(f"{path} is not a directory")
  _, config = read_config(path, dtype=dtype)
  tensors = SafetensorsTensors(path)
  ckpt = None
  if cache_dir is not None:
    ckpt = _checkpoint_dir(path, cache_dir, tensors, config)
    if ckpt.is_dir():
      abstract = nnx.eval_shape(
          lambda: transformer.Transformer(config, rngs=nnx.Rngs(0)))
      graphdef, abstract_state = nnx.split(abstract)
      return nnx.merge(graphdef, checkpoint.restore(ckpt, abstract_state))
  model = from_hf_tensors(config, tensors)
  if ckpt is not None:
    checkpoint.save(ckpt, nnx.state(model))
  return model


def is_cached(path: PathLike, cache_dir: PathLike, *,
              dtype: str | None = None) -> bool:
  """Whether load_hf(path, cache_dir, dtype=dtype) would restore from orbax."""
  path = pathlib.Path(path).expanduser()
  _, config = read_config(path, dtype=dtype)
  return _checkpoint_dir(path, cache_dir, SafetensorsTensors(path),
                         config).is_dir()

