"""Writing videos: mp4 through imageio-ffmpeg (H.264, yuv420p), atomically; prompt-safe file names."""

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
