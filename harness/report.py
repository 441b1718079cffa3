"""``bench report``: comparison tables (markdown and CSV) built from records only.

Speedups compare runs of the same cohort (same model, sampling, prompts, seeds, device, dtype and
weights); the dense baseline used is named in its own column. Quality figures of random-weight runs
are never shown.

Every record is checked once, up front, for the fields the tables read (:data:`TABLE_FIELDS`): one
that lacks any is skipped with its path and the field, and the others are still tabulated. JSON that
is no record (checkpoint specs, plans) is set aside, never called corrupt. The console gets a compact
view of each table (:func:`console_view`); the files keep every column.
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from harness.atomic import atomic_path
from harness.io_checks import ensure_writable_dir
from harness.records import contended, load_records
from harness.spec import record_cohort

DENSE_PREFERENCE = ("fa2", "cudnn", "sdpa", "math")
NUMBER = (int, float)

# The fields the tables read, per record kind: (dotted path, type, required). ``*`` stands for every
# entry of a mapping; an optional field is checked only when its first part is present.
TABLE_FIELDS: dict[str, tuple[tuple[str, type | tuple[type, ...], bool], ...]] = {
    "run": (
        ("spec.model", str, True), ("spec.method", str, True), ("spec.prompts", list, True),
        ("spec.sampling.height", int, True), ("spec.sampling.width", int, True), ("spec.sampling.frames", int, True),
        ("spec.sampling.steps", int, True),
        ("latency.stages.*", dict, True), ("latency.end_to_end_ms_per_video", NUMBER, True),
        ("environment", dict, True), ("artifacts.videos", list, True), ("density", dict, True),
        ("memory", dict, True), ("metrics.*", dict, False), ("training.linear_layers", list, False),
        ("ablation", list, False), ("evaluations.*", list, False),
    ),
    "latency": (
        ("model", str, True), ("tokens", int, True), ("environment", dict, True),
        ("methods.*.forward.median_ms", NUMBER, True), ("methods.*.forward.p25_ms", NUMBER, True),
        ("methods.*.forward.p75_ms", NUMBER, True), ("methods.*.attention_ms_per_layer", NUMBER, True),
        ("methods.*.speedup_vs_baseline", NUMBER, True),
    ),
}  # fmt: skip


@dataclass
class Report:
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    errors: list[tuple[Path, str]] = field(default_factory=list)  # records skipped, with the reason
    not_records: list[Path] = field(default_factory=list)  # other JSON under the runs folder
    notes: dict[str, str] = field(default_factory=dict)  # metric -> how to read it: a protocol's departure, a basis


def usable_records(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[tuple[Path, str]]]:
    """The records the tables can read, and (path, reason) for each one that lacks a field they need."""
    usable, skipped = [], []
    for record in records:
        problem = _shape_problem(record)
        if problem is None:
            usable.append(record)
        else:
            skipped.append((Path(record.get("_path", "?")), f"incomplete {record['kind']} record: {problem}"))
    return usable, skipped


def _shape_problem(record: dict[str, Any]) -> str | None:
    if record.get("status") == "partial":
        return "status partial (an interrupted run; rerun its command to finish it)"
    for path, kind, required in TABLE_FIELDS.get(record["kind"], ()):
        parts = path.split(".")
        if not required and parts[0] not in record:
            continue
        problem = _field_problem(record, parts, kind, "")
        if problem is not None:
            return problem
    if record["kind"] == "run":
        try:
            record_cohort(record)
        except (TypeError, KeyError, ValueError) as exc:
            return f"its spec is not one this version reads ({exc})"
    return None


def _field_problem(value: Any, parts: list[str], kind: type | tuple[type, ...], where: str) -> str | None:
    """Why ``value`` has no ``parts`` path of type ``kind`` (None if it has); ``where`` is the path so far."""
    if not parts:
        wrong = not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, NUMBER))
        return f"{where} is {type(value).__name__}, not {_type_name(kind)}" if wrong else None
    if not isinstance(value, dict):
        return f"{where} is {type(value).__name__}, not a mapping"
    head, rest = parts[0], parts[1:]
    if head != "*" and head not in value:
        return f"lacks {where + '.' if where else ''}{head}"
    children = value.items() if head == "*" else [(head, value[head])]
    for key, child in children:
        problem = _field_problem(child, rest, kind, f"{where}.{key}" if where else key)
        if problem is not None:
            return problem
    return None


def _type_name(kind: type | tuple[type, ...]) -> str:
    return "a number" if kind == NUMBER else {dict: "a mapping", list: "a list", str: "text", int: "an integer"}[kind]


def _params_label(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True, separators=(",", ":")) if params else ""


def _given_params(record: dict[str, Any]) -> str:
    """The parameters the user gave (and the checkpoint's name), short: ``kernel=elu ckpt=toy-5af578e1e7ed``."""
    spec = record["spec"]
    given = sorted(spec.get("method_params", {}).items())
    if spec.get("checkpoint"):
        given.append(("ckpt", spec["checkpoint"]))  # last: a cut label keeps its distinctive end
    return " ".join(f"{key}={_short_value(value)}" for key, value in given)


def _short_value(value: Any) -> str:
    if isinstance(value, list | tuple):
        return ",".join(map(_short_value, value))
    if isinstance(value, str) and "/" in value:
        return Path(value).name  # a file or folder: its name (the full path is in params_resolved)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    return json.dumps(value) if isinstance(value, bool) or value is None else str(value)


def _untimed_if_contended(rec: dict[str, Any]) -> dict[str, Any]:
    """A run sampled beside others (:func:`harness.records.contended`) with its times taken out (no stage
    medians, end-to-end NaN): they measured the other runs' contention, so every table leaves them blank and no
    speedup is computed from them. Other runs unchanged."""
    if not contended(rec):
        return rec
    return {**rec, "latency": {**rec["latency"], "stages": {}, "end_to_end_ms_per_video": math.nan}}


def runs_table(records: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per generation run: latency, speedup within its cohort, density, metrics."""
    rows = []
    for rec in records:
        spec, stages = rec["spec"], rec["latency"]["stages"]
        s = spec["sampling"]
        row = {
            "model": spec["model"],
            "method": spec["method"],
            "params": _given_params(rec),
            "params_resolved": _params_label(rec.get("method_params_resolved") or spec.get("method_params", {})),
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
            "params": _given_params(rec),
            "params_resolved": _params_label(rec.get("method_params_resolved") or spec.get("method_params", {})),
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
    front = ["model", "method", "params", "params_resolved", "prompts", "video", "videos", "device", "latency_s",
             "speedup", "baseline"]  # fmt: skip
    ordered = [c for c in front if c in table] + [c for c in table if c not in front and c != "cohort"]
    return table[ordered].sort_values(["model", "video", "method"]).reset_index(drop=True)


FEW_STEP_METHODS = ("dmd2",)


def table3(records: list[dict[str, Any]], included: pd.DataFrame | None = None) -> pd.DataFrame:
    """The paper's Tab. III layout: every few-step generator run (``dmd2``, any attention inside) beside the dense
    multi-step model of the same prompts, seeds, device, dtype and weights: quality, latency per video, and the
    speedup against that dense model (its run with the most transformer passes: steps x CFG branches).

    Every other run of a model with a few-step row joins the table the same way (e.g. LinVideo, and LinVideo with
    a sparse method in its softmax layers, at the teacher's steps and CFG), so that multi-step and few-step
    speedups sit in one table; ``attention`` names a softmax method inside (``linvideo + radial``). ``included``:
    rows of an earlier report's table3 (:func:`load_included`), which count as few-step rows of their model here;
    they are not in the returned table (:func:`build_report` appends them).

    Latency per video is built from each stage's median (steps x the denoising step's, plus decode and one prompt
    encoding), so the warm-up calls (FlexAttention's compile on a sparse method's first step) do not land in a
    4-step video's figure, as they would in the per-video total.

    Quality: every recorded metric (quality-reportable runs only) and, where VBench scored the Tab. 1 dimensions,
    their average (``vbench_avg``, as Tab. III reports).
    """
    from harness.eval.prompt_sets import PAPER8

    few_models = {r["spec"]["model"] for r in records if r["spec"]["method"] in FEW_STEP_METHODS}
    if included is not None:
        few_models |= set(included.loc[included["method"].isin(FEW_STEP_METHODS), "model"])
    members = [r for r in records if r["spec"]["model"] in few_models]
    references: dict[str, dict[str, Any]] = {}
    for rec in members:
        if rec["spec"]["method"] in DENSE_PREFERENCE and not rec["spec"].get("checkpoint"):
            key = _multistep_key(rec)
            if key not in references or _passes(rec) > _passes(references[key]):
                references[key] = rec
    chosen = {id(rec) for rec in references.values()}
    others = [r for r in members if id(r) not in chosen]
    rows = []
    # The dense references, then the other runs with the most transformer passes first: multi-step before few-step.
    for rec in [*references.values(), *sorted(others, key=_passes, reverse=True)]:
        spec, s = rec["spec"], rec["spec"]["sampling"]
        reference = references.get(_multistep_key(rec))
        latency = _video_seconds(rec)
        base = _video_seconds(reference) if reference else None
        named = f"{reference['spec']['method']} {reference['spec']['sampling']['steps']} steps" if reference else None
        row = {
            "model": spec["model"],
            "method": spec["method"],
            "attention": _attention_label(rec),
            "generator": _generator_label(rec),
            "params": _given_params(rec),
            "video": f"{s['height']}x{s['width']}x{s['frames']}",
            "steps": s["steps"],
            "cfg": s["cfg"],
            "videos": len(rec["artifacts"]["videos"]),
            "device": rec["environment"].get("device_name"),
            "latency_s": latency,
            "speedup": base / latency if base else None,
            "baseline": named,
            "density": rec["density"].get("mean"),
        }
        if rec.get("quality_reportable", False):
            metrics = rec.get("metrics", {})
            if set(PAPER8) <= set(metrics.get("vbench", {})):
                row["vbench_avg"] = sum(metrics["vbench"][d] for d in PAPER8) / len(PAPER8)
            for suite, scores in sorted(metrics.items()):
                row.update({name if name not in row else f"{suite}.{name}": value for name, value in scores.items()})
        rows.append(row)
    table = pd.DataFrame(rows)
    return table.dropna(axis=1, how="all") if not table.empty else table


def _attention_label(rec: dict[str, Any]) -> str:
    """The attention a run's transformer runs: a few-step generator's ``attention``, a method with a softmax method
    inside as ``linvideo + radial``, else the method."""
    resolved = rec.get("method_params_resolved") or {}
    if resolved.get("attention"):
        return resolved["attention"]
    inner = resolved.get("softmax_method")
    return f"{rec['spec']['method']} + {inner}" if inner else rec["spec"]["method"]


def _generator_label(rec: dict[str, Any]) -> str:
    """The model sampled: a few-step generator's own description, else the dense model or the method's checkpoint
    with its steps and CFG (``linvideo checkpoint toy-3bf0c0ed51fa, 20 steps, CFG 4``)."""
    resolved, spec = rec.get("method_params_resolved") or {}, rec["spec"]
    if resolved.get("generator"):
        return resolved["generator"]
    model = f"{spec['method']} checkpoint {Path(spec['checkpoint']).name}" if spec.get("checkpoint") else "dense"
    return f"{model}, {spec['sampling']['steps']} steps, CFG {spec['sampling']['cfg']:g}"


#: The columns an included table3 (an earlier report's ``table3.csv``) must have: its rows' identity, device and
#: speedup basis, which this report keeps as computed there.
INCLUDED_COLUMNS = ("model", "method", "attention", "steps", "cfg", "device", "latency_s", "speedup", "baseline")
SPEEDUP_NOTE = (
    "each row against the dense run named in `baseline` on the row's own device (`device`); rows of different "
    "devices are never compared with each other, and their latencies are not comparable"
)


def load_included(paths: list[Path]) -> pd.DataFrame | None:
    """The rows of earlier reports' ``table3.csv`` files (their records not kept: e.g. a GPU run's few-step rows),
    each with a ``source`` column naming its file (or the source it already names); None for no paths.

    Raises HarnessError (one line) for a path that is missing, not a ``table3.csv``, unreadable or lacking one of
    :data:`INCLUDED_COLUMNS`.
    """
    from harness.errors import HarnessError
    from harness.io_checks import existing_input

    frames = []
    for path in paths:
        path = existing_input(path, "included table", folder=False)
        if path.name != "table3.csv":
            raise HarnessError(f"included table {path} is not a table3.csv: only an earlier `bench report`'s table3 "
                               "can be included (its rows carry their device and speedup basis)")  # fmt: skip
        try:
            frame = pd.read_csv(path)  # pandas 3 reads floats back exactly: a row read back equals its run's
        except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
            raise HarnessError(f"included table {path} cannot be read as CSV: {exc}") from exc
        missing = [column for column in INCLUDED_COLUMNS if column not in frame]
        if missing:
            raise HarnessError(f"included table {path} lacks the column(s) {', '.join(missing)} of a table3.csv")
        frame["source"] = frame["source"].fillna(str(path)) if "source" in frame else str(path)
        text = frame.select_dtypes(include=["object", "string"]).columns
        frame[text] = frame[text].fillna("")  # an empty text cell (e.g. no params) reads back as NaN
        frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else None


def join_once(own: pd.DataFrame | None, included: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """``own`` rows, then the ``included`` rows not already there, and how many were left out.

    A row equal to an earlier one in every column but ``source`` is the same run again (an earlier report of these
    runs included, or one table given twice): kept, it would count that run twice.
    """
    joined = pd.concat([own, included], ignore_index=True)
    repeated = joined.drop(columns="source").map(_cell_key).apply(tuple, axis=1).duplicated()
    return joined[~repeated].reset_index(drop=True).dropna(axis=1, how="all"), int(repeated.sum())


def _cell_key(value: Any) -> str:
    """A cell as read back from a CSV compares: empty for a missing value, numbers as floats (20 and 20.0 alike)."""
    if not isinstance(value, str) and pd.isna(value):
        return ""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return repr(float(value))
    return str(value)


def _multistep_key(rec: dict[str, Any]) -> str:
    """The record's cohort with the sampler's steps, CFG and shift left out, on its device: a few-step run and
    the dense multi-step run it is compared with share it."""
    from dataclasses import replace

    from harness.spec import RunSpec

    spec = RunSpec.from_dict(rec["spec"])
    neutral = replace(spec, sampling=replace(spec.sampling, steps=1, cfg=1.0, shift=1.0))
    return f"{neutral.cohort()}@{rec['environment'].get('device_name')}"


def _video_seconds(rec: dict[str, Any]) -> float:
    """Seconds per video from the stage medians (see :func:`table3`); the recorded total where one is missing."""
    stages = rec["latency"]["stages"]
    medians = [stages.get(name, {}).get("median_ms") for name in ("denoise_step", "decode", "prompt_encoding")]
    if any(median is None for median in medians):
        return rec["latency"]["end_to_end_ms_per_video"] / 1e3
    step, decode, encode = medians
    return (rec["spec"]["sampling"]["steps"] * step + decode + encode) / 1e3


def _passes(rec: dict[str, Any]) -> int:
    """Transformer passes per video: steps x (2 with CFG, else 1)."""
    sampling = rec["spec"]["sampling"]
    return sampling["steps"] * (2 if sampling["cfg"] > 1 else 1)


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
                    "density_fixed": entry.get("density_fixed_by_user"),
                    "data_dependent": entry.get("data_dependent"),
                    "kernel_efficiency": entry.get("kernel_efficiency"),
                    "peak_gib": entry.get("peak_gib"),
                    "baseline": rec["baseline"],
                    "speedup": entry["speedup_vs_baseline"],
                    "compiled_forward_ms": entry.get("compiled", {}).get("forward", {}).get("median_ms"),
                }
            )
    return pd.DataFrame(rows)


ABLATION_TITLES = {
    "alpha": "alpha range of L_reg", "kernel": "feature map (kernel)", "objective": "training objective",
    "selection": "layer selection", "target": "number of converted layers",
}  # fmt: skip


# LinVideo's objective ablation (Tab. 4; reference/linvideo.md 7.2): VBench Imaging Quality on Wan 1.3B. The toy's
# own columns are ToyBench's, so the comparable thing is the order of the objectives, not the figures.
PAPER_OBJECTIVES = {"adm": 66.07, "adm-extra-score": 65.61, "mse": 61.56}
PAPER_OBJECTIVES_NOTE = "LinVideo Tab. 4, VBench Imaging Quality on Wan 1.3B (reference/linvideo.md 7.2)"


def objective_order_note(table: pd.DataFrame, metric: str = "prompt_correctness") -> str:
    """The paper's order of the objectives beside this table's (by ``metric`` over the trained variants), and
    whether they agree; "" if the table has none of the paper's objectives scored."""
    scored = table[table["variant"].isin(list(PAPER_OBJECTIVES)) & table.get("trained", True)]
    if metric not in scored or scored[metric].isna().all():
        return ""
    ours = scored.sort_values(metric, ascending=False)["variant"].tolist()
    paper = [name for name in sorted(PAPER_OBJECTIVES, key=PAPER_OBJECTIVES.get, reverse=True) if name in ours]
    verdict = "agrees with" if ours == paper else "DISAGREES with"
    return (
        f"{PAPER_OBJECTIVES_NOTE}; the paper's order {' > '.join(paper)}; by {metric} here "
        f"{' > '.join(ours)}: this toy {verdict} the paper"
    )


def _memberships(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The (axis, variant, order) entries an ablation record stands for (the default recipe: every axis)."""
    return record.get("ablation", [])


def _reference_label(record: dict[str, Any]) -> str:
    """``sdpa (reference)``, ``linear kernel=hedgehog layers=0,1,2,6 (reference)``."""
    params = _given_params(record)
    return f"{record['spec']['method']}{' ' + params if params else ''} (reference)"


def _reference_linear_layers(record: dict[str, Any]) -> list[int]:
    """The layers an untrained reference runs with linear attention (none for a dense method)."""
    if record["spec"]["method"] != "linear":
        return []
    from harness.models import MODELS
    from methods.params import parse_layers

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
        table = pd.DataFrame(rows)
        if axis == "objective":
            table["paper_imaging_quality"] = table["variant"].map(PAPER_OBJECTIVES)
        tables[f"ablation_{axis}"] = table
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


def _scaling_sweeps(paths: list[Path]) -> list[tuple[Path, dict[str, Any]]]:
    """The scaling sweeps among the JSON files that are not run records."""
    sweeps = []
    for path in paths:
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(data, dict) and data.get("kind") == "scaling":
            sweeps.append((path, data))
    return sweeps


def build_report(runs_dir: Path, out_dir: Path | None, include: list[Path] | None = None) -> Report:
    """Read every record under ``runs_dir``; write ``runs.md/csv`` and ``latency.md/csv`` to ``out_dir``.

    ``include``: earlier reports' ``table3.csv`` files whose rows join this report's table3 as computed there
    (:func:`load_included`), with a ``source`` column naming where each row comes from. A table whose rows come
    from more than one device gets a note on its speedups (:data:`SPEEDUP_NOTE`).

    Raises HarnessError (before reading any record) if ``out_dir`` cannot be written or an included table is bad.
    """
    included = load_included(include or [])
    if out_dir is not None:
        out_dir = ensure_writable_dir(out_dir)
    loaded = load_records(runs_dir)
    records, skipped = usable_records(loaded.records)
    report = Report(errors=loaded.errors + skipped, not_records=loaded.others)
    runs = [_untimed_if_contended(r) for r in records if r["kind"] == "run"]
    reportable = [r for r in runs if r.get("quality_reportable", False)]
    report.notes = protocol_notes(reportable)
    untimed = sum(map(contended, runs))
    if untimed:
        for column in ("step_ms", "latency_s"):  # the runs and ablation tables', table 1's and table 3's times
            report.notes[column] = (f"{untimed} run(s) sampled beside others (bench ablate --jobs) have no times: "
                                    "they measured each other's contention")  # fmt: skip
    tables = {"runs": runs_table(runs), "latency": latency_table([r for r in records if r["kind"] == "latency"]),
              "table1": table1(reportable), "table3": table3(runs, included),
              **ablation_tables(reportable)}  # fmt: skip
    if included is not None:
        own = tables["table3"].assign(source=str(runs_dir)) if not tables["table3"].empty else None
        tables["table3"], repeated = join_once(own, included)
        if repeated:
            report.notes["source"] = (f"{repeated} included row(s) left out: already in the table (an earlier report "
                                      "of these runs, or a table included twice)")  # fmt: skip
    for name, table in tables.items():
        if table.empty:
            continue
        report.tables[name] = table
        notes = _notes_for(table, report.notes)
        if "speedup" in table and "device" in table and table["device"].nunique() > 1:
            notes["speedup"] = report.notes["speedup"] = SPEEDUP_NOTE
        if out_dir is not None:
            if name == "ablation_objective":
                notes["paper_imaging_quality"] = objective_order_note(table) or PAPER_OBJECTIVES_NOTE
            report.files += _write_table(table, out_dir, name, notes)
    ablations = [name for name in report.tables if name.startswith("ablation_")]
    if ablations and out_dir is not None:
        report.files += ablation_figures(reportable, {name: report.tables[name] for name in ablations}, out_dir)
    if out_dir is not None:  # attention time against tokens (harness.benchmarks.scaling_gpu), one figure per sweep
        from harness import plots

        for path, sweep in _scaling_sweeps(loaded.others):
            report.files.append(plots.scaling(sweep, out_dir / "figures" / f"{path.stem}.png"))
    return report


def protocol_notes(records: list[dict[str, Any]]) -> dict[str, str]:
    """metric -> how its figure departs from its benchmark's protocol (e.g. VBench's temporal_flickering scored
    without the static filter), as recorded by the latest evaluation that scored it in any of ``records``."""
    notes: dict[str, str] = {}
    for record in records:
        latest: dict[str, str] = {}
        for entries in record.get("evaluations", {}).values():
            for entry in entries:
                if isinstance(entry, dict):
                    given = entry.get("protocol_notes", {})
                    latest.update({name: given.get(name, "") for name in entry.get("dimensions", ())})
        notes.update({name: note for name, note in latest.items() if note})
    return dict(sorted(notes.items()))


def _notes_for(table: pd.DataFrame, notes: dict[str, str]) -> dict[str, str]:
    return {metric: note for metric, note in notes.items() if metric in table.columns}


def _write_table(table: pd.DataFrame, out_dir: Path, stem: str, notes: dict[str, str]) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    md_path, csv_path = out_dir / f"{stem}.md", out_dir / f"{stem}.csv"
    footer = "".join(f"\n- {metric}: {note}" for metric, note in notes.items())
    markdown = table.to_markdown(index=False, floatfmt=".4g")
    with atomic_path(md_path) as tmp:
        tmp.write_text(markdown + (f"\n\nNotes:{footer}" if footer else "") + "\n")
    with atomic_path(csv_path) as tmp:
        table.to_csv(tmp, index=False)
    return [md_path, csv_path]


# -- the console's compact view --------------------------------------------------------------------------

#: Columns the console shows first, in this order; then the metrics, as far as the terminal's width allows.
CONSOLE_FIRST = ("model", "video", "tokens", "variant", "method", "attention", "params", "device", "step_ms",
                 "forward_ms", "latency_s", "speedup", "density")  # fmt: skip
#: Columns only the files carry: provenance, spread, and ToyBench's sub-scores of prompt correctness.
CONSOLE_HIDDEN = frozenset({
    "params_resolved", "device", "weights", "videos", "peak_gib", "forward_p25_ms", "forward_p75_ms",
    "data_dependent", "density_fixed", "steps", "e2e_s_per_video", "attn_ms_per_step", "colour", "shape", "size",
    "direction", "baseline", "prompts", "trained", "train_s_per_step", "concurrent_jobs", "linear_count", "cfg",
    "source",
})  # fmt: skip
#: Shared by every row: shown once in the title instead of a column.
CONSOLE_CONTEXT = ("model", "video", "tokens")
CONSOLE_CELL = 32  # characters of a cell at most (longer: its middle cut to an ellipsis, the distinctive end kept)
PARAMS_CELL = 21  # the short params label: room for a checkpoint's name (ckpt=toy-5af578e1e7ed) at 80 columns
IDENTITY = ("variant", "method", "params")  # always shown: what each row is (and the device, where rows differ in it)


@dataclass
class ConsoleView:
    """What the console prints of one table: a title, the columns that fit (headers broken at ``_`` onto
    lines, never inside a word), and the columns left to the files."""

    title: str
    columns: list[str]
    rows: list[list[str]]
    left_out: list[str]


def console_view(name: str, table: pd.DataFrame, width: int) -> ConsoleView:
    """The columns of ``table`` that fit in ``width`` characters (rich's box: 3 per column plus 1), in the
    order of :data:`CONSOLE_FIRST` then the table's own; :data:`IDENTITY` columns always, and ``device`` where the
    rows are of more than one (their speedups and latencies are then not comparable across rows)."""
    context = [c for c in CONSOLE_CONTEXT if c in table and table[c].nunique(dropna=False) == 1]
    title = " ".join([name, *(str(table[c].iloc[0]) for c in context)])
    mixed = "device" in table and table["device"].nunique() > 1
    hidden, identity = (CONSOLE_HIDDEN - {"device"}, (*IDENTITY, "device")) if mixed else (CONSOLE_HIDDEN, IDENTITY)
    order = [*(c for c in CONSOLE_FIRST if c in table), *(c for c in table if c not in CONSOLE_FIRST)]
    candidates = [c for c in order if c not in context and c not in hidden]
    shown, headers, cells, used = [], [], {}, 1
    for column in candidates:
        limit = PARAMS_CELL if column == "params" else CONSOLE_CELL
        cells[column] = [_cell(value, limit) for value in table[column]]
        words = [part + "_" for part in column.split("_")]
        words[-1] = words[-1][:-1]
        widest = max(*(len(word) for word in words), *(len(cell) for cell in cells[column]))
        roomy = max(widest, min(len(column), widest + 4))  # a few more characters spare a header line
        column_width = next((w for w in (roomy, widest) if used + w + 3 <= width), None)
        if column in identity or column_width is not None:
            column_width = column_width or roomy
            shown.append(column)
            headers.append(_wrap(words, column_width))
            used += column_width + 3
    rows = [[cells[c][i] for c in shown] for i in range(len(table))]
    return ConsoleView(title, headers, rows, [c for c in table if c not in shown and c not in context])


def _wrap(words: list[str], width: int) -> str:
    """Header words (``prompt_``, ``correctness``) joined onto as few lines of ``width`` as they fit."""
    lines = [words[0]]
    for word in words[1:]:
        if len(lines[-1]) + len(word) <= width:
            lines[-1] += word
        else:
            lines.append(word)
    return "\n".join(lines)


def _cell(value: Any, limit: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    if len(text) <= limit:
        return text
    head = (limit - 1) // 2
    return text[:head] + "\u2026" + text[len(text) - (limit - 1 - head) :]
