"""Run 3's verdict in harness/benchmarks/multi_gpu.py: what counts as a resume with nothing lost."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from harness.benchmarks.multi_gpu import LOSS_TOLERANCE, resume_checks

STEPS, KILL = 6, 3


def _losses(values: list[float]) -> list[dict[str, float]]:
    return [{"objective": v, "total": v + 1.0} for v in values]


def _meta(values: list[float], finished: bool = True) -> dict[str, Any]:
    return {"losses": _losses(values), "step": len(values), "finished": finished}


REFERENCE = [5.0, 4.0, 3.0, 2.5, 2.0, 1.5]
KEPT = _losses([5.001, 4.002, 3.001])  # another CUDA run of the same seeds: ~1e-3 apart before any kill
RESUMED = [5.001, 4.002, 3.001, 2.501, 2.002, 1.501]


def test_a_resume_that_keeps_the_history_and_tracks_the_reference_passes() -> None:
    verdict = resume_checks(KEPT, _meta(RESUMED), _meta(RESUMED), [v + 1.0 for v in REFERENCE], STEPS)
    assert verdict["passed"], verdict["checks"]
    assert verdict["killed_at_checkpoint_step"] == KILL
    assert 0 < verdict["largest_loss_difference"]["before_the_kill"] < LOSS_TOLERANCE


def test_a_resume_that_rewrites_a_kept_step_has_lost_something() -> None:
    rewritten = [5.0, *RESUMED[1:]]
    verdict = resume_checks(KEPT, _meta(rewritten), _meta(RESUMED), [v + 1.0 for v in REFERENCE], STEPS)
    assert not verdict["checks"]["nothing_lost"] and not verdict["passed"]


@pytest.mark.parametrize("which", ["resumed", "on_one"])
def test_a_resume_that_drifts_from_the_reference_fails(which: str) -> None:
    drifted = [*RESUMED[:KILL], 3.0, 2.0, 1.5]
    resumed, on_one = (drifted, RESUMED) if which == "resumed" else (RESUMED, drifted)
    verdict = resume_checks(KEPT, _meta(resumed), _meta(on_one), [v + 1.0 for v in REFERENCE], STEPS)
    assert not verdict["passed"]
    assert verdict["checks"]["nothing_lost"]


def test_a_resume_that_did_not_finish_fails() -> None:
    verdict = resume_checks(KEPT, _meta(RESUMED[:5], finished=False), _meta(RESUMED), REFERENCE, STEPS)
    assert not verdict["checks"]["resumed_to_the_end"]


def test_run_3_alone_on_a_fresh_out_folder_kills_resumes_and_passes(tmp_path: Path) -> None:
    """The issue-24 driver's run 3 by itself (``--runs kill``) against a given uninterrupted run, on 2 gloo ranks:
    a fresh results folder (its logs folder too) and a reference from another run, as on a freshly lent machine."""
    reference = tmp_path / "reference"
    common = ["--device", "cpu", "--model", "wan-tiny", "--method", "sdpa", "--nproc", "2", "--target-layers", "1",
              "--train-steps", "4", "--checkpoint-every", "2"]  # fmt: skip
    driver = [sys.executable, "-m", "harness.benchmarks.multi_gpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([*driver, "--out", str(tmp_path / "a"), "--work", str(reference), *common, "--runs", "train"],
                   check=True, capture_output=True, env=env, timeout=600)  # fmt: skip
    out = tmp_path / "b"
    done = subprocess.run([*driver, "--out", str(out), "--work", str(tmp_path / "w"), *common, "--runs", "kill",
                           "--reference", str(reference / "train_2" / "training_state.json")],
                          capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    kill = json.loads((out / "multi_gpu.json").read_text())["kill"]
    assert kill["passed"] and kill["killed_at_checkpoint_step"] == 2
    assert (out / "logs" / "kill.log").exists()
