"""Block-sparse attention over listed key blocks on CUDA in Triton: each query block streams only its kept key
blocks, whole, in the pattern's own block size (SLA's 64 tokens included).

Computes what :func:`methods.kernels.block_sparse.masked_dense_attention` computes for a block-level pattern (every
kept tile full; the reference it is tested against): per group g (one (batch, head) pair) query block i, tokens
``[i b, (i + 1) b)``, attends to the tokens of the key blocks its row keeps, ``softmax(q k^T / sqrt(D)) v`` over
exactly those keys, FlashAttention's online softmax in fp32 (exp2, scale folded in). The kept key blocks of (g, i)
come as a list, ``lists[g, i, :counts[g, i]]`` int32, ascending (:func:`block_lists` builds it from a tile table; a
method that ranks blocks has it already, SLA's critical blocks, and sorts it).

Why a kernel of our own: SLA (Zhang et al., 2025, Sec. 4) keeps 5% of 64 x 64 blocks at Wan 1.3B, and its own
kernel (thu-ml/SLA, Triton) streams each query block's critical key blocks from such a list. Flex computes the same
tiles at 3.8x density x cuDNN (reports/gpu/h200/run_096045e/, BLOCK 64 options), FlashInfer's BSR wrapper runs
64-row blocks in its 128-row tiles. One program per (query block, group):

- the query block's tile ``(b, D)`` stays in registers;
- per step, ``PAIRS`` listed key blocks (one key tile of ``PAIRS b`` rows: a wider product, half the softmax
  rescales per key at 2) are loaded by pointers (``cp.async``), or with ``TMA`` and ``PAIRS`` 1 through tensor
  descriptors (Hopper's copy engine; a whole block is one contiguous ``(b, D)`` box);
- without ``WS``, each step's keys past N (the ragged last block) are masked to -inf (with pointer loads a list
  entry past the count too);
- with ``WS`` (descriptor loads), the key loop is warp-specialised by Triton (``tl.range(warp_specialize=True)``:
  on Hopper, producer warps issue the descriptor loads into a ring of shared-memory stages while one warpgroup
  computes), q and the output go through descriptors, and every listed block but the sequence's ragged last one
  (the row's last entry, the lists ascending) runs without a column mask; that one runs in a second launch
  (:func:`_ragged_block`), masked to its tokens below N and merged by log-sum-exp.

Query rows of a block that keeps no key get zeros (masked dense gives NaN; no method makes such a block).

Shapes: q, k, v ``(B, H, N, D)`` fp16 or bf16, one dtype, any strides with a contiguous last axis, ``D <= 128``;
``lists (B or 1, H or 1, R, L)`` int32 and ``counts (B or 1, H or 1, R)`` int32 with ``R = ceil(N / b)`` (a table
shared by every batch item or head is read in place, not copied). Returns ``(B, H, N, D)`` contiguous in q's dtype.
Forward only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from harness.errors import HarnessError
from methods.kernels import (
    INTERPRETED,
    descriptor_aligned,
    kernel_op,
    last_axis_contiguous,
    tile_columns,
    triton_jit,
    use_descriptor_scratch,
)
from methods.kernels.attention_states import accumulate_tile
from methods.kernels.block_sparse import BlockSparsePattern

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs (CI): the backend is refused there
    triton = tl = None

MAX_HEAD_DIM = 128
#: Where a pattern keeps its lists (:attr:`BlockSparsePattern.backend_plans`).
LISTS_KEY = ("block-lists",)
#: Block sizes the kernel takes: powers of two, ``tl.arange``'s sizes, from ``tl.dot``'s smallest to 128 (a larger
#: block's tile overflows shared memory at D = 128).
BLOCK_SIZES = (16, 32, 64, 128)


class Config(NamedTuple):
    """A launch of :func:`_attention`: key blocks per step, warps, pipeline stages, tensor-descriptor loads, and
    Triton's automatic warp specialisation of the key loop (Hopper: producer warps issue the descriptor loads while
    one warpgroup computes; it applies to 4-warp programs, descriptor loads only). A specialised program also reads
    q and writes the output through descriptors, runs whole blocks with no column mask and leaves a listed ragged
    last block to a second launch (:func:`_ragged_block`); where q or the output's rows are not 16-byte aligned it
    runs as the unspecialised one."""

    pairs: int
    num_warps: int
    num_stages: int
    tma: bool = False
    ws: bool = False

    @property
    def name(self) -> str:
        """``2x4x3`` (``t`` appended for descriptor loads, ``w`` for warp specialisation)."""
        return "x".join(map(str, self[:3])) + ("t" if self.tma else "") + ("w" if self.ws else "")


#: The configuration per block size: the fastest of the H200 sweeps (harness.benchmarks.block_list_gpu at Wan 1.3B and
#: 14B on SLA's critical blocks and on random tables at density 0.3). 64 tokens (run_fd15a60): descriptor loads in 3
#: stages, 4 warps (112 KB of shared memory); they beat the pointer loads of the same tiles by 1.33-1.44x, two blocks
#: a step (8 warps) lost (2x). Warp-specialised 64-token programs, on Triton 3.6, gave NaN in 3 and 4 stages (with a
#: finite initial maximum too) and took 1.8x the time of 1x4x3t in 2; at 8 warps Triton does not specialise the loop
#: (run_3f2b77d, run_62c9eb5, run_1368e1f). Of 64-token blocks' ~1.35-1.45x their ideal about half is the softmax
#: beside the products: the same loop without it ran at 1.17x / 1.15x, its loads drawing 7.6-7.8 TB/s from L2 (the
#: tiles' bytes over the time) against 6.5-6.6 with it (run_1368e1f/l2_probe); outside warp specialisation Triton
#: waits for each product before the softmax, so no product overlaps it. 128 tokens (run_62c9eb5): the
#: warp-specialised 4-warp program in 2 stages (192 KB), **1.01x / 1.03x the ideal** (density x pinned cuDNN) on the
#: random tables against 1.26x / 1.22x for 8 warps in 3 stages, the earlier choice; its whole key blocks unmasked
#: (1.15x in the probe with a mask on every block, run_eeedd2b). 16 and 32 take 64's (compiled for sm_90 without
#: spills, not timed).
BEST_CONFIGS = {16: Config(1, 4, 3, True), 32: Config(1, 4, 3, True), 64: Config(1, 4, 3, True),
                128: Config(1, 4, 2, True, True)}  # fmt: skip
#: Where a warp-specialised configuration was checked: Triton's release series and the GPU's compute capability. The
#: schedule is Triton's own pass, which differs by version and architecture (on 3.6 / sm_90 it gave NaN for 64-token
#: key tiles in 3 stages and stored a loop's initial state from a pointer store after it), so elsewhere the block
#: size takes its unspecialised configuration (:data:`UNSPECIALISED`).
WS_CHECKED = (("3.6", (9, 0)),)
#: 128-token blocks without warp specialisation: 8 warps, 3 stages (1.22-1.26x the ideal in run_62c9eb5).
UNSPECIALISED = {128: Config(1, 8, 3, True)}


@triton_jit
def _attention(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, lists_ptr, counts_ptr, scale, H, N, NP, L,
               sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, slb, slh, slr, scb, sch,
               D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr, PAIRS: tl.constexpr,
               TMA: tl.constexpr, WS: tl.constexpr, SPLIT: tl.constexpr):  # fmt: skip
    """Program (i, g): query block i of group g = (b, h) over its listed key blocks ``lists[b, h, i, :counts[b, h,
    i]]`` (strides slb, slh, slr, 1 and scb, sch, 1: 0 where a table is shared by every batch item or head; a count
    above the lists' length L reads L entries). ``scale`` is ``log2(e) / sqrt(D)``; the output ``(B * H, N, D)``
    contiguous. With ``SPLIT`` (``WS``, N not a multiple of BLOCK) a listed ragged last block is left to
    :func:`_ragged_block` and each row's base-2 log-sum-exp goes to ``lse (B * H, NP)`` fp32 for it (NP: N rounded
    up to whole blocks, each group's row 16-byte aligned for its descriptor)."""
    i, g = tl.program_id(0), tl.program_id(1)
    b, h = (g // H).to(tl.int64), (g % H).to(tl.int64)
    count = tl.minimum(tl.load(counts_ptr + b * scb + h * sch + i), L)  # never past the row's own list
    listed = lists_ptr + b * slb + h * slh + i * slr
    k_base, v_base = k_ptr + b * skb + h * skh, v_ptr + b * svb + h * svh
    o_base = o_ptr + g.to(tl.int64) * N * D
    m_i = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK,), dtype=tl.float32)
    acc = tl.zeros((BLOCK, BLOCK_D), dtype=tl.float32)
    if WS:  # descriptor loads (the op's condition)
        # Every read and write a whole box, no column mask: Triton specialises the loop only where nothing but the
        # epilogue follows it (compiled for sm_90: a masked step after or before it undid the specialisation).
        q_desc = tl.make_tensor_descriptor(q_ptr + b * sqb + h * sqh, shape=[N, D], strides=[sqn, 1],
                                           block_shape=[BLOCK, BLOCK_D])  # fmt: skip
        k_desc = tl.make_tensor_descriptor(k_base, shape=[N, D], strides=[skn, 1], block_shape=[BLOCK, BLOCK_D])
        v_desc = tl.make_tensor_descriptor(v_base, shape=[N, D], strides=[svn, 1], block_shape=[BLOCK, BLOCK_D])
        q = q_desc.load([i * BLOCK, 0])  # zeros past N
        whole = count
        if SPLIT:  # lists ascend: the sequence's ragged last block, where listed, is the row's last entry
            whole -= ((count > 0) & (tl.load(listed + tl.maximum(count - 1, 0)) * BLOCK + BLOCK > N)).to(tl.int32)
        for step in tl.range(0, whole, warp_specialize=True):
            start = tl.load(listed + step).to(tl.int32) * BLOCK  # descriptor offsets are 32-bit
            k = k_desc.load([start, 0])
            v = v_desc.load([start, 0])
            m_i, l_i, acc = accumulate_tile(tl.dot(q, tl.trans(k)), scale, None, v, m_i, l_i, acc, False)
        out = tl.where(l_i[:, None] > 0, acc / tl.maximum(l_i, 1e-30)[:, None], 0.0)
        o_desc = tl.make_tensor_descriptor(o_base, shape=[N, D], strides=[D, 1], block_shape=[BLOCK, BLOCK_D])
        o_desc.store([i * BLOCK, 0], out.to(o_ptr.dtype.element_ty))  # rows past N are not written
        if SPLIT:  # a pointer store here read the loop's initial state under warp specialisation (run_3f2b77d)
            lse_desc = tl.make_tensor_descriptor(lse_ptr + g.to(tl.int64) * NP, shape=[NP], strides=[1],
                                                 block_shape=[BLOCK])  # fmt: skip
            lse_desc.store([i * BLOCK], m_i + tl.log2(l_i))  # -inf: no key
    else:
        # Every step masked to the keys below N: outside the specialised schedule the unmasked loop ran slower
        # (64-token blocks: 1.49x the cuDNN call against 1.28x, run_eeedd2b/ws_probe/; with it, SLA's and the
        # 64-token tables' 1x4x3t calls took 5-32% longer in run_3f2b77d and run_62c9eb5 than in run_fd15a60).
        rows = i * BLOCK + tl.arange(0, BLOCK)
        cols = tl.arange(0, BLOCK_D)
        inside = cols < D
        row_mask = (rows < N)[:, None] & inside[None, :]
        q = tl.load(q_ptr + b * sqb + h * sqh + rows.to(tl.int64)[:, None] * sqn + cols[None, :], mask=row_mask,
                    other=0.0)  # fmt: skip
        if TMA:
            k_desc = tl.make_tensor_descriptor(k_base, shape=[N, D], strides=[skn, 1], block_shape=[BLOCK, BLOCK_D])
            v_desc = tl.make_tensor_descriptor(v_base, shape=[N, D], strides=[svn, 1], block_shape=[BLOCK, BLOCK_D])
            for step in range(0, count):
                start = tl.load(listed + step).to(tl.int32) * BLOCK
                k = k_desc.load([start, 0])  # zeros past N
                v = v_desc.load([start, 0])
                valid = start + tl.arange(0, BLOCK) < N
                m_i, l_i, acc = accumulate_tile(tl.dot(q, tl.trans(k)), scale, valid, v, m_i, l_i, acc, True)
        else:
            # A key tile is PAIRS listed blocks, one after the other: tile row r is row r % BLOCK of entry r // BLOCK.
            within = tl.arange(0, PAIRS * BLOCK) % BLOCK
            part = tl.arange(0, PAIRS * BLOCK) // BLOCK
            for step in range(0, count, PAIRS):
                entry = step + part
                keys = tl.load(listed + entry, mask=entry < count, other=0) * BLOCK + within
                valid = (entry < count) & (keys < N)
                tile_mask = valid[:, None] & inside[None, :]
                k = tl.load(k_base + keys.to(tl.int64)[:, None] * skn + cols[None, :], mask=tile_mask, other=0.0)
                v = tl.load(v_base + keys.to(tl.int64)[:, None] * svn + cols[None, :], mask=tile_mask, other=0.0)
                m_i, l_i, acc = accumulate_tile(tl.dot(q, tl.trans(k)), scale, valid, v, m_i, l_i, acc, True)
        out = tl.where(l_i[:, None] > 0, acc / tl.maximum(l_i, 1e-30)[:, None], 0.0)
        tl.store(o_base + rows.to(tl.int64)[:, None] * D + cols[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=row_mask)  # fmt: skip


@triton_jit
def _ragged_block(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, lists_ptr, counts_ptr, scale, H, N, NP, L,
                  sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, slb, slh, slr, scb, sch,
                  D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """Program (i, g), after :func:`_attention` with ``SPLIT``: where query block i of group g lists the sequence's
    ragged last block, that block's keys below N (masked) merged into the row's output ``o`` and its log-sum-exp
    ``lse``, the other blocks' (:mod:`methods.kernels.attention_states`' combine: ``o = (2^{lse} o + sum_j p_j v_j)
    / (2^{lse} + sum_j p_j)``, against the larger exponent). Other programs return at once."""
    i, g = tl.program_id(0), tl.program_id(1)
    b, h = (g // H).to(tl.int64), (g % H).to(tl.int64)
    count = tl.minimum(tl.load(counts_ptr + b * scb + h * sch + i), L)
    last = tl.load(lists_ptr + b * slb + h * slh + i * slr + tl.maximum(count - 1, 0)) * BLOCK
    if (count > 0) & (last + BLOCK > N):
        rows = i * BLOCK + tl.arange(0, BLOCK)
        keys = last + tl.arange(0, BLOCK)
        cols = tl.arange(0, BLOCK_D)
        inside = cols < D
        row_mask = (rows < N)[:, None] & inside[None, :]
        valid = keys < N
        key_mask = valid[:, None] & inside[None, :]
        q = tl.load(q_ptr + b * sqb + h * sqh + rows.to(tl.int64)[:, None] * sqn + cols[None, :], mask=row_mask,
                    other=0.0)  # fmt: skip
        k = tl.load(k_ptr + b * skb + h * skh + keys.to(tl.int64)[:, None] * skn + cols[None, :], mask=key_mask,
                    other=0.0)  # fmt: skip
        v = tl.load(v_ptr + b * svb + h * svh + keys.to(tl.int64)[:, None] * svn + cols[None, :], mask=key_mask,
                    other=0.0)  # fmt: skip
        m_b = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
        m_b, l_b, acc = accumulate_tile(tl.dot(q, tl.trans(k)), scale, valid, v, m_b,
                                        tl.zeros((BLOCK,), dtype=tl.float32),
                                        tl.zeros((BLOCK, BLOCK_D), dtype=tl.float32), True)  # fmt: skip
        o_rows = o_ptr + g.to(tl.int64) * N * D + rows.to(tl.int64)[:, None] * D + cols[None, :]
        lse_rows = lse_ptr + g.to(tl.int64) * NP + rows
        lse_a = tl.load(lse_rows, mask=rows < N, other=float("-inf"))
        top = tl.maximum(lse_a, m_b)  # m_b is finite: the block has a key below N
        weight_a = tl.exp2(lse_a - top)  # 0 where the other blocks gave no key
        weight_b = tl.exp2(m_b - top)
        out_a = tl.load(o_rows, mask=row_mask, other=0.0).to(tl.float32)
        total = weight_a + weight_b * l_b
        out = (out_a * weight_a[:, None] + acc * weight_b[:, None]) / total[:, None]
        tl.store(o_rows, out.to(o_ptr.dtype.element_ty), mask=row_mask)


def default_config(block: int, device: torch.device, triton_version: str | None = None,
                   capability: tuple[int, int] | None = None) -> Config:  # fmt: skip
    """The configuration a call with ``block``-token blocks on ``device`` runs when none is given:
    :data:`BEST_CONFIGS`' for the block, or :data:`UNSPECIALISED`'s where that one is warp-specialised and the
    installed Triton's release series (``triton_version``, default the installed one) and the GPU's compute capability
    (``capability``, default ``device``'s) are not a pair in :data:`WS_CHECKED`. Under the interpreter (a CPU
    device), which ignores the schedule, :data:`BEST_CONFIGS`' as is."""
    config = BEST_CONFIGS[block]
    if not config.ws or device.type != "cuda":
        return config
    version = triton_version if triton_version is not None else triton.__version__
    capability = capability or torch.cuda.get_device_capability(device)
    checked = any(version.startswith(series + ".") and capability == cap for series, cap in WS_CHECKED)
    return config if checked else UNSPECIALISED[block]


def block_lists(kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kept key blocks of every query block, ascending, from a tile table ``kept (.., R, C)`` bool: ``lists
    (.., R, C)`` int32 (the kept ones first, the rest unread) and ``counts (.., R)`` int32. One stable sort of the
    rows, no host sync."""
    lists = torch.sort(kept.to(torch.uint8), dim=-1, descending=True, stable=True).indices
    return lists.to(torch.int32), kept.sum(dim=-1, dtype=torch.int32)


@kernel_op("block_list_attention")
def block_list_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lists: torch.Tensor,
                            counts: torch.Tensor, block: int, pairs: int, num_warps: int, num_stages: int,
                            tma: bool, ws: bool) -> torch.Tensor:  # fmt: skip
    """:func:`block_list_attention`'s launch as one op (torch.compile sees one opaque call), its configuration
    spelled out."""
    batch, heads, tokens, dim = q.shape
    q, k, v = (last_axis_contiguous(x) for x in (q, k, v))
    # Broadcast, not copied: a shared table is read with zero batch and head strides.
    lists, counts = lists.expand(batch, heads, -1, -1), counts.expand(batch, heads, -1)
    if lists.stride(-1) != 1 or counts.stride(-1) != 1:
        lists, counts = lists.contiguous(), counts.contiguous()
    groups, blocks = batch * heads, lists.shape[-2]
    with_tma = tma and descriptor_aligned(k) and descriptor_aligned(v)
    # The specialised program reads q and writes the output (B * H, N, D) through descriptors too: the output's rows
    # must be 16-byte multiples (a sliced q of D = 20 passes the stride check; its output rows are 40 bytes).
    specialised = ws and with_tma and descriptor_aligned(q) and dim * q.element_size() % 16 == 0
    if with_tma and not INTERPRETED:
        use_descriptor_scratch()
    split = specialised and tokens % block != 0
    out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    padded = blocks * block
    lse = torch.empty((groups, padded) if split else (1,), device=q.device, dtype=torch.float32)
    arguments = (
        q, k, v, out, lse, lists, counts, 1.4426950408889634 / dim**0.5, heads, tokens, padded, lists.shape[-1],
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
        v.stride(2), lists.stride(0), lists.stride(1), lists.stride(2), counts.stride(0), counts.stride(1),
    )  # fmt: skip
    block_d = tile_columns(dim)
    _attention[(blocks, groups)](
        *arguments,
        D=dim,
        BLOCK_D=block_d,
        BLOCK=block,
        PAIRS=pairs,
        TMA=with_tma,
        WS=specialised,
        SPLIT=split,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if split:
        _ragged_block[(blocks, groups)](*arguments, D=dim, BLOCK_D=block_d, BLOCK=block, num_warps=4, num_stages=1)
    return out


@block_list_attention_op.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lists: torch.Tensor, counts: torch.Tensor, block: int,
      pairs: int, num_warps: int, num_stages: int, tma: bool, ws: bool) -> torch.Tensor:  # fmt: skip
    return q.new_empty(q.shape)


def block_list_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lists: torch.Tensor, counts: torch.Tensor,
                         block: int, config: Config | None = None) -> torch.Tensor:  # fmt: skip
    """Attention of q, k, v ``(B, H, N, D)`` (fp16/bf16, on CUDA or under the Triton interpreter) over the listed
    key blocks: ``lists (B or 1, H or 1, R, L)`` int32, each row's first ``counts`` entries ascending (as
    :func:`block_lists` and SLA's :func:`~methods.sla.critical_lists` make them: the warp-specialised program takes
    the sequence's ragged last block for a row's last entry), ``counts (B or 1, H or 1, R)`` int32, blocks of
    ``block`` tokens, with ``config`` (default :func:`default_config` for the block and q's device). Returns ``(B,
    H, N, D)`` in q's dtype. Nothing checks the order (a device sync per call): lists that do not ascend give a wrong
    output under warp specialisation where N is not a multiple of the block. A warp-specialised configuration runs
    unspecialised (masked, q and the output by pointers) where q or the output's rows are not 16-byte aligned.

    Raises:
        HarnessError: a head dim over :data:`MAX_HEAD_DIM`, a block size not in :data:`BLOCK_SIZES`, lists or counts
            not int32, of another batch or head count than q's (or 1), of length 0, or whose row count is not
            ``ceil(N / block)``, or a configuration with descriptor loads and more than one block a step, or with
            warp specialisation and pointer loads.
    """
    if q.shape[-1] > MAX_HEAD_DIM:  # tiles of wider heads overflow shared memory (a Triton error, not a message)
        raise HarnessError(f"triton-blocks takes head_dim <= {MAX_HEAD_DIM}, got {q.shape[-1]}")
    if block not in BLOCK_SIZES:
        raise HarnessError(f"triton-blocks takes blocks of {', '.join(map(str, BLOCK_SIZES))} tokens, got {block}")
    if lists.dtype != torch.int32 or counts.dtype != torch.int32:
        raise HarnessError(f"triton-blocks takes int32 lists and counts, got {lists.dtype} and {counts.dtype}")
    if (
        lists.dim() != 4
        or counts.shape != lists.shape[:-1]
        or any(n not in (1, full) for n, full in zip(lists.shape[:2], q.shape[:2], strict=True))
    ):
        raise HarnessError(f"block lists {tuple(lists.shape)} and counts {tuple(counts.shape)} do not fit q "
                           f"{tuple(q.shape)}: (B or 1, H or 1, R, L) and (B or 1, H or 1, R)")  # fmt: skip
    if lists.shape[-1] == 0:
        raise HarnessError("block lists of length 0: each row's list needs room for one entry (L >= 1)")
    rows = -(-q.shape[-2] // block)
    if lists.shape[-2] != rows:
        raise HarnessError(f"block lists for {lists.shape[-2]} query blocks, but {q.shape[-2]} tokens in blocks of "
                           f"{block} make {rows}")  # fmt: skip
    config = config or default_config(block, q.device)
    if config.tma and config.pairs != 1:
        raise HarnessError(f"configuration {config.name}: descriptor loads take one key block a step")
    if config.ws and not config.tma:
        raise HarnessError(f"configuration {config.name}: warp specialisation takes descriptor loads")
    return block_list_attention_op(q, k, v, lists, counts, block, *config)


def pattern_lists(pattern: BlockSparsePattern) -> tuple[torch.Tensor, torch.Tensor]:
    """The block lists of a block-level ``pattern``: those a method attached (:func:`attach_lists`), else
    :func:`block_lists` of its tile table; built on the first eager call and kept with the pattern (a pattern reused
    across calls, radial's, lists once), built in the graph on every compiled call (a dict written inside a compiled
    graph recompiles it once: its guard on the pattern's plans fails on the next call)."""
    plan = pattern.backend_plans.get(LISTS_KEY)
    if isinstance(plan, tuple):
        return plan
    built = block_lists(pattern.kept) if plan is None else plan()
    if not torch.compiler.is_compiling():  # stored inside a graph, they would fail its guard on the next call
        pattern.backend_plans[LISTS_KEY] = built
    return built


def attach_lists(pattern: BlockSparsePattern, build: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Give ``pattern`` the builder of its block lists (those of its tile table, each row's ascending, as
    :func:`block_list_attention` takes them), run where a backend
    first reads them (:func:`pattern_lists`), for a method that has them from its own ranking (SLA's critical
    blocks): no sort of the table, and no work where another backend runs the pattern."""
    pattern.backend_plans[LISTS_KEY] = build
