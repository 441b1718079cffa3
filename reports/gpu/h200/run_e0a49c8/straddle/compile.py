import subprocess, tempfile, sys
from pathlib import Path
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import ASTSource
sys.path.insert(0, str(Path(__file__).parent))
import straddle as sp
TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
fn = sp._attention
types = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "o_ptr": "*bf16", "bits_ptr": "*i64", "lists_ptr": "*i32",
         "counts_ptr": "*i32", "lo_ptr": "*i32", "hi_ptr": "*i32", "row_starts_ptr": "*i32", "slots_ptr": "*i8", "scale": "fp32"}
VARIANTS = [(128, 64, True, 4, 2, False), (128, 64, True, 4, 3, False), (128, 64, False, 8, 3, False), (64, 64, False, 4, 3, False), (128, 64, False, 8, 2, True), (64, 64, False, 4, 2, True)]
for block_m, block_n, ws, warps, stages, overflow in VARIANTS:
    consts = {"D": 128, "BLOCK_M": block_m, "BLOCK_N": block_n, "WS": ws, "SPAN": 8, "OVERFLOW": overflow}
    exp = overflow
    sig = {n: ("constexpr" if n in consts else types.get(n, "i32")) for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if types.get(n, "").startswith("*")}
    try:
        c = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / "k.ptx"; p.write_text(c.asm["ptx"]); cb = Path(d) / "k.cubin"
            r = subprocess.run([str(TOOLS / "ptxas"), "-arch=sm_90a", "-v", str(p), "-o", str(cb)], capture_output=True, text=True, check=True)
            sass = subprocess.run([str(TOOLS / "cuobjdump"), "-sass", str(cb)], capture_output=True, text=True, check=True).stdout
        print(block_m, block_n, ws, warps, stages, exp, f"smem {c.metadata.shared/1024:.0f}KB", [l.split(":", 1)[-1].strip()[:60] for l in r.stderr.splitlines() if "registers" in l or "spill" in l], " ".join(f"{op}={sass.count(op)}" for op in ("SETMAXREG", "HGMMA", "UTMALDG", "LDL", "LDG")), flush=True)
    except Exception as e:
        print(block_m, block_n, ws, warps, stages, "FAILED", str(e)[:300])
