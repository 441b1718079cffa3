"""Run 3's verdict in harness/benchmarks/multi_gpu.py: what counts as a resume with nothing lost."""

from __future__ import annotations

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
