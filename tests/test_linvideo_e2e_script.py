"""The LinVideo end-to-end GPU script's CPU smoke mode (whole samples and per step), its time budget, the per-step
schedule check, and the random full-size text encoder."""

from __future__ import annotations

import json
import time

import pytest
import torch

import harness.benchmarks.linvideo_e2e_gpu as e2e
from harness.benchmarks.linvideo_e2e_gpu import PAPER, PER_STEP_SAMPLE, Variant, main, run_samples, variants

SMOKE = ["--device", "cpu", "--model", "wan-tiny", "--steps", "2", "--few-steps", "1"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("e2e")
    main(["--out", str(out), *SMOKE])
    return json.loads((out / "linvideo_e2e_wan-tiny.json").read_text())


def test_smoke_run_checks_first_then_times_every_variant_as_a_real_sample(smoke: dict) -> None:
    assert smoke["correctness"]["linvideo_radial"]["passed"]
    rows = {row["key"]: row for row in smoke["samples"]}
    assert list(rows) == ["linvideo_4step", "fa2_50x2", "linvideo_radial_50x2", "linvideo_50x2", "cudnn_50x2"]
    assert all(row["measured"] and row["total_s"] > 0 and row["decode_s"] > 0 for row in rows.values())
    assert (rows["linvideo_4step"]["transformer_passes"], rows["fa2_50x2"]["transformer_passes"]) == (1, 4)
    assert rows["fa2_50x2"]["paper_s"] == PAPER["fa2_50x2_s"] and rows["linvideo_50x2"]["paper_s"] == 68.26


def test_linvideo_plus_radial_records_radial_and_a_linear_layer_at_density_zero(smoke: dict) -> None:
    row = next(row for row in smoke["samples"] if row["key"] == "linvideo_radial_50x2")
    assert row["params"]["softmax_method"] == "radial" and row["params"]["linear_layers"] == [1]
    assert row["density_per_layer"]["1"] == 0.0
    forward = smoke["forward_check"]
    assert forward["target"] == 2.0 and forward["linvideo_params"]["softmax_method"] == "radial"
    assert forward["bound_if_attention_were_free"] >= 1.0


@pytest.fixture(scope="module")
def per_step(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("e2e_step")
    main(["--out", str(out), "--device", "cpu", "--model", "wan-tiny", "--per-step"])
    return json.loads((out / "linvideo_e2e_per_step_wan-tiny.json").read_text())


def test_per_step_mode_times_the_second_step_of_a_real_two_step_sample_per_variant(per_step: dict) -> None:
    rows = {row["key"]: row for row in per_step["samples"]}
    assert list(rows) == ["linvideo_4step", "fa2_50x2", "linvideo_radial_50x2", "linvideo_50x2", "cudnn_50x2"]
    for row in rows.values():
        steps = row["timing"]["stages"]["denoise_step"]
        assert row["measured"] and row["steps"] == PER_STEP_SAMPLE and row["timed_step"] == PER_STEP_SAMPLE - 1
        assert row["step_ms"] == steps["median_ms"] == steps["samples_ms"][0] and len(steps["warmup_ms"]) == 1
    assert (rows["linvideo_4step"]["forward_ms"], rows["fa2_50x2"]["forward_ms"]) == pytest.approx(
        (rows["linvideo_4step"]["step_ms"], rows["fa2_50x2"]["step_ms"] / 2)
    )
    assert isinstance(per_step["forward_check"], str) and per_step["correctness"]["linvideo_radial"]["passed"]
    # No forward check: the first sample runs unpredicted, the later ones are predicted from the steps before.
    assert rows["linvideo_4step"]["predicted_s"] is None and rows["fa2_50x2"]["predicted_s"] > 0


def test_per_step_mode_predicts_paper_length_totals_with_encode_and_decode_measured_once(per_step: dict) -> None:
    rows = per_step["samples"]
    once = per_step["encode_decode_once"]
    assert once["measured_in"] == "linvideo_4step" and rows[0]["decode_s"] == once["decode_s"] > 0
    assert all(row["decode_s"] == 0 for row in rows[1:])
    for row in rows:
        passes = 2 if row["cfg"] > 1 else 1
        steps = 4 if row["key"] == "linvideo_4step" else 50
        assert row["target"]["steps"] == steps and row["target"]["transformer_passes"] == steps * passes
        expected = steps * row["step_ms"] / 1e3 + passes * once["encode_per_prompt_s"] + once["decode_s"]
        assert row["predicted_total_s"] == pytest.approx(expected) and row["predicted_note"].startswith("PREDICTED")


def test_per_step_schedule_puts_radials_timed_step_after_its_warm_up_at_wan14b() -> None:
    """Radial's 24% warm-up rounds to no step of 2 and to 12 of 50: the timed step 1 of 2 runs dense where steps
    12-49 of 50 do (radial's first layer alone); LinVideo with cuDNN has no warm-up."""
    plans = {v.key: v for v in variants("wan14b", torch.device("cuda"))}
    timed, target = (plans["linvideo_radial_50x2"].sampling("wan14b", n, 4) for n in (PER_STEP_SAMPLE, 50))
    radial = e2e.step_schedule(plans["linvideo_radial_50x2"], "wan14b", timed, target)
    assert radial == {"dense_warmup_steps": 12, "dense_layers_after_warmup": [0], "timed_matches_target": True}
    assert e2e.step_schedule(plans["linvideo_50x2"], "wan14b", timed, target)["dense_warmup_steps"] == 0


def test_per_step_mode_refuses_a_timed_step_still_in_warm_up_before_any_work(monkeypatch: pytest.MonkeyPatch,
                                                                            tmp_path) -> None:  # fmt: skip
    """Radial with 80% warm-up runs step 1 of 2 dense but step 49 of 50 sparse: the timed step would not be one of
    the target's; the script stops before the correctness checks."""
    late = Variant("late_radial", "radial, long warm-up", "radial", {"warmup_fraction": 0.8, "dense_first_layers": 0})
    monkeypatch.setattr(e2e, "variants", lambda model, device: [late])
    monkeypatch.setattr(e2e, "check_correctness", lambda *a: pytest.fail("checks ran before the refusal"))
    with pytest.raises(SystemExit, match="late_radial: the timed step 1 runs dense in other layers"):
        main(["--out", str(tmp_path), "--device", "cpu", "--model", "wan-tiny", "--per-step"])


def test_samples_predicted_past_the_budget_are_not_run_and_say_so() -> None:
    """Past the deadline nothing is built or sampled: each row holds its prediction from the forward medians."""
    device = torch.device("cpu")
    plans = [(variant, variant.sampling("wan-tiny", 2, 1)) for variant in variants("wan-tiny", device)]
    rows = run_samples(None, plans, {"sdpa": 10.0, "linvideo": 5.0}, deadline=time.time(), device=device)
    assert all(not row["measured"] and row["note"].startswith("NOT MEASURED") for row in rows)
    assert [row["total_s"] for row in rows] == pytest.approx([0.005, 0.04, 0.02, 0.02, 0.04])


def test_random_build_with_text_encoder_encodes_prompts_through_umt5(monkeypatch: pytest.MonkeyPatch) -> None:
    """build_random(text_encoder=True): a UMT5 encoder of the configured shape and a byte tokenizer padded to the
    model's text length; prompt embeddings come from it, padding zeroed (the config shrunk for the test)."""
    import harness.models.wan as wan

    small = {**wan.UMT5_XXL_CONFIG, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4}
    monkeypatch.setattr(wan, "UMT5_XXL_CONFIG", small)
    model = wan.WanTiny.build_random(torch.device("cpu"), torch.float32, text_encoder=True)
    assert model.text_encoder is not None and model.text_encoder.config.num_layers == 2
    embeddings = model.encode_prompts(["a red disk"])
    assert embeddings.shape == (1, wan.WanTiny.text_length, 32)
    assert embeddings[0, :11].abs().sum() > 0 and embeddings[0, 11:].abs().sum() == 0  # 10 bytes + end token
