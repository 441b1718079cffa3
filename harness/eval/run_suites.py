"""Suites that score a whole run from its record: fidelity against a reference run, VBench, VBench-2.0."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from harness.errors import HarnessError
from harness.eval.suites import EvalOptions, RunScores, Suite, mean_scores, requires

# -- fidelity ----------------------------------------------------------------------------------------

#: Dense methods a fidelity reference is looked for among, in order (as the report's speedup baseline).
REFERENCE_PREFERENCE = ("fa2", "cudnn", "sdpa", "math")


def load_frames(record: dict[str, Any], runs_dir: Path) -> dict[str, torch.Tensor]:
    """The decoded uint8 frames every run keeps, by the videos' ``frames_key`` (one file, or one per rank)."""
    return load_frame_files(record["artifacts"]["frames"], runs_dir)


def load_frame_files(files: str | list[str], runs_dir: Path) -> dict[str, torch.Tensor]:
    """The frames of one or several safetensors files (paths relative to ``runs_dir``), merged by key."""
    from safetensors.torch import load_file

    return {key: value for name in ([files] if isinstance(files, str) else files)
            for key, value in load_file(str(Path(runs_dir) / name)).items()}  # fmt: skip


def reference_record(record: dict[str, Any], runs_dir: Path, chosen: Path | None) -> tuple[dict[str, Any], Path]:
    """The run to compare against: the one named, else the dense run of the same cohort in ``runs_dir``."""
    from harness.records import load_records, read_record
    from harness.spec import record_cohort

    if chosen is not None:
        path = chosen if chosen.suffix == ".json" else Path(runs_dir) / f"{chosen}.json"
        if not path.is_file():
            raise HarnessError(f"fidelity reference {chosen} is not a run record (looked for {path})")
        return read_record(path), path.parent
    cohort = record_cohort(record)
    peers = [r for r in load_records(runs_dir).records if r.get("kind") == "run" and record_cohort(r) == cohort]
    for method in REFERENCE_PREFERENCE:
        for peer in peers:
            if peer["spec"]["method"] == method and peer["environment"].get("device_name") == record["environment"].get(
                "device_name"
            ):
                return peer, Path(peer["_path"]).parent
    raise HarnessError(
        f"no dense run of this run's cohort in {runs_dir} to compare against: run the same spec with "
        f"--method {REFERENCE_PREFERENCE[2]} (or name one with --reference RUN)"
    )


def _fidelity(record: dict[str, Any], runs_dir: Path, options: EvalOptions) -> RunScores:
    from harness.eval.fidelity import compare_clips

    reference, reference_dir = reference_record(record, runs_dir, options.reference)
    ours, theirs = load_frames(record, runs_dir), load_frames(reference, reference_dir)
    by_sample = {(v["prompt"], v["seed"]): v["frames_key"] for v in reference["artifacts"]["videos"]}
    per_video = []
    for video in record["artifacts"]["videos"]:
        key = by_sample.get((video["prompt"], video["seed"]))
        if key is None:
            raise HarnessError(f"the reference run has no video for seed {video['seed']} of {video['prompt'][:60]!r}")
        per_video.append(compare_clips(ours[video["frames_key"]], theirs[key]))
    details = {
        "reference_run": reference["run_id"],
        "reference_method": reference["spec"]["method"],
        "psnr": "whole-video MSE, dB",
        "ssim": "mean over frames, Gaussian 11 / 1.5",
    }
    return RunScores(mean_scores(per_video), per_video, details)


FIDELITY = Suite(
    "fidelity",
    (),
    None,
    "PSNR / SSIM of each video against the dense video from the same noise (torchmetrics)",
    score_run=_fidelity,
    preflight=requires("torchmetrics"),
)

# -- VBench and VBench-2.0 ---------------------------------------------------------------------------


def dimensions_for(benchmark: str, spec: dict[str, Any], options: EvalOptions) -> tuple[str, ...]:
    """The dimensions to score: named in the options, else in the spec, else those of its prompt set."""
    from harness.eval.prompt_sets import PAPER8
    from harness.eval.vbench.catalogue import dimension

    named = options.dimensions or tuple(spec.get("eval_params", {}).get(benchmark, {}).get("dimensions", ()))
    if not named and _from_prompt_set(benchmark, spec):
        which = spec["prompt_set"].partition(":")[2].partition("+")[0]
        named = PAPER8 if which == "paper8" else (which,)
    if not named:
        raise HarnessError(f"name the {benchmark} dimensions to score with --dimensions (e.g. temporal_flickering)")
    return tuple(dimension(benchmark, name).name for name in named)


def _from_prompt_set(benchmark: str, spec: dict[str, Any]) -> bool:
    return spec.get("prompt_set", "").partition(":")[0] == benchmark


def _benchmark_request(benchmark: str, spec: dict[str, Any], options: EvalOptions):  # type: ignore[no-untyped-def]
    from harness.eval.vbench.environment import Cache
    from harness.eval.vbench.runner import BenchmarkRequest

    return BenchmarkRequest(
        benchmark, dimensions_for(benchmark, spec, options), Cache.resolve(options.cache), options.device
    )


def _preflight(benchmark: str):  # type: ignore[no-untyped-def]
    def check(spec: Any, options: EvalOptions) -> None:
        from harness.eval.vbench.catalogue import check_custom_input
        from harness.eval.vbench.environment import preflight

        data = spec.to_dict()
        request = _benchmark_request(benchmark, data, options)
        if not _from_prompt_set(benchmark, data):
            check_custom_input(benchmark, request.dimensions)
        preflight(benchmark, request.cache, request.dimensions)

    return check


def _score_benchmark(benchmark: str):  # type: ignore[no-untyped-def]
    def score(record: dict[str, Any], runs_dir: Path, options: EvalOptions) -> RunScores:
        from harness.eval.vbench.catalogue import dimension
        from harness.eval.vbench.runner import evaluate_videos, video_names

        request = _benchmark_request(benchmark, record["spec"], options)
        videos = record["artifacts"]["videos"]
        names = video_names(videos, benchmark)
        result = evaluate_videos(
            request,
            [Path(runs_dir) / v["video"] for v in videos],
            names,
            Path(runs_dir) / record["run_id"] / benchmark,
            standard=_from_prompt_set(benchmark, record["spec"]),
            labels=[v.get("label", v["prompt"]) for v in videos],
        )
        per_video = [result.per_video.get(name, {}) for name in names]
        notes = {name: dimension(benchmark, name).protocol_note for name in request.dimensions}
        details = {"dimensions": list(request.dimensions), "raw": result.raw, **result.details,
                   "protocol_notes": {name: note for name, note in notes.items() if note}}  # fmt: skip
        return RunScores(result.percent, per_video, details)

    return score


def _benchmark_suite(benchmark: str, description: str) -> Suite:
    return Suite(
        benchmark,
        (),
        None,
        description,
        score_run=_score_benchmark(benchmark),
        preflight=_preflight(benchmark),
        all_ranks=True,
    )


VBENCH = _benchmark_suite("vbench", "VBench 0.1.5 in its own venv (aggregate x 100, as papers report)")
VBENCH2 = _benchmark_suite("vbench2", "VBench-2.0 in its own venv (aggregate x 100)")
