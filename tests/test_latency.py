"""The timing protocol (statistics, warm-up exclusion, stages) and `bench latency`."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from conftest import normalise

from harness.latency import StageTimer, TimingStats, measure

CPU = torch.device("cpu")


def test_timing_stats_odd_count() -> None:
    """Median, mean, min/max and inclusive quartiles of 1..5 ms; samples keep their order."""
    stats = TimingStats.from_seconds([0.005, 0.001, 0.004, 0.002, 0.003], warmup=[0.1])
    assert stats.median_ms == pytest.approx(3.0)
    assert stats.mean_ms == pytest.approx(3.0)
    assert (stats.min_ms, stats.max_ms) == pytest.approx((1.0, 5.0))
    assert (stats.p25_ms, stats.p75_ms) == pytest.approx((2.0, 4.0))
    assert stats.repeats == 5
    assert stats.samples_ms == pytest.approx((5.0, 1.0, 4.0, 2.0, 3.0))
    assert stats.warmup_ms == pytest.approx((100.0,))


def test_timing_stats_even_count() -> None:
    """With 1..4 ms the median is 2.5 and the inclusive quartiles 1.75 and 3.25."""
    stats = TimingStats.from_seconds([0.004, 0.003, 0.002, 0.001])
    assert stats.median_ms == pytest.approx(2.5)
    assert (stats.p25_ms, stats.p75_ms) == pytest.approx((1.75, 3.25))
    assert stats.warmup_ms == ()


def test_timing_stats_single_sample() -> None:
    """One sample is its own median and quartiles."""
    stats = TimingStats.from_seconds([0.007])
    assert (stats.median_ms, stats.p25_ms, stats.p75_ms, stats.min_ms, stats.max_ms) == pytest.approx((7.0,) * 5)


def test_timing_stats_needs_samples() -> None:
    """No timed samples is an error, never a silent zero."""
    with pytest.raises(ValueError, match="no timed samples"):
        TimingStats.from_seconds([], warmup=[0.1])


def test_timing_stats_to_dict_is_json() -> None:
    """to_dict gives JSON-serialisable lists for samples and warm-up."""
    data = TimingStats.from_seconds([0.001, 0.002], [0.5]).to_dict()
    assert json.loads(json.dumps(data))["warmup_ms"] == [500.0]
    assert isinstance(data["samples_ms"], list)


def test_measure_excludes_warmup() -> None:
    """measure() reports slow first calls as warm-up and computes statistics from the later fast ones."""
    calls = {"n": 0}

    def fn() -> None:
        calls["n"] += 1
        time.sleep(0.06 if calls["n"] <= 2 else 0.005)

    stats, results = measure(fn, CPU, warmup=2, repeats=5, after_each=lambda: calls["n"])
    assert calls["n"] == 7
    assert len(stats.warmup_ms) == 2 and min(stats.warmup_ms) >= 60.0
    assert stats.repeats == 5 and len(stats.samples_ms) == 5
    assert 5.0 <= stats.median_ms < 40.0
    assert results == [3, 4, 5, 6, 7]


def test_measure_without_warmup_times_every_call() -> None:
    """warmup=0 puts every call in the statistics."""
    stats, results = measure(lambda: None, CPU, warmup=0, repeats=3)
    assert stats.repeats == 3 and stats.warmup_ms == () and results == [None, None, None]


@pytest.mark.parametrize(("warmup", "repeats"), [(0, 0), (-1, 3)])
def test_measure_rejects_bad_counts(warmup: int, repeats: int) -> None:
    """repeats < 1 or warmup < 0 is a ValueError."""
    with pytest.raises(ValueError, match="need repeats >= 1"):
        measure(lambda: None, CPU, warmup=warmup, repeats=repeats)


def test_stage_timer_treats_first_call_as_warmup() -> None:
    """StageTimer keeps every region per stage; the first of several is warm-up, a single one is not."""
    timer = StageTimer(CPU)
    for pause in (0.03, 0.001, 0.001):
        with timer.stage("step"):
            time.sleep(pause)
    with timer.stage("decode"):
        pass
    stats = timer.stats()
    assert len(timer.seconds("step")) == 3
    assert stats["step"].repeats == 2 and stats["step"].warmup_ms[0] >= 30.0
    assert stats["decode"].repeats == 1 and stats["decode"].warmup_ms == ()


@pytest.fixture(scope="module")
def latency_result(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, str]:
    """`bench latency --json` on wan-tiny for sdpa and math, also written with --out."""
    from conftest import invoke_cli

    out = tmp_path_factory.mktemp("latency") / "sub" / "lat.json"
    result = invoke_cli([
        "latency", "--model", "wan-tiny", "--device", "cpu", "--methods", "sdpa,math",
        "--repeats", "3", "--warmup", "1", "--out", out, "--json",
    ])  # fmt: skip
    return json.loads(result.stdout), out, result.stdout


def test_latency_json_shape(latency_result) -> None:
    """The JSON names kind 'latency', baseline sdpa, and both methods with positive timings."""
    payload, _, _ = latency_result
    assert payload["kind"] == "latency"
    assert payload["baseline"] == "sdpa"
    assert payload["model"] == "wan-tiny" and payload["weights"] == "random"
    assert set(payload["methods"]) == {"sdpa", "math"}
    for name, entry in payload["methods"].items():
        assert entry["forward"]["median_ms"] > 0, name
        assert entry["forward"]["repeats"] == 3 and len(entry["forward"]["warmup_ms"]) == 1
        assert entry["attention_ms_per_layer"] > 0, name
        assert entry["attention_ms_per_forward"] == pytest.approx(2 * entry["attention_ms_per_layer"])
        assert entry["density"] == 1.0
    assert payload["methods"]["sdpa"]["ratio_to_baseline"] == 1.0
    assert payload["methods"]["sdpa"]["speedup_vs_baseline"] == 1.0
    math = payload["methods"]["math"]
    assert math["ratio_to_baseline"] == pytest.approx(
        math["forward"]["median_ms"] / payload["methods"]["sdpa"]["forward"]["median_ms"]
    )


@pytest.mark.parametrize(("step", "timed"), [(0, "full"), (1, "window")])
def test_latency_times_the_forward_at_the_given_step(step: int, timed: str) -> None:
    """`--step 1` runs step 0 once untimed, then times DFA's windowed step (density: the band's share);
    at step 0 the uniform plan's only step is full attention (density 1)."""
    from harness.latency_run import LatencyRequest, run_latency
    from harness.models import MODELS
    from methods.dfa import DEFAULT_WINDOW_FRACTION, band_density, window_radius

    request = LatencyRequest(model="wan-tiny", methods=["sdpa", "dfa"], device="cpu", dtype="float32", warmup=0,
                             repeats=1, method_params={"dfa": {"uniform": "window_residual"}}, step=step)  # fmt: skip
    result = run_latency(request)
    tokens = MODELS.get("wan-tiny").token_grid(request.sampling()).tokens
    band = band_density(tokens, window_radius(tokens, DEFAULT_WINDOW_FRACTION))
    assert result["methods"]["dfa"]["density"] == pytest.approx({"full": 1.0, "window": band}[timed])
    assert result["spec"]["request"]["step"] == step


def test_latency_records_environment_and_request(latency_result) -> None:
    """The result carries the environment and the resolved request, so `bench check` can replay it."""
    payload, _, _ = latency_result
    assert {"torch", "diffusers", "git_commit", "device_name"} <= set(payload["environment"])
    request = payload["spec"]["request"]
    assert (request["device"], request["dtype"], request["baseline"]) == ("cpu", "float32", "sdpa")
    assert payload["tokens"] == 48


def test_given_commit_wins_over_the_trees_git(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tree copied to another machine may carry a stale .git: BENCH_GIT_COMMIT, when set, is recorded."""
    from harness.environment import capture_environment

    monkeypatch.setenv("BENCH_GIT_COMMIT", "0123abc")
    assert capture_environment(CPU)["git_commit"] == "0123abc"


def test_latency_out_file_matches_stdout(latency_result) -> None:
    """--out writes the same result (creating the folder), marked complete."""
    payload, out, _ = latency_result
    written = json.loads(out.read_text())
    assert written["status"] == "complete"
    assert written["methods"].keys() == payload["methods"].keys()
    assert written["methods"]["math"]["forward"] == payload["methods"]["math"]["forward"]


def test_latency_table_output(bench) -> None:
    """Without --json `bench latency` prints a table naming the baseline."""
    result = bench(
        "latency", "--model", "wan-tiny", "--device", "cpu", "--methods", "math,sdpa", "--repeats", "1", "--warmup", "0"
    )
    text = normalise(result.stdout)
    assert "baseline sdpa" in text and "math" in text


@pytest.mark.parametrize(
    ("baseline", "message"),
    [("cudnn", "baseline 'cudnn' must be one of the timed methods"), ("sdpaa", "unknown method 'sdpaa'")],
)
def test_latency_unknown_baseline_errors(baseline: str, message: str, bench) -> None:
    """A baseline that is not among the timed methods, or not a method at all, exits 2."""
    result = bench("latency", "--model", "wan-tiny", "--methods", "sdpa,math", "--baseline", baseline, expect=2)
    assert message in normalise(result.stderr)


def test_latency_without_dense_method_needs_baseline(bench) -> None:
    """Timing only non-dense methods without --baseline is an error that says what to do."""
    from methods import METHODS, AttentionMethod, register_method

    @register_method("zero-latency")
    class ZeroForLatency(AttentionMethod):
        def attend(self, q, k, v, ctx):  # type: ignore[no-untyped-def]
            return torch.zeros_like(q), 0.0

    try:
        result = bench("latency", "--model", "wan-tiny", "--methods", "zero-latency", expect=2)
        assert "no dense method" in normalise(result.stderr)
    finally:
        METHODS.remove("zero-latency")
