"""Block-sparse attention shared by the sparse methods: one pattern type, a compiled FlexAttention
path for the GPU and a masked dense path (the same output) for CPU, tests and the toy model.

A method describes what one attention call computes as a :class:`BlockSparsePattern`: a small
boolean table of kept tiles (query block x key block) per batch and head -- never an N x N mask --
and, optionally, which kept tiles are only partly kept, with a token-level ``mask_mod`` deciding
inside those.

    pattern = BlockSparsePattern(kept, seq_len=N, block_size=128)                      # whole tiles
    pattern = BlockSparsePattern(kept, N, 128, full=full, mask_mod=band)              # token level
    pattern = BlockSparsePattern(None, N, 128, variable=blocks, tables=build)  # tables built on first read
    out = block_sparse_attention(q, k, v, pattern)        # sparse_backends: Flex on CUDA, masked SDPA on CPU
    pattern.density()          # kept fraction of the N x N score matrix (exact)
    pattern.kept_fraction()    # the same as a 0-d tensor: what methods return per call (the log reads it)
    pattern.tile_density()     # fraction of entries inside computed tiles (what the kernel does)
    pattern.block_mask()       # FlexAttention BlockMask built from block indices
    pattern.dense_mask()       # (B, H, N, N) bool -- CPU and tests only
    pattern.regrouped(128)     # the same token mask over 128 x 128 tiles (what Flex runs on CUDA)
    pattern.kind               # tiles, token-level or variable: what a backend must run (PatternKind)

Block sizes: FlexAttention's CUDA kernels take tiles of :data:`FLEX_TILE` tokens, but the methods pick
smaller blocks on short sequences (32 on the toy's 512 tokens, 64 on a 1,950-token clip; SLA's 8). The
Flex path therefore runs any pattern whose blocks are not multiples of that tile through
:meth:`BlockSparsePattern.regrouped`: the same token mask over 128-token tiles, the small blocks looked
up per token pair by a ``mask_mod``. Densities always come from the method's own pattern.

Selection helpers (per query block): :func:`select_by_cumulative_mass` (XAttention's threshold,
SVG2's top-p), :func:`select_top_fraction` (a fixed kept fraction) and :func:`select_by_cost_budget` (the
highest-scored entries up to a stated share of a cost, e.g. tokens: a fixed density). Token permutations (SVG's
temporal layout, SVG2's clusters): :func:`permute_tokens`, :func:`unpermute_tokens`.
The method base class that runs a pattern under the step/layer schedule is
:class:`methods.sparse.BlockSparseMethod`.

``mask_mod`` follows FlexAttention's signature ``(b, h, q_idx, kv_idx) -> bool`` and must be written
with broadcastable tensor ops (comparisons, arithmetic, indexing small tensors by the index
arguments), so that the CPU path can evaluate it on whole index grids. Values that change between
calls (band widths, cluster labels) must be tensors captured by the closure, not Python numbers:
a changed Python constant is a recompile of the compiled kernel. Every tensor it reads goes through
:func:`mask_tables` first: inside a compiled model Inductor cannot read one that is still a fused expression.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, FlexKernelOptions, flex_attention

try:
    from torch.nn.attention.flex_attention import AuxRequest
except ImportError:  # torch < 2.9: return_lse
    AuxRequest = None  # type: ignore[assignment,misc]

from harness.errors import HarnessError
from methods.kernels import OP_NAMESPACE, needs_gradients
from methods.kernels import permute_triton as permute
from methods.kernels import ranked_selection_triton as ranked

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
#: What a pattern is made of (:attr:`BlockSparsePattern.kind`), which decides the backends that can run it:
#: ``tiles`` whole tiles of equal size (every kept tile full; radial, xattn, SLA), ``token-level`` tiles a
#: ``mask_mod`` keeps in part (svg's band), ``variable`` blocks of unequal sizes (svg2's clusters, given as
#: token-level tiles too).
PatternKind = Literal["tiles", "token-level", "variable"]
PATTERN_KINDS: tuple[PatternKind, ...] = get_args(PatternKind)
#: Each kind as messages name it.
KIND_DESCRIPTIONS: dict[PatternKind, str] = {
    "tiles": "whole tiles",
    "token-level": "token-level pattern (partial tiles)",
    "variable": "variable-size blocks",
}
#: Query and key tokens per tile of FlexAttention's CUDA kernels (their configs take tiles of 128 queries
#: and 64 or 128 keys): the Flex path regroups patterns whose blocks are not multiples of it.
FLEX_TILE = 128

# Each new query length or dtype compiles the kernel once; a whole benchmark sees a handful. A limit
# hit must be an error: Dynamo's fallback runs flex_attention unfused, materialising N x N scores.
RECOMPILE_LIMIT = 64
_PARTIAL_CHUNK_ENTRIES = 1 << 24  # tile entries evaluated at once when counting partial tiles


@torch.library.custom_op(f"{OP_NAMESPACE}::mask_table", mutates_args=())
def _stored_copy(table: torch.Tensor) -> torch.Tensor:
    """A copy of ``table`` made by an op Inductor does not see into: its output is always a buffer in memory."""
    return table.clone()


@_stored_copy.register_fake
def _(table: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(table)


def mask_tables(*tables: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors a ``mask_mod`` reads, in a form FlexAttention can read inside a compiled model: in eager code
    the tensors themselves, under ``torch.compile`` a copy of each made by an opaque op (small tables: at Wan 1.3B
    0.8 MB for xattn's tiles, ~6 MB for svg2's two label tables).

    Flex's lowering builds the ``mask_mod`` into its kernel before it stores the tensors the mask reads, so one
    that is still a fused expression in the graph (the pointwise ``select_scatter`` of xattn's ``kept[..., 0] =
    True``, an ``&`` of two tables) is computed inside the kernel, or refused. On CPU the C++ template refuses it
    ("NotImplementedError: Pointwise", then "No choices to select"). On the H200 (torch 2.11) xattn's compiled
    forward failed with "LoweringException: AttributeError: 'int' object has no attribute 'free_symbols'", which
    the select_scatter's integer index inlined into the Triton template would explain (inferred from Inductor's
    source: the Triton path cannot run here). An opaque op's output is a buffer in memory, which every template
    loads.
    """
    if not torch.compiler.is_compiling():
        return tables
    return tuple(_stored_copy(table) for table in tables)


def num_blocks(seq_len: int, block: int) -> int:
    """Number of blocks of ``block`` tokens covering ``seq_len`` tokens (the last may be ragged)."""
    return -(-seq_len // block)


def block_lengths(seq_len: int, block: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Tokens in each block, ``(num_blocks,)`` int64: ``block`` everywhere but a ragged last block."""
    starts = torch.arange(num_blocks(seq_len, block), device=device) * block
    return (seq_len - starts).clamp(max=block)


def tile_areas(seq_len: int, block_size: tuple[int, int], device: torch.device | str = "cpu") -> torch.Tensor:
    """Entries of every (query block, key block) tile, ``(nq, nk)`` float64."""
    rows = block_lengths(seq_len, block_size[0], device).double()
    cols = block_lengths(seq_len, block_size[1], device).double()
    return rows[:, None] * cols[None, :]


def block_ids(sizes: torch.Tensor, tokens: int) -> torch.Tensor:
    """The block of every token of consecutive variable-size blocks, ``(.., N)`` int64 (block j repeated ``sizes[..,
    j]`` times, in ascending order), from block sizes ``(.., C)`` that sum to ``tokens`` along the last axis: SVG2's
    cluster labels in its permuted order, from the sizes alone. No host sync."""
    ids = torch.arange(sizes.shape[-1], device=sizes.device).expand_as(sizes).reshape(-1)
    repeated = ids.repeat_interleave(sizes.reshape(-1), output_size=sizes[..., 0].numel() * tokens)
    return repeated.view(*sizes.shape[:-1], tokens)


@dataclass(frozen=True)
class VariableBlocks:
    """A token mask as kept (query block, key block) pairs of blocks with unequal sizes, per batch and head.

    Attributes:
        kept: ``(B, H, R, C)`` bool kept block pairs.
        row_sizes: ``(B, H, R)`` int64 tokens per query block (consecutive tokens; they sum to N; 0 allowed).
        col_sizes: ``(B, H, C)`` int64 tokens per key block, likewise.
    """

    kept: torch.Tensor
    row_sizes: torch.Tensor
    col_sizes: torch.Tensor

    def dense_mask(self) -> torch.Tensor:
        """``(B, H, N, N)`` bool token mask. O(N^2) memory: CPU paths and tests only."""
        rows = [
            torch.stack([
                table.repeat_interleave(r, dim=0).repeat_interleave(c, dim=1)
                for table, r, c in zip(tables, row_sizes, col_sizes, strict=True)
            ])
            for tables, row_sizes, col_sizes in zip(self.kept, self.row_sizes, self.col_sizes, strict=True)
        ]  # fmt: skip
        return torch.stack(rows)


def _as_pair(block_size: int | tuple[int, int]) -> tuple[int, int]:
    return (block_size, block_size) if isinstance(block_size, int) else (int(block_size[0]), int(block_size[1]))


@dataclass(frozen=True)
class TileTables:
    """A pattern's tables over its tiles: :class:`BlockSparsePattern`'s ``kept``, ``full`` and ``mask_mod`` (see
    there), as the function building a pattern's deferred tables returns them."""

    kept: torch.Tensor
    full: torch.Tensor | None = None
    mask_mod: MaskMod | None = None


@dataclass(frozen=True, init=False, eq=False)  # identity: a pattern's hash must not change when its tables are built
class BlockSparsePattern:
    """Which entries of the ``N x N`` score matrix one attention call computes, per batch and head.

    Attributes:
        kept: ``(B, H, nq, nk)`` bool, tiles with at least one kept entry (the kernel computes them).
        seq_len: N, tokens of queries and keys (self-attention).
        block_size: ``(query block, key block)`` tokens; an int means both.
        full: ``(B, H, nq, nk)`` bool, kept tiles whose every entry is kept. ``None``: every kept
            tile is full (a block-level pattern; ``mask_mod`` must then be ``None``).
        mask_mod: token predicate ``(b, h, q_idx, kv_idx) -> bool`` applied inside partial tiles
            (``kept & ~full``); see the module docstring for how to write it.
        variable: the same token mask as blocks of unequal sizes (SVG2's clusters), for kernels that
            run such blocks whole (FlashInfer's variable-block-sparse wrapper); ``None`` if not known.

    Deferred tables: a pattern with variable blocks may be given, instead of ``kept`` (and ``full``, ``mask_mod``),
    ``tables``, a function returning its :class:`TileTables`. It runs on the first read of ``kept``, ``full`` or
    ``mask_mod`` (by any method below, or a backend) and its tables stay with the pattern, so a call whose backend
    reads only the variable blocks (triton-variable, flashinfer) never builds them: svg2's 128-token tables and its
    mask's label tables, work its CUDA kernel does not need. Under ``torch.compile`` the build is traced where a
    table is first read: a graph whose backend reads none holds none of their ops. The variable blocks give such a
    pattern's ``(B, H)`` (:attr:`batch_heads`) and kind without a build. The function reads its tensors when it
    runs: nothing may change them in place before.

    Raises:
        HarnessError: a tile table of the wrong shape or dtype (a deferred one when it is built), ``full`` without
            ``mask_mod`` or the reverse, neither or both of ``kept`` and ``tables``, or ``tables`` with ``full``,
            ``mask_mod`` or without ``variable``.
    """

    seq_len: int
    block_size: int | tuple[int, int]
    variable: VariableBlocks | None
    _tiles: TileTables | Callable[[], TileTables] = field(repr=False)
    _flex_masks: dict[tuple[tuple[int, int], bool], BlockMask] = field(repr=False, compare=False)
    #: What a backend prepared for this pattern (e.g. FlashInfer's planned wrapper), by the backend's own key:
    #: a pattern reused across calls (radial's) is planned once, and the plan goes with the pattern.
    backend_plans: dict[tuple[Any, ...], Any] = field(repr=False, compare=False)

    def __init__(self, kept: torch.Tensor | None, seq_len: int, block_size: int | tuple[int, int] = 128,
                 full: torch.Tensor | None = None, mask_mod: MaskMod | None = None,
                 variable: VariableBlocks | None = None,
                 tables: Callable[[], TileTables] | None = None) -> None:  # fmt: skip
        if (kept is None) == (tables is None):
            raise HarnessError("give a pattern its tile table (kept) or a function building its tables (tables), "
                               "one of the two")  # fmt: skip
        if tables is not None and (full is not None or mask_mod is not None or variable is None):
            raise HarnessError("deferred tile tables (tables) take no full or mask_mod (they build them) and need "
                               "the variable blocks, which give the pattern's batch, heads and kind")  # fmt: skip
        # Frozen: the fields are set as the dataclass's own __init__ sets them.
        object.__setattr__(self, "seq_len", seq_len)
        object.__setattr__(self, "block_size", block_size)
        object.__setattr__(self, "variable", variable)
        object.__setattr__(self, "_flex_masks", {})
        object.__setattr__(self, "backend_plans", {})
        object.__setattr__(self, "_tiles", tables if kept is None else self._checked(TileTables(kept, full, mask_mod)))

    def _checked(self, tiles: TileTables) -> TileTables:
        """``tiles`` if they fit this pattern (see the class's Raises), else a HarnessError."""
        q_block, kv_block = self.blocks
        expected = (num_blocks(self.seq_len, q_block), num_blocks(self.seq_len, kv_block))
        kept = tiles.kept
        if kept.dim() != 4 or tuple(kept.shape[-2:]) != expected or kept.dtype != torch.bool:
            raise HarnessError(
                f"kept must be a (B, H, {expected[0]}, {expected[1]}) bool tile table for {self.seq_len} tokens "
                f"in blocks of {self.blocks}, got {tuple(kept.shape)} {kept.dtype}"
            )
        if (tiles.full is None) != (tiles.mask_mod is None):
            raise HarnessError("give full and mask_mod together (token-level pattern) or neither (block-level)")
        if tiles.full is not None and tiles.full.shape != kept.shape:
            raise HarnessError(f"full {tuple(tiles.full.shape)} must match kept {tuple(kept.shape)}")
        return tiles

    @property
    def tables(self) -> TileTables:
        """The tile tables: deferred ones are built on this first read, checked and kept (see the class docstring)."""
        tiles = self._tiles
        if not isinstance(tiles, TileTables):
            tiles = self._checked(tiles())
            if tuple(tiles.kept.shape[:2]) != self.batch_heads:
                raise HarnessError(f"deferred tables of (B, H) = {tuple(tiles.kept.shape[:2])}, but the variable "
                                   f"blocks' are {self.batch_heads}")  # fmt: skip
            object.__setattr__(self, "_tiles", tiles)
        return tiles

    @property
    def kept(self) -> torch.Tensor:
        return self.tables.kept

    @property
    def full(self) -> torch.Tensor | None:
        return self.tables.full

    @property
    def mask_mod(self) -> MaskMod | None:
        return self.tables.mask_mod

    @property
    def batch_heads(self) -> tuple[int, int]:
        """``(B, H)`` of the tables (1 where they broadcast), read without building deferred ones: those of the
        variable blocks then."""
        tiles = self._tiles
        if isinstance(tiles, TileTables):
            source = tiles.kept
        else:
            assert self.variable is not None  # a deferred pattern has them (__init__)
            source = self.variable.kept
        return source.shape[0], source.shape[1]

    @property
    def blocks(self) -> tuple[int, int]:
        return _as_pair(self.block_size)

    @property
    def kind(self) -> PatternKind:
        """``variable`` when it carries variable-size blocks, else ``token-level`` with a ``mask_mod``, else
        ``tiles`` (see :data:`PatternKind`)."""
        if self.variable is not None:
            return "variable"
        return "tiles" if self.mask_mod is None else "token-level"

    @property
    def full_tiles(self) -> torch.Tensor:
        """``(B, H, nq, nk)`` bool: kept tiles computed without the mask_mod."""
        return self.kept if self.full is None else self.full & self.kept

    @property
    def partial_tiles(self) -> torch.Tensor:
        """``(B, H, nq, nk)`` bool: kept tiles where the mask_mod decides per entry."""
        return self.kept & ~self.full_tiles

    # -- densities ------------------------------------------------------------------------------

    def tile_density(self) -> float:
        """Fraction of the N x N entries inside computed tiles (partial tiles count whole)."""
        areas = tile_areas(self.seq_len, self.blocks, self.kept.device)
        return float((self.kept.double() * areas).sum() / (self.kept.shape[0] * self.kept.shape[1] * self.seq_len**2))

    def kept_entries(self) -> torch.Tensor:
        """Kept score entries per (batch, head), ``(B, H)`` float64 (exact: partial tiles are counted)."""
        areas = tile_areas(self.seq_len, self.blocks, self.kept.device)
        entries = (self.full_tiles.double() * areas).sum(dim=(-2, -1))
        if self.mask_mod is not None:
            entries = entries + self._partial_entries()
        return entries

    def kept_fraction(self) -> torch.Tensor:
        """:meth:`density` as a 0-d float64 tensor on the pattern's device, not read into Python: what a method
        returns as the density of a call, which only the density log reads (eagerly; a compiled forward reading
        it would break its graph, issue 21 item 5)."""
        return self.kept_entries().mean() / self.seq_len**2

    def density(self) -> float:
        """Kept fraction of the N x N score matrix, averaged over batch and heads (exact)."""
        return float(self.kept_fraction())

    def _partial_entries(self) -> torch.Tensor:
        """Kept entries inside partial tiles per (batch, head), evaluating mask_mod tile by tile."""
        assert self.mask_mod is not None
        q_block, kv_block = self.blocks
        counts = torch.zeros(self.kept.shape[:2], dtype=torch.float64, device=self.kept.device)
        tiles = self.partial_tiles.nonzero()  # (P, 4): b, h, query block, key block
        offsets_q = torch.arange(q_block, device=tiles.device)
        offsets_kv = torch.arange(kv_block, device=tiles.device)
        chunk = max(1, _PARTIAL_CHUNK_ENTRIES // (q_block * kv_block))
        for part in tiles.split(chunk):
            b, h = part[:, 0, None, None], part[:, 1, None, None]
            q_idx = part[:, 2, None, None] * q_block + offsets_q[None, :, None]
            kv_idx = part[:, 3, None, None] * kv_block + offsets_kv[None, None, :]
            valid = (q_idx < self.seq_len) & (kv_idx < self.seq_len)
            last = self.seq_len - 1
            kept = self.mask_mod(b, h, q_idx.clamp(max=last), kv_idx.clamp(max=last)) & valid
            counts.index_put_((part[:, 0], part[:, 1]), kept.sum(dim=(-2, -1)).double(), accumulate=True)
        return counts

    # -- the two execution forms -----------------------------------------------------------------

    def block_mask(self, backward: bool = False) -> BlockMask:
        """FlexAttention BlockMask from the tile table (block indices; no N x N tensor is formed).

        Full tiles go to ``full_kv_*`` so the kernel skips ``mask_mod`` there; partial tiles go to
        ``kv_*``. ``backward=True`` also builds the transposed indices Flex needs for gradients.
        A block-level pattern's ``mask_mod`` looks the tile up: the compiled kernel never calls it (every kept
        tile is full), but ``flex_attention`` run eagerly ignores the tile tables and applies ``mask_mod`` alone,
        as it does inside a model compiled with a backend other than inductor (``--compile-backend eager``).
        """
        full, partial = self.full_tiles, self.partial_tiles
        full_num, full_idx = _tile_indices(full)
        partial_num, partial_idx = _tile_indices(partial)
        return BlockMask.from_kv_blocks(
            partial_num,
            partial_idx,
            full_num,
            full_idx,
            BLOCK_SIZE=self.blocks,
            mask_mod=self._tile_lookup(backward) if self.mask_mod is None else self.mask_mod,
            seq_lengths=(self.seq_len, self.seq_len),
            compute_q_blocks=backward,
        )

    def _tile_lookup(self, backward: bool) -> MaskMod:
        """The token mask of a block-level pattern as a ``mask_mod``: the kept table at the pair's tile.

        Compiled Flex saves the tensors a ``mask_mod`` captures for the backward; a pattern built under
        ``torch.inference_mode`` (radial's, kept across calls) holds inference tensors, which autograd refuses to
        save, so a mask for the backward captures a normal copy of the table."""
        kept, (q_block, kv_block) = self.kept, self.blocks
        if backward and torch.is_inference(kept):
            kept = kept.clone()
        (kept,) = mask_tables(kept)
        one_batch, one_head = kept.shape[0] == 1, kept.shape[1] == 1  # broadcast tables: index 0 for every b, h

        def in_kept_tiles(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
            return kept[0 if one_batch else b, 0 if one_head else h, q_idx // q_block, kv_idx // kv_block]

        return in_kept_tiles

    def flex_block_mask(self, batch_heads: tuple[int, int], backward: bool = False, tile: int = FLEX_TILE
                        ) -> BlockMask:  # fmt: skip
        """What FlexAttention runs for q of ``(B, H)`` = ``batch_heads``: :meth:`block_mask` of the pattern
        :meth:`regrouped` into ``tile`` tiles (:func:`flex_tile` of the kernel's options).

        Built once per pattern, ``batch_heads``, ``backward`` and ``tile``, and kept with the pattern: one reused
        across calls (radial's, one per grid) is then built in its first eager call, and a compiled model's graph
        holds the attention alone, not the tile tables' regrouping. A compiled call finding none built (the eager
        calls ran on another backend, e.g. FlashInfer) builds it in its graph without keeping it: storing it there
        would change what the graph's guards read, and recompile the model once.
        """
        key = (batch_heads, backward, tile)
        if key in self._flex_masks:
            return self._flex_masks[key]
        mask = self.regrouped(tile, batch_heads).block_mask(backward)
        if not torch.compiler.is_compiling():
            self._flex_masks[key] = mask
        return mask

    def regrouped(self, tile: int, batch_heads: tuple[int, int] | None = None) -> BlockSparsePattern:
        """The same token mask over ``tile x tile`` tiles; the pattern itself if its blocks are multiples of ``tile``.

        A tile is kept when any of the pattern's blocks it overlaps is kept, and full when all of them
        are full; inside the other kept tiles a ``mask_mod`` looks every token pair's block up in this
        pattern's tables (and asks this pattern's ``mask_mod`` inside its partial blocks). Any block
        size works (8, 32, 48: a block may straddle two tiles), and the query and key blocks may differ.

        Args:
            tile: tokens per regrouped tile (:data:`FLEX_TILE` for FlexAttention on CUDA).
            batch_heads: ``(B, H)`` of the q the kernel runs on: the kernel calls ``mask_mod`` with
                every batch and head index, so tables that broadcast (``(1, 1, nq, nk)``) are
                expanded to it. ``None``: the tables' own (enough for :meth:`dense_mask`).

        ``density()`` of the result equals this pattern's (the token mask is the same);
        ``tile_density()`` is what the kernel computes on the larger tiles.
        """
        q_block, kv_block = self.blocks
        if q_block % tile == 0 and kv_block % tile == 0:
            return self
        device = self.kept.device
        rows, cols = (
            _overlapped_blocks(self.seq_len, q_block, tile, device),
            _overlapped_blocks(self.seq_len, kv_block, tile, device),
        )
        areas = (rows[1] - rows[0] + 1)[:, None] * (cols[1] - cols[0] + 1)[None, :]
        kept = rectangle_counts(self.kept, rows, cols) > 0
        full = (rectangle_counts(self.full_tiles, rows, cols) == areas) & kept
        shape = (*(batch_heads or self.kept.shape[:2]), *self.kept.shape[-2:])
        whole, partial = (table.expand(shape) for table in mask_tables(self.full_tiles, self.partial_tiles))
        inner = self.mask_mod

        def in_kept_blocks(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
            q_blk, kv_blk = q_idx // q_block, kv_idx // kv_block
            if inner is None:
                return whole[b, h, q_blk, kv_blk]
            return whole[b, h, q_blk, kv_blk] | (partial[b, h, q_blk, kv_blk] & inner(b, h, q_idx, kv_idx))

        return BlockSparsePattern(kept, self.seq_len, tile, full=full, mask_mod=in_kept_blocks)

    def dense_mask(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, H, R, N)`` bool token mask of the query tokens ``rows`` (``None``: all N, O(N^2) memory).

        A few rows are what a correctness check at Wan scale affords (:mod:`methods.kernels.sparse_backends`).
        """
        q_block, kv_block = self.blocks
        device = self.kept.device
        index = torch.arange(self.seq_len, device=device)
        rows = index if rows is None else rows.to(device)
        q_blk, kv_blk = rows // q_block, index // kv_block

        def expand(tiles: torch.Tensor) -> torch.Tensor:
            return tiles.index_select(-2, q_blk).index_select(-1, kv_blk)

        mask = expand(self.full_tiles)
        if self.mask_mod is not None:
            batch, heads = self.kept.shape[:2]
            token_kept = self.mask_mod(
                torch.arange(batch, device=device)[:, None, None, None],
                torch.arange(heads, device=device)[None, :, None, None],
                rows[None, None, :, None],
                index[None, None, None, :],
            )
            mask = mask | (expand(self.partial_tiles) & token_kept)
        return mask


def _overlapped_blocks(seq_len: int, block: int, tile: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """For every tile of ``tile`` tokens, the first and the last block of ``block`` tokens it overlaps."""
    starts = torch.arange(num_blocks(seq_len, tile), device=device) * tile
    ends = (starts + tile).clamp(max=seq_len) - 1
    return starts // block, ends // block


def rectangle_counts(table: torch.Tensor, rows: tuple[torch.Tensor, torch.Tensor],
                     cols: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:  # fmt: skip
    """Set entries of ``table`` in every rectangle of its last two dims, from 2-D prefix sums.

    Args:
        table: ``(B, H, n, m)`` bool.
        rows: first and last row of each rectangle row (inclusive), ``(R,)`` or ``(B, H, R)`` int64.
        cols: first and last column of each rectangle column (inclusive), ``(C,)`` or ``(B, H, C)``.

    Returns:
        ``(B, H, R, C)`` int32 counts (the prefix sums in int32, half int64's traffic: svg2's 300 x 1,000 cluster
        pairs count at most 300,000).
    """
    batch, heads = table.shape[:2]
    prefix = F.pad(table.cumsum(-2, dtype=torch.int32).cumsum(-1, dtype=torch.int32), (1, 0, 1, 0))
    b = torch.arange(batch, device=table.device)[:, None, None, None]
    h = torch.arange(heads, device=table.device)[None, :, None, None]
    r0, r1 = rows[0][..., :, None], rows[1][..., :, None] + 1
    c0, c1 = cols[0][..., None, :], cols[1][..., None, :] + 1
    return prefix[b, h, r1, c1] - prefix[b, h, r0, c1] - prefix[b, h, r1, c0] + prefix[b, h, r0, c0]


def _tile_indices(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query block: the number of set tiles and their key-block indices first (int32, Flex's form)."""
    count = tiles.sum(dim=-1, dtype=torch.int32)
    order = torch.argsort(tiles.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return count, order


# -- execution -----------------------------------------------------------------------------------


def flex_tile(kernel_options: FlexKernelOptions | None) -> int:
    """Tokens per side of the tiles a pattern is regrouped into for Flex's forward kernel under ``kernel_options``:
    the larger of its forward tile sides where the options give both (64 for 64 x 64 tiles, so that SLA's 64-token
    blocks run as they are, not as partly kept 128-token tiles), else :data:`FLEX_TILE` (Flex's own choice)."""
    sides = [(kernel_options or {}).get(name) for name in ("fwd_BLOCK_M", "fwd_BLOCK_N")]
    return FLEX_TILE if None in sides else max(int(side) for side in sides)  # type: ignore[arg-type]


_compiled_flex: Callable[..., torch.Tensor] | None = None


def compiled_flex_attention() -> Callable[..., torch.Tensor]:
    """``flex_attention`` compiled once per process (static shapes: one kernel per sequence length)."""
    global _compiled_flex
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def flex_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: BlockSparsePattern,
    kernel_options: FlexKernelOptions | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Compiled FlexAttention over the pattern's tiles. Shapes ``(B, H, N, D)``.

    ``kernel_options``: Flex's Triton tile and pipeline settings (``None``: its defaults). With ``return_lse`` also
    each query row's log-sum-exp of its scaled scores ``(B, H, N)`` fp32, natural log (Flex's own convention; -inf
    for a row that keeps no key), to merge with another part of the same row's keys.

    Blocks that are not multiples of :data:`FLEX_TILE` run regrouped into such tiles
    (:meth:`BlockSparsePattern.regrouped`; the same output), or of the options' own tiles where they give both sides
    and no gradient is asked (:func:`flex_tile`). Always compiled: eager ``flex_attention``
    ignores the tile table (it only applies ``mask_mod``, over a materialised N x N score matrix).
    Hitting the recompile limit raises instead of falling back to that unfused path.
    """
    trains = needs_gradients(q, k, v)
    # Flex's backward takes its own tiles (128 queries): a pattern that trains keeps FLEX_TILE.
    tile = FLEX_TILE if trains else flex_tile(kernel_options)
    block_mask = pattern.flex_block_mask((q.shape[0], q.shape[1]), backward=trains, tile=tile)
    if torch.compiler.is_compiling():
        # Inside a compiled model the model's graph captures flex_attention itself; the configuration patch
        # below is a call Dynamo does not trace (a graph break in every sparse layer: issue 21, item 5).
        return _with_lse(flex_attention(q, k, v, block_mask=block_mask, kernel_options=kernel_options,
                                        **_lse_request(return_lse)))  # fmt: skip
    with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT, fail_on_recompile_limit_hit=True):
        return _with_lse(compiled_flex_attention()(q, k, v, block_mask=block_mask, kernel_options=kernel_options,
                                                   **_lse_request(return_lse)))  # fmt: skip


def _lse_request(return_lse: bool) -> dict[str, Any]:
    """Flex's keyword asking for the log-sum-exp: ``return_aux=AuxRequest(lse=True)`` (torch >= 2.9; its
    ``return_lse`` is deprecated there), else ``return_lse``; nothing when it is not asked for."""
    if not return_lse:
        return {}
    return {"return_lse": True} if AuxRequest is None else {"return_aux": AuxRequest(lse=True)}


def _with_lse(result: Any) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Flex's result as the output, or ``(output, lse)`` whichever keyword asked for the log-sum-exp."""
    if isinstance(result, tuple) and hasattr(result[1], "lse"):
        return result[0], result[1].lse
    return result


def masked_dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: BlockSparsePattern
) -> torch.Tensor:
    """The same output as the Flex path through SDPA with the pattern's token mask (CPU, tests)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=pattern.dense_mask())


# -- selection of key blocks per query block ------------------------------------------------------


def select_by_cumulative_mass(scores: torch.Tensor, threshold: float, min_keep: int = 1) -> torch.Tensor:
    """Keep, per row, the fewest largest entries whose sum reaches ``threshold`` x the row's total.

    Args:
        scores: ``(..., n)`` non-negative masses (e.g. block attention mass per key block).
        threshold: in ``(0, 1]``; an entry is kept iff the mass ranked strictly before it is below
            ``threshold`` x total, so the entry that crosses the threshold is kept. ``1`` keeps all.
        min_keep: at least this many largest entries per row are kept.

    Returns:
        ``(..., n)`` bool.

    On CUDA (float32 scores) one launch of :mod:`methods.kernels.ranked_selection_triton` computes it (exact ties
    straddling the cut kept in index order) unless ``$BENCH_SELECTION_BACKEND`` is ``torch``; this torch path is
    the CPU path and the kernel's reference.
    """
    if not 0.0 < threshold <= 1.0:
        raise HarnessError(f"cumulative-mass threshold must be in (0, 1], got {threshold}")
    if threshold == 1.0:
        return torch.ones_like(scores, dtype=torch.bool)
    if ranked.use_fused(scores, scores):
        return ranked.ranked_prefix(scores, scores, threshold, False, min_keep)
    values, order = torch.sort(scores.double(), dim=-1, descending=True)
    before = values.cumsum(dim=-1) - values
    rank = torch.arange(scores.shape[-1], device=scores.device)
    keep_sorted = (before < threshold * values.sum(dim=-1, keepdim=True)) | (rank < min_keep)
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def select_top_fraction(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """Keep, per row, the ``ceil(fraction x n)`` largest entries (at least one). ``(..., n)`` bool."""
    if not 0.0 < fraction <= 1.0:
        raise HarnessError(f"kept fraction must be in (0, 1], got {fraction}")
    count = max(1, math.ceil(fraction * scores.shape[-1] - 1e-9))
    top = scores.topk(count, dim=-1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter(-1, top, True)


def select_by_cost_budget(scores: torch.Tensor, costs: torch.Tensor, fraction: float) -> torch.Tensor:
    """Keep, per row, the largest-scored entries until their cost reaches ``fraction`` of the row's total cost.

    An entry is kept iff the cost ranked strictly before it plus half its own is below ``fraction`` x total (the
    kept cost is the budget rounded to the nearest entry); the top entry is always kept.

    Args:
        scores: ``(..., n)`` non-negative ranking scores (e.g. block masses); ``inf`` ranks an entry first.
        costs: non-negative cost of each entry (e.g. tokens per key block or per cluster), broadcastable to
            ``scores``. The kernel sums int32 costs in int32: a row's total must then stay below 2^31 (token counts
            do: it is N); any other dtype sums in float64.
        fraction: the kept share of the cost, in ``(0, 1]``.

    Returns:
        ``(..., n)`` bool.

    On CUDA (float32 scores) one launch of :mod:`methods.kernels.ranked_selection_triton` computes it unless
    ``$BENCH_SELECTION_BACKEND`` is ``torch``; this torch path is the CPU path and the kernel's reference.
    """
    if not 0.0 < fraction <= 1.0:
        raise HarnessError(f"kept cost fraction must be in (0, 1], got {fraction}")
    if ranked.use_fused(scores, costs):
        return ranked.ranked_prefix(scores, costs, fraction, True, 1)
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)
    ranked_costs = costs.expand_as(scores).gather(-1, order).double()
    before = ranked_costs.cumsum(dim=-1) - ranked_costs
    keep_sorted = before + ranked_costs / 2 < fraction * ranked_costs.sum(dim=-1, keepdim=True)
    keep_sorted[..., 0] = True
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


# -- token permutations ---------------------------------------------------------------------------


def permute_tokens(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """``x[..., order[...], :]`` per batch and head: ``x`` ``(B, H, N, D)``, ``order`` ``(B|1, H|1, N)``.

    On CUDA without gradients the Triton row copy (:mod:`methods.kernels.permute_triton`) unless
    ``$BENCH_PERMUTE_BACKEND`` is ``torch``; this ``gather`` is the CPU path and its reference."""
    if permute.use_fused(x):
        return permute.permute_rows(x, order, False)
    index = order.expand(*x.shape[:2], -1).unsqueeze(-1).expand_as(x)
    return x.gather(-2, index)


def unpermute_tokens(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`permute_tokens` with the same ``order``: scatters rows back to their places (the Triton row
    copy where :func:`permute_tokens` takes it)."""
    if permute.use_fused(x):
        return permute.permute_rows(x, order, True)
    index = order.expand(*x.shape[:2], -1).unsqueeze(-1).expand_as(x)
    return torch.empty_like(x).scatter(-2, index, x)
