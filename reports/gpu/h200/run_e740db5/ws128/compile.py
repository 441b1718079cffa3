import subprocess, tempfile, sys
from pathlib import Path
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import ASTSource
sys.path.insert(0, str(Path(__file__).parent))
import ws128 as wp
TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
fn = wp._ws_tiles
types = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "o_ptr": "*bf16", "bits_ptr": "*i64", "scale": "fp32"}
for block_m, block_n, ws, warps, stages in [(128, 64, True, 4, 2), (128, 64, True, 4, 3), (128, 64, False, 8, 3), (64, 64, True, 4, 2)]:
    consts = {"D": 128, "BLOCK_M": block_m, "BLOCK_N": block_n, "WS": ws}
    sig = {n: ("constexpr" if n in consts else types.get(n, "*i32" if n.endswith("_ptr") else "i32")) for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if sig[n].startswith("*")}
    try:
        c = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / "k.ptx"; p.write_text(c.asm["ptx"]); cb = Path(d) / "k.cubin"
            r = subprocess.run([str(TOOLS / "ptxas"), "-arch=sm_90a", "-v", str(p), "-o", str(cb)], capture_output=True, text=True, check=True)
            sass = subprocess.run([str(TOOLS / "cuobjdump"), "-sass", str(cb)], capture_output=True, text=True, check=True).stdout
        print(block_m, block_n, ws, warps, stages, f"smem {c.metadata.shared/1024:.0f}KB", [l.split(":", 1)[-1].strip()[:60] for l in r.stderr.splitlines() if "registers" in l or "spill" in l], " ".join(f"{op}={sass.count(op)}" for op in ("SETMAXREG", "HGMMA", "UTMALDG", "UTMASTG", "LDL", "LDG")), flush=True)
    except Exception as e:
        print(block_m, block_n, ws, warps, stages, "FAILED", str(e)[:300])
