"""svg's head profiling (:func:`methods.svg.profile_errors`, one masked softmax over all profiles) against the
same math written out per profile: in float64 (the reference) and in fp32, where it is the implementation before
the profiles were fused, op for op. The seeded row draw, the MSEs and the spatial/temporal decision must agree."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from methods import TokenGrid, build_method
from methods.sparse import CounterDraws
from methods.svg import PROFILE_BAND_FRAMES, SparseVideoGen, profile_errors, profile_key_blocks, profile_masks

GRID = TokenGrid(8, 4, 6)  # 192 tokens, 24 per frame: a band of 1.5 frames is 4 blocks of 8
BLOCK = 8
ROWS = 48
HEADS = 6


def method(seed: int) -> SparseVideoGen:
    built = build_method("svg", seed=seed, sampled_rows=ROWS, block_size=BLOCK)
    assert isinstance(built, SparseVideoGen)
    return built


def seeded_rows(seed: int) -> torch.Tensor:
    """The rows the method draws: ROWS among the first min(10,000, N) queries, a video's first draw of the
    counter-based draws seeded with ``seed``."""
    return CounterDraws(seed).randint(GRID.tokens, (ROWS,), torch.device("cpu"))


def reference_errors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``(B, H, 2)`` MSE of the sampled rows' attention under the spatial, then the temporal band, against the exact
    attention, each profile masked and attended on its own, in the inputs' dtype."""
    band_blocks = int(PROFILE_BAND_FRAMES * GRID.tokens_per_frame // BLOCK)
    scores = (q[:, :, rows] * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    exact = scores.softmax(dim=-1) @ v
    token = torch.arange(GRID.tokens)
    frame, position = token // GRID.tokens_per_frame, token % GRID.tokens_per_frame
    errors = []
    for order in (token, position * GRID.frames + frame):  # spatial: frame-major; temporal: position-major
        near = (order[rows, None] // BLOCK - order[None, :] // BLOCK).abs() < band_blocks
        masked = scores.masked_fill(~near, float("-inf")).softmax(dim=-1) @ v
        errors.append(((masked - exact) ** 2).mean(dim=(-2, -1)))
    return torch.stack(errors, dim=-1)


def random_qkv(seed: int, structured: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fresh normal q, k, v (1, HEADS, N, 16); ``structured`` adds to q and k a one-hot of the token's position in
    its frame (weight w) and of its frame (weight 4 - w), w rising over the heads, so the first heads favour the
    spatial band and the last ones the temporal band."""
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, HEADS, GRID.tokens, 16, generator=generator) for _ in range(3))
    if structured:
        token = torch.arange(GRID.tokens)
        position = F.one_hot(token % GRID.tokens_per_frame, 24)[:, :16].float()
        frame = F.one_hot(token // GRID.tokens_per_frame, 16).float()
        w = torch.linspace(0.5, 3.5, HEADS)[:, None, None]
        features = w * position + (4 - w) * frame
        q, k = q + 2 * features, k + 2 * features
    return q, k, v


def relative(errors: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest error of either MSE relative to the head's larger reference MSE (the scale the decision compares at;
    an MSE near zero is a difference of nearly equal outputs, exact only to that scale)."""
    return ((errors.double() - reference).abs() / reference.amax(dim=-1, keepdim=True)).max().item()


def assert_no_ties(errors: torch.Tensor) -> None:
    """The decision is decided: the two MSEs differ by far more than fp32 rounding."""
    margin = (errors[..., 1] - errors[..., 0]).abs() / errors.amax(dim=-1)
    assert margin.min() > 1e-3, margin


@pytest.mark.parametrize("structured", [False, True], ids=["random", "structured"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_profiling_matches_the_float64_reference_and_the_per_profile_decision(seed: int, structured: bool) -> None:
    """fp32 on CPU: the fused MSEs within 1e-5 of float64 (at the head's MSE scale), and the heads' decision equal
    to the per-profile math (float64 and fp32) on the rows the method's seeded generator draws."""
    q, k, v = random_qkv(seed, structured)
    rows = seeded_rows(seed)
    reference = reference_errors(q.double(), k.double(), v.double(), rows)
    assert_no_ties(reference)
    kept = profile_masks(profile_key_blocks(GRID, BLOCK, q.device), rows, 4)
    fused = profile_errors(q, k, v, rows, kept)
    assert relative(fused, reference) < 1e-5
    expected = reference[..., 1] < reference[..., 0]
    unfused = reference_errors(q, k, v, rows)
    assert torch.equal(unfused[..., 1] < unfused[..., 0], expected)
    assert torch.equal(method(seed).temporal_heads(q, k, v, GRID, BLOCK), expected)
    if structured:
        assert expected[0, 0].item() is False and expected[0, -1].item() is True


def test_bf16_profiling_differs_from_float64_only_by_rounding() -> None:
    """bf16 inputs: products and probabilities in bf16, accumulation in fp32; MSEs within bf16 rounding."""
    q, k, v = random_qkv(0, structured=True)
    rows = seeded_rows(0)
    reference = reference_errors(q.double(), k.double(), v.double(), rows)
    kept = profile_masks(profile_key_blocks(GRID, BLOCK, q.device), rows, 4)
    low = profile_errors(q.bfloat16(), k.bfloat16(), v.bfloat16(), rows, kept)
    assert low.dtype == torch.float32
    assert relative(low, reference) < 0.02
    assert torch.equal(low[..., 1] < low[..., 0], reference[..., 1] < reference[..., 0])


def test_profile_masks_keep_the_bands_and_everything_for_the_exact_profile() -> None:
    """Row 0 keeps every key; rows 1 and 2 keep the keys whose frame-major / position-major block is fewer than
    band_blocks from the row's."""
    rows = torch.tensor([0, 30, 191])
    kept = profile_masks(profile_key_blocks(GRID, BLOCK, torch.device("cpu")), rows, 4)
    assert kept.shape == (3, 3, GRID.tokens) and kept[0].all()
    assert kept[1, 1].nonzero().flatten().tolist() == list(range(0, 56))  # row 30 in block 3: blocks 0..6
    slot = lambda t: (t % 24) * 8 + t // 24  # noqa: E731 - position-major slot of frame-major token t
    assert kept[2, 2].tolist() == [slot(t) // BLOCK > slot(191) // BLOCK - 4 for t in range(GRID.tokens)]


def test_frames_shorter_than_the_band_unit_make_every_head_spatial() -> None:
    """1.5 frames under one block leaves both profiling masks empty: no head is called temporal (as argmin of two
    undefined errors did before)."""
    grid = TokenGrid(6, 2, 2)  # 4 tokens per frame: floor(6 / 8) = 0 blocks of band
    q, k, v = (torch.randn(1, 2, grid.tokens, 8) for _ in range(3))
    assert not method(0).temporal_heads(q, k, v, grid, BLOCK).any()
