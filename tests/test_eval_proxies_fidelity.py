"""Weight-free proxies on procedural clips, fidelity against a reference run, bench eval, pre-flight of VBench."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch
from conftest import normalise, records_in

from harness.eval.fidelity import compare_clips
from harness.eval.proxies import score_clip
from harness.toyworld import world

TOY_PROMPTS = ("a small red disk moves left on a gray background", "a large blue square moves up on a black background")


def _clips(count: int) -> list[torch.Tensor]:
    rng = random.Random(7)
    return [world.to_uint8_video(world.sample_clip(rng)[1]) for _ in range(count)]


@pytest.mark.parametrize("clip", _clips(4))
def test_moving_clip_is_dynamic_and_static_is_not(clip: torch.Tensor) -> None:
    """Dynamic degree: the toy objects move 2 px per frame; the first frame held still does not move."""
    moving, static = score_clip(clip, fps=8), score_clip(clip[:1].repeat(len(clip), 1, 1, 1), fps=8)
    assert moving["proxy_dynamic_degree"] == 100.0 and static["proxy_dynamic_degree"] == 0.0
    assert moving["proxy_flow_px"] == pytest.approx(world.SPEED_PX_PER_FRAME, abs=0.5)
    assert static["proxy_flow_px"] < 0.1


@pytest.mark.parametrize("clip", _clips(4))
def test_shuffled_frames_are_less_smooth_than_ordered(clip: torch.Tensor) -> None:
    """Motion smoothness (and flicker) rank the true order above a shuffled order of the same frames."""
    order = torch.tensor([0, 5, 2, 7, 4, 1, 6, 3])
    ordered, shuffled = score_clip(clip, fps=8), score_clip(clip[order], fps=8)
    assert shuffled["proxy_motion_smoothness"] < ordered["proxy_motion_smoothness"] - 1.0
    assert shuffled["proxy_flicker"] < ordered["proxy_flicker"]
    assert ordered["proxy_motion_smoothness"] > 99.0


def test_fidelity_of_identical_clips_is_infinite_psnr_and_unit_ssim() -> None:
    clip = _clips(1)[0]
    scores = compare_clips(clip, clip.clone())
    assert scores["psnr_db"] == float("inf") and scores["ssim"] == pytest.approx(1.0, abs=1e-9)


def test_fidelity_psnr_matches_the_mse() -> None:
    """A uniform offset of 4 grey levels: MSE 16, PSNR = 10 log10(255^2 / 16)."""
    clip = torch.full((4, 16, 16, 3), 100, dtype=torch.uint8)
    scores = compare_clips(clip + 4, clip)
    assert scores["psnr_db"] == pytest.approx(10 * torch.log10(torch.tensor(255.0**2 / 16)).item(), rel=1e-6)
    assert scores["ssim"] < 1.0


@pytest.fixture(scope="module")
def toy_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two toy runs of one cohort (sdpa and linear attention), two prompts, two steps, no suites."""
    from conftest import invoke_cli

    runs = tmp_path_factory.mktemp("toy") / "runs"
    for method in ("sdpa", "linear"):
        args = ["run", "--model", "toy", "--method", method, "--device", "cpu", "--steps", "2", "--eval", "none"]
        invoke_cli([*args, *[a for p in TOY_PROMPTS for a in ("--prompt", p)], "--runs-dir", runs, "--no-progress"])
    return runs


def _record(runs: Path, method: str) -> Path:
    (path,) = [p for p in runs.glob("*.json") if f"__{method}__" in p.name]
    return path


def test_bench_eval_fidelity_against_the_cohorts_dense_run(bench, toy_runs: Path, tmp_path: Path) -> None:
    """Dense against itself: infinite PSNR (in strict JSON null, noted), SSIM 1; linear attention: finite, below 1."""
    import shutil

    from harness import strict_json

    runs = tmp_path / "runs"
    shutil.copytree(toy_runs, runs)
    printed = [bench("eval", _record(runs, m), "--suite", "fidelity", "--json").stdout for m in ("sdpa", "linear")]
    dense, linear = (strict_json.decode(_record(runs, m).read_text()) for m in ("sdpa", "linear"))
    assert strict_json.decode(printed[0])["metrics"]["fidelity"]["psnr_db"] is None, "--json prints strict JSON"
    assert dense["metrics"]["fidelity"]["psnr_db"] is None
    assert dense["non_finite_as_null"]["/metrics/fidelity/psnr_db"] == "Infinity"
    assert dense["metrics"]["fidelity"]["ssim"] == pytest.approx(1.0, abs=1e-9)
    assert 0 < linear["metrics"]["fidelity"]["psnr_db"] < 60 and linear["metrics"]["fidelity"]["ssim"] < 1.0
    assert linear["evaluations"]["fidelity"][-1]["reference_run"] == dense["run_id"]
    assert all("fidelity" in v["metrics"] for v in linear["artifacts"]["videos"])


def test_bench_eval_proxies_land_in_record_and_report(bench, toy_runs: Path, tmp_path: Path) -> None:
    """Proxy scores are merged into the record and shown in `bench report` under proxy_ names."""
    import shutil

    runs = tmp_path / "runs"
    shutil.copytree(toy_runs, runs)
    out = bench("eval", _record(runs, "sdpa").stem, "--suite", "proxies", "--runs-dir", runs, "--json")
    metrics = json.loads(out.stdout)["metrics"]["proxies"]
    assert set(metrics) == {"proxy_flicker", "proxy_dynamic_degree", "proxy_flow_px", "proxy_motion_smoothness"}
    stored = json.loads(_record(runs, "sdpa").read_text())
    assert stored["metrics"]["proxies"] == metrics
    report = json.loads(bench("report", "--runs-dir", runs, "--out", tmp_path / "report", "--json").stdout)
    row = next(r for r in report["tables"]["runs"] if r["method"] == "sdpa")
    assert row["proxy_motion_smoothness"] == pytest.approx(metrics["proxy_motion_smoothness"])


def _ready_environment(cache: Path) -> None:
    """A venv marker matching the current pins (the weights are what this test is about)."""
    from harness.eval.vbench.environment import BACKENDS, MARKER, requirements_hash

    venv = cache / "venvs" / "vbench"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(Path(__import__("sys").executable))
    (venv / MARKER).write_text(json.dumps({"requirements_sha256": requirements_hash(BACKENDS["vbench"])}))


def _toy_run_scored_by_vbench(bench, tmp_path: Path, dimensions: str, cache: Path):  # type: ignore[no-untyped-def]
    """`bench run` on toy asking for VBench ``dimensions``; expected to stop with a user error."""
    args = ["run", "--model", "toy", "--device", "cpu", "--prompt", TOY_PROMPTS[0], "--eval", "vbench"]
    args += ["--dimensions", dimensions, "--cache", cache, "--runs-dir", tmp_path / "runs"]
    return normalise(bench(*args, expect=2).output)


def test_missing_weights_fail_before_any_video(bench, tmp_path: Path) -> None:
    """Each missing file is named with where it goes; no record or video is written."""
    cache = tmp_path / "cache"
    _ready_environment(cache)
    message = _toy_run_scored_by_vbench(bench, tmp_path, "dynamic_degree,motion_smoothness", cache)
    assert "2 VBench weight file(s) missing" in message
    for where in ("weights/vbench/raft_model/models/raft-things.pth", "weights/vbench/amt_model/amt-s.pth"):
        assert str(cache / where) in message
    assert not records_in(tmp_path / "runs") and not list((tmp_path / "runs").rglob("*.mp4"))


def test_unset_environment_fails_before_any_video(bench, tmp_path: Path) -> None:
    message = _toy_run_scored_by_vbench(bench, tmp_path, "temporal_flickering", tmp_path / "none")
    assert "bench vbench setup --cache" in message
    assert not list((tmp_path / "runs").rglob("*.mp4"))


@pytest.mark.parametrize(("suite", "module"), [("fidelity", "torchmetrics"), ("proxies", "cv2")])
def test_suite_missing_its_module_fails_before_any_video(
    bench, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suite: str, module: str
) -> None:
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else find_spec(name, *a))
    args = ["run", "--model", "toy", "--device", "cpu", "--prompt", TOY_PROMPTS[0], "--eval", suite]
    message = normalise(bench(*args, "--runs-dir", tmp_path / "runs", expect=2).output)
    assert f"needs {module}" in message
    assert not list((tmp_path / "runs").rglob("*.mp4"))


def test_dimension_needing_vbench_prompts_is_refused_for_custom_prompts(bench, tmp_path: Path) -> None:
    assert "scene needs VBench's own prompts" in _toy_run_scored_by_vbench(bench, tmp_path, "scene", tmp_path)


def test_vbench_check_lists_every_dimension_and_where_its_files_go(bench, tmp_path: Path) -> None:
    out = json.loads(bench("vbench", "check", "--cache", tmp_path, "--json").stdout)
    dims = {w["dimension"] for w in out["weights"]}
    assert len(dims) == 15 and "temporal_flickering" not in dims  # the one dimension without weights
    assert not any(w["present"] for w in out["weights"]) and out["environment"]["ready"] is False
    assert all(w["path"].startswith(str(tmp_path.resolve())) for w in out["weights"])
    text = normalise(bench("vbench2", "check", "--cache", tmp_path).stdout)
    assert "Diversity" in text and "vgg19-dcbb9e9d.pth" in text


def test_evaluator_venv_skips_an_interpreter_that_does_not_start(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """A pyenv shim of an unselected version is on PATH but exits 127: setup takes the next candidate."""
    from harness.eval.vbench.environment import BACKENDS, _interpreter

    broken, working = tmp_path / "python3.10", tmp_path / "python3.11"
    broken.write_text("#!/bin/sh\nexit 127\n")
    working.symlink_to(sys.executable)
    broken.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert _interpreter(BACKENDS["vbench2"], None) == str(working)
