"""`bench latency --out`: the record saved after each method's stage, and an interrupted run resumed.

An H200 run of four methods with --compile was killed by its timeout and left nothing (reports/gpu/h200/README.md,
run_95b16d0). Here the interruption is an error raised from the n-th timing (:func:`harness.latency.measure`):
the first method's eager forward is timing 1; without --compile the second method's is timing 2; with --compile
the first method's compiled forward is timing 2 and the second method's eager and compiled are 3 and 4.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import Invoke, normalise

import harness.latency_run
from harness import strict_json

PLAIN = ("--methods", "sdpa,math")
COMPILED = ("--methods", "sdpa,linear", "--compile", "--compile-backend", "eager")
# (options, the timing that fails, what the partial record then holds per method)
INTERRUPTIONS = [
    pytest.param(PLAIN, 2, {"sdpa": ["forward"]}, id="second-method"),
    pytest.param(COMPILED, 2, {"sdpa": ["forward"]}, id="first-compiled"),
    pytest.param(COMPILED, 3, {"sdpa": ["forward", "compiled"]}, id="compiled-second-method"),
]


class Interrupted(KeyboardInterrupt):
    """Stands for the timeout's kill: no ``Exception``, which a failed compile is recorded as."""


def _timings(monkeypatch: pytest.MonkeyPatch, fail_at: int | None = None) -> list[int]:
    """Count `bench latency`'s timings (the list grows by one per timing); raise at timing ``fail_at``."""
    real, calls = harness.latency_run.measure, []

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(len(calls) + 1)
        if len(calls) == fail_at:
            raise Interrupted(f"timing {fail_at}")
        return real(*args, **kwargs)

    monkeypatch.setattr(harness.latency_run, "measure", counted)
    return calls


def _latency(bench: Invoke, out: Path, options: tuple[str, ...], repeats: int = 1, expect: int | None = 0) -> Any:
    return bench("latency", "--model", "wan-tiny", "--device", "cpu", "--warmup", "1", "--repeats", repeats, *options,
                 "--out", out, "--json", expect=expect)  # fmt: skip


def _interrupt(bench: Invoke, monkeypatch: pytest.MonkeyPatch, out: Path, options: tuple[str, ...], fail_at: int,
               repeats: int = 1) -> None:  # fmt: skip
    _timings(monkeypatch, fail_at)
    result = _latency(bench, out, options, repeats, expect=None)
    assert result.exit_code == 130, result.output  # as after Ctrl-C


def _keys(value: Any) -> Any:
    """The nested keys of a record (its structure), the values left out."""
    return {key: _keys(item) for key, item in value.items()} if isinstance(value, dict) else None


@pytest.mark.parametrize(("options", "fail_at", "kept"), INTERRUPTIONS)
def test_an_interrupted_latency_leaves_what_it_measured(
    options: tuple[str, ...], fail_at: int, kept: dict[str, list[str]], tmp_path: Path, bench: Invoke,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """--out holds strict JSON marked partial with every stage measured before the interruption, and no more."""
    out = tmp_path / "latency.json"
    _interrupt(bench, monkeypatch, out, options, fail_at)
    record = strict_json.decode(out.read_text())
    assert (record["kind"], record["status"]) == ("latency", "partial")
    assert {name: [stage for stage in ("forward", "compiled") if stage in entry]
            for name, entry in record["methods"].items()} == kept  # fmt: skip
    assert record["methods"]["sdpa"]["forward"]["repeats"] == 1


@pytest.mark.parametrize(("options", "fail_at", "kept"), INTERRUPTIONS)
def test_a_rerun_measures_only_what_the_interrupted_run_lacks(
    options: tuple[str, ...], fail_at: int, kept: dict[str, list[str]], tmp_path: Path, bench: Invoke,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """The same command again times only the missing stages, says which it resumed, and writes a complete record
    shaped like an uninterrupted one, its speedups against the baseline the interrupted run measured."""
    out = tmp_path / "latency.json"
    _interrupt(bench, monkeypatch, out, options, fail_at)
    timings = _timings(monkeypatch)
    result = _latency(bench, out, options)
    stages = 4 if "--compile" in options else 2
    assert len(timings) == stages - sum(len(done) for done in kept.values())
    assert f"sdpa: {', '.join(kept['sdpa'])} resumed from {out}" in normalise(result.stderr)

    payload = json.loads(result.stdout)
    assert strict_json.decode(out.read_text()) == {**payload, "status": "complete"}
    assert payload["resumed"] == kept
    uninterrupted = json.loads(_latency(bench, tmp_path / "whole.json", options).stdout)
    for record in (payload, uninterrupted):
        record.pop("resumed"), record.pop("machine_load")
    assert _keys(payload) == _keys(uninterrupted)
    base = payload["methods"]["sdpa"]
    for entry in payload["methods"].values():
        for stage in (entry, entry["compiled"]) if "--compile" in options else (entry,):
            base_stage = base if stage is entry else base["compiled"]
            ratio = base_stage["forward"]["median_ms"] / stage["forward"]["median_ms"]
            assert stage["speedup_vs_baseline"] == pytest.approx(ratio)


@pytest.mark.parametrize(
    ("options", "repeats", "fragment"),
    [
        (PLAIN, 2, "spec.request.repeats (1 vs 2)"),
        (("--methods", "sdpa,math", "--step", "1"), 1, "spec.request.step (0 vs 1)"),
        (("--methods", "sdpa,linear"), 1, "spec.request.methods"),
    ],
    ids=["repeats", "step", "methods"],
)
def test_a_changed_request_is_refused_against_a_partial_result(
    options: tuple[str, ...], repeats: int, fragment: str, tmp_path: Path, bench: Invoke,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """Another request with the --out of an interrupted one: one line naming what differs (then vs now), exit 2,
    nothing timed and the partial record left as it was."""
    out = tmp_path / "latency.json"
    _interrupt(bench, monkeypatch, out, PLAIN, 2)
    before = out.read_bytes()
    timings = _timings(monkeypatch)
    result = _latency(bench, out, options, repeats, expect=2)
    message = normalise(result.stderr)
    assert f"{out} holds the partial result of another `bench latency` request" in message
    assert fragment in message and "then vs now" in message
    assert timings == [] and out.read_bytes() == before


@pytest.mark.parametrize(("repeats", "timed"), [(1, 0), (2, 2)], ids=["same-request", "another-request"])
def test_a_complete_result_is_kept_for_its_request_and_replaced_for_another(
    repeats: int, timed: int, tmp_path: Path, bench: Invoke, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rerun over a complete record of the same request times nothing and returns its figures; another request
    measures anew and replaces it."""
    out = tmp_path / "latency.json"
    first = json.loads(_latency(bench, out, PLAIN).stdout)
    timings = _timings(monkeypatch)
    again = json.loads(_latency(bench, out, PLAIN, repeats).stdout)
    assert len(timings) == timed
    assert again["spec"]["request"]["repeats"] == repeats == strict_json.decode(out.read_text())["methods"]["math"][
        "forward"]["repeats"]  # fmt: skip
    assert (again["methods"]["math"]["forward"] == first["methods"]["math"]["forward"]) is (timed == 0)
