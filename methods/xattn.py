"""XAttention (Xu et al., ICML 2025): block selection by strided antidiagonal scoring.

Per call and head: every ``stride x stride`` cell of the attention map is scored by the sum of its
antidiagonal only -- every ``stride``-th query row (in reversed offset order) against every
``stride``-th key row, concatenated along the feature axis, is one matmul at 1/stride of QK^T's
cost. Scaled by ``1 / (sqrt(d) * stride)``, softmax over each reduced row, summed into
``block x block`` masses; per query block the key blocks are kept in decreasing mass until the
kept mass reaches ``threshold`` of the row's total. Video mode is non-causal.

``fixed_density`` (not in the paper; for timing at a stated density, e.g. the 0.344 its paper reports at
tau 0.9 on HunyuanVideo, when random weights make attention near-uniform and the threshold keeps nearly
everything) replaces the threshold: per query block the key blocks are kept in decreasing mass until their
tokens reach that share of the row (block 0 first under ``keep_first_block``).

Paper setting (HunyuanVideo; the repository has no Wan integration): stride 8, threshold 0.9
(0.95 the other reported point), 128-token blocks, first 5 of 50 steps dense (``warmup_fraction``
0.1). Faithful details: the official selection writes dropped indices as block 0, so key block 0
is always kept (``keep_first_block``). Differences: keys padded to whole blocks are excluded from
the scoring softmax (the official non-causal path lets zero padding take softmax mass).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from harness.errors import HarnessError
from methods.base import AttentionContext, Capabilities, Schedule, register_method
from methods.kernels import ranked_selection_triton as ranked
from methods.kernels import xattn_scoring_triton as scoring
from methods.kernels.block_sparse import (
    BlockSparsePattern,
    block_lengths,
    num_blocks,
    select_by_cost_budget,
    select_by_cumulative_mass,
)
from methods.kernels.xattn_scoring_triton import BACKEND_NOTE, block_masses, chosen_variant, use_fused
from methods.params import Param
from methods.sparse import BlockSparseMethod, SparsePlan, block_sparse_parameters

_SCORE_CHUNK_ELEMENTS = 1 << 27  # reduced scores held at once (512 MiB in fp32)


def antidiagonal_block_scores(q: torch.Tensor, k: torch.Tensor, block: int, stride: int,
                              backend: str | None = None, variant: str | None = None) -> torch.Tensor:  # fmt: skip
    """XAttention's block masses ``(B, H, nb, nb)`` float32 from q, k ``(B, H, N, D)``.

    Each entry is the softmax mass (over all keys, per reduced query row) of one query block x key
    block, from antidiagonal sums of ``stride x stride`` cells; rows of one query block sum to
    ``block / stride`` (fewer in a ragged last block). On CUDA (fp16/bf16) the fused Triton kernel
    (:mod:`methods.kernels.xattn_scoring_triton`, no score matrix in memory) computes them unless ``backend``
    (default ``$BENCH_XATTN_BACKEND``) is ``torch``, in its two-pass or single-pass ``variant`` (default
    ``$BENCH_XATTN_VARIANT``, else single_pass_tma); elsewhere :func:`antidiagonal_block_scores_torch`.
    Raises HarnessError for an unknown backend or variant (on every path), or ``triton`` where the kernel cannot run.
    """
    variant = chosen_variant(variant)
    if use_fused(q, k, block, stride, backend):
        return block_masses(q, k, block, stride, variant)
    return antidiagonal_block_scores_torch(q, k, block, stride)


def antidiagonal_block_scores_torch(q: torch.Tensor, k: torch.Tensor, block: int, stride: int) -> torch.Tensor:
    """:func:`antidiagonal_block_scores` in torch, the CPU path and the kernel's reference: the reduced scores
    (the inputs' dtype) of up to ``_SCORE_CHUNK_ELEMENTS`` at once, their softmax in fp32."""
    batch, heads, tokens, dim = q.shape
    blocks = num_blocks(tokens, block)
    padded = blocks * block
    q_pad, k_pad = (F.pad(t, (0, 0, 0, padded - tokens)) for t in (q, k))
    reduced_keys = torch.cat([k_pad[..., m::stride, :] for m in range(stride)], dim=-1)
    reduced_queries = torch.cat([q_pad[..., stride - 1 - m :: stride, :] for m in range(stride)], dim=-1)
    reduced = torch.arange(padded // stride, device=q.device) * stride
    key_valid = reduced < tokens  # a reduced row made only of padding takes no softmax mass
    rows = block // stride
    per_block = batch * heads * rows * (padded // stride)
    chunk = max(1, _SCORE_CHUNK_ELEMENTS // per_block)
    scale = 1.0 / (dim**0.5 * stride)
    masses = []
    for start in range(0, blocks, chunk):
        stop = min(blocks, start + chunk)
        query_rows = reduced_queries[..., start * rows : stop * rows, :]
        scores = (query_rows @ reduced_keys.transpose(-2, -1)).float() * scale
        probs = scores.masked_fill(~key_valid, float("-inf")).softmax(dim=-1)
        probs = probs * (reduced[start * rows : stop * rows] < tokens)[:, None]  # padded query rows
        probs = probs.view(batch, heads, stop - start, rows, blocks, rows)
        masses.append(probs.sum(dim=(3, 5)))
    return torch.cat(masses, dim=2)


@register_method("xattn", aliases=("xattention",))
class XAttention(BlockSparseMethod):
    """XAttention: antidiagonal block scoring, cumulative threshold per query block, block-sparse attention."""

    kernel_variables = (scoring.BACKEND_ENV, scoring.VARIANT_ENV, ranked.BACKEND_ENV)
    capabilities = Capabilities(
        sparsity="dynamic",
        data_dependent=True,
        fixed_density=True,
        notes="XAttention: antidiagonal scoring (stride 8), threshold 0.9, 128-blocks, 10% dense warm-up; "
        + BACKEND_NOTE,
    )
    pattern_kinds = frozenset({"tiles"})
    parameters = (
        Param("threshold", "float", 0.9, "tau: kept share of each query block's scored mass (paper: 0.9 and 0.95; "
              "1 keeps every block)", min=0.0, max=1.0, min_open=True, spellings=("tau",)),
        Param("stride", "int", 8, "antidiagonal stride S (paper: 8); must divide an explicit block_size", min=1),
        Param("keep_first_block", "bool", True, "always keep key block 0, as the official selection does"),
        Param("fixed_density", "float", None, "not in the paper: a kept fraction that replaces the threshold (to "
              "time at a stated density: random weights make attention near-uniform)", optional=True, min=0.0,
              max=1.0, min_open=True),
        *block_sparse_parameters(0.1, "paper: 5 of 50 steps"),
    )  # fmt: skip

    def __init__(self, schedule: Schedule | None = None, **params: Any) -> None:
        super().__init__(schedule, **params)
        self.threshold: float = self.settings["threshold"]
        self.stride: int = self.settings["stride"]
        self.keep_first_block: bool = self.settings["keep_first_block"]
        self.fixed_density: float | None = self.settings["fixed_density"]
        if self._block_size is not None and self._block_size % self.stride:
            raise HarnessError(f"xattn: stride {self.stride} must divide the block size {self._block_size}")
        self._strides_used: dict[int, int] = {}

    def usage_params(self) -> dict[str, Any]:
        return {"stride_used": {str(block): stride for block, stride in sorted(self._strides_used.items())}}

    def stride_for(self, block: int) -> int:
        """The stride used with ``block``: an automatic block smaller than the stride (a sequence of
        fewer than 16 x 8 tokens) takes a stride of its gcd; an explicit block is divisible (checked at init)."""
        stride = math.gcd(self.stride, block)
        self._strides_used[block] = stride
        return stride

    def plan(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> SparsePlan:
        tokens = q.shape[-2]
        block = self.block_size(tokens)
        stride = self.stride_for(block)
        masses = antidiagonal_block_scores(q, k, block, stride)
        if self.fixed_density is None:
            kept = select_by_cumulative_mass(masses, self.threshold)
        else:
            if self.keep_first_block:
                masses[..., 0] = float("inf")  # inside the budget, not on top of it
            kept = select_by_cost_budget(masses, block_lengths(tokens, block, q.device), self.fixed_density)
        if self.keep_first_block:
            kept[..., 0] = True
        return SparsePlan(BlockSparsePattern(kept, tokens, block))
