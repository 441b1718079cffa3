"""Paired generation: prompts x seeds, the same initial noise for every method, one record per run.

Everything that can be checked without weights is checked first (:mod:`harness.preflight`, then the output
folder); then the model is built, videos are sampled with per-stage timing, written as mp4 and kept as
tensors, and the record is written atomically.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from harness.atomic import write_json_atomic
from harness.distributed import Ranks, barrier, current_ranks, rank_group
from harness.environment import capture_environment, kernel_choice_changes
from harness.errors import HarnessError
from harness.eval.run_suites import load_frame_files
from harness.eval.suites import SUITES, EvalOptions
from harness.evaluate import evaluate_record, merge_scores, score_clips
from harness.io_checks import ensure_writable_dir
from harness.latency import StageTimer, TimingStats, peak_memory
from harness.models.base import ModelAdapter
from harness.preflight import Prepared, preflight
from harness.records import finished_record, record_path, write_record
from harness.run_videos import find_video, save_video
from harness.spec import RunSpec
from methods.base import AttentionMethod, DensityLog


def initial_noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The initial latent noise of one sample: a CPU generator, so it is the same on every device."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


@dataclass
class RunOutcome:
    record: dict[str, Any]
    path: Path
    skipped: bool


@dataclass
class Share:
    """What one rank's videos are: their entries and frames files, and what this attempt measured making them.

    ``generated`` of the videos were made by this attempt (per-stage seconds, peak memory); the rest were
    finished by an earlier, interrupted one and read back. ``density`` covers every video.
    """

    videos: list[dict[str, Any]]
    frames: list[str]  # one file per video, relative to the runs folder
    stage_seconds: dict[str, list[float]]  # stage -> seconds per call, the rank's first call first
    density: list[tuple[int, int, float, int]]  # DensityLog.entries()
    peak_gib: float | None
    generated: int
    wall_seconds: float  # this rank's time to make its share, from its model loaded to its last video saved

    def to_dict(self) -> dict[str, Any]:
        return vars(self).copy()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Share:
        values = {f.name: data[f.name] for f in fields(cls)}
        return cls(**{**values, "density": [tuple(row) for row in values["density"]]})


def run(
    spec: RunSpec,
    runs_dir: Path,
    force: bool = False,
    allow_download: bool = False,
    show_progress: bool = True,
    eval_options: EvalOptions | None = None,
    concurrent_runs: int = 1,
) -> RunOutcome:
    """Generate every prompt x seed of ``spec``, write its record and score it (skipped if already finished).

    Under torchrun each rank makes every ``WORLD_SIZE``-th video on its own GPU; rank 0 writes the one record.
    ``concurrent_runs`` > 1: the caller runs up to that many runs side by side (:func:`harness.ablate.sample_all`),
    which the record's latency says (``latency.concurrent_runs``): its times measured their contention.
    """
    ranks = current_ranks()
    prepared = preflight(spec, eval_options, allow_download=allow_download)
    spec = prepared.spec  # with the checkpoint's content id, which names the run
    runs_dir = ensure_writable_dir(runs_dir)
    path = record_path(runs_dir, spec.run_id)
    existing = finished_record(path)
    if existing is not None and not force:
        changed = kernel_choice_changes(existing.get("environment", {}), prepared.method.kernel_variables_used)
        if changed:  # its numbers measured other kernels than the ones this run would use
            raise HarnessError(f"{path} is a finished run of this spec made with {', '.join(changed)}: rerun "
                               "it with --force (replaces it), use another --runs-dir, or set them back")  # fmt: skip
        return RunOutcome(existing, path, skipped=True)
    work = [(p, s) for p in range(len(spec.prompts)) for s in range(len(spec.seeds))]
    if ranks.world_size > len(work):
        raise HarnessError(f"{ranks.world_size} ranks for {len(work)} video(s): start at most one rank per video")

    started = time.time()
    artifacts_dir = runs_dir / spec.run_id
    with rank_group(ranks, prepared.device):
        model = prepared.adapter_cls.load(spec.weights, prepared.device, prepared.dtype, allow_download)
        method = prepared.method
        if spec.checkpoint is not None:
            method.load_checkpoint(Path(spec.checkpoint), model.transformer)
        # made only once the weights and checkpoint have loaded, so a bad run leaves nothing behind
        artifacts_dir.mkdir(parents=True, exist_ok=True)
        share = _generate_share(
            prepared, model, ranks.share(work), artifacts_dir, runs_dir, show_progress and ranks.lead, force
        )
        shares = _join_shares(share, ranks, artifacts_dir)
        if ranks.lead:
            record = _build_record(prepared, model, method, shares, time.time() - started, ranks.world_size)
            if concurrent_runs > 1:
                record["latency"]["concurrent_runs"] = concurrent_runs
            clip_suites = [SUITES.get(name) for name in spec.eval_suites if SUITES.get(name).score is not None]
            frames = load_frame_files(record["artifacts"]["frames"], runs_dir) if clip_suites else {}
            for suite in clip_suites:
                scores = score_clips(suite, record["artifacts"]["videos"], frames, spec.sampling.fps)
                merge_scores(record, suite.name, scores)
            write_record(path, record)
        barrier(ranks)  # the record exists before any rank scores it with an external evaluator
        run_suites = tuple(name for name in spec.eval_suites if SUITES.get(name).score is None)
        if run_suites:
            record = evaluate_record(path, run_suites, eval_options or EvalOptions(), preflight=False)
        elif not ranks.lead:
            record = finished_record(path) or {}
    return RunOutcome(record, path, skipped=False)


def _generate_share(
    prepared: Prepared,
    model: ModelAdapter,
    work: list[tuple[int, int]],
    artifacts_dir: Path,
    runs_dir: Path,
    show_progress: bool,
    force: bool,
) -> Share:
    """Make the (prompt index, seed index) pairs of ``work`` that no earlier attempt finished (all of them if
    ``force``), saving each video as soon as it is made (:mod:`harness.run_videos`); time each stage."""
    spec, method = prepared.spec, prepared.method
    finished = {} if force else {
        item: video for item in work if (video := find_video(spec, *item, artifacts_dir, runs_dir)) is not None
    }  # fmt: skip
    todo = [item for item in work if item not in finished]
    started = time.perf_counter()
    timer = StageTimer(prepared.device)
    attention_per_step: list[float] = []
    latent_shape = prepared.adapter_cls.latent_shape(spec.sampling)
    resumed = f" (resuming: {len(finished)} of {len(work)} videos already made)" if finished else ""

    with (
        _progress(show_progress) as progress,
        model.use_method(method) as runtime,
        peak_memory(prepared.device) as memory,
        torch.inference_mode(),
    ):
        task = progress.add_task(f"{spec.model} / {spec.method}{resumed}", total=len(todo) * spec.sampling.steps)
        if todo:
            with timer.stage("prompt_encoding"):
                uncond = model.encode_prompts([spec.sampling.negative_prompt]) if spec.sampling.cfg > 1 else None
        for prompt_index in sorted({p for p, _ in todo}):
            with timer.stage("prompt_encoding"):
                cond = model.encode_prompts([spec.prompts[prompt_index]])
            for seed_index in [s for p, s in todo if p == prompt_index]:
                runtime.timer.pop_seconds()
                method.begin_video()
                method.density.reset()  # one video's log, saved with it so a resumed run still has every video's

                def step_hook(index: int, _task: Any = task):  # type: ignore[no-untyped-def]
                    return _StepScope(timer, runtime, attention_per_step, progress, _task)

                latents = model.sample(
                    initial_noise((1, *latent_shape), spec.seeds[seed_index]), cond, uncond, spec.sampling, runtime,
                    step_hook,
                )  # fmt: skip
                with timer.stage("decode"):
                    frames = model.decode(latents)[0]
                finished[(prompt_index, seed_index)] = save_video(
                    spec, prompt_index, seed_index, frames, method.density.entries(), artifacts_dir, runs_dir
                )

    videos = [finished[item] for item in work]
    density = DensityLog()
    for video in videos:
        density.absorb(video.density)
    stage_seconds = {name: timer.seconds(name) for name in ("prompt_encoding", "denoise_step", "decode")}
    if attention_per_step:
        stage_seconds["attention_per_step"] = attention_per_step
    return Share([v.entry for v in videos], [v.frames for v in videos], stage_seconds, density.entries(),
                 memory["peak_gib"] if todo else None, generated=len(todo),
                 wall_seconds=time.perf_counter() - started)  # fmt: skip


def _join_shares(share: Share, ranks: Ranks, artifacts_dir: Path) -> list[Share]:
    """Every rank's share on the lead (its own alone elsewhere); the shares meet as JSON files."""
    if not ranks.sharded:
        return [share]
    write_json_atomic(artifacts_dir / f"share.rank{ranks.rank}.json", share.to_dict())
    barrier(ranks)
    if not ranks.lead:
        return [share]
    files = [artifacts_dir / f"share.rank{rank}.json" for rank in range(ranks.world_size)]
    shares = [Share.from_dict(json.loads(file.read_text())) for file in files]
    for file in files:
        file.unlink()
    return shares


class _StepScope:
    """Times one denoising step and its attention-only share, then advances the progress bar."""

    def __init__(self, timer: StageTimer, runtime: Any, attention: list[float], progress: Progress, task: Any):
        self.timer, self.runtime, self.attention = timer, runtime, attention
        self.progress, self.task = progress, task
        self._stage = timer.stage("denoise_step")

    def __enter__(self) -> None:
        self._stage.__enter__()

    def __exit__(self, *exc: object) -> None:
        self._stage.__exit__(*exc)
        self.attention.append(self.runtime.timer.pop_seconds())
        self.progress.advance(self.task)


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("steps"),
        TimeElapsedColumn(),
        disable=not enabled,
        transient=False,
    )


def _build_record(
    prepared: Prepared,
    model: ModelAdapter,
    method: AttentionMethod,
    shares: list[Share],
    wall_seconds: float,
    ranks: int,
) -> dict[str, Any]:
    """The run record: every share's videos and frames files in (prompt, seed) order, latency over the videos
    this attempt generated (``resumed_videos`` came from an interrupted earlier attempt), density over all."""
    spec = prepared.spec
    pairs = sorted(((v, f) for s in shares for v, f in zip(s.videos, s.frames, strict=True)),
                   key=lambda pair: (pair[0]["prompt_index"], pair[0]["index"]))  # fmt: skip
    generated = sum(s.generated for s in shares)
    stages = {name: stats.to_dict() for name, stats in _stage_stats(shares).items()}
    step_seconds = [x for s in shares for x in s.stage_seconds["denoise_step"]]
    decode_seconds = [x for s in shares for x in s.stage_seconds["decode"]]
    density = DensityLog()
    for share in shares:
        density.absorb(share.density)
    peaks = [s.peak_gib for s in shares if s.peak_gib is not None]
    weights = "random" if spec.weights == "random" or prepared.adapter_cls.weights_kind == "random" else "pretrained"
    return {
        "kind": "run",
        "status": "complete",
        "run_id": spec.run_id,
        "spec": spec.to_dict(),
        "spec_hash": spec.hash(),
        "cohort": spec.cohort(),
        "method_params_resolved": method.params(),
        "method_capabilities": {
            "sparsity": method.capabilities.sparsity,
            "data_dependent": method.capabilities.data_dependent,
        },
        "weights": weights,
        "weights_identity": model.weights_identity(),
        "checkpoint_identity": prepared.checkpoint_identity,
        "quality_reportable": weights != "random",
        "token_grid": vars(prepared.adapter_cls.token_grid(spec.sampling)),
        "environment": capture_environment(prepared.device),
        "latency": {
            "stages": stages,
            "denoise_total_ms_per_video": _ms_per_video(step_seconds, generated),
            "end_to_end_ms_per_video": _ms_per_video(step_seconds + decode_seconds, generated),
            "note": "per stage, each rank's first call is warm-up (in warmup_ms), the rest are the statistics; "
            "totals per video include every call; all of it over the videos this attempt generated "
            "(not the resumed_videos an interrupted attempt made)",
        },
        "memory": {"peak_gib": max(peaks) if peaks else None},
        "density": density.summary(),
        "metrics": {},
        "artifacts": {"videos": [video for video, _ in pairs], "frames": [frames for _, frames in pairs]},
        "ranks": ranks,
        "rank_wall_seconds": [share.wall_seconds for share in shares],  # in rank order
        "resumed_videos": len(pairs) - generated,
        "wall_seconds": wall_seconds,
    }


def _ms_per_video(seconds: list[float], videos: int) -> float | None:
    return sum(seconds) * 1e3 / videos if videos else None


def _stage_stats(shares: list[Share]) -> dict[str, TimingStats]:
    """Per-stage statistics over every rank; each rank's first call of a stage (if it has more) is warm-up."""
    samples: dict[str, list[float]] = {}
    warmup: dict[str, list[float]] = {}
    for share in shares:
        for name, seconds in share.stage_seconds.items():
            skip = 1 if len(seconds) > 1 else 0
            warmup.setdefault(name, []).extend(seconds[:skip])
            samples.setdefault(name, []).extend(seconds[skip:])
    return {name: TimingStats.from_seconds(samples[name], warmup[name]) for name in samples if samples[name]}
