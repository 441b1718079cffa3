"""Sparse VideoGen2 (Yang et al., NeurIPS 2025): semantic-aware permutation and top-p cluster selection.

Per call and head: Euclidean k-means on Q (``q_clusters``) and, separately, on K (``k_clusters``);
tokens are permuted so every cluster is contiguous (queries by query cluster, keys and values by
key cluster; attention is permutation-equivariant, the output is permuted back). Each query
cluster keeps key clusters in decreasing cluster-size-weighted centroid probability
``|K_j| exp(c_i . c_j / sqrt(d)) / sum_k |K_k| exp(c_i . c_k / sqrt(d))`` until the kept mass
exceeds ``top_p``, and at least ``floor(min_kc_ratio x k_clusters)`` of them. Centroids are cached
per layer across the steps of one video (and shared by the CFG branches, as upstream): the first sparse call runs
``kmeans_init_iters`` iterations from random tokens, later calls ``kmeans_step_iters`` from the cache.

``fixed_density`` (not in the paper; for timing at a stated density, e.g. the 0.295 its paper reports on
Wan 2.1 T2V, when random weights make attention near-uniform and top-p keeps nearly everything) replaces top-p
and the floor: each query cluster keeps key clusters in decreasing weighted mass until their tokens reach that
share of the sequence.

Settings: the repository's Wan 2.1 T2V 14B 720p script (q 300, k 1000 clusters, top-p 0.9,
min_kc_ratio 0.1, k-means 50 then 2 iterations, 20% dense steps, ``floor(0.03 x layers)`` dense first
layers); the paper's own table used 100/500 clusters, 30% warm-up and does not state p. Sequences
shorter than ``MIN_TOKENS_PER_CLUSTER`` x clusters use fewer clusters (the toy: 64 of each for 512
tokens); the counts used are recorded.

Speed: the plan carries the clusters as variable-size blocks, which ``auto`` runs on CUDA (no gradients) on
``triton-variable`` (:mod:`methods.kernels.variable_blocks_triton`: per query cluster only the key tiles holding its
kept keys, whole, and the kept keys of sparse tiles gathered; 1.7-2.2x the density-scaled cuDNN time on an H200,
where the paper puts its patched FlashInfer kernel above 85% of the density-scaled FA3 speed), or on FlashInfer's
upstream variable-block wrapper when named. The key clusters come in the order of how many query tokens keep them,
most first (:func:`by_popularity`; any key order gives the same attention), so that the kept keys of most query
clusters share whole tiles. On Flex the exact output runs through a token-level mask over the permuted order, but
every 128 x 128 tile straddling a cluster boundary is computed whole and then masked, about 1.5-1.9x more work at
equal density. The plan does only what triton-variable reads: the permutations are k-means's own stable sort of its
labels (the sorted update's last one, not a sort again; the key order then moved cluster by cluster, by one Triton
launch on CUDA, by two scatters on the torch path),
and the tile tables and the mask's label tables are deferred (:func:`cluster_pair_pattern`), built where a backend or
a report first reads them (Flex, masked, tile densities).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from methods.base import AttentionContext, Capabilities, Schedule, register_method
from methods.kernels import kmeans_triton as kmeans_kernels
from methods.kernels import permute_triton as permute
from methods.kernels import popularity_triton as popularity
from methods.kernels import ranked_selection_triton as ranked
from methods.kernels.block_sparse import (
    BlockSparsePattern,
    TileTables,
    VariableBlocks,
    block_ids,
    block_lengths,
    mask_tables,
    num_blocks,
    rectangle_counts,
    select_by_cost_budget,
    select_by_cumulative_mass,
)
from methods.kernels.kmeans_triton import BACKEND_NOTE, chosen_variant, kmeans_lloyd, sort_labels, use_fused
from methods.params import Param
from methods.sparse import BlockSparseMethod, CounterDraws, SparsePlan, block_sparse_parameters

MIN_TOKENS_PER_CLUSTER = 8
_ASSIGN_CHUNK_ELEMENTS = 1 << 27  # token x centroid distances held at once


def _assign(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Nearest centroid per token, ``(G, N)`` int64, from x ``(G, N, D)`` and centroids ``(G, C, D)`` fp32.

    The dot products run in x's dtype (bf16 on the GPU, as SVG2's kernels do), distances in fp32.
    """
    groups, tokens, _ = x.shape
    c_sq = (centroids**2).sum(dim=-1)[:, None, :]
    c_t = centroids.to(x.dtype).transpose(-2, -1)
    rows = max(1, _ASSIGN_CHUNK_ELEMENTS // (groups * centroids.shape[1]))
    labels = []
    for start in range(0, tokens, rows):
        dots = (x[:, start : start + rows] @ c_t).float()
        labels.append((c_sq - 2.0 * dots).argmin(dim=-1))  # ||x||^2 is the same for every centroid
    return torch.cat(labels, dim=1)


def starting_centroids(x: torch.Tensor, picks: torch.Tensor) -> torch.Tensor:
    """k-means' first centroids ``(G, C, D)`` fp32: the tokens ``picks (G, C)`` of x ``(G, N, D)``."""
    return x.gather(1, picks[..., None].expand(-1, -1, x.shape[-1])).float()


def kmeans(x: torch.Tensor, clusters: int, iterations: int, init: torch.Tensor | None,
           generator: torch.Generator | None,
           backend: str | None = None,
           update: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Batched Euclidean k-means (Lloyd), as SVG2's ``batch_kmeans_Euclid`` with tolerance 0.

    On CUDA (fp16/bf16) the Triton iterations (:mod:`methods.kernels.kmeans_triton`, no host sync) run them unless
    ``backend`` (default ``$BENCH_KMEANS_BACKEND``, else auto) is ``torch``, with the update step ``update``
    (default ``$BENCH_KMEANS_UPDATE``, else sorted); elsewhere :func:`lloyd`.

    Args:
        x: ``(G, N, D)`` points (means accumulate in fp32).
        clusters: C.
        iterations: Lloyd iterations (>= 1).
        init: ``(G, C, D)`` fp32 starting centroids, or ``None`` for C random tokens per group.
        generator: draws the random starting tokens where ``init`` is ``None``.
        backend: ``auto``, ``torch`` or ``triton`` (HarnessError for another, or ``triton`` where it cannot run).
        update: the kernels' update step, ``onehot`` or ``sorted`` (HarnessError for another, on every path).

    Returns:
        labels ``(G, N)`` int64 of the last assignment, centroids ``(G, C, D)`` fp32 (the means of those
        labels; an empty cluster keeps its previous centroid), cluster sizes ``(G, C)`` int64 and the order
        ``(G, N)`` int64 that sorts the labels stably per group (the tokens cluster by cluster, each cluster's in
        ascending order: svg2's permutation; the sorted update's own last sort where it runs).
    """
    update = chosen_variant(update)
    groups, tokens, _ = x.shape
    if init is None:
        init = starting_centroids(x, torch.randint(0, tokens, (groups, clusters), generator=generator, device=x.device))
    if use_fused(x, backend):
        return kmeans_lloyd(x, init, iterations, update)
    return lloyd(x, init, iterations)


def lloyd(x: torch.Tensor, centroids: torch.Tensor,
          iterations: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """:func:`kmeans`'s iterations in torch from ``centroids`` ``(G, C, D)`` fp32, the CPU path and the Triton
    kernels' reference (same returns; the order from one stable sort of the last labels)."""
    groups, clusters, dim = centroids.shape
    points = x.float().flatten(0, 1)
    offsets = (torch.arange(groups, device=x.device) * clusters)[:, None]
    for _ in range(iterations):
        labels = _assign(x, centroids)
        flat = (labels + offsets).flatten()
        sums = torch.zeros(groups * clusters, dim, device=x.device).index_add_(0, flat, points)
        # bincount's counts, in an output of fixed length: bincount's own depends on the largest label (a graph
        # break under torch.compile, and a host sync on CUDA), although every label is below groups x clusters.
        ones = torch.ones_like(flat)
        sizes = torch.zeros(groups * clusters, dtype=flat.dtype, device=x.device).index_add_(0, flat, ones)
        sizes = sizes.view(groups, clusters)
        means = sums.view(groups, clusters, dim) / sizes.clamp(min=1)[..., None]
        centroids = torch.where(sizes[..., None] > 0, means, centroids)
    return labels, centroids, sizes, sort_labels(labels)[1]


def cluster_mass(q_centroids: torch.Tensor, k_centroids: torch.Tensor, k_sizes: torch.Tensor) -> torch.Tensor:
    """SVG2's cluster-size-weighted centroid probability ``(G, Cq, Ck)`` fp32 of each key cluster for each query
    cluster, ``|K_j| exp(c_i . c_j / sqrt(d)) / sum_k |K_k| exp(c_i . c_k / sqrt(d))``, from centroids ``(G, Cq,
    D)``, ``(G, Ck, D)`` fp32 and key cluster sizes ``(G, Ck)`` int64.

    Computed as ``softmax_j(c_i . c_j / sqrt(d) + log |K_j|)``, the same value: the log sizes, one batched product
    with them as its added term and one softmax, three or four launches where the formula as written takes eight.
    An empty cluster's log size is -inf: its mass is 0."""
    log_sizes = k_sizes.log()[:, None, :]  # float32 from int64
    scale = q_centroids.shape[-1] ** -0.5
    return torch.baddbmm(log_sizes, q_centroids, k_centroids.transpose(-2, -1), alpha=scale).softmax(dim=-1)


def cluster_pair_pattern(keep: torch.Tensor, q_sizes: torch.Tensor, k_sizes: torch.Tensor, tokens: int,
                         block: int) -> BlockSparsePattern:  # fmt: skip
    """The kept cluster pairs over cluster-sorted tokens: as variable blocks (the clusters themselves, what
    triton-variable and FlashInfer run) and as deferred tile tables (built on their first read, see
    :class:`BlockSparsePattern`): a tile is kept if any kept cluster pair has tokens in it, full if all do, and a
    ``mask_mod`` looks each token pair's clusters up in the others.

    Args:
        keep: ``(B, H, Cq, Ck)`` kept (query cluster, key cluster) pairs.
        q_sizes, k_sizes: ``(B, H, Cq)``, ``(B, H, Ck)`` cluster sizes (int64), each summing to ``tokens``.
        tokens: N.
        block: tile size.
    """
    present = (q_sizes > 0)[..., :, None] & (k_sizes > 0)[..., None, :]
    kept_pairs = keep & present
    variable = VariableBlocks(kept_pairs, q_sizes, k_sizes)  # the clusters themselves: SVG2's own kernel blocks

    def tables() -> TileTables:
        q_labels, k_labels = block_ids(q_sizes, tokens), block_ids(k_sizes, tokens)
        starts = torch.arange(num_blocks(tokens, block), device=keep.device) * block
        ends = starts + block_lengths(tokens, block, keep.device) - 1
        # Clusters in a tile of sorted tokens form the id range [label at its first token, label at its last].
        q_first, q_last = q_labels[..., starts], q_labels[..., ends]
        k_first, k_last = k_labels[..., starts], k_labels[..., ends]

        rows, cols = (q_first, q_last), (k_first, k_last)
        pairs = (q_last - q_first + 1)[..., :, None] * (k_last - k_first + 1)[..., None, :]
        kept = rectangle_counts(kept_pairs, rows, cols) > 0
        full = rectangle_counts(keep | ~present, rows, cols) == pairs  # empty clusters hold no tokens: never mask

        keep_read, q_labels_read, k_labels_read = mask_tables(keep, q_labels, k_labels)

        def kept_cluster_pair(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor,
                              kv_idx: torch.Tensor) -> torch.Tensor:  # fmt: skip
            return keep_read[b, h, q_labels_read[b, h, q_idx], k_labels_read[b, h, kv_idx]]

        return TileTables(kept, full=full & kept, mask_mod=kept_cluster_pair)

    return BlockSparsePattern(None, tokens, block, variable=variable, tables=tables)


def by_popularity(keep: torch.Tensor, q_sizes: torch.Tensor, k_sizes: torch.Tensor, k_labels: torch.Tensor,
                  k_order: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """The key clusters reordered by how many query tokens keep them, most first (ties by label): ``keep``'s
    columns, the sizes and the key order, each cluster's tokens still consecutive and ascending; and each query
    cluster's kept keys. Attention is the same under any order of the keys; this one puts the clusters most query
    clusters keep next to each other, so that whole tiles of the key sequence hold mostly kept keys
    (triton-variable's key tiles, Flex's 128-tiles).

    The Triton kernels (:mod:`methods.kernels.popularity_triton`, five launches) compute it where they can run (CUDA,
    up to 4,096 key clusters) unless ``$BENCH_POPULARITY_BACKEND`` is ``torch``; this torch path is the CPU path, the
    fallback and their reference.

    Args:
        keep: ``(G, Cq, Ck)`` kept cluster pairs; q_sizes ``(G, Cq)``, k_sizes ``(G, Ck)`` int64.
        k_labels: ``(G, N)`` int64 each key's cluster; k_order ``(G, N)`` their stable sort (k-means's order).

    Returns:
        keep ``(G, Cq, Ck)``, k_sizes ``(G, Ck)`` and k_order ``(G, N)`` in the new cluster order, and the kept key
        tokens ``(G, Cq)`` int64 of each query cluster. No host sync.
    """
    if popularity.use_fused(keep, k_order):
        return popularity.popularity_order(keep, q_sizes, k_sizes, k_labels, k_order)
    kept_by = (keep * q_sizes[..., None]).sum(dim=-2)
    clusters = kept_by.argsort(dim=-1, descending=True, stable=True)  # new position -> cluster
    new_sizes = k_sizes.gather(-1, clusters)
    new_starts = torch.empty_like(k_sizes).scatter_(-1, clusters, new_sizes.cumsum(-1) - new_sizes)
    old_starts = k_sizes.cumsum(-1) - k_sizes
    positions = torch.arange(k_order.shape[-1], device=k_order.device).expand_as(k_order)
    rank_in_cluster = torch.empty_like(k_order).scatter_(-1, k_order, positions) - old_starts.gather(-1, k_labels)
    new_order = torch.empty_like(k_order).scatter_(-1, new_starts.gather(-1, k_labels) + rank_in_cluster, positions)
    kept_keys = (keep * k_sizes[..., None, :]).sum(dim=-1)
    return keep.gather(-1, clusters[:, None, :].expand_as(keep)), new_sizes, new_order, kept_keys


@dataclass
class LayerCentroids:
    """svg2's route (:meth:`SparseVideoGen2.route`): one layer's k-means centroids ``(B * H, C, D)`` fp32 of the
    queries and of the keys from its last sparse call in this video, the next call's warm start (``None`` before)."""

    q: torch.Tensor | None = None
    k: torch.Tensor | None = None


@register_method("svg2", aliases=("sparse-videogen2", "sap"))
class SparseVideoGen2(BlockSparseMethod):
    """Sparse VideoGen2: k-means on Q and K, cluster permutation, top-p key clusters with a floor."""

    kernel_variables = (
        kmeans_kernels.BACKEND_ENV,
        kmeans_kernels.VARIANT_ENV,
        ranked.BACKEND_ENV,
        permute.BACKEND_ENV,
        popularity.BACKEND_ENV,
    )
    capabilities = Capabilities(
        sparsity="dynamic",
        data_dependent=True,
        fixed_density=True,
        notes="SVG2: k-means 300/1000, top-p 0.9, min 10% key clusters, 20% warm-up; its clusters run as variable-size "
        "blocks on triton-variable on CUDA (Flex computes them as whole 128-tiles); " + BACKEND_NOTE,
    )
    pattern_kinds = frozenset({"variable"})  # the clusters
    parameters = (
        Param("q_clusters", "int", 300, "k-means clusters of the queries", min=1),
        Param("k_clusters", "int", 1000, "k-means clusters of the keys", min=1),
        Param("top_p", "float", 0.9, "kept share of each query cluster's weighted centroid mass (1 keeps all)",
              min=0.0, max=1.0, min_open=True, spellings=("p",)),
        Param("min_kc_ratio", "float", 0.1, "at least floor(ratio x k_clusters) key clusters per query cluster",
              min=0.0, max=1.0),
        Param("kmeans_init_iters", "int", 50, "k-means iterations of a layer's first call", min=1),
        Param("kmeans_step_iters", "int", 2, "k-means iterations of later calls (warm-started)", min=1),
        Param("dense_layer_fraction", "float", 0.03, "floor(fraction x layers) first layers run dense",
              min=0.0, max=1.0),
        Param("seed", "int", 0, "seed of the k-means initialisation", min=0),
        Param("fixed_density", "float", None, "not in the paper: a kept fraction that replaces top-p and the floor "
              "(to time at a stated density: random weights make attention near-uniform)", optional=True, min=0.0,
              max=1.0, min_open=True),
        *block_sparse_parameters(0.2, "paper: 20%"),
    )  # fmt: skip

    def __init__(self, schedule: Schedule | None = None, **params: Any) -> None:
        super().__init__(schedule, **params)
        settings = self.settings
        self.q_clusters: int = settings["q_clusters"]
        self.k_clusters: int = settings["k_clusters"]
        self.kmeans_init_iters: int = settings["kmeans_init_iters"]
        self.kmeans_step_iters: int = settings["kmeans_step_iters"]
        self.top_p: float = settings["top_p"]
        self.min_kc_ratio: float = settings["min_kc_ratio"]
        self.dense_layer_fraction: float = settings["dense_layer_fraction"]
        self.fixed_density: float | None = settings["fixed_density"]
        self.draws = CounterDraws(settings["seed"])
        self._centroids: dict[int, LayerCentroids] = {}
        self._clusters_used: dict[int, tuple[int, int]] = {}

    def usage_params(self) -> dict[str, Any]:
        return {"clusters_used": {str(n): list(pair) for n, pair in sorted(self._clusters_used.items())}}

    def begin_video(self) -> None:
        # k-means warm-starts from the previous step's centroids within a video, never from another video's. Emptied
        # in place: the routes the harness's processor resolved stay this method's.
        self.draws.reset()
        for cached in self._centroids.values():
            cached.q = cached.k = None

    def route(self, ctx: AttentionContext) -> LayerCentroids:
        """The layer's centroid cache, so that a compiled :meth:`plan` finds it without a guard on the layer's
        number."""
        return self._centroids.setdefault(ctx.layer, LayerCentroids())

    def paper_dense_layers(self, num_layers: int) -> int:
        return math.floor(self.dense_layer_fraction * num_layers)

    def clusters(self, tokens: int) -> tuple[int, int]:
        """(query, key) cluster counts for a sequence of ``tokens`` (capped for short sequences)."""
        cap = max(1, tokens // MIN_TOKENS_PER_CLUSTER)
        used = (min(self.q_clusters, cap), min(self.k_clusters, cap))
        self._clusters_used[tokens] = used
        return used

    def _cluster(
        self, x: torch.Tensor, count: int, cached: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """k-means of ``x`` (B, H, N, D) per head, warm-started from ``cached`` when its shape fits (:func:`kmeans`'s
        returns, per ``B * H`` group)."""
        flat = x.flatten(0, 1)
        groups, tokens, dim = flat.shape
        warm = cached is not None and cached.shape == (groups, count, dim)
        if not warm:  # C random tokens per group, drawn in the graph where compiled
            cached = starting_centroids(flat, self.draws.randint(tokens, (groups, count), x.device))
        iterations = self.kmeans_step_iters if warm else self.kmeans_init_iters
        return kmeans(flat, count, iterations, cached, None)

    def plan(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> SparsePlan:
        batch, heads, tokens, _ = q.shape
        q_count, k_count = self.clusters(tokens)
        cached = self.route(ctx) if ctx.route is None else ctx.route
        _, q_centroids, q_sizes, q_order = self._cluster(q, q_count, cached.q)
        k_labels, k_centroids, k_sizes, k_order = self._cluster(k, k_count, cached.k)
        cached.q, cached.k = q_centroids, k_centroids

        mass = cluster_mass(q_centroids, k_centroids, k_sizes)
        if self.fixed_density is None:
            keep = select_by_cumulative_mass(mass, self.top_p, min_keep=math.floor(self.min_kc_ratio * k_count))
        else:
            # int32 token counts (a row's total is N): the fused ranking sums them in int32, not float64.
            keep = select_by_cost_budget(mass, k_sizes.to(torch.int32)[:, None, :], self.fixed_density)
        keep, k_sizes, k_order, kept_keys = by_popularity(keep, q_sizes, k_sizes, k_labels, k_order)

        shape = (batch, heads)
        q_order, k_order = q_order.view(*shape, tokens), k_order.view(*shape, tokens)
        q_sizes, k_sizes = q_sizes.view(*shape, q_count), k_sizes.view(*shape, k_count)
        keep = keep.view(*shape, q_count, k_count)
        # k-means's order sorts its labels stably: the permutation, with no second sort. The tile tables' sorted
        # labels come from the sizes, when a backend reads the tables (not triton-variable: cluster_pair_pattern).
        pattern = cluster_pair_pattern(keep, q_sizes, k_sizes, tokens, self.block_size(tokens))
        # Kept entries: the kept key tokens of each query cluster (int64), times its tokens, summed in float64. Every
        # partial sum is an integer below 2^53 (at most B H N^2), so this is exactly the float64 sum of the pairs'
        # token products, without building them as a (B, H, Cq, Ck) float64 table.
        density = (kept_keys.view(*shape, q_count) * q_sizes).sum(dtype=torch.float64) / (batch * heads * tokens**2)
        return SparsePlan(pattern, q_order=q_order, kv_order=k_order, density=density)
