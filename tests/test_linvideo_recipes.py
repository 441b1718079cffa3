"""LinVideo's named recipes: the paper's appendix values beside the toy's, each difference with its trial."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest
from conftest import Invoke, normalise

from harness.errors import HarnessError
from harness.recipes import PAPER, TOY, TOY_CHANGES, recipe, recipe_table

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_toy_recipe_is_the_trainers_defaults_and_the_paper_recipe_sets_every_field() -> None:
    from methods.linvideo.train import LinVideoTrainConfig

    defaults = {field.name: field.default for field in fields(LinVideoTrainConfig)}
    assert {name: defaults[name] for name in TOY} == TOY
    assert set(recipe("paper")) == set(PAPER) <= set(defaults)


def test_every_toy_change_differs_from_the_paper_and_names_the_trial_behind_it() -> None:
    for name, change in TOY_CHANGES.items():
        assert change.value != PAPER[name].value, name
        assert "round" in change.source, name


def test_the_appendix_values_are_the_paper_recipes() -> None:
    """reference/linvideo.md 9.1: lr 1e-4 cosine, a tenth of warm-up, batch 48, alpha 20 -> 2 over training, lambda
    0.01, 3K steps; Eq. 13's weighting."""
    paper = recipe("paper")
    assert {key: paper[key] for key in ("lr", "warmup_fraction", "batch_size", "alpha_start", "alpha_end",
                                        "alpha_anneal_fraction", "lam", "steps", "adm_weighting")} == {
        "lr": 1e-4, "warmup_fraction": 0.1, "batch_size": 48, "alpha_start": 20.0, "alpha_end": 2.0,
        "alpha_anneal_fraction": 1.0, "lam": 0.01, "steps": 3000, "adm_weighting": "analytic"}  # fmt: skip


def test_an_unknown_recipe_is_refused() -> None:
    with pytest.raises(HarnessError, match="unknown recipe 'dmd'; choose one of toy, paper"):
        recipe("dmd")


def test_the_readme_shows_both_recipes_side_by_side() -> None:
    assert recipe_table() in README.read_text()


def test_bench_train_help_shows_both_recipes_values(bench: Invoke) -> None:
    output = normalise(bench("train", "--help").output)
    assert "--recipe" in output and "paper 0.0001, toy 1e-05" in output and "paper analytic, toy uniform" in output
