"""`bench run` end to end on wan-tiny: record, video, skip/force, determinism, cohort, report."""

from __future__ import annotations

import shutil
from pathlib import Path

import imageio_ffmpeg
import pandas as pd
import pytest
import torch
from conftest import invoke_cli, normalise, records_in

from harness.eval.run_suites import load_frames
from harness.spec import RunSpec
from harness.video import safe_stem

RUN_ARGS = ("run", "--method", "sdpa", "--model", "wan-tiny", "--device", "cpu", "--no-progress")


@pytest.fixture(scope="module")
def single_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A runs folder holding exactly one finished sdpa run (read-only: copy before changing)."""
    runs = tmp_path_factory.mktemp("single") / "runs"
    invoke_cli([*RUN_ARGS, "--runs-dir", runs])
    return runs


@pytest.fixture
def single_run_copy(single_run: Path, tmp_path: Path) -> Path:
    target = tmp_path / "runs"
    shutil.copytree(single_run, target)
    return target


def _record_file(runs: Path) -> Path:
    (path,) = runs.glob("*.json")
    return path


def test_run_writes_one_record_and_one_mp4(single_run: Path) -> None:
    """One run writes exactly one record JSON and one non-empty mp4 of 9 frames, plus the video's frame tensors."""
    records = list(single_run.rglob("*.json"))
    videos = list(single_run.rglob("*.mp4"))
    assert len(records) == 1 and len(videos) == 1
    (artifacts,) = [p for p in single_run.iterdir() if p.is_dir()]
    assert artifacts.name == records[0].stem
    assert sorted(p.name for p in artifacts.iterdir()) == sorted([videos[0].name, "frames"])
    assert [p.name for p in (artifacts / "frames").iterdir()] == [f"{videos[0].stem}.safetensors"]
    assert videos[0].stat().st_size > 0
    frames, _seconds = imageio_ffmpeg.count_frames_and_secs(str(videos[0]))
    assert frames == 9
    assert not [p for p in single_run.rglob(".*")], "temporary files left behind"


def test_video_is_named_after_prompt_and_seed(single_run: Path) -> None:
    """The mp4 is named from a safe stem of the prompt and the seed, and listed in the record."""
    from harness.models.wan import WanTiny

    (default_prompt,) = WanTiny.default_prompts()
    (record,) = records_in(single_run)
    (video,) = record["artifacts"]["videos"]
    assert video["prompt"] == default_prompt and video["seed"] == 0
    assert Path(video["video"]).name == f"{safe_stem(default_prompt)}-seed0.mp4"
    assert (single_run / video["video"]).is_file()
    assert set(load_frames(record, single_run)) == {video["frames_key"]}


def test_record_contents(single_run: Path) -> None:
    """The record carries spec and its hash, environment, per-stage latency, density and weights facts."""
    (record,) = records_in(single_run)
    spec = RunSpec.from_dict(record["spec"])
    assert record["kind"] == "run" and record["status"] == "complete"
    assert record["spec_hash"] == spec.hash()
    assert record["run_id"] == spec.run_id == _record_file(single_run).stem
    assert record["cohort"] == spec.cohort()
    assert (spec.model, spec.method, spec.device, spec.dtype) == ("wan-tiny", "sdpa", "cpu", "float32")
    assert {"torch", "diffusers", "git_commit"} <= set(record["environment"])
    assert record["environment"]["torch"] == torch.__version__
    stages = record["latency"]["stages"]
    assert {"denoise_step", "decode", "prompt_encoding"} <= set(stages)
    assert stages["denoise_step"]["median_ms"] > 0
    assert stages["denoise_step"]["repeats"] + len(stages["denoise_step"]["warmup_ms"]) == spec.sampling.steps
    assert record["latency"]["end_to_end_ms_per_video"] > 0
    assert record["density"]["mean"] == 1.0
    assert set(record["density"]["per_step"]) == {str(s) for s in range(spec.sampling.steps)}
    assert record["weights"] == "random"
    assert record["quality_reportable"] is False
    assert record["token_grid"]["frames"] * record["token_grid"]["height"] * record["token_grid"]["width"] == 48


def test_rerun_is_skipped_without_rewriting(single_run_copy: Path) -> None:
    """Running the same spec again prints 'skipped' and leaves the record and video untouched."""
    record = _record_file(single_run_copy)
    (video,) = single_run_copy.rglob("*.mp4")
    before = (record.stat().st_mtime_ns, video.stat().st_mtime_ns, record.read_bytes())
    result = invoke_cli([*RUN_ARGS, "--runs-dir", single_run_copy])
    assert "skipped" in normalise(result.output)
    assert (record.stat().st_mtime_ns, video.stat().st_mtime_ns, record.read_bytes()) == before


def test_a_finished_run_made_with_other_kernels_is_not_returned_as_this_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With BENCH_LINEAR_BACKEND changed since a linear-attention run finished, the same spec is refused (naming
    the variable, both values and the ways out), not skipped: the record measured other kernels. --force reruns
    it."""
    runs = tmp_path / "runs"
    args = ["run", "--method", "linear", "--model", "wan-tiny", "--device", "cpu", "--no-progress", "--runs-dir", runs]
    invoke_cli(args)
    record = _record_file(runs)
    before = record.read_bytes()
    monkeypatch.setenv("BENCH_LINEAR_BACKEND", "torch")
    result = invoke_cli(args, expect=2)
    assert "BENCH_LINEAR_BACKEND=auto (now torch)" in normalise(result.output) and "--force" in result.output
    assert record.read_bytes() == before
    invoke_cli([*args, "--force"])
    assert records_in(runs)[0]["environment"]["kernel_choices"]["BENCH_LINEAR_BACKEND"] == "torch"


def test_a_kernel_choice_the_method_does_not_read_does_not_stop_a_skip(
    single_run_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """sdpa reads no kernel variable: a finished sdpa run is still skipped after BENCH_KMEANS_UPDATE changed."""
    monkeypatch.setenv("BENCH_KMEANS_UPDATE", "sorted")
    assert "skipped" in normalise(invoke_cli([*RUN_ARGS, "--runs-dir", single_run_copy]).output)


def test_force_reruns(single_run_copy: Path) -> None:
    """--force reruns a finished spec and rewrites its record."""
    record = _record_file(single_run_copy)
    before = record.stat().st_mtime_ns
    result = invoke_cli([*RUN_ARGS, "--runs-dir", single_run_copy, "--force"])
    assert "skipped" not in result.output
    assert " done" in normalise(result.output)
    assert record.stat().st_mtime_ns != before
    assert len(list(single_run_copy.glob("*.json"))) == 1


def test_same_seed_and_spec_give_bit_identical_frames(single_run: Path, finished_runs: Path) -> None:
    """Two runs of the same spec and seed into different folders decode bit-identical frames."""
    (sdpa_a,) = [r for r in records_in(single_run) if r["spec"]["method"] == "sdpa"]
    (sdpa_b,) = [r for r in records_in(finished_runs) if r["spec"]["method"] == "sdpa"]
    assert sdpa_a["spec_hash"] == sdpa_b["spec_hash"]
    frames_a, frames_b = load_frames(sdpa_a, single_run), load_frames(sdpa_b, finished_runs)
    assert frames_a.keys() == frames_b.keys()
    for key in frames_a:
        assert frames_a[key].dtype == torch.uint8 and frames_a[key].shape == (9, 64, 64, 3)
        assert torch.equal(frames_a[key], frames_b[key])


def test_seeds_give_distinct_videos(tmp_path: Path) -> None:
    """--seeds 0,1 writes one video per seed in one record, and different seeds give different frames."""
    runs = tmp_path / "runs"
    invoke_cli([*RUN_ARGS, "--runs-dir", runs, "--seeds", "0,1", "--steps", "1"])
    (record,) = records_in(runs)
    assert [v["seed"] for v in record["artifacts"]["videos"]] == [0, 1]
    frames = load_frames(record, runs)
    first, second = (frames[v["frames_key"]] for v in record["artifacts"]["videos"])
    assert not torch.equal(first, second)


def test_methods_share_a_cohort(finished_runs: Path) -> None:
    """sdpa and math runs of one spec differ in hash but share their cohort."""
    records = {r["spec"]["method"]: r for r in records_in(finished_runs)}
    assert set(records) == {"sdpa", "math"}
    assert records["sdpa"]["spec_hash"] != records["math"]["spec_hash"]
    assert records["sdpa"]["cohort"] == records["math"]["cohort"]


def test_report_prints_and_writes_tables(finished_runs: Path, tmp_path: Path, bench) -> None:
    """`bench report` prints a runs table and writes runs.md and runs.csv."""
    out = tmp_path / "report"
    result = bench("report", "--runs-dir", finished_runs, "--out", out)
    assert "runs" in result.stdout and "sdpa" in result.stdout and "math" in result.stdout
    assert "wrote" in result.stdout
    assert (out / "runs.md").is_file() and (out / "runs.csv").is_file()
    markdown = (out / "runs.md").read_text()
    header = markdown.splitlines()[0]
    assert all(column in header for column in ("method", "step_ms", "baseline", "speedup"))
    assert not (out / "latency.md").exists()


def test_report_speedup_names_the_dense_baseline(finished_runs: Path, tmp_path: Path, bench) -> None:
    """The runs table has a speedup column computed against the named dense baseline (sdpa)."""
    out = tmp_path / "report"
    bench("report", "--runs-dir", finished_runs, "--out", out)
    table = pd.read_csv(out / "runs.csv").set_index("method")
    assert {"baseline", "speedup", "step_ms"} <= set(table.columns)
    assert set(table["baseline"]) == {"sdpa"}
    assert table.loc["sdpa", "speedup"] == pytest.approx(1.0)
    assert table.loc["math", "speedup"] == pytest.approx(table.loc["sdpa", "step_ms"] / table.loc["math", "step_ms"])


def test_report_json_output(finished_runs: Path, tmp_path: Path, bench) -> None:
    """`bench report --json` prints the tables, written files and errors as JSON."""
    import json

    payload = json.loads(bench("report", "--runs-dir", finished_runs, "--out", tmp_path, "--json").stdout)
    assert {row["method"] for row in payload["tables"]["runs"]} == {"sdpa", "math"}
    assert payload["errors"] == []
    assert sorted(Path(p).name for p in payload["files"]) == ["runs.csv", "runs.md"]
