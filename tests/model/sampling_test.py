"""Tests of generate (prefill + compiled decode loop) and the chat helpers.

Notation: B batch, T prompt tokens, N new tokens, V vocabulary.

Most tests use a tiny random Transformer; RealSmolLM2Test runs the real
SmolLM2-135M-Instruct when its GGUF file has been fetched.
"""

from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from turboquant_jax.cache import CacheConfig
from turboquant_jax.data import cache as data_cache
from turboquant_jax.data import smollm2
from turboquant_jax.model import config as config_lib
from turboquant_jax.model import hf
from turboquant_jax.model import sampling
from turboquant_jax.model import transformer

V = 97
FULL32 = CacheConfig(kind="full", dtype="float32")
# Ragged prompts: sequence 0 has 5 tokens, sequence 1 has 3 (+ 2 padding).
PROMPTS = np.array([[5, 17, 42, 8, 66], [23, 4, 90, 0, 0]], np.int32)
LENGTHS = np.array([5, 3], np.int32)


def _model(n_layers=2, seed=0, **kw):
  config = config_lib.ModelConfig(
      vocab_size=V, d_model=64, n_layers=n_layers, n_heads=4, n_kv_heads=2,
      head_dim=32, ffn_dim=96, rope_theta=10000.0, max_seq_len=64, **kw)
  return transformer.Transformer(config, rngs=nnx.Rngs(seed))


def _naive_greedy(model, prompt, n, stop=()):
  """Recomputes forward_no_cache on the growing sequence, token by token."""
  seq = list(prompt)
  width = len(seq) + n                 # one padded shape: one compile
  out = []
  for _ in range(n):
    padded = np.zeros((1, width), np.int32)
    padded[0, :len(seq)] = seq
    logits = transformer.forward_no_cache_jit(model, jnp.asarray(padded))
    tok = int(jnp.argmax(logits[0, len(seq) - 1]))
    out.append(tok)
    seq.append(tok)
    if tok in stop:
      break
  return out


def _count_model_calls(test):
  """Patches Transformer.__call__: counts traces and executed decode steps.
  """
  counts = dict(traces=0, steps=0)
  original = transformer.Transformer.__call__

  def bump():
    counts["steps"] += 1

  def wrapper(self, *args, **kwargs):
    counts["traces"] += 1
    jax.debug.callback(bump)
    return original(self, *args, **kwargs)

  test.enter_context(mock.patch.object(transformer.Transformer, "__call__",
                                       wrapper))
  # A cached trace from another test would bypass the patch.
  jax.clear_caches()
  return counts


class GenerateTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.model = _model()

  def _generate(self, prompts=PROMPTS, lengths=LENGTHS, n=8, **kw):
    kw.setdefault("cache_configs", FULL32)
    return sampling.generate(self.model, jnp.asarray(prompts),
                             jnp.asarray(lengths), max_new_tokens=n, **kw)

  def test_greedy_equals_naive_loop_on_ragged_prompts(self):
    # Given ragged, right-padded prompts and a float32 full cache,
    tokens, lengths = self._generate(n=10)
    # then each sequence is the argmax of a full no-cache forward pass on
    # its own growing sequence, token for token.
    self.assertEqual(tokens.shape, (2, 10))
    self.assertEqual(tokens.dtype, jnp.int32)
    np.testing.assert_array_equal(lengths, [10, 10])
    for b in range(2):
      want = _naive_greedy(self.model, PROMPTS[b, :LENGTHS[b]], 10)
      self.assertEqual(np.asarray(tokens[b]).tolist(), want)

  def test_padding_content_and_capacity_do_not_matter(self):
    tokens, _ = self._generate()
    junk = PROMPTS.copy()
    junk[1, 3:] = [11, 12]
    wide = np.pad(PROMPTS, ((0, 0), (0, 3)), constant_values=7)
    np.testing.assert_array_equal(self._generate(prompts=junk)[0], tokens)
    np.testing.assert_array_equal(
        self._generate(prompts=wide, capacity=32)[0], tokens)

  def test_stop_token_ends_one_sequence_and_others_continue(self):
    free, _ = self._generate(n=8)
    free = np.asarray(free)
    # Stop at sequence 0's third token, if sequence 1 does not emit it.
    stop = int(free[0, 2])
    self.assertNotIn(stop, free[0, :2])
    self.assertNotIn(stop, free[1])
    tokens, lengths = self._generate(n=8, stop_tokens=(stop,), pad_id=1)
    np.testing.assert_array_equal(lengths, [3, 8])
    np.testing.assert_array_equal(tokens[0], [*free[0, :3]] + [1] * 5)
    np.testing.assert_array_equal(tokens[1], free[1])
    self.assertEqual(_naive_greedy(self.model, PROMPTS[0], 8, stop=(stop,)),
                     free[0, :3].tolist())

  def test_loop_is_one_compiled_while_loop_that_exits_early(self):
    counts = _count_model_calls(self)
    tokens, _ = self._generate(n=9)
    jax.effects_barrier()
    # The decode step is traced once (not once per token) and runs N - 1
    # times: the first token comes from the prefill logits.
    self.assertEqual(counts, dict(traces=1, steps=8))
    # A second call with other prompt values does not retrace.
    other = (PROMPTS + 1) % V
    self._generate(prompts=other, n=9)
    jax.effects_barrier()
    self.assertEqual(counts, dict(traces=1, steps=16))
    # When every sequence has stopped the loop exits: stop at the first
    # token of both sequences (more than 8 stop tokens: one new trace).
    _, lengths = self._generate(n=9, stop_tokens=tuple(range(V)))
    jax.effects_barrier()
    np.testing.assert_array_equal(lengths, [1, 1])
    self.assertEqual(counts, dict(traces=2, steps=16))
    # Early exit as soon as the last sequence stops, by token 3 of each
    # (up to 8 stop tokens share the first trace).
    stops = (int(tokens[0, 2]), int(tokens[1, 3]))
    _, lengths = self._generate(n=9, stop_tokens=stops)
    jax.effects_barrier()
    want = [1 + min(i for i, t in enumerate(tokens[b].tolist())
                    if t in stops) for b in range(2)]
    np.testing.assert_array_equal(lengths, want)
    self.assertLessEqual(max(want), 4)
    self.assertEqual(counts, dict(traces=2, steps=16 + max(want) - 1))

  def test_runs_under_jit(self):
    want, want_len = self._generate(n=6, stop_tokens=(3,))

    @jax.jit
    def gen(model, prompts, lengths):
      return sampling.generate(model, prompts, lengths, max_new_tokens=6,
                               cache_configs=FULL32, stop_tokens=(3,))

    got, got_len = gen(self.model, jnp.asarray(PROMPTS),
                       jnp.asarray(LENGTHS))
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got_len, want_len)

  def test_sampling_is_reproducible_and_cold_sampling_is_greedy(self):
    kw = dict(n=8, top_k=40, top_p=0.95)
    a, _ = self._generate(key=jax.random.key(1), temperature=1.0, **kw)
    b, _ = self._generate(key=jax.random.key(1), temperature=1.0, **kw)
    c, _ = self._generate(key=jax.random.key(2), temperature=1.0, **kw)
    np.testing.assert_array_equal(a, b)
    self.assertFalse(np.array_equal(a, c))
    greedy, _ = self._generate(n=8)
    self.assertFalse(np.array_equal(a, greedy))
    cold, _ = self._generate(key=jax.random.key(3), temperature=1e-6, **kw)
    np.testing.assert_array_equal(cold, greedy)

  @parameterized.named_parameters(
      ("turboquant_4", CacheConfig(kind="turboquant", key_bits=4,
                                   value_bits=4)),
      ("turboquant_2.5_prod_window",
       CacheConfig(kind="turboquant", key_bits=3.5, value_bits=2.5,
                   key_method="prod", window=2)),
      ("kivi", CacheConfig(kind="kivi", key_bits=4, value_bits=4,
                           group_size=4)))
  def test_compressed_caches_generate(self, cache_config):
    tokens, lengths = self._generate(n=6, cache_configs=cache_config)
    self.assertEqual(tokens.shape, (2, 6))
    np.testing.assert_array_equal(lengths, [6, 6])
    self.assertTrue(bool(jnp.all((tokens >= 0) & (tokens < V))))

  def test_per_layer_cache_configs(self):
    configs = config_lib.layer_cache_configs(
        self.model.config, CacheConfig(kind="turboquant", key_bits=3,
                                       value_bits=3),
        edge_layers=1, edge=FULL32)
    tokens, _ = self._generate(n=4, cache_configs=configs)
    self.assertEqual(tokens.shape, (2, 4))

  @parameterized.named_parameters(
      ("prompt_longer_than_capacity", dict(capacity=4), "longer than"),
      ("capacity_too_small", dict(capacity=10), "too small"),
      ("capacity_over_max_seq_len", dict(n=60), "max_seq_len"),
      ("negative_temperature", dict(temperature=-1.0), "temperature"),
      ("nan_temperature", dict(temperature=float("nan")), "temperature"),
      ("sampling_without_key", dict(temperature=0.5), "key"),
      ("top_k_zero", dict(top_k=0), "top_k"),
      ("top_p_zero", dict(top_p=0.0), "top_p"),
      ("top_p_above_one", dict(top_p=1.5), "top_p"),
      ("zero_new_tokens", dict(n=0), "max_new_tokens"),
      ("stop_token_outside_vocab", dict(stop_tokens=(V,)), "stop_tokens"),
      ("empty_prompt", dict(lengths=np.array([5, 0], np.int32)),
       "prompt_lengths"),
      ("length_past_padding", dict(lengths=np.array([6, 3], np.int32)),
       "prompt_lengths"),
      ("float_prompt", dict(prompts=PROMPTS.astype(np.float32)),
       "prompt_tokens"),
      ("lengths_shape", dict(lengths=np.array([5], np.int32)),
       "prompt_lengths"))
  def test_errors(self, kwargs, message):
    with self.assertRaisesRegex(ValueError, message):
      self._generate(**kwargs)


class SampleLogitsTest(absltest.TestCase):

  def _draws(self, logits, n=4000, **kw):
    x = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (n, len(logits)))
    return np.asarray(sampling.sample_logits(x, jax.random.key(0), **kw))

  def test_greedy_is_argmax(self):
    x = jnp.array([[0.1, 3.0, 2.0], [5.0, -1.0, 5.0]])
    np.testing.assert_array_equal(sampling.sample_logits(x, None), [1, 0])

  def test_temperature_one_matches_the_softmax(self):
    p = np.array([0.5, 0.3, 0.2])
    freq = np.bincount(self._draws(np.log(p), temperature=1.0), minlength=3)
    # Binomial standard deviation at n = 4000 is at most 0.008.
    np.testing.assert_allclose(freq / 4000, p, atol=0.03)

  def test_top_k_keeps_the_k_largest(self):
    logits = np.log([0.1, 0.4, 0.2, 0.3])
    draws = self._draws(logits, temperature=1.0, top_k=2)
    self.assertEqual(set(draws.tolist()), {1, 3})
    # Renormalized: 0.4 / 0.7 and 0.3 / 0.7.
    self.assertAlmostEqual(np.mean(draws == 1), 4 / 7, delta=0.03)

  def test_top_p_keeps_the_smallest_set_reaching_p(self):
    logits = np.log([0.2, 0.5, 0.3])
    # Mass before each (sorted): 0.5 -> 0, 0.3 -> 0.5, 0.2 -> 0.8 (p = 0.5
    # itself would sit on a float rounding boundary).
    self.assertEqual(set(self._draws(logits, temperature=1.0,
                                     top_p=0.6).tolist()), {1, 2})
    self.assertEqual(set(self._draws(logits, temperature=1.0,
                                     top_p=0.45).tolist()), {1})
    self.assertEqual(set(self._draws(logits, temperature=1.0,
                                     top_p=1.0).tolist()), {0, 1, 2})


class _FakeTokenizer:
  """Characters as ids; "<|im_end|>" is one token (id 2)."""

  def encode(self, text, add_special_tokens=True):
    del add_special_tokens
    ids = []
    for part in text.split("<|im_end|>"):
      ids += [ord(ch) % 90 + 5 for ch in part] + [2]
    return mock.Mock(ids=ids[:-1])

  def token_to_id(self, text):
    return {"<|im_end|>": 2}.get(text)

  def decode(self, ids, skip_special_tokens=False):
    del skip_special_tokens
    return "".join(chr(i + 60) for i in ids)


_TEMPLATE = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}<|im_end|>"
             "{% endfor %}{% if add_generation_prompt %}<a>{% endif %}")


class ChatHelpersTest(absltest.TestCase):

  def test_prompt_ids_and_stop_tokens(self):
    tok = _FakeTokenizer()
    ids = sampling.chat_prompt_ids(tok, _TEMPLATE,
                                   [{"role": "u", "content": "hi"}])
    self.assertEqual(ids, tok.encode("<u>hi<|im_end|><a>").ids)
    self.assertEqual(ids.count(2), 1)
    self.assertEqual(sampling.chat_stop_tokens(tok, {"eos_token_id": 1}),
                     (1, 2))
    self.assertEqual(sampling.chat_stop_tokens(tok, {"eos_token_id": 2}),
                     (2,))
    self.assertEqual(sampling.chat_stop_tokens(tok, {}, end_tokens=()), ())

  def test_chat_reply_matches_generate_and_drops_the_stop_token(self):
    model, tok = _model(), _FakeTokenizer()
    messages = [{"role": "u", "content": "hello"}]
    ids = sampling.chat_prompt_ids(tok, _TEMPLATE, messages)
    prompt = np.zeros((1, 16), np.int32)      # padded as chat_reply pads
    prompt[0, :len(ids)] = ids
    free, _ = sampling.generate(model, jnp.asarray(prompt),
                                jnp.asarray([len(ids)]), max_new_tokens=6,
                                cache_configs=FULL32)
    stop = int(free[0, 3])
    first = np.asarray(free[0]).tolist().index(stop)
    text, new = sampling.chat_reply(model, tok, _TEMPLATE, messages,
                                    stop_tokens=(stop,), max_new_tokens=6,
                                    cache_configs=FULL32, bucket=16)
    self.assertEqual(new, np.asarray(free[0, :first + 1]).tolist())
    self.assertEqual(text, tok.decode(new[:-1]))


class RealSmolLM2Test(parameterized.TestCase):
  """Greedy continuations of the real SmolLM2-135M-Instruct."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.gguf = cls.model = None
    if smollm2.smollm2_path().is_file():
      cls.gguf = smollm2.load_smollm2()
      config = config_lib.ModelConfig.from_hf_config(cls.gguf.hf_config)
      cls.model = hf.from_hf_tensors(config, cls.gguf.weights)

  def setUp(self):
    super().setUp()
    if self.model is None:
      self.skipTest(f"SmolLM2 GGUF not at {smollm2.smollm2_path()}; run "
                    f"`{data_cache.SETUP_COMMAND}`")

  @parameterized.named_parameters(
      ("full", FULL32),
      ("turboquant_4bit", CacheConfig(kind="turboquant", key_bits=4,
                                      value_bits=4)))
  def test_capital_of_france(self, cache_config):
    tok = self.gguf.tokenizer
    ids = tok.encode("The capital of France is").ids
    tokens, lengths = sampling.generate(
        self.model, jnp.asarray([ids]), jnp.asarray([len(ids)]),
        max_new_tokens=6, cache_configs=cache_config,
        stop_tokens=(self.gguf.special_tokens["eos_token_id"],))
    text = tok.decode(np.asarray(tokens[0, :int(lengths[0])]).tolist())
    self.assertIn("Paris", text)


if __name__ == "__main__":
  absltest.main()
