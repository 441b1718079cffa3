"""Sparse baselines on the GPU: Flex against masked dense, then attention and transformer latency.

0. Backends named by ``--backends`` (e.g. flashinfer): each must import and reproduce masked dense on two
   small patterns (tiles with ragged last blocks, query and key blocks unequal; SVG2-style clusters with an
   empty one), else the script stops with the reason before anything else runs; a pattern of a kind the backend
   refuses outright (flashinfer-bsr: variable-size blocks) is not applicable, no failure.
1. Correctness (fresh random inputs, 8 x 16 x 32 = 4,096 tokens, 12 heads x 128): for every method, at the
   density it is timed at, one plan executed twice -- compiled FlexAttention in bf16 and the masked dense path in
   fp32 -- relative error within bf16 tolerance. A failing method is not timed.
2. Attention: per model shape, one method call at a sparse step (selection + kernel), the kernel alone on a
   fixed plan and the selection alone (its share of the cuDNN call, synchronised, back to back, and as whole calls
   back to back less the kernels alone back to back, what a call adds beyond its kernel inside a forward: the plan
   and the call's bookkeeping; and its costliest operators from one profiled call: JSON ``selection_top_ops``),
   beside FA2 and cuDNN dense (random q, k, v in bf16); then every block-sparse backend on that plan (error
   against masked dense on sampled rows, time, or why skipped)
   and the one ``backend=measure`` chooses (JSON ``attention.methods.<name>.backends``). Per method its kernel
   efficiency as ``bench latency`` defines it (:func:`kernel_efficiency`): the ideal time, density x the cuDNN
   call's, over the kernel's on the chosen backend (the call's for a method outside the block-sparse base), and
   its inverse ``kernel_over_ideal``, which issue 21 bounds (<= 1.2 at density <= 0.5). On CUDA with xattn:
   its selection alone (scoring, and scoring + threshold) with the torch path and with the fused Triton
   scoring (two-pass and single-pass kernels), each checked against float64 first (every autotuner configuration
   once, then at each model shape), as a fraction of the cuDNN call (:mod:`harness.benchmarks.xattn_selection`;
   JSON ``attention.xattn_selection`` and a table of its own). On CUDA with svg2: likewise its k-means (cold start
   and warm step of q and k, and the selection) with the torch path and the Triton iterations, checked first
   (:mod:`harness.benchmarks.svg2_kmeans`; JSON ``attention.svg2_kmeans``). With svg2: its kernel against
   density on variable blocks (:func:`svg2_density_sweep`; ``--svg2-densities``): per stated density its plan,
   every backend on it checked against masked dense on sampled rows and then timed (FlashInfer's variable-block
   wrapper on the clusters themselves where installed, Flex on the clusters regrouped into 128-tiles), beside
   the ideal (JSON ``attention.svg2_density_sweep``, and a table of its own).
3. Transformer forward: ``bench latency`` (random weights, real architecture) of cudnn, fa2 and
   every method at its paper setting (a step after warm-up, the paper's dense layers dense), at
   Wan 1.3B 480p x 81 frames (32,760 tokens) and Wan 14B 720p x 81 frames (75,600 tokens).
Densities: on random inputs attention is near-uniform, so a data-dependent method's threshold keeps far more
than on real videos (xattn and svg2 about 0.9 at Wan 1.3B). The methods that take a stated density
(``Capabilities.fixed_density``: xattn, svg2) are therefore checked and timed, in every part above, at the density
their paper reports (:data:`PAPER_DENSITY`), or at ``--at-density X`` for all of them, or with ``--at-density none``
at what their threshold keeps. Records carry the stated density (``density_fixed_by_user``, ``None`` where the
method's own selection decided) beside the one measured (``density``); the printed table shows both. svg has no
stated density: its row keeps the note that its density was measured on random inputs. One JSON per model under
``--out``.

Budget: about 5 minutes on one H100 with the defaults -- FlexAttention compiles once per mask kind
and shape (about 10-20 s each, reported as warm-up), SVG2's first call per layer runs 50 k-means
iterations (warm-up), and the 14B forwards (about 12 s dense) get 1 warm-up and 2 repeats.
Use ``--models wan1.3b`` for a 1-2 minute run. svg2's density sweep adds, per model and density, one plan (a
warm k-means step) and every backend once checked and 7 times run (not yet timed on the H200; at 14B the Flex
kernels of svg2 take hundreds of ms each: ``--svg2-densities 0.1,0.3,0.5`` to shorten it).

    python -m harness.benchmarks.sparse_gpu --out reports/gpu/sparse
    python -m harness.benchmarks.sparse_gpu --out /tmp/x --backends flashinfer --check-only --methods svg2
    python -m harness.benchmarks.sparse_gpu --out /tmp/x --methods svg2 --at-density 0.2 --svg2-densities 0.1,0.5
    python -m harness.benchmarks.sparse_gpu --out /tmp/x --device cpu --models wan-tiny   # smoke test
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from harness.atomic import write_json_atomic
from harness.benchmarks import svg2_kmeans, xattn_selection
from harness.errors import HarnessError, check_number
from harness.latency import back_to_back_ms, measure
from harness.latency_run import LatencyRequest, fixed_density_methods, run_latency, save_latency
from harness.models.base import MODELS
from methods import METHODS, AttentionContext, TokenGrid, build_method
from methods.kernels.block_sparse import BlockSparsePattern, num_blocks
from methods.kernels.sparse_backends import BackendLog, choose_backend, get_backend
from methods.sparse import BlockSparseMethod, SparsePlan

BF16_RELATIVE_TOLERANCE = 2e-2
CHECK_GRID = {"cuda": TokenGrid(8, 16, 32), "cpu": TokenGrid(4, 8, 8)}
CHECK_HEADS_DIM = {"cuda": (12, 128), "cpu": (2, 32)}
#: Backend check: (batch, heads, tokens, head_dim) and (query block, key block); 1,000 tokens leave ragged
#: last blocks. On CUDA bf16 with head_dim 128, the dtype and head size of every Wan call (one FlashInfer JIT module).
BACKEND_CHECK_SHAPE = {"cuda": ((2, 6, 1000, 128), (64, 128)), "cpu": ((1, 2, 200, 32), (16, 32))}
FORWARD_REPEATS = {"wan14b": (1, 2)}  # (warm-up, repeats); others (2, 3)
KERNEL_REPEATS = (2, 5)
RANDOM_DENSITY_NOTE = "data-dependent: density measured on random inputs, not representative of real videos"
STATED_DENSITY_NOTE = "data-dependent: timed at a stated density (fixed_density), not the one its threshold keeps"
#: The density each data-dependent method's paper reports, at which this script and
#: :mod:`harness.benchmarks.scaling_gpu` time it by default (the methods' ``fixed_density``): xattn 0.344 at tau 0.9
#: on HunyuanVideo (the paper has no Wan run), svg2 0.295 on Wan 2.1 T2V (reference/baselines.md).
PAPER_DENSITY = {"xattn": 0.344, "svg2": 0.295}
#: Stated densities of svg2's kernel-against-density sweep (``--svg2-densities``).
SVG2_SWEEP_DENSITIES = (0.1, 0.2, 0.3, 0.5, 0.7)


def sparse_method_names() -> list[str]:
    """Every registered sparse method that runs without a calibration: DFA follows a plan calibrated per
    (step, layer) and caches across steps, so one forward says little of it; its window kernel is checked
    and timed by :mod:`harness.benchmarks.dfa_sla_gpu`. SLA runs here with zero-initialised projections
    (the untrained state, which costs the same as a fine-tuned one)."""
    return [name for name, caps in ((n, METHODS.get(n).capabilities) for n in METHODS.names())
            if caps.sparsity in ("static", "dynamic") and not caps.needs_calibration]  # fmt: skip


def parse_densities(text: str, option: str) -> tuple[float, ...]:
    """Comma-separated kept fractions, each in (0, 1]; a :class:`HarnessError` naming ``option`` otherwise."""
    values = []
    for part in (part.strip() for part in text.split(",")):
        if not part:
            continue
        try:
            value = float(part)
        except ValueError:
            raise HarnessError(f"{option} takes kept fractions in (0, 1], got {part!r}") from None
        check_number(option, value, gt=0, le=1, hint="a kept fraction")
        values.append(value)
    return tuple(values)


def stated_densities(setting: str, names: list[str]) -> dict[str, float]:
    """Method name -> the density it is timed at, for those of ``names`` that take one (``fixed_density``).

    ``setting``: ``paper`` (:data:`PAPER_DENSITY`; a method without an entry keeps its threshold), ``none`` (no
    stated density: the thresholds decide) or one kept fraction in (0, 1] for all of them. Raises
    :class:`HarnessError` for another value, or a fraction when none of ``names`` takes one.
    """
    if setting == "none":
        return {}
    if setting == "paper":
        return {name: PAPER_DENSITY[name] for name in names if name in PAPER_DENSITY}
    values = parse_densities(setting, "--at-density")
    if len(values) != 1:
        raise HarnessError(f"--at-density takes paper, none or one kept fraction in (0, 1], got {setting!r}")
    return dict.fromkeys(fixed_density_methods(names), values[0])


def kernel_efficiency(kernel_ms: float, density: float | None, dense_ms: float) -> dict[str, float | None]:
    """A kernel against its ideal time, ``density`` x the dense call's ``dense_ms``, as ``bench latency`` reports it.

    Returns ``ideal_kernel_ms``; ``kernel_efficiency``, ideal over measured (1.0: the kernel saves exactly the work
    it skips; bench latency's field); and ``kernel_over_ideal``, measured over ideal, the figure issue 21 bounds
    (<= 1.2). Both ``None`` where the ideal is zero or unknown (no density) or the kernel took no time.
    """
    ideal = density * dense_ms if density is not None else None
    if not ideal or not kernel_ms:
        return {"ideal_kernel_ms": ideal, "kernel_efficiency": None, "kernel_over_ideal": None}
    return {"ideal_kernel_ms": ideal, "kernel_efficiency": ideal / kernel_ms, "kernel_over_ideal": kernel_ms / ideal}


def sparse_context(grid: TokenGrid, num_layers: int = 40, num_steps: int = 50) -> AttentionContext:
    """A call after every paper warm-up, at the last layer (no paper keeps it dense)."""
    return AttentionContext(layer=num_layers - 1, num_layers=num_layers, step=num_steps - 1, num_steps=num_steps,
                            timestep=0.1, cfg_branch="cond", grid=grid)  # fmt: skip


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def check_flex(name: str, device: torch.device, grid: TokenGrid, heads: int, dim: int,
               params: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """Flex (bf16 on CUDA) against masked dense (fp32) on the same inputs and the same plan.

    q, k, v are ``(1, heads, grid.tokens, dim)``; the method runs with ``params`` (those it is timed with, e.g. a
    stated ``fixed_density``) over its defaults (``block_size`` auto), and the blocks it used are recorded.
    """
    params = params or {}
    low = torch.bfloat16 if device.type == "cuda" else torch.float32
    # Representable in ``low``: both paths see the same values, so a data-dependent selection (SLA's block
    # classes) is the same and only the kernels' arithmetic differs.
    q, k, v = (torch.randn(1, heads, grid.tokens, dim, device=device).to(low).float() for _ in range(3))
    ctx = sparse_context(grid)
    method = build_method(name, **params)
    if isinstance(method, BlockSparseMethod):
        plan = method.plan(q.to(low), k.to(low), v.to(low), ctx)
        flex = method.execute(q.to(low), k.to(low), v.to(low), plan, backend="flex")
        masked = method.execute(q, k, v, plan, backend="masked")
        density, tile_density = float(plan.used_density()), plan.pattern.tile_density()
        blocks = method.params()["block_size_used"]
    else:  # a method outside the block-sparse base: two instances, one per backend, same seeds
        try:
            flex_method, masked_method = (
                build_method(name, **params, backend=backend) for backend in ("flex", "masked")
            )
        except HarnessError as exc:  # it cannot be checked, so it is not timed either
            return {"tokens": grid.tokens, "relative_error": None, "passed": False, "error": str(exc)}
        flex, masked = flex_method(q.to(low), k.to(low), v.to(low), ctx), masked_method(q, k, v, ctx)
        density, tile_density = flex_method.density.mean(), None
        blocks = flex_method.params().get("block_size_used")
    error = relative_error(flex, masked)
    return {"tokens": grid.tokens, "heads": heads, "head_dim": dim, "block_size_used": blocks,
            "relative_error": error, "passed": error <= BF16_RELATIVE_TOLERANCE, "density": density,
            "density_fixed_by_user": params.get("fixed_density"), "tile_density": tile_density}  # fmt: skip


def backend_check_patterns(batch: int, heads: int, tokens: int, blocks: tuple[int, int], device: torch.device
                           ) -> dict[str, BlockSparsePattern]:  # fmt: skip
    """Three random patterns per (batch, head) that every query sees a key of: ``tiles`` (block level, unequal
    query and key blocks), ``square`` (block level, square tiles of the key block: what radial and xattn make on
    CUDA, and the only tiles FlashInfer's BSR wrapper takes) and ``clusters`` (SVG2's own constructor over 8
    clusters of random sizes, one empty)."""
    from methods.svg2 import cluster_pair_pattern

    def kept(rows: int, cols: int) -> torch.Tensor:
        tiles = torch.rand(batch, heads, num_blocks(tokens, rows), num_blocks(tokens, cols), device=device) < 0.3
        tiles[..., 0] = True
        return tiles

    sizes = []
    for _ in range(2):  # query clusters, key clusters
        weights = torch.rand(batch, heads, 8, device=device) + 0.5  # every cluster over 1/15 of the tokens ...
        weights[..., 3] = 0  # ... but one empty, as k-means leaves them
        size = (weights / weights.sum(-1, keepdim=True) * tokens).long()
        size[..., 0] += tokens - size.sum(-1)  # the rounding
        sizes.append(size)
    keep = torch.rand(batch, heads, 8, 8, device=device) < 0.4
    keep[..., 0] = True
    return {"tiles": BlockSparsePattern(kept(*blocks), tokens, blocks),
            "square": BlockSparsePattern(kept(blocks[1], blocks[1]), tokens, blocks[1]),
            "clusters": cluster_pair_pattern(keep, *sizes, tokens, block=blocks[1])}  # fmt: skip


def check_backends(names: list[str], device: torch.device) -> dict[str, Any]:
    """Each named backend against masked dense on :func:`backend_check_patterns` (fresh random q, k, v).

    Returns ``{"passed", "failure", "patterns": {pattern: {backend: {"error", "ms"}, {"skipped"} or
    {"not_applicable"}}}}``; ``failure`` is the first reason a backend cannot run here (its package, the device),
    does not match, or runs none of the patterns, else ``None``. A pattern the backend refuses (its kind, or its
    data, such as BSR's unequal tiles) is ``not_applicable``, no failure: a method's run refuses it the same way
    (:func:`~methods.kernels.sparse_backends.check_backend` before the run, the call's refusal in it).
    Raises :class:`HarnessError` for an unknown backend name.
    """
    for name in names:
        get_backend(name)
    (batch, heads, tokens, dim), blocks = BACKEND_CHECK_SHAPE[device.type]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, v = (torch.randn(batch, heads, tokens, dim, device=device, dtype=dtype) for _ in range(3))
    patterns: dict[str, dict[str, Any]] = {}
    failure = None
    for kind, pattern in backend_check_patterns(batch, heads, tokens, blocks, device).items():
        reports: dict[str, dict[str, Any]] = {}
        for name in names:
            refusal = get_backend(name).refusal(pattern)
            if refusal:
                reports[name] = {"not_applicable": refusal}
            else:  # masked dense runs beside each backend, so a mismatch is reported in the outcome, not raised
                reports[name] = choose_backend(q, k, v, pattern, tuple(dict.fromkeys((name, "masked")))).report[name]
        patterns[kind] = reports
        for name, outcome in reports.items():
            if "not_applicable" in outcome:
                print(f"backend {name:>10} on {kind:>8}: n/a ({outcome['not_applicable']})", flush=True)
                continue
            detail = outcome["skipped"] if "skipped" in outcome else f"relative error {outcome['error']:.2e}"
            print(f"backend {name:>10} on {kind:>8}: {'ok' if 'ms' in outcome else 'FAILED'} ({detail})", flush=True)
            if "skipped" in outcome and failure is None:
                failure = f"backend {name!r} on {kind}: {outcome['skipped']}"
    for name in names:
        if failure is None and all("not_applicable" in reports[name] for reports in patterns.values()):
            failure = f"backend {name!r} runs none of the check patterns ({', '.join(patterns)})"
    return {"passed": failure is None, "failure": failure, "patterns": patterns}


def measure_backends(method: BlockSparseMethod, plan: SparsePlan, q: torch.Tensor, k: torch.Tensor,
                     v: torch.Tensor, label: str = "benchmark") -> dict[str, Any]:  # fmt: skip
    """Every backend's error against masked dense and time on this plan, and the one ``measure`` chooses.

    ``label`` keys ``measure``'s per-process choice with the method's name: a plan of the same shape under the same
    label would reuse the first one's measurement.
    """
    log = BackendLog("measure", f"{method.name}-{label}")
    method.execute(q, k, v, plan, log)
    tokens = str(q.shape[-2])
    used = log.params()
    chosen, report = used["backend_used"][tokens], used["backend_report"][tokens]
    for backend, outcome in report.items():
        detail = (f"error {outcome['error']:.1e}, {outcome['ms']:.2f} ms" if "ms" in outcome
                  else f"skipped: {outcome['skipped']}")  # fmt: skip
        print(f"  {method.name:>7} {backend:>10}{' (chosen)' if backend == chosen else ''}: {detail}", flush=True)
    return {"chosen": chosen, "report": report}


def model_inputs(model: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionContext]:
    """Random q, k, v ``(1, H, N, D)`` (bf16 on CUDA, fp32 elsewhere) at the model's default shape, and a sparse
    step's context."""
    adapter_cls = MODELS.get(model)
    grid = adapter_cls.token_grid(adapter_cls.defaults)
    config = adapter_cls.transformer_config
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, v = (torch.randn(1, config["num_attention_heads"], grid.tokens, config["attention_head_dim"],
                           device=device, dtype=dtype) for _ in range(3))  # fmt: skip
    return q, k, v, sparse_context(grid, adapter_cls.num_layers)


def top_ops(call: Callable[[], Any], device: torch.device, rows: int = 12) -> list[dict[str, Any]]:
    """One profiled ``call`` (after the timed ones: warm): its ``rows`` costliest operators by self device time on
    CUDA (by self CPU time elsewhere), each with its count and milliseconds, to show where a selection's time goes."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(profiler.key_averages(), key=lambda event: getattr(event, key), reverse=True)[:rows]
    return [{"op": event.key, "count": event.count, "self_ms": getattr(event, key) / 1e3,
             "cpu_ms": event.cpu_time_total / 1e3} for event in events]  # fmt: skip


def density_note(name: str, stated: float | None) -> str | None:
    """What a row's density means where it is not the method's own on real data: stated, or measured on random
    inputs (a data-dependent method); ``None`` for the others."""
    if stated is not None:
        return STATED_DENSITY_NOTE
    return RANDOM_DENSITY_NOTE if METHODS.get(name).capabilities.data_dependent else None


def svg2_density_sweep(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext,
                       densities: tuple[float, ...], dense_ms: float) -> list[dict[str, Any]]:  # fmt: skip
    """svg2's kernel against density on variable blocks: one point per stated density in ``densities``.

    Per point, svg2's plan at that ``fixed_density`` (its k-means warm-started from the previous point's
    centroids, as from a previous step; the first point's cold start is untimed) and every block-sparse backend on
    it through :func:`measure_backends`: checked against masked dense on sampled rows, then timed (FlashInfer's
    variable-block wrapper on the clusters themselves where installed, Flex on the clusters regrouped into
    128-tiles), each with :func:`kernel_efficiency` against ``dense_ms``, the dense call on the same q, k, v
    ``(B, H, N, D)``. A point no backend reproduces records the reason (``error``) and is not timed.
    """
    from methods.svg2 import LayerCentroids

    centroids = replace(ctx, route=LayerCentroids())
    points = []
    for stated in densities:
        method = build_method("svg2", fixed_density=stated)
        plan = method.plan(q, k, v, centroids)
        density = float(plan.used_density())
        point: dict[str, Any] = {"density_fixed_by_user": stated, "density": density,
                                 "tile_density": plan.pattern.tile_density(),
                                 "ideal_kernel_ms": density * dense_ms}  # fmt: skip
        print(
            f"svg2 at stated density {stated}: kept {density:.3f}, in kept tiles {point['tile_density']:.3f}",
            flush=True,
        )
        try:
            backends = measure_backends(method, plan, q, k, v, label=f"density-{stated}")
        except HarnessError as exc:  # no backend matched masked dense: recorded, nothing timed
            points.append(point | {"error": str(exc)})
            continue
        point["chosen"] = backends["chosen"]
        point["backends"] = {name: outcome | kernel_efficiency(outcome["ms"], density, dense_ms) if "ms" in outcome
                             else outcome for name, outcome in backends["report"].items()}  # fmt: skip
        points.append(point)
        del method, plan
    return points


def sweep_table_lines(model: str, points: list[dict[str, Any]]) -> list[str]:
    """Printed rows of :func:`svg2_density_sweep`: stated and kept density, the share inside the plan's kept tiles
    (what Flex computes), the ideal, and per backend its milliseconds and their ratio to the ideal (``-``: skipped or
    failed)."""
    names = list(dict.fromkeys(name for point in points for name in point.get("backends", {})))
    lines = [f"{'model':>8} {'stated':>6} {'kept':>6} {'tiles':>6} {'ideal ms':>9} "
             + " ".join(f"{name:>17}" for name in names)]  # fmt: skip
    for point in points:
        head = (f"{model:>8} {point['density_fixed_by_user']:>6.3f} {point['density']:>6.3f} "
                f"{point['tile_density']:>6.3f} {point['ideal_kernel_ms']:>9.2f}")  # fmt: skip
        if "error" in point:
            lines.append(f"{head}  {point['error'][:120]}")
            continue
        cells = []
        for name in names:
            outcome = point["backends"].get(name, {})
            cells.append(f"{outcome['ms']:>9.2f} {outcome['kernel_over_ideal']:>6.2f}x" if "ms" in outcome
                         else f"{'-':>17}")  # fmt: skip
        lines.append(f"{head} " + " ".join(cells))
    return lines


def time_attention(names: list[str], dense: list[str], model: str, device: torch.device,
                   selection_check: dict[str, Any] | None = None, kmeans_check: dict[str, Any] | None = None,
                   params: dict[str, dict[str, Any]] | None = None,
                   svg2_densities: tuple[float, ...] = ()) -> dict[str, Any]:  # fmt: skip
    """Per method at the model's default shape: a full call (selection + kernel), the kernel alone and its
    efficiency; with ``selection_check`` (:func:`xattn_selection.check_configs`'s result) xattn's selection on every
    scoring path, with ``kmeans_check`` (:func:`svg2_kmeans.check_configs`'s) svg2's k-means on both paths, with
    svg2 among ``names`` and ``svg2_densities`` its :func:`svg2_density_sweep`. ``params``: method name -> the
    parameters it runs with (a stated ``fixed_density``), default its defaults."""
    params = params or {}
    q, k, v, ctx = model_inputs(model, device)
    rows: dict[str, Any] = {}
    with torch.inference_mode():
        for name in [*dense, *names]:
            method = build_method(name, **params.get(name, {}))
            call, _ = measure(lambda m=method: m(q, k, v, ctx), device, *KERNEL_REPEATS)
            row: dict[str, Any] = {"call": call.to_dict(), "density": method.density.mean(),
                                   "density_fixed_by_user": method.params().get("fixed_density")}  # fmt: skip
            # The time the efficiency judges: the kernel on its chosen backend where there is a plan, else the call.
            judged, density = call.median_ms, row["density"]
            if isinstance(method, BlockSparseMethod):
                plan = method.plan(q, k, v, ctx)
                kernel, _ = measure(lambda m=method, p=plan: m.execute(q, k, v, p, m.backend), device, *KERNEL_REPEATS)
                selection, _ = measure(lambda m=method: m.plan(q, k, v, ctx), device, *KERNEL_REPEATS)
                pipelined = back_to_back_ms(lambda m=method: m.plan(q, k, v, ctx), device)
                # What a call adds beyond its kernel when calls are issued back to back, as a forward issues them: the
                # plan (its host work overlaps the previous call's kernel, its device work does not) and the call's
                # own bookkeeping (the density's reduction, the backend log), each call planning afresh.
                calls_b2b = back_to_back_ms(lambda m=method: m(q, k, v, ctx), device)
                kernels_b2b = back_to_back_ms(lambda m=method, p=plan: m.execute(q, k, v, p, m.backend), device)
                backends = measure_backends(method, plan, q, k, v)
                density = float(plan.used_density())
                judged = backends["report"][backends["chosen"]]["ms"]
                row |= {"kernel": kernel.to_dict(), "plan_density": density,
                        "tile_density": plan.pattern.tile_density(), "selection": selection.to_dict(),
                        "selection_share_of_dense": selection.median_ms / rows[dense[0]]["call"]["median_ms"],
                        "selection_back_to_back_ms": pipelined,
                        "selection_back_to_back_share_of_dense": pipelined / rows[dense[0]]["call"]["median_ms"],
                        "calls_back_to_back_ms": calls_b2b, "kernels_back_to_back_ms": kernels_b2b,
                        "selection_in_calls_ms": calls_b2b - kernels_b2b,
                        "selection_in_calls_share_of_dense": (calls_b2b - kernels_b2b)
                        / rows[dense[0]]["call"]["median_ms"],
                        "selection_top_ops": top_ops(lambda m=method: m.plan(q, k, v, ctx), device),
                        "backends": backends}  # fmt: skip
            dense_ms = call.median_ms if name == dense[0] else rows[dense[0]]["call"]["median_ms"]
            row |= {"efficiency_of": "kernel on the chosen backend" if "backends" in row else "call",
                    **kernel_efficiency(judged, density, dense_ms)}  # fmt: skip
            note = density_note(name, row["density_fixed_by_user"])
            if note is not None:
                row["note"] = note
            rows[name] = row
            stated = row["density_fixed_by_user"]
            print(f"{model} attention call {name:>7}: {call.median_ms:.2f} ms, density {row['density']:.3f}"
                  + ("" if stated is None else f" (stated {stated})"), flush=True)  # fmt: skip
            del method
        dense_ms = rows[dense[0]]["call"]["median_ms"]
        result = {"tokens": q.shape[-2], "heads": q.shape[1], "head_dim": q.shape[-1], "methods": rows}
        if selection_check is not None:
            result["xattn_selection"] = xattn_selection.selection_timings(q, k, v, ctx, dense_ms, selection_check)
        if kmeans_check is not None:
            result["svg2_kmeans"] = svg2_kmeans.kmeans_timings(
                q, k, v, ctx, dense_ms, kmeans_check, **params.get("svg2", {})
            )
        if "svg2" in names and svg2_densities:
            result["svg2_density_sweep"] = svg2_density_sweep(q, k, v, ctx, svg2_densities, dense_ms)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for the JSON results")
    parser.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (a smoke test with wan-tiny)")
    parser.add_argument("--models", default="wan1.3b,wan14b", help="comma-separated models (random weights)")
    parser.add_argument("--methods", default="", help="comma-separated sparse methods (default: every registered)")
    parser.add_argument("--backends", default="",
                        help="comma-separated block-sparse backends that must run here (e.g. flashinfer): checked "
                             "against masked dense first; the script stops with the reason if one cannot")  # fmt: skip
    parser.add_argument("--check-only", action="store_true",
                        help="stop after the correctness checks (no timing); writes sparse_check.json")  # fmt: skip
    parser.add_argument("--at-density", default="paper",
                        help="the kept fraction the methods that take one (fixed_density) are checked and timed at: "
                             "paper (default: the density each paper reports, "
                             f"{', '.join(f'{name} {d}' for name, d in PAPER_DENSITY.items())}), a fraction in (0, 1] "
                             "for all of them, or none (what their threshold keeps: near everything on random "
                             "inputs)")  # fmt: skip
    parser.add_argument("--svg2-densities", default=",".join(map(str, SVG2_SWEEP_DENSITIES)),
                        help="comma-separated stated densities of svg2's kernel-against-density sweep on variable "
                             "blocks (every backend checked, then timed, per density); empty: no sweep")  # fmt: skip
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda needs a CUDA GPU; use --device cpu --models wan-tiny for a smoke test")
    names = [METHODS.canonical(m) for m in args.methods.split(",") if m] or sparse_method_names()
    try:
        stated = stated_densities(args.at_density, names)
        svg2_densities = parse_densities(args.svg2_densities, "--svg2-densities")
    except HarnessError as exc:
        raise SystemExit(str(exc)) from None
    params = {name: {"fixed_density": density} for name, density in stated.items()}
    dense = ["cudnn", "fa2"] if device.type == "cuda" else ["sdpa"]
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.time()

    required = [b for b in args.backends.split(",") if b]
    try:
        backend_check = check_backends(required, device) if required else None
    except HarnessError as exc:  # an unknown backend name
        raise SystemExit(f"--backends: {exc}") from None
    if backend_check is not None and not backend_check["passed"]:
        write_json_atomic(args.out / "sparse_check.json", {"backend_check": backend_check})
        raise SystemExit(f"stopped before timing anything: {backend_check['failure']}")

    grid, (heads, dim) = CHECK_GRID[device.type], CHECK_HEADS_DIM[device.type]
    checks = {name: check_flex(name, device, grid, heads, dim, params.get(name)) for name in names}
    for name, check in checks.items():
        outcome = (
            f"relative error {check['relative_error']:.2e}, density {check['density']:.3f}"
            + (f" (stated {stated[name]})" if name in stated else "")
            if ("error" not in check)
            else check["error"]
        )
        print(f"flex vs masked {name:>7}: {'ok' if check['passed'] else 'FAILED'} ({outcome})", flush=True)
    passed = [name for name in names if checks[name]["passed"]]
    selection_check = xattn_selection.check_configs(device) if device.type == "cuda" and "xattn" in passed else None
    kmeans_check = svg2_kmeans.check_configs(device) if device.type == "cuda" and "svg2" in passed else None
    if args.check_only:
        write_json_atomic(args.out / "sparse_check.json",
                          {"backend_check": backend_check, "flex_check": checks, "stated_density": stated})  # fmt: skip
        print(f"checks done in {time.time() - started:.0f} s (--check-only: nothing timed)")
        return

    summary: list[dict[str, Any]] = []
    attentions: dict[str, dict[str, Any]] = {}
    for model in [m for m in args.models.split(",") if m]:
        attention = attentions[model] = time_attention(passed, dense, model, device, selection_check, kmeans_check,
                                                       params, svg2_densities)  # fmt: skip
        # Written before the forward: a forward that runs out of time still leaves the per-call timings.
        write_json_atomic(args.out / f"sparse_attention_{model}.json", attention)
        warmup, repeats = FORWARD_REPEATS.get(model, (2, 3))
        latency_path = args.out / f"sparse_latency_{model}.json"
        result = run_latency(LatencyRequest(
            model=model, methods=[*dense, *passed], weights="random", device=args.device,
            dtype="bfloat16" if device.type == "cuda" else "float32", warmup=warmup, repeats=repeats,
            method_params={name: p for name, p in params.items() if name in passed},
        ), out=latency_path, log=print)  # fmt: skip
        result |= {"flex_check": checks, "attention": attention, "wall_seconds": time.time() - started}
        for name, entry in result["methods"].items():
            note = density_note(name, entry["density_fixed_by_user"])
            if note is not None:
                entry["note"] = note
        save_latency(result, latency_path)
        for name, entry in result["methods"].items():
            timing = attention["methods"][name]
            summary.append({
                "model": model, "tokens": result["tokens"], "method": name,
                "forward_ms": entry["forward"]["median_ms"], "speedup": entry["speedup_vs_baseline"],
                "baseline": result["baseline"],
                "attention_call_ms": timing["call"]["median_ms"],
                "kernel_ms": timing.get("kernel", timing["call"])["median_ms"],
                "selection_share_of_dense": timing.get("selection_share_of_dense"),
                "selection_back_to_back_share_of_dense": timing.get("selection_back_to_back_share_of_dense"),
                "selection_in_calls_share_of_dense": timing.get("selection_in_calls_share_of_dense"),
                "backend": timing.get("backends", {}).get("chosen"),
                "kernel_efficiency": timing["kernel_efficiency"], "kernel_over_ideal": timing["kernel_over_ideal"],
                "density_fixed_by_user": entry["density_fixed_by_user"],
                "density": entry["density"], "data_dependent": entry["data_dependent"],
            })  # fmt: skip
        del result
        if device.type == "cuda":
            torch.cuda.empty_cache()

    selections = {model: attention["xattn_selection"] for model, attention in attentions.items()
                  if "xattn_selection" in attention}  # fmt: skip
    kmeans_rows = {model: attention["svg2_kmeans"] for model, attention in attentions.items()
                   if "svg2_kmeans" in attention}  # fmt: skip
    sweeps = {model: attention["svg2_density_sweep"] for model, attention in attentions.items()
              if "svg2_density_sweep" in attention}  # fmt: skip
    write_json_atomic(args.out / "sparse_summary.json",
                      {"backend_check": backend_check, "flex_check": checks, "rows": summary,
                       "stated_density": stated, "xattn_config_check": selection_check, "xattn_selection": selections,
                       "svg2_kmeans_config_check": kmeans_check, "svg2_kmeans": kmeans_rows,
                       "svg2_density_sweep": sweeps})  # fmt: skip
    header = (
        ("model", 8),
        ("method", 7),
        ("forward ms", 11),
        ("speedup", 8),
        ("call ms", 9),
        ("kernel ms", 10),
        ("backend", 10),
        ("x ideal", 8),
        ("selection", 10),
        ("b2b", 5),
        ("in calls", 9),
        ("stated", 7),
    )
    print("\n" + " ".join(f"{title:>{width}}" for title, width in header) + "  density")
    for row in summary:
        stated_cell = "-" if row["density_fixed_by_user"] is None else f"{row['density_fixed_by_user']:.3f}"
        mark = "*" if row["data_dependent"] and row["density_fixed_by_user"] is None else ""
        share, over = row["selection_share_of_dense"], row["kernel_over_ideal"]
        b2b, in_calls = row["selection_back_to_back_share_of_dense"], row["selection_in_calls_share_of_dense"]
        print(f"{row['model']:>8} {row['method']:>7} {row['forward_ms']:>11.1f} {row['speedup']:>7.2f}x "
              f"{row['attention_call_ms']:>9.2f} {row['kernel_ms']:>10.2f} {row['backend'] or '-':>10} "
              f"{'-' if over is None else f'{over:.2f}x':>8} {'-' if share is None else f'{share:.0%}':>10} "
              f"{'-' if b2b is None else f'{b2b:.0%}':>5} {'-' if in_calls is None else f'{in_calls:.0%}':>9} "
              f"{stated_cell:>7} {row['density']:>7.3f}{mark}")  # fmt: skip
    print(
        f"Speedup vs {summary[0]['baseline'] if summary else '-'}; kernel ms: the plan on the method's own backend "
        "setting; x ideal: the kernel on the chosen backend (the call without one) over density x the dense call "
        f"({dense[0]}), issue 21's bar <= 1.2x; selection: the plan alone as a share of the dense call (b2b: its "
        "calls back to back, the host's work overlapped as in a forward; in calls: whole calls back to back less "
        "the kernels alone back to back: what a call adds beyond its kernel, the plan and its bookkeeping, when "
        "calls are issued as a forward issues them); stated: "
        "the density a method was timed at "
        "(fixed_density), density: the one measured in the forward; * measured on "
        f"random inputs, where a data-dependent method keeps more than on videos. Total {time.time() - started:.0f} s."
    )
    tables = (("xattn selection alone (scoring; scoring + threshold), share of the cuDNN call; error vs float64, "
               "kept blocks shared with float64's", xattn_selection, selections),
              ("svg2 k-means (cold start; warm step) and selection at a warm step, share of the cuDNN call; worst "
               "label gap over its rounding bound, centroid error vs float64, labels shared with torch", svg2_kmeans,
               kmeans_rows))  # fmt: skip
    for title, script, table in tables:
        if table:
            print(f"\n{title}\n{script.TABLE_HEADER}")
            for model, row in table.items():
                print("\n".join(script.table_lines(model, row)))
    if sweeps:
        print(f"\nsvg2 kernel against stated density on variable blocks: per backend ms and x ideal (density x "
              f"the {dense[0]} call); tiles: the share inside the plan's kept tiles (128 at Wan), what Flex "
              "computes")  # fmt: skip
        for model, points in sweeps.items():
            print("\n".join(sweep_table_lines(model, points)))


if __name__ == "__main__":
    main()
