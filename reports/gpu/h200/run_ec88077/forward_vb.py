"""Experiment: svg2's variable blocks on q, k, v captured from a Wan 1.3B random-weight forward (step 12)."""
import functools, json, os, sys
import torch
from harness.latency_run import run_latency, LatencyRequest
from methods import build_method
from methods import svg2 as svg2_module
from methods.svg2 import SparseVideoGen2, LayerCentroids
from methods.kernels.block_sparse import permute_tokens, block_ids
from methods.kernels.sparse_backends import default_timer
from methods.kernels.variable_blocks_triton import Config, variable_block_attention
from dataclasses import replace

LAYERS = (3, 15, 27)
from harness.benchmarks.variable_blocks_gpu import parse_configs
CONFIGS = parse_configs(sys.argv[1])
by_pop = svg2_module.by_popularity
captured = {}
orig = SparseVideoGen2.plan
def plan(self, q, k, v, ctx):
    if ctx.layer in LAYERS and ctx.step == 12 and ctx.layer not in captured:
        captured[ctx.layer] = (q.clone(), k.clone(), v.clone(), ctx)
    return orig(self, q, k, v, ctx)
SparseVideoGen2.plan = plan
run_latency(LatencyRequest(model="wan1.3b", methods=["svg2"], baseline="svg2", weights="random", device="cuda", warmup=0, repeats=1,
                           step=12, method_params={"svg2": {"fixed_density": 0.295}}), log=print)
SparseVideoGen2.plan = orig
print("captured", sorted(captured))

def stats(var):
    kept, rs, cs = var.kept[0], var.row_sizes[0], var.col_sizes[0]
    N = int(rs[0].sum())
    rows_util = float(rs.sum() / (((rs + 63) // 64) * 64).sum())
    useful = listed = 0
    for h in range(kept.shape[0]):
        tk = kept[h].repeat_interleave(cs[h], dim=-1)  # (Cq, N)
        pad = (-N) % 64
        tiles = torch.nn.functional.pad(tk, (0, pad)).view(tk.shape[0], -1, 64).any(-1)
        useful += float((tk.sum(-1) * rs[h]).sum())
        listed += float((tiles.sum(-1) * 64 * rs[h]).sum())
    return {"rows_util": rows_util, "cols_util": useful / listed,
            "q_sizes": [int(rs.min()), float(rs.float().mean()), int(rs.max())],
            "k_sizes": [int(cs.min()), float(cs.float().mean()), int(cs.max())],
            "q_empty": int((rs == 0).sum()), "k_empty": int((cs == 0).sum())}

out = {}
dense = build_method("cudnn")
for layer, (q, k, v, ctx) in sorted(captured.items()):
    dense_ms = default_timer(functools.partial(dense, q, k, v, ctx), q.device, warmup=3, repeats=10) * 1e3
    row = {"dense_ms": dense_ms}
    for label, reorder in (("popularity", by_pop),):
        svg2_module.by_popularity = reorder
        c = replace(ctx, route=LayerCentroids())
        m = build_method("svg2", fixed_density=0.295)
        m.plan(q, k, v, c)
        p = m.plan(q, k, v, c)
        svg2_module.by_popularity = by_pop
        qp, kp, vp = permute_tokens(q, p.q_order), permute_tokens(k, p.kv_order), permute_tokens(v, p.kv_order)
        density = float(p.used_density())
        entry = {"density": density, **stats(p.pattern.variable)}
        for cfg in CONFIGS:
            ms = default_timer(functools.partial(variable_block_attention, qp, kp, vp, p.pattern.variable, cfg), q.device, warmup=3, repeats=10) * 1e3
            entry[cfg.name] = {"ms": ms, "of_ideal": ms / (density * dense_ms)}
        row[label] = entry
        print(layer, label, json.dumps(entry), flush=True)
    out[layer] = row
os.makedirs(os.environ["OUT"], exist_ok=True)
json.dump(out, open(os.path.join(os.environ["OUT"], "forward_vb.json"), "w"), indent=1)
