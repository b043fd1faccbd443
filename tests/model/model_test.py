"""Tests of the NNX decoder, its config, RoPE, caches and the HF loader.

Notation: B batch, T tokens, V vocabulary, N query heads, K KV heads,
H head dim, D model dim, L layers, S cache capacity.

None of these need torch: HF-style checkpoints are written here with the
safetensors numpy API (hf_parity_test.py compares against transformers).
"""

import json
import os
import pathlib
import tempfile
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from turboquant_jax import model as model_lib
from turboquant_jax.cache import CacheConfig
from turboquant_jax.model import hf
from turboquant_jax.model import layers

B, V = 2, 97

FULL32 = CacheConfig(kind="full", dtype="float32")


def _config(**kw) -> model_lib.ModelConfig:
  base = dict(vocab_size=V, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
              head_dim=32, ffn_dim=80, rope_theta=10000.0)
  base.update(kw)
  return model_lib.ModelConfig(**base)


def _model(config, seed=0):
  return model_lib.Transformer(config, rngs=nnx.Rngs(seed))


def _tokens(t, seed=1, batch=B):
  return jax.random.randint(jax.random.key(seed), (batch, t), 0, V)


def _rebuild(config, pure):
  """A model of `config` holding the parameters `pure` (a pure dict)."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: _model(config)))
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graphdef, state)


def _hf_config(family="llama", **kw):
  arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
          "qwen2": "Qwen2ForCausalLM"}[family]
  d = dict(architectures=[arch], model_type=family, vocab_size=V,
           hidden_size=64, intermediate_size=80, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2,
           max_position_embeddings=128, rms_norm_eps=1e-5,
           rope_theta=10000.0, hidden_act="silu", tie_word_embeddings=False)
  d.update(kw)
  return d


def _write_hf(directory, hf_config, *, shards=1, drop=(), reshape=None):
  """Writes config.json + random safetensors in HF names; returns tensors."""
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  (directory / "config.json").write_text(json.dumps(hf_config))
  config = model_lib.ModelConfig.from_hf_config(hf_config)
  rng = np.random.default_rng(0)
  tensors = {n: rng.normal(size=s).astype(np.float32) * 0.2
             for n, (s, _) in hf.hf_tensor_shapes(config).items()}
  if reshape:
    name, shape = reshape
    tensors[name] = np.zeros(shape, np.float32)
  stored = {n: t for n, t in tensors.items() if n not in drop}
  if shards == 1:
    safetensors.numpy.save_file(stored, str(directory / "model.safetensors"))
  else:
    names = sorted(stored)
    weight_map = {}
    for i in range(shards):
      file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
      part = {n: stored[n] for n in names[i::shards]}
      safetensors.numpy.save_file(part, str(directory / file))
      weight_map.update({n: file for n in part})
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        dict(metadata={}, weight_map=weight_map)))
  return tensors


class ConfigTest(parameterized.TestCase):

  def test_rejects_bad_fields(self):
    with self.assertRaisesRegex(ValueError, "n_heads=6 must be a multiple"):
      _config(n_heads=6, n_kv_heads=4)
    with self.assertRaisesRegex(ValueError, "head_dim=7 must be even"):
      _config(head_dim=7)
    with self.assertRaisesRegex(ValueError, "rope_style='x'"):
      _config(rope_style="x")
    with self.assertRaisesRegex(ValueError, "dtype='float16'"):
      _config(dtype="float16")
    with self.assertRaisesRegex(ValueError, "vocab_size=0"):
      _config(vocab_size=0)
    with self.assertRaisesRegex(ValueError, "high_freq_factor"):
      model_lib.RopeScaling(low_freq_factor=4.0, high_freq_factor=1.0)

  def test_rope_scaling_from_mapping(self):
    c = _config(rope_scaling=dict(factor=8.0, low_freq_factor=1.0,
                                  high_freq_factor=4.0,
                                  original_max_position_embeddings=64))
    self.assertEqual(c.rope_scaling, model_lib.RopeScaling(
        original_max_position_embeddings=64))
    self.assertEqual(c.rope_scaling["factor"], 8.0)
    self.assertEqual(dict(c.rope_scaling)["low_freq_factor"], 1.0)
    hash(c)  # Usable as a static (jit) argument.

  def test_from_hf_llama31(self):
    # Given a Llama-3.1-8B-Instruct style config.json (transformers 4).
    d = _hf_config(hidden_size=4096, intermediate_size=14336,
                   num_hidden_layers=32, num_attention_heads=32,
                   num_key_value_heads=8, vocab_size=128256,
                   max_position_embeddings=131072, rope_theta=500000.0,
                   rope_scaling=dict(factor=8.0, low_freq_factor=1.0,
                                     high_freq_factor=4.0,
                                     original_max_position_embeddings=8192,
                                     rope_type="llama3"),
                   torch_dtype="bfloat16")
    c = model_lib.ModelConfig.from_hf_config(d)
    self.assertEqual((c.head_dim, c.n_kv_heads, c.dtype, c.max_seq_len),
                     (128, 8, "bfloat16", 131072))
    self.assertEqual(c.rope_scaling.original_max_position_embeddings, 8192)
    self.assertEqual(c.rope_theta, 500000.0)
    # The transformers-5 spelling gives the same config.
    d5 = dict(d)
    d5["rope_parameters"] = dict(d5.pop("rope_scaling"),
                                 rope_theta=d5.pop("rope_theta"))
    self.assertEqual(model_lib.ModelConfig.from_hf_config(d5), c)

  def test_from_hf_qwen2_and_mistral(self):
    q = model_lib.ModelConfig.from_hf_config(
        _hf_config("qwen2", tie_word_embeddings=True, sliding_window=16,
                   use_sliding_window=False))
    self.assertEqual((q.attn_bias, q.out_bias, q.tie_embeddings,
                      q.max_seq_len), (True, False, True, 128))
    m = model_lib.ModelConfig.from_hf_config(
        _hf_config("mistral", head_dim=48, sliding_window=64))
    self.assertEqual((m.head_dim, m.attn_bias, m.max_seq_len),
                     (48, False, 64))

  @parameterized.named_parameters(
      ("arch", dict(architectures=["GPT2LMHeadModel"]), "architectures="),
      ("model_type", dict(model_type="qwen2"), "model_type='qwen2'"),
      ("no_arch", dict(architectures=None, model_type="gemma"),
       "model_type='gemma'"),
      ("heads", dict(num_attention_heads=5, head_dim=16),
       "num_attention_heads=5"),
      ("hidden", dict(hidden_size=66), "hidden_size=66"),
      ("act", dict(hidden_act="gelu"), "hidden_act='gelu'"),
      ("missing", dict(vocab_size=None), "'vocab_size'"),
      ("rope_type", dict(rope_scaling=dict(rope_type="yarn", factor=4.0)),
       "rope_type='yarn'"),
      ("mlp_bias", dict(mlp_bias=True), "mlp_bias=True"),
  )
  def test_from_hf_errors_name_file_and_field(self, change, field):
    d = _hf_config(**change)
    with self.assertRaisesRegex(ValueError, "^my/config.json: .*" + field):
      model_lib.ModelConfig.from_hf_config(d, source="my/config.json")

  def test_layer_cache_configs(self):
    c = _config(n_layers=5)
    base = CacheConfig(kind="turboquant", key_bits=3, value_bits=2)
    edge = CacheConfig(kind="full")
    got = model_lib.layer_cache_configs(c, base, edge_layers=2, edge=edge)
    self.assertEqual(got, (edge, edge, base, edge, edge))
    self.assertEqual(model_lib.layer_cache_configs(c, base), (base,) * 5)
    with self.assertRaisesRegex(ValueError, "needs edge="):
      model_lib.layer_cache_configs(c, base, edge_layers=1)
    with self.assertRaisesRegex(ValueError, "edge_layers=6"):
      model_lib.layer_cache_configs(c, base, edge_layers=6, edge=edge)


class LayersTest(parameterized.TestCase):

  def test_rmsnorm_hand_values(self):
    # x = [3, 4]: rms = sqrt((9 + 16) / 2) = 3.5355 -> [0.8485, 1.1314].
    norm = model_lib.RMSNorm(2, eps=0.0)
    np.testing.assert_allclose(norm(jnp.array([[3.0, 4.0]])),
                               [[0.848528, 1.131371]], rtol=1e-6)

  @parameterized.parameters("half", "interleaved")
  def test_rope_hand_values(self, style):
    # One pair, inv_freq 1: (1, 0) at position 2 -> (cos 2, sin 2).
    x = jnp.array([1.0, 0.0]).reshape(1, 1, 1, 2)
    out = layers.apply_rope(x, jnp.array([[2]]), np.array([1.0]), style)
    np.testing.assert_allclose(out.ravel(), [np.cos(2.0), np.sin(2.0)],
                               atol=1e-7)

  def test_rope_styles_agree_on_permuted_coordinates(self):
    # interleaved(x[perm]) == half(x)[perm], perm = llama.cpp's row order.
    h = 16
    perm = np.asarray(model_lib.permute_for_interleaved(np.arange(h), 1))
    x = jax.random.normal(jax.random.key(0), (2, 5, 3, h))
    pos = jnp.arange(10).reshape(2, 5) * 7
    inv = layers.rope_frequencies(h, 10000.0)
    half = layers.apply_rope(x, pos, inv, "half")
    inter = layers.apply_rope(x[..., perm], pos, inv, "interleaved")
    np.testing.assert_allclose(inter, half[..., perm], atol=1e-6)

  def test_permutation_inverse_and_layout(self):
    w = np.arange(4 * 8 * 3).reshape(4 * 8, 3)       # 4 heads, H=8, in=3
    p = model_lib.permute_for_interleaved(w, 4)
    np.testing.assert_array_equal(model_lib.unpermute_from_interleaved(p, 4),
                                  w)
    # Head 1, pair 2: rows (2, 2 + H/2) of the head become rows (4, 5).
    np.testing.assert_array_equal(p[8 + 4], w[8 + 2])
    np.testing.assert_array_equal(p[8 + 5], w[8 + 2 + 4])
    with self.assertRaisesRegex(ValueError, "n_heads=3"):
      model_lib.permute_for_interleaved(w, 3)

  def test_llama3_frequencies(self):
    s = model_lib.RopeScaling(factor=8.0, low_freq_factor=1.0,
                              high_freq_factor=4.0,
                              original_max_position_embeddings=64)
    plain = layers.rope_frequencies(32, 10000.0)
    scaled = layers.rope_frequencies(32, 10000.0, s)
    wavelen = 2 * np.pi / plain
    short, long = wavelen < 64 / 4, wavelen > 64 / 1
    np.testing.assert_array_equal(scaled[short], plain[short])
    np.testing.assert_allclose(scaled[long], plain[long] / 8, rtol=1e-6)
    mid = ~short & ~long
    self.assertTrue(mid.any())
    self.assertTrue(np.all((scaled[mid] < plain[mid])
                           & (scaled[mid] > plain[mid] / 8)))

  def test_interleaved_model_equals_half_model_with_permuted_weights(self):
    # Given a half-split model (with q/k biases) and the same weights with
    # the q/k rows permuted as llama.cpp does, in an interleaved model.
    half_cfg = _config(attn_bias=True)
    half = _model(half_cfg)
    pure = nnx.to_pure_dict(nnx.state(half))
    for blk in pure["blocks"].values():
      for proj, heads in (("q_proj", 4), ("k_proj", 2)):
        p = blk["attn"][proj]
        p["kernel"] = model_lib.permute_for_interleaved(p["kernel"].T,
                                                        heads).T
        p["bias"] = model_lib.permute_for_interleaved(p["bias"], heads)
    inter = _rebuild(_config(attn_bias=True, rope_style="interleaved"), pure)
    # Then the logits agree.
    tokens = _tokens(9)
    np.testing.assert_allclose(
        model_lib.forward_no_cache_jit(inter, tokens),
        model_lib.forward_no_cache_jit(half, tokens), atol=1e-5)


def _incremental(model, tokens, caches, chunks):
  """Feeds tokens in chunks through model(...); concatenated logits."""
  out, start = [], 0
  for size in chunks:
    logits, caches = model_lib.forward(model, tokens[:, start:start + size],
                                       caches, caches[0].lengths)
    out.append(logits)
    start += size
  return jnp.concatenate(out, axis=1), caches


class CachedDecodingTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("untied", dict()),
      ("tied_bias", dict(tie_embeddings=True, attn_bias=True,
                         out_bias=True)),
      ("interleaved_scaled", dict(rope_style="interleaved", rope_scaling=dict(
          factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
          original_max_position_embeddings=16))),
      ("mha", dict(n_kv_heads=4)),
  )
  def test_full_cache_equals_no_cache(self, kw):
    # Given a model and a float32 full-precision cache.
    model = _model(_config(**kw))
    tokens = _tokens(12)
    want = model_lib.forward_no_cache_jit(model, tokens)
    # When a prompt is appended in chunks, then tokens one by one.
    caches = model.init_caches(B, 16, FULL32)
    got, caches = _incremental(model, tokens, caches, [5, 3, 1, 1, 1, 1])
    # Then every logit equals the cache-free forward pass.
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(caches[-1].lengths, [12, 12])

  def test_eager_equals_jit(self):
    model = _model(_config(n_layers=1))
    tokens = _tokens(4)
    caches = model.init_caches(B, 8, FULL32)
    eager, _ = model(tokens, caches, caches[0].lengths)
    jitted, _ = model_lib.forward(model, tokens, caches, caches[0].lengths)
    # Float32 rounding: XLA fuses the jitted graph differently.
    np.testing.assert_allclose(eager, jitted, atol=1e-5)
    np.testing.assert_allclose(model.forward_no_cache(tokens), eager,
                               atol=1e-5)  # Eager too.

  def test_ragged_prefill_then_decode(self):
    # Given right-padded prompts of lengths 7 and 4.
    model = _model(_config())
    tokens = _tokens(7)
    nxt = _tokens(1, seed=5)
    caches = model.init_caches(B, 16, FULL32)
    logits, caches = model_lib.forward_prefill(model, tokens, caches,
                                               jnp.array([7, 4]))
    np.testing.assert_array_equal(caches[0].lengths, [7, 4])
    # When each sequence gets one more token at its own position.
    step, _ = model_lib.forward(model, nxt, caches, caches[0].lengths)
    # Then each equals the unpadded sequence run alone.
    for b, n in enumerate((7, 4)):
      seq = jnp.concatenate([tokens[b:b + 1, :n], nxt[b:b + 1]], axis=1)
      want = model_lib.forward_no_cache_jit(model, seq)
      np.testing.assert_allclose(logits[b, :n], want[0, :n], atol=1e-5)
      np.testing.assert_allclose(step[b, 0], want[0, n], atol=1e-5)

  def test_prefill_last_only_is_the_last_prompt_position(self):
    model = _model(_config())
    tokens = _tokens(7)
    lengths = jnp.array([7, 4])
    caches = model.init_caches(B, 16, FULL32)
    full, _ = model.prefill(tokens, caches, lengths)
    last, caches = model.prefill(tokens, caches, lengths, last_only=True)
    self.assertEqual(last.shape, (B, 1, full.shape[-1]))
    np.testing.assert_allclose(last[:, 0], full[jnp.arange(B), lengths - 1],
                               atol=1e-6)
    np.testing.assert_array_equal(caches[0].lengths, [7, 4])

  def test_tree_mode(self):
    with nnx.set_graph_mode(False):
      model = _model(_config(attn_bias=True))
      tokens = _tokens(6)
      caches = model.init_caches(B, 8, FULL32)
      got, _ = _incremental(model, tokens, caches, [4, 1, 1])
      want = model_lib.forward_no_cache_jit(model, tokens)
      np.testing.assert_allclose(got, want, atol=1e-5)

  def _relative_error(self, cache_configs, tokens=None):
    model = _model(_config())
    tokens = _tokens(12) if tokens is None else tokens
    want = model_lib.forward_no_cache_jit(model, tokens)
    caches = model.init_caches(B, 16, cache_configs, jax.random.key(3))
    got, caches = _incremental(model, tokens, caches, [8, 1, 1, 1, 1])
    return float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))

  def test_turboquant_8bit_close_and_fewer_bits_worse(self):
    # The attention reads the compressed cache: error grows as bits fall.
    # Measured: 8 bits 0.015, 4 bits 0.22, 2 bits 0.59 (a bf16 full cache:
    # 0.005); 8-bit Lloyd-Max has ~3x bf16's relative error per vector.
    err = {b: self._relative_error(CacheConfig(
        kind="turboquant", key_bits=b, value_bits=b)) for b in (8, 4, 2)}
    self.assertLess(err[8], 3e-2)
    self.assertLess(err[8], err[4])
    self.assertLess(err[4], err[2])

  def test_gpu_kernel_path_equals_xla_path(self):
    # Through the model, impl="pallas_gpu" (Mosaic GPU interpret mode here;
    # by default the kernel rotates queries and outputs itself, in f16)
    # gives XLA's logits up to the kernel's f16 operands: a prefill of 8
    # ragged tokens, then three decode steps. Measured: 0.7% of the logits'
    # scale (1.3% with XLA doing the rotations; "reference" 5e-5), where
    # a wrong rotation or position would be off by tens of percent.
    model = _model(_config(d_model=128, head_dim=64))
    tokens = _tokens(11)
    cfg = CacheConfig(kind="turboquant", key_bits=4, value_bits=3)

    def run(impl):
      caches = model.init_caches(B, 128, cfg, jax.random.key(3))
      first, caches = model_lib.forward_prefill(
          model, tokens[:, :8], caches, jnp.array([8, 5]), impl=impl)
      out = [first[jnp.arange(B), jnp.array([7, 4])]]
      for i in range(3):
        lengths = caches[0].lengths
        step, caches = model_lib.forward(model, tokens[:, 8 + i:9 + i],
                                         caches, lengths, impl=impl)
        out.append(step[:, 0])
      return jnp.stack(out, 1)                           # [B, 4, V]

    got, want = run("pallas_gpu"), run("xla")
    scale = float(jnp.max(jnp.abs(want)))
    np.testing.assert_allclose(got, want, atol=2e-2 * scale)

  def test_kivi_8bit_close(self):
    err = self._relative_error(CacheConfig(kind="kivi", key_bits=8,
                                           value_bits=8, group_size=4))
    self.assertLess(err, 1e-2)

  def test_mixed_per_layer_caches(self):
    # First/last layers full, the rest TurboQuant with K/V at 4/2 bits;
    # one KIVI layer too: every kind goes through the same model.
    c = _config(n_layers=4)
    configs = model_lib.layer_cache_configs(
        c, CacheConfig(kind="turboquant", key_bits=4, value_bits=2),
        edge_layers=1, edge=FULL32)
    configs = configs[:2] + (CacheConfig(kind="kivi", key_bits=4,
                                         value_bits=4, group_size=4),
                             ) + configs[3:]
    model = _model(c)
    caches = model.init_caches(B, 16, configs)
    self.assertEqual([x.config.kind for x in caches],
                     ["full", "turboquant", "kivi", "full"])
    logits, caches = model_lib.forward_prefill(
        model, _tokens(6), caches, jnp.array([6, 3]))
    logits, caches = model_lib.forward(model, _tokens(1), caches,
                                       caches[0].lengths)
    self.assertTrue(bool(jnp.all(jnp.isfinite(logits))))
    self.assertEqual([int(x.lengths[1]) for x in caches], [4] * 4)

  def test_fractional_bits_prefill_picks_outliers(self):
    model = _model(_config())
    caches = model.init_caches(B, 16, CacheConfig(kind="turboquant",
                                                  key_bits=3.5,
                                                  value_bits=2.5))
    before = np.asarray(caches[0].key_quantizer.outlier_channels)
    _, caches = model_lib.forward_prefill(model, _tokens(8), caches,
                                          jnp.array([8, 8]))
    after = np.asarray(caches[0].key_quantizer.outlier_channels)
    self.assertEqual(before.shape, after.shape)
    self.assertFalse(np.array_equal(before, after))

  def test_bfloat16_model_runs(self):
    model = _model(_config(dtype="bfloat16"))
    self.assertEqual(model.embed.embedding[...].dtype, jnp.bfloat16)
    caches = model.init_caches(B, 8, CacheConfig(kind="full"))
    logits, _ = model_lib.forward(model, _tokens(5), caches,
                                  caches[0].lengths)
    self.assertEqual(logits.dtype, jnp.float32)
    want = model_lib.forward_no_cache_jit(_rebuild(_config(), jax.tree.map(
        lambda x: x.astype(jnp.float32),
        nnx.to_pure_dict(nnx.state(model)))), _tokens(5))
    self.assertLess(float(jnp.max(jnp.abs(logits - want))
                          / jnp.max(jnp.abs(want))), 5e-2)

  def test_errors(self):
    model = _model(_config())
    caches = model.init_caches(B, 8, FULL32)
    with self.assertRaisesRegex(ValueError, "disagrees with caches"):
      model(_tokens(2), caches, jnp.array([1, 0]))
    with self.assertRaisesRegex(ValueError, "len.caches.=1"):
      model(_tokens(2), caches[:1], jnp.zeros(B, jnp.int32))
    with self.assertRaisesRegex(ValueError, "tokens must be an integer"):
      model(jnp.zeros((B, 2)), caches, jnp.zeros(B, jnp.int32))
    with self.assertRaisesRegex(ValueError, "capacity=9999"):
      model.init_caches(B, 9999, FULL32)
    with self.assertRaisesRegex(ValueError, "len.cache_configs.=1"):
      model.init_caches(B, 8, (FULL32,))
    with self.assertRaisesRegex(ValueError, "cache full"):
      model(_tokens(9), caches, jnp.zeros(B, jnp.int32))


class HfLoaderTest(parameterized.TestCase):
  """The loader on checkpoints written with safetensors' numpy API."""

  def setUp(self):
    super().setUp()
    tmp = tempfile.TemporaryDirectory()
    self.addCleanup(tmp.cleanup)
    self.dir = pathlib.Path(tmp.name)

  @parameterized.named_parameters(("single", 1), ("sharded", 3))
  def test_roundtrip(self, shards):
    d = _hf_config("qwen2", tie_word_embeddings=True)
    tensors = _write_hf(self.dir, d, shards=shards)
    model = model_lib.load_hf(self.dir)
    blk = model.blocks[1]
    np.testing.assert_array_equal(
        blk.attn.k_proj.kernel[...],
        tensors["model.layers.1.self_attn.k_proj.weight"].T)
    np.testing.assert_array_equal(
        blk.attn.q_proj.bias[...],
        tensors["model.layers.1.self_attn.q_proj.bias"])
    np.testing.assert_array_equal(model.embed.embedding[...],
                                  tensors["model.embed_tokens.weight"])
    self.assertIsNone(model.lm_head)

  def test_orbax_copy_is_used_on_second_load(self):
    _write_hf(self.dir / "m", _hf_config())
    cache = self.dir / "orbax"
    self.assertFalse(hf.is_cached(self.dir / "m", cache))
    first = model_lib.load_hf(self.dir / "m", cache_dir=cache)
    self.assertTrue(hf.is_cached(self.dir / "m", cache))
    # The second load restores the orbax copy: no conversion runs.
    with mock.patch.object(hf, "from_hf_tensors",
                           side_effect=AssertionError("converted again")):
      second = model_lib.load_hf(self.dir / "m", cache_dir=cache)
    tokens = _tokens(5)
    np.testing.assert_array_equal(
        model_lib.forward_no_cache_jit(first, tokens),
        model_lib.forward_no_cache_jit(second, tokens))
    # A different dtype is a different copy.
    self.assertFalse(hf.is_cached(self.dir / "m", cache, dtype="bfloat16"))

  def test_missing_shard_is_named(self):
    _write_hf(self.dir, _hf_config(), shards=2)
    os.remove(self.dir / "model-00002-of-00002.safetensors")
    with self.assertRaisesRegex(
        FileNotFoundError,
        r"model.safetensors.index.json: shard "
        r"'model-00002-of-00002.safetensors' is missing"):
      model_lib.load_hf(self.dir)

  def test_missing_tensor_is_named(self):
    _write_hf(self.dir, _hf_config(), drop=(
        "model.layers.1.mlp.up_proj.weight",))
    with self.assertRaisesRegex(
        ValueError, r"model.safetensors: missing tensor "
        r"'model.layers.1.mlp.up_proj.weight'"):
      model_lib.load_hf(self.dir)

  def test_missing_lm_head_of_untied_model(self):
    _write_hf(self.dir, _hf_config(), drop=("lm_head.weight",))
    with self.assertRaisesRegex(ValueError, "'lm_head.weight'.*"
                                "tie_word_embeddings=false"):
      model_lib.load_hf(self.dir)

  def test_shape_mismatch_is_named(self):
    _write_hf(self.dir, _hf_config(), reshape=(
        "model.layers.0.self_attn.k_proj.weight", (64, 64)))
    with self.assertRaisesRegex(
        ValueError, r"model.safetensors: tensor "
        r"'model.layers.0.self_attn.k_proj.weight' has shape \(64, 64\), "
        r"expected \(32, 64\) = "
        r"\(num_key_value_heads\*head_dim, hidden_size\) from config.json"):
      model_lib.load_hf(self.dir)

  def test_extra_layers_disagree_with_config(self):
    _write_hf(self.dir, _hf_config(num_hidden_layers=3))
    d = json.loads((self.dir / "config.json").read_text())
    d["num_hidden_layers"] = 2
    (self.dir / "config.json").write_text(json.dumps(d))
    with self.assertRaisesRegex(ValueError, r"unexpected tensor "
                                r"'model.layers.2.*num_hidden_layers=2"):
      model_lib.load_hf(self.dir)

  def test_unsupported_architecture_is_named(self):
    _write_hf(self.dir, _hf_config())
    d = json.loads((self.dir / "config.json").read_text())
    d["architectures"] = ["GemmaForCausalLM"]
    (self.dir / "config.json").write_text(json.dumps(d))
    with self.assertRaisesRegex(
        ValueError, r"config.json: architectures=\['GemmaForCausalLM'\] is "
        "not supported"):
      model_lib.load_hf(self.dir)

  def test_missing_files(self):
    with self.assertRaisesRegex(FileNotFoundError, "config.json"):
      model_lib.load_hf(self.dir)
    (self.dir / "config.json").write_text(json.dumps(_hf_config()))
    with self.assertRaisesRegex(FileNotFoundError, "no model.safetensors"):
      model_lib.load_hf(self.dir)


if __name__ == "__main__":
  absltest.main()
