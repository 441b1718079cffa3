"""XAttention's block selection on the GPU: the fused Triton scoring checked, then timed against the torch path.

Used by :mod:`harness.benchmarks.sparse_gpu` (on CUDA, when xattn is among its methods), per model shape, for
the paths of :data:`PATHS`: torch, and the kernel's variants (``triton`` the two-pass kernel, the name of
earlier runs' JSON; ``triton_single_pass`` the single-pass one, ``triton_single_pass_tma`` the same reading through
tensor descriptors):

1. :func:`check_configs`: per kernel variant, every configuration of its autotuner list, pinned in turn,
   against the torch path in float64 (fresh random q, k at :data:`CONFIG_CHECK_SHAPE`, ragged, fp16 and bf16); a
   configuration that fails, or does not compile (out of shared memory, say), is dropped from the list before
   anything is timed, and the JSON names it with its errors.
2. :func:`selection_timings` at the model's shape: each variant's autotuned masses against float64 (relative
   error within ``MASS_TOLERANCE``, else that variant is not timed), the bf16 torch path's error beside them, and
   how many of xattn's kept blocks (threshold 0.9) each path shares with float64's; then the median time of
   the scoring alone and of the whole selection (``XAttention.plan``: scoring and threshold) per path, and
   each as a fraction of the dense cuDNN call of the same run.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch

from harness.latency import measure
from methods import AttentionContext
from methods.kernels import xattn_scoring_triton as fused
from methods.kernels.block_sparse import select_by_cumulative_mass
from methods.xattn import XAttention, antidiagonal_block_scores, antidiagonal_block_scores_torch

#: Timed path -> (``$BENCH_XATTN_BACKEND``, ``$BENCH_XATTN_VARIANT``; None: the torch path has no variant).
PATHS: dict[str, tuple[str, str | None]] = {"torch": ("torch", None), "triton": ("triton", "two_pass"),
                                            "triton_single_pass": ("triton", "single_pass"),
                                            "triton_single_pass_tma": ("triton", "single_pass_tma")}  # fmt: skip
#: (batch, heads, tokens, head_dim, block, stride) of the per-configuration check: Wan's heads and blocks,
#: 4,000 tokens (a ragged last block and last tile; a multiple of the stride, so the descriptor variant reads
#: through its descriptors).
CONFIG_CHECK_SHAPE = {"cuda": (1, 12, 4000, 128, 128, 8), "cpu": (1, 2, 296, 32, 128, 8)}
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
def environment(settings: dict[str, str]) -> Iterator[None]:
    """Environment variables (a kernel's backend or variant choice, e.g. ``BENCH_XATTN_BACKEND``) set to
    ``settings`` (as a user would) for the calls inside, restored after."""
    saved = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value


def scoring_path(path: str) -> AbstractContextManager[None]:
    """``$BENCH_XATTN_BACKEND`` and ``$BENCH_XATTN_VARIANT`` set to ``path``'s for the calls inside; the variant
    left as it is for the torch path."""
    backend, variant = PATHS[path]
    return environment({fused.BACKEND_ENV: backend} | ({} if variant is None else {fused.VARIANT_ENV: variant}))


def check_configs(device: torch.device) -> dict[str, Any]:
    """Per kernel variant, each configuration of its autotuner's list pinned in turn, against float64 on fresh
    random inputs; the failing ones are removed from the list. Returns ``{"shape", "variants": {variant:
    {"configs": [{"config", "errors", "passed"}], "kept"}}}``."""
    batch, heads, tokens, dim, block, stride = CONFIG_CHECK_SHAPE[device.type]
    dtypes = (torch.float16,) if fused.INTERPRETED else (torch.float16, torch.bfloat16)
    inputs = {dtype: [torch.randn(batch, heads, tokens, dim, device=device).to(dtype) for _ in range(2)]
              for dtype in dtypes}  # fmt: skip
    refs = {dtype: antidiagonal_block_scores_torch(q.double(), k.double(), block, stride)
            for dtype, (q, k) in inputs.items()}  # fmt: skip
    variants = {}
    for variant in fused.VARIANTS:
        tuner = fused.TUNERS[variant]
        results, kept = [], []
        for config in tuner.configs:
            try:
                with pinned(tuner, [config]):
                    errors = {
                        str(dtype).removeprefix("torch."): relative_error(
                            fused.block_masses(q, k, block, stride, variant), refs[dtype]
                        )
                        for dtype, (q, k) in inputs.items()
                    }
            except (fused.triton.runtime.errors.OutOfResources, fused.triton.compiler.errors.CompilationError) as exc:
                errors = {"compile": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
            passed = all(isinstance(e, float) and e <= fused.MASS_TOLERANCE for e in errors.values())
            results.append({"config": str(config), "errors": errors, "passed": passed})
            print(f"xattn scoring {variant} config {config}: {'ok' if passed else 'FAILED'} {errors}", flush=True)
            if passed:
                kept.append(config)
        if kept:
            tuner.configs = kept
            tuner.cache.clear()
        variants[variant] = {"configs": results, "kept": len(kept)}
    return {"shape": CONFIG_CHECK_SHAPE[device.type], "variants": variants}


def selection_timings(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext,
                      dense_ms: float, config_check: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """Check at this shape, then time every path (see the module docstring). q, k, v ``(B, H, N, D)`` bf16 (fp16
    in the interpreter); ``dense_ms`` the dense call's median; ``config_check`` :func:`check_configs`'s result. A
    kernel variant is timed only if some configuration of it passed there and its masses here are within
    tolerance; ``passed`` says whether every variant was."""
    method = XAttention()
    block = method.block_size(q.shape[-2])
    stride = method.stride_for(block)
    ref = antidiagonal_block_scores_torch(q.double(), k.double(), block, stride)
    kept_ref = select_by_cumulative_mass(ref, method.threshold)
    check: dict[str, Any] = {}
    for path, (backend, variant) in PATHS.items():
        if variant is not None:
            reason = fused.unsupported_reason(q, k, block, stride)
            if reason is not None or not config_check["variants"][variant]["kept"]:
                check[path] = {"skipped": reason or "no configuration passed"}
                continue
        masses = antidiagonal_block_scores(q, k, block, stride, backend=backend, variant=variant)
        shared = (select_by_cumulative_mass(masses, method.threshold) == kept_ref).float().mean().item()
        check[path] = {"relative_error": relative_error(masses, ref), "selection_agreement": shared}
        if variant is not None:
            check[path]["passed"] = check[path]["relative_error"] <= fused.MASS_TOLERANCE
        del masses
    del ref
    passed = all(check[path].get("passed", False) for path, (_, variant) in PATHS.items() if variant is not None)
    row: dict[str, Any] = {"block": block, "stride": stride, "dense_ms": dense_ms, "check": check,
                           "passed": passed, "paths": {}}  # fmt: skip
    for path, (backend, variant) in PATHS.items():
        if variant is not None and not check[path].get("passed", False):
            row["paths"][path] = {"skipped": check[path].get("skipped", "masses outside tolerance")}
            continue
        scoring, _ = measure(lambda b=backend, kind=variant: antidiagonal_block_scores(q, k, block, stride, b, kind),
                             q.device, *REPEATS)  # fmt: skip
        with scoring_path(path):
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
            lines.append(f"{model:>8} {path:>18}  skipped: {timing['skipped']}")
            continue
        lines.append(f"{model:>8} {path:>18} {timing['scoring']['median_ms']:>10.2f} "
                     f"{timing['scoring_fraction']:>8.1%} {timing['selection']['median_ms']:>12.2f} "
                     f"{timing['selection_fraction']:>8.1%} "
                     f"{check['relative_error']:>10.1e} {check['selection_agreement']:>9.4f}")  # fmt: skip
    return lines


TABLE_HEADER = (f"{'model':>8} {'path':>18} {'scoring ms':>10} {'of dense':>8} {'selection ms':>12} {'of dense':>8} "
                f"{'error':>10} {'agreement':>9}")  # fmt: skip
