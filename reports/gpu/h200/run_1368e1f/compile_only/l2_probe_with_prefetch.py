"""Experiment (not part of the package): is the block-list kernel on 64-token blocks bound by the L2 -> SM traffic of
its key and value tiles?

One program per (query block, head), its L listed key blocks streamed by tensor descriptors (3 stages, 4 warps), as
triton-blocks' unspecialised program. MODE:
  0 attention : the full step (scores, online softmax, P V), masked to keys below N
  1 mma       : the same loads and both products, no softmax (acc += (q k^T) v in bf16): what is left without exp2
  2 prefetched: as 0, with the next step's q k^T issued before this step's softmax (one product more a row)
(a Triton loop whose loads feed no product is not pipelined, so a loads-only mode would time latency, not traffic)
Lists: random (SLA-like: L of R distinct blocks per row, ascending), and shared (every row lists blocks 0..L-1, the
whole working set L2-resident and identical for all programs). Block sizes 64 (SLA) and 128 (same density). Bytes
moved from L2 = programs x L x 2 x block x D x 2; the table gives TB/s for each. 4 warps for 64, 8 for 128.
"""

import json
import os
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.nn.attention import SDPBackend, sdpa_kernel

from methods.kernels import use_descriptor_scratch
from methods.kernels.attention_states import accumulate_tile


@triton.jit
def _probe(q_ptr, k_ptr, v_ptr, o_ptr, lists_ptr, scale, N, R, L,
           D: tl.constexpr, BLOCK: tl.constexpr, MODE: tl.constexpr):
    i, g = tl.program_id(0), tl.program_id(1).to(tl.int64)
    base = g * N * D
    k_desc = tl.make_tensor_descriptor(k_ptr + base, shape=[N, D], strides=[D, 1], block_shape=[BLOCK, D])
    v_desc = tl.make_tensor_descriptor(v_ptr + base, shape=[N, D], strides=[D, 1], block_shape=[BLOCK, D])
    rows = i * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, D)
    q = tl.load(q_ptr + base + rows[:, None].to(tl.int64) * D + cols[None, :], mask=(rows < N)[:, None], other=0.0)
    m_i = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK,), dtype=tl.float32)
    acc = tl.zeros((BLOCK, D), dtype=tl.float32)
    listed = lists_ptr + (g * R + i) * L
    if MODE == 2:
        # The next step's scores issued before this step's softmax (FlashAttention-3's intra-warpgroup overlap).
        k = k_desc.load([tl.load(listed) * BLOCK, 0])
        qk = tl.dot(q, tl.trans(k))
        for step in range(0, L):
            start = tl.load(listed + step) * BLOCK
            v = v_desc.load([start, 0])
            k_next = k_desc.load([tl.load(listed + tl.minimum(step + 1, L - 1)) * BLOCK, 0])
            qk_next = tl.dot(q, tl.trans(k_next))
            valid = start + tl.arange(0, BLOCK) < N
            m_i, l_i, acc = accumulate_tile(qk, scale, valid, v, m_i, l_i, acc, True)
            qk = qk_next
    for step in range(0, L if MODE < 2 else 0):
        start = tl.load(listed + step) * BLOCK
        k = k_desc.load([start, 0])
        v = v_desc.load([start, 0])
        if MODE == 0:
            valid = start + tl.arange(0, BLOCK) < N
            m_i, l_i, acc = accumulate_tile(tl.dot(q, tl.trans(k)), scale, valid, v, m_i, l_i, acc, True)
        else:
            acc = tl.dot(tl.dot(q, tl.trans(k)).to(v.dtype), v, acc)
    if MODE != 1:
        acc = acc / l_i[:, None]
    tl.store(o_ptr + base + rows[:, None].to(tl.int64) * D + cols[None, :], acc.to(o_ptr.dtype.element_ty),
             mask=(rows < N)[:, None])


def launch(q, k, v, lists, block, mode, stages=3, warps=4):
    _, heads, tokens, dim = q.shape
    out = torch.empty_like(q)
    blocks, length = lists.shape[-2], lists.shape[-1]
    _probe[(blocks, heads)](q, k, v, out, lists, 1.4426950408889634 / dim**0.5, tokens, blocks, length, D=dim,
                            BLOCK=block, MODE=mode, num_warps=warps, num_stages=stages)
    return out


SHAPES = {"wan1.3b": (12, 32760), "wan14b": (40, 75600)}
MODES = {0: "attention", 1: "mma", 2: "prefetched"}


def main():
    out_dir = sys.argv[1]
    use_descriptor_scratch()
    results = {}
    for label, (heads, tokens) in SHAPES.items():
        torch.manual_seed(0)
        q, k, v = (torch.randn(1, heads, tokens, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            cudnn = triton.testing.do_bench(lambda: F.scaled_dot_product_attention(q, k, v), warmup=50, rep=300)
        entry = {"cudnn_ms": cudnn, "rows": {}}
        print(f"{label}: cudnn {cudnn:.3f} ms", flush=True)
        for block in (64, 128):
            blocks = triton.cdiv(tokens, block)
            length = max(1, round(0.05 * blocks))
            ideal = cudnn * length / blocks
            random_lists = torch.rand(1, heads, blocks, blocks, device="cuda").topk(length, dim=-1).indices
            shared = torch.arange(length, device="cuda", dtype=torch.int32).expand(1, heads, blocks, length)
            for kind, lists in (("random", random_lists.sort(dim=-1).values), ("shared", shared)):
                lists = lists.to(torch.int32).contiguous()
                moved = heads * blocks * length * 2 * block * 128 * 2
                for mode, name in MODES.items():
                    ms = triton.testing.do_bench(lambda: launch(q, k, v, lists, block, mode, 3, block // 16), warmup=30,
                                                 rep=200)  # noqa: B023
                    key = f"b{block} {kind} {name}"
                    entry["rows"][key] = {"ms": ms, "x_ideal": ms / ideal, "l2_tb_s": moved / ms / 1e9,
                                          "length": length, "blocks": blocks}
                    print(f"  {key:26} {ms:8.3f} ms  {ms / ideal:5.2f}x ideal  {moved / ms / 1e9:6.2f} TB/s from L2",
                          flush=True)
        results[label] = entry
        del q, k, v
        torch.cuda.empty_cache()
    with open(os.path.join(out_dir, "l2_probe.json"), "w") as fh:
        json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
