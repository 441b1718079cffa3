"""What ADM's update does along a training run (issue 20, E3): against MSE's, and where the student errs.

Three measurements (and the objective) on fixed stored states, taken with the trainer's student as it is at that
step (its attention method attached, as :meth:`LinVideoTrainer.run`'s ``on_step`` sees it):

- ``gradient_cosine``: the cosine between ADM's and MSE's gradients on the student's weights (transformer and
  feature maps) on the same states. ADM's step tends to a weighted MSE at x_s as its landing step shrinks; a low
  cosine says ADM moves the student elsewhere than towards the teacher's velocity at x_s.
- ``error_cosine``: per state, the cosine between the student's velocity errors (student - teacher) at s and at
  the landing time t (at x_hat), averaged. ADM corrects the student's velocity at s by its error at t; that
  corrects the error at s only while the two agree.
- ``limit_cosine``: the cosine between ADM's gradient and the gradient of the weighted MSE that ADM tends to as
  its landing step shrinks (:func:`limit_weights`). Near 1 at small kappa is the check that the pipeline computes
  the maths: ADM at kappa -> 0 is this weighted MSE, not plain MSE, unless the weights are equal.
- ``velocity_error``: per sampler time s (every step, the last one included), the student's relative velocity
  error ``||u_student(x_s) - u_teacher(x_s)|| / ||u_teacher(x_s)||`` over the states stored at s.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from methods.linvideo.losses import adm_limit_weights, landing_time
from methods.linvideo.train import guided_velocity, student_step, trajectory_objective

if TYPE_CHECKING:
    from methods.linvideo.collect import TrajectoryStore
    from methods.linvideo.train import LinVideoTrainer


def fixed_states(store: TrajectoryStore, states: int, prompts_per_step: int, seed: int = 0) -> dict[str, Any]:
    """The states every measurement of a run uses: ``states`` random ones, and the first ``prompts_per_step``
    prompts' states at every sampler time (``per_step``: time -> batch)."""
    batch = store.sample(states, torch.Generator().manual_seed(seed))
    per_step = {}
    for time in store.grid.flip(0).tolist():
        rows = torch.nonzero(store.tensors["t"] == time).flatten()[:prompts_per_step]
        part = {key: value[rows] for key, value in store.tensors.items()}
        part["cond"] = store.cond[part["prompt"]]
        per_step[time] = part
    return {"batch": batch, "per_step": per_step}


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()).clamp(min=1e-30))


def _weight_gradient(trainer: LinVideoTrainer, loss: torch.Tensor) -> torch.Tensor:
    params = [p for p in trainer.trained_weights() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat(
        [(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params, strict=True)]
    )


def _objective(trainer: LinVideoTrainer, batch: dict[str, torch.Tensor], objective: str = "") -> torch.Tensor:
    settings = replace(trainer.settings, objective=objective) if objective else trainer.settings
    with trainer.autocast():
        return trajectory_objective(trainer.student, trainer.teacher, batch, trainer.uncond, trainer.cfg, settings,
                                    trainer.score_model)  # fmt: skip


def gradient_cosine(trainer: LinVideoTrainer, batch: dict[str, torch.Tensor]) -> float:
    """Cosine between ADM's (the trainer's settings) and MSE's gradients on the student's weights."""
    adm = _weight_gradient(trainer, _objective(trainer, batch))
    return _cosine(adm, _weight_gradient(trainer, _objective(trainer, batch, "mse")))


def gradient_norms(trainer: LinVideoTrainer, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """Norms of ADM's (the trainer's settings) and MSE's gradients on the student's weights, before clipping: under
    Adam two parallel gradients train alike while both exceed the clip norm (each is scaled to it) or neither does."""
    return {name: float(_weight_gradient(trainer, _objective(trainer, batch, objective)).norm())
            for name, objective in (("adm", ""), ("mse", "mse"))}  # fmt: skip


def limit_weights(trainer: LinVideoTrainer, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-state weights ``(B,)`` of the MSE that ADM's gradient tends to as kappa -> 0 (trainer's settings;
    :func:`~methods.linvideo.losses.adm_limit_weights`)."""
    s = batch["t"].to(trainer.device)
    t = landing_time(s, batch["t_next"].to(trainer.device), trainer.settings.step_fraction, trainer.settings.t_min)
    return adm_limit_weights(s, t, batch["u"].to(trainer.device), trainer.settings.adm_weighting)


def limit_cosine(trainer: LinVideoTrainer, batch: dict[str, torch.Tensor]) -> float:
    """Cosine between ADM's gradient and that of the MSE weighted by :func:`limit_weights` (``mse-limit``; same
    states)."""
    adm = _weight_gradient(trainer, _objective(trainer, batch))
    return _cosine(adm, _weight_gradient(trainer, _objective(trainer, batch, "mse-limit")))


@torch.no_grad()
def error_cosine(trainer: LinVideoTrainer, batch: dict[str, torch.Tensor]) -> float:
    """Mean over states of the cosine between the student's velocity errors at x_s (time s) and at x_hat (time t)."""
    device, dtype = trainer.device, trainer.teacher.dtype
    cond = batch["cond"].to(device, dtype)
    with trainer.autocast():
        u_student, x_hat, t = student_step(trainer.student, batch, trainer.uncond, trainer.cfg, trainer.settings)
        x_s, s = batch["x"].to(device), batch["t"].to(device)
        error_s = u_student - guided_velocity(trainer.teacher, x_s, s, cond, trainer.uncond, trainer.cfg)
        error_t = guided_velocity(trainer.student, x_hat, t, cond, trainer.uncond, trainer.cfg) - guided_velocity(
            trainer.teacher, x_hat, t, cond, trainer.uncond, trainer.cfg
        )
    return sum(_cosine(a, b) for a, b in zip(error_s, error_t, strict=True)) / len(error_s)


@torch.no_grad()
def velocity_error(trainer: LinVideoTrainer, per_step: dict[float, dict[str, torch.Tensor]]) -> dict[str, float]:
    """The student's relative velocity error at every sampler time (keys: the time, 4 decimals)."""
    errors = {}
    for time, batch in per_step.items():
        x_s, s = batch["x"].to(trainer.device), batch["t"].to(trainer.device)
        cond = batch["cond"].to(trainer.device, trainer.teacher.dtype)
        with trainer.autocast():
            u_student = guided_velocity(trainer.student, x_s, s, cond, trainer.uncond, trainer.cfg)
            u_teacher = guided_velocity(trainer.teacher, x_s, s, cond, trainer.uncond, trainer.cfg)
        errors[f"{time:.4f}"] = float((u_student - u_teacher).double().norm() / u_teacher.double().norm())
    return errors


def measure(trainer: LinVideoTrainer, states: dict[str, Any]) -> dict[str, Any]:
    """The measurements on :func:`fixed_states`' states, and the trainer's objective on its batch."""
    with torch.no_grad(), trainer.autocast():
        objective = trajectory_objective(trainer.student, trainer.teacher, states["batch"], trainer.uncond,
                                         trainer.cfg, trainer.settings, trainer.score_model)  # fmt: skip
    return {
        "objective": float(objective),
        "gradient_cosine": gradient_cosine(trainer, states["batch"]),
        "limit_cosine": limit_cosine(trainer, states["batch"]),
        "error_cosine": error_cosine(trainer, states["batch"]),
        "velocity_error": velocity_error(trainer, states["per_step"]),
    }
