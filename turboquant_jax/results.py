"""Experiment results: `config.json` once, then one JSON object per line.

The layout follows big_vision's metric writer:

    workdir/config.json      the experiment's config, written once
    workdir/results.jsonl    one row (a JSON object) per line, appended

    writer = results.Writer(workdir, config)   # refuses a different config
    done = writer.done_keys(("dataset", "method", "bits"))
    if ("glove", "mse", 2) not in done:
      writer.write(dict(dataset="glove", method="mse", bits=2, d_mse=0.1))

Each row goes to the file in a single `os.write` on an O_APPEND descriptor,
followed by fsync, so a killed run leaves whole rows (at worst one truncated
last line, which the reader skips and the next Writer removes).
"""

import dataclasses
import datetime
import json
import logging
import math
import os
import pathlib
import platform
from typing import Any, Iterable, Sequence

import numpy as np

CONFIG_FILE = "config.json"
RESULTS_FILE = "results.jsonl"


class ConfigMismatchError(ValueError):
  """The workdir holds results of an experiment with another config."""


def jsonable(value: Any) -> Any:
  """Converts numpy/JAX scalars and arrays, tuples, dataclasses and configs.

  Non-finite floats become None, so every file is strict JSON.
  """
  if hasattr(value, "to_dict") and callable(value.to_dict):   # ConfigDict
    value = value.to_dict()
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    value = dataclasses.asdict(value)
  if isinstance(value, dict):
    return {str(k): jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple, set, frozenset)):
    return [jsonable(v) for v in value]
  if isinstance(value, (bool, np.bool_)):
    return bool(value)
  if isinstance(value, (int, np.integer)):
    return int(value)
  if isinstance(value, (float, np.floating)):
    value = float(value)
    return value if math.isfinite(value) else None
  if isinstance(value, (str, type(None))):
    return value
  if hasattr(value, "__array__"):                           # np / jax arrays
    arr = np.asarray(value)
    return jsonable(arr.item() if arr.ndim == 0 else arr.tolist())
  if isinstance(value, os.PathLike):
    return os.fspath(value)
  raise TypeError(f"cannot write {type(value).__name__} as JSON: {value!r}")


def _dumps(value: Any, **kwargs) -> str:
  return json.dumps(jsonable(value), allow_nan=False, ensure_ascii=False,
                    **kwargs)


def read_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
  """The rows of a results.jsonl file ([] if missing).

  A line that does not parse (a run killed mid-write leaves at most the last
  one) is skipped with a warning.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    return []
  rows = []
  with open(path, encoding="utf-8") as f:
    for num, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        logging.warning("%s:%d: skipping a line that is not JSON (a partial "
                        "write?)", path, num)
  return rows


class Writer:
  """Writes one experiment's config and rows into `workdir`.

  Attributes:
    workdir: the directory (created if needed).
    config_path: workdir/config.json.
    results_path: workdir/results.jsonl.
  """

  def __init__(self, workdir: str | os.PathLike, config: Any):
    """Opens `workdir` for `config`.

    Args:
      workdir: where to write; may already hold a run of the same config,
        which is then resumed (rows are appended).
      config: a ConfigDict, dict or dataclass; stored as JSON.

    Raises:
      ConfigMismatchError: workdir/config.json holds a different config.
    """
    self.workdir = pathlib.Path(workdir)
    self.workdir.mkdir(parents=True, exist_ok=True)
    self.config_path = self.workdir / CONFIG_FILE
    self.results_path = self.workdir / RESULTS_FILE
    config = jsonable(config)
    if self.config_path.is_file():
      with open(self.config_path, encoding="utf-8") as f:
        stored = json.load(f)
      if stored != config:
        diff = sorted(_diff(stored, config))
        raise ConfigMismatchError(
            f"{self.config_path} holds a different config (differs at "
            f"{', '.join(diff) or 'the top level'}); use a new --workdir, "
            "or delete the old one to start over")
    else:
      atomic_write(self.config_path,
                    _dumps(config, indent=2, sort_keys=True) + "\n")
    self._repair_tail()

  def _repair_tail(self) -> None:
    """Cuts a partial last line left by a killed writer."""
    if not self.results_path.is_file():
      return
    with open(self.results_path, "rb+") as f:
      data = f.read()
      if not data or data.endswith(b"\n"):
        return
      keep = data.rfind(b"\n") + 1
      logging.warning("%s: removing a partial last line (%d bytes)",
                      self.results_path, len(data) - keep)
      f.truncate(keep)

  def write(self, row: dict[str, Any]) -> None:
    """Appends one row: a single atomic write, flushed to disk."""
    line = (_dumps(row) + "\n").encode("utf-8")
    fd = os.open(self.results_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT,
                 0o644)
    try:
      written = os.write(fd, line)
      if written != len(line):
        raise OSError(f"short write to {self.results_path}: {written} of "
                      f"{len(line)} bytes")
      os.fsync(fd)
    finally:
      os.close(fd)

  def rows(self) -> list[dict[str, Any]]:
    """Every row written so far (by this or earlier runs)."""
    return read_rows(self.results_path)

  def done_keys(self, fields: Sequence[str],
                where: dict[str, Any] | None = None) -> set[tuple]:
    """Key tuples of the rows already written, to skip them on resume.

    Args:
      fields: the row fields that identify a work item, in order.
      where: only rows whose fields equal these values (e.g. an op name).

    Returns:
      {tuple(row[f] for f in fields)} over the matching rows that have every
      field. Values are as read back from JSON (tuples come back as lists,
      so key on scalars).
    """
    where = where or {}
    keys = set()
    for row in self.rows():
      if all(row.get(k) == v for k, v in where.items()) and all(
          f in row for f in fields):
        keys.add(tuple(row[f] for f in fields))
    return keys


def _diff(a: Any, b: Any, prefix: str = "") -> Iterable[str]:
  """Dotted paths where two JSON values differ."""
  if isinstance(a, dict) and isinstance(b, dict):
    for k in set(a) | set(b):
      path = f"{prefix}.{k}" if prefix else k
      if k not in a or k not in b:
        yield path
      else:
        yield from _diff(a[k], b[k], path)
  elif a != b:
    yield prefix


def atomic_write(path: pathlib.Path, text: str) -> None:
  """Writes text to path all at once (temp file, fsync, rename)."""
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _cpu_name() -> str:
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
  """Versions, device and date: where and with what a result was produced."""
  env = {
      "python": platform.python_version(),
      "numpy": np.__version__,
      "platform": platform.platform(),
      "processor": _cpu_name(),
      "cpu_count": os.cpu_count(),
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"),
  }
  if hasattr(os, "sched_getaffinity"):
    env["cpus_available"] = len(os.sched_getaffinity(0))
  try:
    import jax        # pylint: disable=g-import-not-at-top
    import jaxlib     # pylint: disable=g-import-not-at-top
    env["jax"] = jax.__version__
    env["jaxlib"] = jaxlib.__version__
    env["backend"] = jax.default_backend()
    devices = jax.devices()
    env["device"] = devices[0].device_kind
    env["device_count"] = len(devices)
  except ImportError:
    pass
  return env
