"""Compile gluon_blocks.py's kernel for sm_90 on a machine without a GPU (Triton 3.6's compiler and ptxas) and print,
per variant, shared memory, registers, ptxas's performance warnings and the SASS order of the products (HGMMA), their
waits (WARPGROUP.DEPBAR), the exponentials (MUFU.EX2) and the TMA loads."""
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource

sys.path.insert(0, str(Path(__file__).parent))
import gluon_blocks as gb  # noqa: E402

TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
TYPES = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "o_ptr": "*bf16", "lists_ptr": "*i32",
         "counts_ptr": "*i32", "scale": "fp32"}
for mask in (True, False):
    for stages in (2, 3, 4):
        consts = {"BLOCK": 64, "D": 128, "STAGES": stages, "MASK_ALWAYS": mask}
        sig = {n: ("constexpr" if n in consts else TYPES.get(n, "i32")) for n in gb._blocks_fwd.arg_names}
        c = triton.compile(GluonASTSource(gb._blocks_fwd, sig, consts, {}), target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": 4})
        with tempfile.TemporaryDirectory() as d:
            ptx, cubin = Path(d) / "k.ptx", Path(d) / "k.cubin"
            ptx.write_text(c.asm["ptx"])
            r = subprocess.run([str(TOOLS / "ptxas"), "-arch=sm_90a", "-v", str(ptx), "-o", str(cubin)],
                               capture_output=True, text=True, check=True)
            sass = subprocess.run([str(TOOLS / "cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True,
                                  check=True).stdout
        seq = []
        for line in sass.splitlines():
            m = re.search(r"\b(HGMMA\S*|MUFU\.EX2|WARPGROUP\.DEPBAR\S*|UTMALDG\S*)", line)
            if m:
                op = "HGMMA" if m.group(1).startswith("HGMMA") else m.group(1)
                if "DEPBAR" in line:
                    op = line.split(";")[0].split("*/")[-1].strip()
                if seq and seq[-1][0] == op:
                    seq[-1][1] += 1
                else:
                    seq.append([op, 1])
        notes = [x.split(":", 1)[-1].strip()[:100] for x in r.stderr.splitlines() if "registers" in x or "C75" in x]
        print(f"mask on every block={mask} stages={stages} smem {c.metadata.shared // 1024} KB {notes}")
        print("   ", " | ".join(f"{o} x{n}" if n > 1 else o for o, n in seq))
