"""XAttention's block selection on the GPU: the fused Triton scoring checked, then timed against the torch path.

Used by :mod:`harness.benchmarks.sparse_gpu` (on CUDA, when xattn is among its methods), per model shape:

1. :func:`check_configs`: every configuration of the kernel's autotuner list, pinned in turn, against the torch
   path in float64 (fresh random q, k at :data:`CONFIG_CHECK_SHAPE`, ragged, fp16 and bf16); a configuration
   that fails, or does not compile (out of shared memory, say), is dropped from the list before anything is
   timed, and the JSON names it with its errors.
2. :func:`selection_timings` at the model's shape: the autotuned kernel's masses against float64 (relative
   error within ``MASS_TOLERANCE``, else the kernel is not timed), the bf16 torch path's error beside it, and
   how many of xattn's kept blocks (threshold 0.9) each path shares with float64's; then the median time of
   the scoring alone and of the whole selection (``XAttention.plan``: scoring and threshold) per path, and
   each as a fraction of the dense cuDNN call of the same run.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from harness.latency import measure
from methods import AttentionContext
from methods.kernels import xattn_scoring_triton as fused
from methods.kernels.block_sparse import select_by_cumulative_mass
from methods.xattn import XAttention, antidiagonal_block_scores, antidiagonal_block_scores_torch

PATHS = ("torch", "triton")
#: (batch, heads, tokens, head_dim, block, stride) of the per-configuration check: Wan's heads and blocks,
#: 4,000 tokens (a ragged last block and last tile).
CONFIG_CHECK_SHAPE = {"cuda": (1, 12, 4000, 128, 128, 8), "cpu": (1, 2, 300, 32, 128, 8)}
REPEATS = (3, 10)  # (warm-up, timed) calls; the first warm-up call of the kernel runs its autotuner


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


@contextmanager
def pinned(tuner: Any, configs: list[Any]) -> Iterator[None]:
    """A kernel's autotuner (``triton.autotune``'s object) restricted to ``configs`` (its cache cleared before and
    after)."""
    saved = tuner.configs
    tuner.configs = configs
    tuner.cache.clear()
    try:
        yield
    finally:
        tuner.configs = saved
        tuner.cache.clear()


@contextmanager
def backend_variable(variable: str, backend: str) -> Iterator[None]:
    """``$variable`` (a kernel's backend choice, e.g. ``BENCH_XATTN_BACKEND``) set to ``backend`` (as a user would)
    for the calls inside."""
    saved = os.environ.get(variable)
    os.environ[variable] = backend
    try:
        yield
    finally:
        if saved is None:
            del os.environ[variable]
        else:
            os.environ[variable] = saved


def check_configs(device: torch.device) -> dict[str, Any]:
    """Each configuration of the autotuner's list pinned in turn, against float64 on fresh random inputs; the
    failing ones are removed from the list. Returns ``{"configs": [{"config", "errors", "passed"}], "kept"}``."""
    batch, heads, tokens, dim, block, stride = CONFIG_CHECK_SHAPE[device.type]
    dtypes = (torch.float16,) if fused.INTERPRETED else (torch.float16, torch.bfloat16)
    inputs = {dtype: [torch.randn(batch, heads, tokens, dim, device=device).to(dtype) for _ in range(2)]
              for dtype in dtypes}  # fmt: skip
    refs = {dtype: antidiagonal_block_scores_torch(q.double(), k.double(), block, stride)
            for dtype, (q, k) in inputs.items()}  # fmt: skip
    results, kept = [], []
    for config in fused._block_masses.configs:
        try:
            with pinned(fused._block_masses, [config]):
                errors = {
                    str(dtype).removeprefix("torch."): relative_error(
                        fused.fused_block_masses(q, k, block, stride), refs[dtype]
                    )
                    for dtype, (q, k) in inputs.items()
                }
        except (fused.triton.runtime.errors.OutOfResources, fused.triton.compiler.errors.CompilationError) as exc:
            errors = {"compile": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
        passed = all(isinstance(e, float) and e <= fused.MASS_TOLERANCE for e in errors.values())
        results.append({"config": str(config), "errors": errors, "passed": passed})
        print(f"xattn scoring config {config}: {'ok' if passed else 'FAILED'} {errors}", flush=True)
        if passed:
            kept.append(config)
    if kept:
        fused._block_masses.configs = kept
        fused._block_masses.cache.clear()
    return {"shape": CONFIG_CHECK_SHAPE[device.type], "configs": results, "kept": len(kept)}


def selection_timings(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext,
                      dense_ms: float, configs_passed: bool) -> dict[str, Any]:  # fmt: skip
    """Check at this shape, then time both paths (see the module docstring). q, k, v ``(B, H, N, D)`` bf16 (fp16
    in the interpreter); ``dense_ms`` the dense call's median. The kernel is timed only if ``configs_passed``
    (some configuration passed :func:`check_configs`) and its masses here are within tolerance."""
    method = XAttention()
    block = method.block_size(q.shape[-2])
    stride = method.stride_for(block)
    ref = antidiagonal_block_scores_torch(q.double(), k.double(), block, stride)
    kept_ref = select_by_cumulative_mass(ref, method.threshold)
    check: dict[str, Any] = {}
    for path in PATHS:
        if path == "triton" and (not configs_passed or fused.unsupported_reason(q, k, block, stride)):
            check[path] = {"skipped": fused.unsupported_reason(q, k, block, stride) or "no configuration passed"}
            continue
        masses = antidiagonal_block_scores(q, k, block, stride, backend=path)
        shared = (select_by_cumulative_mass(masses, method.threshold) == kept_ref).float().mean().item()
        check[path] = {"relative_error": relative_error(masses, ref), "selection_agreement": shared}
        del masses
    del ref
    passed = check["triton"].get("relative_error", float("inf")) <= fused.MASS_TOLERANCE
    row: dict[str, Any] = {"block": block, "stride": stride, "dense_ms": dense_ms, "check": check,
                           "passed": passed, "paths": {}}  # fmt: skip
    for path in PATHS:
        if path == "triton" and not passed:
            row["paths"][path] = {"skipped": check[path].get("skipped", "masses outside tolerance")}
            continue
        scoring, _ = measure(lambda p=path: antidiagonal_block_scores(q, k, block, stride, backend=p), q.device,
                             *REPEATS)  # fmt: skip
        with backend_variable(fused.BACKEND_ENV, path):
            selection, _ = measure(lambda: method.plan(q, k, v, ctx), q.device, *REPEATS)
        row["paths"][path] = {"scoring": scoring.to_dict(), "selection": selection.to_dict(),
                              "scoring_fraction": scoring.median_ms / dense_ms,
                              "selection_fraction": selection.median_ms / dense_ms}  # fmt: skip
    return row


def table_lines(model: str, row: dict[str, Any]) -> list[str]:
    """Printed rows: per path, scoring and selection in ms and as a share of the dense call, and the errors."""
    lines = []
    for path, timing in row["paths"].items():
        check = row["check"][path]
        if "skipped" in timing:
            lines.append(f"{model:>8} {path:>7}  skipped: {timing['skipped']}")
            continue
        lines.append(f"{model:>8} {path:>7} {timing['scoring']['median_ms']:>10.2f} {timing['scoring_fraction']:>8.1%} "
                     f"{timing['selection']['median_ms']:>12.2f} {timing['selection_fraction']:>8.1%} "
                     f"{check['relative_error']:>10.1e} {check['selection_agreement']:>9.4f}")  # fmt: skip
    return lines


TABLE_HEADER = (f"{'model':>8} {'path':>7} {'scoring ms':>10} {'of dense':>8} {'selection ms':>12} {'of dense':>8} "
                f"{'error':>10} {'agreement':>9}")  # fmt: skip
