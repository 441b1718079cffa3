"""The fused Triton scoring of XAttention against the torch path, and the dispatch between them.

The kernel tests need Triton and either CUDA or the Triton interpreter on CPU tensors; elsewhere (CI) they
skip. To run them on a CPU machine, with Triton (and numpy < 2.4, which Triton 3.6's interpreter needs: it
converts loop bounds with ``int()`` of a one-element array) installed outside the project's environment::

    TRITON_INTERPRET=1 PYTHONPATH=.:<numpy < 2.4 site>:<triton site> python -m pytest tests/test_xattn_scoring_triton.py

The interpreter multiplies bf16 operands as raw integers, so there the kernel is checked in fp16; on CUDA in
fp16 and bf16.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from numerics import relative_error
from triton_helpers import DEVICE, ON_CUDA
from triton_helpers import needs_kernel as triton_needs_kernel

from harness.errors import HarnessError
from methods.kernels import xattn_scoring_triton as fused
from methods.kernels.block_sparse import select_by_cumulative_mass
from methods.xattn import antidiagonal_block_scores, antidiagonal_block_scores_torch

needs_kernel = triton_needs_kernel(fused)
DTYPES = (torch.float16, torch.bfloat16) if ON_CUDA else (torch.float16,)
TOLERANCE = fused.MASS_TOLERANCE  # why 1e-5: see its comment


def reference(q: torch.Tensor, k: torch.Tensor, block: int, stride: int) -> torch.Tensor:
    """The torch path on the same values in float64 (its softmax runs in fp32)."""
    return antidiagonal_block_scores_torch(q.double(), k.double(), block, stride)


@pytest.fixture(params=fused.VARIANTS)
def variant(request: pytest.FixtureRequest) -> str:
    """Each kernel variant: both compute the same masses under the same contract."""
    return request.param


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("batch", "heads", "tokens", "dim", "block", "stride"),
    [(1, 2, 100, 32, 16, 8),  # R = 2 reduced rows per block, ragged last block, 8 blocks per tile
     (2, 2, 77, 16, 16, 4),  # batch 2, a reduced key made only of padding (77 + 3 padded tokens)
     (1, 2, 150, 24, 32, 8),  # head dim padded to 32 columns
     (1, 2, 130, 32, 32, 4),  # R = 8
     (1, 1, 300, 32, 128, 8),  # the paper's block and stride: R = 16, one block per tile
     (1, 2, 50, 16, 4, 4),  # block = stride: R = 1, one reduced row per block
     (1, 2, 96, 32, 16, 8),  # N a multiple of S: the TMA variant reads through descriptors
     (1, 2, 256, 24, 128, 8)],  # the same, head dim padded (the descriptor's zero fill)
)  # fmt: skip
def test_fused_matches_torch_in_float64(batch: int, heads: int, tokens: int, dim: int, block: int, stride: int,
                                        dtype: torch.dtype, variant: str) -> None:  # fmt: skip
    """Masses within TOLERANCE of the torch path in float64, for (B, N, H, D) projections seen as (B, H, N, D)."""
    q, k = (torch.randn(batch, tokens, heads, dim, device=DEVICE).to(dtype).transpose(1, 2) for _ in range(2))
    masses = fused.block_masses(q, k, block, stride, variant)
    ref = reference(q, k, block, stride)
    assert masses.shape == ref.shape and masses.dtype == torch.float32
    assert relative_error(masses, ref) <= TOLERANCE, relative_error(masses, ref)


@pytest.fixture
def gpu_tiles(monkeypatch: pytest.MonkeyPatch, variant: str) -> Iterator[None]:
    """The variant's kernel at a GPU configuration's tiles (64 reduced query rows, 32 reduced keys) instead of the
    interpreter's 16 x 16: at R = 16 four query blocks and two key blocks per tile."""
    tuner = fused.TUNERS[variant]
    monkeypatch.setattr(tuner, "configs", [fused.triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4)])
    tuner.cache.clear()
    yield
    tuner.cache.clear()


@needs_kernel
@pytest.mark.usefixtures("gpu_tiles")
def test_fused_matches_torch_at_gpu_tiles(variant: str) -> None:
    """Several query and key blocks per tile at the paper's R = 16, ragged last block and last tile."""
    q, k = (torch.randn(1, 2, 600, 32, device=DEVICE).to(torch.float16) for _ in range(2))
    masses = fused.block_masses(q, k, 128, 8, variant)
    assert relative_error(masses, reference(q, k, 128, 8)) <= TOLERANCE


@needs_kernel
def test_fused_selection_equals_torch_selection(variant: str) -> None:
    """Where each query block attends to one key block (a permutation) over noise, xattn's threshold keeps the
    same blocks from either path's masses, and not all of them."""
    tokens, dim, block, stride, blocks = 256, 32, 32, 8, 8
    target = torch.tensor([3, 0, 6, 1, 7, 2, 5, 4])
    token_block = torch.arange(tokens) // block
    q = 6 * torch.eye(dim)[token_block][None, None] + 0.3 * torch.randn(1, 2, tokens, dim)
    k = 6 * torch.eye(dim)[torch.argsort(target)[token_block]][None, None] + 0.3 * torch.randn(1, 2, tokens, dim)
    q, k = (t.to(DEVICE, torch.float16) for t in (q, k))
    masses, ref = fused.block_masses(q, k, block, stride, variant), reference(q, k, block, stride)
    assert torch.equal(ref.argmax(dim=-1).cpu(), target.expand(1, 2, blocks))  # well separated by construction
    kept = select_by_cumulative_mass(masses, 0.9)
    assert torch.equal(kept, select_by_cumulative_mass(ref, 0.9)) and kept.float().mean() < 0.5


@needs_kernel
def test_masses_right_when_later_key_tiles_raise_the_row_max(variant: str) -> None:
    """Keys whose scores grow by 2.9 (base 2) per reduced key: every key tile raises each row's max by ~46, so
    a partial not rescaled from the max it was taken against to the row's final max would be off by 2^48."""
    tokens, dim = 320, 16
    q = torch.ones(1, 1, tokens, dim)
    k = torch.linspace(0.0, 1.0, tokens)[None, None, :, None] * torch.ones(1, 1, tokens, dim)
    q, k = q.to(DEVICE, torch.float16), (k * 20).to(DEVICE, torch.float16)  # s spans 1 to 114 in base 2
    masses, ref = fused.block_masses(q, k, 16, 8, variant), reference(q, k, 16, 8)
    assert ref[..., -1].sum() > 0.9 * ref.sum()  # the last key block takes nearly all mass, as built
    assert relative_error(masses, ref) <= TOLERANCE, relative_error(masses, ref)


@needs_kernel
def test_dispatch_runs_the_kernel_where_it_can() -> None:
    """fp16 inputs on the kernel's device take the kernel under auto, the default since its GPU check passed."""
    q, k = (torch.randn(1, 2, 64, 16, device=DEVICE).to(torch.float16) for _ in range(2))
    assert fused.use_fused(q, k, 16, 4, backend="auto") and not fused.use_fused(q, k, 16, 4, backend="torch")
    assert fused.use_fused(q, k, 16, 4)
    masses = antidiagonal_block_scores(q, k, 16, 4, backend="auto")
    assert torch.equal(masses, fused.block_masses(q, k, 16, 4, fused.DEFAULT_VARIANT))


@needs_kernel
def test_the_tma_single_pass_kernel_is_the_default_variant(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without $BENCH_XATTN_VARIANT the single-pass kernel reading through descriptors scores (the default since it
    was the fastest that passed the GPU check); with it set to two_pass, the two-pass op does."""
    q, k = (torch.randn(1, 2, 70, 16, device=DEVICE).to(torch.float16) for _ in range(2))
    monkeypatch.delenv(fused.VARIANT_ENV, raising=False)
    assert fused.chosen_variant() == "single_pass_tma"
    calls: list[str] = []
    for name, launch in list(fused.VARIANT_FUNCTIONS.items()):
        monkeypatch.setitem(fused.VARIANT_FUNCTIONS, name,
                            lambda *args, n=name, f=launch: calls.append(n) or f(*args))  # fmt: skip
    antidiagonal_block_scores(q, k, 16, 4)
    monkeypatch.setenv(fused.VARIANT_ENV, "two_pass")
    antidiagonal_block_scores(q, k, 16, 4)
    assert calls == ["single_pass_tma", "two_pass"]


@needs_kernel
@pytest.mark.parametrize(("op", "options"), [(fused.xattn_block_masses, ()),
                                             (fused.xattn_block_masses_single_pass, (False,)),
                                             (fused.xattn_block_masses_single_pass, (True,))])  # fmt: skip
def test_op_passes_opcheck(op: torch.library.CustomOpDef, options: tuple[bool, ...]) -> None:
    """The op's schema (the masses alias no input), fake output (shape, dtype, strides) and AOT dispatch agree with
    the kernel, for (B, N, H, D) projections seen as (B, H, N, D)."""
    q, k = (torch.randn(1, 40, 2, 16, device=DEVICE).to(torch.float16).transpose(1, 2) for _ in range(2))
    torch.library.opcheck(op, (q, k, 16, 4, *options))


@needs_kernel
def test_compiled_fused_block_masses_equal_eager(variant: str) -> None:
    """torch.compile (fullgraph: no graph break) of the fused scoring gives eager's masses: the launch code is inside
    the op, out of Dynamo's sight."""
    q, k = (torch.randn(1, 2, 40, 16, device=DEVICE).to(torch.float16) for _ in range(2))

    def masses(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return fused.block_masses(q, k, 16, 4, variant)

    torch._dynamo.reset()
    compiled = torch.compile(masses, backend="aot_eager", fullgraph=True)(q, k)
    torch._dynamo.reset()
    assert torch.equal(compiled, masses(q, k))


def test_unsupported_calls_take_the_torch_path() -> None:
    """fp32 inputs (and any input without Triton) are scored by exactly the torch path."""
    q, k = torch.randn(1, 2, 50, 16), torch.randn(1, 2, 50, 16)
    assert fused.unsupported_reason(q, k, 16, 4) is not None
    assert torch.equal(antidiagonal_block_scores(q, k, 16, 4), antidiagonal_block_scores_torch(q, k, 16, 4))


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [("BENCH_XATTN_BACKEND", "triton", "BENCH_XATTN_BACKEND=triton but the fused xattn scoring cannot run"),
     ("BENCH_XATTN_BACKEND", "cuda", "BENCH_XATTN_BACKEND must be one of auto, torch, triton"),
     ("BENCH_XATTN_VARIANT", "one_pass",
      "BENCH_XATTN_VARIANT must be one of two_pass, single_pass, single_pass_tma, got 'one_pass'")],
)  # fmt: skip
def test_backend_variable_errors_are_specific(monkeypatch: pytest.MonkeyPatch, variable: str, value: str,
                                              message: str) -> None:  # fmt: skip
    """Misspelt variables are named, even where the torch path would score (a variant is checked on every path)."""
    monkeypatch.setenv(variable, value)
    q = torch.randn(1, 2, 20, 8)  # fp32: the kernel never takes it
    with pytest.raises(HarnessError, match=message):
        antidiagonal_block_scores(q, q, 8, 4)


@needs_kernel
@pytest.mark.parametrize(("block", "stride"), [(24, 8), (16, 3)])
def test_blocks_of_non_power_of_two_reduced_rows_are_refused(block: int, stride: int) -> None:
    """R = block / stride must be a whole power of two (tl.arange); such calls are named and go to torch."""
    q = torch.randn(1, 1, 48, 16, device=DEVICE).to(torch.float16)
    assert "is not a power of two" in (fused.unsupported_reason(q, q, block, stride) or "")


@needs_kernel
def test_selection_script_checks_every_configuration_then_times_every_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU script's xattn part at a small shape: each autotuner configuration of each kernel variant passes its
    float64 check, each variant's masses at the timed shape are within tolerance and keep float64's blocks, every
    path is timed as a share of the dense call, and the table has one line per path."""
    from harness.benchmarks import xattn_selection as script
    from harness.benchmarks.sparse_gpu import sparse_context
    from methods import TokenGrid

    monkeypatch.setattr(script, "REPEATS", (1, 2))
    configs = script.check_configs(DEVICE)
    assert set(configs["variants"]) == set(fused.VARIANTS)
    for checked in configs["variants"].values():
        assert checked["kept"] == len(checked["configs"]) >= 1
    grid = TokenGrid(2, 8, 8)
    q, k, v = (torch.randn(1, 2, grid.tokens, 32, device=DEVICE).to(torch.float16) for _ in range(3))
    row = script.selection_timings(q, k, v, sparse_context(grid), dense_ms=1.0, config_check=configs)
    assert row["passed"] and set(row["paths"]) == set(script.PATHS) == {"torch", "triton", "triton_single_pass",
                                                                         "triton_single_pass_tma"}  # fmt: skip
    for path in ("triton", "triton_single_pass", "triton_single_pass_tma"):
        assert row["check"][path]["passed"] and row["check"][path]["selection_agreement"] == 1.0
    for timing in row["paths"].values():
        assert timing["selection_fraction"] == timing["selection"]["median_ms"] > 0
    assert len(script.table_lines("toy", row)) == len(script.PATHS)


@pytest.mark.parametrize(("shape", "dtype", "view", "ready"), [
    ((1, 2, 96, 32), torch.float16, "bhnd", True),
    ((1, 2, 96, 32), torch.float16, "bnhd", True),  # projections seen as (B, H, N, D): token stride H x D
    ((1, 2, 100, 32), torch.float16, "bhnd", False),  # N not a multiple of the stride
    ((1, 2, 96, 12), torch.float16, "bhnd", False),  # 24-byte token rows: not a multiple of 16 bytes
    ((1, 2, 96, 32), torch.float16, "offset", False),  # a view starting 2 bytes in
])  # fmt: skip
def test_the_descriptor_variant_reads_through_descriptors_only_where_the_layout_allows(
    shape: tuple[int, ...], dtype: torch.dtype, view: str, ready: bool
) -> None:
    """Tensor descriptors need N a multiple of S and 16-byte aligned starts and strides; elsewhere pointer loads."""
    batch, heads, tokens, dim = shape
    if view == "bnhd":
        x = torch.randn(batch, tokens, heads, dim).to(dtype).transpose(1, 2)
    elif view == "offset":
        x = torch.randn(batch * heads * tokens * dim + 1).to(dtype)[1:].view(batch, heads, tokens, dim)
    else:
        x = torch.randn(*shape).to(dtype)
    assert fused._tma_ready(x, 8) is ready
