"""Radial attention (Li et al., NeurIPS 2025): a static mask whose density halves per doubling of frame distance.

For frames i and j at distance ``d = |i - j|`` (Wan variant of the official mask): key frame 0 is a
full attention sink; ``d = 0`` is full; ``d = 1`` keeps the diagonal band ``|col - row| <= s // 2``
inside the frame pair (s tokens per frame); for ``d >= 2``, band group ``g = bit_length(d)``, the
band half-width is ``max(2^bit_length(s) / 2^g x decay_factor, block)``, and once the undecayed
width ``2^bit_length(s) / 2^g`` drops below one block only every ``block / width``-th frame distance
is kept at all. Each frame pair's token mask is shrunk to the pair's ``block x block`` tiles
(a tile is kept when more than 60% of its non-empty columns are more than 1/3 dense), and the tiles
of all pairs are OR-ed. The result is a block-level mask, built once per grid and shared by all
heads and calls. Where the sequence is not a whole number of blocks, the ragged last tile row and
column are kept dense, as the official code does for the tokens past the last whole block.

Paper setting (Wan 2.1 14B, 768x1280x69): decay factor 0.2, first 12 of 50 steps dense
(``warmup_fraction`` 0.24), first layer dense.
"""

from __future__ import annotations

from typing import Any

import torch

from harness.errors import HarnessError
from methods.base import AttentionContext, Capabilities, Schedule, TokenGrid, register_method
from methods.kernels.block_sparse import BlockSparsePattern, num_blocks
from methods.params import Param
from methods.sparse import BlockSparseMethod, SparsePlan, block_sparse_parameters

COLUMN_DENSE = 1 / 3  # a column of a tile counts as dense above this fill
TILE_KEPT = 0.6  # a tile is kept when more than this share of its non-empty columns are dense


def band_half_width(distance: int, tokens_per_frame: int, decay_factor: float, block: int) -> float:
    """Half-width of the diagonal band kept between two frames ``distance`` apart (Wan variant)."""
    if distance == 0:
        return tokens_per_frame
    if distance == 1:
        return tokens_per_frame // 2
    decayed = 2 ** tokens_per_frame.bit_length() / 2 ** distance.bit_length() * decay_factor
    return max(decayed, block)


def keeps_frame_distance(distance: int, tokens_per_frame: int, block: int) -> bool:
    """False for the frame distances skipped once the undecayed band is narrower than one block."""
    width = 2 ** tokens_per_frame.bit_length() / 2 ** distance.bit_length()
    return width >= block or distance % int(block / width) == 0


def shrink_to_tiles(local: torch.Tensor, block: int) -> torch.Tensor:
    """Tiles of a (padded) token mask kept by the column-density rule; a trailing partial tile is dropped."""
    tiles_r, tiles_c = local.shape[0] // block, local.shape[1] // block
    view = local[: tiles_r * block, : tiles_c * block].view(tiles_r, block, tiles_c, block)
    column_fill = view.sum(dim=1).float() / block  # (tiles_r, tiles_c, block)
    nonempty = (column_fill > 0).sum(dim=-1)
    dense = (column_fill > COLUMN_DENSE).sum(dim=-1)
    return dense / (nonempty + 1e-9) > TILE_KEPT


def radial_tiles(grid: TokenGrid, decay_factor: float, block: int, device: torch.device) -> torch.Tensor:
    """``(nb, nb)`` bool kept tiles of the radial mask for a frame-major grid."""
    frames, per_frame, tokens = grid.frames, grid.tokens_per_frame, grid.tokens
    whole = tokens // block
    tiles = torch.zeros(num_blocks(tokens, block), num_blocks(tokens, block), dtype=torch.bool, device=device)
    tiles[whole:], tiles[:, whole:] = True, True
    offsets = torch.arange(per_frame, device=device)
    relative = (offsets[None, :] - offsets[:, None]).abs()
    span = -(-per_frame // block) * block
    for i in range(frames):
        for j in range(frames):
            distance = abs(i - j)
            if j == 0:
                local = torch.ones(per_frame, per_frame, dtype=torch.bool, device=device)
            elif keeps_frame_distance(distance, per_frame, block):
                local = relative <= band_half_width(distance, per_frame, decay_factor, block)
            else:
                continue
            row0, col0 = (i * per_frame) % block, (j * per_frame) % block
            padded = torch.zeros(row0 + span, col0 + span, dtype=torch.bool, device=device)
            padded[row0 : row0 + per_frame, col0 : col0 + per_frame] = local
            shrunk = shrink_to_tiles(padded, block)
            r, c = (i * per_frame) // block, (j * per_frame) // block
            rows, cols = min(shrunk.shape[0], tiles.shape[0] - r), min(shrunk.shape[1], tiles.shape[1] - c)
            tiles[r : r + rows, c : c + cols] |= shrunk[:rows, :cols]
    return tiles


@register_method("radial", aliases=("radial-attention",))
class RadialAttention(BlockSparseMethod):
    """Radial attention: static O(n log n) block mask from spatiotemporal energy decay."""

    capabilities = Capabilities(
        sparsity="static",
        data_dependent=False,
        notes="Radial: static mask, density halves per doubling of frame distance, decay 0.2, 24% warm-up, "
        "first layer dense",
    )
    pattern_kinds = frozenset({"tiles"})
    parameters = (
        Param("decay_factor", "float", 0.2, "scales the band widths of frame pairs two or more frames apart",
              min=0.0, min_open=True),
        Param("dense_first_layers", "int", 1, "first layers that always run dense", min=0, model_layers=True),
        *block_sparse_parameters(0.24, "paper: 12 of 50 steps"),
    )  # fmt: skip

    def __init__(self, schedule: Schedule | None = None, **params: Any) -> None:
        super().__init__(schedule, **params)
        self.decay_factor: float = self.settings["decay_factor"]
        self.dense_first_layers: int = self.settings["dense_first_layers"]
        self._patterns: dict[tuple[TokenGrid, int, torch.device], tuple[BlockSparsePattern, float]] = {}

    def paper_dense_layers(self, num_layers: int) -> int:
        return self.dense_first_layers

    def plan(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> SparsePlan:
        grid = ctx.grid
        if q.shape[-2] != grid.tokens:
            raise HarnessError(f"radial: {q.shape[-2]} tokens do not match the grid's {grid.tokens}")
        block = self.block_size(grid.tokens)
        key = (grid, block, q.device)
        if key not in self._patterns:
            tiles = radial_tiles(grid, self.decay_factor, block, q.device)
            pattern = BlockSparsePattern(tiles[None, None], grid.tokens, block)
            self._patterns[key] = (pattern, pattern.density())
        pattern, density = self._patterns[key]
        return SparsePlan(pattern, density=density)
