"""Experiment (not part of the package): can 64-token key tiles run under Triton 3.6's warp specialisation on sm_90?

Session 19 found them NaN in 3 and 4 stages (64x64 and 128x64) and slow in 2. Here: the specialised loop of
triton-blocks (descriptor q, k, v, output; whole blocks unmasked: N a multiple of 64), SLA-like random lists
(5% of the blocks a row, ascending), with the running maximum starting at -inf (as shipped) or at a finite -1e30
(if the NaN comes from -inf - -inf in a rescale the specialised schedule reorders), 4 or 8 warps, 2-4 stages.
Each output against triton-blocks' unspecialised 1x4x3t on the same lists (relative error, non-finite counted),
then timed (do_bench) against the ideal, density x cuDNN.
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
def _ws(q_ptr, k_ptr, v_ptr, o_ptr, lists_ptr, scale, N, R, L,
        D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK: tl.constexpr, FINITE: tl.constexpr, WS: tl.constexpr):
    i, g = tl.program_id(0), tl.program_id(1).to(tl.int64)
    base = g * N * D
    q_desc = tl.make_tensor_descriptor(q_ptr + base, shape=[N, D], strides=[D, 1], block_shape=[BLOCK_M, D])
    k_desc = tl.make_tensor_descriptor(k_ptr + base, shape=[N, D], strides=[D, 1], block_shape=[BLOCK, D])
    v_desc = tl.make_tensor_descriptor(v_ptr + base, shape=[N, D], strides=[D, 1], block_shape=[BLOCK, D])
    o_desc = tl.make_tensor_descriptor(o_ptr + base, shape=[N, D], strides=[D, 1], block_shape=[BLOCK_M, D])
    q = q_desc.load([i * BLOCK_M, 0])
    if FINITE:
        m_i = tl.full((BLOCK_M,), -1.0e30, dtype=tl.float32)
    else:
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, D), dtype=tl.float32)
    listed = lists_ptr + (g * R + i * (BLOCK_M // BLOCK)) * L  # BLOCK_M = 2 BLOCK: the first query block's list
    for step in tl.range(0, L, warp_specialize=WS):
        start = tl.load(listed + step) * BLOCK
        k = k_desc.load([start, 0])
        v = v_desc.load([start, 0])
        m_i, l_i, acc = accumulate_tile(tl.dot(q, tl.trans(k)), scale, None, v, m_i, l_i, acc, False)
    o_desc.store([i * BLOCK_M, 0], (acc / l_i[:, None]).to(o_ptr.dtype.element_ty))


def launch(q, k, v, lists, block_m, finite, ws, warps, stages):
    _, heads, tokens, dim = q.shape
    out = torch.empty_like(q)
    blocks, length = lists.shape[-2], lists.shape[-1]
    _ws[(tokens // block_m, heads)](q, k, v, out, lists, 1.4426950408889634 / dim**0.5, tokens, blocks, length,
                                     D=dim, BLOCK_M=block_m, BLOCK=64, FINITE=finite, WS=ws, num_warps=warps,
                                     num_stages=stages)
    return out


SHAPES = {"wan1.3b": (12, 32768), "wan14b": (40, 75648)}
VARIANTS = [(64, finite, True, warps, stages) for finite in (False, True) for warps in (4, 8) for stages in (2, 3, 4)]
VARIANTS += [(64, True, False, 4, 3)]


def main():
    out_dir = sys.argv[1]
    use_descriptor_scratch()
    results = {}
    for label, (heads, tokens) in SHAPES.items():
        torch.manual_seed(0)
        q, k, v = (torch.randn(1, heads, tokens, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        blocks = tokens // 64
        length = max(1, round(0.05 * blocks))
        lists = torch.rand(1, heads, blocks, blocks, device="cuda").topk(length, dim=-1).indices.sort(dim=-1).values
        lists = lists.to(torch.int32).contiguous()
        counts = torch.full((1, heads, blocks), length, dtype=torch.int32, device="cuda")
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            cudnn = triton.testing.do_bench(lambda: F.scaled_dot_product_attention(q, k, v), warmup=50, rep=300)
        ideal = cudnn * length / blocks
        base_config = bl.Config(1, 4, 3, True)
        ref = bl.block_list_attention(q, k, v, lists, counts, 64, base_config).float()
        base = triton.testing.do_bench(lambda: bl.block_list_attention(q, k, v, lists, counts, 64, base_config),
                                       warmup=50, rep=300)
        entry = {"cudnn_ms": cudnn, "length": length, "blocks": blocks, "ideal_ms": ideal,
                 "variants": {"base 1x4x3t": {"ms": base, "x_ideal": base / ideal, "err": 0.0}}}
        print(f"{label}: cudnn {cudnn:.3f} ms, L={length} of {blocks}, ideal {ideal:.3f}; base {base:.3f} "
              f"({base / ideal:.2f}x)", flush=True)
        for variant in VARIANTS:
            block_m, finite, ws, warps, stages = variant
            name = f"{block_m}x64x{warps}x{stages}{'w' if ws else ''} m0={'-1e30' if finite else '-inf'}"
            try:
                out = launch(q, k, v, lists, *variant).float()
                torch.cuda.synchronize()
                bad = int((~torch.isfinite(out)).sum())
                err = ((out.nan_to_num() - ref).norm() / ref.norm()).item()
                row = {"err": err, "non_finite": bad}
                if bad == 0 and err < 1e-2:
                    ms = triton.testing.do_bench(lambda: launch(q, k, v, lists, *variant), warmup=50, rep=300)  # noqa: B023
                    row |= {"ms": ms, "x_ideal": ms / ideal}
                entry["variants"][name] = row
                timing = f"{row['ms']:8.3f} ms  {row['x_ideal']:5.2f}x ideal" if "ms" in row else "not timed"
                print(f"  {name:24} err {err:.2e} non-finite {bad:>9}  {timing}", flush=True)
            except Exception as exc:  # noqa: BLE001
                entry["variants"][name] = {"raised": f"{type(exc).__name__}: {str(exc)[:300]}"}
                print(f"  {name:24} RAISED {type(exc).__name__}: {str(exc)[:300]}", flush=True)
        results[label] = entry
        del q, k, v
        torch.cuda.empty_cache()
    with open(os.path.join(out_dir, "ws64_probe.json"), "w") as fh:
        json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
