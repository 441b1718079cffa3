"""Figures of `bench report` (matplotlib, written as PNG): the L_reg curves, r over training, ablation bars,
attention time against sequence length."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

BAR_METRICS = ("prompt_correctness", "motion_smoothness", "subject_consistency", "imaging_quality")


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(figure: Any, path: Path) -> Path:
    from harness.atomic import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    _pyplot().close(figure)
    return path


def regulariser_curves(path: Path, alphas: tuple[float, ...] = (20, 16, 8, 4, 2, 1)) -> Path:
    """L_reg per layer, ``1 - |2r - 1|^alpha`` over r in [0, 1], for several alpha (flat at 20, a parabola at 2)."""
    import numpy as np

    plt = _pyplot()
    r = np.linspace(0, 1, 401)
    figure, axes = plt.subplots(figsize=(5, 3.2))
    for alpha in alphas:
        axes.plot(r, 1 - np.abs(2 * r - 1) ** alpha, label=f"alpha = {alpha:g}")
    axes.set(xlabel="score r", ylabel="1 - |2r - 1|^alpha", title="LinVideo binarization regulariser")
    axes.legend(fontsize=7)
    return _save(figure, path)


def r_over_training(trajectory: list[dict[str, Any]], title: str, path: Path) -> Path:
    """Every layer's score r against the training step; the 0.5 line decides linear vs softmax."""
    plt = _pyplot()
    steps = [point["step"] for point in trajectory]
    figure, axes = plt.subplots(figsize=(5.5, 3.4))
    for layer in range(len(trajectory[0]["r"])):
        axes.plot(steps, [point["r"][layer] for point in trajectory], label=f"layer {layer}", linewidth=1)
    axes.axhline(0.5, color="gray", linestyle="--", linewidth=0.8)
    axes.set(xlabel="training step", ylabel="r", ylim=(-0.03, 1.03), title=title)
    axes.legend(fontsize=6, ncol=2)
    return _save(figure, path)


def metric_bars(table: pd.DataFrame, label_column: str, title: str, path: Path) -> Path:
    """Grouped bars: the ToyBench metrics of each row (variant, or dense / linear reference)."""
    import numpy as np

    plt = _pyplot()
    metrics = [m for m in BAR_METRICS if m in table.columns]
    x = np.arange(len(metrics))
    width = 0.8 / max(len(table), 1)
    figure, axes = plt.subplots(figsize=(6.5, 3.4))
    for index, (_, row) in enumerate(table.iterrows()):
        axes.bar(x + index * width, [row[m] for m in metrics], width, label=str(row[label_column]))
    axes.set_xticks(x + width * (len(table) - 1) / 2, [m.replace("_", "\n") for m in metrics], fontsize=7)
    axes.set(ylabel="ToyBench (%)", ylim=(0, 105), title=title)
    # Below the axes: inside, the legend hides the bars of the best rows.
    axes.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2, frameon=False)
    return _save(figure, path)


def metric_vs_layers(table: pd.DataFrame, path: Path) -> Path:
    """Quality against the number of layers that ended linear (the target ablation: ``trained`` rows, each
    marked with its target), beside the untrained references (dense at 0 layers, untrained linear)."""
    plt = _pyplot()
    trained = table[table["trained"]].sort_values("linear_count")
    references = table[~table["trained"]]
    metrics = [m for m in BAR_METRICS if m in table.columns]
    figure, axes = plt.subplots(figsize=(5.5, 3.4))
    for index, metric in enumerate(metrics):
        colour = f"C{index}"
        axes.plot(trained["linear_count"], trained[metric], marker="o", color=colour, label=metric)
        axes.scatter(references["linear_count"], references[metric], marker="x", color=colour)
    if "prompt_correctness" in metrics:
        for _, row in trained.iterrows():
            axes.annotate(f"target {row['variant']}", (row["linear_count"], row["prompt_correctness"]),
                          textcoords="offset points", xytext=(4, 4), fontsize=6)  # fmt: skip
        for _, row in references.iterrows():
            label = str(row["variant"]).replace(" (reference)", "")
            axes.annotate(label, (row["linear_count"], row["prompt_correctness"]), textcoords="offset points",
                          xytext=(4, -9), fontsize=6)  # fmt: skip
    axes.set_xticks(sorted(set(table["linear_count"])))
    axes.set(xlabel="layers that ended linear (o trained, x untrained reference)", ylabel="ToyBench (%)",
             ylim=(0, 105), title="quality vs converted layers")  # fmt: skip
    axes.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
    return _save(figure, path)


def scaling(record: dict[str, Any], path: Path) -> Path:
    """Attention time per call against tokens on log-log axes, one line per method, from a ``scaling`` record
    (:mod:`harness.benchmarks.scaling_gpu`). Dotted guides of slope 1 (O(n)) and 2 (O(n^2)) pass through the
    first dense method's shortest length; lengths a method could not run are left out of its line."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(6, 4))
    guide: list[dict[str, Any]] = []
    for name, entry in record["methods"].items():
        points = [point for point in entry["points"] if "ms_per_call" in point]
        if not points:
            continue
        if entry["sparsity"] == "dense" and not guide:
            guide = points
        fixed = entry.get("density_fixed_by_user")
        label = name if fixed is None else f"{name} (density {fixed:g})"
        style = {"dense": "-", "linear": "--"}.get(entry["sparsity"], "-.")
        axes.plot([p["tokens"] for p in points], [p["ms_per_call"] for p in points], style, marker="o",
                  markersize=3, label=label)  # fmt: skip
    if guide:
        n0, t0, n1 = guide[0]["tokens"], guide[0]["ms_per_call"], guide[-1]["tokens"]
        for power, text in ((1, "O(n)"), (2, "O(n^2)")):
            axes.plot([n0, n1], [t0, t0 * (n1 / n0) ** power], ":", color="gray", linewidth=0.8)
            axes.annotate(text, (n1, t0 * (n1 / n0) ** power), fontsize=7, color="gray")
    spec, env = record["spec"], record.get("environment", {})
    title = f"{env.get('device_name', spec['device'])}: {spec['heads']} heads x {spec['head_dim']}, {spec['dtype']}"
    axes.set(xscale="log", yscale="log", xlabel="tokens", ylabel="ms per attention call", title=title)
    axes.legend(fontsize=7)
    return _save(figure, path)
