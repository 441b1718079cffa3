"""`bench ablate` trains, samples, scores and records each variant; `bench report` tabulates and plots them."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from conftest import Invoke, normalise, records_in

from harness.ablate import variants
from harness.models.toy import ToyModel


@pytest.fixture
def quick_toy(monkeypatch: pytest.MonkeyPatch) -> None:
    """2 held-out prompts and 2 sampler steps: the pipeline, not the quality, is under test."""
    monkeypatch.setattr(ToyModel, "default_prompt_count", 2)
    monkeypatch.setattr(ToyModel, "defaults", dataclasses.replace(ToyModel.defaults, steps=2))


def test_variants_cover_the_papers_ablations() -> None:
    assert list(variants("alpha", 8, 4)) == ["20->2", "16->4", "24->1", "fixed 4"]
    assert list(variants("kernel", 8, 4)) == ["hedgehog", "relu", "taylor", "elu"]
    assert variants("selection", 8, 4)["manual"] == {"selection": "manual", "layers": (1, 2, 3, 4)}
    assert list(variants("target", 8, 4)) == ["2", "4", "6"]
    assert list(variants("objective", 8, 4)) == ["adm", "mse", "adm-extra-score"]
    assert variants("r-optimizer", 8, 4)["adamw (lr 1e-2)"] == {"r_optimizer": "adamw", "r_lr": 1e-2}


def test_unknown_axis_suggests_the_closest(bench: Invoke, tmp_path: Path) -> None:
    result = bench("ablate", "kernal", "--runs-dir", tmp_path, expect=2)
    assert "Did you mean 'kernel'" in normalise(result.output)


@pytest.mark.usefixtures("quick_toy")
def test_ablate_objective_records_each_variant_and_resumes(bench: Invoke, tmp_path: Path) -> None:
    runs, train = tmp_path / "runs", tmp_path / "train"
    args = ("ablate", "objective", "--steps", "2", "--batch-size", "2", "--prompts", "2", "--device", "cpu",
            "--runs-dir", runs, "--train-dir", train, "--no-progress")  # fmt: skip
    bench(*args)
    records = records_in(runs)
    assert sorted(r["ablation"]["variant"] for r in records) == ["adm", "adm-extra-score", "mse"]
    for record in records:
        assert record["spec"]["method"] == "linvideo" and "toybench" in record["metrics"]
        assert record["training"]["steps"] == 2 and len(record["training"]["r_per_step"]) == 2
    before = {p.name: p.stat().st_mtime_ns for p in runs.glob("*.json")}
    bench(*args)  # a finished sweep: nothing is trained or sampled again
    assert {p.name: p.stat().st_mtime_ns for p in runs.glob("*.json")} == before

    bench("run", "--model", "toy", "--method", "sdpa", "--device", "cpu", "--runs-dir", runs, "--no-progress")
    payload = json.loads(bench("report", "--runs-dir", runs, "--out", tmp_path / "report", "--json").stdout)
    rows = payload["tables"]["ablation_objective"]
    assert [row["variant"] for row in rows] == ["sdpa (reference)", "adm", "mse", "adm-extra-score"]
    figures = {Path(f).name for f in payload["files"] if f.endswith(".png")}
    assert {"regulariser_curves.png", "toybench_objective.png", "r_objective_adm.png"} <= figures
