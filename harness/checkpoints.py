"""Module weights as safetensors files: written atomically, read without pickle, checked on load."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness.atomic import atomic_path, write_json_atomic
from harness.errors import HarnessError, MissingWeightsError


def save_module_weights(module: nn.Module, path: Path, metadata: dict[str, str] | None = None) -> None:
    """Every parameter and buffer of ``module`` (on CPU, own dtype) to ``path``, atomically."""
    save_tensors(module.state_dict(), path, metadata)


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """A state dict (on CPU, own dtypes) to ``path`` as safetensors, atomically."""
    from safetensors.torch import save_file

    tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def load_module_weights(module: nn.Module, path: Path) -> None:
    """Load ``path`` into ``module`` (strict, cast to each parameter's dtype and device)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise MissingWeightsError(f"weights file {path} does not exist")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise HarnessError(f"cannot read weights {path}: {exc}") from exc
    own = module.state_dict()
    if set(tensors) != set(own):
        missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
        raise HarnessError(f"weights {path} do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for name, target in own.items():
            if tensors[name].shape != target.shape:
                raise HarnessError(f"weights {path}: {name} has shape {tuple(tensors[name].shape)}, "
                                   f"the model {tuple(target.shape)}")  # fmt: skip
            target.copy_(tensors[name].to(target.dtype))


TRAINING_TENSORS, TRAINING_META = "training_state.safetensors", "training_state.json"


def save_training_state(folder: Path, modules: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer],
                        generator: torch.Generator, meta: dict[str, Any]) -> None:  # fmt: skip
    """A resumable training checkpoint: module weights, the moments of each named optimizer and the RNG
    in safetensors, everything else (``meta``: config, step, logs) in JSON. Each file is written
    atomically; the step is stored in both so that a crash between the two writes is detected on resume."""
    from safetensors.torch import save_file

    tensors = {f"{name}.{key}": value for name, module in modules.items() for key, value in module.state_dict().items()}
    param_groups = {}
    for name, optimizer in optimizers.items():
        optimizer_state = optimizer.state_dict()
        param_groups[name] = optimizer_state["param_groups"]
        for index, entry in optimizer_state["state"].items():
            for key, value in entry.items():
                tensors[f"optimizer.{name}.{index}.{key}"] = torch.as_tensor(value)
    tensors["rng.generator"] = generator.get_state()
    tensors = {key: value.detach().contiguous().cpu() for key, value in tensors.items()}
    with atomic_path(folder / TRAINING_TENSORS) as tmp:
        save_file(tensors, str(tmp), metadata={"step": str(meta["step"])})
    write_json_atomic(folder / TRAINING_META, {**meta, "param_groups": param_groups})


def load_training_state(folder: Path, modules: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer],
                        generator: torch.Generator) -> dict[str, Any] | None:  # fmt: skip
    """Restore what :func:`save_training_state` wrote into the given objects; None if nothing was saved."""
    from safetensors import SafetensorError, safe_open

    if not (folder / TRAINING_META).exists():
        return None
    try:
        meta = json.loads((folder / TRAINING_META).read_text())
        with safe_open(str(folder / TRAINING_TENSORS), framework="pt") as handle:
            step = int((handle.metadata() or {})["step"])
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except (OSError, KeyError, ValueError, json.JSONDecodeError, SafetensorError) as exc:
        raise HarnessError(
            f"cannot resume from {folder}: corrupt training state ({exc}); remove it to start over"
        ) from exc
    if step != meta["step"]:
        raise HarnessError(
            f"cannot resume from {folder}: its two state files disagree (steps {step} and {meta['step']})"
        )
    for name, module in modules.items():
        prefix = f"{name}."
        module.load_state_dict({key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)})
    param_groups = meta.pop("param_groups")
    if set(param_groups) != set(optimizers):
        raise HarnessError(f"cannot resume from {folder}: it holds optimizers {sorted(param_groups)}, "
                           f"this run uses {sorted(optimizers)}")  # fmt: skip
    for name, optimizer in optimizers.items():
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith(f"optimizer.{name}."):
                index, field = key[len(f"optimizer.{name}.") :].split(".", 1)
                state.setdefault(int(index), {})[field] = value
        optimizer.load_state_dict({"state": state, "param_groups": param_groups[name]})
    generator.set_state(tensors["rng.generator"])
    return meta


def checkpoint_identity(folder: Path) -> dict[str, str]:
    """What a method checkpoint folder holds, wherever it lies: file name -> sha256 of each tensor file and spec.

    The resumable training state is left out: it does not change the model the checkpoint loads into.
    """
    kept = sorted(path for path in folder.iterdir() if path.is_file() and path.suffix in (".safetensors", ".json")
                  and path.name not in (TRAINING_TENSORS, TRAINING_META))  # fmt: skip
    return {path.name: file_sha256(path) for path in kept}


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
