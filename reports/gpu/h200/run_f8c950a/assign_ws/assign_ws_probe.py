"""Experiment (not part of the package): svg2's k-means assignment (methods.kernels.kmeans_triton._assign) under
Triton's Hopper warp specialisation: the x tile and the prepared centroid tiles through tensor descriptors, the
labels out through one, the centroid loop tl.range(warp_specialize=True), 4 warps. Labels checked equal to the
package kernel's, then both timed at Wan 1.3B's shape (12 x 32,760 x 128, bf16) with 300 and 1,000 clusters."""
import json
import os
import sys

import torch
import triton
import triton.language as tl

from methods.kernels import kmeans_triton as km
from methods.kernels import use_descriptor_scratch


@triton.jit
def _assign_ws(x_ptr, ct_ptr, sq_ptr, labels_ptr, N, C, CP, sxg, sxn, D: tl.constexpr, BLOCK_D: tl.constexpr,
               BF16_ASM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, WS: tl.constexpr):
    tile, g = tl.program_id(0), tl.program_id(1).to(tl.int64)
    x_desc = tl.make_tensor_descriptor(x_ptr + g * sxg, shape=[N, D], strides=[sxn, 1], block_shape=[BLOCK_N, BLOCK_D])
    ct_desc = tl.make_tensor_descriptor(ct_ptr + g * BLOCK_D * CP, shape=[BLOCK_D, CP], strides=[CP, 1],
                                        block_shape=[BLOCK_D, BLOCK_C])
    labels_desc = tl.make_tensor_descriptor(labels_ptr + g * N, shape=[N], strides=[1], block_shape=[BLOCK_N])
    x = x_desc.load([tile * BLOCK_N, 0])
    sq_base = sq_ptr + g * CP
    best = tl.full((BLOCK_N,), float("inf"), dtype=tl.float32)
    best_index = tl.zeros((BLOCK_N,), dtype=tl.int32)
    for start in tl.range(0, C, BLOCK_C, warp_specialize=WS):
        ids = start + tl.arange(0, BLOCK_C)
        dots = km._round_to_points(tl.dot(x, ct_desc.load([0, start])), x.dtype, BF16_ASM)
        distances = tl.load(sq_base + ids)[None, :] - 2.0 * dots
        tile_min = tl.min(distances, axis=1)
        first = tl.min(tl.where(distances == tile_min[:, None], tl.arange(0, BLOCK_C)[None, :], BLOCK_C), axis=1)
        better = tile_min < best
        best = tl.where(better, tile_min, best)
        best_index = tl.where(better, first + start, best_index)
    labels_desc.store([tile * BLOCK_N], best_index)


def main():
    use_descriptor_scratch()
    out = {}
    torch.manual_seed(0)
    G, N, D = 12, 32760, 128
    x = torch.randn(G, N, D, device="cuda", dtype=torch.bfloat16)
    for C in (300, 1000):
        idx = torch.randint(0, N, (G, C), device="cuda")
        centroids = torch.gather(x.float(), 1, idx[..., None].expand(G, C, D)).contiguous()
        ct, sq = km.prepare_centroids(centroids, x.dtype)
        CP = sq.shape[1]
        ref = torch.empty(G, N, device="cuda", dtype=torch.int32)

        def package():
            km.launch_tuned(km._assign, lambda m: (triton.cdiv(N, m["BLOCK_N"]), G), x, ct, sq, ref, N, C, CP,
                            x.stride(0), x.stride(1), D=D, BLOCK_D=128, BF16_ASM=True)
        package()
        entry = {"package_ms": triton.testing.do_bench(package, warmup=25, rep=200),
                 "package_config": str(km._assign.best_config), "variants": {}}
        for bn, bc, warps, stages, ws in ((128, 128, 4, 2, True), (128, 128, 4, 3, True), (128, 64, 4, 3, True),
                                          (128, 128, 4, 2, False), (128, 128, 8, 2, False), (256, 64, 4, 2, True)):
            name = f"{bn}x{bc}x{warps}x{stages}{'w' if ws else ''}"
            labels = torch.full((G, N), -1, device="cuda", dtype=torch.int32)
            run = lambda: _assign_ws[(triton.cdiv(N, bn), G)](x, ct, sq, labels, N, C, CP, x.stride(0), x.stride(1),
                                                              D=D, BLOCK_D=128, BF16_ASM=True, BLOCK_N=bn,
                                                              BLOCK_C=bc, WS=ws, num_warps=warps, num_stages=stages)
            try:
                run()
                torch.cuda.synchronize()
                same = torch.equal(labels, ref)
                ms = triton.testing.do_bench(run, warmup=25, rep=200) if same else None
                entry["variants"][name] = {"equal_labels": same, "ms": ms,
                                           "mismatches": int((labels != ref).sum())}
            except Exception as exc:
                entry["variants"][name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            print(C, name, entry["variants"][name], flush=True)
        print(C, "package", round(entry["package_ms"], 4), entry["package_config"], flush=True)
        out[str(C)] = entry
    json.dump(out, open(os.path.join(sys.argv[1], "assign_ws.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
