"""``bench train``: validate, collect the teacher's trajectories (resumable), train, write a converted checkpoint.

:func:`default_checkpoint` is the same training with the default recipe, run once per built-in teacher and
cached, for ``bench run --method linvideo`` on the toy model without ``--checkpoint``.

Everything that needs no weights is checked first (model, method, target layers, objective, kernel,
output folder); the trajectory store lives in ``OUT/trajectories`` unless named, and is reused by
every run trained from the same collection spec.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from harness.errors import HarnessError
from harness.io_checks import ensure_writable_dir
from harness.models.base import MODELS
from harness.preflight import resolve_device

if TYPE_CHECKING:
    from harness.models.base import ModelAdapter
    from methods.linvideo.collect import TrajectoryStore
    from methods.linvideo.train import LinVideoTrainConfig
    from methods.sla_train import SlaTrainConfig


@dataclass(frozen=True)
class TrainRequest:
    """What `bench train` was asked for; the teacher samples with the model's defaults, the grid's steps and shift
    as asked."""

    model: str
    weights: str
    config: LinVideoTrainConfig | SlaTrainConfig
    out: Path
    prompts: tuple[str, ...] | None  # None: the model's training prompts
    prompt_count: int
    device: str
    store: Path | None = None
    show_progress: bool = True
    # The teacher's sampler grid for the trajectories (None: the model's default, e.g. Wan's 50 steps at shift 5).
    sampler_steps: int | None = None
    sampler_shift: float | None = None
    collect_batch: int = 16  # prompts the teacher samples at once while collecting (a real model's clips: 1-2)


def train(request: TrainRequest) -> Path:
    """Run a LinVideo (or SLA) training from a request; returns the checkpoint folder."""
    from harness.distributed import current_ranks, rank_group
    from methods.linvideo.train import LinVideoTrainer
    from methods.sla_train import SlaTrainConfig, SlaTrainer

    ranks = current_ranks()
    # One process group for the collection (the ranks share its shards) and the training that follows; on cuda:N
    # (a training dealt onto one GPU of several by bench ablate --jobs) that GPU is the current one.
    with rank_group(ranks, resolve_device(request.device)):
        teacher, store = collect_trajectories(request)
        trainer = SlaTrainer if isinstance(request.config, SlaTrainConfig) else LinVideoTrainer
        return trainer(request.config, teacher, store, request.out).run(request.show_progress)


# A run diverged when its last DIVERGENCE_WINDOW steps' median objective is DIVERGENCE_RATIO times the lowest such
# median after the first tenth: of 89 toy LinVideo trainings (reports/toy/linvideo_trials), every one whose objective
# blew up (its clips, where sampled, noise) ended 28-1,800x above its low, every other one at most 11x.
DIVERGENCE_WINDOW, DIVERGENCE_RATIO = 50, 20.0


def divergence_note(objective: Sequence[float]) -> str | None:
    """A note when training diverged without a non-finite loss (which stops it), from the per-step objective values
    (any unit); None for a run that did not, or one shorter than two windows plus a tenth."""
    skip = len(objective) // 10
    if len(objective) - skip < 2 * DIVERGENCE_WINDOW:
        return None
    medians = [statistics.median(objective[end - DIVERGENCE_WINDOW : end])
               for end in range(skip + DIVERGENCE_WINDOW, len(objective) + 1)]  # fmt: skip
    low, last = min(medians), medians[-1]
    if last < DIVERGENCE_RATIO * low:
        return None
    return (f"the objective diverged: its median over the last {DIVERGENCE_WINDOW} steps is {last:.3g}, "
            f"{last / low:.0f}x its lowest ({low:.3g}); the converted model is likely noise. A smaller --lr or fewer "
            "--steps keeps it stable (LinVideo's ADM on the toy diverged once the weights' lr summed over the steps "
            "reached 0.007-0.014)")  # fmt: skip


def train_command(method: str, model: str) -> str:
    """The `bench train` command that makes a ``method`` checkpoint of ``model``, as an error message quotes it:
    LinVideo also needs --target-layers, a model without built-in training prompts --prompt-file."""
    options = [f"--method {method}", f"--model {model}"]
    if method == "linvideo":
        options.append("--target-layers K")
    try:
        MODELS.get(model).training_prompts(1, 0)
    except HarnessError:
        options.append("--prompt-file FILE")
    return f"`bench train {' '.join(options)} --out DIR`"


def collect_trajectories(request: TrainRequest) -> tuple[ModelAdapter, TrajectoryStore]:
    """Validate the request, make its output folder, load the teacher and fill (or reuse) its trajectory store."""
    from methods.linvideo.collect import CollectionSpec, collect

    adapter_cls = MODELS.get(request.model)
    config = request.config
    config.validate(adapter_cls.num_layers)
    grid = {"steps": request.sampler_steps, "shift": request.sampler_shift}
    sampling = replace(adapter_cls.defaults, **{key: value for key, value in grid.items() if value is not None})
    sampling.validate()
    if request.prompt_count < 1 or request.collect_batch < 1:
        raise HarnessError(f"--prompts and --collect-batch must be >= 1, got {request.prompt_count} and "
                           f"{request.collect_batch}")  # fmt: skip
    prompts = request.prompts or adapter_cls.training_prompts(request.prompt_count, config.seed)
    adapter_cls.validate_prompts([*prompts, sampling.negative_prompt])
    device = resolve_device(request.device)
    ensure_writable_dir(request.out)
    store_dir = ensure_writable_dir(request.store or request.out / "trajectories")
    spec = CollectionSpec(MODELS.canonical(request.model), request.weights, sampling, tuple(prompts),
                          tuple(range(len(prompts))), batch_size=min(len(prompts), request.collect_batch))  # fmt: skip
    # fp32 master weights: the trainer runs the student under bf16 autocast on CUDA.
    teacher = adapter_cls.load(request.weights, device, torch.float32)
    from harness.distributed import current_ranks

    return teacher, collect(teacher, spec, store_dir, request.show_progress, current_ranks())


CACHE_ENV = "ATTENTION_BENCH_CACHE"
DEFAULT_PROMPT_COUNT = 64  # training prompts of the default conversion's trajectory store


def default_recipe(num_layers: int) -> LinVideoTrainConfig:
    """The default conversion: half of the layers, every other setting at LinVideoTrainConfig's default (the toy
    recipe)."""
    from methods.linvideo.train import LinVideoTrainConfig

    return LinVideoTrainConfig(target_layers=num_layers // 2)


def cache_dir() -> Path:
    """Where trained defaults are cached: ``$ATTENTION_BENCH_CACHE``, else ``~/.cache/attention-bench``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "attention-bench").expanduser()


def default_checkpoint(model: str, device: str, show_progress: bool = True) -> Path:
    """The default LinVideo conversion of a built-in teacher (half of its layers, the default recipe).

    Named by the recipe and the teacher's sha256: the conversion shipped beside the toy teacher when the
    name matches, else trained on first use and cached under :func:`cache_dir`, so a new teacher or
    recipe trains anew; an interrupted training resumes.
    """
    from harness.checkpoints import file_sha256
    from harness.toyworld.checkpoint import SHIPPED_CHECKPOINT, SHIPPED_CONVERSIONS

    adapter_cls = MODELS.get(model)
    if adapter_cls.weights_kind != "builtin":
        raise HarnessError(
            f"linvideo on {model!r} needs a converted checkpoint: make one with {train_command('linvideo', model)}, "
            "then pass --checkpoint DIR"
        )
    config = default_recipe(adapter_cls.num_layers)
    identity = json.dumps({"config": config.record(), "prompts": DEFAULT_PROMPT_COUNT,
                           "teacher": file_sha256(SHIPPED_CHECKPOINT)}, sort_keys=True)  # fmt: skip
    name = f"{MODELS.canonical(model)}-{hashlib.sha256(identity.encode()).hexdigest()[:12]}"
    shipped, out = SHIPPED_CONVERSIONS / name, cache_dir() / "linvideo" / name
    for folder in (shipped, out):
        if (folder / "spec.json").is_file():
            return folder
    request = TrainRequest(model=MODELS.canonical(model), weights="builtin", config=config, out=out, prompts=None,
                           prompt_count=DEFAULT_PROMPT_COUNT, device=device, show_progress=show_progress)  # fmt: skip
    return train(request)
