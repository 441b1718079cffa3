"""The newcomer catalogue keeps working: a few of its cheapest cases run through its own code, its verdict rules
hold on made-up results, and its model-build probe is installed in a CLI subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.benchmarks.newcomer_cases import CASES, FIXTURES
from harness.benchmarks.newcomer_catalogue import (
    PROBE_DIR,
    REPO,
    TRACEBACK_MARK,
    Case,
    Fixtures,
    Invocation,
    Workspace,
    judge,
    run_case,
)

BY_NAME = {case.name: case for case in CASES}
CHEAPEST = ["unknown-command", "run-unknown-option", "steps-not-a-number", "report-runs-dir-missing", "help-run"]


@pytest.mark.parametrize("name", CHEAPEST)
def test_cheap_case_runs_through_the_catalogue(name: str, tmp_path: Path) -> None:
    """Each of the cheapest cases runs as a CLI subprocess and gets its verdict (OK on a working CLI)."""
    outcome = run_case(BY_NAME[name], tmp_path / "cases", Fixtures(tmp_path / "fixtures", FIXTURES))
    assert outcome.verdict == "OK", (outcome.reason, outcome.message)
    assert outcome.seconds > 0 and outcome.message


def test_catalogue_covers_the_issue_kinds() -> None:
    """At least 70 cases, unique names, and cases of every kind of issue 19 with a CLI form (B-G)."""
    assert len(CASES) >= 70
    assert len({case.name for case in CASES}) == len(CASES)
    assert {"B", "C", "D", "E", "F", "G"} <= {case.kind for case in CASES}


ERROR_CASE = Case("bad", "test", ("run",), fragments=("steps",))
OK_CASE = Case("good", "test", ("run",), expect="ok", check=lambda result, ws: None)


def _result(returncode: int, stderr: str = "", stdout: str = "", cpu: float = 2.0) -> Invocation:
    return Invocation(["run"], returncode, stdout, stderr, seconds=cpu, cpu_seconds=cpu, timed_out=False)


VERDICT_EXAMPLES = [
    pytest.param(ERROR_CASE, _result(2, "error: steps must be >= 1, got 0"), [], [], "OK", id="refused"),
    pytest.param(ERROR_CASE, _result(1, f"{TRACEBACK_MARK}:\n  File x\nValueError: steps"), [], [], "TRACEBACK",
                 id="traceback"),
    pytest.param(ERROR_CASE, _result(0, stdout="done"), [], [], "SILENT", id="accepted"),
    pytest.param(ERROR_CASE, _result(2, "error: steps must be >= 1"), [], ["harness.models.wan.build_transformer"],
                 "LATE", id="model-built"),
    pytest.param(ERROR_CASE, _result(2, "error: steps must be >= 1"), ["runs/toy__sdpa__x"], [], "LATE",
                 id="files-left"),
    pytest.param(ERROR_CASE, _result(2, "error: steps must be >= 1", cpu=60.0), [], [], "LATE", id="cpu-time"),
    pytest.param(ERROR_CASE, _result(2, "error: something else"), [], [], "WRONG-MESSAGE", id="no-fragment"),
    pytest.param(ERROR_CASE, _result(2, "SomeWarning: noise\nerror: steps must be >= 1"), [], [], "WRONG-MESSAGE",
                 id="noise"),
    pytest.param(OK_CASE, _result(0, stdout="done"), ["runs/x.json"], ["built"], "OK", id="valid-ok"),
    pytest.param(OK_CASE, _result(2, "error: refused"), [], [], "WRONG-MESSAGE", id="valid-refused"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "result", "new_paths", "built", "verdict"), VERDICT_EXAMPLES)
def test_verdict_rules(case: Case, result: Invocation, new_paths: list[str], built: list[str], verdict: str,
                       tmp_path: Path) -> None:  # fmt: skip
    """Each verdict follows from the result, the paths left behind and the models built, as the module says."""
    ws = Workspace(tmp_path, Fixtures(tmp_path / "fixtures", {}))
    assert judge(case, result, ws, new_paths, built).verdict == verdict


def test_probe_wraps_every_model_build(tmp_path: Path) -> None:
    """With the probe on PYTHONPATH, a CLI process's model-building functions are wrapped (so LATE is seen)."""
    env = dict(os.environ, PYTHONPATH=str(PROBE_DIR), NEWCOMER_PROBE_FILE=str(tmp_path / "marks"), OMP_NUM_THREADS="1")
    code = (
        "import harness.models.wan as w, harness.toyworld.checkpoint as c; "
        "print(hasattr(w.build_transformer, '__wrapped__'), hasattr(c.build_modules, '__wrapped__'))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["True", "True"]
