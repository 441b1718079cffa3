import subprocess, tempfile, sys
from pathlib import Path
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import ASTSource
sys.path.insert(0, str(Path(__file__).parent.parent / "rows_probe"))
import rows_probe as rp
TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
fn = rp._rows
types = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "o_ptr": "*bf16", "lists_ptr": "*i32", "scale": "fp32"}
for flat in (False, True):
  for rows, stages, qptr in ((4, 2, False), (4, 3, True), (4, 2, True), (4, 4, True)):
    consts = {"D": 128, "BLOCK": 64, "ROWS": rows, "FLAT": flat, "QPTR": qptr}
    sig = {n: ("constexpr" if n in consts else types.get(n, "i32")) for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if types.get(n, "").startswith("*")}
    try:
        c = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": stages})
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / "k.ptx"; p.write_text(c.asm["ptx"]); cb = Path(d) / "k.cubin"
            r = subprocess.run([str(TOOLS / "ptxas"), "-arch=sm_90a", "-v", str(p), "-o", str(cb)], capture_output=True, text=True, check=True)
            sass = subprocess.run([str(TOOLS / "cuobjdump"), "-sass", str(cb)], capture_output=True, text=True, check=True).stdout
        usage = [l.split(":", 1)[-1].strip() for l in r.stderr.splitlines() if "registers" in l or "spill" in l]
        cnt = " ".join(f"{op}={sass.count(op)}" for op in ("LDL", "STL", "HGMMA", "UTMALDG", "SYNCS", "MUFU.EX2"))
        ttgir = c.asm["ttgir"]
        print("flat" if flat else "nest", rows, stages, qptr, f"smem {c.metadata.shared/1024:.0f}KB", usage, cnt, "async_tma_copy" , ttgir.count("async_tma_copy_global_to_local"), "scf.for", ttgir.count("scf.for"), flush=True)
    except Exception as e:
        print(flat, rows, stages, "FAILED", type(e).__name__, str(e)[:800], flush=True)
from methods.kernels import block_list_triton as bl
fn = bl._attention
types = {"lse_ptr": "*fp32", "q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "o_ptr": "*bf16", "lists_ptr": "*i32", "counts_ptr": "*i32", "scale": "fp32"}
consts = {"D": 128, "BLOCK_D": 128, "BLOCK": 64, "PAIRS": 1, "TMA": True, "WS": False, "SPLIT": False}
sig = {n: ("constexpr" if n in consts else types.get(n, "i32")) for n in fn.arg_names}
attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if types.get(n, "").startswith("*")}
c = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 3})
with tempfile.TemporaryDirectory() as d:
    p = Path(d) / "k.ptx"; p.write_text(c.asm["ptx"]); cb = Path(d) / "k.cubin"
    r = subprocess.run([str(TOOLS / "ptxas"), "-arch=sm_90a", "-v", str(p), "-o", str(cb)], capture_output=True, text=True, check=True)
    sass = subprocess.run([str(TOOLS / "cuobjdump"), "-sass", str(cb)], capture_output=True, text=True, check=True).stdout
print("base", f"smem {c.metadata.shared/1024:.0f}KB", [l.split(":", 1)[-1].strip() for l in r.stderr.splitlines() if "registers" in l or "spill" in l or "C75" in l], " ".join(f"{op}={sass.count(op)}" for op in ("HGMMA", "UTMALDG", "SYNCS", "MUFU.EX2")))
