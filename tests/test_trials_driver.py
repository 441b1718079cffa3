"""The toy trials driver (harness.benchmarks.linvideo_trials_gpu): how it deals its child processes over the GPUs,
and E1c's and E1d's plans and readings."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from harness.benchmarks.linvideo_trials_gpu import Job

SHOW_GPU = [sys.executable, "-c", "import os; print(os.environ.get('CUDA_VISIBLE_DEVICES', 'unset'))"]
WAIT = [sys.executable, "-c", "import time; time.sleep(120)"]


def test_each_job_sees_the_gpu_that_runs_the_fewest_jobs(tmp_path: Path) -> None:
    """With GPU 0 busy, the next job sees GPU 1 alone; without GPUs it sees what the driver sees."""
    busy = Job("busy", WAIT, tmp_path / "busy.log")
    jobs = {"busy": busy}
    busy.start(jobs, [0, 1])
    try:
        assert busy.gpu == 0
        for key, gpus, seen in (("next", [0, 1], "1"), ("cpu", [], os.environ.get("CUDA_VISIBLE_DEVICES", "unset"))):
            job = jobs[key] = Job(key, SHOW_GPU, tmp_path / f"{key}.log")
            job.start(jobs, gpus)
            assert job.process is not None and job.process.wait(timeout=60) == 0
            assert job.gpu == (1 if gpus else None)
            assert job.log.with_suffix(".out").read_text().strip() == seen
    finally:
        busy.stop()


def test_a_job_of_a_driver_confined_to_gpu_1_sees_gpu_1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under ``CUDA_VISIBLE_DEVICES=1`` the driver's GPU 0 is physical GPU 1: its child must see ``1``, not ``0``
    (the H200 run of E1d beside sparse_gpu put every training on the other job's GPU)."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    job = Job("confined", SHOW_GPU, tmp_path / "confined.log")
    job.start({"confined": job}, [0])
    assert job.process is not None and job.process.wait(timeout=60) == 0
    assert job.gpu == 0 and job.log.with_suffix(".out").read_text().strip() == "1"


def test_e1c_trains_adm_its_limit_and_mse_on_the_same_layers_and_step() -> None:
    """Issue 20's E1c: three seeds each of ADM at kappa 0.02, the weighted MSE it tends to, and plain MSE."""
    import argparse

    from harness.benchmarks.linvideo_trials_gpu import planned

    runs = planned(argparse.Namespace(experiments=("e1c",), e1_lr=3e-5, e1_steps=400))
    assert sorted(run.name for run in runs) == sorted(f"{arm}_s{seed}" for arm in ("adm", "mse-limit", "mse")
                                                      for seed in (0, 1, 2))  # fmt: skip
    for run in runs:
        options = dict(zip(run.options[::2], run.options[1::2], strict=True))
        assert options["--layers"] == "0,1,2,6" and options["--objective"] == run.name.rsplit("_s", 1)[0]
        assert ("--adm-step-fraction" in options) == (options["--objective"] != "mse")


@pytest.mark.parametrize(("limit", "verdict"), [(58.0, "a property of the objective"), (66.0, "find it")])
def test_e1c_reads_adm_against_its_own_limit(limit: float, verdict: str) -> None:
    from harness.benchmarks.linvideo_trials_gpu import e1c_verdict

    text = e1c_verdict({"adm": [57.0, 56.0, 58.0], "mse-limit": [limit] * 3, "mse": [65.0] * 3})
    assert verdict in text


def test_e1c_without_every_arm_says_it_is_incomplete() -> None:
    from harness.benchmarks.linvideo_trials_gpu import e1c_verdict

    assert "incomplete" in e1c_verdict({"adm": [57.0], "mse": [65.0]})


def test_e1d_trains_adm_towards_kappa_0_and_its_limit_in_fp32() -> None:
    """Issue 20's E1d: ADM at each smaller kappa and mse-limit, E1c's other options plus --no-bf16, seeds 0-2."""
    import argparse

    from harness.benchmarks.linvideo_trials_gpu import E1D_KAPPAS, planned

    runs = planned(argparse.Namespace(experiments=("e1d",), e1_lr=3e-5, e1_steps=400))
    arms = [f"adm_k{kappa:g}" for kappa in E1D_KAPPAS] + ["mse-limit"]
    assert sorted(run.name for run in runs) == sorted(f"{arm}_s{seed}" for arm in arms for seed in (0, 1, 2))
    for run in runs:
        options, arm = list(run.options), run.name.rsplit("_s", 1)[0]
        assert "--no-bf16" in options and options[options.index("--layers") + 1] == "0,1,2,6"
        assert options[options.index("--objective") + 1] == ("mse-limit" if arm == "mse-limit" else "adm")
        if arm != "mse-limit":
            assert options[options.index("--adm-step-fraction") + 1] == arm.removeprefix("adm_k")


@pytest.mark.parametrize(
    ("scores", "verdict"),
    [({"adm_k0.02": 55.0, "adm_k0.005": 60.0, "adm_k0.001": 64.0}, "closes as kappa shrinks"),
     ({"adm_k0.02": 55.0, "adm_k0.005": 55.0, "adm_k0.001": 56.0}, "does not close")],
)  # fmt: skip
def test_e1d_reads_whether_the_gap_closes_as_kappa_shrinks(scores: dict[str, float], verdict: str) -> None:
    from harness.benchmarks.linvideo_trials_gpu import e1d_verdict

    groups = {"mse-limit": [65.0] * 3} | {arm: [score] * 3 for arm, score in scores.items()}
    assert verdict in e1d_verdict(groups)
    assert "incomplete" in e1d_verdict({"mse-limit": [65.0], "adm_k0.02": [57.0]})


@pytest.mark.parametrize(("kappa", "name"), [(1.0, "adm_degrading"), (0.02, "adm_k0.02")])
def test_e3_runs_at_the_step_fraction_it_is_given(tmp_path: Path, kappa: float, name: str) -> None:
    """E3's child trains in a folder named by its kappa and passes the kappa on (E1c's ADM arm at 0.02)."""
    import argparse

    from harness.benchmarks.linvideo_trials_gpu import plan_jobs

    args = argparse.Namespace(experiments=("e3",), e1_lr=3e-5, e1_steps=400, e3_steps=400, e3_every=50, e3_lr=3e-5,
                              e3_kappa=kappa, work=tmp_path, device="cpu", held_out=64)  # fmt: skip
    jobs, _ = plan_jobs(args, [])
    command = jobs[f"train_e3_{name}"].command
    assert command[command.index("--e3-kappa") + 1] == f"{kappa:g}"
