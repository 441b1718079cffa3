"""Probe (not the package): svg2's variable blocks with query tiles that straddle query blocks.

Fixed query tiles of BLOCK_M rows of the cluster-permuted q (no partial tile per block); each tile streams the union
of the key tiles its query blocks keep, each row masked to its own block's kept columns (bits of an int64 per (query
block, key tile)). Launches: per-block bits (dense, (G*R, T) int64), the union lists per query tile, attention (rows
of the tile's first SPAN blocks; warp-specialised where asked), and an overflow pass for rows of tiles spanning more.
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from methods.kernels import INTERPRETED, use_descriptor_scratch
from methods.kernels.block_sparse import block_ids


@triton.jit
def _tile_bits(labels_ptr, kept_ptr, bits_ptr, R, C, N, TILES, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    labels = labels_ptr + (row // R) * N
    kept = kept_ptr + row * C
    column = tl.arange(0, BLOCK_N)
    column_bit = tl.full((BLOCK_N,), 1, dtype=tl.int64) << column.to(tl.int64)
    for first in range(0, TILES, CHUNK):
        tiles = first + tl.arange(0, CHUNK)
        tokens = tiles[:, None] * BLOCK_N + column[None, :]
        inside = tokens < N
        label = tl.load(labels + tokens, mask=inside, other=0)
        keeps = (tl.load(kept + label, mask=inside, other=0) != 0) & inside
        bits = tl.sum(tl.where(keeps, column_bit[None, :], 0), axis=1)
        tl.store(bits_ptr + row * TILES + tiles, bits, mask=tiles < TILES)


@triton.jit
def _union_lists(bits_ptr, lo_ptr, hi_ptr, lists_ptr, counts_ptr, R, TILES, QT, CHUNK: tl.constexpr):
    t, g = tl.program_id(0), tl.program_id(1)
    lo = tl.load(lo_ptr + g * QT + t)
    hi = tl.load(hi_ptr + g * QT + t)
    out = lists_ptr + (g.to(tl.int64) * QT + t) * TILES
    listed = tl.zeros((), dtype=tl.int32)
    for first in range(0, TILES, CHUNK):
        tiles = first + tl.arange(0, CHUNK)
        inside = tiles < TILES
        any_kept = tl.zeros((CHUNK,), dtype=tl.int32)
        for b in range(lo, hi + 1):
            bits = tl.load(bits_ptr + (g.to(tl.int64) * R + b) * TILES + tiles, mask=inside, other=0)
            any_kept |= (bits != 0).to(tl.int32)
        slot = listed + tl.cumsum(any_kept, axis=0) - 1
        tl.store(out + slot, tiles, mask=any_kept != 0)
        listed += tl.sum(any_kept, axis=0)
    tl.store(counts_ptr + g * QT + t, listed)


@triton.jit
def _attention(q_ptr, k_ptr, v_ptr, o_ptr, bits_ptr, lists_ptr, counts_ptr, lo_ptr, hi_ptr, row_starts_ptr, slots_ptr,
               scale, N, NP, R, TILES, QT, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               WS: tl.constexpr, SPAN: tl.constexpr, OVERFLOW: tl.constexpr):
    t, g = tl.program_id(0), tl.program_id(1)
    base = g.to(tl.int64) * N * D
    lo = tl.load(lo_ptr + g * QT + t)
    hi = tl.load(hi_ptr + g * QT + t)
    if (not OVERFLOW) or (hi - lo >= SPAN):
        rows = t * BLOCK_M + tl.arange(0, BLOCK_M)
        k_desc = tl.make_tensor_descriptor(k_ptr + base, shape=[N, D], strides=[D, 1], block_shape=[BLOCK_N, D])
        v_desc = tl.make_tensor_descriptor(v_ptr + base, shape=[N, D], strides=[D, 1], block_shape=[BLOCK_N, D])
        column_bit = tl.full((BLOCK_N,), 1, dtype=tl.int64) << tl.arange(0, BLOCK_N).to(tl.int64)
        m_i = tl.full((BLOCK_M,), -1e30, dtype=tl.float32)  # finite: a row may keep nothing in a listed tile
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, D), dtype=tl.float32)
        listed = lists_ptr + (g.to(tl.int64) * QT + t) * TILES
        count = tl.load(counts_ptr + g * QT + t)
        if OVERFLOW:  # rows of the blocks past the tile's first SPAN, each row's bits by its own pointer
            block = tl.zeros((BLOCK_M,), dtype=tl.int32) + lo
            for b in range(lo + 1, hi + 1):
                block += (rows >= tl.load(row_starts_ptr + g * (R + 1) + b)).to(tl.int32)
            row_bits = bits_ptr + (g.to(tl.int64) * R + block) * TILES
            q = tl.load(q_ptr + base + rows.to(tl.int64)[:, None] * D + tl.arange(0, D)[None, :],
                        mask=(rows < N)[:, None], other=0.0)
            for step in range(0, count):
                j = tl.load(listed + step)
                k = k_desc.load([j * BLOCK_N, 0])
                v = v_desc.load([j * BLOCK_N, 0])
                valid = (tl.load(row_bits + j)[:, None] & column_bit[None, :]) != 0
                qk = tl.where(valid, tl.dot(q, tl.trans(k)), float("-inf"))
                m_new = tl.maximum(m_i, tl.max(qk, axis=1) * scale)
                alpha = tl.exp2(m_i - m_new)
                weights = tl.exp2(qk * scale - m_new[:, None])
                l_i = l_i * alpha + tl.sum(weights, axis=1)
                acc = acc * alpha[:, None] + tl.dot(weights.to(v.dtype), v)
                m_i = m_new
            out = tl.where(l_i[:, None] > 0, acc / tl.maximum(l_i, 1e-30)[:, None], 0.0)
            own = (block - lo >= SPAN) & (rows < N)
            tl.store(o_ptr + base + rows.to(tl.int64)[:, None] * D + tl.arange(0, D)[None, :],
                     out.to(o_ptr.dtype.element_ty), mask=own[:, None])
        else:
            # each row's block among the tile's (0 .. SPAN - 1; SPAN or more: left to the overflow pass)
            slot_desc = tl.make_tensor_descriptor(slots_ptr + g.to(tl.int64) * NP, shape=[NP], strides=[1],
                                                  block_shape=[BLOCK_M])
            slot = slot_desc.load([t * BLOCK_M]).to(tl.int32)
            q_desc = tl.make_tensor_descriptor(q_ptr + base, shape=[N, D], strides=[D, 1], block_shape=[BLOCK_M, D])
            q = q_desc.load([t * BLOCK_M, 0])
            spanned = bits_ptr + (g.to(tl.int64) * R + lo) * TILES
            for step in tl.range(0, count, warp_specialize=WS):
                j = tl.load(listed + step)
                k = k_desc.load([j * BLOCK_N, 0])
                v = v_desc.load([j * BLOCK_N, 0])
                # scalar loads of the spanned blocks' bits, one select each (a per-row gather, or a box of them
                # broadcast over the rows, stops Triton 3.6's warp specialisation)
                bits = tl.where(slot == 0, tl.load(spanned + j), 0)
                for s in tl.static_range(1, SPAN):
                    bits = tl.where(slot == s, tl.load(spanned + s * TILES + j, mask=lo + s <= hi, other=0), bits)
                valid = (bits[:, None] & column_bit[None, :]) != 0
                qk = tl.where(valid, tl.dot(q, tl.trans(k)), float("-inf"))
                m_new = tl.maximum(m_i, tl.max(qk, axis=1) * scale)
                alpha = tl.exp2(m_i - m_new)
                weights = tl.exp2(qk * scale - m_new[:, None])
                l_i = l_i * alpha + tl.sum(weights, axis=1)
                acc = acc * alpha[:, None] + tl.dot(weights.to(v.dtype), v)
                m_i = m_new
            out = tl.where(l_i[:, None] > 0, acc / tl.maximum(l_i, 1e-30)[:, None], 0.0)
            o_desc = tl.make_tensor_descriptor(o_ptr + base, shape=[N, D], strides=[D, 1], block_shape=[BLOCK_M, D])
            o_desc.store([t * BLOCK_M, 0], out.to(o_ptr.dtype.element_ty))


def plan(kept, row_sizes, col_sizes, batch, heads, tokens, block_m, block_n, span, chunk=4, list_chunk=128):
    """Device tables of a call: bits, lo, hi, lists, counts, row_starts, slots."""
    device = kept.device
    groups, R, C = batch * heads, kept.shape[-2], kept.shape[-1]
    kept = kept.expand(batch, heads, -1, -1).reshape(groups, R, C).to(torch.uint8).contiguous()
    rows = row_sizes.expand(batch, heads, -1).reshape(groups, R).long()
    cols = col_sizes.expand(batch, heads, -1).reshape(groups, C).long()
    tiles, qt = triton.cdiv(tokens, block_n), triton.cdiv(tokens, block_m)
    labels = block_ids(cols, tokens).to(torch.int32)
    bits = torch.empty(groups * R, tiles, device=device, dtype=torch.int64)
    _tile_bits[(groups * R,)](labels, kept, bits, R, C, tokens, tiles, BLOCK_N=block_n, CHUNK=chunk, num_warps=1)
    row_starts = F.pad(rows.cumsum(-1), (1, 0)).to(torch.int32).contiguous()
    first = torch.arange(qt, device=device, dtype=torch.int32) * block_m
    last = torch.clamp(first + block_m, max=tokens) - 1
    ends = row_starts[:, 1:].contiguous()
    lo = torch.searchsorted(ends, first.expand(groups, qt).contiguous(), right=True).to(torch.int32)
    hi = torch.searchsorted(ends, last.expand(groups, qt).contiguous(), right=True).to(torch.int32)
    lists = torch.empty(groups * qt, tiles, device=device, dtype=torch.int32)
    counts = torch.empty(groups * qt, device=device, dtype=torch.int32)
    _union_lists[(qt, groups)](bits, lo, hi, lists, counts, R, tiles, qt, CHUNK=list_chunk, num_warps=4)
    padded = qt * block_m
    block_of_row = block_ids(rows, tokens)  # (G, N)
    slots = (block_of_row - lo.long().repeat_interleave(block_m, dim=1)[:, :tokens]).clamp(max=span)
    slots = F.pad(slots, (0, padded - tokens), value=span).to(torch.int8).contiguous()
    return bits, lo, hi, lists, counts, row_starts, slots


def straddle_attention(q, k, v, kept, row_sizes, col_sizes, block_m=128, block_n=64, warps=4, stages=2, ws=True,
                       span=8, tables=None):
    batch, heads, tokens, dim = q.shape
    groups, R = batch * heads, kept.shape[-2]
    q, k, v = (x.contiguous() for x in (q, k, v))
    if tables is None:
        tables = plan(kept, row_sizes, col_sizes, batch, heads, tokens, block_m, block_n, span)
    bits, lo, hi, lists, counts, row_starts, slots = tables
    tiles, qt = triton.cdiv(tokens, block_n), triton.cdiv(tokens, block_m)
    if not INTERPRETED:
        use_descriptor_scratch()
    out = torch.empty_like(q)
    args = (q, k, v, out, bits, lists, counts, lo, hi, row_starts, slots, 1.4426950408889634 / dim**0.5, tokens,
            qt * block_m, R, tiles, qt)
    _attention[(qt, groups)](*args, D=dim, BLOCK_M=block_m, BLOCK_N=block_n, WS=ws, SPAN=span, OVERFLOW=False,
                             num_warps=warps, num_stages=stages)
    if True:  # always: its programs return at once unless their tile spans more than SPAN blocks (no host read)
        _attention[(qt, groups)](*args, D=dim, BLOCK_M=block_m, BLOCK_N=block_n, WS=False, SPAN=span,
                                 OVERFLOW=True, num_warps=warps if block_m == 64 else 8, num_stages=2)
    return out
