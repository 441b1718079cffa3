"""SLA: Sparse-Linear Attention (Zhang et al., arXiv 2509.24006; thu-ml/SLA), a fine-tuned method.

Per call, with blocks of ``b`` tokens for queries and keys:

1. Mean-pool q and the mean-centred k over each block (SageAttention's smoothing of k) and score
   ``P_c = softmax(pool(q) pool(k)^T / sqrt(d))`` per query block.
2. Per query block, the top ``critical`` fraction of key blocks is **critical** (exact attention),
   the bottom ``negligible`` fraction is **skipped**, the rest is **marginal**.
3. Critical blocks: block-sparse softmax attention normalised over those blocks only, ``O_s``.
4. Marginal blocks: linear attention with ``phi = softmax`` over the head dimension; per key block
   ``h_j = phi(K_j)^T V_j`` and ``z_j = sum phi(K_j)``, summed over the query block's marginal blocks:
   ``O_l = phi(Q) H / (phi(Q) Z)``.
5. ``O = O_s + proj(O_l)``, ``proj`` a learned ``d x d`` linear per layer, zero-initialised (training
   starts from pure sparse attention); the DiT is then fine-tuned with this attention.

This is the paper's version (three classes). The public SLA-1 kernel has no skipped set
(``negligible=0`` reproduces it); the Dec 2025 rewrite runs the linear branch over all keys instead.
Paper settings on Wan 1.3B: critical 5%, negligible 10%, 64 x 64 blocks, softmax feature map.

Density recorded per call: the share of the N x N scores computed exactly (the critical tiles); the
linear branch forms no score and is not counted (the paper's "95% sparsity" counts it as sparse).
The critical branch runs through :func:`methods.kernels.sparse_backends.block_sparse_attention`: ``auto`` runs it
on Hopper without gradients on triton-blocks (:mod:`methods.kernels.block_list_triton`), each query block streaming
its critical key blocks from a list taken from the ranking, as SLA's own kernel does (1.46x / 1.30x the
density-scaled cuDNN call at Wan 1.3B / 14B on an H200 synchronised before each call, 1.32x / 1.31x back to back,
against flex-tuned's 3.06x / 2.27x: reports/gpu/h200/run_ea3d5fb/), and on compiled FlexAttention when training
(masked dense on CPU).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness.errors import HarnessError
from methods.base import AttentionContext, AttentionMethod, Capabilities, Density, Schedule, register_method
from methods.kernels import sla_linear_triton as sla_linear
from methods.kernels.block_list_triton import attach_lists
from methods.kernels.block_sparse import BlockSparsePattern, block_lengths, num_blocks
from methods.kernels.linear_attention import fp32_region
from methods.kernels.sparse_backends import BackendLog, check_backend
from methods.params import Param
from methods.sparse import BACKEND

PAPER_BLOCK = 64
#: Added to the linear branch's denominators (only a query whose features meet no marginal key's is near 0).
LINEAR_EPS = 1e-6
#: ``block_size="auto"`` halves the paper's 64 until a row holds this many blocks, so that 5% and
#: 10% of a row are whole blocks: Wan 480p keeps 64 (512 blocks a row), the toy's 512 tokens get 8
#: (one patch row of one frame, 64 blocks a row).
MIN_BLOCKS_PER_ROW = 64
# SLA's own state files sit beside the fine-tuned transformer in a checkpoint folder.
STATE_FILE, TRANSFORMER_FILE = "sla.safetensors", "transformer.safetensors"


def sla_block_size(tokens: int) -> int:
    """64, halved until ``tokens`` hold at least :data:`MIN_BLOCKS_PER_ROW` blocks (never below 1)."""
    block = PAPER_BLOCK
    while block > 1 and tokens < MIN_BLOCKS_PER_ROW * block:
        block //= 2
    return block


def block_means(x: torch.Tensor, block: int) -> torch.Tensor:
    """Mean over each block of ``block`` tokens (the last may be ragged): ``(B, H, N, D) -> (B, H, nb, D)``, summed
    in fp32 (float64 for float64 inputs) without an fp32 copy of x."""
    tokens = x.shape[-2]
    dtype = torch.promote_types(x.dtype, torch.float32)
    whole = tokens // block * block
    sums = x[..., :whole, :].unflatten(-2, (-1, block)).sum(dim=-2, dtype=dtype)
    if whole < tokens:
        sums = torch.cat([sums, x[..., whole:, :].sum(dim=-2, keepdim=True, dtype=dtype)], dim=-2)
    return sums / block_lengths(tokens, block, x.device)[:, None]


def key_block_order(q: torch.Tensor, k: torch.Tensor, block: int) -> torch.Tensor:
    """Key blocks per query block from the best to the worst by the pooled scores, ``(B, H, nq, nk)`` int64: mean-
    pooled q against the mean-pooled mean-centred k (softmax keeps their order, so it is not taken)."""
    pooled_q = block_means(q, block)
    # The block means of the centred k are those of k less k's mean: no centred copy of k.
    pooled_k = block_means(k, block) - k.mean(dim=-2, keepdim=True, dtype=pooled_q.dtype)
    scores = (pooled_q @ pooled_k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    return scores.argsort(dim=-1, descending=True)


def class_sizes(blocks: int, critical: float, negligible: float) -> tuple[int, int]:
    """Critical and skipped key blocks per query block of ``blocks``: ``max(1, floor(critical * blocks))`` and
    ``floor(negligible * blocks)`` (fewer if the two would overlap)."""
    n_critical = min(blocks, max(1, math.floor(critical * blocks + 1e-9)))
    return n_critical, min(blocks - n_critical, math.floor(negligible * blocks + 1e-9))


def classes_from_order(order: torch.Tensor, critical: float, negligible: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Critical and marginal key blocks per query block, each ``(B, H, nq, nk)`` bool, from
    :func:`key_block_order`'s ``order``: the first ones critical, the last ones skipped (:func:`class_sizes`)."""
    blocks = order.shape[-1]
    n_critical, n_skipped = class_sizes(blocks, critical, negligible)
    none = torch.zeros(order.shape, dtype=torch.bool, device=order.device)
    is_critical = none.scatter(-1, order[..., :n_critical], True)
    skipped = none.scatter(-1, order[..., blocks - n_skipped :], True) if n_skipped else none
    return is_critical, ~is_critical & ~skipped


def critical_lists(top: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The critical key blocks of every query block as the block lists of
    :func:`methods.kernels.block_list_triton.block_list_attention`, from the ranking's first ``n_critical`` entries
    ``top (B, H, nq, n_critical)`` int64: ``lists`` int32, ascending (neighbouring reads), and ``counts (B, H, nq)``
    int32, all ``n_critical``. No sort of the ``(nq, nk)`` table."""
    lists = top.sort(dim=-1).values.to(torch.int32)
    return lists, torch.full(top.shape[:-1], top.shape[-1], dtype=torch.int32, device=top.device)


def critical_pattern(q: torch.Tensor, k: torch.Tensor, block: int, critical: float, negligible: float
                     ) -> tuple[BlockSparsePattern, torch.Tensor]:  # fmt: skip
    """SLA's selection as its critical branch runs it: the critical blocks as a block-level pattern, with the
    builder of their lists attached (:func:`critical_lists`, run where triton-blocks first reads them, as SLA's own
    kernel streams them), and the marginal blocks ``(B, H, nq, nk)`` bool (:func:`classify_blocks`' classes). Only
    the ranking's first ``n_critical`` entries outlive the call (the full ranking is ``B H nq nk`` int64: 447 MB at
    Wan 14B)."""
    order = key_block_order(q, k, block)
    is_critical, marginal = classes_from_order(order, critical, negligible)
    top = order[..., : class_sizes(order.shape[-1], critical, negligible)[0]].clone()
    del order
    pattern = BlockSparsePattern(is_critical, q.shape[-2], block)
    attach_lists(pattern, lambda: critical_lists(top))
    return pattern, marginal


def classify_blocks(q: torch.Tensor, k: torch.Tensor, block: int, critical: float, negligible: float
                    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Critical and marginal key blocks per query block, each ``(B, H, nq, nk)`` bool (the rest is skipped), ranked
    by the pooled scores (:func:`key_block_order`, :func:`classes_from_order`)."""
    return classes_from_order(key_block_order(q, k, block), critical, negligible)


def marginal_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, marginal: torch.Tensor,
                              block: int, eps: float = LINEAR_EPS) -> torch.Tensor:  # fmt: skip
    """Linear attention of each query over its block's marginal key blocks, phi = softmax over features.

    ``marginal`` ``(B|1, H|1, nq, nk)``; returns ``(B, H, N, D)`` in fp32 (float64 for float64 inputs: the
    kernel's reference). A query block with no marginal block gets 0.
    """
    tokens = q.shape[-2]
    pad = num_blocks(tokens, block) * block - tokens
    with fp32_region(v) as dtype:  # autocast would run the sums below in bf16
        phi_q, phi_k = q.to(dtype).softmax(dim=-1), k.to(dtype).softmax(dim=-1)
        # Padding keys get zero features, so they add nothing to any block's sums.
        phi_k = torch.nn.functional.pad(phi_k, (0, 0, 0, pad)).unflatten(-2, (-1, block))
        values = torch.nn.functional.pad(v.to(dtype), (0, 0, 0, pad)).unflatten(-2, (-1, block))
        per_block_kv = phi_k.transpose(-2, -1) @ values  # (B, H, nk, D, D)
        per_block_k = phi_k.sum(dim=-2)  # (B, H, nk, D)
        weights = marginal.to(dtype)
        kv = torch.einsum("bhij,bhjde->bhide", weights, per_block_kv)  # (B, H, nq, D, D)
        k_sum = torch.einsum("bhij,bhjd->bhid", weights, per_block_k)  # (B, H, nq, D)
        phi_q = torch.nn.functional.pad(phi_q, (0, 0, 0, pad)).unflatten(-2, (-1, block))  # (B, H, nq, b, D)
        numerator = phi_q @ kv
        denominator = (phi_q @ k_sum.unsqueeze(-1)) + eps
    return (numerator / denominator).flatten(-3, -2)[..., :tokens, :]


class SlaProjections(nn.Module):
    """The learned part of SLA: one zero-initialised ``proj (D -> D)`` per self-attention layer."""

    def __init__(self, num_layers: int, head_dim: int) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.proj = nn.ModuleList(nn.Linear(head_dim, head_dim) for _ in range(num_layers))
        for layer in self.proj:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @property
    def num_layers(self) -> int:
        return len(self.proj)


@register_method("sla", aliases=("sparse-linear",))
class SparseLinearAttention(AttentionMethod):
    """SLA with its learned projections (see the module docstring).

    A quality run needs a fine-tuned checkpoint (``--checkpoint DIR``). Without one the projections are
    zero (untrained SLA is pure block-sparse attention), which serves latency and tests only.
    """

    capabilities = Capabilities(
        devices=("cpu", "cuda"),
        sparsity="dynamic",
        data_dependent=True,
        needs_training=True,
        notes="critical blocks exact (block-sparse, 64-token blocks: listed from the ranking on triton-blocks on "
        "Hopper without gradients, 64-token tiles on flex-tuned when training), marginal blocks linear + learned "
        "proj; fine-tuned; " + sla_linear.BACKEND_NOTE,
    )
    kernel_variables = (sla_linear.BACKEND_ENV,)
    pattern_kinds = frozenset({"tiles"})  # the critical blocks, whole
    parameters = (
        Param("critical", "float", 0.05, "share of key blocks per query block computed exactly (paper: 0.05)",
              min=0.0, max=1.0, min_open=True),
        Param("negligible", "float", 0.10, "share skipped (paper: 0.10; 0 reproduces the public SLA-1 kernel); "
              "critical + negligible <= 1", min=0.0, max=1.0),
        Param("block_size", "block_size", "auto", f"tokens per query/key block: auto ({PAPER_BLOCK} halved until a "
              f"row holds {MIN_BLOCKS_PER_ROW} blocks; 8 on the toy) or an int"),
        BACKEND,
    )  # fmt: skip

    def __init__(self, schedule: Schedule | None = None, **params: Any) -> None:
        super().__init__(schedule, **params)
        self.critical: float = self.settings["critical"]
        self.negligible: float = self.settings["negligible"]
        if self.critical + self.negligible > 1.0:
            raise HarnessError(f"sla: critical + negligible must be <= 1, got {self.critical} + {self.negligible}")
        self.block_size_param: str | int = self.settings["block_size"]
        self.backend: str = self.settings["backend"]
        self.backends = BackendLog(self.backend, self.name)
        self.state: SlaProjections | None = None
        self.trained = False
        self._blocks_used: dict[int, int] = {}
        self._linear_used: dict[int, str] = {}

    def params(self) -> dict[str, Any]:
        return {
            **super().params(),
            "block_size_used": {str(tokens): block for tokens, block in sorted(self._blocks_used.items())},
            "linear_branch_used": {str(tokens): path for tokens, path in sorted(self._linear_used.items())},
            **self.backends.params(),
            "trained": self.trained,
        }

    def check_supported(self, device: torch.device, dtype: torch.dtype) -> None:
        """The method's devices and dtypes, then its ``backend`` setting's for its critical blocks."""
        super().check_supported(device, dtype)
        check_backend(self.backend, device, dtype, self.name, self.pattern_kinds)

    def block_size(self, tokens: int) -> int:
        block = sla_block_size(tokens) if self.block_size_param == "auto" else int(self.block_size_param)
        self._blocks_used[tokens] = block
        return block

    def attach(self, state: SlaProjections, trained: bool) -> None:
        """Use ``state`` (being trained, or loaded from a fine-tuned checkpoint)."""
        self.state, self.trained = state, trained

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext
               ) -> tuple[torch.Tensor, Density]:  # fmt: skip
        if self.state is None:
            self.attach(SlaProjections(ctx.num_layers, q.shape[-1]).requires_grad_(False).to(q.device), trained=False)
        assert self.state is not None
        if self.state.proj[0].weight.device != q.device:  # a loaded checkpoint's state arrives on the CPU
            self.state.to(q.device)
        tokens, block = q.shape[-2], self.block_size(q.shape[-2])
        with torch.no_grad():  # the selection is not differentiated (as in SLA)
            pattern, marginal = critical_pattern(q, k, block, self.critical, self.negligible)
        sparse = self.backends.attention(q, k, v, pattern)
        proj = self.state.proj[ctx.layer]
        fused = sla_linear.use_fused(q, k, v, block, proj.weight, proj.bias)
        if not torch.compiler.is_compiling():  # a compiled graph would guard on the record
            self._linear_used[tokens] = "triton" if fused else "torch"
        if fused:  # the projection and the sum in the kernel's registers
            out = sla_linear.marginal_linear_attention(q, k, v, marginal, block, LINEAR_EPS, sparse, proj.weight,
                                                       proj.bias)  # fmt: skip
            return out, pattern.kept_fraction()
        linear = marginal_linear_attention(q, k, v, marginal, block, LINEAR_EPS)
        out = sparse.float() + proj(linear.to(proj.weight.dtype)).float()
        return out.to(v.dtype), pattern.kept_fraction()

    # -- state --------------------------------------------------------------------------------

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {} if self.state is None else dict(self.state.state_dict())

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        layers = sorted({int(key.split(".")[1]) for key in tensors if key.startswith("proj.")})
        if not layers or "proj.0.weight" not in tensors or layers != list(range(len(layers))):
            raise HarnessError(f"sla state holds no per-layer projections (keys {sorted(tensors)[:4]})")
        state = SlaProjections(len(layers), tensors["proj.0.weight"].shape[0])
        try:
            state.load_state_dict(tensors)
        except RuntimeError as exc:
            raise HarnessError(f"sla state does not fit: {exc}") from exc
        self.attach(state.requires_grad_(False), trained=True)

    def validate_for(self, num_layers: int, num_steps: int) -> None:
        super().validate_for(num_layers, num_steps)
        if self.state is not None and self.state.num_layers != num_layers:
            raise HarnessError(f"sla state has {self.state.num_layers} layers, the model {num_layers}")

    def load_checkpoint(self, path: Path, transformer: nn.Module) -> None:
        """A fine-tuned checkpoint folder: the projections and the fine-tuned transformer weights."""
        from harness.checkpoints import load_module_weights

        if not path.is_dir():
            raise HarnessError(f"sla checkpoint {path} must be a folder made by `bench train --method sla`")
        self.load_state(path / STATE_FILE)
        load_module_weights(transformer, path / TRANSFORMER_FILE)
