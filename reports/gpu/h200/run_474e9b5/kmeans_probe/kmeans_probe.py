"""Probe: where svg2's k-means time goes at Wan 1.3B, and experimental assignment / update variants.

Correctness first (labels against the module's kernel, sums against float64), then times, JSON to $OUT.
"""
import json
import os
import sys

import torch
import triton
import triton.language as tl

from methods.kernels import kmeans_triton as km
from methods.kernels.kmeans_triton import _round_to_points, _store_prepared

G, N, D = 12, 32760, 128
OUT = os.environ.get("OUT", "/tmp")


def timeit(fn, reps=20, inner=5):
    fn(); torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(True), torch.cuda.Event(True)
        a.record()
        for _ in range(inner):
            fn()
        b.record(); b.synchronize()
        times.append(a.elapsed_time(b) / inner)
    times.sort()
    return times[len(times) // 2]


@triton.jit
def assign_x(x_ptr, ct_ptr, sq_ptr, labels_ptr, N, C, CP, sxg, sxn, D: tl.constexpr, BLOCK_D: tl.constexpr,
             ROUND: tl.constexpr, MODE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    tile, g = tl.program_id(0), tl.program_id(1).to(tl.int64)
    tokens = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    x = tl.load(x_ptr + g * sxg + tokens.to(tl.int64)[:, None] * sxn + cols[None, :],
                mask=(tokens < N)[:, None] & (cols < D)[None, :], other=0.0)
    ct_base = ct_ptr + g * BLOCK_D * CP + cols[:, None] * CP
    sq_base = sq_ptr + g * CP
    if MODE == 1:
        best_d = tl.full((BLOCK_N, BLOCK_C), float("inf"), dtype=tl.float32)
        best_t = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.int32)
    best = tl.full((BLOCK_N,), float("inf"), dtype=tl.float32)
    best_index = tl.zeros((BLOCK_N,), dtype=tl.int32)
    acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    for start in range(0, C, BLOCK_C):
        ids = start + tl.arange(0, BLOCK_C)
        dots = tl.dot(x, tl.load(ct_base + ids[None, :]))
        if ROUND:
            dots = _round_to_points(dots, x.dtype, True)
        if MODE == 3:
            acc += dots
        else:
            distances = tl.load(sq_base + ids)[None, :] - 2.0 * dots
            if MODE == 0:
                tile_min = tl.min(distances, axis=1)
                first = tl.min(tl.where(distances == tile_min[:, None], tl.arange(0, BLOCK_C)[None, :], BLOCK_C), axis=1)
                better = tile_min < best
                best = tl.where(better, tile_min, best)
                best_index = tl.where(better, first + start, best_index)
            elif MODE == 1:
                better = distances < best_d
                best_d = tl.where(better, distances, best_d)
                best_t = tl.where(better, start, best_t)
            else:  # MODE 2: min only (bound)
                best = tl.minimum(best, tl.min(distances, axis=1))
    if MODE == 1:
        col_min = tl.min(best_d, axis=1)
        cand = tl.where(best_d == col_min[:, None], best_t + tl.arange(0, BLOCK_C)[None, :], 2147483647)
        best_index = tl.min(cand, axis=1)
    elif MODE == 2:
        best_index = best.to(tl.int32)
    elif MODE == 3:
        best_index = tl.sum(acc, axis=1).to(tl.int32)
    tl.store(labels_ptr + g * N + tokens, best_index, mask=tokens < N)


@triton.jit
def update_window(x_ptr, order_ptr, bounds_ptr, c_ptr, out_ptr, sizes_ptr, ct_ptr, sq_ptr, N, C, CP, sxg, sxn,
                  D: tl.constexpr, BLOCK_D: tl.constexpr, K: tl.constexpr, BLOCK_N: tl.constexpr):
    window, g = tl.program_id(0), tl.program_id(1).to(tl.int64)
    ids = window * K + tl.arange(0, K)
    inside_c = ids < C
    bounds = bounds_ptr + g * (C + 1)
    begins = tl.load(bounds + ids, mask=inside_c, other=0)
    ends = tl.load(bounds + ids + 1, mask=inside_c, other=0)
    begin = tl.load(bounds + window * K)
    end = tl.load(bounds + tl.minimum(window * K + K, C))
    cols = tl.arange(0, BLOCK_D)
    inside = cols < D
    x_base = x_ptr + g * sxg
    sums = tl.zeros((K, BLOCK_D), dtype=tl.float32)
    for start in range(begin, end, BLOCK_N):
        positions = start + tl.arange(0, BLOCK_N)
        present = positions < end
        tokens = tl.load(order_ptr + g * N + positions, mask=present, other=0)
        x = tl.load(x_base + tokens[:, None] * sxn + cols[None, :], mask=present[:, None] & inside[None, :], other=0.0)
        member = (positions[None, :] >= begins[:, None]) & (positions[None, :] < ends[:, None])
        sums = tl.dot(member.to(x.dtype), x, sums)
    counts = ends - begins
    rows = g * C * D + ids[:, None] * D + cols[None, :]
    mask = inside_c[:, None] & inside[None, :]
    previous = tl.load(c_ptr + rows, mask=mask, other=0.0)
    means = tl.math.div_rn(sums, tl.maximum(counts, 1).to(tl.float32)[:, None])
    updated = tl.where((counts > 0)[:, None], means, previous)
    tl.store(out_ptr + rows, updated, mask=mask)
    tl.store(sizes_ptr + g * C + ids, counts, mask=inside_c)
    _store_prepared(ct_ptr, sq_ptr, g, C, CP, ids, updated, BLOCK_D)


def main():
    torch.manual_seed(0)
    dev = "cuda"
    results = {"assign": [], "update": [], "gemm": {}}
    for C in (300, 1000):
        x = torch.randn(G, N, D, device=dev, dtype=torch.bfloat16)
        init = x[:, torch.randperm(N, device=dev)[:C]].float().contiguous()
        ct, sq = km.prepare_centroids(init, x.dtype)
        CP = sq.shape[1]
        ref = torch.empty(G, N, device=dev, dtype=torch.int32)

        def module_assign():
            km.launch_tuned(km._assign, lambda m: (triton.cdiv(N, m["BLOCK_N"]), G), x, ct, sq, ref, N, C, CP,
                            x.stride(0), x.stride(1), D=D, BLOCK_D=128, BF16_ASM=True)
        module_ms = timeit(module_assign)
        flop = 2 * G * N * C * D
        results["assign"].append({"C": C, "variant": "module", "ms": module_ms, "tflops": flop / module_ms / 1e9,
                                  "config": str(km._assign.best_config) if hasattr(km._assign, "best_config") else None})
        print(f"C={C} module {module_ms:.4f} ms {flop / module_ms / 1e9:.0f} TF/s", flush=True)
        c_t = ct[:, :, :C]
        gemm_ms = timeit(lambda: torch.bmm(x, c_t))
        results["gemm"][C] = gemm_ms
        print(f"C={C} bmm bf16 out {gemm_ms:.4f}", flush=True)
        # exact distance gaps for label checks (fp32 of the bf16 products, rounded as the module does)
        full = ((128, 128, 8, 2, None), (128, 128, 8, 2, 128), (128, 128, 8, 3, 128), (128, 64, 8, 2, 128),
                (128, 64, 8, 2, None), (256, 64, 8, 2, None), (256, 64, 8, 2, 128), (128, 64, 4, 3, None),
                (128, 128, 4, 2, None), (256, 128, 16, 2, None), (128, 256, 8, 2, None), (256, 128, 8, 2, None),
                (64, 64, 4, 3, None), (64, 64, 4, 3, 128), (128, 128, 8, 2, 168))
        few = ((128, 128, 8, 2, None), (128, 128, 8, 2, 128), (128, 64, 8, 2, None), (256, 64, 8, 2, None))
        plan = [(0, True, full), (0, False, few), (1, True, few[:1] + few[2:]), (1, False, few[:1]),
                (2, True, few), (3, True, few)]
        for mode, rnd, configs in plan:
                for bn, bc, w, s, maxnreg in configs:
                    out = torch.empty_like(ref)
                    grid = (triton.cdiv(N, bn), G)
                    extra = {} if maxnreg is None else {"maxnreg": maxnreg}

                    def launch():
                        assign_x[grid](x, ct, sq, out, N, C, CP, x.stride(0), x.stride(1), D=D, BLOCK_D=128,
                                       ROUND=rnd, MODE=mode, BLOCK_N=bn, BLOCK_C=bc, num_warps=w, num_stages=s,
                                       **extra)
                    try:
                        launch(); torch.cuda.synchronize()
                    except Exception as e:  # noqa: BLE001
                        print("fail", C, mode, rnd, bn, bc, w, s, maxnreg, type(e).__name__, str(e)[:200], flush=True)
                        continue
                    agree = (out == ref).float().mean().item() if mode < 2 else None
                    ms = timeit(launch)
                    row = {"C": C, "mode": mode, "round": rnd, "config": [bn, bc, w, s, maxnreg], "ms": ms,
                           "tflops": flop / ms / 1e9, "agree_with_module": agree}
                    results["assign"].append(row)
                    print(f"C={C} mode={mode} round={int(rnd)} {bn}x{bc}x{w}x{s} r{maxnreg} {ms:.4f} ms "
                          f"{flop / ms / 1e9:.0f} TF/s agree={agree}", flush=True)
        # update: module sorted (each config) against the window variant
        labels = ref
        order, bounds = km.counting_sort(labels, C)
        sort_ms = timeit(lambda: km.counting_sort(labels, C))
        results["update"].append({"C": C, "variant": "counting_sort", "ms": sort_ms})
        sums64 = torch.zeros(G * C, D, device=dev, dtype=torch.float64)
        flat = (labels.long() + (torch.arange(G, device=dev) * C)[:, None]).flatten()
        sums64.index_add_(0, flat, x.double().flatten(0, 1))
        cnt = torch.bincount(flat, minlength=G * C)
        means64 = (sums64 / cnt.clamp(min=1)[:, None]).view(G, C, D)
        means64 = torch.where((cnt > 0).view(G, C, 1), means64, init.double())
        for bn, w, s in km.SORTED_UPDATE_CONFIGS:
            upd = torch.empty_like(init); sizes = torch.empty(G, C, device=dev, dtype=torch.int64)
            ct2, sq2 = ct.clone(), sq.clone()

            def launch():
                km._update_sorted.fn[(C, G)](x, order, bounds, init, upd, sizes, ct2, sq2, N, C, CP, x.stride(0),
                                             x.stride(1), D=D, BLOCK_D=128, BLOCK_N=bn, num_warps=w, num_stages=s)
            launch(); torch.cuda.synchronize()
            err = ((upd.double() - means64).norm() / means64.norm()).item()
            ms = timeit(launch)
            results["update"].append({"C": C, "variant": "sorted", "config": [bn, w, s], "ms": ms, "error": err})
            print(f"C={C} update sorted {bn}x{w}x{s} {ms:.4f} ms err={err:.2e}", flush=True)
        for k in (16, 32, 64):
            for bn, w, s in ((32, 4, 3), (64, 4, 3), (64, 4, 4), (128, 4, 3), (128, 8, 3), (64, 8, 3)):
                upd = torch.empty_like(init); sizes = torch.empty(G, C, device=dev, dtype=torch.int64)
                ct2, sq2 = ct.clone(), sq.clone()
                grid = (triton.cdiv(C, k), G)

                def launch():
                    update_window[grid](x, order, bounds, init, upd, sizes, ct2, sq2, N, C, CP, x.stride(0),
                                        x.stride(1), D=D, BLOCK_D=128, K=k, BLOCK_N=bn, num_warps=w, num_stages=s)
                try:
                    launch(); torch.cuda.synchronize()
                except Exception as e:  # noqa: BLE001
                    print("fail window", C, k, bn, w, s, type(e).__name__, str(e)[:200], flush=True)
                    continue
                err = ((upd.double() - means64).norm() / means64.norm()).item()
                sizes_ok = bool((sizes.flatten() == cnt).all())
                ms = timeit(launch)
                results["update"].append({"C": C, "variant": "window", "config": [k, bn, w, s], "ms": ms,
                                          "error": err, "sizes_exact": sizes_ok})
                print(f"C={C} update window K={k} {bn}x{w}x{s} {ms:.4f} ms err={err:.2e} sizes={sizes_ok}",
                      flush=True)
    with open(os.path.join(OUT, "kmeans_probe.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
