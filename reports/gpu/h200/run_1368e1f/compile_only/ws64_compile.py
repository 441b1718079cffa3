import subprocess, tempfile, sys
from pathlib import Path
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import ASTSource
sys.path.insert(0, str(Path(__file__).parent.parent / "ws64_probe"))
import ws64_probe as wp
TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
fn = wp._ws
types = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "o_ptr": "*bf16", "lists_ptr": "*i32", "scale": "fp32"}
for block_m, finite, ws, warps, stages in wp.VARIANTS:
    consts = {"D": 128, "BLOCK_M": block_m, "BLOCK": 64, "FINITE": finite, "WS": ws}
    sig = {n: ("constexpr" if n in consts else types.get(n, "i32")) for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if types.get(n, "").startswith("*")}
    try:
        c = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / "k.ptx"; p.write_text(c.asm["ptx"]); cb = Path(d) / "k.cubin"
            r = subprocess.run([str(TOOLS / "ptxas"), "-arch=sm_90a", "-v", str(p), "-o", str(cb)], capture_output=True, text=True, check=True)
            sass = subprocess.run([str(TOOLS / "cuobjdump"), "-sass", str(cb)], capture_output=True, text=True, check=True).stdout
        print(block_m, finite, ws, warps, stages, f"smem {c.metadata.shared/1024:.0f}KB", [l.split(":", 1)[-1].strip()[:60] for l in r.stderr.splitlines() if "registers" in l or "spill" in l], " ".join(f"{op}={sass.count(op)}" for op in ("SETMAXREG", "HGMMA", "UTMALDG", "LDL")), flush=True)
    except Exception as e:
        print(block_m, finite, ws, warps, stages, "FAILED", str(e)[:200])
