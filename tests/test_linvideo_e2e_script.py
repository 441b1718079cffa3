"""The LinVideo end-to-end GPU script's CPU smoke mode, its time budget, and the random full-size text encoder."""

from __future__ import annotations

import json
import time

import pytest
import torch

from harness.benchmarks.linvideo_e2e_gpu import PAPER, main, run_samples, variants

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
