"""Writing videos: mp4 through imageio-ffmpeg's ffmpeg (H.264, yuv420p), verified and atomic; prompt-safe file names.

Two naming schemes: :func:`safe_stem` (any text -> a portable stem, for the run's own files) and
:func:`benchmark_video_name` (VBench's exact ``<prompt>-<i>.mp4``, which must keep the prompt's text).
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import unicodedata
from pathlib import Path

import numpy as np
import torch

from harness.atomic import ArtifactError, atomic_path, one_line
from harness.errors import HarnessError

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


#: libx264's constant rate factor: imageio-ffmpeg's default quality 5, which earlier runs' mp4s were made with.
H264_CRF = 25


def check_mp4_size(height: int, width: int) -> None:
    """Refuse a frame size an H.264 yuv420p mp4 cannot hold: height and width must be even (chroma is 2 x 2).

    A run checks its decoded frame size with this before any model is built. Raises :class:`HarnessError`.
    """
    odd = [f"{name} {value}" for name, value in (("height", height), ("width", width)) if value % 2]
    if odd:
        raise HarnessError(
            f"an mp4 (H.264, yuv420p) needs an even height and width; got {height} x {width} "
            f"(odd {', '.join(odd)}): choose an even size"
        )


def write_mp4(path: Path, frames: torch.Tensor | np.ndarray, fps: int) -> None:
    """Write uint8 frames ``(F, H, W, 3)`` as an H.264 mp4, verified (it holds F frames) and put in place atomically.

    Raises :class:`HarnessError` for an odd height or width (before ffmpeg starts), :class:`ArtifactError`
    if ffmpeg fails or its file does not hold ``F`` frames, :class:`DiskFullError` on a full disk;
    nothing is left at ``path`` in those cases. Same frames and fps give a byte-identical file.
    """
    import imageio_ffmpeg

    array = frames.numpy() if isinstance(frames, torch.Tensor) else frames
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3 or not array.shape[0]:
        raise ValueError(f"expected uint8 frames (F, H, W, 3) with F >= 1, got {array.dtype} {array.shape}")
    count, height, width, _ = array.shape
    check_mp4_size(height, width)
    with atomic_path(Path(path), verify=lambda written: _check_frame_count(written, count)) as tmp:
        command = [
            imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error",
            "-f", "rawvideo", "-vcodec", "rawvideo", "-s", f"{width}x{height}", "-pix_fmt", "rgb24",
            "-r", str(fps), "-i", "-", "-an",
            "-vcodec", "libx264", "-pix_fmt", "yuv420p", "-crf", str(H264_CRF), "-f", "mp4", str(tmp),
        ]  # fmt: skip
        done = subprocess.run(command, input=np.ascontiguousarray(array).tobytes(), capture_output=True, check=False)
        if done.returncode != 0:
            raise ArtifactError(
                f"ffmpeg could not encode {path} (exit {done.returncode}): "
                f"{one_line(done.stderr.decode(errors='replace')) or 'no message'}"
            )


def count_mp4_frames(path: Path) -> int:
    """The number of video frames in the mp4 at ``path`` (its packets, read without decoding).

    Raises ``ValueError`` with ffmpeg's message if the file does not open as a video.
    """
    import imageio_ffmpeg

    command = [imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-loglevel", "error", "-i", str(path),
               "-map", "0:v:0", "-c", "copy", "-f", "null", "-progress", "pipe:1", "-nostats", "-"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, check=False)
    if done.returncode != 0:
        raise ValueError(f"ffmpeg cannot read it: {one_line(done.stderr.decode(errors='replace')) or 'no message'}")
    counts = re.findall(rb"^frame=(\d+)$", done.stdout, flags=re.MULTILINE)
    if not counts:
        raise ValueError("ffmpeg reported no frame count")
    return int(counts[-1])


def _check_frame_count(path: Path, expected: int) -> None:
    found = count_mp4_frames(path)
    if found != expected:
        raise ValueError(f"it holds {found} frame(s), not the {expected} written")
