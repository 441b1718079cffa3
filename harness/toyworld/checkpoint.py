"""The toy teacher's checkpoint: one safetensors file (transformer + prompt encoder) with its config.

Loaded with safetensors only (no pickle). A missing or corrupt file is a clear error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness.atomic import atomic_path
from harness.errors import HarnessError, MissingWeightsError
from harness.toyworld.encoder import PromptEncoder

SHIPPED_CHECKPOINT = Path(__file__).parent / "assets" / "toy_teacher.safetensors"
# LinVideo's default conversion of that teacher, named as harness.training.default_checkpoint names it.
SHIPPED_CONVERSIONS = Path(__file__).parent / "assets" / "linvideo"

TOY_TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": (1, 4, 4),
    "num_attention_heads": 4,
    "attention_head_dim": 32,
    "in_channels": 3,
    "out_channels": 3,
    "text_dim": 64,
    "freq_dim": 64,
    "ffn_dim": 256,
    "num_layers": 8,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "rope_max_seq_len": 64,
}
TOY_ENCODER_CONFIG: dict[str, Any] = {"dim": 64, "layers": 2, "heads": 4}


def build_modules(transformer_config: dict[str, Any], encoder_config: dict[str, Any]) -> tuple[nn.Module, nn.Module]:
    """Freshly initialised (transformer, prompt encoder) in fp32 on CPU."""
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(**transformer_config), PromptEncoder(**encoder_config)


def save_checkpoint(path: Path, transformer_state: dict[str, torch.Tensor], encoder_state: dict[str, torch.Tensor],
                    transformer_config: dict[str, Any], info: dict[str, Any],
                    dtype: torch.dtype = torch.float32) -> None:  # fmt: skip
    """Write both modules' weights (their state dicts, as ``dtype``) and the configs (plus ``info``) atomically.

    Loading casts back to the modules' fp32 parameters.
    """
    from safetensors.torch import save_file

    tensors = {f"transformer.{k}": v for k, v in transformer_state.items()}
    tensors |= {f"encoder.{k}": v for k, v in encoder_state.items()}
    tensors = {k: v.detach().to(dtype).contiguous().cpu() for k, v in tensors.items()}
    metadata = {
        "transformer_config": json.dumps(transformer_config),
        "encoder_config": json.dumps(TOY_ENCODER_CONFIG),
        "info": json.dumps(info),
    }
    with atomic_path(Path(path)) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def load_checkpoint(path: Path) -> tuple[nn.Module, nn.Module, dict[str, Any]]:
    """(transformer, encoder, info) from a checkpoint written by :func:`save_checkpoint`."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise MissingWeightsError(
            f"toy checkpoint {path} does not exist; the package ships one at {SHIPPED_CHECKPOINT}, "
            f"and `bench toy train` reproduces it"
        )
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        transformer_config = json.loads(metadata["transformer_config"])
        encoder_config = json.loads(metadata["encoder_config"])
        info = json.loads(metadata.get("info", "{}"))
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as exc:
        raise HarnessError(f"toy checkpoint {path} is corrupt or not a toy checkpoint: {exc!r}") from exc
    transformer_config.pop("_class_name", None)
    transformer_config.pop("_diffusers_version", None)
    transformer, encoder = build_modules(transformer_config, encoder_config)
    for prefix, module in (("transformer.", transformer), ("encoder.", encoder)):
        state = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise HarnessError(f"toy checkpoint {path} does not match its config: {exc}") from exc
    return transformer, encoder, info


def config_summary() -> dict[str, Any]:
    return {"transformer": TOY_TRANSFORMER_CONFIG, "encoder": TOY_ENCODER_CONFIG}


def count_parameters(*modules: nn.Module) -> int:
    return sum(p.numel() for module in modules for p in module.parameters())


def to_device(module: nn.Module, device: torch.device) -> nn.Module:
    return module.to(device).eval().requires_grad_(False)
