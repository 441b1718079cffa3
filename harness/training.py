"""``bench train``: validate, collect the teacher's trajectories (resumable), train, write a converted checkpoint.

Everything that needs no weights is checked first (model, method, target layers, objective, kernel,
output folder); the trajectory store lives in ``OUT/trajectories`` unless named, and is reused by
every run trained from the same collection spec.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from harness.errors import HarnessError
from harness.generate import resolve_device
from harness.io_checks import ensure_writable_dir
from harness.models.base import MODELS

if TYPE_CHECKING:
    from methods.linvideo.train import LinVideoTrainConfig
    from methods.sla_train import SlaTrainConfig


@dataclass(frozen=True)
class TrainRequest:
    """What `bench train` was asked for; the teacher samples with the model's default settings."""

    model: str
    weights: str
    config: LinVideoTrainConfig | SlaTrainConfig
    out: Path
    prompts: tuple[str, ...] | None  # None: the model's training prompts
    prompt_count: int
    device: str
    store: Path | None = None
    show_progress: bool = True


def train(request: TrainRequest) -> Path:
    """Run a LinVideo (or SLA) training from a request; returns the checkpoint folder."""
    from methods.linvideo.collect import CollectionSpec, collect
    from methods.linvideo.train import LinVideoTrainer
    from methods.sla_train import SlaTrainConfig, SlaTrainer

    adapter_cls = MODELS.get(request.model)
    config = request.config
    config.validate(adapter_cls.num_layers)
    sampling = adapter_cls.defaults
    if request.prompt_count < 1:
        raise HarnessError(f"--prompts must be >= 1, got {request.prompt_count}")
    prompts = request.prompts or adapter_cls.training_prompts(request.prompt_count, config.seed)
    adapter_cls.validate_prompts([*prompts, sampling.negative_prompt])
    device = resolve_device(request.device)
    out = ensure_writable_dir(request.out)
    store_dir = ensure_writable_dir(request.store or out / "trajectories")
    spec = CollectionSpec(MODELS.canonical(request.model), request.weights, sampling, tuple(prompts),
                          tuple(range(len(prompts))), batch_size=min(len(prompts), 16))  # fmt: skip
    # fp32 master weights: the trainer runs the student under bf16 autocast on CUDA.
    teacher = adapter_cls.load(request.weights, device, torch.float32)
    store = collect(teacher, spec, store_dir, request.show_progress)
    if isinstance(config, SlaTrainConfig):
        return SlaTrainer(config, teacher, store, out).run(request.show_progress)
    return LinVideoTrainer(config, teacher, store, out).run(request.show_progress)
