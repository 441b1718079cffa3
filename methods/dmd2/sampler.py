"""The few-step generator's sampler: its fixed times and one step, shared by training and ``bench run``.

Rectified flow, t = 1 noise: ``x_t = (1 - t) x0 + t eps`` and the model predicts the velocity ``u = eps - x0``.
The generator's times follow DMD2's four of 1,000 (1000, 750, 500, 250) as flow-matching distillations of Wan
apply them: ``u_i = 1 - i / n`` for ``i = 0..n-1``, then the model's shift ``t = s u / (1 + (s - 1) u)``, as
the teacher's own sampler shifts its grid (toy, shift 3: 1.0, 0.9, 0.75, 0.5; Wan, shift 5: 1.0, 0.94, 0.83,
0.625). A step at time t_i predicts ``x0 = x_{t_i} - t_i u(x_{t_i}, t_i)``; unless it is the last, it re-noises
that estimate to the next time with fresh noise, ``x_{t_{i+1}} = (1 - t_{i+1}) x0 + t_{i+1} eps'``, as DMD2's
multi-step generator (and consistency models) do; the last step returns x0.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from harness.errors import HarnessError

NUM_TRAIN_TIMESTEPS = 1000  # the transformer's timestep is the flow time x 1000 (Wan, the toy)


def generator_times(steps: int, shift: float) -> tuple[float, ...]:
    """The generator's flow times, highest first: ``u_i = 1 - i/steps`` shifted by ``shift`` (see the module)."""
    if steps < 1 or shift <= 0:
        raise HarnessError(f"a few-step generator needs steps >= 1 and shift > 0, got {steps} and {shift}")
    return tuple(shift * u / (1 + (shift - 1) * u) for u in (1 - i / steps for i in range(steps)))


def timesteps(times: tuple[float, ...], device: torch.device | None = None) -> torch.Tensor:
    """The transformer's timesteps of ``times`` ``(steps,)`` in fp32, computed once so that training and sampling
    feed the generator the same values."""
    return torch.tensor(times, dtype=torch.float32, device=device) * NUM_TRAIN_TIMESTEPS


def x0_from_velocity(x: torch.Tensor, velocity: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """The clean estimate ``x - t u`` of a state ``x (B, C, F, H, W)`` at flow time ``t`` (a float or ``(B,)``)."""
    return x - _per_sample(t, x) * velocity


def renoise(x0: torch.Tensor, t: torch.Tensor | float, noise: torch.Tensor) -> torch.Tensor:
    """``(1 - t) x0 + t eps``: the state at flow time ``t`` (a float or ``(B,)``) of ``x0`` with ``noise``."""
    t = _per_sample(t, x0)
    return (1 - t) * x0 + t * noise


def _per_sample(t: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor | float:
    return t.view(-1, *([1] * (like.dim() - 1))) if isinstance(t, torch.Tensor) else t


def noise_seed(initial: torch.Tensor) -> int:
    """A 63-bit seed from one sample's initial noise ``(C, F, H, W)`` (sha256 of its fp32 bytes)."""
    data = initial.detach().float().cpu().contiguous().numpy().tobytes()
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "little") & (2**63 - 1)


class FewStepScheduler:
    """The generator's sampler behind the diffusers scheduler interface that ``WanFamilyAdapter.sample`` drives.

    The fresh noise of each re-noising comes from a CPU generator per sample, seeded by :func:`noise_seed` of the
    state the first step receives (the sample's initial noise, itself drawn from the video's seed): the same
    draws for every method and device, and for any batching of the videos.
    """

    def __init__(self, times: tuple[float, ...]) -> None:
        self.times = tuple(times)
        self.timesteps = timesteps(self.times)
        self._index = 0
        self._generators: list[torch.Generator] = []

    def set_timesteps(self, num_inference_steps: int, device: torch.device | None = None) -> None:
        """Start a new sample; ``num_inference_steps`` must be the generator's own step count."""
        if num_inference_steps != len(self.times):
            raise HarnessError(f"this generator samples in {len(self.times)} steps, not {num_inference_steps}")
        self.timesteps, self._index = timesteps(self.times, device), 0

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor,
             return_dict: bool = False) -> tuple[torch.Tensor]:  # fmt: skip
        """The next state from the velocity ``model_output`` at the current time (``timestep`` is implied by the
        step count); the clean estimate itself after the last step. Shapes ``(B, C, F, H, W)``, fp32 out."""
        if self._index == 0:
            self._generators = [torch.Generator().manual_seed(noise_seed(row)) for row in sample]
        x0 = x0_from_velocity(sample.float(), model_output.float(), self.times[self._index])
        self._index += 1
        if self._index == len(self.times):
            return (x0,)
        noise = torch.cat([torch.randn((1, *x0.shape[1:]), generator=g) for g in self._generators]).to(x0.device)
        return (renoise(x0, self.times[self._index], noise),)
