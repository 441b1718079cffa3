"""Learning-rate schedules shared by the trainers."""

from __future__ import annotations

import math


def warmup_constant(step: int, warmup_steps: int) -> float:
    """LR factor at ``step`` (0-based): linear warm-up over ``warmup_steps``, then 1."""
    return min(1.0, (step + 1) / warmup_steps)


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """LR factor at ``step`` (0-based): linear warm-up over ``warmup_steps``, then cosine decay to 0 at the end."""
    if step < warmup_steps:
        return warmup_constant(step, warmup_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
