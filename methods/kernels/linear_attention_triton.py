"""Non-causal linear attention on CUDA in Triton, with the feature map fused into the kernels.

Computes what :func:`methods.kernels.linear_attention.linear_attention` computes from
``q_map(q)`` and ``k_map(k)`` (the torch path, which stays the CPU path and the reference),

    out_i = phi_q(q_i) S / (phi_q(q_i) . z + eps),   S = sum_j phi_k(k_j)^T v_j,   z = sum_j phi_k(k_j),

for the maps ``hedgehog`` (``[softmax(x W), softmax(-x W)]``, W per head), ``relu`` and ``elu`` (+ 1).
``taylor`` (1 + D + D^2 features per head) stays in torch. phi(q) and phi(k) never reach memory: every
kernel recomputes them from the token tile it loads (and W).

Kernels, each looping over the token blocks of one chunk of the sequence so that W and the state are
loaded once per program and the token axis is split over enough programs to fill the GPU (the chunk count
minimises waves x chunk length, see :func:`_chunking`):

- :func:`_gram_partials`: per (half, chunk, batch x head) ``phi(k)^T v`` and ``sum phi(k)`` (fp32); hedgehog's
  two feature halves ``softmax(+-x W)`` go to separate, adjacent programs (one fp32 state each in registers).
- :func:`_sum_groups`: the partial sums over chunks, in a fixed order (deterministic): the state ``S, z``.
- :func:`_output`: phi(q) of both halves, ``phi(q) S`` and the normaliser ``den``; the output (and den, for the
  backward). Without the normaliser, ``phi(k) dS``: the value gradient dv.
- :func:`_query_grads`: per half, from the saved output and den, ``g = dout / den`` and
  ``c = -(dout . out) / den``; the state's gradients ``dS = sum phi(q)^T g``, ``dz = sum c phi(q)`` (summed
  over chunks by :func:`_sum_groups`) and dL/d(q W) per half.
- :func:`_key_grads`: per half, dL/d(k W) from ``v dS^T + dz`` (dS^T loaded transposed).
- :func:`_project_grads`: dL/d(x W) summed over halves and taken through the projection, ``dp W^T``, and W's
  gradient ``x^T dp`` (summed over chunks and batch by :func:`_sum_groups`).

``W - I`` is formed inside each kernel from the weight, so a call runs no torch op on the device besides the
kernels: 2 or 3 launches forward, 3 to 8 backward (at a power-of-two head dim with fp32 weights; see the ops).

The launches are entered through two ``torch.library`` custom ops, :func:`linear_attention_forward` and
:func:`linear_attention_backward` (``attention_bench::``), tied by ``register_autograd``: torch.compile sees each as
one opaque call with fake outputs of the real shapes, dtypes and strides, and never traces the launch code (the
autotuners' Python and the ``lru_cache`` of :func:`_chunking`), which Dynamo could not. An eager call that records
no gradient runs the forward op's implementation without the op, and each autotuner runs once per key
(:func:`methods.kernels.tuned_launch.launch_tuned`): an eager forward is host-bound on an H200, and the op's
dispatch and the autotuners' key building cost as much host time as the launches
(``python -m harness.benchmarks.linear_host_profile``).

No kernel takes ``tl.trans`` of a tile it also passes untransposed to another ``tl.dot``, nor of a loaded tile: a
matrix needed both ways is loaded twice, transposed by the addresses (:func:`_matrix`). On an H200 (sm_90, Triton
3.6) a key pass that did (``tl.dot(phi, dS)`` and ``tl.dot(v, tl.trans(dS))``) gave dk 9x off and then an illegal
memory access, where the interpreter was right. The remaining ``tl.trans`` are of computed features ``phi``, used
transposed only (state and query passes, right on the H200).

Shapes: q ``(B, H, N, D)``, k and v ``(B, H, M, D)`` (any strides with a contiguous last axis),
``D <= 128``; the output ``(B, H, N, D)`` in the compute dtype.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import _get_current_dispatch_mode

from methods.kernels import (
    BACKENDS,
    INTERPRETED,
    kernel_choice,
    kernel_op,
    last_axis_contiguous,
    on_input_device,
    tile_columns,
    triton_jit,
    use_kernel,
)
from methods.kernels.linear_attention import EluFeatureMap, FeatureMap, HedgehogFeatureMap, ReluFeatureMap
from methods.kernels.tuned_launch import launch_tuned

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs (CI): every call takes the torch path
    triton = tl = None

FUSED_KERNELS: tuple[str, ...] = ("hedgehog", "relu", "elu")
BACKEND_ENV = "BENCH_LINEAR_BACKEND"
DEFAULT_BACKEND = "auto"
kernel_choice(BACKEND_ENV, DEFAULT_BACKEND, BACKENDS)
BACKEND_NOTE = (
    f"linear attention on CUDA: fused Triton kernel for {', '.join(FUSED_KERNELS)} (taylor runs in torch); "
    f"{BACKEND_ENV}=torch forces the torch path"
)
MAX_HEAD_DIM = 128
# Map codes inside the kernels (constexpr KIND).
KIND_CODES = {"hedgehog": 0, "relu": 1, "elu": 2}
# Tensor types the eager path runs on directly (subclasses such as fake or functional tensors take the op).
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)
_MAP_KINDS: dict[type[FeatureMap], str] = {HedgehogFeatureMap: "hedgehog", ReluFeatureMap: "relu", EluFeatureMap: "elu"}
# (BLOCK_N, num_warps, num_stages) per kernel; the autotuner keeps the fastest of each list (head dim 128; smaller
# heads take the first untimed). The lists hold the configurations an H200 chose at the Wan shapes
# (reports/gpu/h200/linear_triton), a deeper pipeline at two programs per SM for the memory-bound relu and elu
# passes, and a 32-token alternative where ptxas (sm_90) reports spills for hedgehog at 64 or 128 tokens (output
# 48 bytes, query 440; none elsewhere; the key pass at most 138 registers): harness/benchmarks/linear_triton_ptxas.py
# prints that report. The 8-warp variants at 64 tokens (and 32 at 3 stages) halve the registers per thread of the
# 4-warp ones, which the H200 chose at 255, the cap, for the state pass at Wan 1.3B.
REDUCE_CONFIGS = ((128, 8, 2), (64, 4, 2), (64, 4, 3), (64, 8, 2), (64, 8, 3))
OUTPUT_CONFIGS = ((128, 8, 2), (32, 4, 2), (64, 4, 4), (64, 8, 2), (64, 8, 3), (32, 8, 3))
# The query pass at 64 tokens (8 warps, 2 stages) miscompiles on sm_90 at head dim 128 (Triton 3.6): on an H200
# at the Wan 1.3B shape it wrote dz with relative error 1.7e4 (hedgehog) and read out of bounds (relu), while the
# same pass at 32 tokens was right (reports/gpu/h200/linear_triton_t2_failed/localise.log); ptxas reports 444 bytes
# of spills for it. Only the 32-token configuration is kept.
QUERY_CONFIGS = ((32, 8, 2),)
KEY_CONFIGS = ((64, 8, 2), (32, 8, 2))
PROJECT_CONFIGS = ((64, 8, 2), (128, 8, 2))
INTERPRETER_CONFIGS = ((16, 4, 1),)
# Elements of fp32 partial sums that one program of the summing kernel adds over all chunks.
SUM_BLOCK = 1024
# The chunking's model of the GPU: a wave is SLOTS_PER_SM programs per multiprocessor, a program costs
# PROGRAM_COST_TOKENS tokens of streaming besides its chunk (loading W and the state, storing its partial sums),
# and at most MAX_WAVES waves are considered. Two per SM, as the forward's chosen configurations run at head dim 128
# (the state pass at 64 tokens on 4 warps: 255 registers, 98 KB of shared memory; the output pass one per SM):
# on an H200 the hedgehog forward's graph replay took 0.323 ms at Wan 1.3B with 2 against 0.343 with 4 (half the
# partial sums, fewer and longer programs) and 0.320 with 1, and at 14B 2.265, 2.258 and 2.307 ms (1 cuts the
# 14B keys into 3 chunks of 25,216 tokens); reports/gpu/h200/README.md, "Twelfth session".
SLOTS_PER_SM = 2
PROGRAM_COST_TOKENS = 128
MAX_WAVES = 4


def _kernel(configs: tuple[tuple[int, int, int], ...]) -> Any:
    """``triton.autotune`` over ``configs`` (BLOCK_N, num_warps, num_stages) around ``triton.jit``; without
    Triton the plain function, which is never launched."""
    if triton is None:
        return lambda fn: fn
    chosen = INTERPRETER_CONFIGS if INTERPRETED else configs
    tuned = [triton.Config({"BLOCK_N": block}, num_warps=warps, num_stages=stages) for block, warps, stages in chosen]
    autotune = triton.autotune(configs=tuned, key=["BLOCK_D", "KIND", "HAS_W", "NH", "NORMALISE", "WANT_DW"],
                               prune_configs_by={"early_config_prune": _prune})  # fmt: skip
    return lambda fn: autotune(triton.jit(fn))


def _prune(configs: list[Any], named_args: dict[str, Any], **kwargs: Any) -> list[Any]:
    """Small heads (toy models, BLOCK_D < 128) take the first configuration untimed: each tuned one costs a
    compile, and their calls are too small for the choice to matter."""
    return configs if kwargs.get("BLOCK_D", MAX_HEAD_DIM) >= MAX_HEAD_DIM else configs[:1]


def _chunk_alignment(configs: tuple[tuple[int, int, int], ...]) -> int:
    """Chunks are whole multiples of every configuration's block, so no block straddles two chunks."""
    return max(block for block, _, _ in (INTERPRETER_CONFIGS if INTERPRETED else configs))


# -- kernels ------------------------------------------------------------------------------------


@triton_jit
def _project(x, w, HAS_W: tl.constexpr):
    """``x (T, BD)`` -> ``x + x (W - I)`` in fp32; ``w`` holds ``W - I`` in the operand dtype."""
    p = x.to(tl.float32)
    if HAS_W:
        p += tl.dot(x, w)
    return p


@triton_jit
def _phi(p, sign, inside, KIND: tl.constexpr, PADDED: tl.constexpr):
    """Features ``(T, BD)`` fp32 from the projected tile: hedgehog's ``softmax(sign p)`` over the real
    columns (``inside``; all of them unless PADDED), relu, or elu + 1 (0 in padding columns)."""
    if KIND == 0:
        s = p * (sign * 1.4426950408889634)  # softmax(sign p) as base-2 exponentials of sign p log2(e)
        if PADDED:
            s = tl.where(inside[None, :], s, float("-inf"))
        e = tl.exp2(s - tl.max(s, axis=1)[:, None])
        phi = e * (1.0 / tl.sum(e, axis=1))[:, None]
    elif KIND == 1:
        phi = tl.maximum(p, 0.0)
    else:
        phi = tl.where(p > 0, p + 1.0, tl.exp(tl.minimum(p, 0.0)))
        if PADDED:
            phi = tl.where(inside[None, :], phi, 0.0)
    return phi


@triton_jit
def _row_sum(phi_t, weights, acc, dtype):
    """``acc (BD, 16)`` plus ``phi^T weights`` in its column 0 (the others stay 0), for ``phi_t (BD, T)`` in
    ``dtype`` and weights ``(T,)``: a weighted sum over tokens on the tensor cores, which spares the loop a
    cross-warp reduction and its barrier; read it with ``tl.sum(acc, axis=1)``."""
    unit = tl.where(tl.arange(0, 16)[None, :] == 0, weights[:, None], 0.0).to(dtype)
    return tl.dot(phi_t, unit, acc)


@triton_jit
def _phi_grad(p, phi, dphi, sign, KIND: tl.constexpr):
    """dL/dp for ``phi = _phi(p, sign)`` given dL/dphi, all ``(T, BD)`` fp32."""
    if KIND == 0:
        dp = sign * phi * (dphi - tl.sum(dphi * phi, axis=1)[:, None])
    elif KIND == 1:
        dp = tl.where(p > 0, dphi, 0.0)
    else:  # elu + 1: phi = exp(p) where p <= 0 (and 0 in padding columns)
        dp = tl.where(p > 0, dphi, dphi * phi)
    return dp


@triton_jit
def _weight(w_ptr, h, cols, dtype, D: tl.constexpr, HAS_W: tl.constexpr, TRANSPOSED: tl.constexpr,
            BLOCK_D: tl.constexpr):  # fmt: skip
    """Head h's ``W - I`` (``(W - I)^T`` when TRANSPOSED) as a zero-padded ``(BD, BD)`` tile in ``dtype``, built
    from the weight ``(H, D, D)`` (contiguous, any float dtype) in fp32, so that only the learned change is
    rounded; a placeholder, never read, without HAS_W. Built in each program: no host-side op per call."""
    if HAS_W:
        inside = cols < D
        square = inside[:, None] & inside[None, :]
        offsets = cols[None, :] * D + cols[:, None] if TRANSPOSED else cols[:, None] * D + cols[None, :]
        w = tl.load(w_ptr + h * D * D + offsets, mask=square, other=0.0).to(tl.float32)
        tile = tl.where((cols[:, None] == cols[None, :]) & square, w - 1.0, w).to(dtype)
    else:
        tile = tl.zeros((BLOCK_D, BLOCK_D), dtype)
    return tile


@triton_jit
def _state(ptr, row, cols, dtype, BLOCK_D: tl.constexpr):
    """Row ``row`` of a state buffer ``(rows, BD * BD + BD)`` fp32: the ``(BD, BD)`` matrix in ``dtype`` (the
    operand of a product) and the ``(BD,)`` sums in fp32."""
    return _matrix(ptr, row, cols, dtype, False, BLOCK_D), _sums(ptr, row, cols, BLOCK_D)


@triton_jit
def _matrix(ptr, row, cols, dtype, TRANSPOSED: tl.constexpr, BLOCK_D: tl.constexpr):
    """The ``(BD, BD)`` matrix of row ``row`` of a state buffer in ``dtype``, transposed by the load's addresses
    when TRANSPOSED. A kernel that needs a matrix and its transpose loads both: ``tl.trans`` of a tile that is
    also an operand of another ``tl.dot`` gave wrong gradients and an illegal memory access on sm_90 (Triton
    3.6, H200; the interpreter was right), see reports/gpu/h200/linear_triton/NOTES.md."""
    base = ptr + row * (BLOCK_D * BLOCK_D + BLOCK_D)
    offsets = cols[None, :] * BLOCK_D + cols[:, None] if TRANSPOSED else cols[:, None] * BLOCK_D + cols[None, :]
    return tl.load(base + offsets).to(dtype)


@triton_jit
def _sums(ptr, row, cols, BLOCK_D: tl.constexpr):
    """The ``(BD,)`` sums of row ``row`` of a state buffer ``(rows, BD * BD + BD)`` fp32."""
    return tl.load(ptr + row * (BLOCK_D * BLOCK_D + BLOCK_D) + BLOCK_D * BLOCK_D + cols)


@triton_jit
def _store_state(ptr, row, acc, sums, cols, BLOCK_D: tl.constexpr):
    """``acc (BD, BD)`` and ``sums (BD,)`` into row ``row`` of a state buffer ``(rows, BD * BD + BD)``."""
    base = ptr + row * (BLOCK_D * BLOCK_D + BLOCK_D)
    tl.store(base + cols[:, None] * BLOCK_D + cols[None, :], acc)
    tl.store(base + BLOCK_D * BLOCK_D + cols, sums)


@triton_jit
def _program(H):
    """``(half, chunk, bh, b, h, sign)`` of a program on the grid ``(halves, chunks, B * H)``; ``sign`` picks
    hedgehog's feature half (+1: softmax(x W), -1: softmax(-x W))."""
    half, chunk, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    return half, chunk, bh, (bh // H).to(tl.int64), (bh % H).to(tl.int64), 1.0 - 2.0 * half.to(tl.float32)


@triton_jit
def _partial_row():
    """Row ``(chunk, bh, half)`` of a partial-sum buffer ``(chunks, B * H * halves, ...)``: summed over chunks
    it is the ``(B * H, halves)`` layout the kernels read, and for ``halves = 1`` the ``(chunks * B, H)`` one."""
    row = (tl.program_id(1) * tl.num_programs(2) + tl.program_id(2)) * tl.num_programs(0) + tl.program_id(0)
    return row.to(tl.int64)


@triton_jit
def _block(start, rows, N, inside):
    """Token indices ``n`` of one block, the rows that exist, and the tile mask (rows x real columns)."""
    n = start + rows
    valid = n < N
    return n, valid, valid[:, None] & inside[None, :]


@triton_jit
def _rows(base, n, stride, cols, mask):
    """The ``(BLOCK_N, BD)`` tile of tokens n from a token-major matrix at ``base`` (zeros outside ``mask``)."""
    return tl.load(base + n[:, None] * stride + cols[None, :], mask=mask, other=0.0)


@_kernel(REDUCE_CONFIGS)
def _gram_partials(x_ptr, y_ptr, w_ptr, part_ptr, H, N, D: tl.constexpr, CHUNK,
                   sxb, sxh, sxn, syb, syh, syn,
                   KIND: tl.constexpr, HAS_W: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """Program (half, chunk, b * H + h): over the chunk's tokens n, ``sum phi(x_n)^T y_n`` ``(BD, BD)`` and
    ``sum phi(x_n)`` ``(BD,)`` into partial row ``(chunk, bh, half)`` (the halves run side by side, so their
    shared reads of x and y hit the L2)."""
    _, chunk, _, b, h, sign = _program(H)
    rows, cols = tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_D)
    inside = cols < D
    dtype = x_ptr.dtype.element_ty
    x_base, y_base = x_ptr + b * sxb + h * sxh, y_ptr + b * syb + h * syh
    w = _weight(w_ptr, h, cols, dtype, D, HAS_W, False, BLOCK_D)
    acc = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
    zacc = tl.zeros((BLOCK_D, 16), dtype=tl.float32)
    for offset in range(0, CHUNK, BLOCK_N):
        n, valid, mask = _block(chunk * CHUNK + offset, rows, N, inside)
        x, y = _rows(x_base, n, sxn, cols, mask), _rows(y_base, n, syn, cols, mask)
        phi_t = tl.trans(_phi(_project(x, w, HAS_W), sign, inside, KIND, D < BLOCK_D).to(dtype))
        acc = tl.dot(phi_t, y, acc)  # rows past N: y is 0 there
        zacc = _row_sum(phi_t, valid.to(tl.float32), zacc, dtype)
    _store_state(part_ptr, _partial_row(), acc, tl.sum(zacc, axis=1), cols, BLOCK_D)


@triton_jit
def _sum_groups(src_ptr, dst_ptr, GROUPS, SIZE, BLOCK: tl.constexpr):
    """``dst[i] = sum_g src[g, i]`` over a fp32 ``(GROUPS, SIZE)`` buffer, in the order g = 0, 1, ... (the
    same sum on every run); program p adds elements ``[p BLOCK, (p + 1) BLOCK)``."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < SIZE
    src = src_ptr + offsets
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for _ in range(0, GROUPS):
        acc += tl.load(src, mask=inside, other=0.0)
        src += SIZE
    tl.store(dst_ptr + offsets, acc, mask=inside)


@_kernel(OUTPUT_CONFIGS)
def _output(q_ptr, w_ptr, st_ptr, o_ptr, den_ptr, H, N, D: tl.constexpr, CHUNK, eps,
            sqb, sqh, sqn,
            KIND: tl.constexpr, HAS_W: tl.constexpr, NH: tl.constexpr, NORMALISE: tl.constexpr,
            BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """Program (0, chunk, b * H + h): ``out = phi(q) S / den`` with ``den = phi(q) . z + eps`` for the chunk's
    tokens, both feature halves in one program; out ``(B, H, N, D)`` contiguous, den ``(B * H, N)`` fp32 (kept
    for the backward); the state ``(B * H * NH, BD * BD + BD)`` fp32. Without NORMALISE ``out = phi(q) S``
    (den and eps unused): the key pass's ``dv = phi(k) dS``."""
    _, chunk, bh, b, h, _ = _program(H)
    rows, cols = tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_D)
    inside = cols < D
    dtype = q_ptr.dtype.element_ty
    q_base, o_base = q_ptr + b * sqb + h * sqh, o_ptr + bh.to(tl.int64) * N * D
    w = _weight(w_ptr, h, cols, dtype, D, HAS_W, False, BLOCK_D)
    row = bh.to(tl.int64) * NH
    s0, z0 = _state(st_ptr, row, cols, dtype, BLOCK_D)
    if NH == 2:
        s1, z1 = _state(st_ptr, row + 1, cols, dtype, BLOCK_D)
    for offset in range(0, CHUNK, BLOCK_N):
        n, valid, mask = _block(chunk * CHUNK + offset, rows, N, inside)
        p = _project(_rows(q_base, n, sqn, cols, mask), w, HAS_W)
        phi = _phi(p, 1.0, inside, KIND, D < BLOCK_D)
        num = tl.dot(phi.to(dtype), s0)
        if NORMALISE:
            den = tl.sum(phi * z0[None, :], axis=1) + eps
        if NH == 2:
            phi = _phi(p, -1.0, inside, KIND, D < BLOCK_D)
            num = tl.dot(phi.to(dtype), s1, num)
            if NORMALISE:
                den += tl.sum(phi * z1[None, :], axis=1)
        if NORMALISE:
            num = num * (1.0 / den)[:, None]
        tl.store(o_base + n[:, None] * D + cols[None, :], num.to(o_ptr.dtype.element_ty), mask=mask)
        if NORMALISE:
            tl.store(den_ptr + bh.to(tl.int64) * N + n, den, mask=valid)


@_kernel(QUERY_CONFIGS)
def _query_grads(q_ptr, do_ptr, o_ptr, den_ptr, w_ptr, st_ptr, dp_ptr, part_ptr, H, N,
                 D: tl.constexpr, CHUNK, sqb, sqh, sqn, sdb, sdh, sdn,
                 KIND: tl.constexpr, HAS_W: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """Program (half, chunk, b * H + h), per query token of the chunk, with the saved ``out`` and ``den``:
    ``g = dout / den`` (dL/d numerator), ``c = -(dout . out) / den`` (dL/d den), ``dphi = g S^T + c z`` for
    this half's features, and dp (dL/d projected q, in q's dtype) into ``dp[half]`` ``(NH, B, H, N, BD)``; and
    the state's gradients ``sum phi^T g``, ``sum c phi`` into partial row ``(chunk, bh, half)``."""
    half, chunk, bh, b, h, sign = _program(H)
    rows, cols = tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_D)
    inside = cols < D
    dtype = q_ptr.dtype.element_ty
    q_base, do_base = q_ptr + b * sqb + h * sqh, do_ptr + b * sdb + h * sdh
    o_base = o_ptr + bh.to(tl.int64) * N * D
    dp_base = dp_ptr + (half * tl.num_programs(2) + bh).to(tl.int64) * N * BLOCK_D
    w = _weight(w_ptr, h, cols, dtype, D, HAS_W, False, BLOCK_D)
    row = bh.to(tl.int64) * tl.num_programs(0) + half
    s_t, z = _matrix(st_ptr, row, cols, dtype, True, BLOCK_D), _sums(st_ptr, row, cols, BLOCK_D)
    acc = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
    zacc = tl.zeros((BLOCK_D, 16), dtype=tl.float32)
    for offset in range(0, CHUNK, BLOCK_N):
        n, valid, mask = _block(chunk * CHUNK + offset, rows, N, inside)
        p = _project(_rows(q_base, n, sqn, cols, mask), w, HAS_W)
        phi = _phi(p, sign, inside, KIND, D < BLOCK_D)  # rows past N: g and c are 0 there
        inv_den = 1.0 / tl.load(den_ptr + bh.to(tl.int64) * N + n, mask=valid, other=1.0)
        dout = _rows(do_base, n, sdn, cols, mask).to(tl.float32)
        out = _rows(o_base, n, D, cols, mask).to(tl.float32)
        c = -tl.sum(dout * out, axis=1) * inv_den
        g = (dout * inv_den[:, None]).to(dtype)
        phi_t = tl.trans(phi.to(dtype))
        acc = tl.dot(phi_t, g, acc)
        zacc = _row_sum(phi_t, c, zacc, dtype)
        dp = _phi_grad(p, phi, tl.dot(g, s_t) + c[:, None] * z[None, :], sign, KIND)
        tl.store(dp_base + n[:, None] * BLOCK_D + cols[None, :], dp.to(dtype), mask=valid[:, None])
    _store_state(part_ptr, _partial_row(), acc, tl.sum(zacc, axis=1), cols, BLOCK_D)


@_kernel(KEY_CONFIGS)
def _key_grads(k_ptr, v_ptr, w_ptr, ds_ptr, dp_ptr, H, M, D: tl.constexpr, CHUNK,
               skb, skh, skn, svb, svh, svn,
               KIND: tl.constexpr, HAS_W: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """Program (half, chunk, b * H + h), per key token of the chunk, for this half's features: dp (dL/d projected
    k) from ``dphi = v dS^T + dz`` into ``dp[half]`` ``(NH, B, H, M, BD)`` in k's dtype; dS, dz from the state
    gradients ``(B * H * NH, BD * BD + BD)`` fp32, dS^T loaded transposed (no ``tl.trans`` of a tile: see
    :func:`_matrix`). The value gradient is the output pass without its normaliser."""
    half, chunk, bh, b, h, sign = _program(H)
    rows, cols = tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_D)
    inside = cols < D
    dtype = k_ptr.dtype.element_ty
    k_base, v_base = k_ptr + b * skb + h * skh, v_ptr + b * svb + h * svh
    dp_base = dp_ptr + (half * tl.num_programs(2) + bh).to(tl.int64) * M * BLOCK_D
    w = _weight(w_ptr, h, cols, dtype, D, HAS_W, False, BLOCK_D)
    row = bh.to(tl.int64) * tl.num_programs(0) + half
    ds_t, dz = _matrix(ds_ptr, row, cols, dtype, True, BLOCK_D), _sums(ds_ptr, row, cols, BLOCK_D)
    for offset in range(0, CHUNK, BLOCK_N):
        n, valid, mask = _block(chunk * CHUNK + offset, rows, M, inside)
        p = _project(_rows(k_base, n, skn, cols, mask), w, HAS_W)
        phi = _phi(p, sign, inside, KIND, D < BLOCK_D)
        dphi = tl.dot(_rows(v_base, n, svn, cols, mask), ds_t) + dz[None, :]
        tl.store(dp_base + n[:, None] * BLOCK_D + cols[None, :], _phi_grad(p, phi, dphi, sign, KIND).to(dtype),
                 mask=valid[:, None])  # fmt: skip


@_kernel(PROJECT_CONFIGS)
def _project_grads(dp_ptr, x_ptr, w_ptr, dx_ptr, part_ptr, H, N, D: tl.constexpr, CHUNK, sxb, sxh, sxn,
                   NH: tl.constexpr, HAS_W: tl.constexpr, WANT_DW: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """Program (0, chunk, b * H + h), per token of the chunk, from dL/dp per feature half ``(NH, B, H, N, BD)``:
    ``dp = sum_half dp[half]`` (fp32), ``dx = dp (I + (W - I))^T`` into dx ``(B, H, N, D)`` contiguous (dp's
    dtype); with WANT_DW, W's gradient ``sum x^T dp`` into partial row ``(chunk * B + b) * H + h`` of a
    ``(chunks * B * H, BD * BD)`` fp32 buffer."""
    _, chunk, bh, b, h, _ = _program(H)
    rows, cols = tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_D)
    inside = cols < D
    dtype = dp_ptr.dtype.element_ty
    x_base, dx_base = x_ptr + b * sxb + h * sxh, dx_ptr + bh.to(tl.int64) * N * D
    dp_base = dp_ptr + bh.to(tl.int64) * N * BLOCK_D
    w_t = _weight(w_ptr, h, cols, dtype, D, HAS_W, True, BLOCK_D)
    acc = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
    for offset in range(0, CHUNK, BLOCK_N):
        n, valid, mask = _block(chunk * CHUNK + offset, rows, N, inside)
        dp = _rows(dp_base, n, BLOCK_D, cols, valid[:, None]).to(tl.float32)
        if NH == 2:
            dp += _rows(dp_base + tl.num_programs(2).to(tl.int64) * N * BLOCK_D, n, BLOCK_D, cols,
                        valid[:, None]).to(tl.float32)  # fmt: skip
        dx = tl.dot(dp.to(dtype), w_t, dp) if HAS_W else dp
        tl.store(dx_base + n[:, None] * D + cols[None, :], dx.to(dtype), mask=mask)
        if WANT_DW:
            x_t = tl.load(x_base + n[None, :] * sxn + cols[:, None], mask=inside[:, None] & valid[None, :], other=0.0)
            acc = tl.dot(x_t, dp.to(dtype), acc)  # x^T by the load's addresses: no tl.trans (see _matrix)
    if WANT_DW:
        row = _partial_row()
        tl.store(part_ptr + row * BLOCK_D * BLOCK_D + cols[:, None] * BLOCK_D + cols[None, :], acc)


# -- launches -------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _slots(device: torch.device) -> int:
    """Programs ``device`` runs at once in the chunking's model (the interpreter's CPU: 2)."""
    return SLOTS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2


@functools.lru_cache(maxsize=1024)
def _chunking(tokens: int, rows: int, slots: int, alignment: int) -> tuple[int, int]:
    """``(chunks, chunk)``: the token axis cut into chunks of ``chunk`` tokens (a multiple of ``alignment``)
    for ``rows`` programs per chunk on a device running ``slots`` programs at once, minimising the critical path
    ``waves x (chunk + PROGRAM_COST_TOKENS)``; ties go to fewer chunks (fewer partial sums)."""
    most = max(1, min(triton.cdiv(tokens, alignment), triton.cdiv(MAX_WAVES * slots, rows)))
    best = (float("inf"), 1, tokens)
    for wanted in range(1, most + 1):
        chunk = triton.cdiv(triton.cdiv(tokens, wanted), alignment) * alignment
        chunks = triton.cdiv(tokens, chunk)
        cost = triton.cdiv(chunks * rows, slots) * (chunk + PROGRAM_COST_TOKENS)
        if cost < best[0]:
            best = (cost, chunks, chunk)
    return best[1], best[2]


def _grid(x: torch.Tensor, halves: int, configs: tuple[tuple[int, int, int], ...]) -> tuple[tuple[int, ...], int]:
    """Grid ``(halves, chunks, B*H)`` and chunk length of a per-token kernel over x ``(B, H, N, D)``."""
    batch, heads, tokens, _ = x.shape
    chunks, chunk = _chunking(tokens, batch * heads * halves, _slots(x.device), _chunk_alignment(configs))
    return (halves, chunks, batch * heads), chunk


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _state_buffer(groups: int, rows: int, block_d: int, device: torch.device) -> torch.Tensor:
    """fp32 ``(groups, rows, BD * BD + BD)``: per row a ``(BD, BD)`` matrix and its ``(BD,)`` sums."""
    return torch.empty(groups, rows, block_d * block_d + block_d, device=device, dtype=torch.float32)


def _summed(partials: torch.Tensor) -> torch.Tensor:
    """Partial sums ``(groups, ...)`` fp32 -> their sum over groups ``(...)``, contiguous, in one launch; for one
    group none: that group, a view of ``partials``, which no caller keeps."""
    if partials.shape[0] == 1:
        return partials[0]
    total = torch.empty(partials.shape[1:], device=partials.device, dtype=torch.float32)
    size = total.numel()
    _sum_groups[(triton.cdiv(size, SUM_BLOCK),)](partials, total, partials.shape[0], size, BLOCK=SUM_BLOCK)
    return total


def _gram(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None, kind: int, nh: int) -> torch.Tensor:
    """The state ``sum_n phi(x_n)^T y_n`` and ``sum_n phi(x_n)`` per (batch x head, half): ``(B*H*nh, BD*BD + BD)``
    fp32, for x and y ``(B, H, N, D)``."""
    batch, heads, tokens, dim = x.shape
    grid, chunk = _grid(x, nh, REDUCE_CONFIGS)
    partials = _state_buffer(grid[1], batch * heads * nh, tile_columns(dim), x.device)
    launch_tuned(
        _gram_partials, grid, x, y, x if w is None else w, partials, heads, tokens, dim, chunk,
        *_strides(x), *_strides(y),
        KIND=kind, HAS_W=w is not None, BLOCK_D=tile_columns(dim),
    )  # fmt: skip
    return _summed(partials)


def _weight_operand(weight: torch.Tensor | None) -> torch.Tensor | None:
    """The map's weight ``(H, D, D)`` as the kernels read it (``W - I`` is formed inside them)."""
    return None if weight is None else weight.detach().contiguous()


def _through_projection(x: torch.Tensor, dp_halves: torch.Tensor, weight: torch.Tensor | None, want_weight: bool,
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """dL/dx ``(B, H, N, D)`` and dL/dW ``(H, D, D)`` (fp32 sums, in W's dtype; None unless wanted), both
    contiguous, from dL/dp per feature half ``(nh, B, H, N, BD)``, for ``p = x W``."""
    nh, batch, heads, tokens, block_d = dp_halves.shape
    dim = x.shape[-1]
    if nh == 1 and weight is None:
        return dp_halves[0][..., :dim].contiguous(), None  # a copy only where the head dim is padded
    want = weight is not None and want_weight
    dx = torch.empty(x.shape, device=x.device, dtype=dp_halves.dtype)
    grid, chunk = _grid(x, 1, PROJECT_CONFIGS)
    partials = dx  # a placeholder, never read without WANT_DW
    if want:
        partials = torch.empty(grid[1] * batch, heads, block_d * block_d, device=x.device, dtype=torch.float32)
    launch_tuned(
        _project_grads, grid, dp_halves, x, x if weight is None else _weight_operand(weight), dx, partials, heads,
        tokens, dim, chunk, *_strides(x), NH=nh, HAS_W=weight is not None, WANT_DW=want, BLOCK_D=block_d,
    )  # fmt: skip
    if not want:
        return dx, None
    return dx, _summed(partials).view(heads, block_d, block_d)[:, :dim, :dim].to(weight.dtype).contiguous()


def _output_pass(q: torch.Tensor, wq: torch.Tensor | None, state: torch.Tensor, kind: int, nh: int,
                 eps: float | None) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """The output ``(B, H, N, D)`` in q's dtype and the normaliser ``den`` ``(B * H, N)`` fp32 from the state;
    with ``eps`` None the product ``sum_half phi(q) S[half]`` alone and no den (the key pass's dv)."""
    batch, heads, tokens, dim = q.shape
    out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    den = None if eps is None else torch.empty(batch * heads, tokens, device=q.device, dtype=torch.float32)
    grid, chunk = _grid(q, 1, OUTPUT_CONFIGS)  # both halves in each program
    launch_tuned(
        _output, grid, q, q if wq is None else wq, state, out, out if den is None else den, heads, tokens, dim, chunk,
        0.0 if eps is None else eps, *_strides(q), KIND=kind, HAS_W=wq is not None, NH=nh, NORMALISE=den is not None,
        BLOCK_D=tile_columns(dim),
    )  # fmt: skip
    return out, den


def _query_pass(q: torch.Tensor, grad_out: torch.Tensor, out: torch.Tensor, den: torch.Tensor,
                wq: torch.Tensor | None, state: torch.Tensor, kind: int, nh: int,
                ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """dL/dp per feature half ``(nh, B, H, N, BD)`` in q's dtype and the state's gradients ``dS, dz`` laid out as
    the state ``(B * H * nh, BD * BD + BD)`` fp32."""
    batch, heads, tokens, dim = q.shape
    block_d = tile_columns(dim)
    dp_q = torch.empty(nh, batch, heads, tokens, block_d, device=q.device, dtype=q.dtype)
    grid, chunk = _grid(q, nh, QUERY_CONFIGS)
    partials = _state_buffer(grid[1], batch * heads * nh, block_d, q.device)
    launch_tuned(
        _query_grads, grid, q, grad_out, out, den, q if wq is None else wq, state, dp_q, partials,
        heads, tokens, dim, chunk, *_strides(q), *_strides(grad_out),
        KIND=kind, HAS_W=wq is not None, BLOCK_D=block_d,
    )  # fmt: skip
    return dp_q, _summed(partials)


def _key_pass(k: torch.Tensor, v: torch.Tensor, wk: torch.Tensor | None, d_state: torch.Tensor, kind: int, nh: int
              ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """dL/dp of the keys per feature half ``(nh, B, H, M, BD)`` and dv ``(B, H, M, D)``, both in k's dtype. Two
    launches: dv ``sum_half phi(k) dS`` by the output kernel, dp per half by :func:`_key_grads` (one fused program
    for both, holding dS and its transpose, spilled and went wrong on sm_90: NOTES.md)."""
    batch, heads, key_tokens, dim = k.shape
    dv, _ = _output_pass(k, wk, d_state, kind, nh, None)
    dp_k = torch.empty(nh, batch, heads, key_tokens, tile_columns(dim), device=k.device, dtype=k.dtype)
    grid, chunk = _grid(k, nh, KEY_CONFIGS)
    launch_tuned(
        _key_grads, grid, k, v, k if wk is None else wk, d_state, dp_k, heads, key_tokens, dim, chunk,
        *_strides(k), *_strides(v),
        KIND=kind, HAS_W=wk is not None, BLOCK_D=tile_columns(dim),
    )  # fmt: skip
    return dp_k, dv


def _halves(kind: str) -> int:
    """Feature halves of a map: hedgehog's ``softmax(+-x W)`` are two, relu's and elu's one."""
    return 2 if kind == "hedgehog" else 1


def _state_shape(q: torch.Tensor, kind: str) -> tuple[int, int]:
    """The state buffer's shape ``(B * H * halves, BD * BD + BD)`` for q ``(B, H, N, D)``."""
    batch, heads, _, dim = q.shape
    block_d = tile_columns(int(dim))  # the head dim is static: it picks the kernels' tile
    return batch * heads * _halves(kind), block_d * block_d + block_d


def _no_weight_grad(x: torch.Tensor) -> torch.Tensor:
    """The backward op's "no weight gradient" (no weight, or not wanted): an empty ``(0,)`` tensor in x's dtype,
    since an op's schema cannot return an optional tensor."""
    return x.new_empty(0)


@on_input_device
def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_weight: torch.Tensor | None,
             k_weight: torch.Tensor | None, kind: str, eps: float,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """The fused forward, run by the op :data:`linear_attention_forward` (one opaque call to torch.compile: Dynamo
    does not trace the launch code) or, for plain eager calls that record no gradient, directly
    (:func:`fused_linear_attention`): q ``(B, H, N, D)``, k and v ``(B, H, M, D)`` in one compute dtype
    (fp16/bf16; any strides), hedgehog's weights ``(H, D, D)`` or None, ``kind`` one of :data:`FUSED_KERNELS`.
    Returns, each contiguous and in memory of its own, the output ``(B, H, N, D)`` in q's dtype, the state
    ``(B * H * halves, BD * BD + BD)`` fp32 and the normaliser ``den`` ``(B * H, N)`` fp32 (both kept for the
    backward). Launches: 2 or 3 (state partials, their sum when the keys are cut into more than one chunk, output);
    no other device op."""
    code, nh = KIND_CODES[kind], _halves(kind)
    q, k, v = (last_axis_contiguous(t) for t in (q, k, v))
    state = _gram(k, v, _weight_operand(k_weight), code, nh)
    out, den = _output_pass(q, _weight_operand(q_weight), state, code, nh, eps)
    return out, state, den


linear_attention_forward = kernel_op("linear_attention_forward")(_forward)


@linear_attention_forward.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_weight: torch.Tensor | None,
      k_weight: torch.Tensor | None, kind: str, eps: float) -> tuple[torch.Tensor, ...]:  # fmt: skip
    batch, heads, tokens, _ = q.shape
    state = q.new_empty(_state_shape(q, kind), dtype=torch.float32)
    return q.new_empty(q.shape), state, q.new_empty((batch * heads, tokens), dtype=torch.float32)


@kernel_op("linear_attention_backward")
def linear_attention_backward(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_weight: torch.Tensor | None,
    k_weight: torch.Tensor | None, state: torch.Tensor, out: torch.Tensor, den: torch.Tensor, kind: str,
    want_dwq: bool, want_dwk: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """The fused backward as one op: from dL/dout ``(B, H, N, D)``, the forward's inputs and its outputs ``state``,
    ``out``, ``den`` (as :func:`linear_attention_forward` returned them), ``(dq, dk, dv, dWq, dWk)``, each
    contiguous and in memory of its own: dq, dk, dv in the inputs' dtype and shape, dW ``(H, D, D)`` in its
    weight's dtype (fp32 sums) when that weight exists and ``want_dw`` asks for it, else :func:`_no_weight_grad`'s
    empty ``(0,)`` tensor. Launches: 3 to 8 (query pass, the state gradients' sum over chunks when there are
    several, the key pass's dv and dp, and per side with hedgehog's halves or W one projection pass and, for W's
    gradient, its sum over chunks and batch); no other device op at a power-of-two head dim >= 16 (Wan's 128) with
    fp32 weights. Elsewhere slicing the padded columns off costs one copy per unprojected dq/dk and per dW, as does
    casting dW to a weight dtype other than fp32. First order only: it registers no autograd of its own."""
    code, nh = KIND_CODES[kind], _halves(kind)
    grad_out, q, k, v = (last_axis_contiguous(t) for t in (grad_out, q, k, v))
    wq, wk = _weight_operand(q_weight), _weight_operand(k_weight)
    dp_q, d_state = _query_pass(q, grad_out, out, den, wq, state, code, nh)
    dp_k, dv = _key_pass(k, v, wk, d_state, code, nh)
    dq, dwq = _through_projection(q, dp_q, q_weight, want_dwq)
    dk, dwk = _through_projection(k, dp_k, k_weight, want_dwk)
    return dq, dk, dv, _no_weight_grad(q) if dwq is None else dwq, _no_weight_grad(k) if dwk is None else dwk


@linear_attention_backward.register_fake
def _(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_weight: torch.Tensor | None,
      k_weight: torch.Tensor | None, state: torch.Tensor, out: torch.Tensor, den: torch.Tensor, kind: str,
      want_dwq: bool, want_dwk: bool) -> tuple[torch.Tensor, ...]:  # fmt: skip
    def weight_grad(x: torch.Tensor, weight: torch.Tensor | None, wanted: bool) -> torch.Tensor:
        return weight.new_empty(weight.shape) if weight is not None and wanted else _no_weight_grad(x)

    return (q.new_empty(q.shape), k.new_empty(k.shape), k.new_empty(k.shape), weight_grad(q, q_weight, want_dwq),
            weight_grad(k, k_weight, want_dwk))  # fmt: skip


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
    q, k, v, q_weight, k_weight, kind, _ = inputs
    out, state, den = output
    ctx.save_for_backward(q, k, v, q_weight, k_weight, state, out, den)
    ctx.mark_non_differentiable(state, den)
    ctx.kind = kind


def _backward(ctx: Any, grad_out: torch.Tensor, _grad_state: Any, _grad_den: Any) -> tuple[torch.Tensor | None, ...]:
    """dL/d(q, k, v, q_weight, k_weight); the state and den are saved for the backward, not differentiable."""
    q, k, v, q_weight, k_weight, state, out, den = ctx.saved_tensors
    want_dwq, want_dwk = (ctx.needs_input_grad[i] and w is not None for i, w in ((3, q_weight), (4, k_weight)))
    dq, dk, dv, dwq, dwk = linear_attention_backward(grad_out, q, k, v, q_weight, k_weight, state, out, den, ctx.kind,
                                                     want_dwq, want_dwk)  # fmt: skip
    return dq, dk, dv, dwq if want_dwq else None, dwk if want_dwk else None, None, None


linear_attention_forward.register_autograd(_backward, setup_context=_setup_context)


# -- dispatch -------------------------------------------------------------------------------------


def map_kind(feature_map: FeatureMap) -> str | None:
    """The fused kernel's name for ``feature_map`` (None: the map runs in torch only, e.g. taylor)."""
    return _MAP_KINDS.get(type(feature_map))


def compute_dtype(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.dtype | None:
    """The operand dtype of a call: autocast's where autocast is on for the device, else the inputs' common
    fp16/bf16 dtype; None for other inputs (fp32 without autocast runs in torch at full precision)."""
    if torch.is_autocast_enabled(q.device.type):
        return torch.get_autocast_dtype(q.device.type)
    dtypes = {q.dtype, k.dtype, v.dtype}
    dtype = dtypes.pop() if len(dtypes) == 1 else None
    return dtype if dtype in (torch.float16, torch.bfloat16) else None


def unsupported_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_map: FeatureMap, k_map: FeatureMap,
                       *, device_type: str = "cuda") -> str | None:  # fmt: skip
    """Why the fused kernel cannot run this call (None when it can). ``device_type`` is ``cuda``, or
    ``cpu`` under the Triton interpreter (tests). Runs before every call: its checks are the cheap ones (``is_cuda``
    rather than ``device``, each shape read once)."""
    if triton is None:
        return "triton is not installed"
    if device_type == "cuda":
        on_device = q.is_cuda and k.is_cuda and v.is_cuda
    else:
        on_device = q.device.type == k.device.type == v.device.type == device_type
    if not on_device:
        return f"inputs are not all on {device_type}"
    kind = map_kind(q_map)
    if kind is None or map_kind(k_map) != kind:
        return (f"feature maps {type(q_map).__name__}/{type(k_map).__name__} run in torch; the kernel fuses "
                f"{', '.join(FUSED_KERNELS)} (taylor's 1 + D + D^2 features stay in torch)")  # fmt: skip
    if compute_dtype(q, k, v) is None:
        return f"inputs are {q.dtype}/{k.dtype}/{v.dtype}: the kernel computes in fp16 or bf16 (or under autocast)"
    q_shape, k_shape = q.shape, k.shape
    if len(q_shape) != 4 or k_shape != v.shape or q_shape[:2] != k_shape[:2] or q_shape[-1] != k_shape[-1]:
        return f"shapes q {tuple(q_shape)}, k {tuple(k_shape)}, v {tuple(v.shape)} are not (B, H, N, D), (B, H, M, D)"
    if q_shape[-1] > MAX_HEAD_DIM:
        return f"head_dim {q_shape[-1]} > {MAX_HEAD_DIM}"
    for side in (q_map, k_map):
        if isinstance(side, HedgehogFeatureMap) and (side.heads, side.head_dim) != (q_shape[1], q_shape[-1]):
            return f"the hedgehog map was built for {side.heads} heads of {side.head_dim}"  # torch raises the error
    return None


def use_fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_map: FeatureMap, k_map: FeatureMap) -> bool:
    """Whether this call runs the fused kernel: ``$BENCH_LINEAR_BACKEND`` ``auto`` (default: when it can),
    ``torch`` (never, for A/B comparison) or ``triton`` (always; HarnessError when it cannot)."""
    return use_kernel(BACKEND_ENV, DEFAULT_BACKEND, None, lambda: unsupported_reason(q, k, v, q_map, k_map),
                      "the fused linear attention")  # fmt: skip


def fused_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_map: FeatureMap,
                           k_map: FeatureMap, eps: float = 1e-6) -> torch.Tensor:  # fmt: skip
    """``linear_attention(q_map(q), k_map(k), v, eps)`` through the fused kernels, differentiable in q, k, v
    and hedgehog's weights. Inputs are cast to :func:`compute_dtype`; returns ``(B, H, N, D)`` in v's dtype.
    The caller checks :func:`unsupported_reason` first (:func:`use_fused` does)."""
    out_dtype, dtype = v.dtype, compute_dtype(q, k, v)
    q, k, v = (t if t.dtype == dtype else t.to(dtype) for t in (q, k, v))  # a cast's no-op still costs ~1 us
    q_weight, k_weight = getattr(q_map, "weight", None), getattr(k_map, "weight", None)
    forward = _forward if _plain_eager_without_grad(q, k, v, q_weight, k_weight) else linear_attention_forward
    out, _, _ = forward(q, k, v, q_weight, k_weight, map_kind(q_map), eps)
    return out if out.dtype == out_dtype else out.to(out_dtype)


def _plain_eager_without_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether a call may run the op's implementation without the op: in eager mode (not traced by torch.compile or
    export, no Python dispatch mode), on plain tensors (or parameters), with no gradient to record. The op's eager
    dispatch (its autograd wrapper, redispatch, schema and aliasing checks) costs more host time than a launch;
    the op stays what a trace sees, and what records the backward."""
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return False
    grad = torch.is_grad_enabled()
    return all(t is None or (type(t) in _PLAIN_TENSORS and not (grad and t.requires_grad)) for t in tensors)


def float64_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kind: str,
                      q_weight: torch.Tensor | None = None, k_weight: torch.Tensor | None = None,
                      eps: float = 1e-6) -> torch.Tensor:  # fmt: skip
    """The same function entirely in float64 (O(N F D), differentiable), the reference the kernels and the
    torch path are checked against at sizes where the O(N^2) :func:`naive_linear_attention` does not fit."""

    def phi(x: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        x = x.double()
        if kind == "hedgehog":
            x = x if weight is None else torch.einsum("bhnd,hde->bhne", x, weight.double())
            return torch.cat([x.softmax(dim=-1), (-x).softmax(dim=-1)], dim=-1)
        return F.relu(x) if kind == "relu" else F.elu(x) + 1

    phi_q, phi_k = phi(q, q_weight), phi(k, k_weight)
    numerator = phi_q @ (phi_k.transpose(-2, -1) @ v.double())
    return numerator / (phi_q @ phi_k.sum(dim=-2).unsqueeze(-1) + eps)
