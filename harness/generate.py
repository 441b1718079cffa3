"""Paired generation: prompts x seeds, the same initial noise for every method, one record per run.

Everything that can be checked without weights is checked first (names, sampling, schedule, device,
method support, output folder); then the model is built, videos are sampled with per-stage timing,
written as mp4 and kept as tensors, and the record is written atomically.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from harness.atomic import write_json_atomic
from harness.checkpoints import checkpoint_identity
from harness.distributed import Ranks, barrier, current_ranks, rank_device, rank_group
from harness.environment import capture_environment
from harness.errors import HarnessError
from harness.eval.run_suites import load_frame_files
from harness.eval.suites import SUITES, EvalOptions
from harness.evaluate import evaluate_record, merge_scores, score_clips
from harness.io_checks import ensure_writable_dir
from harness.latency import StageTimer, TimingStats, peak_memory
from harness.models.base import MODELS, ModelAdapter
from harness.records import finished_record, record_path, write_record
from harness.spec import RunSpec
from harness.video import safe_stem, write_mp4
from methods import METHODS
from methods.base import AttentionMethod, DensityLog, Schedule

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


@dataclass
class Prepared:
    """A validated spec with its resolved classes, ready to build."""

    spec: RunSpec
    adapter_cls: type[ModelAdapter]
    method: AttentionMethod
    device: torch.device
    dtype: torch.dtype


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise HarnessError(f"device {name!r} requested but CUDA is not available on this machine")
    return device


def resolve_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise HarnessError(f"unknown dtype {name!r}; use one of {sorted(set(DTYPES))}") from None


def initial_noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The initial latent noise of one sample: a CPU generator, so it is the same on every device."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def prepare(spec: RunSpec, eval_options: EvalOptions | None = None, checkpoint_to_come: bool = False) -> Prepared:
    """Validate everything that needs no weights; raises :class:`HarnessError` with a clear message.

    Suites with requirements of their own (an evaluator's venv and weights) check them here too.
    ``checkpoint_to_come``: the caller trains the method's checkpoint next (a missing one is not an error).
    """
    adapter_cls = MODELS.get(spec.model)
    method_cls = METHODS.get(spec.method)
    adapter_cls.validate_sampling(spec.sampling)
    adapter_cls.validate_prompts([*spec.prompts, spec.sampling.negative_prompt])
    schedule = Schedule(spec.dense_warmup_steps, spec.dense_layers)
    device, dtype = rank_device(resolve_device(spec.device), current_ranks()), resolve_dtype(spec.dtype)
    if spec.weights == "random" and adapter_cls.weights_kind == "pretrained" and spec.eval_suites:
        raise HarnessError("quality metrics are meaningless with --random-weights; drop --eval")
    for name in spec.eval_suites:
        suite = SUITES.get(name)
        suite.check_model(spec.model)
        if suite.preflight is not None:
            suite.preflight(spec, eval_options or EvalOptions())
    method = method_cls(schedule=schedule, **spec.method_params)
    method.validate_for(adapter_cls.num_layers, spec.sampling.steps)
    method.check_supported(device, dtype)
    if method.capabilities.needs_training and spec.checkpoint is None and not checkpoint_to_come:
        # Untrained states (linvideo's linear_layers) serve `bench latency` only, never a quality run.
        from harness.training import train_command  # training imports this module

        raise HarnessError(
            f"method {spec.method!r} needs a trained checkpoint: make one with "
            f"{train_command(spec.method, spec.model)}, then pass --checkpoint DIR"
        )
    if spec.checkpoint is not None and not Path(spec.checkpoint).exists():
        raise HarnessError(f"method checkpoint {spec.checkpoint} does not exist")
    return Prepared(spec, adapter_cls, method, device, dtype)


@dataclass
class RunOutcome:
    record: dict[str, Any]
    path: Path
    skipped: bool


@dataclass
class Share:
    """What one rank generated: its videos, its frames file, per-stage seconds, density and peak memory."""

    videos: list[dict[str, Any]]
    frames: str  # relative to the runs folder
    stage_seconds: dict[str, list[float]]  # stage -> seconds per call, the rank's first call first
    density: list[tuple[int, int, float, int]]  # DensityLog.entries()
    peak_gib: float | None

    def to_dict(self) -> dict[str, Any]:
        return vars(self).copy()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Share:
        return cls(**{**data, "density": [tuple(row) for row in data["density"]]})


def run(
    spec: RunSpec,
    runs_dir: Path,
    force: bool = False,
    allow_download: bool = False,
    show_progress: bool = True,
    eval_options: EvalOptions | None = None,
) -> RunOutcome:
    """Generate every prompt x seed of ``spec``, write its record and score it (skipped if already finished).

    Under torchrun each rank makes every ``WORLD_SIZE``-th video on its own GPU; rank 0 writes the one record.
    """
    ranks = current_ranks()
    prepared = prepare(spec, eval_options)
    runs_dir = ensure_writable_dir(runs_dir)
    path = record_path(runs_dir, spec.run_id)
    existing = finished_record(path)
    if existing is not None and not force:
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
        frames_name = "frames.safetensors" if not ranks.sharded else f"frames.rank{ranks.rank}.safetensors"
        share, frames_kept = _generate_share(
            prepared, model, ranks.share(work), artifacts_dir / frames_name, runs_dir, show_progress and ranks.lead
        )
        shares = _join_shares(share, ranks, artifacts_dir)
        if ranks.lead:
            if ranks.sharded:
                frames_kept = load_frame_files([s.frames for s in shares], runs_dir)
            clip_suites = [SUITES.get(name) for name in spec.eval_suites if SUITES.get(name).score is not None]
            videos = [video for s in shares for video in s.videos]
            videos.sort(key=lambda v: (v["prompt_index"], v["index"]))
            record = _build_record(prepared, model, method, shares, videos, time.time() - started, ranks.world_size)
            for suite in clip_suites:
                merge_scores(record, suite.name, score_clips(suite, videos, frames_kept, spec.sampling.fps))
            write_record(path, record)
        barrier(ranks)  # the record exists before any rank scores it with an external evaluator
        run_suites = tuple(name for name in spec.eval_suites if SUITES.get(name).score is None)
        if run_suites:
            record = evaluate_record(path, run_suites, eval_options or EvalOptions())
        elif not ranks.lead:
            record = finished_record(path) or {}
    return RunOutcome(record, path, skipped=False)


def _generate_share(
    prepared: Prepared,
    model: ModelAdapter,
    work: list[tuple[int, int]],
    frames_path: Path,
    runs_dir: Path,
    show_progress: bool,
) -> tuple[Share, dict[str, torch.Tensor]]:
    """Sample the (prompt index, seed index) pairs of ``work``; write their mp4s and frames; time each stage."""
    spec, method = prepared.spec, prepared.method
    timer = StageTimer(prepared.device)
    attention_per_step: list[float] = []
    videos: list[dict[str, Any]] = []
    frames_kept: dict[str, torch.Tensor] = {}
    latent_shape = prepared.adapter_cls.latent_shape(spec.sampling)

    with (
        _progress(show_progress) as progress,
        model.use_method(method) as runtime,
        peak_memory(prepared.device) as memory,
        torch.inference_mode(),
    ):
        task = progress.add_task(f"{spec.model} / {spec.method}", total=len(work) * spec.sampling.steps)
        with timer.stage("prompt_encoding"):
            uncond = model.encode_prompts([spec.sampling.negative_prompt]) if spec.sampling.cfg > 1 else None
        for prompt_index in sorted({p for p, _ in work}):
            prompt = spec.prompts[prompt_index]
            with timer.stage("prompt_encoding"):
                cond = model.encode_prompts([prompt])
            for seed_index in [s for p, s in work if p == prompt_index]:
                seed = spec.seeds[seed_index]
                runtime.timer.pop_seconds()

                def step_hook(index: int, _task: Any = task):  # type: ignore[no-untyped-def]
                    return _StepScope(timer, runtime, attention_per_step, progress, _task)

                latents = model.sample(
                    initial_noise((1, *latent_shape), seed), cond, uncond, spec.sampling, runtime, step_hook
                )
                with timer.stage("decode"):
                    frames = model.decode(latents)[0]
                stem = f"{safe_stem(spec.label(prompt_index))}-seed{seed}"
                video_path = frames_path.parent / f"{stem}.mp4"
                write_mp4(video_path, frames, spec.sampling.fps)
                frames_kept[stem] = frames
                videos.append(
                    {
                        "prompt": prompt,
                        "label": spec.label(prompt_index),
                        "prompt_index": prompt_index,
                        "seed": seed,
                        "index": seed_index,
                        "video": str(video_path.relative_to(runs_dir)),
                        "frames_key": stem,
                    }
                )

    _save_frames(frames_path, frames_kept)
    stage_seconds = {name: timer.seconds(name) for name in ("prompt_encoding", "denoise_step", "decode")}
    if attention_per_step:
        stage_seconds["attention_per_step"] = attention_per_step
    share = Share(videos, str(frames_path.relative_to(runs_dir)), stage_seconds, method.density.entries(),
                  memory["peak_gib"])  # fmt: skip
    return share, frames_kept


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


def _save_frames(path: Path, frames: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    from harness.atomic import atomic_path

    with atomic_path(path) as tmp:
        save_file({key: value.contiguous() for key, value in frames.items()}, str(tmp))


def _build_record(
    prepared: Prepared,
    model: ModelAdapter,
    method: AttentionMethod,
    shares: list[Share],
    videos: list[dict[str, Any]],
    wall_seconds: float,
    ranks: int,
) -> dict[str, Any]:
    spec = prepared.spec
    stages = {name: stats.to_dict() for name, stats in _stage_stats(shares).items()}
    step_seconds = [x for s in shares for x in s.stage_seconds["denoise_step"]]
    decode_seconds = [x for s in shares for x in s.stage_seconds["decode"]]
    per_video = (sum(step_seconds) + sum(decode_seconds)) / max(len(videos), 1)
    density = DensityLog()
    for share in shares:
        density.absorb(share.density)
    peaks = [s.peak_gib for s in shares if s.peak_gib is not None]
    weights = "random" if spec.weights == "random" or prepared.adapter_cls.weights_kind == "random" else "pretrained"
    frames: str | list[str] = shares[0].frames if len(shares) == 1 else [s.frames for s in shares]
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
        "checkpoint_identity": checkpoint_identity(Path(spec.checkpoint)) if spec.checkpoint else None,
        "quality_reportable": weights != "random",
        "token_grid": vars(prepared.adapter_cls.token_grid(spec.sampling)),
        "environment": capture_environment(prepared.device),
        "latency": {
            "stages": stages,
            "denoise_total_ms_per_video": sum(step_seconds) * 1e3 / max(len(videos), 1),
            "end_to_end_ms_per_video": per_video * 1e3,
            "note": "per stage, each rank's first call is warm-up (in warmup_ms), the rest are the statistics; "
            "totals per video include every call",
        },
        "memory": {"peak_gib": max(peaks) if peaks else None},
        "density": density.summary(),
        "metrics": {},
        "artifacts": {"videos": videos, "frames": frames},
        "ranks": ranks,
        "wall_seconds": wall_seconds,
    }


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
