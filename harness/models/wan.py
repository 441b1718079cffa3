"""Wan 2.1 text-to-video through diffusers: ``wan1.3b``, ``wan14b`` and the test config ``wan-tiny``.

The sampler reproduces ``WanPipeline``'s loop (UniPC flow-matching with a shift, two transformer
passes per step for CFG, fp32 latents) but owns it, so that every step knows its index, timestep and
CFG branch, and stages can be timed. Random-weight builds keep the real architecture for latency;
by default they have no text encoder (prompt embeddings are seeded noise of the real shape), and
``build_random(text_encoder=True)`` adds a random full-size UMT5-XXL encoder to time prompt encoding.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any, ClassVar

import torch

from harness.errors import HarnessError, MissingWeightsError
from harness.models.base import ModelAdapter, StepHook, TrajectoryObserver
from harness.models.processor import AttentionRuntime, MethodAttnProcessor
from harness.models.weights import WeightsSource, check_hub_cache, missing_hub_message, resolve_weights
from harness.spec import Sampling
from methods.base import AttentionMethod

NUM_TRAIN_TIMESTEPS = 1000
SUBFOLDERS = ("transformer", "vae", "text_encoder", "tokenizer")  # of a diffusers checkout of Wan

WAN_1_3B_CONFIG: dict[str, Any] = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=12,
    attention_head_dim=128,
    in_channels=16,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    ffn_dim=8960,
    num_layers=30,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)
WAN_14B_CONFIG: dict[str, Any] = {**WAN_1_3B_CONFIG, "num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40}
# Wan 2.1's text encoder: the encoder of google/umt5-xxl (5.7B parameters), run in the model's dtype.
UMT5_XXL_CONFIG: dict[str, Any] = dict(
    vocab_size=256384,
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_heads=64,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu",
)


def build_transformer(config: dict[str, Any], device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A randomly initialised ``WanTransformer3DModel`` created on ``device`` in ``dtype``."""
    from diffusers import WanTransformer3DModel

    with built_on(device, dtype):
        transformer = WanTransformer3DModel(**config)
    return cast_transformer(transformer, dtype)


@contextmanager
def built_on(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Modules created inside are initialised directly on ``device`` in ``dtype`` (no CPU copy in fp32)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def cast_transformer(transformer: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast parameters to ``dtype`` except those diffusers keeps in fp32 (as ``from_pretrained`` does).

    Parameters only: the RoPE tables are buffers and keep their own dtype, as in diffusers.
    """
    keep = set(getattr(transformer, "_keep_in_fp32_modules", None) or ())
    for name, param in transformer.named_parameters():
        target = torch.float32 if keep.intersection(name.split(".")) else dtype
        if param.dtype != target:
            param.data = param.data.to(target)
    return transformer


def _seed_from_text(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & (2**63 - 1)


class ByteTokenizer:
    """UTF-8 bytes as token ids (0 = pad, 1 = end): a tokenizer that needs no vocabulary file."""

    vocab_size = 256 + 3

    def __init__(self, max_length: int) -> None:
        self.max_length = max_length

    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.zeros(len(prompts), self.max_length, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            tokens = [*(b + 3 for b in prompt.encode()[: self.max_length - 1]), 1]
            ids[row, : len(tokens)] = torch.tensor(tokens)
        return ids, (ids > 0).long()


class WanFamilyAdapter(ModelAdapter):
    """Shared machinery of every ``WanTransformer3DModel``-based adapter."""

    hub_id: ClassVar[str] = ""
    transformer_config: ClassVar[dict[str, Any]]
    text_length: ClassVar[int] = 512

    def __init__(
        self,
        transformer: torch.nn.Module,
        device: torch.device,
        dtype: torch.dtype,
        vae: torch.nn.Module | None = None,
        text_encoder: torch.nn.Module | None = None,
        tokenizer: Any = None,
    ) -> None:
        self.transformer = transformer.eval().requires_grad_(False)
        self.device, self.dtype = device, dtype
        self.vae = vae.eval().requires_grad_(False) if vae is not None else None
        self.text_encoder = text_encoder.eval().requires_grad_(False) if text_encoder is not None else None
        self.tokenizer = tokenizer
        self._runtime: AttentionRuntime | None = None

    @classmethod
    def validate_sampling(cls, sampling: Sampling) -> None:
        """Also reject a video longer or larger than the transformer's RoPE tables: at most
        ``rope_max_seq_len`` token positions per axis."""
        super().validate_sampling(sampling)
        limit = cls.transformer_config["rope_max_seq_len"]
        grid = cls.token_grid(sampling)
        pixels_per_position = cls.vae_spatial_stride * cls.patch_size[1]
        largest = {
            "frames": (grid.frames, (limit * cls.patch_size[0] - 1) * cls.vae_temporal_stride + 1),
            "height": (grid.height, limit * pixels_per_position),
            "width": (grid.width, limit * pixels_per_position),
        }
        for axis, (positions, most) in largest.items():
            if positions > limit:
                raise HarnessError(f"{cls.name}: {axis} {getattr(sampling, axis)} needs {positions} RoPE positions, "
                                   f"the model has {limit}: use at most {most}")  # fmt: skip

    # -- contract ----------------------------------------------------------------------------

    def self_attention_layers(self) -> list[torch.nn.Module]:
        return [block.attn1 for block in self.transformer.blocks]

    @contextmanager
    def use_method(self, method: AttentionMethod) -> Iterator[AttentionRuntime]:
        method.check_supported(self.device, self.dtype)
        layers = self.self_attention_layers()
        runtime = AttentionRuntime(method=method, num_layers=len(layers))
        originals = [layer.processor for layer in layers]
        for index, layer in enumerate(layers):
            layer.set_processor(MethodAttnProcessor(runtime, index))
        self._runtime = runtime
        try:
            yield runtime
        finally:
            for layer, processor in zip(layers, originals, strict=True):
                layer.set_processor(processor)
            self._runtime = None

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        text_dim = self.transformer.config.text_dim
        if self.text_encoder is None:
            # Random-weight builds: seeded noise of the real embedding shape, one draw per prompt text.
            rows = [
                torch.randn(self.text_length, text_dim, generator=torch.Generator().manual_seed(_seed_from_text(p)))
                for p in prompts
            ]
            return torch.stack(rows).to(self.device, self.dtype)
        ids, mask = self._tokenize(prompts)
        hidden = self.text_encoder(ids.to(self.device), mask.to(self.device)).last_hidden_state.to(self.dtype)
        # As Wan: keep each prompt's real tokens, zero the padding positions.
        return hidden * mask.to(self.device, hidden.dtype).unsqueeze(-1)

    def _tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(self.tokenizer, ByteTokenizer):
            return self.tokenizer(prompts)
        out = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.text_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        return out.input_ids, out.attention_mask

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        if self._runtime is not None:
            _, _, frames, height, width = latents.shape
            p_t, p_h, p_w = self.patch_size
            self._runtime.begin_forward(type(self).token_grid_from_latent(frames // p_t, height // p_h, width // p_w))
        out = self.transformer(
            hidden_states=latents.to(self.dtype),
            timestep=timestep.expand(latents.shape[0]),
            encoder_hidden_states=embeddings,
            return_dict=False,
        )
        return out[0]

    @staticmethod
    def token_grid_from_latent(frames: int, height: int, width: int):  # type: ignore[no-untyped-def]
        from methods.base import TokenGrid

        return TokenGrid(frames, height, width)

    def make_scheduler(self, shift: float) -> Any:
        from diffusers import UniPCMultistepScheduler

        return UniPCMultistepScheduler(
            num_train_timesteps=NUM_TRAIN_TIMESTEPS,
            prediction_type="flow_prediction",
            use_flow_sigmas=True,
            flow_shift=shift,
        )

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
        scheduler = runtime.method.scheduler(sampling) or self.make_scheduler(sampling.shift)
        scheduler.set_timesteps(sampling.steps, device=self.device)
        timesteps = scheduler.timesteps
        flow_times = (timesteps.detach().float().cpu() / NUM_TRAIN_TIMESTEPS).tolist()
        latents = noise.to(self.device, torch.float32)
        runtime.num_steps = len(timesteps)
        use_cfg = uncond is not None and sampling.cfg > 1.0
        if use_cfg and uncond.shape[0] != cond.shape[0]:
            uncond = uncond.expand(cond.shape[0], -1, -1)  # one null prompt for a batch of prompts
        for index, t in enumerate(timesteps):
            runtime.step, runtime.timestep = index, flow_times[index]
            with step_hook(index) if step_hook else nullcontext():
                runtime.cfg_branch = "cond"
                velocity = self.forward(latents, t, cond)
                if use_cfg:
                    runtime.cfg_branch = "uncond"
                    velocity_uncond = self.forward(latents, t, uncond)
                    velocity = velocity_uncond + sampling.cfg * (velocity - velocity_uncond)
                if observer is not None:
                    next_time = flow_times[index + 1] if index + 1 < len(flow_times) else 0.0
                    observer(index, flow_times[index], next_time, latents, velocity)
                latents = scheduler.step(velocity, t, latents, return_dict=False)[0]
        runtime.cfg_branch = "none"
        return latents

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            raise HarnessError(f"{self.name} was built without a VAE and cannot decode")
        config = self.vae.config
        # The VAE's device, not the caller's: a CPU-generated draw would otherwise reach CUDA convolutions.
        latents = latents.to(self.vae.device)
        mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1, 1).to(latents.device, latents.dtype)
        std = torch.tensor(config.latents_std).view(1, -1, 1, 1, 1).to(latents.device, latents.dtype)
        video = self.vae.decode((latents * std + mean).to(self.vae.dtype), return_dict=False)[0]
        frames = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return frames.permute(0, 2, 3, 4, 1).cpu()  # (B, C, F, H, W) -> (B, F, H, W, C)

    # -- building ----------------------------------------------------------------------------

    @classmethod
    def check_weights(cls, weights: str, allow_download: bool = False) -> None:
        if weights != "random" and cls.weights_kind == "pretrained":  # the toy's are built in, wan-tiny's random
            source = resolve_weights(weights, cls.hub_id, SUBFOLDERS, allow_download)
            check_hub_cache(source, cls.hub_id, SUBFOLDERS)

    @classmethod
    def load(cls, weights: str, device: torch.device, dtype: torch.dtype, allow_download: bool = False) -> ModelAdapter:
        if weights == "random":
            return cls.build_random(device, dtype)
        return cls._from_pretrained(resolve_weights(weights, cls.hub_id, SUBFOLDERS, allow_download), device, dtype)

    @classmethod
    def build_random(cls, device: torch.device, dtype: torch.dtype, text_encoder: bool = False) -> WanFamilyAdapter:
        """The real architecture with random weights (latency only), built directly on ``device``: transformer
        in ``dtype``, VAE in fp32 (as loaded from the hub). ``text_encoder``: also a random UMT5-XXL encoder in
        ``dtype`` (11 GiB in bf16) fed by a byte tokenizer padded to the real 512 tokens, so that prompt encoding
        costs what Wan's does; without it prompts are embedded as seeded noise. Needs ``transformers`` for it."""
        from diffusers import AutoencoderKLWan

        torch.manual_seed(0)
        transformer = build_transformer(cls.transformer_config, device, dtype)
        with torch.device(device):
            vae = AutoencoderKLWan()
        if not text_encoder:
            return cls(transformer, device, dtype, vae=vae)
        from transformers import UMT5Config, UMT5EncoderModel

        with built_on(device, dtype):
            encoder = UMT5EncoderModel(UMT5Config(**UMT5_XXL_CONFIG))
        return cls(transformer, device, dtype, vae, encoder, ByteTokenizer(cls.text_length))

    @classmethod
    def _from_pretrained(cls, source: WeightsSource, device: torch.device, dtype: torch.dtype) -> ModelAdapter:
        from diffusers import AutoencoderKLWan, WanTransformer3DModel
        from transformers import AutoTokenizer, UMT5EncoderModel

        common = {"local_files_only": source.local_files_only}
        try:
            transformer = WanTransformer3DModel.from_pretrained(
                source.location, subfolder="transformer", torch_dtype=dtype, **common
            )
            vae = AutoencoderKLWan.from_pretrained(
                source.location, subfolder="vae", torch_dtype=torch.float32, **common
            )
            text_encoder = UMT5EncoderModel.from_pretrained(
                source.location, subfolder="text_encoder", torch_dtype=dtype, **common
            )
            tokenizer = AutoTokenizer.from_pretrained(source.location, subfolder="tokenizer", **common)
        except (OSError, ValueError) as exc:
            raise MissingWeightsError(missing_hub_message(source, cls.hub_id, f"{type(exc).__name__}: {exc}")) from exc
        layers = transformer.config.num_layers
        if layers != cls.num_layers:
            raise HarnessError(
                f"weights at {source.location} have {layers} layers, but {cls.name} has {cls.num_layers}; "
                f"is this the right model?"
            )
        return cls(transformer.to(device), device, dtype, vae.to(device), text_encoder.to(device), tokenizer)


class Wan13B(WanFamilyAdapter):
    name = "wan1.3b"
    description = "Wan 2.1 T2V 1.3B (diffusers), 30 layers, 12 heads x 128"
    hub_id = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    transformer_config = WAN_1_3B_CONFIG
    num_layers = 30
    latent_channels = 16
    defaults = Sampling(steps=50, cfg=5.0, shift=5.0, height=480, width=832, frames=81, fps=16)


class Wan14B(WanFamilyAdapter):
    name = "wan14b"
    description = "Wan 2.1 T2V 14B (diffusers), 40 layers, 40 heads x 128"
    hub_id = "Wan-AI/Wan2.1-T2V-14B-Diffusers"
    transformer_config = WAN_14B_CONFIG
    num_layers = 40
    latent_channels = 16
    defaults = Sampling(steps=50, cfg=5.0, shift=5.0, height=720, width=1280, frames=81, fps=16)


WAN_TINY_CONFIG: dict[str, Any] = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=24,
    in_channels=4,
    out_channels=4,
    text_dim=32,
    freq_dim=64,
    ffn_dim=64,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=64,
)


class WanTiny(WanFamilyAdapter):
    """A small random Wan (transformer, VAE, UMT5 text encoder, byte tokenizer) for tests: same code paths."""

    name = "wan-tiny"
    description = "tiny random Wan config for tests (2 layers, 2 heads x 24, tiny VAE and UMT5)"
    transformer_config = WAN_TINY_CONFIG
    num_layers = 2
    latent_channels = 4
    text_length = 16
    weights_kind = "random"
    defaults = Sampling(steps=4, cfg=5.0, shift=5.0, height=64, width=64, frames=9, fps=8)

    @classmethod
    def load(cls, weights: str, device: torch.device, dtype: torch.dtype, allow_download: bool = False) -> ModelAdapter:
        if weights not in ("random", "builtin", ""):
            raise HarnessError("wan-tiny is always built from its seeded random config; do not pass --weights")
        from diffusers import AutoencoderKLWan
        from transformers import UMT5Config, UMT5EncoderModel

        torch.manual_seed(0)
        transformer = build_transformer(cls.transformer_config, device, dtype)
        vae = AutoencoderKLWan(
            base_dim=8,
            z_dim=cls.latent_channels,
            dim_mult=[1, 2, 2, 2],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
            latents_mean=[0.0] * cls.latent_channels,
            latents_std=[1.0] * cls.latent_channels,
        )
        tokenizer = ByteTokenizer(cls.text_length)
        text_encoder = UMT5EncoderModel(
            UMT5Config(
                vocab_size=ByteTokenizer.vocab_size,
                d_model=32,
                d_kv=8,
                d_ff=64,
                num_layers=2,
                num_heads=4,
                relative_attention_num_buckets=8,
                relative_attention_max_distance=16,
            )
        )
        return cls(transformer, device, dtype, vae.to(device), text_encoder.to(device), tokenizer)
