"""SVG2's Triton k-means against the torch path (:func:`methods.svg2.lloyd`), and the dispatch between them. The
tests of the kernels' shared contract run each update variant (one-hot and sorted).

The kernel tests need Triton and either CUDA or the Triton interpreter on CPU tensors; elsewhere (CI) they
skip. To run them on a CPU machine, with Triton (and numpy < 2.4, which Triton 3.6's interpreter needs)
installed outside the project's environment::

    TRITON_INTERPRET=1 PYTHONPATH=.:<numpy < 2.4 site>:<triton site> python -m pytest tests/test_kmeans_triton.py

The interpreter multiplies bf16 operands as raw integers, so there the kernels are checked in fp16; on CUDA in
fp16 and bf16.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from numerics import relative_error
from triton_helpers import DEVICE, ON_CUDA
from triton_helpers import needs_kernel as triton_needs_kernel

from harness.errors import HarnessError
from methods.kernels import kmeans_triton as fused
from methods.kernels import tuned_launch
from methods.svg2 import kmeans, lloyd

needs_kernel = triton_needs_kernel(fused)
DTYPES = (torch.float16, torch.bfloat16) if ON_CUDA else (torch.float16,)
every_variant = pytest.mark.parametrize("update", fused.VARIANTS)
# Two fp32 sums of the same 24 positive squares in different orders: each within 24 u (u = 6e-8) of the exact one.
SUM_ORDER_RTOL = 3e-6


def separated(groups: int, clusters: int, tokens: int, dim: int,
              dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Points ``(G, N, D)`` around ``clusters`` well-separated centres per group (token n near centre ``n % C``,
    spread 0.1 against centres ~8 apart), starting centroids ``(G, C, D)``: the centres shuffled, 0.5 off, and the
    labels ``(G, N)`` those centroids must give."""
    centres = 4 * torch.randn(groups, clusters, dim)
    members = torch.arange(tokens) % clusters
    x = (centres[:, members] + 0.1 * torch.randn(groups, tokens, dim)).to(DEVICE, dtype)
    order = torch.stack([torch.randperm(clusters) for _ in range(groups)])
    init = centres.gather(1, order[..., None].expand(-1, -1, dim)) + 0.5 * torch.randn(groups, clusters, dim)
    return x, init.to(DEVICE), order.argsort(dim=1)[:, members].to(DEVICE)


def means_of(x: torch.Tensor, labels: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """Float64 means of ``x`` per label, ``previous`` where a cluster is empty."""
    clusters = previous.shape[1]
    one_hot = torch.nn.functional.one_hot(labels, clusters).double()  # (G, N, C)
    sizes = one_hot.sum(dim=1)
    means = one_hot.transpose(1, 2) @ x.double() / sizes.clamp(min=1)[..., None]
    return torch.where(sizes[..., None] > 0, means, previous.double())


@needs_kernel
@every_variant
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("groups", "clusters", "tokens", "dim", "iterations"),
    [(2, 5, 77, 16, 1),  # ragged last token tile, clusters fewer than a tile
     (3, 20, 150, 24, 3),  # G = 3, head dim padded to 32 columns, clusters over two tiles (ragged)
     (1, 33, 100, 32, 2),  # clusters over three tiles, 33 = 2 x 16 + 1
     (1, 300, 700, 16, 1)],  # more clusters than CENTROID_PAD: the prepared buffers padded to 512
)  # fmt: skip
def test_well_separated_points_get_torch_labels_sizes_and_centroids(
    groups: int, clusters: int, tokens: int, dim: int, iterations: int, dtype: torch.dtype, update: str
) -> None:
    """Labels (the clusters by construction) and sizes equal the torch path's exactly, centroids within
    CENTROID_TOLERANCE of its and of the float64 means of those labels."""
    x, init, expected = separated(groups, clusters, tokens, dim, dtype)
    labels, centroids, sizes, _ = fused.kmeans_lloyd(x, init, iterations, update)
    ref_labels, ref_centroids, ref_sizes, _ = lloyd(x, init, iterations)
    assert labels.dtype == sizes.dtype == torch.int64 and centroids.dtype == torch.float32
    assert torch.equal(labels, expected) and torch.equal(ref_labels, expected) and torch.equal(sizes, ref_sizes)
    assert relative_error(centroids, ref_centroids) <= fused.CENTROID_TOLERANCE
    assert relative_error(centroids, means_of(x, labels, init)) <= fused.CENTROID_TOLERANCE


@pytest.fixture
def gpu_tiles(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The kernels at GPU configurations' tiles instead of the interpreter's 16 x 16: 64 tokens x 32 centroids in
    the assignment, 32 clusters x 64 tokens in the one-hot update, windows of 16 clusters in 32-token tiles in the
    sorted one."""
    tuners = {fused._assign: {"BLOCK_N": 64, "BLOCK_C": 32}, fused._update: {"BLOCK_C": 32, "BLOCK_N": 64},
              fused._update_sorted: {"WINDOW": 16, "BLOCK_N": 32}}  # fmt: skip
    for tuner, tiles in tuners.items():
        monkeypatch.setattr(tuner, "configs", [fused.triton.Config(tiles, num_warps=4)])
        tuner.cache.clear()
    yield
    for tuner in tuners:
        tuner.cache.clear()


@needs_kernel
@every_variant
@pytest.mark.usefixtures("gpu_tiles")
def test_well_separated_points_at_gpu_tiles(update: str) -> None:
    """Several token, centroid and cluster tiles, each ragged (40 clusters of 37 and 38 tokens: windows of 16
    clusters over 32-token tiles that straddle clusters, the last window partly past the clusters): labels and sizes
    exact, centroids within tolerance."""
    x, init, expected = separated(2, 40, 1500, 32)
    labels, centroids, sizes, _ = fused.kmeans_lloyd(x, init, 2, update)
    ref_labels, ref_centroids, ref_sizes, _ = lloyd(x, init, 2)
    assert torch.equal(labels, expected) and torch.equal(ref_labels, expected) and torch.equal(sizes, ref_sizes)
    assert relative_error(centroids, ref_centroids) <= fused.CENTROID_TOLERANCE


@needs_kernel
@every_variant
def test_random_points_get_a_nearest_centroid_and_the_means_of_their_labels(update: str) -> None:
    """On overlapping random points (near-ties possible), one iteration passes the GPU script's check (every label a
    nearest centroid up to the dot products' rounding, centroids the float64 means of those labels, sizes their
    counts), and the labels are mostly torch's."""
    from harness.benchmarks.svg2_kmeans import label_check

    x, init = torch.randn(2, 200, 32, device=DEVICE).to(torch.float16), torch.randn(2, 24, 32, device=DEVICE)
    out = fused.kmeans_lloyd(x, init, 1, update)
    check = label_check(x, init, out)
    assert check["passed"], check
    assert (out[0] == lloyd(x, init, 1)[0]).float().mean() > 0.95


def test_the_check_records_a_failed_check_as_strict_json() -> None:
    """Centroids gone NaN fail the GPU script's check, their error recorded as null (the record is strict JSON)."""
    from harness.benchmarks.svg2_kmeans import label_check

    x, init, _ = separated(1, 4, 40, 8)
    labels, centroids, sizes, order = lloyd(x, init, 1)
    check = label_check(x, init, (labels, torch.full_like(centroids, float("nan")), sizes, order))
    assert not check["passed"] and check["centroid_error"] is None
    json.dumps(check, allow_nan=False)


def test_the_check_takes_a_zero_point_at_its_nearest_centroid() -> None:
    """A point at the origin has a rounding bound of 0: at its nearest centroid its gap is 0, and the check
    passes (before, 0 / 0 gave NaN, which the maximum then dropped)."""
    from harness.benchmarks.svg2_kmeans import label_check

    x, init, _ = separated(1, 4, 40, 8)
    x[0, 0] = 0
    check = label_check(x, init, lloyd(x, init, 1))
    assert check["passed"] and check["worst_gap"] is not None and check["worst_gap"] <= 1.0


@needs_kernel
@every_variant
def test_ties_go_to_the_first_centroid_and_empty_clusters_keep_theirs(update: str) -> None:
    """Duplicated centroids (exact ties, in one centroid tile and across tiles: indices 0, 1 and 69) give the lowest
    index, as argmin does; the duplicates and far centroids get no token and keep their value exactly."""
    x, _, _ = separated(1, 3, 60, 16)
    means = means_of(x, (torch.arange(60, device=DEVICE) % 3)[None], torch.zeros(1, 3, 16, device=DEVICE)).float()
    far = 50 + torch.randn(1, 65, 16, device=DEVICE)  # distances far above the means', within fp16
    init = torch.cat([means[:, :1], means[:, :1], means[:, 1:], far, means[:, :1]], dim=1)  # 70 centroids
    labels, centroids, sizes, _ = fused.kmeans_lloyd(x, init, 2, update)
    ref_labels, ref_centroids, ref_sizes, _ = lloyd(x, init, 2)
    assert torch.equal(labels, ref_labels) and torch.equal(sizes, ref_sizes)
    assert sizes[0].tolist() == [20, 0, 20, 20] + [0] * 66
    empty = sizes[0] == 0
    assert torch.equal(centroids[:, empty], init[:, empty])
    assert relative_error(centroids, ref_centroids) <= fused.CENTROID_TOLERANCE


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
def test_dot_products_are_rounded_to_the_points_dtype_to_nearest_even(dtype: torch.dtype) -> None:
    """Exact integer products one past 2^p (p = 11 in fp16, 8 in bf16: spacing 2 above it) decide the labels: in
    group 0 <x, c_0> = 2^p + 1 rounds down to 2^p (centroid 0's distance then 1 above centroid 1's, 1 below
    unrounded); in group 1 <x, c_0> = 2^p + 3 rounds up to 2^p + 4, the even neighbour (centroid 0 then 1 below,
    unrounded or truncated 1 or 3 above). Labels [1] and [0], as the torch path's."""
    p = 11 if dtype == torch.float16 else 8
    k, m = 2 ** (p // 2), 2 ** (p - p // 2)  # k m = 2^p, both exact
    x, init = torch.zeros(2, 1, 16), torch.zeros(2, 2, 16)
    x[0, 0, :2], init[0, 0, :2], init[0, 1, 0] = torch.tensor([k, 1]), torch.tensor([m, 1]), m
    # Group 1: ||c_0||^2 = m^2 + 7 (columns 1 to 4 add 1 + 4 + 1 + 1; x is nonzero in column 1 only).
    x[1, 0, :2], init[1, 0, :5], init[1, 1, 0] = torch.tensor([k, 3]), torch.tensor([m, 1, 2, 1, 1]), m
    x, init = x.to(DEVICE, dtype), init.to(DEVICE)
    labels = fused.kmeans_lloyd(x, init, 1)[0]
    assert labels.tolist() == [[1], [0]] and torch.equal(labels, lloyd(x, init, 1)[0])


@needs_kernel
def test_prepared_copy_is_the_centroids_in_the_points_dtype_transposed_and_zero_padded() -> None:
    """prepare_centroids' ct: (G, BLOCK_D, CP) with ct[g, d, j] = centroid j's column d rounded to the points'
    dtype, zeros past D (24 of 32 columns) and past C (37 of CENTROID_PAD)."""
    centroids = torch.randn(2, 37, 24, device=DEVICE)
    ct, _ = fused.prepare_centroids(centroids, torch.float16)
    assert ct.shape == (2, 32, fused.CENTROID_PAD) and ct.dtype == torch.float16
    assert torch.equal(ct[:, :24, :37], centroids.half().transpose(1, 2))
    assert not ct[:, 24:].any() and not ct[:, :, 37:].any()


@needs_kernel
def test_prepared_norms_are_the_float32_squared_norms_and_inf_past_the_clusters() -> None:
    """prepare_centroids' sq: (G, CP) fp32, the squared norms of the fp32 centroids (as the torch path's ``(c **
    2).sum(-1)``, up to the sum's order; not of the rounded copy), +inf for the padding clusters."""
    centroids = torch.randn(2, 37, 24, device=DEVICE)
    _, sq = fused.prepare_centroids(centroids, torch.float16)
    assert sq.shape == (2, fused.CENTROID_PAD) and sq.dtype == torch.float32
    torch.testing.assert_close(sq[:, :37], (centroids**2).sum(dim=-1), rtol=SUM_ORDER_RTOL, atol=0)
    assert torch.isinf(sq[:, 37:]).all() and (sq[:, 37:] > 0).all()


@needs_kernel
@every_variant
def test_each_update_writes_the_prepared_copy_of_its_new_centroids(update: str) -> None:
    """After an update step on the initial prepared buffers, they hold prepare_centroids of the new centroids (an
    empty far cluster's kept one included): the copy exactly, the norms up to their sum's order."""
    x = torch.randn(2, 90, 24, device=DEVICE).to(torch.float16)
    init = torch.cat([x[:, :6].float(), 50 + torch.randn(2, 1, 24, device=DEVICE)], dim=1)  # 7 clusters, 1 empty
    ct, sq = fused.prepare_centroids(init, x.dtype)
    labels = lloyd(x, init, 1)[0].int()  # int32, as the op hands them to its update steps
    updated, sizes = torch.empty_like(init), torch.empty(2, 7, device=DEVICE, dtype=torch.int64)
    fused.UPDATE_STEPS[update](x, labels, init, updated, sizes, ct, sq)
    expected_ct, expected_sq = fused.prepare_centroids(updated, x.dtype)
    assert (sizes[:, 6] == 0).all() and torch.equal(updated[:, 6], init[:, 6])
    assert torch.equal(ct, expected_ct) and torch.equal(torch.isinf(sq), torch.isinf(expected_sq))
    torch.testing.assert_close(sq, expected_sq, rtol=SUM_ORDER_RTOL, atol=0)


@needs_kernel
@every_variant
def test_strided_points_are_read_in_place(update: str) -> None:
    """(N, G, D) points seen as (G, N, D) (a head-major view of token-major projections) cluster as their copy."""
    x, init, _ = separated(2, 6, 50, 16)
    strided = x.transpose(0, 1).contiguous().transpose(0, 1)
    out, ref = fused.kmeans_lloyd(strided, init, 2, update), fused.kmeans_lloyd(x, init, 2, update)
    assert all(torch.equal(a, b) for a, b in zip(out, ref, strict=True))


@needs_kernel
def test_the_assignment_autotuner_runs_once_per_cluster_count(monkeypatch: pytest.MonkeyPatch) -> None:
    """The autotuner's key holds the cluster count C (a runtime argument): its first call per C goes through the
    autotuner, later calls of that C launch the chosen configuration directly, with the same labels."""
    tuner = fused._assign
    runs = []
    run = type(tuner).run
    monkeypatch.setattr(type(tuner), "run", lambda self, *a, **kw: runs.append(self) or run(self, *a, **kw))
    monkeypatch.setattr(tuned_launch, "_CHOSEN", {})  # no choice left by earlier tests' cluster counts
    x, init, _ = separated(2, 6, 50, 16)
    first = fused.kmeans_lloyd(x, init, 3)
    assert runs.count(tuner) == 1
    runs.clear()
    again = fused.kmeans_lloyd(x, init, 3)
    assert runs.count(tuner) == 0 and all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    fused.kmeans_lloyd(x, init[:, :5].contiguous(), 1)
    assert runs.count(tuner) == 1


@needs_kernel
def test_a_choice_made_under_a_pinned_list_does_not_outlive_the_pin(monkeypatch: pytest.MonkeyPatch) -> None:
    """A configuration chosen while a caller pinned another list (the GPU check pins each in turn) is not launched
    directly once the autotuner's own list is back: the next call goes through the autotuner again."""
    tuner = fused._assign
    runs = []
    run = type(tuner).run
    monkeypatch.setattr(type(tuner), "run", lambda self, *a, **kw: runs.append(self) or run(self, *a, **kw))
    monkeypatch.setattr(tuned_launch, "_CHOSEN", {})
    x, init, _ = separated(2, 6, 50, 16)
    own = tuner.configs
    with monkeypatch.context() as pin:
        pin.setattr(tuner, "configs", list(own))
        fused.kmeans_lloyd(x, init, 1)
    assert tuner.configs is own and runs.count(tuner) == 1
    fused.kmeans_lloyd(x, init, 1)
    assert runs.count(tuner) == 2


@needs_kernel
def test_dispatch_runs_the_kernels_only_when_asked() -> None:
    """kmeans takes the kernels under auto or triton, the torch path under torch (the default until a GPU check
    passes), with the same returns on separated points."""
    x, init, _ = separated(2, 4, 40, 16)
    assert fused.use_fused(x, "auto") and fused.use_fused(x, "triton") and not fused.use_fused(x, "torch")
    generator = torch.Generator(DEVICE)
    fast = kmeans(x, 4, 2, init, generator, backend="auto")
    assert all(torch.equal(a, b) for a, b in zip(fast, fused.kmeans_lloyd(x, init, 2), strict=True))
    slow = kmeans(x, 4, 2, init, generator, backend="torch")
    assert torch.equal(fast[0], slow[0]) and relative_error(fast[1], slow[1]) <= fused.CENTROID_TOLERANCE


@needs_kernel
@every_variant
def test_op_passes_opcheck(update: str) -> None:
    """The op's schema (outputs alias no input), fake outputs (shapes, dtypes, strides) and AOT dispatch agree with
    the kernels."""
    x, init, _ = separated(2, 5, 40, 16)
    torch.library.opcheck(fused.kmeans_lloyd, (x, init, 2, update))


@needs_kernel
@every_variant
def test_compiled_kmeans_equals_eager(update: str) -> None:
    """torch.compile (fullgraph: no graph break) of the op gives eager's outputs: the launches are inside the op."""
    x, init, _ = separated(2, 5, 40, 16)

    def cluster(x: torch.Tensor, init: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return fused.kmeans_lloyd(x, init, 2, update)

    torch._dynamo.reset()
    compiled = torch.compile(cluster, backend="aot_eager", fullgraph=True)(x, init)
    torch._dynamo.reset()
    assert all(torch.equal(a, b) for a, b in zip(compiled, cluster(x, init), strict=True))


@needs_kernel
def test_sorted_update_gives_the_onehot_labels_and_the_float64_means() -> None:
    """Random overlapping points from random tokens and far centroids (which stay empty), one iteration: the sorted
    update's labels and sizes equal the one-hot update's, sizes are the labels' counts, centroids within
    CENTROID_TOLERANCE of the float64 means of those labels, empty clusters keep their centroid exactly. 77 tokens,
    head dim 24 and 3 near centroids: ragged token and column tiles, a cluster over two or more 16-token tiles."""
    x = torch.randn(2, 77, 24, device=DEVICE).to(torch.float16)
    far = 50 + torch.randn(2, 3, 24, device=DEVICE)
    init = torch.cat([x[:, :2].float(), far[:, :2], x[:, 2:3].float(), far[:, 2:]], dim=1)  # 6 centroids
    labels, centroids, sizes, _ = fused.kmeans_lloyd(x, init, 1, "sorted")
    onehot = fused.kmeans_lloyd(x, init, 1, "onehot")
    assert torch.equal(labels, onehot[0]) and torch.equal(sizes, onehot[2])
    counts = torch.nn.functional.one_hot(labels, 6).sum(dim=1)
    assert torch.equal(sizes, counts) and (sizes[:, [2, 3, 5]] == 0).all()
    assert relative_error(centroids, means_of(x, labels, init)) <= fused.CENTROID_TOLERANCE
    assert torch.equal(centroids[sizes == 0], init[sizes == 0])


@needs_kernel
@every_variant
def test_every_update_is_deterministic(update: str) -> None:
    """Two runs of the same iterations on random points give bit-identical labels, centroids and sizes."""
    x, init = torch.randn(2, 90, 16, device=DEVICE).to(torch.float16), torch.randn(2, 7, 16, device=DEVICE)
    first, second = fused.kmeans_lloyd(x, init, 2, update), fused.kmeans_lloyd(x, init, 2, update)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def clumped(groups: int, clusters: int, tokens: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 points ``(G, N, D)`` drawn from ``clusters`` random points per group (many exact duplicates: clusters
    of many tokens, in no order), and those points as starting centroids (the first of them twice: one stays
    empty)."""
    centres = torch.randn(groups, clusters, dim, device=DEVICE)
    picks = torch.randint(0, clusters, (groups, tokens), device=DEVICE)
    x = centres.gather(1, picks[..., None].expand(-1, -1, dim)).to(torch.float16)
    return x, torch.cat([centres[:, :1], centres], dim=1).to(torch.float16).float()


def assert_stable_order(labels: torch.Tensor, order: torch.Tensor) -> None:
    """``order`` is the stable sort of ``labels`` per group: int64 token indices, the clusters in ascending order,
    each cluster's tokens in ascending order."""
    assert order.dtype == torch.int64 and order.shape == labels.shape
    assert torch.equal(order, labels.sort(dim=1, stable=True).indices)


@needs_kernel
@every_variant
def test_the_kernels_return_the_stable_order_of_their_last_labels(update: str) -> None:
    """Both update steps, over 3 iterations on clumped points (clusters of ~10 tokens, tokens of a cluster scattered
    through the sequence): the order is the stable sort of the returned labels, the same as the torch path's."""
    x, init = clumped(2, 9, 90, 16)
    labels, _, _, order = fused.kmeans_lloyd(x, init, 3, update)
    assert_stable_order(labels, order)
    assert torch.equal(order, lloyd(x, init, 3)[3])


@needs_kernel
@pytest.mark.parametrize(
    ("groups", "tokens", "clusters", "tiles"),
    [(3, 77, 5, {"block": 16, "cluster_tile": 16}),  # several groups, N not a multiple of the block
     (2, 1000, 37, {"block": 64, "cluster_tile": 16}),  # C not a power of two over three cluster tiles, 16 blocks
     (2, 128, 300, {"block": 32, "cluster_tile": 64}),  # more clusters than tokens (most empty), N a multiple
     (1, 5, 1, {"block": 16, "cluster_tile": 16}),  # C = 1, fewer tokens than a block
     (2, 2000, 1000, {}),  # the GPU's block and cluster tile: two blocks (the second ragged), four tiles
     (2, 3000, 100, {"block": 8, "cluster_tile": 16})],  # 375 blocks: the scan in 7 tiles of 16 clusters, ragged
)  # fmt: skip
def test_counting_sort_is_the_stable_sort_and_its_cluster_bounds(
    groups: int, tokens: int, clusters: int, tiles: dict[str, int]
) -> None:
    """On random int32 labels with many ties and empty clusters (every label that is a multiple of 3 moved to the
    last cluster: clusters 0, 3, 6, ... empty unless last), the order equals torch's stable sort's indices and the
    bounds the first position of every cluster (and N) in the sorted labels, both int64."""
    labels = torch.randint(0, clusters, (groups, tokens), device=DEVICE, dtype=torch.int32)
    labels[labels % 3 == 0] = clusters - 1
    order, bounds = fused.counting_sort(labels, clusters, **tiles)
    ranked = torch.sort(labels, dim=1, stable=True)
    ids = torch.arange(clusters + 1, device=DEVICE, dtype=torch.int32).expand(groups, -1).contiguous()
    assert order.dtype == bounds.dtype == torch.int64 and bounds.shape == (groups, clusters + 1)
    assert torch.equal(order, ranked.indices) and torch.equal(bounds, torch.searchsorted(ranked.values, ids))


@needs_kernel
def test_counting_sort_of_no_tokens_is_empty() -> None:
    """No tokens: an empty order and every cluster empty (bounds all 0), without a launch."""
    order, bounds = fused.counting_sort(torch.zeros(2, 0, device=DEVICE, dtype=torch.int32), 5)
    assert order.shape == (2, 0) and order.dtype == torch.int64
    assert torch.equal(bounds, torch.zeros(2, 6, device=DEVICE, dtype=torch.int64))


@pytest.mark.parametrize(
    ("clusters", "tiles", "message"),
    [(1 << 20, {}, "overflow the counting sort's keys"),  # 2^20 << log2(1024) reaches 2^30
     (4, {"block": 48}, "must be powers of two"),
     (4, {"block": 1}, "must be powers of two"),
     (4, {"cluster_tile": 100}, "must be powers of two")],
)  # fmt: skip
def test_counting_sort_refuses_tiles_and_cluster_counts_it_cannot_key(
    clusters: int, tiles: dict[str, int], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        fused.counting_sort(torch.zeros(1, 8, dtype=torch.int32), clusters, **tiles)


@needs_kernel
@every_variant
def test_the_kernels_sort_without_torch_sort(monkeypatch: pytest.MonkeyPatch, update: str) -> None:
    """Neither update step (nor the one-hot path's closing order) calls torch.sort or torch.searchsorted, and the
    order is still the stable sort of the labels."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the kernel path called a torch sort or search")

    x, init = clumped(2, 9, 90, 16)
    monkeypatch.setattr(torch, "sort", refuse)
    monkeypatch.setattr(torch, "searchsorted", refuse)
    labels, _, _, order = fused.kmeans_lloyd(x, init, 2, update)
    monkeypatch.undo()
    assert_stable_order(labels, order)


def test_the_torch_path_returns_the_stable_order_of_its_last_labels() -> None:
    """The torch path (the CPU's) on clumped fp32 points, over 3 iterations: the order is the stable sort of its
    labels."""
    x, init = clumped(2, 9, 90, 16)
    labels, _, _, order = lloyd(x.float().cpu(), init.cpu(), 3)
    assert_stable_order(labels, order)


@needs_kernel
@every_variant
def test_kmeans_runs_the_update_the_variable_names(monkeypatch: pytest.MonkeyPatch, update: str) -> None:
    """``$BENCH_KMEANS_UPDATE`` picks the kernels' update step: only that one runs, once per iteration."""
    calls: list[str] = []
    for name, step in fused.UPDATE_STEPS.items():
        monkeypatch.setitem(fused.UPDATE_STEPS, name, lambda *args, n=name, s=step: calls.append(n) or s(*args))
    monkeypatch.setenv(fused.VARIANT_ENV, update)
    x, init, _ = separated(1, 4, 40, 16)
    kmeans(x, 4, 2, init, torch.Generator(DEVICE), backend="triton")
    assert calls == [update, update]


def test_the_default_update_is_sorted_the_faster_on_an_h200(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(fused.VARIANT_ENV, raising=False)
    assert fused.chosen_variant() == fused.DEFAULT_VARIANT == "sorted"
    assert fused.chosen_variant("onehot") == "onehot"
    monkeypatch.setenv(fused.VARIANT_ENV, " OneHot ")
    assert fused.chosen_variant() == "onehot"


def test_an_unknown_update_is_a_specific_error_on_every_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Also where the torch path runs (fp32 points), as the xattn variant's error."""
    monkeypatch.setenv(fused.VARIANT_ENV, "scatter")
    with pytest.raises(HarnessError, match="BENCH_KMEANS_UPDATE must be one of onehot, sorted, got 'scatter'"):
        kmeans(torch.randn(1, 20, 8), 4, 1, None, torch.Generator(), backend="torch")


def test_unsupported_points_take_the_torch_path() -> None:
    """fp32 points (and any points without Triton) are clustered by exactly the torch path, even under auto."""
    x, init = torch.randn(2, 30, 8), torch.randn(2, 4, 8)
    assert fused.unsupported_reason(x) is not None and not fused.use_fused(x, "auto")
    out, ref = kmeans(x, 4, 2, init, torch.Generator(), backend="auto"), lloyd(x, init, 2)
    assert all(torch.equal(a, b) for a, b in zip(out, ref, strict=True))


@pytest.mark.parametrize(
    ("value", "message"),
    [("triton", "BENCH_KMEANS_BACKEND=triton but the Triton k-means cannot run"),
     ("cuda", "BENCH_KMEANS_BACKEND must be one of auto, torch, triton")],
)  # fmt: skip
def test_backend_variable_errors_are_specific(monkeypatch: pytest.MonkeyPatch, value: str, message: str) -> None:
    monkeypatch.setenv(fused.BACKEND_ENV, value)
    x = torch.randn(1, 20, 8)  # fp32: the kernels never take it
    with pytest.raises(HarnessError, match=message):
        kmeans(x, 4, 1, None, torch.Generator())


def test_the_default_backend_runs_the_kernels_where_they_can(monkeypatch: pytest.MonkeyPatch) -> None:
    """auto since the GPU check passed: fp16 on the kernels' device takes them, fp32 and CPU tensors (without the
    interpreter) never do."""
    monkeypatch.delenv(fused.BACKEND_ENV, raising=False)
    assert fused.DEFAULT_BACKEND == "auto" and not fused.use_fused(torch.randn(1, 20, 8))
    points = torch.randn(1, 20, 8, device=DEVICE).half()
    assert fused.use_fused(points) == (fused.unsupported_reason(points) is None)


def stand_in_check(monkeypatch: pytest.MonkeyPatch, failing: set[tuple[str, str]], assigns: int = 7,
                   updates: int = 6) -> tuple[dict[str, Any], list[str], dict[str, list[str]]]:  # fmt: skip
    """svg2_kmeans.check_configs on stand-in autotuners (``assigns`` assignment configurations a0, a1, ...; ``updates``
    of each update step, o0, ... and s0, ...) and a stand-in k-means whose pinned pair fails where listed in
    ``failing``: no Triton needed. Returns the check's result and the lists left in the autotuners."""
    from types import SimpleNamespace

    from harness.benchmarks import svg2_kmeans as script

    assign = SimpleNamespace(configs=[f"a{i}" for i in range(assigns)], cache={})
    tuners = {update: SimpleNamespace(configs=[f"{update[0]}{i}" for i in range(updates)], cache={})
              for update in ("onehot", "sorted")}  # fmt: skip
    monkeypatch.setattr(fused, "_assign", assign)
    monkeypatch.setattr(fused, "TUNERS", tuners)
    monkeypatch.setattr(fused, "VARIANTS", ("onehot", "sorted"))
    monkeypatch.setattr(fused, "kmeans_lloyd",
                        lambda x, init, iterations, update: (assign.configs[0], tuners[update].configs[0]))  # fmt: skip
    monkeypatch.setattr(script, "label_check", lambda x, init, pair: {"passed": pair not in failing})
    result = script.check_configs(torch.device("cpu"))
    return result, assign.configs, {update: tuner.configs for update, tuner in tuners.items()}


def test_the_configuration_check_pairs_every_configuration_and_drops_a_member_of_each_failing_pair(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """7 assignment configurations beside 6 update ones per update step, the shorter list cycled (7 pairs each).
    a6 fails beside both updates' first configurations, which pass beside a0: a6 goes, o0 and s0 stay. a3 fails
    beside o3, its only pair, but passes beside s3: o3 goes. The JSON names what is kept."""
    failing = {("a6", "o0"), ("a6", "s0"), ("a3", "o3")}
    result, assigns, updates = stand_in_check(monkeypatch, failing)
    assert all(len(result["variants"][update]["configs"]) == 7 for update in ("onehot", "sorted"))
    assert assigns == result["assign_kept"] == [f"a{i}" for i in range(6)]
    assert updates["onehot"] == result["variants"]["onehot"]["kept_configs"] == ["o0", "o1", "o2", "o4", "o5"]
    assert updates["sorted"] == result["variants"]["sorted"]["kept_configs"] == [f"s{i}" for i in range(6)]
    assert result["variants"]["onehot"]["kept"] == 5 and result["variants"]["sorted"]["kept"] == 6


def test_a_failing_pair_of_configurations_that_each_passed_elsewhere_drops_the_update(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """(a0, o0) fails while a0 passes beside s0 and o0 beside a6: the assignment's labels do not depend on the update
    step, so o0 is to blame and goes; a0 stays (the autotuners choose independently: keeping both would let a run
    pick the failing pair)."""
    _, assigns, updates = stand_in_check(monkeypatch, {("a0", "o0")})
    assert assigns == [f"a{i}" for i in range(7)]
    assert updates["onehot"] == [f"o{i}" for i in range(1, 6)] and updates["sorted"] == [f"s{i}" for i in range(6)]


def test_when_every_pair_fails_nothing_is_kept_and_the_lists_stay(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every pair failing: kept 0 for both update steps (none is timed), the autotuners' lists left as they were (an
    empty list would leave nothing to launch)."""
    every = {(f"a{i}", f"{update[0]}{j}") for i in range(3) for j in range(2) for update in ("onehot", "sorted")}
    result, assigns, updates = stand_in_check(monkeypatch, every, assigns=3, updates=2)
    assert result["assign_kept"] == [] and assigns == ["a0", "a1", "a2"]
    assert all(result["variants"][update]["kept"] == 0 for update in ("onehot", "sorted"))
    assert updates == {"onehot": ["o0", "o1"], "sorted": ["s0", "s1"]}


@needs_kernel
def test_kmeans_script_checks_every_configuration_then_times_every_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU script at a small shape: each autotuner configuration pair of each update step passes its check, the
    kernels' iteration at the timed shape passes too with both updates, every path is timed (k-means and the
    selection) as a share of the dense call, the faster update step is named, and the table has one line per
    path."""
    from harness.benchmarks import svg2_kmeans as script
    from harness.benchmarks.sparse_gpu import sparse_context
    from methods import TokenGrid

    monkeypatch.setattr(script, "COLD_REPEATS", (0, 1))
    monkeypatch.setattr(script, "WARM_REPEATS", (1, 1))
    configs = script.check_configs(DEVICE)
    assert set(configs["variants"]) == set(fused.VARIANTS)
    assert all(result["passed"] for check in configs["variants"].values() for result in check["configs"])
    for update, check in configs["variants"].items():  # every configuration of both lists, each kept
        assert len(check["configs"]) == max(len(fused._assign.configs), len(fused.TUNERS[update].configs))
        assert check["kept"] == len(fused.TUNERS[update].configs) >= 1
    grid = TokenGrid(2, 8, 8)  # 128 tokens
    q, k, v = (torch.randn(1, 2, grid.tokens, 32, device=DEVICE).to(torch.float16) for _ in range(3))
    row = script.kmeans_timings(q, k, v, sparse_context(grid), 1.0, configs, q_clusters=4, k_clusters=8,
                                kmeans_init_iters=2, kmeans_step_iters=1)  # fmt: skip
    assert row["passed"] and row["clusters"] == {"q": 4, "k": 8}
    assert all(row["check"][path][name]["label_agreement"] > 0.9 for path in script.PATHS for name in "qk")
    assert set(row["paths"]) == set(script.PATHS) and row["fastest_update"] in fused.VARIANTS
    for timing in row["paths"].values():
        assert timing["selection_fraction"] == timing["selection"]["median_ms"] > 0
        assert all(timing[name]["warm_fraction"] == timing[name]["warm"]["median_ms"] > 0 for name in "qk")
    assert len(script.table_lines("toy", row)) == len(script.PATHS)
