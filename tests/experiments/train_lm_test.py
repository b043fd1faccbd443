"""Tests of the LM training driver: data, unigram baseline, training, resume.

The training tests need the Austen text in the data cache (fetch it with
`python -m turboquant_jax.data.fetch`); they are skipped without it.
"""

import json
import math
import pathlib
import shutil
import sys
import tempfile

from absl.testing import absltest
import jax
import numpy as np

# configs/ and experiments/ are top-level folders of the checkout, not part
# of the installed package: make them importable under any test runner.
_REPO = pathlib.Path(__file__).resolve().parents[2]
if str(_REPO) not in sys.path:
  sys.path.insert(0, str(_REPO))

# pylint: disable=g-import-not-at-top,wrong-import-position
from configs import train_lm as train_lm_config
from experiments import train_lm
from turboquant_jax import checkpoint
from turboquant_jax import results
from turboquant_jax.data import austen
# pylint: enable=g-import-not-at-top,wrong-import-position

_HAVE_AUSTEN = austen.is_fetched()


def tiny_config():
  config = train_lm_config.get_config("scale=quick")
  config.data.books = ("persuasion",)
  config.model.update(d_model=64, n_layers=1, n_heads=2, n_kv_heads=1,
                      head_dim=32, ffn_dim=128)
  config.seq_len = 32
  config.batch_size = 8
  config.num_steps = 12
  config.optimizer.lr = 1e-2
  config.optimizer.warmup_steps = 2
  config.log_every = 2
  config.eval_every = 4
  config.checkpoint_every = 4
  config.keep_checkpoints = 2
  config.eval_windows = 16
  config.eval_batch_size = 8
  return config


def _rows(workdir, ops=("train", "eval")):
  """The deterministic rows: train and eval, without timing fields."""
  return [{k: v for k, v in r.items() if k not in train_lm.TIMING_FIELDS}
          for r in results.read_rows(workdir / results.RESULTS_FILE)
          if r["op"] in ops]


def _restore(config, workdir, step):
  """The checkpointed {params, opt_state, step} of a byte-level run."""
  mconfig = train_lm.model_config(config, vocab_size=256)
  _, state = train_lm.init_state(config, mconfig,
                                 train_lm.make_optimizer(config))
  return checkpoint.restore(
      workdir / train_lm.CHECKPOINT_DIR / str(step),
      jax.eval_shape(lambda: state))


class DataTest(absltest.TestCase):

  def test_split_takes_the_last_fraction(self):
    train, val = train_lm.split_tokens(np.arange(100), 0.05)
    np.testing.assert_array_equal(train, np.arange(95))
    np.testing.assert_array_equal(val, np.arange(95, 100))
    # ceil: a short book still gets a validation token.
    _, val = train_lm.split_tokens(np.arange(10), 0.05)
    self.assertLen(val, 1)

  def test_batches_depend_only_on_seed_and_step(self):
    # Given two "books" whose tokens tell where they came from.
    books = (np.arange(0, 50, dtype=np.int32),
             np.arange(1000, 1020, dtype=np.int32))
    a = train_lm.train_batch(books, seed=3, step=7, batch_size=64,
                             seq_len=8)
    b = train_lm.train_batch(books, seed=3, step=7, batch_size=64,
                             seq_len=8)
    c = train_lm.train_batch(books, seed=3, step=8, batch_size=64,
                             seq_len=8)
    np.testing.assert_array_equal(a, b)
    self.assertFalse(np.array_equal(a, c))
    self.assertEqual(a.shape, (64, 9))
    # Every window is a contiguous run of one book (never crosses books).
    np.testing.assert_array_equal(np.diff(a, axis=1), 1)
    self.assertTrue(np.all((a[:, -1] < 50) | (a[:, 0] >= 1000)))
    # Both books are sampled (in proportion to their 42 and 12 starts).
    self.assertTrue(np.any(a[:, 0] >= 1000) and np.any(a[:, 0] < 1000))

  def test_eval_windows_predict_each_target_once(self):
    val = (np.arange(10, dtype=np.int32), np.arange(100, 107,
                                                    dtype=np.int32))
    w = train_lm.eval_windows(val, seq_len=3)
    # Book 1: [0..3], [3..6], [6..9]; book 2: [100..103], [103..106].
    np.testing.assert_array_equal(w[:, 0], [0, 3, 6, 100, 103])
    targets = w[:, 1:].ravel()
    self.assertLen(np.unique(targets), len(targets))
    self.assertLen(train_lm.eval_windows(val, seq_len=3, max_windows=2), 2)

  def test_unigram_baseline_by_hand(self):
    # Given training tokens [0, 0, 1] over a vocabulary of 3: counts
    # (2, 1, 0), add-one p = (3, 2, 1) / 6.
    train = (np.array([0, 0]), np.array([1]))
    # Targets [0, 2]: NLL = -(log(3/6) + log(1/6)) / 2 = log(12) / 2, so
    # perplexity sqrt(12).
    nll = train_lm.unigram_nll(train, np.array([[0, 2]]), vocab_size=3)
    self.assertAlmostEqual(nll, math.log(12) / 2, places=12)
    self.assertAlmostEqual(math.exp(nll), math.sqrt(12), places=12)

  def test_byte_tokenizer_round_trips(self):
    encode, decode, vocab = train_lm.tokenizer_fns("bytes")
    self.assertEqual(vocab, 256)
    ids = encode("Miss Bennet — “yes”")
    self.assertEqual(ids.dtype, np.int32)
    self.assertEqual(decode(ids), "Miss Bennet — “yes”")


@absltest.skipUnless(_HAVE_AUSTEN, "Austen text is not in the data cache; "
                     "run `python -m turboquant_jax.data.fetch`")
class TrainTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = pathlib.Path(tempfile.mkdtemp())
    cls.config = tiny_config()
    cls.straight = cls.tmp / "straight"
    cls.final = train_lm.run(cls.config, cls.straight)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.tmp, ignore_errors=True)
    super().tearDownClass()

  def test_writes_the_outputs(self):
    for name in ("config.json", "results.jsonl", train_lm.PLOT_FILE):
      self.assertGreater((self.straight / name).stat().st_size, 0, name)
    with open(self.straight / "config.json") as f:
      self.assertEqual(json.load(f), results.jsonable(self.config))
    # Checkpoints every 4 steps, the newest 2 kept.
    self.assertEqual(
        train_lm.checkpoint_steps(self.straight / train_lm.CHECKPOINT_DIR),
        [8, 12])
    rows = _rows(self.straight)
    self.assertEqual([r["step"] for r in rows if r["op"] == "train"],
                     [2, 4, 6, 8, 10, 12])
    self.assertEqual([r["step"] for r in rows if r["op"] == "eval"],
                     [0, 4, 8, 12])
    for r in rows:
      if r["op"] == "train":
        self.assertEqual(r["tokens_seen"], r["step"] * 8 * 32)
        self.assertGreater(r["lr"], 0)

  def test_loss_decreases(self):
    rows = _rows(self.straight)
    train = [r["train_loss"] for r in rows if r["op"] == "train"]
    val = [r["val_loss"] for r in rows if r["op"] == "eval"]
    self.assertLess(train[-1], train[0] - 0.5)
    # From about log(256) at initialization.
    self.assertLess(val[-1], val[0] - 1.0)
    self.assertEqual(self.final["step"], 12)
    self.assertAlmostEqual(self.final["val_ppl"],
                           math.exp(self.final["val_loss"]))
    self.assertGreater(self.final["unigram_ppl"], 1)

  def test_kill_and_resume_is_exact(self):
    # Given a run stopped after step 6 (last checkpoint: step 4; rows up to
    # step 6 written) that was also killed mid-write of a row.
    workdir = self.tmp / "resumed"
    self.assertIsNone(train_lm.run(self.config, workdir, stop_after=6))
    self.assertEqual(
        train_lm.checkpoint_steps(workdir / train_lm.CHECKPOINT_DIR), [4])
    self.assertIn(6, [r["step"] for r in _rows(workdir)])
    with open(workdir / results.RESULTS_FILE, "a") as f:
      f.write('{"op": "train", "step": 7, "train_lo')
    # When it is resumed to the end.
    final = train_lm.run(self.config, workdir)
    # Then parameters and optimizer state are bit-identical to the
    # uninterrupted run's (same batches, same compiled step, on CPU XLA is
    # deterministic: no float tolerance is needed).
    a = _restore(self.config, self.straight, 12)
    b = _restore(self.config, workdir, 12)
    self.assertEqual(jax.tree.structure(a), jax.tree.structure(b))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # And the rows are those of one run (the rows of steps 5-6 dropped and
    # rewritten), apart from wall-clock fields and one "run" row per start.
    self.assertEqual(_rows(workdir), _rows(self.straight))
    self.assertEqual([r["step"] for r in _rows(workdir, ("run",))], [0, 4])
    self.assertEqual(final, self.final)
    # A finished workdir: nothing to do, no rows but a "run" row.
    train_lm.run(self.config, workdir)
    self.assertEqual(_rows(workdir), _rows(self.straight))

  def test_refuses_a_workdir_of_another_config(self):
    config = tiny_config()
    config.optimizer.lr = 2e-2
    with self.assertRaisesRegex(results.ConfigMismatchError, "lr"):
      train_lm.run(config, self.straight)


if __name__ == "__main__":
  absltest.main()
