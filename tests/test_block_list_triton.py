"""The Triton block-list attention (triton-blocks: SLA's critical blocks, any block-level pattern of square tiles)
against float64 attention under the pattern's token mask, its lists, and its place among the block-sparse backends.

The kernel tests need Triton and either CUDA or the Triton interpreter on CPU tensors; elsewhere (CI) they skip.
On a CPU machine, with Triton (and numpy < 2.4) installed outside the project's environment::

    TRITON_INTERPRET=1 PYTHONPATH=.:<numpy < 2.4 site>:<triton site> python -m pytest tests/test_block_list_triton.py

The interpreter multiplies bf16 operands as raw integers, so there the kernel is checked in fp16; on CUDA in fp16
and bf16.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from numerics import relative_error
from triton_helpers import DEVICE, ON_CUDA
from triton_helpers import needs_kernel as triton_needs_kernel

from harness.errors import HarnessError
from methods.kernels import block_list_triton as kernel
from methods.kernels import descriptor_aligned, sparse_backends
from methods.kernels.block_sparse import BlockSparsePattern, num_blocks
from methods.sla import classify_blocks, critical_pattern

needs_kernel = triton_needs_kernel(kernel)
DTYPES = (torch.float16, torch.bfloat16) if ON_CUDA else (torch.float16,)
#: Relative error of the kernel's output against float64 attention on the same (rounded) inputs.
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
#: Every way the kernel loads key blocks: one per step by pointers or by tensor descriptors (with and without warp
#: specialisation: the interpreter ignores the schedule, but the specialised program's unmasked whole blocks, second
#: launch for the ragged block and descriptor reads of q and writes of the output run there too), two per step.
LOADS = (
    kernel.Config(1, 4, 2),
    kernel.Config(1, 4, 2, True),
    kernel.Config(1, 4, 2, True, True),
    kernel.Config(2, 4, 2),
)


def random_tiles(batch: int, heads: int, tokens: int, block: int, share: float = 0.4) -> torch.Tensor:
    """``(B, H, R, R)`` random kept tiles; every query block keeps key block 0."""
    blocks = num_blocks(tokens, block)
    kept = torch.rand(batch, heads, blocks, blocks) < share
    kept[..., 0] = True
    return kept.to(DEVICE)


def float64_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: BlockSparsePattern) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v in float64 over the pattern's token mask; rows that keep no key are 0."""
    scores = (q.double() @ k.double().transpose(-2, -1)) / math.sqrt(q.shape[-1])
    weights = scores.masked_fill(~pattern.dense_mask(), float("-inf")).softmax(dim=-1).nan_to_num(0.0)
    return weights @ v.double()


def inputs(shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    return tuple(torch.randn(*shape, dtype=dtype).to(DEVICE) for _ in range(3))


def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kept: torch.Tensor, block: int,
        config: kernel.Config | None = None) -> torch.Tensor:  # fmt: skip
    return kernel.block_list_attention(q, k, v, *kernel.block_lists(kept), block, config)


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", LOADS, ids=lambda c: c.name)
@pytest.mark.parametrize(("tokens", "dim", "block"), [
    (100, 32, 16),  # a ragged last block (4 of 16 tokens)
    (96, 24, 32),  # a head dim that is not a power of two (padded columns)
    (130, 64, 64),  # a last block of 2 tokens
])  # fmt: skip
def test_matches_float64_attention_under_the_tiles(dtype: torch.dtype, config: kernel.Config, tokens: int, dim: int,
                                                    block: int) -> None:  # fmt: skip
    torch.manual_seed(tokens + dim)
    q, k, v = inputs((2, 2, tokens, dim), dtype)
    kept = random_tiles(2, 2, tokens, block)
    out = run(q, k, v, kept, block, config)
    assert out.shape == q.shape and out.dtype == dtype
    assert relative_error(out, float64_attention(q, k, v, BlockSparsePattern(kept, tokens, block))) < TOLERANCE[dtype]


@needs_kernel
def test_a_table_shared_by_every_head_broadcasts() -> None:
    """``(1, 1, R, L)`` lists and ``(1, 1, R)`` counts apply to every batch item and head."""
    torch.manual_seed(1)
    q, k, v = inputs((2, 3, 86, 32), torch.float16)  # a ragged last block: the split path reads the shared table too
    shared = random_tiles(1, 1, 86, 16)
    expected = float64_attention(q, k, v, BlockSparsePattern(shared.expand(2, 3, -1, -1), 86, 16))
    assert relative_error(run(q, k, v, shared, 16), expected) < TOLERANCE[torch.float16]


@needs_kernel
@pytest.mark.parametrize("config", LOADS, ids=lambda c: c.name)
def test_reads_strided_inputs_in_place(config: kernel.Config) -> None:
    """q, k, v as ``(B, N, H, D)`` tensors seen as ``(B, H, N, D)`` (the layout a transformer's projection gives)."""
    torch.manual_seed(2)
    q, k, v = (x.transpose(1, 2) for x in inputs((1, 70, 2, 32), torch.float16))  # ragged: the split path too
    kept = random_tiles(1, 2, 70, 16)
    expected = float64_attention(q, k, v, BlockSparsePattern(kept, 70, 16))
    assert relative_error(run(q, k, v, kept, 16, config), expected) < TOLERANCE[torch.float16]


@needs_kernel
@pytest.mark.parametrize("shared", [(1, 3), (2, 1)], ids=["per-head", "per-item"])
def test_a_table_shared_over_one_axis_broadcasts(shared: tuple[int, int]) -> None:
    torch.manual_seed(8)
    q, k, v = inputs((2, 3, 70, 16), torch.float16)
    kept = random_tiles(*shared, 70, 16)
    expected = float64_attention(q, k, v, BlockSparsePattern(kept.expand(2, 3, -1, -1), 70, 16))
    assert relative_error(run(q, k, v, kept, 16), expected) < TOLERANCE[torch.float16]


@needs_kernel
def test_inputs_the_copy_engine_cannot_read_run_on_pointer_loads() -> None:
    """Heads 200 bytes apart (fp16, D = 100, seen from a (B, N, H, D) tensor): a descriptor made at every other head
    would start misaligned, so descriptor configurations load those k and v by pointers, with the same output."""
    torch.manual_seed(9)
    q, k, v = (x.transpose(1, 2) for x in inputs((1, 64, 2, 100), torch.float16))
    assert not descriptor_aligned(k)
    kept = random_tiles(1, 2, 64, 16)
    expected = float64_attention(q, k, v, BlockSparsePattern(kept, 64, 16))
    assert relative_error(run(q, k, v, kept, 16, kernel.Config(1, 4, 2, True)), expected) < TOLERANCE[torch.float16]


@needs_kernel
def test_an_output_whose_rows_the_copy_engine_cannot_write_runs_on_pointers() -> None:
    """q, k, v sliced to D = 20 from rows of 32 (fp16): their descriptors would be aligned, but the output's 40-byte
    rows are not (an H200 gave a relative error of 1.4e3 before the check), so the call runs unspecialised: k and v
    through descriptors, q and the output by pointers, every step masked."""
    torch.manual_seed(12)
    q, k, v = (x[..., :20] for x in inputs((1, 2, 70, 32), torch.float16))
    assert all(descriptor_aligned(x) for x in (q, k, v))
    kept = random_tiles(1, 2, 70, 16)
    expected = float64_attention(q, k, v, BlockSparsePattern(kept, 70, 16))
    assert relative_error(run(q, k, v, kept, 16, kernel.Config(1, 4, 2, True, True)), expected) < 2e-3


@needs_kernel
@pytest.mark.parametrize("config", LOADS[:3], ids=lambda c: c.name)
def test_a_count_past_the_lists_length_reads_the_list_only(config: kernel.Config) -> None:
    """Lists cut to L entries with counts above L: each row reads its own L entries, never the next row's."""
    torch.manual_seed(10)
    q, k, v = inputs((1, 2, 80, 16), torch.float16)
    kept = torch.zeros(1, 2, 5, 5, dtype=torch.bool, device=DEVICE)
    kept[..., :2] = True  # every row keeps blocks 0 and 1: the lists' first two entries
    lists, counts = kernel.block_lists(kept)
    out = kernel.block_list_attention(q, k, v, lists[..., :2].contiguous(), counts + 3, 16, config)
    expected = float64_attention(q, k, v, BlockSparsePattern(kept, 80, 16))
    assert relative_error(out, expected) < TOLERANCE[torch.float16]


@needs_kernel
@pytest.mark.parametrize("block", kernel.BLOCK_SIZES)
def test_each_shipped_configuration_at_head_dim_128_over_a_ragged_sequence(block: int) -> None:
    """The configuration each block size runs by default (its warps, stages and schedule: on an H200 a warp-specialised
    schedule once read the loop's initial state after the loop at exactly this head dim, not at the small ones
    above), on a sequence whose last block holds 5 tokens."""
    torch.manual_seed(block)
    tokens = 3 * block + 5
    q, k, v = inputs((1, 2, tokens, 128), torch.float16)
    kept = random_tiles(1, 2, tokens, block, share=0.6)
    kept[..., -1] = True  # every row lists the ragged block
    out = run(q, k, v, kept, block)
    assert (
        relative_error(out, float64_attention(q, k, v, BlockSparsePattern(kept, tokens, block)))
        < TOLERANCE[torch.float16]
    )


@needs_kernel
@pytest.mark.parametrize("config", LOADS[:3], ids=lambda c: c.name)
def test_the_ragged_last_block_alone_or_beside_others(config: kernel.Config) -> None:
    """Under warp specialisation the sequence's ragged last block runs after the others, merged into their output: rows
    that keep only it, it and others, and not it all match (70 tokens in blocks of 16: the last holds 6)."""
    torch.manual_seed(11)
    q, k, v = inputs((1, 2, 70, 16), torch.float16)
    kept = torch.zeros(1, 2, 5, 5, dtype=torch.bool, device=DEVICE)
    kept[..., 0, 4] = True  # only the ragged block
    kept[..., 1, [0, 2, 4]] = True  # it and others
    kept[..., 2:, :2] = True  # not it
    out = run(q, k, v, kept, 16, config)
    assert relative_error(out, float64_attention(q, k, v, BlockSparsePattern(kept, 70, 16))) < TOLERANCE[torch.float16]


@needs_kernel
def test_a_query_block_that_keeps_no_key_gets_zeros() -> None:
    torch.manual_seed(3)
    q, k, v = inputs((1, 1, 50, 16), torch.float16)  # ragged: the split path leaves the empty row alone too
    kept = random_tiles(1, 1, 50, 16)
    kept[..., 1, :] = False
    out = run(q, k, v, kept, 16)
    assert torch.equal(out[0, 0, 16:32], torch.zeros_like(out[0, 0, 16:32]))
    assert relative_error(out, float64_attention(q, k, v, BlockSparsePattern(kept, 50, 16))) < TOLERANCE[torch.float16]


def test_warp_specialisation_runs_by_default_only_where_it_was_checked() -> None:
    """The 128-token default is warp-specialised on the Triton series and GPU it was checked on (3.6, sm_90), its
    unspecialised configuration elsewhere; other block sizes and CPU calls (the interpreter) as listed."""
    cuda = torch.device("cuda")
    assert kernel.default_config(128, cuda, "3.6.0", (9, 0)) == kernel.BEST_CONFIGS[128]
    assert kernel.BEST_CONFIGS[128].ws
    for version, capability in (("3.7.0", (9, 0)), ("3.6.0", (10, 0)), ("3.6.0", (8, 0)), ("3.60.1", (9, 0))):
        assert kernel.default_config(128, cuda, version, capability) == kernel.UNSPECIALISED[128]
    assert kernel.default_config(64, cuda, "3.7.0", (10, 0)) == kernel.BEST_CONFIGS[64]
    assert kernel.default_config(128, torch.device("cpu")) == kernel.BEST_CONFIGS[128]


def test_block_lists_list_each_rows_kept_blocks_in_ascending_order() -> None:
    kept = torch.tensor([[[[True, False, True, True], [False, False, False, False], [False, True, False, False]]]])
    lists, counts = kernel.block_lists(kept)
    assert lists.dtype == counts.dtype == torch.int32
    assert counts.tolist() == [[[3, 0, 1]]]
    assert lists[0, 0, 0, :3].tolist() == [0, 2, 3] and lists[0, 0, 2, :1].tolist() == [1]


def test_slas_critical_lists_are_its_critical_blocks_in_ascending_order() -> None:
    """Listed from the ranking (no sort of the table): the same blocks as the critical table, row by row; the
    classes are classify_blocks'."""
    torch.manual_seed(4)
    q, k = torch.randn(1, 2, 640, 16), torch.randn(1, 2, 640, 16)
    pattern, marginal = critical_pattern(q, k, 16, 0.2, 0.1)
    critical, expected_marginal = classify_blocks(q, k, 16, 0.2, 0.1)
    assert torch.equal(pattern.kept, critical) and torch.equal(marginal, expected_marginal)
    lists, counts = kernel.pattern_lists(pattern)
    table_lists, table_counts = kernel.block_lists(critical)
    assert torch.equal(counts, table_counts)
    assert torch.equal(lists, table_lists[..., : lists.shape[-1]])


def test_pattern_lists_build_once_from_an_attached_builder_or_the_table() -> None:
    kept = torch.tensor([[[[True, False], [True, True]]]])
    built = []

    def build() -> tuple[torch.Tensor, torch.Tensor]:
        built.append(1)
        return kernel.block_lists(kept)

    attached = BlockSparsePattern(kept, 32, 16)
    kernel.attach_lists(attached, build)
    assert not built  # nothing is listed before a backend asks
    first, second = kernel.pattern_lists(attached), kernel.pattern_lists(attached)
    assert built == [1] and first is second
    plain = BlockSparsePattern(kept, 32, 16)
    assert torch.equal(kernel.pattern_lists(plain)[1], kernel.block_lists(kept)[1])


@needs_kernel
def test_op_passes_opcheck() -> None:
    """The op's schema (the output aliases no input), fake output and AOT dispatch agree with the kernel."""
    torch.manual_seed(6)
    q, k, v = inputs((1, 2, 64, 16), torch.float16)
    lists, counts = kernel.block_lists(random_tiles(1, 2, 64, 16))
    torch.library.opcheck(kernel.block_list_attention_op, (q, k, v, lists, counts, 16, *kernel.Config(1, 4, 2)))
    q, k, v = inputs((1, 2, 70, 16), torch.float16)  # the split path: two launches and the log-sum-exp buffer
    lists, counts = kernel.block_lists(random_tiles(1, 2, 70, 16))
    torch.library.opcheck(kernel.block_list_attention_op,
                          (q, k, v, lists, counts, 16, *kernel.Config(1, 4, 2, True, True)))  # fmt: skip


@pytest.mark.parametrize(("shape", "block", "change", "message"), [
    ((1, 1, 32, 160), 16, None, "triton-blocks takes head_dim <= 128, got 160"),
    ((1, 1, 48, 16), 24, None, "triton-blocks takes blocks of 16, 32, 64, 128 tokens, got 24"),
    ((1, 1, 40, 16), 16, None, "block lists for 2 query blocks, but 40 tokens in blocks of 16 make 3"),
    ((1, 1, 32, 16), 16, "int64", "triton-blocks takes int32 lists and counts, got torch.int64 and torch.int32"),
    ((1, 2, 32, 16), 16, "three heads", r"block lists \(1, 3, 2, 2\) and counts \(1, 3, 2\) do not fit q"),
    ((1, 1, 32, 16), 16, "pairs with descriptors", "configuration 2x4x2t: descriptor loads take one key block a step"),
    ((1, 1, 32, 16), 16, "specialised pointer loads", "configuration 1x4x2w: warp specialisation takes descriptor"),
    ((1, 1, 32, 16), 16, "empty lists", "block lists of length 0"),
])  # fmt: skip
def test_bad_calls_are_refused_with_their_reason(shape: tuple[int, ...], block: int, change: str | None,
                                                 message: str) -> None:  # fmt: skip
    q = torch.randn(*shape, dtype=torch.float16)
    lists, counts = kernel.block_lists(torch.ones(1, 3 if change == "three heads" else 1, 2, 2, dtype=torch.bool))
    lists = lists.long() if change == "int64" else lists[..., :0] if change == "empty lists" else lists
    configs = {"pairs with descriptors": kernel.Config(2, 4, 2, True),
               "specialised pointer loads": kernel.Config(1, 4, 2, False, True)}  # fmt: skip
    config = configs.get(change)
    with pytest.raises(HarnessError, match=message):
        kernel.block_list_attention(q, q, q, lists, counts, block, config)


def test_backend_takes_square_tiles_of_the_kernels_sizes_only() -> None:
    """Registered as ``triton-blocks``: forward only, fp16/bf16 on CUDA; it refuses variable blocks, token-level
    patterns and unequal or unsupported tiles with the reason."""
    backend = sparse_backends.get_backend("triton-blocks")
    assert not backend.differentiable and backend.devices == ("cuda",)
    assert backend.refusal(BlockSparsePattern(torch.ones(1, 1, 2, 2, dtype=torch.bool), 64, 32)) is None
    uneven = BlockSparsePattern(torch.ones(1, 1, 2, 1, dtype=torch.bool), 64, (32, 64))
    assert "query and key blocks differ" in (backend.refusal(uneven) or "")
    band = BlockSparsePattern(torch.ones(1, 1, 2, 2, dtype=torch.bool), 64, 32,
                              full=torch.zeros(1, 1, 2, 2, dtype=torch.bool),
                              mask_mod=lambda b, h, q, k: q >= k)  # fmt: skip
    assert "whole tiles only" in (backend.refusal(band) or "")


STAND_IN_CALLS: list[int] = []


@torch.library.custom_op("bench_test::block_lists_masked", mutates_args=())
def _masked_stand_in(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lists: torch.Tensor, counts: torch.Tensor,
                     block: int, pairs: int, num_warps: int, num_stages: int, tma: bool,
                     ws: bool) -> torch.Tensor:  # fmt: skip
    """The kernel op's contract computed by masked dense SDPA on the CPU (no Triton here); counts its calls."""
    STAND_IN_CALLS.append(block)
    blocks = lists.shape[-2]
    listed = torch.arange(lists.shape[-1]) < counts[..., None]
    kept = torch.zeros(*lists.shape[:-1], blocks, dtype=torch.bool).scatter(-1, lists.long(), listed)
    mask = BlockSparsePattern(kept, q.shape[-2], block).dense_mask()
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@_masked_stand_in.register_fake
def _(q: torch.Tensor, *args: object) -> torch.Tensor:
    return torch.empty_like(q)


@pytest.fixture
def triton_blocks_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """triton-blocks registered for CPU fp32 calls, its op computed by :func:`_masked_stand_in` (no Triton here)."""
    blocks = sparse_backends.REGISTRY["triton-blocks"]
    monkeypatch.setitem(sparse_backends.REGISTRY, "triton-blocks",
                        replace(blocks, devices=("cpu",), dtypes=(torch.float32,), package="torch"))  # fmt: skip
    monkeypatch.setattr(kernel, "block_list_attention_op", _masked_stand_in)


@pytest.mark.usefixtures("triton_blocks_on_cpu")
def test_a_pattern_reused_across_compiled_calls_compiles_once() -> None:
    """Radial's kind of pattern, made once and run every call: the compiled graph builds its lists itself and stores
    nothing in the pattern, so the second call runs the same graph (no recompile)."""
    from torch._dynamo.testing import CompileCounter

    torch.manual_seed(11)
    q, k, v = (torch.randn(1, 2, 64, 16) for _ in range(3))
    pattern = BlockSparsePattern(random_tiles(1, 1, 64, 16).cpu(), 64, 16)
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(lambda q, k, v: sparse_backends.block_sparse_attention(q, k, v, pattern, "triton-blocks"),
                             backend=counter, fullgraph=True)  # fmt: skip
    first, second = compiled(q, k, v), compiled(q, k, v)
    assert counter.frame_count == 1 and torch.equal(first, second)
    assert kernel.LISTS_KEY not in pattern.backend_plans


@pytest.mark.usefixtures("triton_blocks_on_cpu")
def test_sla_on_auto_compiles_in_one_graph_on_triton_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """SLA's critical blocks as ``auto`` runs them on an H200 (triton-blocks, its lists from SLA's ranking) trace
    whole under ``torch.compile(fullgraph=True)``: the kernel is one opaque op, the lists' builder runs in the graph.
    The output is the masked path's."""
    from torch._dynamo.testing import CompileCounter

    from methods import AttentionContext, TokenGrid
    from methods.kernels import sla_linear_triton
    from methods.sla import SlaProjections, SparseLinearAttention

    monkeypatch.setattr(sparse_backends, "auto_backend", lambda device, dtype=None, head_dim=None: "flex-tuned")
    monkeypatch.setenv(sla_linear_triton.BACKEND_ENV, "torch")
    torch.manual_seed(7)
    q, k, v = (torch.randn(1, 2, 320, 16) for _ in range(3))
    ctx = AttentionContext(layer=0, num_layers=1, step=1, num_steps=2, timestep=0.5, cfg_branch="cond",
                           grid=TokenGrid(1, 1, 320))  # fmt: skip
    fast, reference = SparseLinearAttention(block_size=16), SparseLinearAttention(block_size=16, backend="masked")
    state = SlaProjections(1, 16).requires_grad_(False)
    torch.nn.init.constant_(state.proj[0].weight, 0.01)  # a linear branch that counts
    for method in (fast, reference):
        method.attach(state, trained=True)
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(lambda q, k, v: fast.attend(q, k, v, ctx)[0], backend=counter, fullgraph=True)
    STAND_IN_CALLS.clear()
    out = compiled(q, k, v)
    assert counter.frame_count == 1
    assert STAND_IN_CALLS == [16]  # the critical blocks ran on triton-blocks' op
    assert torch.allclose(out, reference.attend(q, k, v, ctx)[0], atol=1e-5)


def test_the_sweeps_check_fails_a_fault_confined_to_a_few_rows() -> None:
    """harness.benchmarks.block_list_gpu's check: one wrong row in 16,384 stays under the whole output's tolerance
    but fails on its worst row; NaN and a raised launch fail."""
    from harness.benchmarks import block_list_gpu as sweep

    torch.manual_seed(13)
    ref = torch.randn(1, 2, 8192, 16)
    out = ref + 1e-3 * torch.randn_like(ref)
    assert sweep.passed({"relative": sweep.relative(out, ref), "worst_row": sweep.worst_row(out, ref)})
    out[0, 1, 100] = -ref[0, 1, 100]  # that row's error is 2
    error = {"relative": sweep.relative(out, ref), "worst_row": sweep.worst_row(out, ref)}
    assert error["relative"] < sweep.BF16_RELATIVE_TOLERANCE and error["worst_row"] == pytest.approx(2.0, rel=1e-2)
    assert not sweep.passed(error)
    assert not sweep.passed({"relative": float("nan"), "worst_row": float("nan")})
    assert not sweep.passed({"raised": "OutOfResources: shared memory"})


def test_the_sweep_times_what_passed_and_stops_where_a_default_failed() -> None:
    """A warp-specialised 64-token configuration failing (as on Triton 3.6) leaves the 128-token one of the same name,
    the 128-token default, timed and the sweep running; the 128-token default failing stops it."""
    from harness.benchmarks import block_list_gpu as sweep

    good = {"relative": 2e-3, "worst_row": 8e-3}
    cpu = torch.device("cpu")
    errors = {name: {"flex": good, **{c.name: good for c in sweep.CONFIGS[size]}}
              for name, size in sweep.PATTERN_BLOCKS.items()}  # fmt: skip
    errors["tiles64"]["1x4x2tw"] = {"relative": float("nan"), "worst_row": float("nan")}
    failed, defaults_failed, configs = sweep.verdict(errors, cpu)
    assert list(failed) == ["tiles64_1x4x2tw"] and not defaults_failed
    assert "1x4x2tw" not in [c.name for c in configs[64]] and "1x4x2tw" in [c.name for c in configs[128]]
    errors["tiles128"]["1x4x2tw"] = {"raised": "CompilationError"}
    assert sweep.verdict(errors, cpu)[1]
