"""Attention methods, one module each, all behind the contract in :mod:`methods.base`.

Built-in methods are registered lazily so that ``bench methods`` lists them without importing
their kernels; importing :mod:`methods` is therefore cheap.
"""

from methods.base import (
    METHODS,
    AttentionContext,
    AttentionMethod,
    Capabilities,
    Schedule,
    TokenGrid,
    build_method,
    register_method,
)
from methods.params import Param

_BUILTIN = {
    "sdpa": ("methods.dense:Sdpa", ("dense", "default")),
    "math": ("methods.dense:MathReference", ("reference",)),
    "cudnn": ("methods.dense:Cudnn", ()),
    "fa2": ("methods.dense:FlashAttention2", ("flash", "flash-attn2")),
    "linear": ("methods.linear:LinearAttention", ("linear-attention",)),
    "linvideo": ("methods.linvideo.attention:LinVideo", ("lin-video",)),
    "xattn": ("methods.xattn:XAttention", ("xattention",)),
    "svg": ("methods.svg:SparseVideoGen", ("sparse-videogen", "sparse-video-gen")),
    "svg2": ("methods.svg2:SparseVideoGen2", ("sparse-videogen2", "sap")),
    "radial": ("methods.radial:RadialAttention", ("radial-attention",)),
    "dfa": ("methods.dfa:DiTFastAttn", ("ditfastattn",)),
    "sla": ("methods.sla:SparseLinearAttention", ("sparse-linear",)),
    "dmd2": ("methods.dmd2.generator:Dmd2Generator", ("dmd",)),
}
for _name, (_target, _aliases) in _BUILTIN.items():
    if _name not in METHODS:
        METHODS.add(_name, _target, _aliases)

__all__ = [
    "METHODS",
    "AttentionContext",
    "AttentionMethod",
    "Capabilities",
    "Param",
    "Schedule",
    "TokenGrid",
    "build_method",
    "register_method",
]
