"""Untrained linear attention on chosen layers: LinVideo's "direct replacement" baseline.

The selected layers swap softmax attention for non-causal linear attention with a fixed kernel and
no training at all; the other layers keep dense softmax attention. It measures how far a video DiT
drifts when attention is linearised without the distillation that LinVideo adds.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from methods.base import AttentionContext, AttentionMethod, Capabilities, Schedule, register_method
from methods.kernels.linear_attention import FeatureMap, build_feature_map, feature_linear_attention
from methods.kernels.linear_attention_triton import BACKEND_ENV, BACKEND_NOTE
from methods.params import Param

# taylor is left out: its 1 + D + D^2 features (16,513 per token at D = 128) do not fit at video length.
LINEAR_KERNELS: tuple[str, ...] = ("elu", "relu", "hedgehog")


@register_method("linear", aliases=("linear-attention",))
class LinearAttention(AttentionMethod):
    """Untrained linear attention on ``layers``, dense softmax attention (SDPA) on the other layers.

    ``hedgehog`` uses the identity W, i.e. ``[softmax(x), softmax(-x)]`` untrained. Density is the
    fraction of the N x N score matrix computed: 0.0 for a linear-attention call (no score is ever
    formed) and 1.0 for a dense call. The schedule's dense warm-up steps and dense layers still take
    precedence over ``layers``.
    """

    kernel_variables = (BACKEND_ENV,)
    capabilities = Capabilities(
        devices=("cpu", "cuda"),
        sparsity="linear",
        notes=f"untrained linear attention (LinVideo direct replacement); kernels: {', '.join(LINEAR_KERNELS)}; "
        f"{BACKEND_NOTE}",
    )
    parameters = (
        Param("kernel", "choice", "elu", "feature map (taylor's 1 + D + D^2 features do not fit at video length)",
              choices=LINEAR_KERNELS),
        Param("layers", "layers_or_all", "all", "layers run with linear attention (0-based), the others dense",
              model_layers=True),
    )  # fmt: skip

    def __init__(self, schedule: Schedule | None = None, **params: Any) -> None:
        super().__init__(schedule, **params)
        self.kernel = self.settings["kernel"]
        layers = self.settings["layers"]
        self.layers: tuple[int, ...] | None = None if layers == "all" else tuple(layers)
        self._maps: dict[int, FeatureMap] = {}

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
