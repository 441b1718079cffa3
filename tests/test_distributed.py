"""`bench run` under torchrun: ranks share the videos, rank 0 writes one record equal to a single-process run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import Crash, count_samples, invoke_cli, records_in

from harness.distributed import Ranks, child_visible_devices, current_ranks, rank_device, rank_group, visible_gpus
from harness.errors import HarnessError
from harness.eval.run_suites import load_frames

RUN_ARGS = ("run", "--method", "sdpa", "--model", "wan-tiny", "--device", "cpu", "--no-progress", "--steps", "2",
            "--seeds", "0,1,2")  # fmt: skip


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_shares_cover_every_item_once(world_size: int) -> None:
    """The ranks' shares are disjoint, cover the work and differ in size by at most one."""
    items = list(range(10))
    shares = [Ranks(rank, world_size).share(items) for rank in range(world_size)]
    assert sorted(x for share in shares for x in share) == items
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_inconsistent_torchrun_environment_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(HarnessError, match="inconsistent torchrun environment"):
        current_ranks()


@pytest.mark.parametrize(("ranks", "expected"), [(Ranks(), "cuda:0"), (Ranks(1, 2, 1), "cuda:1")])
def test_a_bare_cuda_device_leaves_with_an_index(monkeypatch: pytest.MonkeyPatch, ranks: Ranks, expected: str) -> None:
    """NCCL's init_process_group(device_id=...) refuses ``cuda`` without an index (found on the H200 with
    train_fsdp_gpu in one process): one process gets the current GPU, a rank its LOCAL_RANK's."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert rank_device(torch.device("cuda"), ranks) == torch.device(expected)
    assert rank_device(torch.device("cuda", 1), ranks) == torch.device("cuda", 1)
    assert rank_device(torch.device("cpu"), ranks) == torch.device("cpu")


@pytest.mark.parametrize(("device", "current"), [("cuda:1", ["cuda:1"]), ("cpu", []), ("cuda", [])])
def test_a_run_on_an_indexed_gpu_makes_it_current(monkeypatch: pytest.MonkeyPatch, device: str,
                                                  current: list[str]) -> None:  # fmt: skip
    """One process on cuda:1 (bench run or train --device cuda:1, a variant bench ablate dealt there) computes with
    cuda:1 current: Triton's launches and the timers' CUDA events follow the current device, not the tensors'."""
    seen: list[str] = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda target: seen.append(str(target)))
    with rank_group(Ranks(), torch.device(device)):
        assert seen == current


def test_bench_latency_on_an_indexed_gpu_makes_it_current(monkeypatch: pytest.MonkeyPatch) -> None:
    """bench latency --device cuda:1 times with cuda:1 current (it builds no process group)."""
    from harness import latency_run
    from harness.latency_run import LatencyRequest, run_latency

    def stop(device: torch.device) -> None:
        raise RuntimeError(f"current {device}")

    monkeypatch.setattr(latency_run, "_validate", lambda request: ([], torch.device("cuda", 1), torch.float32))
    monkeypatch.setattr(latency_run, "use_device", stop)
    with pytest.raises(RuntimeError, match="current cuda:1"):
        run_latency(LatencyRequest(model="wan-tiny", methods=["sdpa"]))


def _torchrun(args: list[str], ranks: int) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
               "-m", "harness.cli", *args]  # fmt: skip
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)


def test_two_ranks_write_the_single_process_record(tmp_path: Path) -> None:
    """Two ranks under torchrun make the 3 videos of one run; the record equals a single-process run's."""
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    invoke_cli([*RUN_ARGS, "--runs-dir", single])
    done = _torchrun([*RUN_ARGS, "--runs-dir", str(sharded)], ranks=2)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    (one,), (two,) = records_in(single), records_in(sharded)
    assert two["run_id"] == one["run_id"] and two["ranks"] == 2
    assert len(two["rank_wall_seconds"]) == 2 and all(seconds > 0 for seconds in two["rank_wall_seconds"])
    assert [v["seed"] for v in two["artifacts"]["videos"]] == [0, 1, 2]
    assert len(two["artifacts"]["frames"]) == 3, "one frames file per video"
    frames_one, frames_two = load_frames(one, single), load_frames(two, sharded)
    assert frames_one.keys() == frames_two.keys()
    for key, frames in frames_one.items():
        assert (frames.int() - frames_two[key].int()).abs().max() <= 1, key
    steps = two["latency"]["stages"]["denoise_step"]
    assert steps["repeats"] + len(steps["warmup_ms"]) == 3 * 2 and len(steps["warmup_ms"]) == 2, "a warm-up per rank"
    assert not list((sharded / two["run_id"]).glob("share.rank*.json")), "the shares' summaries are removed"


def test_two_ranks_resume_a_killed_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run killed after its first video, started again on two ranks: they make only the two missing videos."""
    runs = tmp_path / "runs"
    count_samples(monkeypatch, crash_after=1)
    assert isinstance(invoke_cli([*RUN_ARGS, "--runs-dir", runs], expect=None).exception, Crash)
    monkeypatch.undo()
    (kept,) = runs.rglob("frames/*.safetensors")
    before = kept.stat().st_mtime_ns
    done = _torchrun([*RUN_ARGS, "--runs-dir", str(runs)], ranks=2)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (record,) = records_in(runs)
    assert record["ranks"] == 2 and record["resumed_videos"] == 1
    assert [v["seed"] for v in record["artifacts"]["videos"]] == [0, 1, 2]
    assert kept.stat().st_mtime_ns == before, "the finished video is not made again"
    steps = record["latency"]["stages"]["denoise_step"]
    assert steps["repeats"] + len(steps["warmup_ms"]) == 2 * 2


def test_more_ranks_than_videos_is_an_error(tmp_path: Path) -> None:
    """Four ranks for three videos stop before any model is built, with a message naming both counts."""
    done = _torchrun([*RUN_ARGS, "--runs-dir", str(tmp_path / "runs")], ranks=4)
    assert done.returncode != 0
    assert "4 ranks for 3 video(s)" in done.stdout + done.stderr
    assert not list((tmp_path / "runs").glob("*.json"))


def test_frames_per_rank_load_as_one_mapping(tmp_path: Path) -> None:
    """A record listing one frames file per rank loads as the union of their tensors."""
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(1, dtype=torch.uint8)}, str(tmp_path / "f0.safetensors"))
    save_file({"b": torch.ones(1, dtype=torch.uint8)}, str(tmp_path / "f1.safetensors"))
    record = {"artifacts": {"frames": ["f0.safetensors", "f1.safetensors"]}}
    assert sorted(load_frames(record, tmp_path)) == ["a", "b"]


@pytest.mark.parametrize(("device", "expected"), [("cuda", [0, 1]), ("auto", [0, 1]), ("cuda:1", []), ("cpu", [])])
def test_independent_jobs_spread_over_every_visible_gpu_only_for_a_bare_cuda(
    monkeypatch: pytest.MonkeyPatch, device: str, expected: list[int]
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert visible_gpus(device) == expected


@pytest.mark.parametrize(
    ("listed", "ordinal", "expected"),
    [(None, 1, "1"), ("1", 0, "1"), ("3,2", 1, "2"), (" GPU-aa , GPU-bb", 1, "GPU-bb")],
)  # fmt: skip
def test_a_child_sees_the_parents_gpu_of_that_ordinal(
    monkeypatch: pytest.MonkeyPatch, listed: str | None, ordinal: int, expected: str
) -> None:
    """Ordinals count the GPUs this process sees; the child gets the parent's own CUDA_VISIBLE_DEVICES entry."""
    if listed is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", listed)
    assert child_visible_devices(ordinal) == expected


def test_an_ordinal_beyond_the_visible_gpus_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    with pytest.raises(HarnessError, match="GPU ordinal 1 is not among CUDA_VISIBLE_DEVICES='1'"):
        child_visible_devices(1)
