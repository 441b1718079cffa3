"""Every device operator of svg2's plan and of a whole call at Wan 1.3B (warm step), by self device time."""
import torch
from torch.profiler import ProfilerActivity, profile

from harness.benchmarks.sparse_gpu import model_inputs
from methods import build_method

dev = torch.device("cuda")
q, k, v, ctx = model_inputs("wan1.3b", dev)
with torch.inference_mode():
    m = build_method("svg2", fixed_density=0.295)
    for _ in range(3):
        m(q, k, v, ctx)
    torch.cuda.synchronize()
    for label, fn in (("plan", lambda: m.plan(q, k, v, ctx)), ("call", lambda: m(q, k, v, ctx))):
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if e.self_device_time_total > 0]
        events.sort(key=lambda e: e.self_device_time_total, reverse=True)
        total = sum(e.self_device_time_total for e in events) / 1e3
        print(f"== {label}: device total {total:.4f} ms over {sum(e.count for e in events)} events")
        for e in events[:70]:
            print(f"{e.self_device_time_total / 1e3:8.4f} {e.count:4d}  {e.key[:150]}")
