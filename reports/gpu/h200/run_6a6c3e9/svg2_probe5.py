"""svg2's plan at Wan 1.3B and 14B (warm step, fixed density 0.295): back-to-back plan time with the k-means pair on
two streams or one after the other, the popularity order in Triton or torch; the cuDNN call beside it; then the
plan's device operators at 1.3B."""
import json
import os
import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

from harness.benchmarks.sparse_gpu import back_to_back_ms, model_inputs
from methods import build_method, svg2
from methods.kernels import kmeans_triton

dev = torch.device("cuda")
out = {}
pair = svg2.kmeans_both


def sequential(first, second, backend=None, update=None):
    (x, init, it), (y, y_init, y_it) = first, second
    return kmeans_triton.kmeans_lloyd(x, init, it, "sorted"), kmeans_triton.kmeans_lloyd(y, y_init, y_it, "sorted")


for model in sys.argv[1:]:
    q, k, v, ctx = model_inputs(model, dev)
    row = {}
    with torch.inference_mode():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            row["cudnn_b2b_ms"] = back_to_back_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), dev)
        m = build_method("svg2", fixed_density=0.295)
        for _ in range(3):
            m(q, k, v, ctx)
        torch.cuda.synchronize()
        base = m.plan(q, k, v, ctx)
        for name, kb, pop in (("pair+triton", pair, "auto"), ("sequential+triton", sequential, "auto"),
                              ("pair+torch_pop", pair, "torch"), ("sequential+torch_pop", sequential, "torch"),
                              ("pair+triton again", pair, "auto")):
            svg2.kmeans_both = kb
            os.environ["BENCH_POPULARITY_BACKEND"] = pop
            plan = m.plan(q, k, v, ctx)
            same = (torch.equal(plan.q_order, base.q_order) and torch.equal(plan.kv_order, base.kv_order)
                    and torch.equal(plan.pattern.variable.kept, base.pattern.variable.kept)
                    and float(plan.density) == float(base.density))
            row[name] = {"plan_b2b_ms": back_to_back_ms(lambda: m.plan(q, k, v, ctx), dev, calls=20),
                         "call_b2b_ms": back_to_back_ms(lambda: m(q, k, v, ctx), dev),
                         "same_plan": same}
            print(model, name, row[name], flush=True)
        svg2.kmeans_both = pair
        os.environ["BENCH_POPULARITY_BACKEND"] = "auto"
        row["kernel_b2b_ms"] = back_to_back_ms(lambda: m.execute(q, k, v, base, m.backend), dev)
        for name in ("pair+triton", "sequential+triton", "pair+torch_pop"):
            row[name]["selection_in_calls_share"] = (row[name]["call_b2b_ms"] - row["kernel_b2b_ms"]) / row["cudnn_b2b_ms"]
            row[name]["plan_share"] = row[name]["plan_b2b_ms"] / row["cudnn_b2b_ms"]
        if model == "wan1.3b":
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                m.plan(q, k, v, ctx)
                torch.cuda.synchronize()
            events = sorted((e for e in prof.key_averages() if e.self_device_time_total > 0),
                            key=lambda e: e.self_device_time_total, reverse=True)
            print("== plan operators by self device time (ms, count)")
            for e in events[:40]:
                print(f"{e.self_device_time_total / 1e3:8.4f} {e.count:4d}  {e.key[:120]}")
    out[model] = row
    print(model, json.dumps(row), flush=True)
json.dump(out, open(os.environ["OUT"] + "/svg2_probe5.json", "w"), indent=1)
for model, row in out.items():
    print(f"{model}: cudnn {row['cudnn_b2b_ms']:.3f} kernel {row['kernel_b2b_ms']:.3f}")
    for name in ("pair+triton", "sequential+triton", "pair+torch_pop", "sequential+torch_pop", "pair+triton again"):
        r = row[name]
        print(f"  {name:22s} plan {r['plan_b2b_ms']:.3f} call {r['call_b2b_ms']:.3f} same {r['same_plan']} "
              f"in-calls {r.get('selection_in_calls_share', float('nan')):.4f} plan {r.get('plan_share', float('nan')):.4f}")
