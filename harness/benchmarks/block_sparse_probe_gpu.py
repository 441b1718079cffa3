"""Which block-sparse kernel reaches issue 21's bar (kernel <= 1.2 x density x cuDNN) on Hopper: a probe.

At Wan 1.3B 480p (1, 12, 32,760, 128) bf16, on the plans radial, xattn (at its paper's density 0.344) and svg
make at a sparse step (128-token tiles), it times:

1. compiled FlexAttention under several kernel-option sets (tiles, warps, stages, ``USE_TMA``, ``PRESCALE_QK``,
   ``ROWS_GUARANTEED_SAFE``), each checked against masked dense in fp32 on sampled rows first;
2. the ``flashinfer-bsr`` backend (:func:`methods.kernels.sparse_backends.flashinfer_bsr_attention`: FlashInfer's
   BSR wrapper, FA3 on Hopper, keys in pages of gcd(128, N) tokens), its copies included, on q, k, v
   ``(B, H, N, D)``-contiguous and in the attention processor's layout (``(B, N, H, D)`` projections seen as
   ``(B, H, N, D)``). A head-shared table (radial's) is read in place in both layouts; per-head tables (xattn, svg)
   stack the heads: a copy of q into whole tiles, and of k and v too in the processor's layout. (Run at 95b16d0,
   before that backend existed, this row timed the wrapper alone; at 8ae5dda the backend padded every head and
   corrected the padding through the lse, with one copy per q, k, v.)

Per variant: relative error against masked dense (fp32, 1,024 sampled rows), ms (CUDA events, median of 7), and
``x ideal`` (the kernel over density x the cuDNN call). A table last; JSON in ``$OUT/block_sparse_probe.json``.

    python -m harness.benchmarks.block_sparse_probe_gpu --out $OUT
"""

from __future__ import annotations

import argparse
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import flex_attention

from harness.atomic import write_json_atomic
from harness.benchmarks.sparse_gpu import PAPER_DENSITY, model_inputs, relative_error
from methods import build_method
from methods.kernels.block_sparse import BlockSparsePattern
from methods.kernels.sparse_backends import default_timer, get_backend, masked_reference, reference_rows

TILE = 128
OPTION_SETS: dict[str, dict[str, Any] | None] = {
    "flex default": None,
    "128x64 w8 s3": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3},
    "128x64 w8 s3 tma": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3, "USE_TMA": True},
    "128x128 w8 s2": {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2},
    "128x128 w8 s2 tma": {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2, "USE_TMA": True},
    "128x64 w8 s3 tma+safe+prescale": {
        "BLOCK_M": 128,
        "BLOCK_N": 64,
        "num_warps": 8,
        "num_stages": 3,
        "USE_TMA": True,
        "ROWS_GUARANTEED_SAFE": True,
        "PRESCALE_QK": True,
    },
    "128x64 w4 s3": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
    "64x64 w4 s3 tma": {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3, "USE_TMA": True},
}
METHODS = {"radial": {}, "xattn": {"fixed_density": PAPER_DENSITY["xattn"]}, "svg": {}}


_COMPILED: dict[str, Any] = {}


def flex_variant(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: BlockSparsePattern,
                 label: str) -> Any:  # fmt: skip
    """One compiled Flex per option set, reused across the methods' masks (same shapes: no recompile)."""
    options = OPTION_SETS[label]
    compiled = _COMPILED.setdefault(label, torch.compile(flex_attention, dynamic=False))
    mask = pattern.flex_block_mask((q.shape[0], q.shape[1]))
    return lambda: compiled(q, k, v, block_mask=mask, kernel_options=options)


def probe(device: torch.device) -> dict[str, Any]:
    q, k, v, ctx = model_inputs("wan1.3b", device)
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        dense_ms = default_timer(lambda: F.scaled_dot_product_attention(q, k, v), device, 3, 7) * 1e3
    print(f"cudnn {dense_ms:.3f} ms", flush=True)
    rows_idx = reference_rows(q.shape[-2], device)
    processor_qkv = tuple(x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    result: dict[str, Any] = {"cudnn_ms": dense_ms, "methods": {}}
    torch._dynamo.config.recompile_limit = 64
    with torch.inference_mode():
        for name, params in METHODS.items():
            method = build_method(name, **params)
            pattern = method.plan(q, k, v, ctx).pattern
            density = pattern.tile_density()
            ref = masked_reference(q, k, v, pattern, rows_idx)
            entry: dict[str, Any] = {"tile_density": density, "blocks": list(pattern.blocks), "variants": {}}
            variants: dict[str, Any] = {f"flex {label}": (lambda o=label, p=pattern: flex_variant(q, k, v, p, o))
                                        for label in OPTION_SETS}  # fmt: skip
            variants["flashinfer-bsr"] = lambda p=pattern: lambda: get_backend("flashinfer-bsr").run(q, k, v, p)
            variants["flashinfer-bsr processor layout"] = lambda p=pattern: (
                lambda: get_backend("flashinfer-bsr").run(*processor_qkv, p)
            )
            for label, build in variants.items():
                try:
                    run = build()
                    error = relative_error(run()[..., rows_idx, :].float(), ref)
                    ms = default_timer(run, device, 2, 7) * 1e3
                    row = {"error": error, "ms": ms, "x_ideal": ms / (density * dense_ms)}
                except Exception as exc:  # a variant that cannot compile or run is reported, not fatal
                    row = {"failed": f"{type(exc).__name__}: {exc}"[:400]}
                    traceback.print_exc()
                entry["variants"][label] = row
                print(f"{name} {label}: {row}", flush=True)
            result["methods"][name] = entry
            del method
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="results folder ($OUT)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    result = probe(torch.device("cuda"))
    write_json_atomic(args.out / "block_sparse_probe.json", result)
    print(f"\ncuDNN {result['cudnn_ms']:.3f} ms; x ideal = kernel / (tile density x cuDNN)")
    for name, entry in result["methods"].items():
        for label, row in entry["variants"].items():
            text = row.get("failed") or f"{row['ms']:8.3f} ms  {row['x_ideal']:5.2f}x ideal  error {row['error']:.1e}"
            print(f"{name:>7} {entry['tile_density']:.3f} {label:<40} {text}")


if __name__ == "__main__":
    main()
