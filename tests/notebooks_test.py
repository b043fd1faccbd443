"""Executes the notebooks in notebooks/ on small settings, so they never break.

Each notebook reads TQ_NOTEBOOK_SMALL=1 in its first code cell and shrinks
itself (fewer vectors, a shorter passage, fewer cache configurations). The
kernel is this interpreter (sys.executable) through a kernel spec written
into a temporary directory, whatever kernels the machine has installed.
A cell that raises fails the test with the cell's traceback.
"""

import json
import pathlib
import re
import sys
import time

from jupyter_client import kernelspec
from jupyter_client import manager
import nbclient
from nbclient import exceptions
import nbformat
import pytest

from turboquant_jax.data import smollm2

_NOTEBOOKS = pathlib.Path(__file__).resolve().parents[1] / "notebooks"
_NAMES = ("quantizer.ipynb", "kv_cache.ipynb")
_KERNEL = "turboquant-test"
# Seconds per cell; the small settings need far less on a free core.
_CELL_TIMEOUT = 600


def _kernel_manager(spec_dir: pathlib.Path) -> manager.KernelManager:
  """A KernelManager that starts a kernel of sys.executable."""
  kernel_dir = spec_dir / "kernels" / _KERNEL
  kernel_dir.mkdir(parents=True)
  spec = dict(argv=[sys.executable, "-m", "ipykernel_launcher", "-f",
                    "{connection_file}"],
              display_name="turboquant_jax tests", language="python")
  (kernel_dir / "kernel.json").write_text(json.dumps(spec))
  specs = kernelspec.KernelSpecManager(kernel_dirs=[str(spec_dir / "kernels")])
  return manager.KernelManager(kernel_name=_KERNEL, kernel_spec_manager=specs)


def _run(name: str, tmp_path: pathlib.Path,
         monkeypatch: pytest.MonkeyPatch) -> nbformat.NotebookNode:
  """Executes notebooks/<name> on small settings; returns it with outputs."""
  monkeypatch.setenv("TQ_NOTEBOOK_SMALL", "1")
  path = _NOTEBOOKS / name
  nb = nbformat.read(path, as_version=4)
  km = _kernel_manager(tmp_path)
  client = nbclient.NotebookClient(
      nb, km=km, timeout=_CELL_TIMEOUT,
      resources={"metadata": {"path": str(_NOTEBOOKS)}})
  start = time.perf_counter()
  try:
    client.execute()
  except exceptions.CellExecutionError as e:
    pytest.fail(f"{name}: a cell raised:\n{e}", pytrace=False)
  finally:
    # A kernel manager passed in is not shut down by nbclient.
    if km.has_kernel:
      km.shutdown_kernel(now=True)
  print(f"{name}: {time.perf_counter() - start:.1f} s")
  return nb


def _outputs(nb: nbformat.NotebookNode, output_type: str) -> list:
  return [o for cell in nb.cells if cell.cell_type == "code"
          for o in cell.outputs if o.output_type == output_type]


def _check_ran(nb: nbformat.NotebookNode) -> None:
  """Every code cell ran, in order, and the plots came out as images."""
  counts = [c.execution_count for c in nb.cells if c.cell_type == "code"]
  assert counts == list(range(1, len(counts) + 1)), counts
  images = [o for o in _outputs(nb, "display_data") if "image/png" in o.data]
  assert images, "no plot was drawn"


def _text(nb: nbformat.NotebookNode) -> str:
  return "".join(o.text for o in _outputs(nb, "stream"))


def test_stored_without_outputs():
  """The committed notebooks carry no outputs (small, reviewable diffs)."""
  for path in (_NOTEBOOKS / name for name in _NAMES):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
      if cell.cell_type == "code":
        assert not cell.outputs and cell.execution_count is None, path.name


def test_quantizer_notebook(tmp_path, monkeypatch):
  nb = _run("quantizer.ipynb", tmp_path, monkeypatch)
  _check_ran(nb)
  text = _text(nb)
  match = re.search(r"nearest-centroid index: ([0-9.]+)%", text)
  assert match and float(match.group(1)) > 99.99, match
  assert "round-trips: True" in text


def test_kv_cache_notebook(tmp_path, monkeypatch):
  if not smollm2.smollm2_path().is_file():
    pytest.skip("SmolLM2 GGUF not in the data cache (python -m "
                "turboquant_jax.data.fetch)")
  nb = _run("kv_cache.ipynb", tmp_path, monkeypatch)
  _check_ran(nb)
  text = _text(nb)
  # The end-to-end table: the bfloat16 cache must be nearly lossless
  # against the no-cache forward pass, and every perplexity finite.
  ppl = {m.group(1).strip(): float(m.group(2)) for m in re.finditer(
      r"^(full precision \(no cache\)|full|TQ [^\n]*?) +([0-9.]+) +[0-9.]+ +"
      r"[0-9.]+%$", text, re.MULTILINE)}
  assert set(ppl) >= {"full precision (no cache)", "full"}, ppl
  assert len(ppl) >= 3, ppl                     # at least one TurboQuant
  assert "4 bits, D = 128: grid distortion +" in text
  assert "tq4-grid" in text
  assert abs(ppl["full"] / ppl["full precision (no cache)"] - 1) < 0.01, ppl
