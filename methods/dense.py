"""Dense attention backends: torch's choice, FlashAttention-2, cuDNN, and the math reference.

Each backend pins exactly one implementation. If that implementation cannot run on the inputs, it
is an error, never a silent fall back to another kernel (a timing of "fa2" must be FA2).
"""

from __future__ import annotations

import importlib.util
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from harness.errors import HarnessError
from methods.base import AttentionContext, AttentionMethod, Capabilities, Schedule, register_method
from methods.params import Param

HALF_DTYPES = (torch.float16, torch.bfloat16)


class _PinnedSdpa(AttentionMethod):
    """Dense attention through one named torch SDPA backend."""

    backend: ClassVar[SDPBackend]

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext
    ) -> tuple[torch.Tensor, float]:
        with sdpa_kernel([self.backend]):
            return F.scaled_dot_product_attention(q, k, v), 1.0


@register_method("sdpa", aliases=("dense", "default"))
class Sdpa(AttentionMethod):
    """torch's default scaled-dot-product attention (on H100 it picks cuDNN, on CPU a fused C++ kernel)."""

    capabilities = Capabilities(notes="torch picks the kernel; record the device to know which")

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext
    ) -> tuple[torch.Tensor, float]:
        return F.scaled_dot_product_attention(q, k, v), 1.0


@register_method("math", aliases=("reference",))
class MathReference(_PinnedSdpa):
    """torch's unfused math SDPA: the numerical reference, slow and memory-hungry at video length."""

    backend = SDPBackend.MATH
    capabilities = Capabilities(notes="reference implementation (unfused)")


@register_method("cudnn")
class Cudnn(_PinnedSdpa):
    """cuDNN fused attention through torch (CUDA, fp16/bf16)."""

    backend = SDPBackend.CUDNN_ATTENTION
    capabilities = Capabilities(devices=("cuda",), dtypes=HALF_DTYPES, notes="torch CUDNN_ATTENTION backend")


@register_method("fa2", aliases=("flash", "flash-attn2"))
class FlashAttention2(_PinnedSdpa):
    """FlashAttention-2: the ``flash_attn`` package when installed, else torch's FLASH_ATTENTION backend."""

    backend = SDPBackend.FLASH_ATTENTION
    capabilities = Capabilities(
        devices=("cuda",), dtypes=HALF_DTYPES, notes="flash_attn package if installed, else torch FLASH backend"
    )
    parameters = (
        Param("impl", "choice", "auto", "auto (the flash_attn package if importable), torch or package",
              choices=("auto", "torch", "package")),
    )  # fmt: skip

    def __init__(self, schedule: Schedule | None = None, **params: Any) -> None:
        super().__init__(schedule, **params)
        impl = self.settings["impl"]
        has_package = importlib.util.find_spec("flash_attn") is not None
        if impl == "package" and not has_package:
            raise HarnessError("fa2 impl='package' needs the flash_attn package: pip install flash-attn")
        self.impl = "package" if impl == "package" or (impl == "auto" and has_package) else "torch"

    def params(self) -> dict[str, Any]:
        return {"impl": self.impl}

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext
    ) -> tuple[torch.Tensor, float]:
        if self.impl == "torch":
            return super().attend(q, k, v, ctx)
        from flash_attn import flash_attn_func  # the package takes (B, N, H, D)

        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2), 1.0
