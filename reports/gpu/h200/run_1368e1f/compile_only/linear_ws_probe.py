"""Experiment (not part of the package): hedgehog's output pass (methods.kernels.linear_attention_triton._output)
with its token loop under Triton's warp specialisation (descriptor loads of q, descriptor stores of the output and
den), against the shipped pass on the same state, at Wan 1.3B and 14B shapes."""

import json
import os
import sys

import torch
import triton
import triton.language as tl

from methods.kernels import linear_attention_triton as lat
from methods.kernels import use_descriptor_scratch


@triton.jit
def _output_ws(q_ptr, w_ptr, st_ptr, o_ptr, den_ptr, H, N, CHUNK, eps,
               D: tl.constexpr, BLOCK_N: tl.constexpr, WS: tl.constexpr):
    chunk, bh = tl.program_id(1), tl.program_id(2)
    h = (bh % H).to(tl.int64)
    cols = tl.arange(0, D)
    dtype = q_ptr.dtype.element_ty
    base = bh.to(tl.int64) * N * D
    q_desc = tl.make_tensor_descriptor(q_ptr + base, shape=[N, D], strides=[D, 1], block_shape=[BLOCK_N, D])
    o_desc = tl.make_tensor_descriptor(o_ptr + base, shape=[N, D], strides=[D, 1], block_shape=[BLOCK_N, D])
    d_desc = tl.make_tensor_descriptor(den_ptr + bh.to(tl.int64) * N, shape=[N], strides=[1], block_shape=[BLOCK_N])
    w = lat._weight(w_ptr, h, cols, dtype, D, True, False, D)
    row = bh.to(tl.int64) * 2
    s0, z0 = lat._state(st_ptr, row, cols, dtype, D)
    s1, z1 = lat._state(st_ptr, row + 1, cols, dtype, D)
    inside = cols < D
    for offset in tl.range(0, CHUNK, BLOCK_N, warp_specialize=WS):
        start = chunk * CHUNK + offset
        p = lat._project(q_desc.load([start, 0]), w, True)
        phi = lat._phi(p, 1.0, inside, 0, False)
        num = tl.dot(phi.to(dtype), s0)
        den = tl.sum(phi * z0[None, :], axis=1) + eps
        phi = lat._phi(p, -1.0, inside, 0, False)
        num = tl.dot(phi.to(dtype), s1, num)
        den += tl.sum(phi * z1[None, :], axis=1)
        num = num * (1.0 / den)[:, None]
        o_desc.store([start, 0], num.to(o_ptr.dtype.element_ty))
        d_desc.store([start], den)


def launch_ws(q, w, state, chunk, block_n, warps, stages, ws):
    batch, heads, tokens, dim = q.shape
    out = torch.empty_like(q)
    den = torch.empty(batch * heads, tokens, device=q.device, dtype=torch.float32)
    chunks = triton.cdiv(tokens, chunk)
    _output_ws[(1, chunks, batch * heads)](q, w, state, out, den, heads, tokens, chunk, 1e-6, D=dim,
                                           BLOCK_N=block_n, WS=ws, num_warps=warps, num_stages=stages)
    return out, den


SHAPES = {"wan1.3b": (12, 32760), "wan14b": (40, 75600)}
VARIANTS = [(bn, warps, stages, ws) for ws in (True, False) for bn, warps, stages in
            ((128, 4, 2), (128, 8, 2), (64, 4, 2), (64, 4, 3), (128, 4, 3))]


def main():
    out_dir = sys.argv[1]
    use_descriptor_scratch()
    results = {}
    for label, (heads, tokens) in SHAPES.items():
        torch.manual_seed(0)
        q = torch.randn(1, heads, tokens, 128, device="cuda", dtype=torch.bfloat16)
        w = (torch.eye(128, device="cuda") + 0.05 * torch.randn(heads, 128, 128, device="cuda")).to(torch.bfloat16)
        state = torch.zeros(heads * 2, 128 * 128 + 128, device="cuda")
        state[:, : 128 * 128] = torch.randn(heads * 2, 128 * 128, device="cuda")
        state[:, 128 * 128:] = torch.rand(heads * 2, 128, device="cuda") * 100 + 1
        ref, ref_den = lat._output_pass(q, w, state, 0, 2, 1e-6)
        shipped = triton.testing.do_bench(lambda: lat._output_pass(q, w, state, 0, 2, 1e-6), warmup=50, rep=300)
        grid, chunk = lat._grid(q, 1, lat.OUTPUT_CONFIGS)
        entry = {"shipped_ms": shipped, "chunk": chunk, "chunks": grid[1], "variants": {}}
        print(f"{label}: shipped output pass {shipped:.4f} ms (chunk {chunk}, {grid[1]} chunks)", flush=True)
        for variant in VARIANTS:
            bn, warps, stages, ws = variant
            name = f"{bn}x{warps}x{stages}{'w' if ws else ''}"
            size = triton.cdiv(chunk, bn) * bn
            try:
                out, den = launch_ws(q, w, state, size, *variant)
                torch.cuda.synchronize()
                err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
                err_den = ((den - ref_den).norm() / ref_den.norm()).item()
                row = {"err": err, "err_den": err_den}
                if err < 1e-2 and err_den < 1e-3:
                    row["ms"] = triton.testing.do_bench(lambda: launch_ws(q, w, state, size, *variant), warmup=50,
                                                        rep=300)  # noqa: B023
                entry["variants"][name] = row
                timing = f"{row['ms']:.4f} ms ({row['ms'] / shipped:.2f} of shipped)" if "ms" in row else "not timed"
                print(f"  {name:10} err {err:.1e} den {err_den:.1e}  {timing}", flush=True)
            except Exception as exc:  # noqa: BLE001
                entry["variants"][name] = {"raised": f"{type(exc).__name__}: {str(exc)[:300]}"}
                print(f"  {name:10} RAISED {type(exc).__name__}: {str(exc)[:300]}", flush=True)
        results[label] = entry
    with open(os.path.join(out_dir, "linear_ws_probe.json"), "w") as fh:
        json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
