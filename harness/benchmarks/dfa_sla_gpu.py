"""DFA's window and SLA's attention on the GPU: Flex against masked dense first, then per-call latency.

1. Correctness (fresh random inputs, bf16, 8,190 tokens: not a multiple of 128): DFA's band through
   compiled FlexAttention against the masked dense SDPA in fp32; SLA's output on Flex's own tiles (64-blocks
   regrouped into 128-tiles), on flex-tuned (64 x 64 tiles, unregrouped) and on triton-blocks (its critical blocks
   listed from the ranking), its linear branch, projection and sum on the Triton kernels
   (:mod:`methods.kernels.sla_linear_triton`), and SLA's gradients (q, k, v, proj: the torch linear branch,
   regrouped Flex), against the masked path in fp32; then the kernels' linear branch against the torch path in
   float64 at Wan 1.3B's and 14B's token counts (4 heads, two classes each). A failure stops the script.
2. Latency per self-attention call at Wan 1.3B 480p (12 heads x 128, 32,760 tokens) and Wan 14B 720p
   (40 heads, 75,600 tokens): cuDNN dense (pinned), DFA's window (1/8), DFA's residual refresh (dense + window),
   SLA forward (classification, critical branch and linear branch as ``auto`` runs them) at the paper's 5% / 10%,
   64-blocks; and SLA's parts: the selection, the critical branch on 64 x 64 Flex tiles, regrouped into 128 x 128
   ones and on triton-blocks, each against its ideal (the density x the dense call), the selection with the critical
   lists triton-blocks reads, the linear branch on the kernel and in torch, the whole call with the torch linear
   branch.

    python -m harness.benchmarks.dfa_sla_gpu --out $OUT
    python -m harness.benchmarks.dfa_sla_gpu --out /tmp/x --device cpu      # smoke test, tiny shapes (Flex in fp32;
                                                                             # forward only: no Flex backward on CPU)
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from harness.atomic import write_json_atomic
from harness.environment import capture_environment
from harness.latency import measure
from methods import AttentionContext, TokenGrid
from methods.dfa import DEFAULT_WINDOW_FRACTION, band_density, window_attention, window_radius
from methods.kernels import sla_linear_triton as sla_linear
from methods.kernels.block_list_triton import block_list_attention, pattern_lists
from methods.kernels.block_sparse import flex_block_sparse_attention
from methods.kernels.sparse_backends import HOPPER_FLEX_OPTIONS, tuned_flex_attention
from methods.sla import (
    LINEAR_EPS,
    SlaProjections,
    SparseLinearAttention,
    classes_from_order,
    classify_blocks,
    critical_pattern,
    key_block_order,
    marginal_linear_attention,
)

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
    # Forward on Flex's own tiles (regrouped into 128) and on flex-tuned's 64 x 64 ones, the linear branch on the
    # kernel where it runs (CUDA, bf16, no gradient); gradients on the torch linear branch and regrouped Flex.
    # FlexAttention has no backward on CPU: there (smoke mode) only the forward is compared.
    checks = [("sla_output", "flex", False), ("sla_output_flex_tuned", "flex-tuned", False)]
    checks += [("sla_output_triton_blocks", "triton-blocks", False), ("sla_grad", "flex", True)] if cuda else []
    for label, fast_backend, grad in checks:
        block = 64 if cuda else 4
        results = {}
        for backend, dtype in ((fast_backend, fast_dtype), ("masked", torch.float32)):
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
        for name, fast_value, ref_value in zip(names, results[fast_backend], results["masked"], strict=True):
            errors[f"{label}_{name}".rstrip("_")] = relative(fast_value, ref_value)
    if cuda:
        # 4 heads at each shape's tokens: the float64 reference's states take 3 GB per head at 14B.
        for name, (_, shape_tokens) in SHAPES.items():
            errors.update(check_linear_kernel(device, 4, shape_tokens, head_dim, name))
    return errors


def check_linear_kernel(device: torch.device, heads: int, tokens: int, head_dim: int, label: str
                        ) -> dict[str, float]:  # fmt: skip
    """SLA's linear branch on the Triton kernel (bf16 inputs) against the torch path in float64, at the paper's
    classes (5% critical, 10% skipped) and at 50% / 25% (a quarter of each row marginal), 64-blocks."""
    q, k, v = (torch.randn(1, heads, tokens, head_dim, device=device, dtype=torch.bfloat16) for _ in range(3))
    order = key_block_order(q, k, 64)
    errors = {}
    for critical, negligible in ((0.05, 0.10), (0.50, 0.25)):
        _, marginal = classes_from_order(order, critical, negligible)
        out = sla_linear.marginal_linear_attention(q, k, v, marginal, 64, LINEAR_EPS)
        ref = marginal_linear_attention(q.double(), k.double(), v.double(), marginal, 64)
        errors[f"sla_linear_kernel_{label}_{round(critical * 100)}_{round(negligible * 100)}"] = relative(out, ref)
    return errors


def time_call(fn: Callable[[], Any], device: torch.device, repeats: int) -> dict[str, float]:
    stats, _ = measure(fn, device, 2, repeats)
    return stats.to_dict()


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The dense call sparse methods are measured against: cuDNN's on CUDA (pinned: SDPA's own choice there may be
    another kernel), SDPA's choice elsewhere."""
    if q.is_cuda:
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)


def latency(device: torch.device, heads: int, tokens: int, head_dim: int, repeats: int) -> dict[str, Any]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, v = (torch.randn(1, heads, tokens, head_dim, device=device, dtype=dtype) for _ in range(3))
    radius = window_radius(tokens, DEFAULT_WINDOW_FRACTION)
    method, ctx = sla_call(head_dim, tokens, "auto", device)
    with torch.inference_mode():
        rows = {
            "dense": time_call(lambda: dense_attention(q, k, v), device, repeats),
            "dfa_window": time_call(lambda: window_attention(q, k, v, radius), device, repeats),
            "dfa_refresh": time_call(
                lambda: dense_attention(q, k, v) - window_attention(q, k, v, radius), device, repeats
            ),
            "sla": time_call(lambda: method(q, k, v, ctx), device, repeats),
        }
        parts = sla_parts(method, q, k, v, device, repeats)
        rows.update(parts.pop("calls"))
        with mock.patch.dict(os.environ, {sla_linear.BACKEND_ENV: "torch"}):
            rows["sla_torch_linear"] = time_call(lambda: method(q, k, v, ctx), device, repeats)
    density = method.density.mean()
    dense_ms = rows["dense"]["median_ms"]
    over_ideal = {name: stats["median_ms"] / (density * dense_ms) for name, stats in rows.items()
                  if name.startswith("sla_critical_")}  # fmt: skip
    return {"calls": rows, "dense_backend": "cudnn" if device.type == "cuda" else "sdpa",
            "dfa_window_density": band_density(tokens, radius), "sla_density": density,
            "sla_block": method.params()["block_size_used"], **parts, "sla_critical_ideal_ms": density * dense_ms,
            "sla_critical_over_ideal": over_ideal,
            "sla_critical_backend": method.params()["backend_used"][str(tokens)],
            "sla_speedup_vs_dense": dense_ms / rows["sla"]["median_ms"]}  # fmt: skip


def sla_parts(method: SparseLinearAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              device: torch.device, repeats: int) -> dict[str, Any]:  # fmt: skip
    """SLA's call in its parts: the selection (pooled scores, ranks, classes), the critical branch on flex-tuned's
    64 x 64 tiles, regrouped into the Hopper 128 x 128 ones and (on CUDA) on triton-blocks with its lists from the
    ranking, the linear branch on the kernel (where it runs) and in torch; with the linear kernel's configuration."""
    tokens = q.shape[-2]
    block = method.block_size(tokens)
    pattern, marginal = critical_pattern(q, k, block, method.critical, method.negligible)
    lists = pattern_lists(pattern)
    calls = {
        "sla_selection": time_call(lambda: classify_blocks(q, k, block, method.critical, method.negligible), device,
                                   repeats),
        "sla_critical_64_tiles": time_call(lambda: tuned_flex_attention(q, k, v, pattern), device, repeats),
        "sla_critical_128_tiles": time_call(
            lambda: flex_block_sparse_attention(q, k, v, pattern, HOPPER_FLEX_OPTIONS), device, repeats),
        "sla_linear_torch": time_call(lambda: marginal_linear_attention(q, k, v, marginal, block), device, repeats),
    }  # fmt: skip
    if q.is_cuda:
        calls["sla_critical_triton_blocks"] = time_call(
            lambda: block_list_attention(q, k, v, *lists, block), device, repeats)  # fmt: skip
        calls["sla_selection_with_lists"] = time_call(
            lambda: pattern_lists(critical_pattern(q, k, block, method.critical, method.negligible)[0]), device,
            repeats)  # fmt: skip
    out: dict[str, Any] = {}
    if sla_linear.use_fused(q, k, v, block):
        calls["sla_linear_kernel"] = time_call(
            lambda: sla_linear.marginal_linear_attention(q, k, v, marginal, block, LINEAR_EPS), device, repeats
        )
        out["sla_linear_kernel_config"] = str(getattr(sla_linear.TUNER, "best_config", None))
    return {"calls": calls, **out}


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
        over_ideal = ", ".join(f"{row.removeprefix('sla_critical_')} {ratio:.2f}x"
                               for row, ratio in entry["sla_critical_over_ideal"].items())  # fmt: skip
        print(f"  sla: {entry['sla_speedup_vs_dense']:.2f}x dense; critical branch over its ideal: {over_ideal} "
              f"(the call's: {entry['sla_critical_backend']})")  # fmt: skip
        densities = f"window density {entry['dfa_window_density']:.3f}, sla density {entry['sla_density']:.3f}"
        print(f"{name} ({heads} heads, {tokens} tokens): {calls}; {densities}")
    write_json_atomic(args.out / "dfa_sla_gpu.json", {**result, "status": "complete"})


if __name__ == "__main__":
    main()
