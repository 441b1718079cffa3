"""Probe (not the package): triton-variable's whole-tile loop at 128 query rows under Triton's warp specialisation,
each tile inside one query block (its rows past the block computed and clipped at the store), every listed key tile
whole with its 1-D column mask (the package's _key_tiles lists at sparse_below 0). One program per exact tile."""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from methods.kernels import INTERPRETED, use_descriptor_scratch
from methods.kernels.block_sparse import block_ids
from methods.kernels.variable_blocks_triton import KEY_TILE_CHUNK, KEY_TILE_WARPS, _key_tiles


@triton.jit
def _ws_tiles(q_ptr, k_ptr, v_ptr, o_ptr, tile_group_ptr, tile_row_ptr, tile_first_ptr, tile_end_ptr, lists_ptr,
              bits_ptr, counts_ptr, scale, N, KEY_TILES, D: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, WS: tl.constexpr):
    p = tl.program_id(0)
    g = tl.load(tile_group_ptr + p).to(tl.int64)
    row = tl.load(tile_row_ptr + p).to(tl.int64)  # g * R + block
    first = tl.load(tile_first_ptr + p)
    end = tl.load(tile_end_ptr + p)
    base = g * N * D
    q_desc = tl.make_tensor_descriptor(q_ptr + base, shape=[N, D], strides=[D, 1], block_shape=[BLOCK_M, D])
    k_desc = tl.make_tensor_descriptor(k_ptr + base, shape=[N, D], strides=[D, 1], block_shape=[BLOCK_N, D])
    v_desc = tl.make_tensor_descriptor(v_ptr + base, shape=[N, D], strides=[D, 1], block_shape=[BLOCK_N, D])
    q = q_desc.load([first, 0])
    column_bit = tl.full((BLOCK_N,), 1, dtype=tl.int64) << tl.arange(0, BLOCK_N).to(tl.int64)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, D), dtype=tl.float32)
    listed = lists_ptr + row * KEY_TILES
    listed_bits = bits_ptr + row * KEY_TILES
    for step in tl.range(0, tl.load(counts_ptr + row), warp_specialize=WS):
        j = tl.load(listed + step)
        valid = (tl.load(listed_bits + step) & column_bit) != 0
        k = k_desc.load([j * BLOCK_N, 0])
        v = v_desc.load([j * BLOCK_N, 0])
        qk = tl.where(valid[None, :], tl.dot(q, tl.trans(k)), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1) * scale)
        alpha = tl.exp2(m_i - m_new)
        weights = tl.exp2(qk * scale - m_new[:, None])
        l_i = l_i * alpha + tl.sum(weights, axis=1)
        acc = acc * alpha[:, None] + tl.dot(weights.to(v.dtype), v)
        m_i = m_new
    out = tl.where(l_i[:, None] > 0, acc / tl.maximum(l_i, 1e-30)[:, None], 0.0)
    # rows from the block's end on belong to the next block: clipped by the descriptor's shape
    o_desc = tl.make_tensor_descriptor(o_ptr + base, shape=[end, D], strides=[D, 1], block_shape=[BLOCK_M, D])
    o_desc.store([first, 0], out.to(o_ptr.dtype.element_ty))


def plan(kept, row_sizes, col_sizes, batch, heads, tokens, block_m, block_n):
    device = kept.device
    groups, R, C = batch * heads, kept.shape[-2], kept.shape[-1]
    kept = kept.expand(batch, heads, -1, -1).reshape(groups * R, C).to(torch.uint8).contiguous()
    rows = row_sizes.expand(batch, heads, -1).reshape(groups, R).long()
    cols = col_sizes.expand(batch, heads, -1).reshape(groups, C).long()
    key_tiles = triton.cdiv(tokens, block_n)
    labels = block_ids(cols, tokens).to(torch.int32)
    lists = torch.empty(groups * R, key_tiles, device=device, dtype=torch.int32)
    bits = torch.empty(groups * R, key_tiles, device=device, dtype=torch.int64)
    counts = torch.empty(groups * R, device=device, dtype=torch.int32)
    idx = torch.empty(groups * R, 1, device=device, dtype=torch.int32)
    gathered = torch.empty(groups * R, device=device, dtype=torch.int32)
    _key_tiles[(groups * R,)](labels, kept, lists, bits, counts, idx, gathered, R, C, tokens, key_tiles, 1, 0,
                              BLOCK_N=block_n, CHUNK=KEY_TILE_CHUNK, num_warps=KEY_TILE_WARPS)
    per_block = ((rows + block_m - 1) // block_m).flatten()  # (G * R,)
    starts = (rows.cumsum(-1) - rows).flatten()
    ends = rows.cumsum(-1).flatten()
    block_of_tile = torch.repeat_interleave(torch.arange(groups * R, device=device), per_block)  # host read inside
    within = torch.arange(len(block_of_tile), device=device) - (per_block.cumsum(0) - per_block)[block_of_tile]
    tile_group = (block_of_tile // R).to(torch.int32)
    tile_first = (starts[block_of_tile] + within * block_m).to(torch.int32)
    tile_end = ends[block_of_tile].to(torch.int32)
    return lists, bits, counts, tile_group, block_of_tile.to(torch.int32), tile_first, tile_end


def ws_attention(q, k, v, tables, block_m=128, block_n=64, warps=4, stages=2, ws=True):
    batch, heads, tokens, dim = q.shape
    lists, bits, counts, tile_group, tile_row, tile_first, tile_end = tables
    if not INTERPRETED:
        use_descriptor_scratch()
    out = torch.zeros_like(q)
    _ws_tiles[(len(tile_group),)](q, k, v, out, tile_group, tile_row, tile_first, tile_end, lists, bits, counts,
                                  1.4426950408889634 / dim**0.5, tokens, lists.shape[1], D=dim, BLOCK_M=block_m,
                                  BLOCK_N=block_n, WS=ws, num_warps=warps, num_stages=stages)
    return out
