"""Experiment (not part of the package): svg2's k-means assignment (methods.kernels.kmeans_triton._assign) in Gluon,
with the next centroid tile's product issued as an asynchronous warpgroup MMA before this tile's nearest-centroid
epilogue (round to bf16, distance, row minimum, first index), so that the tensor cores and the epilogue's ALU work
overlap. Labels checked equal to the package kernel's, then both timed at Wan 1.3B's shape (12 x 32,760 x 128, bf16)
with 300 and 1,000 clusters (svg2's q and k clusterings), and at 14B's (40 x 75,600)."""

import json
import os
import sys

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait

from methods.kernels import kmeans_triton as km
from methods.kernels import use_descriptor_scratch


@gluon.jit
def _nearest(d, sq_t, start, best, best_index, BLOCK_C: gl.constexpr, acc_layout: gl.constexpr):
    """The package kernel's epilogue on one tile of products ``d (BLOCK_N, BLOCK_C)`` fp32."""
    packed = gl.inline_asm_elementwise("cvt.rn.bf16x2.f32 $0, $1, $2;", "=r,f,f", [d, gl.zeros_like(d)],
                                       dtype=gl.int32, is_pure=True, pack=1)
    distances = sq_t[None, :] - 2.0 * packed.to(gl.float32, bitcast=True)
    tile_min = gl.min(distances, axis=1)
    cols = gl.arange(0, BLOCK_C, layout=gl.SliceLayout(0, acc_layout))
    first = gl.min(gl.where(distances == tile_min[:, None], cols[None, :], BLOCK_C), axis=1)
    better = tile_min < best
    return gl.where(better, tile_min, best), gl.where(better, first + start, best_index)


@gluon.jit
def _load_tile(ct_desc, ct_smem, ready, c, tiles, STAGES: gl.constexpr, BLOCK_C: gl.constexpr):
    stage = c % STAGES
    pred = c < tiles
    mbarrier.expect(ready.index(stage), ct_desc.block_type.nbytes, pred=pred)
    tma.async_copy_global_to_shared(ct_desc, [0, gl.minimum(c, tiles - 1) * BLOCK_C], ready.index(stage),
                                    ct_smem.index(stage), pred=pred)


@gluon.jit
def _assign_gluon(x_ptr, ct_ptr, sq_ptr, labels_ptr, N, C, CP, sxg, sxn, D: gl.constexpr, BLOCK_N: gl.constexpr,
                  BLOCK_C: gl.constexpr, STAGES: gl.constexpr, num_warps: gl.constexpr):
    tile = gl.program_id(0)
    g = gl.program_id(1).to(gl.int64)
    smem_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                         instr_shape=[16, BLOCK_C, 16])
    x_desc = tma.make_tensor_descriptor(x_ptr + g * sxg, shape=[N, D], strides=[sxn, 1], block_shape=[BLOCK_N, D],
                                        layout=smem_layout)
    ct_desc = tma.make_tensor_descriptor(ct_ptr + g * D * CP, shape=[D, CP], strides=[CP, 1],
                                         block_shape=[D, BLOCK_C], layout=smem_layout)
    x_smem = gl.allocate_shared_memory(x_desc.dtype, [BLOCK_N, D], smem_layout)
    ct_smem = gl.allocate_shared_memory(ct_desc.dtype, [STAGES, D, BLOCK_C], smem_layout)
    x_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(x_bar, count=1)
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
    tiles = gl.cdiv(C, BLOCK_C)
    mbarrier.expect(x_bar, x_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(x_desc, [tile * BLOCK_N, 0], x_bar, x_smem)
    for s in gl.static_range(STAGES):
        _load_tile(ct_desc, ct_smem, ready, s, tiles, STAGES, BLOCK_C)
    sq_base = sq_ptr + g * CP
    ids = gl.arange(0, BLOCK_C, layout=gl.SliceLayout(0, acc_layout))
    zero = gl.zeros([BLOCK_N, BLOCK_C], gl.float32, acc_layout)
    mbarrier.wait(x_bar, 0)
    mbarrier.wait(ready.index(0), 0)
    d = warpgroup_mma(x_smem, ct_smem.index(0), zero, use_acc=False, is_async=True)
    d = warpgroup_mma_wait(num_outstanding=0, deps=(d,))
    sq_t = gl.load(sq_base + ids)
    best = gl.full([BLOCK_N], float("inf"), gl.float32, gl.SliceLayout(1, acc_layout))
    best_index = gl.zeros([BLOCK_N], gl.int32, gl.SliceLayout(1, acc_layout))
    for c in range(0, tiles - 1):
        nxt = c + 1
        mbarrier.wait(ready.index(nxt % STAGES), (nxt // STAGES) & 1)
        d_next = warpgroup_mma(x_smem, ct_smem.index(nxt % STAGES), zero, use_acc=False, is_async=True)
        sq_next = gl.load(sq_base + nxt * BLOCK_C + ids)
        _load_tile(ct_desc, ct_smem, ready, c + STAGES, tiles, STAGES, BLOCK_C)  # tile c's product is done
        best, best_index = _nearest(d, sq_t, c * BLOCK_C, best, best_index, BLOCK_C, acc_layout)
        # best_index among the wait's operands: the wait cannot be scheduled before the epilogue that makes it.
        d, best_index = warpgroup_mma_wait(num_outstanding=0, deps=(d_next, best_index))
        sq_t = sq_next
    best, best_index = _nearest(d, sq_t, (tiles - 1) * BLOCK_C, best, best_index, BLOCK_C, acc_layout)
    tokens = tile * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, acc_layout))
    gl.store(labels_ptr + g * N + tokens, best_index, mask=tokens < N)
    mbarrier.invalidate(x_bar)
    for s in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(s))


def launch(x, ct, sq, labels, clusters, block_n, block_c, warps, stages):
    groups, tokens, dim = x.shape
    _assign_gluon[(triton.cdiv(tokens, block_n), groups)](x, ct, sq, labels, tokens, clusters, sq.shape[1],
                                                          x.stride(0), x.stride(1), D=dim, BLOCK_N=block_n,
                                                          BLOCK_C=block_c, STAGES=stages, num_warps=warps)


VARIANTS = [(128, 128, 8, 3), (128, 128, 8, 2), (64, 128, 4, 3), (64, 128, 4, 4), (128, 64, 8, 3), (64, 256, 4, 2),
            (128, 256, 8, 2)]


def main():
    use_descriptor_scratch()
    out = {}
    for shape_label, (groups, tokens) in {"wan1.3b": (12, 32760), "wan14b": (40, 75600)}.items():
        torch.manual_seed(0)
        x = torch.randn(groups, tokens, 128, device="cuda", dtype=torch.bfloat16)
        for clusters in (300, 1000):
            idx = torch.randint(0, tokens, (groups, clusters), device="cuda")
            centroids = torch.gather(x.float(), 1, idx[..., None].expand(groups, clusters, 128)).contiguous()
            centroids += 0.01 * torch.randn_like(centroids)
            ct, sq = km.prepare_centroids(centroids, x.dtype)
            ref = torch.empty(groups, tokens, device="cuda", dtype=torch.int32)

            def package():
                km.launch_tuned(km._assign, lambda m: (triton.cdiv(tokens, m["BLOCK_N"]), groups), x, ct, sq, ref,
                                tokens, clusters, sq.shape[1], x.stride(0), x.stride(1), D=128, BLOCK_D=128,
                                BF16_ASM=True)  # noqa: B023

            package()
            torch.cuda.synchronize()
            entry = {"package_ms": triton.testing.do_bench(package, warmup=25, rep=200),
                     "package_config": str(km._assign.best_config), "variants": {}}
            print(shape_label, clusters, "package", round(entry["package_ms"], 4), entry["package_config"],
                  flush=True)
            for variant in VARIANTS:
                name = "x".join(map(str, variant))
                labels = torch.full((groups, tokens), -1, device="cuda", dtype=torch.int32)
                try:
                    launch(x, ct, sq, labels, clusters, *variant)
                    torch.cuda.synchronize()
                    mismatches = int((labels != ref).sum())
                    row = {"equal_labels": mismatches == 0, "mismatches": mismatches}
                    if mismatches == 0:
                        row["ms"] = triton.testing.do_bench(
                            lambda v=variant, lb=labels: launch(x, ct, sq, lb, clusters, *v), warmup=25, rep=200)  # noqa: B023
                        row["of_package"] = row["ms"] / entry["package_ms"]
                except Exception as exc:  # noqa: BLE001
                    row = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                entry["variants"][name] = row
                print(shape_label, clusters, name, row, flush=True)
            out[f"{shape_label} {clusters}"] = entry
        del x
        torch.cuda.empty_cache()
    with open(os.path.join(sys.argv[1], "gluon_assign.json"), "w") as fh:
        json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
