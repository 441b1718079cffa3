"""XAttention's antidiagonal block scoring on CUDA in Triton, without materialising the reduced scores.

Computes what :func:`methods.xattn.antidiagonal_block_scores_torch` computes (the torch path, which stays the
CPU path and the reference): with stride S and ``R = block / S`` reduced rows per block, reduced query row i is
``[q_{S i + S - 1}, q_{S i + S - 2}, ..., q_{S i}]`` and reduced key row j ``[k_{S j}, k_{S j + 1}, ...,
k_{S j + S - 1}]`` (zero rows past N), their score ``s_ij = <rq_i, rk_j> / (sqrt(D) S)``, the softmax over the
reduced keys with ``S j < N`` (a reduced key made only of padding takes no mass), rows with ``S i >= N`` set to
0, and the mass ``masses[b, h, qb, kb] = sum of p_ij over i in query block qb, j in key block kb``.

Two variants compute the same masses (:data:`VARIANTS`, chosen by :func:`block_masses`):

``two_pass``, :func:`_block_masses`: one program per (tile of BLOCK_M reduced query rows = BLOCK_M / R query
blocks, batch x head), two passes over the reduced keys in tiles of BLOCK_N (= BLOCK_N / R key blocks):

1. the scores of each tile, an online row max and row sum (fp32, base-2 exponentials);
2. the scores again, normalised by the pass-1 statistics, summed per key block over the tile's R keys and per
   query block over its R rows: a ``(BLOCK_M / R, BLOCK_N / R)`` tile of masses, stored; no atomics, so the
   result is the same on every run.

``single_pass``: each score tile computed once, in two launches; ``single_pass_tma`` the same with q and k read
through tensor descriptors (per head ``(N / S, S, D)`` views, copied by Hopper's tensor memory accelerator) where N
is a multiple of S and the strides allow it (:func:`_tma_ready`), by pointers elsewhere. The default.

1. :func:`_block_partials`, the same programs and tiles as pass 1: per tile the running row max ``m_i`` and
   sum, and per (reduced row i, key block kb of the tile) the partial ``P_i,kb = sum_{j in kb} exp2(s_ij -
   m_i)`` against the running max at that tile, stored with that max; at the end each row's final max and its
   weight ``1 / l_i`` (0 for rows with ``S i >= N``). Rescaling the stored partials whenever a later tile
   raises the max would rewrite every earlier tile (quadratic traffic), and keeping all NB partials of a row in
   registers does not fit at Wan's 256 key blocks, so each partial keeps the max it was taken against.
2. :func:`_combine_partials`, one program per (query block, BLOCK_K key blocks, batch x head): ``masses[qb, kb]
   = sum_{i in qb} P_i,kb exp2(m_i,kb - m_i) / l_i``, summed over the block's R rows in registers (no atomics).

The partials and the maxima they were taken against are ``(B H, nb, nb R)`` fp32 each, key-block major (a
tile's store is BLOCK_M consecutive rows per key block); the max is kept per key block, not per key tile, so the
second launch does not depend on the BLOCK_N the autotuner chose. At Wan 1.3B (12 heads, nb = 256, R = 16)
that is 48 MiB each, 96 MiB in all plus 2 x 192 KiB of row statistics, freed when the op returns; the second
launch reads them once: about 50 microseconds of HBM traffic on an H200, 1% of the scoring's 5 ms.

The reduced rows are never formed: ``s = sum_m Q_m K_m^T`` over the S offsets m, where ``Q_m`` holds tokens
``S i + S - 1 - m`` and ``K_m`` tokens ``S j + m``; each is a strided load of whole token rows (pointer
arithmetic, masked to zeros past N as the torch path's padding; or, in ``single_pass_tma``, a block of a tensor
descriptor over the ``(N / S, S, D)`` view, zero-filled past it), so no ``(N / S, S D)`` copy of q or k reaches
memory and any (B, H, N, D) strides with a contiguous last axis are read in place. By pointers ``K_m`` is loaded
transposed by its addresses (no ``tl.trans``: see :mod:`methods.kernels.linear_attention_triton` on sm_90); a
descriptor loads rows, which are transposed for the product, a tile used transposed only, and every configuration
of that variant passed its float64 check on an H200 (reports/gpu/h200/run_81d2574/xattn/).

Cost: one reduced QK^T is ``2 N^2 D / S`` FLOPs per head, i.e. ``1 / (2 S)`` of a dense attention call's
``4 N^2 D``: the two-pass kernel computes it twice (``1 / S`` of a dense call, 12.5% at S = 8, at equal
efficiency), the single-pass one once (6.25% at S = 8) plus ``N^2 / S^2`` exponentials, the same count as one
of the two-pass kernel's passes. Memory: the two-pass kernel the masses only, the single-pass one the partials
above.

Each variant's launches are one ``torch.library`` custom op, :func:`xattn_block_masses` and
:func:`xattn_block_masses_single_pass` (``attention_bench::``, inference only), so torch.compile sees one opaque
call with a fake output of the masses' shape and never traces the autotuner.

Shapes: q, k ``(B, H, N, D)`` fp16 or bf16, ``D <= 128`` (any larger head falls back to torch), ``block / S`` a
power of two; masses ``(B, H, nb, nb)`` float32, ``nb = ceil(N / block)``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from methods.kernels import (
    BACKENDS,
    INTERPRETED,
    KERNEL_DEVICE,
    descriptor_aligned,
    env_choice,
    kernel_choice,
    kernel_op,
    last_axis_contiguous,
    on_kernel_device,
    tile_columns,
    triton_jit,
    use_descriptor_scratch,
    use_kernel,
)
from methods.kernels.block_sparse import num_blocks
from methods.kernels.tuned_launch import launch_tuned

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs (CI): every call takes the torch path
    triton = tl = None

BACKEND_ENV = "BENCH_XATTN_BACKEND"
# auto since the kernel passed sparse_gpu's check on an H200 (every configuration, fp16 and bf16, relative error
# <= 9.3e-8; scoring 5.24 ms against torch's 10.15 ms at Wan 1.3B: reports/gpu/h200/README.md, run_25aee45).
DEFAULT_BACKEND = "auto"
VARIANT_ENV = "BENCH_XATTN_VARIANT"
VARIANTS: tuple[str, ...] = ("two_pass", "single_pass", "single_pass_tma")
# single_pass_tma since it passed sparse_gpu's check on an H200 (every configuration, fp16 and bf16, relative error
# <= 1e-7, the same blocks kept as float64's) and scored in 0.991 ms against the pointer loads' 1.154 ms at Wan 1.3B,
# 16.1 against 18.7 ms at 14B, in the same run (reports/gpu/h200/run_81d2574/xattn/); where N is not a multiple of
# the stride it reads by pointers, as single_pass does.
DEFAULT_VARIANT = "single_pass_tma"
kernel_choice(BACKEND_ENV, DEFAULT_BACKEND, BACKENDS)
kernel_choice(VARIANT_ENV, DEFAULT_VARIANT, VARIANTS)
BACKEND_NOTE = (f"xattn scoring: the fused Triton kernel on CUDA (fp16/bf16) where it can run; {BACKEND_ENV}=torch "
                f"forces the torch path; {VARIANT_ENV}={'|'.join(VARIANTS)} picks the kernel (default "
                f"{DEFAULT_VARIANT}: each tile scored once, q and k read by the copy engine)")  # fmt: skip
MAX_HEAD_DIM = 128
# Relative error (norm) of the kernel's masses against the torch path on the same fp16/bf16 values in float64:
# products of 8- or 11-bit mantissas are exact in fp32, the sums over S D terms and over the reduced keys are
# fp32 (~1e-7 relative each; 5e-8 to 1e-7 seen in the interpreter), the exponentials base-2 (on the GPU
# ex2.approx, 2^-22 relative). The reference's own softmax is fp32. 1e-5 leaves a 100x margin.
MASS_TOLERANCE = 1e-5
LOG2_E = 1.4426950408889634
# (BLOCK_M reduced query rows, BLOCK_N reduced keys, num_warps, num_stages); the autotuner keeps the fastest
# (tiles smaller than one block, R = block / S, are pruned). Not yet run on a GPU: at Wan's block 128 and S = 8
# (R = 16) every score tile is a loop of S = 8 products of K = 128, whose loads (a (BLOCK_M, D) and a (D, BLOCK_N)
# tile per slice) the pipeliner buffers num_stages deep: 128 x 64 tiles at 3 stages hold 144 KiB of bf16.
CONFIGS = ((64, 64, 4, 3), (128, 64, 8, 3), (128, 32, 8, 3), (64, 32, 4, 4), (128, 128, 8, 2), (64, 16, 4, 4),
           (128, 64, 8, 1), (128, 128, 8, 3), (128, 256, 8, 2), (256, 128, 8, 2))  # fmt: skip
# The descriptor loads need less shared memory: 256 x 64 tiles at 3 stages fit there (the pointer kernels ask for
# 245,760 bytes of the H200's 232,448: reports/gpu/h200/run_81d2574/xattn/).
TMA_CONFIGS = (*CONFIGS, (256, 64, 8, 3))
INTERPRETER_CONFIGS = ((16, 16, 4, 1),)
# Elements of a combining program's (R reduced rows, BLOCK_K key blocks) tile: BLOCK_K = COMBINE_TILE / R key
# blocks (128 at R = 16), a power of two as R is.
COMBINE_TILE = 2048


def _configs(configs: tuple[tuple[int, int, int, int], ...]) -> list[Any]:
    chosen = INTERPRETER_CONFIGS if INTERPRETED else configs
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in chosen]


def _prune(configs: list[Any], named_args: dict[str, Any], **kwargs: Any) -> list[Any]:
    """Tiles hold whole blocks: configurations with fewer than R rows or keys are dropped; when none is left
    (blocks of more than 128 reduced rows), one tile of exactly R x R."""
    rows = kwargs["R"]
    kept = [c for c in configs if c.kwargs["BLOCK_M"] >= rows and c.kwargs["BLOCK_N"] >= rows]
    return kept or [triton.Config({"BLOCK_M": rows, "BLOCK_N": rows}, num_warps=8, num_stages=2)]


def _kernel(fn: Any, configs: tuple[tuple[int, int, int, int], ...] = CONFIGS) -> Any:
    """``triton.autotune`` over ``configs`` around ``triton.jit``; without Triton the plain function, which is never
    launched."""
    if triton is None:
        return fn
    autotune = triton.autotune(configs=_configs(configs), key=["R", "S", "BLOCK_D"],
                               prune_configs_by={"early_config_prune": _prune})  # fmt: skip
    return autotune(triton.jit(fn))


# -- kernel ---------------------------------------------------------------------------------------


@triton_jit
def _scores(q_base, k_base, row_start, start, cols, inside, N, sqn, skn, S: tl.constexpr, BLOCK_M: tl.constexpr,
            BLOCK_N: tl.constexpr, TMA: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
    """``(BLOCK_M, BLOCK_N)`` fp32 unscaled scores of reduced query rows ``rows = row_start + [0, BLOCK_M)`` against
    reduced keys ``keys = start + [0, BLOCK_N)``:
    ``sum_m Q_m K_m^T`` with Q_m the tokens ``S rows + S - 1 - m`` and K_m the tokens ``S keys + m`` (zeros past
    N, as the torch path's padding). Pointer loads (K_m^T transposed by the addresses), or with TMA q_base and
    k_base are tensor descriptors over ``(N / S, S, D)`` views (:func:`_descriptors`) whose ``[i, m]`` rows are
    those tokens, loaded by the copy engine (zeros past the view), K_m transposed for the product."""
    rows, keys = row_start + tl.arange(0, BLOCK_M), start + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for m in range(S):  # the product's K loop (S slices of D): a loop the pipeliner buffers num_stages deep
        if TMA:
            q_tile = tl.reshape(q_base.load([row_start, S - 1 - m, 0]), (BLOCK_M, BLOCK_D))
            k_rows = tl.reshape(k_base.load([start, m, 0]), (BLOCK_N, BLOCK_D))
            acc = tl.dot(q_tile, tl.trans(k_rows), acc)
        else:
            q_tokens = rows * S + (S - 1 - m)
            k_tokens = keys * S + m
            q_tile = tl.load(q_base + q_tokens.to(tl.int64)[:, None] * sqn + cols[None, :],
                             mask=(q_tokens < N)[:, None] & inside[None, :], other=0.0)  # fmt: skip
            k_tile = tl.load(k_base + k_tokens.to(tl.int64)[None, :] * skn + cols[:, None],
                             mask=inside[:, None] & (k_tokens < N)[None, :], other=0.0)  # fmt: skip
            acc = tl.dot(q_tile, k_tile, acc)
    return acc


@triton_jit
def _descriptors(q_base, k_base, N, sqn, skn, S: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """Tensor descriptors of one head's q and k as ``(N / S, S, D)`` (N a multiple of S): row i, slice m is token
    ``S i + m``; blocks of ``(BLOCK_M or BLOCK_N, 1, BLOCK_D)``."""
    q_desc = tl.make_tensor_descriptor(q_base, shape=[N // S, S, D], strides=[S * sqn, sqn, 1],
                                       block_shape=[BLOCK_M, 1, BLOCK_D])  # fmt: skip
    k_desc = tl.make_tensor_descriptor(k_base, shape=[N // S, S, D], strides=[S * skn, skn, 1],
                                       block_shape=[BLOCK_N, 1, BLOCK_D])  # fmt: skip
    return q_desc, k_desc


@triton_jit
def _tile_scores(q_base, k_base, row_start, start, cols, inside, N, reduced_keys, scale, sqn, skn, S: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TMA: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
    """The scores of the tile of rows from ``row_start`` and keys from ``start`` in base-2 units (``scale`` is
    ``log2(e) / (sqrt(D) S)``), ``-inf`` at keys past the reduced keys ``S j < N`` so that they take no mass."""
    s = _scores(q_base, k_base, row_start, start, cols, inside, N, sqn, skn, S, BLOCK_M, BLOCK_N, TMA, BLOCK_D) * scale
    return tl.where((start + tl.arange(0, BLOCK_N) < reduced_keys)[None, :], s, float("-inf"))


@triton_jit
def _per_key_block(p, R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``(BLOCK_M, BLOCK_N / R)``: each row of ``p`` summed over the R keys of each key block."""
    return tl.sum(tl.reshape(p, (BLOCK_M, BLOCK_N // R, R)), axis=2)


@triton_jit
def _head_bases(q_ptr, k_ptr, bh, H, sqb, sqh, skb, skh):
    """Where q and k of ``bh = b * H + h`` start."""
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    return q_ptr + b * sqb + h * sqh, k_ptr + b * skb + h * skh


@triton_jit
def _online_pass(q_base, k_base, row_start, cols, inside, N, scale, sqn, skn, partial_ptr, max_ptr, NB, ROWS,
                 S: tl.constexpr, R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 PARTIALS: tl.constexpr, TMA: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
    """One pass over the reduced keys in tiles of BLOCK_N: each row's max and sum of ``exp2(s - max)`` (online,
    fp32), returned. With PARTIALS, also each tile's per (row, key block) sums against the row's running max and
    that max, stored at ``partial_ptr`` and ``max_ptr`` (``(NB, ROWS)``, key-block major; rows past ROWS and key
    blocks past NB are not stored)."""
    reduced_keys = tl.cdiv(N, S)  # reduced keys j with S j < N: every other one is padding only
    rows = row_start + tl.arange(0, BLOCK_M)
    row_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for start in range(0, reduced_keys, BLOCK_N):
        s = _tile_scores(q_base, k_base, row_start, start, cols, inside, N, reduced_keys, scale, sqn, skn, S, BLOCK_M,
                         BLOCK_N, TMA, BLOCK_D)  # fmt: skip
        new_max = tl.maximum(row_max, tl.max(s, axis=1))  # finite: the first tile holds key 0
        p = tl.exp2(s - new_max[:, None])
        row_sum = row_sum * tl.exp2(row_max - new_max) + tl.sum(p, axis=1)
        row_max = new_max
        if PARTIALS:  # BLOCK_N is a multiple of R: tiles hold whole key blocks
            key_blocks = start // R + tl.arange(0, BLOCK_N // R)
            offsets = key_blocks[None, :] * ROWS + rows[:, None]
            stored = (rows < ROWS)[:, None] & (key_blocks < NB)[None, :]
            tl.store(partial_ptr + offsets, _per_key_block(p, R, BLOCK_M, BLOCK_N), mask=stored)
            tl.store(max_ptr + offsets, tl.broadcast_to(row_max[:, None], (BLOCK_M, BLOCK_N // R)), mask=stored)
    return row_max, row_sum


@_kernel
def _block_masses(q_ptr, k_ptr, out_ptr, H, N, NB, scale, sqb, sqh, sqn, skb, skh, skn,
                  D: tl.constexpr, S: tl.constexpr, R: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """Two-pass program (query tile, b * H + h): the masses of query blocks ``[tile QB, (tile + 1) QB)`` (``QB =
    BLOCK_M / R``) against every key block into ``out (B * H, NB, NB)`` fp32."""
    tile, bh = tl.program_id(0), tl.program_id(1)
    q_base, k_base = _head_bases(q_ptr, k_ptr, bh, H, sqb, sqh, skb, skh)
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    inside = cols < D
    row_max, row_sum = _online_pass(q_base, k_base, tile * BLOCK_M, cols, inside, N, scale, sqn, skn, out_ptr, out_ptr,
                                    NB, 0, S, R, BLOCK_M, BLOCK_N, PARTIALS=False, TMA=False,
                                    BLOCK_D=BLOCK_D)  # fmt: skip
    weight = tl.where(rows * S < N, 1.0 / row_sum, 0.0)  # padded query rows contribute 0
    reduced_keys = tl.cdiv(N, S)
    query_blocks = tile * (BLOCK_M // R) + tl.arange(0, BLOCK_M // R)
    out_base = out_ptr + bh.to(tl.int64) * NB * NB
    for start in range(0, reduced_keys, BLOCK_N):
        s = _tile_scores(q_base, k_base, tile * BLOCK_M, start, cols, inside, N, reduced_keys, scale, sqn, skn, S,
                         BLOCK_M, BLOCK_N, False, BLOCK_D)  # fmt: skip
        p = tl.exp2(s - row_max[:, None]) * weight[:, None]
        mass = tl.sum(tl.reshape(_per_key_block(p, R, BLOCK_M, BLOCK_N), (BLOCK_M // R, R, BLOCK_N // R)), axis=1)
        key_blocks = start // R + tl.arange(0, BLOCK_N // R)
        tl.store(out_base + query_blocks[:, None] * NB + key_blocks[None, :], mass,
                 mask=(query_blocks < NB)[:, None] & (key_blocks < NB)[None, :])  # fmt: skip


def _partials_program(q_ptr, k_ptr, partial_ptr, max_ptr, final_max_ptr, weight_ptr, H, N, NB, ROWS, scale, sqb,
                      sqh, sqn, skb, skh, skn, D: tl.constexpr, S: tl.constexpr, R: tl.constexpr,
                      BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      TMA: tl.constexpr):  # fmt: skip
    """Single-pass program (query tile, b * H + h), one pass over the reduced keys: per (row, key block) the
    partial sum against the row's running max and that max, into ``partial`` and ``max`` ``(B * H, NB, ROWS)``
    fp32 (``ROWS = NB R``, key-block major); then each row's final max and weight (``1 / row sum``, 0 past N)
    into ``final_max`` and ``weight`` ``(B * H, ROWS)``. With TMA (N a multiple of S) q and k are read through
    tensor descriptors (:func:`_descriptors`)."""
    tile, bh = tl.program_id(0), tl.program_id(1)
    q_base, k_base = _head_bases(q_ptr, k_ptr, bh, H, sqb, sqh, skb, skh)
    if TMA:
        q_base, k_base = _descriptors(q_base, k_base, N, sqn, skn, S, D, BLOCK_D, BLOCK_M, BLOCK_N)
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    head = bh.to(tl.int64) * NB * ROWS
    row_max, row_sum = _online_pass(q_base, k_base, tile * BLOCK_M, cols, cols < D, N, scale, sqn, skn,
                                    partial_ptr + head, max_ptr + head, NB, ROWS, S, R, BLOCK_M, BLOCK_N, PARTIALS=True,
                                    TMA=TMA, BLOCK_D=BLOCK_D)  # fmt: skip
    row_offsets = bh.to(tl.int64) * ROWS + rows
    tl.store(final_max_ptr + row_offsets, row_max, mask=rows < ROWS)
    tl.store(weight_ptr + row_offsets, tl.where(rows * S < N, 1.0 / row_sum, 0.0), mask=rows < ROWS)


# Two autotuners over one program: the pointer loads and the TMA ones are timed and pinned apart.
_block_partials = _kernel(_partials_program)
_block_partials_tma = _kernel(_partials_program, TMA_CONFIGS)


@triton_jit
def _combine_partials(partial_ptr, max_ptr, final_max_ptr, weight_ptr, out_ptr, NB, ROWS, R: tl.constexpr,
                      BLOCK_K: tl.constexpr):  # fmt: skip
    """Program (query block, key tile, b * H + h): ``out[qb, kb] = sum over the block's R rows of partial
    exp2(max - final max) weight`` for BLOCK_K key blocks, into ``out (B * H, NB, NB)`` fp32."""
    query_block, key_tile, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = query_block * R + tl.arange(0, R)
    key_blocks = key_tile * BLOCK_K + tl.arange(0, BLOCK_K)
    present = key_blocks < NB
    offsets = bh.to(tl.int64) * NB * ROWS + key_blocks[None, :] * ROWS + rows[:, None]
    partial = tl.load(partial_ptr + offsets, mask=present[None, :], other=0.0)
    at_store = tl.load(max_ptr + offsets, mask=present[None, :], other=0.0)
    row_offsets = bh.to(tl.int64) * ROWS + rows
    final_max, weight = tl.load(final_max_ptr + row_offsets), tl.load(weight_ptr + row_offsets)
    mass = tl.sum(partial * tl.exp2(at_store - final_max[:, None]) * weight[:, None], axis=0)
    tl.store(out_ptr + bh.to(tl.int64) * NB * NB + query_block * NB + key_blocks, mass, mask=present)


# -- dispatch -------------------------------------------------------------------------------------


def unsupported_reason(q: torch.Tensor, k: torch.Tensor, block: int, stride: int) -> str | None:
    """Why the fused kernel cannot score this call (None when it can): it runs on CUDA, or on CPU tensors under
    the Triton interpreter (``TRITON_INTERPRET=1``, tests), in fp16 or bf16 (fp16 only in the interpreter, which
    multiplies bf16 operands as raw integers)."""
    if triton is None:
        return "triton is not installed"
    if not on_kernel_device(q, k):
        return f"inputs are not all on {KERNEL_DEVICE}"
    dtypes = (torch.float16,) if INTERPRETED else (torch.float16, torch.bfloat16)
    if q.dtype != k.dtype or q.dtype not in dtypes:
        return f"inputs are {q.dtype}/{k.dtype}: the kernel scores {' or '.join(str(d) for d in dtypes)} inputs"
    if q.dim() != 4 or q.shape != k.shape:
        return f"shapes q {tuple(q.shape)}, k {tuple(k.shape)} are not both (B, H, N, D)"
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head_dim {q.shape[-1]} > {MAX_HEAD_DIM}"
    rows = block // stride
    if block % stride or rows & (rows - 1):
        return f"block {block} / stride {stride} is not a power of two"
    return None


def use_fused(q: torch.Tensor, k: torch.Tensor, block: int, stride: int, backend: str | None = None) -> bool:
    """Whether this call runs the fused kernel: ``backend`` (default ``$BENCH_XATTN_BACKEND``, else
    :data:`DEFAULT_BACKEND`) ``auto`` (when it can), ``torch`` (never) or ``triton`` (always; HarnessError when it
    cannot)."""
    return use_kernel(BACKEND_ENV, DEFAULT_BACKEND, backend, lambda: unsupported_reason(q, k, block, stride),
                      "the fused xattn scoring")  # fmt: skip


def chosen_variant(variant: str | None = None) -> str:
    """The kernel variant: ``variant``, else ``$BENCH_XATTN_VARIANT``, else :data:`DEFAULT_VARIANT`; HarnessError
    when it is not one of :data:`VARIANTS`."""
    return env_choice(variant, VARIANT_ENV, DEFAULT_VARIANT, VARIANTS)


def block_masses(q: torch.Tensor, k: torch.Tensor, block: int, stride: int, variant: str | None = None) -> torch.Tensor:
    """XAttention's block masses ``(B, H, nb, nb)`` float32 from q, k ``(B, H, N, D)`` by the kernel variant
    :func:`chosen_variant` names. The caller checks :func:`unsupported_reason` first (:func:`use_fused` does)."""
    return VARIANT_FUNCTIONS[chosen_variant(variant)](q, k, block, stride)


def fused_block_masses(q: torch.Tensor, k: torch.Tensor, block: int, stride: int) -> torch.Tensor:
    """The two-pass variant's masses (see :func:`block_masses`), in one launch through the op
    :func:`xattn_block_masses`."""
    return xattn_block_masses(q, k, block, stride)


def fused_block_masses_single_pass(q: torch.Tensor, k: torch.Tensor, block: int, stride: int) -> torch.Tensor:
    """The single-pass variant's masses (see :func:`block_masses`), in two launches through the op
    :func:`xattn_block_masses_single_pass`."""
    return xattn_block_masses_single_pass(q, k, block, stride, False)


def fused_block_masses_single_pass_tma(q: torch.Tensor, k: torch.Tensor, block: int, stride: int) -> torch.Tensor:
    """:func:`fused_block_masses_single_pass` with q and k read through tensor descriptors where they can be."""
    return xattn_block_masses_single_pass(q, k, block, stride, True)


def _launch_shape(q: torch.Tensor, k: torch.Tensor, block: int, stride: int) -> tuple[Any, ...]:
    """What both ops start from: q and k with a contiguous last axis (else copied), the empty masses ``(B, H, nb,
    nb)`` fp32, the sizes (H, N, nb), the base-2 score scale ``log2(e) / (sqrt(D) S)``, the six strides and the
    constexprs (D, S, R, BLOCK_D) that both scoring kernels take."""
    q, k = last_axis_contiguous(q), last_axis_contiguous(k)
    batch, heads, tokens, dim = q.shape
    blocks, rows = num_blocks(tokens, block), block // stride
    masses = torch.empty(batch, heads, blocks, blocks, device=q.device, dtype=torch.float32)
    scale = LOG2_E / (math.sqrt(dim) * stride)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2))
    constexprs = {"D": dim, "S": stride, "R": rows, "BLOCK_D": tile_columns(dim)}
    return q, k, masses, (heads, tokens, blocks), scale, strides, constexprs


def _query_tiles(masses: torch.Tensor, rows: int) -> Any:
    """The scoring kernels' grid: (tiles of BLOCK_M reduced query rows over every block's R rows, B * H)."""
    batch, heads, blocks, _ = masses.shape
    return lambda meta: (triton.cdiv(blocks * rows, meta["BLOCK_M"]), batch * heads)


@kernel_op("xattn_block_masses")
def xattn_block_masses(q: torch.Tensor, k: torch.Tensor, block: int, stride: int) -> torch.Tensor:
    """The two-pass kernel's launch as one op, opaque to torch.compile (Dynamo does not trace the autotuner's
    Python): the masses ``(B, H, nb, nb)`` float32, contiguous, in memory of their own, for q, k ``(B, H, N, D)``
    (any strides). Inference only: the masses select blocks, nothing differentiates them, so the op registers no
    autograd (a backward through it raises)."""
    q, k, masses, (heads, tokens, blocks), scale, strides, constexprs = _launch_shape(q, k, block, stride)
    launch_tuned(_block_masses, _query_tiles(masses, constexprs["R"]), q, k, masses, heads, tokens, blocks, scale,
                 *strides, **constexprs)  # fmt: skip
    return masses


def _tma_ready(x: torch.Tensor, stride: int) -> bool:
    """Whether the copy engine can read ``x (B, H, N, D)`` as per-head ``(N / S, S, D)`` views: N a multiple of
    the stride S, and the start and every stride but the last (contiguous) one a multiple of 16 bytes."""
    return x.shape[2] % stride == 0 and descriptor_aligned(x)


@kernel_op("xattn_block_masses_single_pass")
def xattn_block_masses_single_pass(q: torch.Tensor, k: torch.Tensor, block: int, stride: int,
                                   tma: bool) -> torch.Tensor:  # fmt: skip
    """The single-pass kernels' two launches as one op, with :func:`xattn_block_masses`'s contract (same masses
    up to fp32 rounding, same shape, dtype, strides; inference only). The partials live only inside the op. With
    ``tma`` the scoring reads q and k through tensor descriptors (the copy engine on Hopper) where
    :func:`_tma_ready` holds for both, else by pointers."""
    q, k, masses, (heads, tokens, blocks), scale, strides, constexprs = _launch_shape(q, k, block, stride)
    batch_heads, rows = masses.shape[0] * masses.shape[1], constexprs["R"]
    partials, maxima = (torch.empty(batch_heads, blocks, blocks * rows, device=q.device, dtype=torch.float32)
                        for _ in range(2))  # fmt: skip
    final_max, weight = (torch.empty(batch_heads, blocks * rows, device=q.device, dtype=torch.float32)
                         for _ in range(2))  # fmt: skip
    with_tma = tma and _tma_ready(q, stride) and _tma_ready(k, stride)
    if with_tma and not INTERPRETED:
        use_descriptor_scratch()
    tuner = _block_partials_tma if with_tma else _block_partials
    launch_tuned(tuner, _query_tiles(masses, rows), q, k, partials, maxima, final_max, weight, heads, tokens, blocks,
                 blocks * rows, scale, *strides, **constexprs, TMA=with_tma)  # fmt: skip
    key_blocks = max(1, COMBINE_TILE // rows)
    _combine_partials[(blocks, triton.cdiv(blocks, key_blocks), batch_heads)](
        partials, maxima, final_max, weight, masses, blocks, blocks * rows, R=rows, BLOCK_K=key_blocks
    )
    return masses


def _fake_masses(q: torch.Tensor, k: torch.Tensor, block: int, stride: int, *tma: bool) -> torch.Tensor:
    """Both ops' fake output: the masses' shape and dtype, without running anything."""
    batch, heads, tokens, _ = q.shape
    blocks = num_blocks(tokens, block)
    return q.new_empty((batch, heads, blocks, blocks), dtype=torch.float32)


xattn_block_masses.register_fake(_fake_masses)
xattn_block_masses_single_pass.register_fake(_fake_masses)
VARIANT_FUNCTIONS = {"two_pass": fused_block_masses, "single_pass": fused_block_masses_single_pass,
                     "single_pass_tma": fused_block_masses_single_pass_tma}  # fmt: skip
#: Each variant's autotuned kernel (the one whose configurations the GPU check pins in turn).
TUNERS = {"two_pass": _block_masses, "single_pass": _block_partials, "single_pass_tma": _block_partials_tma}
