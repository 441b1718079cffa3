"""Atomic, verified file writes: write beside the target, read what was written back, then rename over it.

Every artifact the harness keeps (records, frames, videos, checkpoints, plans, tables) goes through
:func:`atomic_path`, so a crash, a full disk or a writer that failed quietly never leaves a wrong file
at the target: the target is either what it was before or a new file that passed its check.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from harness import strict_json
from harness.errors import HarnessError

#: Reads a written file back; raises (any exception, its message the reason) if it is not what was meant.
Verifier = Callable[[Path], None]


class ArtifactError(HarnessError):
    """A written file failed its check, so it was not put in place."""


class WriteError(HarnessError):
    """The operating system refused a write (a file-size limit, a read-only or failing disk, no permission); nothing
    was put in place."""


class DiskFullError(WriteError):
    """The file system ran out of space (or quota) while a file was written; nothing was put in place."""


def verify_json(path: Path) -> None:
    """Strict JSON (no NaN or Infinity) that parses."""
    strict_json.decode(path.read_text())


def verify_safetensors(path: Path) -> None:
    """A safetensors header that parses and covers the file exactly (a truncated file fails), its metadata
    rewritten in place in sorted key order first.

    safetensors' writer orders the metadata by a hash seeded per process, so the same tensors and metadata gave
    different bytes from one run to the next (a resumed training's checkpoint differed from an uninterrupted one's
    in nothing but that order); sorted, the same content is the same file.
    """
    from safetensors import safe_open

    _sort_safetensors_metadata(path)
    with safe_open(str(path), "pt") as handle:
        handle.keys()


def _sort_safetensors_metadata(path: Path) -> None:
    """Rewrite the header's ``__metadata__`` in sorted key order, in place (the same bytes, reordered)."""
    with open(path, "r+b") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            return  # not a safetensors file: the check that follows says so
        size = int.from_bytes(prefix, "little")
        raw = handle.read(size)
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return
        if not isinstance(header, dict) or not isinstance(header.get("__metadata__"), dict):
            return
        metadata = header["__metadata__"]
        header["__metadata__"] = {key: metadata[key] for key in sorted(metadata)}
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > size:
            return  # another serialisation than safetensors' own: leave the file as written
        handle.seek(8)
        handle.write(text + b" " * (size - len(text)))


#: The check a target gets by its suffix when the writer names none; every file must also be non-empty.
VERIFIERS: dict[str, Verifier] = {".json": verify_json, ".safetensors": verify_safetensors}


@contextlib.contextmanager
def atomic_path(path: Path, verify: Verifier | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds, check the file and rename it over ``path``.

    The check: the file is non-empty, then ``verify(tmp)`` (default: :data:`VERIFIERS` by the target's
    suffix). Raises :class:`ArtifactError` if the check fails, :class:`DiskFullError` (naming ``path`` and the
    space left) if the disk filled and :class:`WriteError` (naming ``path`` and the system's reason) on any other
    refused write (EFBIG, EROFS, EACCES, EIO, ...), however the writer reported it: an ``OSError`` or, from writers
    outside Python (safetensors' Rust), its text. The temporary file is removed in every case, and ``path`` is
    left as it was unless the rename happened.
    """
    path = Path(path)
    check = verify or VERIFIERS.get(path.suffix)
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        yield tmp
        _check(tmp, path, check)
        # mkstemp (and some writers) create 0600 files; give the result a plain open()'s permissions.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except Exception as exc:
        code = _os_error_code(exc)
        if code in DISK_FULL:
            raise DiskFullError(
                f"no space left to write {path} ({_free_space(path.parent)} free on its file system): "
                "free some space or write elsewhere, then run the command again"
            ) from exc
        if code is not None:
            raise WriteError(
                f"cannot write {path}: {os.strerror(code)}{WRITE_HINTS.get(code, '')}; nothing was put in place"
            ) from exc
        raise
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def write_json_atomic(path: Path, payload: Any) -> None:
    """Serialise ``payload`` as indented strict JSON (:mod:`harness.strict_json`) and move it into place atomically."""
    with atomic_path(path, verify=verify_json) as tmp:
        tmp.write_text(strict_json.encode(payload) + "\n")


def _check(tmp: Path, path: Path, verify: Verifier | None) -> None:
    if not tmp.is_file() or tmp.stat().st_size == 0:
        raise ArtifactError(f"refusing to write {path}: the writer left an empty file")
    if verify is None:
        return
    try:
        verify(tmp)
    except Exception as exc:
        if _os_error_code(exc) is not None:
            raise
        raise ArtifactError(f"refusing to write {path}: it does not read back ({one_line(str(exc))})") from exc


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
#: The operating system's refusals of a write, each one clear line; DISK_FULL gets its own message.
WRITE_ERRNOS = (*DISK_FULL, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.ENOTDIR,
                errno.EISDIR, errno.ENAMETOOLONG, errno.EXDEV)  # fmt: skip
WRITE_HINTS = {
    errno.EFBIG: " (over the process's file-size limit, `ulimit -f`, or the file system's largest file)",
    errno.EROFS: ": write elsewhere",
    errno.EACCES: ": write elsewhere or change the folder's permissions",
    errno.EPERM: ": write elsewhere or change the folder's permissions",
}


def _os_error_code(exc: BaseException) -> int | None:
    """The errno of a refused write in ``exc`` (one of :data:`WRITE_ERRNOS`), else None."""
    if isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS:
        return exc.errno
    # Writers outside Python report it only as text: safetensors' Rust as "(os error N)", ffmpeg a full disk in the
    # OS's own words.
    text = str(exc)
    match = re.search(r"\(os error (\d+)\)", text)
    if match and int(match.group(1)) in WRITE_ERRNOS:
        return int(match.group(1))
    return next((code for code in DISK_FULL if os.strerror(code) in text), None)


def _free_space(folder: Path) -> str:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return "unknown space"
    units = ("bytes", "KiB", "MiB", "GiB", "TiB")
    exponent = min(int(math.log(free, 1024)) if free else 0, len(units) - 1)
    return f"{free} bytes" if exponent == 0 else f"{free / 1024**exponent:.1f} {units[exponent]}"


def one_line(text: str, limit: int = 300) -> str:
    """``text`` on one line (whitespace runs collapsed), cut to ``limit`` characters: for error messages."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."
