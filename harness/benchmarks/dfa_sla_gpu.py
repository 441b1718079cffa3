"""DFA's window and SLA's attention on the GPU: Flex against masked dense first, then per-call latency.

1. Correctness (fresh random inputs, bf16, 8,190 tokens: not a multiple of 128): DFA's band through
   compiled FlexAttention against the masked dense SDPA in fp32; SLA's output and its gradients (q, k,
   v, proj), both at 64-blocks regrouped into Flex's 128-tiles, against the masked path in fp32. A
   failure stops the script.
2. Latency per self-attention call at Wan 1.3B 480p (12 heads x 128, 32,760 tokens) and Wan 14B 720p
   (40 heads, 75,600 tokens): cudnn dense, DFA's window (1/8), DFA's residual refresh (dense + window),
   SLA forward (classification + critical Flex + linear branch) at the paper's 5% / 10%, 64-blocks.

    python -m harness.benchmarks.dfa_sla_gpu --out $OUT
    python -m harness.benchmarks.dfa_sla_gpu --out /tmp/x --device cpu      # smoke test, tiny shapes (Flex in fp32;
                                                                             # forward only: no Flex backward on CPU)
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from harness.atomic import write_json_atomic
from harness.environment import capture_environment
from harness.latency import measure
from methods import AttentionContext, TokenGrid
from methods.dfa import DEFAULT_WINDOW_FRACTION, band_density, window_attention, window_radius
from methods.sla import SlaProjections, SparseLinearAttention

BF16_RELATIVE_TOLERANCE = 2e-2
SHAPES = {"wan1.3b-480p": (12, 32760), "wan14b-720p": (40, 75600)}
SMOKE_SHAPES = {"smoke": (2, 300)}


def relative(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def sla_call(head_dim: int, tokens: int, backend: str, device: torch.device, block: Any = "auto"
             ) -> tuple[SparseLinearAttention, AttentionContext]:  # fmt: skip
    """SLA on one layer with a fixed, non-zero projection (so the linear branch counts)."""
    method = SparseLinearAttention(backend=backend, block_size=block)
    state = SlaProjections(1, head_dim).to(device)
    torch.nn.init.constant_(state.proj[0].weight, 0.01)
    method.attach(state, trained=True)
    return method, AttentionContext(layer=0, num_layers=1, step=1, num_steps=2, timestep=0.5, cfg_branch="cond",
                                    grid=TokenGrid(1, 1, tokens))  # fmt: skip


def check_correctness(device: torch.device, heads: int, tokens: int, head_dim: int) -> dict[str, float]:
    """Relative errors of the Flex paths against the masked dense paths (fp32): DFA's window in bf16, SLA's in bf16
    on CUDA and fp32 elsewhere."""
    # Rounded to bf16 first, so that both paths see the same values: SLA ranks blocks by pooled scores,
    # and a rounding that moves a block across a class boundary is a different computation, not an error.
    q, k, v = (torch.randn(1, heads, tokens, head_dim, device=device).bfloat16().float() for _ in range(3))
    radius = window_radius(tokens, DEFAULT_WINDOW_FRACTION)
    errors = {"dfa_window": relative(window_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), radius, "flex"),
                                     window_attention(q, k, v, radius, "masked"))}  # fmt: skip
    cuda = device.type == "cuda"
    fast_dtype = torch.bfloat16 if cuda else torch.float32
    # Forward and gradients at the paper's 64-blocks, which Flex runs regrouped into its 128-tiles.
    # FlexAttention has no backward on CPU: there (smoke mode) only the forward is compared.
    checks = (("sla_output", False), ("sla_grad", True)) if cuda else (("sla_output", False),)
    for label, grad in checks:
        block = 64 if cuda else 4
        results = {}
        for backend, dtype in (("flex", fast_dtype), ("masked", torch.float32)):
            method, ctx = sla_call(head_dim, tokens, backend, device, block)
            inputs = [t.detach().clone().to(dtype).requires_grad_(grad) for t in (q, k, v)]
            with torch.set_grad_enabled(grad):
                out = method(*inputs, ctx)
            if grad:
                out.float().square().mean().backward()
                results[backend] = [t.grad for t in inputs] + [method.state.proj[0].weight.grad]
            else:
                results[backend] = [out]
        names = ("dq", "dk", "dv", "dproj") if grad else ("",)
        for name, fast_value, ref_value in zip(names, results["flex"], results["masked"], strict=True):
            errors[f"{label}_{name}".rstrip("_")] = relative(fast_value, ref_value)
    return errors


def time_call(fn: Callable[[], Any], device: torch.device, repeats: int) -> dict[str, float]:
    stats, _ = measure(fn, device, 2, repeats)
    return stats.to_dict()


def latency(device: torch.device, heads: int, tokens: int, head_dim: int, repeats: int) -> dict[str, Any]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, v = (torch.randn(1, heads, tokens, head_dim, device=device, dtype=dtype) for _ in range(3))
    radius = window_radius(tokens, DEFAULT_WINDOW_FRACTION)
    method, ctx = sla_call(head_dim, tokens, "auto", device)
    with torch.inference_mode():
        rows = {
            "dense_sdpa": time_call(lambda: F.scaled_dot_product_attention(q, k, v), device, repeats),
            "dfa_window": time_call(lambda: window_attention(q, k, v, radius), device, repeats),
            "dfa_refresh": time_call(
                lambda: F.scaled_dot_product_attention(q, k, v) - window_attention(q, k, v, radius), device, repeats
            ),
            "sla": time_call(lambda: method(q, k, v, ctx), device, repeats),
        }
    return {"calls": rows, "dfa_window_density": band_density(tokens, radius), "sla_density": method.density.mean(),
            "sla_block": method.params()["block_size_used"]}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for dfa_sla_gpu.json")
    parser.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (a smoke test, tiny shapes)")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per variant (median and spread)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    smoke = device.type != "cuda"
    check_shape = (2, 300, 16) if smoke else (12, 8190, 128)
    errors = check_correctness(device, *check_shape)
    print("correctness (relative error vs masked dense fp32):", json.dumps(errors, indent=1))
    failed = {name: err for name, err in errors.items() if not err <= BF16_RELATIVE_TOLERANCE}
    result: dict[str, Any] = {"correctness": errors, "tolerance": BF16_RELATIVE_TOLERANCE,
                              "environment": capture_environment(device), "shapes": {}}  # fmt: skip
    if failed:
        write_json_atomic(args.out / "dfa_sla_gpu.json", {**result, "status": "failed"})
        raise SystemExit(f"correctness failed: {failed}")
    for name, (heads, tokens) in (SMOKE_SHAPES if smoke else SHAPES).items():
        entry = latency(device, heads, tokens, 16 if smoke else 128, args.repeats)
        result["shapes"][name] = entry
        calls = ", ".join(f"{call} {stats['median_ms']:.3g} ms" for call, stats in entry["calls"].items())
        densities = f"window density {entry['dfa_window_density']:.3f}, sla density {entry['sla_density']:.3f}"
        print(f"{name} ({heads} heads, {tokens} tokens): {calls}; {densities}")
    write_json_atomic(args.out / "dfa_sla_gpu.json", {**result, "status": "complete"})


if __name__ == "__main__":
    main()
