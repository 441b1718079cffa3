"""Ranked-prefix selection on CUDA in Triton: the threshold step of XAttention and SVG2 in one launch.

Computes what :func:`methods.kernels.block_sparse.select_by_cumulative_mass` and
:func:`~methods.kernels.block_sparse.select_by_cost_budget` compute in torch (which stay the CPU path and the
reference): per row of ``scores (..., n)``, rank the entries by decreasing score, sum a weight in rank order (the
score itself for a cumulative mass, a cost such as tokens per block for a budget) and keep the leading entries
while ``weight before + half x own weight < fraction x row total`` (``half`` 0 or 1/2), or while their rank is
below ``min_keep``. Both rules keep a prefix of the ranking (the left side never decreases along it for
non-negative weights), so the kept set is every entry whose rank key is at least the last kept one's.

In torch that is a sort, a gather, a cumulative sum, a comparison and a scatter, about ten launches and their
host work per call: at Wan 1.3B, XAttention's threshold added 0.37 ms (3.3% of a cuDNN call) to its 0.99 ms of
scoring (reports/gpu/h200/run_81d2574/xattn/). Here one program per row holds the row in registers:

- the rank key of entry j is ``(ordered float bits of score_j) << 32 | (BLOCK - 1 - j)``, an int64 (a
  non-negative score's IEEE bits order as the scores do, ``inf`` first; a negative one's magnitude bits are flipped
  so that it ranks below, and padding ranks last): one descending ``tl.sort`` ranks by score with ties in index
  order, as the stable sort of the torch budget does (the torch cumulative mass sorts
  without stability: only the order of exact ties differs, and only where they straddle the cut);
- the weights are gathered in rank order (a load by index, from L1/L2), summed by ``tl.cumsum`` in float64 as the
  torch path sums in double, the kept count is the prefix the rule allows, and the cut is the smallest kept key.

Shapes: scores ``(..., n)`` float32, non-negative (``inf`` ranks first), ``n <= MAX_ENTRIES``; weights
broadcastable to scores, any real dtype. Returns ``(..., n)`` bool. On CPU tensors under the interpreter
(``TRITON_INTERPRET=1``, tests) as on CUDA.
"""

from __future__ import annotations

import os
import struct
from typing import Any

import torch

from methods.kernels import BACKENDS, kernel_choice, kernel_op, use_kernel

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs (CI): every call takes the torch path
    triton = tl = None

BACKEND_ENV = "BENCH_SELECTION_BACKEND"
DEFAULT_BACKEND = "auto"
kernel_choice(BACKEND_ENV, DEFAULT_BACKEND, BACKENDS)
#: The longest row the kernel ranks; longer rows take the torch path. One program sorts its row in registers, which
#: costs far more than n log^2 n suggests past 512 entries: on an H200 (device time, reports/gpu/h200/run_68cb19d/)
#: 0.8 us a program for rows of 256 (xattn at Wan 1.3B: 0.019 ms for 3,072 rows, where the torch path had added
#: 0.37 ms to the synchronised selection, host work included, in run_81d2574), 13 us for rows padded to 1,024
#: (2.41 ms for xattn's 23,640 rows of 591 at 14B, 2.11 ms synchronised against torch's 1.69; 0.36 ms for SVG2's
#: 3,600 rows of 1,000 key clusters at 1.3B).
MAX_ENTRIES = 512
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _jit(fn: Any) -> Any:
    return fn if triton is None else triton.jit(fn)


@_jit
def _ranked_prefix(scores_ptr, weights_ptr, keep_ptr, n, inner, wsp, wsq, wsn, fraction_bits, own, min_keep,
                   BLOCK: tl.constexpr):  # fmt: skip
    """Program ``row``: the kept entries of ``scores[row, :n]`` (contiguous rows) into ``keep[row]``, counting
    ``own`` (0 or 1/2) of each entry's weight against the budget ``fraction x total``, the fraction passed as the
    int64 bits of its double (Triton passes a Python float as float32: at an exact tie, equal costs summing to the
    budget, the rounded fraction kept one entry more than torch); the weights of row ``row = p * inner + q`` are at
    ``weights_ptr + p wsp + q wsq + j wsn`` (broadcast rows have stride 0)."""
    row = tl.program_id(0).to(tl.int64)
    entries = tl.arange(0, BLOCK)
    present = entries < n
    score = tl.load(scores_ptr + row * n + entries, mask=present, other=0.0) + 0.0  # -0.0 ranks as 0.0
    bits = score.to(tl.int32, bitcast=True)
    bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # IEEE bits in score order, negative scores included
    padding = -9223372036854775807 - 1  # below every score's key: the padding ranks last
    key = tl.where(present, (bits.to(tl.int64) << 32) | (BLOCK - 1 - entries), padding)
    ranked = tl.sort(key, descending=True)
    order = BLOCK - 1 - (ranked & 0xFFFFFFFF)  # entry index at each rank; the n entries rank before the padding
    weights_row = weights_ptr + (row // inner) * wsp + (row % inner) * wsq
    weight = tl.load(weights_row + order * wsn, mask=present, other=0).to(tl.float64)
    before = tl.cumsum(weight, 0) - weight
    total = tl.sum(weight, 0)
    kept = before + weight * own < total * fraction_bits.to(tl.float64, bitcast=True)
    kept = (kept | (entries < min_keep)) & present
    cut = tl.min(tl.where(kept, ranked, 0x7FFFFFFFFFFFFFFF), 0)
    tl.store(keep_ptr + row * n + entries, key >= cut, mask=present)


def unsupported_reason(scores: torch.Tensor, weights: torch.Tensor) -> str | None:
    """Why the kernel cannot rank this call (None when it can): Triton on CUDA, or CPU tensors under the
    interpreter; float32 scores with at least one and at most :data:`MAX_ENTRIES` entries a row."""
    if triton is None:
        return "triton is not installed"
    device_type = "cpu" if INTERPRETED else "cuda"
    if {scores.device.type, weights.device.type} != {device_type}:
        return f"inputs are not all on {device_type}"
    if scores.dtype != torch.float32:
        return f"scores are {scores.dtype}, the kernel ranks float32"
    if scores.dim() == 0 or not 0 < scores.shape[-1] <= MAX_ENTRIES:
        return f"rows of {scores.shape[-1] if scores.dim() else 0} entries (the kernel ranks 1 to {MAX_ENTRIES})"
    if scores.numel() == 0:
        return "no rows"
    return None


def use_fused(scores: torch.Tensor, weights: torch.Tensor, backend: str | None = None) -> bool:
    """Whether this selection runs the kernel: ``backend`` (default ``$BENCH_SELECTION_BACKEND``, else auto)
    ``auto`` (when it can), ``torch`` (never) or ``triton`` (always; HarnessError when it cannot)."""
    return use_kernel(BACKEND_ENV, DEFAULT_BACKEND, backend, lambda: unsupported_reason(scores, weights),
                      "the fused ranked selection")  # fmt: skip


@kernel_op("ranked_prefix")
def ranked_prefix(scores: torch.Tensor, weights: torch.Tensor, fraction: float, half: bool,
                  min_keep: int) -> torch.Tensor:  # fmt: skip
    """The module's rule as one op (no gradients): ``(..., n)`` bool kept entries of ``scores (..., n)`` float32,
    ranking by score and summing ``weights`` (broadcastable to scores) until ``fraction`` of the row's total, the
    crossing entry kept (``half`` False) or kept when under half of it (``half`` True); at least ``min_keep``.
    The caller checks :func:`unsupported_reason` first (:func:`use_fused` does)."""
    n = scores.shape[-1]
    inner = scores.shape[-2] if scores.dim() > 1 else 1
    flat = scores.reshape(-1, n).contiguous()
    rows = flat.shape[0]
    spread = weights.expand_as(scores).reshape(rows // inner, inner, n)  # a view where the broadcast allows
    keep = torch.empty(scores.shape, dtype=torch.bool, device=scores.device)
    block = max(16, triton.next_power_of_2(n))
    fraction_bits = struct.unpack("<q", struct.pack("<d", fraction))[0]  # > 2^31 for any fraction > 2^-1022: int64
    _ranked_prefix[(rows,)](flat, spread, keep, n, inner, *spread.stride(), fraction_bits, 0.5 if half else 0.0,
                            min_keep, BLOCK=block, num_warps=4)  # fmt: skip
    return keep


@ranked_prefix.register_fake
def _fake_keep(scores: torch.Tensor, weights: torch.Tensor, fraction: float, half: bool,
               min_keep: int) -> torch.Tensor:  # fmt: skip
    return torch.empty_like(scores, dtype=torch.bool)
