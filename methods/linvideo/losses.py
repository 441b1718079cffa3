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


def landing_time(s: torch.Tensor, t_next: torch.Tensor, fraction: float = 1.0, t_min: float = 0.02) -> torch.Tensor:
    """Where ADM's student step from a stored state at time ``s`` lands: ``t = s - kappa (s - t_next)``, >= t_min.

    ``s, t_next``: ``(B,)`` flow times (1 = noise) of a sampler step, ``t_next < s``; ``fraction`` is kappa in
    (0, 1]: 1 lands on the sampler's next time (the paper's step), smaller lands part of the way, where ADM's
    comparison of teacher and student at x_hat tends to a weighted MSE at x_s as kappa -> 0. The sampler's last
    step lands at t_next = 0, where the score difference's weight (1 - t)/t is infinite (and neither model is
    ever evaluated there by the sampler): that landing is clamped to ``t_min`` (the student steps from s to
    t_min and both models are evaluated at t_min), so the last step is trained like every other one with the
    finite weight (1 - t_min)/t_min (49 at 0.02) under ``analytic`` and 1 / (mean|u_teacher| (s - t_min)) under
    ``uniform``. Written as ``t_next + (1 - kappa)(s - t_next)`` so that kappa = 1 gives t_next exactly.
    """
    if not 0.0 < fraction <= 1.0:
        raise HarnessError(f"ADM step fraction must be in (0, 1], got {fraction}")
    return (t_next + (1.0 - fraction) * (s - t_next)).clamp(min=t_min)


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


REDUCTIONS = ("mean", "sample-sum")


def reduce_objective(squared: torch.Tensor, reduction: str) -> torch.Tensor:
    """An objective's per-element terms ``(B, ...)`` reduced to a scalar, by name (the scale against lambda).

    ``sample-sum``: summed over each sample's elements, averaged over the batch: the objective of a sample is
    the squared Frobenius norm the paper writes (Eq. 7, and Eq. 12's gradient g on every element of x_hat), so
    its gradient on r is not divided by the size of a sample. ``mean``: averaged over every element, i.e. the
    per-sample sum divided by the elements of a sample (C F H W: 24,576 on the toy, ~2.1M for Wan 1.3B at
    480p), while lambda (L_con + L_reg) is not: with the mean, lambda weighs that many times more against the
    objective than with the per-sample sum.
    """
    if reduction not in REDUCTIONS:
        raise HarnessError(f"reduction must be one of {', '.join(REDUCTIONS)}; got {reduction!r}")
    if reduction == "mean":
        return squared.mean()
    return squared.reshape(squared.shape[0], -1).sum(dim=1).mean()


def adm_loss(x_hat: torch.Tensor, g: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """The ADM surrogate ``0.5 ||x_hat - sg(x_hat - g)||^2``; it reaches the student only through x_hat.

    ``x_hat, g``: ``(B, C, F, H, W)``. With ``reduction="sample-sum"`` its gradient with respect to each
    sample's ``x_hat`` is exactly ``g / B`` (Eq. 12, averaged over the batch); ``"mean"`` (DMD-style
    implementations) divides that by the number of elements of a sample too (:func:`reduce_objective`).
    """
    return 0.5 * reduce_objective((x_hat - (x_hat - g).detach()) ** 2, reduction)


def mse_loss(u_student: torch.Tensor, u_teacher: torch.Tensor, reduction: str = "mean",
             weights: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """Eq. 7: regress the stored teacher velocity at the same (x_t, t, prompt); ``(B, C, F, H, W)`` each.

    ``reduction`` as :func:`reduce_objective` (``"mean"``: torch's MSE; ``"sample-sum"``: Eq. 7's squared
    Frobenius norm per sample, averaged over the batch). ``weights``: ``(B,)`` per-state weights, or ``None``
    for Eq. 7's equal ones (:func:`adm_limit_weights` gives the MSE that ADM tends to).
    """
    squared = (u_student.float() - u_teacher.float()) ** 2
    if weights is not None:
        squared = weights.float().view(-1, *([1] * (squared.dim() - 1))) * squared
    return reduce_objective(squared, reduction)


def adm_limit_weights(s: torch.Tensor, t: torch.Tensor, u_teacher: torch.Tensor, weighting: str) -> torch.Tensor:
    """Per-state weights ``(B,)`` of the MSE at x_s that ADM's gradient tends to as its landing step shrinks.

    ``s, t``: ``(B,)`` stored and landing times (:func:`landing_time`); ``u_teacher``: ``(B, C, F, H, W)``, the
    teacher's velocity at x_s. With ``x_hat = x_s - (s - t) u_student(x_s)`` the student's velocity receives
    ``-(s - t) g``, and g's velocity difference at x_hat tends to the one at x_s, so the weights are: ``uniform``
    ``1 / mean|u_teacher|`` (g divides by the step; a ~1.4x spread over the toy's grid), ``normalized``
    ``(s - t) / mean|u_teacher|`` and ``analytic`` ``(s - t)(1 - t)/t``, which spans ~15,000x over the toy's
    20-step grid (the step times the weight 49 at t_min against ~0.0003 near noise).
    """
    if weighting == "analytic":
        return (s - t) * (1 - t) / t
    size = u_teacher.float().abs().mean(dim=tuple(range(1, u_teacher.dim())))
    return (s - t) / size if weighting == "normalized" else 1 / size
