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
scoring (reports/gpu/h200/run_81d2574/xattn/). Here one program per row holds the row in registers and finds the
cut without sorting:

- the rank key of entry j is the pair ``(ordered float bits of score_j, BLOCK - 1 - j)`` in lexicographic order
  (a non-negative score's IEEE bits order as the scores do, ``inf`` first; a negative one's magnitude bits are
  flipped so that it ranks below): a strict total order, by score with ties in index order, as the stable sort of
  the torch budget ranks (the torch cumulative mass sorts without stability: only the order of exact ties
  differs, and only where they straddle the cut);
- with ``G(t) = weight of the keys above t + half x weight of key t``, entry e is kept iff ``G(key e) < fraction x
  total``; G never decreases down the ranking, so the dropped entries are the keys up to the highest dropped one
  V, and a binary search over the key space finds V without ranking anything: the 32 score bits, then
  ``log2(BLOCK) + 1`` index bits within the tie at V's score, each bit one test of G against the budget, G a sum
  over the row (``tl.sum(tl.where(key above t, weight, 0))``; a second sum in the tie's steps takes its one
  entry's own weight). Weights sum in float64 as the torch paths sum in double (int32 weights in int32, compared
  as doubles): integer costs make every sum exact, so the kept set is torch's bit for bit whatever the order of
  summation; float masses sum in another
  order than torch's ``cumsum`` (so did the sorting kernel's ``tl.cumsum``), which can only matter where the
  budget falls within rounding of an entry's edge;
- ``min_keep``: where the rule keeps fewer, the same search over counts (int32) finds the ``min_keep``-th key.

Cost model: ``33 + 2 (log2(BLOCK) + 1)`` serial reductions a row, 55 at 1,024 entries (twice that where the ``min_keep``
floor binds, the second search over int32), each a compare, a select and a float64 (or int32) add per entry and the
warps' shuffles: O(n) work a step, O(bits x n) a row, against the sort's O(n log^2 n) compare-exchanges through
registers and shared memory (0.8 us a program at 256 entries, 13 us at 1,024 on an H200, reports/gpu/h200/run_68cb19d/).
On an H200 the search took 0.015 ms of device time for xattn's 3,072 rows of 256 at Wan 1.3B (0.019 with the sort),
0.095 ms for svg2's 3,600 rows of 1,000 (the torch path's operators ~0.25 ms), 0.31 ms for svg2's 12,000 rows at 14B and
0.50 ms for xattn's 23,640 rows of 591 there (reports/gpu/h200/run_5ce9330/, ``selection_top_ops``), each a warp a row;
svg2's rows then took 0.087 ms over two warps in float64 and 0.064 over four in int32 (its token counts; run_2c9239b/),
0.056-0.060 in its plan and 0.197 at 14B (run_3bc646e/). xattn's 14B rows now run over two warps, not re-timed. Ties,
``inf``, zero rows and exact budget ties keep what the sort kept: a zero row drops everything but the floor (its budget
is 0), an entry of ``inf`` mass is dropped (its ``0 x inf`` is NaN where torch's ``cumsum - value`` is ``inf - inf``),
and the fraction is compared as a double.

Shapes: scores ``(..., n)`` float32, non-negative (``inf`` ranks first), ``n <= MAX_ENTRIES``; weights
broadcastable to scores, any real dtype: int32 weights sum in int32 (the caller's promise that a row's total fits;
a thread's adds and shuffles of one word, not a double's two), any other in float64. Returns ``(..., n)`` bool. On
CPU tensors under the interpreter (``TRITON_INTERPRET=1``, tests) as on CUDA.
"""

from __future__ import annotations

import struct

import torch

from methods.kernels import BACKENDS, KERNEL_DEVICE, kernel_choice, kernel_op, on_kernel_device, triton_jit, use_kernel

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs (CI): every call takes the torch path
    triton = tl = None

BACKEND_ENV = "BENCH_SELECTION_BACKEND"
DEFAULT_BACKEND = "auto"
kernel_choice(BACKEND_ENV, DEFAULT_BACKEND, BACKENDS)
#: The longest row the kernel ranks; longer rows take the torch path. The search costs O(n) a step and 33 + 2
#: (log2(BLOCK) + 1) steps (55 at 1,024 entries), so it grows linearly with the row, unlike the in-register sort it
#: replaced (0.8 us a program at 256 entries but 13 us at 1,024 on an H200, reports/gpu/h200/run_68cb19d/, which
#: held this at 512): 4,096 covers SVG2's 1,000 key clusters and XAttention's 591 blocks at 14B, in up to 16 warps a
#: row (:func:`launch_options`). Timed on an H200 at 256, 591 and 1,000 entries (module docstring); longer
#: rows are checked, not timed.
MAX_ENTRIES = 4096
#: Entries of a row each thread holds, by how the weights sum: rows of up to 32 x this many run in one warp (see
#: :func:`launch_options`). On an H200, svg2's 3,600 rows of 1,000 at Wan 1.3B took 0.134 / 0.087 / 0.106 ms at 32 /
#: 16 / 8 entries a thread with float64 sums and 0.101 / 0.070 / 0.064 ms with int32 sums (reports/gpu/h200/
#: run_2c9239b/svg2_probe6.json).
ENTRIES_PER_THREAD = {"float64": 16, "int32": 8}


def launch_options(block: int, int_weights: bool) -> dict[str, int]:
    """The launch's options for rows padded to ``block`` entries whose weights sum in int32 (``int_weights``) or
    float64, chosen here alone: one program a row, one warp up to ``32 x ENTRIES_PER_THREAD`` entries and as many
    warps above that as keep a thread at that many. In one warp each of the search's serial sums is a thread's own
    adds and five shuffle rounds; more warps add a shared-memory round and a barrier to every one, but hold fewer
    registers a thread, so that more programs share an SM and fill each other's latency: ptxas for sm_90a gave 255
    registers a thread at 1,024 entries in one warp (eight programs an SM), 168 over two warps; the H200 timings
    beside :data:`ENTRIES_PER_THREAD` chose."""
    per_thread = ENTRIES_PER_THREAD["int32" if int_weights else "float64"]
    return {"num_warps": max(1, block // (32 * per_thread))}


@triton_jit
def _kept_above_last_dropped(bits, rank_index, weight, own, budget, LOG_BLOCK: tl.constexpr):
    """One rule's kept entries, ``(BLOCK,)`` bool: every entry ranked above the highest-ranked one the rule drops.

    Entry ``j``'s rank key is the pair ``(bits_j, rank_index_j)`` in lexicographic order (``bits`` int32 in score
    order, ``rank_index`` = ``BLOCK - 1 - j`` int32). With ``G(t) = sum(weight of keys > t) + own x weight of key
    t`` (``weight`` non-negative, float64 or int32 counts, 0 on padding; ``own`` 0 or 1/2) the rule keeps entry e
    iff ``G(key e) < budget``, as torch compares (a NaN G, ``0 x inf``, drops it as torch's ``inf - inf`` does). G
    never increases with t, so the dropped entries are the keys up to the highest dropped one V, found bit by bit,
    one test of ``G < budget`` a bit. First the 32 score bits, the sign first (int32 orders signed): the bit's test
    is at the pair ``(s - 1, 2^32 - 1)``, between entries' keys, where ``G = sum(weight where bits >= s)`` and
    ``own`` does not enter; ``score_bits`` ends at V's. Then ``index`` = V's rank index + 1, in
    ``[0, BLOCK]``, within the tie at that score (``LOG_BLOCK + 1`` bits), where G is the weight above the tie plus
    a sum over the tie plus ``own x`` one entry's weight. Float64 sums of non-negative values over a tree of fixed
    shape are monotone in the set summed, so the computed G never increases with t either. When no key's G
    reaches the budget, the search ends at or below the lowest entry's key and every entry is kept; when every
    key's does (a zero budget), it ends above the highest and none is."""
    score_bits = tl.where(tl.sum(tl.where(bits >= 0, weight, 0), 0) < budget, -2147483648, 0)
    for step in range(31):
        candidate = score_bits | (1 << (30 - step))
        score_bits = tl.where(tl.sum(tl.where(bits >= candidate, weight, 0), 0) < budget, score_bits, candidate)
    tied = bits == score_bits
    above = tl.sum(tl.where(bits > score_bits, weight, 0), 0)
    tied_weight = tl.where(tied, weight, 0)
    index = 0
    for step in range(LOG_BLOCK + 1):
        candidate = index | (1 << (LOG_BLOCK - step))
        own_weight = tl.sum(tl.where(rank_index == candidate - 1, tied_weight, 0), 0)  # one entry's, exact
        counted = (above + tl.sum(tl.where(rank_index >= candidate, tied_weight, 0), 0)).to(tl.float64)
        counted += own * own_weight.to(tl.float64)
        index = tl.where(counted < budget, index, candidate)
    return (bits > score_bits) | (tied & (rank_index >= index))


@triton_jit
def _ranked_prefix(scores_ptr, weights_ptr, keep_ptr, n, inner, wsp, wsq, wsn, fraction_bits, own, min_keep,
                   BLOCK: tl.constexpr, LOG_BLOCK: tl.constexpr, INT_WEIGHTS: tl.constexpr):  # fmt: skip
    """Program ``row``: the kept entries of ``scores[row, :n]`` (contiguous rows) into ``keep[row]``, counting
    ``own`` (0 or 1/2) of each entry's weight against the budget ``fraction x total``, the fraction passed as the
    int64 bits of its double (Triton passes a Python float as float32: at an exact tie, equal costs summing to the
    budget, the rounded fraction kept one entry more than torch); the weights of row ``row = p * inner + q`` are at
    ``weights_ptr + p wsp + q wsq + j wsn`` (broadcast rows have stride 0), summed in int32 with ``INT_WEIGHTS``
    (int32 weights: every row's total fits), else in float64. ``BLOCK = 2^LOG_BLOCK >= n``."""
    row = tl.program_id(0).to(tl.int64)
    entries = tl.arange(0, BLOCK)
    present = entries < n
    score = tl.load(scores_ptr + row * n + entries, mask=present, other=0.0) + 0.0  # -0.0 ranks as 0.0
    bits = score.to(tl.int32, bitcast=True)
    bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # IEEE bits in score order, negative scores included
    weights_row = weights_ptr + (row // inner) * wsp + (row % inner) * wsq
    weight = tl.load(weights_row + entries * wsn, mask=present, other=0)  # padding weighs nothing
    weight = weight.to(tl.int32) if INT_WEIGHTS else weight.to(tl.float64)
    budget = tl.sum(weight, 0).to(tl.float64) * fraction_bits.to(tl.float64, bitcast=True)
    kept = _kept_above_last_dropped(bits, BLOCK - 1 - entries, weight, own, budget, LOG_BLOCK)
    if tl.sum((kept & present).to(tl.int32), 0) < min_keep:  # the floor binds: the top min_keep are kept too
        counts = present.to(tl.int32)  # G(t) counts the entries above t: the cheaper int32 sums
        kept = kept | _kept_above_last_dropped(bits, BLOCK - 1 - entries, counts, 0, min_keep, LOG_BLOCK)
    tl.store(keep_ptr + row * n + entries, kept, mask=present)


def unsupported_reason(scores: torch.Tensor, weights: torch.Tensor) -> str | None:
    """Why the kernel cannot rank this call (None when it can): Triton on CUDA, or CPU tensors under the
    interpreter; float32 scores with at least one and at most :data:`MAX_ENTRIES` entries a row."""
    if triton is None:
        return "triton is not installed"
    if not on_kernel_device(scores, weights):
        return f"inputs are not all on {KERNEL_DEVICE}"
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
    ranking by score and summing ``weights`` (broadcastable to scores; int32 ones in int32, their row totals below
    2^31) until ``fraction`` of the row's total, the crossing entry kept (``half`` False) or kept when under half of
    it (``half`` True); at least ``min_keep``. The caller checks :func:`unsupported_reason` first (:func:`use_fused`
    does)."""
    n = scores.shape[-1]
    inner = scores.shape[-2] if scores.dim() > 1 else 1
    flat = scores.reshape(-1, n).contiguous()
    rows = flat.shape[0]
    spread = weights.expand_as(scores).reshape(rows // inner, inner, n)  # a view where the broadcast allows
    keep = torch.empty(scores.shape, dtype=torch.bool, device=scores.device)
    block = max(16, triton.next_power_of_2(n))
    log_block = block.bit_length() - 1
    fraction_bits = struct.unpack("<q", struct.pack("<d", fraction))[0]  # > 2^31 for any fraction > 2^-1022: int64
    int_weights = weights.dtype == torch.int32
    _ranked_prefix[(rows,)](flat, spread, keep, n, inner, *spread.stride(), fraction_bits, 0.5 if half else 0.0,
                            min_keep, BLOCK=block, LOG_BLOCK=log_block, INT_WEIGHTS=int_weights,
                            **launch_options(block, int_weights))  # fmt: skip
    return keep


@ranked_prefix.register_fake
def _fake_keep(scores: torch.Tensor, weights: torch.Tensor, fraction: float, half: bool,
               min_keep: int) -> torch.Tensor:  # fmt: skip
    return torch.empty_like(scores, dtype=torch.bool)
