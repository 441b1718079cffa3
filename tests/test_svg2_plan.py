"""svg2's plan against the computation it replaced: the same orders, kept pairs, density and tile tables."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from methods import AttentionContext, TokenGrid, build_method
from methods.kernels.block_sparse import (
    BlockSparsePattern,
    VariableBlocks,
    block_lengths,
    mask_tables,
    num_blocks,
    rectangle_counts,
    select_by_cost_budget,
    select_by_cumulative_mass,
)
from methods.sparse import SparsePlan
from methods.svg2 import SparseVideoGen2

GRID = TokenGrid(5, 5, 8)  # 200 tokens
SETTINGS = {"q_clusters": 8, "k_clusters": 16, "kmeans_init_iters": 3, "kmeans_step_iters": 1, "block_size": 16}


def context(step: int) -> AttentionContext:
    return AttentionContext(layer=3, num_layers=8, step=step, num_steps=20, timestep=0.25, cfg_branch="cond",
                            grid=GRID)  # fmt: skip


def previous_pattern(keep: torch.Tensor, q_sizes: torch.Tensor, k_sizes: torch.Tensor, q_labels_sorted: torch.Tensor,
                     k_labels_sorted: torch.Tensor, block: int) -> BlockSparsePattern:  # fmt: skip
    """``cluster_pair_pattern`` as it was: every tile table built at once, from the sorted labels."""
    tokens = q_labels_sorted.shape[-1]
    device = keep.device
    present = (q_sizes > 0)[..., :, None] & (k_sizes > 0)[..., None, :]
    starts = torch.arange(num_blocks(tokens, block), device=device) * block
    ends = starts + block_lengths(tokens, block, device) - 1
    q_first, q_last = q_labels_sorted[..., starts], q_labels_sorted[..., ends]
    k_first, k_last = k_labels_sorted[..., starts], k_labels_sorted[..., ends]
    rows, cols = (q_first, q_last), (k_first, k_last)
    pairs = (q_last - q_first + 1)[..., :, None] * (k_last - k_first + 1)[..., None, :]
    kept = rectangle_counts(keep & present, rows, cols) > 0
    full = rectangle_counts(keep | ~present, rows, cols) == pairs
    keep_read, q_labels_read, k_labels_read = mask_tables(keep, q_labels_sorted, k_labels_sorted)

    def kept_cluster_pair(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return keep_read[b, h, q_labels_read[b, h, q_idx], k_labels_read[b, h, kv_idx]]

    variable = VariableBlocks(keep & present, q_sizes, k_sizes)
    return BlockSparsePattern(kept, tokens, block, full=full & kept, mask_mod=kept_cluster_pair, variable=variable)


def previous_plan(method: SparseVideoGen2, q: torch.Tensor, k: torch.Tensor, ctx: AttentionContext) -> SparsePlan:
    """``SparseVideoGen2.plan`` as it was: the labels sorted again after k-means, the tables built at once."""
    batch, heads, tokens, dim = q.shape
    q_count, k_count = method.clusters(tokens)
    cached = method.route(ctx)
    q_labels, q_centroids, q_sizes, _ = method._cluster(q, q_count, cached.q)
    k_labels, k_centroids, k_sizes, _ = method._cluster(k, k_count, cached.k)
    cached.q, cached.k = q_centroids, k_centroids
    logits = q_centroids @ k_centroids.transpose(-2, -1) / dim**0.5
    weights = k_sizes[:, None, :].float() * (logits - logits.amax(dim=-1, keepdim=True)).exp()
    mass = weights / weights.sum(dim=-1, keepdim=True)
    if method.fixed_density is None:
        keep = select_by_cumulative_mass(mass, method.top_p, min_keep=math.floor(method.min_kc_ratio * k_count))
    else:
        keep = select_by_cost_budget(mass, k_sizes[:, None, :], method.fixed_density)
    shape = (batch, heads)
    q_labels, k_labels = q_labels.view(*shape, tokens), k_labels.view(*shape, tokens)
    q_sizes, k_sizes = q_sizes.view(*shape, q_count), k_sizes.view(*shape, k_count)
    keep = keep.view(*shape, q_count, k_count)
    q_sorted, q_order = q_labels.sort(dim=-1, stable=True)
    k_sorted, k_order = k_labels.sort(dim=-1, stable=True)
    pattern = previous_pattern(keep, q_sizes, k_sizes, q_sorted, k_sorted, method.block_size(tokens))
    pair_tokens = q_sizes[..., :, None].double() * k_sizes[..., None, :].double()
    density = (keep * pair_tokens).sum() / (batch * heads * tokens**2)
    return SparsePlan(pattern, q_order=q_order, kv_order=k_order, density=density)


def assert_same_plan(plan: SparsePlan, expected: SparsePlan) -> None:
    """Bit-identical orders, density (value and dtype), variable blocks and tile tables (the token mask too)."""
    assert torch.equal(plan.q_order, expected.q_order) and torch.equal(plan.kv_order, expected.kv_order)
    assert isinstance(plan.density, torch.Tensor) and isinstance(expected.density, torch.Tensor)
    assert plan.density.dtype == expected.density.dtype and torch.equal(plan.density, expected.density)
    got, want = plan.pattern.variable, expected.pattern.variable
    assert got is not None and want is not None
    for name in ("kept", "row_sizes", "col_sizes"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert plan.pattern.blocks == expected.pattern.blocks and plan.pattern.seq_len == expected.pattern.seq_len
    assert torch.equal(plan.pattern.kept, expected.pattern.kept)
    assert torch.equal(plan.pattern.full, expected.pattern.full)
    assert torch.equal(plan.pattern.dense_mask(), expected.pattern.dense_mask())


@pytest.mark.parametrize("params", [{}, {"fixed_density": 0.3}], ids=["top-p", "fixed-density"])
def test_the_plan_equals_the_computation_it_replaced(params: dict[str, Any]) -> None:
    """On random q and k, a cold call (k-means from random tokens) and a warm one (from the cached centroids): the
    plan equals the previous computation (labels sorted again, tables built at once) bit for bit."""
    method, reference = (build_method("svg2", **SETTINGS, **params) for _ in range(2))
    assert isinstance(method, SparseVideoGen2) and isinstance(reference, SparseVideoGen2)
    generator = torch.Generator().manual_seed(0)
    for step in (15, 16):
        q, k, v = (torch.randn(1, 2, GRID.tokens, 16, generator=generator) for _ in range(3))
        assert_same_plan(method.plan(q, k, v, context(step)), previous_plan(reference, q, k, context(step)))


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
