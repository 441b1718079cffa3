"""The shared block-sparse helpers: tile tables, densities, Flex vs masked dense, selection, permutations."""

from __future__ import annotations

import pytest
import torch
from numerics import relative_error

from harness.errors import HarnessError
from methods.kernels.block_sparse import (
    FLEX_TILE,
    BlockSparsePattern,
    TileTables,
    VariableBlocks,
    block_lengths,
    flex_block_sparse_attention,
    mask_tables,
    masked_dense_attention,
    num_blocks,
    permute_tokens,
    select_by_cost_budget,
    select_by_cumulative_mass,
    select_top_fraction,
    unpermute_tokens,
)
from methods.kernels.sparse_backends import block_sparse_attention

N, BLOCK = 300, 64  # deliberately not a multiple of the block: the last tile is ragged


def random_tiles(batch: int = 1, heads: int = 2, keep: float = 0.4) -> torch.Tensor:
    nb = num_blocks(N, BLOCK)
    kept = torch.rand(batch, heads, nb, nb) < keep
    kept[..., 0] = True  # every query row keeps something
    return kept


def band_pattern(width: torch.Tensor, heads: int = 2) -> BlockSparsePattern:
    """Token band |q - kv| <= width over every tile, all tiles partial."""

    def band(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return (q_idx - kv_idx).abs() <= width

    kept = torch.ones(1, heads, num_blocks(N, BLOCK), num_blocks(N, BLOCK), dtype=torch.bool)
    return BlockSparsePattern(kept, N, BLOCK, full=torch.zeros_like(kept), mask_mod=band)


def masked_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """softmax over kept entries only, in float64, written out."""
    scores = (q.double() @ k.double().transpose(-2, -1)) / q.shape[-1] ** 0.5
    weights = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    return weights @ v.double()


def test_block_lengths_cover_the_sequence_with_a_ragged_last_block() -> None:
    """300 tokens in blocks of 64: four full blocks and a last block of 44."""
    assert block_lengths(N, BLOCK).tolist() == [64, 64, 64, 64, 44]


def test_dense_mask_expands_tiles_and_applies_mask_mod_in_partial_tiles() -> None:
    """Whole kept tiles are kept entry by entry; in partial tiles only mask_mod's entries are."""
    kept = random_tiles()
    mask = BlockSparsePattern(kept, N, BLOCK).dense_mask()
    assert mask.shape == (1, 2, N, N)
    assert bool(mask[0, 1, 64 * 2 + 5, 64 * 4 + 43]) == bool(kept[0, 1, 2, 4])
    band = band_pattern(torch.tensor(10)).dense_mask()
    index = torch.arange(N)
    assert torch.equal(band[0, 0], (index[:, None] - index[None, :]).abs() <= 10)


@pytest.mark.parametrize("kind", ["tiles", "band"])
def test_density_is_the_mean_of_the_mask_used(kind: str) -> None:
    """density() counts kept entries exactly (ragged tiles and partial tiles included)."""
    pattern = BlockSparsePattern(random_tiles(), N, BLOCK) if kind == "tiles" else band_pattern(torch.tensor(37))
    assert pattern.density() == pytest.approx(pattern.dense_mask().double().mean().item(), abs=1e-12)
    assert pattern.tile_density() >= pattern.density()


def test_masked_dense_matches_a_float64_masked_softmax() -> None:
    """The CPU path is softmax over the kept entries (relative error <= 1e-5 in fp32)."""
    q, k, v = (torch.randn(2, 2, N, 16) for _ in range(3))
    pattern = BlockSparsePattern(random_tiles(batch=2), N, BLOCK)
    out = block_sparse_attention(q, k, v, pattern, backend="masked")
    assert relative_error(out, masked_reference(q, k, v, pattern.dense_mask())) <= 1e-5


def test_block_mask_holds_exactly_the_kept_tiles() -> None:
    """The Flex BlockMask built from block indices covers the kept tiles: full ones and partial ones."""
    kept = random_tiles()
    full = kept & (torch.rand_like(kept, dtype=torch.float) < 0.5)
    pattern = BlockSparsePattern(kept, N, BLOCK, full=full, mask_mod=band_pattern(torch.tensor(5)).mask_mod)
    block_mask = pattern.block_mask()
    assert torch.equal(block_mask.to_dense().bool(), kept)
    nf = block_mask.full_kv_num_blocks
    assert nf is not None and torch.equal(nf, full.sum(-1, dtype=torch.int32))


def test_compiled_flex_matches_masked_dense_without_recompiling() -> None:
    """Compiled Flex (CPU inductor) equals the masked path for tile and token patterns; a second
    density and a second band width reuse the compiled kernels (no new graph)."""
    from torch._dynamo.utils import counters

    q, k, v = (torch.randn(1, 2, N, 16) for _ in range(3))
    for pattern in (BlockSparsePattern(random_tiles(), N, BLOCK), band_pattern(torch.tensor(40))):
        out = flex_block_sparse_attention(q, k, v, pattern)
        assert relative_error(out, masked_dense_attention(q, k, v, pattern)) <= 1e-5
    graphs = counters["stats"]["unique_graphs"]
    for pattern in (BlockSparsePattern(random_tiles(keep=0.8), N, BLOCK), band_pattern(torch.tensor(90))):
        out = flex_block_sparse_attention(q, k, v, pattern)
        assert relative_error(out, masked_dense_attention(q, k, v, pattern)) <= 1e-5
    assert counters["stats"]["unique_graphs"] == graphs


def test_eager_flex_attention_with_a_block_level_patterns_mask_computes_the_pattern() -> None:
    """flex_attention run eagerly (as inside a model compiled by a backend other than inductor) ignores the tile
    tables and applies the BlockMask's mask_mod alone: a block-level pattern's is the tile lookup, not dense.
    Built once per pattern and (B, H)."""
    from torch.nn.attention.flex_attention import flex_attention

    tokens = 2 * FLEX_TILE
    kept = torch.tensor([[True, False], [True, True]]).expand(1, 2, 2, 2)
    pattern = BlockSparsePattern(kept, tokens, FLEX_TILE)
    q, k, v = (torch.randn(1, 2, tokens, 16) for _ in range(3))
    block_mask = pattern.flex_block_mask((1, 2))
    assert pattern.flex_block_mask((1, 2)) is block_mask
    out = flex_attention(q, k, v, block_mask=block_mask)
    assert relative_error(out, masked_dense_attention(q, k, v, pattern)) <= 1e-5


def test_a_mask_for_the_backward_captures_no_inference_tensor() -> None:
    """A pattern built under inference mode (radial's, reused across calls) and later run with gradients: the tile
    lookup its BlockMask carries captures a normal tensor, which compiled Flex can save for the backward."""
    import inspect

    with torch.inference_mode():
        pattern = BlockSparsePattern(torch.tensor([[True, False], [True, True]]).expand(1, 2, 2, 2), 2 * FLEX_TILE,
                                     FLEX_TILE)  # fmt: skip
    captured = {
        backward: [value for value in inspect.getclosurevars(pattern.block_mask(backward).mask_mod).nonlocals.values()
                   if isinstance(value, torch.Tensor)]
        for backward in (False, True)
    }  # fmt: skip
    assert captured[False] and all(torch.is_inference(t) for t in captured[False])
    assert captured[True] and not any(torch.is_inference(t) for t in captured[True])


def small_block_pattern(tokens: int, blocks: int | tuple[int, int], token_level: bool) -> BlockSparsePattern:
    """Random kept tiles of ``blocks`` tokens; ``token_level`` adds random full tiles and a band mask_mod."""
    q_block, kv_block = (blocks, blocks) if isinstance(blocks, int) else blocks
    kept = torch.rand(1, 2, num_blocks(tokens, q_block), num_blocks(tokens, kv_block)) < 0.3
    kept[..., 0] = True
    if not token_level:
        return BlockSparsePattern(kept, tokens, blocks)
    full = kept & (torch.rand(kept.shape) < 0.5)
    width = torch.tensor(tokens // 7)

    def band(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return (q_idx - kv_idx).abs() <= width

    return BlockSparsePattern(kept, tokens, blocks, full=full, mask_mod=band)


@pytest.mark.parametrize("token_level", [False, True], ids=["blocks", "token-level"])
@pytest.mark.parametrize("blocks", [16, 32, 64, 48, 8, (32, 48)])
@pytest.mark.parametrize("tokens", [512, 1950])
def test_regrouped_into_flex_tiles_keeps_the_token_mask_and_density(tokens: int, blocks: int, token_level: bool
                                                                    ) -> None:  # fmt: skip
    """Blocks smaller than Flex's tile (or not dividing it), ragged lengths: the 128-tile pattern keeps
    exactly the small-block pattern's entries, and the density stays the small-block pattern's."""
    pattern = small_block_pattern(tokens, blocks, token_level)
    regrouped = pattern.regrouped(FLEX_TILE, (3, 2))  # batch 3: broadcast tables are expanded for Flex
    assert regrouped.blocks == (FLEX_TILE, FLEX_TILE)
    assert torch.equal(regrouped.dense_mask(), pattern.dense_mask())
    assert regrouped.density() == pytest.approx(pattern.density(), abs=1e-12)
    assert regrouped.tile_density() >= pattern.tile_density()


def test_regrouping_leaves_multiples_of_the_tile_alone() -> None:
    """A pattern of 128- or 256-token blocks is what Flex runs as it is."""
    for block in (128, 256):
        pattern = small_block_pattern(1950, block, token_level=True)
        assert pattern.regrouped(FLEX_TILE) is pattern


@pytest.mark.parametrize("blocks", [32, 48])
def test_compiled_flex_with_small_blocks_matches_masked_dense(blocks: int) -> None:
    """The toy's 512 tokens in 32-blocks (and 48-blocks, which straddle tiles), batch 2 over a (1, H)
    pattern: compiled Flex (CPU inductor, regrouped into 128-tiles) equals the masked dense path."""
    q, k, v = (torch.randn(2, 2, 512, 16) for _ in range(3))
    for token_level in (False, True):
        pattern = small_block_pattern(512, blocks, token_level)
        out = flex_block_sparse_attention(q, k, v, pattern)
        assert relative_error(out, masked_dense_attention(q, k, v, pattern)) <= 1e-5


def test_cumulative_mass_keeps_the_smallest_prefix_reaching_the_threshold() -> None:
    """Masses 0.5, 0.3, 0.15, 0.05: tau 0.75 keeps the first two, 0.85 three, 1.0 all; min_keep applies."""
    scores = torch.tensor([[0.15, 0.5, 0.05, 0.3]])
    assert select_by_cumulative_mass(scores, 0.75).tolist() == [[False, True, False, True]]
    assert select_by_cumulative_mass(scores, 0.85).tolist() == [[True, True, False, True]]
    assert select_by_cumulative_mass(scores, 1.0).all()
    assert select_by_cumulative_mass(scores, 0.1, min_keep=3).sum() == 3
    with pytest.raises(HarnessError, match=r"\(0, 1\]"):
        select_by_cumulative_mass(scores, 1.5)


def test_top_fraction_keeps_the_largest_entries() -> None:
    """A quarter of 8 entries keeps the 2 largest; a tiny fraction still keeps one."""
    scores = torch.tensor([[1.0, 8.0, 3.0, 7.0, 2.0, 0.0, 5.0, 4.0]])
    assert select_top_fraction(scores, 0.25).nonzero()[:, 1].tolist() == [1, 3]
    assert select_top_fraction(scores, 0.01).sum() == 1


def test_cost_budget_keeps_the_best_entries_up_to_the_nearest_entry() -> None:
    """Half of 4 unit costs keeps the 2 best; a heavy best entry (3 of 6) alone fills half; inf ranks first;
    the budget is rounded to the nearest entry and never keeps nothing."""
    scores = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    assert select_by_cost_budget(scores, torch.ones(4), 0.5).tolist() == [[True, True, False, False]]
    heavy_first = torch.tensor([3.0, 1.0, 1.0, 1.0])
    assert select_by_cost_budget(scores, heavy_first, 0.5).tolist() == [[True, False, False, False]]
    first = torch.tensor([[1.0, 3.0, 2.0, float("inf")]])
    assert select_by_cost_budget(first, torch.ones(4), 0.25).tolist() == [[False, False, False, True]]
    assert select_by_cost_budget(scores, torch.ones(4), 0.3).sum() == 1  # 1.2 entries round to 1
    assert select_by_cost_budget(scores, torch.ones(4), 0.4).sum() == 2  # 1.6 round to 2
    assert select_by_cost_budget(scores, torch.ones(4), 0.01).sum() == 1
    with pytest.raises(HarnessError, match=r"\(0, 1\]"):
        select_by_cost_budget(scores, torch.ones(4), 0.0)


def test_permutation_round_trip_and_equivariance() -> None:
    """unpermute(permute(x)) == x; attention on permuted tokens, permuted back, equals attention."""
    q, k, v = (torch.randn(1, 2, 40, 8) for _ in range(3))
    order = torch.stack([torch.randperm(40), torch.randperm(40)])[None]
    assert torch.equal(unpermute_tokens(permute_tokens(q, order), order), q)
    kept = torch.ones(1, 2, 1, 1, dtype=torch.bool)
    pattern = BlockSparsePattern(kept, 40, 64)
    permuted = [permute_tokens(t, order) for t in (q, k, v)]
    out = unpermute_tokens(block_sparse_attention(*permuted, pattern, backend="masked"), order)
    assert relative_error(out, torch.nn.functional.scaled_dot_product_attention(q, k, v)) <= 1e-6


def test_bad_patterns_are_refused() -> None:
    """A table of the wrong shape, or full without a mask_mod, or an unknown backend: clear errors."""
    with pytest.raises(HarnessError, match="tile table"):
        BlockSparsePattern(torch.ones(1, 1, 3, 3, dtype=torch.bool), N, BLOCK)
    kept = random_tiles()
    with pytest.raises(HarnessError, match="together"):
        BlockSparsePattern(kept, N, BLOCK, full=kept)
    q = torch.randn(1, 2, N, 8)
    with pytest.raises(HarnessError, match="backend"):
        block_sparse_attention(q, q, q, BlockSparsePattern(kept, N, BLOCK), backend="triton")


def deferred_twin(pattern: BlockSparsePattern) -> tuple[BlockSparsePattern, list[int]]:
    """``pattern`` (block level, ``BLOCK`` tiles) with deferred tables (the same ones) and its tiles as variable
    blocks, and the list the build appends to each time it runs."""
    builds: list[int] = []

    def tables() -> TileTables:
        builds.append(1)
        return TileTables(pattern.kept, pattern.full, pattern.mask_mod)

    lengths = block_lengths(pattern.seq_len, BLOCK).expand(*pattern.kept.shape[:2], -1)
    variable = VariableBlocks(pattern.kept, lengths, lengths)
    return BlockSparsePattern(None, pattern.seq_len, BLOCK, variable=variable, tables=tables), builds


def test_deferred_tables_are_built_once_on_their_first_read_and_equal_the_given_ones() -> None:
    """Kind, (B, H) and the variable blocks are read without a build; the first table read builds them, once,
    and every table and density equals the pattern's given at once."""
    eager = BlockSparsePattern(random_tiles(), N, BLOCK)
    deferred, builds = deferred_twin(eager)
    assert deferred.kind == "variable" and deferred.batch_heads == (1, 2) and deferred.variable is not None
    assert not builds
    assert torch.equal(deferred.kept, eager.kept) and deferred.full is None and deferred.mask_mod is None
    assert deferred.density() == eager.density() and deferred.tile_density() == eager.tile_density()
    assert torch.equal(deferred.dense_mask(), eager.dense_mask())
    assert builds == [1]


def test_a_pattern_hashes_alike_before_and_after_its_tables_are_built() -> None:
    """Patterns hash and compare by identity, so building deferred tables (which replaces the builder held inside)
    leaves a pattern's hash, and its place in a set, as they were."""
    deferred, _ = deferred_twin(BlockSparsePattern(random_tiles(), N, BLOCK))
    before, seen = hash(deferred), {deferred}
    _ = deferred.kept
    assert hash(deferred) == before and deferred in seen


def test_deferred_tables_are_checked() -> None:
    """Deferred tables come instead of kept, full and mask_mod and with variable blocks; built, they are checked as
    given tables are, and must have the variable blocks' (B, H)."""
    kept = random_tiles()
    variable = deferred_twin(BlockSparsePattern(kept, N, BLOCK))[0].variable
    with pytest.raises(HarnessError, match="one of the two"):
        BlockSparsePattern(kept, N, BLOCK, variable=variable, tables=lambda: TileTables(kept))
    with pytest.raises(HarnessError, match="need the variable blocks"):
        BlockSparsePattern(None, N, BLOCK, tables=lambda: TileTables(kept))
    wrong_shape = BlockSparsePattern(None, N, BLOCK, variable=variable, tables=lambda: TileTables(kept[..., 1:]))
    with pytest.raises(HarnessError, match="tile table"):
        _ = wrong_shape.kept
    one_head = BlockSparsePattern(None, N, BLOCK, variable=variable, tables=lambda: TileTables(kept[:, :1]))
    with pytest.raises(HarnessError, match=r"variable blocks' are \(1, 2\)"):
        _ = one_head.kept


def test_mask_tables_are_the_tensors_themselves_in_eager_code() -> None:
    """No copy outside torch.compile (the copy is for Inductor: test_compile's Inductor test)."""
    kept, labels = torch.ones(1, 2, 4, 4, dtype=torch.bool), torch.arange(8).view(1, 1, 8)
    assert all(out is table for out, table in zip(mask_tables(kept, labels), (kept, labels), strict=True))


@pytest.mark.parametrize("table", [torch.rand(1, 2, 4, 4) > 0.5, torch.arange(24).view(2, 3, 4)[:, :, ::2]],
                         ids=["bool", "int-strided"])  # fmt: skip
def test_the_mask_table_op_passes_opcheck(table: torch.Tensor) -> None:
    """The op that stores a mask table under torch.compile: its schema, fake (shape, dtype, strides) and outputs."""
    torch.library.opcheck(torch.ops.attention_bench.mask_table.default, (table,))


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "head_shared", "order_shared", "with_grad"])
def test_permutations_are_gather_and_scatter_of_token_rows(layout: str) -> None:
    """In every layout the methods pass (and on whichever path: the Triton row copy where it runs, gather / scatter
    elsewhere), the permuted tokens are ``x[b, h, order[b, h, i]]`` by indexing and unpermuting puts each row back;
    with gradients they flow back to x."""
    batch, heads, tokens, dim = 2, 3, 50, 16
    x = {"transposed": torch.randn(batch, tokens, heads, dim).transpose(1, 2),
         "head_shared": torch.randn(batch, 1, tokens, dim).expand(batch, heads, tokens, dim)}.get(
        layout, torch.randn(batch, heads, tokens, dim))  # fmt: skip
    x.requires_grad_(layout == "with_grad")
    order = torch.stack([torch.stack([torch.randperm(tokens) for _ in range(heads)]) for _ in range(batch)])
    if layout == "order_shared":
        order = torch.randperm(tokens)[None, None]
    full = order.expand(batch, heads, tokens)
    permuted = permute_tokens(x, order)
    expected = torch.stack([torch.stack([x[b, h, full[b, h]] for h in range(heads)]) for b in range(batch)])
    assert torch.equal(permuted, expected)
    assert torch.equal(unpermute_tokens(permuted, order), x)
    if layout == "with_grad":
        unpermute_tokens(permuted, order).sum().backward()
        assert torch.equal(x.grad, torch.ones_like(x))
