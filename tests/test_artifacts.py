"""Writes that could leave a wrong file: every artifact is verified before it is put in place (harness.atomic).

An odd frame size is refused before ffmpeg starts, a failed ffmpeg leaves nothing, a full disk is one
clear error, and every JSON file is strict (non-finite numbers as null, noted).
"""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import harness.video
from harness import strict_json
from harness.atomic import ArtifactError, DiskFullError, atomic_path, write_json_atomic
from harness.errors import HarnessError
from harness.records import read_record, write_record
from harness.video import check_mp4_size, count_mp4_frames, write_mp4

FRAMES = np.random.default_rng(0).integers(0, 256, (5, 32, 48, 3), dtype=np.uint8)


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _refuse(constant: str) -> None:
    raise ValueError(f"non-strict JSON constant {constant}")


def test_write_mp4_round_trips_its_frame_count(tmp_path: Path) -> None:
    """A written mp4 holds as many frames as were sent, and nothing else is left in the folder."""
    write_mp4(tmp_path / "v.mp4", FRAMES, fps=8)
    assert count_mp4_frames(tmp_path / "v.mp4") == len(FRAMES)
    assert _files(tmp_path) == ["v.mp4"]


def test_odd_size_is_refused_before_ffmpeg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """write_mp4 of 33 x 35 frames: a clear error naming the size, ffmpeg never started, no file left."""

    def no_ffmpeg(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("ffmpeg was started")

    monkeypatch.setattr(harness.video.subprocess, "run", no_ffmpeg)
    with pytest.raises(HarnessError, match=r"even height and width; got 33 x 35"):
        write_mp4(tmp_path / "odd.mp4", np.zeros((9, 33, 35, 3), np.uint8), fps=8)
    assert _files(tmp_path) == []


def test_preflight_size_check_names_the_odd_axis() -> None:
    """The check a run's preflight calls refuses an odd width alone, and accepts even sizes."""
    check_mp4_size(64, 48)
    with pytest.raises(HarnessError, match=r"odd width 35"):
        check_mp4_size(64, 35)


def _fake_encoder(returncode: int, output: bytes, stderr: bytes = b"") -> Any:
    """subprocess.run that fakes ffmpeg's encode (writes ``output``, exits ``returncode``) and runs anything else."""
    real_run = subprocess.run

    def run(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
        if "rawvideo" not in command:
            return real_run(command, **kwargs)
        Path(command[-1]).write_bytes(output)
        return subprocess.CompletedProcess(command, returncode, b"", stderr)

    return run


@pytest.mark.parametrize(
    ("returncode", "output", "message"),
    [
        (1, b"", r"ffmpeg could not encode .*exit 1.*Invalid argument"),
        (0, b"", r"the writer left an empty file"),
        (0, b"not an mp4 at all", r"does not read back \(ffmpeg cannot read it"),
    ],
    ids=["exit-code", "empty-file", "unreadable-file"],
)
def test_failed_encode_puts_nothing_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, returncode: int, output: bytes, message: str
) -> None:
    """A failed or silent-but-wrong ffmpeg: one clear error, the previous file untouched, no temporary left."""
    target = tmp_path / "v.mp4"
    target.write_bytes(b"previous video")
    monkeypatch.setattr(harness.video.subprocess, "run", _fake_encoder(returncode, output, b"Invalid argument"))
    with pytest.raises(ArtifactError, match=message):
        write_mp4(target, FRAMES, fps=8)
    assert target.read_bytes() == b"previous video"
    assert _files(tmp_path) == ["v.mp4"]


def test_ffmpeg_disk_full_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ffmpeg failing on a full disk (reported only in its stderr) becomes the disk-full error, nothing left."""
    stderr = b"[out#0/mp4] Error muxing a packet: No space left on device\n"
    monkeypatch.setattr(harness.video.subprocess, "run", _fake_encoder(228, b"\x00" * 100, stderr))
    with pytest.raises(DiskFullError, match=r"no space left to write .*v\.mp4 \(.* free on its file system\)"):
        write_mp4(tmp_path / "v.mp4", FRAMES, fps=8)
    assert _files(tmp_path) == []


def _half_then_enospc(path: Path, payload: bytes) -> None:
    path.write_bytes(payload[: len(payload) // 2])
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("suffix", [".json", ".safetensors", ".md"])
def test_enospc_mid_write_is_one_clear_error(tmp_path: Path, suffix: str) -> None:
    """ENOSPC half-way through any artifact: DiskFullError naming the path and the space left; no partial file."""
    target = tmp_path / f"artifact{suffix}"
    with pytest.raises(DiskFullError) as caught, atomic_path(target) as tmp:
        _half_then_enospc(tmp, b"x" * 64)
    assert str(target) in str(caught.value) and "free on its file system" in str(caught.value)
    assert _files(tmp_path) == []


def test_enospc_in_write_json_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A record write that hits ENOSPC is the same one error, and the old record stays."""
    target = tmp_path / "r.json"
    target.write_text('{"old": true}')
    monkeypatch.setattr(Path, "write_text", lambda self, text: _half_then_enospc(self, text.encode()))
    with pytest.raises(DiskFullError, match=r"r\.json"):
        write_json_atomic(target, {"new": True})
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"old": True}
    assert _files(tmp_path) == ["r.json"]


def test_truncated_safetensors_is_not_put_in_place(tmp_path: Path) -> None:
    """A safetensors file whose header does not cover the file (a writer cut short) is refused."""
    from safetensors.torch import save

    data = save({"x": torch.zeros(100)})
    with pytest.raises(ArtifactError, match=r"x\.safetensors: it does not read back"), \
            atomic_path(tmp_path / "x.safetensors") as tmp:  # fmt: skip
        tmp.write_bytes(data[:-10])
    assert _files(tmp_path) == []


def test_non_strict_json_is_not_put_in_place(tmp_path: Path) -> None:
    """A .json file with a bare NaN (what json.dumps writes by default) is refused by the .json check."""
    with pytest.raises(ArtifactError, match=r"NaN is not strict JSON"), atomic_path(tmp_path / "p.json") as tmp:
        tmp.write_text(json.dumps({"threshold": float("nan")}))
    assert _files(tmp_path) == []


def test_record_with_non_finite_numbers_is_strict_json(tmp_path: Path) -> None:
    """inf / -inf / NaN are written as null with a note per value, and the file parses strictly."""
    record = {"kind": "run", "spec": {}, "metrics": {"fidelity": {"psnr_db": float("inf"), "ssim": 1.0}},
              "per_video": [1.5, float("-inf"), float("nan")], "a/b": {"c": np.float32("nan")}}  # fmt: skip
    path = tmp_path / "r.json"
    write_record(path, record)
    data = json.loads(path.read_text(), parse_constant=_refuse)
    assert data["metrics"]["fidelity"] == {"psnr_db": None, "ssim": 1.0}
    assert data["per_video"] == [1.5, None, None]
    assert data["non_finite_as_null"] == {
        "/metrics/fidelity/psnr_db": "Infinity",
        "/per_video/1": "-Infinity",
        "/per_video/2": "NaN",
        "/a~1b/c": "NaN",
    }


def test_notes_follow_the_values_across_rewrites(tmp_path: Path) -> None:
    """A record read back and written again keeps its notes; a note goes once a finite value replaces its null."""
    path = tmp_path / "r.json"
    latency_fields = {"model": "toy", "methods": {}, "environment": {}, "baseline": "sdpa", "tokens": 512}
    write_record(path, {"kind": "latency", "spec": {}, **latency_fields,
                        "metrics": {"psnr_db": float("inf"), "flow": float("nan")}})  # fmt: skip
    record = read_record(path)
    record["metrics"]["flow"] = 2.0
    write_record(path, record)
    data = strict_json.decode(path.read_text())
    assert data["metrics"] == {"psnr_db": None, "flow": 2.0}
    assert data["non_finite_as_null"] == {"/metrics/psnr_db": "Infinity"}


def test_safetensors_with_metadata_are_the_same_bytes_in_every_process(tmp_path: Path) -> None:
    """safetensors orders metadata by a per-process hash; written through atomic_path, the same content is the same
    file from any process (a resumed training's checkpoint once differed from an uninterrupted one's in that order)."""
    script = (
        "import sys, torch\n"
        "from pathlib import Path\n"
        "from harness.checkpoints import save_tensors\n"
        "save_tensors({'b': torch.ones(3), 'a': torch.zeros(2)}, Path(sys.argv[1]),\n"
        "             {'method': 'x', 'params': '{}', 'z': 'w', 'kernel': 'hedgehog', 'step': '3'})\n"
    )
    outputs = []
    for index in range(6):  # the hash seed differs per process: six processes gave three orders before the fix
        path = tmp_path / f"{index}.safetensors"
        subprocess.run([sys.executable, "-c", script, str(path)], check=True, cwd=Path(__file__).parents[1])
        outputs.append(path.read_bytes())
    assert all(output == outputs[0] for output in outputs)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "0.safetensors"), "pt") as handle:
        assert handle.metadata()["kernel"] == "hedgehog"  # still readable as metadata
