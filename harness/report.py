"""``bench report``: comparison tables (markdown and CSV) built from records only.

Speedups compare runs of the same cohort (same model, sampling, prompts, seeds, device, dtype and
weights); the dense baseline used is named in its own column. Quality figures of random-weight runs
are never shown.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from harness.atomic import atomic_path
from harness.records import load_records
from harness.spec import record_cohort

DENSE_PREFERENCE = ("fa2", "cudnn", "sdpa", "math")


@dataclass
class Report:
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    errors: list[tuple[Path, str]] = field(default_factory=list)


def _params_label(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True, separators=(",", ":")) if params else ""


def runs_table(records: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per generation run: latency, speedup within its cohort, density, metrics."""
    rows = []
    for rec in records:
        spec, stages = rec["spec"], rec["latency"]["stages"]
        s = spec["sampling"]
        row = {
            "model": spec["model"],
            "method": spec["method"],
            "params": _params_label(rec.get("method_params_resolved") or spec.get("method_params", {})),
            "weights": rec.get("weights"),
            "device": rec["environment"].get("device_name"),
            "video": f"{s['height']}x{s['width']}x{s['frames']}",
            "steps": s["steps"],
            "videos": len(rec["artifacts"]["videos"]),
            "step_ms": stages.get("denoise_step", {}).get("median_ms"),
            "attn_ms_per_step": stages.get("attention_per_step", {}).get("median_ms"),
            "e2e_s_per_video": rec["latency"]["end_to_end_ms_per_video"] / 1e3,
            "density": rec["density"].get("mean"),
            "peak_gib": rec["memory"].get("peak_gib"),
            "cohort": _cohort(rec),
        }
        if rec.get("quality_reportable", False):
            for suite, scores in sorted(rec.get("metrics", {}).items()):
                for name, value in scores.items():
                    row[name if name not in row else f"{suite}.{name}"] = value
        rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    _add_speedups(table, "step_ms")
    return table.drop(columns="cohort").sort_values(["model", "video", "method"]).reset_index(drop=True)


def _cohort(rec: dict[str, Any]) -> str:
    # Same spec on two GPU models is two cohorts: speedups never mix devices.
    return f"{record_cohort(rec)}@{rec['environment'].get('device_name')}"


def _add_speedups(table: pd.DataFrame, time_column: str) -> None:
    """``baseline`` and ``speedup`` columns: each row's time against the preferred dense run of its cohort."""
    table["baseline"], table["speedup"] = None, None
    for _, group in table.groupby("cohort"):
        dense = next((m for m in DENSE_PREFERENCE if m in set(group["method"])), None)
        if dense is None:
            continue
        base = group.loc[group["method"] == dense, time_column].median()
        table.loc[group.index, "baseline"] = dense
        table.loc[group.index, "speedup"] = base / group[time_column]


def table1(records: list[dict[str, Any]]) -> pd.DataFrame:
    """LinVideo's Table 1 layout: latency, speedup and the 8 VBench dimensions (x 100) per method.

    Runs scored by VBench only; dimensions beyond the 8 follow them. Proxies never appear here.
    """
    from harness.eval.prompt_sets import PAPER8, PAPER_TITLES

    scored = [r for r in records if r.get("quality_reportable", False) and r.get("metrics", {}).get("vbench")]
    rows = []
    for rec in scored:
        spec, s = rec["spec"], rec["spec"]["sampling"]
        row = {
            "model": spec["model"],
            "method": spec["method"],
            "params": _params_label(rec.get("method_params_resolved") or spec.get("method_params", {})),
            "prompts": spec.get("prompt_set") or f"{len(spec['prompts'])} given",
            "video": f"{s['height']}x{s['width']}x{s['frames']}",
            "videos": len(rec["artifacts"]["videos"]),
            "device": rec["environment"].get("device_name"),
            "latency_s": rec["latency"]["end_to_end_ms_per_video"] / 1e3,
            "cohort": _cohort(rec),
        }
        scores = rec["metrics"]["vbench"]
        extra = sorted(set(scores) - set(PAPER8))
        row.update({PAPER_TITLES[d]: scores.get(d) for d in PAPER8})
        row.update({d: scores[d] for d in extra})
        rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    _add_speedups(table, "latency_s")
    table = table.dropna(axis=1, how="all")  # dimensions no run was scored on
    front = ["model", "method", "params", "prompts", "video", "videos", "device", "latency_s", "speedup", "baseline"]
    ordered = [c for c in front if c in table] + [c for c in table if c not in front and c != "cohort"]
    return table[ordered].sort_values(["model", "video", "method"]).reset_index(drop=True)


def latency_table(records: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per method of every ``bench latency`` result."""
    rows = []
    for rec in records:
        for method, entry in rec["methods"].items():
            rows.append(
                {
                    "model": rec["model"],
                    "weights": rec.get("weights"),
                    "device": rec["environment"].get("device_name"),
                    "tokens": rec["tokens"],
                    "method": method,
                    "forward_ms": entry["forward"]["median_ms"],
                    "forward_p25_ms": entry["forward"]["p25_ms"],
                    "forward_p75_ms": entry["forward"]["p75_ms"],
                    "attn_ms_per_layer": entry["attention_ms_per_layer"],
                    "density": entry.get("density"),
                    "data_dependent": entry.get("data_dependent"),
                    "peak_gib": entry.get("peak_gib"),
                    "baseline": rec["baseline"],
                    "speedup": entry["speedup_vs_baseline"],
                }
            )
    return pd.DataFrame(rows)


ABLATION_TITLES = {
    "alpha": "alpha range of L_reg", "kernel": "feature map (kernel)", "objective": "training objective",
    "selection": "layer selection", "target": "number of converted layers",
}  # fmt: skip


def _memberships(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The (axis, variant, order) entries an ablation record stands for (the default recipe: every axis)."""
    return record.get("ablation", [])


def _reference_label(record: dict[str, Any]) -> str:
    """``sdpa (reference)``, ``linear layers=0,1,2,6 kernel=hedgehog (reference)``."""
    params = " ".join(f"{key}={value}" for key, value in sorted(record["spec"].get("method_params", {}).items()))
    return f"{record['spec']['method']}{' ' + params if params else ''} (reference)"


def _reference_linear_layers(record: dict[str, Any]) -> list[int]:
    """The layers an untrained reference runs with linear attention (none for a dense method)."""
    if record["spec"]["method"] != "linear":
        return []
    from harness.models import MODELS
    from methods.linear import parse_layers

    resolved = record.get("method_params_resolved") or record["spec"].get("method_params", {})
    layers = parse_layers(resolved.get("layers"))  # None: every layer
    return list(range(MODELS.get(record["spec"]["model"]).num_layers) if layers is None else layers)


def ablation_tables(records: list[dict[str, Any]]) -> dict[str, pd.DataFrame]:
    """One table per ablation axis: each variant's layers, training cost and metrics, beside the dense run
    and the untrained ``linear`` baseline of the same cohort (same prompts, seeds, device)."""
    variants = [r for r in records if _memberships(r)]
    references = [(record_cohort(r), r) for r in records if not _memberships(r)]  # the spec hashed once per record
    tables = {}
    for axis in sorted({m["axis"] for r in variants for m in _memberships(r)}):
        members = sorted((m["order"], m["variant"], r) for r in variants for m in _memberships(r) if m["axis"] == axis)
        cohorts = {record_cohort(r) for _, _, r in members}
        labelled = [(_reference_label(r), r) for cohort, r in references if cohort in cohorts]
        rows = []
        for label, rec in labelled + [(variant, r) for _, variant, r in members]:
            training = rec.get("training", {})
            layers = training["linear_layers"] if training else _reference_linear_layers(rec)
            row = {
                "variant": label,
                "trained": bool(training),
                "linear_layers": ",".join(map(str, layers)),
                "linear_count": len(layers),
                "train_s_per_step": training.get("seconds_per_step"),
                "score_model_s_per_step": training.get("score_seconds_per_step"),  # adm-extra-score's, within the step
                "concurrent_jobs": training.get("concurrent_jobs"),
                "step_ms": rec["latency"]["stages"].get("denoise_step", {}).get("median_ms"),
            }
            for scores in rec.get("metrics", {}).values():
                row.update(scores)
            rows.append(row)
        tables[f"ablation_{axis}"] = pd.DataFrame(rows)
    return tables


def ablation_figures(records: list[dict[str, Any]], tables: dict[str, pd.DataFrame], out_dir: Path) -> list[Path]:
    """The L_reg curves, every layer's r over training per variant, ToyBench bars per axis, quality vs layers."""
    from harness import plots

    files = [plots.regulariser_curves(out_dir / "figures" / "regulariser_curves.png")]
    for rec in (r for r in records if r.get("training", {}).get("r_per_step")):
        for membership in _memberships(rec):
            axis, variant = membership["axis"], membership["variant"]
            name = f"r_{axis}_{variant}".replace(" ", "-").replace(">", "").replace("/", "-")
            files.append(plots.r_over_training(rec["training"]["r_per_step"], f"r per layer: {axis} = {variant}",
                                               out_dir / "figures" / f"{name}.png"))  # fmt: skip
    for name, table in tables.items():
        axis = name.removeprefix("ablation_")
        files.append(plots.metric_bars(table, "variant", ABLATION_TITLES.get(axis, axis),
                                       out_dir / "figures" / f"toybench_{axis}.png"))  # fmt: skip
        if axis == "target":
            files.append(plots.metric_vs_layers(table, out_dir / "figures" / "quality_vs_layers.png"))
    return files


def build_report(runs_dir: Path, out_dir: Path | None) -> Report:
    """Read every record under ``runs_dir``; write ``runs.md/csv`` and ``latency.md/csv`` to ``out_dir``."""
    loaded = load_records(runs_dir)
    report = Report(errors=loaded.errors)
    for kind, builder in (("runs", runs_table), ("latency", latency_table)):
        records = [r for r in loaded.records if r.get("kind") == ("run" if kind == "runs" else "latency")]
        table = builder(records) if records else pd.DataFrame()
        if table.empty:
            continue
        report.tables[kind] = table
        if out_dir is not None:
            report.files += _write_table(table, Path(out_dir), kind)
    runs = [r for r in loaded.records if r.get("kind") == "run" and r.get("quality_reportable", False)]
    paper_table = table1(runs)
    if not paper_table.empty:
        report.tables["table1"] = paper_table
        if out_dir is not None:
            report.files += _write_table(paper_table, Path(out_dir), "table1")
    ablations = ablation_tables(runs)
    for name, table in ablations.items():
        report.tables[name] = table
        if out_dir is not None:
            report.files += _write_table(table, Path(out_dir), name)
    if ablations and out_dir is not None:
        report.files += ablation_figures(runs, ablations, Path(out_dir))
    return report


def _write_table(table: pd.DataFrame, out_dir: Path, stem: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    md_path, csv_path = out_dir / f"{stem}.md", out_dir / f"{stem}.csv"
    with atomic_path(md_path) as tmp:
        tmp.write_text(table.to_markdown(index=False, floatfmt=".4g") + "\n")
    with atomic_path(csv_path) as tmp:
        table.to_csv(tmp, index=False)
    return [md_path, csv_path]
