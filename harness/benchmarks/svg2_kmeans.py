"""SVG2's k-means on the GPU: the Triton Lloyd iterations checked, then timed against the torch path.

Used by :mod:`harness.benchmarks.sparse_gpu` (on CUDA, when svg2 is among its methods) and runnable alone, per
model shape, on random bf16 q and k ``(B, H, N, D)`` clustered per head with svg2's cluster counts, for the paths
of :data:`PATHS`: torch, and the kernels with each update step (``triton`` the one-hot update, the name of earlier
runs' JSON; ``triton_sorted`` the sorted one):

1. :func:`check_configs`: per update step, each (assignment, update) configuration pair of the kernels' autotuner
   lists (the shorter list cycled beside the longer: every configuration of each), pinned in turn, on fresh random
   points at :data:`CONFIG_CHECK_SHAPE` in fp16 and bf16, one iteration checked by :func:`label_check`; each pair
   that fails (or does not compile) loses the member not cleared by passing elsewhere (both if neither was) before
   anything is timed, and the JSON names each failing pair with its errors and the configurations kept.
2. :func:`kmeans_timings` at the model's shape: the same check of one iteration per path from a warm cache
   (torch's cold-start centroids), with the share of labels equal to torch's (random points have near-ties that
   rounding order decides, so equality is reported, not required); then per path the median time of the cold
   start (``kmeans_init_iters`` from random tokens) and of a warm step (``kmeans_step_iters`` from the cache) of q
   and of k, and of svg2's whole selection at a warm step (``SparseVideoGen2.plan``), as fractions of the dense
   cuDNN call; ``fastest_update`` names the update step with the faster warm selection.

    python -m harness.benchmarks.svg2_kmeans --out $OUT/svg2_kmeans --models wan1.3b,wan14b
"""

from __future__ import annotations

import argparse
import math
from functools import partial
from pathlib import Path
from typing import Any

import torch

from harness.atomic import write_json_atomic
from harness.benchmarks.xattn_selection import environment, pinned
from harness.latency import measure
from methods import AttentionContext, build_method
from methods.kernels import kmeans_triton as fused
from methods.svg2 import SparseVideoGen2, kmeans

#: Timed path -> (``$BENCH_KMEANS_BACKEND``, ``$BENCH_KMEANS_UPDATE``; None: the torch path has no update step).
PATHS: dict[str, tuple[str, str | None]] = {"torch": ("torch", None), "triton": ("triton", "onehot"),
                                            "triton_sorted": ("triton", "sorted")}  # fmt: skip
#: (groups, tokens, head_dim, clusters) of the per-configuration check: Wan's heads, 4,000 tokens and 300 clusters
#: (ragged last token and cluster tiles at every configuration).
CONFIG_CHECK_SHAPE = {"cuda": (12, 4000, 128, 300), "cpu": (2, 100, 32, 40)}
COLD_REPEATS, WARM_REPEATS = (1, 3), (3, 10)  # (warm-up, timed) calls: a torch cold start at Wan 14B takes seconds


def label_check(x: torch.Tensor, centroids: torch.Tensor, out: tuple[torch.Tensor, ...]) -> dict[str, Any]:
    """One Lloyd iteration ``out = (labels, new centroids, sizes, order)`` from ``centroids`` ``(G, C, D)`` on x
    ``(G, N, D)``, checked in float64 per group:

    - each label is a nearest centroid up to the rounding of the dot products: with u the unit roundoff of x's
      dtype, rounding ``c`` to it and the product back perturbs ``||c||^2 - 2 x.c`` by at most ``4 u sum |x_i c_i|
      <= 4 u ||x|| ||c||``, so the chosen distance exceeds the least by at most ``8 u ||x|| max_j ||c_j||`` (the
      bound; ``worst_gap`` is the largest gap over its bound, <= 1 to pass);
    - the new centroids within ``CENTROID_TOLERANCE`` (relative, norm) of the float64 means of those labels, the
      old centroid for an empty cluster;
    - the sizes the labels' exact counts;
    - the order the stable sort of the labels (``order_exact``).
    """
    labels, updated, sizes, order = out
    unit = torch.finfo(x.dtype).eps / 2
    worst, error_sq, norm_sq, sizes_exact, order_exact = 0.0, 0.0, 0.0, True, True
    for g in range(x.shape[0]):
        points, previous = x[g].double(), centroids[g].double()
        distances = (previous**2).sum(dim=-1) - 2 * points @ previous.T
        chosen = distances.gather(1, labels[g][:, None])[:, 0]
        bound = 8.5 * unit * points.norm(dim=-1) * previous.norm(dim=-1).max()  # 8.5: fp32 sums' slack
        # A zero-norm point's bound is 0: its gap must then be 0 too (0 / tiny), not 0 / 0.
        gap = ((chosen - distances.amin(dim=-1)) / bound.clamp(min=torch.finfo(torch.float64).tiny)).max().item()
        worst = max(worst, gap) if math.isfinite(gap) else math.inf  # NaN or inf: the check fails
        del distances
        counts = torch.bincount(labels[g], minlength=previous.shape[0])
        sums = torch.zeros_like(previous).index_add_(0, labels[g], points)
        means = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], previous)
        error_sq += (updated[g].double() - means).norm().item() ** 2
        norm_sq += means.norm().item() ** 2
        sizes_exact = sizes_exact and torch.equal(sizes[g], counts)
        order_exact = order_exact and torch.equal(order[g], labels[g].sort(stable=True).indices)
    centroid_error = (error_sq / norm_sq) ** 0.5
    passed = worst <= 1.0 and centroid_error <= fused.CENTROID_TOLERANCE and sizes_exact and order_exact
    finite = {name: value if math.isfinite(value) else None  # strict JSON: a failed check's NaN or inf as null
              for name, value in (("worst_gap", worst), ("centroid_error", centroid_error))}  # fmt: skip
    return {**finite, "sizes_exact": sizes_exact, "order_exact": order_exact, "passed": passed}


def check_configs(device: torch.device) -> dict[str, Any]:
    """Per update step, each configuration pair of the autotuners' lists pinned in turn (see the module
    docstring); every failing pair loses a member: the one not cleared by passing in another pair, both where neither
    was (an assignment configuration is in at least one pair per update step). Nothing is checked, and nothing kept,
    when a list is empty. Returns ``{"shape", "assign_kept": [config], "variants": {update: {"configs": [{"config",
    "checks", "passed"}], "kept", "kept_configs"}}}``."""
    groups, tokens, dim, clusters = CONFIG_CHECK_SHAPE[device.type]
    dtypes = (torch.float16,) if fused.INTERPRETED else (torch.float16, torch.bfloat16)
    inputs = {}
    for dtype in dtypes:
        x = torch.randn(groups, tokens, dim, device=device).to(dtype)
        inputs[dtype] = (x, x[:, torch.randperm(tokens, device=device)[:clusters]].float())  # random tokens
    variants: dict[str, Any] = {}
    if not fused._assign.configs or not all(fused.TUNERS[update].configs for update in fused.VARIANTS):
        nothing = {update: {"configs": [], "kept": 0, "kept_configs": []} for update in fused.VARIANTS}
        return {"shape": CONFIG_CHECK_SHAPE[device.type], "assign_kept": [], "variants": nothing}
    assign_passed: set[int] = set()
    update_passed: dict[str, set[int]] = {update: set() for update in fused.VARIANTS}
    failures: list[tuple[str, int, int]] = []  # (update step, assignment index, update index) of each failing pair
    for update in fused.VARIANTS:
        tuner = fused.TUNERS[update]
        results = []
        # Every configuration of both lists is checked: the shorter list is cycled beside the longer (a plain zip
        # left the assignment's seventh configuration unchecked beside six update ones, yet kept it).
        assigns, updates = fused._assign.configs, tuner.configs
        for index in range(max(len(assigns), len(updates))):
            places = (index % len(assigns), index % len(updates))
            pair = (assigns[places[0]], updates[places[1]])
            try:
                checks = {}
                with pinned(fused._assign, [pair[0]]), pinned(tuner, [pair[1]]):
                    for dtype, (x, init) in inputs.items():
                        out = fused.kmeans_lloyd(x, init, 1, update)
                        checks[str(dtype).removeprefix("torch.")] = label_check(x, init, out)
            except (fused.triton.runtime.errors.OutOfResources, fused.triton.compiler.errors.CompilationError) as exc:
                checks = {"compile": {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                                      "passed": False}}  # fmt: skip
            passed = all(check["passed"] for check in checks.values())
            results.append({"config": [str(config) for config in pair], "checks": checks, "passed": passed})
            print(f"svg2 k-means {update} configs {pair[0]} / {pair[1]}: {'ok' if passed else 'FAILED'} {checks}",
                  flush=True)  # fmt: skip
            if passed:
                assign_passed.add(places[0])
                update_passed[update].add(places[1])
            else:
                failures.append((update, *places))
        variants[update] = {"configs": results}
    # Every failing pair loses a member. One iteration from pinned configurations gives the same labels whatever the
    # update step: an assignment configuration that passed elsewhere clears itself and blames its partner, an update
    # one that passed elsewhere blames the assignment; a pair with neither cleared loses both.
    dropped_assign: set[int] = set()
    dropped_update: dict[str, set[int]] = {update: set() for update in fused.VARIANTS}
    for update, assign_index, update_index in failures:
        if assign_index in assign_passed:
            dropped_update[update].add(update_index)
        elif update_index in update_passed[update]:
            dropped_assign.add(assign_index)
        else:
            dropped_assign.add(assign_index)
            dropped_update[update].add(update_index)
    kept_assign = [config for index, config in enumerate(fused._assign.configs) if index not in dropped_assign]
    if kept_assign:
        fused._assign.configs = kept_assign
        fused._assign.cache.clear()
    for update in fused.VARIANTS:
        tuner = fused.TUNERS[update]
        kept = [config for index, config in enumerate(tuner.configs) if index not in dropped_update[update]]
        if kept:
            tuner.configs = kept
            tuner.cache.clear()
        usable = kept if kept_assign else []
        variants[update] |= {"kept": len(usable), "kept_configs": [str(config) for config in usable]}
    return {
        "shape": CONFIG_CHECK_SHAPE[device.type],
        "assign_kept": [str(config) for config in kept_assign],
        "variants": variants,
    }


def kmeans_timings(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext, dense_ms: float,
                   config_check: dict[str, Any], **params: Any) -> dict[str, Any]:  # fmt: skip
    """Check at this shape, then time every path (see the module docstring). q, k, v ``(B, H, N, D)`` bf16 (fp16
    in the interpreter); ``dense_ms`` the dense call's median; ``config_check`` :func:`check_configs`'s result;
    ``params`` svg2's (default: the repository's settings). An update step is timed only if some pair of it passed
    there and its iteration here passes :func:`label_check`; ``passed`` says whether every update step's did."""
    settings = SparseVideoGen2(**params)
    counts = dict(zip("qk", settings.clusters(q.shape[-2]), strict=True))
    points = {"q": q.flatten(0, 1), "k": k.flatten(0, 1)}
    generator = torch.Generator(q.device).manual_seed(0)
    cold_iters, warm_iters = settings.kmeans_init_iters, settings.kmeans_step_iters
    cache = {name: kmeans(x, counts[name], cold_iters, None, generator, "torch")[1] for name, x in points.items()}
    check: dict[str, Any] = {path: {} for path in PATHS}
    for name, x in points.items():
        torch_labels = None
        for path, (backend, update) in PATHS.items():
            passed_pairs = update is None or config_check["variants"][update]["kept"] > 0
            reason = fused.unsupported_reason(x) or (None if passed_pairs else "no configuration passed")
            if update is not None and reason:
                check[path][name] = {"skipped": reason, "passed": False}
                continue
            out = kmeans(x, counts[name], 1, cache[name], generator, backend, update)
            torch_labels = out[0] if torch_labels is None else torch_labels
            agreement = (out[0] == torch_labels).float().mean().item()
            check[path][name] = label_check(x, cache[name], out) | {"label_agreement": agreement}
            del out
    checked = {path: all(check[path][name]["passed"] for name in points) for path, (_, u) in PATHS.items() if u}
    row: dict[str, Any] = {"clusters": counts, "iterations": {"cold": cold_iters, "warm": warm_iters},
                           "dense_ms": dense_ms, "check": check, "passed": all(checked.values()),
                           "paths": {}}  # fmt: skip
    for path, (backend, update) in PATHS.items():
        if not checked.get(path, True):
            row["paths"][path] = {"skipped": "an iteration failed its check"}
            continue
        timing: dict[str, Any] = {}
        for name, x in points.items():
            cold_start = partial(kmeans, x, counts[name], cold_iters, None, generator, backend, update)
            warm_step = partial(kmeans, x, counts[name], warm_iters, cache[name], generator, backend, update)
            cold, _ = measure(cold_start, q.device, *COLD_REPEATS)
            warm, _ = measure(warm_step, q.device, *WARM_REPEATS)
            timing[name] = {"cold": cold.to_dict(), "warm": warm.to_dict(), "warm_fraction": warm.median_ms / dense_ms}
        with environment({fused.BACKEND_ENV: backend} | ({} if update is None else {fused.VARIANT_ENV: update})):
            method = SparseVideoGen2(**params)  # the first (warm-up) plan runs the cold start, the timed ones warm
            selection, _ = measure(lambda m=method: m.plan(q, k, v, ctx), q.device, *WARM_REPEATS)
        warm_ms = sum(timing[name]["warm"]["median_ms"] for name in points)
        timing |= {"selection": selection.to_dict(), "warm_kmeans_fraction": warm_ms / dense_ms,
                   "selection_fraction": selection.median_ms / dense_ms}  # fmt: skip
        row["paths"][path] = timing
    timed = {update: row["paths"][path]["selection"]["median_ms"] for path, (_, update) in PATHS.items()
             if update is not None and "selection" in row["paths"][path]}  # fmt: skip
    row["fastest_update"] = min(timed, key=timed.__getitem__) if timed else None
    return row


TABLE_HEADER = (f"{'model':>8} {'path':>13} {'q cold ms':>9} {'q warm ms':>9} {'k cold ms':>9} {'k warm ms':>9} "
                f"{'q warm %':>8} {'k warm %':>8} {'selection ms':>12} {'of dense':>8} {'gap/bound':>9} "
                f"{'centroids':>9} {'agreement':>9}")  # fmt: skip


def table_lines(model: str, row: dict[str, Any]) -> list[str]:
    """Printed rows: per path, cold start and warm step of q and k (ms; the warm steps also as shares of the dense
    call), the warm selection (ms and share of the dense call), and the check's worst label gap over its bound,
    centroid error and label agreement with torch (worst of q and k)."""
    lines = []
    for path, timing in row["paths"].items():
        if "skipped" in timing:
            lines.append(f"{model:>8} {path:>13}  skipped: {timing['skipped']}")
            continue
        checks = row["check"][path].values()
        times = " ".join(f"{timing[n][when]['median_ms']:>9.2f}" for n in "qk" for when in ("cold", "warm"))
        times += "".join(f" {timing[n]['warm_fraction']:>8.1%}" for n in "qk")
        lines.append(f"{model:>8} {path:>13} {times} {timing['selection']['median_ms']:>12.2f} "
                     f"{timing['selection_fraction']:>8.1%} {worst_of(checks, 'worst_gap'):>9.2f} "
                     f"{worst_of(checks, 'centroid_error'):>9.1e} "
                     f"{min(c['label_agreement'] for c in checks):>9.4f}")  # fmt: skip
    return lines


def worst_of(checks: Any, name: str) -> float:
    """The largest ``name`` of :func:`label_check` results, inf where one recorded it as null (not finite)."""
    return max(math.inf if check[name] is None else check[name] for check in checks)


def model_row(model: str, device: torch.device, config_check: dict[str, Any]) -> dict[str, Any]:
    """:func:`kmeans_timings` at ``model``'s shape, beside the cuDNN dense call on the same q, k, v."""
    from harness.benchmarks.sparse_gpu import model_inputs  # sparse_gpu imports this module

    q, k, v, ctx = model_inputs(model, device)
    dense = build_method("cudnn")
    dense_ms = measure(lambda: dense(q, k, v, ctx), device, *WARM_REPEATS)[0].median_ms
    return kmeans_timings(q, k, v, ctx, dense_ms, config_check)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for svg2_kmeans.json")
    parser.add_argument("--models", default="wan1.3b,wan14b", help="comma-separated models (their q, k shapes)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (the kernel tests cover the CPU interpreter)")
    device = torch.device("cuda")
    args.out.mkdir(parents=True, exist_ok=True)
    configs = check_configs(device)
    rows = {}
    with torch.inference_mode():
        for model in [m for m in args.models.split(",") if m]:
            rows[model] = model_row(model, device, configs)
            write_json_atomic(args.out / "svg2_kmeans.json", {"config_check": configs, "models": rows})
            torch.cuda.empty_cache()
    print(TABLE_HEADER)
    for model, row in rows.items():
        print("\n".join(table_lines(model, row)))
        print(
            f"{'':>8} dense {row['dense_ms']:.2f} ms; clusters {row['clusters']}, iterations {row['iterations']}; "
            f"faster update step: {row['fastest_update']}"
        )


if __name__ == "__main__":
    main()
