"""The numerics check the kernel and method tests share."""

from __future__ import annotations

import torch


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` (Frobenius norms) in float64, on detached copies: how far a result is from its
    reference (an fp32 or float64 computation of the same thing)."""
    out, ref = out.detach().double(), ref.detach().double()
    return float((out - ref).norm() / ref.norm())
