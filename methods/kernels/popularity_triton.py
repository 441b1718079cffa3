"""SVG2's key clusters put in order of popularity on CUDA in Triton: five launches where torch takes about twenty.

Computes what :func:`methods.svg2.by_popularity` computes in torch (its torch path, the CPU path and the
reference), for kept cluster pairs ``keep (G, R, C)`` of R query and C key clusters per group (one (batch, head)
pair), query and key cluster sizes, each key's cluster and the keys' order by cluster (k-means's stable sort):

- each key cluster's popularity, the query tokens that keep it, ``sum_i keep[i, j] |Q_i|``, and each query
  cluster's kept keys, ``sum_j keep[i, j] |K_j|`` (what the density counts);
- the key clusters ranked by popularity, most first, ties by label (``argsort(descending, stable)``): their new
  order, sizes and first positions;
- the keys' new order: every cluster's tokens still consecutive and ascending, moved by its new start less its old
  one; and ``keep``'s columns in the new cluster order.

:func:`_cluster_totals`, one program per (tile of query clusters, group), sums both over its rows of ``keep`` (the
popularity by int64 atomics into zeros); :func:`_rank_clusters`, one program per group, ranks the C key clusters on
chip: one bitonic sort (:func:`methods.kernels.sorting_triton.sort_keys`) of the int32 keys ``(N - popularity) <<
log2(C') | label`` (C' = C rounded up to a power of two; a popularity is at most N), and writes the new order, sizes
and each cluster's old and new first positions; :func:`_move_keys`, one program per (tile of positions, group),
moves each key of the old order to its place in the new one. ``keep``'s columns are gathered by torch. In torch the
same is two products and sums over ``keep``, a sort, and a dozen gathers, scatters and running sums of sizes and
orders: at Wan 1.3B (300 x 1,000 clusters, 12 heads) about 0.13 ms of an H200's device time in svg2's plan, and
their host work (reports/gpu/h200/run_674ac94/svg2_profile.log.gz).

Shapes: keep ``(G, R, C)`` bool, q_sizes ``(G, R)``, k_sizes ``(G, C)`` int64 (the key sizes summing to N),
k_labels and k_order ``(G, N)`` int64. Returns keep ``(G, R, C)`` bool, k_sizes ``(G, C)``, k_order ``(G, N)`` and
kept keys ``(G, R)`` int64, as the torch path. Needs ``(N + 2) C' <= 2^30`` (the sort's int32 keys) and C' <=
:data:`MAX_CLUSTERS`.
"""

from __future__ import annotations

import torch

from methods.kernels import (
    BACKENDS,
    INTERPRETED,
    KERNEL_DEVICE,
    kernel_choice,
    kernel_op,
    on_kernel_device,
    triton_jit,
    use_kernel,
)
from methods.kernels.sorting_triton import sort_keys

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs (CI): every call takes the torch path
    triton = tl = None

BACKEND_ENV = "BENCH_POPULARITY_BACKEND"
DEFAULT_BACKEND = "auto"
kernel_choice(BACKEND_ENV, DEFAULT_BACKEND, BACKENDS)
#: Most key clusters one program ranks on chip (a sort of this many int32 keys; run on an H200 in the tests of
#: reports/gpu/h200/run_1f3b6ab/).
MAX_CLUSTERS = 4096
#: Entries of ``keep`` a program of :func:`_cluster_totals` sums (16 query clusters of 1,024 padded key clusters), and
#: its warps. A first version summed every query cluster of a head in one program (12 programs at Wan 1.3B): 0.20 ms
#: on an H200, more than torch's operators (reports/gpu/h200/run_6a6c3e9/).
TOTALS_TILE, TOTALS_WARPS = 16384, 8
#: Padded key clusters a warp of :func:`_rank_clusters` sorts (at least 4 warps): compiled for sm_90a without a GPU,
#: 95 registers a thread at 1,024 over 4 warps, 190 at 4,096 over 8 (over 4 it spilled).
RANK_CLUSTERS_PER_WARP = 512
if INTERPRETED:  # tests: several tiles of query clusters at small sizes
    TOTALS_TILE = 64
#: Positions a program of :func:`_move_keys` moves.
MOVE_BLOCK = 1024


@triton_jit
def _cluster_totals(keep_ptr, q_sizes_ptr, k_sizes_ptr, kept_keys_ptr, popularity_ptr, R, C, ROWS: tl.constexpr,
                    BLOCK_C: tl.constexpr):  # fmt: skip
    """Program (tile t of ROWS query clusters, group g): from ``keep (G, R, C)``, ``q_sizes (G, R)`` and ``k_sizes
    (G, C)``, the kept keys ``(G, R)`` of the tile's query clusters, and their query tokens added to the popularity
    ``(G, C)`` of each key cluster they keep (int64 atomics: integer sums, the same in any order)."""
    tile, g = tl.program_id(0), tl.program_id(1).to(tl.int64)
    labels = tl.arange(0, BLOCK_C)
    listed = labels < C
    rows = tile * ROWS + tl.arange(0, ROWS)
    inside = rows < R
    kept = tl.load(keep_ptr + (g * R + rows[:, None]) * C + labels[None, :], mask=inside[:, None] & listed[None, :],
                   other=0) != 0  # fmt: skip
    k_sizes = tl.load(k_sizes_ptr + g * C + labels, mask=listed, other=0)
    q_sizes = tl.load(q_sizes_ptr + g * R + rows, mask=inside, other=0)
    tl.store(kept_keys_ptr + g * R + rows, tl.sum(tl.where(kept, k_sizes[None, :], 0), axis=1), mask=inside)
    popular = tl.sum(tl.where(kept, q_sizes[:, None], 0), axis=0)
    tl.atomic_add(popularity_ptr + g * C + labels, popular, mask=listed & (popular > 0), sem="relaxed")


@triton_jit
def _rank_clusters(popularity_ptr, k_sizes_ptr, clusters_ptr, new_sizes_ptr, old_starts_ptr, new_starts_ptr, C, N,
                   BLOCK_C: tl.constexpr, LOG_C: tl.constexpr):  # fmt: skip
    """Program g: the key clusters by decreasing ``popularity (G, C)``, ties by label: ``clusters[g, p]`` the one
    at new place p and ``new_sizes[g, p]`` its size; ``old_starts[g, j]`` and ``new_starts[g, j]`` where cluster
    j's keys start in the old and new orders (all int64). ``BLOCK_C = 2^LOG_C >= C``."""
    g = tl.program_id(0).to(tl.int64)
    labels = tl.arange(0, BLOCK_C)
    listed = labels < C
    popularity = tl.load(popularity_ptr + g * C + labels, mask=listed, other=0)
    k_sizes = tl.load(k_sizes_ptr + g * C + labels, mask=listed, other=0)
    # Ascending keys: the most popular first, then the lower label; the padding (N + 1) after every cluster.
    keys = (tl.where(listed, N - popularity, N + 1).to(tl.int32) << LOG_C) | labels
    clusters = sort_keys(keys, LOG_C) & (BLOCK_C - 1)
    new_sizes = tl.load(k_sizes_ptr + g * C + clusters, mask=listed, other=0)
    tl.store(clusters_ptr + g * C + labels, clusters.to(tl.int64), mask=listed)
    tl.store(new_sizes_ptr + g * C + labels, new_sizes, mask=listed)
    tl.store(old_starts_ptr + g * C + labels, tl.cumsum(k_sizes, axis=0) - k_sizes, mask=listed)
    tl.store(new_starts_ptr + g * C + clusters, tl.cumsum(new_sizes, axis=0) - new_sizes, mask=listed)


@triton_jit
def _move_keys(order_ptr, labels_ptr, old_starts_ptr, new_starts_ptr, out_ptr, N, C, BLOCK: tl.constexpr):
    """Program (tile t, group g): for positions p in ``[t BLOCK, (t + 1) BLOCK)`` below N of the old order ``(G,
    N)``, its key ``token`` of cluster ``j = labels[g, token]`` goes to ``out[g, p - old_starts[g, j] +
    new_starts[g, j]]``."""
    t, g = tl.program_id(0), tl.program_id(1).to(tl.int64)
    positions = t * BLOCK + tl.arange(0, BLOCK)
    inside = positions < N
    token = tl.load(order_ptr + g * N + positions, mask=inside, other=0)
    label = tl.load(labels_ptr + g * N + token, mask=inside, other=0)
    shift = tl.load(new_starts_ptr + g * C + label, mask=inside, other=0) - tl.load(old_starts_ptr + g * C + label,
                                                                                      mask=inside, other=0)  # fmt: skip
    tl.store(out_ptr + g * N + positions + shift, token, mask=inside)


def _padded(clusters: int) -> int:
    """Key clusters rounded up to a power of two, at least 2 (the sort's hypercube needs one axis)."""
    return max(2, triton.next_power_of_2(clusters))


def unsupported_reason(keep: torch.Tensor, k_order: torch.Tensor) -> str | None:
    """Why the kernels cannot order these clusters (None when they can): Triton on CUDA, or CPU tensors under the
    interpreter; ``keep (G, R, C)`` with C' (C rounded up to a power of two) at most :data:`MAX_CLUSTERS` and
    ``(N + 2) C' <= 2^30`` for N keys (the sort's int32 keys)."""
    if triton is None:
        return "triton is not installed"
    if not on_kernel_device(keep, k_order):
        return f"inputs are not all on {KERNEL_DEVICE}"
    if keep.dim() != 3 or keep.numel() == 0 or k_order.shape[-1] == 0:
        return f"kept pairs of shape {tuple(keep.shape)} over {k_order.shape[-1]} keys"
    padded = _padded(keep.shape[-1])
    if padded > MAX_CLUSTERS:
        return f"{keep.shape[-1]} key clusters (the kernel ranks up to {MAX_CLUSTERS})"
    if (k_order.shape[-1] + 2) * padded > 1 << 30:
        return f"{k_order.shape[-1]} keys in {keep.shape[-1]} clusters overflow the sort's int32 keys"
    return None


def use_fused(keep: torch.Tensor, k_order: torch.Tensor, backend: str | None = None) -> bool:
    """Whether this ordering runs the kernels: ``backend`` (default ``$BENCH_POPULARITY_BACKEND``, else auto)
    ``auto`` (when they can), ``torch`` (never) or ``triton`` (always; HarnessError when they cannot)."""
    return use_kernel(BACKEND_ENV, DEFAULT_BACKEND, backend, lambda: unsupported_reason(keep, k_order),
                      "the Triton popularity order")  # fmt: skip


@kernel_op("popularity_order")
def popularity_order(keep: torch.Tensor, q_sizes: torch.Tensor, k_sizes: torch.Tensor, k_labels: torch.Tensor,
                     k_order: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                     torch.Tensor]:  # fmt: skip
    """The module's ordering as one op (no gradients): keep ``(G, R, C)``, k_sizes ``(G, C)`` and k_order ``(G, N)``
    in the new cluster order, and the kept keys ``(G, R)`` int64 of each query cluster. The caller checks
    :func:`unsupported_reason` first (:func:`use_fused` does)."""
    groups, rows, clusters = keep.shape
    tokens = k_order.shape[-1]
    keep, q_sizes, k_sizes = keep.contiguous(), q_sizes.long().contiguous(), k_sizes.long().contiguous()  # int64 sums
    k_labels, k_order = k_labels.contiguous(), k_order.contiguous()
    kept_keys = torch.empty(groups, rows, device=keep.device, dtype=torch.int64)
    ranked, new_sizes, old_starts, new_starts = (torch.empty_like(k_sizes) for _ in range(4))
    popular = torch.zeros_like(k_sizes)
    padded = _padded(clusters)
    tile_rows = max(1, TOTALS_TILE // padded)
    _cluster_totals[(triton.cdiv(rows, tile_rows), groups)](keep, q_sizes, k_sizes, kept_keys, popular, rows,
                                                            clusters, ROWS=tile_rows, BLOCK_C=padded,
                                                            num_warps=TOTALS_WARPS)  # fmt: skip
    _rank_clusters[(groups,)](popular, k_sizes, ranked, new_sizes, old_starts, new_starts, clusters, tokens,
                              BLOCK_C=padded, LOG_C=padded.bit_length() - 1,
                              num_warps=max(4, padded // RANK_CLUSTERS_PER_WARP))  # fmt: skip
    new_order = torch.empty_like(k_order)
    _move_keys[(triton.cdiv(tokens, MOVE_BLOCK), groups)](k_order, k_labels, old_starts, new_starts, new_order,
                                                           tokens, clusters, BLOCK=MOVE_BLOCK)  # fmt: skip
    return keep.gather(-1, ranked[:, None, :].expand_as(keep)), new_sizes, new_order, kept_keys


@popularity_order.register_fake
def _fake_order(keep: torch.Tensor, q_sizes: torch.Tensor, k_sizes: torch.Tensor, k_labels: torch.Tensor,
                k_order: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    # Contiguous, as the op's outputs; the kept keys int64 whatever q_sizes' integer dtype.
    return (keep.new_empty(keep.shape), k_sizes.new_empty(k_sizes.shape, dtype=torch.int64),
            k_order.new_empty(k_order.shape), q_sizes.new_empty(q_sizes.shape, dtype=torch.int64))  # fmt: skip
