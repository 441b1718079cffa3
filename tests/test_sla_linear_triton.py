"""SLA's linear-branch Triton kernel against the torch path in float64, and the dispatch between them.

The kernel tests need Triton and either CUDA or the Triton interpreter on CPU tensors; elsewhere (CI) they skip. On a
CPU machine (see tests/test_xattn_scoring_triton.py for the environment)::

    TRITON_INTERPRET=1 PYTHONPATH=.:<numpy < 2.4 site>:<triton site> python -m pytest tests/test_sla_linear_triton.py

The interpreter multiplies bf16 operands as raw integers, so there the kernel is checked in fp16; on CUDA in fp16 and
bf16.
"""

from __future__ import annotations

import pytest
import torch
from numerics import relative_error
from triton_helpers import DEVICE, ON_CUDA
from triton_helpers import needs_kernel as triton_needs_kernel

from harness.errors import HarnessError
from methods import AttentionContext, TokenGrid, build_method
from methods.kernels import sla_linear_triton as fused
from methods.sla import SlaProjections, classes_from_order, key_block_order, marginal_linear_attention

needs_kernel = triton_needs_kernel(fused)
DTYPES = (torch.float16, torch.bfloat16) if ON_CUDA else (torch.float16,)
# States rounded to bf16 (8 bits) before and after they are summed: ~3e-3 relative (3.0e-3 in the interpreter at
# these shapes).
TOLERANCE = 6e-3


def inputs(batch: int, heads: int, tokens: int, dim: int, dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, tokens, dim, generator=generator).to(DEVICE, dtype) for _ in range(3)]


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("batch", "heads", "tokens", "dim", "block", "critical", "negligible"),
    [(1, 2, 256, 32, 16, 0.05, 0.10),  # SLA's classes over 16 blocks: 1 critical, 1 skipped
     (2, 2, 200, 32, 16, 0.25, 0.10),  # batch 2, a ragged last block (200 = 12 x 16 + 8)
     (1, 2, 160, 24, 32, 0.20, 0.0),  # head dim padded to 32 columns; no skipped block (the public SLA-1 kernel)
     (1, 1, 256, 32, 16, 0.50, 0.25),  # a quarter of each row marginal
     (1, 2, 128, 16, 16, 0.50, 0.50)],  # 4 critical and 4 skipped of 8: no marginal block, the branch is 0
)  # fmt: skip
def test_kernel_matches_the_torch_path_in_float64(batch: int, heads: int, tokens: int, dim: int, block: int,
                                                  critical: float, negligible: float,
                                                  dtype: torch.dtype) -> None:  # fmt: skip
    q, k, v = inputs(batch, heads, tokens, dim, dtype, seed=tokens + dim)
    _, marginal = classes_from_order(key_block_order(q, k, block), critical, negligible)
    out = fused.marginal_linear_attention(q, k, v, marginal, block, 1e-6)
    ref = marginal_linear_attention(q.double(), k.double(), v.double(), marginal, block)
    assert out.dtype == torch.float32 and out.shape == q.shape
    if not bool(marginal.any()):
        assert float(out.abs().max()) == 0.0
        return
    assert relative_error(out, ref) < TOLERANCE


@needs_kernel
def test_a_head_shared_marginal_table_broadcasts() -> None:
    """Marginal blocks given once for every batch and head ``(1, 1, nq, nk)`` equal the same table expanded."""
    q, k, v = inputs(2, 2, 128, 16, torch.float16, seed=3)
    shared = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(0)).to(DEVICE) < 0.5
    out = fused.marginal_linear_attention(q, k, v, shared, 16, 1e-6)
    expanded = fused.marginal_linear_attention(q, k, v, shared.expand(2, 2, 8, 8).clone(), 16, 1e-6)
    assert torch.equal(out, expanded)


@needs_kernel
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.float16])
def test_fused_projection_equals_the_projected_branch_plus_the_sparse_output(weight_dtype: torch.dtype) -> None:
    """Given the sparse output and the projection, the op returns ``sparse + O_l W^T + b`` in v's dtype: the torch
    composition's value in float64, within the output's rounding (the projection computed in fp32 in the kernel)."""
    q, k, v = inputs(1, 2, 200, 24, torch.float16, seed=4)  # ragged last block, head dim padded
    _, marginal = classes_from_order(key_block_order(q, k, 16), 0.25, 0.10)
    generator = torch.Generator().manual_seed(4)
    sparse = torch.randn(1, 2, 200, 24, generator=generator).to(DEVICE, torch.float16)
    weight = (torch.randn(24, 24, generator=generator) * 0.5).to(DEVICE, weight_dtype)
    bias = torch.randn(24, generator=generator).to(DEVICE, weight_dtype)
    out = fused.marginal_linear_attention(q, k, v, marginal, 16, 1e-6, sparse, weight, bias)
    branch = marginal_linear_attention(q.double(), k.double(), v.double(), marginal, 16)
    ref = sparse.double() + branch @ weight.double().T + bias.double()
    assert out.dtype == v.dtype and relative_error(out, ref) < 2e-3


@needs_kernel
def test_the_projection_needs_all_three_of_its_inputs() -> None:
    q, k, v = inputs(1, 1, 64, 16, torch.float16, seed=5)
    marginal = torch.ones(1, 1, 4, 4, dtype=torch.bool, device=DEVICE)
    with pytest.raises(ValueError, match="together"):
        fused.marginal_linear_attention(q, k, v, marginal, 16, 1e-6, q, None, None)


@needs_kernel
def test_autocast_leaves_the_sums_in_their_dtypes() -> None:
    """Under fp16 autocast (a no-grad sampling inside a training loop) the op computes what it computes outside it:
    autocast would have made the summed states fp16 (past 65,504: inf) and the summed sums fp16/bf16."""
    q, k, v = inputs(1, 2, 128, 16, torch.float16, seed=6)
    v = v * 3000  # block states near 64 x 3000 x 0.3, their sums over blocks past fp16's range
    marginal = torch.ones(1, 2, 8, 8, dtype=torch.bool, device=DEVICE)
    plain = fused.marginal_linear_attention(q, k, v, marginal, 16, 1e-6)
    with torch.autocast(DEVICE.type, dtype=torch.float16):
        autocast = fused.marginal_linear_attention(q, k, v, marginal, 16, 1e-6)
    assert bool(torch.isfinite(autocast).all()) and torch.equal(autocast, plain)


@needs_kernel
def test_op_passes_opcheck() -> None:
    """The op's schema (its output aliases no input), fake output and AOT dispatch agree with the kernels."""
    q, k, v = inputs(1, 2, 64, 16, torch.float16, seed=1)
    marginal = torch.rand(1, 2, 4, 4, generator=torch.Generator().manual_seed(1)).to(DEVICE) < 0.5
    torch.library.opcheck(fused.marginal_linear_attention, (q, k, v, marginal, 16, 1e-6))


@needs_kernel
def test_compiled_branch_equals_eager() -> None:
    """torch.compile (fullgraph: no graph break) of the kernel's call gives eager's branch: the launches are inside
    the op, out of Dynamo's sight."""
    q, k, v = inputs(1, 2, 64, 16, torch.float16, seed=2)
    marginal = torch.rand(1, 2, 4, 4, generator=torch.Generator().manual_seed(2)).to(DEVICE) < 0.5

    def branch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return fused.marginal_linear_attention(q, k, v, marginal, 16, 1e-6)

    torch._dynamo.reset()
    compiled = torch.compile(branch, backend="aot_eager", fullgraph=True)(q, k, v)
    torch._dynamo.reset()
    assert torch.equal(compiled, branch(q, k, v))


def test_cpu_tensors_take_the_torch_path() -> None:
    q, k, v = (torch.randn(1, 1, 64, 16) for _ in range(3))
    assert not fused.use_fused(q, k, v, 16)
    with pytest.raises(HarnessError, match="BENCH_SLA_BACKEND=triton"):
        fused.use_fused(q, k, v, 16, backend="triton")


@pytest.mark.parametrize(("block", "why"), [(8, "power of two >= 16"), (48, "power of two >= 16")])
def test_small_or_odd_blocks_are_refused(block: int, why: str) -> None:
    q = torch.randn(1, 1, 64, 16, dtype=torch.float16)
    reason = fused.unsupported_reason(q, q, q, block)
    assert reason is not None and (fused.triton is None or why in reason)


@needs_kernel
def test_a_gradient_request_takes_the_torch_path() -> None:
    q, k, v = inputs(1, 1, 64, 16, torch.float16, seed=0)
    weight = torch.zeros(16, 16, device=DEVICE, requires_grad=True)  # a projection being trained
    assert fused.unsupported_reason(q, k, v, 16) is None
    assert "gradients" in (fused.unsupported_reason(q, k, v, 16, weight) or "")
    q.requires_grad_(True)
    assert "gradients" in (fused.unsupported_reason(q, k, v, 16) or "")
    with torch.no_grad():
        assert fused.unsupported_reason(q, k, v, 16, weight) is None


@needs_kernel
def test_the_method_runs_the_kernel_and_matches_its_torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """SLA's call with the kernel (the projection and the sum fused) equals the same call with
    ``BENCH_SLA_BACKEND=torch`` (trained projections, so that the linear branch counts in the output), and the record
    names each path."""
    q, k, v = inputs(1, 2, 1024, 32, torch.float16, seed=7)
    ctx = AttentionContext(layer=0, num_layers=1, step=1, num_steps=2, timestep=0.5, cfg_branch="cond",
                           grid=TokenGrid(1, 32, 32))  # fmt: skip
    method = build_method("sla", block_size=16)
    state = SlaProjections(1, q.shape[-1])
    torch.nn.init.normal_(state.proj[0].weight, std=0.5)
    torch.nn.init.normal_(state.proj[0].bias)
    method.attach(state.requires_grad_(False).to(DEVICE), trained=True)
    with torch.no_grad():
        out = method(q, k, v, ctx)
        assert method.params()["linear_branch_used"] == {"1024": "triton"}
        monkeypatch.setenv(fused.BACKEND_ENV, "torch")
        ref = method(q, k, v, ctx)
        assert method.params()["linear_branch_used"] == {"1024": "torch"}
    assert relative_error(out, ref) < 5e-3
