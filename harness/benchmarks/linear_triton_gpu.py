"""Fused Triton linear attention on one GPU: correctness against float64 first, then time against cuDNN.

1. Correctness (fresh random bf16 inputs): the fused kernel for hedgehog (a trained-like W = I + noise, separate
   for q and k), relu and elu; the output and every gradient (q, k, v and hedgehog's W of q and of k) against
   the float64 reference by relative error, at a toy shape (head dim 24, padded in the kernel; batch 2) and at
   the Wan 1.3B 480p and 14B 720p shapes, with q, k, v laid out as the attention processor passes them ((B, N,
   H, D) projections seen as (B, H, N, D)). The torch path's errors are recorded beside. Tolerances (bf16
   operands, fp32 accumulation): 1e-2 for the output, 2e-2 for the gradients. If any check fails nothing is
   timed: each failed (map, shape) is localised (every kernel stage's intermediate, S, z, out, den, dp_q, dS, dz,
   dp_k, dv, dq, dk, dW, against float64, autotuned and with each configuration index pinned) and the script
   exits non-zero. A CUDA error stops it at once (the context is lost); ``--localise hedgehog,relu`` then runs
   the localisation alone, printing each variant before it runs.
2. Timing (CUDA events, warm-up, median): one cuDNN attention call (SDPBackend.CUDNN_ATTENTION), the torch path
   (``linear_attention(q_map(q), k_map(k), v)``) and the fused kernel through the dispatcher, forward (no grad)
   and forward + backward (``torch.autograd.grad`` of a random upstream gradient, W included), at both Wan
   shapes; the ratios to cuDNN against the targets (forward <= 3%, forward + backward <= 10%), and the memory
   floor (q, k, v read and the output written once, at the copy bandwidth measured here).
3. Where each fused call's time goes (:mod:`harness.benchmarks.launch_split`): every kernel's device time and the
   launches per call (profiler), the call replayed as a CUDA graph (device time without host work) and the
   host time to enqueue it; one line per fused path, and in the JSON.
4. A table last; the JSON (checks, timings, diagnostics, the autotuner's choices, registers and spills of each
   compiled kernel) in ``--out``/linear_triton.json, written after each stage.

About 2-3 minutes on one H200 for both shapes (Triton compiles and autotunes about 50 kernel variants in the first
calls); ``--models wan1.3b`` and ``--no-torch`` shorten it.

    PYTHONUNBUFFERED=1 python -m harness.benchmarks.linear_triton_gpu --out $OUT
"""

from __future__ import annotations

import argparse
import contextlib
import math
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from harness.atomic import write_json_atomic
from harness.benchmarks.launch_split import diagnose, summary_line
from harness.latency import measure
from harness.models.base import MODELS
from methods.kernels import linear_attention_triton as fused
from methods.kernels import tile_columns
from methods.kernels.linear_attention import FeatureMap, build_feature_map, feature_linear_attention, linear_attention

FORWARD_TOLERANCE, GRADIENT_TOLERANCE = 1e-2, 2e-2
TARGETS = {"forward": 0.03, "forward_backward": 0.10}
TIMED_MODELS = ("wan1.3b", "wan14b")
TOY_SHAPE = (2, 4, 1061, 24)
REPEATS = {"wan1.3b": (3, 30), "wan14b": (2, 7)}  # (warm-up, timed) calls
GRADIENT_NAMES = ("dq", "dk", "dv", "dWq", "dWk")
TUNED_KERNELS = ("_gram_partials", "_output", "_query_grads", "_key_grads", "_project_grads")


def model_shape(model: str) -> tuple[int, int, int, int]:
    """``(B, H, N, D)`` of one self-attention call of ``model`` at its default sampling, batch 1."""
    adapter = MODELS.get(model)
    config = adapter.transformer_config
    tokens = adapter.token_grid(adapter.defaults).tokens
    return 1, config["num_attention_heads"], tokens, config["attention_head_dim"]


def processor_inputs(shape: tuple[int, int, int, int], device: torch.device) -> list[torch.Tensor]:
    """Random bf16 q, k, v ``(B, H, N, D)`` as views of ``(B, N, H, D)`` projections, requiring grad."""
    batch, heads, tokens, dim = shape
    return [torch.randn(batch, tokens, heads, dim, device=device, dtype=torch.bfloat16).transpose(1, 2)
            .requires_grad_() for _ in range(3)]  # fmt: skip


def feature_maps(kind: str, heads: int, dim: int, device: torch.device) -> tuple[FeatureMap, FeatureMap]:
    """q and k maps as LinVideo trains them; hedgehog's W moved off the identity as training moves it."""
    pair = [build_feature_map(kind, heads, dim, trainable=True).to(device) for _ in range(2)]
    for phi in pair:
        for weight in phi.parameters():
            with torch.no_grad():
                weight += 0.05 * torch.randn_like(weight)
    return pair[0], pair[1]


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    return ((out - ref).norm() / ref.norm()).item()


def errors_against(
    run: Callable[[], torch.Tensor], leaves: list[torch.Tensor], grad: torch.Tensor, ref: torch.Tensor,
    ref_grads: tuple[torch.Tensor, ...],
) -> dict[str, float]:  # fmt: skip
    """Relative errors of ``run()`` and its gradients against the reference's; None where not finite."""
    out = run()
    grads = torch.autograd.grad(out, leaves, grad)
    names = ("out", *GRADIENT_NAMES)
    return {name: relative_error(a, b) if torch.isfinite(a).all() else None
            for name, a, b in zip(names, (out, *grads), (ref, *ref_grads), strict=False)}  # fmt: skip


def check(kind: str, shape: tuple[int, int, int, int], device: torch.device) -> dict[str, Any]:
    """The fused kernel's (and the torch path's) output and gradients against float64, on fresh inputs."""
    q, k, v = processor_inputs(shape, device)
    q_map, k_map = feature_maps(kind, shape[1], shape[3], device)
    leaves = [q, k, v, *q_map.parameters(), *k_map.parameters()]
    weights = getattr(q_map, "weight", None), getattr(k_map, "weight", None)
    grad = torch.randn(shape, device=device, dtype=torch.bfloat16)
    ref = fused.float64_reference(q, k, v, kind, *weights)
    ref_grads = torch.autograd.grad(ref, leaves, grad.double())
    ref = ref.detach()
    result: dict[str, Any] = {"shape": list(shape), "kind": kind}
    result["fused"] = errors_against(lambda: fused.fused_linear_attention(q, k, v, q_map, k_map),
                                     leaves, grad, ref, ref_grads)  # fmt: skip
    result["torch"] = errors_against(lambda: linear_attention(q_map(q), k_map(k), v), leaves, grad, ref, ref_grads)
    result["passed"] = all(
        error is not None and error <= (FORWARD_TOLERANCE if name == "out" else GRADIENT_TOLERANCE)
        for name, error in result["fused"].items()
    )
    return result


@contextlib.contextmanager
def pinned(index: int | None) -> Iterator[str]:
    """Every autotuned kernel held to configuration ``index`` of its list (its last where the list is shorter;
    None: autotuned as shipped); yields the pinned configurations as text. Chunks stay aligned to every list's
    largest block, so any configuration computes the same function."""
    saved = {name: getattr(fused, name).configs for name in TUNED_KERNELS}
    try:
        for name, configs in saved.items():
            tuner = getattr(fused, name)
            tuner.configs = configs if index is None else [configs[min(index, len(configs) - 1)]]
            tuner.cache.clear()
        yield "autotuned" if index is None else ", ".join(f"{n}={getattr(fused, n).configs[0]}" for n in saved)
    finally:
        for name, configs in saved.items():
            getattr(fused, name).configs = configs
            getattr(fused, name).cache.clear()


def stage_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kind: str, q_weight: torch.Tensor | None,
                    k_weight: torch.Tensor | None, grad: torch.Tensor, eps: float = 1e-6,
                    ) -> dict[str, torch.Tensor]:  # fmt: skip
    """Every intermediate of the fused kernels computed in float64 by autograd: the state ``S, z`` per half, out and
    den, the state's gradients ``dS, dz``, dL/dp per half for the queries and summed over halves for the keys
    (p = x W, or x), and dq, dk, dv, dWq, dWk. Shapes as the float64 reference's, halves on axis 2."""

    def project(x: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        x = x.detach().double()
        return x if weight is None else torch.einsum("bhnd,hde->bhne", x, weight.detach().double())

    def features(p: torch.Tensor, sign: float) -> torch.Tensor:
        if kind == "hedgehog":
            return (sign * p).softmax(dim=-1)
        return F.relu(p) if kind == "relu" else F.elu(p) + 1

    signs = (1.0, -1.0) if kind == "hedgehog" else (1.0,)
    p_q = [project(q, q_weight).requires_grad_() for _ in signs]  # one leaf per half: dL/dp per half
    p_k = project(k, k_weight).requires_grad_()
    v64 = v.detach().double().requires_grad_()
    phi_q = [features(p, sign) for p, sign in zip(p_q, signs, strict=True)]
    phi_k = [features(p_k, sign) for sign in signs]
    s = [f.transpose(-2, -1) @ v64 for f in phi_k]
    z = [f.sum(dim=-2) for f in phi_k]
    for t in (*s, *z):
        t.retain_grad()
    den = sum((f * zz.unsqueeze(-2)).sum(dim=-1) for f, zz in zip(phi_q, z, strict=True)) + eps
    out = sum(f @ ss for f, ss in zip(phi_q, s, strict=True)) / den.unsqueeze(-1)
    out.backward(grad.double())
    dp_q = torch.stack([p.grad for p in p_q], dim=2)
    ref = {"S": torch.stack(s, dim=2), "z": torch.stack(z, dim=2), "out": out, "den": den,
           "dS": torch.stack([t.grad for t in s], dim=2), "dz": torch.stack([t.grad for t in z], dim=2),
           "dp_q": dp_q, "dp_k": p_k.grad, "dv": v64.grad}  # fmt: skip
    for side, x, weight, dp in (("q", q, q_weight, dp_q.sum(dim=2)), ("k", k, k_weight, p_k.grad)):
        ref[f"d{side}"] = dp if weight is None else torch.einsum("bhne,hde->bhnd", dp, weight.double())
        if weight is not None:
            ref[f"dW{side}"] = torch.einsum("bhnd,bhne->hde", x.double(), dp)
    return {name: t.detach() for name, t in ref.items()}


def stage_errors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kind: str, q_weight: torch.Tensor | None,
                 k_weight: torch.Tensor | None, grad: torch.Tensor, eps: float = 1e-6,
                 ) -> dict[str, float | None]:  # fmt: skip
    """The relative error of every intermediate of one fused forward + backward (each launch in turn, as the ops
    ``linear_attention_forward`` and ``linear_attention_backward`` chain them) against :func:`stage_reference`: names
    the first wrong kernel (state and its sum: S, z; output pass: out, den; query pass and its sum: dp_q, dS, dz; key
    pass: dp_k, dv; projection passes: dq, dk, dWq, dWk). None where not finite. q, k, v, grad ``(B, H, N, D)`` in
    the compute dtype."""
    code, nh = fused.KIND_CODES[kind], 2 if kind == "hedgehog" else 1
    batch, heads, tokens, dim = q.shape
    bd = tile_columns(dim)
    wq, wk = fused._weight_operand(q_weight), fused._weight_operand(k_weight)

    def squares(state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A state buffer ``(B * H * nh, BD * BD + BD)`` as ``(B, H, nh, D, D)`` and ``(B, H, nh, D)``."""
        square = state[:, : bd * bd].reshape(batch, heads, nh, bd, bd)[..., :dim, :dim]
        return square, state[:, bd * bd :].reshape(batch, heads, nh, bd)[..., :dim]

    with torch.no_grad():
        q, k, v = (t.detach() for t in (q, k, v))
        state = fused._gram(k, v, wk, code, nh)
        out, den = fused._output_pass(q, wq, state, code, nh, eps)
        dp_q, d_state = fused._query_pass(q, grad.contiguous(), out, den, wq, state, code, nh)
        dp_k, dv = fused._key_pass(k, v, wk, d_state, code, nh)
        dq, dwq = fused._through_projection(q, dp_q, q_weight, True)
        dk, dwk = fused._through_projection(k, dp_k, k_weight, True)
    got = {"out": out, "den": den.view(batch, heads, tokens), "dp_q": dp_q[..., :dim].permute(1, 2, 3, 0, 4),
           "dp_k": dp_k.float().sum(dim=0)[..., :dim], "dv": dv, "dq": dq, "dk": dk}  # fmt: skip
    got["S"], got["z"] = squares(state)
    got["dS"], got["dz"] = squares(d_state)
    got["dp_q"] = got["dp_q"].transpose(2, 3)  # (B, H, nh, N, D) as the reference's
    if dwq is not None:
        got["dWq"] = dwq
    if dwk is not None:
        got["dWk"] = dwk
    ref = stage_reference(q, k, v, kind, q_weight, k_weight, grad, eps)
    return {name: relative_error(got[name], ref[name]) if torch.isfinite(got[name]).all() else None
            for name in ref}  # fmt: skip


def localise(kind: str, shape: tuple[int, int, int, int], device: torch.device) -> list[dict[str, Any]]:
    """:func:`stage_errors` on fresh inputs with the autotuner's choice and then each configuration index pinned
    (:func:`pinned`), printing each line before it runs so that a crash names the variant that was running."""
    q, k, v = processor_inputs(shape, device)
    q_map, k_map = feature_maps(kind, shape[1], shape[3], device)
    weights = getattr(q_map, "weight", None), getattr(k_map, "weight", None)
    grad = torch.randn(shape, device=device, dtype=torch.bfloat16)
    longest = max(len(getattr(fused, name).configs) for name in TUNED_KERNELS)
    rows = []
    for index in (None, *range(longest)):
        with pinned(index) as label:
            print(f"localise {kind} {shape} [{label}] ...", flush=True)
            errors = stage_errors(q, k, v, kind, *weights, grad)
        worst = {name: error for name, error in errors.items() if error is None or error > GRADIENT_TOLERANCE}
        shown = {name: None if e is None else float(f"{e:.2e}") for name, e in errors.items()}
        print(f"  {'ok' if not worst else 'WRONG ' + str(worst)}; all: {shown}", flush=True)
        rows.append({"kind": kind, "shape": list(shape), "pinned": label, "errors": errors})
    return rows


def timings(forward: Callable[[], torch.Tensor], leaves: list[torch.Tensor], grad: torch.Tensor,
            device: torch.device, warmup: int, repeats: int, diagnosed: bool = False) -> dict[str, Any]:  # fmt: skip
    """Forward (no grad) and forward + backward medians in ms, with the full statistics; with ``diagnosed``,
    each mode's :func:`~harness.benchmarks.launch_split.diagnose` under ``diagnostics``."""

    def no_grad_forward() -> None:
        with torch.no_grad():
            forward()

    def forward_backward() -> None:
        torch.autograd.grad(forward(), leaves, grad)

    fwd, _ = measure(no_grad_forward, device, warmup, repeats)
    both, _ = measure(forward_backward, device, warmup, repeats)
    row = {"forward_ms": fwd.median_ms, "forward_backward_ms": both.median_ms,
           "forward": fwd.to_dict(), "forward_backward": both.to_dict()}  # fmt: skip
    if diagnosed:
        calls = {"forward": no_grad_forward, "forward_backward": forward_backward}
        row["diagnostics"] = {mode: diagnose(call, device, repeats) for mode, call in calls.items()}
    return row


def copy_bandwidth(device: torch.device) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + written), median of 10 copies of 1 GiB."""
    source = torch.randn(2**28, device=device)
    target = torch.empty_like(source)
    stats, _ = measure(lambda: target.copy_(source), device, 2, 10)
    return 2 * source.numel() * source.element_size() / (stats.median_ms / 1e3)


def time_model(model: str, kinds: list[str], device: torch.device, bandwidth: float, with_torch: bool = True
               ) -> dict[str, Any]:  # fmt: skip
    """cuDNN, the torch path (unless not ``with_torch``) and the fused kernel, diagnosed, at ``model``'s shape."""
    shape = model_shape(model)
    warmup, repeats = REPEATS[model]
    q, k, v = processor_inputs(shape, device)
    grad = torch.randn(shape, device=device, dtype=torch.bfloat16)
    floor_bytes = 4 * q.numel() * q.element_size()  # q, k, v read, the output written
    rows: dict[str, Any] = {}
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        rows["cudnn"] = timings(lambda: F.scaled_dot_product_attention(q, k, v), [q, k, v], grad, device,
                                warmup, repeats)  # fmt: skip
    print(f"{model} cudnn: {rows['cudnn']['forward_ms']:.3f} ms forward, "
          f"{rows['cudnn']['forward_backward_ms']:.3f} ms forward + backward", flush=True)  # fmt: skip
    for kind in kinds:
        q_map, k_map = feature_maps(kind, shape[1], shape[3], device)
        leaves = [q, k, v, *q_map.parameters(), *k_map.parameters()]
        if not fused.use_fused(q, k, v, q_map, k_map):
            raise RuntimeError(f"the dispatcher does not take the fused kernel: "
                               f"{fused.unsupported_reason(q, k, v, q_map, k_map)}")  # fmt: skip
        paths = {"torch": lambda m=q_map, n=k_map: linear_attention(m(q), n(k), v),
                 "fused": lambda m=q_map, n=k_map: feature_linear_attention(q, k, v, m, n)}  # fmt: skip
        for path, forward in paths.items():
            if path == "torch" and not with_torch:
                continue
            row = timings(forward, leaves, grad, device, warmup, repeats, diagnosed=path == "fused")
            rows[f"{path} {kind}"] = row
            print(f"{model} {path} {kind}: {row['forward_ms']:.3f} ms forward, "
                  f"{row['forward_backward_ms']:.3f} ms forward + backward", flush=True)  # fmt: skip
            for mode, diagnosis in row.get("diagnostics", {}).items():
                print(f"  {mode}: {summary_line(diagnosis)}", flush=True)
        torch.cuda.empty_cache()
    return {"shape": list(shape), "floor_ms": floor_bytes / bandwidth * 1e3, "rows": summarise(rows)}


def summarise(rows: dict[str, Any]) -> dict[str, Any]:
    """Each row's forward and forward + backward ratios to cuDNN's, and whether fused rows meet the targets."""
    for name, row in rows.items():
        for mode in TARGETS:
            row[f"{mode}_vs_cudnn"] = row[f"{mode}_ms"] / rows["cudnn"][f"{mode}_ms"]
            if name.startswith("fused"):
                row[f"{mode}_meets_target"] = row[f"{mode}_vs_cudnn"] <= TARGETS[mode]
    return rows


def compiled_kernels() -> dict[str, Any]:
    """The autotuner's choice per key, its last tuning's timings (:func:`last_tuning`) and each compiled variant's
    specialisation, warps, stages, shared memory, registers and spills, read off Triton's caches (internals: best
    effort, never fatal)."""
    report: dict[str, Any] = {}
    for name in ("_gram_partials", "_output", "_query_grads", "_key_grads", "_project_grads"):
        tuner = getattr(fused, name)
        entry: dict[str, Any] = {"chosen": {str(key): str(config) for key, config in tuner.cache.items()}}
        try:
            entry["last_tuning_ms"] = last_tuning(tuner)
            entry["compiled"] = [
                {"specialisation": str(key)[-400:], "warps": kernel.metadata.num_warps,
                 "stages": kernel.metadata.num_stages, "shared_bytes": kernel.metadata.shared,
                 "registers": getattr(kernel, "n_regs", None), "spills": getattr(kernel, "n_spills", None)}
                for caches in tuner.fn.device_caches.values() for key, kernel in caches[0].items()
            ]  # fmt: skip
        except Exception as exc:  # a diagnostic must not lose the measurements
            entry.setdefault("last_tuning_ms", None)
            entry["compiled"] = f"unavailable: {type(exc).__name__}: {exc}"
        report[name] = entry
    return report


def last_tuning(tuner: Any) -> dict[str, dict[str, float | None]]:
    """The autotuner's timings of the last key it tuned (Triton keeps no others; the script tunes the check shapes
    first, then each timed shape in turn): per configuration the median and the 20th and 80th percentiles in ms, as
    Triton's ``do_bench`` returns them; a configuration that failed to run times as inf, recorded as null."""
    quantiles = ("median", "p20", "p80")
    report = {}
    for config, times in (getattr(tuner, "configs_timings", None) or {}).items():
        values = times if isinstance(times, list | tuple) else [times]
        report[str(config)] = {name: float(t) if math.isfinite(float(t)) else None
                               for name, t in zip(quantiles, values, strict=False)}  # fmt: skip
    return report


def print_table(result: dict[str, Any]) -> None:
    for check_row in result["checks"]:
        errors = check_row.get("fused", {})
        worst = "-" if not errors else "non-finite" if None in errors.values() else f"{max(errors.values()):.2e}"
        print(f"check {check_row['kind']:>8} {tuple(check_row['shape'])!s:>22}: "
              f"{'ok' if check_row['passed'] else 'FAILED'} (max relative error {worst}"
              f"{'; ' + check_row['error'] if 'error' in check_row else ''})")  # fmt: skip
    print(f"\n{'model':>8} {'path':>15} {'fwd ms':>9} {'vs cuDNN':>9} {'fwd+bwd ms':>11} {'vs cuDNN':>9}"
          f"   graph replay fwd, fwd+bwd ms")  # fmt: skip
    for model, timed in result["timings"].items():
        if "error" in timed:
            print(f"{model:>8} timing failed: {timed['error']}")
            continue
        for name, row in timed["rows"].items():
            marks = ["" if row.get(f"{mode}_meets_target", True) else " (over target)" for mode in TARGETS]
            fwd, both = row["forward_vs_cudnn"], row["forward_backward_vs_cudnn"]
            graphs = [row.get("diagnostics", {}).get(mode, {}).get("graph_ms") for mode in TARGETS]
            graphs_text = ", ".join(f"{ms:.3f}" if isinstance(ms, float) else "-" for ms in graphs)
            print(f"{model:>8} {name:>15} {row['forward_ms']:>9.3f} {fwd:>8.2%}{marks[0]} "
                  f"{row['forward_backward_ms']:>11.3f} {both:>8.2%}{marks[1]}   {graphs_text}")  # fmt: skip
        print(f"{model:>8} {'memory floor':>15} {timed['floor_ms']:>9.3f}")
    print(f"Targets: fused forward <= {TARGETS['forward']:.0%} of cuDNN, forward + backward <= "
          f"{TARGETS['forward_backward']:.0%}. Total {result['wall_seconds']:.0f} s.")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for linear_triton.json")
    parser.add_argument("--kinds", default=",".join(fused.FUSED_KERNELS), help="comma-separated feature maps")
    parser.add_argument("--models", default=",".join(TIMED_MODELS), help="comma-separated Wan shapes to check and time")
    parser.add_argument("--no-torch", action="store_true", help="skip timing the torch path (cuDNN and fused only)")
    parser.add_argument("--localise", default="", metavar="KINDS",
                        help="only localise: every kernel stage of these maps against float64, autotuned and with each "
                             "configuration pinned, at the toy and --models shapes (no checks, no timing)")  # fmt: skip
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() or fused.triton is None:
        raise SystemExit("needs a CUDA GPU and triton")
    device = torch.device("cuda")
    kinds = [kind for kind in args.kinds.split(",") if kind]
    models = [model for model in args.models.split(",") if model]
    started = time.time()
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device), "torch": torch.__version__, "triton": fused.triton.__version__,
        "tolerances": {"output": FORWARD_TOLERANCE, "gradients": GRADIENT_TOLERANCE}, "targets": TARGETS,
        "checks": [], "timings": {},
    }  # fmt: skip
    path = args.out / "linear_triton.json"

    if args.localise:
        for kind in (kind for kind in args.localise.split(",") if kind):
            for shape in [TOY_SHAPE, *(model_shape(model) for model in models)]:
                result.setdefault("localised", []).extend(localise(kind, shape, device))
                write_json_atomic(path, result)
        return

    # The toy shape first, then the Wan shapes: the autotuner picks the 128-wide kernels' configuration at 1.3B.
    for shape in [TOY_SHAPE, *(model_shape(model) for model in models)]:
        for kind in kinds:
            try:
                row = check(kind, shape, device)
            except Exception as exc:  # a compile failure or OOM is recorded, and the kind is not timed
                row = {"shape": list(shape), "kind": kind, "passed": False, "error": f"{type(exc).__name__}: {exc}",
                       "traceback": traceback.format_exc()}  # fmt: skip
            result["checks"].append(row)
            print(f"check {kind} {shape}: {'ok' if row['passed'] else 'FAILED'} "
                  f"{row.get('fused', row.get('error'))}", flush=True)  # fmt: skip
            if "CUDA error" in row.get("error", ""):  # the context is lost: nothing after this would be measured
                write_json_atomic(path, result)
                raise SystemExit(f"stopped: a CUDA error in the {kind} check at {shape}; rerun with --localise {kind} "
                                 "to find the kernel and configuration")  # fmt: skip
            torch.cuda.empty_cache()
    write_json_atomic(path, result | {"kernels": compiled_kernels()})
    failed = [(row["kind"], tuple(row["shape"])) for row in result["checks"] if not row["passed"]]
    if failed:  # correctness first: nothing is timed; each failure is traced to its kernel and configuration
        for kind, shape in failed:
            result.setdefault("localised", []).extend(localise(kind, shape, device))
            write_json_atomic(path, result | {"kernels": compiled_kernels()})
        raise SystemExit(f"stopped: {len(failed)} correctness check(s) failed: {failed}; per-stage errors in {path}")
    bandwidth = copy_bandwidth(device)
    result["copy_bandwidth_tb_s"] = bandwidth / 1e12
    for model in models:
        try:
            result["timings"][model] = time_model(model, kinds, device, bandwidth, with_torch=not args.no_torch)
        except Exception as exc:
            result["timings"][model] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        torch.cuda.empty_cache()
        write_json_atomic(path, result | {"kernels": compiled_kernels()})
    result["wall_seconds"] = time.time() - started
    write_json_atomic(path, result | {"kernels": compiled_kernels()})
    print_table(result)


if __name__ == "__main__":
    main()
