"""Tests of the SnapKV-style token-eviction cache.

Notation: B batch, K KV heads, G query heads per KV head, N = G·K, T prompt
tokens, S capacity, D head dim, W observation window.
"""

import math

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from turboquant_jax import cache as cache_lib
from turboquant_jax import model as model_lib
from turboquant_jax.cache import CacheConfig
from turboquant_jax.cache import snapkv_cache
from turboquant_jax.kernels import decode_attention

B, K, G, D = 2, 2, 2, 16
T, LENGTHS = 24, jnp.array([24, 17])       # the second prompt right-padded


def _snap(**kw) -> CacheConfig:
  kw.setdefault("window", 3)
  return CacheConfig(kind="snapkv", dtype="float32", **kw)


def _qkv(seed: int, t: int):
  """Random q f32[B, N, T, D], k, v f32[B, K, T, D]."""
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  q = 2 * jax.random.normal(kq, (B, G * K, t, D), jnp.float32)
  k = jax.random.normal(kk, (B, K, t, D), jnp.float32)
  v = jax.random.normal(kv, (B, K, t, D), jnp.float32)
  return q, k, v


def _prefilled(cfg=None):
  """A cache of capacity T + 5 after the prefill of _qkv(1, T), LENGTHS."""
  cfg = cfg or _snap(budget=0.3, pool_kernel=5)
  q, k, v = _qkv(1, T)
  cache = cache_lib.init(cfg, B, K, T + 5, D)
  return cache_lib.prefill(cache, k, v, LENGTHS, queries=q)


def _numpy_selection(cfg, q, k, lengths):
  """The kept positions of each (sequence, head), written from the paper's
  description with numpy loops (independent of the library)."""
  q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
  out = {}
  half = cfg.pool_kernel // 2
  for b, n in enumerate(np.asarray(lengths)):
    w = min(cfg.window, n)
    keep = min(n, max(cfg.window, math.ceil(cfg.budget * n)))
    for h in range(K):
      votes = np.zeros(n - w)
      for g in range(G):
        for t in range(n - w, n):
          s = q[b, h * G + g, t] @ k[b, h, :t + 1].T / math.sqrt(D)
          p = np.exp(s - s.max())
          votes += (p / p.sum())[:n - w]
      padded = np.concatenate([np.zeros(half), votes, np.zeros(half)])
      windows = [padded[i:i + cfg.pool_kernel] for i in range(n - w)]
      pooled = np.array([x.max() if cfg.pool == "max" else x.mean()
                         for x in windows])
      top = np.argsort(-pooled, kind="stable")[:keep - w]
      out[b, h] = sorted(top.tolist()) + list(range(n - w, n))
  return out


class ConfigTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("budget_zero", dict(kind="snapkv", window=4, budget=0.0), "budget"),
      ("budget_big", dict(kind="snapkv", window=4, budget=1.5), "budget"),
      ("budget_other_kind", dict(kind="full", budget=0.5), "budget"),
      ("even_kernel", dict(kind="snapkv", window=4, pool_kernel=4),
       "pool_kernel"),
      ("bad_pool", dict(kind="snapkv", window=4, pool="min"), "pool"),
      ("no_window", dict(kind="snapkv", window=0), "window"),
  )
  def test_bad_config_raises(self, kw, name):
    with self.assertRaisesRegex(ValueError, name):
      CacheConfig(**kw)

  def test_prefill_without_queries_raises(self):
    _, k, v = _qkv(0, 8)
    cache = cache_lib.init(_snap(), B, K, 8, D)
    with self.assertRaisesRegex(ValueError, "queries"):
      cache_lib.prefill(cache, k, v, jnp.array([8, 8]))

  def test_append_past_capacity_raises(self):
    cache = _prefilled()
    self.assertEqual(cache.capacity, 8 + 5)           # keep(24) + (29 - 24)
    _, k, v = _qkv(4, 5)
    cache = cache_lib.append(cache, k, v)
    with self.assertRaisesRegex(ValueError, "capacity"):
      cache_lib.append(cache, k[:, :, :1], v[:, :, :1])


class SelectionTest(parameterized.TestCase):

  def _hand_made(self, pool_kernel, budget):
    # One sequence, one head, T = 12, W = 2 (tokens 10, 11). The window's
    # queries are 8·e0; keys 3, 7 and 9 are 1, 1.5 and 2 times e0, all
    # others 0, so the votes rank 9 > 7 > 3 > every other token.
    t = 12
    q = jnp.zeros((1, 1, t, D)).at[0, 0, 10:, 0].set(8.0)
    k = jnp.zeros((1, 1, t, D))
    for pos, a in ((3, 1.0), (7, 1.5), (9, 2.0)):
      k = k.at[0, 0, pos, 0].set(a)
    cfg = CacheConfig(kind="snapkv", dtype="float32", window=2,
                      budget=budget, pool_kernel=pool_kernel)
    cache = cache_lib.init(cfg, 1, 1, t, D)
    cache = cache_lib.prefill(cache, k, k, jnp.array([t]), queries=q)
    slots = int(cache.slots[0])
    kept = np.asarray(cache.keys[0, 0, :slots, 0])
    return slots, kept

  def test_hand_made_no_pooling_keeps_the_top_tokens(self):
    # keep = ceil(0.4 · 12) = 5: the window and tokens 3, 7, 9.
    slots, kept = self._hand_made(pool_kernel=1, budget=0.4)
    self.assertEqual(slots, 5)
    np.testing.assert_array_equal(kept, [1.0, 1.5, 2.0, 0.0, 0.0])

  def test_hand_made_max_pooling_keeps_the_neighbours(self):
    # Width 3: token 8 pools max(v7, v8, v9) = v9, tied with 9; keep = 4:
    # tokens 8 and 9 (8 has a zero key) and the window; 3 and 7 go.
    slots, kept = self._hand_made(pool_kernel=3, budget=0.3)
    self.assertEqual(slots, 4)
    np.testing.assert_array_equal(kept, [0.0, 2.0, 0.0, 0.0])

  def test_pool_hand_made(self):
    x = jnp.array([0.0, 1.0, 0.0, 0.0, 3.0])
    np.testing.assert_allclose(snapkv_cache.pool(x, 3, "max"),
                               [1, 1, 1, 3, 3])
    np.testing.assert_allclose(snapkv_cache.pool(x, 3, "avg"),
                               [1 / 3, 1 / 3, 1 / 3, 1, 1])

  @parameterized.parameters(("max", 5, 0.3), ("max", 1, 0.6),
                            ("avg", 3, 0.6))
  def test_matches_numpy_reference(self, pool, pool_kernel, budget):
    # Random queries and keys, GQA, two sequences of different lengths
    # (the second right-padded): each head keeps exactly the positions
    # the loop-by-loop reference picks, and the cache holds their k and v.
    cfg = _snap(budget=budget, pool=pool, pool_kernel=pool_kernel)
    cache = _prefilled(cfg)
    q, k, v = _qkv(1, T)
    want = _numpy_selection(cfg, q, k, LENGTHS)
    keep_t = snapkv_cache.kept_tokens(cfg, T)
    self.assertEqual(cache.capacity, keep_t + 5)
    np.testing.assert_array_equal(cache.lengths, LENGTHS)
    for (b, h), pos in want.items():
      self.assertEqual(int(cache.slots[b]), len(pos))
      np.testing.assert_array_equal(cache.keys[b, h, :len(pos)],
                                    k[b, h, np.array(pos)])
      np.testing.assert_array_equal(cache.values[b, h, :len(pos)],
                                    v[b, h, np.array(pos)])

  def test_memory_is_exact(self):
    # bf16 keys and values of keep(T) + S - T slots, plus lengths and slots.
    t, s = 40, 48
    cfg = CacheConfig(kind="snapkv", window=4, budget=0.25)
    q, k, v = _qkv(2, t)
    cache = jax.eval_shape(lambda: cache_lib.prefill(
        cache_lib.init(cfg, B, K, s, D), k, v, jnp.array([40, 40]),
        queries=q))
    slots = 10 + (s - t)
    mem = cache_lib.memory(cache)
    self.assertEqual(mem["nbytes"], 2 * B * K * slots * D * 2 + 2 * B * 4)
    self.assertEqual(mem["fixed_nbytes"], 0)


class AttentionTest(absltest.TestCase):

  def test_decode_attends_to_kept_and_appended_slots_only(self):
    # After eviction and five appends, attention over the cache equals f32
    # attention over exactly the kept tokens plus the appended ones.
    cfg = _snap(budget=0.3, pool_kernel=5)
    cache = _prefilled(cfg)
    q, k, v = _qkv(1, T)
    _, k2, v2 = _qkv(4, 5)
    cache = cache_lib.append(cache, k2, v2)
    np.testing.assert_array_equal(cache.lengths, LENGTHS + 5)
    q1 = jax.random.normal(jax.random.key(5), (B, G * K, D))
    out = decode_attention.decode_attention(q1, cache, cache.slots,
                                            impl="xla")
    want = _numpy_selection(cfg, q, k, LENGTHS)
    for b in range(B):
      for h in range(K):
        pos = np.array(want[b, h])
        kk = np.concatenate([k[b, h, pos], k2[b, h]])
        vv = np.concatenate([v[b, h, pos], v2[b, h]])
        for g in range(G):
          s = kk @ np.asarray(q1[b, h * G + g]) / math.sqrt(D)
          p = np.exp(s - s.max())
          np.testing.assert_allclose(out[b, h * G + g], p @ vv / p.sum(),
                                     rtol=1e-5, atol=1e-5)


class ModelTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.config = model_lib.ModelConfig(
        vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
        head_dim=32, ffn_dim=96, max_seq_len=256)
    cls.model = model_lib.Transformer(cls.config, rngs=nnx.Rngs(0))
    cls.tokens = jax.random.randint(jax.random.key(1), (2, 30), 0, 97)
    cls.lengths = jnp.array([30, 23])
    cls.full_logits, cls.full_caches = cls._run(CacheConfig(kind="full"))

  @classmethod
  def _run(cls, cfg, steps=3):
    """Prefill logits, then `steps` greedy decode steps' logits."""
    m = cls.model
    caches = m.init_caches(2, 40, cfg)
    logits, caches = model_lib.forward_prefill(m, cls.tokens, caches,
                                               cls.lengths)
    out = [logits[jnp.arange(2), cls.lengths - 1]]
    for i in range(steps):
      nxt = jnp.argmax(out[-1], axis=-1)[:, None].astype(jnp.int32)
      logits, caches = model_lib.forward(m, nxt, caches, cls.lengths + i)
      out.append(logits[:, 0])
    return jnp.stack(out, 1), caches

  def test_keeping_everything_equals_the_full_cache(self):
    # bf16 storage (the default): the prompt attends to its own bf16-rounded
    # keys and values in both, then decoding reads the same slots.
    snap, caches = self._run(CacheConfig(kind="snapkv", window=4))
    np.testing.assert_array_equal(caches[0].slots, self.lengths + 3)
    np.testing.assert_array_equal(caches[0].lengths, self.lengths + 3)
    np.testing.assert_allclose(snap, self.full_logits, rtol=1e-5, atol=1e-5)

  def test_evicting_cache_keeps_positions(self):
    # Layer 0 sees the embeddings in both runs: its kept keys must be the
    # full cache's keys at some prompt positions (RoPE'd at their original
    # positions), and the first decoded token's key (the same token: the
    # prefill is the same) must equal the full cache's key at position =
    # prompt length, not at the slot it lands in.
    snap_logits, snap = self._run(CacheConfig(kind="snapkv", window=4,
                                              budget=0.3), steps=1)
    np.testing.assert_allclose(snap_logits[:, 0], self.full_logits[:, 0],
                               rtol=1e-5, atol=1e-5)
    f0, s0 = self.full_caches[0], snap[0]
    for b, n in enumerate(np.asarray(self.lengths)):
      slots = int(s0.slots[b])
      self.assertEqual(slots, math.ceil(0.3 * n) + 1)
      self.assertEqual(int(s0.lengths[b]), n + 1)
      for h in range(2):
        prompt = np.asarray(f0.keys[b, h, :n], np.float32)
        for slot in range(slots - 1):
          key = np.asarray(s0.keys[b, h, slot], np.float32)
          self.assertEqual(np.abs(prompt - key).max(-1).min(), 0.0)
        np.testing.assert_array_equal(s0.keys[b, h, slots - 1],
                                      f0.keys[b, h, n])
        np.testing.assert_array_equal(s0.values[b, h, slots - 1],
                                      f0.values[b, h, n])


if __name__ == "__main__":
  absltest.main()
