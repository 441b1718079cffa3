import subprocess, tempfile, sys, re, os
from pathlib import Path
import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource
sys.path.insert(0, str(Path(__file__).parent))
import gluon_assign as ga
TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
fn = ga._assign_gluon
types = {"x_ptr": "*bf16", "ct_ptr": "*bf16", "sq_ptr": "*fp32", "labels_ptr": "*i32"}
for bn, bc, warps, stages in ga.VARIANTS:
    consts = {"D": 128, "BLOCK_N": bn, "BLOCK_C": bc, "STAGES": stages, "num_warps": warps}
    sig = {n: ("constexpr" if n in consts else types.get(n, "i32")) for n in fn.arg_names}
    try:
        c = triton.compile(GluonASTSource(fn, sig, consts, {}), target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / "k.ptx"; p.write_text(c.asm["ptx"]); cb = Path(d) / "k.cubin"
            r = subprocess.run([str(TOOLS / "ptxas"), "-arch=sm_90a", "-v", str(p), "-o", str(cb)], capture_output=True, text=True, check=True)
            sass = subprocess.run([str(TOOLS / "cuobjdump"), "-sass", str(cb)], capture_output=True, text=True, check=True).stdout
        seq = []
        for line in sass.splitlines():
            m = re.search(r"\b(HGMMA\S*|F2FP\S*|WARPGROUP\.DEPBAR\S*|UTMALDG\S*)", line)
            if m:
                op = m.group(1)
                if op.startswith("HGMMA"): op = "HGMMA"
                if op.startswith("F2FP"): op = "F2FP"
                if seq and seq[-1][0] == op: seq[-1][1] += 1
                else: seq.append([op, 1])
        print(bn, bc, warps, stages, f"smem {c.metadata.shared/1024:.0f}KB", [l.split(":", 1)[-1].strip()[:80] for l in r.stderr.splitlines() if "registers" in l or "spill" in l or "C75" in l])
        print("   ", " ".join(f"{o}x{n}" if n > 1 else o for o, n in seq))
    except Exception as e:
        print(bn, bc, warps, stages, "FAILED", str(e)[-600:])
