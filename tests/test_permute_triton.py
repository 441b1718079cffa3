"""The Triton token permutation (:mod:`methods.kernels.permute_triton`) against the torch path's gather and
scatter, and the dispatch in :func:`methods.kernels.block_sparse.permute_tokens`.

The kernel tests need Triton and either CUDA or the Triton interpreter on CPU tensors; elsewhere (CI) they skip::

    TRITON_INTERPRET=1 PYTHONPATH=.:<numpy < 2.4 site>:<triton site> python -m pytest tests/test_permute_triton.py
"""

from __future__ import annotations

import pytest
import torch
from triton_helpers import DEVICE
from triton_helpers import needs_kernel as triton_needs_kernel

from harness.errors import HarnessError
from methods.kernels import INTERPRETED
from methods.kernels import permute_triton as permute
from methods.kernels.block_sparse import permute_tokens, unpermute_tokens

needs_kernel = triton_needs_kernel(permute)
BATCH, HEADS, TOKENS = 2, 3, 77  # two full 32-row tiles and a ragged one


def tensor(layout: str, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """``(B, H, N, D)`` in a layout the methods see: contiguous, a projection's transposed ``(B, N, H, D)``, one
    head broadcast to all."""
    if layout == "transposed":
        return torch.randn(BATCH, TOKENS, HEADS, dim, device=DEVICE).to(dtype).transpose(1, 2)
    if layout == "head_shared":
        return torch.randn(BATCH, 1, TOKENS, dim, device=DEVICE).to(dtype).expand(BATCH, HEADS, TOKENS, dim)
    return torch.randn(BATCH, HEADS, TOKENS, dim, device=DEVICE).to(dtype)


def orders(shared: bool) -> torch.Tensor:
    """A permutation per (b, h), or one shared by all ``(1, 1, N)``."""
    if shared:
        return torch.randperm(TOKENS, device=DEVICE)[None, None]
    return torch.stack([torch.stack([torch.randperm(TOKENS) for _ in range(HEADS)]) for _ in range(BATCH)]).to(DEVICE)


@needs_kernel
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "head_shared"])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize(("dim", "dtype"), [(128, torch.float16), (24, torch.float32)])  # 24: columns masked
def test_kernel_moves_the_rows_gather_and_scatter_move(layout: str, shared: bool, dim: int,
                                                       dtype: torch.dtype) -> None:  # fmt: skip
    """Both directions equal the torch path bit for bit, and the inverse undoes the permutation."""
    x, order = tensor(layout, dim, dtype), orders(shared)
    index = order.expand(BATCH, HEADS, TOKENS)[..., None].expand_as(x)
    permuted = permute.permute_rows(x, order, False)
    assert permuted.is_contiguous() and torch.equal(permuted, x.gather(-2, index))
    assert torch.equal(permute.permute_rows(permuted, order, True), x)
    assert torch.equal(permute.permute_rows(x, order, True), torch.empty_like(x).scatter(-2, index, x))


@needs_kernel
def test_tokens_take_the_kernel_and_gradients_the_torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """permute_tokens / unpermute_tokens run the op without gradients (unless $BENCH_PERMUTE_BACKEND=torch) and
    gather / scatter for a tensor that needs them, whose gradient then flows back; under no_grad the op again."""
    calls = []
    real = permute.permute_rows
    monkeypatch.setattr(permute, "permute_rows", lambda *args: calls.append(args[2]) or real(*args))
    x, order = tensor("contiguous", 16, torch.float32), orders(False)
    assert torch.equal(unpermute_tokens(permute_tokens(x, order), order), x) and calls == [False, True]
    monkeypatch.setenv(permute.BACKEND_ENV, "torch")
    assert torch.equal(unpermute_tokens(permute_tokens(x, order), order), x) and calls == [False, True]
    monkeypatch.delenv(permute.BACKEND_ENV)
    x.requires_grad_(True)
    unpermute_tokens(permute_tokens(x, order), order).sum().backward()
    assert calls == [False, True] and torch.equal(x.grad, torch.ones_like(x))
    with torch.no_grad():  # no graph recorded: the kernel serves a tensor that would otherwise need gradients
        assert torch.equal(unpermute_tokens(permute_tokens(x, order), order), x) and calls == [False, True] * 2


@needs_kernel
@pytest.mark.parametrize("inverse", [False, True])
def test_op_passes_opcheck(inverse: bool) -> None:
    """The op's schema (its output aliases no input), fake output (shape, dtype, contiguous strides) and AOT dispatch
    agree with the kernel, on a transposed x and an order shared by the batch."""
    x, order = tensor("transposed", 16, torch.float16), orders(False)[:1]
    torch.library.opcheck(permute.permute_rows, (x, order, inverse))


@needs_kernel
def test_compiled_permutation_equals_eager() -> None:
    """torch.compile (fullgraph: no graph break) of permute_tokens and unpermute_tokens gives eager's outputs."""

    def round_trip(x: torch.Tensor, order: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        permuted = permute_tokens(x, order)
        return permuted, unpermute_tokens(permuted * 2, order)

    x, order = tensor("contiguous", 16, torch.float32), orders(False)
    torch._dynamo.reset()
    compiled = torch.compile(round_trip, backend="aot_eager", fullgraph=True)(x, order)
    torch._dynamo.reset()
    assert all(torch.equal(a, b) for a, b in zip(compiled, round_trip(x, order), strict=True))


def test_the_kernel_refuses_what_it_cannot_move() -> None:
    """Reasons name the tensor's problem; forcing the kernel where it cannot run is a specific error."""
    x = torch.randn(2, 3, 4, 8, requires_grad=True)
    assert permute.unsupported_reason(x) is not None
    if permute.triton is not None and INTERPRETED:
        assert "gradients" in permute.unsupported_reason(x)
        assert "non-empty" in permute.unsupported_reason(torch.randn(2, 3, 0, 8))
        many = torch.zeros(1, 1, 4, 8).expand(permute.MAX_GROUPS + 1, 1, 4, 8)
        assert "(batch, head) pairs" in permute.unsupported_reason(many)
    with pytest.raises(HarnessError, match="BENCH_PERMUTE_BACKEND=triton"):
        permute.use_fused(x, "triton")
