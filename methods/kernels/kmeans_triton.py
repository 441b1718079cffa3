"""SVG2's batched Euclidean k-means (Lloyd) on CUDA in Triton: every iteration on the device, no host sync.

Computes what :func:`methods.svg2.lloyd` computes (the torch path, which stays the CPU path and the reference):
per group g (one (batch, head) pair) with points ``x_g (N, D)`` and centroids ``c_g (C, D)`` fp32, one iteration

1. assignment: ``label_n = argmin_j ||c_j||^2 - 2 <x_n, c_j>`` (``||x_n||^2`` is the same for every j), the first
   index on ties; the dot products on tensor cores in x's dtype (c rounded to it, the products accumulated in fp32
   and rounded back to x's dtype, as the torch path's fp16/bf16 matmul returns them), ``||c_j||^2`` and the
   distance in fp32;
2. update: ``sums_j = sum of x_n (fp32) over label_n = j``, ``sizes_j = |{n: label_n = j}|``, the new centroid
   ``sums_j / sizes_j`` where ``sizes_j > 0``, the old one where the cluster is empty.

An assignment kernel and an update step per iteration, launched back to back with nothing read back to the host
in between. The labels stay int32 between them (what the counting sort reads: no conversion per iteration), made
int64 once, for the op's output. The assignment reads the centroids prepared once per iteration, not per program:
``ct (G, BLOCK_D, CP)``, the centroids rounded to x's dtype and transposed (each tile a straight, coalesced load of
a ``(D, BLOCK_C)`` block: no ``tl.trans`` of a loaded dot operand, which miscompiled on sm_90 in
:mod:`methods.kernels.linear_attention_triton`), and ``sq (G, CP)``, their fp32 squared norms (the fp32 sum of
squares of the fp32 centroid, as the torch path's), with CP = C rounded up to :data:`CENTROID_PAD` (zeros in ct and
+inf in sq past C, so tiles load unmasked and the padding never wins). :func:`_prepare` writes them for the initial
centroids (one launch per op call); every update kernel writes them beside its new centroids (no extra launch).
The update has two variants (:data:`VARIANTS`, the op's ``update``; :func:`chosen_variant` reads
``$BENCH_KMEANS_UPDATE``) with the same outputs:

- :func:`_assign`: one program per (tile of BLOCK_N tokens, group): the tile of x stays on chip while the prepared
  centroids stream past in tiles of BLOCK_C (from L2), with a running minimum and its index: per tile the
  distances' row minimum, then the first column holding it (two plain reductions, cheaper than an argmin's
  (value, index) pairs), kept where strictly below the running one (ties: the lower index). In bf16 on the GPU
  the products are rounded by one ``cvt.rn.bf16x2.f32`` per element (:func:`_round_to_points`; Triton's own
  conversion is a slow scalar F2F). Only the ``(G, N)`` labels reach memory, never the ``(N, C)`` distances.
- ``onehot``, :func:`_update`: one program per (tile of BLOCK_C clusters, group): over all tokens in tiles of
  BLOCK_N, the one-hot matrix ``[label_n = j]`` (BLOCK_C, BLOCK_N) in x's dtype times the x tile, accumulated in
  fp32 on tensor cores. The products ``1 x x_n`` are exact and the accumulation is fp32, so the sums are the fp32
  sums of the torch path in another order. No atomics, no sort: each program owns its clusters and adds their
  tokens in a fixed order, so the result is the same on every run (the torch path's ``index_add_`` on CUDA is not).
- ``sorted``: per group the labels' stable order (the tokens of a cluster in ascending order) and each cluster's
  bounds in it by a counting sort (:func:`counting_sort`, below), then :func:`_update_sorted`, one program per
  (window of WINDOW clusters, group): the window's tokens, one run of the ``order``, their rows of x gathered in tiles
  of BLOCK_N and summed per cluster by a one-hot product on tensor cores, accumulated in fp32 (tile by tile in a
  fixed order: the same on every run). Each token is read once. A program per cluster, the earlier kernel, left
  most of a program's time to three dependent loads (its bounds, its positions, its rows) for ~33 tokens.

The counting sort, three launches and no host sync, for labels ``(G, N)`` int32 in ``[0, C)`` in blocks of
:data:`SORT_BLOCK` tokens (B = ceil(N / SORT_BLOCK) per group):

1. :func:`_block_histograms`, per (block, group): the block's label counts ``(G, B, C)`` int32 (``tl.histogram``
   over tiles of :data:`SORT_CLUSTER_TILE` clusters);
2. :func:`_cluster_offsets`, per (tile of clusters, group): an exclusive scan of the counts, cluster-major
   (cluster 0's tokens block by block, then cluster 1's, ...), each tile starting from the sum of the tiles before
   it: the bounds ``(G, C + 1)`` int64 and, beside the counts, each (block, cluster)'s first position in the order
   less the block's tokens of lower clusters;
3. :func:`_scatter_order`, per (block, group): the block's keys ``label << log2(SORT_BLOCK) | index`` sorted on
   chip (:func:`~methods.kernels.sorting_triton.sort_keys`, a bitonic network), so that a token's position i in its
   sorted block is its block's tokens of lower clusters plus its rank among its own cluster's; it goes to
   ``order[offset + i]``.

It replaced, per iteration, a stable ``torch.sort`` of the labels (cub's segmented radix sort, several launches), an
``arange`` copied per group and a ``torch.searchsorted``: at Wan 1.3B on an H200 svg2's plan spent 0.397 ms of
device time in 5 sorts, the 2 warm iterations' of q and of k among them (reports/gpu/h200/README.md, run_aee13f7).
The op also returns the tokens in stable label order (what svg2 permutes q and k by): the sorted update's last order
(of the last assignment's labels, the ones returned), or one counting sort after the one-hot iterations.

Cost per iteration and group: the assignment is ``2 N C D`` FLOPs (one ``x c^T``) plus ~5 instructions per distance
(round, subtract, minimum, first index); the one-hot update another ``2 N C D`` (C times the ``N D`` adds a scatter
would do, on tensor cores) and reads x ``C / BLOCK_C`` times, the sorted one ``2 N WINDOW D`` (the one-hot product over
the window's run), x read once (``O(N D)`` bytes) plus the counting sort. At Wan 1.3B (N = 32,760, D = 128, 12 heads)
with 1,000 key clusters the one-hot update took ~1.3 ms per iteration on an H200, more than the assignment. Memory: the
assignment reads x once and the prepared centroids (``2 C D`` bytes in bf16) once per token tile, from L2: ~0.8 GB per
assignment at Wan 1.3B with 1,000 key clusters in 128-token tiles. The earlier kernel read the fp32 centroids instead
(twice the bytes, transposed by address, squared and converted per program) and took 1.25 ms on an H200 for a
selection's four warm assignments (~210 TFLOP/s). The prepared buffers take ``G CP (2 BLOCK_D + 4)`` bytes; both updates
write O(N + C D), the prepared copy included. The counting sort reads the labels twice (``8 N`` bytes), writes the ``4 B
C`` bytes of counts and of offsets and the ``8 N`` bytes of order: at Wan 1.3B with 1,000 key clusters (B = 32) about
3.1 MB each over the 12 heads; its scan reads the counts ``(T + 1) / 2`` times over for T tiles of clusters (4.5 at
1.3B, 16.5 at 14B), each tile summing the ones before it. Its work: per cluster tile and 32 labels, log2(tile) warp
ballots and tile / 32 popcounts a lane in the histogram; per block 55 compare-exchange steps on 1,024 keys (log2 1024
(log2 1024 + 1) / 2; the steps between warps through shared memory); per tile of clusters a scan, after the sums of the
earlier tiles' counts. On an H200 at Wan 1.3B svg2's four warm sorts took 0.158 ms of device time (histograms 0.025,
scatters 0.085, scans 0.048 when one program per group ran every tile of its group after another: 12 programs), and at
14B 0.748 ms (reports/gpu/h200/run_5ce9330/); the orders equalled torch's stable sort's in every configuration check.
The scans per tile took 0.038 ms at 1.3B (8 tiles a head) but 0.248 at 14B against 0.215 (32 tiles a head: the last one
sums 31 tiles before its own; reports/gpu/h200/run_3bc646e/); summing four tiles a step spills registers at 14B's 128
padded blocks (ptxas for sm_90a), so the sums stay one tile a step.

The loop is one ``torch.library`` custom op, :func:`kmeans_lloyd` (``attention_bench::``, inference only), so
torch.compile sees one opaque call with fake outputs of the right shapes and never traces the autotuner.

Shapes: x ``(G, N, D)`` fp16 or bf16 (fp16 only under the interpreter), ``D <= 128``, any strides with a
contiguous last axis; centroids ``(G, C, D)`` float32. Returns labels ``(G, N)`` int64, centroids
``(G, C, D)`` float32, sizes ``(G, C)`` int64 and the order ``(G, N)`` int64, as the torch path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from methods.kernels import (
    BACKENDS,
    INTERPRETED,
    KERNEL_DEVICE,
    env_choice,
    kernel_choice,
    kernel_op,
    last_axis_contiguous,
    on_kernel_device,
    tile_columns,
    triton_jit,
    use_kernel,
)
from methods.kernels.sorting_triton import sort_keys
from methods.kernels.tuned_launch import launch_tuned

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs (CI): every call takes the torch path
    triton = tl = None

BACKEND_ENV = "BENCH_KMEANS_BACKEND"
# auto since the kernels passed harness.benchmarks.svg2_kmeans's check on an H200 (every configuration pair: labels
# as torch's, centroids within 2e-8 of float64) and made svg2's warm selection 67.8 ms against torch's 294.8 ms in
# the same run at Wan 1.3B (reports/gpu/h200/README.md, run_65b3f07).
DEFAULT_BACKEND = "auto"
VARIANT_ENV = "BENCH_KMEANS_UPDATE"
VARIANTS: tuple[str, ...] = ("onehot", "sorted")
# sorted: checked and timed against onehot in one process on an H200 at Wan 1.3B (harness.benchmarks.svg2_kmeans,
# reports/gpu/h200/run_9dca079/svg2_kmeans/): a warm q iteration 0.73 against 1.56 ms, k 1.34 against 2.58 ms, the
# same labels; the whole selection 3.78 against 5.78 ms.
DEFAULT_VARIANT = "sorted"
kernel_choice(BACKEND_ENV, DEFAULT_BACKEND, BACKENDS)
kernel_choice(VARIANT_ENV, DEFAULT_VARIANT, VARIANTS)
BACKEND_NOTE = (f"svg2 k-means: the Triton Lloyd iterations on CUDA (fp16/bf16) where they can run; "
                f"{BACKEND_ENV}=torch forces the torch path; {VARIANT_ENV}=onehot|sorted picks the update step "
                f"(default {DEFAULT_VARIANT}: it reads each token once, and was the faster on an H200)")  # fmt: skip
MAX_HEAD_DIM = 128
# Relative error (norm) of the kernel's centroids against the float64 means of the same labels: each is a sum of
# up to N fp32 terms (relative error ~N u in the worst case, ~sqrt(N) u typically, u = 6e-8) and one division.
CENTROID_TOLERANCE = 1e-5
# Candidates, none timed one by one (the autotuner times them at run time); compiled for sm_90 without a GPU, none
# spills. (BLOCK_N tokens, BLOCK_C centroids, num_warps, num_stages) of the assignment: a (BLOCK_N, 128) tile of x
# held while (128, BLOCK_C) tiles of the prepared centroids stream past; the autotuner keeps the fastest per cluster
# count. Larger BLOCK_N reads the centroids fewer times (at Wan 1.3B with 1,000 key clusters, 128 tokens: ~0.8 GB
# from L2 per assignment; 256: half). 300 query clusters waste less in tiles of 64 or 128 (320, 384) than of 256
# (512). Compiled for sm_90 (bf16, session 17): (128, 128, 8, 2) takes 173 registers a thread and (256, 64, 8, 2) 211,
# one program an SM each (an earlier comment here had them at 128, two an SM: not so); (128, 128, 4, 2), 238
# registers over half the threads, fits two, and was the fastest at 1,000 clusters in an H200 probe at Wan 1.3B
# (0.268 ms against 0.279 for (256, 64, 8, 2)), the slowest of those three at 300 (0.120 against 0.103).
ASSIGN_CONFIGS = ((128, 128, 8, 2), (256, 128, 8, 2), (128, 256, 8, 2), (256, 64, 8, 2), (256, 128, 16, 2),
                  (128, 64, 4, 3), (128, 128, 4, 2))  # fmt: skip
# The prepared centroids are padded to a multiple of every assignment BLOCK_C (powers of two: the largest), so that
# the assignment loads them unmasked.
CENTROID_PAD = max(config[1] for config in ASSIGN_CONFIGS)
# Clusters per program of the initial preparation (:func:`_prepare`), a divisor of CENTROID_PAD.
PREPARE_BLOCK = 32
# Candidates, none timed one by one. (BLOCK_C clusters, BLOCK_N tokens, num_warps, num_stages) of the update: small
# cluster tiles give more programs (300 query clusters in tiles of 64 are only 5 per head), larger ones read x fewer
# times.
UPDATE_CONFIGS = ((64, 64, 4, 3), (128, 64, 8, 3), (64, 128, 4, 3), (32, 128, 4, 3), (128, 128, 8, 2),
                  (32, 64, 4, 4))  # fmt: skip
# Candidates. (WINDOW clusters, BLOCK_N tokens, num_warps, num_stages) of the sorted update: a window's tokens
# gathered in (BLOCK_N, 128) tiles. Wan's clusters average N / C tokens (33 of 1,000 key clusters, 109 of 300 query
# clusters), so a window of 16 runs ~4 (k) to ~14 (q) tiles of 128, loads in flight across them. At Wan 1.3B's shape
# on an H200, (16, 128, 4, 3) took 0.041 ms at 300 clusters and 0.048 at 1,000 on converged clusters, against 0.054
# and 0.064 for the best configuration of the earlier kernel (one program per cluster; run_3bfeba6/kmeans_probe2),
# and 0.066 and 0.079 against 0.20 and 0.31 on the lopsided clusters of a first iteration from random tokens
# (run_474e9b5/kmeans_probe); windows of 64 were 2-3x slower (fewer programs), 32-token tiles 1.2-2x. In svg2's warm
# selection the four updates took 0.156 ms of device time against 0.288 (run_24d3bf0, run_4ad7f39).
SORTED_UPDATE_CONFIGS = ((16, 128, 4, 3), (16, 64, 4, 3), (32, 128, 4, 3), (16, 128, 8, 3), (32, 64, 4, 3),
                         (16, 32, 4, 3))  # fmt: skip
# Under the interpreter, every tile 16.
INTERPRETER_TILE, INTERPRETER_WARPS, INTERPRETER_STAGES = 16, 4, 1
# The counting sort's fixed tiles (plain triton.jit, not autotuned; timed as a whole, not per tile size). Tokens per
# block: at Wan's 32,760 tokens 32 blocks per group (384 programs over 12 groups, about three per H200 SM), the
# per-block counts ``(G, blocks, C)`` int32 1.5 MB at 1,000 clusters; one block's keys sort on chip (a bitonic
# network of log2(1024) (log2(1024) + 1) / 2 = 55 compare-exchange steps). Smaller blocks sort faster but multiply
# the counts the scan reads, larger ones halve them with fewer, slower programs. A power of two (its local index
# takes the keys' low bits).
SORT_BLOCK = 1024
# Bins per histogram call: a runtime cluster count in tiles of 256 (300 clusters in two, 1,000 in four). Triton's
# histogram takes log2(bins) warp ballots per 32 labels and a popcount per bin a lane owns (bins / 32: 8 at 256), so
# the work per label grows with the tile and the tiles add up to about C either way.
SORT_CLUSTER_TILE = 256
# Elements of the scan's (blocks padded to a power of two, clusters) tile, over 8 warps: compiled for sm_90 without a
# GPU, 4,096 spill nothing from 1 to 256 padded blocks (N up to 262,144 at SORT_BLOCK; 100-252 registers, the scans
# over both axes holding several copies of the tile); 8,192 spilled at 128 blocks, and 16 warps at 8,192 too.
SCAN_TILE = 4096
# The histogram and scatter programs: 1,024 tokens over 4 warps, 8 a thread (compiled for sm_90: the scatter at 32
# registers, the histogram at 150, no spill; over 8 warps the sort takes 35 barriers against 26). Not timed.
SORT_WARPS, SCAN_WARPS = 4, 8


def _kernel(configs: tuple[tuple[int, ...], ...], names: tuple[str, ...]) -> Any:
    """``triton.autotune`` over ``configs`` (``(*tiles, num_warps, num_stages)``, the tile sizes named ``names``)
    around ``triton.jit``; without Triton the plain function, which is never launched."""

    def wrap(fn: Any) -> Any:
        if triton is None:
            return fn
        interpreted = ((INTERPRETER_TILE,) * len(names) + (INTERPRETER_WARPS, INTERPRETER_STAGES),)
        listed = [triton.Config(dict(zip(names, config[:-2], strict=True)), num_warps=config[-2],
                                num_stages=config[-1])
                  for config in (interpreted if INTERPRETED else configs)]  # fmt: skip
        return triton.autotune(configs=listed, key=["C", "BLOCK_D"])(triton.jit(fn))

    return wrap


# -- kernels --------------------------------------------------------------------------------------


@triton_jit
def _store_prepared(ct_ptr, sq_ptr, g, C, CP, ids, centroids, BLOCK_D: tl.constexpr):
    """The assignment's copy of the centroids ``(R, BLOCK_D)`` fp32 (zero past D and for ids >= C) of clusters ``ids
    (R,)`` of group g: ``ct[g, :, ids]`` (G, BLOCK_D, CP) in ct's dtype (x's) and their fp32 squared norms
    ``sq[g, ids]`` (G, CP), +inf for the padding ids >= C, which then never win; ids >= CP are not written."""
    cols = tl.arange(0, BLOCK_D)
    stored = ids < CP
    squares = tl.sum(centroids * centroids, axis=1)
    tl.store(sq_ptr + g * CP + ids, tl.where(ids < C, squares, float("inf")), mask=stored)
    tl.store(ct_ptr + g * BLOCK_D * CP + cols[None, :] * CP + ids[:, None], centroids.to(ct_ptr.dtype.element_ty),
             mask=stored[:, None])  # fmt: skip


@triton_jit
def _prepare(c_ptr, ct_ptr, sq_ptr, C, CP, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program (cluster tile, group g): :func:`_store_prepared` of clusters ``[tile BLOCK_C, (tile + 1) BLOCK_C)``
    from contiguous centroids ``(G, C, D)`` fp32, padding included."""
    tile, g = tl.program_id(0), tl.program_id(1).to(tl.int64)
    ids = tile * BLOCK_C + tl.arange(0, BLOCK_C)
    cols = tl.arange(0, BLOCK_D)
    centroids = tl.load(c_ptr + g * C * D + ids[:, None] * D + cols[None, :],
                        mask=(ids < C)[:, None] & (cols < D)[None, :], other=0.0)  # fmt: skip
    _store_prepared(ct_ptr, sq_ptr, g, C, CP, ids, centroids, BLOCK_D)


@triton_jit
def _round_to_points(dots, dtype: tl.constexpr, BF16_ASM: tl.constexpr):
    """fp32 ``dots`` rounded to the points' ``dtype`` (to nearest, ties to even) and back to fp32, as the torch
    path's fp16/bf16 matmul returns its products. With ``BF16_ASM`` (bf16 on a GPU; the interpreter runs no inline
    assembly) one ``cvt.rn.bf16x2.f32`` of (dot, 0) per element (SASS F2FP.BF16.F32.PACK_AB), whose packed result,
    the rounded dot in the high half and zeros below, is that fp32 value itself. Triton's own conversion compiles to
    a scalar F2F.BF16.F32 and a shift back per element there; F2F is a conversion unit's instruction, at a fraction
    of the fp32 FMA rate (the CUDA guide's throughput table; not measured here)."""
    if BF16_ASM:
        packed = tl.inline_asm_elementwise("cvt.rn.bf16x2.f32 $0, $1, $2;", "=r,f,f", [dots, tl.zeros_like(dots)],
                                           dtype=tl.int32, is_pure=True, pack=1)  # fmt: skip
        return packed.to(tl.float32, bitcast=True)
    return dots.to(dtype).to(tl.float32)


@_kernel(ASSIGN_CONFIGS, ("BLOCK_N", "BLOCK_C"))
def _assign(x_ptr, ct_ptr, sq_ptr, labels_ptr, N, C, CP, sxg, sxn, D: tl.constexpr, BLOCK_D: tl.constexpr,
            BF16_ASM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):  # fmt: skip
    """Program (token tile, group g): the nearest centroid of tokens ``[tile BLOCK_N, (tile + 1) BLOCK_N)`` into
    ``labels (G, N)`` int32, from x ``(G, N, D)`` (strides sxg, sxn, 1) and the prepared centroids of
    :func:`_prepare`: ``ct (G, BLOCK_D, CP)`` in x's dtype and ``sq (G, CP)`` fp32."""
    tile, g = tl.program_id(0), tl.program_id(1).to(tl.int64)
    tokens = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    x = tl.load(x_ptr + g * sxg + tokens.to(tl.int64)[:, None] * sxn + cols[None, :],
                mask=(tokens < N)[:, None] & (cols < D)[None, :], other=0.0)  # fmt: skip
    ct_base = ct_ptr + g * BLOCK_D * CP + cols[:, None] * CP
    sq_base = sq_ptr + g * CP
    best = tl.full((BLOCK_N,), float("inf"), dtype=tl.float32)
    best_index = tl.zeros((BLOCK_N,), dtype=tl.int32)
    for start in range(0, C, BLOCK_C):
        # Unmasked: CP is a multiple of BLOCK_C, the padding zero in ct and +inf in sq (never below a real distance).
        ids = start + tl.arange(0, BLOCK_C)
        dots = _round_to_points(tl.dot(x, tl.load(ct_base + ids[None, :])), x.dtype, BF16_ASM)
        distances = tl.load(sq_base + ids)[None, :] - 2.0 * dots
        # The tile's minimum, then its first column (cheaper than an argmin's (value, index) pairs).
        tile_min = tl.min(distances, axis=1)
        first = tl.min(tl.where(distances == tile_min[:, None], tl.arange(0, BLOCK_C)[None, :], BLOCK_C), axis=1)
        better = tile_min < best  # strictly: on a tie across tiles the earlier (lower) index stays
        best = tl.where(better, tile_min, best)
        best_index = tl.where(better, first + start, best_index)
    tl.store(labels_ptr + g * N + tokens, best_index, mask=tokens < N)


@_kernel(UPDATE_CONFIGS, ("BLOCK_C", "BLOCK_N"))
def _update(x_ptr, labels_ptr, c_ptr, out_ptr, sizes_ptr, ct_ptr, sq_ptr, N, C, CP, sxg, sxn, D: tl.constexpr,
            BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """Program (cluster tile, group g): the new centroids ``out (G, C, D)`` fp32 and sizes ``(G, C)`` int64 of
    clusters ``[tile BLOCK_C, (tile + 1) BLOCK_C)`` from x, the labels ``(G, N)`` int32 and the previous centroids
    ``c``, and their prepared copy for the next assignment (:func:`_store_prepared`)."""
    tile, g = tl.program_id(0), tl.program_id(1).to(tl.int64)
    ids = tile * BLOCK_C + tl.arange(0, BLOCK_C)
    cols = tl.arange(0, BLOCK_D)
    inside = cols < D
    x_base = x_ptr + g * sxg
    sums = tl.zeros((BLOCK_C, BLOCK_D), dtype=tl.float32)
    counts = tl.zeros((BLOCK_C,), dtype=tl.int32)
    for start in range(0, N, BLOCK_N):
        tokens = start + tl.arange(0, BLOCK_N)
        present = tokens < N
        labels = tl.load(labels_ptr + g * N + tokens, mask=present, other=-1)
        member = ids[:, None] == labels[None, :]
        counts += tl.sum(member.to(tl.int32), axis=1)
        x = tl.load(x_base + tokens.to(tl.int64)[:, None] * sxn + cols[None, :],
                    mask=present[:, None] & inside[None, :], other=0.0)  # fmt: skip
        sums = tl.dot(member.to(x.dtype), x, sums)  # 1 x x_n is exact; fp32 accumulation
    rows = g * C * D + ids[:, None] * D + cols[None, :]
    mask = (ids < C)[:, None] & inside[None, :]
    previous = tl.load(c_ptr + rows, mask=mask, other=0.0)
    means = tl.math.div_rn(sums, tl.maximum(counts, 1).to(tl.float32)[:, None])  # IEEE division, as torch's
    updated = tl.where((counts > 0)[:, None], means, previous)  # zero past C and D: the padding's copy
    tl.store(out_ptr + rows, updated, mask=mask)
    tl.store(sizes_ptr + g * C + ids, counts.to(tl.int64), mask=ids < C)
    _store_prepared(ct_ptr, sq_ptr, g, C, CP, ids, updated, BLOCK_D)


@_kernel(SORTED_UPDATE_CONFIGS, ("WINDOW", "BLOCK_N"))
def _update_sorted(x_ptr, order_ptr, bounds_ptr, c_ptr, out_ptr, sizes_ptr, ct_ptr, sq_ptr, N, C, CP, sxg, sxn,
                   D: tl.constexpr, BLOCK_D: tl.constexpr, WINDOW: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """Program (window of clusters ``[w WINDOW, (w + 1) WINDOW)``, group g): their new centroids ``out[g, j]`` (fp32)
    and sizes ``sizes[g, j]`` (int64) from the tokens ``order[g, bounds[g, j]:bounds[g, j + 1]]`` (``order (G, N)``
    int64, the tokens sorted by label; ``bounds (G, C + 1)`` int64, where each cluster starts in that order), their
    rows of x and the previous centroids ``c``, and their prepared copy for the next assignment
    (:func:`_store_prepared`). The window's clusters are one run of the order: its rows are gathered in tiles of
    BLOCK_N positions and summed per cluster by a product with the (WINDOW, BLOCK_N) matrix ``[position in cluster
    j]``, accumulated in fp32 on tensor cores (``1 x x_n`` is exact)."""
    window, g = tl.program_id(0), tl.program_id(1).to(tl.int64)
    ids = window * WINDOW + tl.arange(0, WINDOW)
    listed = ids < C
    bounds = bounds_ptr + g * (C + 1)
    begins = tl.load(bounds + ids, mask=listed, other=0)
    ends = tl.load(bounds + ids + 1, mask=listed, other=0)  # past C: an empty range, no position in it
    begin = tl.load(bounds + window * WINDOW)
    end = tl.load(bounds + tl.minimum(window * WINDOW + WINDOW, C))
    cols = tl.arange(0, BLOCK_D)
    inside = cols < D
    x_base = x_ptr + g * sxg
    sums = tl.zeros((WINDOW, BLOCK_D), dtype=tl.float32)
    for start in range(begin, end, BLOCK_N):
        positions = start + tl.arange(0, BLOCK_N)
        present = positions < end
        tokens = tl.load(order_ptr + g * N + positions, mask=present, other=0)
        x = tl.load(x_base + tokens[:, None] * sxn + cols[None, :], mask=present[:, None] & inside[None, :],
                    other=0.0)  # fmt: skip
        member = (positions[None, :] >= begins[:, None]) & (positions[None, :] < ends[:, None])
        sums = tl.dot(member.to(x.dtype), x, sums)
    counts = ends - begins
    rows = g * C * D + ids[:, None] * D + cols[None, :]
    mask = listed[:, None] & inside[None, :]
    previous = tl.load(c_ptr + rows, mask=mask, other=0.0)
    means = tl.math.div_rn(sums, tl.maximum(counts, 1).to(tl.float32)[:, None])  # IEEE division, as torch's
    updated = tl.where((counts > 0)[:, None], means, previous)  # zero past C and D: the padding's copy
    tl.store(out_ptr + rows, updated, mask=mask)
    tl.store(sizes_ptr + g * C + ids, counts, mask=listed)
    _store_prepared(ct_ptr, sq_ptr, g, C, CP, ids, updated, BLOCK_D)


@triton_jit
def _block_histograms(labels_ptr, counts_ptr, N, C, blocks, BLOCK: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program (token block b, group g): ``counts[g, b, j]`` (G, blocks, C) int32, how many of tokens ``[b BLOCK,
    (b + 1) BLOCK)`` have label j, from ``labels (G, N)`` int32 in ``[0, C)``; the clusters in tiles of BLOCK_C."""
    block, g = tl.program_id(0), tl.program_id(1).to(tl.int64)
    tokens = block * BLOCK + tl.arange(0, BLOCK)
    labels = tl.load(labels_ptr + g * N + tokens, mask=tokens < N, other=-1)
    row = counts_ptr + (g * blocks + block) * C
    for start in range(0, C, BLOCK_C):
        bins = labels - start
        # Masked, not left out of range: on the GPU the histogram bins a value by its low log2(BLOCK_C) bits.
        counts = tl.histogram(bins, BLOCK_C, mask=(bins >= 0) & (bins < BLOCK_C))
        ids = start + tl.arange(0, BLOCK_C)
        tl.store(row + ids, counts, mask=ids < C)


@triton_jit
def _cluster_offsets(counts_ptr, offsets_ptr, bounds_ptr, C, blocks, BLOCKS: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program (cluster tile t, group g), clusters ``[t BLOCK_C, (t + 1) BLOCK_C)``: from the block counts ``(G,
    blocks, C)`` int32 of :func:`_block_histograms`, ``bounds[g, j]`` (G, C + 1) int64, where cluster j starts in the
    group's order (the tokens of every cluster before it; the last tile also writes ``bounds[g, C]``, N), and
    ``offsets[g, b, j]`` (G, blocks, C) int32, ``bounds[g, j] + (tokens of cluster j in blocks before b) - (tokens of
    block b in clusters before j)``: a token of block b with label j that sorts to position i among its block's
    tokens (by label, then index) goes to position ``offset + i`` of the order. BLOCKS is ``blocks`` rounded up to a
    power of two (the tile's rows). The program first sums the counts of the clusters before its tile (plain sums,
    no scan), so that the tiles of a group scan at once, not one after another."""
    tile, g = tl.program_id(0), tl.program_id(1).to(tl.int64)
    rows = tl.arange(0, BLOCKS)
    base = g * blocks * C + rows[:, None] * C
    row_before = tl.zeros((BLOCKS,), dtype=tl.int32)  # tokens of each block in the clusters before the tile
    for start in range(0, tile * BLOCK_C, BLOCK_C):
        ids = start + tl.arange(0, BLOCK_C)
        counts = tl.load(counts_ptr + base + ids[None, :], mask=(rows < blocks)[:, None], other=0)  # ids < C here
        row_before += tl.sum(counts, axis=1)
    ids = tile * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < blocks)[:, None] & (ids < C)[None, :]
    counts = tl.load(counts_ptr + base + ids[None, :], mask=mask, other=0)
    totals = tl.sum(counts, axis=0)
    first = tl.sum(row_before, axis=0) + tl.cumsum(totals, axis=0) - totals
    earlier_blocks = tl.cumsum(counts, axis=0) - counts
    earlier_clusters = row_before[:, None] + tl.cumsum(counts, axis=1) - counts
    tl.store(offsets_ptr + base + ids[None, :], first[None, :] + earlier_blocks - earlier_clusters, mask=mask)
    tl.store(bounds_ptr + g * (C + 1) + ids, first.to(tl.int64), mask=ids < C)
    if tile == tl.num_programs(0) - 1:  # N: every label is below C
        tl.store(bounds_ptr + g * (C + 1) + C, (tl.sum(row_before, axis=0) + tl.sum(totals, axis=0)).to(tl.int64))


@triton_jit
def _scatter_order(labels_ptr, offsets_ptr, order_ptr, N, C, blocks, BLOCK: tl.constexpr, LOG_BLOCK: tl.constexpr):
    """Program (token block b, group g): ``order[g, offset[g, b, j] + i] = token`` (G, N) int64 for each token of
    the block, with label j and position i in its block sorted by (label, index): one :func:`sort_keys` of the
    distinct keys ``label << LOG_BLOCK | local index`` (the tokens past N keyed as label C, after every real one and
    never stored). ``offsets (G, blocks, C)`` int32 from :func:`_cluster_offsets`."""
    block, g = tl.program_id(0), tl.program_id(1).to(tl.int64)
    local = tl.arange(0, BLOCK)
    tokens = block * BLOCK + local
    labels = tl.load(labels_ptr + g * N + tokens, mask=tokens < N, other=0)
    keys = sort_keys((tl.where(tokens < N, labels, C) << LOG_BLOCK) | local, LOG_BLOCK)
    sorted_labels = keys >> LOG_BLOCK
    present = sorted_labels < C
    offsets = tl.load(offsets_ptr + (g * blocks + block) * C + sorted_labels, mask=present, other=0)
    tokens = block * BLOCK + (keys & (BLOCK - 1))
    tl.store(order_ptr + g * N + offsets + local, tokens.to(tl.int64), mask=present)


# -- dispatch -------------------------------------------------------------------------------------


def unsupported_reason(x: torch.Tensor) -> str | None:
    """Why the kernels cannot cluster ``x`` (None when they can): they run on CUDA, or on CPU tensors under the
    Triton interpreter (``TRITON_INTERPRET=1``, tests), in fp16 or bf16 (fp16 only in the interpreter, which
    multiplies bf16 operands as raw integers; bf16 from sm_80 on), for ``(G, N, D)`` points with ``D <= 128``."""
    if triton is None:
        return "triton is not installed"
    if not on_kernel_device(x):
        return f"points are not on {KERNEL_DEVICE}"
    dtypes = (torch.float16,) if INTERPRETED else (torch.float16, torch.bfloat16)
    if x.dtype not in dtypes:
        return f"points are {x.dtype}: the kernels cluster {' or '.join(str(d) for d in dtypes)} points"
    if x.dim() != 3:
        return f"points of shape {tuple(x.shape)} are not (G, N, D)"
    if x.shape[-1] > MAX_HEAD_DIM:
        return f"head_dim {x.shape[-1]} > {MAX_HEAD_DIM}"
    if x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) < (8, 0):
        return "bf16 points need sm_80 or newer (bf16 matrix products, the bf16 rounding instruction)"
    return None


def use_fused(x: torch.Tensor, backend: str | None = None) -> bool:
    """Whether this k-means runs the kernels: ``backend`` (default ``$BENCH_KMEANS_BACKEND``, else
    :data:`DEFAULT_BACKEND`) ``auto`` (when they can), ``torch`` (never) or ``triton`` (always; HarnessError when
    they cannot)."""
    return use_kernel(BACKEND_ENV, DEFAULT_BACKEND, backend, lambda: unsupported_reason(x), "the Triton k-means")


def chosen_variant(variant: str | None = None) -> str:
    """The update step: ``variant``, else ``$BENCH_KMEANS_UPDATE``, else :data:`DEFAULT_VARIANT`; HarnessError when
    it is not one of :data:`VARIANTS`."""
    return env_choice(variant, VARIANT_ENV, DEFAULT_VARIANT, VARIANTS)


def prepare_centroids(centroids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """What the assignment reads of contiguous centroids ``(G, C, D)`` fp32 (:func:`_prepare`, one launch):
    ``ct (G, BLOCK_D, CP)`` the centroids rounded to ``dtype`` (x's) and transposed, ``sq (G, CP)`` fp32 their
    squared norms, with CP = C rounded up to :data:`CENTROID_PAD`; zeros in ``ct`` and +inf in ``sq`` past C, zeros
    in ``ct`` past D. The update kernels then refresh the first C clusters in place.

    Raises:
        ValueError: an assignment configuration in force (a caller may pin others) whose BLOCK_C does not divide
            CP: its unmasked loads would read past the buffers.
    """
    if any(CENTROID_PAD % config.kwargs["BLOCK_C"] for config in _assign.configs):
        raise ValueError(f"every assignment BLOCK_C must divide CENTROID_PAD = {CENTROID_PAD}: "
                         f"{[config.kwargs['BLOCK_C'] for config in _assign.configs]}")  # fmt: skip
    groups, clusters, dim = centroids.shape
    block_d = tile_columns(dim)
    padded = triton.cdiv(clusters, CENTROID_PAD) * CENTROID_PAD
    ct = torch.empty(groups, block_d, padded, device=centroids.device, dtype=dtype)
    sq = torch.empty(groups, padded, device=centroids.device, dtype=torch.float32)
    _prepare[(padded // PREPARE_BLOCK, groups)](centroids, ct, sq, clusters, padded, D=dim, BLOCK_D=block_d,
                                                BLOCK_C=PREPARE_BLOCK)  # fmt: skip
    return ct, sq


def sort_labels(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``labels (G, N)`` sorted per group, stable (the tokens of a cluster in ascending order): the sorted labels
    ``(G, N)`` int32 and the order ``(G, N)`` int64 (token indices), by a sort of int32 keys (half the radix sort's
    key bits of int64; a stable sort's order does not depend on the keys' dtype). The torch path's order
    (:func:`methods.svg2.lloyd`); the kernels sort by :func:`counting_sort`."""
    return torch.sort(labels.to(torch.int32), dim=1, stable=True)


def counting_sort(labels: torch.Tensor, clusters: int, block: int = SORT_BLOCK,
                  cluster_tile: int = SORT_CLUSTER_TILE) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The stable sort of contiguous ``labels (G, N)`` int32 in ``[0, clusters)`` per group, in three launches and
    no host sync: the order ``(G, N)`` int64 (``torch.sort(labels, dim=1, stable=True).indices``) and the bounds
    ``(G, C + 1)`` int64 (cluster j is ``order[g, bounds[g, j]:bounds[g, j + 1]]``; ``bounds[g, C] = N``).

    :func:`_block_histograms` counts each block of ``block`` tokens' labels (tiles of ``cluster_tile`` clusters),
    :func:`_cluster_offsets` scans the counts per tile of clusters (cluster-major: cluster 0 over the blocks in
    order, then cluster 1, ...), :func:`_scatter_order` sorts each block's keys and writes each token at its
    cluster's offset plus its rank. ``block`` (at least 2) and ``cluster_tile`` are powers of two (the defaults
    for a GPU; tests take smaller ones for several blocks and tiles at small sizes).

    Raises:
        ValueError: ``block`` or ``cluster_tile`` not a power of two, ``block`` below 2, or ``clusters`` too many
            for the keys ``label << log2(block) | index`` below 2^30 (:func:`sort_keys`): ``clusters < 2^(30 -
            log2(block))``, 1,048,576 at blocks of 1,024.
    """
    if block < 2 or cluster_tile < 1 or block & (block - 1) or cluster_tile & (cluster_tile - 1):
        raise ValueError(f"block ({block}, at least 2) and cluster_tile ({cluster_tile}) must be powers of two")
    log_block = block.bit_length() - 1
    if clusters >= 1 << (30 - log_block):
        raise ValueError(f"{clusters} clusters overflow the counting sort's keys at blocks of {block} tokens")
    groups, tokens = labels.shape
    if tokens == 0:  # nothing to sort: every cluster empty
        return labels.new_empty((groups, 0), dtype=torch.int64), labels.new_zeros(
            (groups, clusters + 1), dtype=torch.int64
        )
    blocks = triton.cdiv(tokens, block)
    padded_blocks = triton.next_power_of_2(blocks)
    # The counts, then the scan's offsets beside them (a tile's counts are read by every later tile's program).
    counts = torch.empty(groups, blocks, clusters, device=labels.device, dtype=torch.int32)
    offsets = torch.empty_like(counts)
    order = torch.empty(groups, tokens, device=labels.device, dtype=torch.int64)
    bounds = torch.empty(groups, clusters + 1, device=labels.device, dtype=torch.int64)
    _block_histograms[(blocks, groups)](labels, counts, tokens, clusters, blocks, BLOCK=block, BLOCK_C=cluster_tile,
                                        num_warps=SORT_WARPS)  # fmt: skip
    # At least 16 clusters a tile: past 256 padded blocks (N > 262,144 tokens at blocks of 1,024) the tile outgrows
    # SCAN_TILE (spills, from 512) rather than shrinking to slivers.
    scan_tile = max(16, SCAN_TILE // padded_blocks)
    _cluster_offsets[(triton.cdiv(clusters, scan_tile), groups)](counts, offsets, bounds, clusters, blocks,
                                                                 BLOCKS=padded_blocks, BLOCK_C=scan_tile,
                                                                 num_warps=SCAN_WARPS)  # fmt: skip
    _scatter_order[(blocks, groups)](labels, offsets, order, tokens, clusters, blocks, BLOCK=block,
                                     LOG_BLOCK=log_block, num_warps=SORT_WARPS)  # fmt: skip
    return order, bounds


def _update_onehot(x: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor, updated: torch.Tensor,
                   sizes: torch.Tensor, ct: torch.Tensor, sq: torch.Tensor) -> None:  # fmt: skip
    """The one-hot update (:func:`_update`) of ``updated`` and ``sizes`` from x, the labels and the centroids, and
    of the prepared ``ct``, ``sq`` (:func:`prepare_centroids`) from ``updated``; it sorts nothing (``None``: no order
    of the labels to hand on)."""
    groups, tokens, dim = x.shape
    clusters = centroids.shape[1]

    def grid(meta: dict[str, Any]) -> tuple[int, int]:
        return triton.cdiv(clusters, meta["BLOCK_C"]), groups

    launch_tuned(_update, grid, x, labels, centroids, updated, sizes, ct, sq, tokens, clusters, sq.shape[1],
                 x.stride(0), x.stride(1), D=dim, BLOCK_D=tile_columns(dim))  # fmt: skip


def _update_by_sorting(x: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor, updated: torch.Tensor,
                       sizes: torch.Tensor, ct: torch.Tensor, sq: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """The sorted update (:func:`_update_sorted`), same arguments as :func:`_update_onehot`: the labels' stable order
    per group and each cluster's bounds in it (:func:`counting_sort`; stable, so the sums' order is the tokens'
    order), then one program per (window of clusters, group). Returns the order ``(G, N)`` int64."""
    groups, tokens, dim = x.shape
    clusters = centroids.shape[1]
    order, bounds = counting_sort(labels, clusters)

    def grid(meta: dict[str, Any]) -> tuple[int, int]:
        return triton.cdiv(clusters, meta["WINDOW"]), groups

    launch_tuned(_update_sorted, grid, x, order, bounds, centroids, updated, sizes, ct, sq, tokens, clusters,
                 sq.shape[1], x.stride(0), x.stride(1), D=dim, BLOCK_D=tile_columns(dim))  # fmt: skip
    return order


#: Each update variant's step ``(x, labels, centroids, updated, sizes, ct, sq) -> order``: it writes ``updated``,
#: ``sizes``, ``ct`` and ``sq`` and returns the labels' stable sorting order where it computed one (else ``None``).
UPDATE_STEPS: dict[str, Callable[..., torch.Tensor | None]] = {"onehot": _update_onehot, "sorted": _update_by_sorting}
#: Each update variant's autotuned kernel (the one whose configurations the GPU check pins in turn).
TUNERS = {"onehot": _update, "sorted": _update_sorted}


@kernel_op("kmeans_lloyd")
def kmeans_lloyd(x: torch.Tensor, centroids: torch.Tensor, iterations: int, update: str = DEFAULT_VARIANT
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """``iterations`` (>= 1) Lloyd iterations from ``centroids`` ``(G, C, D)`` fp32 on points x ``(G, N, D)`` (any
    strides), with the update step ``update`` (one of :data:`VARIANTS`; same results up to the fp32 sums' order for
    finite points: a non-finite point makes NaN every centroid its program multiplies it into, its window of
    clusters in the sorted update and its cluster tile in the one-hot one, its own cluster in the torch path), as
    one op opaque to torch.compile (Dynamo does not trace the autotuner's Python): labels of the last assignment
    ``(G, N)`` int64, the means of those labels ``(G, C, D)`` fp32 (an empty cluster keeps its centroid), cluster
    sizes ``(G, C)`` int64 and the order ``(G, N)`` int64 that sorts those labels stably per group (the sorted
    update's last sort, else one sort after the iterations), each in memory of its own. The caller checks
    :func:`unsupported_reason` first (:func:`use_fused` does). Inference only: no autograd is registered.

    Raises:
        ValueError: iterations < 1, or 2^20 clusters or more (the counting sort's keys, :func:`counting_sort`).
        HarnessError: an unknown update step.
    """
    if iterations < 1:
        raise ValueError(f"k-means needs iterations >= 1, got {iterations}")
    update_step = UPDATE_STEPS[chosen_variant(update)]
    x = last_axis_contiguous(x)
    groups, tokens, dim = x.shape
    clusters = centroids.shape[1]
    centroids = centroids.float().contiguous()
    labels = torch.empty(groups, tokens, device=x.device, dtype=torch.int32)  # the sort's keys: see the module
    sizes = torch.empty(groups, clusters, device=x.device, dtype=torch.int64)
    block_d = tile_columns(dim)
    bf16_asm = x.dtype == torch.bfloat16 and not INTERPRETED

    def assign_grid(meta: dict[str, Any]) -> tuple[int, int]:
        return triton.cdiv(tokens, meta["BLOCK_N"]), groups

    ct, sq = prepare_centroids(centroids, x.dtype)  # then each update step refreshes them
    for _ in range(iterations):
        launch_tuned(_assign, assign_grid, x, ct, sq, labels, tokens, clusters, sq.shape[1], x.stride(0),
                     x.stride(1), D=dim, BLOCK_D=block_d, BF16_ASM=bf16_asm)  # fmt: skip
        updated = torch.empty_like(centroids)
        order = update_step(x, labels, centroids, updated, sizes, ct, sq)
        centroids = updated
    if order is None:  # the one-hot update sorts nothing
        order = counting_sort(labels, clusters)[0]
    return labels.long(), centroids, sizes, order


@kmeans_lloyd.register_fake
def _(x: torch.Tensor, centroids: torch.Tensor, iterations: int, update: str = DEFAULT_VARIANT
      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    groups, tokens, _ = x.shape
    return (x.new_empty((groups, tokens), dtype=torch.int64), centroids.new_empty(centroids.shape, dtype=torch.float32),
            x.new_empty((groups, centroids.shape[1]), dtype=torch.int64),
            x.new_empty((groups, tokens), dtype=torch.int64))  # fmt: skip
