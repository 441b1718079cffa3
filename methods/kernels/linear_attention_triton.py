"""Non-causal linear attention on CUDA in Triton, with the feature map fused into the kernels.

Computes what :func:`methods.kernels.linear_attention.linear_attention` computes from
``q_map(q)`` and ``k_map(k)`` (the torch path, which stays the CPU path and the reference),

    out_i = phi_q(q_i) S / (phi_q(q_i) . z + eps),   S = sum_j phi_k(k_j)^T v_j,   z = sum_j phi_k(k_j),

for the maps ``hedgehog`` (``[softmax(x W), softmax(-x W)]``, W per head), ``relu`` and ``elu`` (+ 1).
``taylor`` (1 + D + D^2 features per head) stays in torch. phi(q) and phi(k) never reach memory: every
kernel recomputes them from the token tile it loads (and W).

Kernels, each looping over the token blocks of one chunk of the sequence so that W and the state are
loaded once per program and the token axis is split over enough programs to fill the GPU; hedgehog's
two feature halves ``softmax(+-x W)`` go to separate, adjacent programs where that keeps registers low:

- :func:`_gram_partials`: per (half, chunk, batch x head) ``phi(x)^T y`` and ``sum phi(x)`` (fp32),
  summed over chunks on the host: the state ``S, z`` (x = k, y = v) and W's gradient ``x^T dp``
  (identity map).
- :func:`_output`: phi(q), ``phi(q) S`` and the normaliser ``den``; the output (and den, for the backward).
- :func:`_query_grads`: from the saved output and den, ``g = dout / den`` and ``c = -(dout . out) / den``;
  the state's gradients ``dS = sum phi(q)^T g``, ``dz = sum c phi(q)`` and dL/d(q W) per half.
- :func:`_key_grads`: dv per half ``phi(k) dS`` and dL/d(k W) per half from ``v dS^T + dz``.

The halves' dv and dL/dp are summed, and dL/dp taken through the projection (``dp (I + dW)^T``), by
torch on the host (a few bf16 passes over ``(B, H, N, D)``).

Precision: bf16/fp16 operands with fp32 accumulation. The state is accumulated in fp32 and rounded
once to the operand dtype where it enters a product (relative 2^-9 in bf16, the size of the output's
own rounding); the normaliser stays fp32. Hedgehog's projection is computed as ``x + x (W - I)``, so
the identity part is exact and only the learned change is rounded to the operand dtype. The weight
gradients are fp32.

Shapes: q ``(B, H, N, D)``, k and v ``(B, H, M, D)`` (any strides with a contiguous last axis),
``D <= 128``; the output ``(B, H, N, D)`` in the compute dtype.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F

from harness.errors import HarnessError
from methods.kernels.linear_attention import EluFeatureMap, FeatureMap, HedgehogFeatureMap, ReluFeatureMap

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs (CI): every call takes the torch path
    triton = tl = None

FUSED_KERNELS: tuple[str, ...] = ("hedgehog", "relu", "elu")
BACKEND_ENV = "BENCH_LINEAR_BACKEND"
BACKENDS: tuple[str, ...] = ("auto", "torch", "triton")
BACKEND_NOTE = (
    f"linear attention on CUDA: fused Triton kernel for {', '.join(FUSED_KERNELS)} (taylor runs in torch); "
    f"{BACKEND_ENV}=torch forces the torch path"
)
MAX_HEAD_DIM = 128
# Map codes inside the kernels (constexpr KIND); IDENTITY serves the weight-gradient reduction x^T dp.
KIND_CODES = {"hedgehog": 0, "relu": 1, "elu": 2}
IDENTITY = 3
_MAP_KINDS: dict[type[FeatureMap], str] = {HedgehogFeatureMap: "hedgehog", ReluFeatureMap: "relu", EluFeatureMap: "elu"}
# The Triton interpreter (TRITON_INTERPRET=1, CPU tensors) cannot time configurations: one small one.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# (BLOCK_N, num_warps, num_stages) per kernel; the autotuner keeps the fastest. Chosen from ptxas's report
# for sm_90 (head dim 128, hedgehog, the heaviest map): none spills more than a few bytes, and each list
# mixes wgmma tiles with a light mma.sync one.
REDUCE_CONFIGS = ((32, 8, 2), (128, 8, 2), (64, 4, 2))
OUTPUT_CONFIGS = ((128, 8, 2), (32, 8, 2), (32, 4, 2))
QUERY_CONFIGS = ((32, 8, 2), (64, 8, 2))
KEY_CONFIGS = ((64, 8, 2), (32, 8, 2), (64, 4, 2))
INTERPRETER_CONFIGS = ((16, 4, 1),)
# Programs per multiprocessor that the chunking aims at (a few waves keep every SM busy to the end).
PROGRAMS_PER_SM = 4


def _kernel(configs: tuple[tuple[int, int, int], ...]) -> Any:
    """``triton.autotune`` over ``configs`` (BLOCK_N, num_warps, num_stages) around ``triton.jit``; without
    Triton the plain function, which is never launched."""
    if triton is None:
        return lambda fn: fn
    chosen = INTERPRETER_CONFIGS if INTERPRETED else configs
    tuned = [triton.Config({"BLOCK_N": block}, num_warps=warps, num_stages=stages) for block, warps, stages in chosen]
    autotune = triton.autotune(configs=tuned, key=["BLOCK_D", "KIND", "HAS_W", "HAS_C", "STORE_DP", "NH"],
                               prune_configs_by={"early_config_prune": _prune})  # fmt: skip
    return lambda fn: autotune(triton.jit(fn))


def _prune(configs: list[Any], named_args: dict[str, Any], **kwargs: Any) -> list[Any]:
    """Small heads (toy models, BLOCK_D < 128) take the first configuration untimed: each tuned one costs a
    compile, and their calls are too small for the choice to matter."""
    return configs if kwargs.get("BLOCK_D", MAX_HEAD_DIM) >= MAX_HEAD_DIM else configs[:1]


def _jit(fn: Any) -> Any:
    return fn if triton is None else triton.jit(fn)


def _chunk_alignment(configs: tuple[tuple[int, int, int], ...]) -> int:
    """Chunks are whole multiples of every configuration's block, so no block straddles two chunks."""
    return max(block for block, _, _ in (INTERPRETER_CONFIGS if INTERPRETED else configs))


# -- kernels ------------------------------------------------------------------------------------


@_jit
def _project(x, w, HAS_W: tl.constexpr):
    """``x (T, BD)`` -> ``x + x (W - I)`` in fp32; ``w`` holds ``W - I`` in the operand dtype."""
    p = x.to(tl.float32)
    if HAS_W:
        p += tl.dot(x, w)
    return p


@_jit
def _phi(p, sign, inside, KIND: tl.constexpr):
    """Features ``(T, BD)`` fp32 from the projected tile: hedgehog's ``softmax(sign p)`` over the real
    columns (``inside``), relu, elu + 1 (0 in padding columns), or ``p`` itself (IDENTITY)."""
    if KIND == 0:
        s = tl.where(inside[None, :], p * sign, float("-inf"))
        e = tl.exp(s - tl.max(s, axis=1)[:, None])
        phi = e * (1.0 / tl.sum(e, axis=1))[:, None]
    elif KIND == 1:
        phi = tl.maximum(p, 0.0)
    elif KIND == 2:
        phi = tl.where(inside[None, :], tl.where(p > 0, p + 1.0, tl.exp(tl.minimum(p, 0.0))), 0.0)
    else:
        phi = p
    return phi


@_jit
def _phi_grad(p, phi, dphi, sign, KIND: tl.constexpr):
    """dL/dp for ``phi = _phi(p, sign)`` given dL/dphi, all ``(T, BD)`` fp32."""
    if KIND == 0:
        dp = sign * phi * (dphi - tl.sum(dphi * phi, axis=1)[:, None])
    elif KIND == 1:
        dp = tl.where(p > 0, dphi, 0.0)
    else:  # elu + 1: phi = exp(p) where p <= 0 (and 0 in padding columns)
        dp = tl.where(p > 0, dphi, dphi * phi)
    return dp


@_jit
def _square(ptr, cols, BLOCK_D: tl.constexpr):
    """One ``(BD, BD)`` row-major tile."""
    return tl.load(ptr + cols[:, None] * BLOCK_D + cols[None, :])


@_jit
def _square_t(ptr, cols, BLOCK_D: tl.constexpr):
    """The transpose of one ``(BD, BD)`` row-major tile."""
    return tl.load(ptr + cols[None, :] * BLOCK_D + cols[:, None])


@_jit
def _weight(w_ptr, h, cols, dtype, HAS_W: tl.constexpr, BLOCK_D: tl.constexpr):
    """Head h's ``W - I`` tile, or an unread placeholder without HAS_W."""
    return _square(w_ptr + h * BLOCK_D * BLOCK_D, cols, BLOCK_D) if HAS_W else tl.zeros((BLOCK_D, BLOCK_D), dtype)


@_jit
def _program(H):
    """``(half, chunk, bh, b, h, sign)`` of a program on the grid ``(halves, chunks, B * H)``; ``sign`` picks
    hedgehog's feature half (+1: softmax(x W), -1: softmax(-x W))."""
    half, chunk, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    return half, chunk, bh, (bh // H).to(tl.int64), (bh % H).to(tl.int64), 1.0 - 2.0 * half.to(tl.float32)


@_jit
def _block(start, rows, N, inside):
    """Token indices ``n`` of one block, the rows that exist, and the tile mask (rows x real columns)."""
    n = start + rows
    valid = n < N
    return n, valid, valid[:, None] & inside[None, :]


@_jit
def _rows(base, n, stride, cols, mask):
    """The ``(BLOCK_N, BD)`` tile of tokens n from a token-major matrix at ``base`` (zeros outside ``mask``)."""
    return tl.load(base + n[:, None] * stride + cols[None, :], mask=mask, other=0.0)


@_jit
def _store_partial(s_ptr, z_ptr, acc, zacc, cols, BLOCK_D: tl.constexpr):
    """This program's ``(BD, BD)`` and ``(BD,)`` partial sums, at row ``(half, chunk, bh)``."""
    row = (tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(2) + tl.program_id(2)
    row = row.to(tl.int64)
    tl.store(s_ptr + row * BLOCK_D * BLOCK_D + cols[:, None] * BLOCK_D + cols[None, :], acc)
    tl.store(z_ptr + row * BLOCK_D + cols, zacc)


@_kernel(REDUCE_CONFIGS)
def _gram_partials(x_ptr, y_ptr, w_ptr, s_ptr, z_ptr, H, N, D: tl.constexpr, CHUNK,
                   sxb, sxh, sxn, syb, syh, syn,
                   KIND: tl.constexpr, HAS_W: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """Program (half, chunk, b * H + h): over the chunk's tokens n, ``sum phi(x_n)^T y_n`` ``(BD, BD)`` and
    ``sum phi(x_n)`` ``(BD,)`` into row ``(half, chunk, bh)`` of s and z (the halves run side by side, so
    their shared reads of x and y hit the L2)."""
    _, chunk, _, b, h, sign = _program(H)
    rows, cols = tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_D)
    inside = cols < D
    x_base, y_base = x_ptr + b * sxb + h * sxh, y_ptr + b * syb + h * syh
    w = _weight(w_ptr, h, cols, x_ptr.dtype.element_ty, HAS_W, BLOCK_D)
    acc = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
    zacc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for offset in range(0, CHUNK, BLOCK_N):
        n, valid, mask = _block(chunk * CHUNK + offset, rows, N, inside)
        x, y = _rows(x_base, n, sxn, cols, mask), _rows(y_base, n, syn, cols, mask)
        phi = tl.where(valid[:, None], _phi(_project(x, w, HAS_W), sign, inside, KIND), 0.0)
        zacc += tl.sum(phi, axis=0)
        acc = tl.dot(tl.trans(phi.to(y_ptr.dtype.element_ty)), y, acc)
    _store_partial(s_ptr, z_ptr, acc, zacc, cols, BLOCK_D)


@_kernel(OUTPUT_CONFIGS)
def _output(q_ptr, w_ptr, s_ptr, z_ptr, o_ptr, den_ptr, H, N, D: tl.constexpr, CHUNK, eps,
            sqb, sqh, sqn,
            KIND: tl.constexpr, HAS_W: tl.constexpr, NH: tl.constexpr,
            BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """Program (0, chunk, b * H + h): ``out = phi(q) S / den`` with ``den = phi(q) . z + eps`` for the chunk's
    tokens; out ``(B, H, N, D)`` contiguous, den ``(B * H, N)`` fp32 (kept for the backward)."""
    _, chunk, bh, b, h, _ = _program(H)
    rows, cols = tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_D)
    inside = cols < D
    dtype = s_ptr.dtype.element_ty
    q_base, o_base = q_ptr + b * sqb + h * sqh, o_ptr + bh.to(tl.int64) * N * D
    w = _weight(w_ptr, h, cols, dtype, HAS_W, BLOCK_D)
    state = bh.to(tl.int64) * NH
    s0, z0 = _square(s_ptr + state * BLOCK_D * BLOCK_D, cols, BLOCK_D), tl.load(z_ptr + state * BLOCK_D + cols)
    if NH == 2:
        s1 = _square(s_ptr + (state + 1) * BLOCK_D * BLOCK_D, cols, BLOCK_D)
        z1 = tl.load(z_ptr + (state + 1) * BLOCK_D + cols)
    for offset in range(0, CHUNK, BLOCK_N):
        n, valid, mask = _block(chunk * CHUNK + offset, rows, N, inside)
        p = _project(_rows(q_base, n, sqn, cols, mask), w, HAS_W)
        phi = _phi(p, 1.0, inside, KIND)
        num = tl.dot(phi.to(dtype), s0)
        den = tl.sum(phi * z0[None, :], axis=1) + eps
        if NH == 2:
            phi = _phi(p, -1.0, inside, KIND)
            num = tl.dot(phi.to(dtype), s1, num)
            den += tl.sum(phi * z1[None, :], axis=1)
        out = num * (1.0 / den)[:, None]
        tl.store(o_base + n[:, None] * D + cols[None, :], out.to(o_ptr.dtype.element_ty), mask=mask)
        tl.store(den_ptr + bh.to(tl.int64) * N + n, den, mask=valid)


@_kernel(QUERY_CONFIGS)
def _query_grads(q_ptr, do_ptr, o_ptr, den_ptr, w_ptr, s_ptr, z_ptr, dp_ptr, ds_ptr, dz_ptr, H, N,
                 D: tl.constexpr, CHUNK, sqb, sqh, sqn, sdb, sdh, sdn,
                 KIND: tl.constexpr, HAS_W: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """Program (half, chunk, b * H + h), per query token of the chunk, with the saved ``out`` and ``den``:
    ``g = dout / den`` (dL/d numerator), ``c = -(dout . out) / den`` (dL/d den), ``dphi = g S^T + c z`` for
    this half's features, and dp (dL/d projected q, bf16) into ``dp[half]`` ``(NH, B, H, N, BD)``; and the
    state's gradients ``sum phi^T g``, ``sum c phi`` into row ``(half, chunk, bh)`` of ds and dz."""
    half, chunk, bh, b, h, sign = _program(H)
    rows, cols = tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_D)
    inside = cols < D
    dtype = s_ptr.dtype.element_ty
    q_base, do_base = q_ptr + b * sqb + h * sqh, do_ptr + b * sdb + h * sdh
    o_base = o_ptr + bh.to(tl.int64) * N * D
    dp_base = dp_ptr + (half * tl.num_programs(2) + bh).to(tl.int64) * N * BLOCK_D
    w = _weight(w_ptr, h, cols, dtype, HAS_W, BLOCK_D)
    state = bh.to(tl.int64) * tl.num_programs(0) + half
    s_t, z = _square_t(s_ptr + state * BLOCK_D * BLOCK_D, cols, BLOCK_D), tl.load(z_ptr + state * BLOCK_D + cols)
    acc = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
    zacc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for offset in range(0, CHUNK, BLOCK_N):
        n, valid, mask = _block(chunk * CHUNK + offset, rows, N, inside)
        p = _project(_rows(q_base, n, sqn, cols, mask), w, HAS_W)
        phi = tl.where(valid[:, None], _phi(p, sign, inside, KIND), 0.0)
        inv_den = 1.0 / tl.load(den_ptr + bh.to(tl.int64) * N + n, mask=valid, other=1.0)
        dout = _rows(do_base, n, sdn, cols, mask).to(tl.float32)
        out = _rows(o_base, n, D, cols, mask).to(tl.float32)
        c = -tl.sum(dout * out, axis=1) * inv_den
        g = (dout * inv_den[:, None]).to(dtype)
        acc = tl.dot(tl.trans(phi.to(dtype)), g, acc)
        zacc += tl.sum(phi * c[:, None], axis=0)
        dp = _phi_grad(p, phi, tl.dot(g, s_t) + c[:, None] * z[None, :], sign, KIND)
        tl.store(dp_base + n[:, None] * BLOCK_D + cols[None, :], dp.to(dtype), mask=valid[:, None])
    _store_partial(ds_ptr, dz_ptr, acc, zacc, cols, BLOCK_D)


@_kernel(KEY_CONFIGS)
def _key_grads(k_ptr, v_ptr, w_ptr, ds_ptr, dz_ptr, dp_ptr, dv_ptr, H, M, D: tl.constexpr, CHUNK,
               skb, skh, skn, svb, svh, svn,
               KIND: tl.constexpr, HAS_W: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """Program (half, chunk, b * H + h), per key token of the chunk, for this half's features: the value
    gradient ``phi dS`` into ``dv[half]`` ``(NH, B, H, M, D)`` and dp (dL/d projected k) from
    ``dphi = v dS^T + dz`` into ``dp[half]`` ``(NH, B, H, M, BD)``, both in the compute dtype."""
    half, chunk, bh, b, h, sign = _program(H)
    rows, cols = tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_D)
    inside = cols < D
    dtype = ds_ptr.dtype.element_ty
    k_base, v_base = k_ptr + b * skb + h * skh, v_ptr + b * svb + h * svh
    slot = (half * tl.num_programs(2) + bh).to(tl.int64)
    dp_base, dv_base = dp_ptr + slot * M * BLOCK_D, dv_ptr + slot * M * D
    w = _weight(w_ptr, h, cols, dtype, HAS_W, BLOCK_D)
    state = bh.to(tl.int64) * tl.num_programs(0) + half
    ds, dz = _square(ds_ptr + state * BLOCK_D * BLOCK_D, cols, BLOCK_D), tl.load(dz_ptr + state * BLOCK_D + cols)
    ds_t = _square_t(ds_ptr + state * BLOCK_D * BLOCK_D, cols, BLOCK_D)
    for offset in range(0, CHUNK, BLOCK_N):
        n, valid, mask = _block(chunk * CHUNK + offset, rows, M, inside)
        y = _rows(v_base, n, svn, cols, mask)
        p = _project(_rows(k_base, n, skn, cols, mask), w, HAS_W)
        phi = _phi(p, sign, inside, KIND)
        dv = tl.dot(phi.to(dtype), ds)
        tl.store(dv_base + n[:, None] * D + cols[None, :], dv.to(dv_ptr.dtype.element_ty), mask=mask)
        dp = _phi_grad(p, phi, tl.dot(y, ds_t) + dz[None, :], sign, KIND)
        tl.store(dp_base + n[:, None] * BLOCK_D + cols[None, :], dp.to(dtype), mask=valid[:, None])


# -- launches -------------------------------------------------------------------------------------


def _block_d(head_dim: int) -> int:
    """Columns of a tile: the head dimension rounded up to a power of two, at least 16 (tl.dot's minimum)."""
    return max(16, 1 << (head_dim - 1).bit_length())


def _chunking(tokens: int, rows: int, device: torch.device, alignment: int) -> tuple[int, int]:
    """``(chunks, chunk)``: the token axis cut into chunks of ``chunk`` tokens (a multiple of ``alignment``)
    so that ``chunks x rows`` programs fill the device a few times over."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2
    chunks = max(1, min(triton.cdiv(tokens, alignment), triton.cdiv(PROGRAMS_PER_SM * sms, rows)))
    chunk = triton.cdiv(triton.cdiv(tokens, chunks), alignment) * alignment
    return triton.cdiv(tokens, chunk), chunk


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _last_axis_contiguous(x: torch.Tensor) -> torch.Tensor:
    """The kernels take any batch, head and token strides but read each token's row as one contiguous run."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _weight_operand(weight: torch.Tensor | None, block_d: int, dtype: torch.dtype) -> torch.Tensor | None:
    """``W - I`` ``(H, BD, BD)`` in ``dtype``, zero-padded; the kernels add the identity back exactly."""
    if weight is None:
        return None
    heads, dim, _ = weight.shape
    padded = weight.new_zeros(heads, block_d, block_d, dtype=dtype)
    padded[:, :dim, :dim] = weight.detach() - torch.eye(dim, device=weight.device, dtype=weight.dtype)
    return padded


def _gram(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None, kind: int, nh: int
          ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(sum_n phi(x_n)^T y_n, sum_n phi(x_n))`` per (batch x head, half): ``(B*H, nh, BD, BD)`` and
    ``(B*H, nh, BD)`` fp32, for x ``(B, H, N, D)`` and y ``(B, H, N, >= D)`` (columns past D ignored)."""
    batch, heads, tokens, dim = x.shape
    block_d = _block_d(dim)
    chunks, chunk = _chunking(tokens, batch * heads * nh, x.device, _chunk_alignment(REDUCE_CONFIGS))
    s = torch.empty(nh, chunks, batch * heads, block_d, block_d, device=x.device, dtype=torch.float32)
    z = torch.empty(nh, chunks, batch * heads, block_d, device=x.device, dtype=torch.float32)
    _gram_partials[(nh, chunks, batch * heads)](
        x, y, x if w is None else w, s, z, heads, tokens, dim, chunk, *_strides(x), *_strides(y),
        KIND=kind, HAS_W=w is not None, BLOCK_D=block_d,
    )  # fmt: skip
    return _per_head(s), _per_head(z)


def _per_head(partials: torch.Tensor) -> torch.Tensor:
    """Partial sums ``(nh, chunks, B*H, ...)`` -> totals ``(B*H, nh, ...)``, the layout the kernels read."""
    return partials.sum(1).transpose(0, 1).contiguous()


def _grid(x: torch.Tensor, halves: int, configs: tuple[tuple[int, int, int], ...]) -> tuple[tuple[int, ...], int]:
    """Grid ``(halves, chunks, B*H)`` and chunk length of a per-token kernel over x ``(B, H, N, D)``."""
    batch, heads, tokens, _ = x.shape
    chunks, chunk = _chunking(tokens, batch * heads * halves, x.device, _chunk_alignment(configs))
    return (halves, chunks, batch * heads), chunk


def _through_projection(x: torch.Tensor, dp_halves: torch.Tensor, delta: torch.Tensor | None,
                        weight: torch.Tensor | None, want_weight: bool,
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """dL/dx ``(B, H, N, D)`` and dL/dW ``(H, D, D)`` (fp32 sums, in W's dtype; None unless wanted) from dL/dp
    per feature half ``(nh, B, H, N, BD)``, for ``p = x (I + delta)``."""
    batch, heads, _, dim = x.shape
    dp = dp_halves[0] if dp_halves.shape[0] == 1 else dp_halves.sum(0)
    dx = dp if delta is None else dp + dp @ delta.transpose(-1, -2)
    if weight is None or not want_weight:
        return dx[..., :dim], None
    gram, _ = _gram(x, dp, None, IDENTITY, 1)
    return dx[..., :dim], gram.view(batch, heads, *gram.shape[-2:]).sum(0)[:, :dim, :dim].to(weight.dtype)


class _FusedLinearAttention(torch.autograd.Function):
    """Autograd of the fused kernels; inputs already in the compute dtype, weights ``(H, D, D)`` (fp32)."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_weight: torch.Tensor | None,
                k_weight: torch.Tensor | None, kind: str, eps: float) -> torch.Tensor:  # fmt: skip
        code, nh = KIND_CODES[kind], 2 if kind == "hedgehog" else 1
        batch, heads, tokens, dim = q.shape
        block_d, dtype = _block_d(dim), q.dtype
        state, normaliser = _gram(k, v, _weight_operand(k_weight, block_d, dtype), code, nh)
        out = torch.empty(q.shape, device=q.device, dtype=dtype)
        den = torch.empty(batch * heads, tokens, device=q.device, dtype=torch.float32)
        wq = _weight_operand(q_weight, block_d, dtype)
        grid, chunk = _grid(q, 1, OUTPUT_CONFIGS)  # both halves in each program
        _output[grid](
            q, q if wq is None else wq, state.to(dtype), normaliser, out, den, heads, tokens, dim, chunk, eps,
            *_strides(q), KIND=code, HAS_W=wq is not None, NH=nh, BLOCK_D=block_d,
        )  # fmt: skip
        ctx.save_for_backward(q, k, v, q_weight, k_weight, state, normaliser, out, den)
        ctx.kind = kind
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, q_weight, k_weight, state, normaliser, out, den = ctx.saved_tensors
        grad_out = _last_axis_contiguous(grad_out)
        code, nh = KIND_CODES[ctx.kind], 2 if ctx.kind == "hedgehog" else 1
        batch, heads, tokens, dim = q.shape
        key_tokens, block_d, dtype = k.shape[2], _block_d(dim), q.dtype
        wq, wk = _weight_operand(q_weight, block_d, dtype), _weight_operand(k_weight, block_d, dtype)

        dp_q = torch.empty(nh, batch, heads, tokens, block_d, device=q.device, dtype=dtype)
        grid, chunk = _grid(q, nh, QUERY_CONFIGS)
        d_state = torch.empty(*grid, block_d, block_d, device=q.device, dtype=torch.float32)
        d_normaliser = torch.empty(*grid, block_d, device=q.device, dtype=torch.float32)
        _query_grads[grid](
            q, grad_out, out, den, q if wq is None else wq, state.to(dtype), normaliser, dp_q, d_state, d_normaliser,
            heads, tokens, dim, chunk, *_strides(q), *_strides(grad_out),
            KIND=code, HAS_W=wq is not None, BLOCK_D=block_d,
        )  # fmt: skip

        dp_k = torch.empty(nh, batch, heads, key_tokens, block_d, device=k.device, dtype=dtype)
        dv_halves = torch.empty(nh, *v.shape, device=v.device, dtype=dtype)
        grid, chunk = _grid(k, nh, KEY_CONFIGS)
        _key_grads[grid](
            k, v, k if wk is None else wk, _per_head(d_state).to(dtype), _per_head(d_normaliser), dp_k, dv_halves,
            heads, key_tokens, dim, chunk, *_strides(k), *_strides(v),
            KIND=code, HAS_W=wk is not None, BLOCK_D=block_d,
        )  # fmt: skip
        dq, dwq = _through_projection(q, dp_q, wq, q_weight, ctx.needs_input_grad[3])
        dk, dwk = _through_projection(k, dp_k, wk, k_weight, ctx.needs_input_grad[4])
        dv = dv_halves[0] if nh == 1 else dv_halves.sum(0)
        return dq, dk, dv, dwq, dwk, None, None


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
    ``cpu`` under the Triton interpreter (tests)."""
    if triton is None:
        return "triton is not installed"
    if {t.device.type for t in (q, k, v)} != {device_type}:
        return f"inputs are not all on {device_type}"
    kind = map_kind(q_map)
    if kind is None or map_kind(k_map) != kind:
        return (f"feature maps {type(q_map).__name__}/{type(k_map).__name__} run in torch; the kernel fuses "
                f"{', '.join(FUSED_KERNELS)} (taylor's 1 + D + D^2 features stay in torch)")  # fmt: skip
    if compute_dtype(q, k, v) is None:
        return f"inputs are {q.dtype}/{k.dtype}/{v.dtype}: the kernel computes in fp16 or bf16 (or under autocast)"
    if q.dim() != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        return f"shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} are not (B, H, N, D), (B, H, M, D)"
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head_dim {q.shape[-1]} > {MAX_HEAD_DIM}"
    for side in (q_map, k_map):
        if isinstance(side, HedgehogFeatureMap) and (side.heads, side.head_dim) != (q.shape[1], q.shape[-1]):
            return f"the hedgehog map was built for {side.heads} heads of {side.head_dim}"  # torch raises the error
    return None


def use_fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_map: FeatureMap, k_map: FeatureMap) -> bool:
    """Whether this call runs the fused kernel: ``$BENCH_LINEAR_BACKEND`` ``auto`` (default: when it can),
    ``torch`` (never, for A/B comparison) or ``triton`` (always; HarnessError when it cannot)."""
    backend = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if backend not in BACKENDS:
        raise HarnessError(f"{BACKEND_ENV} must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "torch":
        return False
    reason = unsupported_reason(q, k, v, q_map, k_map)
    if reason is not None and backend == "triton":
        raise HarnessError(f"{BACKEND_ENV}=triton but the fused linear attention cannot run: {reason}")
    return reason is None


def fused_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_map: FeatureMap,
                           k_map: FeatureMap, eps: float = 1e-6) -> torch.Tensor:  # fmt: skip
    """``linear_attention(q_map(q), k_map(k), v, eps)`` through the fused kernels, differentiable in q, k, v
    and hedgehog's weights. Inputs are cast to :func:`compute_dtype`; returns ``(B, H, N, D)`` in v's dtype.
    The caller checks :func:`unsupported_reason` first (:func:`use_fused` does)."""
    out_dtype, dtype = v.dtype, compute_dtype(q, k, v)
    q, k, v = (_last_axis_contiguous(t.to(dtype)) for t in (q, k, v))
    out = _FusedLinearAttention.apply(q, k, v, getattr(q_map, "weight", None), getattr(k_map, "weight", None),
                                      map_kind(q_map), eps)  # fmt: skip
    return out.to(out_dtype)


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
