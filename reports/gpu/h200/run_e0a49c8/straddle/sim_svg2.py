"""CPU model of svg2's tile work under several query-tile schemes (random q, k at Wan 1.3B, a few heads)."""
import sys, time, torch
from safetensors.torch import save_file
from dataclasses import replace
from harness.benchmarks.sparse_gpu import model_inputs
from methods import build_method
from methods.svg2 import LayerCentroids
torch.manual_seed(0)
model = sys.argv[1] if len(sys.argv) > 1 else "wan1.3b"
heads = int(sys.argv[2]) if len(sys.argv) > 2 else 2
q, k, v, ctx = model_inputs(model, torch.device("cpu"))
q, k, v = (x[:, :heads].contiguous() for x in (q, k, v))
ctx = replace(ctx, route=LayerCentroids())
t = time.time()
build_method("svg2", fixed_density=0.295).plan(q, k, v, ctx)
plan = build_method("svg2", fixed_density=0.295).plan(q, k, v, ctx)
print("plan s", time.time() - t, "density", float(plan.used_density()))
vb = plan.pattern.variable
save_file({"kept": vb.kept.contiguous(), "rows": vb.row_sizes.contiguous(), "cols": vb.col_sizes.contiguous()}, f"/tmp/svg2_blocks_{model}.safetensors")
