"""Attention over variable-size blocks on CUDA in Triton: SVG2's cluster pairs at the cost of the kept tokens alone.

Computes what :func:`methods.kernels.block_sparse.masked_dense_attention` computes for a pattern carrying
:class:`~methods.kernels.block_sparse.VariableBlocks` (the reference it is tested against): per group g (one
(batch, head) pair), query block i (consecutive tokens, SVG2's query cluster after its permutation) attends to the
tokens of the key blocks j it keeps, ``softmax(q k^T / sqrt(D)) v`` over exactly those keys. SVG2 (Yang et al.,
NeurIPS 2025, Sec. 4.3) runs the same computation on a patched FlashInfer whose kernel skips whole kept-or-not
cluster pairs; FlashInfer's upstream variable-block wrapper lists one key index per kept token and plans on the
host per call, 4.1-6.2x the density-scaled cuDNN time on an H200 (reports/gpu/h200/run_9dca079/sparse/).

Query tiles never straddle two query blocks: block i is cut into ``ceil(rows_i / BLOCK_M)`` tiles (the last
partial), so every row of a tile keeps the same keys. :func:`_attention`, one program per (query tile, group),
streams those keys in tiles of BLOCK_N with the online softmax of FlashAttention in fp32 (exp2, scale folded in).
The keys come two ways, both in the default (:class:`Config`'s ``tiles`` and ``sparse_below``):

- **Whole key tiles**: the key blocks are consecutive tokens, so the program reads whole tiles
  ``[t BLOCK_N, (t + 1) BLOCK_N)`` of the key sequence, through tensor descriptors (Hopper's copy engine) where the
  strides allow, each masked to the columns whose block its query block keeps, the bits of an int64.
- **Gathered keys**: key tokens listed one by one, their rows of k and v gathered by index (no copy engine: it has
  no gather on Hopper), every computed column kept. The default gathers the kept keys of tiles with fewer than
  ``sparse_below`` of them (at most :data:`GATHER_CAP` per query block), after the whole tiles, in the same
  program; ``tiles`` off gathers every kept key (:func:`_key_indices`, one host read for the lists' size).

:func:`_key_tiles` lists both per (group, query block), on the device with no host read. A whole tile computes kept
and dropped columns alike, so the order of the key blocks matters: svg2 puts the key clusters that most query tokens
keep next to each other (:func:`methods.svg2.by_popularity`).

Measured on an H200 at density 0.295 (reports/gpu/h200/run_c8cd359/, run_ec88077/): per computed entry, with every
block kept, whole tiles take 1.43x the dense cuDNN call's time and gathered keys 2.12x. On q, k, v taken from a Wan
1.3B forward (random weights) 0.65 of the listed tiles' columns are kept: whole tiles alone 9.15-9.34 ms, gathered
keys alone 8.46-8.62, both (``sparse_below`` 40) 7.20-7.29 ms, 2.05-2.12x the density-scaled cuDNN call. On random
q, k, v (0.93 of the columns kept) 7.38 ms at Wan 1.3B (2.17x) and 101.9 ms at 14B (1.71x) against 9.32 and 122.5
gathered. The rest is the tile rate of a 64-row Triton kernel and the partial last tile of each query block: with 300
query clusters over 32,760 tokens a block averages 109 rows and 64-row tiles use 0.81 of their rows (128-row tiles:
3.38x, 1.79x per entry; a second launch for each block's remainder in 16- or 32-row tiles saved at most 2%,
run_109ff79/).
:func:`computed_entries` counts what a call computes: at svg2's 0.295 on random q, k, v the time over the ideal is
1.39 (entries computed over kept) x 1.55 (time per computed entry over the dense call's) at Wan 1.3B and 1.17 x 1.38
at 14B (run_290ac86/). Query tiles that cross query blocks, each row masked to its own block's keys, computed about
as much (1.43x / 1.36x the kept entries at 128 rows, 1.30x / 1.27x at 64) at a worse rate, 2.48x / 2.08x their ideal
against 2.03x / 1.62x (run_e0a49c8/straddle/); 128-row tiles under warp specialisation ran at ~1.2x per computed
entry but compute 2.12x / 1.59x the kept entries inside svg2's query blocks (run_e740db5/ws128/).
Query rows of a block that keeps no key get zeros (masked dense gives NaN there; no method makes such a block).

Shapes: q, k, v ``(B, H, N, D)`` fp16 or bf16, one dtype, any strides with a contiguous last axis, ``D <= 128``;
the blocks' ``kept (B or 1, H or 1, R, C)``, ``row_sizes (.., R)``, ``col_sizes (.., C)`` (each summing to N).
Returns ``(B, H, N, D)`` contiguous in q's dtype. Forward only (SVG2 is training-free).

Whole key tiles and the ``k_rows`` configurations' gathered ones take ``tl.trans`` of a loaded key tile, which
:mod:`methods.kernels.linear_attention_triton` avoids after a miscompile on sm_90 (a tile used both ways); here the
tile is used transposed only, and every configuration passed its check on an H200 (run_998d57e/variable_blocks/,
run_c8cd359/, run_ec88077/).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from harness.errors import HarnessError
from methods.kernels import (
    INTERPRETED,
    descriptor_aligned,
    kernel_op,
    last_axis_contiguous,
    tile_columns,
    triton_jit,
    use_descriptor_scratch,
)
from methods.kernels.attention_states import accumulate_tile
from methods.kernels.block_sparse import VariableBlocks, block_ids

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs (CI): the backend is refused there
    triton = tl = None


class Config(NamedTuple):
    """A configuration of :func:`_attention`: its tiles, warps and pipeline stages; whether it reads whole key
    tiles of the sequence, masked (``tiles``, BLOCK_N <= :data:`MAX_KEY_TILE`; always loaded as rows), gathering
    only the keys of tiles with fewer than ``sparse_below`` kept (0: none; needs ``tiles``), or gathers every kept
    key; and whether gathered key tiles load as rows ``(BLOCK_N, D)`` and are transposed (``k_rows``) or load
    transposed by their addresses ``(D, BLOCK_N)``."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    k_rows: bool = False
    tiles: bool = False
    sparse_below: int = 0

    @property
    def name(self) -> str:
        """``64x32x4x3`` (``r`` appended for k_rows, ``t`` for whole key tiles, then sparse_below where not 0)."""
        tiles = f"t{self.sparse_below or ''}" if self.tiles else ""
        return "x".join(map(str, self[:4])) + ("r" if self.k_rows else "") + tiles


#: 64-row query tiles, 64-token key tiles, 4 warps, 3 stages; tiles with fewer than 40 kept keys gathered, as rows.
#: Whole tiles were timed on an H200 beside 2 and 4 stages (within 2%), 32-column tiles (2-4% slower) and 128-row
#: tiles on 8 warps (30-50% slower) at Wan 1.3B and 14B, svg2 at 0.295 (reports/gpu/h200/run_c8cd359/); the gathered
#: threshold beside 24, 32 and 48 on a forward's q, k, v and random ones (48 up to 2% faster or 0.2% slower than 40,
#: 24 3-12% slower; run_ec88077/). The gathered keys' best, 64x64x4x3r, came first among 10 gathered configurations
#: (run_998d57e/variable_blocks/).
DEFAULT_CONFIG = Config(64, 64, 4, 3, k_rows=True, tiles=True, sparse_below=40)
INTERPRETER_CONFIG = Config(16, 16, 4, 1, k_rows=True, tiles=True, sparse_below=10)
MAX_HEAD_DIM = 128
#: Widest key tile of the ``tiles`` configurations: one int64 holds its kept columns.
MAX_KEY_TILE = 64


def gather_cap(tokens: int, sparse_below: int) -> int:
    """Gathered keys a query block may take (the width of its list): :data:`GATHER_CAP`, at most the sequence, and
    1 (no list) where nothing is gathered."""
    return max(1, min(GATHER_CAP, tokens)) if sparse_below else 1


def default_config() -> Config:
    """:data:`DEFAULT_CONFIG`, or :data:`INTERPRETER_CONFIG` under the Triton interpreter."""
    return INTERPRETER_CONFIG if INTERPRETED else DEFAULT_CONFIG


#: Positions of the index lists one program of :func:`_key_indices` writes.
INDEX_BLOCK = 1024
#: Key tiles one step of :func:`_key_tiles` scans, and its warps: one program per query block scans every key
#: tile, so narrow programs, many per SM, did best. On an H200 at Wan 1.3B (svg2's 3,600 blocks over 512 tiles) 4
#: tiles over 1 warp took 0.259 ms, 8 x 1 0.279, 16 x 2 0.284, 16 x 4 0.326; the earlier kernel (one scan over the
#: chunk's flattened tokens, always) 0.524 ms at 16 x 4 (``reports/gpu/h200/run_674ac94/call5/``).
KEY_TILE_CHUNK, KEY_TILE_WARPS = 4, 1
#: Gathered keys a query block may take besides its whole tiles (the list is allocated at this width per block, with
#: no host read; past it, sparse tiles are read whole). svg2's blocks at Wan 1.3B gathered at most 3,563 keys at
#: ``sparse_below`` 39 in a random-weight forward (mean 2,234; counted on the CPU).
GATHER_CAP = 4096


@triton_jit
def _key_indices(cum_ptr, starts_ptr, offsets_ptr, idx_ptr, R, C, STEPS: tl.constexpr, BLOCK: tl.constexpr):
    """Program (g * R + i, t): positions ``[t BLOCK, (t + 1) BLOCK)`` of query block (g, i)'s key list: the token
    index ``starts[g, j] + p - cum[g, i, j]`` of the key block j holding position p, into ``idx[offsets + p]``.
    ``cum (G * R, C + 1)`` int32 running sums of kept block sizes, ``starts (G, C)`` int32 first token of each key
    block, ``offsets (G * R,)`` int64; STEPS >= log2(C) halvings of the search."""
    row = tl.program_id(0).to(tl.int64)
    cum = cum_ptr + row * (C + 1)
    total = tl.load(cum + C)
    p = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = p < total
    # Invariant: cum[lo] <= p < cum[hi]; cum[0] = 0 and cum[C] = total, so it holds from the start.
    lo = tl.zeros((BLOCK,), dtype=tl.int32)
    hi = tl.full((BLOCK,), C, dtype=tl.int32)
    for _ in tl.static_range(STEPS):
        mid = (lo + hi) // 2
        open_range = hi - lo > 1
        below = tl.load(cum + mid, mask=inside, other=0) <= p
        lo = tl.where(open_range & below, mid, lo)
        hi = tl.where(open_range & ~below, mid, hi)
    group = row // R
    token = tl.load(starts_ptr + group * C + lo, mask=inside, other=0) + p - tl.load(cum + lo, mask=inside, other=0)
    tl.store(idx_ptr + tl.load(offsets_ptr + row) + p, token, mask=inside)


@triton_jit
def _key_tiles(labels_ptr, kept_ptr, lists_ptr, bits_ptr, counts_ptr, gathered_ptr, gathered_counts_ptr, R, C, N,
               TILES, CAP, SPARSE, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr):  # fmt: skip
    """Program g * R + i: the keys that query block (g, i) keeps, by tiles ``[t BLOCK_N, (t + 1) BLOCK_N)`` of the
    cluster-sorted keys, ascending. A tile with at least ``SPARSE`` kept keys is listed whole: its index into
    ``lists[g * R + i, :counts[g * R + i]]`` int32, the bits of its kept columns (bit c: token ``t BLOCK_N + c``) at
    the same place of ``bits`` int64. A tile with fewer (a sparse tile) has its kept tokens appended to
    ``gathered[g * R + i, :gathered_counts[g * R + i]]`` int32, until the sparse tiles' keys so far exceed ``CAP``;
    from that tile on, sparse tiles are listed whole. ``labels (G, N)``
    int32 the key block of every token, ``kept (G * R, C)`` uint8; ``TILES = ceil(N / BLOCK_N)``, the lists'
    width."""
    row = tl.program_id(0).to(tl.int64)
    labels = labels_ptr + (row // R) * N
    kept = kept_ptr + row * C
    column = tl.arange(0, BLOCK_N)
    column_bit = tl.full((BLOCK_N,), 1, dtype=tl.int64) << column.to(tl.int64)
    listed = tl.zeros((), dtype=tl.int32)
    gathered = tl.zeros((), dtype=tl.int32)
    asked = tl.zeros((), dtype=tl.int32)
    for first in range(0, TILES, CHUNK):
        tiles = first + tl.arange(0, CHUNK)
        tokens = tiles[:, None] * BLOCK_N + column[None, :]
        inside = tokens < N
        label = tl.load(labels + tokens, mask=inside, other=0)
        keeps = (tl.load(kept + label, mask=inside, other=0) != 0) & inside
        keys = tl.sum(keeps.to(tl.int32), axis=1)
        sparse = (keys > 0) & (keys < SPARSE)
        asked_by = asked + tl.cumsum(tl.where(sparse, keys, 0), axis=0)  # every sparse tile's keys so far
        fits = sparse & (asked_by <= CAP)
        whole = (keys > 0) & ~fits
        bits = tl.sum(tl.where(keeps, column_bit[None, :], 0), axis=1)  # disjoint bits: the sum is their or
        slot = listed + tl.cumsum(whole.to(tl.int32), axis=0) - 1
        tl.store(lists_ptr + row * TILES + slot, tiles, mask=whole)
        tl.store(bits_ptr + row * TILES + slot, bits, mask=whole)
        listed += tl.sum(whole.to(tl.int32), axis=0)
        gathered_by_tile = tl.where(fits, keys, 0)
        if tl.sum(gathered_by_tile, axis=0) > 0:  # no scan where no tile of the chunk is gathered
            taken = (keeps & fits[:, None]).to(tl.int32)
            # A token's place: the gathered keys of the earlier tiles, then of its tile's earlier columns (two short
            # scans, one per axis, rather than one over the chunk's flattened tokens).
            before = tl.cumsum(gathered_by_tile, axis=0) - gathered_by_tile
            place = gathered + before[:, None] + tl.cumsum(taken, axis=1) - taken
            tl.store(gathered_ptr + row * CAP + place, tokens, mask=taken != 0)
        gathered += tl.sum(gathered_by_tile, axis=0)
        asked = tl.max(asked_by, axis=0)
    tl.store(counts_ptr + row, listed)
    tl.store(gathered_counts_ptr + row, gathered)


@triton_jit
def _attention(q_ptr, k_ptr, v_ptr, o_ptr, tile_block_ptr, first_tile_ptr, row_starts_ptr, tile_counts_ptr,
               tile_lists_ptr, bits_ptr, counts_ptr, offsets_ptr, idx_ptr, scale, H, N, R, TILES, KEY_TILES,
               sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
               D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               K_ROWS: tl.constexpr, WHOLE_TILES: tl.constexpr, TMA: tl.constexpr):  # fmt: skip
    """Program (t, g): query tile t of group g, in query block ``i = tile_block[g, t]`` (R: past the last tile,
    nothing to do), rows ``row_starts[g, i] + (t - first_tile[g, i]) BLOCK_M + [0, BLOCK_M)`` below
    ``row_starts[g, i + 1]``, over the keys of (g, i): with ``WHOLE_TILES``, first its ``tile_counts[g * R + i]``
    listed tiles ``tile_lists[(g * R + i) KEY_TILES:]`` of the key sequence, each read whole (through tensor
    descriptors with ``TMA``) and masked to the columns set in ``bits`` (same place); then its ``counts[g * R + i]``
    gathered key tokens ``idx[offsets[g * R + i]:]``, in tiles of BLOCK_N. ``scale`` is ``log2(e) / sqrt(D)``; the
    output ``(B * H, N, D)`` contiguous."""
    t, g = tl.program_id(0), tl.program_id(1)
    block = tl.load(tile_block_ptr + g * TILES + t)
    if block < R:
        b, h = (g // H).to(tl.int64), (g % H).to(tl.int64)
        row = g.to(tl.int64) * R + block
        start = tl.load(row_starts_ptr + g * (R + 1) + block)
        end = tl.load(row_starts_ptr + g * (R + 1) + block + 1)
        rows = start + (t - tl.load(first_tile_ptr + g * (R + 1) + block)) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_D)
        inside = cols < D
        row_mask = (rows < end)[:, None] & inside[None, :]
        q = tl.load(q_ptr + b * sqb + h * sqh + rows[:, None] * sqn + cols[None, :], mask=row_mask, other=0.0)
        k_base, v_base = k_ptr + b * skb + h * skh, v_ptr + b * svb + h * svh
        column = tl.arange(0, BLOCK_N)
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        if WHOLE_TILES:
            if TMA:
                k_desc = tl.make_tensor_descriptor(k_base, shape=[N, D], strides=[skn, 1],
                                                   block_shape=[BLOCK_N, BLOCK_D])  # fmt: skip
                v_desc = tl.make_tensor_descriptor(v_base, shape=[N, D], strides=[svn, 1],
                                                   block_shape=[BLOCK_N, BLOCK_D])  # fmt: skip
            listed = tile_lists_ptr + row * KEY_TILES
            for step in range(0, tl.load(tile_counts_ptr + row)):
                first_key = tl.load(listed + step) * BLOCK_N
                valid = ((tl.load(bits_ptr + row * KEY_TILES + step) >> column.to(tl.int64)) & 1) != 0
                if TMA:  # a whole tile of the key sequence is one box; zeros past N
                    k, v = k_desc.load([first_key, 0]), v_desc.load([first_key, 0])
                else:
                    token = (first_key + column).to(tl.int64)
                    tile_mask = (token < N)[:, None] & inside[None, :]
                    k = tl.load(k_base + token[:, None] * skn + cols[None, :], mask=tile_mask, other=0.0)
                    v = tl.load(v_base + token[:, None] * svn + cols[None, :], mask=tile_mask, other=0.0)
                m_i, l_i, acc = accumulate_tile(tl.dot(q, tl.trans(k)), scale, valid, v, m_i, l_i, acc, True)
        count = tl.load(counts_ptr + row)
        base = tl.load(offsets_ptr + row)
        for offset in range(0, count, BLOCK_N):
            p = offset + column
            valid = p < count
            token = tl.load(idx_ptr + base + p, mask=valid, other=0).to(tl.int64)
            if K_ROWS:
                k = tl.load(k_base + token[:, None] * skn + cols[None, :], mask=valid[:, None] & inside[None, :],
                            other=0.0)  # fmt: skip
                qk = tl.dot(q, tl.trans(k))
            else:  # (BLOCK_D, BLOCK_N): k^T by its addresses
                kt = tl.load(k_base + token[None, :] * skn + cols[:, None], mask=valid[None, :] & inside[:, None],
                             other=0.0)  # fmt: skip
                qk = tl.dot(q, kt)
            v = tl.load(v_base + token[:, None] * svn + cols[None, :], mask=valid[:, None] & inside[None, :],
                        other=0.0)  # fmt: skip
            m_i, l_i, acc = accumulate_tile(qk, scale, valid, v, m_i, l_i, acc, True)
        out = tl.where(l_i[:, None] > 0, acc / tl.maximum(l_i, 1e-30)[:, None], 0.0)
        o_base = o_ptr + g.to(tl.int64) * N * D
        tl.store(o_base + rows[:, None] * D + cols[None, :], out.to(o_ptr.dtype.element_ty), mask=row_mask)


def computed_entries(blocks: VariableBlocks, tokens: int, config: Config | None = None, batch: int = 1,
                     heads: int = 1) -> tuple[int, int]:  # fmt: skip
    """Score entries one :func:`variable_block_attention` call over ``blocks`` (``tokens`` each side) computes with
    ``config`` (:func:`default_config`), and those the blocks keep, each summed over every (batch, head) pair the
    call runs: q's ``batch`` and ``heads``, or the blocks' own where larger (a table or sizes shared by every batch
    item or head count once per pair, as the kernel runs them). The split of the kernel's time over its ideal (density
    x the dense call's) into its work over the kept entries and its time per computed entry. A query block of r rows
    runs ``ceil(r / BLOCK_M)`` tiles of BLOCK_M rows; each computes BLOCK_N columns per key tile :func:`_key_tiles`
    lists whole and, for its gathered keys, ``ceil(gathered / BLOCK_N)`` tiles of BLOCK_N (without ``tiles``: all its
    kept keys gathered). Torch ops, one (batch, head) pair at a time (an ``(R, N)`` bool table each), summed on the
    blocks' device and read once."""
    config = config or default_config()
    shapes = (blocks.kept.shape[:2], blocks.row_sizes.shape[:2], blocks.col_sizes.shape[:2], (batch, heads))
    batch, heads = (max(sizes) for sizes in zip(*shapes, strict=True))
    kept = blocks.kept.bool().expand(batch, heads, -1, -1)
    rows = blocks.row_sizes.expand(batch, heads, -1)
    cols = blocks.col_sizes.expand(batch, heads, -1)
    computed = kept_entries = torch.zeros((), dtype=torch.int64, device=kept.device)
    for b in range(batch):
        for h in range(heads):
            token_kept = kept[b, h][:, block_ids(cols[b, h][None], tokens)[0]]  # (R, N)
            keys = token_kept.sum(-1)
            if config.tiles:
                width = -(-tokens // config.block_n) * config.block_n
                per_tile = F.pad(token_kept, (0, width - tokens)).view(len(keys), -1, config.block_n).sum(-1)
                sparse = (per_tile > 0) & (per_tile < config.sparse_below)
                cap = gather_cap(tokens, config.sparse_below)
                gathered_tile = sparse & (torch.where(sparse, per_tile, 0).cumsum(-1) <= cap)
                whole = ((per_tile > 0) & ~gathered_tile).sum(-1)
                gathered = torch.where(gathered_tile, per_tile, 0).sum(-1)
            else:
                whole, gathered = torch.zeros_like(keys), keys
            columns = (whole + (gathered + config.block_n - 1) // config.block_n) * config.block_n
            row_tiles = (rows[b, h] + config.block_m - 1) // config.block_m * config.block_m
            computed = computed + (row_tiles * columns).sum()
            kept_entries = kept_entries + (rows[b, h] * keys).sum()
    return int(computed), int(kept_entries)


def _running_sums(x: torch.Tensor) -> torch.Tensor:
    """``(.., L)`` -> ``(.., L + 1)`` int32: 0, then the running sums of the last axis."""
    return F.pad(x.cumsum(-1), (1, 0)).to(torch.int32)


@kernel_op("variable_block_attention")
def variable_block_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kept: torch.Tensor,
                                row_sizes: torch.Tensor, col_sizes: torch.Tensor, block_m: int, block_n: int,
                                num_warps: int, num_stages: int, k_rows: bool, tiles: bool,
                                sparse_below: int) -> torch.Tensor:  # fmt: skip
    """The launches of :func:`variable_block_attention` as one op (torch.compile sees one opaque call; gathered keys
    read the index list's size on the host inside it). Arguments as there, the configuration spelled out."""
    batch, heads, tokens, dim = q.shape
    groups, blocks_q, blocks_k = batch * heads, kept.shape[-2], kept.shape[-1]
    q, k, v = (last_axis_contiguous(x) for x in (q, k, v))
    kept = kept.expand(batch, heads, -1, -1).reshape(groups, blocks_q, blocks_k)
    rows = row_sizes.expand(batch, heads, -1).reshape(groups, blocks_q).long()
    cols = col_sizes.expand(batch, heads, -1).reshape(groups, blocks_k).long()

    with_tma = False
    if tiles:
        key_tiles = triton.cdiv(tokens, block_n)
        cap = gather_cap(tokens, sparse_below)
        labels = block_ids(cols, tokens).to(torch.int32)
        tile_lists = torch.empty(groups * blocks_q, key_tiles, device=q.device, dtype=torch.int32)
        bits = torch.empty(groups * blocks_q, key_tiles, device=q.device, dtype=torch.int64)
        tile_counts = torch.empty(groups * blocks_q, device=q.device, dtype=torch.int32)
        idx = torch.empty(groups * blocks_q, cap, device=q.device, dtype=torch.int32)
        counts = torch.empty(groups * blocks_q, device=q.device, dtype=torch.int32)
        kept_bytes = kept.to(torch.uint8).contiguous()
        _key_tiles[(groups * blocks_q,)](labels, kept_bytes, tile_lists, bits, tile_counts, idx, counts, blocks_q,
                                         blocks_k, tokens, key_tiles, cap, sparse_below, BLOCK_N=block_n,
                                         CHUNK=KEY_TILE_CHUNK, num_warps=KEY_TILE_WARPS)  # fmt: skip
        offsets = torch.arange(groups * blocks_q, device=q.device, dtype=torch.int64) * cap
        with_tma = descriptor_aligned(k) and descriptor_aligned(v)
        if with_tma and not INTERPRETED:
            use_descriptor_scratch()
    else:
        key_tiles = 0
        cum = _running_sums(kept * cols[:, None, :]).view(groups * blocks_q, blocks_k + 1)
        counts = cum[:, -1].contiguous()  # read by the kernel as a flat int32 array
        offsets = counts.long().cumsum(0) - counts
        total = int(counts.sum())  # the one host read: the size of the index lists
        idx = torch.empty(max(total, 1), device=q.device, dtype=torch.int32)
        tile_lists = tile_counts = bits = idx  # unread
        starts = (cols.cumsum(-1) - cols).to(torch.int32)
        steps = max(1, blocks_k.bit_length())
        index_grid = (groups * blocks_q, triton.cdiv(tokens, INDEX_BLOCK))
        _key_indices[index_grid](cum, starts, offsets, idx, blocks_q, blocks_k, STEPS=steps, BLOCK=INDEX_BLOCK)

    first_tile = _running_sums((rows + block_m - 1) // block_m)
    query_tiles = triton.cdiv(tokens, block_m) + blocks_q  # each block adds at most one partial tile
    positions = torch.arange(query_tiles, device=q.device, dtype=torch.int32).expand(groups, query_tiles).contiguous()
    tile_block = torch.searchsorted(first_tile[:, 1:].contiguous(), positions, right=True).to(torch.int32)
    out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    _attention[(query_tiles, groups)](
        q, k, v, out, tile_block, first_tile, _running_sums(rows), tile_counts, tile_lists, bits, counts, offsets, idx,
        1.4426950408889634 / dim**0.5, heads, tokens, blocks_q, query_tiles, key_tiles,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
        v.stride(2), D=dim, BLOCK_D=tile_columns(dim), BLOCK_M=block_m, BLOCK_N=block_n,
        K_ROWS=k_rows, WHOLE_TILES=tiles, TMA=with_tma,
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out


@variable_block_attention_op.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kept: torch.Tensor, row_sizes: torch.Tensor,
      col_sizes: torch.Tensor, block_m: int, block_n: int, num_warps: int, num_stages: int, k_rows: bool,
      tiles: bool, sparse_below: int) -> torch.Tensor:  # fmt: skip
    return q.new_empty(q.shape)


def variable_block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blocks: VariableBlocks,
                             config: Config | None = None) -> torch.Tensor:  # fmt: skip
    """Attention of q, k, v ``(B, H, N, D)`` (fp16/bf16, on CUDA or under the Triton interpreter) over ``blocks``'
    kept pairs, ``(B, H, N, D)`` in q's dtype, with ``config`` (:func:`default_config`). Raises
    :class:`HarnessError` for a head dim over :data:`MAX_HEAD_DIM`, key tiles wider than :data:`MAX_KEY_TILE`
    (their kept columns are the bits of one int64), or ``sparse_below`` without whole key tiles."""
    if q.shape[-1] > MAX_HEAD_DIM:  # tiles of wider heads overflow shared memory (a Triton error, not a message)
        raise HarnessError(f"triton-variable takes head_dim <= {MAX_HEAD_DIM}, got {q.shape[-1]}")
    config = config or default_config()
    if config.tiles and config.block_n > MAX_KEY_TILE:
        raise HarnessError(f"configuration {config.name}: key tiles take BLOCK_N <= {MAX_KEY_TILE}")
    if config.sparse_below and not config.tiles:
        raise HarnessError(f"configuration {config.name}: sparse_below {config.sparse_below} needs whole key tiles")
    return variable_block_attention_op(q, k, v, blocks.kept, blocks.row_sizes, blocks.col_sizes, *config)
