"""A killed `bench run` keeps its finished videos: the same command resumes at the first unfinished one."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import Crash, count_samples, invoke_cli, normalise, records_in

SEEDS = (0, 1, 2, 3)
STEPS = 1
RUN_ARGS = ("run", "--model", "wan-tiny", "--device", "cpu", "--no-progress", "--steps", str(STEPS),
            "--seeds", ",".join(map(str, SEEDS)), "--method")  # fmt: skip


def _bytes(runs: Path, names: list[str]) -> list[bytes]:
    return [(runs / name).read_bytes() for name in names]


@pytest.fixture(scope="module", params=["sdpa"])
def method(request: pytest.FixtureRequest) -> str:
    """The attention method of the run (a test may ask for others with indirect parametrisation)."""
    return request.param


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, method: str) -> Path:
    """A runs folder with the same run made in one go (read-only)."""
    runs = tmp_path_factory.mktemp("whole") / "runs"
    invoke_cli([*RUN_ARGS, method, "--runs-dir", runs])
    return runs


@pytest.fixture
def killed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str) -> Path:
    """A runs folder where the run was killed after its first 2 of 4 videos: no record, 2 videos kept."""
    runs = tmp_path / "runs"
    count_samples(monkeypatch, crash_after=2)
    result = invoke_cli([*RUN_ARGS, method, "--runs-dir", runs], expect=None)
    assert isinstance(result.exception, Crash)
    monkeypatch.undo()
    assert not list(runs.glob("*.json")), "a killed run has no record"
    (artifacts,) = [p for p in runs.iterdir() if p.is_dir()]
    assert len(list((artifacts / "frames").glob("*.safetensors"))) == 2 and len(list(artifacts.glob("*.mp4"))) == 2
    return runs


@pytest.mark.parametrize("method", ["sdpa", "svg", "svg2"], indirect=True)  # random draws, warm starts
def test_rerun_makes_only_the_unfinished_videos_bit_identically(
    killed: Path, uninterrupted: Path, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    """The rerun samples the 2 missing videos only; its frames and mp4s equal an uninterrupted run's byte for byte."""
    calls = count_samples(monkeypatch)
    invoke_cli([*RUN_ARGS, method, "--runs-dir", killed])
    assert len(calls) == 2
    (resumed,), (whole,) = records_in(killed), records_in(uninterrupted)
    assert resumed["artifacts"] == whole["artifacts"]
    assert [v["seed"] for v in resumed["artifacts"]["videos"]] == list(SEEDS)
    files = resumed["artifacts"]["frames"] + [v["video"] for v in resumed["artifacts"]["videos"]]
    assert _bytes(killed, files) == _bytes(uninterrupted, files)
    assert resumed["density"] == whole["density"]


def test_resumed_record_times_only_the_videos_it_made(killed: Path, method: str) -> None:
    """The record says how many videos were resumed, and its step statistics cover the generated ones only."""
    invoke_cli([*RUN_ARGS, method, "--runs-dir", killed])
    (record,) = records_in(killed)
    assert record["resumed_videos"] == 2
    steps = record["latency"]["stages"]["denoise_step"]
    assert steps["repeats"] + len(steps["warmup_ms"]) == 2 * STEPS
    assert "resumed_videos" in record["latency"]["note"]


def test_force_remakes_every_video(killed: Path, monkeypatch: pytest.MonkeyPatch, method: str) -> None:
    """--force ignores the finished videos of the killed attempt and samples all of them."""
    calls = count_samples(monkeypatch)
    invoke_cli([*RUN_ARGS, method, "--runs-dir", killed, "--force"])
    assert len(calls) == len(SEEDS)
    assert records_in(killed)[0]["resumed_videos"] == 0


@pytest.mark.parametrize("damage", ["truncate", "foreign-spec", "no-mp4"])
def test_a_damaged_video_is_made_again(
    killed: Path, uninterrupted: Path, monkeypatch: pytest.MonkeyPatch, damage: str, method: str
) -> None:
    """A kept video whose frames file is unreadable, of another spec, or without its mp4 counts as unfinished."""
    from safetensors.torch import load_file, save_file

    (frames_file, *_) = sorted(killed.rglob("frames/*.safetensors"))
    if damage == "truncate":
        frames_file.write_bytes(frames_file.read_bytes()[:-100])
    elif damage == "foreign-spec":
        save_file(
            load_file(frames_file), str(frames_file), metadata={"bench_video": '{"format": "1", "spec_hash": "0"}'}
        )
    else:
        frames_file.parent.parent.joinpath(frames_file.stem + ".mp4").unlink()
    calls = count_samples(monkeypatch)
    invoke_cli([*RUN_ARGS, method, "--runs-dir", killed])
    assert len(calls) == 3
    (record,) = records_in(killed)
    assert record["resumed_videos"] == 1
    assert _bytes(killed, record["artifacts"]["frames"]) == _bytes(uninterrupted, record["artifacts"]["frames"])


def test_finished_videos_are_left_untouched(killed: Path, method: str) -> None:
    """The rerun does not rewrite a finished video's files (same contents and modification time)."""
    kept = sorted(killed.rglob("*-seed[01].*"))
    before = [(p.stat().st_mtime_ns, p.read_bytes()) for p in kept]
    invoke_cli([*RUN_ARGS, method, "--runs-dir", killed])
    assert len(kept) == 4 and [(p.stat().st_mtime_ns, p.read_bytes()) for p in kept] == before


def test_killed_before_its_record_makes_no_video_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    """Killed after its last video but before the record: the rerun samples nothing, says so, writes the record."""
    import harness.generate

    def killed_here(*args: object) -> None:
        raise Crash("killed before the record")

    runs = tmp_path / "runs"
    monkeypatch.setattr(harness.generate, "write_record", killed_here)
    assert isinstance(invoke_cli([*RUN_ARGS, method, "--runs-dir", runs], expect=None).exception, Crash)
    monkeypatch.undo()
    calls = count_samples(monkeypatch)
    result = invoke_cli([*RUN_ARGS, method, "--runs-dir", runs])
    assert calls == []
    assert f"{len(SEEDS)} video(s) ({len(SEEDS)} resumed), untimed" in normalise(result.output)
    (record,) = records_in(runs)
    assert record["resumed_videos"] == len(SEEDS) and record["latency"]["end_to_end_ms_per_video"] is None
