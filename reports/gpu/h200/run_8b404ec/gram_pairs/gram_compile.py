import subprocess, tempfile, sys
from pathlib import Path
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import ASTSource
sys.path.insert(0, str(Path(__file__).parent))
import gram_pairs_probe as gp
from methods.kernels import linear_attention_triton as lat
TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
def comp(fn, consts, types, warps, stages, label):
    sig = {n: ("constexpr" if n in consts else types.get(n, "i32")) for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if types.get(n, "").startswith("*")}
    c = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "k.ptx"; p.write_text(c.asm["ptx"]); cb = Path(d) / "k.cubin"
        r = subprocess.run([str(TOOLS / "ptxas"), "-arch=sm_90a", "-v", str(p), "-o", str(cb)], capture_output=True, text=True, check=True)
    print(label, f"smem {c.metadata.shared/1024:.0f}KB", [l.split(":", 1)[-1].strip()[:90] for l in r.stderr.splitlines() if "registers" in l or "spill" in l or "C75" in l], flush=True)
types = {"x_ptr": "*bf16", "y_ptr": "*bf16", "w_ptr": "*fp32", "part_ptr": "*fp32"}
for bn, warps, stages in gp.VARIANTS:
    comp(gp._gram_pairs, {"D": 128, "BLOCK_D": 128, "BLOCK_N": bn}, types, warps, stages, f"pairs {bn}x{warps}x{stages}")
fn = lat._gram_partials.fn
for bn, warps, stages in lat.REDUCE_CONFIGS:
    comp(fn, {"D": 128, "BLOCK_D": 128, "BLOCK_N": bn, "KIND": 0, "HAS_W": True}, types, warps, stages, f"package {bn}x{warps}x{stages}")
