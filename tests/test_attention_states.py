"""Merging two attention states over disjoint keys gives attention over their union (the split backend's combine).

The Triton merge needs Triton and either CUDA or the interpreter on CPU tensors; the torch path runs everywhere::

    TRITON_INTERPRET=1 PYTHONPATH=.:<numpy < 2.4 site>:<triton site> python -m pytest tests/test_attention_states.py
"""

from __future__ import annotations

import math

import pytest
import torch
from triton_helpers import DEVICE
from triton_helpers import needs_kernel as triton_needs_kernel

from methods.kernels import attention_states as states

needs_kernel = triton_needs_kernel(states)


def state(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q over the keys ``keys`` ``(N,)`` bool (float64): the output and the base-2 log-sum-exp."""
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~keys, float("-inf"))
    lse = scores.logsumexp(dim=-1)
    out = (scores - lse[..., None]).exp().nan_to_num(0.0) @ v
    return out, lse * states.LOG2_E


def split_inputs(seed: int = 0) -> tuple[torch.Tensor, ...]:
    """q, k, v ``(2, 3, 40, 16)`` float64, a random split of the keys into A and B, and attention over all keys."""
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 3, 40, 16, generator=generator, dtype=torch.float64) for _ in range(3))
    in_a = torch.rand(40, generator=generator) < 0.5
    full = torch.softmax((q @ k.transpose(-2, -1)) / 4.0, dim=-1) @ v
    return q, k, v, in_a, full


def test_torch_merge_of_two_key_sets_is_attention_over_their_union() -> None:
    q, k, v, in_a, full = split_inputs()
    out_a, lse_a = state(q, k, v, in_a)
    out_b, lse_b = state(q, k, v, ~in_a)
    merged = states.merge_attention_states_torch(out_a, lse_a.float(), out_b, lse_b.float())
    assert float((merged - full).norm() / full.norm()) < 1e-6


def test_a_set_with_no_key_gives_the_other_state_and_none_gives_zeros() -> None:
    """A row whose keys are all in B (lse_A = -inf) takes B's state; a row with none anywhere gets zeros, not NaN."""
    q, k, v, _, full = split_inputs(1)
    everything = torch.ones(40, dtype=torch.bool)
    empty_out, empty_lse = torch.zeros_like(full), torch.full(full.shape[:-1], float("-inf"), dtype=torch.float64)
    out_b, lse_b = state(q, k, v, everything)
    merged = states.merge_attention_states_torch(empty_out, empty_lse.float(), out_b, lse_b.float())
    assert torch.allclose(merged, full, rtol=1e-6, atol=1e-9)
    nothing = states.merge_attention_states_torch(empty_out, empty_lse.float(), empty_out, empty_lse.float())
    assert torch.equal(nothing, torch.zeros_like(full))


def test_a_side_without_keys_is_not_read() -> None:
    """Whatever a kernel left in a row without keys (NaN here) stays out of the merge: only its weight, 0, is used."""
    q, k, v, _, full = split_inputs(3)
    out_b, lse_b = state(q, k, v, torch.ones(40, dtype=torch.bool))
    garbage = torch.full_like(full, float("nan"))
    no_keys = torch.full(full.shape[:-1], float("-inf"))
    merged = states.merge_attention_states_torch(garbage, no_keys, out_b, lse_b.float())
    assert torch.allclose(merged, full, rtol=1e-6, atol=1e-9)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_triton_merge_matches_torch_on_strided_outputs(dtype: torch.dtype) -> None:
    """The kernel reads both outputs through any strides (one as a ``(B, N, H, D)`` layout seen as ``(B, H, N, D)``),
    and the log-sum-exps likewise, and writes what the torch path computes; rows whose keys are all on one side take
    that side's state (the other holding NaN), rows with no key anywhere get zeros."""
    q, k, v, in_a, _ = split_inputs(2)
    out_a, lse_a = state(q, k, v, in_a)
    out_b, lse_b = state(q, k, v, ~in_a)
    out_a = out_a.to(dtype).transpose(1, 2).contiguous().transpose(1, 2).to(DEVICE)
    out_b, lse_a, lse_b = out_b.to(dtype).to(DEVICE), lse_a.float().to(DEVICE), lse_b.float().to(DEVICE)
    lse_b = lse_b.transpose(1, 2).contiguous().transpose(1, 2)
    lse_a[0, 0, :3] = float("-inf")  # rows whose keys are all in B
    out_a[0, 0, :3] = float("nan")
    lse_a[1, 2, 5], lse_b[1, 2, 5] = float("-inf"), float("-inf")  # a row without keys
    merged = states.merge_attention_states(out_a, lse_a, out_b, lse_b)
    reference = states.merge_attention_states_torch(out_a, lse_a, out_b, lse_b)
    assert merged.dtype == dtype and merged.is_contiguous() and not merged.isnan().any()
    assert torch.equal(merged[1, 2, 5], torch.zeros_like(merged[1, 2, 5]))
    assert float((merged.float() - reference.float()).norm() / reference.float().norm()) < 1e-3


@needs_kernel
def test_triton_merge_takes_a_head_dim_that_is_not_a_power_of_two() -> None:
    """D = 24 runs in 32-column tiles whose last 8 columns are masked."""
    generator = torch.Generator().manual_seed(4)
    out_a, out_b = (torch.randn(1, 2, 37, 24, generator=generator).to(DEVICE) for _ in range(2))
    lse_a, lse_b = (torch.randn(1, 2, 37, generator=generator).to(DEVICE) for _ in range(2))
    merged = states.merge_attention_states(out_a, lse_a, out_b, lse_b)
    assert torch.allclose(merged, states.merge_attention_states_torch(out_a, lse_a, out_b, lse_b), atol=1e-6)
