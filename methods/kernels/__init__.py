"""Attention kernels shared by methods: linear attention and its feature maps (``linear_attention``),
block-sparse attention on FlexAttention with its masked dense equivalent (``block_sparse``) and its backends
(``sparse_backends``), and the Triton kernels (``linear_attention_triton``, ``xattn_scoring_triton``, ``kmeans_triton``,
``variable_blocks_triton``, ``ranked_selection_triton``, ``sla_linear_triton``, ``permute_triton``,
``popularity_triton``), each entered
through a ``torch.library`` custom op in :data:`OP_NAMESPACE` so that torch.compile treats the launch code as one
opaque call (but ``attention_states``' merge, a plain function: only the eager-only flashinfer-split backend calls
it), and chosen over its torch path by :func:`use_kernel`; :func:`kernel_op` registers such an op, launched on its
inputs' GPU (:func:`on_input_device`)."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from harness.errors import HarnessError

F = TypeVar("F", bound=Callable[..., Any])

OP_NAMESPACE = "attention_bench"
#: The Triton interpreter (``TRITON_INTERPRET=1``): the kernels run on CPU tensors (tests), in small tiles.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
#: Where the kernels run: CPU tensors under the interpreter, CUDA ones otherwise.
KERNEL_DEVICE = "cpu" if INTERPRETED else "cuda"
#: Values of a kernel's backend variable (``BENCH_XATTN_BACKEND``, ...): where it can run, never, always.
BACKENDS: tuple[str, ...] = ("auto", "torch", "triton")
#: Every kernel choice read from the environment (``BENCH_LINEAR_BACKEND``, ``BENCH_XATTN_VARIANT``, ...): its
#: default and allowed values, declared by its kernel module through :func:`kernel_choice`. A run's preflight checks
#: them all (:func:`check_kernel_choices`) and records carry the values in force (:func:`kernel_settings`).
KERNEL_CHOICES: dict[str, tuple[str, tuple[str, ...]]] = {}
#: The modules that declare kernel choices (imported by :func:`kernel_settings` so that every one is known).
CHOICE_MODULES = (
    "linear_attention_triton",
    "xattn_scoring_triton",
    "kmeans_triton",
    "ranked_selection_triton",
    "sla_linear_triton",
    "permute_triton",
    "popularity_triton",
)


def triton_jit(fn: F) -> F:
    """``triton.jit(fn)`` where Triton imports, else ``fn`` itself, never launched (CPU-only installs, CI: every call
    takes its torch path): the decorator of every Triton kernel in this package."""
    try:
        import triton
    except ImportError:
        return fn
    return triton.jit(fn)


def on_kernel_device(*tensors: torch.Tensor) -> bool:
    """Whether every tensor is where the kernels run (:data:`KERNEL_DEVICE`): the first check of each kernel module's
    ``unsupported_reason``."""
    return all(x.device.type == KERNEL_DEVICE for x in tensors)


def last_axis_contiguous(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself where its last axis is contiguous, else a contiguous copy: the Triton kernels take any batch,
    head and token strides but read each token's row as one contiguous run."""
    return x if x.stride(-1) == 1 else x.contiguous()


def needs_gradients(*tensors: torch.Tensor) -> bool:
    """Whether a call on ``tensors`` records a backward: autograd on and any of them requiring a gradient (the
    kernels without a backward take their torch path then)."""
    return torch.is_grad_enabled() and any(x.requires_grad for x in tensors)


def tile_columns(head_dim: int) -> int:
    """Columns of a Triton kernel's tile over the head dimension: rounded up to a power of two (``tl.arange``'s
    sizes), at least 16 (``tl.dot``'s smallest)."""
    return max(16, 1 << (head_dim - 1).bit_length())


def descriptor_aligned(x: torch.Tensor) -> bool:
    """Whether Hopper's copy engine can read ``x (B, H, N, D)`` through a tensor descriptor made at any (b, h, n)
    offset: its start and its batch, head and token strides multiples of 16 bytes (a zero stride, broadcast, is);
    the last axis contiguous."""
    size = x.element_size()
    return x.stride(-1) == 1 and x.data_ptr() % 16 == 0 and all(x.stride(i) * size % 16 == 0 for i in range(3))


def _descriptor_scratch(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    """Global memory Triton asks for the tensor descriptors a kernel makes on the device (``triton.set_allocator``),
    on the current device (the op's inputs' one, :func:`on_input_device`). ``alignment`` is met without asking: the
    caching allocator's blocks start at multiples of 512 bytes."""
    return torch.empty(size, device="cuda", dtype=torch.int8)


@functools.cache
def use_descriptor_scratch() -> None:
    """Install Triton's allocator for device-side tensor descriptors (``tl.make_tensor_descriptor``), once per
    process; a kernel that makes them needs it before its first launch (not under the interpreter)."""
    import triton

    triton.set_allocator(_descriptor_scratch)


def kernel_choice(variable: str, default: str, allowed: tuple[str, ...]) -> None:
    """Declare the environment variable ``variable`` as a kernel choice among ``allowed`` whose default is
    ``default``."""
    KERNEL_CHOICES[variable] = (default, allowed)


def _declared() -> dict[str, tuple[str, tuple[str, ...]]]:
    """:data:`KERNEL_CHOICES`, with every module that declares some imported first."""
    import importlib

    for module in CHOICE_MODULES:
        importlib.import_module(f"{__name__}.{module}")
    return KERNEL_CHOICES


def _read(variable: str, default: str) -> str:
    """``$variable`` normalised (stripped, lower case), else ``default``."""
    return os.environ.get(variable, default).strip().lower() or default


def kernel_settings() -> dict[str, str]:
    """The value in force of every kernel choice, by variable: as set (normalised), else its default. Records carry
    it (:func:`harness.environment.capture_environment`), since a choice changes which kernel a number measured."""
    return {variable: _read(variable, default) for variable, (default, _) in sorted(_declared().items())}


def check_kernel_choices() -> None:
    """Refuse a kernel variable set to a value it does not take, before a run builds anything (a typo in
    ``BENCH_KMEANS_UPDATE`` was refused only at svg2's first k-means call, after the model loaded).

    Raises:
        HarnessError: naming the variable and its values.
    """
    for variable, (default, allowed) in _declared().items():
        env_choice(None, variable, default, allowed)


def env_choice(value: str | None, variable: str, default: str, allowed: tuple[str, ...]) -> str:
    """``value``, else ``$variable``, else ``default``, normalised (stripped, lower case).

    Raises:
        HarnessError: naming ``variable`` when the choice is not one of ``allowed``.
    """
    chosen = (value.strip().lower() or default) if value is not None else _read(variable, default)
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


def on_input_device(fn: F) -> F:
    """``fn`` run with the CUDA device of its first tensor argument current (unchanged for CPU tensors, or none).

    Triton launches on the current device, not the tensors', so a kernel given tensors on ``cuda:1`` while
    ``cuda:0`` is current fails ("Pointer argument (at 0) cannot be accessed from Triton (cpu tensor?)"): a
    training dealt onto the second GPU of a host (``bench ablate --jobs``) or ``bench run --device cuda:1`` did.
    Wrapping twice wraps once, so an implementation that is also called directly can carry it under its op."""
    if getattr(fn, "launches_on_input_device", False):
        return fn

    @functools.wraps(fn)
    def on_device(*args: Any, **kwargs: Any) -> Any:
        device = next((a.device for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        if device is None or device.type != "cuda":
            return fn(*args, **kwargs)
        with torch.cuda.device(device):
            return fn(*args, **kwargs)

    on_device.launches_on_input_device = True  # type: ignore[attr-defined]
    return on_device  # type: ignore[return-value]


def kernel_op(name: str) -> Callable[[Callable[..., Any]], Any]:
    """Register a function that launches Triton kernels as the custom op ``{OP_NAMESPACE}::{name}`` (it mutates
    none of its arguments), launched on its inputs' GPU by :func:`on_input_device`. Returns the op
    (``torch.library.CustomOpDef``), on which fakes and autograd are registered as on any custom op."""

    def register(fn: Callable[..., Any]) -> Any:
        # The schema from fn itself: its string annotations resolve in its own module, not in the wrapper's.
        schema = torch.library.infer_schema(fn, mutates_args=())
        return torch.library.custom_op(f"{OP_NAMESPACE}::{name}", on_input_device(fn), mutates_args=(), schema=schema)

    return register
