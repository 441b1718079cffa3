"""Fine-tuning a student DiT whose self-attention is a trainable method, on a teacher's trajectories.

The generic part of a trainable-attention method's training: a student copy of the teacher routed
through the method, the ADM or MSE objective on stored teacher states (LinVideo's losses, CFG-guided
velocities as at inference), AdamW with a warm-up + cosine schedule, gradient clipping, bf16
autocast on GPU, resumable checkpoints every K steps, a stop on a non-finite loss (the last good
checkpoint is kept) and a progress bar. A method's trainer subclasses :class:`AttentionFineTuner`
and gives its parameter groups, any extra loss terms, and how to write the finished checkpoint.
"""

from __future__ import annotations

import copy
import json
import math
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness.checkpoints import load_training_state, save_training_state
from harness.errors import HarnessError, check_choice
from harness.models.base import ModelAdapter
from harness.optim import warmup_cosine
from methods import build_method
from methods.base import AttentionMethod
from methods.linvideo.collect import TrajectoryStore
from methods.linvideo.train import ADM_WEIGHTINGS, ObjectiveSettings, trajectory_objective

OBJECTIVES = ("adm", "mse")
LOG_EVERY = 25  # steps between log lines when the progress bar is off


@dataclass(frozen=True)
class FineTuneSettings:
    """The loop's settings (a method's config carries them and adds its own)."""

    objective: str = "adm"
    steps: int = 400
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_fraction: float = 0.1
    grad_clip: float = 1.0
    t_min: float = 0.02
    adm_reduction: str = "mean"
    adm_weighting: str = "uniform"  # as LinVideo's default (reports/toy/linvideo_trials, round 3)
    activation_checkpointing: bool = False
    checkpoint_every: int = 100
    seed: int = 0

    def validate(self) -> None:
        check_choice("objective", self.objective, OBJECTIVES)
        check_choice("ADM weighting", self.adm_weighting, ADM_WEIGHTINGS)
        if self.steps < 1 or self.batch_size < 1 or self.checkpoint_every < 1:
            raise HarnessError("steps, batch size and checkpoint interval must be >= 1")
        if self.lr <= 0 or not 0.0 <= self.warmup_fraction < 1.0:
            raise HarnessError(f"need lr > 0 and 0 <= warmup_fraction < 1, got {self.lr}, {self.warmup_fraction}")


class AttentionFineTuner(ABC):
    """Trains ``student.transformer`` and the method's own modules; :meth:`run` trains or resumes into ``out``."""

    def __init__(self, settings: FineTuneSettings, config: dict[str, Any], teacher: ModelAdapter,
                 store: TrajectoryStore, out: Path, method: AttentionMethod) -> None:  # fmt: skip
        settings.validate()
        self.settings, self.config, self.teacher, self.store, self.out = settings, config, teacher, store, out
        self.method, self.device = method, teacher.device
        self.cfg = float(store.spec["sampling"]["cfg"])
        self.student = copy.copy(teacher)
        self.student.transformer = copy.deepcopy(teacher.transformer).requires_grad_(True).train()
        if settings.activation_checkpointing:
            self.student.transformer.enable_gradient_checkpointing()
        self.uncond = store.uncond.to(self.device, teacher.dtype)
        self.generator = torch.Generator().manual_seed(settings.seed)
        self._optimizer: torch.optim.Optimizer | None = None

    # -- what a method's trainer provides ----------------------------------------------------------

    @abstractmethod
    def method_modules(self) -> dict[str, nn.Module]:
        """The method's trainable modules by name (checkpointed beside the student)."""

    def param_groups(self) -> list[dict[str, Any]]:
        """AdamW groups (each with a ``name`` and its base ``lr``); default: everything at ``settings.lr``."""
        params = [*self.student.transformer.parameters()]
        for module in self.method_modules().values():
            params.extend(module.parameters())
        return [{"params": params, "lr": self.settings.lr, "name": "weights"}]

    def extra_losses(self, step: int) -> dict[str, torch.Tensor]:
        """Loss terms added to the objective (e.g. LinVideo's constraint and regulariser)."""
        return {}

    @abstractmethod
    def write_result(self, log: dict[str, Any]) -> Path:
        """Write the finished checkpoint into ``self.out`` and return it."""

    # -- the loop -----------------------------------------------------------------------------------

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        if self._optimizer is None:
            groups = self.param_groups()
            for group in groups:
                group["base_lr"] = group["lr"]
            self._optimizer = torch.optim.AdamW(groups, weight_decay=self.settings.weight_decay)
        return self._optimizer

    def modules(self) -> dict[str, nn.Module]:
        return {"student": self.student.transformer, **self.method_modules()}

    def objective(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """ADM (one student step from a stored state, scored by the teacher) or MSE on stored velocities."""
        settings = self.settings
        objective = ObjectiveSettings(settings.objective, settings.adm_weighting, settings.t_min,
                                      settings.adm_reduction)  # fmt: skip
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            return trajectory_objective(self.student, self.teacher, batch, self.uncond, self.cfg, objective)

    def run(self, show_progress: bool = True) -> Path:
        """Train to ``settings.steps`` (resuming a half-done run) and write the result."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        settings, out = self.settings, self.out
        out.mkdir(parents=True, exist_ok=True)
        meta = load_training_state(out, self.modules(), {"adamw": self.optimizer}, self.generator)
        if meta is not None and meta["config"] != json.loads(json.dumps(self.config)):
            raise HarnessError(
                f"{out} holds a training run with another config; use another --out or the same settings"
            )
        if meta is not None and meta["step"] >= settings.steps and meta.get("finished"):
            return out
        log: dict[str, Any] = meta or {"config": self.config, "step": 0, "seconds": 0.0, "losses": []}
        name = self.method.name
        columns = (TextColumn(f"[bold]{name}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"))
        started = time.time() - log["seconds"]
        warmup = max(1, round(settings.warmup_fraction * settings.steps))
        with (
            self.teacher.use_method(build_method("sdpa")),
            self.student.use_method(self.method),
            Progress(*columns, TimeRemainingColumn(), disable=not show_progress) as progress,
        ):
            task = progress.add_task("train", total=settings.steps, completed=log["step"], info="")
            while log["step"] < settings.steps:
                step = log["step"]
                for group in self.optimizer.param_groups:
                    group["lr"] = group["base_lr"] * warmup_cosine(step, warmup, settings.steps)
                terms = {"objective": self.objective(self.store.sample(settings.batch_size, self.generator)),
                         **self.extra_losses(step)}  # fmt: skip
                total = sum(terms.values(), torch.zeros((), device=self.device))
                values = {key: float(value.detach()) for key, value in {**terms, "total": total}.items()}
                if not all(math.isfinite(v) for v in values.values()):
                    raise HarnessError(f"non-finite loss at step {step} ({values}); last good checkpoint kept in {out}")
                self.optimizer.zero_grad(set_to_none=True)
                total.backward()
                torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]],
                                               settings.grad_clip)  # fmt: skip
                self.optimizer.step()
                log["step"] += 1
                log["losses"].append(values)
                info = " ".join(f"{key} {value:.4g}" for key, value in values.items())
                progress.update(task, advance=1, info=info)
                if not show_progress and (log["step"] % LOG_EVERY == 0 or log["step"] == settings.steps):
                    progress.console.print(f"step {log['step']}/{settings.steps}: {info}")
                if log["step"] % settings.checkpoint_every == 0 or log["step"] == settings.steps:
                    log["seconds"] = time.time() - started
                    save_training_state(out, self.modules(), {"adamw": self.optimizer}, self.generator, log)
        result = self.write_result(log)
        save_training_state(out, self.modules(), {"adamw": self.optimizer}, self.generator, {**log, "finished": True})
        return result
