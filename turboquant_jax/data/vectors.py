"""Vector sets for nearest-neighbour search, in their standard forms.

- `load_ann_hdf5`: an ann-benchmarks HDF5 file (datasets `train` [N, D],
  `test` [Q, D], `neighbors` i32[Q, K], optionally `distances` [Q, K]; the
  file attribute `distance` names the metric: "angular", "euclidean",
  "dot"/"ip"). E.g. glove-200-angular.hdf5, the paper's GloVe d=200.
- `load_parquet_embeddings`: one list-of-float column of one or more
  parquet files (e.g. the paper's OpenAI DBpedia embeddings, d=1536/3072,
  column "text-embedding-3-large-1536-embedding").
- `smollm2_token_embeddings`: SmolLM2-135M's token-embedding matrix
  (49,152 x 576, dequantized from its Q8_0 GGUF tensor).
- `smollm2_attention_vectors`: real keys and queries of one SmolLM2 layer on
  an Austen novel (RoPE applied, as attention sees them), computed with the
  model code (`turboquant_jax.model`) and cached as .npy files.
- `split_base_queries`: disjoint random base and held-out query rows.

The SmolLM2 arrays are derived from the cached GGUF file (set up once with
`python -m turboquant_jax.data.fetch`) and kept in the data cache under
`smollm2/vectors/`, so they are computed once.
"""

import dataclasses
import glob
import os
import pathlib

import numpy as np

from turboquant_jax.data import cache

# ann-benchmarks `distance` attribute -> our metric ("ip" on the stored
# vectors, "angular" = ip on unit-normalized vectors, "l2").
_ANN_METRICS = {"angular": "angular", "cosine": "angular",
                "euclidean": "l2", "l2": "l2", "dot": "ip", "ip": "ip",
                "inner_product": "ip"}
EMBEDDING_TENSOR = "model.embed_tokens.weight"


@dataclasses.dataclass(frozen=True)
class AnnDataset:
  """An ann-benchmarks data set.

  Attributes:
    train: f32[N, D] base vectors.
    test: f32[Q, D] queries.
    neighbors: i32[Q, K] true nearest base rows per query, best first
      (by `metric`), or None if the file has none.
    distances: f32[Q, K] their distances, or None.
    metric: "angular", "l2" or "ip".
  """
  train: np.ndarray
  test: np.ndarray
  neighbors: np.ndarray | None
  distances: np.ndarray | None
  metric: str

  @property
  def dim(self) -> int:
    return self.train.shape[1]


def _check_matrix(name: str, arr: np.ndarray, dim: int | None = None
                  ) -> np.ndarray:
  arr = np.asarray(arr)
  if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.number):
    raise ValueError(f"{name}: expected a numeric [rows, dim] matrix, got "
                     f"{arr.dtype}{list(arr.shape)}")
  if dim is not None and arr.shape[1] != dim:
    raise ValueError(f"{name}: dim {arr.shape[1]} differs from the base "
                     f"vectors' {dim}")
  return arr.astype(np.float32, copy=False)


def load_ann_hdf5(path: str | os.PathLike, metric: str | None = None
                  ) -> AnnDataset:
  """Reads an ann-benchmarks HDF5 file.

  Args:
    path: the .hdf5 file.
    metric: overrides the file's `distance` attribute ("angular", "l2",
      "ip", or an ann-benchmarks name such as "euclidean").

  Raises:
    FileNotFoundError: no such file.
    ValueError: a dataset is missing or misshapen, or the metric is unknown.
  """
  import h5py   # pylint: disable=g-import-not-at-top
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such ann-benchmarks HDF5 file")
  with h5py.File(path, "r") as f:
    for name in ("train", "test"):
      if name not in f:
        raise ValueError(f"{path}: no '{name}' dataset (found "
                         f"{sorted(f.keys())}); not an ann-benchmarks file?")
    name = metric or f.attrs.get("distance")
    if isinstance(name, bytes):
      name = name.decode()
    if name is None:
      raise ValueError(f"{path} has no 'distance' attribute; pass metric=")
    if str(name).lower() not in _ANN_METRICS:
      raise ValueError(f"{path}: metric {name!r} must be one of "
                       f"{sorted(_ANN_METRICS)}")
    train = _check_matrix(f"{path}:train", f["train"][()])
    test = _check_matrix(f"{path}:test", f["test"][()], train.shape[1])
    neighbors = distances = None
    if "neighbors" in f:
      neighbors = np.asarray(f["neighbors"][()])
      if (neighbors.ndim != 2 or neighbors.shape[0] != test.shape[0]
          or not np.issubdtype(neighbors.dtype, np.integer)):
        raise ValueError(f"{path}:neighbors: expected int[{test.shape[0]}, "
                         f"K], got {neighbors.dtype}{list(neighbors.shape)}")
      if neighbors.size and (neighbors.min() < 0
                             or neighbors.max() >= train.shape[0]):
        raise ValueError(f"{path}:neighbors holds ids outside [0, "
                         f"{train.shape[0]})")
      neighbors = neighbors.astype(np.int32)
    if "distances" in f:
      distances = np.asarray(f["distances"][()], np.float32)
  return AnnDataset(train=train, test=test, neighbors=neighbors,
                    distances=distances,
                    metric=_ANN_METRICS[str(name).lower()])


def _parquet_files(path: str | os.PathLike) -> list[pathlib.Path]:
  path = pathlib.Path(path)
  if path.is_dir():
    files = sorted(path.glob("*.parquet"))
  elif any(c in str(path) for c in "*?["):
    files = sorted(pathlib.Path(p) for p in glob.glob(str(path)))
  else:
    files = [path] if path.is_file() else []
  if not files:
    raise FileNotFoundError(f"{path}: no parquet file(s) found")
  return files


def _is_float_list(field_type) -> bool:
  import pyarrow as pa   # pylint: disable=g-import-not-at-top
  t = field_type
  if not (pa.types.is_list(t) or pa.types.is_large_list(t)
          or pa.types.is_fixed_size_list(t)):
    return False
  return pa.types.is_floating(t.value_type)


def load_parquet_embeddings(path: str | os.PathLike,
                            column: str | None = None,
                            limit: int | None = None) -> np.ndarray:
  """One embedding column of parquet file(s) as f32[N, D].

  Args:
    path: a .parquet file, a directory of them (read in name order) or a
      glob pattern.
    column: the list-of-float column; None picks the only such column.
    limit: read at most this many rows (in file order).

  Raises:
    FileNotFoundError: nothing matches `path`.
    ValueError: the column is missing, not a list of floats, ambiguous, or
      its rows differ in length or hold nulls.
  """
  import pyarrow as pa   # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq   # pylint: disable=g-import-not-at-top
  if limit is not None and limit < 1:
    raise ValueError(f"{limit=} must be a positive number of rows or None")
  files = _parquet_files(path)
  schema = pq.read_schema(files[0])
  if column is None:
    candidates = [f.name for f in schema if _is_float_list(f.type)]
    if len(candidates) != 1:
      raise ValueError(f"{files[0]}: cannot pick the embedding column: "
                       f"list-of-float columns {candidates}; pass column=")
    column = candidates[0]
  if column not in schema.names:
    raise ValueError(f"{files[0]}: no column {column!r}; columns are "
                     f"{schema.names}")
  if not _is_float_list(schema.field(column).type):
    raise ValueError(f"{files[0]}: column {column!r} has type "
                     f"{schema.field(column).type}, expected a list of "
                     "floats")
  parts, rows, dim = [], 0, None
  for file in files:
    table = pq.read_table(file, columns=[column])
    chunked = table.column(column)
    for chunk in chunked.chunks:
      if chunk.null_count:
        raise ValueError(f"{file}: column {column!r} holds "
                         f"{chunk.null_count} null rows")
      if pa.types.is_fixed_size_list(chunk.type):
        width = chunk.type.list_size
      else:
        lengths = np.asarray(chunk.value_lengths())
        if lengths.size and lengths.min() != lengths.max():
          raise ValueError(f"{file}: column {column!r} has rows of lengths "
                           f"{lengths.min()}..{lengths.max()}; embeddings "
                           "must share one dimension")
        width = int(lengths[0]) if lengths.size else 0
      if dim is None:
        dim = width
      elif width != dim and len(chunk):
        raise ValueError(f"{file}: column {column!r} has dim {width}, "
                         f"earlier rows {dim}")
      values = np.asarray(chunk.flatten().to_numpy(zero_copy_only=False),
                          np.float32)
      parts.append(values.reshape(len(chunk), dim))
      rows += len(chunk)
      if limit is not None and rows >= limit:
        break
    if limit is not None and rows >= limit:
      break
  out = np.concatenate(parts) if parts else np.zeros((0, dim or 0),
                                                     np.float32)
  if limit is not None:
    out = out[:limit]
  if not np.all(np.isfinite(out)):
    raise ValueError(f"{path}: column {column!r} holds non-finite values")
  return out


def split_base_queries(x: np.ndarray, n_base: int, n_queries: int,
                       seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Disjoint random base and query rows of x (one permutation).

  Returns:
    (base f32[n_base, D], queries f32[n_queries, D]), rows in original order.
  """
  x = np.asarray(x)
  if x.ndim != 2:
    raise ValueError(f"x.shape={x.shape}: expected [rows, dim]")
  if n_base < 1 or n_queries < 1 or n_base + n_queries > x.shape[0]:
    raise ValueError(f"{n_base=} + {n_queries=} must be positive and at most "
                     f"the {x.shape[0]} rows")
  perm = np.random.default_rng(seed).permutation(x.shape[0])
  base = x[np.sort(perm[:n_base])].astype(np.float32)
  queries = x[np.sort(perm[n_base:n_base + n_queries])].astype(np.float32)
  return base, queries


def unique_rows(x: np.ndarray) -> np.ndarray:
  """x without repeated rows (first occurrences, original order).

  Repeated base vectors make "the" nearest neighbour ambiguous.
  """
  _, first = np.unique(np.ascontiguousarray(x), axis=0, return_index=True)
  return x[np.sort(first)]


# ------------------------------------------------------------ SmolLM2


def _vectors_dir() -> pathlib.Path:
  return cache.cache_dir() / "smollm2" / "vectors"


def _save_atomic(path: pathlib.Path, arr: np.ndarray) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  with open(tmp, "wb") as f:
    np.save(f, arr)
  os.replace(tmp, path)


def smollm2_token_embeddings() -> np.ndarray:
  """SmolLM2-135M's token embeddings f32[49152, 576] (dequantized Q8_0).

  Computed from the cached GGUF on first use, then read from the cache.
  """
  path = _vectors_dir() / "token_embeddings.npy"
  if path.is_file():
    return np.load(path)
  # pylint: disable-next=g-import-not-at-top
  from turboquant_jax.data import smollm2
  emb = np.asarray(smollm2.load_smollm2().weights[EMBEDDING_TENSOR],
                   np.float32)
  _save_atomic(path, emb)
  return emb


def attention_vectors(model, tokens: np.ndarray, layer: int,
                      batch: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """Keys and queries of one layer, as attention sees them (RoPE applied).

  Args:
    model: a `turboquant_jax.model.Transformer`.
    tokens: i32[S, L] sequences, each at positions 0..L-1.
    layer: which block (0-based).
    batch: sequences per forward call.

  Returns:
    (keys f32[S, L, K, H], queries f32[S, L, N, H]), K KV heads, N query
    heads, H head dim.
  """
  import jax   # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp   # pylint: disable=g-import-not-at-top
  n_layers = model.config.n_layers
  if not 0 <= layer < n_layers:
    raise ValueError(f"{layer=} must be in [0, {n_layers})")
  tokens = np.asarray(tokens)
  if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
    raise ValueError(f"tokens must be an integer [sequences, length] array, "
                     f"got {tokens.dtype}{list(tokens.shape)}")

  @jax.jit
  def qk(m, t):
    positions = jnp.broadcast_to(jnp.arange(t.shape[1], dtype=jnp.int32),
                                 t.shape)
    x = m.embed(t)
    for block in m.blocks[:layer]:
      x = block.forward_no_cache(x, positions)
    target = m.blocks[layer]
    # pylint: disable-next=protected-access
    q, k, _ = target.attn._qkv(target.input_norm(x), positions)
    return k.astype(jnp.float32), q.astype(jnp.float32)

  keys, queries = [], []
  for start in range(0, tokens.shape[0], batch):
    k, q = qk(model, jnp.asarray(tokens[start:start + batch], jnp.int32))
    keys.append(np.asarray(k))
    queries.append(np.asarray(q))
  return np.concatenate(keys), np.concatenate(queries)


def smollm2_attention_vectors(text: str, layer: int, num_tokens: int,
                              sequence_length: int = 2048
                              ) -> tuple[np.ndarray, np.ndarray]:
  """Real keys and queries of SmolLM2-135M layer `layer` on an Austen novel.

  The novel's first num_tokens tokens (no BOS) are cut into consecutive
  sequences of sequence_length, each run from position 0, as in a KV cache.
  Cached under the data cache, so the forward passes run once.

  Args:
    text: a book name of `turboquant_jax.data.austen.BOOKS`, e.g. "emma".
    layer: 0..29.
    num_tokens: a multiple of sequence_length.
    sequence_length: tokens per sequence (<= 8192, the model's context).

  Returns:
    (keys f32[T, 3, 64], queries f32[T, 9, 64]): per token, the 3 KV heads'
    keys and the 9 query heads' queries (query head h reads KV head h // 3).
  """
  if sequence_length < 1 or num_tokens < 1 or num_tokens % sequence_length:
    raise ValueError(f"{num_tokens=} must be a positive multiple of "
                     f"{sequence_length=}")
  tag = f"{text}_L{layer}_T{num_tokens}_S{sequence_length}"
  kpath = _vectors_dir() / f"keys_{tag}.npy"
  qpath = _vectors_dir() / f"queries_{tag}.npy"
  if kpath.is_file() and qpath.is_file():
    return np.load(kpath), np.load(qpath)
  # pylint: disable=g-import-not-at-top
  from turboquant_jax import model as model_lib
  from turboquant_jax.data import austen
  from turboquant_jax.data import smollm2
  # pylint: enable=g-import-not-at-top
  gguf_model = smollm2.load_smollm2()
  mc = model_lib.ModelConfig.from_hf_config(gguf_model.hf_config,
                                            dtype="float32")
  if sequence_length > mc.max_seq_len:
    raise ValueError(f"{sequence_length=} exceeds the model's "
                     f"{mc.max_seq_len}")
  model = model_lib.from_hf_tensors(mc, gguf_model.weights)
  ids = gguf_model.tokenizer.encode(austen.load_book(text)).ids
  if len(ids) < num_tokens:
    raise ValueError(f"{text!r} has {len(ids)} tokens, fewer than "
                     f"{num_tokens=}")
  tokens = np.asarray(ids[:num_tokens], np.int32).reshape(-1, sequence_length)
  keys, queries = attention_vectors(model, tokens, layer)
  keys = keys.reshape(num_tokens, *keys.shape[2:])
  queries = queries.reshape(num_tokens, *queries.shape[2:])
  _save_atomic(kpath, keys)
  _save_atomic(qpath, queries)
  return keys, queries
