"""The byte-permute lookup's SASS by math pipe, on a CPU machine.

The decode kernel is bound by the ALU pipe (NOTES.md, session 13), and the
lookup is most of its integer work. Mosaic GPU's PTX for the whole kernel
needs a GPU, but the lookup's own PTX (prmt_lookup.ptx) does not: this
probe wraps it in a small kernel (one loaded word set a trip, the outputs
folded into one register so that nothing is dead, `nounroll`), assembles
it with ptxas for sm_90a and counts the loop's instructions by pipe
(sass_census.PIPES), for each width and both prmt_lookup.FMA_PIPE
variants. That is how session 13 found what ptxas makes of the PTX (it
fuses and+xor into LOP3 and shl+or into LEA, keeps a multiply-add with a
non-power-of-two factor on the FMA pipe, turns mad.hi by 2^31 back into
LEA.HI) before spending device time on a variant.

    python -m experiments.probes.lookup_sass [--dim=128]

ptxas and cuobjdump come from PATH, $CUDA_HOME/bin or /usr/local/cuda/bin
(pip wheels nvidia-cuda-nvcc and nvidia-cuda-cuobjdump carry both). The
loop's last instructions fold the outputs (a LOP3 per 2-3 outputs) and
advance the pointer: the same in every variant.
"""

import collections
import os
import re
import tempfile
from unittest import mock

from experiments import probes
from experiments.probes import sass_census
from turboquant_jax.kernels.decode_attention import prmt_lookup
from turboquant_jax.quant import codebook

# Inputs (u32 words) and outputs (f16x2) of one register pair's PTX.
SHAPES = {2: (1, 4), 3: (3, 8), 4: (1, 2)}


def loop_kernel(name: str, asm: str, inputs: int, outputs: int) -> str:
  """A PTX entry that runs `asm` once a trip on words loaded from global
  memory and XORs its outputs into one stored register."""
  regs = [f"%o{k}" for k in range(outputs)] + [f"%i{k}" for k in
                                               range(inputs)]
  body = re.sub(r"\$(\d+)", lambda m: regs[int(m.group(1))], asm)
  loads = "\n".join(f"ld.global.u32 %i{k}, [%base+{4 * k}];"
                    for k in range(inputs))
  fold = "\n".join(f"xor.b32 %acc, %acc, %o{k};" for k in range(outputs))
  return f"""
.visible .entry {name}(.param .u64 pin, .param .u64 pout, .param .u32 n)
{{
.reg .b32 %o<{outputs}>, %i<{inputs}>, %acc, %j, %n;
.reg .b64 %base, %out;
.reg .pred %p;
ld.param.u64 %base, [pin];
ld.param.u64 %out, [pout];
ld.param.u32 %n, [n];
mov.b32 %acc, 0;
mov.b32 %j, 0;
LOOP:
.pragma "nounroll";
{loads}
{body}
{fold}
add.u64 %base, %base, 64;
add.u32 %j, %j, 1;
setp.lt.u32 %p, %j, %n;
@%p bra LOOP;
st.global.u32 [%out], %acc;
ret;
}}
"""


def module(dim: int = 128) -> tuple[str, list[str]]:
  """(PTX module text, kernel names): each width's lookup with FMA_PIPE on
  and off, named k{bits}_{fma|alu}."""
  text = ".version 8.0\n.target sm_90a\n.address_size 64\n"
  names = []
  for bits, (inputs, outputs) in SHAPES.items():
    centroids = tuple(float(x) for x in codebook.codebook(dim, bits))
    for label, fma in (("fma", True), ("alu", False)):
      with mock.patch.object(prmt_lookup, "FMA_PIPE", fma):
        asm = prmt_lookup.ptx(bits, centroids)
      names.append(f"k{bits}_{label}")
      text += loop_kernel(names[-1], asm, inputs, outputs)
  return text, names


def pipes_by_kernel(listing: str) -> dict[str, collections.Counter]:
  """{kernel: its loop's instructions by pipe} of a cuobjdump listing."""
  out = {}
  for chunk in re.split(r"Function : ", listing)[1:]:
    name = chunk.split()[0]
    instrs, labels = sass_census.parse(chunk)
    body = sass_census.loops(instrs, labels)
    out[name] = collections.Counter(
        sass_census.pipe(i) for i in (body[0] if body else instrs))
  return out


def main():
  dim = int(probes.option("dim", "128"))
  text, names = module(dim)
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "lookup.ptx")
    with open(path, "w", encoding="utf-8") as f:
      f.write(text)
    listing, _ = sass_census.assemble(path)
  counts = pipes_by_kernel(listing)
  print(f"D={dim}: the loop of one register pair's lookup, by pipe")
  for name in names:
    c = counts.get(name, collections.Counter())
    print(f"{name:<7} " + ", ".join(f"{k} {v}" for k, v in
                                    sorted(c.items())))


if __name__ == "__main__":
  main()
