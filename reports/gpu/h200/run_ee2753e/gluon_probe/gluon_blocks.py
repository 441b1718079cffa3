"""Experiment (not part of the package): block-list attention for 64-token blocks in Gluon (Triton's lower-level
language), with FlashAttention-3's intra-warpgroup overlap written out: the next key block's scores are issued as an
asynchronous warpgroup MMA before this block's softmax, and P V runs while the next softmax starts.

One program per (query block i, group g), one warpgroup (4 warps). Shared memory: q's tile, a ring of STAGES key and
value tiles filled by TMA (one mbarrier a stage). Per listed block j (lists ascend; count >= 1):
  issue S_{j+1} = q K_{j+1}^T (async); rescale acc by block j's alpha; issue acc += P_j V_j (async, P in registers)
  wait for S_{j+1} (P V_j stays in flight); softmax of S_{j+1} (fp32, base 2, scale folded; masked to keys below N
  where the block is the ragged last one) while P V_j runs
  wait for P V_j; refill block j's stage with block j + STAGES
Rows of a query block that lists no key get zeros.
"""

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)


@gluon.jit
def _refill(k_desc, v_desc, k_smem, v_smem, ready, listed, b, count, STAGES: gl.constexpr, BLOCK: gl.constexpr):
    """Block ``b`` of the list (where it exists) into stage ``b % STAGES``."""
    pred = b < count
    start = gl.load(listed + gl.minimum(b, count - 1)) * BLOCK
    stage = b % STAGES
    bar = ready.index(stage)
    mbarrier.expect(bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes, pred=pred)
    tma.async_copy_global_to_shared(k_desc, [start, 0], bar, k_smem.index(stage), pred=pred)
    tma.async_copy_global_to_shared(v_desc, [start, 0], bar, v_smem.index(stage), pred=pred)


@gluon.jit
def _softmax(j, s, m_i, l_i, listed, scale, N, BLOCK: gl.constexpr, s_layout: gl.constexpr, o_layout: gl.constexpr,
             dtype: gl.constexpr, MASK_ALWAYS: gl.constexpr):
    """Block j's scores ``s`` -> its probabilities as P V's register operand, the rescale of earlier blocks' sums,
    and the running maximum and sum."""
    start = gl.load(listed + j) * BLOCK
    if MASK_ALWAYS:
        cols = start + gl.arange(0, BLOCK, layout=gl.SliceLayout(0, s_layout))
        s = gl.where((cols < N)[None, :], s, float("-inf"))
    elif start + BLOCK > N:  # the sequence's ragged last block: keys past N are another group's rows or zeros
        cols = start + gl.arange(0, BLOCK, layout=gl.SliceLayout(0, s_layout))
        s = gl.where((cols < N)[None, :], s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, axis=1) * scale)
    alpha = gl.exp2(m_i - m_new)
    p = gl.exp2(s * scale - m_new[:, None])
    l_i = l_i * alpha + gl.sum(p, axis=1)
    p_op = gl.convert_layout(p.to(dtype), gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2))
    return p_op, gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), m_new, l_i


@gluon.jit
def _blocks_fwd(q_ptr, k_ptr, v_ptr, o_ptr, lists_ptr, counts_ptr, scale, N, L,
                BLOCK: gl.constexpr, D: gl.constexpr, STAGES: gl.constexpr, MASK_ALWAYS: gl.constexpr):
    i = gl.program_id(0)
    g = gl.program_id(1)
    blocks = gl.cdiv(N, BLOCK)
    base = g.to(gl.int64) * N * D
    smem_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, D, 16])
    q_desc = tma.make_tensor_descriptor(q_ptr + base, shape=[N, D], strides=[D, 1], block_shape=[BLOCK, D],
                                        layout=smem_layout)
    k_desc = tma.make_tensor_descriptor(k_ptr + base, shape=[N, D], strides=[D, 1], block_shape=[BLOCK, D],
                                        layout=smem_layout)
    v_desc = tma.make_tensor_descriptor(v_ptr + base, shape=[N, D], strides=[D, 1], block_shape=[BLOCK, D],
                                        layout=smem_layout)
    q_smem = gl.allocate_shared_memory(q_desc.dtype, [BLOCK, D], smem_layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES, BLOCK, D], smem_layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES, BLOCK, D], smem_layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)

    count = gl.minimum(gl.load(counts_ptr + g * blocks + i), L)
    listed = lists_ptr + (g * blocks + i).to(gl.int64) * L
    rows = i * BLOCK + gl.arange(0, BLOCK, layout=gl.SliceLayout(1, o_layout))
    dims = gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))
    o_rows = o_ptr + base + rows.to(gl.int64)[:, None] * D + dims[None, :]
    if count > 0:
        mbarrier.expect(q_bar, q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [i * BLOCK, 0], q_bar, q_smem)
        for s in gl.static_range(STAGES):
            _refill(k_desc, v_desc, k_smem, v_smem, ready, listed, s, count, STAGES, BLOCK)
        mbarrier.wait(q_bar, 0)
        mbarrier.wait(ready.index(0), 0)
        zero_s = gl.zeros([BLOCK, BLOCK], gl.float32, s_layout)
        s_cur = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        s_cur = warpgroup_mma_wait(num_outstanding=0, deps=(s_cur,))
        m_i = gl.full([BLOCK], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
        l_i = gl.zeros([BLOCK], gl.float32, gl.SliceLayout(1, s_layout))
        p_op, alpha, m_i, l_i = _softmax(0, s_cur, m_i, l_i, listed, scale, N, BLOCK, s_layout, o_layout,
                                         k_desc.dtype, MASK_ALWAYS)
        acc = gl.zeros([BLOCK, D], gl.float32, o_layout)
        for j in range(0, count - 1):
            # FlashAttention-3's order: block j + 1's scores in flight while acc is rescaled, P V of block j in
            # flight while block j + 1's softmax runs; no product's registers outlive the iteration in flight.
            nxt = j + 1
            mbarrier.wait(ready.index(nxt % STAGES), (nxt // STAGES) & 1)
            s_next = warpgroup_mma(q_smem, k_smem.index(nxt % STAGES).permute((1, 0)), zero_s, use_acc=False,
                                   is_async=True)
            acc = warpgroup_mma(p_op, v_smem.index(j % STAGES), acc * alpha[:, None], is_async=True)
            s_next = warpgroup_mma_wait(num_outstanding=1, deps=(s_next,))
            p_op, alpha, m_i, l_i = _softmax(nxt, s_next, m_i, l_i, listed, scale, N, BLOCK, s_layout, o_layout,
                                             k_desc.dtype, MASK_ALWAYS)
            # p_op among the wait's operands: the wait cannot be scheduled before the softmax that makes it.
            acc, p_op = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p_op))
            _refill(k_desc, v_desc, k_smem, v_smem, ready, listed, j + STAGES, count, STAGES, BLOCK)
        last = count - 1
        acc = warpgroup_mma(p_op, v_smem.index(last % STAGES), acc * alpha[:, None], is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        out = acc / gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))[:, None]
        gl.store(o_rows, out.to(o_ptr.dtype.element_ty), mask=(rows < N)[:, None])
    else:
        gl.store(o_rows, gl.zeros([BLOCK, D], o_ptr.dtype.element_ty, o_layout), mask=(rows < N)[:, None])
    mbarrier.invalidate(q_bar)
    for s in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(s))


def launch(q, k, v, lists, counts, stages=3, mask_always=False):
    """q, k, v (B, H, N, 128) bf16 contiguous; lists (B, H, R, L) int32 contiguous; counts (B, H, R) int32."""
    import torch

    batch, heads, tokens, dim = q.shape
    out = torch.empty_like(q)
    blocks = triton.cdiv(tokens, 64)
    _blocks_fwd[(blocks, batch * heads)](q, k, v, out, lists, counts, 1.4426950408889634 / dim**0.5, tokens,
                                         lists.shape[-1], BLOCK=64, D=dim, STAGES=stages,
                                         MASK_ALWAYS=mask_always, num_warps=4)
    return out
