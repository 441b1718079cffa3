"""LinVideo's attention: per-layer mixing of softmax and linear attention, and the converted model.

While training, every self-attention layer l outputs ``r_l * softmax(q, k, v) + (1 - r_l) * linear(q, k, v)``
from the same q, k, v (Eq. 8), with a learnable score ``r_l = rho_l``, kept in [0, 1] by projection after every
optimiser step (:meth:`TransferState.project_`), and per-layer feature maps, separate for q and k, applied after
qk-norm and RoPE. After training a layer is linear iff ``r_l < 0.5`` and only its chosen branch runs (the
converted model).

The converted model's softmax layers run any registered dense or sparse softmax method
(``softmax_method``, with its own ``softmax_params``): the paper's Appendix J notes that LinVideo "can be
further accelerated if we combine sparse attention" in the layers that keep softmax.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from harness.errors import HarnessError, UnsupportedError
from methods.base import AttentionContext, AttentionMethod, Capabilities, Density, Schedule, register_method
from methods.inner import build_inner, parse_inner, softmax_methods  # noqa: F401 (softmax_methods: re-exported)
from methods.kernels.linear_attention import KERNELS, build_feature_map, check_kernel, feature_linear_attention
from methods.kernels.linear_attention_triton import BACKEND_ENV, BACKEND_NOTE
from methods.params import Param

LINEAR_THRESHOLD = 0.5
# A final r farther than this from both 0 and 1 trained as a mix of the two branches, not as the one it is rounded to.
UNBINARISED_MARGIN = 0.1
# A converted checkpoint is a folder holding these two files and the spec that made them.
STATE_FILE, TRANSFORMER_FILE, SPEC_FILE = "linvideo.safetensors", "transformer.safetensors", "spec.json"


def conversion_notes(final_r: list[float], target: int) -> list[str]:
    """What a user should know of a finished conversion: a missed target, and layers whose final r (one per layer)
    lies between the branches, which the rounding at :data:`LINEAR_THRESHOLD` switches to one never run alone."""
    notes = []
    ended = sum(r < LINEAR_THRESHOLD for r in final_r)
    if ended != target:
        scores = ", ".join(f"{r:.2f}" for r in final_r)
        notes.append(f"{ended} layer(s) ended linear, not the target {target} "
                     f"(a layer is linear iff r < {LINEAR_THRESHOLD}; final r: {scores})")  # fmt: skip
    mixed = [f"{layer} (r = {r:.2f})" for layer, r in enumerate(final_r) if min(r, 1 - r) > UNBINARISED_MARGIN]
    if mixed:
        notes.append(f"layer(s) {', '.join(mixed)} ended between the two branches: the conversion rounds each to the "
                     "one branch it never ran alone, so the converted model can differ from the trained one (more "
                     "steps at the final alpha or a larger --lam binarise r)")  # fmt: skip
    return notes


class TransferState(nn.Module):
    """The trainable LinVideo state of one model: scores ``rho (layers,)`` and q/k feature maps per layer."""

    def __init__(self, num_layers: int, heads: int, head_dim: int, kernel: str = "hedgehog",
                 r_init: float = 0.95) -> None:  # fmt: skip
        super().__init__()
        if not 0.0 <= r_init <= 1.0:
            raise HarnessError(f"r_init must lie in [0, 1], got {r_init}")
        self.kernel = check_kernel(kernel)
        self.heads, self.head_dim = heads, head_dim
        self.rho = nn.Parameter(torch.full((num_layers,), float(r_init)))
        self.q_maps = nn.ModuleList(
            build_feature_map(kernel, heads, head_dim, trainable=True) for _ in range(num_layers)
        )
        self.k_maps = nn.ModuleList(
            build_feature_map(kernel, heads, head_dim, trainable=True) for _ in range(num_layers)
        )

    @property
    def num_layers(self) -> int:
        return self.rho.numel()

    def r(self) -> torch.Tensor:
        """Scores in [0, 1], ``(layers,)``: rho itself while it is kept projected (:meth:`project_`).

        The clamp is the identity on [0, 1] and passes the gradient there, the ends included; it only bounds a
        rho loaded from a run made before the projection (whose rho could leave the interval).
        """
        return self.rho.clamp(0.0, 1.0)

    @torch.no_grad()
    def project_(self) -> None:
        """Project rho back into [0, 1] (the trainer calls this after every optimiser step of r).

        A score is a constrained parameter, trained by projected gradient descent: a step that overshoots an
        end leaves r at that end, where the gradient still reaches it, so L_con and the objective can move it
        back. Clamping only in the forward pass (r = clamp(rho)) let rho run past an end, where the clamp passes
        no gradient and nothing brings it back: the layer could never move again. A straight-through clamp
        would keep the gradient but let rho drift arbitrarily far outside, so that a later correction takes as
        many steps as the overshoot did; the projection keeps no such hidden state.
        """
        self.rho.clamp_(0.0, 1.0)

    @torch.no_grad()
    def set_linear(self, layers: tuple[int, ...]) -> None:
        """Hard selection: r = 0 on ``layers``, 1 elsewhere."""
        self.rho.fill_(1.0)
        self.rho[list(layers)] = 0.0

    def linear_layers(self) -> tuple[int, ...]:
        """The layers a conversion makes linear: ``r < 0.5``."""
        return tuple(int(i) for i in torch.nonzero(self.r().detach() < LINEAR_THRESHOLD).flatten())

    def linear(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The layer's linear attention ``(B, H, N, D)``, accumulated in fp32."""
        return feature_linear_attention(q, k, v, self.q_maps[layer], self.k_maps[layer])

    def mixed(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Eq. 8: ``r * softmax + (1 - r) * linear`` from the same q, k, v ``(B, H, N, D)``."""
        r = self.r()[layer].to(v.dtype)
        return r * F.scaled_dot_product_attention(q, k, v) + (1 - r) * self.linear(layer, q, k, v)


@dataclass(frozen=True)
class LayerRoute:
    """Where a converted LinVideo sends one layer's calls (:meth:`LinVideo.route`): linear attention with the layer's
    ``(q, k)`` feature ``maps`` of ``state``, or (``maps`` ``None``) the softmax method, called with ``softmax_ctx``:
    the call's context with the softmax method's own route (built here: a context built in a compiled forward
    guards on every field, the step included)."""

    state: TransferState
    maps: tuple[nn.Module, nn.Module] | None
    softmax_ctx: AttentionContext | None = None


@register_method("linvideo", aliases=("lin-video",))
class LinVideo(AttentionMethod):
    """LinVideo: a converted model runs linear attention on its selected layers, softmax elsewhere.

    The state comes from ``bench train --method linvideo`` (a converted checkpoint: which layers are
    linear, feature-map weights, fine-tuned transformer weights). While training, :attr:`converted` is
    False and every layer mixes both branches by its score r. The softmax layers of a converted model run
    :attr:`softmax` (``softmax_method``, torch's SDPA by default), which sees every call of those layers with
    the same context; its schedule and own rules (radial's warm-up) decide which run dense, also in
    :meth:`runs_dense`, where the harness's processor asks before the forward. Density: 0 for a linear
    layer's call, the softmax method's density for a softmax call (mixed calls compute the full softmax, so 1).
    """

    kernel_variables = (BACKEND_ENV,)  # its linear layers; the softmax method adds its own
    capabilities = Capabilities(
        devices=("cpu", "cuda"),
        sparsity="linear",
        needs_training=True,
        notes="learned selective transfer + Hedgehog linear attention; needs a converted checkpoint (--checkpoint); "
        + BACKEND_NOTE,
    )
    state_params = ("kernel",)  # the feature maps' weights are the kernel's
    untrained_params = ("linear_layers",)  # a checkpoint fixes its own linear layers

    parameters = (
        Param("kernel", "choice", "hedgehog", "feature map of the linear layers (the checkpoint's own)",
              choices=KERNELS),
        Param("linear_layers", "layers", None, "untrained state with these layers linear, for latency only "
              "(a quality run needs --checkpoint)", optional=True, model_layers=True),
        Param("softmax_method", "method", "sdpa", "method of the softmax layers: a dense backend or a sparse "
              "method, e.g. radial (Appendix J)"),
        Param("softmax_params", "object", None, 'the softmax method\'s parameters as JSON, e.g. {"decay_factor": '
              "0.5} (default: its own defaults)", optional=True),
    )  # fmt: skip

    def __init__(self, schedule: Schedule | None = None, **params: Any) -> None:
        super().__init__(schedule, **params)
        self.kernel = self.settings["kernel"]
        self.state: TransferState | None = None
        self.converted = True
        self._linear: frozenset[int] = frozenset()
        # Latency at real shape needs no trained weights: an untrained state with these layers linear.
        layers = self.settings["linear_layers"]
        self.untrained_layers = None if layers is None else tuple(layers)
        self.softmax = build_inner("linvideo softmax_method", self.settings["softmax_method"],
                                   self.settings["softmax_params"], self.schedule, "softmax_params")  # fmt: skip

    @property
    def kernel_variables_used(self) -> tuple[str, ...]:
        return (*self.kernel_variables, *self.softmax.kernel_variables_used)

    @classmethod
    def parse_params(cls, raw: dict[str, Any]) -> dict[str, Any]:
        """As the base, and ``softmax_params`` typed by the schema of ``softmax_method``, which must be a softmax
        method (:func:`methods.inner.softmax_methods`)."""
        return parse_inner(
            "linvideo", super().parse_params(raw), "softmax_method", "softmax_params", "the softmax layers"
        )

    def params(self) -> dict[str, Any]:
        if self.state is None or not self.converted:
            linear = None if self.untrained_layers is None else list(self.untrained_layers)
        else:
            linear = list(self.state.linear_layers())
        return {"kernel": self.kernel, "linear_layers": linear, "trained": self.untrained_layers is None,
                "softmax_method": self.softmax.name, "softmax_params": self.softmax.params()}  # fmt: skip

    def validate_for(self, num_layers: int, num_steps: int) -> None:
        super().validate_for(num_layers, num_steps)
        self.softmax.validate_for(num_layers, num_steps)

    def check_supported(self, device: torch.device, dtype: torch.dtype) -> None:
        super().check_supported(device, dtype)
        try:
            self.softmax.check_supported(device, dtype)
        except UnsupportedError as exc:
            raise UnsupportedError(f"linvideo softmax_method: {exc}") from exc

    def attach(self, state: TransferState, converted: bool) -> None:
        """Use ``state`` (trained or being trained); ``converted=False`` mixes both branches by r."""
        if state.kernel != self.kernel:
            raise HarnessError(f"linvideo: state uses kernel {state.kernel!r}, the method {self.kernel!r}")
        self.state, self.converted = state, converted
        # Fixed once converted: no device sync on rho inside every attention call.
        self._linear = frozenset(state.linear_layers()) if converted else frozenset()

    def begin_video(self) -> None:
        """The softmax method's, which may draw (svg) or warm-start (svg2) within a video."""
        self.softmax.begin_video()

    def runs_softmax(self, layer: int) -> bool:
        """Whether ``layer``'s calls go to :attr:`softmax`: a converted model's layers that are not linear (the
        ``linear_layers`` of an untrained state before its first call builds it)."""
        linear = self._linear if self.state is not None else frozenset(self.untrained_layers or ())
        return self.converted and layer not in linear

    def runs_dense(self, ctx: AttentionContext) -> bool:
        """The schedule, and in the softmax layers the softmax method's own rules (radial's warm-up)."""
        return super().runs_dense(ctx) or (self.runs_softmax(ctx.layer) and self.softmax.runs_dense(ctx))

    def route(self, ctx: AttentionContext) -> LayerRoute | None:
        """The converted layer's branch and feature maps; ``None`` before the state exists or while training (every
        layer mixes both branches). Resolved before the forward, so that a compiled frame of :meth:`run` (one
        compiled on its own where the softmax method breaks the graph) holds no guard on the layer's number: one
        frame serves every linear layer and one every softmax layer."""
        if self.state is None or not self.converted:
            return None
        layer = ctx.layer
        if layer in self._linear:
            return LayerRoute(self.state, (self.state.q_maps[layer], self.state.k_maps[layer]))
        return LayerRoute(self.state, None, replace(ctx, route=self.softmax.route(ctx)))

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext,
            dense: bool | None = None) -> tuple[torch.Tensor, Density]:  # fmt: skip
        route = self._route(q, ctx)
        if route is not None and route.maps is None:
            return self.softmax.run(q, k, v, route.softmax_ctx, dense)
        return super().run(q, k, v, ctx, dense)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext
               ) -> tuple[torch.Tensor, Density]:  # fmt: skip
        route = self._route(q, ctx)
        if route is None:
            return self._state_for(q, ctx).mixed(ctx.layer, q, k, v), 1.0
        if route.maps is not None:
            return feature_linear_attention(q, k, v, *route.maps), 0.0
        return self.softmax.run(q, k, v, route.softmax_ctx)

    def _route(self, q: torch.Tensor, ctx: AttentionContext) -> LayerRoute | None:
        """The call's :meth:`route`: the one resolved before the forward if it belongs to the state in use."""
        state = self._state_for(q, ctx)  # attached first: it says which layers are linear
        resolved = ctx.route
        if isinstance(resolved, LayerRoute) and resolved.state is state:
            return resolved
        return self.route(ctx)

    def _state_for(self, q: torch.Tensor, ctx: AttentionContext) -> TransferState:
        """The state on q's device: the attached one, or an untrained one with ``linear_layers`` linear."""
        if self.state is None and self.untrained_layers is not None:
            self.attach(self._untrained_state(ctx.num_layers, q), converted=True)
        if self.state is None:
            raise HarnessError("linvideo needs a converted checkpoint: pass --checkpoint DIR (made by `bench train`)")
        if self.state.rho.device != q.device:
            self.state.to(q.device)
        return self.state

    def _untrained_state(self, num_layers: int, q: torch.Tensor) -> TransferState:
        state = TransferState(num_layers, q.shape[1], q.shape[-1], self.kernel).requires_grad_(False)
        state.set_linear(self.untrained_layers or ())
        return state.to(q.device)

    # -- state ------------------------------------------------------------------------------------

    def state_tensors(self) -> dict[str, torch.Tensor]:
        if self.state is None:
            return {}
        tensors = {"rho": self.state.rho.detach(), "shape": torch.tensor([self.state.heads, self.state.head_dim])}
        # The dropped branch of a softmax layer is not kept: only linear layers' maps are saved.
        for layer in self.state.linear_layers():
            for side, maps in (("q", self.state.q_maps), ("k", self.state.k_maps)):
                for name, tensor in maps[layer].state_dict().items():
                    tensors[f"{side}_maps.{layer}.{name}"] = tensor
        return tensors

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        try:
            rho, (heads, head_dim) = tensors["rho"], tensors["shape"].tolist()
        except (KeyError, ValueError) as exc:
            raise HarnessError(f"linvideo state is missing its scores or shape: {exc}") from exc
        state = TransferState(rho.numel(), int(heads), int(head_dim), self.kernel)
        state.rho.data.copy_(rho)
        expected = {f"{side}_maps.{layer}.{name}" for layer in state.linear_layers() for side in ("q", "k")
                    for name in state.q_maps[layer].state_dict()}  # fmt: skip
        given = set(tensors) - {"rho", "shape"}
        if given != expected:
            raise HarnessError(f"linvideo state does not match its scores: missing {sorted(expected - given)}, "
                               f"unexpected {sorted(given - expected)}")  # fmt: skip
        state.load_state_dict({**state.state_dict(), **{k: v for k, v in tensors.items() if k in expected}})
        self.attach(state.requires_grad_(False), converted=True)

    def load_checkpoint(self, path: Path, transformer: nn.Module) -> None:
        """A converted checkpoint folder: the method state and the fine-tuned transformer weights."""
        from harness.checkpoints import load_module_weights

        self.load_state(path / STATE_FILE)
        load_module_weights(transformer, path / TRANSFORMER_FILE)
