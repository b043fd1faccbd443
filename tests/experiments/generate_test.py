"""Tests of the chat experiment on a tiny random model (no GGUF needed)."""

import json
import pathlib
import sys
import tempfile
import types

from absl.testing import absltest
from flax import nnx

# configs/ and experiments/ are top-level folders of the checkout, not part
# of the installed package: make them importable under any test runner.
_REPO = pathlib.Path(__file__).resolve().parents[2]
if str(_REPO) not in sys.path:
  sys.path.insert(0, str(_REPO))

# pylint: disable=g-import-not-at-top,wrong-import-position
from configs import generate as generate_config
from experiments import generate
from turboquant_jax.cache import CacheConfig
from turboquant_jax.model import config as config_lib
from turboquant_jax.model import transformer
# pylint: enable=g-import-not-at-top,wrong-import-position

V = 97
_TEMPLATE = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}|"
             "{% endfor %}{% if add_generation_prompt %}<a>{% endif %}")


class _CharTokenizer:
  """One id per character (mod V); decodes ids to letters."""

  def encode(self, text, add_special_tokens=True):
    del add_special_tokens
    return types.SimpleNamespace(ids=[ord(c) % V for c in text])

  def token_to_id(self, text):
    del text
    return None

  def decode(self, ids, skip_special_tokens=False):
    del skip_special_tokens
    return "".join(chr(ord("a") + i % 26) for i in ids)


def _bot(n_layers=3):
  config = config_lib.ModelConfig(
      vocab_size=V, d_model=64, n_layers=n_layers, n_heads=4, n_kv_heads=2,
      head_dim=32, ffn_dim=96, max_seq_len=256)
  model = transformer.Transformer(config, rngs=nnx.Rngs(0))
  return generate.Chatbot(model=model, tokenizer=_CharTokenizer(),
                          chat_template=_TEMPLATE, stop_tokens=(3,),
                          name="tiny")


class GenerateExperimentTest(absltest.TestCase):

  def test_config_args_and_per_layer_caches(self):
    config = generate_config.get_config(
        "cache=turboquant,key_bits=3,value_bits=2.5,edge_layers=1")
    self.assertEqual((config.key_bits, config.value_bits), (3.0, 2.5))
    model_config = _bot().model.config
    configs = generate.cache_configs(config, model_config)
    self.assertEqual([c.kind for c in configs],
                     ["full", "turboquant", "full"])
    self.assertEqual(configs[1], CacheConfig(kind="turboquant", key_bits=3,
                                             value_bits=2.5))
    config.edge_cache = "turboquant"
    configs = generate.cache_configs(config, model_config)
    self.assertEqual((configs[0].key_bits, configs[2].value_bits), (8, 8))
    with self.assertRaisesRegex(ValueError, "unknown config arg"):
      generate_config.get_config("bits=3")

  def test_run_prints_and_writes_a_row(self):
    config = generate_config.get_config(
        "cache=turboquant,key_bits=4,value_bits=3,edge_layers=1")
    config.max_new_tokens = 5
    lines = []
    with tempfile.TemporaryDirectory() as workdir:
      row = generate.run(config, "hello", workdir, bot=_bot(),
                         echo=lines.append)
      written = [json.loads(line) for line in
                 (pathlib.Path(workdir) / "results.jsonl").open()]
      self.assertTrue((pathlib.Path(workdir) / "config.json").is_file())
    self.assertLen(written, 1)
    self.assertEqual(written[0]["reply"], row["reply"])
    self.assertBetween(row["new_tokens"], 1, 5)
    self.assertGreater(row["tokens_per_s"], 0)
    mem = row["memory"]
    # Layers 0 and 2 hold bf16 keys and values: 2 * 2 heads * 32 * 2 bytes
    # (+ the i32 length, shared by the 64 + 5 token capacity).
    self.assertAlmostEqual(mem["layer0"]["bytes_per_token"], 256 + 4 / 69)
    self.assertBetween(mem["bytes_per_token"] - 512, 30, 100)
    self.assertIn("assistant: ", "\n".join(lines))
    self.assertIn("tokens/s", "\n".join(lines))
    self.assertIn("B/token", "\n".join(lines))

  def test_interactive_keeps_the_conversation(self):
    config = generate_config.get_config("cache=full")
    config.max_new_tokens = 3
    prompts = iter(["hi", "and then?"])

    def read(_):
      try:
        return next(prompts)
      except StopIteration:
        raise EOFError() from None

    lines = []
    history = generate.interactive(config, bot=_bot(), read=read,
                                   echo=lines.append)
    self.assertEqual([m["role"] for m in history],
                     ["user", "assistant", "user", "assistant"])
    self.assertEqual(history[2]["content"], "and then?")
    self.assertLen([x for x in lines if x.startswith("assistant> ")], 2)


if __name__ == "__main__":
  absltest.main()
