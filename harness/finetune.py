"""Fine-tuning a student DiT whose self-attention is a trainable method, on a teacher's trajectories.

The generic part of a trainable-attention method's training, as a task of :mod:`harness.train`: a student
copy of the teacher routed through the method, the ADM or MSE objective on stored teacher states
(LinVideo's losses, CFG-guided velocities as at inference), AdamW with a warm-up + cosine schedule. The
engine runs the loop (clipping, bf16 autocast on GPU, gradient accumulation, resumable checkpoints, the stop
on a non-finite loss, progress; FSDP2 under torchrun with the teacher frozen in bf16). A method's trainer
subclasses :class:`AttentionFineTuner` and gives its modules, parameter groups, any extra loss terms, and how
to write the finished checkpoint.
"""

from __future__ import annotations

import copy
from abc import abstractmethod
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness.errors import check_choice, check_number
from harness.models.base import ModelAdapter
from harness.train import engine
from harness.train.config import EngineConfig
from harness.train.engine import Run
from harness.train.task import Group, Modules, Shard, Task
from methods import build_method
from methods.base import AttentionMethod
from methods.linvideo.collect import TrajectoryStore
from methods.linvideo.train import ADM_WEIGHTINGS, ObjectiveSettings, trajectory_objective

OBJECTIVES = ("adm", "mse")


@dataclass(frozen=True)
class FineTuneSettings(EngineConfig):
    """The loop's settings (a method's config carries them and adds its own)."""

    objective: str = "adm"
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_fraction: float = 0.1
    t_min: float = 0.02
    adm_reduction: str = "mean"
    adm_weighting: str = "uniform"  # as LinVideo's default (reports/toy/linvideo_trials, round 3)

    def validate(self) -> None:
        super().validate()
        check_choice("objective", self.objective, OBJECTIVES)
        check_choice("ADM weighting", self.adm_weighting, ADM_WEIGHTINGS)
        check_number("lr", self.lr, gt=0)
        check_number("weight decay", self.weight_decay, ge=0)
        check_number("warmup fraction", self.warmup_fraction, ge=0, lt=1)
        check_number("t_min", self.t_min, gt=0, lt=1)

    def warmup_steps(self) -> int:
        return max(1, round(self.warmup_fraction * self.steps))


class StoreBatches:
    """One data shard's batches: stored teacher states drawn with the shard's (CPU) generator (``jump``:
    :meth:`TrajectoryStore.sample`'s)."""

    def __init__(self, store: TrajectoryStore, batch_size: int, generator: torch.Generator,
                 jump: str = "next") -> None:  # fmt: skip
        self.store, self.batch_size, self.generator, self.jump = store, batch_size, generator, jump

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        return self.store.sample(self.batch_size, self.generator, jump=self.jump)


class AttentionFineTuner(Task):
    """Trains ``student.transformer`` and the method's own modules; :meth:`run` trains or resumes into ``out``."""

    generator_device = torch.device("cpu")  # the store lives in host memory

    def __init__(self, settings: FineTuneSettings, teacher: ModelAdapter, store: TrajectoryStore, out: Path,
                 method: AttentionMethod) -> None:  # fmt: skip
        settings.validate()
        self.config, self.teacher, self.store, self.out = settings, teacher, store, out
        self.method, self.device, self.name = method, teacher.device, method.name
        self.cfg = float(store.spec["sampling"]["cfg"])
        self.log: dict[str, Any] = {}

    # -- what a method's trainer provides ----------------------------------------------------------

    @abstractmethod
    def method_modules(self) -> dict[str, nn.Module]:
        """The method's trainable modules by name (replicated on every rank, checkpointed beside the student)."""

    def param_groups(self) -> list[Group]:
        """One AdamW group of student and method modules at ``config.lr``; a trainer may split it."""
        params = [*self.student.transformer.parameters()]
        for module in self.method_modules().values():
            params.extend(module.parameters())
        return [Group("adamw", params, self.config.lr, self.config.warmup_steps(),
                      weight_decay=self.config.weight_decay)]  # fmt: skip

    def extra_losses(self, step: int) -> dict[str, torch.Tensor]:
        """Loss terms added to the objective (e.g. LinVideo's constraint and regulariser)."""
        return {}

    @abstractmethod
    def finish(self, run: Run) -> Path:
        """Write the finished checkpoint into ``self.out`` (gather on every rank, write on the lead); return it."""

    # -- the task ------------------------------------------------------------------------------------

    def build(self, device: torch.device) -> Modules:
        self.student = copy.copy(self.teacher)
        self.student.transformer = copy.deepcopy(self.teacher.transformer).requires_grad_(True).train()
        self.uncond = self.store.uncond.to(device, self.teacher.dtype)
        return Modules(sharded={"student": self.student.transformer}, replicated=self.method_modules(),
                       frozen={"teacher": self.teacher.transformer})  # fmt: skip

    def data(self, shard: Shard, step: int) -> StoreBatches:
        return StoreBatches(self.store, self.config.batch_size, shard.generator)

    def losses(self, batch: dict[str, torch.Tensor], shard: Shard, step: int) -> dict[str, torch.Tensor]:
        """ADM (one student step from a stored state, scored by the teacher) or MSE on stored velocities."""
        config = self.config
        objective = ObjectiveSettings(config.objective, config.adm_weighting, config.t_min, config.adm_reduction)
        terms = trajectory_objective(self.student, self.teacher, batch, self.uncond, self.cfg, objective)
        return {"objective": terms, **self.extra_losses(step)}

    def session(self) -> AbstractContextManager[Any]:
        stack = ExitStack()
        stack.enter_context(self.teacher.use_method(build_method("sdpa")))
        stack.enter_context(self.student.use_method(self.method))
        return stack

    def run(self, show_progress: bool = True) -> Path:
        """Train to ``config.steps`` (resuming a half-done run) and write the result."""
        return engine.run(self, show_progress)
