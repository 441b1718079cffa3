"""`bench ablate` trains, samples, scores and records each variant; `bench report` tabulates and plots them."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import Invoke, normalise, records_in

from harness.ablate import (
    AblationRequest,
    _spec,
    ablate,
    expand_axes,
    plan,
    sample_all,
    spread_over_gpus,
    train_all,
    variants,
)
from harness.models.toy import ToyModel
from harness.training import TrainRequest
from methods.linvideo import train as linvideo_train
from methods.linvideo.train import LinVideoTrainConfig


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


def test_a_configuration_shared_by_axes_is_planned_once(tmp_path: Path) -> None:
    base = LinVideoTrainConfig(target_layers=4)
    planned = plan(("objective", "kernel"), base, 8, tmp_path)
    assert len(planned) == 6  # adm and hedgehog are both the default recipe
    default = next(v for v in planned if v.config == base)
    assert default.memberships == [{"axis": "objective", "variant": "adm", "order": 0},
                                   {"axis": "kernel", "variant": "hedgehog", "order": 0}]  # fmt: skip
    assert len({v.folder for v in planned}) == 6


def test_all_means_the_papers_five_axes() -> None:
    assert expand_axes(("all", "kernel", "r-optimizer")) == (
        "alpha", "kernel", "objective", "selection", "target", "r-optimizer")  # fmt: skip


def test_parallel_training_matches_sequential(tmp_path: Path) -> None:
    """Two variants trained in two spawned processes end where the same two trained one after the other do."""

    def requests(folder: Path) -> list[TrainRequest]:
        return [TrainRequest(model="toy", weights="builtin", prompts=None, prompt_count=2, device="cpu",
                             config=LinVideoTrainConfig(target_layers=4, steps=2, batch_size=2, kernel=kernel),
                             out=folder / kernel, store=folder / "store", show_progress=False)
                for kernel in ("hedgehog", "relu")]  # fmt: skip

    sequential = train_all(requests(tmp_path / "one"), jobs=1, show_progress=False)
    parallel = train_all(requests(tmp_path / "two"), jobs=2, show_progress=False)
    for a, b in zip(sequential, parallel, strict=True):
        assert a.name == b.name and a.parent.name == "one" and b.parent.name == "two"
        first, second = (json.loads((path / "spec.json").read_text()) for path in (a, b))
        assert first["linear_layers"] == second["linear_layers"]
        assert first["final_r"] == pytest.approx(second["final_r"], abs=1e-5)


@pytest.mark.parametrize(
    ("device", "expected"), [("cuda", ["cuda:0", "cuda:1", "cuda:0"]), ("cuda:1", ["cuda:1"] * 3), ("cpu", ["cpu"] * 3)]
)
def test_concurrent_variants_are_dealt_over_the_visible_gpus(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, device: str, expected: list[str]
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    requests = [TrainRequest(model="toy", weights="builtin", prompts=None, prompt_count=2, device=device,
                             config=LinVideoTrainConfig(target_layers=4, steps=2), out=tmp_path / str(index),
                             store=tmp_path / "store", show_progress=False)
                for index in range(3)]  # fmt: skip
    assert [request.device for request in spread_over_gpus(requests)] == expected


def test_unknown_axis_suggests_the_closest(bench: Invoke, tmp_path: Path) -> None:
    result = bench("ablate", "kernal", "--runs-dir", tmp_path, expect=2)
    assert "Did you mean 'kernel'" in normalise(result.output)


@pytest.mark.usefixtures("quick_toy")
def test_ablate_objective_records_each_variant_and_resumes(
    bench: Invoke, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # r starts below 0.5, so the 2-step default ends with linear layers for the untrained-linear reference.
    # (over the recipe's r_init, which bench ablate passes explicitly)
    monkeypatch.setattr(
        linvideo_train, "LinVideoTrainConfig", lambda **kw: LinVideoTrainConfig(**{**kw, "r_init": 0.3})
    )
    runs, train = tmp_path / "runs", tmp_path / "train"
    args = ("ablate", "objective", "--steps", "2", "--batch-size", "2", "--prompts", "2", "--device", "cpu",
            "--runs-dir", runs, "--train-dir", train, "--no-progress")  # fmt: skip
    bench(*args)
    records = [r for r in records_in(runs) if "ablation" in r]
    assert {r["spec"]["method"] for r in records_in(runs) if "ablation" not in r} == {"sdpa", "linear"}
    assert sorted(m["variant"] for r in records for m in r["ablation"]) == ["adm", "adm-extra-score", "mse"]
    for record in records:
        assert record["spec"]["method"] == "linvideo" and "toybench" in record["metrics"]
        assert record["training"]["steps"] == 2 and len(record["training"]["r_per_step"]) == 2
    before = {p.name: p.stat().st_mtime_ns for p in runs.glob("*.json")}
    bench(*args)  # a finished sweep: nothing is trained or sampled again
    assert {p.name: p.stat().st_mtime_ns for p in runs.glob("*.json")} == before

    payload = json.loads(bench("report", "--runs-dir", runs, "--out", tmp_path / "report", "--json").stdout)
    rows = payload["tables"]["ablation_objective"]
    default = next(r for r in records if r["ablation"][0]["variant"] == "adm")
    layers = ",".join(map(str, default["training"]["linear_layers"]))
    linear = f"linear kernel=hedgehog layers={layers} (reference)"
    assert [row["variant"] for row in rows] == [linear, "sdpa (reference)", "adm", "mse", "adm-extra-score"]
    assert (rows[0]["trained"], rows[0]["linear_layers"]) == (False, layers)  # the reference's own layers
    assert rows[2]["concurrent_jobs"] == 1
    figures = {Path(f).name for f in payload["files"] if f.endswith(".png")}
    assert {"regulariser_curves.png", "toybench_objective.png", "r_objective_adm.png"} <= figures


def test_an_untrained_linear_reference_on_every_layer_counts_all_of_them() -> None:
    """``layers=all`` (the linear method's default) is every layer of the model, not a parse error."""
    from harness.report import _reference_linear_layers

    record = {"spec": {"method": "linear", "model": "toy"}, "method_params_resolved": {"layers": "all"}}
    assert _reference_linear_layers(record) == list(range(8))
    assert _reference_linear_layers({"spec": {"method": "sdpa", "model": "toy"}}) == []


@pytest.mark.parametrize(("options", "expected"), [
    ((), {"lr": 1e-5, "steps": 400, "batch_size": 8, "adm_weighting": "uniform"}),
    (("--recipe", "paper"), {"lr": 1e-4, "steps": 3000, "batch_size": 48, "adm_weighting": "analytic"}),
    (("--recipe", "paper", "--steps", "50", "--batch-size", "4"), {"lr": 1e-4, "steps": 50, "batch_size": 4}),
])  # fmt: skip
def test_ablate_starts_every_variant_from_the_named_recipe(
    options: tuple[str, ...], expected: dict, monkeypatch: pytest.MonkeyPatch, bench: Invoke
) -> None:
    """`bench ablate --recipe` sets the base configuration (toy by default); --steps/--batch-size override it."""
    import harness.ablate

    seen = []
    monkeypatch.setattr(harness.ablate, "ablate", lambda request: seen.append(request) or [])
    bench("ablate", "objective", *options)
    assert {key: getattr(seen[0].base, key) for key in expected} == expected


def test_ablate_unknown_recipe_is_refused(bench: Invoke) -> None:
    """An unknown recipe is a clear error naming the recipes, before anything trains."""
    result = bench("ablate", "objective", "--recipe", "papr", expect=2)
    assert "recipe" in normalise(result.output) and "paper" in normalise(result.output)


@pytest.mark.parametrize(("scores", "verdict"), [
    ({"adm": 70.0, "adm-extra-score": 60.0, "mse": 50.0}, "this toy agrees with the paper"),
    ({"adm": 53.1, "adm-extra-score": 40.0, "mse": 62.5}, "this toy DISAGREES with the paper"),
])  # fmt: skip
def test_objective_table_states_the_papers_order_beside_ours(scores: dict[str, float], verdict: str) -> None:
    """The objective ablation's note gives Tab. 4's order (adm > adm-extra-score > mse) beside the measured one;
    references (untrained rows) do not count."""
    import pandas as pd

    from harness.report import objective_order_note

    rows = [{"variant": "sdpa (reference)", "trained": False, "prompt_correctness": 99.0}]
    rows += [{"variant": name, "trained": True, "prompt_correctness": value} for name, value in scores.items()]
    note = objective_order_note(pd.DataFrame(rows))
    assert "adm > adm-extra-score > mse" in note and note.endswith(verdict)
    ours = " > ".join(sorted(scores, key=scores.get, reverse=True))
    assert f"prompt_correctness here {ours}" in note


@pytest.mark.usefixtures("quick_toy")
def test_concurrent_sampling_writes_the_records_sequential_sampling_does(bench: Invoke, tmp_path: Path) -> None:
    """Two runs sampled in two spawned processes score what the same two sampled one after the other do, say that
    they ran side by side, and a finished run is skipped, not sampled again."""

    request = AblationRequest(axes=("kernel",), model="toy", base=LinVideoTrainConfig(target_layers=4),
                              runs_dir=tmp_path, train_dir=tmp_path, device="cpu", prompt_count=2)  # fmt: skip
    specs = [_spec(request, "sdpa", {}), _spec(request, "linear", {"layers": "0,1", "kernel": "relu"})]
    sequential = [outcome for _, outcome in sorted(sample_all(specs, tmp_path / "one", jobs=1, show_progress=False))]
    parallel = dict(sample_all(specs, tmp_path / "two", jobs=2, show_progress=False))
    for index, a in enumerate(sequential):
        b = parallel[index]
        assert a.path.parent.name == "one" and b.path.parent.name == "two" and a.path.name == b.path.name
        assert b.record["metrics"]["toybench"] == pytest.approx(a.record["metrics"]["toybench"])
        assert "concurrent_runs" not in a.record["latency"] and b.record["latency"]["concurrent_runs"] == 2
    assert all(outcome.skipped for _, outcome in sample_all(specs, tmp_path / "two", jobs=2, show_progress=False))

    # Times measured beside another run are left out of every table, with a note; the solo runs keep theirs.
    def step_ms(folder: Path) -> tuple[list[Any], str]:
        payload = json.loads(bench("report", "--runs-dir", folder, "--out", folder / "report", "--json").stdout)
        return [row["step_ms"] for row in payload["tables"]["runs"]], json.dumps(payload)

    solo, _ = step_ms(tmp_path / "one")
    contended, text = step_ms(tmp_path / "two")
    assert all(ms is not None and ms > 0 for ms in solo) and all(ms is None for ms in contended)
    assert "2 run(s) sampled beside others" in text


@pytest.mark.usefixtures("quick_toy")
def test_an_interrupted_sampling_keeps_the_labels_of_the_variants_it_finished(
    bench: Invoke, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sweep cut off while sampling (the references come last) leaves every variant it sampled labelled with its
    axis and training, not shown as an unlabelled reference until it resumes."""
    import harness.generate

    real_run = harness.generate.run

    def run(spec: Any, runs_dir: Path, **kwargs: Any) -> Any:
        if spec.method == "sdpa":
            raise RuntimeError("device time ran out")
        return real_run(spec, runs_dir, **kwargs)

    monkeypatch.setattr(harness.generate, "run", run)
    runs = tmp_path / "runs"
    with pytest.raises(RuntimeError, match="device time ran out"):
        ablate(AblationRequest(axes=("target",), model="toy", base=LinVideoTrainConfig(target_layers=4, steps=2,
                                                                                       batch_size=2),
                               runs_dir=runs, train_dir=tmp_path / "train", device="cpu", prompt_count=2,
                               show_progress=False))  # fmt: skip
    variants = [record for record in records_in(runs) if record["spec"]["method"] == "linvideo"]
    assert len(variants) == 3 and all(record["ablation"] and record["training"] for record in variants)


@pytest.mark.usefixtures("quick_toy")
def test_a_failed_concurrent_sampling_leaves_the_others_marked_as_contended(tmp_path: Path) -> None:
    """The mark is part of a run's one record write: a sibling that fails (here a bad parameter) does not leave
    the finished run's record looking like a solo run's."""
    from harness.errors import HarnessError
    from harness.records import contended

    request = AblationRequest(axes=("kernel",), model="toy", base=LinVideoTrainConfig(target_layers=4),
                              runs_dir=tmp_path, train_dir=tmp_path, device="cpu", prompt_count=2)  # fmt: skip
    specs = [_spec(request, "sdpa", {}), _spec(request, "linear", {"layers": "99"})]
    with pytest.raises(HarnessError):
        list(sample_all(specs, tmp_path / "runs", jobs=2, show_progress=False))
    (record,) = records_in(tmp_path / "runs")
    assert record["spec"]["method"] == "sdpa" and contended(record)
