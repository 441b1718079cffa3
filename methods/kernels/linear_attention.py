"""Non-causal linear attention and the feature maps (kernels) compared by LinVideo.

Linear attention replaces softmax(q k^T) by a kernel phi(q) phi(k)^T, so that the key-value
summary ``phi(K)^T V`` is computed once and the cost is linear in the number of tokens N:

    out_i = phi(q_i) (sum_j phi(k_j)^T v_j) / (phi(q_i) . sum_j phi(k_j))

Shapes: inputs to a feature map are ``(B, H, N, D)``; features are ``(B, H, N, F)`` with
``F = feature_map.feature_dim(D)``; values and the output are ``(B, H, N, D)``.

Kernels (:data:`KERNELS`):

- ``hedgehog``: ``[softmax(x W), softmax(-x W)]`` over the feature axis, W per head, identity init
  (LinVideo Eq. 6, LoLCATs' softmax-over-features variant); F = 2D.
- ``relu``: ``relu(x)``; F = D.
- ``taylor``: Based's second-order Taylor map of ``exp(q.k / sqrt(D))``; F = 1 + D + D^2.
- ``elu``: ``elu(x) + 1`` (Katharopoulos et al.); F = D.

Precision: linear attention and every feature map compute in (at least) fp32 with autocast off
(:func:`fp32_region`), and return their input's dtype. Under the trainers' bf16 autocast a matmul or
einsum would otherwise run in bf16 (a 0.7% output error at N = 4,096), and in fp16 Taylor's
``x_i x_j`` overflows from ``|x| > 256``.
"""

from __future__ import annotations

import difflib
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from harness.errors import HarnessError

KERNELS: tuple[str, ...] = ("hedgehog", "relu", "taylor", "elu")


@contextmanager
def fp32_region(x: torch.Tensor) -> Iterator[torch.dtype]:
    """Autocast off on ``x``'s device; yields the dtype to compute in: fp32, or fp64 for fp64 inputs.

    Autocast would run the matmuls and einsums inside in bf16/fp16 whatever their inputs; with it
    off they run in the dtype the caller casts to.
    """
    with torch.autocast(x.device.type, enabled=False):
        yield torch.promote_types(x.dtype, torch.float32)


def linear_attention(phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Non-causal linear attention ``phi_q (phi_k^T v) / (phi_q . sum_n phi_k)`` in O(N F D).

    Args:
        phi_q: query features ``(B, H, N, F)``.
        phi_k: key features ``(B, H, M, F)``.
        v: values ``(B, H, M, D)``.
        eps: added to the denominator; it only matters when a query's features are all zero
            (possible with ``relu``), whose output is then 0 instead of NaN.

    Returns:
        ``(B, H, N, D)`` in ``v``'s dtype. Sums over tokens run in fp32 whatever the input dtype and
        under autocast: in bf16 the key-value summary over tens of thousands of tokens would lose
        most digits.
    """
    with fp32_region(v):
        phi_q, phi_k, v32 = phi_q.float(), phi_k.float(), v.float()
        kv = phi_k.transpose(-2, -1) @ v32  # (B, H, F, D)
        k_sum = phi_k.sum(dim=-2)  # (B, H, F)
        numerator = phi_q @ kv  # (B, H, N, D)
        denominator = (phi_q @ k_sum.unsqueeze(-1)) + eps  # (B, H, N, 1)
    return (numerator / denominator).to(v.dtype)


def feature_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_map: FeatureMap,
                             k_map: FeatureMap, eps: float = 1e-6) -> torch.Tensor:  # fmt: skip
    """``linear_attention(q_map(q), k_map(k), v, eps)`` for q ``(B, H, N, D)``, k and v ``(B, H, M, D)``.

    On CUDA it runs the fused Triton kernel (:mod:`methods.kernels.linear_attention_triton`: hedgehog, relu,
    elu; features never stored) unless ``$BENCH_LINEAR_BACKEND=torch``; elsewhere, and for taylor, the torch path.
    """
    from methods.kernels.linear_attention_triton import fused_linear_attention, use_fused  # imports this module

    if use_fused(q, k, v, q_map, k_map):
        return fused_linear_attention(q, k, v, q_map, k_map, eps)
    return linear_attention(q_map(q), k_map(k), v, eps)


def naive_linear_attention(
    phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """The O(N^2) reference of :func:`linear_attention`, in float64.

    Builds ``A = phi_q phi_k^T`` ``(B, H, N, M)``, divides each row by its sum (+ ``eps``, as in
    :func:`linear_attention`) and multiplies by ``v`` ``(B, H, M, D)``. Returns ``(B, H, N, D)`` float64.
    """
    scores = phi_q.double() @ phi_k.double().transpose(-2, -1)
    weights = scores / (scores.sum(dim=-1, keepdim=True) + eps)
    return weights @ v.double()


# -- feature maps -----------------------------------------------------------------------------


class FeatureMap(nn.Module, ABC):
    """A kernel feature map: ``forward(x (B, H, N, D)) -> (B, H, N, F)`` with ``F = feature_dim(D)``.

    ``forward`` runs the subclass's :meth:`features` in fp32 (fp64 for fp64 inputs) with autocast off
    and returns ``x``'s dtype, so no map depends on the precision it is called in.
    """

    @abstractmethod
    def feature_dim(self, head_dim: int) -> int:
        """Features per head for heads of size ``head_dim``."""

    @abstractmethod
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, N, D)`` -> ``(B, H, N, F)`` in ``x``'s dtype (fp32 or fp64)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with fp32_region(x) as dtype:
            return self.features(x.to(dtype)).to(x.dtype)


class EluFeatureMap(FeatureMap):
    """``elu(x) + 1``: strictly positive, so the denominator never vanishes. F = D."""

    def feature_dim(self, head_dim: int) -> int:
        return head_dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.elu(x) + 1


class ReluFeatureMap(FeatureMap):
    """``relu(x)`` (T2R / SANA-style). F = D; a query with no positive coordinate gets output 0."""

    def feature_dim(self, head_dim: int) -> int:
        return head_dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x)


class TaylorFeatureMap(FeatureMap):
    """Based's second-order Taylor map, ``[1, x / D^(1/4), vec(x x^T) / (sqrt(2) sqrt(D))]``.

    Then ``phi(q) . phi(k) = 1 + s + s^2 / 2`` with ``s = q.k / sqrt(D)``: the Taylor expansion of
    ``exp(s)``, which is positive for every s. F = 1 + D + D^2 (16,513 for D = 128, so only use it on
    projected or short inputs).
    """

    def feature_dim(self, head_dim: int) -> int:
        return 1 + head_dim + head_dim * head_dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        head_dim = x.shape[-1]
        ones = x.new_ones(*x.shape[:-1], 1)
        linear = x / head_dim**0.25
        quadratic = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2) / math.sqrt(2 * head_dim)
        return torch.cat([ones, linear, quadratic], dim=-1)


class HedgehogFeatureMap(FeatureMap):
    """Hedgehog map ``[softmax(x W_h), softmax(-x W_h)]``, softmax over the feature axis. F = 2D.

    ``W`` is a per-head ``(heads, D, D)`` parameter initialised to the identity, so the untrained map
    is ``[softmax(x), softmax(-x)]``. With ``identity=True`` W is fixed to the identity and the module
    has no parameters (LinVideo's untrained direct-replacement baseline). The projection and the
    softmax run in fp32 (as every map's, see :class:`FeatureMap`); features are returned in ``x``'s dtype.
    """

    def __init__(self, heads: int, head_dim: int, identity: bool = False) -> None:
        super().__init__()
        if heads <= 0 or head_dim <= 0:
            raise HarnessError(f"hedgehog needs heads > 0 and head_dim > 0, got heads={heads}, head_dim={head_dim}")
        self.heads = heads
        self.head_dim = head_dim
        self.identity = identity
        # eye per head, as in fla's Hedgehog map: the linear branch is sensible from step 0.
        self.weight: nn.Parameter | None = None if identity else nn.Parameter(torch.eye(head_dim).repeat(heads, 1, 1))

    def feature_dim(self, head_dim: int) -> int:
        return 2 * head_dim

    def extra_repr(self) -> str:
        return f"heads={self.heads}, head_dim={self.head_dim}, identity={self.identity}"

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.heads or x.shape[-1] != self.head_dim:
            raise HarnessError(
                f"hedgehog map built for heads={self.heads}, head_dim={self.head_dim} "
                f"got input of shape {tuple(x.shape)} (B, H, N, D)"
            )
        projected = x if self.weight is None else torch.einsum("bhnd,hde->bhne", x, self.weight.to(x.dtype))
        return torch.cat([projected.softmax(dim=-1), (-projected).softmax(dim=-1)], dim=-1)


def check_kernel(name: str, allowed: Sequence[str] = KERNELS) -> str:
    """Return ``name`` if it is one of ``allowed``, else raise :class:`HarnessError` naming the closest."""
    if name in allowed:
        return name
    close = difflib.get_close_matches(str(name), list(allowed), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise HarnessError(f"unknown kernel {name!r}.{hint} Choose one of: {', '.join(allowed)}")


def build_feature_map(name: str, heads: int, head_dim: int, *, trainable: bool = False) -> FeatureMap:
    """The feature map called ``name`` (one of :data:`KERNELS`) for ``heads`` heads of size ``head_dim``.

    ``trainable`` only changes kernels with parameters: ``hedgehog`` gets a learnable per-head W
    (identity init) when True and a fixed identity W when False. elu, relu and taylor have none.
    """
    check_kernel(name)
    if name == "hedgehog":
        return HedgehogFeatureMap(heads, head_dim, identity=not trainable)
    return {"elu": EluFeatureMap, "relu": ReluFeatureMap, "taylor": TaylorFeatureMap}[name]()
