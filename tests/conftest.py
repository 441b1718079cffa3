"""Shared fixtures: the wan-tiny model on CPU in fp32, a CLI invoker, and finished runs."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import Result
from typer.testing import CliRunner

from harness.cli import app

Invoke = Callable[..., Result]


def normalise(text: str) -> str:
    """Collapse rich's line wrapping so messages can be matched as one line."""
    return " ".join(text.split())


def invoke_cli(args: list[str], expect: int | None = 0) -> Result:
    """Run ``bench ARGS`` in-process; assert the exit code when ``expect`` is not None.

    Recent click keeps stderr apart in ``result.stderr`` and interleaves both streams in
    ``result.output``; user errors go to stderr through a rich console.
    """
    runner = CliRunner(env={"COLUMNS": "240", "NO_COLOR": "1", "TERM": "dumb"})
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=True)
    if expect is not None and result.exit_code != expect:
        import traceback

        trace = "".join(traceback.format_exception(*result.exc_info)) if result.exc_info else ""
        raise AssertionError(
            f"`bench {' '.join(map(str, args))}` exited {result.exit_code}, expected {expect}\n"
            f"--- output ---\n{result.output}\n--- exception ---\n{trace}"
        )
    return result


@pytest.fixture
def no_model_build(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a transformer is built (the expensive work every error must come before)."""
    import harness.models.wan as wan
    import harness.toyworld.checkpoint as toy_checkpoint

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the model was built before the error was detected")

    monkeypatch.setattr(wan, "build_transformer", refuse)
    monkeypatch.setattr(toy_checkpoint, "build_modules", refuse)


@pytest.fixture
def bench() -> Invoke:
    """``bench(*args, expect=0)`` runs the CLI in-process and returns click's Result."""

    def _invoke(*args: object, expect: int | None = 0) -> Result:
        return invoke_cli([str(a) for a in args], expect)

    return _invoke


@pytest.fixture(scope="session")
def tiny_model():
    """The wan-tiny adapter built once, on CPU in fp32 (seeded random weights)."""
    from harness.models.wan import WanTiny

    return WanTiny.load("random", torch.device("cpu"), torch.float32)


@pytest.fixture(scope="session")
def finished_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A runs folder with one finished wan-tiny run each for ``sdpa`` and ``math`` (same cohort).

    Read-only for tests: copy it (``copy_runs``) before changing anything in it.
    """
    runs = tmp_path_factory.mktemp("finished") / "runs"
    for method in ("sdpa", "math"):
        invoke_cli(
            ["run", "--method", method, "--model", "wan-tiny", "--device", "cpu", "--runs-dir", runs, "--no-progress"]
        )
    return runs


@pytest.fixture
def copy_runs(finished_runs: Path, tmp_path: Path) -> Callable[[], Path]:
    """Copy the session's finished runs into this test's tmp_path and return the copy."""

    def _copy() -> Path:
        target = tmp_path / "runs"
        shutil.copytree(finished_runs, target)
        return target

    return _copy


def records_in(runs_dir: Path) -> list[dict]:
    """Every record JSON directly in ``runs_dir``, parsed."""
    return [json.loads(p.read_text()) for p in sorted(runs_dir.glob("*.json"))]


class Crash(RuntimeError):
    """The simulated kill."""


def count_samples(monkeypatch: pytest.MonkeyPatch, crash_after: int | None = None) -> list[int]:
    """Count ``WanTiny.sample`` calls (one per video); raise :class:`Crash` on the call after ``crash_after``."""
    from harness.models.wan import WanTiny

    calls: list[int] = []
    original: Callable[..., Any] = WanTiny.sample

    def sample(self: Any, *args: Any, **kwargs: Any) -> Any:
        if crash_after is not None and len(calls) == crash_after:
            raise Crash(f"killed after {crash_after} videos")
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(WanTiny, "sample", sample)
    return calls
