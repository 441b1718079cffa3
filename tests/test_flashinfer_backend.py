"""The FlashInfer backend's calls, checked on the CPU through a stand-in ``flashinfer`` module.

The stand-in follows flashinfer-python 0.6.18.post1's ``VariableBlockSparseAttentionWrapper``
(flashinfer/sparse.py): ``plan`` takes a ``(kv_heads, MB, NB)`` bool block table with ``(kv_heads, MB)`` and
``(kv_heads, NB)`` block sizes of consecutive tokens, ``run`` takes q ``(qo_heads, qo_len, D)`` and k, v
``(kv_heads, kv_len, D)`` and returns ``(qo_heads, qo_len, D)`` at softmax scale ``1/sqrt(D)``. It checks
every argument against that contract and computes the attention it describes, so the backend's output must
equal masked dense on the same pattern: a wrong head order, layout or block size shows as a large error.
Where flashinfer is installed, two more tests hold the stand-in to its signatures and run its own plan()/run()
Python on our arguments with only the CUDA module replaced.
"""

from __future__ import annotations

import inspect
import math
import sys
import types
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest
import torch

from harness.errors import HarnessError
from methods.kernels import sparse_backends
from methods.kernels.block_sparse import BlockSparsePattern, masked_dense_attention, num_blocks
from methods.kernels.sparse_backends import flashinfer_block_sparse_attention, get_backend, tolerance


class StandInVariableWrapper:
    """FlashInfer's variable-block-sparse wrapper contract; records its calls in ``calls``."""

    calls: ClassVar[list[tuple[str, dict[str, Any]]]] = []

    def __init__(self, float_workspace_buffer: torch.Tensor, backend: str = "auto") -> None:
        assert float_workspace_buffer.dtype == torch.uint8 and float_workspace_buffer.numel() >= 128 * 1024**2
        self.planned: dict[str, Any] | None = None

    def plan(self, block_mask_map: torch.Tensor, block_row_sz: torch.Tensor, block_col_sz: torch.Tensor,
             num_qo_heads: int, num_kv_heads: int, head_dim: int, causal: bool = False,
             pos_encoding_mode: str = "NONE", use_fp16_qk_reduction: bool = False,
             logits_soft_cap: float | None = None, sm_scale: float | None = None, rope_scale: float | None = None,
             rope_theta: float | None = None, non_blocking: bool = True, q_data_type: Any = "float16",
             kv_data_type: Any = None) -> None:  # fmt: skip
        kv_heads, row_blocks, col_blocks = block_mask_map.shape
        assert block_mask_map.dtype == torch.bool and kv_heads == num_kv_heads
        assert block_row_sz.shape == (kv_heads, row_blocks) and block_col_sz.shape == (kv_heads, col_blocks)
        assert block_row_sz.dtype == block_col_sz.dtype == torch.int32
        assert num_qo_heads % num_kv_heads == 0 and not causal and sm_scale is None
        self.planned = dict(mask=block_mask_map, rows=block_row_sz, cols=block_col_sz, qo_heads=num_qo_heads,
                            head_dim=head_dim, q_dtype=q_data_type, kv_dtype=kv_data_type)  # fmt: skip
        self.calls.append(("plan", self.planned))

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor | None = None,
            lse: torch.Tensor | None = None, return_lse: bool = False, enable_pdl: bool | None = None
            ) -> torch.Tensor:  # fmt: skip
        plan = self.planned
        assert plan is not None, "run before plan"
        kv_heads = plan["mask"].shape[0]
        assert q.shape[0] == plan["qo_heads"] and k.shape[0] == v.shape[0] == kv_heads
        assert q.shape[-1] == k.shape[-1] == plan["head_dim"] and q.dtype == plan["q_dtype"]
        assert k.dtype == plan["kv_dtype"]
        assert bool((plan["rows"].sum(-1) == q.shape[1]).all()) and bool((plan["cols"].sum(-1) == k.shape[1]).all())
        self.calls.append(("run", {"q": q.shape, "k": k.shape}))
        group = plan["qo_heads"] // kv_heads
        outs = []
        for head in range(plan["qo_heads"]):
            kv = head // group
            mask = plan["mask"][kv].repeat_interleave(plan["rows"][kv].long(), 0)
            mask = mask.repeat_interleave(plan["cols"][kv].long(), 1)
            scores = (q[head].float() @ k[kv].float().T) / q.shape[-1] ** 0.5
            outs.append(scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v[kv].float())
        return torch.stack(outs).to(q.dtype)


@pytest.fixture
def stand_in(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, dict[str, Any]]]]:
    """``import flashinfer`` gives the stand-in; yields its call log."""
    module = types.ModuleType("flashinfer")
    module.sparse = types.SimpleNamespace(VariableBlockSparseAttentionWrapper=StandInVariableWrapper)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "flashinfer", module)
    StandInVariableWrapper.calls = []
    yield StandInVariableWrapper.calls


def qkv(batch: int, heads: int, tokens: int, dim: int = 16) -> tuple[torch.Tensor, ...]:
    return tuple(torch.randn(batch, heads, tokens, dim, dtype=torch.bfloat16) for _ in range(3))


def relative_error(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   pattern: BlockSparsePattern) -> float:  # fmt: skip
    ref = masked_dense_attention(q.float(), k.float(), v.float(), pattern)
    return float((out.float() - ref).norm() / ref.norm())


def tile_pattern(batch: int, heads: int, tokens: int, blocks: tuple[int, int]) -> BlockSparsePattern:
    kept = torch.rand(batch, heads, num_blocks(tokens, blocks[0]), num_blocks(tokens, blocks[1])) < 0.4
    kept[..., 0] = True  # every query block sees a key
    return BlockSparsePattern(kept, tokens, blocks)


@pytest.mark.parametrize(("batch", "heads", "pattern_batch_heads", "blocks"), [
    (2, 3, (2, 3), (16, 32)),  # per-(batch, head) tables, query and key blocks differ, ragged last blocks
    (2, 3, (1, 1), (32, 32)),  # one table broadcast to every batch and head
])  # fmt: skip
def test_tiles_reach_flashinfer_as_per_head_blocks_and_match_masked_dense(
    stand_in: list, batch: int, heads: int, pattern_batch_heads: tuple[int, int], blocks: tuple[int, int]
) -> None:
    """A block-level pattern runs as B x H FlashInfer heads of tile-sized blocks and reproduces masked dense."""
    tokens = 200
    q, k, v = qkv(batch, heads, tokens)
    pattern = tile_pattern(*pattern_batch_heads, tokens, blocks)
    out = flashinfer_block_sparse_attention(q, k, v, pattern)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert relative_error(out, q, k, v, pattern) <= tolerance(q.dtype)
    (_, plan), (_, run) = stand_in
    assert plan["qo_heads"] == batch * heads and plan["mask"].shape == (batch * heads, *pattern.kept.shape[-2:])
    assert run["q"] == (batch * heads, tokens, 16)


def test_svg2_clusters_reach_flashinfer_as_variable_blocks_and_match_masked_dense(stand_in: list) -> None:
    """SVG2's clusters (an empty one included) run as FlashInfer's variable blocks, not as tiles."""
    from methods.svg2 import cluster_pair_pattern

    sizes = torch.tensor([[[30, 0, 50, 16], [10, 20, 30, 36]]])
    labels = torch.stack([torch.arange(4).repeat_interleave(sizes[0, h]) for h in range(2)])[None]
    keep = torch.rand(1, 2, 4, 4) < 0.5
    keep[..., 0] = True
    pattern = cluster_pair_pattern(keep, sizes, sizes, labels, labels, block=16)
    q, k, v = qkv(1, 2, 96)
    out = flashinfer_block_sparse_attention(q, k, v, pattern)
    assert relative_error(out, q, k, v, pattern) <= tolerance(q.dtype)
    (_, plan), _ = stand_in
    assert torch.equal(plan["rows"], sizes[0].int()) and plan["mask"].shape == (2, 4, 4)


def test_the_gpu_script_check_patterns_reach_flashinfer_and_match_masked_dense(stand_in: list) -> None:
    """sparse_gpu's --backends check patterns (ragged tiles; clusters with an empty one) as FlashInfer runs them."""
    from harness.benchmarks.sparse_gpu import backend_check_patterns

    q, k, v = qkv(2, 3, 200)
    for pattern in backend_check_patterns(2, 3, 200, (16, 32), torch.device("cpu")).values():
        out = flashinfer_block_sparse_attention(q, k, v, pattern)
        assert relative_error(out, q, k, v, pattern) <= tolerance(q.dtype)


def test_a_plan_past_flashinfer_int32_indices_is_refused_before_planning(
    stand_in: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More kept key tokens than FlashInfer's int32 indices hold is a clear error, and nothing is planned."""
    monkeypatch.setattr(sparse_backends, "FLASHINFER_MAX_KV_INDICES", 1000)
    q, k, v = qkv(1, 2, 200)
    with pytest.raises(HarnessError, match=r"int32 indices \(1,000\): run fewer heads"):
        flashinfer_block_sparse_attention(q, k, v, tile_pattern(1, 2, 200, (32, 32)))
    assert stand_in == []


def test_a_missing_package_is_named_with_what_installs_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without flashinfer the reason names the module, the pip distribution and the import error."""
    monkeypatch.setitem(sys.modules, "flashinfer", None)  # import raises ImportError
    sparse_backends.import_failure.cache_clear()
    try:
        q, *_ = qkv(1, 2, 200)
        reason = get_backend("flashinfer").unavailable(q, tile_pattern(1, 2, 200, (32, 32)))
    finally:
        sparse_backends.import_failure.cache_clear()
    expected = "package 'flashinfer' cannot be imported (pip install flashinfer-python): ModuleNotFoundError"
    assert reason is not None and reason.startswith(expected)


def test_the_stand_in_has_the_installed_flashinfer_signatures() -> None:
    """Where flashinfer is installed, every parameter the stand-in declares is the real wrapper's, with the same
    default and position."""
    flashinfer = pytest.importorskip("flashinfer")
    real = flashinfer.sparse.VariableBlockSparseAttentionWrapper
    for method in ("__init__", "plan", "run"):
        ours = list(inspect.signature(getattr(StandInVariableWrapper, method)).parameters.values())
        theirs = list(inspect.signature(getattr(real, method)).parameters.values())
        assert [(p.name, p.default) for p in ours] == [(p.name, p.default) for p in theirs[: len(ours)]], method


class PagedRunReference:
    """FlashInfer's batch-prefill module as the variable wrapper drives it (page size 1): request ``i``'s queries
    ``q[qo_indptr[i]:qo_indptr[i + 1]]`` attend the keys ``kv_indices[kv_indptr[i]:kv_indptr[i + 1]]``."""

    def plan(self, *args: Any) -> list[int]:
        return []

    def paged_run(self, float_workspace: torch.Tensor, int_workspace: torch.Tensor, plan_info: list[int],
                  q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qo_indptr: torch.Tensor, kv_indptr: torch.Tensor,
                  kv_indices: torch.Tensor, last_page_len: torch.Tensor, out: torch.Tensor, lse: torch.Tensor | None,
                  mask_mode: int, layout: int, window_left: int, enable_pdl: bool, *params: Any) -> None:  # fmt: skip
        sm_scale = params[7]
        assert sm_scale == pytest.approx(q.shape[-1] ** -0.5) and k.shape[1:3] == (1, 1)
        for i in range(len(qo_indptr) - 1):
            rows, keys = slice(qo_indptr[i], qo_indptr[i + 1]), kv_indices[kv_indptr[i] : kv_indptr[i + 1]].long()
            scores = q[rows].float() @ k[keys, 0, 0].float().T * sm_scale  # (rows, group, keys)
            out[rows] = (scores.softmax(-1) @ v[keys, 0, 0].float()).to(out.dtype)


def test_the_installed_flashinfer_python_side_runs_our_arguments_to_masked_dense(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where flashinfer is installed: its own plan()/run() Python (block table to token indices, HND to its
    kernel layout and back) on our arguments, with the CUDA module replaced by :class:`PagedRunReference`,
    reproduces masked dense on ragged tiles and on SVG2 clusters with an empty one."""
    pytest.importorskip("flashinfer")
    import flashinfer.sparse as fi_sparse

    from harness.benchmarks.sparse_gpu import backend_check_patterns

    on_cpu = types.ModuleType("torch_on_cpu")
    on_cpu.__getattr__ = lambda name: getattr(torch, name)  # type: ignore[method-assign]
    on_cpu.empty = lambda *args, pin_memory=False, **kwargs: torch.empty(*args, **kwargs)  # type: ignore[attr-defined]
    on_cpu.cuda = types.SimpleNamespace(synchronize=lambda: None)  # type: ignore[attr-defined]
    monkeypatch.setattr(fi_sparse, "torch", on_cpu)
    monkeypatch.setattr(fi_sparse, "determine_attention_backend", lambda *args, **kwargs: "fa3")
    monkeypatch.setattr(fi_sparse, "get_batch_prefill_module", lambda *args: PagedRunReference())
    monkeypatch.setattr(fi_sparse, "device_support_pdl", lambda device: False)
    q, k, v = qkv(2, 3, 200)
    for pattern in backend_check_patterns(2, 3, 200, (16, 32), torch.device("cpu")).values():
        out = flashinfer_block_sparse_attention(q, k, v, pattern)
        assert relative_error(out, q, k, v, pattern) <= tolerance(q.dtype)


class StandInBsrWrapper:
    """FlashInfer's ``BlockSparseAttentionWrapper`` contract (flashinfer/sparse.py 0.6.18.post1): ``plan`` takes
    a CSR block table (``indptr (MB + 1,)``, ``indices``) over an ``M x N`` matrix of ``R x C`` blocks; ``run``
    takes q ``(M, qo_heads, D)`` and k, v ``(N, kv_heads, D)`` (paged into ``N / C`` pages of C tokens) and, with
    ``return_lse``, returns the base-2 log-sum-exp of each row's scaled scores beside the output."""

    plans: ClassVar[int] = 0

    def __init__(self, float_workspace_buffer: torch.Tensor, backend: str = "auto") -> None:
        assert float_workspace_buffer.dtype == torch.uint8
        self.planned: dict[str, Any] | None = None

    def plan(self, indptr: torch.Tensor, indices: torch.Tensor, M: int, N: int, R: int, C: int,
             num_qo_heads: int, num_kv_heads: int, head_dim: int, mask: Any = None, packed_mask: Any = None,
             causal: bool = False, pos_encoding_mode: str = "NONE", use_fp16_qk_reduction: bool = False,
             logits_soft_cap: float | None = None, sm_scale: float | None = None, rope_scale: float | None = None,
             rope_theta: float | None = None, q_data_type: Any = "float16", kv_data_type: Any = None,
             o_data_type: Any = "float16") -> None:  # fmt: skip
        assert indptr.dtype == indices.dtype == torch.int32 and len(indptr) == M // R + 1 and M % R == 0
        assert N % C == 0 and int(indices.max()) * C < N and mask is None and not causal and sm_scale is None
        StandInBsrWrapper.plans += 1
        self.planned = dict(indptr=indptr, indices=indices, R=R, C=C, M=M, N=N, dtype=o_data_type)

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, return_lse: bool = False
            ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        plan = self.planned
        assert plan is not None and q.shape[0] == plan["M"] and k.shape[0] == v.shape[0] == plan["N"] and return_lse
        pages_k, pages_v = k.reshape(-1, plan["C"], *k.shape[1:]), v.reshape(-1, plan["C"], *v.shape[1:])
        out = torch.empty(q.shape, dtype=plan["dtype"])
        lse = torch.empty(q.shape[:2], dtype=torch.float32)
        for row in range(len(plan["indptr"]) - 1):
            pages = plan["indices"][plan["indptr"][row] : plan["indptr"][row + 1]].long()
            rows = slice(row * plan["R"], (row + 1) * plan["R"])
            keys, values = pages_k[pages].flatten(0, 1)[:, 0].float(), pages_v[pages].flatten(0, 1)[:, 0].float()
            scores = q[rows, 0].float() @ keys.T / q.shape[-1] ** 0.5
            out[rows, 0] = (scores.softmax(-1) @ values).to(out.dtype)
            lse[rows, 0] = torch.logsumexp(scores, -1) / math.log(2)
        return out, lse


@pytest.fixture
def bsr_stand_in(monkeypatch: pytest.MonkeyPatch) -> None:
    module = types.ModuleType("flashinfer")
    module.sparse = types.SimpleNamespace(BlockSparseAttentionWrapper=StandInBsrWrapper)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "flashinfer", module)
    StandInBsrWrapper.plans = 0


@pytest.mark.parametrize(("batch", "heads", "pattern_batch_heads", "tokens"), [
    (2, 3, (2, 3), 200),  # per-(batch, head) tables; 200 tokens: 24 padding keys in the last 32-token page
    (1, 2, (1, 1), 192),  # one table for every head; whole pages, no padding
])  # fmt: skip
@pytest.mark.parametrize("processor_layout", [True, False])
def test_bsr_stacks_heads_corrects_the_padding_and_matches_masked_dense(
    bsr_stand_in: None,
    batch: int,
    heads: int,
    pattern_batch_heads: tuple[int, int],
    tokens: int,
    processor_layout: bool,
) -> None:
    """The BSR path stacks B x H heads into one table and removes the padding keys' share of each row's softmax
    (rows whose query block keeps the last, ragged key block), so the output equals masked dense."""
    q, k, v = qkv(batch, heads, tokens)
    if processor_layout:  # as the attention processor passes them: (B, N, H, D) projections seen as (B, H, N, D)
        q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    pattern = tile_pattern(*pattern_batch_heads, tokens, (32, 32))
    pattern.kept[..., -1] = True  # every row sees the padded page: uncorrected, the error would show
    out = sparse_backends.flashinfer_bsr_attention(q, k, v, pattern)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert relative_error(out, q, k, v, pattern) <= tolerance(q.dtype)


def test_bsr_plans_a_pattern_once_across_calls(bsr_stand_in: None) -> None:
    """A pattern reused across calls (radial's) is planned in its first call only."""
    q, k, v = qkv(1, 2, 200)
    pattern = tile_pattern(1, 2, 200, (32, 32))
    first = sparse_backends.flashinfer_bsr_attention(q, k, v, pattern)
    second = sparse_backends.flashinfer_bsr_attention(q, k, v, pattern)
    assert StandInBsrWrapper.plans == 1 and torch.equal(first, second)


@pytest.mark.parametrize(("kind", "reason"), [
    ("token", "token-level pattern"),
    ("unequal", "query and key blocks differ"),
    ("variable", "variable-size blocks"),
])  # fmt: skip
def test_bsr_refuses_patterns_it_cannot_run_whole(kind: str, reason: str) -> None:
    from harness.benchmarks.sparse_gpu import backend_check_patterns

    if kind == "unequal":
        pattern = tile_pattern(1, 2, 200, (16, 32))
    elif kind == "variable":
        pattern = next(p for p in backend_check_patterns(1, 2, 200, (32, 32), torch.device("cpu")).values()
                       if p.variable is not None)  # fmt: skip
    else:
        full = torch.zeros(1, 2, 7, 7, dtype=torch.bool)
        pattern = BlockSparsePattern(torch.ones(1, 2, 7, 7, dtype=torch.bool), 200, 32, full,
                                     lambda b, h, q_idx, kv_idx: q_idx >= kv_idx)  # fmt: skip
    refusal = sparse_backends._bsr_refuses(pattern)
    assert refusal is not None and refusal.startswith(reason)


@pytest.mark.parametrize(("device", "major", "expected"), [("cpu", None, "masked"), ("cuda", 9, "flex-tuned"),
                                                          ("cuda", 8, "flex"), ("cuda", 10, "flex")])  # fmt: skip
def test_auto_takes_the_hopper_flex_options_only_on_hopper(
    monkeypatch: pytest.MonkeyPatch, device: str, major: int | None, expected: str
) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda _device=None: (major, 0))
    sparse_backends.auto_backend.cache_clear()
    try:
        assert sparse_backends.auto_backend(torch.device(device)) == expected
    finally:
        sparse_backends.auto_backend.cache_clear()
