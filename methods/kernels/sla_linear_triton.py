"""SLA's marginal linear attention on CUDA: per-block key states in Triton, their selection as one GEMM, the
queries' products in Triton.

Computes what :func:`methods.sla.marginal_linear_attention` computes (the torch path, which stays the CPU path, the
training path and the reference): with blocks of ``b`` tokens, ``phi = softmax`` over the head dimension and, per
query block i, its marginal key blocks ``M_i`` (a 0/1 matrix ``W (nq, nk)`` per head),

    O_l[i] = phi(Q_i) H_i / (phi(Q_i) Z_i + eps),   H_i = sum_j W_ij h_j,   Z_i = sum_j W_ij z_j,
    h_j = phi(K_j)^T V_j  (D x D),   z_j = sum of phi(K_j)'s rows  (D)

(SLA, Zhang et al., arXiv 2509.24006, Eq. 5-6), in three steps:

1. :func:`_key_states`, one program per (chunk of key blocks, batch x head): each block's ``h_j`` (its features in
   fp32, the product on tensor cores in TF32, stored in bf16) and ``z_j`` (fp32).
2. ``H = W h`` and ``Z = W z`` per head as batched matrix products (cuBLAS, autocast off): ``(nq, nk) x (nk, D^2)``
   in bf16 (cuBLAS accumulates in fp32; ``torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction``, on by
   default, lets it reduce split-K partial sums in bf16), ``(nq, nk) x (nk, D)`` in fp32. Adding a block's state
   costs ``2 D^2`` FLOPs per (query block, key block) pair on tensor cores, where forming ``(phi(Q_i) phi(K_j)^T)
   V_j`` per pair costs ``4 b^2 D``, 2b^2/D = 64 times more at b = 64, D = 128: over all nk blocks the GEMM does a
   tenth of the work of the pairwise form over the 15% of pairs it needed at SLA's classes (the critical and skipped
   blocks, subtracted from all keys' sums), a 54th of that over the 85% marginal ones (at Wan 1.3B 103 GFLOP a call,
   at 14B 1.8 TFLOP; reports/gpu/h200/run_551d626/ timed the pairwise form).
3. :func:`_apply_states`, one program per (query block, batch x head): ``phi(Q_i) H_i`` (TF32) and ``phi(Q_i) .
   Z_i``, divided.

The torch path does the same algebra in fp32 without tensor cores, with ``phi(K)`` and both ``(nk, D, D)`` and
``(nq, D, D)`` states in fp32 (at Wan 1.3B 4.5 ms a call on an H200); here the states are bf16 (``(nk + nq) D^2``
x 2 bytes per batch x head: 400 MB at Wan 1.3B, 3.1 GB at 14B for batch 1, freed when the op returns) and no ``phi``
reaches memory.

Precision: q, k, v fp16 or bf16; the features and every sum in fp32; the states rounded to bf16 (fp32's range: a
block state reaches 64 max|v| and a sum over 1,000 blocks more, past fp16's 65,504), the products with them fp32
(bf16 x bf16 accumulated in fp32, then TF32). The output is fp32, as the torch path's.

Shapes: q, k, v ``(B, H, N, D)`` with a contiguous last axis, ``D <= 128``; ``b`` a power of two >= 16 (SLA's 64;
smaller blocks, as the toy's 8, take the torch path); the marginal blocks ``(B|1, H|1, nq, nk)`` bool.
"""

from __future__ import annotations

from typing import Any

import torch

from methods.kernels import (
    BACKENDS,
    INTERPRETED,
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
from methods.kernels.block_sparse import num_blocks
from methods.kernels.tuned_launch import launch_tuned

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs (CI): every call takes the torch path
    triton = tl = None

BACKEND_ENV = "BENCH_SLA_BACKEND"
DEFAULT_BACKEND = "auto"
kernel_choice(BACKEND_ENV, DEFAULT_BACKEND, BACKENDS)
BACKEND_NOTE = (f"the linear branch, projection and sum in Triton on CUDA (fp16/bf16, no gradient, blocks a power of "
                f"two >= 16) where they can run, training on the torch path; {BACKEND_ENV}=torch forces the torch "
                f"path")  # fmt: skip
MAX_HEAD_DIM = 128
MIN_BLOCK = 16  # tl.dot's smallest dimension
# Key blocks per program of the key states (at Wan 1.3B 32 chunks x 12 heads).
CHUNK_BLOCKS = 16
# (num_warps, num_stages) of the per-query-block kernel (no loop: one stage); the autotuner keeps the faster per
# (b, D, PROJECT). Compiled for sm_90, none spills (224 and 127 registers; 245 and 197 with the projection).
CONFIGS = ((4, 1), (8, 1))
INTERPRETER_CONFIGS = ((4, 1),)


def _tuned(fn: Any) -> Any:
    """``triton.autotune`` over :data:`CONFIGS` around ``triton.jit``; without Triton the plain function."""
    if triton is None:
        return fn
    chosen = INTERPRETER_CONFIGS if INTERPRETED else CONFIGS
    configs = [triton.Config({}, num_warps=warps, num_stages=stages) for warps, stages in chosen]
    return triton.autotune(configs=configs, key=["BLOCK", "BLOCK_D", "PROJECT"])(triton.jit(fn))


# -- kernels --------------------------------------------------------------------------------------


@triton_jit
def _features_t(ptr, keys, cols, N, D: tl.constexpr, stride):
    """``phi`` of the rows ``keys`` of one head, transposed: ``(BLOCK_D, len(keys))`` fp32, softmax over the D
    columns (loaded transposed by their addresses: no ``tl.trans`` of a loaded dot operand, which miscompiled on
    sm_90 in :mod:`methods.kernels.linear_attention_triton`); zero for keys past N."""
    present = keys < N
    x = tl.load(ptr + keys.to(tl.int64)[None, :] * stride + cols[:, None],
                mask=(cols < D)[:, None] & present[None, :], other=0.0).to(tl.float32)  # fmt: skip
    x = tl.where((cols < D)[:, None], x * 1.4426950408889634, float("-inf"))  # log2(e): base-2 exponentials
    e = tl.exp2(x - tl.max(x, axis=0)[None, :])
    return tl.where(present[None, :], e / tl.sum(e, axis=0)[None, :], 0.0)


@triton_jit
def _head_offsets(bh, H, sb, sh):
    """Where batch x head ``bh`` starts in a tensor with batch stride ``sb`` and head stride ``sh``."""
    return (bh // H).to(tl.int64) * sb + (bh % H).to(tl.int64) * sh


@triton_jit
def _key_states(k_ptr, v_ptr, h_ptr, z_ptr, H, N, NB, skb, skh, skn, svb, svh, svn, D: tl.constexpr,
                BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK_BLOCKS: tl.constexpr):  # fmt: skip
    """Program (chunk c, b * H + h): for each key block j of the chunk (blocks ``[c CHUNK_BLOCKS, (c + 1)
    CHUNK_BLOCKS)``, those < NB), ``h[bh, j] = phi(K_j)^T V_j`` ``(BLOCK_D, BLOCK_D)`` in h's dtype (bf16) and
    ``z[bh, j] = sum phi(K_j)`` ``(BLOCK_D,)`` fp32 (zero past D)."""
    chunk, bh = tl.program_id(0), tl.program_id(1)
    k_base = k_ptr + _head_offsets(bh, H, skb, skh)
    v_base = v_ptr + _head_offsets(bh, H, svb, svh)
    cols = tl.arange(0, BLOCK_D)
    for block in range(chunk * CHUNK_BLOCKS, tl.minimum(chunk * CHUNK_BLOCKS + CHUNK_BLOCKS, NB)):
        keys = block * BLOCK + tl.arange(0, BLOCK)
        phi_kt = _features_t(k_base, keys, cols, N, D, skn)
        values = tl.load(v_base + keys.to(tl.int64)[:, None] * svn + cols[None, :],
                         mask=(keys < N)[:, None] & (cols < D)[None, :], other=0.0)  # fmt: skip
        state = tl.dot(phi_kt, values.to(tl.float32))
        out = bh.to(tl.int64) * NB + block
        tl.store(h_ptr + out * BLOCK_D * BLOCK_D + cols[:, None] * BLOCK_D + cols[None, :],
                 state.to(h_ptr.dtype.element_ty))  # fmt: skip
        tl.store(z_ptr + out * BLOCK_D + cols, tl.sum(phi_kt, axis=1))


@_tuned
def _apply_states(q_ptr, h_ptr, z_ptr, s_ptr, w_ptr, b_ptr, out_ptr, H, N, NQ, eps, sqb, sqh, sqn, ssb, ssh, ssn,
                  D: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, PROJECT: tl.constexpr):  # fmt: skip
    """Program (query block i, b * H + h): ``O_l`` of the block's rows from its summed states ``h (BH, NQ, BLOCK_D,
    BLOCK_D)`` (bf16) and ``z (BH, NQ, BLOCK_D)`` fp32, into ``out (B, H, N, D)`` contiguous: ``O_l`` itself (fp32),
    or with PROJECT SLA's output ``s + O_l w^T + b`` in out's dtype, from the sparse branch's output ``s (B, H, N, D)``
    and the projection's weight ``w (D, D)`` (contiguous) and bias ``b (D,)``."""
    block, bh = tl.program_id(0), tl.program_id(1)
    rows = block * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, BLOCK_D)
    inside = cols < D
    present = (rows < N)[:, None] & inside[None, :]
    x = tl.load(q_ptr + _head_offsets(bh, H, sqb, sqh) + rows.to(tl.int64)[:, None] * sqn + cols[None, :],
                mask=present, other=0.0).to(tl.float32)  # fmt: skip
    x = tl.where(inside[None, :], x * 1.4426950408889634, float("-inf"))
    e = tl.exp2(x - tl.max(x, axis=1)[:, None])
    phi_q = e / tl.sum(e, axis=1)[:, None]
    at = bh.to(tl.int64) * NQ + block
    state = tl.load(h_ptr + at * BLOCK_D * BLOCK_D + cols[:, None] * BLOCK_D + cols[None, :]).to(tl.float32)
    numerator = tl.dot(phi_q, state)
    denominator = tl.sum(phi_q * tl.load(z_ptr + at * BLOCK_D + cols)[None, :], axis=1)
    out = numerator / (denominator + eps)[:, None]
    if PROJECT:  # w^T loaded transposed by its addresses (input features down, output features across)
        weight_t = tl.load(w_ptr + cols[None, :] * D + cols[:, None], mask=inside[:, None] & inside[None, :],
                           other=0.0).to(tl.float32)  # fmt: skip
        out = tl.dot(out, weight_t) + tl.load(b_ptr + cols, mask=inside, other=0.0).to(tl.float32)[None, :]
        out += tl.load(s_ptr + _head_offsets(bh, H, ssb, ssh) + rows.to(tl.int64)[:, None] * ssn + cols[None, :],
                       mask=present, other=0.0).to(tl.float32)  # fmt: skip
    tl.store(out_ptr + bh.to(tl.int64) * N * D + rows.to(tl.int64)[:, None] * D + cols[None, :],
             out.to(out_ptr.dtype.element_ty), mask=present)  # fmt: skip


#: The autotuned kernel (its ``best_config`` is what the GPU script records).
TUNER = _apply_states


# -- dispatch -------------------------------------------------------------------------------------


def unsupported_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int,
                       *parameters: torch.Tensor) -> str | None:  # fmt: skip
    """Why the kernel cannot compute this call (None when it can): CUDA (CPU tensors under the interpreter), fp16 or
    bf16 (fp16 only in the interpreter, which multiplies bf16 operands as raw integers), no gradient asked of q, k, v
    or of ``parameters`` (the projection's, when it is fused), head dim <= 128, blocks a power of two >= 16."""
    if triton is None:
        return "triton is not installed"
    if block < MIN_BLOCK or block & (block - 1):
        return f"block {block} is not a power of two >= {MIN_BLOCK}"
    if not on_kernel_device(q, k, v):
        return f"inputs are not all on {KERNEL_DEVICE}"
    dtypes = (torch.float16,) if INTERPRETED else (torch.float16, torch.bfloat16)
    if len({q.dtype, k.dtype, v.dtype}) != 1 or q.dtype not in dtypes:
        return f"inputs are {q.dtype}/{k.dtype}/{v.dtype}: the kernel takes {' or '.join(map(str, dtypes))}"
    if needs_gradients(q, k, v, *parameters):
        return "gradients are asked for: the kernel has no backward (training takes the torch path)"
    if q.dim() != 4 or q.shape != k.shape or k.shape != v.shape:
        return f"shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} are not all (B, H, N, D)"
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head_dim {q.shape[-1]} > {MAX_HEAD_DIM}"
    return None


def use_fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int, *parameters: torch.Tensor,
              backend: str | None = None) -> bool:  # fmt: skip
    """Whether this call runs the kernel: ``backend`` (default ``$BENCH_SLA_BACKEND``, else ``auto``) ``auto``
    (when it can), ``torch`` (never) or ``triton`` (always; HarnessError when it cannot)."""
    return use_kernel(BACKEND_ENV, DEFAULT_BACKEND, backend, lambda: unsupported_reason(q, k, v, block, *parameters),
                      "the SLA linear-branch kernel")  # fmt: skip


def key_states(k: torch.Tensor, v: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each key block's state ``h_j = phi(K_j)^T V_j`` ``(B H, nk, BLOCK_D^2)`` bf16 and ``z_j = sum phi(K_j)``
    ``(B H, nk, BLOCK_D)`` fp32 (zero past D)."""
    k, v = last_axis_contiguous(k), last_axis_contiguous(v)
    batch, heads, tokens, dim = k.shape
    block_d, blocks = tile_columns(dim), num_blocks(tokens, block)
    states = torch.empty(batch * heads, blocks, block_d * block_d, device=k.device, dtype=torch.bfloat16)
    sums = torch.empty(batch * heads, blocks, block_d, device=k.device, dtype=torch.float32)
    # 8 warps: with 4 a program takes 254 registers on sm_90 (ptxas).
    _key_states[(triton.cdiv(blocks, CHUNK_BLOCKS), batch * heads)](
        k, v, states, sums, heads, tokens, blocks, *k.stride()[:3], *v.stride()[:3], D=dim, BLOCK=block,
        BLOCK_D=block_d, CHUNK_BLOCKS=CHUNK_BLOCKS, num_warps=8)  # fmt: skip
    return states, sums


@kernel_op("sla_marginal_linear")
def marginal_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, marginal: torch.Tensor, block: int,
                              eps: float, sparse: torch.Tensor | None = None, weight: torch.Tensor | None = None,
                              bias: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """SLA's linear branch ``O_l`` ``(B, H, N, D)`` fp32 (see the module docstring) from q, k, v ``(B, H, N, D)`` and
    the marginal key blocks of each query block, ``(B|1, H|1, nq, nk)`` bool; given the sparse branch's output
    ``sparse (B, H, N, D)`` and the projection's ``weight (D, D)`` and ``bias (D,)``, SLA's output ``sparse + O_l
    weight^T + bias`` in v's dtype instead, formed in the last kernel's registers (no fp32 ``O_l`` in memory). One op,
    opaque to torch.compile; inference only (no autograd is registered). The caller checks
    :func:`unsupported_reason` first (:func:`use_fused` does).

    Raises:
        ValueError: ``sparse``, ``weight`` and ``bias`` not all given or all left out.
    """
    project = sparse is not None
    if project != (weight is not None) or project != (bias is not None):
        raise ValueError("sla's fused output needs the sparse output, the projection's weight and its bias together")
    q, k, v = (last_axis_contiguous(x) for x in (q, k, v))
    batch, heads, tokens, dim = q.shape
    blocks = num_blocks(tokens, block)
    weights = marginal.expand(batch, heads, blocks, blocks).reshape(batch * heads, blocks, blocks)
    states, sums = key_states(k, v, block)
    with torch.autocast(q.device.type, enabled=False):  # fp16 autocast would overflow the sums, bf16 round Z's
        summed_states = torch.bmm(weights.to(torch.bfloat16), states)  # (B H, nq, BLOCK_D^2), bf16
        summed_sums = torch.bmm(weights.to(torch.float32), sums)
    out = torch.empty(batch, heads, tokens, dim, device=q.device, dtype=v.dtype if project else torch.float32)
    if project:
        sparse, weight = last_axis_contiguous(sparse), weight.contiguous()
    else:  # not read
        sparse = weight = bias = out
    launch_tuned(_apply_states, (blocks, batch * heads), q, summed_states, summed_sums, sparse, weight, bias, out,
                 heads, tokens, blocks, eps, *q.stride()[:3], *sparse.stride()[:3], D=dim, BLOCK=block,
                 BLOCK_D=tile_columns(dim), PROJECT=project)  # fmt: skip
    return out


@marginal_linear_attention.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, marginal: torch.Tensor, block: int, eps: float,
      sparse: torch.Tensor | None = None, weight: torch.Tensor | None = None,
      bias: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    return q.new_empty(q.shape, dtype=v.dtype if sparse is not None else torch.float32)
