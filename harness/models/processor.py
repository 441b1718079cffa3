"""The harness's self-attention processor for diffusers Wan-style attention modules.

It computes q, k, v exactly as diffusers' ``WanAttnProcessor`` does (projections, RMS qk-norm across
heads, interleaved RoPE), hands them to the active :class:`~methods.base.AttentionMethod` with an
:class:`~methods.base.AttentionContext`, and applies the output projection. Cross-attention keeps
diffusers' own processor (text attention stays dense everywhere).

Compiled as users run it (``torch.compile(transformer, fullgraph=True)``): whatever depends on where the
sampler is (step, timestep, CFG branch, token grid) is resolved outside the transformer's forward, when the
sampler or the adapter sets it on the :class:`AttentionRuntime`, into one context object (carrying what the
method looks up per layer: its route) and one dense-or-not decision per layer; the forward only reads them, so a
compiled graph holds no guard on the step and is not recompiled from one step to the next (it is once, where the
decision itself changes: the end of a dense warm-up), nor, where a method breaks the graph, once per layer. The
attention timer and the method's density log are Python bookkeeping and stay out of a compiled
graph (``torch.compiler.is_compiling()``): eager calls are timed and logged as before; compiled calls are
neither, so compiled figures come from timing whole forwards (``bench latency --compile``).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from harness.latency import Region
from methods.base import AttentionContext, AttentionMethod, CfgBranch, TokenGrid

# A CUDA region is read once the GPU has reached its end; past this many unread ones the oldest is waited for,
# so a method installed for a whole training run holds a bounded number of regions (issue 19, kind G2).
MAX_PENDING_REGIONS = 64
# The runtime fields the sampler and the adapter set; each assignment re-resolves every layer's call.
POSITION_FIELDS = frozenset({"grid", "step", "num_steps", "timestep", "cfg_branch"})


class AttentionTimer:
    """Attention-only time: a timed region around every eager method call, summed into a running total.

    Completed regions are folded into the total as soon as they can be read without waiting (CPU at once,
    CUDA when the end event is reached), and at most :data:`MAX_PENDING_REGIONS` wait for the GPU, so the
    memory held does not grow with the number of calls. Inside a compiled graph nothing is timed.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._pending: deque[Region] = deque()
        self._seconds = 0.0

    @property
    def pending(self) -> int:
        """Regions not yet folded into the total (bounded by :data:`MAX_PENDING_REGIONS`)."""
        return len(self._pending)

    def start(self, device: torch.device) -> Region | None:
        """A started region, or None when timing is off or the call is being compiled."""
        if not self.enabled or torch.compiler.is_compiling():
            return None
        region = Region(device)
        region.start()
        return region

    def stop(self, region: Region | None) -> None:
        if region is None:
            return
        region.stop()
        self._pending.append(region)
        if len(self._pending) > MAX_PENDING_REGIONS:
            self._fold(self._pending.popleft())  # waits for the oldest
        while self._pending and self._pending[0].ready():
            self._fold(self._pending.popleft())

    def _fold(self, region: Region) -> None:
        self._seconds += region.seconds()

    def pop_seconds(self) -> float:
        """Total attention seconds since the last call (waits for pending CUDA events)."""
        while self._pending:
            self._fold(self._pending.popleft())
        total, self._seconds = self._seconds, 0.0
        return total


@dataclass(frozen=True)
class LayerCall:
    """What one layer's attention call runs with: its context, carrying the method's route for the layer
    (:meth:`~methods.base.AttentionMethod.route`), and whether the method's schedule runs it dense."""

    ctx: AttentionContext
    dense: bool


@dataclass
class LayerSlot:
    """Where one layer's processor finds its current :class:`LayerCall` (``None`` until the grid is set).

    The processor holds its slot, not an index into the runtime's calls: a compiled forward reading
    ``calls[self.layer]`` is guarded on the layer's number, so wherever a method breaks the graph inside the
    processor (a selection read in Python), Dynamo compiled the processor's frame again for every layer and hit
    its recompile limit past 8 layers. Read through the slot, the guards are on the call's own values, which
    differ between layers only where the layers run differently.
    """

    call: LayerCall | None = None


@dataclass
class AttentionRuntime:
    """What every harness processor shares: the method and where the sampler currently is.

    Setting any of :data:`POSITION_FIELDS` (outside the forward: the sampler sets the step, the adapter the
    grid) resolves the :class:`LayerCall` in every layer's :class:`LayerSlot`, which is all the forward reads.
    """

    method: AttentionMethod
    num_layers: int
    grid: TokenGrid | None = None
    step: int = 0
    num_steps: int = 1
    timestep: float = 0.0
    cfg_branch: CfgBranch = "none"
    timer: AttentionTimer = field(default_factory=AttentionTimer)
    slots: tuple[LayerSlot, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.slots = tuple(LayerSlot() for _ in range(self.num_layers))
        self._resolve()

    def __setattr__(self, name: str, value: Any) -> None:
        changed = self.__dict__.get(name, _UNSET) != value
        super().__setattr__(name, value)
        if changed and name in POSITION_FIELDS and "slots" in self.__dict__:
            self._resolve()

    def begin_forward(self, grid: TokenGrid) -> None:
        """Before each transformer forward (the adapter, outside the forward): the call's token ``grid``, and every
        layer's call resolved again even where no position changed. The method's state may have changed since the
        last resolution (an untrained LinVideo builds its state in its first call; attached, loaded or trained
        state), and a route resolved before it would send every call to the method's own lookup by layer number:
        the per-layer recompiles that routes are there to avoid."""
        if grid == self.grid:
            self._resolve()
        else:
            self.grid = grid  # resolves

    def _resolve(self) -> None:
        for layer, slot in enumerate(self.slots):
            if self.grid is None:
                slot.call = None
                continue
            ctx = AttentionContext(
                layer=layer,
                num_layers=self.num_layers,
                step=self.step,
                num_steps=self.num_steps,
                timestep=self.timestep,
                cfg_branch=self.cfg_branch,
                grid=self.grid,
            )
            slot.call = LayerCall(replace(ctx, route=self.method.route(ctx)), self.method.runs_dense(ctx))


_UNSET = object()


def apply_interleaved_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (0,1), (2,3), ... of ``x`` (B, N, H, D) by Wan's RoPE tables (1, N, 1, D)."""
    x_even, x_odd = x[..., 0::2], x[..., 1::2]
    cos_half, sin_half = cos[..., 0::2], sin[..., 1::2]
    rotated = torch.stack((x_even * cos_half - x_odd * sin_half, x_even * sin_half + x_odd * cos_half), dim=-1)
    return rotated.flatten(-2).type_as(x)


class MethodAttnProcessor:
    """Self-attention processor that delegates the attention itself to the runtime's method."""

    def __init__(self, runtime: AttentionRuntime, layer: int) -> None:
        self.runtime = runtime
        self.layer = layer
        self.slot = runtime.slots[layer]

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("MethodAttnProcessor handles unmasked self-attention only")
        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
        if rotary_emb is not None:
            query = apply_interleaved_rope(query, *rotary_emb)
            key = apply_interleaved_rope(key, *rotary_emb)

        call = self.slot.call
        if call is None:
            raise RuntimeError("the model adapter must set the token grid before a forward pass")
        region = self.runtime.timer.start(hidden_states.device)
        out = self.runtime.method(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), call.ctx, dense=call.dense
        )
        self.runtime.timer.stop(region)
        out = out.transpose(1, 2).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))
