"""Instruction census of the decode kernel's SASS: what one tile costs.

Nsight Compute says the kernel is issue-bound (NOTES.md, session 6), so
its speed is the number of instructions a thread issues per 64-token tile.
This probe compiles the kernel with Mosaic GPU's dumps on
(MOSAIC_GPU_DUMP_PTX / _SASS, MOSAIC_GPU_DUMP_TO), at the B=8, D=128
benchmark shape or (`--smol`) SmolLM2's B=32 decode shape (9/3 heads,
D=64, 8192 of 9216 tokens), finds the loops in the listing (backward
branches), and prints, per loop of more than `--min=100` instructions, its
length and its opcodes by count, by class (integer ALU, f32,
conversions, shared/global memory, tensor cores, barriers and control)
and by math pipe (ALU, which issues a warp every 2 cycles, against FMA;
`PIPES`): the static cost of one trip, per thread, and the registers
ptxas used.

Where Mosaic GPU cannot disassemble (it found no nvdisasm on the lent
H200), the dumped PTX is assembled with `ptxas -arch=sm_90a` and listed
with `cuobjdump -sass`, taken from PATH, $CUDA_HOME/bin or
/usr/local/cuda/bin (on a CPU machine: the nvidia-cuda-nvcc and
nvidia-cuda-cuobjdump wheels carry both).

    python -m experiments.probes.sass_census [--bits=4] [--smol] [--fused] [--grid]
        [--options="{'min_columns': 8}"] [--dir=DUMP]
(--bits: the cache's width, 2-4 or the outlier split's 2.5, 3.5;
--grid: a cache of grid codebooks (CacheConfig.grid_centroids);
--fused: the kernel of pallas_gpu.append_attention, which also appends
the decode token; --options: keyword options of pallas_gpu.attention, a
Python dict, dumped under sass_<options>; --dir: only read an existing
dump (SASS listings, or PTX to assemble), which is all that works on a
CPU.)
"""

import ast
import collections
import dataclasses
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

from experiments import probes

_INSTR = re.compile(
    r"/\*([0-9a-fA-F]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)"
    r"((?:\.[A-Z0-9_]+)*)([^;]*);")
_LABEL = re.compile(r"^\s*(\.L_x_\d+|\.L_\w+):")
_TARGET = re.compile(r"`\((\.L_\w+)\)|\b(0x[0-9a-fA-F]+)\b")

CLASSES = {
    "integer": ("IADD3", "IADD", "LOP3", "LOP", "SHF", "SHL", "SHR", "PRMT",
                "IMAD", "IMUL", "ISETP", "SEL", "LEA", "IABS", "IMNMX",
                "BFE", "BFI", "POPC", "FLO", "BMSK", "SGXT", "VIADD",
                "VIMNMX", "UIADD3", "ULOP3", "USHF", "UIMAD", "ULEA",
                "USEL", "UISETP", "UPRMT", "UMOV", "MOV", "PLOP3", "P2R",
                "R2P", "S2R", "S2UR", "CS2R", "R2UR"),
    "f32": ("FFMA", "FMUL", "FADD", "FMNMX", "FSETP", "FSEL", "MUFU",
            "FCHK", "FSWZADD"),
    "f16": ("HFMA2", "HMUL2", "HADD2", "HMNMX2", "HSETP2"),
    "convert": ("F2F", "F2FP", "I2F", "F2I", "I2FP", "F2IP", "FRND"),
    "shared": ("LDS", "STS", "LDSM", "STSM", "ATOMS"),
    "global": ("LDG", "STG", "LD", "ST", "RED", "ATOM", "LDC", "ULDC",
               "UTMALDG", "UTMASTG", "UBLKCP", "UTMACMDFLUSH",
               "UTMAPF"),
    "tensor": ("HGMMA", "IGMMA", "QGMMA", "HMMA", "IMMA", "WARPGROUP"),
    "sync": ("BAR", "SYNCS", "MEMBAR", "FENCE", "DEPBAR", "WARPSYNC",
             "ARRIVES", "NANOSLEEP", "ERRBAR", "CCTL"),
    "control": ("BRA", "BRX", "EXIT", "RET", "CALL", "BSSY", "BSYNC",
                "YIELD", "NOP", "VOTE", "VOTEU", "SHFL", "ELECT"),
}


@dataclasses.dataclass(frozen=True)
class Instr:
  address: int
  opcode: str          # without modifiers: PRMT, LOP3, HGMMA, ...
  text: str            # opcode with modifiers and operands


def parse(text: str) -> tuple[list[Instr], dict[str, int]]:
  """Instructions of an nvdisasm/cuobjdump listing, and its labels'
  addresses (the next instruction's)."""
  instrs, labels, pending = [], {}, []
  for line in text.splitlines():
    label = _LABEL.match(line)
    if label:
      pending.append(label.group(1))
      continue
    m = _INSTR.search(line)
    if not m:
      continue
    address = int(m.group(1), 16)
    for name in pending:
      labels[name] = address
    pending = []
    instrs.append(Instr(address, m.group(2),
                        (m.group(2) + m.group(3) + m.group(4)).strip()))
  return instrs, labels


def loops(instrs: list[Instr], labels: dict[str, int]) -> list[list[Instr]]:
  """The bodies of backward branches (target at or before the branch),
  each from its target to the branch, longest first."""
  out = []
  for i, ins in enumerate(instrs):
    if ins.opcode not in ("BRA", "BRX"):
      continue
    m = _TARGET.search(ins.text)
    if not m:
      continue
    target = labels.get(m.group(1)) if m.group(1) else int(m.group(2), 16)
    if target is None or target > ins.address:
      continue
    out.append([x for x in instrs[:i + 1] if x.address >= target])
  return sorted(out, key=len, reverse=True)


def classify(opcode: str) -> str:
  for name, members in CLASSES.items():
    if opcode in members:
      return name
  return "other"


# The math pipe an instruction issues to on GH100 (NVIDIA's description:
# the ALU pipe takes integer instructions other than IMAD, logic, bit
# manipulation and data movement, 16 lanes a sub-partition, so 2 cycles a
# warp; FMA-heavy takes IMAD and FP32, FMA-lite FP32; FP16x2 issues to
# both; forums.developer.nvidia.com/t/302018 and /108729). Where the
# sources are silent (VIADD, FP32 min/max and compares, MOV) this is a
# guess; Nsight Compute's pipe utilization is the measurement.
PIPES = {
    "alu": ("IADD3", "IADD", "LOP3", "LOP", "SHF", "SHL", "SHR", "PRMT",
            "LEA", "ISETP", "SEL", "IABS", "IMNMX", "BMSK", "SGXT", "PLOP3",
            "FMNMX", "FSETP", "FSEL", "MOV", "P2R", "R2P", "VIMNMX"),
    "fma": ("IMAD", "IMUL", "FFMA", "FMUL", "FADD", "HFMA2", "HMUL2",
            "HADD2", "VIADD"),
}


def pipe(ins: Instr) -> str:
  """"alu", "fma" or "other" (PIPES); IMAD.HI and IMAD.WIDE, which on the
  H200 cost more than the shifts they replaced (NOTES.md, session 13),
  count as "fma_wide"."""
  if ins.opcode == "IMAD" and re.match(r"IMAD\.(HI|WIDE)", ins.text):
    return "fma_wide"
  for name, members in PIPES.items():
    if ins.opcode in members:
      return name
  return "other"


def census(body: list[Instr]) -> tuple[collections.Counter,
                                       collections.Counter]:
  """(opcodes by count, classes by count) of a loop body."""
  ops = collections.Counter(i.opcode for i in body)
  classes = collections.Counter()
  for op, count in ops.items():
    classes[classify(op)] += count
  return ops, classes


def report(text: str, minimum: int = 100) -> str:
  instrs, labels = parse(text)
  lines = [f"{len(instrs)} instructions, {len(labels)} labels"]
  for body in loops(instrs, labels):
    if len(body) < minimum:
      continue
    ops, classes = census(body)
    lines.append(f"\nloop of {len(body)} instructions "
                 f"(0x{body[0].address:x}-0x{body[-1].address:x})")
    lines.append("  by class: " + ", ".join(
        f"{k} {v}" for k, v in classes.most_common()))
    pipes = collections.Counter(pipe(i) for i in body)
    lines.append("  by pipe: " + ", ".join(
        f"{k} {v}" for k, v in pipes.most_common()))
    lines.append("  by opcode: " + ", ".join(
        f"{k} {v}" for k, v in ops.most_common(20)))
  return "\n".join(lines)


def _compile_kernel(dump_dir: str, bits: float, smol: bool,
                    fused: bool, options: dict) -> None:
  """Compiles and runs one decode-attention call with the dumps on."""
  os.environ["MOSAIC_GPU_DUMP_SASS"] = "1"
  os.environ["MOSAIC_GPU_DUMP_PTX"] = "1"
  os.environ["MOSAIC_GPU_DUMP_TO"] = dump_dir
  # pylint: disable=g-import-not-at-top (the dump flags must be set first)
  import jax
  from experiments import kernel_bench
  from turboquant_jax import cache as cache_lib
  from turboquant_jax.kernels import decode_attention as da
  from turboquant_jax.kernels.decode_attention import pallas_gpu
  cfg = cache_lib.CacheConfig(key_bits=bits, value_bits=bits,
                              grid_centroids="--grid" in sys.argv)
  # (batch, query heads, KV heads, tokens, head dim)
  b, h, kvh, s, d = (32, 9, 3, 8192, 64) if smol else (8, 32, 8, 32768, 128)
  c = kernel_bench.random_cache(jax.random.key(4), cfg, b, kvh, s, d)
  q = jax.random.normal(jax.random.key(0), (b, h, d))
  # Whether Mosaic GPU writes the listing under DUMP_TO or to stdout, it
  # ends up in dump_dir: the process's stdout goes to a file meanwhile.
  sys.stdout.flush()
  saved = os.dup(1)
  with open(os.path.join(dump_dir, "stdout.txt"), "w") as out:
    os.dup2(out.fileno(), 1)
    try:
      if fused:               # the decode token appended by the kernel
        c = dataclasses.replace(c, lengths=c.lengths - 1)
        token = jax.numpy.ones((b, kvh, 1, d), jax.numpy.bfloat16)
        jax.block_until_ready(pallas_gpu.append_attention(
            q[:, None], token, token, c))
      else:
        jax.block_until_ready(jax.jit(lambda q, c: da.decode_attention(
            q, c, c.lengths, impl="pallas_gpu", **options))(q, c))
    finally:
      sys.stdout.flush()
      os.dup2(saved, 1)
      os.close(saved)


def cuda_tool(name: str) -> str | None:
  """Path of a CUDA binary (ptxas, cuobjdump): PATH, $CUDA_HOME/bin,
  /usr/local/cuda/bin."""
  for d in (None, os.path.join(os.environ.get("CUDA_HOME", ""), "bin"),
            "/usr/local/cuda/bin"):
    found = shutil.which(name, path=d)
    if found:
      return found
  return None


def assemble(ptx_path: str, arch: str = "sm_90a") -> tuple[str, str]:
  """(SASS listing, ptxas -v's report) of a PTX file."""
  ptxas, cuobjdump = cuda_tool("ptxas"), cuda_tool("cuobjdump")
  if not (ptxas and cuobjdump):
    raise FileNotFoundError("ptxas and cuobjdump: not on PATH, $CUDA_HOME/"
                            "bin or /usr/local/cuda/bin")
  cubin = ptx_path + ".cubin"
  report = subprocess.run([ptxas, f"-arch={arch}", "-v", "-o", cubin,
                           ptx_path], check=True, capture_output=True,
                          text=True)
  sass = subprocess.run([cuobjdump, "-sass", cubin], check=True,
                        capture_output=True, text=True)
  return sass.stdout, report.stderr + report.stdout


def main():
  minimum = int(probes.option("min", "100"))
  dump_dir = probes.option("dir", None)
  if dump_dir is None:
    options = ast.literal_eval(probes.option("options", "{}"))
    dump_dir = os.environ.get("OUT") or tempfile.mkdtemp()
    tag = "".join(ch for ch in str(sorted(options.items()))
                  if ch.isalnum() or ch in "_=")
    dump_dir = os.path.join(dump_dir, "sass" + (f"_{tag}" if options
                                                  else "")
                            + ("_grid" if "--grid" in sys.argv else ""))
    os.makedirs(dump_dir, exist_ok=True)
    bits = float(probes.option("bits", "4"))    # 2.5, 3.5: the split
    _compile_kernel(dump_dir, int(bits) if bits == int(bits) else bits,
                    "--smol" in sys.argv, "--fused" in sys.argv, options)
  files = sorted(f for f in glob.glob(os.path.join(dump_dir, "**", "*"),
                                      recursive=True) if os.path.isfile(f))
  found = False
  for path in files:
    with open(path, errors="replace") as f:
      text = f.read()
    if not _INSTR.search(text):
      continue
    found = True
    print(f"== {os.path.relpath(path, dump_dir)}")
    print(report(text, minimum))
  for path in [] if found else [f for f in files if f.endswith(".ptx")]:
    found = True
    text, ptxas_report = assemble(path)
    registers = re.search(r"Used (\d+) registers", ptxas_report)
    print(f"== {os.path.relpath(path, dump_dir)} (assembled here, "
          f"{registers.group(1) if registers else '?'} registers)")
    print(report(text, minimum))
  if not found:
    print(f"no SASS listing or PTX among {len(files)} files under "
          f"{dump_dir}: {[os.path.basename(f) for f in files][:20]}")


if __name__ == "__main__":
  main()
