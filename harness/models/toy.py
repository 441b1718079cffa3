"""The embedded default model: a small Wan transformer in pixel space trained on the toy world.

Same ``WanTransformer3DModel`` class as Wan 2.1, no VAE (pixels are the latents, in [-1, 1]),
a small learned prompt encoder, rectified flow with Wan's sampler. Its checkpoint ships in the package.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch

from harness.models.base import ModelAdapter
from harness.models.wan import WanFamilyAdapter, cast_transformer
from harness.spec import Sampling
from harness.toyworld import world
from harness.toyworld.checkpoint import SHIPPED_CHECKPOINT, TOY_TRANSFORMER_CONFIG, load_checkpoint
from harness.toyworld.encoder import MAX_WORDS, PromptEncoder, check_toy_prompt, tokenize


class ToyModel(WanFamilyAdapter):
    name = "toy"
    description = "toy-world teacher shipped with the package: Wan transformer, pixel space, 8 layers"
    transformer_config = TOY_TRANSFORMER_CONFIG
    num_layers = 8
    latent_channels = 3
    patch_size = (1, 4, 4)
    vae_temporal_stride = 1
    vae_spatial_stride = 1
    text_length = MAX_WORDS
    weights_kind = "builtin"
    defaults = Sampling(steps=20, cfg=4.0, shift=3.0, height=world.HEIGHT, width=world.WIDTH,
                        frames=world.FRAMES, fps=8)  # fmt: skip
    prompt_encoder: ClassVar[type[PromptEncoder]] = PromptEncoder
    default_eval: ClassVar[tuple[str, ...]] = ("toybench",)
    #: Held-out prompts a run uses when it names none (the evaluation split of the toy world).
    default_prompt_count: ClassVar[int] = 64

    @classmethod
    def training_prompts(cls, count: int, seed: int) -> tuple[str, ...]:
        """Prompts of the training split only: held-out combinations never reach a distillation either."""
        import random

        rng = random.Random(seed)
        return tuple(world.sample_placed_scene(rng, "train")[0].prompt for _ in range(count))

    @classmethod
    def default_prompts(cls) -> tuple[str, ...]:
        return tuple(scene.prompt for scene, _ in world.eval_scenes(cls.default_prompt_count))

    def __init__(self, transformer: torch.nn.Module, encoder: torch.nn.Module, device: torch.device,
                 dtype: torch.dtype) -> None:  # fmt: skip
        super().__init__(cast_transformer(transformer.to(device), dtype), device, dtype)
        self.encoder = encoder.to(device).eval().requires_grad_(False)
        self.checkpoint: Path | None = None

    @classmethod
    def load(cls, weights: str, device: torch.device, dtype: torch.dtype, allow_download: bool = False) -> ModelAdapter:
        path = SHIPPED_CHECKPOINT if weights in ("", "builtin") else Path(weights).expanduser()
        transformer, encoder, _ = load_checkpoint(path)
        model = cls(transformer, encoder, device, dtype)
        model.checkpoint = path
        return model

    def weights_identity(self) -> dict[str, str]:
        from harness.checkpoints import file_sha256

        if self.checkpoint is None:
            return {}
        return {"checkpoint": self.checkpoint.name, "sha256": file_sha256(self.checkpoint)}

    @classmethod
    def validate_prompts(cls, prompts: list[str]) -> None:
        """Its vocabulary, and its grammar for every non-empty prompt (the empty one is the CFG null prompt)."""
        tokenize(prompts)
        for prompt in prompts:
            if prompt:
                check_toy_prompt(prompt)

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        return self.encoder(tokenize(prompts).to(self.device)).to(self.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] ``(B, 3, F, H, W)`` -> uint8 ``(B, F, H, W, 3)``."""
        return ((latents.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1).cpu()
