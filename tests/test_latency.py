"""The timing protocol (statistics, warm-up exclusion, stages) and `bench latency`."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import normalise

from harness.latency import StageTimer, TimingStats, back_to_back_ms, measure

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


def test_back_to_back_is_the_median_regions_time_per_call_after_two_warm_calls(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """back_to_back_ms runs two warm calls, then ``samples`` regions of ``calls`` calls each, and returns the median
    region's time divided by its calls: on a clock that each call advances (50 ms for the first region's calls, 2 ms
    for every other), 2 ms exactly (a mean of the regions would give 18, a region's whole time 8)."""
    clock = {"now": 0.0, "calls": 0}

    def fn() -> None:
        clock["calls"] += 1
        clock["now"] += 0.05 if 2 < clock["calls"] <= 6 else 0.002

    monkeypatch.setattr(time, "perf_counter", lambda: clock["now"])
    per_call = back_to_back_ms(fn, CPU, calls=4, samples=3)
    assert clock["calls"] == 2 + 4 * 3
    assert per_call == pytest.approx(2.0)


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


def test_dirty_means_code_changed_not_committed_results(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A GPU call moves reports/ out of the tree to fit the transfer limit: that alone is not a dirty tree."""
    from harness import environment

    def git(*args: str) -> None:
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)  # fmt: skip

    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "r.json").write_text("{}")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "c")
    monkeypatch.setattr(environment, "REPO_ROOT", tmp_path)
    (tmp_path / "reports" / "r.json").unlink()
    assert environment.capture_environment(CPU)["git_dirty"] is False
    (tmp_path / "code.py").write_text("x = 2\n")
    assert environment.capture_environment(CPU)["git_dirty"] is True


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


# -- the attention timer's memory (issue 19, G2) ------------------------------------------------------


def test_attention_timer_holds_no_region_after_training_forwards(tiny_model) -> None:
    """50 training-like forwards (autograd on, backward run) with a method installed: on CPU every region is folded
    into the total at once, so the timer holds none, and the total still counts every call."""
    from harness.models.wan import WanTiny
    from methods import build_method

    latents = torch.randn(1, *WanTiny.latent_shape(WanTiny.defaults), requires_grad=True)
    embeddings = tiny_model.encode_prompts(["a prompt"])
    with tiny_model.use_method(build_method("sdpa")) as runtime:
        for _ in range(50):
            tiny_model.forward(latents, torch.tensor(500.0), embeddings).square().mean().backward()
            assert runtime.timer.pending == 0
        assert runtime.timer.pop_seconds() > 0.0


def test_attention_timer_waits_for_the_oldest_region_past_its_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """As on a GPU far behind the CPU (no region readable without waiting), the timer holds at most
    MAX_PENDING_REGIONS regions, and the total is the sum of every region."""
    from harness.latency import Region
    from harness.models.processor import MAX_PENDING_REGIONS, AttentionTimer

    monkeypatch.setattr(Region, "ready", lambda self: False)
    monkeypatch.setattr(Region, "seconds", lambda self: 0.001)
    timer = AttentionTimer()
    for _ in range(3 * MAX_PENDING_REGIONS):
        timer.stop(timer.start(CPU))
        assert timer.pending <= MAX_PENDING_REGIONS
    assert timer.pop_seconds() == pytest.approx(3 * MAX_PENDING_REGIONS * 0.001)
    assert timer.pending == 0


# -- spread, machine load, efficiency ------------------------------------------------------------------


@pytest.mark.parametrize(("samples", "flagged"), [([0.010, 0.011, 0.012], False), ([0.001, 0.0015, 0.0035], True)])
def test_spread_exceeding_the_median_is_flagged(samples: list[float], flagged: bool) -> None:
    """max - min > median flags a figure (1-3.5 ms around 1.5 ms); 10-12 ms around 11 ms is not flagged."""
    from harness.latency import spread_warning

    stats = TimingStats.from_seconds(samples)
    assert stats.spread_exceeds_median is flagged
    assert stats.to_dict()["spread_exceeds_median"] is flagged
    assert (spread_warning("sdpa forward", stats.to_dict()) is not None) is flagged


def test_latency_warns_on_a_spread_larger_than_the_median(bench, monkeypatch: pytest.MonkeyPatch) -> None:
    """A forward whose repeats spread wider than their median (sdpa 1.47-265 ms on a loaded machine) is printed
    with a warning on stderr; --json's stdout stays JSON and the record keeps the flag and the warning."""
    import harness.latency_run

    def unsteady(fn, device, warmup=2, repeats=5, after_each=None):  # type: ignore[no-untyped-def]
        fn()
        return TimingStats.from_seconds([0.00147, 0.002, 0.265]), [after_each() if after_each else None] * 3

    monkeypatch.setattr(harness.latency_run, "measure", unsteady)
    result = bench("latency", "--model", "wan-tiny", "--device", "cpu", "--methods", "sdpa", "--json")
    payload = json.loads(result.stdout)
    assert payload["methods"]["sdpa"]["forward"]["spread_exceeds_median"] is True
    assert any(w.startswith("sdpa forward: repeats span 1.47-265 ms") for w in payload["warnings"])
    assert "warning: sdpa forward: repeats span 1.47-265 ms" in normalise(result.stderr)


def test_latency_records_the_machine_load(latency_result) -> None:
    """Before and after the run: load averages, CPU counts, a loaded flag; GPU utilisation is None on CPU."""
    payload, _, _ = latency_result
    for when in ("before", "after"):
        load = payload["machine_load"][when]
        assert len(load["loadavg_1_5_15"]) == 3 and load["cpu_count"] >= load["cpus_usable"] >= 1
        assert load["loaded"] == (load["loadavg_1_5_15"][0] > load["cpus_usable"])
        assert load["gpu_utilisation_percent"] is None


def test_latency_reports_kernel_efficiency_and_tflops(latency_result) -> None:
    """Efficiency = density x the baseline's attention time per layer / the method's (1 for the baseline itself);
    TFLOP/s = the dense FLOPs x density over the attention time."""
    payload, _, _ = latency_result
    sdpa, math = payload["methods"]["sdpa"], payload["methods"]["math"]
    assert sdpa["kernel_efficiency"] == pytest.approx(1.0)
    assert math["ideal_attention_ms_per_layer"] == pytest.approx(sdpa["attention_ms_per_layer"])
    assert math["kernel_efficiency"] == pytest.approx(sdpa["attention_ms_per_layer"] / math["attention_ms_per_layer"])
    tflop = payload["dense_attention_tflop_per_forward"]
    assert math["attention_tflops"] == pytest.approx(tflop / (math["attention_ms_per_forward"] / 1e3))


# -- data-dependent methods at a stated density (issue 21, item 4) ----------------------------------


@pytest.mark.parametrize(("name", "params"), [("xattn", {"block_size": 16}), ("svg2", {})])
@pytest.mark.parametrize("stated", [0.15, 0.3, 0.5])
def test_fixed_density_is_the_density_achieved(name: str, params: dict, stated: float) -> None:
    """On random q, k (near-uniform attention, where the thresholds keep ~0.9) the fixed-density selection keeps
    the stated share of the score matrix within 0.02. Each query row rounds to its nearest key block (xattn: 64
    per row here, 16-token tiles) or cluster (svg2: 128 clusters of ~8 tokens)."""
    from methods import AttentionContext, TokenGrid, build_method

    grid = TokenGrid(4, 16, 16)
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, grid.tokens, 16, generator=generator) for _ in range(3))
    ctx = AttentionContext(layer=1, num_layers=2, step=9, num_steps=10, timestep=0.5, cfg_branch="cond", grid=grid)
    method = build_method(name, fixed_density=stated, **params)
    method(q, k, v, ctx)
    assert method.density.mean() == pytest.approx(stated, abs=0.02)
    assert method.params()["fixed_density"] == stated


def test_latency_at_density_times_xattn_at_the_stated_density(bench) -> None:
    """--at-density sets xattn's fixed density (sdpa has none); the record says so and the density matches."""
    result = bench("latency", "--model", "wan-tiny", "--device", "cpu", "--methods", "sdpa,xattn", "--repeats", "1",
                   "--warmup", "0", "--at-density", "0.344", "--json")  # fmt: skip
    methods = json.loads(result.stdout)["methods"]
    assert methods["xattn"]["density_fixed_by_user"] == 0.344
    assert methods["xattn"]["density"] == pytest.approx(0.344, abs=0.05)
    assert methods["sdpa"]["density_fixed_by_user"] is None and methods["sdpa"]["density"] == 1.0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--methods", "sdpa,math", "--at-density", "0.3"], "--at-density applies to methods with a fixed-density"),
        (["--methods", "sdpa,xattn", "--at-density", "1.5"], "xattn: fixed_density must be in (0, 1], got 1.5"),
        (["--methods", "sdpa", "--compile", "--warmup", "0"], "--compile needs --warmup >= 1"),
        (["--methods", "sdpa", "--compile", "--compile-backend", "nope"], "'nope' is not a torch.compile backend"),
    ],
)
def test_latency_rejects_bad_density_and_compile_options(bench, args: list[str], message: str) -> None:
    """A density no timed method takes, one outside (0, 1], a compile without warm-up or with an unknown
    backend: exit 2 with the reason, before the model is built."""
    result = bench("latency", "--model", "wan-tiny", "--device", "cpu", *args, expect=2)
    assert message in normalise(result.stderr)


def test_latency_compile_times_every_method_beside_eager(
    bench, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--compile (Dynamo's capture alone: --compile-backend eager) times sdpa and linear compiled, each in one graph
    without a break, with the same output as eager and a speedup against it; a second table shows them."""
    from harness.cli import _print_latency, console

    monkeypatch.setattr(console, "width", 200)

    result = bench("latency", "--model", "wan-tiny", "--device", "cpu", "--methods", "sdpa,linear", "--repeats",
                   "2", "--warmup", "1", "--compile", "--compile-backend", "eager", "--json")  # fmt: skip
    payload = json.loads(result.stdout)
    _print_latency(payload)
    assert "compiled (eager, mode default)" in normalise(capsys.readouterr().out)
    for name, entry in payload["methods"].items():
        compiled = entry["compiled"]
        assert (compiled["graphs"], compiled["graph_breaks"], compiled["fullgraph"]) == (1, 0, True), name
        assert compiled["rel_error_vs_eager"] < 1e-5, name
        assert compiled["forward"]["repeats"] == 2 and len(compiled["forward"]["warmup_ms"]) == 1
        assert compiled["speedup_vs_eager"] == pytest.approx(
            entry["forward"]["median_ms"] / compiled["forward"]["median_ms"]
        )


def test_latency_runs_on_the_toy_model(bench) -> None:
    """The probe prompt is the model's own default: the toy's grammar refused a free-text probe."""
    result = bench("latency", "--model", "toy", "--device", "cpu", "--methods", "sdpa", "--repeats", "1", "--warmup",
                   "0", "--json")  # fmt: skip
    assert json.loads(result.stdout)["methods"]["sdpa"]["forward"]["median_ms"] > 0


def test_a_timed_sample_excludes_the_first_encode_and_decode_of_the_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whichever variant is timed first must not carry the decoder's and encoder's one-time costs: the first
    time_sample of a model runs each stage once untimed, later ones (same latent shape) do not."""
    import dataclasses
    from collections import Counter

    from harness.latency_run import time_sample
    from harness.models.base import MODELS
    from methods import build_method

    adapter_cls = MODELS.get("wan-tiny")
    model = adapter_cls.load("random", CPU, torch.float32)
    calls: Counter[str] = Counter()
    for stage in ("decode", "encode_prompts"):
        original = getattr(model, stage)
        monkeypatch.setattr(
            model, stage, lambda *a, _stage=stage, _fn=original, **k: calls.update([_stage]) or _fn(*a, **k)
        )
    sampling = dataclasses.replace(adapter_cls.defaults, steps=1, cfg=1.0)
    first = time_sample(model, build_method("sdpa"), sampling, CPU)
    assert calls == {"decode": 2, "encode_prompts": 2}
    time_sample(model, build_method("sdpa"), sampling, CPU)
    assert calls == {"decode": 3, "encode_prompts": 3}
    decode = first["stages"]["decode"]
    assert len(decode["samples_ms"]) + len(decode["warmup_ms"]) == 1


def test_a_timed_sample_without_decode_leaves_the_decoder_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """``decode=False`` (a caller timing the decode once for several samples): after the once-per-shape warm-up,
    no decode call, no decode stage, a total of the stages that ran."""
    import dataclasses

    from harness.latency_run import time_sample
    from harness.models.base import MODELS
    from methods import build_method

    adapter_cls = MODELS.get("wan-tiny")
    model = adapter_cls.load("random", CPU, torch.float32)
    sampling = dataclasses.replace(adapter_cls.defaults, steps=1, cfg=1.0)
    time_sample(model, build_method("sdpa"), sampling, CPU)  # the warm-up decode happens here
    monkeypatch.setattr(model, "decode", lambda *a, **k: pytest.fail("decoded with decode=False"))
    timing = time_sample(model, build_method("sdpa"), sampling, CPU, decode=False)
    stages = timing["stages"]
    assert set(stages) == {"prompt_encoding", "denoise_step"}
    ran = sum(sum(stats["samples_ms"]) + sum(stats["warmup_ms"]) for stats in stages.values())
    assert timing["total_ms"] == pytest.approx(ran)


def test_wan_decode_runs_on_the_vae_device(tiny_model, monkeypatch: pytest.MonkeyPatch) -> None:
    """Latents from any device reach the VAE on its own: the untimed warm-up's CPU noise met a CUDA VAE on an
    H200 (``slow_conv3d_forward`` on CUDA). A stand-in VAE on the meta device records what it is given."""
    seen: dict[str, torch.device] = {}

    class MetaVae:
        config, dtype, device = tiny_model.vae.config, torch.float32, torch.device("meta")

        def decode(self, latents: torch.Tensor, return_dict: bool) -> tuple[torch.Tensor]:
            seen["device"] = latents.device
            return (torch.zeros(latents.shape[0], 3, 1, 2, 2),)

    monkeypatch.setattr(tiny_model, "vae", MetaVae())
    frames = tiny_model.decode(torch.zeros(1, len(tiny_model.vae.config.latents_mean), 1, 2, 2))
    assert seen["device"].type == "meta" and frames.shape == (1, 1, 2, 2, 3)


def test_records_carry_the_kernel_choices_in_force(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every kernel variable a kernel module reads (found by importing every module of methods.kernels: one added
    without declaring its choice fails here) is in the environment a record carries, with its value in force (as
    set, else its default): BENCH_KMEANS_UPDATE=sorted changes which kernel a number measured."""
    import importlib
    import pkgutil

    import methods.kernels
    from harness.environment import capture_environment
    from methods.kernels import kmeans_triton, xattn_scoring_triton

    monkeypatch.setenv(kmeans_triton.VARIANT_ENV, "Sorted")
    choices = capture_environment(CPU)["kernel_choices"]
    modules = [importlib.import_module(f"methods.kernels.{info.name}")
               for info in pkgutil.iter_modules(methods.kernels.__path__)]  # fmt: skip
    read = {getattr(module, name) for module in modules for name in ("BACKEND_ENV", "VARIANT_ENV")
            if hasattr(module, name)}  # fmt: skip
    assert {kmeans_triton.VARIANT_ENV, "BENCH_SLA_BACKEND"} <= read
    assert set(choices) == read
    assert choices[kmeans_triton.VARIANT_ENV] == "sorted"
    assert choices[xattn_scoring_triton.VARIANT_ENV] == xattn_scoring_triton.DEFAULT_VARIANT
