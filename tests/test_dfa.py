"""DiTFastAttn: each plan choice against a hand-computed fp64 reference, densities, schedule, plans, calibration."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from harness.errors import HarnessError
from methods import AttentionContext, Schedule, TokenGrid, build_method
from methods.dfa import (
    FULL,
    REUSE_COND,
    REUSE_STEP,
    WINDOW,
    WINDOW_REUSE_COND,
    DfaPlan,
    band_density,
    band_pattern,
    output_steps,
    residual_steps,
    window_radius,
)
from methods.dfa_calibrate import relative_error

B, H, N, D = 2, 2, 40, 8
LAYERS, STEPS = 2, 4


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v in float64, optionally restricted to ``mask`` (N, N)."""
    scores = q.double() @ k.double().transpose(-2, -1) / q.shape[-1] ** 0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1) @ v.double()


def band(tokens: int, radius: int) -> torch.Tensor:
    index = torch.arange(tokens)
    return (index[:, None] - index[None, :]).abs() <= radius


def ctx(step: int, layer: int = 0, branch: str = "cond") -> AttentionContext:
    return AttentionContext(layer=layer, num_layers=LAYERS, step=step, num_steps=STEPS, timestep=1 - step / STEPS,
                            cfg_branch=branch, grid=TokenGrid(1, 5, 8))  # type: ignore[arg-type]  # fmt: skip


def qkv() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(torch.randn(B, H, N, D) for _ in range(3))  # type: ignore[return-value]


def plan_file(tmp_path: Path, rows: list[list[str]], window: float = 0.25) -> Path:
    path = tmp_path / "plan.json"
    DfaPlan(choices=rows, window_fraction=window, threshold=0.05, cfg=True).save(path)
    return path


def method_with(tmp_path: Path, rows: list[list[str]], schedule: Schedule | None = None, window: float = 0.25):  # type: ignore[no-untyped-def]
    method = build_method("dfa", schedule, plan=str(plan_file(tmp_path, rows, window)))
    method.validate_for(len(rows[0]), len(rows))
    return method


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm())


def test_all_full_plan_equals_dense(tmp_path: Path) -> None:
    """A plan of full attention everywhere gives dense attention on every call and density 1."""
    method = method_with(tmp_path, [[FULL] * LAYERS] * STEPS)
    for step in range(STEPS):
        q, k, v = qkv()
        for branch in ("cond", "uncond"):
            assert rel(method(q, k, v, ctx(step, branch=branch)), reference(q, k, v)) < 1e-5
    assert method.density.mean() == 1.0


def test_window_residual_adds_the_cached_residual(tmp_path: Path) -> None:
    """WA-RS at step 2 = window(step 2) + full(step 0) - window(step 0); the band is |i - j| <= radius."""
    method = method_with(tmp_path, [[FULL] * LAYERS, [REUSE_STEP] * LAYERS, [WINDOW] * LAYERS, [FULL] * LAYERS])
    radius = window_radius(N, 0.25)
    mask = band(N, radius)
    q0, k0, v0 = qkv()
    method(q0, k0, v0, ctx(0))
    method(*qkv(), ctx(1))
    q2, k2, v2 = qkv()
    out = method(q2, k2, v2, ctx(2))
    expected = reference(q2, k2, v2, mask) + reference(q0, k0, v0) - reference(q0, k0, v0, mask)
    assert rel(out, expected) < 1e-5


def test_window_covering_everything_equals_dense(tmp_path: Path) -> None:
    """With the window as wide as the sequence, WA-RS is exact: the residual is zero."""
    method = method_with(tmp_path, [[FULL] * LAYERS] + [[WINDOW] * LAYERS] * (STEPS - 1), window=2.0)
    assert window_radius(N, 2.0) >= N - 1
    method(*qkv(), ctx(0))
    q, k, v = qkv()
    assert rel(method(q, k, v, ctx(1)), reference(q, k, v)) < 1e-5
    assert method.density.per_step()[1] == 1.0


def test_recorded_density_is_the_band_mask_density(tmp_path: Path) -> None:
    """A windowed call records the exact share of the band mask; a reuse records 0; a refresh 1 + band."""
    method = method_with(tmp_path, [[FULL] * LAYERS, [WINDOW] * LAYERS, [REUSE_STEP] * LAYERS, [FULL] * LAYERS])
    radius = window_radius(N, 0.25)
    mask_share = float(band(N, radius).double().mean())
    pattern = band_pattern(N, radius, torch.device("cpu"))
    assert torch.equal(pattern.dense_mask()[0, 0], band(N, radius))
    assert band_density(N, radius) == pytest.approx(mask_share, abs=1e-12)
    assert pattern.density() == pytest.approx(mask_share, abs=1e-12)
    for step in range(3):
        method(*qkv(), ctx(step))
    per_step = method.density.per_step()
    assert per_step[0] == pytest.approx(1.0 + mask_share)  # full + window: the residual step 1 uses
    assert per_step[1] == pytest.approx(mask_share)
    assert per_step[2] == 0.0


def test_reuse_step_returns_the_previous_output_of_the_same_branch(tmp_path: Path) -> None:
    """AST returns exactly what the same layer and CFG branch produced one step earlier."""
    method = method_with(tmp_path, [[FULL] * LAYERS, [REUSE_STEP] * LAYERS, [FULL] * LAYERS, [FULL] * LAYERS])
    cond_in, uncond_in = qkv(), qkv()
    cond_out = method(*cond_in, ctx(0, branch="cond"))
    uncond_out = method(*uncond_in, ctx(0, branch="uncond"))
    assert torch.equal(method(*qkv(), ctx(1, branch="cond")), cond_out)
    assert torch.equal(method(*qkv(), ctx(1, branch="uncond")), uncond_out)


@pytest.mark.parametrize("choice", [REUSE_COND, WINDOW_REUSE_COND])
def test_cfg_reuse_copies_the_conditional_output(tmp_path: Path, choice: str) -> None:
    """ASC: the unconditional call returns the conditional call's output of the same step, at density 0."""
    method = method_with(tmp_path, [[FULL] * LAYERS, [choice] * LAYERS, [FULL] * LAYERS, [FULL] * LAYERS])
    method(*qkv(), ctx(0, branch="cond"))
    method(*qkv(), ctx(0, branch="uncond"))
    q, k, v = qkv()
    cond = method(q, k, v, ctx(1, branch="cond"))
    if choice == REUSE_COND:
        assert rel(cond, reference(q, k, v)) < 1e-5
    assert torch.equal(method(*qkv(), ctx(1, branch="uncond")), cond)
    density_before = method.density.per_step()[1]
    assert density_before == pytest.approx((1.0 if choice == REUSE_COND else band_density(N, 5)) / 2)


def test_cfg_reuse_without_conditional_pass_is_an_error(tmp_path: Path) -> None:
    method = method_with(tmp_path, [[FULL] * LAYERS, [REUSE_COND] * LAYERS, [FULL] * LAYERS, [FULL] * LAYERS])
    method(*qkv(), ctx(0, branch="uncond"))
    with pytest.raises(HarnessError, match="conditional pass of the same step"):
        method(*qkv(), ctx(1, branch="uncond"))


def test_schedule_runs_full_on_warmup_steps_and_dense_layers(tmp_path: Path) -> None:
    """Dense warm-up steps and dense layers compute dense attention where the plan says reuse."""
    rows = [[FULL] * LAYERS] + [[REUSE_STEP] * LAYERS] * (STEPS - 1)
    method = method_with(tmp_path, rows, Schedule(dense_warmup_steps=2, dense_layers=(1,)))
    for step in range(STEPS):
        for layer in range(LAYERS):
            q, k, v = qkv()
            out = method(q, k, v, ctx(step, layer))
            dense = step < 2 or layer == 1
            assert (rel(out, reference(q, k, v)) < 1e-5) == dense, (step, layer)
    per_layer = method.density.per_layer()
    assert per_layer[1] == 1.0 and per_layer[0] == pytest.approx(0.5)


def test_residual_is_refreshed_only_where_a_window_follows() -> None:
    rows = [[FULL, FULL], [WINDOW, REUSE_STEP], [FULL, REUSE_COND], [REUSE_STEP, WINDOW_REUSE_COND]]
    assert residual_steps(rows) == {(0, 0), (2, 1)}


def test_output_is_kept_only_where_the_next_step_reuses_it() -> None:
    rows = [[FULL, FULL], [WINDOW, REUSE_STEP], [FULL, REUSE_STEP], [REUSE_STEP, WINDOW_REUSE_COND]]
    assert output_steps(rows) == {(0, 1), (1, 1), (2, 0)}


def test_plan_round_trip_and_record_params(tmp_path: Path) -> None:
    """A saved plan loads unchanged; the method records its path, sha256, threshold and choice counts."""
    rows = [[FULL, FULL], [WINDOW, REUSE_STEP], [REUSE_COND, FULL]]
    path = plan_file(tmp_path, rows)
    assert DfaPlan.load(path).choices == rows
    params = build_method("dfa", plan=str(path)).params()
    assert params["plan_sha256"] and params["calibrated"] and params["threshold"] == 0.05
    assert params["choices"] == {FULL: 3, WINDOW: 1, REUSE_STEP: 1, REUSE_COND: 1}


def plan_json(choices: list[list[str]]) -> str:
    return json.dumps({"method": "dfa", "format": 1, "choices": choices, "window_fraction": 0.1, "threshold": 0.1,
                       "cfg": True})  # fmt: skip


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "cannot read dfa plan"),
        (json.dumps({"method": "svg"}), "is not a dfa plan"),
        (plan_json([["window_residual"]]), "step 0 must be full"),
        (plan_json([["full"], ["skip"]]), "unknown choices"),
    ],
)
def test_bad_plan_is_a_clear_error(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "plan.json"
    path.write_text(content)
    with pytest.raises(HarnessError, match=message):
        build_method("dfa", plan=str(path))


def test_missing_plan_names_the_calibrate_command() -> None:
    with pytest.raises(HarnessError, match="bench calibrate --method dfa"):
        build_method("dfa")


def test_plan_for_other_steps_is_refused(tmp_path: Path) -> None:
    method = build_method("dfa", plan=str(plan_file(tmp_path, [[FULL] * LAYERS] * STEPS)))
    with pytest.raises(HarnessError, match="calibrate for this setting"):
        method.validate_for(LAYERS, STEPS + 1)


def test_relative_error_is_zero_for_equal_and_bounded_by_clip() -> None:
    a = torch.randn(100)
    assert relative_error(a, a) == 0.0
    assert relative_error(a, -a) == pytest.approx(2.0, rel=1e-3)


def calibrate_tiny(model, threshold: float):  # type: ignore[no-untyped-def]
    """A plan for wan-tiny (3 steps) on one prompt; returns the plan and the batch it was searched on."""
    from dataclasses import replace

    from methods.dfa_calibrate import calibrate

    sampling = replace(type(model).defaults, steps=3)
    noise = torch.randn(1, *type(model).latent_shape(sampling), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        cond, uncond = model.encode_prompts(["a cat"]), model.encode_prompts([""])
    return calibrate(model, noise, cond, uncond, sampling, threshold, 0.125), (noise, cond, uncond, sampling)


def test_zero_threshold_keeps_only_exact_substitutes(tiny_model) -> None:  # type: ignore[no-untyped-def]
    """Under a ~0 threshold only exact substitutes survive, and sampling with the plan equals dense sampling."""
    plan, (noise, cond, uncond, sampling) = calibrate_tiny(tiny_model, 1e-12)
    # Layer 0's self-attention runs before any cross-attention: its two CFG branches are identical.
    assert plan.choices[1][0] == REUSE_COND and plan.errors[1][0] == 0.0
    assert all(plan.errors[s][layer] == 0.0 for s in range(1, 3) for layer in range(LAYERS)
               if plan.choices[s][layer] != FULL)  # fmt: skip
    samples = {}
    for name, params in (("sdpa", {}), ("dfa", {"uniform": FULL})):
        method = build_method(name, **params)
        method.validate_for(LAYERS, 3)
        if name == "dfa":
            method.use_plan(plan)
        with tiny_model.use_method(method) as runtime, torch.inference_mode():
            samples[name] = tiny_model.sample(noise, cond, uncond, sampling, runtime)
    torch.testing.assert_close(samples["dfa"], samples["sdpa"], rtol=1e-5, atol=1e-5)


def test_loose_threshold_reuses_every_later_step(tiny_model) -> None:  # type: ignore[no-untyped-def]
    plan, _ = calibrate_tiny(tiny_model, 10.0)
    assert plan.counts() == {FULL: 2, REUSE_STEP: 4}
    per_step = plan.calibration["density"]["per_step"]
    assert per_step[1] == per_step[2] == 0.0


def test_calibrate_command_then_run_records_the_plan(bench, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """bench calibrate writes the plan; bench run --param plan=... records its sha256, choices and density."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    plan_path, runs = tmp_path / "plan.json", tmp_path / "runs"
    bench("calibrate", "--model", "wan-tiny", "--prompt-file", prompts, "--threshold", 10.0, "--steps", 2,
          "--out", plan_path, "--device", "cpu", "--no-progress")  # fmt: skip
    result = bench("run", "--method", "dfa", "--model", "wan-tiny", "--device", "cpu", "--steps", 2,
                   "--param", f"plan={plan_path}", "--runs-dir", runs, "--no-progress", "--json")  # fmt: skip
    record = json.loads(result.stdout)["record"]
    params = record["method_params_resolved"]
    assert params["plan_sha256"] == hashlib.sha256(plan_path.read_bytes()).hexdigest()
    assert params["choices"] == {FULL: 2, REUSE_STEP: 2}
    assert record["density"]["per_step"] == {"0": 1.0, "1": 0.0}
