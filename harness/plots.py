"""Figures of `bench report` (matplotlib, written as PNG): the L_reg curves, r over training, ablation bars."""

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
