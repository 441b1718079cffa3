"""Suites that score a whole run from its record: fidelity against a reference run, VBench, VBench-2.0."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from harness.errors import HarnessError
from harness.eval.suites import EvalOptions, RunScores, Suite, mean_scores, requires
from harness.spec import RunSpec, record_cohort

# -- fidelity ----------------------------------------------------------------------------------------

#: Dense methods a fidelity reference is looked for among, in order (as the report's speedup baseline).
REFERENCE_PREFERENCE = ("fa2", "cudnn", "sdpa", "math")


def load_frames(record: dict[str, Any], runs_dir: Path) -> dict[str, torch.Tensor]:
    """The decoded uint8 frames ``(F, H, W, 3)`` every run keeps, by the videos' ``frames_key``."""
    return load_frame_files(record["artifacts"]["frames"], runs_dir)


def load_frame_files(files: str | list[str], runs_dir: Path) -> dict[str, torch.Tensor]:
    """The frames of one or several safetensors files (paths relative to ``runs_dir``), merged by key.

    A record lists one file per video (one per run or per rank before runs resumed). Raises
    :class:`HarnessError` naming a file that is missing or unreadable.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    frames: dict[str, torch.Tensor] = {}
    for name in [files] if isinstance(files, str) else files:
        path = Path(runs_dir) / name
        try:
            frames.update(load_file(str(path)))
        except (OSError, SafetensorError) as exc:
            raise HarnessError(
                f"the run's frames file {path} cannot be read ({exc}): make the run again with --force"
            ) from None
    return frames


def reference_record(record: dict[str, Any], runs_dir: Path, chosen: Path | None) -> tuple[dict[str, Any], Path]:
    """The run to compare against: the one named (a record path, or a run id in ``runs_dir``; it must share the
    run's cohort), else the dense run of the same cohort in ``runs_dir``."""
    from harness.records import load_records

    if chosen is not None:
        path = chosen if chosen.suffix == ".json" else Path(runs_dir) / f"{chosen}.json"
        return named_reference(RunSpec.from_dict(record["spec"]), path), path.parent
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


def check_reference(spec: RunSpec, reference: dict[str, Any], path: Path) -> None:
    """Refuse a fidelity reference outside ``spec``'s cohort.

    Fidelity measures what the attention method changes in videos made from the same noise, sampler and
    weights; a reference of another resolution cannot be compared frame by frame, and one of another step
    count (or CFG, shift, dtype, ...) would put the sampler's change into the run's one fidelity score.
    """
    try:
        theirs = RunSpec.from_dict(reference["spec"])
    except (KeyError, TypeError, HarnessError) as exc:
        raise HarnessError(f"fidelity reference {path} has no readable run spec ({exc})") from None
    differences = spec.cohort_differences(theirs)
    if differences:
        raise HarnessError(f"fidelity reference {path} is not of this run's cohort: it differs in "
                           f"{'; '.join(differences)}. The reference must differ in the method only (same model, "
                           "weights, sampling, prompts, seeds, device and dtype)")  # fmt: skip


def named_reference(spec: RunSpec, path: Path) -> dict[str, Any]:
    """The reference record at ``path``, checked to share ``spec``'s cohort."""
    from harness.records import read_record

    if not path.is_file():
        raise HarnessError(f"fidelity reference {path} is not a run record")
    try:
        reference = read_record(path)
    except ValueError as exc:
        raise HarnessError(f"fidelity reference {path}: {exc}") from None
    check_reference(spec, reference, path)
    return reference


def _fidelity_preflight(spec: RunSpec, options: EvalOptions) -> None:
    requires("torchmetrics")(spec, options)
    if options.reference is not None and options.reference.suffix == ".json":  # an id needs the runs folder
        named_reference(spec, options.reference)


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
    preflight=_fidelity_preflight,
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
        from harness.eval.vbench.runner import video_names

        # The file names the evaluator will read, from the spec alone (video i of a prompt is its i-th seed).
        planned = [{"prompt": spec.prompts[p], "label": spec.label(p), "index": s}
                   for p in range(len(spec.prompts)) for s in range(len(spec.seeds))]  # fmt: skip
        video_names(planned, benchmark)
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
