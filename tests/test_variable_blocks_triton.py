"""The Triton variable-block attention (SVG2's clusters) against float64 attention under the blocks' token mask, and
its place among the block-sparse backends.

The kernel tests need Triton and either CUDA or the Triton interpreter on CPU tensors; elsewhere (CI) they skip.
On a CPU machine, with Triton (and numpy < 2.4) installed outside the project's environment::

    TRITON_INTERPRET=1 PYTHONPATH=.:<numpy < 2.4 site>:<triton site> python -m pytest \
        tests/test_variable_blocks_triton.py

The interpreter multiplies bf16 operands as raw integers, so there the kernel is checked in fp16; on CUDA in fp16
and bf16.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from numerics import relative_error
from triton_helpers import DEVICE, ON_CUDA
from triton_helpers import needs_kernel as triton_needs_kernel

from harness.errors import HarnessError
from methods.kernels import variable_blocks_triton as kernel
from methods.kernels.block_sparse import BlockSparsePattern, VariableBlocks, block_ids
from methods.kernels.sparse_backends import get_backend

needs_kernel = triton_needs_kernel(kernel)
#: The default, whole key tiles only, and gathered keys only, in the tiles this device runs.
CONFIGS = {
    "default": kernel.default_config(),
    "whole-tiles": kernel.default_config()._replace(sparse_below=0),
    "gathered": kernel.default_config()._replace(tiles=False, sparse_below=0),
}
DTYPES = (torch.float16, torch.bfloat16) if ON_CUDA else (torch.float16,)
#: Relative error of the kernel's output against float64 attention on the same (rounded) inputs.
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def block_sizes(batch: int, heads: int, tokens: int, blocks: int, empty: int | None) -> torch.Tensor:
    """``(B, H, blocks)`` random sizes summing to ``tokens``, block ``empty`` holding none (k-means leaves some)."""
    weights = torch.rand(batch, heads, blocks) + 0.2
    if empty is not None:
        weights[..., empty] = 0
    sizes = (weights / weights.sum(-1, keepdim=True) * tokens).long()
    sizes[..., 0] += tokens - sizes.sum(-1)
    return sizes.to(DEVICE)


def random_blocks(batch: int, heads: int, tokens: int, rows: int, cols: int, share: float = 0.4) -> VariableBlocks:
    """Random variable blocks: every query block keeps key block 0 and about ``share`` of the others."""
    kept = torch.rand(batch, heads, rows, cols) < share
    kept[..., 0] = True
    return VariableBlocks(kept.to(DEVICE), block_sizes(batch, heads, tokens, rows, 2 if rows > 2 else None),
                          block_sizes(batch, heads, tokens, cols, 1 if cols > 2 else None))  # fmt: skip


def float64_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blocks: VariableBlocks) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v in float64 over the blocks' token mask; rows that keep no key are 0."""
    mask = blocks.dense_mask()
    scores = (q.double() @ k.double().transpose(-2, -1)) / math.sqrt(q.shape[-1])
    weights = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1).nan_to_num(0.0)
    return weights @ v.double()


def inputs(shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    return tuple(torch.randn(*shape, dtype=dtype).to(DEVICE) for _ in range(3))


@needs_kernel
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("tokens", "dim", "rows", "cols"), [
    (100, 32, 5, 9),  # blocks of ~20 tokens: several tiles a block, partial last tiles
    (160, 64, 3, 40),  # many small key blocks: a key tile spans several of them
    (96, 24, 7, 7),  # a head dim that is not a power of two (padded columns)
])  # fmt: skip
def test_matches_float64_attention_under_the_blocks_mask(dtype: torch.dtype, tokens: int, dim: int, rows: int,
                                                          cols: int, config: kernel.Config) -> None:  # fmt: skip
    torch.manual_seed(tokens + dim)
    q, k, v = inputs((2, 2, tokens, dim), dtype)
    blocks = random_blocks(2, 2, tokens, rows, cols)
    out = kernel.variable_block_attention(q, k, v, blocks, config)
    assert out.shape == q.shape and out.dtype == dtype
    assert relative_error(out, float64_attention(q, k, v, blocks)) < TOLERANCE[dtype]


@needs_kernel
def test_blocks_shared_by_every_head_broadcast() -> None:
    """A ``(1, 1, R, C)`` table (and sizes) applies to every batch item and head."""
    torch.manual_seed(1)
    q, k, v = inputs((2, 3, 80, 32), torch.float16)
    shared = random_blocks(1, 1, 80, 4, 6)
    out = kernel.variable_block_attention(q, k, v, shared)
    expanded = VariableBlocks(shared.kept.expand(2, 3, -1, -1), shared.row_sizes.expand(2, 3, -1),
                              shared.col_sizes.expand(2, 3, -1))  # fmt: skip
    assert relative_error(out, float64_attention(q, k, v, expanded)) < TOLERANCE[torch.float16]


@needs_kernel
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("dim", [32, 20], ids=["descriptor-rows", "rows-of-40-bytes"])
def test_reads_strided_inputs_in_place(config: kernel.Config, dim: int) -> None:
    """q, k, v as ``(B, N, H, D)`` tensors seen as ``(B, H, N, D)`` (the layout a transformer's projection gives);
    with 20 columns a head starts 40 bytes after the previous one, off the copy engine's 16-byte grid, and key tiles
    load by pointers."""
    torch.manual_seed(2)
    q, k, v = (x.transpose(1, 2) for x in inputs((1, 64, 2, dim), torch.float16))
    blocks = random_blocks(1, 2, 64, 4, 5)
    out = kernel.variable_block_attention(q, k, v, blocks, config)
    assert relative_error(out, float64_attention(q, k, v, blocks)) < 2e-3


def listed_keys(kept: torch.Tensor, cols: torch.Tensor, tile: int, sparse_below: int,
                cap: int) -> tuple[list[list[tuple[int, int]]], list[list[int]]]:  # fmt: skip
    """:func:`_key_tiles`' lists from first principles: per query block, its whole tiles (index, bits of the kept
    columns) and its gathered key tokens, tiles scanned in order, sparse ones gathered until their keys so far
    exceed ``cap``."""
    tokens = int(cols.sum())
    tiles, gathered = [], []
    for row in kept.bool():
        token_kept = row.repeat_interleave(cols)
        whole, tokens_gathered, asked = [], [], 0
        for index in range(-(-tokens // tile)):
            columns = token_kept[tile * index : tile * (index + 1)].tolist()
            keys = [tile * index + c for c, kept_key in enumerate(columns) if kept_key]
            asked += len(keys) if len(keys) < sparse_below else 0
            if keys and len(keys) < sparse_below and asked <= cap:
                tokens_gathered += keys
            elif keys:
                whole.append((index, sum(1 << c for c, kept_key in enumerate(columns) if kept_key)))
        tiles.append(whole)
        gathered.append(tokens_gathered)
    return tiles, gathered


@needs_kernel
@pytest.mark.parametrize(("sparse_below", "cap", "chunk"), [
    (0, 40, 2), (6, 40, 2),
    (6, 4, 2),  # the first sparse tile is over the cap already
    (16, 7, 1),  # a tile gathered, the next one past the cap, at a chunk's edge: read whole
], ids=["whole", "sparse", "cap-at-once", "cap-crossed"])  # fmt: skip
def test_key_tiles_list_whole_tiles_and_gather_sparse_ones(sparse_below: int, cap: int, chunk: int) -> None:
    """:func:`_key_tiles` on blocks of 5, 20, 3 and 12 tokens (40 tokens, tiles of 16): per query block the tiles
    that hold a kept key, ascending; those with fewer than ``sparse_below`` kept keys have their tokens gathered
    while ``cap`` holds them, the others are listed whole with bit c set where token ``16 t + c`` is kept."""
    cols = torch.tensor([[5, 20, 3, 12]], device=DEVICE)
    kept = torch.tensor([[[1, 0, 0, 1], [0, 1, 0, 0], [0, 0, 1, 0]]], device=DEVICE, dtype=torch.uint8)
    labels = block_ids(cols, 40).to(torch.int32)
    lists = torch.full((3, 3), -1, device=DEVICE, dtype=torch.int32)
    bits = torch.zeros(3, 3, device=DEVICE, dtype=torch.int64)
    gathered = torch.full((3, cap), -1, device=DEVICE, dtype=torch.int32)
    counts, gathered_counts = (torch.empty(3, device=DEVICE, dtype=torch.int32) for _ in range(2))
    kernel._key_tiles[(3,)](labels, kept.view(3, 4), lists, bits, counts, gathered, gathered_counts, 3, 4, 40, 3,
                            cap, sparse_below, BLOCK_N=16, CHUNK=chunk)  # fmt: skip
    tiles, tokens = listed_keys(kept[0].cpu(), cols[0].cpu(), 16, sparse_below, cap)
    assert counts.tolist() == [len(whole) for whole in tiles]
    assert gathered_counts.tolist() == [len(keys) for keys in tokens]
    for row, (whole, keys) in enumerate(zip(tiles, tokens, strict=True)):
        assert list(zip(lists[row, : len(whole)].tolist(), bits[row, : len(whole)].tolist(), strict=True)) == whole
        assert gathered[row, : len(keys)].tolist() == keys


@needs_kernel
def test_sparse_tiles_past_the_gather_cap_are_read_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    """With room for 8 gathered keys per query block, the rest of its sparse tiles are read whole: the same
    attention."""
    monkeypatch.setattr(kernel, "GATHER_CAP", 8)
    torch.manual_seed(7)
    q, k, v = inputs((1, 2, 160, 32), torch.float16)
    blocks = random_blocks(1, 2, 160, 3, 40)
    config = kernel.default_config()._replace(sparse_below=kernel.default_config().block_n)
    assert (
        relative_error(kernel.variable_block_attention(q, k, v, blocks, config), float64_attention(q, k, v, blocks))
        < 2e-3
    )


@pytest.mark.parametrize("config", [
    kernel.Config(16, 16, 4, 1, tiles=True), kernel.Config(16, 16, 4, 1, True, True, 6),
    kernel.Config(32, 16, 4, 1, True, True, 16), kernel.Config(16, 32, 4, 1),
], ids=["whole", "sparse", "rows-32", "gathered"])  # fmt: skip
def test_computed_entries_count_listed_tiles_and_gathered_keys(
    config: kernel.Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Per query block, its row tiles times its whole tiles' columns and its gathered keys in whole tiles, from
    :func:`listed_keys` (the lists by first principles; a cap of 6 gathered keys crossed), summed over heads; the
    kept entries are its rows times its kept keys."""
    monkeypatch.setattr(kernel, "GATHER_CAP", 6)
    torch.manual_seed(3)
    blocks = random_blocks(1, 2, 90, 5, 9)
    computed = kept_entries = 0
    for h in range(2):
        rows, cols, kept = blocks.row_sizes[0, h].cpu(), blocks.col_sizes[0, h].cpu(), blocks.kept[0, h].cpu()
        tiles, gathered = listed_keys(kept, cols, config.block_n, config.sparse_below if config.tiles else 91, 6)
        for i, r in enumerate(rows.tolist()):
            keys = int(kept[i].repeat_interleave(cols).sum())
            whole_columns = len(tiles[i]) * config.block_n if config.tiles else 0
            gathered_keys = len(gathered[i]) if config.tiles else keys
            columns = whole_columns + -(-gathered_keys // config.block_n) * config.block_n
            computed += -(-r // config.block_m) * config.block_m * columns
            kept_entries += r * keys
    assert kernel.computed_entries(blocks, 90, config) == (computed, kept_entries)


def test_computed_entries_count_every_pair_of_a_shared_table() -> None:
    """A table shared by the heads (kept with batch and head axes of 1) counts each head with its own sizes; blocks
    shared entirely count once per pair of the call's ``batch`` x ``heads``; per-head key sizes alone broadcast the
    rest."""
    torch.manual_seed(4)
    blocks = random_blocks(1, 3, 64, 4, 6)
    shared_kept = replace(blocks, kept=blocks.kept[:, :1])
    config = kernel.Config(16, 16, 4, 1, tiles=True)
    per_head = [
        kernel.computed_entries(replace(shared_kept, row_sizes=blocks.row_sizes[:, h : h + 1],
                                        col_sizes=blocks.col_sizes[:, h : h + 1]), 64, config)
        for h in range(3)
    ]  # fmt: skip
    assert kernel.computed_entries(shared_kept, 64, config) == tuple(map(sum, zip(*per_head, strict=True)))
    one_pair = replace(blocks, kept=blocks.kept[:, :1], row_sizes=blocks.row_sizes[:, :1],
                       col_sizes=blocks.col_sizes[:, :1])  # fmt: skip
    computed, kept = kernel.computed_entries(one_pair, 64, config)
    assert kernel.computed_entries(one_pair, 64, config, batch=2, heads=3) == (6 * computed, 6 * kept)
    per_key_sizes = [kernel.computed_entries(replace(one_pair, col_sizes=blocks.col_sizes[:, h : h + 1]), 64, config)
                     for h in range(3)]  # fmt: skip
    assert kernel.computed_entries(replace(one_pair, col_sizes=blocks.col_sizes), 64, config) == tuple(
        map(sum, zip(*per_key_sizes, strict=True))
    )  # only the key sizes per head: the others broadcast


@pytest.mark.parametrize(("config", "message"), [
    (kernel.Config(64, 128, 4, 3, tiles=True), "64x128x4x3t: key tiles take BLOCK_N <= 64"),
    (kernel.Config(64, 64, 4, 3, sparse_below=40), "64x64x4x3: sparse_below 40 needs whole key tiles"),
], ids=["wider-than-an-int64", "sparse-below-without-tiles"])  # fmt: skip
def test_a_configuration_the_kernel_cannot_run_is_refused(config: kernel.Config, message: str) -> None:
    q = torch.randn(1, 1, 8, 16, dtype=torch.float16)
    blocks = VariableBlocks(torch.ones(1, 1, 1, 1, dtype=torch.bool), torch.tensor([[[8]]]), torch.tensor([[[8]]]))
    with pytest.raises(HarnessError, match=message):
        kernel.variable_block_attention(q, q, q, blocks, config)


@needs_kernel
def test_a_query_block_that_keeps_no_key_gets_zeros() -> None:
    torch.manual_seed(3)
    q, k, v = inputs((1, 1, 48, 16), torch.float16)
    blocks = random_blocks(1, 1, 48, 3, 4)
    blocks.kept[..., 1, :] = False
    out = kernel.variable_block_attention(q, k, v, blocks)
    start, end = int(blocks.row_sizes[0, 0, 0]), int(blocks.row_sizes[0, 0, :2].sum())
    assert torch.equal(out[0, 0, start:end], torch.zeros_like(out[0, 0, start:end]))
    assert relative_error(out, float64_attention(q, k, v, blocks)) < TOLERANCE[torch.float16]


def test_backend_takes_variable_blocks_only() -> None:
    """Registered as ``triton-variable``: forward only, fp16/bf16 on CUDA, refusing tiles and token-level patterns
    with the reason."""
    backend = get_backend("triton-variable")
    assert not backend.differentiable
    assert backend.devices == ("cuda",)
    tiles = BlockSparsePattern(torch.ones(1, 1, 2, 2, dtype=torch.bool), 64, 32)
    assert "variable-size blocks" in (backend.refusal(tiles) or "")
    blocks = random_blocks(1, 1, 64, 2, 2)
    variable = BlockSparsePattern(torch.ones(1, 1, 2, 2, dtype=torch.bool), 64, 32, variable=blocks)
    assert backend.refusal(variable) is None


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k_rows", [False, True])
def test_both_key_tile_loads_match_float64(dtype: torch.dtype, k_rows: bool) -> None:
    """Gathered key tiles loaded as rows and transposed (``k_rows``), or transposed by their addresses: the same
    attention."""
    torch.manual_seed(4)
    q, k, v = inputs((1, 2, 120, 32), dtype)
    blocks = random_blocks(1, 2, 120, 4, 12)
    out = kernel.variable_block_attention(q, k, v, blocks, CONFIGS["gathered"]._replace(k_rows=k_rows))
    assert relative_error(out, float64_attention(q, k, v, blocks)) < TOLERANCE[dtype]


@needs_kernel
def test_op_passes_opcheck() -> None:
    """The op's schema (the output aliases no input), fake output and AOT dispatch agree with the kernel."""
    torch.manual_seed(6)
    q, k, v = inputs((1, 2, 64, 16), torch.float16)
    blocks = random_blocks(1, 2, 64, 3, 5)
    args = (q, k, v, blocks.kept, blocks.row_sizes, blocks.col_sizes, *kernel.default_config())
    torch.library.opcheck(kernel.variable_block_attention_op, args)


def test_a_head_dim_over_128_is_refused_with_its_reason() -> None:
    q = torch.randn(1, 1, 8, 160, dtype=torch.float16)
    blocks = VariableBlocks(torch.ones(1, 1, 1, 1, dtype=torch.bool), torch.tensor([[[8]]]), torch.tensor([[[8]]]))
    with pytest.raises(HarnessError, match="triton-variable takes head_dim <= 128, got 160"):
        kernel.variable_block_attention(q, q, q, blocks)


@torch.library.custom_op("bench_test::variable_blocks_masked", mutates_args=())
def _masked_stand_in(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kept: torch.Tensor, row_sizes: torch.Tensor,
                     col_sizes: torch.Tensor, block_m: int, block_n: int, num_warps: int, num_stages: int,
                     k_rows: bool, tiles: bool, sparse_below: int) -> torch.Tensor:  # fmt: skip
    """The kernel op's contract computed by masked dense SDPA on the CPU (no Triton here)."""
    mask = VariableBlocks(kept, row_sizes, col_sizes).dense_mask()
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@_masked_stand_in.register_fake
def _(q: torch.Tensor, *args: object) -> torch.Tensor:
    return torch.empty_like(q)


def test_auto_on_variable_blocks_compiles_in_one_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    """``auto`` choosing triton-variable inside a compiled graph (as svg2's forward does on an H200) traces whole: its
    check that the package imports is read as a constant (the import itself broke an H200 forward into 13 graphs),
    and the kernel is one opaque op. The output is masked dense's."""
    from torch._dynamo.testing import CompileCounter

    from methods.kernels import sparse_backends

    monkeypatch.setattr(sparse_backends, "auto_backend", lambda device, dtype=None, head_dim=None: "flex-tuned")
    variable = sparse_backends.REGISTRY["triton-variable"]
    monkeypatch.setitem(sparse_backends.REGISTRY, "triton-variable",
                        replace(variable, devices=("cpu",), dtypes=(torch.float32,), package="torch"))  # fmt: skip
    monkeypatch.setattr(kernel, "variable_block_attention_op", _masked_stand_in)
    torch.manual_seed(5)
    q, k, v = (torch.randn(1, 2, 64, 16) for _ in range(3))
    blocks = random_blocks(1, 2, 64, 3, 4)
    blocks = VariableBlocks(blocks.kept.cpu(), blocks.row_sizes.cpu(), blocks.col_sizes.cpu())
    pattern = BlockSparsePattern(torch.ones(1, 2, 1, 1, dtype=torch.bool), 64, 64, variable=blocks)
    assert sparse_backends.auto_choice(q, k, v, pattern) == "triton-variable"
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(lambda q, k, v: sparse_backends.block_sparse_attention(q, k, v, pattern), backend=counter,
                             fullgraph=True)  # fmt: skip
    out = compiled(q, k, v)
    assert counter.frame_count == 1
    torch.testing.assert_close(out, float64_attention(q, k, v, blocks).float(), rtol=1e-4, atol=1e-4)


def test_the_gpu_script_reads_configurations_and_refuses_malformed_ones() -> None:
    from harness.benchmarks.variable_blocks_gpu import parse_configs

    assert parse_configs("64x32x4x3,64x64x4x3r,64x64x4x2t,64x64x4x3rt40") == [
        kernel.Config(64, 32, 4, 3),
        kernel.Config(64, 64, 4, 3, True),
        kernel.Config(64, 64, 4, 2, tiles=True),
        kernel.Config(64, 64, 4, 3, True, True, 40),
    ]
    assert kernel.Config(64, 64, 4, 3, True).name == "64x64x4x3r"
    assert kernel.Config(64, 64, 4, 2, tiles=True).name == "64x64x4x2t"
    assert kernel.Config(64, 64, 4, 3, True, True, 40).name == "64x64x4x3rt40"
    with pytest.raises(HarnessError, match="'64x64x4' is not BLOCK_MxBLOCK_NxWARPSxSTAGES"):
        parse_configs("64x64x4")


@needs_kernel
def test_the_gpu_script_checks_then_times_every_configuration(tmp_path: Path) -> None:
    """The GPU script at wan-tiny's shape on the interpreter (CUDA: the real one): each configuration is checked
    against masked dense, then timed against its ideal; the JSON is written."""
    import json

    from harness.benchmarks import variable_blocks_gpu as script

    device = "cuda" if ON_CUDA else "cpu"
    script.main(["--out", str(tmp_path), "--device", device, "--models", "wan-tiny", "--densities", "0.3",
                 "--configs", "16x16x4x1,16x16x4x1r,16x16x4x1rt8", "--full-blocks", "16"])  # fmt: skip
    record = json.loads((tmp_path / "variable_blocks.json").read_text())
    (point,) = record["models"]["wan-tiny"]["points"]
    for name in ("triton-variable 16x16x4x1", "triton-variable 16x16x4x1r", "triton-variable 16x16x4x1rt8"):
        result = point["results"][name]
        assert result["passed"] and result["ms"] > 0
        # its time over the ideal split into the work over the kept entries and the time per computed entry
        assert result["computed_entries"] >= result["kept_entries"] > 0
        assert result["of_ideal"] == pytest.approx(result["work_over_kept"] * result["per_computed_entry"])
    full = record["models"]["wan-tiny"]["full_blocks"]
    assert full["block"] == 16
    for name in ("16x16x4x1", "16x16x4x1r", "16x16x4x1rt8"):  # every block kept: checked against dense, then timed
        assert full["results"][name]["passed"] and full["results"][name]["of_dense"] > 0
        assert full["results"][name]["block"] == 16


@needs_kernel
def test_the_full_block_point_never_runs_a_half_masked_tile(tmp_path: Path) -> None:
    """A configuration whose BLOCK_M exceeds --full-blocks runs blocks of its BLOCK_M (a 32-row tile over 16-token
    blocks would compute every row twice), still checked against dense attention."""
    from harness.benchmarks import variable_blocks_gpu as script

    q, k, v = (torch.randn(1, 2, 100, 16, device=DEVICE, dtype=torch.float16) for _ in range(3))
    config = kernel.Config(32, 16, 4, 1)
    full = script.full_point(q, k, v, [config], 1.0, 16)
    assert full["results"][config.name]["block"] == 32 and full["results"][config.name]["passed"]
