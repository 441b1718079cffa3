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


def processor_layout(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """As the attention processor passes them: ``(B, N, H, D)``-contiguous projections seen as ``(B, H, N, D)``."""
    return tuple(x.transpose(1, 2).contiguous().transpose(1, 2) for x in tensors)


def shares_memory(passed: torch.Tensor | None, source: torch.Tensor) -> bool:
    return passed is not None and passed.untyped_storage().data_ptr() == source.untyped_storage().data_ptr()


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
    keep = torch.rand(1, 2, 4, 4) < 0.5
    keep[..., 0] = True
    pattern = cluster_pair_pattern(keep, sizes, sizes, 96, block=16)
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


@pytest.mark.parametrize(("stand_in_fixture", "backend", "what"), [
    ("stand_in", "flashinfer", "kept key tokens"),  # the variable wrapper lists one index per key token
    ("bsr_stand_in", "flashinfer-bsr", "kept key pages"),  # the BSR wrapper one per key page
])  # fmt: skip
def test_a_plan_past_flashinfer_int32_indices_is_refused_before_planning(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, stand_in_fixture: str, backend: str, what: str
) -> None:
    """More key indices than FlashInfer's int32 indices hold is a clear error, and nothing is planned."""
    recorded = request.getfixturevalue(stand_in_fixture)
    monkeypatch.setattr(sparse_backends, "FLASHINFER_MAX_KV_INDICES", 10)
    q, k, v = qkv(1, 2, 200)
    with pytest.raises(
        HarnessError, match=rf"{what} \(one per query block\), past its int32 indices \(10\): run fewer"
    ):
        get_backend(backend).run(q, k, v, tile_pattern(1, 1, 200, (32, 32)))
    assert recorded == []


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


@pytest.mark.parametrize(("stand_in_name", "wrapper"), [
    ("StandInVariableWrapper", "VariableBlockSparseAttentionWrapper"),
    ("StandInBsrWrapper", "BlockSparseAttentionWrapper"),
])  # fmt: skip
def test_the_stand_ins_have_the_installed_flashinfer_signatures(stand_in_name: str, wrapper: str) -> None:
    """Where flashinfer is installed, every parameter a stand-in declares is the real wrapper's, with the same
    default and position."""
    flashinfer = pytest.importorskip("flashinfer")
    real, ours_cls = getattr(flashinfer.sparse, wrapper), globals()[stand_in_name]
    for method in ("__init__", "plan", "run"):
        ours = list(inspect.signature(getattr(ours_cls, method)).parameters.values())
        theirs = list(inspect.signature(getattr(real, method)).parameters.values())
        assert [(p.name, p.default) for p in ours] == [(p.name, p.default) for p in theirs[: len(ours)]], method


def attend_pages(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qo_indptr: torch.Tensor, kv_indptr: torch.Tensor,
                 kv_indices: torch.Tensor, last_page_len: torch.Tensor, sm_scale: float, out: torch.Tensor,
                 lse: torch.Tensor | None) -> None:  # fmt: skip
    """FlashInfer's paged prefill in fp32 over NHD pages k, v ``(pages, page_size, kv_heads, D)``, read through their
    strides: request i's queries ``q[qo_indptr[i]:qo_indptr[i + 1]]`` attend the first ``(n - 1) * page_size +
    last_page_len[i]`` tokens of its n pages ``kv_indices[kv_indptr[i]:kv_indptr[i + 1]]`` (every one inside k), query
    head h key head ``h // group``; a request without pages gets zeros and lse -inf (FA3's ``store_zero``). Writes
    ``out`` and the base-2 ``lse``."""
    page_size, group = k.shape[1], q.shape[1] // k.shape[2]
    for i in range(len(qo_indptr) - 1):
        rows, pages = slice(qo_indptr[i], qo_indptr[i + 1]), kv_indices[kv_indptr[i] : kv_indptr[i + 1]].long()
        assert bool((pages < k.shape[0]).all()), "a page outside the k tensor"
        kv_len = (len(pages) - 1) * page_size + int(last_page_len[i]) if len(pages) else 0
        keys, values = (x[pages].flatten(0, 1)[:kv_len].float().repeat_interleave(group, 1) for x in (k, v))
        scores = torch.einsum("qhd,khd->hqk", q[rows].float(), keys) * sm_scale
        out[rows] = (scores.softmax(-1) @ values.transpose(0, 1)).transpose(0, 1).to(out.dtype)
        if lse is not None:
            lse[rows] = (torch.logsumexp(scores, -1) / math.log(2)).T


class PagedRunReference:
    """FlashInfer's FA3 batch-prefill module as flashinfer/data/csrc/batch_prefill_sm90.cu takes its tensors: every
    stride from them (unit stride along D; k and v with equal page and token strides, which it checks), then
    :func:`attend_pages`."""

    def plan(self, *args: Any) -> list[int]:
        return []

    def paged_run(self, float_workspace: torch.Tensor, int_workspace: torch.Tensor, plan_info: list[int],
                  q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qo_indptr: torch.Tensor, kv_indptr: torch.Tensor,
                  kv_indices: torch.Tensor, last_page_len: torch.Tensor, out: torch.Tensor, lse: torch.Tensor | None,
                  mask_mode: int, layout: int, window_left: int, enable_pdl: bool, *params: Any) -> None:  # fmt: skip
        sm_scale = params[7]
        assert sm_scale == pytest.approx(q.shape[-1] ** -0.5)
        assert q.stride(-1) == k.stride(-1) == v.stride(-1) == 1 and k.stride()[:2] == v.stride()[:2]
        attend_pages(q, k, v, qo_indptr, kv_indptr, kv_indices, last_page_len, sm_scale, out, lse)


@pytest.fixture
def flashinfer_python_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where flashinfer is installed: its wrappers' own plan()/run() Python on the CPU, the CUDA module replaced by
    :class:`PagedRunReference`."""
    pytest.importorskip("flashinfer")
    import flashinfer.sparse as fi_sparse

    on_cpu = types.ModuleType("torch_on_cpu")
    on_cpu.__getattr__ = lambda name: getattr(torch, name)  # type: ignore[method-assign]
    on_cpu.empty = lambda *args, pin_memory=False, **kwargs: torch.empty(*args, **kwargs)  # type: ignore[attr-defined]
    on_cpu.cuda = types.SimpleNamespace(synchronize=lambda: None)  # type: ignore[attr-defined]
    monkeypatch.setattr(fi_sparse, "torch", on_cpu)
    monkeypatch.setattr(fi_sparse, "determine_attention_backend", lambda *args, **kwargs: "fa3")
    monkeypatch.setattr(fi_sparse, "get_batch_prefill_module", lambda *args: PagedRunReference())
    monkeypatch.setattr(fi_sparse, "device_support_pdl", lambda device: False)


def test_the_installed_flashinfer_python_side_runs_our_arguments_to_masked_dense(
    flashinfer_python_on_cpu: None,
) -> None:
    """The variable wrapper's Python (block table to token indices, HND to its kernel layout and back) on our
    arguments reproduces masked dense on ragged tiles and on SVG2 clusters with an empty one."""
    from harness.benchmarks.sparse_gpu import backend_check_patterns

    q, k, v = qkv(2, 3, 200)
    for pattern in backend_check_patterns(2, 3, 200, (16, 32), torch.device("cpu")).values():
        out = flashinfer_block_sparse_attention(q, k, v, pattern)
        assert relative_error(out, q, k, v, pattern) <= tolerance(q.dtype)


@pytest.mark.parametrize("batch_heads", [(1, 1), (2, 3)])
def test_the_installed_flashinfer_bsr_python_side_runs_our_arguments_to_masked_dense(
    flashinfer_python_on_cpu: None, batch_heads: tuple[int, int]
) -> None:
    """The BSR wrapper's Python (``qo_indptr`` ending at M, k and v reshaped into pages) on our arguments, in the
    processor's layout with a ragged last tile every query block keeps, reproduces masked dense: head-shared (read
    in place) and per-head (stacked)."""
    q, k, v = processor_layout(*qkv(2, 3, 200))
    pattern = tile_pattern(*batch_heads, 200, (32, 32))
    pattern.kept[..., -1] = True
    out = sparse_backends.flashinfer_bsr_attention(q, k, v, pattern)
    assert relative_error(out, q, k, v, pattern) <= tolerance(q.dtype)


class StandInBsrWrapper:
    """FlashInfer's ``BlockSparseAttentionWrapper`` contract (flashinfer/sparse.py 0.6.18.post1, its tensor-core
    path): ``plan`` takes a CSR table (``indptr (MB + 1,)``, ``indices``) of ``R x C`` blocks over M query rows and N
    keys, ``MB = ceil(M / R)`` (its ``qo_indptr`` is ``R * arange(MB + 1)`` with the last entry M: the last query
    block may be partial) and ``N % C == 0``; ``run`` takes q ``(M, qo_heads, D)`` and k, v ``(N, kv_heads, D)`` of
    any strides, reshapes k and v into pages ``(N / C, C, kv_heads, D)`` as its ``run`` does, checks what
    batch_prefill_sm90.cu checks (unit stride along D; k and v with equal page and token strides), writes into
    ``out`` where given and returns the base-2 log-sum-exp with ``return_lse``. A query block without pages gets
    zeros and lse -inf (FA3's ``store_zero``). Every plan and run (the tensors it was given) is recorded."""

    plans: ClassVar[list[dict[str, Any]]] = []
    runs: ClassVar[list[dict[str, torch.Tensor | None]]] = []

    def __init__(self, float_workspace_buffer: torch.Tensor, backend: str = "auto") -> None:
        assert float_workspace_buffer.dtype == torch.uint8
        self.planned: dict[str, Any] | None = None

    def plan(self, indptr: torch.Tensor, indices: torch.Tensor, M: int, N: int, R: int, C: int,
             num_qo_heads: int, num_kv_heads: int, head_dim: int, mask: Any = None, packed_mask: Any = None,
             causal: bool = False, pos_encoding_mode: str = "NONE", use_fp16_qk_reduction: bool = False,
             logits_soft_cap: float | None = None, sm_scale: float | None = None, rope_scale: float | None = None,
             rope_theta: float | None = None, q_data_type: Any = "float16", kv_data_type: Any = None,
             o_data_type: Any = "float16") -> None:  # fmt: skip
        assert indptr.dtype == indices.dtype == torch.int32 and len(indptr) == -(-M // R) + 1 and N % C == 0
        assert int(indptr[-1]) == len(indices) and (len(indices) == 0 or int(indices.max()) < N // C)
        assert mask is None and not causal and sm_scale is None and num_qo_heads % num_kv_heads == 0
        assert R * (num_qo_heads // num_kv_heads) >= 4, "the real plan would run its decode kernel"
        assert len(indices) > 0, "the real plan takes indices.max() of the table"
        self.planned = dict(indptr=indptr, indices=indices, R=R, C=C, M=M, N=N, qo_heads=num_qo_heads,
                            kv_heads=num_kv_heads, head_dim=head_dim, dtype=o_data_type)  # fmt: skip
        StandInBsrWrapper.plans.append(self.planned)

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale_q: Any = None, scale_k: Any = None,
            scale_v: Any = None, out: torch.Tensor | None = None, lse: torch.Tensor | None = None,
            return_lse: bool = False, enable_pdl: bool | None = None
            ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        plan = self.planned
        assert plan is not None, "run before plan"
        assert q.shape == (plan["M"], plan["qo_heads"], plan["head_dim"])
        assert k.shape == v.shape == (plan["N"], plan["kv_heads"], plan["head_dim"])
        pages_k, pages_v = (x.reshape(-1, plan["C"], *x.shape[-2:]) for x in (k, v))
        assert q.stride(-1) == pages_k.stride(-1) == pages_v.stride(-1) == 1
        assert pages_k.stride()[:2] == pages_v.stride()[:2], "K and V must have same page stride and stride_n"
        StandInBsrWrapper.runs.append(dict(q=q, k=k, v=v, pages_k=pages_k, out=out))
        if out is None:
            out = torch.empty(q.shape, dtype=plan["dtype"])
        assert out.shape == q.shape and out.dtype == plan["dtype"]
        if lse is None:
            lse = torch.empty(q.shape[:2], dtype=torch.float32)
        assert lse.shape == q.shape[:2] and lse.dtype == torch.float32
        blocks = len(plan["indptr"]) - 1
        qo_indptr = (torch.arange(blocks + 1) * plan["R"]).clamp(max=plan["M"])
        attend_pages(q, pages_k, pages_v, qo_indptr, plan["indptr"], plan["indices"],
                     torch.full((blocks,), plan["C"]), q.shape[-1] ** -0.5, out, lse)  # fmt: skip
        return (out, lse) if return_lse else out


@pytest.fixture
def bsr_stand_in(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """``import flashinfer`` gives the BSR stand-in; returns its plans."""
    module = types.ModuleType("flashinfer")
    module.sparse = types.SimpleNamespace(BlockSparseAttentionWrapper=StandInBsrWrapper)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "flashinfer", module)
    StandInBsrWrapper.plans, StandInBsrWrapper.runs = [], []
    return StandInBsrWrapper.plans


def test_bsr_pages_list_each_kept_tiles_pages_in_csr_order() -> None:
    """Tiles of 8 over 12 keys in pages of 4: tile 0 is pages 0-1, the ragged tile 1 page 2; the second sequence's
    pages start after the first's 3."""
    kept = torch.tensor([[[True, True], [False, True]], [[True, False], [True, True]]])
    indptr, indices = sparse_backends.bsr_pages(kept, tokens=12, tile=8, page=4)
    assert indptr.tolist() == [0, 3, 4, 6, 9] and indices.tolist() == [0, 1, 2, 2, 3, 4, 3, 4, 5]
    assert indptr.dtype == indices.dtype == torch.int32


@pytest.mark.parametrize(("batch", "tokens", "keep_tail"), [
    (1, 200, True),   # 32-token tiles, a ragged 8-token last key tile every query block keeps: 8-token pages
    (2, 200, False),  # no query block keeps the ragged tile; two batch items on one plan
    (2, 203, True),   # gcd(32, 203) = 1: one-token pages
    (1, 192, True),   # whole tiles: 32-token pages
])  # fmt: skip
@pytest.mark.parametrize("layout", ["processor", "contiguous"])
def test_bsr_reads_a_head_shared_pattern_in_place_and_matches_masked_dense(
    bsr_stand_in: list, batch: int, tokens: int, keep_tail: bool, layout: str
) -> None:
    """A table shared by every head (radial's) runs with FlashInfer's own heads on (N, H, D) views of q, k and v
    (no copy in), pages of gcd(tile, N) keys (no padding), into an output the result is a view of (no copy out)."""
    heads = 3
    q, k, v = qkv(batch, heads, tokens)
    if layout == "processor":
        q, k, v = processor_layout(q, k, v)
    pattern = tile_pattern(1, 1, tokens, (32, 32))
    pattern.kept[..., -1] = keep_tail
    out = sparse_backends.flashinfer_bsr_attention(q, k, v, pattern)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert relative_error(out, q, k, v, pattern) <= tolerance(q.dtype)
    (plan,) = StandInBsrWrapper.plans
    assert (plan["qo_heads"], plan["kv_heads"], plan["M"], plan["C"]) == (heads, heads, tokens, math.gcd(32, tokens))
    assert len(StandInBsrWrapper.runs) == batch
    for item, run in enumerate(StandInBsrWrapper.runs):
        for name, source in (("q", q), ("k", k), ("v", v)):
            assert run[name].data_ptr() == source.transpose(1, 2)[item].data_ptr() and shares_memory(run[name], source)
        assert run["pages_k"].data_ptr() == k.transpose(1, 2)[item].data_ptr()  # paged as a view, not a copy
        assert shares_memory(run["out"], out)


@pytest.mark.parametrize("layout", ["processor", "contiguous"])
def test_bsr_stacks_per_head_tables_and_matches_masked_dense(bsr_stand_in: list, layout: str) -> None:
    """Per-(batch, head) tables (xattn's, svg's) run as B x H heads stacked along the token axis in one table: q
    copied into whole tiles per head, k and v as they are where (B, H, N, D) is contiguous (else one copy each)."""
    q, k, v = qkv(2, 3, 200)
    if layout == "processor":
        q, k, v = processor_layout(q, k, v)
    pattern = tile_pattern(2, 3, 200, (32, 32))
    pattern.kept[..., -1] = True
    out = sparse_backends.flashinfer_bsr_attention(q, k, v, pattern)
    assert relative_error(out, q, k, v, pattern) <= tolerance(q.dtype)
    (plan,) = StandInBsrWrapper.plans
    assert (plan["qo_heads"], plan["M"], plan["N"], plan["C"]) == (1, 6 * 224, 6 * 200, 8)
    (run,) = StandInBsrWrapper.runs
    assert shares_memory(run["k"], k) == shares_memory(run["v"], v) == (layout == "contiguous")


@pytest.mark.parametrize("case", ["k and v strides differ", "strides off 16 bytes"])
def test_bsr_stacks_a_head_shared_pattern_flashinfer_cannot_read_in_place(bsr_stand_in: list, case: str) -> None:
    """Where FA3 could not read the tensors as they are (it takes one set of page strides for k and v, and 16-byte
    aligned strides), a head-shared pattern takes the stacked path, which copies, and still matches masked dense."""
    q, k, v = qkv(1, 2, 200)
    if case == "k and v strides differ":
        q, k = processor_layout(q, k)
    else:
        q = torch.randn(1, 2, 200, 17, dtype=torch.bfloat16)[..., :16]  # rows 34 bytes apart
    assert not sparse_backends.reads_in_place(q, k, v)
    pattern = tile_pattern(1, 1, 200, (32, 32))
    out = sparse_backends.flashinfer_bsr_attention(q, k, v, pattern)
    assert relative_error(out, q, k, v, pattern) <= tolerance(q.dtype)
    assert [plan["qo_heads"] for plan in StandInBsrWrapper.plans] == [1]


def flex_with_natural_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: BlockSparsePattern,
                          kernel_options: Any = None,
                          return_lse: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Flex's contract (CPU Flex returns no log-sum-exp): the masked softmax's output and, with ``return_lse``, each
    row's natural-log log-sum-exp; zeros and -inf for a row that keeps no key."""
    scores = (q.float() @ k.float().transpose(-2, -1)) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~pattern.dense_mask(), float("-inf"))
    lse = scores.logsumexp(dim=-1)
    out = ((scores - lse[..., None]).exp().nan_to_num(0.0) @ v.float()).to(q.dtype)
    return (out, lse) if return_lse else out


@pytest.mark.parametrize("layout", ["processor", "contiguous"])
def test_split_runs_whole_tiles_on_bsr_and_partial_ones_on_flex_and_matches_masked_dense(
    bsr_stand_in: list, monkeypatch: pytest.MonkeyPatch, layout: str
) -> None:
    """svg's band and sink (head-shared, token level, ragged sink tile): the full tiles go to the BSR wrapper with
    their base-2 log-sum-exps, the partial tiles to Flex with its natural-log ones; merged, the output is masked
    dense's over the whole pattern, and both parts are planned once across calls."""
    from methods.svg import band_with_sink_pattern

    monkeypatch.setattr(sparse_backends, "flex_block_sparse_attention", flex_with_natural_lse)
    q, k, v = qkv(2, 3, 200)
    if layout == "processor":
        q, k, v = processor_layout(q, k, v)
    pattern = band_with_sink_pattern(200, 32, 40, 32, q.device)
    assert pattern.partial_tiles.any() and pattern.full_tiles.any()
    first = sparse_backends.flashinfer_split_attention(q, k, v, pattern)
    second = sparse_backends.flashinfer_split_attention(q, k, v, pattern)
    assert first.shape == q.shape and first.dtype == q.dtype and torch.equal(first, second)
    assert relative_error(first, q, k, v, pattern) <= tolerance(q.dtype)
    (plan,) = StandInBsrWrapper.plans
    assert plan["qo_heads"] == 3  # one shared table read in place: FlashInfer's own heads


def test_split_stacks_per_head_tables_and_runs_a_pattern_without_full_tiles_on_flex_alone(
    bsr_stand_in: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Per-(batch, head) token-level tables take the BSR wrapper's stacked path (its log-sum-exps cut back to N rows
    per head); a pattern with no full tile has no BSR part (FlashInfer's plan takes no empty table) and runs on Flex
    alone. Both equal masked dense."""
    monkeypatch.setattr(sparse_backends, "flex_block_sparse_attention", flex_with_natural_lse)
    q, k, v = qkv(2, 3, 200)
    kept = torch.rand(2, 3, 7, 7) < 0.5
    kept[..., 0] = True
    full = kept & (torch.rand(2, 3, 7, 7) < 0.5)
    band = BlockSparsePattern(kept, 200, 32, full=full, mask_mod=lambda b, h, qi, ki: (qi - ki).abs() < 40)
    out = sparse_backends.flashinfer_split_attention(q, k, v, band)
    assert relative_error(out, q, k, v, band) <= tolerance(q.dtype)
    assert [plan["qo_heads"] for plan in StandInBsrWrapper.plans] == [1]  # heads stacked in one table
    partial_only = BlockSparsePattern(kept, 200, 32, full=torch.zeros_like(kept), mask_mod=band.mask_mod)
    out = sparse_backends.flashinfer_split_attention(q, k, v, partial_only)
    assert relative_error(out, q, k, v, partial_only) <= tolerance(q.dtype)
    assert len(StandInBsrWrapper.plans) == 1  # nothing planned for it


def test_split_patterns_cover_the_pattern_once() -> None:
    """The two parts are disjoint and together keep exactly the pattern's entries: whole tiles at block level, the
    partial ones under the pattern's mask_mod."""
    from methods.svg import band_with_sink_pattern

    pattern = band_with_sink_pattern(200, 32, 40, 32, torch.device("cpu"))
    whole, cut = sparse_backends.split_patterns(pattern)
    assert whole.kind == "tiles" and cut.kind == "token-level"
    assert not (whole.dense_mask() & cut.dense_mask()).any()
    assert torch.equal(whole.dense_mask() | cut.dense_mask(), pattern.dense_mask())
    assert sparse_backends.split_patterns(pattern)[0] is whole


def test_bsr_plans_a_pattern_once_across_calls(bsr_stand_in: list) -> None:
    """A pattern reused across calls (radial's) is planned in its first call only."""
    q, k, v = qkv(1, 2, 200)
    pattern = tile_pattern(1, 1, 200, (32, 32))
    first = sparse_backends.flashinfer_bsr_attention(q, k, v, pattern)
    second = sparse_backends.flashinfer_bsr_attention(q, k, v, pattern)
    assert len(StandInBsrWrapper.plans) == 1 and torch.equal(first, second)


@pytest.mark.parametrize(("kind", "reason"), [
    ("token", "token-level pattern"),
    ("unequal", "query and key blocks differ"),
    ("variable", "variable-size blocks"),
    ("tiny", "tiles of 2 tokens"),
])  # fmt: skip
def test_bsr_refuses_patterns_it_cannot_run_whole(kind: str, reason: str) -> None:
    from harness.benchmarks.sparse_gpu import backend_check_patterns

    if kind == "unequal":
        pattern = tile_pattern(1, 2, 200, (16, 32))
    elif kind == "tiny":
        pattern = tile_pattern(1, 2, 10, (2, 2))
    elif kind == "variable":
        pattern = next(p for p in backend_check_patterns(1, 2, 200, (32, 32), torch.device("cpu")).values()
                       if p.variable is not None)  # fmt: skip
    else:
        full = torch.zeros(1, 2, 7, 7, dtype=torch.bool)
        pattern = BlockSparsePattern(torch.ones(1, 2, 7, 7, dtype=torch.bool), 200, 32, full,
                                     lambda b, h, q_idx, kv_idx: q_idx >= kv_idx)  # fmt: skip
    refusal = get_backend("flashinfer-bsr").refusal(pattern)
    assert refusal is not None and refusal.startswith(reason)


@pytest.mark.parametrize(("device", "major", "dtype", "head_dim", "expected"), [
    ("cpu", None, torch.bfloat16, 128, "masked"),
    ("cuda", 9, torch.bfloat16, 128, "flex-tuned"),
    ("cuda", 9, torch.float16, 64, "flex-tuned"),
    ("cuda", 9, torch.float32, 128, "flex"),  # 128 x 128 fp32 tiles in two stages overflow an SM's shared memory
    ("cuda", 9, torch.bfloat16, 256, "flex"),
    ("cuda", 8, torch.bfloat16, 128, "flex"),
    ("cuda", 10, torch.bfloat16, 128, "flex"),
])  # fmt: skip
def test_auto_takes_the_hopper_flex_options_only_where_they_were_measured(
    monkeypatch: pytest.MonkeyPatch, device: str, major: int | None, dtype: torch.dtype, head_dim: int, expected: str
) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda _device=None: (major, 0))
    sparse_backends.auto_backend.cache_clear()
    try:
        assert sparse_backends.auto_backend(torch.device(device), dtype, head_dim) == expected
    finally:
        sparse_backends.auto_backend.cache_clear()
