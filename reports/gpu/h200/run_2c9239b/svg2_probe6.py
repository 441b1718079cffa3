"""svg2 at Wan 1.3B (warm step, fixed density 0.295): the ranked selection on the plan's own masses with int64 and
int32 costs and 32, 16 or 8 entries a thread; the plan's device operators; plan, call and kernel back to back."""
import json
import os

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

from harness.benchmarks.sparse_gpu import back_to_back_ms, model_inputs
from methods import build_method, svg2
from methods.kernels import ranked_selection_triton as ranked

dev = torch.device("cuda")
q, k, v, ctx = model_inputs("wan1.3b", dev)
out = {}
captured = {}
original = svg2.select_by_cost_budget


def capture(scores, costs, fraction):
    captured["args"] = (scores.clone(), costs.clone(), fraction)
    return original(scores, costs, fraction)


with torch.inference_mode():
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        out["cudnn_b2b_ms"] = back_to_back_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), dev)
    m = build_method("svg2", fixed_density=0.295)
    for _ in range(3):
        m(q, k, v, ctx)
    svg2.select_by_cost_budget = capture
    m.plan(q, k, v, ctx)
    svg2.select_by_cost_budget = original
    scores, costs, fraction = captured["args"]
    reference = ranked.ranked_prefix(scores, costs.long(), fraction, True, 1)
    rows = {}
    for dtype in (torch.int64, torch.int32):
        for ept in (32, 16, 8):
            ranked.ENTRIES_PER_THREAD = ept
            w = costs.to(dtype)
            same = torch.equal(ranked.ranked_prefix(scores, w, fraction, True, 1), reference)
            ms = triton.testing.do_bench(lambda: ranked.ranked_prefix(scores, w, fraction, True, 1), warmup=50, rep=300,
                                         return_mode="median")
            rows[f"{str(dtype)[6:]} x{ept}"] = {"ms": ms, "same": same}
            print("ranked", dtype, ept, round(ms, 4), same, flush=True)
    ranked.ENTRIES_PER_THREAD = 32
    out["ranked"] = rows
    base = m.plan(q, k, v, ctx)
    out["plan_b2b_ms"] = back_to_back_ms(lambda: m.plan(q, k, v, ctx), dev, calls=20)
    out["call_b2b_ms"] = back_to_back_ms(lambda: m(q, k, v, ctx), dev)
    out["kernel_b2b_ms"] = back_to_back_ms(lambda: m.execute(q, k, v, base, m.backend), dev)
    out["selection_in_calls_share"] = (out["call_b2b_ms"] - out["kernel_b2b_ms"]) / out["cudnn_b2b_ms"]
    out["plan_share"] = out["plan_b2b_ms"] / out["cudnn_b2b_ms"]
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        m.plan(q, k, v, ctx)
        torch.cuda.synchronize()
    events = sorted((e for e in prof.key_averages() if e.self_device_time_total > 0),
                    key=lambda e: e.self_device_time_total, reverse=True)
    out["plan_ops"] = [[e.key[:120], e.count, e.self_device_time_total / 1e3] for e in events]
    print("== plan operators by self device time (ms, count)")
    for e in events[:45]:
        print(f"{e.self_device_time_total / 1e3:8.4f} {e.count:4d}  {e.key[:110]}")
json.dump(out, open(os.environ["OUT"] + "/svg2_probe6.json", "w"), indent=1)
print({k: v for k, v in out.items() if k not in ("plan_ops",)})
