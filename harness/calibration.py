"""``bench calibrate``: validate, load the teacher, search a method's plan on calibration prompts, save it.

Calibration prompts come from the model's training split (toy) or a prompt file, never from the
held-out prompts a run is scored on. The plan is written atomically as JSON and names the prompts,
seeds and sampling that produced it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from harness.errors import HarnessError, check_number
from harness.generate import initial_noise
from harness.io_checks import ensure_writable_file
from harness.models.base import MODELS
from harness.preflight import resolve_device, resolve_dtype
from harness.spec import Sampling
from methods import METHODS
from methods.base import Schedule

CALIBRATED_METHODS = ("dfa",)


@dataclass(frozen=True)
class CalibrationRequest:
    """What `bench calibrate` was asked for. ``prompts=None``: the model's training prompts."""

    method: str
    model: str
    weights: str
    out: Path
    threshold: float
    window: float
    prompt_count: int = 8
    prompts: tuple[str, ...] | None = None
    steps: int | None = None
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    dense_warmup_steps: int = 0
    dense_layers: tuple[int, ...] = ()
    show_progress: bool = True

    def __post_init__(self) -> None:
        check_number("--threshold", self.threshold, gt=0, hint="DFA's error bound delta")
        check_number("--window", self.window, gt=0, le=2, hint="a fraction of the tokens; 2 covers every key")
        check_number("--prompts", self.prompt_count, ge=1)
        if self.steps is not None:
            check_number("--steps", self.steps, ge=1)


def calibrate(request: CalibrationRequest) -> Path:
    """Search the plan and write it to ``request.out``; returns the path."""
    from methods.dfa import DfaPlan
    from methods.dfa_calibrate import calibrate as search

    method = METHODS.canonical(request.method)
    if method not in CALIBRATED_METHODS:
        raise HarnessError(f"bench calibrate supports {', '.join(CALIBRATED_METHODS)}, not {request.method!r}")
    adapter_cls = MODELS.get(request.model)
    defaults = adapter_cls.defaults
    sampling = Sampling(**{**asdict(defaults), "steps": request.steps or defaults.steps})
    adapter_cls.validate_sampling(sampling)
    schedule = Schedule(request.dense_warmup_steps, request.dense_layers)
    schedule.validate_for(adapter_cls.num_layers, sampling.steps)
    prompts = list(request.prompts or adapter_cls.training_prompts(request.prompt_count, request.seed))
    adapter_cls.validate_prompts([*prompts, sampling.negative_prompt])
    device, dtype = resolve_device(request.device), resolve_dtype(request.dtype)
    ensure_writable_file(request.out)

    model = adapter_cls.load(request.weights, device, dtype)
    seeds = list(range(request.seed, request.seed + len(prompts)))
    noise = torch.cat([initial_noise((1, *adapter_cls.latent_shape(sampling)), seed) for seed in seeds])
    with torch.inference_mode():
        cond = model.encode_prompts(prompts)
        uncond = model.encode_prompts([sampling.negative_prompt]) if sampling.cfg > 1.0 else None
    searched_layers = adapter_cls.num_layers - len(set(request.dense_layers))
    total = max(sampling.steps - max(1, request.dense_warmup_steps), 0) * searched_layers
    columns = (TextColumn(f"[bold]calibrate {method}"), BarColumn(), MofNCompleteColumn(), TextColumn("layer-steps"),
               TimeElapsedColumn())  # fmt: skip
    with Progress(*columns, disable=not request.show_progress) as progress:
        task = progress.add_task("calibrate", total=total)
        plan = search(model, noise, cond, uncond, sampling, request.threshold, request.window, schedule,
                      on_layer=lambda: progress.advance(task))  # fmt: skip
    plan = DfaPlan(**{**asdict(plan), "model": MODELS.canonical(request.model), "calibration": {
        **plan.calibration, "prompts": prompts, "seeds": seeds, "sampling": asdict(sampling),
        "weights": request.weights, "device": str(device), "dtype": str(dtype).removeprefix("torch.")}})  # fmt: skip
    plan.save(request.out.expanduser())
    return request.out.expanduser()
