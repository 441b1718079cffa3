"""The base of the block-sparse methods (XAttention, SVG, SVG2, Radial, ...).

A subclass plans each sparse call -- which tiles to compute, in which token order -- and the base
runs the plan with :func:`methods.kernels.sparse_backends.block_sparse_attention` (on CUDA compiled
FlexAttention, or where no gradient is needed our Triton kernels or FlashInfer's; the masked dense equivalent on
CPU), undoes any permutation and records the
exact density of the mask used. Besides the user's :class:`~methods.base.Schedule`, every method
keeps its paper's own dense warm-up steps (``warmup_fraction`` of the steps) and dense first layers
(:meth:`paper_dense_layers`), which scale with the model's step and layer counts.

Block size: the papers use 128 x 128 tiles on Wan (12 tiles per 480p frame). ``block_size="auto"``
keeps 128 whenever a row holds at least :data:`MIN_BLOCKS_PER_ROW` such tiles and otherwise halves it
until it does, so the toy model's 512 tokens (8 frames of 64) get 32-token tiles (half a frame, 16
per row) instead of 4 tiles of two whole frames; the block size used per sequence length is recorded.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from methods.base import AttentionContext, AttentionMethod, Density, Schedule
from methods.kernels.block_sparse import BlockSparsePattern, PatternKind, permute_tokens, unpermute_tokens
from methods.kernels.sparse_backends import (
    BackendLog,
    backend_names,
    backend_needs,
    block_sparse_attention,
    check_backend,
)
from methods.params import Param

PAPER_BLOCK = 128
MIN_BLOCKS_PER_ROW = 16


@dataclass(frozen=True)
class SparsePlan:
    """What one sparse call computes.

    Attributes:
        pattern: the tiles (and token mask) over queries in ``q_order`` and keys in ``kv_order``.
        q_order: ``(B|1, H|1, N)`` permutation of the queries (the output is permuted back);
            ``None`` keeps the model's frame-major order.
        kv_order: permutation of keys and values; ``None`` means the same as ``q_order``.
        density: the exact kept fraction when the method knows it more cheaply than
            ``pattern.density()`` (e.g. from cluster sizes); ``None`` asks the pattern.
    """

    pattern: BlockSparsePattern
    q_order: torch.Tensor | None = None
    kv_order: torch.Tensor | None = None
    density: Density | None = None

    def used_density(self) -> Density:
        """The call's density, a tensor unless the method gave a number (see :data:`methods.base.Density`)."""
        return self.pattern.kept_fraction() if self.density is None else self.density


def auto_block_size(tokens: int) -> int:
    """128, halved until a row of ``tokens`` holds at least MIN_BLOCKS_PER_ROW blocks (never below 1)."""
    block = PAPER_BLOCK
    while block > 1 and tokens < MIN_BLOCKS_PER_ROW * block:
        block //= 2
    return block


BACKEND = Param("backend", "choice", "auto", "auto (flex-tuned on Hopper, sm_90, in fp16/bf16 up to head dim 128, "
                "or there, without gradients, triton-variable on variable blocks, eager with flashinfer-python's "
                "kernels prebuilt flashinfer-bsr on a tile table shared by every head and flashinfer-split on a "
                "token-level one (svg's band), and triton-blocks on other block-level patterns; "
                "flex on other CUDA calls; masked elsewhere, flex past its size), measure (the fastest backend "
                f"matching masked dense, timed on the first call per shape; recorded) or one of {backend_needs()}",
                choices=backend_names())  # fmt: skip


def block_sparse_parameters(warmup_fraction: float, paper: str) -> tuple[Param, ...]:
    """The parameters every block-sparse method shares; ``warmup_fraction`` and ``paper`` give its warm-up."""
    return (
        Param("warmup_fraction", "float", warmup_fraction, f"share of the first steps run dense ({paper})",
              min=0.0, max=1.0),
        Param("block_size", "block_size", "auto", f"tokens per tile: auto ({PAPER_BLOCK} at Wan scale, halved until "
              f"a row holds {MIN_BLOCKS_PER_ROW} tiles) or an int"),
        BACKEND,
    )  # fmt: skip


def _as_int64(value: int) -> int:
    """``value`` mod 2^64 as a signed 64-bit integer (torch's int64 arithmetic wraps the same way)."""
    value %= 1 << 64
    return value - (1 << 64) if value >= 1 << 63 else value


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 ``x`` (torch's ``>>`` keeps the sign)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


#: SplitMix64's increment and multipliers (Steele, Lea and Flood, OOPSLA 2014), as signed int64.
_GOLDEN, _MIX_1, _MIX_2 = (_as_int64(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's output function of int64 ``x`` (elementwise, wrapping as uint64 would): a bijection whose
    outputs pass BigCrush for consecutive inputs. Plain tensor arithmetic, so torch.compile traces it."""
    x = x + _GOLDEN
    x = (x ^ _shift_right(x, 30)) * _MIX_1
    x = (x ^ _shift_right(x, 27)) * _MIX_2
    return x ^ _shift_right(x, 31)


class CounterDraws:
    """A method's random integers, repeatable per video and traced by torch.compile into the graph (a
    ``torch.Generator`` breaks it: Dynamo traces none). A device's draws are one stream: the j-th integer drawn there
    since the last :meth:`reset` is ``splitmix64(seed_key ^ j) mod high``, whatever the sizes of the calls. The
    stream's position is an int64 tensor on that device, advanced in place, so a compiled graph reads it as an input
    and guards on no count (created on the first draw: a graph compiled before any eager draw recompiles once when
    it exists)."""

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self._key = _as_int64(splitmix64(torch.tensor(_as_int64(self.seed))).item())
        self._counters: dict[torch.device, torch.Tensor] = {}

    def randint(self, high: int, size: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """``size`` int64 draws in ``[0, high)`` on ``device`` (modulo bias below high / 2^63)."""
        counter = self._counters.get(device)
        if counter is None:
            with torch.inference_mode(False):  # a normal tensor: reset() and later draws update it in any mode
                counter = self._counters[device] = torch.zeros((), dtype=torch.int64, device=device)
            if not torch.compiler.is_compiling():  # (Dynamo cannot trace the marking)
                # Updated in place by the graph: static, so that CUDA-graph modes (reduce-overhead) still capture it.
                torch._dynamo.mark_static_address(counter)
        count = math.prod(size)
        index = counter + torch.arange(count, device=device)
        counter.add_(count)
        return (splitmix64(index ^ self._key) & _as_int64((1 << 63) - 1)).remainder(high).view(size)

    def reset(self) -> None:
        """Start every device's draws from the seed again (in place: a compiled graph keeps reading the same
        counters)."""
        for counter in self._counters.values():
            counter.zero_()


class BlockSparseMethod(AttentionMethod):
    """An attention method whose sparse calls run a :class:`SparsePlan` through block-sparse attention.

    Subclasses end their ``parameters`` with :func:`block_sparse_parameters` (warm-up, block size, backend) and
    declare ``pattern_kinds``.
    """

    parameters = block_sparse_parameters(0.0, "none")
    #: The kinds of pattern its plans hold (:attr:`BlockSparsePattern.kind`): a ``backend`` refusing all of them is
    #: refused before the run (:meth:`check_supported`).
    pattern_kinds: ClassVar[frozenset[PatternKind]]

    def __init__(self, schedule: Schedule | None = None, **params: Any) -> None:
        super().__init__(schedule, **params)
        block_size = self.settings["block_size"]
        self._block_size: int | None = None if block_size == "auto" else block_size
        self.warmup_fraction: float = self.settings["warmup_fraction"]
        self.backend: str = self.settings["backend"]
        self.backends = BackendLog(self.backend, self.name)
        self._blocks_used: dict[int, int] = {}

    # -- what subclasses provide ---------------------------------------------------------------

    @abstractmethod
    def plan(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> SparsePlan:
        """The tiles one sparse call computes. q, k, v are ``(B, H, N, D)`` in frame-major order."""

    def paper_dense_steps(self, num_steps: int) -> int:
        """First denoising steps the paper runs dense: ``warmup_fraction`` of them, rounded half up."""
        return math.floor(self.warmup_fraction * num_steps + 0.5)

    def paper_dense_layers(self, num_layers: int) -> int:
        """First layers the paper always runs dense, for a model of ``num_layers``."""
        return 0

    def usage_params(self) -> dict[str, Any]:
        """What the subclass chose per sequence (e.g. its stride per block), recorded beside its settings."""
        return {}

    # -- the contract ----------------------------------------------------------------------------

    def block_size(self, tokens: int) -> int:
        """Tile size for a sequence of ``tokens`` (recorded per length)."""
        block = self._block_size or auto_block_size(tokens)
        self._blocks_used[tokens] = block
        return block

    def check_supported(self, device: torch.device, dtype: torch.dtype) -> None:
        """The method's devices and dtypes, then its ``backend`` setting's (a missing package included, and the kinds
        of pattern it refuses)."""
        super().check_supported(device, dtype)
        check_backend(self.backend, device, dtype, self.name, self.pattern_kinds)

    def runs_dense(self, ctx: AttentionContext) -> bool:
        return (
            super().runs_dense(ctx)
            or ctx.step < self.paper_dense_steps(ctx.num_steps)
            or ctx.layer < self.paper_dense_layers(ctx.num_layers)
        )

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext
    ) -> tuple[torch.Tensor, Density]:
        plan = self.plan(q, k, v, ctx)
        return self.execute(q, k, v, plan, self.backends), plan.used_density()

    @staticmethod
    def execute(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: SparsePlan, backend: str | BackendLog = "auto"
    ) -> torch.Tensor:
        """Run ``plan`` on q, k, v ``(B, H, N, D)``: permute, block-sparse attention, permute back.

        ``backend``: a backend name (see :mod:`methods.kernels.sparse_backends`), or a method's
        :class:`BackendLog`, which also records the backend used.
        """
        kv_order = plan.q_order if plan.kv_order is None else plan.kv_order
        if plan.q_order is not None:
            q = permute_tokens(q, plan.q_order)
        if kv_order is not None:
            k, v = permute_tokens(k, kv_order), permute_tokens(v, kv_order)
        if isinstance(backend, BackendLog):
            out = backend.attention(q, k, v, plan.pattern)
        else:
            out = block_sparse_attention(q, k, v, plan.pattern, backend)
        return out if plan.q_order is None else unpermute_tokens(out, plan.q_order)

    def params(self) -> dict[str, Any]:
        return {
            **super().params(),
            **self.usage_params(),
            **self.backends.params(),
            "block_size_used": {str(tokens): block for tokens, block in sorted(self._blocks_used.items())},
        }
