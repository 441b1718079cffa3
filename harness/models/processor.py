"""The harness's self-attention processor for diffusers Wan-style attention modules.

It computes q, k, v exactly as diffusers' ``WanAttnProcessor`` does (projections, RMS qk-norm across
heads, interleaved RoPE), hands them to the active :class:`~methods.base.AttentionMethod` with an
:class:`~methods.base.AttentionContext`, and applies the output projection. Cross-attention keeps
diffusers' own processor (text attention stays dense everywhere).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from harness.latency import Region
from methods.base import AttentionContext, AttentionMethod, CfgBranch, TokenGrid


@dataclass
class AttentionTimer:
    """Attention-only time: a timed region around every method call, summed on demand."""

    enabled: bool = True
    _regions: list[Region] = field(default_factory=list)

    @contextmanager
    def time(self, device: torch.device) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        region = Region(device)
        region.start()
        yield
        region.stop()
        self._regions.append(region)

    def pop_seconds(self) -> float:
        """Total attention seconds since the last call (waits for pending CUDA events)."""
        total = sum(region.seconds() for region in self._regions)
        self._regions = []
        return total


@dataclass
class AttentionRuntime:
    """What every harness processor shares: the method and where the sampler currently is."""

    method: AttentionMethod
    num_layers: int
    grid: TokenGrid | None = None
    step: int = 0
    num_steps: int = 1
    timestep: float = 0.0
    cfg_branch: CfgBranch = "none"
    timer: AttentionTimer = field(default_factory=AttentionTimer)

    def context(self, layer: int) -> AttentionContext:
        if self.grid is None:
            raise RuntimeError("the model adapter must set the token grid before a forward pass")
        return AttentionContext(
            layer=layer,
            num_layers=self.num_layers,
            step=self.step,
            num_steps=self.num_steps,
            timestep=self.timestep,
            cfg_branch=self.cfg_branch,
            grid=self.grid,
        )


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

        ctx = self.runtime.context(self.layer)
        with self.runtime.timer.time(hidden_states.device):
            out = self.runtime.method(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), ctx)
        out = out.transpose(1, 2).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))
