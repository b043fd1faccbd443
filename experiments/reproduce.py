r"""Reproduces the paper's tables and figures in one command, resumably.

    python -m turboquant_jax.data.fetch             # data and weights, once
    python -m experiments.reproduce --config=configs/reproduce.py \
        --workdir=reports/quick

Runs each part of configs/reproduce.py (distortion: Figs 1-3 and Table 2's
quantization time; nn_search: Fig. 5 and Table 2's indexing times against
faiss; needle: Fig. 4; perplexity; LongBench-E: Table 1, with local data
only) in `workdir/runs/<part>/`, each through its own driver's
`run(config, workdir)`, then writes `workdir/README.md`: the environment,
the paper's headline numbers beside ours, every part's table and figures.

Resumable at two levels: a part marked done (`runs/<part>/DONE`, written
after its outputs) is not run again, and a part that was killed midway
resumes from its results.jsonl (its driver skips finished rows). The report
is rewritten atomically after every part, so it is never half-written.
"""

import importlib
import json
import os
import pathlib
import time
import traceback

from absl import app
from absl import logging
import tqdm

from experiments import common
from turboquant_jax import results

_PAPER = """\
The paper's numbers (PAPER.md, arXiv v1; Llama-3.1-8B-Instruct and OpenAI3
embeddings, which no registry here ships):

| what | paper | notes |
|---|---|---|
| D_mse at b = 1, 2, 3, 4 | 0.36, 0.117, 0.03, 0.009 | Figs 1-3 (`distortion`) |
| Needle in a haystack, 25% memory | full 0.997, TurboQuant 0.997, KIVI 0.981, SnapKV 0.858 | Fig. 4 (`needle`) |
| LongBench-E average | full 50.06, TurboQuant 3.5-bit 50.06, 2.5-bit 49.44, KIVI-3 48.50 | Table 1 (`longbench`) |
| Quantize 100k vectors at 4 bits (s), d = 200 / 1536 / 3072 | PQ 37.04 / 239.75 / 494.42; RaBitQ 597.25 / 2267.59 / 3957.19; TurboQuant 0.0007 / 0.0013 / 0.0021 | Table 2 (`distortion`, `nn_search`) |
"""

_WHAT = {
    "distortion": "Figures 1-3 (distortion, inner-product error) and "
                  "Table 2's TurboQuant quantization time",
    "nn_search": "Figure 5 (recall@1@k) and Table 2's indexing times, "
                 "against faiss PQ and RaBitQ",
    "needle": "Figure 4 (needle in a haystack) with SmolLM2",
    "perplexity": "Perplexity through the compressed KV cache (SmolLM2)",
    "longbench": "Table 1 (LongBench-E)",
}


def part_config(part):
  """The part's experiment config: its config file's get_config(arg) with
  the overrides applied (unknown fields are an error)."""
  config = importlib.import_module(part.config_file).get_config(
      part.arg or None)
  for key, value in part.overrides.items():
    if key not in config:
      raise ValueError(f"{part.config_file}: no field {key!r} to override")
    config[key] = type(config[key])(value) if isinstance(
        config[key], (int, float, str, bool)) else value
  return config


def selected_parts(config) -> list[str]:
  """The parts to run, in the paper's order (ConfigDict sorts its keys)."""
  names = sorted(config.parts.keys(),
                 key=lambda n: (list(_WHAT).index(n) if n in _WHAT
                                else len(_WHAT), n))
  only = [n for n in config.only.split(",") if n]
  unknown = sorted(set(only) - set(names))
  if unknown:
    raise ValueError(f"config.only names unknown parts {unknown}; "
                     f"known: {names}")
  return [n for n in names if not only or n in only]


def _skip_reason(name: str, config) -> str | None:
  if name == "longbench":
    data = config.longbench_data_dir
    if not data:
      return ("LongBench-E is not available on this machine; pass "
              "--config.longbench_data_dir=DIR (a folder of the official "
              "*_e.jsonl files) to run it. The code is tested on fixture "
              "files (tests/experiments/longbench_test.py).")
    if not pathlib.Path(data).is_dir():
      raise ValueError(f"config.longbench_data_dir={data!r} is not a folder")
  return None


def run_part(name: str, config, workdir: pathlib.Path) -> dict:
  """Runs one part unless it is done; returns its status record."""
  part_dir = workdir / "runs" / name
  done = part_dir / "DONE"
  if done.exists():
    return json.loads(done.read_text())
  reason = _skip_reason(name, config)
  if reason:
    return dict(part=name, status="skipped", reason=reason)
  part = config.parts[name]
  exp_config = part_config(part)
  if name == "longbench":
    exp_config.data_dir = config.longbench_data_dir
  module = importlib.import_module(part.module)
  start = time.time()
  module.run(exp_config, part_dir)
  record = dict(part=name, status="done", seconds=round(time.time() - start),
                command=f"python -m {part.module} --config={part.config_file}"
                .replace("configs.", "configs/") + ".py"
                + (f":{part.arg}" if part.arg else "")
                + "".join(f" --config.{k}={v}"
                          for k, v in part.overrides.items()))
  results.atomic_write(done, json.dumps(record, indent=1) + "\n")
  return record


def _part_section(workdir: pathlib.Path, name: str, record: dict) -> str:
  lines = [f"## {name}: {_WHAT.get(name, '')}", ""]
  if record["status"] == "skipped":
    return "\n".join(lines + [f"Not run: {record['reason']}", ""])
  if record["status"] == "failed":
    return "\n".join(lines + ["Failed (see the log): "
                              f"`{record['error']}`", ""])
  part_dir = workdir / "runs" / name
  lines += [f"Run folder `runs/{name}/` (config.json, results.jsonl); "
            f"{record['seconds']} s; the same run alone:", "",
            f"    {record['command']} --workdir=runs/{name}", ""]
  table = part_dir / "table.md"
  if table.exists():
    text = table.read_text()
    # Demote the part's headings one level under this section.
    lines += [("#" + line) if line.startswith("#") else line
              for line in text.splitlines()]
    lines.append("")
  for png in sorted(part_dir.glob("*.png")):
    lines += [f"![{png.stem}](runs/{name}/{png.name})", ""]
  return "\n".join(lines)


def write_report(workdir: pathlib.Path, config, records: dict) -> pathlib.Path:
  env = results.environment()
  lines = ["# TurboQuant reproduction report", "",
           f"Scale `{config.scale}`; generated "
           f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", "",
           "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()
                                       if isinstance(v, (str, int, float))),
           "", "The weights of SmolLM2 are 4-bit (Q4_1 GGUF, dequantized): "
           "its \"full\" cache is a float KV cache on 4-bit weights.", "",
           _PAPER, "## Parts", "",
           "| part | status | seconds |", "|---|---|---:|"]
  for name, rec in records.items():
    lines.append(f"| {name} | {rec['status']} | {rec.get('seconds', '')} |")
  lines.append("")
  for name, rec in records.items():
    lines.append(_part_section(workdir, name, rec))
  path = workdir / "README.md"
  results.atomic_write(path, "\n".join(lines) + "\n")
  results.atomic_write(workdir / "environment.json",
                       json.dumps(results.jsonable(env), indent=1) + "\n")
  return path


def run(config, workdir: str | os.PathLike) -> pathlib.Path:
  """Runs every selected part (resuming) and writes the report."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  writer = results.Writer(workdir, config)        # refuses another config
  del writer
  names = selected_parts(config)
  records = {}
  for name in tqdm.tqdm(names, desc="reproduce", unit="part"):
    try:
      records[name] = run_part(name, config, workdir)
    except Exception as e:  # noqa: BLE001 - report it, run the rest
      logging.error("part %s failed:\n%s", name, traceback.format_exc())
      records[name] = dict(part=name, status="failed",
                           error=f"{type(e).__name__}: {e}"[:500])
    write_report(workdir, config, records)
  failed = [n for n, r in records.items() if r["status"] == "failed"]
  if failed:
    raise RuntimeError(f"parts failed: {failed}; fix and re-run the same "
                       "command (finished parts are kept)")
  return workdir / "README.md"


if __name__ == "__main__":
  common.define_flags("reproduce.py", workdir="reports/quick")
  app.run(common.main_for(run, lambda path: print(f"report: {path}")))
