"""Probe 4: a Triton row permutation against gather/scatter, and _key_tiles with a 2D place scan, at Wan 1.3B."""
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(__file__))
from kmeans_probe import timeit  # noqa: E402

from harness.benchmarks.sparse_gpu import model_inputs  # noqa: E402
from methods import build_method  # noqa: E402
from methods.kernels import variable_blocks_triton as vb  # noqa: E402
from methods.kernels.block_sparse import block_ids, permute_tokens, unpermute_tokens  # noqa: E402


@triton.jit
def permute_rows(x_ptr, order_ptr, out_ptr, N, H, sxb, sxh, sxn, sob, soh, syb, syh, syn, INVERSE: tl.constexpr,
                 D: tl.constexpr, BLOCK: tl.constexpr):
    t, g = tl.program_id(0), tl.program_id(1)
    b, h = (g // H).to(tl.int64), (g % H).to(tl.int64)
    rows = t * BLOCK + tl.arange(0, BLOCK)
    m = rows < N
    src = tl.load(order_ptr + b * sob + h * soh + rows, mask=m, other=0)
    cols = tl.arange(0, D)
    if INVERSE:
        x = tl.load(x_ptr + b * sxb + h * sxh + rows.to(tl.int64)[:, None] * sxn + cols[None, :], mask=m[:, None])
        tl.store(out_ptr + b * syb + h * syh + src[:, None] * syn + cols[None, :], x, mask=m[:, None])
    else:
        x = tl.load(x_ptr + b * sxb + h * sxh + src[:, None] * sxn + cols[None, :], mask=m[:, None])
        tl.store(out_ptr + b * syb + h * syh + rows.to(tl.int64)[:, None] * syn + cols[None, :], x, mask=m[:, None])


def triton_permute(x, order, inverse, block, warps):
    B, H, N, D = x.shape
    out = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    o = order.expand(B, H, N)
    permute_rows[(triton.cdiv(N, block), B * H)](x, o, out, N, H, x.stride(0), x.stride(1), x.stride(2), o.stride(0),
                                                o.stride(1), out.stride(0), out.stride(1), out.stride(2),
                                                INVERSE=inverse, D=D, BLOCK=block, num_warps=warps)
    return out


@triton.jit
def key_tiles_x(labels_ptr, kept_ptr, lists_ptr, bits_ptr, counts_ptr, gathered_ptr, gathered_counts_ptr, R, C, N,
                TILES, CAP, SPARSE, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr, SKIP: tl.constexpr):
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
        asked_by = asked + tl.cumsum(tl.where(sparse, keys, 0), axis=0)
        fits = sparse & (asked_by <= CAP)
        whole = (keys > 0) & ~fits
        bits = tl.sum(tl.where(keeps, column_bit[None, :], 0), axis=1)
        slot = listed + tl.cumsum(whole.to(tl.int32), axis=0) - 1
        tl.store(lists_ptr + row * TILES + slot, tiles, mask=whole)
        tl.store(bits_ptr + row * TILES + slot, bits, mask=whole)
        listed += tl.sum(whole.to(tl.int32), axis=0)
        taken = (keeps & fits[:, None]).to(tl.int32)
        per_tile = tl.where(fits, keys, 0)
        if SKIP:
            if tl.sum(per_tile, axis=0) > 0:
                place = gathered + (tl.cumsum(per_tile, axis=0) - per_tile)[:, None] + tl.cumsum(taken, axis=1) - taken
                tl.store(gathered_ptr + row * CAP + place, tokens, mask=taken != 0)
        else:
            place = gathered + (tl.cumsum(per_tile, axis=0) - per_tile)[:, None] + tl.cumsum(taken, axis=1) - taken
            tl.store(gathered_ptr + row * CAP + place, tokens, mask=taken != 0)
        gathered += tl.sum(per_tile, axis=0)
        asked = tl.max(asked_by, axis=0)
    tl.store(counts_ptr + row, listed)
    tl.store(gathered_counts_ptr + row, gathered)


dev = torch.device("cuda")
q, k, v, ctx = model_inputs("wan1.3b", dev)
qt = q.transpose(1, 2).contiguous().transpose(1, 2)
with torch.inference_mode():
    m = build_method("svg2", fixed_density=0.295)
    for _ in range(2):
        m(q, k, v, ctx)
    plan = m.plan(q, k, v, ctx)
    order = plan.q_order
    for name, x in (("contiguous", q), ("transposed", qt)):
        ref = permute_tokens(x, order)
        print(f"permute {name}: gather {timeit(lambda: permute_tokens(x, order)):.4f} ms", flush=True)
        for block, warps in ((32, 4), (64, 4), (64, 8), (128, 8), (16, 4)):
            assert torch.equal(triton_permute(x, order, False, block, warps), ref)
            print(f"   triton {block}x{warps}: {timeit(lambda: triton_permute(x, order, False, block, warps)):.4f}", flush=True)
    p = permute_tokens(q, order)
    ref = unpermute_tokens(p, order)
    print(f"unpermute: scatter {timeit(lambda: unpermute_tokens(p, order)):.4f} ms", flush=True)
    for block, warps in ((32, 4), (64, 4), (64, 8), (128, 8), (16, 4)):
        assert torch.equal(triton_permute(p, order, True, block, warps), ref)
        print(f"   triton {block}x{warps}: {timeit(lambda: triton_permute(p, order, True, block, warps)):.4f}", flush=True)
    var = plan.pattern.variable
    kept, cols = var.kept, var.col_sizes
    batch, heads, tokens, dim = q.shape
    groups, blocks_q, blocks_k = batch * heads, kept.shape[-2], kept.shape[-1]
    kept = kept.expand(batch, heads, -1, -1).reshape(groups, blocks_q, blocks_k)
    cols = cols.expand(batch, heads, -1).reshape(groups, blocks_k).long()
    labels = block_ids(cols, tokens).to(torch.int32)
    key_tiles = triton.cdiv(tokens, 64)
    cap = vb.GATHER_CAP
    kept_bytes = kept.to(torch.uint8).contiguous()

    def buffers():
        return (torch.zeros(groups * blocks_q, key_tiles, device=dev, dtype=torch.int32),
                torch.zeros(groups * blocks_q, key_tiles, device=dev, dtype=torch.int64),
                torch.zeros(groups * blocks_q, device=dev, dtype=torch.int32),
                torch.zeros(groups * blocks_q, cap, device=dev, dtype=torch.int32),
                torch.zeros(groups * blocks_q, device=dev, dtype=torch.int32))
    ref = buffers()
    vb._key_tiles[(groups * blocks_q,)](labels, kept_bytes, *ref, blocks_q, blocks_k, tokens, key_tiles, cap, 40,
                                        BLOCK_N=64, CHUNK=16)
    print(f"_key_tiles module 16x4: {timeit(lambda: vb._key_tiles[(groups * blocks_q,)](labels, kept_bytes, *ref, blocks_q, blocks_k, tokens, key_tiles, cap, 40, BLOCK_N=64, CHUNK=16)):.4f}", flush=True)
    for skip in (False, True):
        for chunk, warps in ((8, 2), (16, 2), (16, 4), (8, 4), (32, 4), (4, 1), (8, 1)):
            out = buffers()

            def launch():
                key_tiles_x[(groups * blocks_q,)](labels, kept_bytes, *out, blocks_q, blocks_k, tokens, key_tiles, cap,
                                                  40, BLOCK_N=64, CHUNK=chunk, SKIP=skip, num_warps=warps)
            launch()
            same = all(torch.equal(a, b) for a, b in zip(out, ref))
            print(f"_key_tiles 2d skip={skip} {chunk}x{warps}: {timeit(launch):.4f} ms same={same}", flush=True)
