import subprocess, tempfile, sys
from pathlib import Path
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import ASTSource
sys.path.insert(0, str(Path(__file__).parent))
import linear_ws_probe as lp
TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
fn = lp._output_ws
types = {"q_ptr": "*bf16", "w_ptr": "*bf16", "st_ptr": "*fp32", "o_ptr": "*bf16", "den_ptr": "*fp32", "eps": "fp32"}
for bn, warps, stages, ws in lp.VARIANTS:
    consts = {"D": 128, "BLOCK_N": bn, "WS": ws}
    sig = {n: ("constexpr" if n in consts else types.get(n, "i32")) for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if types.get(n, "").startswith("*")}
    try:
        c = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / "k.ptx"; p.write_text(c.asm["ptx"]); cb = Path(d) / "k.cubin"
            r = subprocess.run([str(TOOLS / "ptxas"), "-arch=sm_90a", "-v", str(p), "-o", str(cb)], capture_output=True, text=True, check=True)
            sass = subprocess.run([str(TOOLS / "cuobjdump"), "-sass", str(cb)], capture_output=True, text=True, check=True).stdout
        print(bn, warps, stages, ws, f"smem {c.metadata.shared/1024:.0f}KB", [l.split(":", 1)[-1].strip()[:70] for l in r.stderr.splitlines() if "registers" in l or "spill" in l], " ".join(f"{op}={sass.count(op)}" for op in ("SETMAXREG", "HGMMA", "UTMALDG", "UTMASTG", "LDL")), flush=True)
    except Exception as e:
        print(bn, warps, stages, ws, "FAILED", str(e)[-300:])
