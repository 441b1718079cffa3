"""Experiment (not part of the package): hedgehog's state pass with both feature halves in one program
(methods.kernels.linear_attention_triton._gram_partials runs them as two adjacent programs, each projecting the
same key tile): the projection x W and the loads of x and v once per tile, two fp32 states in registers (8 warps).
Checked against the package's state (relative error), then both timed (do_bench) at the Wan 1.3B and 14B shapes."""

import json
import os
import sys

import torch
import triton
import triton.language as tl

from methods.kernels import linear_attention_triton as lat


@triton.jit
def _gram_pairs(x_ptr, y_ptr, w_ptr, part_ptr, H, N, D: tl.constexpr, CHUNK, sxb, sxh, sxn, syb, syh, syn,
                BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    chunk, bh = tl.program_id(1), tl.program_id(2)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    rows, cols = tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_D)
    inside = cols < D
    dtype = x_ptr.dtype.element_ty
    x_base, y_base = x_ptr + b * sxb + h * sxh, y_ptr + b * syb + h * syh
    w = lat._weight(w_ptr, h, cols, dtype, D, True, False, BLOCK_D)
    acc0 = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
    z0 = tl.zeros((BLOCK_D, 16), dtype=tl.float32)
    z1 = tl.zeros((BLOCK_D, 16), dtype=tl.float32)
    for offset in range(0, CHUNK, BLOCK_N):
        n, valid, mask = lat._block(chunk * CHUNK + offset, rows, N, inside)
        x, y = lat._rows(x_base, n, sxn, cols, mask), lat._rows(y_base, n, syn, cols, mask)
        p = lat._project(x, w, True)
        weights = valid.to(tl.float32)
        phi_t = tl.trans(lat._phi(p, 1.0, inside, 0, D < BLOCK_D).to(dtype))
        acc0 = tl.dot(phi_t, y, acc0)
        z0 = lat._row_sum(phi_t, weights, z0, dtype)
        phi_t = tl.trans(lat._phi(p, -1.0, inside, 0, D < BLOCK_D).to(dtype))
        acc1 = tl.dot(phi_t, y, acc1)
        z1 = lat._row_sum(phi_t, weights, z1, dtype)
    row = ((chunk * tl.num_programs(2) + bh) * 2).to(tl.int64)
    lat._store_state(part_ptr, row, acc0, tl.sum(z0, axis=1), cols, BLOCK_D)
    lat._store_state(part_ptr, row + 1, acc1, tl.sum(z1, axis=1), cols, BLOCK_D)


def gram_pairs(x, y, w, block_n, warps, stages):
    batch, heads, tokens, dim = x.shape
    chunks, chunk = lat._chunking(tokens, batch * heads, lat._slots(x.device), block_n)
    partials = lat._state_buffer(chunks, batch * heads * 2, 128, x.device)
    _gram_pairs[(1, chunks, batch * heads)](x, y, w, partials, heads, tokens, dim, chunk, *lat._strides(x),
                                            *lat._strides(y), BLOCK_D=128, BLOCK_N=block_n, num_warps=warps,
                                            num_stages=stages)
    return lat._summed(partials)


VARIANTS = [(64, 8, 2), (64, 8, 3), (32, 8, 2), (32, 8, 3), (128, 8, 2), (32, 4, 2)]


def main():
    out = {}
    for label, (heads, tokens) in {"wan1.3b": (12, 32760), "wan14b": (40, 75600)}.items():
        torch.manual_seed(0)
        k, v = (torch.randn(1, tokens, heads, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
                for _ in range(2))
        w = (torch.eye(128, device="cuda") + 0.05 * torch.randn(heads, 128, 128, device="cuda")).contiguous()
        ref = lat._gram(k, v, w, 0, 2)
        entry = {"package_ms": triton.testing.do_bench(lambda: lat._gram(k, v, w, 0, 2), warmup=25, rep=200),
                 "package_config": str(lat._gram_partials.best_config), "variants": {}}
        print(label, "package", round(entry["package_ms"], 4), entry["package_config"], flush=True)
        for variant in VARIANTS:
            name = "x".join(map(str, variant))
            try:
                state = gram_pairs(k, v, w, *variant)
                torch.cuda.synchronize()
                err = ((state - ref).norm() / ref.norm()).item()
                row = {"err": err}
                if err < 1e-4:
                    row["ms"] = triton.testing.do_bench(lambda vr=variant: gram_pairs(k, v, w, *vr), warmup=25,
                                                        rep=200)
                    row["of_package"] = row["ms"] / entry["package_ms"]
            except Exception as exc:  # noqa: BLE001
                row = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            entry["variants"][name] = row
            print(label, name, row, flush=True)
        out[label] = entry
    with open(os.path.join(sys.argv[1], "gram_pairs.json"), "w") as fh:
        json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
