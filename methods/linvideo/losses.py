"""LinVideo's training objectives (reference/linvideo.md, sections 3 and 4), one function per equation.

Conventions: rectified flow with t = 1 noise, velocity u = eps - x0; ``r`` is the vector of per-layer
selective-transfer scores in [0, 1] (1 keeps softmax attention, 0 is pure linear attention).
"""

from __future__ import annotations

import torch

from harness.errors import HarnessError


def ste_round(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest integer in the forward pass; gradient 1 in the backward pass (straight-through)."""
    return x + (torch.round(x) - x).detach()


def constraint_loss(r: torch.Tensor, target: int) -> torch.Tensor:
    """Eq. 9 with the intended semantics: ``(sum_l round(1 - r_l) - target)^2``, ``target`` = layers to convert.

    ``r``: ``(layers,)``. The rounding is straight-through, so every r receives the same gradient
    ``-2 (count - target)``; which layers cross 0.5 first is decided by the task loss.
    """
    return (ste_round(1 - r).sum() - target) ** 2


def binarization_loss(r: torch.Tensor, alpha: float) -> torch.Tensor:
    """Eq. 10: ``sum_l 1 - |2 r_l - 1|^alpha``; 0 at r in {0, 1}, 1 at r = 0.5; ``r``: ``(layers,)``."""
    return (1 - (2 * r - 1).abs() ** alpha).sum()


def annealed_alpha(step: int, total_steps: int, start: float = 20.0, end: float = 2.0) -> float:
    """Alpha of L_reg at ``step`` (0-based), linear from ``start`` to ``end`` over the run (start == end: fixed)."""
    if total_steps < 1:
        raise HarnessError(f"total_steps must be >= 1, got {total_steps}")
    progress = min(max(step / max(total_steps - 1, 1), 0.0), 1.0)
    return start + (end - start) * progress


def adm_gradient(
    u_teacher: torch.Tensor, u_student: torch.Tensor, t: torch.Tensor, t_min: float = 0.02
) -> torch.Tensor:
    """Eq. 13: ``g = (1 - t)/t (u_teacher(x_hat) - u_student(x_hat))`` = -(s_t - s_hat_t), without gradient.

    ``u_*``: ``(B, C, F, H, W)`` velocities at the student's sample x_hat; ``t``: ``(B,)`` in (0, 1],
    clamped to ``t_min`` so that the weight (1 - t)/t stays finite near the data end.
    """
    t = t.clamp(min=t_min).view(-1, *([1] * (u_teacher.dim() - 1)))
    return ((1 - t) / t * (u_teacher - u_student)).detach()


def adm_loss(x_hat: torch.Tensor, g: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """The ADM surrogate ``0.5 ||x_hat - sg(x_hat - g)||^2``; it reaches the student only through x_hat.

    With ``reduction="sum"`` its gradient with respect to ``x_hat`` is exactly ``g`` (Eq. 12); ``"mean"``
    (the default, as DMD-style implementations reduce) divides that by the number of elements.
    """
    if reduction not in ("mean", "sum"):
        raise HarnessError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    squared = (x_hat - (x_hat - g).detach()) ** 2
    return 0.5 * (squared.mean() if reduction == "mean" else squared.sum())


def mse_loss(u_student: torch.Tensor, u_teacher: torch.Tensor) -> torch.Tensor:
    """Eq. 7: regress the stored teacher velocity at the same (x_t, t, prompt)."""
    return torch.nn.functional.mse_loss(u_student.float(), u_teacher.float())
