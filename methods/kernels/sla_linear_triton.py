"""SLA's marginal linear attention on CUDA in Triton: no ``(nq, D, D)`` state per query block reaches memory.

Computes what :func:`methods.sla.marginal_linear_attention` computes (the torch path, which stays the CPU path, the
training path and the reference): with blocks of ``b`` tokens, ``phi = softmax`` over the head dimension and, per
query block i, its marginal key blocks ``M_i``,

    O_l[i] = phi(Q_i) H_i / (phi(Q_i) Z_i + eps),   H_i = sum_{j in M_i} phi(K_j)^T V_j,   Z_i = sum_{j in M_i} phi(K_j)

(SLA, Zhang et al., arXiv 2509.24006, Eq. 5-6). The torch path forms every ``H_i`` (at Wan 1.3B 480p, 512 query
blocks x 12 heads of 128 x 128 fp32: 400 MB, and 103 GFLOP of fp32 einsum per call). Here one program per (query
block, batch x head) never forms it: ``phi(Q_i) phi(K_j)^T V_j = (phi(Q_i) phi(K_j)^T) V_j``, a ``(b, b)`` product
of features on tensor cores and then one with the values, the same two products as one tile of softmax attention,
summed over a list of key blocks given per query block. Two modes (:func:`marginal_linear_attention`):

- ``direct``: the list is ``M_i`` itself.
- ``complement``: the list is the other blocks (critical and skipped), subtracted from the sums over all keys,
  ``H = phi(K)^T V`` and ``Z = sum phi(K)`` per head (:func:`_key_sums`, one pass over k and v):
  ``phi(Q_i) H_i = phi(Q_i) H - sum_{j not in M_i} (phi(Q_i) phi(K_j)^T) V_j``. At SLA's settings (5% critical,
  10% skipped) it lists 15% of the key blocks where ``direct`` lists 85%.

The caller lists whichever is shorter, so a subtraction never cancels more than half of the sums' blocks.

Precision: q, k, v fp16 or bf16; the features in fp32 (base-2 exponentials), rounded to fp16 for their product
(they lie in [0, 1], where fp16 keeps 11 bits to bf16's 8), the ``(b, b)`` products rounded to v's dtype for the
product with V (as FlashAttention rounds P), every sum in fp32; ``phi(Q_i) H`` and ``phi(K)^T V`` are fp32
products (TF32 on tensor cores). The output is fp32, as the torch path's.

Shapes: q, k, v ``(B, H, N, D)`` with a contiguous last axis, ``D <= 128``; ``b`` a power of two >= 16 (SLA's 64;
smaller blocks, as the toy's 8, take the torch path); lists ``(B, H, nq, L)`` int32 key-block indices.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from methods.kernels import BACKENDS, kernel_choice, kernel_op, use_kernel
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
BACKEND_NOTE = (f"sla linear branch: the Triton kernel on CUDA (fp16/bf16, no gradient, blocks of 16 tokens or "
                f"more) where it can run; {BACKEND_ENV}=torch forces the torch path")  # fmt: skip
MAX_HEAD_DIM = 128
MIN_BLOCK = 16  # tl.dot's smallest dimension
MODES: tuple[str, ...] = ("direct", "complement")
# The Triton interpreter (TRITON_INTERPRET=1, CPU tensors): tests run the kernels there.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# Tokens per program of the key sums: partial sums of CHUNK keys each, added in torch (at Wan 1.3B 16 chunks x 12
# heads of 64 KB).
CHUNK = 2048
# (num_warps, num_stages) of the per-query-block kernel; the autotuner keeps the fastest per (b, D, mode).
CONFIGS = ((4, 2), (4, 3), (8, 2), (8, 3))
INTERPRETER_CONFIGS = ((4, 1),)


def _jit(fn: Any) -> Any:
    return fn if triton is None else triton.jit(fn)


def _tuned(fn: Any) -> Any:
    """``triton.autotune`` over :data:`CONFIGS` around ``triton.jit``; without Triton the plain function."""
    if triton is None:
        return fn
    chosen = INTERPRETER_CONFIGS if INTERPRETED else CONFIGS
    configs = [triton.Config({}, num_warps=warps, num_stages=stages) for warps, stages in chosen]
    return triton.autotune(configs=configs, key=["BLOCK", "BLOCK_D", "COMPLEMENT"])(triton.jit(fn))


# -- kernels --------------------------------------------------------------------------------------


@_jit
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


@_jit
def _head_offsets(bh, H, sb, sh):
    """Where batch x head ``bh`` starts in a tensor with batch stride ``sb`` and head stride ``sh``."""
    return (bh // H).to(tl.int64) * sb + (bh % H).to(tl.int64) * sh


@_jit
def _key_sums(k_ptr, v_ptr, h_ptr, z_ptr, phi_ptr, H, N, NP, skb, skh, skn, svb, svh, svn, D: tl.constexpr,
              BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK_TOKENS: tl.constexpr):  # fmt: skip
    """Program (chunk c, b * H + h): ``h[c, bh] = phi(K_c)^T V_c`` ``(BLOCK_D, BLOCK_D)`` and ``z[c, bh] = sum
    phi(K_c)`` ``(BLOCK_D,)`` fp32 over the chunk's keys ``[c CHUNK_TOKENS, (c + 1) CHUNK_TOKENS)``, and the
    features themselves, transposed, into ``phi (B H, BLOCK_D, NP)`` fp16 (keys past N and columns past D zero;
    keys past NP not stored)."""
    chunk, bh = tl.program_id(0), tl.program_id(1)
    k_base = k_ptr + _head_offsets(bh, H, skb, skh)
    v_base = v_ptr + _head_offsets(bh, H, svb, svh)
    cols = tl.arange(0, BLOCK_D)
    state = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
    sums = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for start in range(chunk * CHUNK_TOKENS, chunk * CHUNK_TOKENS + CHUNK_TOKENS, BLOCK):
        keys = start + tl.arange(0, BLOCK)
        phi_kt = _features_t(k_base, keys, cols, N, D, skn)
        tl.store(phi_ptr + bh.to(tl.int64) * BLOCK_D * NP + cols[:, None] * NP + keys[None, :], phi_kt.to(tl.float16),
                 mask=(keys < NP)[None, :])  # fmt: skip
        values = tl.load(v_base + keys.to(tl.int64)[:, None] * svn + cols[None, :],
                         mask=(keys < N)[:, None] & (cols < D)[None, :], other=0.0)  # fmt: skip
        state = tl.dot(phi_kt, values.to(tl.float32), state)
        sums += tl.sum(phi_kt, axis=1)
    out = (chunk * tl.num_programs(1) + bh).to(tl.int64)
    tl.store(h_ptr + out * BLOCK_D * BLOCK_D + cols[:, None] * BLOCK_D + cols[None, :], state)
    tl.store(z_ptr + out * BLOCK_D + cols, sums)


@_tuned
def _marginal_linear(q_ptr, phi_ptr, v_ptr, h_ptr, z_ptr, lists_ptr, out_ptr, H, N, NP, NQ, L, eps, sqb, sqh, sqn,
                     svb, svh, svn, D: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
                     COMPLEMENT: tl.constexpr):  # fmt: skip
    """Program (query block i, b * H + h): ``O_l`` of the block's rows into ``out (B, H, N, D)`` fp32 contiguous,
    from the key blocks ``lists[bh, i, :L]`` through their features ``phi (BH, BLOCK_D, NP)`` (:func:`_key_sums`)
    (summed, or with COMPLEMENT subtracted from the sums over all keys ``h (BH, BLOCK_D, BLOCK_D)`` and ``z (BH,
    BLOCK_D)``)."""
    block, bh = tl.program_id(0), tl.program_id(1)
    rows = block * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, BLOCK_D)
    inside = cols < D
    x = tl.load(q_ptr + _head_offsets(bh, H, sqb, sqh) + rows.to(tl.int64)[:, None] * sqn + cols[None, :],
                mask=(rows < N)[:, None] & inside[None, :], other=0.0).to(tl.float32)  # fmt: skip
    x = tl.where(inside[None, :], x * 1.4426950408889634, float("-inf"))
    e = tl.exp2(x - tl.max(x, axis=1)[:, None])
    phi_q = e / tl.sum(e, axis=1)[:, None]
    phi_q16 = phi_q.to(tl.float16)
    phi_base = phi_ptr + bh.to(tl.int64) * BLOCK_D * NP + cols[:, None] * NP
    v_base = v_ptr + _head_offsets(bh, H, svb, svh)
    if COMPLEMENT:  # start from the sums over all keys, and subtract: phi_q in fp32 dies here
        state = tl.load(h_ptr + bh.to(tl.int64) * BLOCK_D * BLOCK_D + cols[:, None] * BLOCK_D + cols[None, :])
        numerator = tl.dot(phi_q, state)
        denominator = tl.sum(phi_q * tl.load(z_ptr + bh.to(tl.int64) * BLOCK_D + cols)[None, :], axis=1)
        sign = -1.0
    else:
        numerator = tl.zeros((BLOCK, BLOCK_D), dtype=tl.float32)
        denominator = tl.zeros((BLOCK,), dtype=tl.float32)
        sign = 1.0
    listed = lists_ptr + (bh.to(tl.int64) * NQ + block) * L
    for entry in range(L):
        keys = tl.load(listed + entry) * BLOCK + tl.arange(0, BLOCK)
        scores = tl.dot(phi_q16, tl.load(phi_base + keys[None, :])) * sign  # (BLOCK, BLOCK) fp32
        denominator += tl.sum(scores, axis=1)
        values = tl.load(v_base + keys.to(tl.int64)[:, None] * svn + cols[None, :],
                         mask=(keys < N)[:, None] & inside[None, :], other=0.0)  # fmt: skip
        numerator = tl.dot(scores.to(values.dtype), values, numerator)
    out = numerator / (denominator + eps)[:, None]
    tl.store(out_ptr + bh.to(tl.int64) * N * D + rows.to(tl.int64)[:, None] * D + cols[None, :], out,
             mask=(rows < N)[:, None] & inside[None, :])  # fmt: skip


#: The autotuned kernel (its ``best_config`` is what the GPU script records).
TUNER = _marginal_linear


# -- dispatch -------------------------------------------------------------------------------------


def unsupported_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int) -> str | None:
    """Why the kernel cannot compute this call (None when it can): CUDA (CPU tensors under the interpreter), fp16 or
    bf16 (fp16 only in the interpreter, which multiplies bf16 operands as raw integers), no gradient asked, head dim
    <= 128, blocks a power of two >= 16."""
    if triton is None:
        return "triton is not installed"
    device_type = "cpu" if INTERPRETED else "cuda"
    if {x.device.type for x in (q, k, v)} != {device_type}:
        return f"inputs are not all on {device_type}"
    dtypes = (torch.float16,) if INTERPRETED else (torch.float16, torch.bfloat16)
    if len({q.dtype, k.dtype, v.dtype}) != 1 or q.dtype not in dtypes:
        return f"inputs are {q.dtype}/{k.dtype}/{v.dtype}: the kernel takes {' or '.join(map(str, dtypes))}"
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        return "gradients are asked for: the kernel has no backward (training takes the torch path)"
    if q.dim() != 4 or q.shape != k.shape or k.shape != v.shape:
        return f"shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} are not all (B, H, N, D)"
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head_dim {q.shape[-1]} > {MAX_HEAD_DIM}"
    if block < MIN_BLOCK or block & (block - 1):
        return f"block {block} is not a power of two >= {MIN_BLOCK}"
    return None


def use_fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int, backend: str | None = None) -> bool:
    """Whether this call runs the kernel: ``backend`` (default ``$BENCH_SLA_BACKEND``, else ``auto``) ``auto``
    (when it can), ``torch`` (never) or ``triton`` (always; HarnessError when it cannot)."""
    return use_kernel(BACKEND_ENV, DEFAULT_BACKEND, backend, lambda: unsupported_reason(q, k, v, block),
                      "the SLA linear-branch kernel")  # fmt: skip


def _block_d(head_dim: int) -> int:
    """Columns of a tile: the head dimension rounded up to a power of two, at least 16 (tl.dot's minimum)."""
    return max(16, 1 << (head_dim - 1).bit_length())


def _contiguous_last(*xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(x if x.stride(-1) == 1 else x.contiguous() for x in xs)


def key_sums(k: torch.Tensor, v: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Over every key of each head: ``H = phi(K)^T V`` ``(B H, BLOCK_D, BLOCK_D)`` and ``Z = sum phi(K)`` ``(B H,
    BLOCK_D)`` fp32 (zero past D), by :data:`CHUNK`-token partial sums added in torch, and the features
    ``phi(K)^T`` ``(B H, BLOCK_D, NP)`` fp16, ``NP = nb b`` (zero past N and D), which the per-query-block kernel
    reads instead of computing each key block's softmax once per query block that lists it."""
    k, v = _contiguous_last(k, v)
    batch, heads, tokens, dim = k.shape
    block_d = _block_d(dim)
    padded = num_blocks(tokens, block) * block
    chunk = max(block, min(CHUNK, triton.next_power_of_2(tokens)))
    chunks = triton.cdiv(tokens, chunk)
    state = torch.empty(chunks, batch * heads, block_d, block_d, device=k.device, dtype=torch.float32)
    sums = torch.empty(chunks, batch * heads, block_d, device=k.device, dtype=torch.float32)
    features = torch.empty(batch * heads, block_d, padded, device=k.device, dtype=torch.float16)
    # 8 warps: with 4 a program takes 254 registers on sm_90 (ptxas).
    _key_sums[(chunks, batch * heads)](k, v, state, sums, features, heads, tokens, padded, *k.stride()[:3],
                                       *v.stride()[:3], D=dim, BLOCK=block, BLOCK_D=block_d, CHUNK_TOKENS=chunk,
                                       num_warps=8)  # fmt: skip
    return state.sum(dim=0), sums.sum(dim=0), features


@kernel_op("sla_marginal_linear")
def marginal_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lists: torch.Tensor, block: int,
                              complement: bool, eps: float) -> torch.Tensor:  # fmt: skip
    """SLA's linear branch ``(B, H, N, D)`` fp32 (see the module docstring) from q, k, v ``(B, H, N, D)`` and the key
    blocks listed per query block, ``lists (B, H, nq, L)`` int32: their sums (``complement`` False: the marginal
    blocks) or the sums over all keys less theirs (``complement`` True: the critical and skipped blocks). One op,
    opaque to torch.compile; inference only (no autograd is registered). The caller checks
    :func:`unsupported_reason` first (:func:`use_fused` does)."""
    q, k, v = _contiguous_last(q, k, v)
    batch, heads, tokens, dim = q.shape
    blocks, listed = num_blocks(tokens, block), lists.shape[-1]
    lists = lists.to(torch.int32).expand(batch, heads, blocks, listed).contiguous()
    state, sums, features = key_sums(k, v, block)  # the sums are read only by the complement mode
    out = torch.empty(batch, heads, tokens, dim, device=q.device, dtype=torch.float32)
    launch_tuned(_marginal_linear, (blocks, batch * heads), q, features, v, state, sums, lists, out, heads, tokens,
                 features.shape[-1], blocks, listed, eps, *q.stride()[:3], *v.stride()[:3], D=dim, BLOCK=block,
                 BLOCK_D=_block_d(dim), COMPLEMENT=complement)  # fmt: skip
    return out


@marginal_linear_attention.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lists: torch.Tensor, block: int, complement: bool,
      eps: float) -> torch.Tensor:  # fmt: skip
    return q.new_empty(q.shape, dtype=torch.float32)
