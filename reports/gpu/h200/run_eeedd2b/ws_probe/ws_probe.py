"""Experiment (not part of the package): how fast can a Triton block-list attention program run on Hopper?

Every key block listed (dense), at Wan 1.3B (12 x 32,768 x 128) and 14B (40 x 75,648 x 128) shapes, bf16, against
cuDNN's SDPA in the same process. Variants of the inner loop:
  base : the shipped step (s = qk * scale; where(valid); max; exp2(s - m))
  fold : the scale folded into one FFMA (m = max(m, max(qk) * scale); exp2(qk * scale - m)), where kept
  nomask: fold without the where (N here is a multiple of every block: every column valid)
  ws   : + tl.range(warp_specialize=True) (Triton's Hopper automatic warp specialisation)
Checks each against SDPA (math, fp32) on sampled rows first.
"""

import json
import os
import sys

import torch
import triton
import triton.language as tl


@triton.jit
def _probe(q_ptr, k_ptr, v_ptr, o_ptr, lists_ptr, counts_ptr, scale, N, L,
           D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MODE: tl.constexpr,
           WS: tl.constexpr, LISTED: tl.constexpr):
    i, g = tl.program_id(0), tl.program_id(1).to(tl.int64)
    base = g * N * D
    q_desc = tl.make_tensor_descriptor(q_ptr + base, shape=[N, D], strides=[D, 1], block_shape=[BLOCK_M, D])
    k_desc = tl.make_tensor_descriptor(k_ptr + base, shape=[N, D], strides=[D, 1], block_shape=[BLOCK_N, D])
    v_desc = tl.make_tensor_descriptor(v_ptr + base, shape=[N, D], strides=[D, 1], block_shape=[BLOCK_N, D])
    o_desc = tl.make_tensor_descriptor(o_ptr + base, shape=[N, D], strides=[D, 1], block_shape=[BLOCK_M, D])
    q = q_desc.load([i * BLOCK_M, 0])
    R = tl.cdiv(N, BLOCK_M)
    if LISTED:
        count = tl.load(counts_ptr + g * R + i)
    else:
        count = tl.cdiv(N, BLOCK_N)
    listed = lists_ptr + (g * R + i) * L
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, D), dtype=tl.float32)
    for step in tl.range(0, count, warp_specialize=WS):
        if LISTED:
            start = tl.load(listed + step) * BLOCK_N
        else:
            start = step * BLOCK_N
        k = k_desc.load([start, 0])
        v = v_desc.load([start, 0])
        qk = tl.dot(q, k.T)
        if MODE == 0:
            valid = start + tl.arange(0, BLOCK_N) < N
            s = tl.where(valid[None, :], qk * scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            p = tl.exp2(s - m_new[:, None])
        elif MODE == 1:
            valid = start + tl.arange(0, BLOCK_N) < N
            qk = tl.where(valid[None, :], qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, axis=1) * scale)
            p = tl.exp2(qk * scale - m_new[:, None])
        else:
            m_new = tl.maximum(m_i, tl.max(qk, axis=1) * scale)
            p = tl.exp2(qk * scale - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    o_desc.store([i * BLOCK_M, 0], (acc / l_i[:, None]).to(o_ptr.dtype.element_ty))


MODES = {"base": 0, "fold": 1, "nomask": 2}


def launch(q, k, v, lists, counts, mode, ws, listed, bm, bn, warps, stages):
    G, N, D = q.shape
    out = torch.empty_like(q)
    scale = 1.4426950408889634 / D ** 0.5
    grid = (triton.cdiv(N, bm), G)
    _probe[grid](q, k, v, out, lists, counts, scale, N, lists.shape[-1], D=D, BLOCK_M=bm, BLOCK_N=bn,
                 MODE=MODES[mode], WS=ws, LISTED=listed, num_warps=warps, num_stages=stages)
    return out


def variants():
    rows = []
    for mode in ("base", "fold", "nomask"):
        for ws in (False, True):
            for bm, bn, warps, stages in ((128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 4, 3), (128, 64, 8, 3),
                                          (64, 64, 4, 3), (128, 128, 4, 2), (128, 128, 4, 3)):
                if ws and mode == "base" and (bm, bn) != (128, 128):
                    continue
                rows.append((mode, ws, True, bm, bn, warps, stages))
    rows += [("nomask", ws, False, 128, 128, 8, s) for ws in (False, True) for s in (2, 3)]
    return rows


def name(row):
    mode, ws, listed, bm, bn, warps, stages = row
    return f"{mode}{'+ws' if ws else ''}{'' if listed else '+contig'} {bm}x{bn}x{warps}x{stages}"


def main():
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    out_dir = sys.argv[1]
    shapes = {"wan1.3b": (12, 32768), "wan14b": (40, 75648)}
    results = {"triton": triton.__version__, "torch": torch.__version__, "shapes": {}}
    torch.manual_seed(0)
    for label, (heads, tokens) in shapes.items():
        q, k, v = (torch.randn(heads, tokens, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            dense = lambda: torch.nn.functional.scaled_dot_product_attention(q[None], k[None], v[None])
            ref_full = dense()[0]
            cudnn = triton.testing.do_bench(dense, warmup=50, rep=300)
        rows_idx = torch.randint(0, tokens, (256,), device="cuda")
        ref = torch.softmax((q[:, rows_idx].float() @ k.float().transpose(1, 2)) / 128 ** 0.5, -1) @ v.float()
        entry = {"cudnn_ms": cudnn, "cudnn_err": ((ref_full[:, rows_idx].float() - ref).norm() / ref.norm()).item(),
                 "variants": {}}
        print(f"{label}: cudnn {cudnn:.3f} ms", flush=True)
        for row in variants():
            mode, ws, listed, bm, bn, warps, stages = row
            R = triton.cdiv(tokens, bm)
            per = triton.cdiv(tokens, bn)
            lists = torch.arange(per, device="cuda", dtype=torch.int32).expand(heads, R, per).contiguous()
            counts = torch.full((heads, R), per, device="cuda", dtype=torch.int32)
            try:
                out = launch(q, k, v, lists, counts, mode, ws, listed, bm, bn, warps, stages)
                err = ((out[:, rows_idx].float() - ref).norm() / ref.norm()).item()
                ms = triton.testing.do_bench(lambda: launch(q, k, v, lists, counts, mode, ws, listed, bm, bn,
                                                            warps, stages), warmup=50, rep=300)
                entry["variants"][name(row)] = {"ms": ms, "x_cudnn": ms / cudnn, "err": err}
                print(f"  {name(row):32} {ms:8.3f} ms  {ms / cudnn:5.2f}x  err {err:.2e}", flush=True)
            except Exception as exc:
                entry["variants"][name(row)] = {"error": f"{type(exc).__name__}: {str(exc)[:400]}"}
                print(f"  {name(row):32} FAILED {type(exc).__name__}: {str(exc)[:200]}", flush=True)
        results["shapes"][label] = entry
        del q, k, v
    with open(os.path.join(out_dir, "ws_probe.json"), "w") as fh:
        json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
