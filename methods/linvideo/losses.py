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


def annealed_alpha(
    step: int, total_steps: int, start: float = 20.0, end: float = 2.0, anneal_fraction: float = 1.0
) -> float:
    """Alpha of L_reg at ``step`` (0-based): linear from ``start`` to ``end`` over the first ``anneal_fraction``
    of the run, then held at ``end`` (start == end: fixed)."""
    if total_steps < 1:
        raise HarnessError(f"total_steps must be >= 1, got {total_steps}")
    if not 0.0 < anneal_fraction <= 1.0:
        raise HarnessError(f"anneal_fraction must be in (0, 1], got {anneal_fraction}")
    anneal_steps = max(anneal_fraction * (total_steps - 1), 1.0)
    progress = min(max(step / anneal_steps, 0.0), 1.0)
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


def normalized_adm_gradient(u_teacher: torch.Tensor, u_student: torch.Tensor) -> torch.Tensor:
    """DMD's normalisation of the score difference in velocities: ``(u_teacher - u_student) / mean|u_teacher|``.

    DMD divides the x0-prediction difference by ``mean|x - x0_real|`` per sample; with x0 = x - t u both
    are ``t`` times a velocity, so the weight becomes ``1 / mean|u_teacher|`` per sample instead of the
    analytic ``(1 - t)/t``, which is bounded at small t. Shapes as :func:`adm_gradient`; without gradient.
    """
    scale = u_teacher.abs().mean(dim=tuple(range(1, u_teacher.dim())), keepdim=True).clamp(min=1e-6)
    return ((u_teacher - u_student) / scale).detach()


def step_normalized_adm_gradient(u_teacher: torch.Tensor, u_student: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """:func:`normalized_adm_gradient` divided by the step ``s - t`` per sample (``step``: ``(B,)``, > 0).

    With ``x_hat = x_s - (s - t) u_student(x_s)`` the student's velocity receives ``(s - t) g``; dividing g by
    the step gives every grid step the same weight in velocity space. The analytic weight times the step spans
    ~2,400x over the toy's 20-step grid (0.0003 at the noise end, 0.72 near the data), so the early, high-noise
    steps, where layout and motion form, are hardly trained. Shapes as :func:`adm_gradient`; without gradient.
    """
    return normalized_adm_gradient(u_teacher, u_student) / step.view(-1, *([1] * (u_teacher.dim() - 1)))


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
