"""Probe 2: svg2's k-means kernels on converged clusters at Wan 1.3B's shape (as the warm selection sees them):
assignment (module, pointer variants, TMA variant) and update (per-cluster program against windows).
Correctness first, then times; JSON to $OUT."""
import json
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(__file__))
from kmeans_probe import assign_x, timeit  # noqa: E402

from methods.kernels import kmeans_triton as km, use_descriptor_scratch  # noqa: E402
from methods.kernels.kmeans_triton import _round_to_points, _store_prepared  # noqa: E402

G, N, D = 12, 32760, 128
OUT = os.environ.get("OUT", "/tmp")


@triton.jit
def assign_tma(x_ptr, ct_ptr, sq_ptr, labels_ptr, N, C, CP, sxg, sxn, D: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    tile, g = tl.program_id(0), tl.program_id(1).to(tl.int64)
    x_desc = tl.make_tensor_descriptor(x_ptr + g * sxg, shape=[N, D], strides=[sxn, 1], block_shape=[BLOCK_N, BLOCK_D])
    c_desc = tl.make_tensor_descriptor(ct_ptr + g * BLOCK_D * CP, shape=[BLOCK_D, CP], strides=[CP, 1],
                                       block_shape=[BLOCK_D, BLOCK_C])
    x = x_desc.load([tile * BLOCK_N, 0])
    sq_base = sq_ptr + g * CP
    best = tl.full((BLOCK_N,), float("inf"), dtype=tl.float32)
    best_index = tl.zeros((BLOCK_N,), dtype=tl.int32)
    for start in range(0, C, BLOCK_C):
        ids = start + tl.arange(0, BLOCK_C)
        dots = _round_to_points(tl.dot(x, c_desc.load([0, start])), x.dtype, True)
        distances = tl.load(sq_base + ids)[None, :] - 2.0 * dots
        tile_min = tl.min(distances, axis=1)
        first = tl.min(tl.where(distances == tile_min[:, None], tl.arange(0, BLOCK_C)[None, :], BLOCK_C), axis=1)
        better = tile_min < best
        best = tl.where(better, tile_min, best)
        best_index = tl.where(better, first + start, best_index)
    tokens = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(labels_ptr + g * N + tokens, best_index, mask=tokens < N)


@triton.jit
def update_per_cluster(x_ptr, order_ptr, bounds_ptr, c_ptr, out_ptr, sizes_ptr, ct_ptr, sq_ptr, N, C, CP, sxg, sxn,
                       D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    cluster, g = tl.program_id(0), tl.program_id(1).to(tl.int64)
    begin = tl.load(bounds_ptr + g * (C + 1) + cluster)
    end = tl.load(bounds_ptr + g * (C + 1) + cluster + 1)
    cols = tl.arange(0, BLOCK_D)
    inside = cols < D
    x_base = x_ptr + g * sxg
    sums = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for start in range(begin, end, BLOCK_N):
        positions = start + tl.arange(0, BLOCK_N)
        present = positions < end
        tokens = tl.load(order_ptr + g * N + positions, mask=present, other=0)
        x = tl.load(x_base + tokens[:, None] * sxn + cols[None, :], mask=present[:, None] & inside[None, :], other=0.0)
        sums += tl.sum(x.to(tl.float32), axis=0)
    count = end - begin
    row = g * C * D + cluster * D + cols
    previous = tl.load(c_ptr + row, mask=inside, other=0.0)
    size = tl.broadcast_to(tl.maximum(count, 1).to(tl.float32), (BLOCK_D,))
    mean = tl.math.div_rn(sums, size)
    updated = tl.where(count > 0, mean, previous)
    tl.store(out_ptr + row, updated, mask=inside)
    tl.store(sizes_ptr + g * C + cluster, count.to(tl.int64))
    _store_prepared(ct_ptr, sq_ptr, g, C, CP, tl.full((1,), cluster, tl.int32), updated[None, :], BLOCK_D)


def main():
    use_descriptor_scratch()
    torch.manual_seed(0)
    dev = "cuda"
    results = {"assign": [], "update": [], "sizes": {}}
    for C in (300, 1000):
        x = torch.randn(G, N, D, device=dev, dtype=torch.bfloat16)
        init = x[:, torch.randperm(N, device=dev)[:C]].float().contiguous()
        _, centroids, sizes, _ = km.kmeans_lloyd(x, init, 50, "sorted")
        results["sizes"][C] = {"max": sizes.max().item(), "mean": sizes.float().mean().item(),
                               "empty": (sizes == 0).sum().item()}
        print(C, results["sizes"][C], flush=True)
        ct, sq = km.prepare_centroids(centroids, x.dtype)
        CP = sq.shape[1]
        ref = torch.empty(G, N, device=dev, dtype=torch.int32)
        flop = 2 * G * N * C * D

        def module_assign():
            km.launch_tuned(km._assign, lambda m: (triton.cdiv(N, m["BLOCK_N"]), G), x, ct, sq, ref, N, C, CP,
                            x.stride(0), x.stride(1), D=D, BLOCK_D=128, BF16_ASM=True)
        ms = timeit(module_assign)
        results["assign"].append({"C": C, "variant": "module", "ms": ms, "tflops": flop / ms / 1e9})
        print(f"C={C} assign module {ms:.4f} ms {flop / ms / 1e9:.0f} TF/s", flush=True)
        for kind, kernel, configs in (
                ("pointers", assign_x, ((128, 128, 4, 2), (256, 64, 8, 2), (128, 64, 4, 3), (128, 128, 8, 2))),
                ("tma", assign_tma, ((128, 128, 8, 2), (128, 128, 4, 2), (128, 64, 4, 3), (256, 64, 8, 2),
                                     (128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 2), (64, 128, 4, 3),
                                     (128, 128, 4, 3), (256, 128, 8, 2)))):
            for bn, bc, w, s in configs:
                out = torch.empty_like(ref)
                grid = (triton.cdiv(N, bn), G)
                extra = dict(ROUND=True, MODE=0) if kind == "pointers" else {}

                def launch():
                    kernel[grid](x, ct, sq, out, N, C, CP, x.stride(0), x.stride(1), D=D, BLOCK_D=128, BLOCK_N=bn,
                                 BLOCK_C=bc, num_warps=w, num_stages=s, **extra)
                try:
                    launch(); torch.cuda.synchronize()
                except Exception as e:  # noqa: BLE001
                    print("fail", kind, C, bn, bc, w, s, type(e).__name__, str(e)[:300], flush=True)
                    continue
                agree = (out == ref).float().mean().item()
                ms = timeit(launch)
                results["assign"].append({"C": C, "variant": kind, "config": [bn, bc, w, s], "ms": ms,
                                          "tflops": flop / ms / 1e9, "agree_with_module": agree})
                print(f"C={C} assign {kind} {bn}x{bc}x{w}x{s} {ms:.4f} ms {flop / ms / 1e9:.0f} TF/s agree={agree}",
                      flush=True)
        labels = ref
        order, bounds = km.counting_sort(labels, C)
        sort_ms = timeit(lambda: km.counting_sort(labels, C))
        results["update"].append({"C": C, "variant": "counting_sort", "ms": sort_ms})
        print(f"C={C} counting sort {sort_ms:.4f}", flush=True)
        sums64 = torch.zeros(G * C, D, device=dev, dtype=torch.float64)
        flat = (labels.long() + (torch.arange(G, device=dev) * C)[:, None]).flatten()
        sums64.index_add_(0, flat, x.double().flatten(0, 1))
        cnt = torch.bincount(flat, minlength=G * C)
        means64 = (sums64 / cnt.clamp(min=1)[:, None]).view(G, C, D)
        means64 = torch.where((cnt > 0).view(G, C, 1), means64, centroids.double())
        variants = [("per_cluster", (bn,), w, s) for bn, w, s in ((32, 4, 2), (64, 4, 2), (128, 4, 2), (32, 2, 3))]
        variants += [("window", (k, bn), w, s) for k, bn, w, s in km.SORTED_UPDATE_CONFIGS]
        variants += [("window", (k, bn), w, s) for k, bn, w, s in ((8, 128, 4, 3), (16, 128, 4, 4), (16, 256, 8, 3),
                                                                  (16, 128, 4, 2))]
        for kind, tiles, w, s in variants:
            upd = torch.empty_like(centroids); sz = torch.empty(G, C, device=dev, dtype=torch.int64)
            ct2, sq2 = ct.clone(), sq.clone()
            if kind == "per_cluster":
                def launch():
                    update_per_cluster[(C, G)](x, order, bounds, centroids, upd, sz, ct2, sq2, N, C, CP, x.stride(0),
                                               x.stride(1), D=D, BLOCK_D=128, BLOCK_N=tiles[0], num_warps=w,
                                               num_stages=s)
            else:
                def launch():
                    km._update_sorted.fn[(triton.cdiv(C, tiles[0]), G)](
                        x, order, bounds, centroids, upd, sz, ct2, sq2, N, C, CP, x.stride(0), x.stride(1), D=D,
                        BLOCK_D=128, WINDOW=tiles[0], BLOCK_N=tiles[1], num_warps=w, num_stages=s)
            try:
                launch(); torch.cuda.synchronize()
            except Exception as e:  # noqa: BLE001
                print("fail", kind, C, tiles, w, s, type(e).__name__, str(e)[:300], flush=True)
                continue
            err = ((upd.double() - means64).norm() / means64.norm()).item()
            exact = bool((sz.flatten() == cnt).all())
            ms = timeit(launch)
            results["update"].append({"C": C, "variant": kind, "config": [*tiles, w, s], "ms": ms, "error": err,
                                      "sizes_exact": exact})
            print(f"C={C} update {kind} {tiles} {w}x{s} {ms:.4f} ms err={err:.2e} sizes={exact}", flush=True)
    with open(os.path.join(OUT, "kmeans_probe2.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
