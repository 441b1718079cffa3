"""Device probe: svg2's variable blocks with straddling query tiles (straddle.py) against triton-variable's shipped
kernel, on svg2's plan at density 0.295 (random q, k, v, warm k-means), Wan 1.3B and 14B. Checks first (sampled rows
against masked dense in fp32), then times in one process. Writes straddle.json under argv[1]."""
import functools, json, sys, time
from dataclasses import replace
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).parent))
import straddle as sp
from harness.benchmarks.sparse_gpu import model_inputs
from harness.latency import back_to_back_ms
from methods import build_method
from methods.kernels.block_sparse import permute_tokens
from methods.kernels.sparse_backends import default_timer, masked_reference, reference_rows, relative_error, tolerance
from methods.kernels.variable_blocks_triton import variable_block_attention
from methods.svg2 import LayerCentroids

out_dir = Path(sys.argv[1]); out_dir.mkdir(parents=True, exist_ok=True)
models = sys.argv[2].split(",") if len(sys.argv) > 2 else ["wan1.3b", "wan14b"]
VARIANTS = {  # name: (block_m, block_n, warps, stages, ws, span)
    "128x64 ws 4w2s span8": (128, 64, 4, 2, True, 8),
    "128x64 ws 4w3s span8": (128, 64, 4, 3, True, 8),
    "128x64 ws 4w2s span4": (128, 64, 4, 2, True, 4),
    "128x64 8w3s span8": (128, 64, 8, 3, False, 8),
    "64x64 4w3s span8": (64, 64, 4, 3, False, 8),
}
import os
device = torch.device(os.environ.get("PROBE_DEVICE", "cuda"))
record = {"gpu": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__, "models": {}}
lines = []
for model in models:
    torch.manual_seed(0)
    q, k, v, ctx = model_inputs(model, device)
    if device.type == "cpu":
        q, k, v = (torch.nn.functional.pad(x, (0, 32 - x.shape[-1])).half() for x in (q, k, v))  # smoke: D 32
    dense = build_method("cudnn" if device.type == "cuda" else "sdpa")
    dense_ms = default_timer(functools.partial(dense, q, k, v, ctx), device, warmup=3, repeats=10) * 1e3
    ctx = replace(ctx, route=LayerCentroids())
    build_method("svg2", fixed_density=0.295).plan(q, k, v, ctx)
    plan = build_method("svg2", fixed_density=0.295).plan(q, k, v, ctx)
    density = float(plan.used_density())
    vb = plan.pattern.variable
    qp, kp, vp = permute_tokens(q, plan.q_order), permute_tokens(k, plan.kv_order), permute_tokens(v, plan.kv_order)
    rows = reference_rows(q.shape[-2], device)
    ref = masked_reference(qp, kp, vp, plan.pattern, rows)
    ideal = density * dense_ms
    entry = {"cudnn_ms": dense_ms, "density": density, "ideal_ms": ideal, "results": {}}
    print(f"{model}: cuDNN {dense_ms:.3f} ms, density {density:.4f}, ideal {ideal:.3f} ms", flush=True)
    shipped = functools.partial(variable_block_attention, qp, kp, vp, vb)
    base_out = shipped()
    err = relative_error(base_out[..., rows, :], ref)
    ms = default_timer(shipped, device, warmup=3, repeats=10) * 1e3
    b2b = back_to_back_ms(shipped, device)
    entry["results"]["shipped"] = {"error": err, "ms": ms, "b2b_ms": b2b, "of_ideal": ms / ideal, "b2b_of_ideal": b2b / ideal}
    print(f"  shipped: err {err:.2e}, {ms:.3f} ms ({ms/ideal:.2f}x), b2b {b2b:.3f} ({b2b/ideal:.2f}x)", flush=True)
    batch, heads, tokens, _ = q.shape
    for name, (bm, bn, warps, stages, ws, span) in VARIANTS.items():
        try:
            make = functools.partial(sp.plan, vb.kept, vb.row_sizes, vb.col_sizes, batch, heads, tokens, bm, bn, span)
            tables = make()
            spans = (tables[2] - tables[1] + 1)
            full = lambda: sp.straddle_attention(qp, kp, vp, vb.kept, vb.row_sizes, vb.col_sizes, bm, bn, warps, stages, ws, span)
            attn = lambda: sp.straddle_attention(qp, kp, vp, vb.kept, vb.row_sizes, vb.col_sizes, bm, bn, warps, stages, ws, span, tables)
            o = full()
            err = relative_error(o[..., rows, :], ref)
            diff = float((o.float() - base_out.float()).abs().max())
            finite = bool(torch.isfinite(o).all())
            res = {"error": err, "max_abs_vs_shipped": diff, "finite": finite, "span_max": int(spans.max()),
                   "tiles_over_span": int((spans > span).sum()), "listed_tiles": int(tables[4].sum())}
            print(f"  {name}: err {err:.2e}, max|diff| {diff:.2e}, finite {finite}, span max {res['span_max']}, "
                  f"tiles over span {res['tiles_over_span']}", flush=True)
            if finite and err <= tolerance(q.dtype):
                res["ms"] = default_timer(full, device, warmup=3, repeats=10) * 1e3
                res["b2b_ms"] = back_to_back_ms(full, device)
                res["attention_ms"] = default_timer(attn, device, warmup=3, repeats=10) * 1e3
                res["plan_ms"] = default_timer(make, device, warmup=3, repeats=10) * 1e3
                res["of_ideal"], res["b2b_of_ideal"] = res["ms"] / ideal, res["b2b_ms"] / ideal
                print(f"    {res['ms']:.3f} ms ({res['of_ideal']:.2f}x), b2b {res['b2b_ms']:.3f} ({res['b2b_of_ideal']:.2f}x); "
                      f"attention alone {res['attention_ms']:.3f}, tables {res['plan_ms']:.3f}", flush=True)
            entry["results"][name] = res
        except Exception as exc:
            entry["results"][name] = {"skipped": f"{type(exc).__name__}: {str(exc)[:300]}"}
            print(f"  {name}: FAILED {type(exc).__name__}: {str(exc)[:300]}", flush=True)
    record["models"][model] = entry
    (out_dir / "straddle.json").write_text(json.dumps(record, indent=1))
    del q, k, v, qp, kp, vp, plan
    torch.cuda.empty_cache()
print("\nmodel     variant                      ms     x ideal   b2b x ideal")
for model, entry in record["models"].items():
    for name, res in entry["results"].items():
        if "ms" in res:
            print(f"{model:9} {name:26} {res['ms']:8.3f} {res['of_ideal']:7.2f} {res['b2b_of_ideal']:9.2f}")
