"""Experiment (not part of the package): several query blocks per program for full block lists (SLA's critical
blocks: every row lists L blocks), so that one program's pipeline runs on from one query block into the next.

SLA's 64-token blocks at 5% (1.3B: 26 of 512 a row; 14B: 59 of 1,182) cost ~47 ns a row beyond the per-block cost
(two-point fit from run_<s20 call1>): the pipeline fill and q load of each program. Variants:
  base    : the package's triton-blocks, 1x4x3t (one query block a program)
  flatN   : ROWS=N query blocks a program, one hand-flattened loop over ROWS * L steps, the row's epilogue
            (output by pointers) and the next row's q load (by pointers, or a descriptor) under an if
4 warps, 2-4 stages. (Nested loops under tl.range(flatten=True) fail Triton 3.6's TMA lowering pass for sm_90.) Checked against the base output (relative error) before timing.
"""

import json
import os
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.nn.attention import SDPBackend, sdpa_kernel

from methods.kernels import block_list_triton as bl
from methods.kernels import use_descriptor_scratch
from methods.kernels.attention_states import accumulate_tile


@triton.jit
def _rows(q_ptr, k_ptr, v_ptr, o_ptr, lists_ptr, scale, N, R, L,
          D: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr, FLAT: tl.constexpr, QPTR: tl.constexpr):
    p, g = tl.program_id(0), tl.program_id(1).to(tl.int64)
    base = g * N * D
    q_desc = tl.make_tensor_descriptor(q_ptr + base, shape=[N, D], strides=[D, 1], block_shape=[BLOCK, D])
    k_desc = tl.make_tensor_descriptor(k_ptr + base, shape=[N, D], strides=[D, 1], block_shape=[BLOCK, D])
    v_desc = tl.make_tensor_descriptor(v_ptr + base, shape=[N, D], strides=[D, 1], block_shape=[BLOCK, D])
    o_desc = tl.make_tensor_descriptor(o_ptr + base, shape=[N, D], strides=[D, 1], block_shape=[BLOCK, D])
    first = p * ROWS
    last = tl.minimum(first + ROWS, R)
    listed = lists_ptr + g * R * L
    if FLAT:
        within = tl.arange(0, BLOCK)
        cols = tl.arange(0, D)
        if QPTR:
            q = tl.load(q_ptr + base + (first * BLOCK + within)[:, None].to(tl.int64) * D + cols[None, :],
                        mask=(first * BLOCK + within < N)[:, None], other=0.0)
        else:
            q = q_desc.load([first * BLOCK, 0])
        m_i = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK,), dtype=tl.float32)
        acc = tl.zeros((BLOCK, D), dtype=tl.float32)
        for t in range(0, (last - first) * L):
            r = first + t // L
            e = t % L
            start = tl.load(listed + r * L + e) * BLOCK
            k = k_desc.load([start, 0])
            v = v_desc.load([start, 0])
            valid = start + tl.arange(0, BLOCK) < N
            m_i, l_i, acc = accumulate_tile(tl.dot(q, tl.trans(k)), scale, valid, v, m_i, l_i, acc, True)
            if e == L - 1:
                o_rows = r * BLOCK + within
                tl.store(o_ptr + base + o_rows[:, None].to(tl.int64) * D + cols[None, :],
                         (acc / l_i[:, None]).to(o_ptr.dtype.element_ty), mask=(o_rows < N)[:, None])
                if QPTR:
                    q_rows = (r + 1) * BLOCK + within
                    q = tl.load(q_ptr + base + q_rows[:, None].to(tl.int64) * D + cols[None, :],
                                mask=(q_rows < N)[:, None], other=0.0)
                else:
                    q = q_desc.load([tl.minimum(r + 1, R - 1) * BLOCK, 0])
                # The next step's rescale by exp2(-inf - m) = 0 clears acc (its first block has a key below N).
                m_i = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
                l_i = tl.zeros((BLOCK,), dtype=tl.float32)
    else:
        for r in tl.range(first, last, flatten=True):
            q = q_desc.load([r * BLOCK, 0])
            m_i = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
            l_i = tl.zeros((BLOCK,), dtype=tl.float32)
            acc = tl.zeros((BLOCK, D), dtype=tl.float32)
            for e in range(0, L):
                start = tl.load(listed + r * L + e) * BLOCK
                k = k_desc.load([start, 0])
                v = v_desc.load([start, 0])
                valid = start + tl.arange(0, BLOCK) < N
                m_i, l_i, acc = accumulate_tile(tl.dot(q, tl.trans(k)), scale, valid, v, m_i, l_i, acc, True)
            o_desc.store([r * BLOCK, 0], (acc / l_i[:, None]).to(o_ptr.dtype.element_ty))


def launch(q, k, v, lists, rows, flat, stages, qptr=False):
    _, heads, tokens, dim = q.shape
    out = torch.empty_like(q)
    blocks, length = lists.shape[-2], lists.shape[-1]
    _rows[(triton.cdiv(blocks, rows), heads)](q, k, v, out, lists, 1.4426950408889634 / dim**0.5, tokens, blocks,
                                               length, D=dim, BLOCK=64, ROWS=rows, FLAT=flat, QPTR=qptr, num_warps=4,
                                               num_stages=stages)
    return out


SHAPES = {"wan1.3b": (12, 32760), "wan14b": (40, 75600)}


def main():
    out_dir = sys.argv[1]
    use_descriptor_scratch()
    results = {}
    for label, (heads, tokens) in SHAPES.items():
        torch.manual_seed(0)
        q, k, v = (torch.randn(1, heads, tokens, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        blocks = triton.cdiv(tokens, 64)
        length = max(1, round(0.05 * blocks))
        lists = torch.rand(1, heads, blocks, blocks, device="cuda").topk(length, dim=-1).indices.sort(dim=-1).values
        lists = lists.to(torch.int32).contiguous()
        counts = torch.full((1, heads, blocks), length, dtype=torch.int32, device="cuda")
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            cudnn = triton.testing.do_bench(lambda: F.scaled_dot_product_attention(q, k, v), warmup=50, rep=300)
        ideal = cudnn * length / blocks
        base_config = bl.Config(1, 4, 3, True)
        ref = bl.block_list_attention(q, k, v, lists, counts, 64, base_config)
        base = triton.testing.do_bench(lambda: bl.block_list_attention(q, k, v, lists, counts, 64, base_config),
                                       warmup=50, rep=300)
        entry = {"cudnn_ms": cudnn, "length": length, "blocks": blocks, "ideal_ms": ideal,
                 "variants": {"base 1x4x3t": {"ms": base, "x_ideal": base / ideal, "err": 0.0}}}
        print(f"{label}: cudnn {cudnn:.3f} ms, L={length} of {blocks}, ideal {ideal:.3f}; base {base:.3f} "
              f"({base / ideal:.2f}x)", flush=True)
        for rows, stages, qptr in ((2, 3, True), (4, 3, True), (8, 3, True), (4, 2, True), (8, 2, True),
                                   (4, 2, False), (4, 4, True)):
            name = f"flat{rows} s{stages}{' qptr' if qptr else ' qtma'}"
            try:
                out = launch(q, k, v, lists, rows, True, stages, qptr)
                torch.cuda.synchronize()
                err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
                if not err < 1e-2:
                    entry["variants"][name] = {"err": err}
                    print(f"  {name:18} WRONG err {err:.2e}", flush=True)
                    continue
                ms = triton.testing.do_bench(lambda: launch(q, k, v, lists, rows, True, stages, qptr), warmup=50,
                                             rep=300)  # noqa: B023
                entry["variants"][name] = {"ms": ms, "x_ideal": ms / ideal, "err": err}
                print(f"  {name:18} {ms:8.3f} ms  {ms / ideal:5.2f}x ideal  err {err:.2e}", flush=True)
            except Exception as exc:  # noqa: BLE001
                entry["variants"][name] = {"raised": f"{type(exc).__name__}: {str(exc)[:300]}"}
                print(f"  {name:18} RAISED {type(exc).__name__}: {str(exc)[:300]}", flush=True)
        results[label] = entry
        del q, k, v
        torch.cuda.empty_cache()
    with open(os.path.join(out_dir, "rows_probe.json"), "w") as fh:
        json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
