"""Probe 3: svg2's permutations (gather against index_select / index_copy) and _key_tiles variants at Wan 1.3B."""
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(__file__))
from kmeans_probe import timeit  # noqa: E402

from harness.benchmarks.sparse_gpu import model_inputs  # noqa: E402
from methods import build_method  # noqa: E402
from methods.kernels import variable_blocks_triton as vb  # noqa: E402
from methods.kernels.block_sparse import block_ids, permute_tokens, unpermute_tokens  # noqa: E402


def old_p(x, order):
    index = order.expand(*x.shape[:2], -1).unsqueeze(-1).expand_as(x)
    return x.gather(-2, index)


def old_u(x, order):
    index = order.expand(*x.shape[:2], -1).unsqueeze(-1).expand_as(x)
    return torch.empty_like(x).scatter(-2, index, x)


dev = torch.device("cuda")
q, k, v, ctx = model_inputs("wan1.3b", dev)
qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # the forward's layout
with torch.inference_mode():
    m = build_method("svg2", fixed_density=0.295)
    for _ in range(2):
        m(q, k, v, ctx)
    plan = m.plan(q, k, v, ctx)
    order = plan.q_order
    for name, x in (("contiguous", q), ("transposed", qt)):
        assert torch.equal(permute_tokens(x, order), old_p(x, order))
        print(f"permute {name}: gather {timeit(lambda: old_p(x, order)):.4f} ms, "
              f"index_select {timeit(lambda: permute_tokens(x, order)):.4f} ms", flush=True)
    p = permute_tokens(q, order)
    assert torch.equal(unpermute_tokens(p, order), old_u(p, order))
    print(f"unpermute: scatter {timeit(lambda: old_u(p, order)):.4f} ms, "
          f"index_copy {timeit(lambda: unpermute_tokens(p, order)):.4f} ms", flush=True)
    print(f"call {timeit(lambda: m(q, k, v, ctx)):.4f} ms; execute {timeit(lambda: m.execute(q, k, v, plan, m.backend)):.4f} ms", flush=True)
    # _key_tiles alone, as the op launches it
    var = plan.pattern.variable
    kept, rows, cols = var.kept, var.row_sizes, var.col_sizes
    batch, heads, tokens, dim = q.shape
    groups, blocks_q, blocks_k = batch * heads, kept.shape[-2], kept.shape[-1]
    kept = kept.expand(batch, heads, -1, -1).reshape(groups, blocks_q, blocks_k)
    cols = cols.expand(batch, heads, -1).reshape(groups, blocks_k).long()
    labels = block_ids(cols, tokens).to(torch.int32)
    block_n = 64
    key_tiles = triton.cdiv(tokens, block_n)
    cap = vb.GATHER_CAP
    tile_lists = torch.empty(groups * blocks_q, key_tiles, device=dev, dtype=torch.int32)
    bits = torch.empty(groups * blocks_q, key_tiles, device=dev, dtype=torch.int64)
    tile_counts = torch.empty(groups * blocks_q, device=dev, dtype=torch.int32)
    idx = torch.empty(groups * blocks_q, cap, device=dev, dtype=torch.int32)
    counts = torch.empty(groups * blocks_q, device=dev, dtype=torch.int32)
    kept_bytes = kept.to(torch.uint8).contiguous()
    for chunk in (4, 8, 16, 32):
        for warps in (2, 4, 8):
            def launch():
                vb._key_tiles[(groups * blocks_q,)](labels, kept_bytes, tile_lists, bits, tile_counts, idx, counts,
                                                    blocks_q, blocks_k, tokens, key_tiles, cap, 40, BLOCK_N=block_n,
                                                    CHUNK=chunk, num_warps=warps)
            print(f"_key_tiles chunk {chunk} warps {warps}: {timeit(launch):.4f} ms", flush=True)
    for sparse in (0, 1):
        def launch():
            vb._key_tiles[(groups * blocks_q,)](labels, kept_bytes, tile_lists, bits, tile_counts, idx, counts,
                                                blocks_q, blocks_k, tokens, key_tiles, cap, sparse, BLOCK_N=block_n,
                                                CHUNK=16)
        print(f"_key_tiles sparse_below {sparse} (no gathered keys): {timeit(launch):.4f} ms", flush=True)
    print("mean listed tiles", tile_counts.float().mean().item(), "of", key_tiles, flush=True)
