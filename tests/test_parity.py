"""The harness's attention processor reproduces diffusers' Wan processor exactly (fp32, wan-tiny)."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch

from harness.models.processor import MethodAttnProcessor, apply_interleaved_rope
from harness.models.wan import WanTiny
from methods import AttentionMethod, build_method


@pytest.fixture(scope="module")
def inputs(tiny_model):
    """Random latents of wan-tiny's default shape, one prompt embedding and a mid timestep."""
    latents = torch.randn(1, *WanTiny.latent_shape(WanTiny.defaults))
    with torch.inference_mode():
        embeddings = tiny_model.encode_prompts(["a prompt"])
    return latents, torch.tensor(500.0), embeddings


@pytest.mark.parametrize("name", ["sdpa", "math"])
def test_harness_processor_matches_diffusers(tiny_model, inputs, name: str) -> None:
    """Transformer output through the harness processor equals diffusers' own within 1e-5 (fp32)."""
    latents, timestep, embeddings = inputs
    with torch.inference_mode():
        expected = tiny_model.forward(latents, timestep, embeddings)
        with tiny_model.use_method(build_method(name)) as runtime:
            actual = tiny_model.forward(latents, timestep, embeddings)
    assert actual.shape == latents.shape
    assert expected.abs().max() > 0
    diff = (actual - expected).abs().max().item()
    assert diff <= 1e-5, f"{name}: max abs difference {diff:.3g}"
    assert runtime.method.density.mean() == 1.0


def test_use_method_swaps_only_self_attention_and_restores(tiny_model) -> None:
    """Inside use_method every attn1 uses the harness processor, attn2 stays diffusers'; all restored after."""
    blocks = tiny_model.transformer.blocks
    before = [(block.attn1.processor, block.attn2.processor) for block in blocks]
    with tiny_model.use_method(build_method("sdpa")):
        assert all(isinstance(block.attn1.processor, MethodAttnProcessor) for block in blocks)
        assert [block.attn1.processor.layer for block in blocks] == list(range(len(blocks)))
        assert [block.attn2.processor for block in blocks] == [b for _, b in before]
    assert [(block.attn1.processor, block.attn2.processor) for block in blocks] == before


def test_use_method_restores_processors_after_error(tiny_model) -> None:
    """An exception inside use_method still restores diffusers' processors."""
    before = [layer.processor for layer in tiny_model.self_attention_layers()]
    with pytest.raises(RuntimeError, match="boom"), tiny_model.use_method(build_method("sdpa")):
        raise RuntimeError("boom")
    assert [layer.processor for layer in tiny_model.self_attention_layers()] == before


class RecordingDense(AttentionMethod):
    """Dense attention that records every context and the q shape it was called with."""

    name: ClassVar[str] = "recording-for-test"

    def __init__(self, schedule=None) -> None:  # type: ignore[no-untyped-def]
        super().__init__(schedule)
        self.calls: list[tuple] = []

    def attend(self, q, k, v, ctx):  # type: ignore[no-untyped-def]
        self.calls.append((ctx.layer, ctx.step, ctx.cfg_branch, ctx.num_steps, ctx.grid.tokens, q.shape))
        return torch.nn.functional.scaled_dot_product_attention(q, k, v), 1.0


def test_sampler_passes_layer_step_branch_and_grid_to_method(tiny_model) -> None:
    """Each sampling step calls the method per layer and CFG branch with the right context and token grid."""
    from dataclasses import replace

    sampling = replace(WanTiny.defaults, steps=2)
    method = RecordingDense()
    grid = WanTiny.token_grid(sampling)
    with torch.inference_mode(), tiny_model.use_method(method) as runtime:
        cond = tiny_model.encode_prompts(["a prompt"])
        uncond = tiny_model.encode_prompts([""])
        noise = torch.randn(1, *WanTiny.latent_shape(sampling))
        tiny_model.sample(noise, cond, uncond, sampling, runtime)
    heads, head_dim = 2, 24
    expected = [
        (layer, step, branch, 2, grid.tokens, torch.Size([1, heads, grid.tokens, head_dim]))
        for step in range(2) for branch in ("cond", "uncond") for layer in range(2)
    ]  # fmt: skip
    assert method.calls == expected


def naive_complex_rope(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (2i, 2i+1) of x (B, N, H, D) as complex numbers by exp(i * theta) (N, D/2)."""
    pairs = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2).contiguous())
    rotation = torch.polar(torch.ones_like(theta), theta)[None, :, None, :]
    return torch.view_as_real(pairs * rotation).flatten(-2)


def test_interleaved_rope_matches_complex_rotation() -> None:
    """apply_interleaved_rope with Wan's repeat-interleaved tables equals a complex-number rotation."""
    batch, tokens, heads, dim = 2, 7, 3, 16
    x = torch.randn(batch, tokens, heads, dim, dtype=torch.float64)
    theta = torch.rand(tokens, dim // 2, dtype=torch.float64) * 20 - 10
    cos = theta.cos().repeat_interleave(2, dim=-1)[None, :, None, :]
    sin = theta.sin().repeat_interleave(2, dim=-1)[None, :, None, :]
    out = apply_interleaved_rope(x, cos, sin)
    torch.testing.assert_close(out, naive_complex_rope(x, theta), rtol=1e-12, atol=1e-12)


def test_interleaved_rope_matches_diffusers_tables(tiny_model) -> None:
    """With diffusers' own Wan RoPE tables of wan-tiny the helper matches the complex rotation."""
    rope = tiny_model.transformer.rope
    latents = torch.zeros(1, *WanTiny.latent_shape(WanTiny.defaults))
    cos, sin = rope(latents)
    x = torch.randn(1, cos.shape[1], 2, cos.shape[-1], dtype=torch.float64)
    theta = torch.atan2(sin[0, :, 0, 0::2], cos[0, :, 0, 0::2]).double()
    assert torch.allclose(cos[..., 0::2], cos[..., 1::2]) and torch.allclose(sin[..., 0::2], sin[..., 1::2])
    out = apply_interleaved_rope(x, cos.double(), sin.double())
    # Tolerance allows for tables kept in fp32 (cos^2 + sin^2 == 1 only to ~1e-7 then).
    torch.testing.assert_close(out, naive_complex_rope(x, theta), rtol=0, atol=1e-6)
