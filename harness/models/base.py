"""The model contract and the model registry.

An adapter owns a video diffusion transformer and everything needed to sample from it: prompt
encoding, the sampler, decoding, the token grid, and the hook that routes self-attention through
an attention method. Class-level facts (layer count, strides, default sampling) let the harness
validate a spec before any weights are loaded.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import ClassVar

import torch

from harness.errors import HarnessError
from harness.models.processor import AttentionRuntime
from harness.registry import Registry
from harness.spec import Sampling
from methods.base import AttentionMethod, TokenGrid

StepHook = Callable[[int], AbstractContextManager[None]]
# Called at every sampler step with (index, t, t_next, x_t, guided velocity); t is the flow time in [0, 1].
TrajectoryObserver = Callable[[int, float, float, torch.Tensor, torch.Tensor], None]


class ModelAdapter(ABC):
    """A text-to-video model behind one interface."""

    name: ClassVar[str]
    description: ClassVar[str]
    defaults: ClassVar[Sampling]
    num_layers: ClassVar[int]
    latent_channels: ClassVar[int]
    patch_size: ClassVar[tuple[int, int, int]] = (1, 2, 2)
    vae_temporal_stride: ClassVar[int] = 4
    vae_spatial_stride: ClassVar[int] = 8
    weights_kind: ClassVar[str] = "pretrained"  # or "builtin" (shipped) / "random" (test configs)

    device: torch.device
    dtype: torch.dtype
    transformer: torch.nn.Module

    # -- facts about shapes, available before loading --------------------------------------

    @classmethod
    def validate_sampling(cls, sampling: Sampling) -> None:
        """Reject a resolution or frame count this model's VAE and patching cannot take."""
        sampling.validate()
        if (sampling.frames - 1) % cls.vae_temporal_stride:
            lo = (sampling.frames - 1) // cls.vae_temporal_stride * cls.vae_temporal_stride + 1
            raise HarnessError(
                f"{cls.name}: frames must be {cls.vae_temporal_stride}k+1 for its VAE; "
                f"got {sampling.frames}, nearest valid {lo} or {lo + cls.vae_temporal_stride}"
            )
        multiple = cls.vae_spatial_stride * cls.patch_size[1]
        for axis in ("height", "width"):
            value = getattr(sampling, axis)
            if value % multiple:
                raise HarnessError(f"{cls.name}: {axis} must be a multiple of {multiple}, got {value}")

    @classmethod
    def validate_prompts(cls, prompts: list[str]) -> None:
        """Reject prompts this model cannot encode (most models take any text)."""
        return None

    @classmethod
    def default_prompts(cls) -> tuple[str, ...]:
        """Prompts of a run that names none."""
        return ("a red fox runs through fresh snow at dawn",)

    def weights_identity(self) -> dict[str, str]:
        """What identifies the loaded weights in a record (e.g. a checkpoint's sha256); empty if unknown."""
        return {}

    @classmethod
    def training_prompts(cls, count: int, seed: int) -> tuple[str, ...]:
        """Prompts for data-free collection when the user names none (a model with a prompt world)."""
        raise HarnessError(f"{cls.name} has no built-in training prompts: pass --prompt-file (one prompt per line)")

    #: Metric suites a run of this model computes when none are named (``--eval``).
    default_eval: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def latent_shape(cls, sampling: Sampling) -> tuple[int, int, int, int]:
        """(channels, latent frames, latent height, latent width) of one sample."""
        return (
            cls.latent_channels,
            (sampling.frames - 1) // cls.vae_temporal_stride + 1,
            sampling.height // cls.vae_spatial_stride,
            sampling.width // cls.vae_spatial_stride,
        )

    @classmethod
    def token_grid(cls, sampling: Sampling) -> TokenGrid:
        _, frames, height, width = cls.latent_shape(sampling)
        p_t, p_h, p_w = cls.patch_size
        return TokenGrid(frames // p_t, height // p_h, width // p_w)

    # -- building ----------------------------------------------------------------------------

    @classmethod
    def check_weights(cls, weights: str, allow_download: bool = False) -> None:
        """Raise :class:`~harness.errors.MissingWeightsError` if :meth:`load` could not find ``weights`` (without
        importing or building anything: the preflight calls it). Built-in and random weights: nothing to check."""
        return None

    @classmethod
    @abstractmethod
    def load(cls, weights: str, device: torch.device, dtype: torch.dtype, allow_download: bool = False) -> ModelAdapter:
        """Build the model. ``weights``: a local folder, a hub id, ``random`` or ``builtin``."""

    # -- running -----------------------------------------------------------------------------

    @abstractmethod
    def self_attention_layers(self) -> list[torch.nn.Module]:
        """The self-attention modules, in depth order (index = layer in AttentionContext)."""

    @abstractmethod
    def use_method(self, method: AttentionMethod) -> AbstractContextManager[AttentionRuntime]:
        """Route every self-attention call through ``method`` inside the ``with`` block."""

    @abstractmethod
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Prompt embeddings ``(len(prompts), text_tokens, text_dim)`` on the model's device."""

    @abstractmethod
    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        """One transformer forward: predicted velocity, same shape as ``latents`` (B, C, F, H, W)."""

    @abstractmethod
    def sample(
        self,
        noise: torch.Tensor,
        cond: torch.Tensor,
        uncond: torch.Tensor | None,
        sampling: Sampling,
        runtime: AttentionRuntime,
        step_hook: StepHook | None = None,
        observer: TrajectoryObserver | None = None,
    ) -> torch.Tensor:
        """Run the sampler from ``noise`` (t = 1) to clean latents, updating ``runtime`` each step.

        ``observer`` sees every step's state and guided velocity (data-free collection uses it).
        """

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents on any device -> video frames, uint8 ``(B, frames, height, width, 3)`` on CPU."""

    def iter_layers(self) -> Iterator[tuple[int, torch.nn.Module]]:
        return enumerate(self.self_attention_layers())


MODELS: Registry[type[ModelAdapter]] = Registry("model", entry_point_group="attention_bench.models")
MODELS.add("wan1.3b", "harness.models.wan:Wan13B", aliases=("wan2.1-t2v-1.3b", "wan-1.3b"))
MODELS.add("wan14b", "harness.models.wan:Wan14B", aliases=("wan2.1-t2v-14b", "wan-14b"))
MODELS.add("wan-tiny", "harness.models.wan:WanTiny", aliases=("tiny",))
MODELS.add("toy", "harness.models.toy:ToyModel", aliases=("toy-teacher",))
