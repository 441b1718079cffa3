"""The toy model's sparse methods and LinVideo on CUDA: Flex against masked dense at the sizes the toy and a
short Wan clip use, then a short ``bench run`` of each method (issue 19: blocks smaller than Flex's tile).

1. Correctness (fresh random inputs; Flex in bf16 against masked dense in fp32, relative error within
   2e-2): every sparse method's own plan with its automatic blocks at the toy's size (8 x 8 x 8 = 512
   tokens, 4 heads x 32: blocks of 32, SLA's 8) and at a Wan 2.1 clip of 17 frames at 240 x 416
   (1,950 tokens, 12 heads x 128: blocks of 64, SLA's 16); DFA's window at both sizes; and at toy size
   the gradients through SLA's critical blocks (what ``bench train --method sla`` differentiates).
2. ``bench train --method sla`` for 2 steps on 2 prompts (the checkpoint its run needs).
3. ``bench run --model toy --method M`` for xattn, svg, svg2, radial, sla, dfa (a uniform window plan)
   and linvideo (the shipped default conversion): 2 held-out prompts, 8 steps, no evaluation, each a
   subprocess. Pass: exit code 0 and a record. ``--jobs`` runs go at once, so a run's wall time
   includes its Flex compiles and the others' load, not the method's speed.

A table on stdout and ``OUT/toy_cuda.json``. The toy is a diffusers ``WanTransformer3DModel``: the
subprocess runs need diffusers installed. About 4-6 minutes on one H200 with the defaults.

    python -m harness.benchmarks.toy_cuda_gpu --out $OUT
    python -m harness.benchmarks.toy_cuda_gpu --out /tmp/x --device cpu --shapes toy --methods radial  # smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from harness.atomic import write_json_atomic
from harness.benchmarks.sparse_gpu import BF16_RELATIVE_TOLERANCE, check_flex, relative_error, sparse_method_names
from harness.models.base import MODELS
from methods import TokenGrid
from methods.dfa import DEFAULT_WINDOW_FRACTION, window_attention, window_radius
from methods.kernels.block_sparse import BlockSparsePattern
from methods.kernels.sparse_backends import block_sparse_attention
from methods.sla import classify_blocks, sla_block_size


def check_shapes() -> dict[str, tuple[TokenGrid, int, int]]:
    """(grid, heads, head_dim) per checked size: the toy's defaults and a 17-frame 240 x 416 Wan 1.3B clip."""
    toy, wan = MODELS.get("toy"), MODELS.get("wan1.3b")
    clip = dataclasses.replace(wan.defaults, frames=17, height=240, width=416)
    return {
        name: (cls.token_grid(sampling), cls.transformer_config["num_attention_heads"],
               cls.transformer_config["attention_head_dim"])
        for name, cls, sampling in (("toy", toy, toy.defaults), ("wan-like", wan, clip))
    }  # fmt: skip


def fresh_qkv(grid: TokenGrid, heads: int, dim: int, device: torch.device, low: torch.dtype) -> list[torch.Tensor]:
    """fp32 q, k, v ``(1, heads, N, dim)`` representable in ``low``, so both paths see the same values."""
    return [torch.randn(1, heads, grid.tokens, dim, device=device).to(low).float() for _ in range(3)]


def check_dfa_window(grid: TokenGrid, heads: int, dim: int, device: torch.device, low: torch.dtype) -> dict[str, Any]:
    """DFA's window (1/8 of the tokens) through Flex against the masked path."""
    q, k, v = fresh_qkv(grid, heads, dim, device, low)
    radius = window_radius(grid.tokens, DEFAULT_WINDOW_FRACTION)
    flex = window_attention(q.to(low), k.to(low), v.to(low), radius, "flex")
    error = relative_error(flex, window_attention(q, k, v, radius, "masked"))
    return {"tokens": grid.tokens, "relative_error": error, "passed": error <= BF16_RELATIVE_TOLERANCE}


def check_sla_gradients(grid: TokenGrid, heads: int, dim: int, device: torch.device, low: torch.dtype
                        ) -> dict[str, Any]:  # fmt: skip
    """Gradients of q, k, v through SLA's critical blocks (its automatic block size): Flex against masked."""
    q, k, v = fresh_qkv(grid, heads, dim, device, low)
    block = sla_block_size(grid.tokens)
    critical, _ = classify_blocks(q, k, block, 0.05, 0.10)
    pattern = BlockSparsePattern(critical, grid.tokens, block)
    grads = {}
    for backend, dtype in (("flex", low), ("masked", torch.float32)):
        inputs = [t.detach().to(dtype).requires_grad_(True) for t in (q, k, v)]
        block_sparse_attention(*inputs, pattern, backend).float().square().mean().backward()
        grads[backend] = [t.grad for t in inputs]
    pairs = zip(("dq", "dk", "dv"), grads["flex"], grads["masked"], strict=True)
    errors = {name: relative_error(fast, ref) for name, fast, ref in pairs}
    worst = max(errors.values())
    return {"tokens": grid.tokens, "block_size_used": block, "relative_errors": errors, "relative_error": worst,
            "passed": worst <= BF16_RELATIVE_TOLERANCE}  # fmt: skip


def correctness(shapes: list[str], methods: list[str], device: torch.device) -> dict[str, dict[str, Any]]:
    """Every check per (shape, method); printed as it goes."""
    low = torch.bfloat16 if device.type == "cuda" else torch.float32
    results: dict[str, dict[str, Any]] = {}
    for shape in shapes:
        grid, heads, dim = check_shapes()[shape]
        checks = {name: check_flex(name, device, grid, heads, dim) for name in methods if name != "dfa"}
        if "dfa" in methods:
            checks["dfa"] = check_dfa_window(grid, heads, dim, device, low)
        if shape == "toy" and "sla" in methods and device.type == "cuda":  # Flex has no backward on CPU
            checks["sla_grad"] = check_sla_gradients(grid, heads, dim, device, low)
        for name, check in checks.items():
            error = check["relative_error"]
            outcome = check.get("error") or f"relative error {error:.2e}, blocks {check.get('block_size_used', '-')}"
            print(f"{shape:>8} flex vs masked {name:>8}: {'ok' if check['passed'] else 'FAILED'} ({outcome})",
                  flush=True)  # fmt: skip
        results[shape] = checks
    return results


def bench_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "harness.cli", *args]


def run_step(label: str, command: list[str], timeout_s: float) -> dict[str, Any]:
    """One subprocess: exit code, wall time, the record's density when its stdout is the JSON it promises."""
    started = time.time()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return {"label": label, "command": command, "passed": False, "seconds": time.time() - started,
                "error": f"timed out after {timeout_s:.0f} s"}  # fmt: skip
    result: dict[str, Any] = {"label": label, "command": command, "returncode": done.returncode,
                              "passed": done.returncode == 0, "seconds": time.time() - started}  # fmt: skip
    if done.returncode != 0:
        result["error"] = (done.stderr.strip().splitlines() or ["(no stderr)"])[-1]
        result["stderr_tail"] = done.stderr[-4000:]
    elif "--json" in command:
        try:
            record = json.loads(done.stdout)["record"]
            result["density"] = record["density"]["mean"]
        except (json.JSONDecodeError, KeyError, TypeError):
            result["note"] = "stdout is not the JSON record alone"
    print(f"{label:>10}: {'ok' if result['passed'] else 'FAILED'} in {result['seconds']:.0f} s"
          + (f" ({result['error']})" if "error" in result else ""), flush=True)  # fmt: skip
    return result


def bench_runs(methods: list[str], args: argparse.Namespace) -> list[dict[str, Any]]:
    """`bench train --method sla` (when sla runs), then `bench run` per method, ``args.jobs`` at a time."""
    prompts = MODELS.get("toy").default_prompts()[: args.prompts]
    common = ["--model", "toy", "--device", args.device, "--no-progress"]
    runs_dir, sla_checkpoint = args.out / "runs", args.out / "sla_checkpoint"
    extra = {"dfa": ["--param", "uniform=window_residual"], "sla": ["--checkpoint", str(sla_checkpoint)]}

    def run_command(method: str) -> list[str]:
        prompt_args = [part for prompt in prompts for part in ("--prompt", prompt)]
        return bench_command("run", "--method", method, *common, *prompt_args, "--steps", str(args.steps),
                             "--eval", "none", "--runs-dir", str(runs_dir), "--force", "--json",
                             *extra.get(method, []))  # fmt: skip

    results: list[dict[str, Any]] = []
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        training: Future[dict[str, Any]] | None = None
        if "sla" in methods:
            train = bench_command("train", "--method", "sla", *common, "--prompts", str(args.prompts),
                                  "--steps", "2", "--batch-size", "1", "--checkpoint-every", "1",
                                  "--out", str(sla_checkpoint))  # fmt: skip
            training = pool.submit(run_step, "sla train", train, args.timeout)
        futures = [pool.submit(run_step, m, run_command(m), args.timeout) for m in methods if m != "sla"]
        if training is not None:
            results.append(training.result())
            if results[-1]["passed"]:
                futures.append(pool.submit(run_step, "sla", run_command("sla"), args.timeout))
            else:
                results.append({"label": "sla", "passed": False, "error": "no checkpoint: sla train failed"})
        results += [future.result() for future in futures]
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--out", type=Path, required=True, help="folder for toy_cuda.json, the runs and SLA's checkpoint"
    )
    parser.add_argument("--device", default="cuda", help="cuda (the check) or cpu (a smoke test)")
    parser.add_argument("--shapes", default="toy,wan-like", help="comma-separated sizes to check: toy, wan-like")
    parser.add_argument("--methods", default="", help="comma-separated (default: every sparse method, dfa, linvideo)")
    parser.add_argument("--prompts", type=int, default=2, help="held-out toy prompts per run")
    parser.add_argument("--steps", type=int, default=8, help="denoising steps per run")
    parser.add_argument("--jobs", type=int, default=4, help="bench subprocesses at once")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds before a subprocess counts as failed")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda needs a CUDA GPU; use --device cpu for a smoke test")
    if importlib.util.find_spec("diffusers") is None:
        raise SystemExit("the toy model is a diffusers WanTransformer3DModel: install diffusers first")
    shapes = [s for s in args.shapes.split(",") if s]
    if unknown := set(shapes) - set(check_shapes()):
        raise SystemExit(f"unknown --shapes {sorted(unknown)}; choose from {sorted(check_shapes())}")
    methods = [m for m in args.methods.split(",") if m] or [*sparse_method_names(), "dfa", "linvideo"]
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.time()

    flex_checks = correctness(shapes, [m for m in methods if m != "linvideo"], device)
    runs = bench_runs(methods, args)
    passed = all(c["passed"] for checks in flex_checks.values() for c in checks.values()) and all(
        r["passed"] for r in runs
    )
    environment = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
    }
    write_json_atomic(args.out / "toy_cuda.json", {"passed": passed, "environment": environment,
                                                   "flex_check": flex_checks, "runs": runs,
                                                   "wall_seconds": time.time() - started})  # fmt: skip

    print(f"\n{'check':>22} {'result':>7} {'rel. error':>11}  blocks")
    for shape, checks in flex_checks.items():
        for name, check in checks.items():
            error = "-" if check["relative_error"] is None else f"{check['relative_error']:.2e}"
            print(f"{shape + ' ' + name:>22} {'ok' if check['passed'] else 'FAILED':>7} {error:>11}  "
                  f"{check.get('block_size_used', '-')}")  # fmt: skip
    print(f"\n{'bench':>10} {'result':>7} {'seconds':>8}  density")
    for run in runs:
        density = f"{run['density']:.3f}" if "density" in run else run.get("error", run.get("note", "-"))
        print(f"{run['label']:>10} {'ok' if run['passed'] else 'FAILED':>7} {run.get('seconds', 0):>8.0f}  {density}")
    print(
        f"{'all passed' if passed else 'FAILURES above'}; total {time.time() - started:.0f} s; "
        f"JSON: {args.out / 'toy_cuda.json'}"
    )
    if not passed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
