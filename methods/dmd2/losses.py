"""DMD2's losses (Yin et al., 2024, Sec. 3-4; DMD, Yin et al., 2023, Eq. 7-8), in rectified-flow terms.

Conventions: ``x_t = (1 - t) x0 + t eps``, t = 1 noise, velocity ``u = eps - x0``, and a model's clean estimate
``x0(x_t) = x_t - t u(x_t)``. The generator G makes ``x0_G`` (one step of its sampler from a state of its own
rollout); it is re-noised at a random time t (``t = shift(s)``, s uniform in ``[t_min, t_max]``) with fresh noise
eps to ``x_t = (1 - t) x0_G + t eps``. There

- the **real score** is the frozen teacher with CFG scale w: ``u_real = u(x_t, null) + w (u(x_t, c) - u(x_t, null))``;
- the **fake score** is a model initialised from the teacher and trained on the generator's samples, read
  conditionally: ``u_fake = u_phi(x_t, c)``.

The **distribution matching gradient** (DMD's Eq. 7, its normalisation Eq. 8): the KL gradient with respect to
``x0_G`` is ``s_fake(x_t) - s_real(x_t)``; in clean estimates that is, up to a positive weight per t,

    g = (x0_fake - x0_real) / mean_{C,F,H,W} |x0_G - x0_real|,

computed without gradient, per sample. The generator minimises ``L_DM = 1/2 mean (x0_G - sg(x0_G - g))^2``, whose
gradient with respect to ``x0_G`` is ``g / numel``: a step moves x0_G toward the real score's estimate and away
from the fake one's. The **fake score** minimises flow matching on the generator's samples,
``L_fake = mean (u_phi(x_t, c) - (eps - sg(x0_G)))^2``, N times per generator step (the two time-scale rule).
The optional **regression** loss (DMD's, which DMD2 drops) is ``mean (x0_G(z, t=1) - y(z))^2`` against the
teacher's ODE output y from the same noise z and prompt. DMD2's GAN term is left out.
"""

from __future__ import annotations

import torch

from harness.models.base import ModelAdapter
from methods.dmd2.sampler import NUM_TRAIN_TIMESTEPS


def guided_velocity(model: ModelAdapter, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                    uncond: torch.Tensor, cfg: float) -> torch.Tensor:  # fmt: skip
    """The CFG-guided velocity ``(B, C, F, H, W)`` in fp32 at flow times ``t (B,)``; the conditional and null prompt
    passes go through the model as one batch (half the launches of two passes). ``cfg <= 1``: conditional only."""
    timestep = t * NUM_TRAIN_TIMESTEPS
    if cfg <= 1.0:
        return model.forward(x, timestep, cond).float()
    both = model.forward(torch.cat([x, x]), torch.cat([timestep, timestep]),
                         torch.cat([cond, uncond.expand(x.shape[0], -1, -1)])).float()  # fmt: skip
    conditional, unconditional = both.chunk(2)
    return unconditional + cfg * (conditional - unconditional)


def shifted_times(count: int, t_min: float, t_max: float, shift: float, generator: torch.Generator) -> torch.Tensor:
    """``count`` flow times ``t = shift s / (1 + (shift - 1) s)``, s uniform in ``[t_min, t_max]`` (as the teacher
    was trained and samples); on the generator's device."""
    s = t_min + (t_max - t_min) * torch.rand(count, generator=generator, device=generator.device)
    return shift * s / (1 + (shift - 1) * s)


def distribution_matching_gradient(x0_generated: torch.Tensor, x0_real: torch.Tensor,
                                   x0_fake: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """DMD's ``g = (x0_fake - x0_real) / mean|x0_G - x0_real|`` per sample, without gradient; shapes
    ``(B, C, F, H, W)``, fp32."""
    with torch.no_grad():
        dims = tuple(range(1, x0_generated.dim()))
        scale = (x0_generated.float() - x0_real.float()).abs().mean(dim=dims, keepdim=True).clamp(min=1e-6)
        return (x0_fake.float() - x0_real.float()) / scale


def distribution_matching_loss(x0_generated: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """``1/2 mean (x0_G - sg(x0_G - g))^2``: its gradient with respect to ``x0_G`` is ``g / numel``."""
    x0 = x0_generated.float()
    return 0.5 * torch.nn.functional.mse_loss(x0, (x0 - gradient).detach())


def fake_score_loss(velocity: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``mean (u - (eps - x0))^2``: the fake score's loss on a re-noised generator sample (``x0`` detached)."""
    return torch.nn.functional.mse_loss(velocity.float(), (noise - x0.detach()).float())
