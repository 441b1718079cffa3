"""Module weights as safetensors files: written atomically, read without pickle, checked on load; method
checkpoints inspected (their spec file and safetensors headers, no tensor) before any model is built."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness.atomic import atomic_path
from harness.errors import HarnessError, MissingWeightsError


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


# A training run's record (harness.train.checkpoint), and the tensors of the trainers before the engine, which
# folders trained then still hold: neither is part of what a checkpoint folder is.
TRAINING_TENSORS, TRAINING_META = "training_state.safetensors", "training_state.json"


def checkpoint_identity(checkpoint: Path) -> dict[str, str]:
    """What a method checkpoint holds, wherever it lies: file name -> sha256 of each tensor file and spec
    (a state file given alone: that file).

    The resumable training state is left out: it does not change the model the checkpoint loads into.
    """
    if checkpoint.is_file():
        return {checkpoint.name: file_sha256(checkpoint)}
    kept = sorted(path for path in checkpoint.iterdir() if path.is_file() and path.suffix in (".safetensors", ".json")
                  and path.name not in (TRAINING_TENSORS, TRAINING_META))  # fmt: skip
    return {path.name: file_sha256(path) for path in kept}


def identity_digest(identity: dict[str, str]) -> str:
    """12 hex digits naming a :func:`checkpoint_identity` (the run spec's ``checkpoint_id``)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# A trained method's checkpoint folder (`bench train`): its spec, the method's state file (``<method>.safetensors``,
# written by AttentionMethod.save_state) and the fine-tuned transformer.
CHECKPOINT_SPEC, CHECKPOINT_TRANSFORMER = "spec.json", "transformer.safetensors"


def state_file_name(method: str) -> str:
    """The method's state file in a checkpoint folder."""
    return f"{method}.safetensors"


@dataclass(frozen=True)
class CheckpointSummary:
    """What a checkpoint says of itself, read without loading a tensor.

    ``model``: the model it was trained on ("" when it does not say: a state file given alone);
    ``state_params``: the method parameters its state file recorded when it was saved; ``spec``: a folder's
    ``spec.json`` (empty for a state file).
    """

    path: Path
    model: str
    state_params: dict[str, Any]
    spec: dict[str, Any] = field(default_factory=dict)

    @property
    def weights(self) -> str:
        """The teacher weights (``--weights``) the checkpoint was distilled from, where its spec names them."""
        return str(self.spec.get("weights", ""))

    @property
    def fixed_sampling(self) -> dict[str, Any]:
        """Sampling settings the checkpoint fixes (a few-step generator: its steps, CFG and shift), else empty."""
        fixed = self.spec.get("fixed_sampling")
        return dict(fixed) if isinstance(fixed, dict) else {}


def checkpoint_sampling(path: Path | None) -> dict[str, Any]:
    """The sampling settings a run loading ``path`` defaults to (:attr:`CheckpointSummary.fixed_sampling`);
    empty for a checkpoint that fixes none or cannot be read (the preflight then names the fault)."""
    if path is None:
        return {}
    try:
        spec = json.loads((Path(path) / CHECKPOINT_SPEC).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return CheckpointSummary(Path(path), "", {}, spec).fixed_sampling if isinstance(spec, dict) else {}


def inspect_checkpoint(path: Path, method: str, folder: bool) -> CheckpointSummary:
    """Check that ``path`` is a whole checkpoint of ``method`` and read what it records; raise
    :class:`HarnessError` naming the fault (missing, a file for a folder, no spec, another method's, a damaged
    or truncated safetensors file). ``folder``: the method loads a `bench train` folder (spec, state,
    transformer) rather than a state file alone."""
    made_by = f"`bench train --method {method}`"
    if not path.exists():
        raise HarnessError(f"method checkpoint {path} does not exist")
    if not folder:
        if not path.is_file():
            raise HarnessError(f"method {method!r} loads a state file (made by its save_state), not the folder {path}")
        return CheckpointSummary(path, "", state_file_params(path, method))
    if not path.is_dir():
        raise HarnessError(f"checkpoint {path} is a file; {method} takes the folder {made_by} writes "
                           f"({CHECKPOINT_SPEC}, {state_file_name(method)}, {CHECKPOINT_TRANSFORMER})")  # fmt: skip
    spec_path = path / CHECKPOINT_SPEC
    if not spec_path.is_file():
        raise HarnessError(f"checkpoint folder {path} has no {CHECKPOINT_SPEC}: not a finished checkpoint of "
                           f"{made_by}")  # fmt: skip
    try:
        spec = json.loads(spec_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HarnessError(
            f"checkpoint spec {spec_path} is unreadable ({exc}); train it again with {made_by}"
        ) from None
    if not isinstance(spec, dict):
        raise HarnessError(f"checkpoint spec {spec_path} is not a JSON object; train it again with {made_by}")
    if spec.get("method") != method:
        raise HarnessError(f"checkpoint {path} was trained for method {spec.get('method')!r}, not {method!r}")
    _header(path / CHECKPOINT_TRANSFORMER, made_by)
    store = spec.get("trajectory_store")
    model = spec.get("model") or (store.get("model", "") if isinstance(store, dict) else "")
    return CheckpointSummary(path, str(model), state_file_params(path / state_file_name(method), method), spec)


def state_file_params(path: Path, method: str) -> dict[str, Any]:
    """The parameters a method state file recorded, after checking that it is ``method``'s and whole."""
    meta = _header(path, f"`bench train --method {method}`")
    if meta.get("method") != method:
        raise HarnessError(f"state file {path} belongs to method {meta.get('method')!r}, not {method!r}")
    try:
        params = json.loads(meta.get("params", "{}"))
    except json.JSONDecodeError:
        raise HarnessError(f"state file {path} records unreadable parameters {meta.get('params')!r}") from None
    return params if isinstance(params, dict) else {}


def _header(path: Path, made_by: str) -> dict[str, str]:
    """The metadata of a safetensors file whose header covers the whole file (a truncated one fails here)."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise HarnessError(f"checkpoint file {path} is missing; train the checkpoint again with {made_by}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError) as exc:
        raise HarnessError(
            f"checkpoint file {path} is damaged ({exc}); copy it again or retrain with {made_by}"
        ) from None
