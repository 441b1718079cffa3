"""Checks on where results go, made before any expensive work."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from harness.errors import HarnessError

MIN_FREE_BYTES = 200 * 2**20


def ensure_writable_dir(folder: Path, min_free_bytes: int = MIN_FREE_BYTES) -> Path:
    """Create ``folder`` if needed and prove it is writable and has room; else a clear error.

    Every output option (``--out``, ``--runs-dir``, ...) goes through here: a path under a file, a
    read-only disk or a full one is one line naming the folder, before any work.
    """
    folder = Path(folder).expanduser()
    blocker = _file_in_the_way(folder)
    if blocker is not None:
        raise HarnessError(f"cannot write to output folder {folder}: {blocker} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-probe-"):
            pass
    except OSError as exc:
        raise HarnessError(f"cannot write to output folder {folder}: {exc.strerror or exc}") from exc
    free = shutil.disk_usage(folder).free
    if free < min_free_bytes:
        raise HarnessError(
            f"output folder {folder} has only {free / 2**20:.0f} MiB free; "
            f"need at least {min_free_bytes / 2**20:.0f} MiB"
        )
    return folder


def ensure_writable_file(path: Path, min_free_bytes: int = MIN_FREE_BYTES) -> Path:
    """An output file's checks (``--out x.json``): not an existing folder, and a writable folder to hold it."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise HarnessError(f"cannot write {path}: it is a folder; name a file in it, e.g. {path / 'result.json'}")
    ensure_writable_dir(path.parent, min_free_bytes)
    return path


def existing_input(path: Path, what: str, folder: bool, missing_hint: str = "") -> Path:
    """An input ``path`` that must exist as a folder (``folder``) or as a file; else one line naming ``what`` it is
    and whether it is missing (then ``missing_hint``) or of the other kind."""
    path = Path(path).expanduser()
    if not path.exists():
        raise HarnessError(f"{what} {path} does not exist{missing_hint}")
    if path.is_dir() != folder:
        wanted, found = ("folder", "file") if folder else ("file", "folder")
        raise HarnessError(f"{what} {path} is a {found}, not a {wanted}")
    return path


def _file_in_the_way(folder: Path) -> Path | None:
    """``folder`` or the first of its ancestors that exists as something other than a folder (else None)."""
    for path in (folder, *folder.parents):
        if path.exists():
            return None if path.is_dir() else path
    return None
