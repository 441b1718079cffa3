"""Attention kernels shared by methods: linear attention and its feature maps (``linear_attention``),
block-sparse attention on FlexAttention with its masked dense equivalent (``block_sparse``), and the Triton
kernels (``linear_attention_triton``, ``xattn_scoring_triton``, ``kmeans_triton``), each entered through a
``torch.library`` custom op in :data:`OP_NAMESPACE` so that torch.compile treats the launch code as one opaque call,
and chosen over its torch path by :func:`use_kernel`."""

from __future__ import annotations

import os
from collections.abc import Callable

from harness.errors import HarnessError

OP_NAMESPACE = "attention_bench"
#: Values of a kernel's backend variable (``BENCH_XATTN_BACKEND``, ...): where it can run, never, always.
BACKENDS: tuple[str, ...] = ("auto", "torch", "triton")


def env_choice(value: str | None, variable: str, default: str, allowed: tuple[str, ...]) -> str:
    """``value``, else ``$variable``, else ``default``, normalised (stripped, lower case).

    Raises:
        HarnessError: naming ``variable`` when the choice is not one of ``allowed``.
    """
    chosen = (value if value is not None else os.environ.get(variable, default)).strip().lower() or default
    if chosen not in allowed:
        raise HarnessError(f"{variable} must be one of {', '.join(allowed)}, got {chosen!r}")
    return chosen


def use_kernel(variable: str, default: str, backend: str | None, reason: Callable[[], str | None], kernel: str) -> bool:
    """Whether a call runs a Triton kernel rather than its torch path: ``backend`` (default ``$variable``, else
    ``default``) ``auto`` (when ``reason()``, why it cannot run, is None), ``torch`` (never) or ``triton`` (always).

    Raises:
        HarnessError: for any other value, or ``triton`` where the kernel (named by ``kernel``) cannot run.
    """
    chosen = env_choice(backend, variable, default, BACKENDS)
    if chosen == "torch":
        return False
    why = reason()
    if why is not None and chosen == "triton":
        raise HarnessError(f"{variable}=triton but {kernel} cannot run: {why}")
    return why is None
