"""Device probe: triton-variable's whole-tile loop at 128 rows under warp specialisation (ws128.py), against the
shipped 64-row kernel: its rate per computed entry on svg2's plan (0.295, random q, k, v, warm k-means) and with every
block kept, and the time a hybrid (128-row tiles for each query block's whole 128-row chunks, the shipped kernel for
the rest) would take at the measured rates. Checks first, then times. Writes ws128.json under argv[1]."""
import functools, json, os, sys
from dataclasses import replace
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).parent))
import ws128 as wp
from harness.benchmarks.sparse_gpu import model_inputs
from methods import build_method
from methods.kernels.block_sparse import VariableBlocks, permute_tokens
from methods.kernels.sparse_backends import default_timer, masked_reference, reference_rows, relative_error, tolerance
from methods.kernels.variable_blocks_triton import Config, computed_entries, default_config, variable_block_attention
from methods.svg2 import LayerCentroids

out_dir = Path(sys.argv[1]); out_dir.mkdir(parents=True, exist_ok=True)
models = sys.argv[2].split(",") if len(sys.argv) > 2 else ["wan1.3b", "wan14b"]
device = torch.device(os.environ.get("PROBE_DEVICE", "cuda"))
BM = 128 if device.type == "cuda" else 32
BN = 64 if device.type == "cuda" else 16
VARIANTS = {"ws 4w2s": (4, 2, True), "ws 4w3s": (4, 3, True), "8w3s": (8, 3, False)}
record = {"gpu": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "models": {}}
for model in models:
    torch.manual_seed(0)
    q, k, v, ctx = model_inputs(model, device)
    if device.type == "cpu":
        q, k, v = (torch.nn.functional.pad(x, (0, 32 - x.shape[-1])).half() for x in (q, k, v))
    batch, heads, tokens, _ = q.shape
    total = batch * heads * tokens**2
    dense = build_method("cudnn" if device.type == "cuda" else "sdpa")
    dense_ms = default_timer(functools.partial(dense, q, k, v, ctx), device, warmup=3, repeats=10) * 1e3
    ctx = replace(ctx, route=LayerCentroids())
    build_method("svg2", fixed_density=0.295).plan(q, k, v, ctx)
    plan = build_method("svg2", fixed_density=0.295).plan(q, k, v, ctx)
    density = float(plan.used_density())
    vb = plan.pattern.variable
    qp, kp, vp = permute_tokens(q, plan.q_order), permute_tokens(k, plan.kv_order), permute_tokens(v, plan.kv_order)
    rows = reference_rows(tokens, device)
    ref = masked_reference(qp, kp, vp, plan.pattern, rows)
    ideal = density * dense_ms
    entry = {"cudnn_ms": dense_ms, "density": density, "ideal_ms": ideal, "plan": {}, "full": {}}
    print(f"{model}: cuDNN {dense_ms:.3f} ms, density {density:.4f}, ideal {ideal:.3f} ms", flush=True)
    shipped_config = default_config()
    shipped = functools.partial(variable_block_attention, qp, kp, vp, vb)
    err = relative_error(shipped()[..., rows, :], ref)
    ms = default_timer(shipped, device, warmup=3, repeats=10) * 1e3
    work64 = computed_entries(vb, tokens, shipped_config)[0] / total
    rate64 = ms / (work64 * dense_ms)
    entry["plan"]["shipped"] = {"error": err, "ms": ms, "of_ideal": ms / ideal, "computed_share": work64, "rate": rate64}
    print(f"  shipped {shipped_config.name}: err {err:.2e}, {ms:.3f} ms ({ms/ideal:.2f}x = work {work64/density:.2f} x rate {rate64:.2f})", flush=True)
    config128 = Config(BM, BN, 4, 2, tiles=True)
    work128 = computed_entries(vb, tokens, config128)[0] / total
    tables = wp.plan(vb.kept, vb.row_sizes, vb.col_sizes, batch, heads, tokens, BM, BN)
    plan_ms = default_timer(lambda: wp.plan(vb.kept, vb.row_sizes, vb.col_sizes, batch, heads, tokens, BM, BN), device, 3, 10) * 1e3
    full_rows = vb.row_sizes // BM * BM
    work_full = computed_entries(replace(vb, row_sizes=full_rows), tokens, config128)[0] / total
    work_rest = computed_entries(replace(vb, row_sizes=vb.row_sizes - full_rows), tokens, shipped_config)[0] / total
    for name, (warps, stages, ws) in VARIANTS.items():
        call = functools.partial(wp.ws_attention, qp, kp, vp, tables, BM, BN, warps, stages, ws and device.type == "cuda")
        o = call()
        err = relative_error(o[..., rows, :], ref)
        res = {"error": err, "finite": bool(torch.isfinite(o).all()), "computed_share": work128}
        if res["finite"] and err <= tolerance(q.dtype):
            res["ms"] = default_timer(call, device, warmup=3, repeats=10) * 1e3
            res["rate"] = res["ms"] / (work128 * dense_ms)
            res["hybrid_ms_at_rates"] = dense_ms * (work_full * res["rate"] + work_rest * rate64)
            res["hybrid_of_ideal"] = res["hybrid_ms_at_rates"] / ideal
            print(f"  128-row {name}: err {err:.2e}, {res['ms']:.3f} ms ({res['ms']/ideal:.2f}x = work {work128/density:.2f} x rate "
                  f"{res['rate']:.2f}); tables {plan_ms:.3f} ms; hybrid at these rates {res['hybrid_ms_at_rates']:.3f} ms "
                  f"({res['hybrid_of_ideal']:.2f}x; work full chunks {work_full/density:.2f} + rest {work_rest/density:.2f})", flush=True)
        else:
            print(f"  128-row {name}: err {err:.2e} FAILED (finite {res['finite']})", flush=True)
        entry["plan"][name] = res
    # every block kept: 128-row query blocks, 64-token key blocks, so that no tile is partial: the rate alone
    count_q, count_k = -(-tokens // BM), -(-tokens // BN)
    q_sizes = torch.full((1, 1, count_q), BM, device=device, dtype=torch.int64); q_sizes[..., -1] = tokens - (count_q - 1) * BM
    k_sizes = torch.full((1, 1, count_k), BN, device=device, dtype=torch.int64); k_sizes[..., -1] = tokens - (count_k - 1) * BN
    full = VariableBlocks(torch.ones(1, 1, count_q, count_k, device=device, dtype=torch.bool), q_sizes, k_sizes)
    dense_ref = torch.nn.functional.scaled_dot_product_attention(q[..., rows, :].float(), k.float(), v.float())
    full_tables = wp.plan(full.kept, full.row_sizes, full.col_sizes, batch, heads, tokens, BM, BN)
    calls = {"shipped": functools.partial(variable_block_attention, q, k, v, full)}
    for name, (warps, stages, ws) in VARIANTS.items():
        calls[f"128-row {name}"] = functools.partial(wp.ws_attention, q, k, v, full_tables, BM, BN, warps, stages, ws and device.type == "cuda")
    for name, call in calls.items():
        err = relative_error(call()[..., rows, :], dense_ref)
        res = {"error": err}
        if err <= tolerance(q.dtype):
            res["ms"] = default_timer(call, device, warmup=3, repeats=10) * 1e3
            res["of_dense"] = res["ms"] / dense_ms
        print(f"  every block kept, {name}: err {err:.2e}" + (f", {res['ms']:.3f} ms, {res['of_dense']:.2f}x the dense call" if "ms" in res else " FAILED"), flush=True)
        entry["full"][name] = res
    record["models"][model] = entry
    (out_dir / "ws128.json").write_text(json.dumps(record, indent=1))
    del q, k, v, qp, kp, vp, plan
    if device.type == "cuda":
        torch.cuda.empty_cache()
