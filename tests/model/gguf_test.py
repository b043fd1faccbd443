"""Tests for the GGUF loader and the chat template renderer.

Notation: N query heads, K key/value heads, H head dim, D model dim, F FFN
dim, V vocabulary. Synthetic GGUF files are written with gguf.GGUFWriter;
the real SmolLM2 file is used when `python -m turboquant_jax.data.fetch`
has run.
"""

import pathlib
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import gguf
import numpy as np
from tokenizers import pre_tokenizers

from turboquant_jax.data import austen
from turboquant_jax.data import cache
from turboquant_jax.data import smollm2
from turboquant_jax.model import chat
from turboquant_jax.model import gguf as gguf_lib

# SmolLM2-135M-Instruct's `tokenizer.chat_template` (Apache-2.0).
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] "
    "!= 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant "
    "named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")
_SMOLLM2_SYSTEM = ("<|im_start|>system\nYou are a helpful AI assistant named "
                   "SmolLM, trained by Hugging Face<|im_end|>\n")

_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d",
           "Ġwor ld"]


def _tiny_vocab() -> tuple[list[str], list[str]]:
  """(tokens, merges): 3 specials, the 256 byte symbols, merge products."""
  alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
  tokens = _SPECIALS + alphabet
  for merge in _MERGES:
    tokens.append(merge.replace(" ", ""))
  return tokens, list(_MERGES)


def _rope_half_split(x: np.ndarray, pos: int, theta: float) -> np.ndarray:
  """HF/NeoX RoPE of x [..., H]: rotates the pairs (x[i], x[i + H/2])."""
  h = x.shape[-1]
  angle = pos * theta ** (-np.arange(0, h, 2) / h)
  a, b = x[..., :h // 2], x[..., h // 2:]
  cos, sin = np.cos(angle), np.sin(angle)
  return np.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)


def _rope_interleaved(x: np.ndarray, pos: int, theta: float) -> np.ndarray:
  """llama.cpp/GPT-J RoPE of x [..., H]: rotates (x[2i], x[2i + 1])."""
  h = x.shape[-1]
  angle = pos * theta ** (-np.arange(0, h, 2) / h)
  a, b = x[..., 0::2], x[..., 1::2]
  cos, sin = np.cos(angle), np.sin(angle)
  out = np.empty_like(x)
  out[..., 0::2] = a * cos - b * sin
  out[..., 1::2] = a * sin + b * cos
  return out


class PermutationTest(parameterized.TestCase):

  def test_small_case_by_hand(self):
    # One head of size 4: HF rows [r0 r1 | r2 r3] (halves) are stored by
    # llama.cpp as the pairs (r0, r2), (r1, r3).
    w = np.arange(8).reshape(8, 1)   # 2 heads of H=4
    np.testing.assert_array_equal(gguf_lib.permute_qk(w, 2)[:, 0],
                                  [0, 2, 1, 3, 4, 6, 5, 7])
    np.testing.assert_array_equal(
        gguf_lib.unpermute_qk(np.array([0, 2, 1, 3, 4, 6, 5, 7])[:, None], 2),
        w)

  @parameterized.parameters((9, 64, 576), (3, 64, 576), (4, 8, 5))
  def test_unpermute_inverts_permute(self, heads, head_dim, d):
    w = np.random.default_rng(0).normal(size=(heads * head_dim, d))
    np.testing.assert_array_equal(
        gguf_lib.unpermute_qk(gguf_lib.permute_qk(w, heads), heads), w)
    np.testing.assert_array_equal(
        gguf_lib.permute_qk(gguf_lib.unpermute_qk(w, heads), heads), w)

  def test_rejects_odd_heads(self):
    with self.assertRaisesRegex(ValueError, "num_heads=3"):
      gguf_lib.unpermute_qk(np.zeros((10, 4)), 3)

  @parameterized.parameters(0, 1, 7, 1000)
  def test_interleaved_rope_on_gguf_rows_is_half_split_on_hf_rows(self, pos):
    # Given HF-layout q/k weights (N=4 query heads, K=2 kv heads, H=8) and
    # their llama.cpp-permuted copies.
    rng = np.random.default_rng(pos)
    n, k, h, d, theta = 4, 2, 8, 16, 100_000.0
    wq_hf, wk_hf = rng.normal(size=(n * h, d)), rng.normal(size=(k * h, d))
    wq_gguf, wk_gguf = gguf_lib.permute_qk(wq_hf, n), gguf_lib.permute_qk(
        wk_hf, k)
    x, y = rng.normal(size=d), rng.normal(size=d)
    # When q is rotated interleaved on GGUF rows and half-split on HF rows.
    q_int = _rope_interleaved((wq_gguf @ x).reshape(n, h), pos, theta)
    q_half = _rope_half_split((wq_hf @ x).reshape(n, h), pos, theta)
    # Then they are the same vector up to the row permutation,
    np.testing.assert_allclose(
        q_int.reshape(-1), gguf_lib.permute_qk(q_half.reshape(-1), n),
        rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(
        gguf_lib.unpermute_qk(q_int.reshape(-1), n), q_half.reshape(-1),
        rtol=1e-12, atol=1e-12)
    # and the attention logits (query at pos, key at 3) agree, with GQA.
    k_int = _rope_interleaved((wk_gguf @ y).reshape(k, h), 3, theta)
    k_half = _rope_half_split((wk_hf @ y).reshape(k, h), 3, theta)
    groups = n // k
    logits_int = np.einsum("nh,nh->n", q_int, np.repeat(k_int, groups, 0))
    logits_half = np.einsum("nh,nh->n", q_half, np.repeat(k_half, groups, 0))
    np.testing.assert_allclose(logits_int, logits_half, rtol=1e-10)
    # While the half-split rotation on GGUF rows is wrong (the bug).
    q_wrong = _rope_half_split((wq_gguf @ x).reshape(n, h), pos, theta)
    k_wrong = _rope_half_split((wk_gguf @ y).reshape(k, h), 3, theta)
    logits_wrong = np.einsum("nh,nh->n", q_wrong,
                             np.repeat(k_wrong, groups, 0))
    if pos != 3:
      self.assertGreater(np.abs(logits_wrong - logits_half).max(), 1e-3)


class _TinyGGUF:
  """A 1-layer llama GGUF: D=32, N=4, K=2, H=8, F=48, F32 weights."""

  D, N, K, H, F = 32, 4, 2, 8, 48

  def __init__(self, seed: int = 0, tied: bool = True):
    rng = np.random.default_rng(seed)
    self.tokens, self.merges = _tiny_vocab()
    self.V = len(self.tokens)
    d, f, qd, kd = self.D, self.F, self.N * self.H, self.K * self.H

    def rand(*shape):
      return rng.normal(size=shape).astype(np.float32)

    # HF names and layouts: what load_gguf must return.
    self.hf = {
        "model.embed_tokens.weight": rand(self.V, d),
        "model.norm.weight": rand(d),
        "model.layers.0.input_layernorm.weight": rand(d),
        "model.layers.0.post_attention_layernorm.weight": rand(d),
        "model.layers.0.self_attn.q_proj.weight": rand(qd, d),
        "model.layers.0.self_attn.k_proj.weight": rand(kd, d),
        "model.layers.0.self_attn.v_proj.weight": rand(kd, d),
        "model.layers.0.self_attn.o_proj.weight": rand(d, qd),
        "model.layers.0.mlp.gate_proj.weight": rand(f, d),
        "model.layers.0.mlp.up_proj.weight": rand(f, d),
        "model.layers.0.mlp.down_proj.weight": rand(d, f),
    }
    if not tied:
      self.hf["lm_head.weight"] = rand(self.V, d)
    # GGUF names; q/k rows permuted as llama.cpp's converter does.
    gguf_names = {"model.embed_tokens.weight": "token_embd.weight",
                  "model.norm.weight": "output_norm.weight",
                  "lm_head.weight": "output.weight"}
    for ours, theirs in [("input_layernorm", "attn_norm"),
                         ("post_attention_layernorm", "ffn_norm"),
                         ("self_attn.q_proj", "attn_q"),
                         ("self_attn.k_proj", "attn_k"),
                         ("self_attn.v_proj", "attn_v"),
                         ("self_attn.o_proj", "attn_output"),
                         ("mlp.gate_proj", "ffn_gate"),
                         ("mlp.up_proj", "ffn_up"),
                         ("mlp.down_proj", "ffn_down")]:
      gguf_names[f"model.layers.0.{ours}.weight"] = f"blk.0.{theirs}.weight"
    self.tensors = {}
    for name, arr in self.hf.items():
      if name.endswith("q_proj.weight"):
        arr = gguf_lib.permute_qk(arr, self.N)
      elif name.endswith("k_proj.weight"):
        arr = gguf_lib.permute_qk(arr, self.K)
      self.tensors[gguf_names[name]] = arr

  def write(self, path: pathlib.Path, arch: str = "llama",
            tensor_types: dict[str, gguf.GGMLQuantizationType] | None = None,
            **metadata) -> pathlib.Path:
    """Writes the file; `metadata` overrides (None drops a key)."""
    w = gguf.GGUFWriter(str(path), arch)
    meta = {
        "block_count": 1, "context_length": 128, "embedding_length": self.D,
        "feed_forward_length": self.F, "head_count": self.N,
        "head_count_kv": self.K, "rope_freq_base": 100_000.0,
        "layer_norm_rms_eps": 1e-5, "rope_dimension_count": self.H,
        "vocab_size": self.V, "tokenizer_model": "gpt2",
        "tokenizer_pre": "smollm", "token_list": self.tokens,
        "token_types": [gguf.TokenType.CONTROL] * len(_SPECIALS)
                       + [gguf.TokenType.NORMAL]
                       * (self.V - len(_SPECIALS)),
        "token_merges": self.merges, "bos_token_id": 1, "eos_token_id": 2,
        "pad_token_id": 2, "add_bos_token": False,
        "chat_template": SMOLLM2_TEMPLATE,
    }
    meta.update(metadata)
    for key, value in meta.items():
      if value is not None:
        getattr(w, f"add_{key}")(value)
    for name, arr in self.tensors.items():
      qtype = (tensor_types or {}).get(name)
      if qtype is None:
        w.add_tensor(name, arr)
      else:
        w.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


class _TempDirTestCase(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.tmp = pathlib.Path(
        self.enter_context(tempfile.TemporaryDirectory()))


class TokenizerTest(_TempDirTestCase):

  def setUp(self):
    super().setUp()
    path = _TinyGGUF().write(self.tmp / "tiny.gguf")
    self.model = gguf_lib.load_gguf(path)
    self.tok = self.model.tokenizer

  def test_round_trip_and_merges(self):
    text = "hello world 2024, Émile said.\n\n<|im_start|>user\nhi<|im_end|>"
    enc = self.tok.encode(text)
    self.assertEqual(self.tok.decode(enc.ids, skip_special_tokens=False),
                     text)
    # The merges apply, digits are split one by one (pre "smollm"), and
    # special tokens are single ids.
    self.assertEqual(enc.tokens[:5], ["hello", "Ġworld", "Ġ", "2", "0"])
    self.assertIn(1, enc.ids)
    self.assertEqual(self.tok.token_to_id("<|im_start|>"), 1)
    self.assertEqual(enc.ids.count(2), 1)

  def test_special_tokens_and_template(self):
    self.assertEqual(self.model.special_tokens,
                     {"bos_token_id": 1, "eos_token_id": 2,
                      "pad_token_id": 2})
    self.assertEqual(self.model.chat_template, SMOLLM2_TEMPLATE)
    self.assertEqual(self.tok.get_vocab_size(), len(_tiny_vocab()[0]))
    # No BOS is added unless the metadata asks for it.
    self.assertNotEqual(self.tok.encode("hello").ids[0], 1)

  def test_add_bos_token(self):
    path = _TinyGGUF().write(self.tmp / "bos.gguf", add_bos_token=True)
    tok = gguf_lib.load_gguf(path).tokenizer
    ids = tok.encode("hello").ids
    self.assertEqual(ids[0], 1)
    self.assertEqual(tok.decode(ids), "hello")

  def test_unsupported_tokenizer(self):
    path = _TinyGGUF().write(self.tmp / "spm.gguf", tokenizer_model="llama")
    with self.assertRaisesRegex(NotImplementedError, "'llama'"):
      gguf_lib.load_gguf(path)


class LoadTest(_TempDirTestCase):

  def test_names_shapes_values_and_unpermutation(self):
    # Given a 1-layer F32 GGUF whose q/k rows are in llama.cpp's order.
    tiny = _TinyGGUF()
    model = gguf_lib.load_gguf(tiny.write(self.tmp / "tiny.gguf"))
    # Then every weight comes back under its HF name, in HF layout, exactly,
    # q_proj and k_proj un-permuted.
    self.assertEqual(set(model.weights), set(tiny.hf))
    for name, want in tiny.hf.items():
      got = model.weights[name]
      self.assertEqual(got.dtype, np.float32, name)
      np.testing.assert_array_equal(got, want, err_msg=name)
    self.assertFalse(np.array_equal(
        tiny.tensors["blk.0.attn_q.weight"],
        model.weights["model.layers.0.self_attn.q_proj.weight"]))

  def test_hf_config(self):
    tiny = _TinyGGUF()
    config = gguf_lib.load_gguf(tiny.write(self.tmp / "t.gguf")).hf_config
    want = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": 32, "intermediate_size": 48,
            "num_hidden_layers": 1, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 8, "hidden_act": "silu",
            "rms_norm_eps": 1e-5, "rope_theta": 100_000.0,
            "rope_scaling": None, "vocab_size": tiny.V,
            "max_position_embeddings": 128, "tie_word_embeddings": True,
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    self.assertEqual({k: config[k] for k in want}, want)
    self.assertEqual(config["gguf_source"]["tensor_types"], {"F32": 11})

  def test_untied_output(self):
    tiny = _TinyGGUF(tied=False)
    model = gguf_lib.load_gguf(tiny.write(self.tmp / "untied.gguf"))
    self.assertFalse(model.hf_config["tie_word_embeddings"])
    np.testing.assert_array_equal(model.weights["lm_head.weight"],
                                  tiny.hf["lm_head.weight"])

  def test_transposed_token_embedding_is_accepted(self):
    tiny = _TinyGGUF()
    tiny.tensors["token_embd.weight"] = np.ascontiguousarray(
        tiny.hf["model.embed_tokens.weight"].T)   # [D, V]
    model = gguf_lib.load_gguf(tiny.write(self.tmp / "t.gguf"))
    np.testing.assert_array_equal(model.weights["model.embed_tokens.weight"],
                                  tiny.hf["model.embed_tokens.weight"])

  def test_quantized_tensors_dequantize(self):
    tiny = _TinyGGUF()
    q8, q41 = gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_1
    model = gguf_lib.load_gguf(tiny.write(
        self.tmp / "q.gguf", tensor_types={"token_embd.weight": q8,
                                           "blk.0.attn_q.weight": q41}))
    emb = model.weights["model.embed_tokens.weight"]
    self.assertEqual(emb.dtype, np.float32)
    # Q8_0: 8-bit codes with a per-32 scale; errors well under 2% of range.
    np.testing.assert_allclose(emb, tiny.hf["model.embed_tokens.weight"],
                               atol=0.02 * np.abs(emb).max())
    q = model.weights["model.layers.0.self_attn.q_proj.weight"]
    # Q4_1: 16 levels per 32 values; un-permuted like the F32 case.
    np.testing.assert_allclose(
        q, tiny.hf["model.layers.0.self_attn.q_proj.weight"],
        atol=0.2 * np.abs(q).max())
    self.assertEqual(model.hf_config["gguf_source"]["tensor_types"],
                     {"F32": 9, "Q8_0": 1, "Q4_1": 1})

  @parameterized.named_parameters(
      ("wrong_k_rows", "blk.0.attn_k.weight", np.zeros((8, 32), np.float32),
       ValueError, "'blk.0.attn_k.weight'.*expected \\(16, 32\\)"),
      ("wrong_vocab", "token_embd.weight", np.zeros((5, 32), np.float32),
       ValueError, "'token_embd.weight'"),
      ("unknown_tensor", "blk.0.attn_q.bias", np.zeros(32, np.float32),
       ValueError, "blk.0.attn_q.bias"),
      ("llama3_rope", "rope_freqs.weight", np.ones(4, np.float32),
       NotImplementedError, "rope_freqs"),
      ("missing_tensor", "blk.0.ffn_up.weight", None, ValueError,
       "lacks 1 tensors.*mlp.up_proj"),
  )
  def test_rejects(self, name, arr, error, message):
    tiny = _TinyGGUF()
    if arr is None:
      del tiny.tensors[name]
    else:
      tiny.tensors[name] = arr
    with self.assertRaisesRegex(error, message):
      gguf_lib.load_gguf(tiny.write(self.tmp / "bad.gguf"))

  def test_rejects_other_architectures(self):
    path = _TinyGGUF().write(self.tmp / "q.gguf", arch="qwen2")
    with self.assertRaisesRegex(NotImplementedError, "arch='qwen2'"):
      gguf_lib.load_gguf(path)


class ChatTemplateTest(parameterized.TestCase):

  def test_smollm2_user_turn(self):
    text = chat.apply_chat_template(
        SMOLLM2_TEMPLATE, [{"role": "user", "content": "Who is Emma?"}])
    self.assertEqual(text, _SMOLLM2_SYSTEM + "<|im_start|>user\nWho is "
                     "Emma?<|im_end|>\n<|im_start|>assistant\n")

  def test_smollm2_own_system_and_no_generation_prompt(self):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}]
    text = chat.apply_chat_template(SMOLLM2_TEMPLATE, messages,
                                    add_generation_prompt=False)
    self.assertEqual(text, "<|im_start|>system\nBe brief.<|im_end|>\n"
                     "<|im_start|>user\nHi<|im_end|>\n"
                     "<|im_start|>assistant\nHello.<|im_end|>\n")

  def test_raise_exception_and_bad_input(self):
    with self.assertRaisesRegex(Exception, "no system"):
      chat.apply_chat_template(
          "{{ raise_exception('no system') }}", [{"role": "user"}])
    with self.assertRaisesRegex(ValueError, "role"):
      chat.apply_chat_template(SMOLLM2_TEMPLATE, [{"content": "x"}])


class RealSmolLM2Test(absltest.TestCase):
  """The real SmolLM2-135M-Instruct GGUF, when it has been fetched."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    path = smollm2.smollm2_path()
    cls.model = gguf_lib.load_gguf(path) if path.is_file() else None

  def setUp(self):
    super().setUp()
    if self.model is None:
      self.skipTest(f"SmolLM2 GGUF not at {smollm2.smollm2_path()}; run "
                    f"`{cache.SETUP_COMMAND}`")

  def test_config(self):
    c = self.model.hf_config
    want = {"num_hidden_layers": 30, "hidden_size": 576,
            "num_attention_heads": 9, "num_key_value_heads": 3,
            "head_dim": 64, "intermediate_size": 1536, "vocab_size": 49152,
            "rope_theta": 100_000.0, "rms_norm_eps": 1e-5,
            "max_position_embeddings": 8192, "tie_word_embeddings": True}
    self.assertEqual({k: c[k] for k in want}, want)
    self.assertEqual(c["gguf_source"]["file_type"], "MOSTLY_Q4_1")

  def test_weights(self):
    w = self.model.weights
    self.assertLen(w, 2 + 30 * 9)
    self.assertNotIn("lm_head.weight", w)
    self.assertEqual(w["model.embed_tokens.weight"].shape, (49152, 576))
    self.assertEqual(w["model.layers.29.self_attn.q_proj.weight"].shape,
                     (576, 576))
    self.assertEqual(w["model.layers.0.self_attn.k_proj.weight"].shape,
                     (192, 576))
    self.assertEqual(w["model.layers.0.mlp.down_proj.weight"].shape,
                     (576, 1536))
    self.assertEqual(sum(a.size for a in w.values()), 134_515_008)
    self.assertTrue(all(np.isfinite(a).all() for a in w.values()))

  def test_tokenizer_and_chat(self):
    self.assertEqual(self.model.special_tokens,
                     {"bos_token_id": 1, "eos_token_id": 2,
                      "unk_token_id": 0, "pad_token_id": 2})
    self.assertEqual(self.model.chat_template, SMOLLM2_TEMPLATE)
    prompt = chat.apply_chat_template(self.model.chat_template,
                                      [{"role": "user", "content": "Hi"}])
    ids = self.model.tokenizer.encode(prompt).ids
    self.assertEqual(ids[0], 1)                 # <|im_start|>
    self.assertEqual(ids.count(2), 2)           # two <|im_end|>
    self.assertEqual(self.model.tokenizer.decode(
        ids, skip_special_tokens=False), prompt)

  def test_emma_round_trips(self):
    if not austen.is_fetched():
      self.skipTest(f"Austen novels not fetched; run `{cache.SETUP_COMMAND}`")
    emma = austen.load_book("emma")
    start = emma.index("Emma Woodhouse, handsome")
    paragraph = emma[start:emma.index("\n\n", start)]
    tok = self.model.tokenizer
    ids = tok.encode(paragraph).ids
    self.assertEqual(tok.decode(ids), paragraph)
    self.assertBetween(len(ids), len(paragraph.split()),
                       2 * len(paragraph.split()))
    # A longer stretch, with dialogue, dashes and digits, also round-trips.
    chunk = emma[:50_000]
    self.assertEqual(tok.decode(tok.encode(chunk).ids), chunk)


if __name__ == "__main__":
  absltest.main()
