"""``bench ablate AXIS...``: train, sample, score and record every variant of LinVideo ablation axes.

A variant is a ``LinVideoTrainConfig`` that differs from the default recipe along one axis (the
paper's ablations: alpha range, kernel, objective, layer selection, number of converted layers; and
ours: the optimizer of the scores r).
Each distinct configuration is trained once into ``train_dir/linvideo-<config hash>`` from one shared
trajectory store, then sampled on the model's held-out prompts like ``bench run --method linvideo
--checkpoint`` and scored (``--jobs N`` trains, then samples, N at a time in their own processes, dealt
over every visible GPU: the toy model is launch-bound, so one GPU runs several). Its record lists every
(axis, variant) it stands for (the default recipe belongs to every axis) and the training summary. A
half-done sweep resumes: training resumes from its checkpoints and finished runs are skipped.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import multiprocessing
import os
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.distributed import visible_gpus
from harness.errors import HarnessError
from harness.records import write_record

if TYPE_CHECKING:
    from harness.training import TrainRequest

AXES = ("alpha", "kernel", "objective", "selection", "target", "r-optimizer")
PAPER_AXES = ("alpha", "kernel", "objective", "selection", "target")  # what `bench ablate all` runs
ALPHA_RANGES = ((20.0, 2.0), (16.0, 4.0), (24.0, 1.0), (4.0, 4.0))


def _alpha_label(start: float, end: float) -> str:
    return f"fixed {start:g}" if start == end else f"{start:g}->{end:g}"


def variants(axis: str, num_layers: int, target: int) -> dict[str, dict[str, Any]]:
    """The configuration changes of every variant of ``axis`` (label -> changes to the default recipe)."""
    if axis == "alpha":
        return {_alpha_label(a, b): {"alpha_start": a, "alpha_end": b} for a, b in ALPHA_RANGES}
    if axis == "kernel":
        return {kernel: {"kernel": kernel} for kernel in ("hedgehog", "relu", "taylor", "elu")}
    if axis == "objective":
        return {objective: {"objective": objective} for objective in ("adm", "mse", "adm-extra-score")}
    if axis == "selection":
        # manual: the shallow layers after the first (the paper keeps layer 1 softmax), as a fixed rule.
        manual = {"selection": "manual", "layers": tuple(range(1, target + 1))}
        return {"learned": {}, "heuristic": {"selection": "heuristic"}, "manual": manual}
    if axis == "target":
        counts = sorted({max(1, num_layers // 4), num_layers // 2, 3 * num_layers // 4})
        return {str(count): {"target_layers": count} for count in counts}
    if axis == "r-optimizer":
        # Not a paper ablation: the paper does not name r's optimizer; this shows why the default is SGD.
        return {"sgd": {}, "adamw (lr 1e-2)": {"r_optimizer": "adamw", "r_lr": 1e-2}}
    close = difflib.get_close_matches(axis, list(AXES), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise HarnessError(f"unknown ablation axis {axis!r}.{hint} Choose one of: {', '.join(AXES)}")


def _config_hash(config: Any) -> str:
    import hashlib

    canonical = json.dumps(config.record(), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def _r_trajectory(log_path: Path, points: int = 200) -> list[dict[str, Any]]:
    """Every layer's r along training, at most ``points`` steps (evenly spaced, the last one kept)."""
    from methods.linvideo.train import r_history

    history = r_history(json.loads(log_path.read_text()))
    stride = max(1, -(-len(history) // points))
    steps = sorted({*range(0, len(history), stride), len(history) - 1})
    return [{"step": step + 1, "r": history[step]} for step in steps]


def _training_summary(checkpoint: Path, concurrent_jobs: int) -> dict[str, Any]:
    """What an ablation record keeps of its training: layers, final r, cost, and every layer's r over time."""
    summary = json.loads((checkpoint / "spec.json").read_text())
    training = {key: summary[key] for key in ("linear_layers", "final_r", "steps", "train_seconds",
                                               "seconds_per_step", "selection")}  # fmt: skip
    if "score_seconds_per_step" in summary:  # adm-extra-score: its score model's updates, within each step
        training["score_seconds_per_step"] = summary["score_seconds_per_step"]
    return {**training, "concurrent_jobs": concurrent_jobs,
            "r_per_step": _r_trajectory(checkpoint / "training_state.json")}  # fmt: skip


def expand_axes(axes: tuple[str, ...]) -> tuple[str, ...]:
    """``all`` stands for the paper's five axes; duplicates are dropped, the order kept."""
    expanded = [name for axis in axes for name in (PAPER_AXES if axis == "all" else (axis,))]
    return tuple(dict.fromkeys(expanded))


@dataclass
class Variant:
    """One distinct training configuration and every (axis, variant label, order) it stands for."""

    config: Any  # LinVideoTrainConfig
    folder: Path
    memberships: list[dict[str, Any]] = field(default_factory=list)


def plan(axes: tuple[str, ...], base: Any, num_layers: int, train_dir: Path) -> list[Variant]:
    """The distinct configurations of ``axes`` (validated), each named by its hash under ``train_dir``."""
    planned: dict[str, Variant] = {}
    for axis in expand_axes(axes):
        for order, (label, changes) in enumerate(variants(axis, num_layers, base.target_layers).items()):
            config = dataclasses.replace(base, **changes)
            config.validate(num_layers)
            key = _config_hash(config)
            variant = planned.setdefault(key, Variant(config, train_dir / f"linvideo-{key}"))
            variant.memberships.append({"axis": axis, "variant": label, "order": order})
    return list(planned.values())


@dataclass(frozen=True)
class AblationRequest:
    axes: tuple[str, ...]
    model: str
    base: Any  # the LinVideoTrainConfig every variant starts from
    runs_dir: Path
    train_dir: Path
    device: str
    prompt_count: int
    show_progress: bool = True
    jobs: int = 1  # trainings at a time, each in its own process


def _train_in_worker(request: TrainRequest, threads: int) -> Path:
    """One training in a pool process: its share of the CPU threads, no progress bar of its own."""
    import torch

    from harness.training import train

    torch.set_num_threads(threads)
    return train(dataclasses.replace(request, show_progress=False))


def _run_in_worker(spec: Any, runs_dir: Path, gpu: int | None, concurrent: int, threads: int) -> Any:
    """One sampling (``bench run`` of ``spec``) in a pool process, on visible GPU ``gpu`` (None: where the spec
    says), beside up to ``concurrent`` - 1 others, with its share of the CPU threads and no progress bar; returns
    its RunOutcome."""
    import torch

    from harness.generate import run

    torch.set_num_threads(threads)
    if gpu is not None:
        torch.cuda.set_device(gpu)  # the spec keeps its bare "cuda": the run's identity does not depend on the GPU
    return run(spec, runs_dir, show_progress=False, concurrent_runs=concurrent)


def _in_pool(worker: Any, calls: list[tuple[Any, ...]], jobs: int, description: str,
             show_progress: bool) -> Iterator[tuple[int, Any]]:  # fmt: skip
    """``worker(*call, threads)`` for every call, ``jobs`` at a time in spawned processes (CUDA cannot be used from a
    forked one), each with its share of the CPU threads; yields ``(index of the call, its result)`` as each
    finishes, so that a caller keeps what finished before a failure. On a failure (or when the caller stops) the
    calls not yet started are cancelled."""
    from rich.progress import Progress

    threads = max(1, (os.cpu_count() or 1) // jobs)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool, Progress(disable=not show_progress) as bar:
        futures = {pool.submit(worker, *call, threads): index for index, call in enumerate(calls)}
        task = bar.add_task(f"{description}, {jobs} at a time", total=len(calls))
        try:
            for future in as_completed(futures):
                yield futures[future], future.result()
                bar.advance(task)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def spread_over_gpus(requests: list[TrainRequest]) -> list[TrainRequest]:
    """The requests on a bare ``cuda`` (or ``auto``) dealt round-robin over every visible GPU (``cuda:N``); others
    unchanged. A launch-bound toy training keeps one GPU busy only in part, so concurrent ones use them all."""
    gpus = visible_gpus(requests[0].device) if requests else []
    if not gpus:
        return requests
    return [dataclasses.replace(request, device=f"cuda:{gpus[index % len(gpus)]}")
            for index, request in enumerate(requests)]  # fmt: skip


def train_all(requests: list[TrainRequest], jobs: int, show_progress: bool = True) -> list[Path]:
    """Train every request (``jobs`` at a time, in spawned processes when > 1); returns their checkpoints.

    The trajectory store they share is filled first, here, so that no two processes write it.
    """
    from harness.training import collect_trajectories, train

    if jobs < 1:
        raise HarnessError(f"--jobs must be >= 1, got {jobs}")
    if jobs == 1 or len(requests) < 2:
        return [train(request) for request in requests]
    collect_trajectories(requests[0])
    calls = [(request,) for request in spread_over_gpus(requests)]
    checkpoints = dict(_in_pool(_train_in_worker, calls, jobs, f"train {len(requests)} variants", show_progress))
    return [checkpoints[index] for index in range(len(calls))]


def sample_all(specs: list[Any], runs_dir: Path, jobs: int, show_progress: bool = True) -> Iterator[tuple[int, Any]]:
    """``bench run`` every spec into ``runs_dir`` (``jobs`` at a time, in spawned processes when > 1, dealt
    round-robin over every visible GPU for a bare ``cuda``); yields ``(index of the spec, its RunOutcome)`` as each
    finishes, finished runs skipped. The toy's sampling is launch-bound like its training: one at a time, a sweep's
    15 took ~10 minutes on an H200. Runs sampled side by side time each other's contention: each such record says
    so in its one write (``latency.concurrent_runs``), and reports leave its times out."""
    from harness.generate import run

    if jobs == 1 or len(specs) < 2:
        for index, spec in enumerate(specs):
            yield index, run(spec, runs_dir, show_progress=show_progress)
        return
    gpus = visible_gpus(specs[0].device)
    # At most this many ran at once (some may be finished runs, skipped): a run that in fact ran alone loses its
    # times, never the other way round.
    concurrent = min(jobs, len(specs))
    calls = [(spec, runs_dir, gpus[index % len(gpus)] if gpus else None, concurrent)
             for index, spec in enumerate(specs)]  # fmt: skip
    yield from _in_pool(_run_in_worker, calls, jobs, f"sample {len(specs)} runs", show_progress)


def _weights(model: str) -> str:
    from harness.models.base import MODELS

    return "builtin" if MODELS.get(model).weights_kind == "builtin" else ""


def _spec(request: AblationRequest, method: str, params: dict[str, Any], checkpoint: Path | None = None) -> Any:
    """The run that samples and scores the model's held-out prompts (seed 0) with one method."""
    from harness.models.base import MODELS
    from harness.spec import RunSpec

    adapter_cls = MODELS.get(request.model)
    return RunSpec(model=request.model, method=method, sampling=adapter_cls.defaults,
                   prompts=adapter_cls.default_prompts(), seeds=(0,), device=request.device, dtype="float32",
                   weights=_weights(request.model), method_params=params,
                   checkpoint=None if checkpoint is None else str(checkpoint),
                   eval_suites=adapter_cls.default_eval)  # fmt: skip


def _preflight(request: AblationRequest) -> None:
    """What would stop a sweep after hours of training, checked first: a model without a prompt world (ablate
    has no --prompt-file: every variant trains and is scored on the model's own prompts) and the two folders."""
    from harness.io_checks import ensure_writable_dir
    from harness.models.base import MODELS
    from harness.training import train_command

    if not _has_prompt_world(MODELS.get(request.model)):
        usable = [name for name in MODELS.names() if _has_prompt_world(MODELS.get(name))]
        raise HarnessError(
            f"bench ablate trains and scores every variant on the model's own prompts; {request.model} has none "
            f"(models with them: {', '.join(usable)}); to convert it on your prompts, train each variant with "
            f"{train_command('linvideo', request.model)}"
        )
    ensure_writable_dir(request.train_dir)
    ensure_writable_dir(request.runs_dir)


def _has_prompt_world(adapter_cls: Any) -> bool:
    """Built-in training prompts and a default metric suite (the toy's prompt grammar and ToyBench)."""
    try:
        adapter_cls.training_prompts(1, 0)
    except HarnessError:
        return False
    return bool(adapter_cls.default_eval)


def ablate(request: AblationRequest) -> list[dict[str, Any]]:
    """Run every variant of the axes and the dense and untrained-linear references; returns the variants'
    records (with ``ablation`` and ``training``)."""
    from harness.models.base import MODELS
    from harness.training import TrainRequest

    _preflight(request)
    planned = plan(request.axes, request.base, MODELS.get(request.model).num_layers, request.train_dir)
    checkpoints = train_all([
        TrainRequest(model=request.model, weights=_weights(request.model), config=variant.config, out=variant.folder,
                     prompts=None, prompt_count=request.prompt_count, device=request.device,
                     store=request.train_dir / "trajectories", show_progress=request.show_progress)
        for variant in planned
    ], request.jobs, request.show_progress)  # fmt: skip
    # Dense, and untrained linear attention on the default recipe's linear layers, sampled in the variants' cohort:
    # every table then shows what training bought.
    specs = [_spec(request, "linvideo", {"kernel": variant.config.kernel}, checkpoint)
             for variant, checkpoint in zip(planned, checkpoints, strict=True)]  # fmt: skip
    specs.append(_spec(request, "sdpa", {}))
    default = next((c for v, c in zip(planned, checkpoints, strict=True) if v.config == request.base), None)
    layers = [] if default is None else json.loads((default / "spec.json").read_text())["linear_layers"]
    if layers:
        specs.append(_spec(request, "linear", {"layers": ",".join(map(str, layers)), "kernel": request.base.kernel}))
    records: list[dict[str, Any]] = [{} for _ in planned]
    for index, outcome in sample_all(specs, request.runs_dir, request.jobs, request.show_progress):
        if index < len(planned):  # labelled as it finishes: an interrupted sweep keeps every finished variant's
            records[index] = _labelled(outcome, planned[index], checkpoints[index], min(request.jobs, len(planned)))
    return records


def _labelled(outcome: Any, variant: Variant, checkpoint: Path, concurrent_jobs: int) -> dict[str, Any]:
    """A variant's run record with every (axis, variant) it stands for and its training summary, written back
    when either is new (a record from an earlier sweep keeps the memberships it had)."""
    record = outcome.record
    known = record.get("ablation", []) if outcome.skipped else []
    memberships = known + [m for m in variant.memberships if m not in known]
    if "training" not in record or memberships != known:
        training = record.get("training") or _training_summary(checkpoint, concurrent_jobs)
        record = {**record, "ablation": memberships, "training": training}
        write_record(outcome.path, record)
    return record
