"""Tests of the perplexity experiment on a tiny random model.

Notation: N sequences, L tokens each, P prefill tokens.

The chunked fast path must equal token-by-token decoding wherever the
experiment uses it, and the driver must run end to end and resume.
"""

import json
import math
import pathlib
import shutil
import sys
import tempfile
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax
import numpy as np

# configs/ and experiments/ are top-level folders of the checkout, not part
# of the installed package: make them importable under any test runner.
_REPO = pathlib.Path(__file__).resolve().parents[2]
if str(_REPO) not in sys.path:
  sys.path.insert(0, str(_REPO))

# pylint: disable=g-import-not-at-top,wrong-import-position
from configs import perplexity as perplexity_config
from experiments import perplexity
from turboquant_jax import model as model_lib
from turboquant_jax import results
from turboquant_jax.cache import CacheConfig
# pylint: enable=g-import-not-at-top,wrong-import-position

N, L, P = 2, 40, 8

_REQUIRED = ("model", "cache", "kind", "key_bits", "value_bits", "key_method",
             "window", "edge_layers", "bits_per_coordinate",
             "bytes_per_token", "tokens", "nll", "ppl", "rel_to_full",
             "seconds", "path")


def _model_and_tokens():
  model = model_lib.Transformer(perplexity.tiny_model_config(),
                                rngs=nnx.Rngs(0))
  tokens = np.asarray(jax.random.randint(jax.random.key(1), (N, L), 0,
                                         model.config.vocab_size))
  return model, tokens


def _nll(model, tokens, cfg, path):
  configs = (cfg,) * model.config.n_layers
  nll, _, taken = perplexity.evaluate(model, tokens, configs, prefill=P,
                                      path=path, decode_segment=8,
                                      key=jax.random.key(3))
  return nll, taken


class FastPathTest(parameterized.TestCase):
  """Chunked appends equal decoding exactly where the experiment uses them."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.model, cls.tokens = _model_and_tokens()

  @parameterized.named_parameters(
      ("full_f32", CacheConfig(kind="full", dtype="float32")),
      ("tq3", CacheConfig(kind="turboquant", key_bits=3, value_bits=3,
                          norm_correction=False)),
      ("tq_k4v2_prod", CacheConfig(kind="turboquant", key_bits=4,
                                   value_bits=2, key_method="prod")),
      ("tq2.5_centered", CacheConfig(kind="turboquant", key_bits=2.5,
                                     value_bits=2.5, center_keys=True)),
      # 8-bit norms (range fixed by the prefill) and a sink read exactly.
      ("tq4_norm8_sink", CacheConfig(kind="turboquant", key_bits=4,
                                     value_bits=4, norm_bits=8, sink=4)),
  )
  def test_chunked_equals_token_by_token(self, cfg):
    # Given a cache where every appended token is quantized on its own,
    # when the tokens after the prefill go in as one chunk or one by one,
    # then every position's NLL is the same (up to float summation order).
    self.assertTrue(perplexity.exact_chunks((cfg,)))
    chunked, path = _nll(self.model, self.tokens, cfg, "auto")
    self.assertEqual(path, "chunk")
    decoded, path = _nll(self.model, self.tokens, cfg, "decode")
    self.assertEqual(path, "decode")
    self.assertEqual(chunked.shape, (N, L - 1))
    np.testing.assert_allclose(chunked, decoded, rtol=0, atol=2e-4)

  def test_full_cache_equals_plain_forward(self):
    # The protocol's NLL under a float32 full cache is the model's own.
    cfg = CacheConfig(kind="full", dtype="float32")
    nll, _ = _nll(self.model, self.tokens, cfg, "auto")
    logits = model_lib.forward_no_cache_jit(self.model, self.tokens)
    logp = jax.nn.log_softmax(logits, axis=-1)
    want = -np.take_along_axis(np.asarray(logp[:, :-1]),
                               self.tokens[:, 1:, None], axis=-1)[..., 0]
    np.testing.assert_allclose(nll, want, rtol=0, atol=2e-4)

  @parameterized.named_parameters(
      ("window", CacheConfig(kind="turboquant", key_bits=2, value_bits=2,
                             window=4)),
      ("kivi", CacheConfig(kind="kivi", key_bits=2, value_bits=2,
                           group_size=8)),
  )
  def test_window_and_kivi_decode(self, cfg):
    # A window (relative to the current length) and KIVI's key groups make
    # a chunk differ from decoding: auto takes the decode path, and forcing
    # chunks would change the numbers.
    self.assertFalse(perplexity.exact_chunks((cfg,)))
    decoded, path = _nll(self.model, self.tokens, cfg, "auto")
    self.assertEqual(path, "decode")
    chunked, _ = _nll(self.model, self.tokens, cfg, "chunk")
    self.assertGreater(np.abs(chunked - decoded).max(), 1e-3)

  def test_edge_layers_and_description(self):
    spec = perplexity_config.cache(
        "x", "lever", key_bits=4, value_bits=2, center_keys=True,
        edge_layers=1, edge=dict(kind="full"))
    configs = perplexity.layer_configs(self.model.config, spec)
    self.assertEqual([c.kind for c in configs],
                     ["full", "turboquant", "full"])
    self.assertTrue(configs[1].center_keys)
    self.assertEqual(perplexity.describe(spec),
                     "TurboQuant K4/V2-bit, norm corr., centered keys; "
                     "first/last 1 layer(s): full precision (bfloat16)")

  def test_center_skip_reaches_the_cache_config(self):
    spec = perplexity_config.cache("x", "lever", key_bits=4, value_bits=4,
                                   center_keys=True, center_skip=1)
    configs = perplexity.layer_configs(self.model.config, spec)
    self.assertEqual({(c.center_keys, c.center_skip) for c in configs},
                     {(True, 1)})
    self.assertIn("mean without the first 1", perplexity.describe(spec))

  def test_norm_bits_and_sink_reach_the_cache_config(self):
    spec = perplexity_config.cache("x", "lever", key_bits=4, value_bits=4,
                                   norm_bits=8, sink=4, window=2)
    configs = perplexity.layer_configs(self.model.config, spec)
    self.assertEqual({(c.norm_bits_of("keys"), c.norm_bits_of("values"),
                       c.sink) for c in configs}, {(8, 8, 4)})
    self.assertEqual(perplexity.describe(spec),
                     "TurboQuant 4-bit, norm corr., 8-bit log norms, first "
                     "4 tokens fp (sink), 2-token fp window")
    spec = perplexity_config.cache("x", "lever", key_bits=4, value_bits=4,
                                   value_norm_bits=8)
    self.assertIn("8-bit log value norms", perplexity.describe(spec))
    self.assertEqual(perplexity.layer_configs(self.model.config, spec)[0]
                     .norm_bits_of("keys"), 16)


class DefaultConfigTest(absltest.TestCase):

  def test_default_sweep_is_valid(self):
    # Every entry builds valid CacheConfigs; the noise checks name entries.
    config = perplexity_config.get_config()
    items = perplexity.work_items(config)
    self.assertEqual(items[0][0]["name"], config.reference)
    self.assertLen(items, len(config.caches) + len(config.seed_checks)
                   * len(config.extra_seeds) + len(config.decode_checks))
    mc = perplexity.tiny_model_config()
    for spec, _, _ in items:
      self.assertLen(perplexity.layer_configs(mc, spec), mc.n_layers)
    self.assertTrue({"paper", "lever", "kivi", "baseline"}
                    <= {s["group"] for s in config.caches})

  def test_other_sweeps(self):
    config = perplexity_config.get_config("sweep=k5v4_windows")
    items = perplexity.work_items(config)
    self.assertEqual(items[0][0]["name"], config.reference)
    self.assertTrue(all(s["window"] for s in config.caches[1:]))
    for sweep in ("norm8", "sink"):
      config = perplexity_config.get_config(f"sweep={sweep}")
      items = perplexity.work_items(config)        # seed checks name caches
      self.assertEqual(items[0][0]["name"], config.reference)
      self.assertTrue(all(s["key_norm_bits"] == 8 for s in config.caches
                          if s["name"].endswith("_n8")))
      self.assertGreater(len(items), len(config.caches))
    with self.assertRaisesRegex(ValueError, "sweep"):
      perplexity_config.get_config("sweep=nope")

  def test_grid_sweep_pairs_each_cache_with_its_grid_twin(self):
    config = perplexity_config.get_config("sweep=grid")
    specs = {s["name"]: s for s in config.caches}
    mc = perplexity.tiny_model_config()
    twins = [n for n in specs if n.endswith("_grid")]
    self.assertLen(twins, 4)
    for name in twins:
      exact, grid = specs[name[:-len("_grid")]], specs[name]
      self.assertNotIn("grid_centroids", exact)   # old configs still match
      self.assertEqual({k: v for k, v in grid.items()
                        if k not in ("name", "grid_centroids")},
                       {k: v for k, v in exact.items() if k != "name"})
      self.assertTrue(perplexity.layer_configs(mc, grid)[0].grid_centroids)
      self.assertFalse(perplexity.layer_configs(mc, exact)[0].grid_centroids)
      self.assertIn("grid codebooks", perplexity.describe(grid))
    self.assertGreater(len(perplexity.work_items(config)), len(specs))


def tiny_config():
  config = perplexity_config.get_config("scale=quick")
  c = perplexity_config.cache
  config.caches = (
      c("full", "baseline", "full"),
      c("tq2.5", "paper", key_bits=2.5, value_bits=2.5,
        norm_correction=False),
      c("k4v2_c_w8", "lever", key_bits=4, value_bits=2, center_keys=True,
        window=8),
      c("kivi2_w8", "kivi", "kivi", key_bits=2, value_bits=2, window=8),
  )
  config.seed_checks = ("tq2.5",)
  config.extra_seeds = (1,)
  config.decode_checks = ("tq2.5",)
  return config


class EndToEndTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.config = tiny_config()
    cls.tmp = pathlib.Path(tempfile.mkdtemp())
    cls.workdir = cls.tmp / "run"
    cls.outputs = perplexity.run(cls.config, cls.workdir)
    cls.rows = results.read_rows(cls.workdir / results.RESULTS_FILE)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.tmp, ignore_errors=True)
    super().tearDownClass()

  def test_rows(self):
    names = [s["name"] for s in self.config.caches]
    self.assertEqual([r["id"] for r in self.rows],
                     names + ["tq2.5@seed1", "tq2.5@decode"])
    self.assertEqual([r["main"] for r in self.rows],
                     [True] * len(names) + [False, False])
    c = self.config
    for row in self.rows:
      for field in _REQUIRED:
        self.assertIn(field, row)
      self.assertEqual(row["tokens"],
                       c.num_sequences * (c.sequence_length - 1))
      self.assertAlmostEqual(row["ppl"], math.exp(row["nll"]), places=6)
      nll = np.load(self.workdir / "arrays" / f"nll_{row['id']}.npy")
      self.assertAlmostEqual(float(nll.mean()), row["nll"], places=4)
    by = {r["cache"]: r for r in self.rows if r["main"]}
    self.assertEqual(by["full"]["rel_to_full"], 0)
    self.assertEqual(by["full"]["path"], "chunk")
    self.assertEqual(by["tq2.5"]["path"], "chunk")
    self.assertEqual(by["k4v2_c_w8"]["path"], "decode")
    self.assertEqual(by["kivi2_w8"]["path"], "decode")
    self.assertAlmostEqual(by["full"]["bits_per_coordinate"], 16, delta=0.01)
    # Head dim 32: 2.5 code bits + two fp16 norms per part of each vector.
    self.assertAlmostEqual(by["tq2.5"]["bits_per_coordinate"], 3.5,
                           delta=0.01)
    for row in self.rows:
      self.assertAlmostEqual(
          row["rel_to_full"], row["ppl"] / by["full"]["ppl"] - 1, places=9)
    extra = {r["id"]: r for r in self.rows}
    self.assertEqual(extra["tq2.5@seed1"]["seed"], 1)
    self.assertNotEqual(extra["tq2.5@seed1"]["ppl"], by["tq2.5"]["ppl"])
    self.assertEqual(extra["tq2.5@decode"]["path"], "decode")
    # Exact in exact arithmetic; a tiny model shows no float cascade.
    self.assertAlmostEqual(extra["tq2.5@decode"]["ppl"], by["tq2.5"]["ppl"],
                           delta=1e-3 * by["tq2.5"]["ppl"])

  def test_files(self):
    for name in ("config.json", "results.jsonl", "table.md",
                 "ppl_vs_bits.png"):
      path = self.workdir / name
      self.assertTrue(path.is_file(), path)
      self.assertGreater(path.stat().st_size, 0)
    with open(self.workdir / "config.json") as f:
      self.assertEqual(json.load(f), results.jsonable(self.config))
    table = (self.workdir / "table.md").read_text()
    for name in ("full", "tq2.5", "kivi2_w8", "## Targets",
                 "## Noise checks", "token by token"):
      self.assertIn(name, table)

  def test_resume_skips_done_rows(self):
    workdir = self.tmp / "resumed"
    shutil.copytree(self.workdir, workdir)
    path = workdir / results.RESULTS_FILE
    lines = path.read_text().splitlines(keepends=True)
    # Killed during the last configuration, mid-write of its row.
    path.write_text("".join(lines[:-1]) + lines[-1][:30])
    real = perplexity.measure
    with mock.patch.object(perplexity, "measure",
                           side_effect=real) as measure:
      perplexity.run(self.config, workdir)
    self.assertEqual([(c.args[2]["name"], c.kwargs["path"])
                      for c in measure.call_args_list],
                     [("tq2.5", "decode")])
    rows = results.read_rows(path)
    self.assertEqual([r["id"] for r in rows], [r["id"] for r in self.rows])
    self.assertAlmostEqual(rows[-1]["ppl"], self.rows[-1]["ppl"], places=4)
    # A complete workdir: nothing measured, nothing appended.
    with mock.patch.object(perplexity, "measure") as measure:
      perplexity.run(self.config, workdir)
    measure.assert_not_called()
    self.assertLen(results.read_rows(path), len(self.rows))


if __name__ == "__main__":
  absltest.main()
