"""A run's finished videos on disk: each video saved as soon as it is made, found again when a run resumes.

Every video of a run keeps ``<run-id>/<stem>.mp4`` and ``<run-id>/frames/<stem>.safetensors``: the decoded
uint8 frames ``(F, H, W, 3)`` under the key ``<stem>``, with the video's record entry, the spec hash and
the video's density log in the header. Both are verified and written atomically, the frames file last, so
a frames file whose header names this spec marks a finished video: a killed run, started again, makes only
the videos without one. The run record lists the frames files (``artifacts.frames``) when the run ends.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from harness.atomic import atomic_path
from harness.spec import RunSpec
from harness.video import safe_stem, write_mp4

FRAMES_FOLDER = "frames"
#: The frames file's metadata key holding the video's JSON header.
HEADER_KEY = "bench_video"
#: The header layout of a video's frames file; a file of another layout is made again.
FRAMES_FORMAT = "1"

DensityEntries = list[tuple[int, int, float, int]]  # DensityLog.entries()


@dataclass(frozen=True)
class FinishedVideo:
    """One video on disk: its record entry, its frames file (relative to the runs folder) and its density log."""

    entry: dict[str, Any]
    frames: str
    density: DensityEntries


def video_stem(spec: RunSpec, prompt_index: int, seed_index: int) -> str:
    """The file stem (and frames key) of one video: the prompt's label made safe, then its seed."""
    return f"{safe_stem(spec.label(prompt_index))}-seed{spec.seeds[seed_index]}"


def save_video(
    spec: RunSpec,
    prompt_index: int,
    seed_index: int,
    frames: torch.Tensor,
    density: DensityEntries,
    artifacts_dir: Path,
    runs_dir: Path,
) -> FinishedVideo:
    """Write one video's mp4, then its frames file (the mark that it is finished); both verified, atomic.

    ``frames``: uint8 ``(F, H, W, 3)``. Raises what :func:`harness.video.write_mp4` and
    :func:`harness.atomic.atomic_path` raise (an odd size, a failed encode, a full disk).
    """
    from safetensors.torch import save_file

    stem = video_stem(spec, prompt_index, seed_index)
    video_path = artifacts_dir / f"{stem}.mp4"
    write_mp4(video_path, frames, spec.sampling.fps)
    entry = {
        "prompt": spec.prompts[prompt_index],
        "label": spec.label(prompt_index),
        "prompt_index": prompt_index,
        "seed": spec.seeds[seed_index],
        "index": seed_index,
        "video": str(video_path.relative_to(runs_dir)),
        "frames_key": stem,
    }
    frames_path = _frames_path(artifacts_dir, stem)
    # One metadata key: safetensors writes several in a hash map's order, which differs between calls.
    header = json.dumps({"format": FRAMES_FORMAT, "spec_hash": spec.hash(), "video": entry, "density": density})
    with atomic_path(frames_path) as tmp:
        save_file({stem: frames.contiguous()}, str(tmp), metadata={HEADER_KEY: header})
    return FinishedVideo(entry, str(frames_path.relative_to(runs_dir)), density)


def find_video(spec: RunSpec, prompt_index: int, seed_index: int, artifacts_dir: Path, runs_dir: Path
               ) -> FinishedVideo | None:  # fmt: skip
    """The video an earlier attempt of this spec finished, or None if it must be made (missing, foreign, unreadable)."""
    from safetensors import SafetensorError, safe_open

    stem = video_stem(spec, prompt_index, seed_index)
    frames_path = _frames_path(artifacts_dir, stem)
    if not frames_path.is_file():
        return None
    try:
        with safe_open(str(frames_path), "pt") as handle:
            header, keys = json.loads((handle.metadata() or {})[HEADER_KEY]), set(handle.keys())
        if header["format"] != FRAMES_FORMAT or header["spec_hash"] != spec.hash() or stem not in keys:
            return None
        entry, density = header["video"], [tuple(row) for row in header["density"]]
    except (OSError, SafetensorError, KeyError, TypeError, ValueError):
        return None
    if not (Path(runs_dir) / entry["video"]).is_file():
        return None
    return FinishedVideo(entry, str(frames_path.relative_to(runs_dir)), density)  # type: ignore[arg-type]


def _frames_path(artifacts_dir: Path, stem: str) -> Path:
    return Path(artifacts_dir) / FRAMES_FOLDER / f"{stem}.safetensors"
