"""Merging two attention states of the same query rows over disjoint key sets (FlashAttention's split-KV combine).

An attention state is a row's output ``o = sum_j p_j v_j / sum_j p_j`` over some keys and the log-sum-exp ``l`` of
its scaled scores. Over two disjoint key sets A and B, attention over their union is

    o = (2^{l_A} o_A + 2^{l_B} o_B) / (2^{l_A} + 2^{l_B}),

here with both log-sum-exps in base 2 (FlashInfer's convention; a natural-log one, Flex's, is multiplied by
``log2(e)`` first), computed against their larger one so that nothing overflows. A row with no key in one set has
``l = -inf`` there and takes the other state; a row with no key in either gets zeros.

:func:`merge_attention_states` runs one Triton program per (tile of rows, batch x head) on CUDA, reading both
outputs with any strides (one pass: two reads and one write of the output's size); :func:`merge_attention_states_torch`
is the CPU path and its reference. Used by the split backend (``flashinfer-split``: whole tiles on FlashInfer, the
partial ones on Flex).
"""

from __future__ import annotations

import torch

from methods.kernels import last_axis_contiguous, on_input_device, on_kernel_device, triton_jit

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs (CI): the torch path
    triton = tl = None

LOG2_E = 1.4426950408889634
#: A program holds two ``(ROWS_PER_PROGRAM, D)`` fp32 tiles: up to 256 columns keeps them at 64 registers a thread
#: (4 warps), and 32 rows give Wan 1.3B's 12 heads x 32,760 rows ~12,000 programs, enough to stream at full bandwidth.
MAX_HEAD_DIM = 256
ROWS_PER_PROGRAM = 32


def merge_attention_states_torch(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                                 lse_b: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """The merged output ``(B, H, N, D)`` in ``out_a``'s dtype from two states: outputs ``(B, H, N, D)`` and
    base-2 log-sum-exps ``(B, H, N)`` (fp32), in fp32."""
    top = torch.maximum(lse_a, lse_b)
    top = torch.where(torch.isneginf(top), 0.0, top)  # neither set has a key: both weights 0, the output 0
    weight_a, weight_b = torch.exp2(lse_a - top)[..., None], torch.exp2(lse_b - top)[..., None]
    total = (weight_a + weight_b).clamp_min(torch.finfo(torch.float32).tiny)
    # A side without keys weighs 0 and is not read: whatever its kernel left there (NaN included) stays out.
    part_a = torch.where(weight_a > 0, weight_a * out_a.float(), 0.0)
    part_b = torch.where(weight_b > 0, weight_b * out_b.float(), 0.0)
    return ((part_a + part_b) / total).to(out_a.dtype)


@triton_jit
def accumulate_tile(qk, scale, valid, v, m_i, l_i, acc, MASKED: tl.constexpr):
    """One key tile of FlashAttention's online softmax, the step of the block-sparse kernels
    (:mod:`methods.kernels.block_list_triton`, :mod:`methods.kernels.variable_blocks_triton`): raw scores ``qk
    (BLOCK_M, BLOCK_N)`` fp32 (``q k^T``), ``scale`` (``log2(e) / sqrt(D)``: the softmax in base 2), with ``MASKED``
    only the columns ``valid (BLOCK_N,)`` kept (without it every column counts: no select per score), their values
    ``v (BLOCK_N, BLOCK_D)``; the running row max ``m_i`` (log2 units), sum ``l_i`` and fp32 accumulator ``acc``
    updated and returned. The scale is folded into the exponent's argument (one FMA per score, as Triton's fused
    attention tutorial does), not applied to the scores first."""
    if MASKED:
        qk = tl.where(valid[None, :], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, axis=1) * scale)
    alpha = tl.exp2(m_i - m_new)
    weights = tl.exp2(qk * scale - m_new[:, None])
    l_i = l_i * alpha + tl.sum(weights, axis=1)
    acc = acc * alpha[:, None] + tl.dot(weights.to(v.dtype), v)
    return m_new, l_i, acc


@triton_jit
def _merge(a_ptr, la_ptr, b_ptr, lb_ptr, out_ptr, H, N, D: tl.constexpr, sab, sah, san, slab, slah, slan, sbb, sbh,
           sbn, slbb, slbh, slbn, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
    """Program (row tile, b * H + h): rows ``[tile BLOCK_N, (tile + 1) BLOCK_N)`` of both states merged into
    ``out (B, H, N, D)`` contiguous."""
    tile, bh = tl.program_id(0), tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    rows = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    valid = rows < N
    mask = valid[:, None] & (cols < D)[None, :]
    lse_a = tl.load(la_ptr + b * slab + h * slah + rows * slan, mask=valid, other=float("-inf"))
    lse_b = tl.load(lb_ptr + b * slbb + h * slbh + rows * slbn, mask=valid, other=float("-inf"))
    top = tl.maximum(lse_a, lse_b)
    top = tl.where(top == float("-inf"), 0.0, top)
    weight_a, weight_b = tl.exp2(lse_a - top), tl.exp2(lse_b - top)
    scale = 1.0 / tl.maximum(weight_a + weight_b, 1.1754943508222875e-38)
    offsets_a = b * sab + h * sah + rows[:, None].to(tl.int64) * san + cols[None, :]
    offsets_b = b * sbb + h * sbh + rows[:, None].to(tl.int64) * sbn + cols[None, :]
    out_a = tl.load(a_ptr + offsets_a, mask=mask, other=0.0).to(tl.float32)
    out_b = tl.load(b_ptr + offsets_b, mask=mask, other=0.0).to(tl.float32)
    merged = tl.where((weight_a > 0)[:, None], out_a * (weight_a * scale)[:, None], 0.0)
    merged += tl.where((weight_b > 0)[:, None], out_b * (weight_b * scale)[:, None], 0.0)
    out_offsets = bh.to(tl.int64) * N * D + rows[:, None].to(tl.int64) * D + cols[None, :]
    tl.store(out_ptr + out_offsets, merged.to(out_ptr.dtype.element_ty), mask=mask)


def _kernel_runs(out_a: torch.Tensor) -> bool:
    """Whether the Triton merge runs: Triton installed, CUDA tensors (CPU ones under the interpreter), a head dim
    up to :data:`MAX_HEAD_DIM`."""
    return triton is not None and on_kernel_device(out_a) and out_a.shape[-1] <= MAX_HEAD_DIM


@on_input_device
def merge_attention_states(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                           lse_b: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """:func:`merge_attention_states_torch`'s result, in one Triton launch on CUDA (any strides with a contiguous
    last axis; contiguous output), else by the torch path."""
    if not _kernel_runs(out_a):
        return merge_attention_states_torch(out_a, lse_a, out_b, lse_b)
    out_a, out_b = last_axis_contiguous(out_a), last_axis_contiguous(out_b)
    batch, heads, tokens, dim = out_a.shape
    out = torch.empty(batch, heads, tokens, dim, device=out_a.device, dtype=out_a.dtype)
    grid = (triton.cdiv(tokens, ROWS_PER_PROGRAM), batch * heads)
    _merge[grid](out_a, lse_a, out_b, lse_b, out, heads, tokens, dim, *out_a.stride()[:3], *lse_a.stride(),
                 *out_b.stride()[:3], *lse_b.stride(), BLOCK_N=ROWS_PER_PROGRAM,
                 BLOCK_D=triton.next_power_of_2(dim))  # fmt: skip
    return out
