"""Mesh and partition specs for the Transformer and its KV caches.

A 2-D mesh with axes "data" and "model":

    mesh = sharding.make_mesh(data=2, model=4)
    model = sharding.shard_model(model, mesh)
    caches = sharding.shard_caches(model.init_caches(...), mesh)
    tokens = sharding.shard_batch(tokens, mesh)
    logits, caches = forward_prefill(model, tokens, caches, lengths)

Then jit (GSPMD, `AxisType.Auto` axes) partitions the computation from the
inputs' shardings; the results equal the unsharded ones up to float
reassociation (tests/sharding_test.py, on 8 virtual CPU devices).

Parameters (Megatron-style tensor parallelism over "model"; nnx.Linear
kernels are [in, out]):
- q_proj [D, N·H] and its bias: output over "model" (whole query heads, so
  n_heads must divide by the model axis); k_proj, v_proj [D, K·H]: whole KV
  heads over "model" (n_kv_heads must divide); o_proj [N·H, D]: input over
  "model" (its bias replicated).
- MLP: gate_proj, up_proj [D, F] output over "model", down_proj [F, D]
  input over "model" (ffn_dim must divide).
- Embedding [V, D] and lm_head [D, V]: the vocabulary over "model" (the
  logits come out vocabulary-sharded), when vocab_size divides; with tied
  embeddings the one table serves both.
- RMSNorm scales: replicated.
A dimension that the model axis does not divide is replicated instead (e.g.
GQA with fewer KV heads than model shards replicates k_proj, v_proj and the
cache's head axis, as Megatron does); `param_specs` shows what was chosen.

Caches (every kind: full, turboquant, kivi). Leaves laid out [B, K, ...]
(codes, norms, QJL signs, KIVI mins/scales, full-precision windows and
rings) go batch over "data" and KV heads over "model"; `lengths` i32[B] over
"data". Quantizers: a shared quantizer (integer bits: one rotation, one
codebook for all heads) is replicated, as are the rotations' kernel tiles
(`rotation_tiles`, also where they hold the D = 64 split's folded
rotations per head: 8 KB a head and tensor); the per-head split quantizers of
fractional bits (leaves stacked on a leading K axis) and their folded
rotations (`key_split_rotation`, [K, D, D]) go over "model". The
batch must divide by the data axis (else it is replicated too).

The GPU kernels (pallas_gpu decode attention, the fused append) are custom
calls that declare no partitioning: under a mesh of several GPUs GSPMD has
to replicate their operands (not tried here: the lent machine has one GPU).
There, choose the XLA paths (`decode_attention(..., impl="xla")`,
`CacheConfig(append_impl="xla")`); the tests here run those (on CPU
devices).
"""

from collections.abc import Sequence
import dataclasses

from flax import nnx
import jax
import numpy as np

DATA = "data"
MODEL = "model"
P = jax.sharding.PartitionSpec

# (module name, parameter name) -> (which dim is split, what divides it).
# "heads", "kv_heads", "ffn", "vocab" name the ModelConfig size that must
# divide by the model axis.
_PARAM_RULES = {
    ("q_proj", "kernel"): (1, "heads"),
    ("q_proj", "bias"): (0, "heads"),
    ("k_proj", "kernel"): (1, "kv_heads"),
    ("k_proj", "bias"): (0, "kv_heads"),
    ("v_proj", "kernel"): (1, "kv_heads"),
    ("v_proj", "bias"): (0, "kv_heads"),
    ("o_proj", "kernel"): (0, "heads"),
    ("gate_proj", "kernel"): (1, "ffn"),
    ("up_proj", "kernel"): (1, "ffn"),
    ("down_proj", "kernel"): (0, "ffn"),
    ("embed", "embedding"): (0, "vocab"),
    ("lm_head", "kernel"): (1, "vocab"),
}
_QUANTIZER_FIELDS = ("key_quantizer", "value_quantizer")
_REPLICATED_FIELDS = ("rotation_tiles",)     # the same on every device
_PER_HEAD_FIELDS = ("key_split_rotation", "value_split_rotation")  # [K, ...]


def make_mesh(data: int = 1, model: int = 1,
              devices: Sequence[jax.Device] | None = None
              ) -> jax.sharding.Mesh:
  """A (data, model) mesh over the first data·model devices.

  Args:
    data: size of the "data" (batch) axis.
    model: size of the "model" (heads, MLP hidden, vocabulary) axis.
    devices: the devices to use (default: jax.devices()).

  Returns:
    A jax.sharding.Mesh with axes ("data", "model"), both AxisType.Auto (the
    compiler propagates shardings from the inputs).
  """
  for name, size in (("data", data), ("model", model)):
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
      raise ValueError(f"{name}={size!r} must be a positive integer")
  devices = list(jax.devices() if devices is None else devices)
  if data * model > len(devices):
    raise ValueError(f"a {data}x{model} mesh needs {data * model} devices, "
                     f"have {len(devices)} (on CPU, set XLA_FLAGS="
                     "--xla_force_host_platform_device_count=N before jax "
                     "starts)")
  auto = jax.sharding.AxisType.Auto
  return jax.make_mesh((data, model), (DATA, MODEL), axis_types=(auto, auto),
                       devices=devices[:data * model])


def _divides(mesh: jax.sharding.Mesh, axis: str, n: int) -> bool:
  return n % mesh.shape[axis] == 0


def _names(path) -> list[str]:
  return [k.key for k in path
          if isinstance(k, jax.tree_util.DictKey) and isinstance(k.key, str)]


def param_specs(model: nnx.Module, mesh: jax.sharding.Mesh) -> nnx.State:
  """The PartitionSpec of every parameter of a Transformer, as its State.

  Args:
    model: a turboquant_jax.model.Transformer.
    mesh: from make_mesh.

  Returns:
    nnx.state(model) with a PartitionSpec in place of each array.
  """
  c = model.config
  sizes = dict(heads=c.n_heads, kv_heads=c.n_kv_heads, ffn=c.ffn_dim,
               vocab=c.vocab_size)

  def spec(path, x):
    names = _names(path)
    rule = _PARAM_RULES.get(tuple(names[-2:]))
    if rule is None or not _divides(mesh, MODEL, sizes[rule[1]]):
      return P()
    axes = [None] * x.ndim
    axes[rule[0]] = MODEL
    return P(*axes)

  return jax.tree_util.tree_map_with_path(spec, nnx.state(model))


def shard_model(model: nnx.Module, mesh: jax.sharding.Mesh) -> nnx.Module:
  """A copy of the Transformer with its parameters placed on the mesh."""
  graphdef, state = nnx.split(model)
  specs = param_specs(model, mesh)
  shardings = jax.tree.map(lambda s: jax.sharding.NamedSharding(mesh, s),
                           specs)
  return nnx.merge(graphdef, jax.device_put(state, shardings))


def _kv_spec(x, mesh: jax.sharding.Mesh) -> P:
  """[B, K, ...]: batch over data, KV heads over model (where they divide)."""
  axes = [None] * x.ndim
  if x.ndim >= 1 and _divides(mesh, DATA, x.shape[0]):
    axes[0] = DATA
  if x.ndim >= 2 and _divides(mesh, MODEL, x.shape[1]):
    axes[1] = MODEL
  return P(*axes)


def _quantizer_specs(quantizer, kv_heads: int, mesh: jax.sharding.Mesh):
  # Deferred import: keep this module importable without the quant stack.
  from turboquant_jax.quant import split  # pylint: disable=g-import-not-at-top
  per_head = (isinstance(quantizer, split.SplitQuantizer)
              and _divides(mesh, MODEL, kv_heads))

  def spec(x):
    if per_head:       # leaves stacked over K on axis 0
      return P(MODEL, *[None] * (x.ndim - 1))
    return P()

  return jax.tree.map(spec, quantizer)


def cache_specs(cache, mesh: jax.sharding.Mesh):
  """The PartitionSpec of every leaf of one layer's cache (same pytree)."""
  if not dataclasses.is_dataclass(cache):
    raise ValueError(f"expected a cache dataclass, got {type(cache)}")
  kv_heads = cache.kv_heads
  fields = {}
  for f in dataclasses.fields(cache):
    if f.metadata.get("static"):
      continue
    value = getattr(cache, f.name)
    if value is None:
      continue
    if f.name in _QUANTIZER_FIELDS:
      fields[f.name] = _quantizer_specs(value, kv_heads, mesh)
    elif f.name in _REPLICATED_FIELDS:
      fields[f.name] = P()
    elif f.name in _PER_HEAD_FIELDS:
      fields[f.name] = (P(MODEL, None, None)
                        if _divides(mesh, MODEL, kv_heads) else P())
    else:   # lengths [B] and every [B, K, ...] buffer
      fields[f.name] = jax.tree.map(lambda x: _kv_spec(x, mesh), value)
  return dataclasses.replace(cache, **fields)


def shard_caches(caches, mesh: jax.sharding.Mesh):
  """Places one cache, or a sequence of per-layer caches, on the mesh.

  Works outside jit (a device_put) and inside (a sharding constraint).
  """
  if dataclasses.is_dataclass(caches):
    return _shard_cache(caches, mesh)
  return type(caches)(_shard_cache(c, mesh) for c in caches)


def _shard_cache(cache, mesh):
  shardings = jax.tree.map(lambda s: jax.sharding.NamedSharding(mesh, s),
                           cache_specs(cache, mesh))
  if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(cache)):
    return jax.lax.with_sharding_constraint(cache, shardings)
  return jax.device_put(cache, shardings)


def shard_batch(x: jax.Array | np.ndarray,
                mesh: jax.sharding.Mesh) -> jax.Array:
  """Places a [B, ...] array (tokens, lengths) batch over "data"."""
  x = np.asarray(x) if not isinstance(x, jax.Array) else x
  axes = [DATA if _divides(mesh, DATA, x.shape[0]) else None]
  return jax.device_put(x, jax.sharding.NamedSharding(
      mesh, P(*axes, *[None] * (x.ndim - 1))))
