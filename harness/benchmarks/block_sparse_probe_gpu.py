"""Which block-sparse kernel reaches issue 21's bar (kernel <= 1.2 x density x cuDNN) on Hopper: a probe.

At Wan 1.3B 480p (1, 12, 32,760, 128) bf16, on the plans radial, xattn (at its paper's density 0.344) and svg
make at a sparse step (128-token tiles), it times:

1. compiled FlexAttention under several kernel-option sets (tiles, warps, stages, ``USE_TMA``, ``PRESCALE_QK``,
   ``ROWS_GUARANTEED_SAFE``), each checked against masked dense in fp32 on sampled rows first;
2. FlashInfer's ``BlockSparseAttentionWrapper`` (one BSR table, paged KV with 128-token pages: its FA3 kernel on
   Hopper) with the heads stacked along the token axis (head h's blocks only list head h's key blocks, so one
   table serves per-head masks). Pages must be whole, so each head is padded to a multiple of 128 tokens with
   zero keys and values; a zero key scores exactly 0, so the output is corrected by the normaliser the returned
   log-sum-exp gives: ``out * Z / (Z - pad_keys_kept)``, where ``Z = 2**lse`` (FlashInfer's base-2 lse; the
   natural-base reading is checked beside it).

Per variant: relative error against masked dense (fp32, 1,024 sampled rows), ms (CUDA events, median of 7), and
``x ideal`` (the kernel over density x the cuDNN call). A table last; JSON in ``$OUT/block_sparse_probe.json``.

    python -m harness.benchmarks.block_sparse_probe_gpu --out $OUT
"""

from __future__ import annotations

import argparse
import math
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
from methods.kernels.sparse_backends import default_timer, masked_reference, reference_rows

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


def flashinfer_variant(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: BlockSparsePattern,
                       base: float) -> tuple[Any, float]:  # fmt: skip
    """A thunk running the stacked-heads BSR call with the padding correction, and its plan's seconds."""
    import time

    import flashinfer

    if pattern.full is not None:
        raise ValueError("token-level pattern (partial tiles): the BSR wrapper computes whole tiles")
    _, heads, tokens, dim = q.shape
    padded = math.ceil(tokens / TILE) * TILE
    pad = padded - tokens
    blocks = padded // TILE
    kept = pattern.kept.expand(1, heads, -1, -1)[0]  # (H, MB, NB)
    assert kept.shape[-2:] == (blocks, blocks), kept.shape

    def stack(x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[0], (0, 0, 0, pad)).reshape(heads * padded, 1, dim).contiguous()

    qs, ks, vs = stack(q), stack(k), stack(v)
    head_of, _, col_of = kept.nonzero(as_tuple=True)
    counts = kept.sum(-1).reshape(-1)
    indptr = torch.zeros(heads * blocks + 1, dtype=torch.int32, device=q.device)
    indptr[1:] = counts.cumsum(0)
    indices = (head_of * blocks + col_of).to(torch.int32)
    pad_kept = kept[..., -1].reshape(heads, blocks, 1).expand(-1, -1, TILE).reshape(heads, padded)[:, :tokens]
    pad_keys = (pad * pad_kept).float()  # (H, N): zero keys each real row's softmax included
    workspace = torch.empty(128 * 1024 * 1024, dtype=torch.uint8, device=q.device)
    wrapper = flashinfer.sparse.BlockSparseAttentionWrapper(workspace, backend="auto")
    begin = time.perf_counter()
    wrapper.plan(indptr, indices, heads * padded, heads * padded, TILE, TILE, 1, 1, dim,
                 q_data_type=q.dtype, kv_data_type=k.dtype, o_data_type=q.dtype)  # fmt: skip
    torch.cuda.synchronize()
    plan_s = time.perf_counter() - begin

    def run() -> torch.Tensor:
        out, lse = wrapper.run(qs, ks, vs, return_lse=True)
        out = out.reshape(heads, padded, dim)[:, :tokens]
        z = torch.pow(base, lse.reshape(heads, padded)[:, :tokens])
        return (out.float() * (z / (z - pad_keys))[..., None]).to(q.dtype)[None]

    return run, plan_s


def probe(device: torch.device) -> dict[str, Any]:
    q, k, v, ctx = model_inputs("wan1.3b", device)
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        dense_ms = default_timer(lambda: F.scaled_dot_product_attention(q, k, v), device, 3, 7) * 1e3
    print(f"cudnn {dense_ms:.3f} ms", flush=True)
    rows_idx = reference_rows(q.shape[-2], device)
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
            for base_name, base in (("base2", 2.0), ("natural", math.e)):
                label = f"flashinfer bsr ({base_name} lse)"
                variants[label] = lambda b=base, p=pattern: flashinfer_variant(q, k, v, p, b)
            for label, build in variants.items():
                try:
                    built = build()
                    run, plan_s = built if isinstance(built, tuple) else (built, None)
                    error = relative_error(run()[..., rows_idx, :].float(), ref)
                    ms = default_timer(run, device, 2, 7) * 1e3
                    row = {"error": error, "ms": ms, "x_ideal": ms / (density * dense_ms), "plan_s": plan_s}
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
