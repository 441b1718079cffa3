"""svg's band on the split backend, part by part (issue 21: kernel time <= 1.2 x density x cuDNN).

Per model shape, svg's plan on random bf16 q, k, v (permuted as its layout transform does), then:

1. checked: flex-tuned and ``flashinfer-split`` with each candidate of Flex's options for the partial tiles
   (:data:`PARTIAL_OPTIONS`) against masked dense in fp32 on sampled query rows (relative error <= the backends'
   tolerance, else the candidate is not timed);
2. timed in one process: cuDNN dense; flex-tuned over the whole pattern; the split backend per candidate; and its
   parts alone (the BSR wrapper on the full tiles with log-sum-exps, Flex on the partial tiles per candidate, the
   merge), each synchronised per call (as the backend choice times) and back to back (the host's work overlapped, as
   in a forward); every time over density x cuDNN's.

Prints a table last and writes ``split.json`` (strict JSON, atomically) under ``--out``::

    python3 -m harness.benchmarks.split_gpu --out reports/gpu/h200/<run>/split --models wan1.3b,wan14b
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from harness.atomic import write_json_atomic
from harness.benchmarks.sparse_gpu import model_inputs
from harness.environment import capture_environment
from harness.latency import back_to_back_ms
from methods import build_method
from methods.kernels import sparse_backends
from methods.kernels.attention_states import LOG2_E, merge_attention_states
from methods.kernels.block_sparse import flex_block_sparse_attention, permute_tokens
from methods.kernels.sparse_backends import (
    HOPPER_FLEX_OPTIONS,
    bsr_attention,
    default_timer,
    masked_reference,
    reference_rows,
    relative_error,
    split_patterns,
    tolerance,
)

#: Flex's options for the partial tiles: the Hopper ones, Flex's own choice, and smaller tiles (more programs at once
#: for a part of a few tiles per query block).
PARTIAL_OPTIONS: dict[str, dict[str, Any] | None] = {
    "hopper 128x128 w8": HOPPER_FLEX_OPTIONS,
    "flex default": None,
    "64x64 w4 s3": sparse_backends.SMALL_TILE_FLEX_OPTIONS,
    "128x64 w4 s3": {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64, "fwd_num_warps": 4, "fwd_num_stages": 3},
}


def timings(fn: Callable[[], Any], device: torch.device) -> dict[str, float]:
    """Milliseconds per call, synchronised per call and back to back."""
    return {
        "synced_ms": default_timer(fn, device, warmup=3, repeats=7) * 1e3,
        "back_to_back_ms": back_to_back_ms(fn, device),
    }


def measure_model(model: str, device: torch.device) -> dict[str, Any]:
    """Check, then time, every variant at ``model``'s shape (see the module docstring)."""
    q, k, v, ctx = model_inputs(model, device)
    with torch.inference_mode():
        dense_ms = default_timer(lambda: build_method("cudnn")(q, k, v, ctx), device, warmup=3, repeats=7) * 1e3
        plan = build_method("svg").plan(q, k, v, ctx)
        q, k, v = (permute_tokens(x, plan.q_order) for x in (q, k, v))
        pattern = plan.pattern
        density = float(plan.used_density())
        ideal = density * dense_ms
        rows = reference_rows(q.shape[-2], device)
        reference = masked_reference(q, k, v, pattern, rows)
        whole, cut = split_patterns(pattern)
        variants: dict[str, Callable[[], torch.Tensor]] = {
            "flex-tuned": lambda: sparse_backends.tuned_flex_attention(q, k, v, pattern),
            **{f"split, partial {name}": (
                lambda o=options: sparse_backends.flashinfer_split_attention(q, k, v, pattern, o))
               for name, options in PARTIAL_OPTIONS.items()},
        }  # fmt: skip
        result: dict[str, Any] = {"tokens": q.shape[-2], "heads": q.shape[1], "density": density,
                                  "cudnn_ms": dense_ms, "ideal_ms": ideal, "variants": {}, "parts": {}}  # fmt: skip
        for name, fn in variants.items():
            error = relative_error(fn()[..., rows, :], reference)
            entry: dict[str, Any] = {"error": error, "passed": error <= tolerance(q.dtype)}
            if entry["passed"]:
                entry |= timings(fn, device)
                entry["over_ideal"] = entry["synced_ms"] / ideal
            result["variants"][name] = entry
            print(f"{model} {name:>28}: error {error:.1e}"
                  + (f", {entry['synced_ms']:.3f} ms ({entry['over_ideal']:.2f}x ideal)" if entry["passed"] else
                     " FAILED"), flush=True)  # fmt: skip
        result["passed"] = all(entry["passed"] for entry in result["variants"].values())
        result["partial_tile_density"] = cut.tile_density()
        result["full_tile_density"] = 0.0 if whole is None else whole.density()
        if not result["passed"] or whole is None:
            return result  # the parts are timed only where the whole passed, and there are two of them
        out_whole, lse_whole = bsr_attention(q, k, v, whole, return_lse=True)
        out_cut, lse_cut = flex_block_sparse_attention(q, k, v, cut, HOPPER_FLEX_OPTIONS, return_lse=True)
        parts: dict[str, Callable[[], Any]] = {
            "full tiles on BSR": lambda: bsr_attention(q, k, v, whole, return_lse=True),
            **{f"partial tiles on Flex, {name}": (
                lambda o=options: flex_block_sparse_attention(q, k, v, cut, o, return_lse=True))
               for name, options in PARTIAL_OPTIONS.items()},
            "merge": lambda: merge_attention_states(out_whole, lse_whole, out_cut, lse_cut * LOG2_E),
        }  # fmt: skip
        for name, fn in parts.items():
            result["parts"][name] = timings(fn, device)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for split.json")
    parser.add_argument("--models", default="wan1.3b,wan14b", help="comma-separated models (their attention shape)")
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    started = time.time()
    results: dict[str, Any] = {"environment": capture_environment(device), "models": {}}
    for model in args.models.split(","):
        results["models"][model] = measure_model(model, device)
        write_json_atomic(args.out / "split.json", results)
    print(f"\n{'model':>8} {'variant or part':>40} {'synced ms':>10} {'b2b ms':>8} {'x ideal':>8}")
    for model, result in results["models"].items():
        for name, entry in {**result["variants"], **result["parts"]}.items():
            if "synced_ms" in entry:
                over = entry["synced_ms"] / result["ideal_ms"]
                print(f"{model:>8} {name:>40} {entry['synced_ms']:>10.3f} {entry['back_to_back_ms']:>8.3f} "
                      f"{over:>7.2f}x")  # fmt: skip
    failed = [model for model, result in results["models"].items() if not result["passed"]]
    print(f"x ideal: over density x cuDNN. Total {time.time() - started:.0f} s."
          + (f" FAILED its check at {', '.join(failed)}." if failed else ""))  # fmt: skip
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
