"""svg2 (fixed density 0.295, warm step) per model: the cuDNN call synced and back to back, svg2's plan, call and
kernel (execute on triton-variable) back to back and synced, the selection's shares, the plan's top device ops."""
import json
import os
import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

from harness.benchmarks.sparse_gpu import KERNEL_REPEATS, back_to_back_ms, model_inputs
from harness.latency import measure
from methods import build_method

dev = torch.device("cuda")
out = {}
for model in sys.argv[1:]:
    q, k, v, ctx = model_inputs(model, dev)
    row = {}
    with torch.inference_mode():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            dense = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)  # noqa: E731
            row["cudnn_synced_ms"] = measure(dense, dev, *KERNEL_REPEATS)[0].median_ms
            row["cudnn_b2b_ms"] = back_to_back_ms(dense, dev)
        m = build_method("svg2", fixed_density=0.295)
        for _ in range(3):
            m(q, k, v, ctx)
        plan = m.plan(q, k, v, ctx)
        row["density"] = float(plan.used_density())
        row["plan_synced_ms"] = measure(lambda: m.plan(q, k, v, ctx), dev, *KERNEL_REPEATS)[0].median_ms
        row["kernel_synced_ms"] = measure(lambda: m.execute(q, k, v, plan, m.backend), dev, *KERNEL_REPEATS)[0].median_ms
        row["plan_b2b_ms"] = back_to_back_ms(lambda: m.plan(q, k, v, ctx), dev, calls=20)
        row["call_b2b_ms"] = back_to_back_ms(lambda: m(q, k, v, ctx), dev)
        row["kernel_b2b_ms"] = back_to_back_ms(lambda: m.execute(q, k, v, plan, m.backend), dev)
        row["selection_in_calls_ms"] = row["call_b2b_ms"] - row["kernel_b2b_ms"]
        for base in ("cudnn_synced_ms", "cudnn_b2b_ms"):
            row[f"in_calls_share_of_{base}"] = row["selection_in_calls_ms"] / row[base]
            row[f"kernel_over_ideal_{base}"] = row["kernel_synced_ms"] / (row["density"] * row[base])
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            m.plan(q, k, v, ctx)
            torch.cuda.synchronize()
        events = sorted((e for e in prof.key_averages() if e.self_device_time_total > 0),
                        key=lambda e: e.self_device_time_total, reverse=True)
        row["plan_ops"] = [[e.key[:120], e.count, e.self_device_time_total / 1e3] for e in events]
        print(f"== {model} plan operators by self device time (ms, count)")
        for e in events[:25]:
            print(f"{e.self_device_time_total / 1e3:8.4f} {e.count:4d}  {e.key[:100]}")
    out[model] = row
    print(model, {k: round(v, 4) for k, v in row.items() if k != "plan_ops"}, flush=True)
    del q, k, v, m, plan
    torch.cuda.empty_cache()
json.dump(out, open(os.environ["OUT"] + "/svg2_probe7.json", "w"), indent=1)
