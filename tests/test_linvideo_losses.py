"""LinVideo's objectives, each equation checked against hand-computed values or autograd."""

from __future__ import annotations

import math

import pytest
import torch

from harness.errors import HarnessError
from methods.linvideo.losses import (
    adm_gradient,
    adm_loss,
    annealed_alpha,
    binarization_loss,
    constraint_loss,
    landing_time,
    mse_loss,
    normalized_adm_gradient,
    ste_round,
    step_normalized_adm_gradient,
)


def test_ste_round_rounds_forward_and_passes_gradient_one() -> None:
    x = torch.tensor([0.2, 0.49, 0.51, 0.9], requires_grad=True)
    y = ste_round(x)
    assert y.tolist() == [0.0, 0.0, 1.0, 1.0]
    y.sum().backward()
    assert x.grad is not None and x.grad.tolist() == [1.0, 1.0, 1.0, 1.0]


def test_binarization_loss_and_gradient_at_alpha_20_r_0_9() -> None:
    """L_reg = 1 - |2r - 1|^a; at a = 20, r = 0.9: value 1 - 0.8^20, dL/dr = -2 a 0.8^19."""
    r = torch.tensor([0.9], dtype=torch.float64, requires_grad=True)
    loss = binarization_loss(r, alpha=20.0)
    loss.backward()
    assert loss.item() == pytest.approx(1 - 0.8**20, rel=1e-12)
    assert r.grad is not None and r.grad.item() == pytest.approx(-2 * 20 * 0.8**19, rel=1e-12)
    assert r.grad.item() == pytest.approx(-0.5765, abs=1e-4)  # the figure quoted in reference/linvideo.md


def test_binarization_loss_is_zero_at_the_ends_and_one_at_half() -> None:
    r = torch.tensor([0.0, 1.0, 0.5], dtype=torch.float64)
    for alpha in (2.0, 4.0, 20.0):
        assert binarization_loss(r[:2], alpha).item() == pytest.approx(0.0)
        assert binarization_loss(r[2:], alpha).item() == pytest.approx(1.0)


def test_binarization_loss_at_alpha_2_is_the_parabola() -> None:
    """At alpha = 2, 1 - (2r - 1)^2 = 4 r (1 - r)."""
    r = torch.rand(7, dtype=torch.float64)
    assert binarization_loss(r, 2.0).item() == pytest.approx((4 * r * (1 - r)).sum().item(), rel=1e-12)


def test_constraint_loss_counts_layers_below_half_against_the_target() -> None:
    """(sum round(1 - r) - target)^2: three layers below 0.5, target 5 -> 4; gradient -2 (3 - 5) (-1) each."""
    r = torch.tensor([0.1, 0.3, 0.45, 0.6, 0.95, 0.99], requires_grad=True)
    loss = constraint_loss(r, target=5)
    loss.backward()
    assert loss.item() == pytest.approx(4.0)
    assert r.grad is not None and torch.allclose(r.grad, torch.full_like(r, 4.0))


def test_constraint_loss_is_zero_on_target() -> None:
    r = torch.tensor([0.2, 0.7, 0.1, 0.8])
    assert constraint_loss(r, target=2).item() == 0.0


@pytest.mark.parametrize(("start", "end"), [(20.0, 2.0), (16.0, 4.0), (24.0, 1.0), (4.0, 4.0)])
def test_alpha_anneals_linearly_from_start_to_end(start: float, end: float) -> None:
    total = 11
    values = [annealed_alpha(step, total, start, end) for step in range(total)]
    assert values[0] == start and values[-1] == pytest.approx(end)
    assert values[5] == pytest.approx((start + end) / 2)


def test_alpha_reaches_its_end_at_the_anneal_fraction_and_holds() -> None:
    total = 101  # steps 0..100: annealing over the first 60
    assert annealed_alpha(30, total, 20.0, 2.0, anneal_fraction=0.6) == pytest.approx(11.0)
    assert [annealed_alpha(s, total, 20.0, 2.0, 0.6) for s in (60, 80, 100)] == pytest.approx([2.0, 2.0, 2.0])


def test_normalized_adm_gradient_divides_by_the_teachers_mean_speed_per_sample() -> None:
    u_teacher, u_student = torch.randn(2, 3, 2, 4, 4), torch.randn(2, 3, 2, 4, 4)
    g = normalized_adm_gradient(u_teacher, u_student)
    for i in range(2):
        assert torch.allclose(g[i], (u_teacher[i] - u_student[i]) / u_teacher[i].abs().mean())
    assert not g.requires_grad


def test_step_normalized_adm_gradient_divides_the_normalized_one_by_each_samples_step() -> None:
    u_teacher, u_student = torch.randn(2, 3, 2, 4, 4), torch.randn(2, 3, 2, 4, 4)
    step = torch.tensor([0.05, 0.2])
    g = step_normalized_adm_gradient(u_teacher, u_student, step)
    expected = normalized_adm_gradient(u_teacher, u_student)
    assert torch.allclose(g[0], expected[0] / 0.05) and torch.allclose(g[1], expected[1] / 0.2)


def test_adm_gradient_is_weighted_velocity_difference() -> None:
    """g = (1 - t)/t (u_T - u_S), per sample, with t clamped away from 0."""
    u_teacher, u_student = torch.randn(2, 3, 2, 4, 4), torch.randn(2, 3, 2, 4, 4)
    t = torch.tensor([0.25, 0.001])
    g = adm_gradient(u_teacher, u_student, t, t_min=0.02)
    assert torch.allclose(g[0], 3.0 * (u_teacher[0] - u_student[0]))
    assert torch.allclose(g[1], (0.98 / 0.02) * (u_teacher[1] - u_student[1]))
    assert not g.requires_grad


def test_adm_surrogate_gradient_with_respect_to_x_hat_is_g() -> None:
    """Autograd of 0.5||x_hat - sg(x_hat - g)||^2 gives g / B per sample (sample-sum); the mean divides it by numel."""
    g = torch.randn(2, 3, 2, 4, 4, dtype=torch.float64)
    for reduction, scale in (("sample-sum", 1.0 / len(g)), ("mean", 1.0 / g.numel())):
        x_hat = torch.randn_like(g, requires_grad=True)
        adm_loss(x_hat, g, reduction).backward()
        assert x_hat.grad is not None and torch.allclose(x_hat.grad, g * scale, rtol=1e-12, atol=0)


def test_adm_loss_value_is_half_squared_norm_of_g_per_sample() -> None:
    g = torch.randn(4, 5, dtype=torch.float64)
    x_hat = torch.randn_like(g)
    assert adm_loss(x_hat, g, "sample-sum").item() == pytest.approx(0.5 * (g**2).sum().item() / 4, rel=1e-12)
    assert math.isfinite(adm_loss(x_hat, g).item())


@pytest.mark.parametrize(("reduction", "expected"), [("mean", 25.0 / 6), ("sample-sum", 12.5)])
def test_mse_reduction_is_the_elements_mean_or_the_per_sample_frobenius_norm(reduction: str, expected: float) -> None:
    """Eq. 7 per sample is ||u_T - u_S||_F^2: samples with squared errors summing to 9 and 16, three elements each."""
    u_teacher = torch.zeros(2, 3, dtype=torch.float64)
    u_student = torch.tensor([[3.0, 0.0, 0.0], [0.0, 4.0, 0.0]], dtype=torch.float64)
    assert mse_loss(u_student, u_teacher, reduction).item() == pytest.approx(expected)


def test_an_unknown_reduction_is_refused() -> None:
    with pytest.raises(HarnessError, match="reduction must be one of mean, sample-sum"):
        adm_loss(torch.zeros(1, 2), torch.zeros(1, 2), "sum")


def test_the_landing_time_is_kappa_of_the_step_and_the_last_step_lands_at_t_min() -> None:
    """Issue 20: kappa = 1 is t_next exactly, 0.5 the midpoint; the last step (t_next = 0) lands at t_min, not 0."""
    s, t_next = torch.tensor([0.9, 0.6, 0.3]), torch.tensor([0.6, 0.3, 0.0])
    assert torch.equal(landing_time(s, t_next, 1.0, 0.02), torch.tensor([0.6, 0.3, 0.02]))
    assert landing_time(s, t_next, 0.5, 0.02).tolist() == pytest.approx([0.75, 0.45, 0.15])
    with pytest.raises(HarnessError, match="step fraction must be in"):
        landing_time(s, t_next, 0.0)
