"""Untrained linear attention on chosen layers: LinVideo's "direct replacement" baseline.

The selected layers swap softmax attention for non-causal linear attention with a fixed kernel and
no training at all; the other layers keep dense softmax attention. It measures how far a video DiT
drifts when attention is linearised without the distillation that LinVideo adds.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from harness.errors import HarnessError
from methods.base import AttentionContext, AttentionMethod, Capabilities, Schedule, register_method
from methods.kernels.linear_attention import (
    KERNELS,
    FeatureMap,
    build_feature_map,
    check_kernel,
    feature_linear_attention,
)
from methods.kernels.linear_attention_triton import BACKEND_NOTE

# taylor is left out: its 1 + D + D^2 features (16,513 per token at D = 128) do not fit at video length.
LINEAR_KERNELS: tuple[str, ...] = ("elu", "relu", "hedgehog")


def parse_layers(layers: Any) -> tuple[int, ...] | None:
    """``None`` (all layers) or sorted unique layer indices, from ``"all"``, ``"0,2,5"``, an int or a sequence.

    Values come from ``--param layers=...`` JSON-decoded when possible, so ``3``, ``[1, 2]`` and the
    string ``"1,2"`` must all work.
    """
    if layers is None or (isinstance(layers, str) and layers.strip().lower() == "all"):
        return None
    if isinstance(layers, str):
        parts: list[Any] = [part.strip() for part in layers.split(",") if part.strip()]
    elif isinstance(layers, (list, tuple)):
        parts = list(layers)
    else:
        parts = [layers]
    indices: list[int] = []
    for part in parts:
        # bool is an int subclass and floats like 2.0 arrive from JSON: neither is a layer index.
        if isinstance(part, bool) or not isinstance(part, (int, str)):
            raise HarnessError(f"linear: layers must be 'all' or comma-separated integers, got {layers!r}")
        try:
            index = int(part)
        except ValueError:
            raise HarnessError(f"linear: layers must be 'all' or comma-separated integers, got {layers!r}") from None
        if index < 0:
            raise HarnessError(f"linear: layer indices must be >= 0, got {index} in {layers!r}")
        indices.append(index)
    if not indices:
        # An empty selection would run plain dense attention under the name "linear".
        raise HarnessError("linear: layers is empty; give 'all' or at least one layer index (or use 'sdpa')")
    return tuple(sorted(set(indices)))


@register_method("linear", aliases=("linear-attention",))
class LinearAttention(AttentionMethod):
    """Untrained linear attention on ``layers``, dense softmax attention (SDPA) on the other layers.

    Parameters:
        kernel: feature map, one of ``elu`` (default), ``relu``, ``hedgehog``. ``hedgehog`` uses the
            identity W, i.e. ``[softmax(x), softmax(-x)]`` untrained.
        layers: ``"all"`` (default), a comma-separated string ``"0,2,5"``, an int or a sequence of ints
            (0-based). Layers outside the selection run dense attention.

    Density is the fraction of the N x N score matrix computed: 0.0 for a linear-attention call (no
    score is ever formed) and 1.0 for a dense call. The schedule's dense warm-up steps and dense
    layers still take precedence over ``layers``.
    """

    capabilities = Capabilities(
        devices=("cpu", "cuda"),
        sparsity="linear",
        notes=f"untrained linear attention (LinVideo direct replacement); kernels: {', '.join(LINEAR_KERNELS)}; "
        f"{BACKEND_NOTE}",
    )

    def __init__(
        self, schedule: Schedule | None = None, kernel: str = "elu", layers: Any = "all", **params: Any
    ) -> None:
        super().__init__(schedule, **params)
        if kernel in KERNELS and kernel not in LINEAR_KERNELS:
            raise HarnessError(
                f"linear: kernel {kernel!r} is not offered here (1 + D + D^2 features per token); "
                f"choose one of: {', '.join(LINEAR_KERNELS)}"
            )
        self.kernel = check_kernel(kernel, LINEAR_KERNELS)
        self.layers = parse_layers(layers)
        self._maps: dict[int, FeatureMap] = {}

    def params(self) -> dict[str, Any]:
        return {"kernel": self.kernel, "layers": "all" if self.layers is None else list(self.layers)}

    def validate_for(self, num_layers: int, num_steps: int) -> None:
        super().validate_for(num_layers, num_steps)
        bad = [layer for layer in self.layers or () if layer >= num_layers]
        if bad:
            # Otherwise a typo'd layer would silently never be linearised.
            raise HarnessError(f"linear: layers {bad} do not exist: the model has {num_layers} layers (0-based)")

    def runs_linear(self, layer: int) -> bool:
        return self.layers is None or layer in self.layers

    def feature_map(self, layer: int, q: torch.Tensor) -> FeatureMap:
        """The layer's feature map, built on first use from q's ``(B, H, N, D)`` shape."""
        if layer not in self._maps:
            heads, head_dim = q.shape[1], q.shape[-1]
            self._maps[layer] = build_feature_map(self.kernel, heads, head_dim, trainable=False).to(q.device)
        return self._maps[layer]

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext
    ) -> tuple[torch.Tensor, float]:
        if not self.runs_linear(ctx.layer):
            return F.scaled_dot_product_attention(q, k, v), 1.0
        phi = self.feature_map(ctx.layer, q)
        return feature_linear_attention(q, k, v, phi, phi), 0.0
