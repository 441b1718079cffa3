"""The latency regression gate: `bench check` fails on a planted regression, passes on the committed baseline."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from conftest import normalise

import harness.check
import methods.dense
from harness.check import Verdict, check, compare, confirmed, request_from_baseline
from harness.errors import HarnessError

COMMITTED_BASELINE = Path(__file__).parents[1] / "reports" / "baselines" / "cpu-wan-tiny.json"
# Per attention call: several times a wan-tiny forward (22 ms sdpa, 86 ms math on 2 cores), so that the
# planted slowdown stays far beyond the timing noise of a loaded CI machine (a 2x slower sdpa included).
PLANTED_DELAY_S = 0.2
CI_TOLERANCE = "0.25"
# CI's re-measurements of a failed check: a ratio 27% over the baseline was seen once on CI's shared cores.
CI_CONFIRM = "2"


def _latency(ratios: dict[str, float]) -> dict:
    return {"kind": "latency", "methods": {name: {"ratio_to_baseline": r} for name, r in ratios.items()}}


@pytest.mark.parametrize(
    ("old", "new", "tolerance", "regressed"),
    [
        (2.0, 2.0, 0.10, False),
        (2.0, 2.2, 0.10, False),  # exactly at the limit: not a regression
        (2.0, 2.2001, 0.10, True),
        (2.0, 1.0, 0.10, False),  # faster is never a regression
        (0.5, 0.56, 0.10, True),
        (0.5, 0.56, 0.20, False),
        (1.0, 1.0 + 1e-9, 0.0, True),
    ],
)
def test_compare_regressed_iff_new_exceeds_old_times_one_plus_tolerance(
    old: float, new: float, tolerance: float, regressed: bool
) -> None:
    """compare() flags a method iff new ratio > old ratio x (1 + tolerance)."""
    (verdict,) = compare(_latency({"m": old}), _latency({"m": new}), tolerance)
    assert verdict.regressed is regressed
    assert verdict.limit == pytest.approx(old * (1 + tolerance))
    assert verdict.change == pytest.approx(new / old - 1)


def test_compare_gives_one_verdict_per_baseline_method() -> None:
    """Every method of the baseline gets a verdict in baseline order; extra current methods are ignored."""
    verdicts = compare(_latency({"sdpa": 1.0, "math": 1.5}), _latency({"math": 1.4, "sdpa": 1.0, "new": 9.0}), 0.1)
    assert [v.method for v in verdicts] == ["sdpa", "math"]
    assert verdicts == [Verdict("sdpa", 1.0, 1.0, 1.1), Verdict("math", 1.5, 1.4, pytest.approx(1.65))]


def test_compare_missing_method_is_an_error() -> None:
    """A baseline method missing from the new measurement is a HarnessError."""
    with pytest.raises(HarnessError, match="'math' of the baseline was not measured"):
        compare(_latency({"math": 1.5}), _latency({"sdpa": 1.0}), 0.1)


def test_confirmed_keeps_each_methods_lowest_ratio() -> None:
    """Across measurements, a method's verdict is its lowest new ratio: regressed iff regressed in all."""
    first = [Verdict("sdpa", 1.0, 1.0, 1.1), Verdict("math", 4.0, 5.0, 4.4), Verdict("x", 2.0, 3.0, 2.2)]
    second = [Verdict("sdpa", 1.0, 1.0, 1.1), Verdict("math", 4.0, 4.1, 4.4), Verdict("x", 2.0, 2.9, 2.2)]
    verdicts = confirmed([first, second])
    assert [v.new_ratio for v in verdicts] == [1.0, 4.1, 2.9]
    assert [v.regressed for v in verdicts] == [False, False, True]


@pytest.mark.parametrize(("ratios", "confirm", "measured", "passed"), [
    ([5.0, 4.1], 1, 2, True),  # a loaded first measurement, confirmed away
    ([5.0, 5.0, 5.0], 2, 3, False),  # regressed every time: a regression
    ([5.0, 5.0], 0, 1, False),  # no confirmation asked: the first verdict stands
    ([4.1, 9.0], 3, 1, True),  # a passing check is not re-measured
])  # fmt: skip
def test_check_remeasures_a_failed_check_up_to_confirm_times(
    tmp_path: Path, monkeypatch, ratios: list[float], confirm: int, measured: int, passed: bool
) -> None:
    """check() re-measures only while a method is regressed, at most `confirm` more times."""
    baseline = tmp_path / "base.json"
    baseline.write_text(json.dumps({
        **_latency({"sdpa": 1.0, "math": 4.0}), "spec": {"request": {"model": "wan-tiny", "methods": ["sdpa", "math"]}},
    }))  # fmt: skip
    pending = iter(ratios)
    monkeypatch.setattr(harness.check, "run_latency", lambda request: _latency({"sdpa": 1.0, "math": next(pending)}))
    verdicts, _, attempts = check(baseline, 0.1, confirm=confirm)
    assert len(attempts) == measured
    assert (not any(v.regressed for v in verdicts)) is passed


def test_check_negative_confirm_is_an_error(tmp_path: Path) -> None:
    """A negative --confirm is refused before anything is measured."""
    with pytest.raises(HarnessError, match="--confirm must be >= 0"):
        check(tmp_path / "never-read.json", 0.1, confirm=-1)


def test_compare_negative_tolerance_is_an_error() -> None:
    """A negative tolerance is refused."""
    with pytest.raises(HarnessError, match="tolerance must be >= 0"):
        compare(_latency({"m": 1.0}), _latency({"m": 1.0}), -0.1)


@pytest.fixture(scope="module")
def fresh_baseline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A `bench latency` baseline of sdpa and math on wan-tiny, measured in this session."""
    from conftest import invoke_cli

    out = tmp_path_factory.mktemp("baseline") / "base.json"
    invoke_cli([
        "latency", "--model", "wan-tiny", "--device", "cpu", "--methods", "sdpa,math",
        "--warmup", "1", "--repeats", "5", "--out", out,
    ])  # fmt: skip
    return out


def test_request_from_baseline_replays_the_request(fresh_baseline: Path) -> None:
    """The re-measurement uses the baseline's own request, with overrides applied."""
    baseline = json.loads(fresh_baseline.read_text())
    request = request_from_baseline(baseline, {"repeats": 2})
    assert request.methods == ["sdpa", "math"] and request.baseline == "sdpa"
    assert (request.model, request.warmup, request.repeats, request.dense_layers) == ("wan-tiny", 1, 2, ())


def test_check_fails_on_planted_regression(fresh_baseline: Path, monkeypatch, bench) -> None:
    """Slowing math's attention by PLANTED_DELAY_S per call makes `bench check` exit 1 and mark math REGRESSED."""
    original = methods.dense.MathReference.attend

    def slow_attend(self, q, k, v, ctx):  # type: ignore[no-untyped-def]
        out = original(self, q, k, v, ctx)
        time.sleep(PLANTED_DELAY_S)
        return out

    monkeypatch.setattr(methods.dense.MathReference, "attend", slow_attend)
    result = bench("check", "--baseline", fresh_baseline, "--confirm", "0", expect=1)
    rows = {line.split()[1]: line for line in result.stdout.splitlines() if line.strip().startswith("│")
            and len(line.split()) > 1 and line.split()[1] in ("sdpa", "math")}  # fmt: skip
    assert "REGRESSED" in rows["math"]
    assert "REGRESSED" not in rows["sdpa"]
    assert "FAILED" in result.stdout


def test_check_json_reports_regression(fresh_baseline: Path, monkeypatch, bench) -> None:
    """`bench check --json` reports passed false and the regressed method with its ratios."""
    original = methods.dense.MathReference.attend

    def slow_attend(self, q, k, v, ctx):  # type: ignore[no-untyped-def]
        time.sleep(PLANTED_DELAY_S)
        return original(self, q, k, v, ctx)

    monkeypatch.setattr(methods.dense.MathReference, "attend", slow_attend)
    payload = json.loads(
        bench("check", "--baseline", fresh_baseline, "--repeats", "2", "--confirm", "1", "--json", expect=1).stdout
    )
    verdicts = {v["method"]: v for v in payload["verdicts"]}
    assert payload["passed"] is False and len(payload["measurements"]) == 2
    assert verdicts["math"]["regressed"] is True and verdicts["math"]["new_ratio"] > verdicts["math"]["limit"]
    assert verdicts["sdpa"] == {**verdicts["sdpa"], "old_ratio": 1.0, "new_ratio": 1.0, "regressed": False}


def test_check_passes_on_committed_baseline(bench) -> None:
    """`bench check` passes against the committed CPU wan-tiny baseline."""
    assert COMMITTED_BASELINE.is_file(), f"missing committed baseline {COMMITTED_BASELINE}"
    baseline = json.loads(COMMITTED_BASELINE.read_text())
    assert baseline["kind"] == "latency" and set(baseline["methods"]) == {"sdpa", "math"}
    # CI's tolerance: the ratio's spread between processes on 2 shared CPU cores was measured at
    # about +-10% (3.85-4.25 over three runs at 2,304 tokens), so 10% would flake; 25% with confirmation
    # re-measurements does not.
    result = bench("check", "--baseline", COMMITTED_BASELINE, "--tolerance", CI_TOLERANCE, "--confirm", CI_CONFIRM,
                   expect=None)  # fmt: skip
    assert result.exit_code == 0, normalise(result.output)
    assert "passed" in result.stdout and "REGRESSED" not in result.stdout


def test_ci_tolerance_still_catches_a_planted_regression(monkeypatch, bench) -> None:
    """At CI's tolerance and confirmations, a planted slowdown of math still fails the committed-baseline check."""
    import methods.dense

    original = methods.dense.MathReference.attend

    def slower(self, q, k, v, ctx):  # type: ignore[no-untyped-def]
        time.sleep(PLANTED_DELAY_S)
        return original(self, q, k, v, ctx)

    monkeypatch.setattr(methods.dense.MathReference, "attend", slower)
    result = bench("check", "--baseline", COMMITTED_BASELINE, "--tolerance", CI_TOLERANCE, "--repeats", "3",
                   "--confirm", CI_CONFIRM, expect=1)  # fmt: skip
    assert "REGRESSED" in result.stdout
