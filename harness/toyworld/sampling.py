"""Sample toy clips for scenes, in batches, with any attention method; score them with ToyBench."""

from __future__ import annotations

import torch

from harness.models.toy import ToyModel
from harness.spec import Sampling
from harness.toyworld import world
from methods import build_method
from methods.base import AttentionMethod


def initial_noise_batch(shape: tuple[int, ...], seeds: list[int]) -> torch.Tensor:
    """One CPU-generated noise draw per seed, as in paired generation (same seed, same noise)."""
    from harness.generate import initial_noise

    return torch.cat([initial_noise((1, *shape), seed) for seed in seeds])


@torch.inference_mode()
def sample_videos(model: ToyModel, prompts: list[str], seeds: list[int], sampling: Sampling,
                  method: AttentionMethod | None = None, batch_size: int = 32) -> torch.Tensor:  # fmt: skip
    """uint8 videos ``(len(prompts), F, H, W, 3)``; prompt i is sampled from seed i."""
    method = method or build_method("sdpa")
    shape = ToyModel.latent_shape(sampling)
    videos = []
    with model.use_method(method) as runtime:
        uncond = model.encode_prompts([sampling.negative_prompt])
        for begin in range(0, len(prompts), batch_size):
            part = prompts[begin : begin + batch_size]
            noise = initial_noise_batch(shape, seeds[begin : begin + batch_size])
            latents = model.sample(noise, model.encode_prompts(part), uncond, sampling, runtime)
            videos.append(model.decode(latents))
    return torch.cat(videos)


def heldout_prompts(count: int) -> list[str]:
    return [scene.prompt for scene, _ in world.eval_scenes(count)]


def toybench_of(model: ToyModel, count: int, sampling: Sampling | None = None, method: AttentionMethod | None = None,
                seed: int = 0) -> dict[str, float]:  # fmt: skip
    """Mean ToyBench scores of ``count`` held-out prompts (seeds ``seed..seed+count-1``)."""
    from harness.eval.toybench import score_clips

    prompts = heldout_prompts(count)
    videos = sample_videos(model, prompts, list(range(seed, seed + count)), sampling or ToyModel.defaults, method)
    return score_clips(list(videos), prompts)
