"""SVG2's variable-block attention kernels on one GPU: our Triton kernel's configurations against FlashInfer's wrapper.

Per model shape (random q, k, v; svg2's plan at each stated density, its k-means warm-started as from a previous
step), first every candidate is checked against masked dense on sampled rows (fp32 reference; the same check
``backend=measure`` makes), then each that passed is timed in this one process beside the dense cuDNN call on the
same q, k, v:

- ``triton-variable`` at every configuration of ``--configs`` (:class:`Config`);
- FlashInfer's variable-block wrapper (``flashinfer``), where installed, plan included (it plans per call);
- flex-tuned on the clusters regrouped into 128-tiles.

Kernel efficiency is the time over ``density x`` the cuDNN time (issue 21's bar: <= 1.2x), split for each
``triton-variable`` configuration into its work (score entries computed over those kept:
:func:`~methods.kernels.variable_blocks_triton.computed_entries`) times its rate (time per computed entry over the
dense call's). Then every configuration once more with every block kept, in blocks of ``--full-blocks`` tokens or
of its BLOCK_M where larger (checked against dense attention first): density 1 and no partial tile, so its time over
the cuDNN call's is the kernel's own cost per computed entry, the ceiling of its efficiency at any density
(``full_blocks`` in the JSON). Prints a table last and writes ``variable_blocks.json`` under ``--out``::

    python -m harness.benchmarks.variable_blocks_gpu --out /tmp/vb --models wan1.3b,wan14b --densities 0.1,0.295,0.5
"""

from __future__ import annotations

import argparse
import functools
import math
import re
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from harness.atomic import write_json_atomic
from harness.benchmarks.sparse_gpu import model_inputs, parse_densities
from harness.errors import HarnessError
from methods import build_method
from methods.kernels.block_sparse import VariableBlocks, permute_tokens
from methods.kernels.sparse_backends import (
    default_timer,
    get_backend,
    masked_reference,
    reference_rows,
    relative_error,
    tolerance,
)
from methods.kernels.variable_blocks_triton import Config, computed_entries, variable_block_attention

CONFIGS = "64x32x4x3,64x32x4x4,64x32x4x5,64x64x4x4,64x32x4x3r,64x64x4x3r,64x32x4x4r,128x32x8x4,128x64x8x4,128x64x4x3"
BASELINES = ("flashinfer", "flex-tuned")


def parse_configs(text: str) -> list[Config]:
    """``64x64x4x3,64x32x4x3r,64x64x4x3t,64x64x4x3t40`` -> their :class:`Config` (BLOCK_M x BLOCK_N x num_warps x
    num_stages; ``r``: gathered key tiles loaded as rows; ``t``: whole key tiles of the sequence, masked, those with
    fewer kept keys than the number after it gathered instead)."""
    configs = []
    for item in filter(None, text.split(",")):
        match = re.fullmatch(r"(\d+)x(\d+)x(\d+)x(\d+)(r?)(t(\d*))?", item)
        if match is None:
            raise HarnessError(f"--configs: {item!r} is not BLOCK_MxBLOCK_NxWARPSxSTAGES[r][t[N]] (e.g. 64x64x4x3)")
        configs.append(Config(*(int(part) for part in match.group(1, 2, 3, 4)), k_rows=bool(match.group(5)),
                              tiles=bool(match.group(6)), sparse_below=int(match.group(7) or 0)))  # fmt: skip
    return configs


def run_point(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: Any, configs: list[Config],
              dense_ms: float, density: float) -> dict[str, Any]:  # fmt: skip
    """Check, then time, every candidate on one plan's permuted q, k, v."""
    qp, kp, vp = permute_tokens(q, plan.q_order), permute_tokens(k, plan.kv_order), permute_tokens(v, plan.kv_order)
    rows = reference_rows(q.shape[-2], q.device)
    reference = masked_reference(qp, kp, vp, plan.pattern, rows)
    candidates: dict[str, Any] = {
        f"triton-variable {config.name}": functools.partial(
            variable_block_attention, qp, kp, vp, plan.pattern.variable, config)
        for config in configs
    }  # fmt: skip
    for name in BASELINES if q.is_cuda else ():  # the CPU smoke times the Triton kernel alone
        backend = get_backend(name)
        reason = backend.unavailable(qp, plan.pattern)
        candidates[name] = reason or functools.partial(backend.run, qp, kp, vp, plan.pattern)
    results: dict[str, Any] = {}
    for name, call in candidates.items():
        if isinstance(call, str):
            results[name] = {"skipped": call}
            continue
        try:
            error = relative_error(call()[..., rows, :], reference)
        except Exception as exc:  # a configuration that cannot compile or run here is reported, not fatal
            results[name] = {"skipped": f"{type(exc).__name__}: {str(exc)[:200]}"}
            continue
        if not math.isfinite(error):  # the record is strict JSON: no NaN
            results[name] = {"skipped": "output not finite"}
            print(f"  {name:>28}: output not finite, FAILED", flush=True)
            continue
        passed = error <= tolerance(q.dtype)
        results[name] = {"error": error, "passed": passed}
        print(f"  {name:>28}: error {error:.2e} {'ok' if passed else 'FAILED'}", flush=True)
    batch, heads, tokens, _ = q.shape
    for config in configs:  # what each configuration computes, for the split of its time below
        computed, kept = computed_entries(plan.pattern.variable, tokens, config, batch, heads)
        results[f"triton-variable {config.name}"] |= {"computed_entries": computed, "kept_entries": kept}
    for name, outcome in results.items():
        if outcome.get("passed"):
            ms = default_timer(candidates[name], q.device, warmup=3, repeats=10) * 1e3
            outcome |= {"ms": ms, "of_ideal": ms / (density * dense_ms)}
            split = ""
            if "computed_entries" in outcome:
                # x ideal = (computed / kept) x (time per computed entry over the dense call's)
                outcome["work_over_kept"] = outcome["computed_entries"] / outcome["kept_entries"]
                outcome["per_computed_entry"] = ms / (outcome["computed_entries"] / (batch * heads * tokens**2)
                                                      * dense_ms)  # fmt: skip
                split = f" = work {outcome['work_over_kept']:.2f} x rate {outcome['per_computed_entry']:.2f}"
            print(f"  {name:>28}: {ms:8.3f} ms, {outcome['of_ideal']:.2f}x ideal{split}", flush=True)
    return results


def full_point(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, configs: list[Config], dense_ms: float,
               block: int) -> dict[str, Any]:  # fmt: skip
    """Every configuration on blocks where every query block keeps every key block: density 1 and no partial tile
    (blocks of ``block`` tokens, or of the configuration's BLOCK_M where that is larger, so that no tile is half
    masked; the last block shorter), so the time over the dense call's is the kernel's own cost per computed entry,
    the ceiling of its efficiency at any density (approximately: its key lists hold all N tokens per block, more
    index reads per entry than svg2's larger clusters take). Each is checked first against dense attention on
    sampled rows."""
    tokens = q.shape[-2]
    rows = reference_rows(tokens, q.device)
    reference = torch.nn.functional.scaled_dot_product_attention(q[..., rows, :].float(), k.float(), v.float())
    results: dict[str, Any] = {}
    for config in configs:
        size = -(-max(block, config.block_m) // config.block_m) * config.block_m
        count = -(-tokens // size)
        sizes = torch.full((1, 1, count), size, device=q.device, dtype=torch.int64)
        sizes[..., -1] = tokens - (count - 1) * size
        blocks = VariableBlocks(torch.ones(1, 1, count, count, device=q.device, dtype=torch.bool), sizes, sizes)
        call = functools.partial(variable_block_attention, q, k, v, blocks, config)
        error = relative_error(call()[..., rows, :], reference)
        passed = math.isfinite(error) and error <= tolerance(q.dtype)
        results[config.name] = {"block": size, "error": error if math.isfinite(error) else None, "passed": passed}
        if passed:
            ms = default_timer(call, q.device, warmup=3, repeats=10) * 1e3
            results[config.name] |= {"ms": ms, "of_dense": ms / dense_ms}
        print(f"  full {size}-token blocks {config.name:>12}: "
              + (f"{results[config.name]['ms']:8.3f} ms, {results[config.name]['of_dense']:.2f}x the dense call"
                 if passed else f"FAILED (error {error:.2e})"), flush=True)  # fmt: skip
    return {"block": block, "results": results}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for variable_blocks.json")
    parser.add_argument("--models", default="wan1.3b", help="comma-separated models (their attention shape)")
    parser.add_argument("--densities", default="0.1,0.295,0.5", help="comma-separated stated densities of svg2")
    parser.add_argument("--device", default="cuda",
                        help="cuda (the benchmark), or cpu under TRITON_INTERPRET=1 with --models wan-tiny (a smoke "
                             "test: sdpa stands in for cuDNN)")  # fmt: skip
    parser.add_argument("--full-blocks", type=int, default=64,
                        help="also time every configuration with every block kept, blocks of this many tokens or of "
                             "its BLOCK_M where larger (density 1, no partial tiles: the kernel's ceiling against the "
                             "dense call); 0 skips",
                        )  # fmt: skip
    parser.add_argument("--configs", default=CONFIGS,
                        help="comma-separated Triton configurations BLOCK_MxBLOCK_NxWARPSxSTAGES")  # fmt: skip
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda needs a CUDA GPU; TRITON_INTERPRET=1 ... --device cpu --models wan-tiny smokes")
    try:
        configs, densities = parse_configs(args.configs), parse_densities(args.densities, "--densities")
    except HarnessError as exc:
        raise SystemExit(str(exc)) from None
    from methods.svg2 import LayerCentroids

    record: dict[str, Any] = {"configs": [config._asdict() for config in configs], "models": {}}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "variable_blocks.json"
    lines = []
    for model in filter(None, args.models.split(",")):
        q, k, v, ctx = model_inputs(model, device)
        if device.type == "cpu":  # the interpreter's kernels compute in fp16
            q, k, v = (x.half() for x in (q, k, v))
        dense = build_method("cudnn" if device.type == "cuda" else "sdpa")
        dense_ms = default_timer(functools.partial(dense, q, k, v, ctx), device, warmup=3, repeats=10) * 1e3
        print(f"{model}: q {tuple(q.shape)}, {dense.name} {dense_ms:.3f} ms", flush=True)
        ctx = replace(ctx, route=LayerCentroids())
        build_method("svg2", fixed_density=densities[0]).plan(q, k, v, ctx)  # the cold k-means, untimed
        points = []
        for stated in densities:
            plan = build_method("svg2", fixed_density=stated).plan(q, k, v, ctx)
            density = float(plan.used_density())
            print(f"{model} svg2 at {stated}: kept {density:.3f}", flush=True)
            results = run_point(q, k, v, plan, configs, dense_ms, density)
            points.append({"density_fixed_by_user": stated, "density": density, "results": results})
            timed = {name: r["ms"] for name, r in results.items() if "ms" in r}
            best = min(timed, key=timed.__getitem__) if timed else "none"
            cells = " | ".join(f"{name} {timed.get(name, float('nan')):.3f} ms" for name in (best, *BASELINES))
            lines.append(f"{model:>8} {density:6.3f} ideal {density * dense_ms:7.3f} ms | best {cells}")
        full = full_point(q, k, v, configs, dense_ms, args.full_blocks) if args.full_blocks > 0 else None
        if full is not None:
            timed = {name: r["of_dense"] for name, r in full["results"].items() if "of_dense" in r}
            best = min(timed, key=timed.__getitem__) if timed else None
            lines.append(f"{model:>8} full {args.full_blocks}-token blocks: best "
                         + (f"{best} {timed[best]:.2f}x the dense call" if best else "none passed"))  # fmt: skip
        record["models"][model] = {"shape": list(q.shape), "dense_ms": dense_ms, "points": points,
                                   "full_blocks": full}  # fmt: skip
        write_json_atomic(path, record)  # after each model: a later one that runs out of time loses only itself
        del q, k, v
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print("\n".join(lines))
    print(f"wrote {path} ({time.strftime('%H:%M:%S')})")


if __name__ == "__main__":
    main()
