"""Writing videos: mp4 through imageio-ffmpeg (H.264, yuv420p), atomically; prompt-safe file names.

Two naming schemes: :func:`safe_stem` (any text -> a portable stem, for the run's own files) and
:func:`benchmark_video_name` (VBench's exact ``<prompt>-<i>.mp4``, which must keep the prompt's text).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from pathlib import Path

import numpy as np
import torch

from harness.atomic import atomic_path

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_stem(text: str, max_length: int = 80) -> str:
    """A file-name stem from free text: ASCII letters, digits, ``._-`` only, never a path, never empty.

    A short hash of the full text keeps distinct prompts distinct after truncation.
    """
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    stem = _UNSAFE.sub("-", ascii_text).strip("-._")[:max_length].rstrip("-._") or "prompt"
    return f"{stem}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


#: The longest file name Linux file systems take, in bytes.
MAX_NAME_BYTES = 255


def benchmark_video_name(label: str, index: int, max_prompt_chars: int | None = None) -> str:
    """VBench's file name for video ``index`` of a prompt: ``<label[:max_prompt_chars]>-<index>.mp4``.

    VBench matches files by the exact prompt text, so the text is kept as it is (spaces, quotes,
    commas, parentheses, non-ASCII); what could leave the folder or is not a valid name is refused.
    VBench-2.0 cuts prompts at 180 characters (``max_prompt_chars=180``).
    """
    if index < 0:
        raise ValueError(f"video index must be >= 0, got {index}")
    text = label[:max_prompt_chars] if max_prompt_chars else label
    name = f"{text}-{index}.mp4"
    problems = [
        why
        for why, bad in (
            ("is empty", not text.strip()),
            ("contains a path separator", "/" in text or "\\" in text),
            ("contains a control character", any(ord(ch) < 32 or ord(ch) == 127 for ch in text)),
            ("starts with a dot (a hidden or relative name)", text.startswith(".")),
            (f"is longer than {MAX_NAME_BYTES} bytes as a file name", len(name.encode()) > MAX_NAME_BYTES),
        )
        if bad
    ]
    if problems:
        raise ValueError(f"prompt {label[:60]!r} cannot name a benchmark video: it {', '.join(problems)}")
    return name


def place_in(folder: Path, name: str) -> Path:
    """``folder / name``, guaranteed to be a direct child of ``folder`` (never elsewhere)."""
    target = (Path(folder) / name).resolve()
    if target.parent != Path(folder).resolve() or Path(name).name != name:
        raise ValueError(f"file name {name!r} would leave {folder}")
    return target


def write_mp4(path: Path, frames: torch.Tensor | np.ndarray, fps: int) -> None:
    """Write uint8 frames ``(F, H, W, 3)`` as an H.264 mp4 (even height and width required)."""
    import imageio_ffmpeg

    array = frames.numpy() if isinstance(frames, torch.Tensor) else frames
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames (F, H, W, 3), got {array.dtype} {array.shape}")
    _, height, width, _ = array.shape
    with atomic_path(Path(path)) as tmp:
        writer = imageio_ffmpeg.write_frames(
            str(tmp),
            (width, height),
            fps=fps,
            codec="libx264",
            pix_fmt_out="yuv420p",
            macro_block_size=1,
            ffmpeg_log_level="error",
            output_params=["-f", "mp4"],
        )
        writer.send(None)
        for frame in array:
            writer.send(np.ascontiguousarray(frame))
        writer.close()
