"""Attention time per call against sequence length, 8K to 128K tokens: the O(n) vs O(n^2) picture.

Random q, k, v at Wan 1.3B's 12 heads x 128 (bf16 on CUDA) over the token grid of Wan's 480p frame (30 x 52 =
1,560 tokens after the VAE and patching) repeated over 5 to 84 latent frames: 7,800, 15,600, 32,760 (81 video
frames), 65,520 and 131,040 tokens. No model and no diffusers: one attention call per method and length, at a
step after every paper warm-up and at the last layer (:func:`harness.benchmarks.sparse_gpu.sparse_context`).
Methods at their settings: dense (cudnn and fa2 on CUDA, sdpa on CPU), linear attention with LinVideo's
hedgehog map, and every sparse method that needs no calibration; the two whose selection near-uniform random
attention defeats run at the density their paper reports (xattn 0.344: tau 0.9 on HunyuanVideo, the paper
has no Wan run; svg2 0.295: Wan 2.1 T2V), recorded as stated (``fixed_density``).

1. Correctness before any timing, on a small grid: dense backends against float64 math attention, linear
   attention against its quadratic float64 form with the same feature map, sparse methods as compiled Flex
   against the masked dense form of one plan (:func:`harness.benchmarks.sparse_gpu.check_flex`). A method
   that fails is not timed.
2. Timing: :func:`harness.latency.measure` per (method, length), warm-ups excluded (Flex compiles once per
   length, svg2's first call runs its 50 k-means iterations); median and spread recorded with the density
   and the TFLOP/s on the kept score entries. A length a method cannot fit in memory is recorded as such.

The JSON (kind ``scaling``) goes to ``$OUT/scaling.json`` (or ``--out``), rewritten after each method so that
a stopped run keeps what it measured; ``bench report`` draws its log-log plot when it finds it among the records.
Budget: an estimate of 3-5 minutes on one H200 with the defaults (not yet run there), most of it FlexAttention
compiling once per sparse method and length (25 compiles); ``--frames 5,21,84`` roughly halves it.

    python -m harness.benchmarks.scaling_gpu                        # $OUT/scaling.json
    python -m harness.benchmarks.scaling_gpu --frames 5,21 --methods cudnn,linear,radial
    python -m harness.benchmarks.scaling_gpu --device cpu --frames 1,2 --frame 4x8 --heads 2 --head-dim 16
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from harness.atomic import write_json_atomic
from harness.benchmarks.sparse_gpu import PAPER_DENSITY, check_flex, relative_error, sparse_context, sparse_method_names
from harness.environment import capture_environment
from harness.latency import machine_load, measure
from harness.latency_run import dense_attention_tflop
from methods import METHODS, AttentionContext, TokenGrid, build_method
from methods.kernels.linear_attention import naive_linear_attention
from methods.linear import LinearAttention

WAN_480P_FRAME = (30, 52)
DEFAULT_FRAMES = (5, 10, 21, 42, 84)
WAN_1_3B_LAYERS = 30
LINEAR_SETTING = {"kernel": "hedgehog"}
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 1e-2, torch.float32: 1e-4}
CHECK_GRID = TokenGrid(2, 16, 32)


def default_methods(device: torch.device) -> dict[str, dict[str, Any]]:
    """Method name -> parameters: dense, linear, and every sparse method at its setting."""
    dense = ["cudnn", "fa2"] if device.type == "cuda" else ["sdpa"]
    sparse = {name: {"fixed_density": PAPER_DENSITY[name]} if name in PAPER_DENSITY else {}
              for name in sparse_method_names()}  # fmt: skip
    return {**{name: {} for name in dense}, "linear": dict(LINEAR_SETTING), **sparse}


def check_method(name: str, params: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """One call on the check grid against its reference; ``passed`` when the relative error is within ``dtype``'s
    tolerance. Sparse methods: :func:`check_flex` (Flex against masked dense, one plan, with ``params``)."""
    heads, dim = (12, 128) if device.type == "cuda" else (2, 16)
    if METHODS.get(name).capabilities.sparsity in ("static", "dynamic"):
        return check_flex(name, device, CHECK_GRID, heads, dim, params)
    generator = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, heads, CHECK_GRID.tokens, dim, device=device, generator=generator).to(dtype)
               for _ in range(3))  # fmt: skip
    ctx = sparse_context(CHECK_GRID, WAN_1_3B_LAYERS)
    method = build_method(name, **params)
    with torch.inference_mode():
        out = method(q, k, v, ctx)
        if isinstance(method, LinearAttention):
            phi = method.feature_map(ctx.layer, q)
            reference = naive_linear_attention(phi(q.float()).double(), phi(k.float()).double(), v.double())
        else:
            reference = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double())
    error = relative_error(out, reference)
    return {"tokens": CHECK_GRID.tokens, "relative_error": error, "passed": error <= TOLERANCE[dtype]}


def time_point(
    method: Any, grid: TokenGrid, heads: int, head_dim: int, device: torch.device, dtype: torch.dtype,
    warmup: int, repeats: int,
) -> dict[str, Any]:  # fmt: skip
    """One method at one length: call timing, density and TFLOP/s on the kept entries (``error`` if out of memory)."""
    ctx: AttentionContext = sparse_context(grid, WAN_1_3B_LAYERS)
    try:
        q, k, v = (torch.randn(1, heads, grid.tokens, head_dim, device=device, dtype=dtype) for _ in range(3))
        method.density.reset()
        with torch.inference_mode():
            stats, _ = measure(lambda: method(q, k, v, ctx), device, warmup, repeats)
    except torch.OutOfMemoryError as exc:
        return {"tokens": grid.tokens, "frames": grid.frames, "error": f"out of memory: {str(exc).splitlines()[0]}"}
    finally:
        q = k = v = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    density = method.density.mean()
    flop = dense_attention_tflop(grid.tokens, heads, head_dim, layers=1) * density if density else None
    return {
        "tokens": grid.tokens,
        "frames": grid.frames,
        "ms_per_call": stats.median_ms,
        "call": stats.to_dict(),
        "density": density,
        "tflops": flop / (stats.median_ms / 1e3) if flop else None,
    }


def sweep(
    methods: dict[str, dict[str, Any]],
    frames: tuple[int, ...] = DEFAULT_FRAMES,
    frame_shape: tuple[int, int] = WAN_480P_FRAME,
    heads: int = 12,
    head_dim: int = 128,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.bfloat16,
    warmup: int = 1,
    repeats: int = 3,
    log: Callable[[str], None] = print,
    save: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Check every method, then time the ones that passed at every length; the ``scaling`` record (JSON-able).

    Args:
        methods: method name -> parameters.
        frames: latent frames per length; tokens = frames x ``frame_shape`` (rows x columns of tokens).
        heads, head_dim: q, k, v are ``(1, heads, tokens, head_dim)`` standard normal in ``dtype``.
        device: where to run (default: CUDA if available).
        warmup, repeats: :func:`harness.latency.measure`'s counts per point (one warm-up covers Flex's compile
            and svg2's k-means initialisation).
        log: receives one progress line per check and per point.
        save: receives the record after the checks and after each method (``status`` "partial" until the
            last), so that a run stopped part-way keeps what it measured.
    """
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    started = time.time()
    record: dict[str, Any] = {
        "kind": "scaling",
        "spec": {
            "frames": list(frames),
            "frame_shape": list(frame_shape),
            "heads": heads,
            "head_dim": head_dim,
            "dtype": str(dtype).removeprefix("torch."),
            "device": device.type,
            "warmup": warmup,
            "repeats": repeats,
            "methods": methods,
        },
        "environment": capture_environment(device),
        "machine_load": {"before": machine_load(device)},
        "checks": {name: check_method(name, params, device, dtype) for name, params in methods.items()},
        "methods": {},
        "status": "partial",
    }
    for name, check in record["checks"].items():
        outcome = f"relative error {check['relative_error']:.2e}" if check.get("relative_error") is not None else ""
        log(f"check {name:>7}: {'ok' if check['passed'] else 'FAILED'} {outcome} {check.get('error', '')}".rstrip())
    for name, params in methods.items():
        if save is not None:
            save({**record, "wall_seconds": time.time() - started})
        if not record["checks"][name]["passed"]:
            continue
        method = build_method(name, **params)
        points = []
        for count in frames:
            point = time_point(method, TokenGrid(count, *frame_shape), heads, head_dim, device, dtype, warmup, repeats)
            points.append(point)
            figure = f"{point['ms_per_call']:.3f} ms" if "error" not in point else point["error"]
            log(f"{name:>7} {point['tokens']:>7} tokens: {figure} ({time.time() - started:.0f} s)")
        capabilities = METHODS.get(name).capabilities
        record["methods"][name] = {
            "params": method.params(),
            "sparsity": capabilities.sparsity,
            "data_dependent": capabilities.data_dependent,
            "density_fixed_by_user": method.params().get("fixed_density"),
            "points": points,
        }
    record["machine_load"]["after"] = machine_load(device)
    record |= {"status": "complete", "wall_seconds": time.time() - started}
    if save is not None:
        save(record)
    return record


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part.strip())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")), help="folder (default: $OUT)")
    parser.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (a smoke test at small sizes)")
    parser.add_argument("--frames", default=",".join(map(str, DEFAULT_FRAMES)), help="latent frames per length")
    parser.add_argument("--frame", default="x".join(map(str, WAN_480P_FRAME)), help="tokens per frame, ROWSxCOLS")
    parser.add_argument("--heads", type=int, default=12, help="attention heads per call (Wan 1.3B: 12)")
    parser.add_argument("--head-dim", type=int, default=128, help="head dimension (Wan: 128)")
    parser.add_argument("--methods", default="", help="comma-separated methods (default: dense, linear, every sparse)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per point (Flex compiles in the first)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per point (median and spread)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda needs a CUDA GPU; use --device cpu with small --frames for a smoke test")
    defaults = default_methods(device)
    names = [METHODS.canonical(m) for m in args.methods.split(",") if m.strip()] or list(defaults)
    methods = {name: defaults.get(name, {}) for name in names}
    rows, columns = _ints(args.frame.replace("x", ","))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "scaling.json"
    record = sweep(methods, _ints(args.frames), (rows, columns), args.heads, args.head_dim, device, dtype,
                   args.warmup, args.repeats, save=lambda partial: write_json_atomic(path, partial))  # fmt: skip
    tokens = [TokenGrid(count, rows, columns).tokens for count in _ints(args.frames)]
    print("\n" + f"{'method':>8} " + " ".join(f"{n:>9}" for n in tokens) + "   (ms per call, tokens)")
    for name, entry in record["methods"].items():
        cells = [f"{p['ms_per_call']:>9.3f}" if "ms_per_call" in p else f"{'OOM':>9}" for p in entry["points"]]
        print(f"{name:>8} " + " ".join(cells))
    print(f"wrote {path} in {record['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()
