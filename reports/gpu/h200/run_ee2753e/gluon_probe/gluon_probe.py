"""Experiment (not part of the package): the Gluon block-list kernel (gluon_blocks.py beside this) against
triton-blocks' 1x4x3t: correctness first (relative error and worst row against the package kernel on random inputs,
ragged N, counts from 0 to L including empty rows), then time (do_bench) on SLA-like full lists (5% of 64-token
blocks a row) at the Wan 1.3B and 14B shapes, against the ideal (density x cuDNN)."""

import json
import os
import sys

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gluon_blocks as gb  # noqa: E402

from methods.kernels import block_list_triton as bl  # noqa: E402
from methods.kernels import use_descriptor_scratch  # noqa: E402

BASE = bl.Config(1, 4, 3, True)
VARIANTS = [(stages, mask) for mask in (True, False) for stages in (2, 3, 4)]


def errors(out, ref):
    out, ref = out.float(), ref.float()
    whole = ((out - ref).norm() / ref.norm()).item()
    rows = ((out - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-6)).max().item()
    return whole, rows, int((~torch.isfinite(out)).sum())


def lists_for(heads, blocks, length, device, varied):
    lists = torch.rand(1, heads, blocks, blocks, device=device).topk(length, dim=-1).indices.sort(dim=-1).values
    lists = lists.to(torch.int32).contiguous()
    if varied:
        counts = torch.randint(0, length + 1, (1, heads, blocks), device=device, dtype=torch.int32)
        lists[..., -1, :] = torch.arange(blocks - length, blocks, device=device, dtype=torch.int32)  # the ragged block
    else:
        counts = torch.full((1, heads, blocks), length, dtype=torch.int32, device=device)
    return lists, counts


def main():
    out_dir = sys.argv[1]
    use_descriptor_scratch()
    result = {"checks": {}, "timing": {}}
    ok = True
    for label, (heads, tokens, length, varied) in {"small_varied": (4, 4000, 9, True),
                                                   "small_full": (4, 4033, 7, False),
                                                   "wan1.3b": (12, 32760, 26, False),
                                                   "wan14b": (40, 75600, 59, False)}.items():
        torch.manual_seed(1)
        q, k, v = (torch.randn(1, heads, tokens, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        blocks = triton.cdiv(tokens, 64)
        lists, counts = lists_for(heads, blocks, length, "cuda", varied)
        ref = bl.block_list_attention(q, k, v, lists, counts, 64, BASE)
        for stages, mask in VARIANTS:
            name = f"s{stages}{' mask' if mask else ''}"
            try:
                out = gb.launch(q, k, v, lists, counts, stages, mask)
                torch.cuda.synchronize()
                whole, worst, bad = errors(out, ref)
                passed = bad == 0 and whole < 1e-2 and worst < 5e-2
                ok &= passed
                result["checks"][f"{label} {name}"] = {"relative": whole, "worst_row": worst, "non_finite": bad,
                                                        "passed": passed}
                print(f"check {label:12} {name:8} rel {whole:.2e} worst {worst:.2e} non-finite {bad} "
                      f"{'ok' if passed else 'FAILED'}", flush=True)
            except Exception as exc:  # noqa: BLE001
                ok = False
                result["checks"][f"{label} {name}"] = {"raised": f"{type(exc).__name__}: {str(exc)[:400]}"}
                print(f"check {label:12} {name:8} RAISED {type(exc).__name__}: {str(exc)[:400]}", flush=True)
        if label.startswith("wan"):
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                cudnn = triton.testing.do_bench(lambda: F.scaled_dot_product_attention(q, k, v), warmup=50, rep=300)
            ideal = cudnn * length / blocks
            rows = {"base 1x4x3t": triton.testing.do_bench(
                lambda: bl.block_list_attention(q, k, v, lists, counts, 64, BASE), warmup=50, rep=300)}
            for stages, mask in VARIANTS:
                name = f"gluon s{stages}{' mask' if mask else ''}"
                if result["checks"].get(f"{label} s{stages}{' mask' if mask else ''}", {}).get("passed"):
                    rows[name] = triton.testing.do_bench(lambda s=stages, m=mask: gb.launch(q, k, v, lists, counts, s, m),
                                                         warmup=50, rep=300)
            result["timing"][label] = {"cudnn_ms": cudnn, "ideal_ms": ideal, "ms": rows,
                                       "x_ideal": {n: ms / ideal for n, ms in rows.items()}}
            print(f"{label}: cudnn {cudnn:.3f} ms, ideal {ideal:.3f}", flush=True)
            for n, ms in rows.items():
                print(f"  {n:18} {ms:8.3f} ms  {ms / ideal:5.2f}x ideal", flush=True)
        del q, k, v
        torch.cuda.empty_cache()
    result["all_passed"] = ok
    with open(os.path.join(out_dir, "gluon_probe.json"), "w") as fh:
        json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
