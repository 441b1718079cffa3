"""Checks on where results go, made before any expensive work."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from harness.errors import HarnessError

MIN_FREE_BYTES = 200 * 2**20


def ensure_writable_dir(folder: Path, min_free_bytes: int = MIN_FREE_BYTES) -> Path:
    """Create ``folder`` if needed and prove it is writable and has room; else a clear error."""
    folder = Path(folder).expanduser()
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
