"""Where model weights come from: a local folder, the local hub cache, or (only if allowed) the hub.

Offline-first: nothing is downloaded unless the user asks for it, and ``HF_HUB_OFFLINE=1`` always
wins. A missing model is an error naming what is missing and how to get it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from harness.errors import MissingWeightsError


@dataclass(frozen=True)
class WeightsSource:
    """A resolved weights location for ``from_pretrained``."""

    location: str
    local_files_only: bool
    is_local_folder: bool


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _looks_like_path(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~")) or source.count("/") != 1


def resolve_weights(
    source: str, hub_id: str, required_subfolders: tuple[str, ...], allow_download: bool
) -> WeightsSource:
    """Resolve ``source`` (a folder, a hub id, or ``""`` for the model's default hub id)."""
    source = source or hub_id
    folder = Path(source).expanduser()
    if folder.exists():
        if not folder.is_dir():
            raise MissingWeightsError(f"weights path {folder} is a file; expected a diffusers model folder")
        missing = [sub for sub in required_subfolders if not (folder / sub).is_dir()]
        if missing:
            raise MissingWeightsError(
                f"weights folder {folder} lacks the subfolder(s) {', '.join(missing)}; "
                f"it must be a diffusers checkout of {hub_id} (model_index.json, {', '.join(required_subfolders)})"
            )
        return WeightsSource(str(folder), local_files_only=True, is_local_folder=True)
    if _looks_like_path(source):
        raise MissingWeightsError(
            f"local weights folder {folder} does not exist. Download the diffusers weights on a machine "
            f"with internet (`huggingface-cli download {hub_id} --local-dir {folder}`) and pass that folder "
            f"with --weights, or pass a hub id."
        )
    return WeightsSource(source, local_files_only=hub_offline() or not allow_download, is_local_folder=False)


def check_hub_cache(source: WeightsSource, hub_id: str, required_subfolders: tuple[str, ...]) -> None:
    """A hub id that may be read from the local cache only must be there, with every required subfolder: else
    :class:`MissingWeightsError` with :func:`missing_hub_message`. Reads the cache's files only (no model library is
    imported, so their warnings cannot come before the error)."""
    if source.is_local_folder or not source.local_files_only:
        return
    from huggingface_hub import try_to_load_from_cache

    index = try_to_load_from_cache(source.location, "model_index.json")
    if not isinstance(index, str):
        raise MissingWeightsError(missing_hub_message(source, hub_id, "not in the local hub cache"))
    snapshot = Path(index).parent
    missing = [sub for sub in required_subfolders if not (snapshot / sub).is_dir()]
    if missing:
        reason = f"the cached snapshot {snapshot} lacks {', '.join(missing)}"
        raise MissingWeightsError(missing_hub_message(source, hub_id, reason))


def missing_hub_message(source: WeightsSource, hub_id: str, reason: str) -> str:
    how = (
        "HF_HUB_OFFLINE is set, so only the local cache is searched"
        if hub_offline()
        else "downloads are off by default; pass --download to fetch it"
    )
    cache = os.environ.get("HF_HOME", "~/.cache/huggingface")
    return (
        f"model weights {source.location!r} are not available: {reason}. "
        f"Looked in the hub cache under {cache} ({how}). Get them with "
        f"`huggingface-cli download {hub_id} --local-dir DIR` and pass --weights DIR."
    )
