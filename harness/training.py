"""``bench train``: validate, collect the teacher's trajectories (resumable), train, write a converted checkpoint.

Everything that needs no weights is checked first (model, method, target layers, objective, kernel,
output folder); the trajectory store lives in ``OUT/trajectories`` unless named, and is reused by
every run trained from the same collection spec.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from harness.errors import HarnessError
from harness.generate import resolve_device, resolve_dtype
from harness.io_checks import ensure_writable_dir
from harness.models.base import MODELS
from harness.spec import Sampling


@dataclass(frozen=True)
class TrainRequest:
    """What `bench train` was asked for; ``config`` is a ``LinVideoTrainConfig``."""

    model: str
    weights: str
    config: object
    out: Path
    prompts: tuple[str, ...] | None  # None: the model's training prompts
    prompt_count: int
    sampling: Sampling | None  # None: the model's defaults
    device: str
    dtype: str
    store: Path | None = None
    show_progress: bool = True


def train(request: TrainRequest) -> Path:
    """Run a LinVideo training from a request; returns the converted checkpoint folder."""
    from methods.linvideo.collect import CollectionSpec, collect
    from methods.linvideo.train import LinVideoTrainConfig, LinVideoTrainer

    adapter_cls = MODELS.get(request.model)
    config = request.config
    if not isinstance(config, LinVideoTrainConfig):
        raise HarnessError("bench train supports --method linvideo only")
    config.validate(adapter_cls.num_layers)
    sampling = request.sampling or adapter_cls.defaults
    adapter_cls.validate_sampling(sampling)
    if request.prompt_count < 1:
        raise HarnessError(f"--prompts must be >= 1, got {request.prompt_count}")
    prompts = request.prompts or adapter_cls.training_prompts(request.prompt_count, config.seed)
    adapter_cls.validate_prompts([*prompts, sampling.negative_prompt])
    device, dtype = resolve_device(request.device), resolve_dtype(request.dtype)
    out = ensure_writable_dir(request.out)
    store_dir = ensure_writable_dir(request.store or out / "trajectories")
    spec = CollectionSpec(MODELS.canonical(request.model), request.weights, sampling, tuple(prompts),
                          tuple(range(len(prompts))), batch_size=min(len(prompts), 16))  # fmt: skip
    teacher = adapter_cls.load(request.weights, device, dtype)
    store = collect(teacher, spec, store_dir, request.show_progress)
    return LinVideoTrainer(config, teacher, store, out).run(request.show_progress)
