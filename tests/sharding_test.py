"""Sharded equals unsharded: a tiny Transformer and its caches on 8 devices.

B batch, T prompt tokens, K KV heads, N query heads, V vocabulary.

Eight virtual CPU devices need
XLA_FLAGS=--xla_force_host_platform_device_count=8 before jax starts, and
pytest has already started jax in other test modules, so the comparison runs
in a child process (this file with --child), which
prints one JSON line per (mesh, cache kind); the tests assert on them.
"""

import json
import os
import subprocess
import sys

from absl.testing import absltest
from absl.testing import parameterized

_MESHES = ((2, 4), (4, 2))           # (data, model); K = 4 divides both
_KINDS = ("full", "turboquant", "turboquant_split", "kivi")
# K = 4 KV heads on 8 model shards: KV heads replicated (N = 8 still split).
_FALLBACK = ("turboquant_split", 1, 8)
# What a cache keeps per KV head on a leading K axis, not [B, K, ...].
_PER_HEAD = ("key_quantizer", "value_quantizer", "key_split_rotation",
             "value_split_rotation")
_CASES = tuple((k, d, m) for k in _KINDS for d, m in _MESHES) + (_FALLBACK,)
_DECODE_STEPS = 3
# Tensor parallelism splits the o_proj / down_proj contractions and sums the
# partial products (an all-reduce): float32 reassociation, not more.
_ATOL = 1e-5


def _child() -> None:
  """Runs in the child: compares sharded and unsharded logits, prints JSON."""
  # pylint: disable=g-import-not-at-top
  import dataclasses

  from flax import nnx
  import jax
  import jax.numpy as jnp
  import numpy as np

  from turboquant_jax import model as model_lib
  from turboquant_jax import sharding
  from turboquant_jax.cache.config import CacheConfig
  # pylint: enable=g-import-not-at-top

  assert len(jax.devices()) == 8, jax.devices()
  config = model_lib.ModelConfig(
      vocab_size=64, d_model=64, n_layers=1, n_heads=8, n_kv_heads=4,
      head_dim=16, ffn_dim=128, max_seq_len=32)
  model = model_lib.Transformer(config, rngs=nnx.Rngs(0))
  cache_configs = {
      "full": CacheConfig(kind="full", dtype="float32"),
      "turboquant": CacheConfig(kind="turboquant", key_bits=4, value_bits=3,
                                window=2),
      # Fractional bits: one SplitQuantizer per KV head (sharded over model).
      "turboquant_split": CacheConfig(kind="turboquant", key_bits=2.5,
                                      value_bits=2.5),
      "kivi": CacheConfig(kind="kivi", key_bits=2, value_bits=2,
                          group_size=4, window=2),
  }
  b, t, capacity = 4, 12, 24
  rng = np.random.default_rng(0)
  prompts = jnp.asarray(rng.integers(0, 64, (b, t)), jnp.int32)
  lengths = jnp.asarray([12, 7, 10, 9], jnp.int32)
  steps = jnp.asarray(rng.integers(0, 64, (_DECODE_STEPS, b, 1)), jnp.int32)
  valid = np.arange(t)[None, :] < np.asarray(lengths)[:, None]

  def spec(x):
    return str(tuple(x.sharding.spec))

  def run(m, caches, shard=None):
    tokens, lens, decode = prompts, lengths, steps
    if shard is not None:
      tokens = sharding.shard_batch(tokens, shard)
      lens = sharding.shard_batch(lens, shard)
    logits, caches = model_lib.forward_prefill(m, tokens, caches, lens)
    out = [np.asarray(logits)[valid]]
    for s in range(_DECODE_STEPS):
      tok = decode[s] if shard is None else sharding.shard_batch(decode[s],
                                                                 shard)
      logits, caches = model_lib.forward(m, tok, caches, caches[0].lengths)
      out.append(np.asarray(logits)[:, 0])
    return out, caches

  def buffers(cache):
    """The [B, K, ...] leaves (codes, norms, windows), not the quantizers
    or their folded split rotations ([K, D, D])."""
    no_quantizers = {n: None for n in _PER_HEAD if hasattr(cache, n)}
    return [x for x in jax.tree.leaves(
        dataclasses.replace(cache, **no_quantizers)) if x.ndim >= 3]

  for kind, cache_config in cache_configs.items():
    caches = model.init_caches(b, capacity, cache_config,
                               jax.random.key(1))
    expected, _ = run(model, caches)
    for data, mdl in [(d, m) for k, d, m in _CASES if k == kind]:
      mesh = sharding.make_mesh(data, mdl)
      s_model = sharding.shard_model(model, mesh)
      s_caches = sharding.shard_caches(caches, mesh)
      got, out_caches = run(s_model, s_caches, mesh)
      # Inside jit, shard_caches is a sharding constraint.
      constrained = jax.jit(lambda c, m=mesh: sharding.shard_caches(c, m))(
          caches)
      first = caches[0]
      row = dict(
          kind=kind, data=data, model=mdl,
          max_abs_diff=max(float(np.max(np.abs(g - e)))
                           for g, e in zip(got, expected)),
          max_abs_logit=max(float(np.max(np.abs(e))) for e in expected),
          q_proj_spec=spec(s_model.blocks[0].attn.q_proj.kernel[...]),
          k_proj_spec=spec(s_model.blocks[0].attn.k_proj.kernel[...]),
          lengths_spec=spec(s_caches[0].lengths),
          out_lengths=np.asarray(out_caches[0].lengths).tolist(),
          cache_leaf_specs=sorted({spec(x) for x in buffers(s_caches[0])}),
          cache_leaf_shapes=sorted({str(x.shape) for x in buffers(first)}),
          quantizer_specs=sorted({
              spec(x)
              for name in _PER_HEAD if hasattr(s_caches[0], name)
              for x in jax.tree.leaves(getattr(s_caches[0], name))}),
          out_cache_specs=sorted({spec(x) for x in buffers(out_caches[0])}),
          constrained_specs=sorted({spec(x)
                                    for x in buffers(constrained[0])}),
      )
      print("RESULT " + json.dumps(row), flush=True)


class ShardingTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        " --xla_force_host_platform_device_count=8").strip()
    proc = subprocess.run([sys.executable, __file__, "--child"], env=env,
                          capture_output=True, text=True, timeout=600,
                          check=False)
    if proc.returncode:
      raise RuntimeError(f"child failed ({proc.returncode}):\n"
                         f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    cls.rows = {}
    for line in proc.stdout.splitlines():
      if line.startswith("RESULT "):
        row = json.loads(line[len("RESULT "):])
        cls.rows[row["kind"], row["data"], row["model"]] = row

  def test_every_case_ran(self):
    self.assertEqual(set(self.rows), set(_CASES))

  @parameterized.named_parameters(
      (f"{k}_{d}x{m}", k, d, m) for k, d, m in _CASES)
  def test_sharded_equals_unsharded(self, kind, data, model):
    # Given a prefill of right-padded prompts and three decode steps, both
    # unsharded and on a (data, model) mesh, the logits agree.
    row = self.rows[kind, data, model]
    self.assertGreater(row["max_abs_logit"], 0.1)   # not trivially zero
    self.assertLessEqual(row["max_abs_diff"], _ATOL, row)
    self.assertEqual(row["out_lengths"], [12 + _DECODE_STEPS,
                                          7 + _DECODE_STEPS,
                                          10 + _DECODE_STEPS,
                                          9 + _DECODE_STEPS])

  @parameterized.parameters(*_MESHES)
  def test_placements(self, data, model):
    row = self.rows["turboquant_split", data, model]
    # Query heads (8) and KV heads (4) both divide the model axis.
    self.assertEqual(row["q_proj_spec"], "(None, 'model')")
    self.assertEqual(row["k_proj_spec"], "(None, 'model')")
    self.assertEqual(row["lengths_spec"], "('data',)")
    # Every [B, K, ...] buffer: batch over data, KV heads over model; the
    # caches that prefill and decode return stay so.
    for kind in _KINDS:
      r = self.rows[kind, data, model]
      for spec in (r["cache_leaf_specs"] + r["out_cache_specs"]
                   + r["constrained_specs"]):
        self.assertTrue(spec.startswith("('data', 'model'"), (kind, spec))
    # Per-head split quantizers over model; a shared quantizer replicated.
    for spec in row["quantizer_specs"]:
      self.assertTrue(spec.startswith("('model'"), spec)
    self.assertEqual(self.rows["turboquant", data, model]["quantizer_specs"],
                     ["()"])

  def test_kv_heads_that_do_not_divide_are_replicated(self):
    # Given K = 4 KV heads on 8 model shards: k_proj, the caches' head axis
    # and the per-head quantizers are replicated; the 8 query heads split.
    row = self.rows[_FALLBACK]
    self.assertEqual(row["q_proj_spec"], "(None, 'model')")
    self.assertEqual(row["k_proj_spec"], "()")
    for spec in row["cache_leaf_specs"]:
      self.assertTrue(spec.startswith("('data', None"), spec)
    self.assertEqual(row["quantizer_specs"], ["()"])


class CacheSpecsTest(absltest.TestCase):

  def test_rotation_tiles_are_replicated(self):
    # f16[2, G², 64, 64] is no [B, K, ...] buffer: its leading axes must
    # not go over "data" and "model" though 2 and 1 would divide them.
    # pylint: disable=g-import-not-at-top (jax starts in the child first)
    import jax
    from jax.sharding import PartitionSpec as P
    from turboquant_jax import cache as cache_lib
    from turboquant_jax import sharding
    # pylint: enable=g-import-not-at-top
    cache = cache_lib.init(cache_lib.CacheConfig(), 2, 2, 64, 64)
    mesh = jax.sharding.AbstractMesh((2, 1), ("data", "model"))
    specs = sharding.cache_specs(cache, mesh)
    self.assertEqual(cache.rotation_tiles.shape, (2, 1, 64, 64))
    self.assertEqual(specs.rotation_tiles, P())
    self.assertEqual(specs.keys.codes, P("data", "model", None, None))

  def test_split_rotations_go_with_their_heads(self):
    # f32[K, D, D] per KV head, like the split quantizers' leaves: over
    # "model" where K divides it, else replicated.
    # pylint: disable=g-import-not-at-top (jax starts in the child first)
    import jax
    from jax.sharding import PartitionSpec as P
    from turboquant_jax import cache as cache_lib
    from turboquant_jax import sharding
    # pylint: enable=g-import-not-at-top
    cfg = cache_lib.CacheConfig(key_bits=2.5, value_bits=3.5)
    for kv_heads, expected in ((2, P("model", None, None)), (3, P())):
      cache = cache_lib.init(cfg, 2, kv_heads, 64, 64)
      specs = sharding.cache_specs(
          cache, jax.sharding.AbstractMesh((1, 2), ("data", "model")))
      self.assertEqual(cache.key_split_rotation.shape, (kv_heads, 64, 64))
      self.assertEqual(specs.key_split_rotation, expected)
      self.assertEqual(specs.value_split_rotation, expected)


if __name__ == "__main__":
  if "--child" in sys.argv:
    _child()
  else:
    absltest.main()
