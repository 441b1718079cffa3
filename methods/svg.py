"""Sparse VideoGen (Xi et al., ICML 2025): spatial or temporal heads, chosen online per call.

Per call (after the dense warm-up), ``sampled_rows`` random query rows among the first
``sample_max_row`` are attended exactly and under two fixed profiling masks -- *spatial*, a band of
``|i - j| < floor(1.5 x tokens_per_frame / block)`` blocks in frame-major order, and *temporal*, the
same band in position-major order (same spatial position across frames) -- and each (batch, head)
takes the mask with the lower MSE. Temporal heads are permuted from frame-major ``(f, p)`` to
position-major ``(p, f)`` order (the layout transform), so both head types share one token mask:
``|q - kv| <= w`` or ``kv < tokens_per_frame`` (the first-frame sink, in each head's own order), with
``w`` the band of kept fraction ``sparsity`` (``w = N (1 - sqrt(1 - sparsity))``) rounded up to
whole blocks.

Paper setting (the repository's Wan 2.1 T2V 14B 720p script): sparsity 0.3, first 20% of steps
dense, ``floor(0.03 x layers)`` first layers dense (1 of 40; 0 of 30), 64 sampled rows from the
first 10,000 queries. As in the official code the mask is token level (partial diagonal tiles).

Speed: the official code runs that mask on FlexAttention. Here ``auto`` runs it, in eager on Hopper with
``flashinfer-python``, on ``flashinfer-split``: the band's full tiles on FlashInfer's BSR wrapper (one table for every
head, planned once per shape), the partial ones (the band's diagonal edges, the sink's ragged tile) on Flex, merged
by their log-sum-exps; the same output, 1.13x and 1.11x the density-scaled cuDNN time at Wan 1.3B and 14B on an H200
against flex-tuned's 1.34x and 1.25x (reports/gpu/h200/run_829fb7d/, run_3df0d93/).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from harness.errors import HarnessError
from methods.base import AttentionContext, Capabilities, Schedule, TokenGrid, register_method
from methods.kernels import permute_triton as permute
from methods.kernels.block_sparse import BlockSparsePattern, block_lengths, mask_tables, num_blocks
from methods.params import Param
from methods.sparse import BlockSparseMethod, CounterDraws, SparsePlan, block_sparse_parameters

PROFILE_BAND_FRAMES = 1.5  # the profiling masks' band, in frames (official: 1.5 x frame size)


def position_major_order(grid: TokenGrid, device: torch.device) -> torch.Tensor:
    """``(N,)`` frame-major token index at each position-major slot ``p * frames + f``."""
    return torch.arange(grid.tokens, device=device).view(grid.frames, grid.tokens_per_frame).t().reshape(-1)


def band_width(tokens: int, sparsity: float, tokens_per_frame: int, block: int) -> int:
    """Half-width w of the diagonal band ``|q - kv| <= w`` of area ``sparsity x N^2``, rounded up to blocks."""
    frames = tokens * (1.0 - math.sqrt(1.0 - sparsity)) / tokens_per_frame
    return math.ceil(frames * tokens_per_frame / block) * block


def band_with_sink_pattern(tokens: int, width: int, sink: int, block: int, device: torch.device) -> BlockSparsePattern:
    """Token pattern ``|q - kv| <= width or kv < sink`` with tiles classified analytically (no N x N mask)."""
    lengths = block_lengths(tokens, block, device)
    starts = torch.arange(num_blocks(tokens, block), device=device) * block
    ends = starts + lengths - 1  # last token of each block
    q_lo, q_hi = starts[:, None], ends[:, None]
    kv_lo, kv_hi = starts[None, :], ends[None, :]
    nearest = torch.maximum(torch.clamp(kv_lo - q_hi, min=0), torch.clamp(q_lo - kv_hi, min=0))
    farthest = torch.maximum(q_hi - kv_lo, kv_hi - q_lo)
    kept = (nearest <= width) | (kv_lo < sink)
    full = (farthest <= width) | (kv_hi < sink)
    width_t, sink_t = mask_tables(torch.tensor(width, device=device), torch.tensor(sink, device=device))

    def band_or_sink(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return ((q_idx - kv_idx).abs() <= width_t) | (kv_idx < sink_t)

    expand = (1, 1, *kept.shape)
    return BlockSparsePattern(kept.view(expand), tokens, block, full=full.view(expand), mask_mod=band_or_sink)


def profile_key_blocks(grid: TokenGrid, block: int, device: torch.device) -> torch.Tensor:
    """``(3, N)`` int32 block of each token under the exact, spatial and temporal profiles.

    Row 0 is all zeros (every key is near every row: the exact attention), row 1 the frame-major block (spatial),
    row 2 the block in position-major order ``p * frames + f`` (temporal)."""
    frame_major = torch.arange(grid.tokens, dtype=torch.int32, device=device)
    position_major = (frame_major % grid.tokens_per_frame) * grid.frames + frame_major // grid.tokens_per_frame
    return torch.stack((torch.zeros_like(frame_major), frame_major // block, position_major // block))


def profile_masks(key_blocks: torch.Tensor, rows: torch.Tensor, band_blocks: int) -> torch.Tensor:
    """``(3, R, N)`` bool: key ``j`` is kept for sampled row ``rows[r]`` when their blocks are ``< band_blocks``
    apart (:func:`profile_key_blocks`'s orders; the exact profile keeps all). Compared against both band ends,
    so no ``(3, R, N)`` integer distance is built."""
    row_blocks = key_blocks[:, rows, None]
    return (key_blocks[:, None] > row_blocks - band_blocks) & (key_blocks[:, None] < row_blocks + band_blocks)


def profile_errors(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor, kept: torch.Tensor
) -> torch.Tensor:
    """``(B, H, P - 1)`` fp32 MSE between the sampled rows' attention under each profile ``kept[1:]`` and the
    exact one ``kept[0]`` (q, k, v: ``(B, H, N, D)``; rows: ``(R,)``; kept: ``(P, R, N)`` bool).

    One product ``q[rows] k^T`` in the inputs' dtype (tensor cores for bf16/fp16), masked into all P profiles'
    logits at once (``-inf`` outside), one softmax (fp32 accumulation, probabilities rounded to the inputs' dtype
    for the product with v, as before) and one product with v, so each ``(B, H, P, R, N)`` tensor is written once
    in the inputs' dtype; fp32 copies of the scores and a copy, fill, softmax and cast per profile were most of
    this selection's time on an H200 (reports/gpu/h200/run_31f9aae). Only the small outputs are compared in fp32.
    """
    scores = (q[:, :, rows] * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    probs = torch.where(kept, scores[:, :, None], float("-inf")).softmax(dim=-1)
    out = (probs.flatten(2, 3) @ v).float().unflatten(2, kept.shape[:2])
    return ((out[:, :, 1:] - out[:, :, :1]) ** 2).mean(dim=(-2, -1))


@register_method("svg", aliases=("sparse-videogen", "sparse-video-gen"))
class SparseVideoGen(BlockSparseMethod):
    """Sparse VideoGen: online spatial/temporal head profiling, layout transform, band + sink mask."""

    kernel_variables = (permute.BACKEND_ENV,)  # its temporal layout
    capabilities = Capabilities(
        sparsity="dynamic",
        data_dependent=True,
        notes="SVG: per-head spatial/temporal profiling, band 0.3 + first-frame sink, 20% warm-up; Flex as upstream, "
        "or in eager on Hopper with FlashInfer its full tiles on BSR and the partial ones on Flex (flashinfer-split)",
    )
    pattern_kinds = frozenset({"token-level"})  # the band's edges cut tiles
    parameters = (
        Param("sparsity", "float", 0.3, "kept fraction of the band (the official sparsity argument is a density)",
              min=0.0, max=1.0, min_open=True),
        Param("sampled_rows", "int", 64, "query rows sampled for profiling", min=1),
        Param("sample_max_row", "int", 10_000, "rows are drawn among the first this many queries", min=1),
        Param("dense_layer_fraction", "float", 0.03, "floor(fraction x layers) first layers run dense",
              min=0.0, max=1.0),
        Param("seed", "int", 0, "seed of the row sampling (counter-based draws, so runs repeat)", min=0),
        *block_sparse_parameters(0.2, "paper: 20%"),
    )  # fmt: skip

    def __init__(self, schedule: Schedule | None = None, **params: Any) -> None:
        super().__init__(schedule, **params)
        self.sparsity: float = self.settings["sparsity"]
        self.dense_layer_fraction: float = self.settings["dense_layer_fraction"]
        self.sampled_rows: int = self.settings["sampled_rows"]
        self.sample_max_row: int = self.settings["sample_max_row"]
        self.draws = CounterDraws(self.settings["seed"])
        self._patterns: dict[tuple[int, int, int, torch.device], tuple[BlockSparsePattern, float]] = {}
        self._profile_blocks: dict[tuple[int, int, int, torch.device], torch.Tensor] = {}

    def begin_video(self) -> None:
        self.draws.reset()

    def paper_dense_layers(self, num_layers: int) -> int:
        return math.floor(self.dense_layer_fraction * num_layers)

    def temporal_heads(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: TokenGrid, block: int
    ) -> torch.Tensor:
        """``(B, H)`` bool: heads whose sampled rows are better served by the temporal mask (lower MSE)."""
        tokens = q.shape[-2]
        rows = self.draws.randint(min(self.sample_max_row, tokens), (min(self.sampled_rows, tokens),), q.device)
        band_blocks = int(PROFILE_BAND_FRAMES * grid.tokens_per_frame // block)
        if band_blocks == 0:  # both profiling masks are empty (frames shorter than a block): nothing to compare
            return torch.zeros(q.shape[:2], dtype=torch.bool, device=q.device)
        key = (grid.tokens, grid.tokens_per_frame, block, q.device)
        if key not in self._profile_blocks:
            self._profile_blocks[key] = profile_key_blocks(grid, block, q.device)
        errors = profile_errors(q, k, v, rows, profile_masks(self._profile_blocks[key], rows, band_blocks))
        return errors[..., 1] < errors[..., 0]  # ties go to spatial, as argmin does

    def band_pattern(self, grid: TokenGrid, block: int, device: torch.device) -> tuple[BlockSparsePattern, float]:
        """The shared band + sink pattern for this grid and its exact density (built once per shape)."""
        key = (grid.tokens, grid.tokens_per_frame, block, device)
        if key not in self._patterns:
            width = band_width(grid.tokens, self.sparsity, grid.tokens_per_frame, block)
            pattern = band_with_sink_pattern(grid.tokens, width, grid.tokens_per_frame, block, device)
            self._patterns[key] = (pattern, pattern.density())
        return self._patterns[key]

    def plan(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> SparsePlan:
        grid = ctx.grid
        if q.shape[-2] != grid.tokens:
            raise HarnessError(f"svg: {q.shape[-2]} tokens do not match the grid's {grid.tokens}")
        block = self.block_size(grid.tokens)
        temporal = self.temporal_heads(q, k, v, grid, block)
        identity = torch.arange(grid.tokens, device=q.device)
        order = torch.where(temporal[..., None], position_major_order(grid, q.device), identity)
        pattern, density = self.band_pattern(grid, block, q.device)
        return SparsePlan(pattern, q_order=order, density=density)
