"""svg2's plan against its token mask: the orders, density, variable blocks and (deferred) tile tables."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from methods import AttentionContext, TokenGrid, build_method
from methods.kernels.block_sparse import (
    rectangle_counts,
)
from methods.sparse import SparsePlan
from methods.svg2 import SparseVideoGen2, cluster_mass

GRID = TokenGrid(5, 5, 8)  # 200 tokens
SETTINGS = {"q_clusters": 8, "k_clusters": 16, "kmeans_init_iters": 3, "kmeans_step_iters": 1, "block_size": 16}


def context(step: int) -> AttentionContext:
    return AttentionContext(layer=3, num_layers=8, step=step, num_steps=20, timestep=0.25, cfg_branch="cond",
                            grid=GRID)  # fmt: skip


def token_mask(keep: torch.Tensor, q_labels: torch.Tensor, k_labels: torch.Tensor) -> torch.Tensor:
    """``(B, H, N, N)`` bool, from first principles: query token i (in cluster-sorted order) sees key token j when
    their clusters' pair is kept."""
    q_sorted, k_sorted = q_labels.sort(dim=-1, stable=True).values, k_labels.sort(dim=-1, stable=True).values
    batch = torch.arange(keep.shape[0])[:, None, None, None]
    heads = torch.arange(keep.shape[1])[None, :, None, None]
    return keep[batch, heads, q_sorted[..., :, None], k_sorted[..., None, :]]


def tile_reductions(mask: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(kept, full)`` ``(B, H, T, T)`` of a token mask over tiles of ``block`` (the last partial): any, all."""
    tiles = range(0, mask.shape[-1], block)

    def reduce(op: Any) -> torch.Tensor:
        rows = [[op(mask[..., i : i + block, j : j + block].flatten(-2), -1) for j in tiles] for i in tiles]
        return torch.stack([torch.stack(row, -1) for row in rows], -2)

    return reduce(torch.any), reduce(torch.all)


def in_label_order(keep: torch.Tensor, q_sizes: torch.Tensor, k_sizes: torch.Tensor, k_labels: torch.Tensor,
                   k_order: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """:func:`methods.svg2.by_popularity`'s place taken by the key clusters in label order (k-means's own)."""
    return keep, k_sizes, k_order, (keep * k_sizes[..., None, :]).sum(dim=-1)


@pytest.mark.parametrize("params", [{}, {"fixed_density": 0.3}], ids=["top-p", "fixed-density"])
def test_the_plan_matches_its_token_mask(params: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """On random q and k, a cold call (k-means from random tokens) and a warm one (from the cached centroids), key
    clusters in label order: the orders are the stable sorts of a second instance's k-means labels (same seed), and
    the density, variable blocks and tile tables (built when read) are those of the token mask of the kept cluster
    pairs over those orders."""
    from methods import svg2

    monkeypatch.setattr(svg2, "by_popularity", in_label_order)
    method, reference = (build_method("svg2", **SETTINGS, **params) for _ in range(2))
    assert isinstance(method, SparseVideoGen2) and isinstance(reference, SparseVideoGen2)
    generator = torch.Generator().manual_seed(0)
    for step in (15, 16):
        q, k, v = (torch.randn(1, 2, GRID.tokens, 16, generator=generator) for _ in range(3))
        plan = method.plan(q, k, v, context(step))
        cached = reference.route(context(step))
        q_labels, cached.q, _, _ = reference._cluster(q, method.clusters(GRID.tokens)[0], cached.q)
        k_labels, cached.k, _, _ = reference._cluster(k, method.clusters(GRID.tokens)[1], cached.k)
        q_labels, k_labels = q_labels.view(1, 2, -1), k_labels.view(1, 2, -1)
        assert torch.equal(plan.q_order, q_labels.sort(dim=-1, stable=True).indices)
        assert torch.equal(plan.kv_order, k_labels.sort(dim=-1, stable=True).indices)
        variable = plan.pattern.variable
        assert variable is not None
        mask = token_mask(variable.kept, q_labels, k_labels)
        assert plan.density is not None and plan.density.dtype == torch.float64
        assert float(plan.density) == float(mask.double().mean())
        assert torch.equal(variable.dense_mask(), mask)
        kept, full = tile_reductions(mask, method.block_size(GRID.tokens))
        assert torch.equal(plan.pattern.kept, kept) and torch.equal(plan.pattern.full, full)
        assert torch.equal(plan.pattern.dense_mask(), mask)


def mask_by_token(plan: SparsePlan) -> torch.Tensor:
    """The plan's token mask ``(B, H, N, N)`` indexed by the tokens' own positions (its orders undone)."""
    assert plan.pattern.variable is not None and plan.q_order is not None and plan.kv_order is not None
    mask = plan.pattern.variable.dense_mask()
    rows = torch.empty_like(mask).scatter_(-2, plan.q_order[..., None].expand_as(mask), mask)
    return torch.empty_like(mask).scatter_(-1, plan.kv_order[..., None, :].expand_as(mask), rows)


@pytest.mark.parametrize("params", [{}, {"fixed_density": 0.3}], ids=["top-p", "fixed-density"])
def test_key_clusters_come_most_kept_first_with_the_same_pairs(params: dict[str, Any],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """The plan's key clusters are ordered by the query tokens that keep them, most first: each still consecutive
    (a run of its size) and ascending in token order, and the kept token pairs and density are those of the plan in
    label order."""
    from methods import svg2

    plans = []
    for reorder in (in_label_order, svg2.by_popularity):
        monkeypatch.setattr(svg2, "by_popularity", reorder)
        method = build_method("svg2", **SETTINGS, **params)
        generator = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 2, GRID.tokens, 16, generator=generator) for _ in range(3))
        plans.append(method.plan(q, k, v, context(15)))
    labelled, plan = plans
    assert torch.equal(mask_by_token(plan), mask_by_token(labelled))
    assert plan.density is not None and float(plan.density) == float(labelled.density)
    variable = plan.pattern.variable
    assert variable is not None and plan.kv_order is not None and labelled.kv_order is not None
    kept_by = (variable.kept * variable.row_sizes[..., None]).sum(dim=-2)
    assert bool((kept_by[..., :-1] >= kept_by[..., 1:]).all())
    for group in range(2):
        runs = plan.kv_order[0, group].split(variable.col_sizes[0, group].tolist())
        assert all(bool((run[1:] > run[:-1]).all()) for run in runs)
        assert sorted(tuple(run.tolist()) for run in runs if len(run)) == sorted(
            tuple(run.tolist()) for run in labelled.kv_order[0, group].split(
                labelled.pattern.variable.col_sizes[0, group].tolist()) if len(run))  # fmt: skip


def test_the_plan_builds_no_tile_table_until_one_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """The plan gives the orders, density and variable blocks (all that triton-variable reads) without the tile
    tables; the first table read builds them (kept and full: two rectangle counts), later reads reuse them."""
    from methods import svg2

    counts: list[int] = []
    monkeypatch.setattr(svg2, "rectangle_counts", lambda *args: counts.append(1) or rectangle_counts(*args))
    method = build_method("svg2", **SETTINGS)
    q, k, v = (torch.randn(1, 2, GRID.tokens, 16) for _ in range(3))
    plan = method.plan(q, k, v, context(15))
    assert plan.pattern.kind == "variable" and plan.pattern.batch_heads == (1, 2) and plan.density is not None
    assert not counts
    plan.pattern.dense_mask()
    plan.pattern.tile_density()
    assert counts == [1, 1]


def traced_calls(fn: Any, *args: torch.Tensor) -> tuple[Any, list[str]]:
    """``fn(*args)`` compiled in one graph (fullgraph) by a backend that runs the graph as it is: the result and
    the names of the functions and methods the graph calls."""
    calls: list[str] = []

    def backend(graph: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Any:
        calls.extend(getattr(node.target, "__name__", str(node.target)) for node in graph.graph.nodes
                     if node.op in ("call_function", "call_method"))  # fmt: skip
        return graph.forward

    torch._dynamo.reset()
    try:
        return torch.compile(fn, backend=backend, fullgraph=True)(*args), calls
    finally:
        torch._dynamo.reset()


def test_a_compiled_plan_traces_the_tile_tables_only_where_they_are_read() -> None:
    """A warm plan (k-means from the cached centroids: no draw) compiled in one graph: read for its variable blocks
    alone (triton-variable's case) the graph holds no tile-table op (the sorted labels' repeat_interleave, the
    rectangle counts' pad of their prefix sums); read for its tile table it builds them in the graph, equal to
    eager's."""
    method = build_method("svg2", **SETTINGS)
    assert isinstance(method, SparseVideoGen2)
    q, k, v = (torch.randn(1, 2, GRID.tokens, 16) for _ in range(3))
    method.plan(q, k, v, context(15))  # the cold call fills the centroid cache
    cache = method.route(context(16))
    start = cache.q, cache.k

    def warm_plan(*qkv: torch.Tensor) -> SparsePlan:
        cache.q, cache.k = start  # every call from the same centroids
        return method.plan(*qkv, context(16))

    eager = warm_plan(q, k, v)
    variable, calls = traced_calls(lambda *qkv: warm_plan(*qkv).pattern.variable.kept, q, k, v)
    assert not {"repeat_interleave", "pad"} & set(calls)
    assert eager.pattern.variable is not None and torch.equal(variable, eager.pattern.variable.kept)
    kept, calls = traced_calls(lambda *qkv: warm_plan(*qkv).pattern.kept, q, k, v)
    assert {"repeat_interleave", "pad"} <= set(calls)
    assert torch.equal(kept, eager.pattern.kept)


def test_cluster_mass_is_the_size_weighted_centroid_probability() -> None:
    """The mass equals ``|K_j| exp(c_i . c_j / sqrt(d)) / sum_k |K_k| exp(c_i . c_k / sqrt(d))`` in float64 within
    fp32 rounding, an empty key cluster's is exactly 0, and each row sums to 1."""
    torch.manual_seed(0)
    q_centroids, k_centroids = torch.randn(3, 7, 32), torch.randn(3, 11, 32)
    k_sizes = torch.randint(1, 50, (3, 11))
    k_sizes[:, 4] = 0
    logits = q_centroids.double() @ k_centroids.double().transpose(-2, -1) / 32**0.5
    weights = k_sizes[:, None, :] * logits.exp()
    expected = weights / weights.sum(dim=-1, keepdim=True)
    mass = cluster_mass(q_centroids, k_centroids, k_sizes)
    assert mass.dtype == torch.float32
    assert ((mass.double() - expected).abs() <= 1e-6 * expected.amax(dim=-1, keepdim=True)).all()
    assert (mass[..., 4] == 0).all()
    assert torch.allclose(mass.sum(dim=-1), torch.ones(3, 7))
