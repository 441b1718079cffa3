import subprocess, tempfile, sys, re
from pathlib import Path
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import ASTSource
sys.path.insert(0, str(Path(__file__).parent))
import l2_probe_with_prefetch as lp
TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
fn = lp._probe
types = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "o_ptr": "*bf16", "lists_ptr": "*i32", "scale": "fp32"}
block, mode, stages = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
consts = {"D": 128, "BLOCK": block, "MODE": mode}
sig = {n: ("constexpr" if n in consts else types.get(n, "i32")) for n in fn.arg_names}
attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if types.get(n, "").startswith("*")}
c = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32), options={"num_warps": block // 16, "num_stages": stages})
with tempfile.TemporaryDirectory() as d:
    p = Path(d) / "k.ptx"; p.write_text(c.asm["ptx"]); cb = Path(d) / "k.cubin"
    r = subprocess.run([str(TOOLS / "ptxas"), "-arch=sm_90a", "-v", str(p), "-o", str(cb)], capture_output=True, text=True, check=True)
    sass = subprocess.run([str(TOOLS / "cuobjdump"), "-sass", str(cb)], capture_output=True, text=True, check=True).stdout
print(block, mode, stages, f"smem {c.metadata.shared/1024:.0f}KB", [l.split(":", 1)[-1].strip() for l in r.stderr.splitlines() if "registers" in l or "spill" in l or "C75" in l])
seq = []
for line in sass.splitlines():
    m = re.search(r"\b(HGMMA\S*|MUFU\.EX2|WARPGROUP\.\S+|UTMALDG\S*|BRA|SYNCS\.\S+)", line)
    if m:
        op = m.group(1)
        if op.startswith("HGMMA"): op = "HGMMA"
        if seq and seq[-1][0] == op: seq[-1][1] += 1
        else: seq.append([op, 1])
import os
if os.environ.get("DUMP"): print("\n".join(l for l in sass.splitlines() if "DEPBAR" in l or "HGMMA" in l))
print(" ".join(f"{o}x{n}" if n > 1 else o for o, n in seq))
print(c.asm["ttgir"].count("warp_group_dot_wait"), "waits;", c.asm["ttgir"].count("isAsync = true"), "async dots")
