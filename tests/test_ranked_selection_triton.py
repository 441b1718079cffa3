"""The Triton ranked-prefix selection against the torch selections it replaces (XAttention's threshold, SVG2's top-p,
both budgets).

The kernel tests need Triton and either CUDA or the Triton interpreter on CPU tensors; elsewhere (CI) they skip.
On a CPU machine, with Triton (and numpy < 2.4) installed outside the project's environment::

    TRITON_INTERPRET=1 PYTHONPATH=.:<numpy < 2.4 site>:<triton site> python -m pytest \
        tests/test_ranked_selection_triton.py
"""

from __future__ import annotations

import pytest
import torch
from triton_helpers import DEVICE
from triton_helpers import needs_kernel as triton_needs_kernel

from harness.errors import HarnessError
from methods.kernels import ranked_selection_triton as kernel
from methods.kernels.block_sparse import select_by_cost_budget, select_by_cumulative_mass

needs_kernel = triton_needs_kernel(kernel)


def torch_path(monkeypatch: pytest.MonkeyPatch, select, *args, **kwargs) -> torch.Tensor:
    """``select(*args, **kwargs)`` on the torch path (the reference)."""
    with monkeypatch.context() as patch:
        patch.setenv(kernel.BACKEND_ENV, "torch")
        return select(*args, **kwargs)


def masses(*shape: int, seed: int = 0) -> torch.Tensor:
    """Random non-negative float32 masses, skewed as attention masses are (a few large entries per row)."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(*shape, generator=generator) ** 4).to(DEVICE)


@needs_kernel
@pytest.mark.parametrize("threshold", [0.3, 0.9, 0.999])
@pytest.mark.parametrize("min_keep", [0, 1, 7])
@pytest.mark.parametrize("entries", [1, 37, 256])
def test_cumulative_mass_matches_torch(monkeypatch: pytest.MonkeyPatch, threshold: float, min_keep: int,
                                       entries: int) -> None:  # fmt: skip
    """XAttention's and SVG2's top-p rule keeps the same entries as the torch sort."""
    scores = masses(2, 3, 5, entries, seed=entries)
    monkeypatch.setenv(kernel.BACKEND_ENV, "triton")
    kept = select_by_cumulative_mass(scores, threshold, min_keep=min_keep)
    assert torch.equal(kept, torch_path(monkeypatch, select_by_cumulative_mass, scores, threshold, min_keep=min_keep))


@needs_kernel
def test_cumulative_mass_of_an_empty_row_keeps_only_the_floor(monkeypatch: pytest.MonkeyPatch) -> None:
    """A row of zeros has no mass to reach: nothing is kept but the ``min_keep`` floor, its first entries (all tie;
    torch's unstable sort keeps any of them); the other rows as in torch."""
    scores = masses(4, 16)
    scores[1] = 0.0
    scores[2] = -0.0  # its bits differ from +0.0's: it must rank as zero
    monkeypatch.setenv(kernel.BACKEND_ENV, "triton")
    for min_keep in (0, 3):
        kept = select_by_cumulative_mass(scores, 0.9, min_keep=min_keep)
        floor = torch.arange(16, device=DEVICE) < min_keep
        assert torch.equal(kept[1:3], floor.expand(2, -1))
        reference = torch_path(monkeypatch, select_by_cumulative_mass, scores, 0.9, min_keep=min_keep)
        assert torch.equal(kept[[0, 3]], reference[[0, 3]])


@needs_kernel
@pytest.mark.parametrize("fraction", [0.05, 0.344, 0.9])
@pytest.mark.parametrize("layout", ["shared costs", "costs per group"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32], ids=["float64 sums", "int32 sums"])
def test_cost_budget_matches_torch(monkeypatch: pytest.MonkeyPatch, fraction: float, layout: str,
                                   dtype: torch.dtype) -> None:  # fmt: skip
    """Both budgets' layouts keep the same entries as the torch path: xattn's one row of block lengths for every
    row, SVG2's cluster sizes per (batch x head) group ``(G, 1, C)`` broadcast over its query clusters; int64 costs
    summed in float64, int32 ones in int32."""
    groups, rows, entries = 6, 9, 50
    scores = masses(groups, rows, entries, seed=3)
    generator = torch.Generator().manual_seed(4)
    shape = (entries,) if layout == "shared costs" else (groups, 1, entries)
    costs = torch.randint(0, 300, shape, generator=generator).to(DEVICE, dtype)
    monkeypatch.setenv(kernel.BACKEND_ENV, "triton")
    kept = select_by_cost_budget(scores, costs, fraction)
    assert torch.equal(kept, torch_path(monkeypatch, select_by_cost_budget, scores, costs, fraction))


@needs_kernel
def test_cost_budget_ranks_ties_by_index_and_inf_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """Scores on a few levels tie often: the kernel breaks ties in index order, as the torch path's stable sort does;
    ``inf`` (xattn's always-kept first block) ranks first."""
    scores = (torch.randint(0, 4, (8, 64), generator=torch.Generator().manual_seed(5)).float() / 4).to(DEVICE)
    scores[:, 0] = float("inf")
    costs = torch.full((64,), 128, device=DEVICE)
    monkeypatch.setenv(kernel.BACKEND_ENV, "triton")
    for fraction in (0.1, 0.3, 0.55):
        kept = select_by_cost_budget(scores, costs, fraction)
        assert kept[:, 0].all()
        assert torch.equal(kept, torch_path(monkeypatch, select_by_cost_budget, scores, costs, fraction))


@needs_kernel
@pytest.mark.parametrize("fraction", [0.7, 0.9, 0.344])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32], ids=["float64 sums", "int32 sums"])
def test_an_exact_tie_at_the_budget_keeps_what_torch_keeps(monkeypatch: pytest.MonkeyPatch, fraction: float,
                                                           dtype: torch.dtype) -> None:  # fmt: skip
    """Equal costs (xattn's block lengths) and equal masses put the budget exactly on an entry's edge: the kernel
    compares against the same double fraction as torch (on CUDA a float32 one kept one entry more), its half entry
    too where the costs sum in int32."""
    monkeypatch.setenv(kernel.BACKEND_ENV, "triton")
    equal = torch.ones(2, 125, device=DEVICE)
    costs = torch.full((125,), 128, device=DEVICE, dtype=dtype)
    for entries in (5, 125):
        scores, weights = equal[:, :entries], costs[:entries]
        kept = select_by_cost_budget(scores, weights, fraction)
        assert torch.equal(kept, torch_path(monkeypatch, select_by_cost_budget, scores, weights, fraction))
        kept = select_by_cumulative_mass(scores, fraction, min_keep=0)
        reference = torch_path(monkeypatch, select_by_cumulative_mass, scores, fraction, min_keep=0)
        assert torch.equal(kept.sum(-1), reference.sum(-1))  # all tie: which ones torch keeps is unspecified


@needs_kernel
def test_negative_scores_rank_below_the_others_and_padding_last(monkeypatch: pytest.MonkeyPatch) -> None:
    """Out of the masses' contract, but a negative score must not rank the padding among the entries (it read past
    the row): it ranks by value, as torch's sort does."""
    scores = torch.tensor([[0.5, -0.25, 0.1, 0.2, 0.3, -1.0, float("-inf")]], device=DEVICE)
    costs = torch.arange(1, 8, device=DEVICE)
    monkeypatch.setenv(kernel.BACKEND_ENV, "triton")
    for fraction in (0.5, 0.95, 1.0):
        kept = select_by_cost_budget(scores, costs, fraction)
        assert torch.equal(kept, torch_path(monkeypatch, select_by_cost_budget, scores, costs, fraction))


@needs_kernel
@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")  # the interpreter's 0 x inf
def test_an_infinite_mass_keeps_only_the_floor(monkeypatch: pytest.MonkeyPatch) -> None:
    """An ``inf`` mass ranks first and makes torch's ``cumsum - value`` NaN there (``inf`` below it): the mass rule
    keeps nothing, the ``min_keep`` floor alone is kept; the kernel's ``0 x inf`` drops it alike."""
    scores = masses(4, 50)
    scores[:, 3] = float("inf")
    monkeypatch.setenv(kernel.BACKEND_ENV, "triton")
    for min_keep in (0, 2):
        kept = select_by_cumulative_mass(scores, 0.9, min_keep=min_keep)
        assert kept.sum() == min_keep * 4
        assert torch.equal(kept, torch_path(monkeypatch, select_by_cumulative_mass, scores, 0.9, min_keep=min_keep))


@needs_kernel
@pytest.mark.parametrize("ranking", ["distinct scores", "tied scores"])
@pytest.mark.parametrize("entries", [1000, 4096])
def test_long_rows_keep_the_torch_budget(monkeypatch: pytest.MonkeyPatch, ranking: str, entries: int) -> None:
    """Rows past the sort's old 512 entries (SVG2's 1,000 key clusters, up to 4,096) keep what torch keeps under
    integer costs, for random scores and for scores on four levels, whose ties rank in index order across the row."""
    generator = torch.Generator().manual_seed(entries)
    if ranking == "distinct scores":
        scores = masses(3, entries, seed=entries)
    else:
        scores = (torch.randint(0, 4, (3, entries), generator=generator).float() / 4).to(DEVICE)
    costs = torch.randint(0, 300, (entries,), generator=generator).to(DEVICE)
    monkeypatch.setenv(kernel.BACKEND_ENV, "triton")
    for fraction in (0.05, 0.344, 0.9):
        kept = select_by_cost_budget(scores, costs, fraction)
        assert torch.equal(kept, torch_path(monkeypatch, select_by_cost_budget, scores, costs, fraction))


@needs_kernel
@pytest.mark.parametrize("floor", ["none", "one", "a tenth"])
@pytest.mark.parametrize("entries", [1000, 4096])
def test_long_rows_keep_the_torch_cumulative_mass(monkeypatch: pytest.MonkeyPatch, floor: str, entries: int) -> None:
    """Rows of 1,000 and 4,096 masses keep what torch's top-p keeps; SVG2's floor of a tenth of the clusters binds
    at the 0.3 threshold (about 7% of the entries hold 30% of these masses), where the floor's own search runs."""
    scores = masses(3, entries, seed=entries)
    min_keep = {"none": 0, "one": 1, "a tenth": entries // 10}[floor]
    monkeypatch.setenv(kernel.BACKEND_ENV, "triton")
    for threshold in (0.3, 0.9, 0.999):
        kept = select_by_cumulative_mass(scores, threshold, min_keep=min_keep)
        reference = torch_path(monkeypatch, select_by_cumulative_mass, scores, threshold, min_keep=min_keep)
        assert torch.equal(kept, reference)
        assert kept.sum(-1).min() >= min_keep


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32], ids=["float64 sums", "int32 sums"])
def test_svg2_shaped_budget_matches_torch(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    """SVG2's fixed-density call at its shapes: ``(B, H, 300, 1000)`` query- by key-cluster masses against each
    head's key-cluster sizes ``(B, H, 1, 1000)``, broadcast over its 300 query clusters (two heads: a group edge)."""
    scores = masses(1, 2, 300, 1000, seed=11)
    sizes = torch.randint(1, 120, (1, 2, 1, 1000), generator=torch.Generator().manual_seed(12)).to(DEVICE, dtype)
    monkeypatch.setenv(kernel.BACKEND_ENV, "triton")
    kept = select_by_cost_budget(scores, sizes, 0.295)
    assert torch.equal(kept, torch_path(monkeypatch, select_by_cost_budget, scores, sizes, 0.295))


@needs_kernel
def test_op_contract() -> None:
    """The op's fake matches its output and it traces through ``torch.library.opcheck``."""
    scores = masses(3, 40)
    costs = torch.arange(40, device=DEVICE)
    torch.library.opcheck(kernel.ranked_prefix, (scores, costs, 0.5, True, 1))
    torch.library.opcheck(kernel.ranked_prefix, (scores, scores, 0.9, False, 2))


@needs_kernel
def test_rows_longer_than_the_kernel_takes_run_in_torch() -> None:
    """A row of more than :data:`~kernel.MAX_ENTRIES` entries is refused by the kernel with its reason, so ``auto``
    takes the torch path."""
    scores = torch.rand(1, kernel.MAX_ENTRIES + 1, device=DEVICE)
    assert "entries" in kernel.unsupported_reason(scores, scores)
    assert not kernel.use_fused(scores, scores, "auto")


def test_forcing_the_kernel_where_it_cannot_run_names_why(monkeypatch: pytest.MonkeyPatch) -> None:
    """``BENCH_SELECTION_BACKEND=triton`` on scores it does not rank is a HarnessError naming the variable."""
    monkeypatch.setenv(kernel.BACKEND_ENV, "triton")
    with pytest.raises(HarnessError, match=f"{kernel.BACKEND_ENV}=triton but the fused ranked selection cannot run"):
        select_by_cumulative_mass(torch.rand(2, 8, dtype=torch.float64), 0.9)
