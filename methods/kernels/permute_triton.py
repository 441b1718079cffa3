"""Token permutations in Triton: whole rows of ``(B, H, N, D)`` tensors moved by a per-head token order.

Computes what :func:`methods.kernels.block_sparse.permute_tokens` and :func:`~methods.kernels.block_sparse.
unpermute_tokens` compute with ``gather`` and ``scatter`` (their torch path, the CPU path and the reference):
``out[b, h, i] = x[b, h, order[b, h, i]]``, or its inverse ``out[b, h, order[b, h, i]] = x[b, h, i]``. Sparse
VideoGen (its temporal layout) and SVG2 (its clusters) permute q, k and v before every sparse call and the output
back after it.

torch's ``gather`` over an index expanded to x's shape reads one int64 index per element and computes each
element's address on its own; on an H200 at Wan 1.3B (12 heads x 32,760 tokens x 128, bf16) it took 0.17-0.29 ms a
tensor (about 0.7-1.2 TB/s for its 201 MB read and written) and the output's ``scatter`` 0.21-0.23 ms. Here one
program moves BLOCK rows: it loads their BLOCK indices once and each row as one contiguous run of D elements, so
the copy runs near the memory's rate: 0.063 ms a tensor, 0.059-0.070 the inverse
(``reports/gpu/h200/run_674ac94/call5/``). A copy: exact in every dtype.

Shapes: x ``(B, H, N, D)`` any strides with a contiguous last axis; order ``(B|1, H|1, N)`` int64, a permutation of
``range(N)`` per (b, h) (not checked: an index out of range reads or writes outside the tensors, where ``gather``
raises, and a repeated one makes the inverse's stores collide). Returns a contiguous ``(B, H, N, D)`` tensor of x's
dtype. No gradients: callers take the torch path for tensors that need them.
"""

from __future__ import annotations

import torch

from methods.kernels import (
    BACKENDS,
    KERNEL_DEVICE,
    kernel_choice,
    kernel_op,
    last_axis_contiguous,
    needs_gradients,
    on_kernel_device,
    tile_columns,
    triton_jit,
    use_kernel,
)

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs (CI): every call takes the torch path
    triton = tl = None

BACKEND_ENV = "BENCH_PERMUTE_BACKEND"
DEFAULT_BACKEND = "auto"
kernel_choice(BACKEND_ENV, DEFAULT_BACKEND, BACKENDS)
#: Rows a program moves, and its warps: 32 x 4 was within 5% of the fastest of (16-128 rows) x (4, 8 warps) in both
#: directions and both layouts of q (contiguous, and the projection's transposed one) on an H200 at Wan 1.3B.
BLOCK_ROWS, NUM_WARPS = 32, 4
#: (batch, head) pairs one launch takes: CUDA's limit on a grid's second axis.
MAX_GROUPS = 65535


@triton_jit
def _permute_rows(x_ptr, order_ptr, out_ptr, N, H, sxb, sxh, sxn, sob, soh, syb, syh, syn, INVERSE: tl.constexpr,
                  D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """Program (tile t, group g = b H + h): rows ``i`` in ``[t BLOCK, (t + 1) BLOCK)`` below N: ``out[b, h, i] =
    x[b, h, order[b, h, i]]``, or with INVERSE ``out[b, h, order[b, h, i]] = x[b, h, i]``; x strides (sxb, sxh,
    sxn, 1), order's (sob, soh, 1), out's (syb, syh, syn, 1)."""
    t, g = tl.program_id(0), tl.program_id(1)
    b, h = (g // H).to(tl.int64), (g % H).to(tl.int64)
    rows = t * BLOCK + tl.arange(0, BLOCK)
    present = rows < N
    moved = tl.load(order_ptr + b * sob + h * soh + rows, mask=present, other=0)
    rows = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = present[:, None] & (cols < D)[None, :]
    source, target = (rows, moved) if INVERSE else (moved, rows)
    x = tl.load(x_ptr + b * sxb + h * sxh + source[:, None] * sxn + cols[None, :], mask=mask)
    tl.store(out_ptr + b * syb + h * syh + target[:, None] * syn + cols[None, :], x, mask=mask)


def unsupported_reason(x: torch.Tensor) -> str | None:
    """Why the kernel cannot move ``x``'s rows (None when it can): Triton on CUDA, or CPU tensors under the
    interpreter; a ``(B, H, N, D)`` tensor with tokens, not needing gradients."""
    if triton is None:
        return "triton is not installed"
    if not on_kernel_device(x):
        return f"x is not on {KERNEL_DEVICE}"
    if x.dim() != 4 or x.numel() == 0:
        return f"x of shape {tuple(x.shape)} is not a non-empty (B, H, N, D)"
    if needs_gradients(x):
        return "x needs gradients (the kernel has no backward)"
    if x.shape[0] * x.shape[1] > MAX_GROUPS:
        return f"{x.shape[0] * x.shape[1]} (batch, head) pairs (the launch grid's second axis holds {MAX_GROUPS})"
    return None


def use_fused(x: torch.Tensor, backend: str | None = None) -> bool:
    """Whether this permutation runs the kernel: ``backend`` (default ``$BENCH_PERMUTE_BACKEND``, else auto)
    ``auto`` (when it can), ``torch`` (never) or ``triton`` (always; HarnessError when it cannot)."""
    return use_kernel(BACKEND_ENV, DEFAULT_BACKEND, backend, lambda: unsupported_reason(x), "the Triton permutation")


@kernel_op("permute_rows")
def permute_rows(x: torch.Tensor, order: torch.Tensor, inverse: bool) -> torch.Tensor:
    """``x[b, h, order[b, h, i]]`` at ``(b, h, i)`` (``inverse`` False) or ``x[b, h, i]`` at ``(b, h, order[b, h,
    i])`` (True), as one op (no gradients): x ``(B, H, N, D)``, order ``(B|1, H|1, N)`` int64. Returns a contiguous
    tensor of x's shape and dtype. The caller checks :func:`unsupported_reason` first (:func:`use_fused` does)."""
    x = last_axis_contiguous(x)
    batch, heads, tokens, dim = x.shape
    order = order.long().expand(batch, heads, tokens)  # int64 offsets: an int32 index times the stride could overflow
    if order.stride(-1) != 1:
        order = order.contiguous()
    out = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    _permute_rows[(triton.cdiv(tokens, BLOCK_ROWS), batch * heads)](
        x, order, out, tokens, heads, x.stride(0), x.stride(1), x.stride(2), order.stride(0), order.stride(1),
        out.stride(0), out.stride(1), out.stride(2), INVERSE=inverse, D=dim, BLOCK_D=tile_columns(dim),
        BLOCK=BLOCK_ROWS, num_warps=NUM_WARPS,
    )  # fmt: skip
    return out


@permute_rows.register_fake
def _fake_rows(x: torch.Tensor, order: torch.Tensor, inverse: bool) -> torch.Tensor:
    return torch.empty(x.shape, device=x.device, dtype=x.dtype)
