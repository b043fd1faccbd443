"""Logit parity with Hugging Face transformers (PyTorch, CPU, float32).

Notation: B batch, T tokens, V vocabulary.

Each test builds a tiny randomly initialized Llama (Llama-3.1 RoPE scaling,
untied), Mistral (explicit head_dim, sliding window) or Qwen2 (q/k/v biases,
tied embeddings) with a fixed torch seed, saves it with save_pretrained
(safetensors; also sharded), loads it with load_hf and compares logits:
max |ours - theirs| / max |theirs| < 1e-4. Skipped when torch or
transformers is missing (both are in requirements.txt).
"""

import dataclasses
import json
import pathlib
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from turboquant_jax import model as model_lib
from turboquant_jax.cache import CacheConfig
from turboquant_jax.model import layers

try:
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  import transformers.modeling_rope_utils  # pylint: disable=g-import-not-at-top
except ImportError:
  torch = transformers = None

B, T, V = 2, 24, 101
RTOL = 1e-4  # The bar: relative to the largest logit, float32.

FAMILIES = {
    "llama": dict(
        cls="LlamaConfig", model="LlamaForCausalLM", num_key_value_heads=2,
        rope_scaling=dict(rope_type="llama3", factor=8.0,
                          low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=32),
        tie_word_embeddings=False),
    "mistral": dict(
        cls="MistralConfig", model="MistralForCausalLM",
        num_key_value_heads=1, head_dim=24, sliding_window=64,
        tie_word_embeddings=False),
    "qwen2": dict(
        cls="Qwen2Config", model="Qwen2ForCausalLM", num_key_value_heads=2,
        tie_word_embeddings=True),
}


def _hf_model(family: str, seed: int = 0):
  """A tiny random HF model whose every parameter (biases, norms) is set."""
  spec = dict(FAMILIES[family])
  cls = getattr(transformers, spec.pop("cls"))
  model_cls = getattr(transformers, spec.pop("model"))
  config = cls(vocab_size=V, hidden_size=64, intermediate_size=96,
               num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=256, rms_norm_eps=1e-5,
               rope_theta=10000.0, **spec)
  config._attn_implementation = "eager"  # pylint: disable=protected-access
  torch.manual_seed(seed)
  model = model_cls(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      else:
        p.copy_(0.15 * torch.randn_like(p))
  return model


def _tokens(seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, V, (B, T))


def _hf_logits(model, tokens) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(np.array(tokens))).logits.float().numpy()


def _relative(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


@absltest.skipIf(torch is None, "needs torch and transformers")
class HfParityTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    tmp = tempfile.TemporaryDirectory()
    self.addCleanup(tmp.cleanup)
    self.dir = pathlib.Path(tmp.name)

  def _save(self, family, **save_kw):
    hf = _hf_model(family)
    hf.save_pretrained(self.dir / family, **save_kw)
    return hf, self.dir / family

  @parameterized.named_parameters(
      ("llama", "llama", None), ("mistral", "mistral", None),
      ("qwen2", "qwen2", None), ("llama_sharded", "llama", "40KB"),
      ("qwen2_sharded", "qwen2", "40KB"))
  def test_logits_match_transformers(self, family, max_shard_size):
    # Given a saved HF checkpoint (sharded when max_shard_size is set).
    kw = {} if max_shard_size is None else dict(max_shard_size=max_shard_size)
    hf, path = self._save(family, **kw)
    if max_shard_size:
      index = json.loads((path / "model.safetensors.index.json").read_text())
      self.assertGreater(len(set(index["weight_map"].values())), 2)
    tokens = _tokens()
    want = _hf_logits(hf, tokens)
    # When loaded with our loader.
    model = model_lib.load_hf(path)
    self.assertEqual(model.config.dtype, "float32")
    # Then the cache-free logits match within 1e-4 relative.
    got = model_lib.forward_no_cache_jit(model, jnp.asarray(tokens))
    self.assertLess(_relative(got, want), RTOL)
    # And so do the logits of prefill + token-by-token decoding through a
    # float32 full cache (attention reads the cache).
    caches = model.init_caches(B, T, CacheConfig(kind="full",
                                                 dtype="float32"))
    first, caches = model_lib.forward_prefill(
        model, jnp.asarray(tokens[:, :T - 4]), caches,
        jnp.full((B,), T - 4, jnp.int32))
    steps = [first]
    for t in range(T - 4, T):
      logits, caches = model_lib.forward(model, jnp.asarray(tokens[:, t:t + 1]),
                                         caches, caches[0].lengths)
      steps.append(logits)
    self.assertLess(_relative(jnp.concatenate(steps, axis=1), want), RTOL)

  def test_config_fields(self):
    _, path = self._save("mistral")
    c = model_lib.load_hf(path).config
    self.assertEqual((c.head_dim, c.n_kv_heads, c.max_seq_len,
                      c.tie_embeddings, c.attn_bias), (24, 1, 64, False,
                                                       False))
    _, path = self._save("qwen2")
    c = model_lib.load_hf(path).config
    self.assertEqual((c.attn_bias, c.out_bias, c.tie_embeddings),
                     (True, False, True))

  def test_llama3_frequencies_match_transformers(self):
    hf = _hf_model("llama")
    init = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS["llama3"]
    want, _ = init(hf.config)
    c = model_lib.ModelConfig.from_hf_config(hf.config.to_dict())
    got = layers.rope_frequencies(c.head_dim, c.rope_theta, c.rope_scaling)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-6)

  def test_rope_scaling_is_exercised(self):
    # Dropping the Llama-3.1 scaling moves logits far beyond the tolerance,
    # so the parity above really tests it.
    hf, path = self._save("llama")
    model = model_lib.load_hf(path)
    tokens = jnp.asarray(_tokens())
    want = _hf_logits(hf, np.asarray(tokens))
    cfg = model.config
    unscaled_cfg = dataclasses.replace(cfg, rope_scaling=None)
    graphdef, state = nnx.split(nnx.eval_shape(
        lambda: model_lib.Transformer(unscaled_cfg, rngs=nnx.Rngs(0))))
    nnx.replace_by_pure_dict(state, nnx.to_pure_dict(nnx.state(model)))
    unscaled = nnx.merge(graphdef, state)
    got = model_lib.forward_no_cache_jit(unscaled, tokens)
    self.assertGreater(_relative(got, want), 100 * RTOL)

  def test_bfloat16_checkpoint(self):
    # Given a checkpoint saved in bfloat16 (as Llama-3.1-8B-Instruct is).
    hf = _hf_model("qwen2")
    want = _hf_logits(hf, _tokens())
    hf = hf.to(torch.bfloat16)
    hf.save_pretrained(self.dir / "bf16")
    # When loaded: bfloat16 by default, float32 on request.
    model = model_lib.load_hf(self.dir / "bf16")
    self.assertEqual(model.config.dtype, "bfloat16")
    f32 = model_lib.load_hf(self.dir / "bf16", dtype="float32")
    # Then the weights are the stored bfloat16 values, exactly.
    stored = hf.model.layers[1].self_attn.q_proj.weight.detach().float().numpy()
    np.testing.assert_array_equal(
        np.asarray(model.blocks[1].attn.q_proj.kernel[...], np.float32),
        stored.T)
    np.testing.assert_array_equal(f32.blocks[1].attn.q_proj.kernel[...],
                                  stored.T)
    # And both run close to the float32 original.
    for m, tol in ((f32, 5e-2), (model, 5e-2)):
      got = model_lib.forward_no_cache_jit(m, jnp.asarray(_tokens()))
      self.assertLess(_relative(got, want), tol)

  def test_orbax_second_load_matches(self):
    hf, path = self._save("llama")
    first = model_lib.load_hf(path, cache_dir=self.dir / "orbax")
    second = model_lib.load_hf(path, cache_dir=self.dir / "orbax")
    tokens = jnp.asarray(_tokens())
    want = _hf_logits(hf, np.asarray(tokens))
    for m in (first, second):
      got = model_lib.forward_no_cache_jit(m, tokens)
      self.assertLess(_relative(got, want), RTOL)
    leaves = zip(jax.tree.leaves(first), jax.tree.leaves(second))
    for a, b in leaves:
      np.testing.assert_array_equal(a, b)


if __name__ == "__main__":
  absltest.main()
