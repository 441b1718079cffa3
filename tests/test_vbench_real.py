"""Real VBench end to end (`make test-vbench`): its own venv, temporal_flickering on toy clips, record and report.

Builds the venv under $BENCH_VBENCH_CACHE (reused when already set up; ~4 minutes and ~6 GB the first
time), so it is excluded from `make test`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
from conftest import normalise

pytestmark = pytest.mark.vbench
TOY_PROMPTS = ("a small red disk moves left on a gray background", "a large blue square moves up on a black background")


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import invoke_cli

    root = Path(os.environ.get("BENCH_VBENCH_CACHE") or tmp_path_factory.mktemp("vbench-cache"))
    invoke_cli(["vbench", "setup", "--cache", root])
    return root


def _flicker_of_mp4(path: Path) -> float:
    """VBench's formula on the decoded mp4, computed here independently: (255 - mean |f_t - f_t-1|) / 255."""
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    width, height = meta["size"]
    frames = np.stack([np.frombuffer(f, np.uint8).reshape(height, width, 3) for f in reader]).astype(np.float32)
    return (255.0 - np.abs(np.diff(frames, axis=0)).mean()) / 255.0


def test_temporal_flickering_runs_for_real_and_lands_in_record_and_report(bench, cache: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    args = [
        "run",
        "--model",
        "toy",
        "--device",
        "cpu",
        "--steps",
        "4",
        "--seeds",
        "0,1",
        "--eval",
        "vbench",
        "--dimensions",
        "temporal_flickering",
        "--cache",
        cache,
        "--eval-device",
        "cpu",
        "--runs-dir",
        runs,
        "--no-progress",
    ]
    bench(*args, *[a for p in TOY_PROMPTS for a in ("--prompt", p)])
    (path,) = runs.glob("*.json")
    record = json.loads(path.read_text())
    evaluation = record["evaluations"]["vbench"][-1]
    raw = evaluation["raw"]["temporal_flickering"]
    assert record["metrics"]["vbench"]["temporal_flickering"] == pytest.approx(100 * raw)
    assert evaluation["mode"] == "custom_input" and evaluation["versions"]["vbench"] == "0.1.5"
    staged = sorted((runs / record["run_id"] / "vbench" / "videos").iterdir())
    assert [p.name for p in staged] == sorted(f"{p}-{i}.mp4" for p in TOY_PROMPTS for i in (0, 1))
    expected = np.mean([_flicker_of_mp4(p) for p in staged])
    assert raw == pytest.approx(expected, abs=2e-3)
    per_video = [v["metrics"]["vbench"]["temporal_flickering"] for v in record["artifacts"]["videos"]]
    assert np.mean(per_video) == pytest.approx(raw)
    report = json.loads(bench("report", "--runs-dir", runs, "--out", tmp_path / "report", "--json").stdout)
    (row,) = report["tables"]["table1"]
    assert row["temporal_flickering"] == pytest.approx(100 * raw) and row["latency_s"] > 0
    assert "temporal_flickering" in normalise(bench("report", "--runs-dir", runs, "--out", tmp_path / "r2").stdout)


def test_stale_result_never_passes_for_success(bench, cache: Path, tmp_path: Path) -> None:
    """A driver that fails (an unknown mode here) leaves no result: the harness reports the failure and its log."""
    from harness.errors import HarnessError
    from harness.eval.vbench.environment import Cache
    from harness.eval.vbench.runner import BenchmarkRequest, evaluate_videos

    video = tmp_path / "v.mp4"
    from harness.video import write_mp4

    write_mp4(video, np.zeros((5, 16, 16, 3), np.uint8), 8)
    request = BenchmarkRequest("vbench", ("temporal_flickering",), Cache.resolve(cache), "cpu")
    result = evaluate_videos(request, [video], ["still-0.mp4"], tmp_path / "ok", standard=False, labels=["still"])
    assert result.raw["temporal_flickering"] == pytest.approx(1.0)
    with pytest.raises(HarnessError, match=r"not in VBench_full_info\.json|wrote no result"):
        evaluate_videos(request, [video], ["still-0.mp4"], tmp_path / "ok", standard=True, labels=["still"])
