"""GPU latency benchmark of the dense backends at the paper's shapes (``make bench``).

1. Correctness: every method against an fp32 math reference on fresh random inputs (relative
   error within bf16 tolerance); a failing method is not timed.
2. Timing: ``bench latency`` (random weights, real architecture) for Wan 1.3B at 480p x 81 frames
   (32,760 tokens) and Wan 14B at 720p x 81 frames (75,600 tokens).
3. A short table last; one JSON per model under ``--out``.

    python -m harness.benchmarks.gpu_latency --out $OUT --models wan1.3b,wan14b --methods sdpa,fa2,cudnn
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from harness.atomic import write_json_atomic
from harness.latency_run import LatencyRequest, run_latency, save_latency
from methods import build_method
from methods.base import AttentionContext, TokenGrid

BF16_RELATIVE_TOLERANCE = 2e-2
REPEATS = {"wan1.3b": (2, 5), "wan14b": (1, 3)}  # (warm-up, repeats): a 14B forward takes ~12 s


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def check_correctness(methods: list[str], device: torch.device) -> dict[str, float]:
    """Relative error of each method (bf16) against the fp32 math reference, fresh random inputs."""
    grid = TokenGrid(4, 16, 32)  # 2,048 tokens: frame-major like a real video grid
    ctx = AttentionContext(layer=0, num_layers=1, step=0, num_steps=1, timestep=0.5, cfg_branch="cond", grid=grid)
    q, k, v = (torch.randn(1, 12, grid.tokens, 128, device=device) for _ in range(3))
    reference = build_method("math")(q, k, v, ctx)
    errors = {}
    for name in methods:
        out = build_method(name)(q.bfloat16(), k.bfloat16(), v.bfloat16(), ctx)
        errors[name] = relative_error(out, reference)
    return errors


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for the JSON results")
    parser.add_argument("--models", default="wan1.3b,wan14b", help="comma-separated models (random weights)")
    parser.add_argument("--methods", default="sdpa,fa2,cudnn", help="comma-separated methods to time")
    parser.add_argument("--sample-steps", type=int, default=0, help="also time a whole sample of N steps")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    device = torch.device("cuda")
    methods = [m for m in args.methods.split(",") if m]
    args.out.mkdir(parents=True, exist_ok=True)

    errors = check_correctness(methods, device)
    passed = [m for m in methods if errors[m] <= BF16_RELATIVE_TOLERANCE]
    for name, err in errors.items():
        print(f"correctness {name:>8}: relative error {err:.2e} ({'ok' if name in passed else 'FAILED'})", flush=True)

    summary: list[dict[str, Any]] = []
    for model in [m for m in args.models.split(",") if m]:
        warmup, repeats = REPEATS.get(model, (2, 5))
        started = time.time()
        latency_path = args.out / f"latency_{model}.json"
        result = run_latency(
            LatencyRequest(
                model=model,
                methods=passed,
                weights="random",
                dtype="bfloat16",
                device="cuda",
                warmup=warmup,
                repeats=repeats,
                sample_steps=args.sample_steps,
            ),
            out=latency_path,
            log=print,
        )
        result["correctness_relative_error"] = errors
        result["wall_seconds"] = time.time() - started
        save_latency(result, latency_path)
        for name, entry in result["methods"].items():
            summary.append(
                {
                    "model": model,
                    "tokens": result["tokens"],
                    "method": name,
                    "forward_ms": entry["forward"]["median_ms"],
                    "attn_ms_per_layer": entry["attention_ms_per_layer"],
                    "speedup_vs_" + result["baseline"]: entry["speedup_vs_baseline"],
                    "peak_gib": entry["peak_gib"],
                }
            )
        del result
        torch.cuda.empty_cache()

    print(f"\n{torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    print(f"{'model':>8} {'tokens':>7} {'method':>7} {'forward ms':>11} {'attn ms/layer':>14} {'peak GiB':>9}")
    for row in summary:
        print(
            f"{row['model']:>8} {row['tokens']:>7} {row['method']:>7} {row['forward_ms']:>11.1f} "
            f"{row['attn_ms_per_layer']:>14.2f} {row['peak_gib']:>9.1f}"
        )
    write_json_atomic(args.out / "summary.json", summary)


if __name__ == "__main__":
    main()
