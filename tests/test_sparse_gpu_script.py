"""The sparse GPU script's CPU smoke mode: Flex check, attention timings and forward latency on wan-tiny."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from harness.benchmarks.sparse_gpu import (
    PAPER_DENSITY,
    STATED_DENSITY_NOTE,
    backend_check_patterns,
    check_backends,
    main,
    sparse_method_names,
    stated_densities,
)
from methods.kernels import sparse_backends
from methods.kernels.block_sparse import masked_dense_attention
from methods.kernels.sparse_backends import REGISTRY, register_backend


def test_default_methods_are_the_registered_sparse_ones() -> None:
    """Without --methods the script takes every static or dynamic method, and no dense one."""
    names = sparse_method_names()
    assert {"xattn", "svg", "svg2", "radial"} <= set(names)
    assert not {"sdpa", "fa2", "cudnn", "linear", "linvideo"} & set(names)


SWEEP_DENSITIES = (0.2, 0.5)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One CPU run on wan-tiny (radial, xattn and svg2 at their paper densities, svg2's sweep at two densities):
    the latency record and the summary."""
    out = tmp_path_factory.mktemp("sparse")
    main(["--out", str(out), "--device", "cpu", "--models", "wan-tiny", "--methods", "radial,xattn,svg2",
          "--svg2-densities", ",".join(map(str, SWEEP_DENSITIES))])  # fmt: skip
    return {"latency": json.loads((out / "sparse_latency_wan-tiny.json").read_text()),
            "summary": json.loads((out / "sparse_summary.json").read_text())}  # fmt: skip


def test_smoke_run_writes_checks_timings_and_densities(smoke: dict[str, Any]) -> None:
    """--device cpu --models wan-tiny: the check passes, the JSON holds the kernel and forward timings,
    densities, and the data-dependent rows are marked."""
    result = smoke["latency"]
    assert all(check["passed"] for check in result["flex_check"].values())
    assert set(result["methods"]) == {"sdpa", "radial", "xattn", "svg2"}
    assert result["attention"]["methods"]["radial"]["kernel"]["median_ms"] > 0
    assert 0 < result["methods"]["radial"]["density"] < 1
    assert "note" in result["methods"]["xattn"] and "note" not in result["methods"]["radial"]
    backends = result["attention"]["methods"]["radial"]["backends"]
    assert backends["chosen"] in ("masked", "flex", "flex-tuned")
    assert "ms" in backends["report"][backends["chosen"]] and "skipped" in backends["report"]["flashinfer"]
    rows = smoke["summary"]["rows"]
    assert {row["method"] for row in rows} == {"sdpa", "radial", "xattn", "svg2"}
    assert {row["backend"] for row in rows if row["method"] == "xattn"} <= {"masked", "flex", "flex-tuned"}


def test_methods_that_take_a_density_are_checked_and_timed_at_their_papers(smoke: dict[str, Any]) -> None:
    """By default xattn and svg2 run at PAPER_DENSITY in the check, the attention call and the forward, and every
    record says the density was stated (radial's own density is not); the measured density stays beside it."""
    result, stated = smoke["latency"], {"xattn": PAPER_DENSITY["xattn"], "svg2": PAPER_DENSITY["svg2"]}
    assert smoke["summary"]["stated_density"] == stated
    for records in (result["methods"], result["attention"]["methods"]):
        assert {name: records[name]["density_fixed_by_user"] for name in ("radial", *stated)} == {"radial": None,
                                                                                                  **stated}  # fmt: skip
        assert all(records[name]["note"] == STATED_DENSITY_NOTE for name in stated)
    for name, density in stated.items():
        assert result["methods"][name]["params"]["fixed_density"] == density
        assert result["flex_check"][name]["density_fixed_by_user"] == density
        assert result["flex_check"][name]["density"] == pytest.approx(density, abs=0.1)
    rows = {row["method"]: row for row in smoke["summary"]["rows"]}
    assert {name: rows[name]["density_fixed_by_user"] for name in stated} == stated


def test_kernel_efficiency_is_the_ideal_over_the_kernel_on_the_chosen_backend(smoke: dict[str, Any]) -> None:
    """Per method: ideal = density of the timed plan x the dense call; efficiency = ideal / the chosen backend's
    time (bench latency's kernel_efficiency), kernel_over_ideal its inverse; the dense call's is 1."""
    rows = smoke["latency"]["attention"]["methods"]
    dense_ms = rows["sdpa"]["call"]["median_ms"]
    assert rows["sdpa"]["kernel_efficiency"] == pytest.approx(1.0)
    for name in ("radial", "xattn", "svg2"):
        row = rows[name]
        kernel_ms = row["backends"]["report"][row["backends"]["chosen"]]["ms"]
        assert row["ideal_kernel_ms"] == pytest.approx(row["plan_density"] * dense_ms)
        assert row["kernel_efficiency"] == pytest.approx(row["ideal_kernel_ms"] / kernel_ms)
        assert row["kernel_over_ideal"] == pytest.approx(1 / row["kernel_efficiency"])
    summary = {row["method"]: row for row in smoke["summary"]["rows"]}
    assert summary["svg2"]["kernel_over_ideal"] == rows["svg2"]["kernel_over_ideal"]


def test_selection_in_calls_is_whole_calls_less_kernels_back_to_back(smoke: dict[str, Any]) -> None:
    """What a plan adds inside a sequence of calls: whole calls back to back less the same plan's kernels back to
    back, as a share of the dense call; the summary row carries the share."""
    rows = smoke["latency"]["attention"]["methods"]
    dense_ms = rows["sdpa"]["call"]["median_ms"]
    summary = {row["method"]: row for row in smoke["summary"]["rows"]}
    for name in ("radial", "xattn", "svg2"):
        row = rows[name]
        assert row["calls_back_to_back_ms"] > 0 and row["kernels_back_to_back_ms"] > 0
        assert row["selection_in_calls_ms"] == pytest.approx(
            row["calls_back_to_back_ms"] - row["kernels_back_to_back_ms"]
        )
        assert row["selection_in_calls_share_of_dense"] == pytest.approx(row["selection_in_calls_ms"] / dense_ms)
        assert summary[name]["selection_in_calls_share_of_dense"] == row["selection_in_calls_share_of_dense"]


def test_svg2_sweep_has_one_checked_and_timed_point_per_stated_density(smoke: dict[str, Any]) -> None:
    """attention.svg2_density_sweep: per --svg2-densities value, svg2's plan at it, every backend's error against
    masked dense (within tolerance where timed) and its time over the ideal; flashinfer skipped here with its reason."""
    points = smoke["latency"]["attention"]["svg2_density_sweep"]
    assert [point["density_fixed_by_user"] for point in points] == list(SWEEP_DENSITIES)
    assert points[0]["density"] < points[1]["density"] <= points[1]["tile_density"]
    dense_ms = smoke["latency"]["attention"]["methods"]["sdpa"]["call"]["median_ms"]
    for point in points:
        assert point["ideal_kernel_ms"] == pytest.approx(point["density"] * dense_ms)
        assert "ms" in point["backends"][point["chosen"]] and "skipped" in point["backends"]["flashinfer"]
        for outcome in (o for o in point["backends"].values() if "ms" in o):
            assert outcome["error"] <= 1e-4
            assert outcome["kernel_over_ideal"] == pytest.approx(outcome["ms"] / point["ideal_kernel_ms"])
    assert smoke["summary"]["svg2_density_sweep"]["wan-tiny"] == points


@pytest.mark.parametrize(
    ("setting", "names", "expected"),
    [
        ("paper", ["radial", "xattn", "svg2"], {"xattn": 0.344, "svg2": 0.295}),
        ("none", ["xattn", "svg2"], {}),
        ("0.25", ["radial", "xattn", "svg2"], {"xattn": 0.25, "svg2": 0.25}),
        ("paper", ["radial"], {}),
    ],
)
def test_at_density_states_a_density_for_the_methods_that_take_one(setting: str, names: list[str],
                                                                     expected: dict[str, float]) -> None:  # fmt: skip
    """paper: each method's PAPER_DENSITY; none: nothing stated; a fraction: that one for every method with
    fixed_density (radial has none)."""
    assert stated_densities(setting, names) == expected


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--at-density", "1.5"], r"^--at-density must be a finite number > 0 and <= 1 \(a kept fraction\), got 1.5$"),
        (["--at-density", "half"], r"^--at-density takes kept fractions in \(0, 1\], got 'half'$"),
        (["--at-density", "0.2,0.3"], r"^--at-density takes paper, none or one kept fraction"),
        (["--at-density", "0.2", "--methods", "radial"], r"^--at-density applies to methods with a fixed-density"),
        (["--svg2-densities", "0.1,0"], r"^--svg2-densities must be a finite number > 0 and <= 1"),
    ],
)
def test_a_bad_density_option_stops_the_script_before_any_check(tmp_path: Path, option: list[str], message: str
                                                                ) -> None:  # fmt: skip
    """A density outside (0, 1], not a number, or stated for methods that take none: one line, nothing written."""
    with pytest.raises(SystemExit, match=message):
        main(["--out", str(tmp_path / "out"), "--device", "cpu", "--models", "wan-tiny", *option])
    assert not (tmp_path / "out").exists()


def test_at_density_none_leaves_the_thresholds_and_the_check_says_so(tmp_path: Path) -> None:
    """--at-density none --check-only: nothing stated, xattn checked with its threshold (fixed_density unset)."""
    main(["--out", str(tmp_path), "--device", "cpu", "--methods", "xattn", "--at-density", "none", "--check-only"])
    result = json.loads((tmp_path / "sparse_check.json").read_text())
    assert result["stated_density"] == {} and result["flex_check"]["xattn"]["passed"]
    assert result["flex_check"]["xattn"]["density_fixed_by_user"] is None


def test_toy_cuda_script_checks_toy_size_and_a_wan_clip_at_their_automatic_blocks() -> None:
    """The CUDA script's Flex checks run at the toy's 512 tokens (blocks of 32, below Flex's 128-tile) and
    at a 1,950-token Wan clip (blocks of 64), with each model's heads and head size."""
    from harness.benchmarks.toy_cuda_gpu import check_shapes
    from methods.sparse import auto_block_size

    shapes = check_shapes()
    assert {name: (grid.tokens, auto_block_size(grid.tokens), heads, dim)
            for name, (grid, heads, dim) in shapes.items()} == {"toy": (512, 32, 4, 32),
                                                                "wan-like": (1950, 64, 12, 128)}  # fmt: skip


def test_a_required_backend_that_cannot_import_stops_the_script_naming_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--backends flashinfer without flashinfer: one line naming the module and its pip distribution, before any
    method is checked or timed; the check's JSON says why."""
    monkeypatch.setitem(sys.modules, "flashinfer", None)  # import raises ImportError
    sparse_backends.import_failure.cache_clear()
    try:
        with pytest.raises(
            SystemExit,
            match=r"^stopped before timing anything: backend 'flashinfer' on tiles: "
            r"package 'flashinfer' cannot be imported \(pip install flashinfer-python\)",
        ):
            main(["--out", str(tmp_path), "--device", "cpu", "--models", "wan-tiny", "--backends", "flashinfer"])
    finally:
        sparse_backends.import_failure.cache_clear()
    check = json.loads((tmp_path / "sparse_check.json").read_text())["backend_check"]
    assert not check["passed"] and "flashinfer-python" in check["patterns"]["clusters"]["flashinfer"]["skipped"]
    assert not (tmp_path / "sparse_latency_wan-tiny.json").exists()


def test_a_check_pattern_of_a_kind_the_backend_refuses_is_not_applicable_not_a_failure() -> None:
    """A backend that never runs variable blocks (as flashinfer-bsr) passes on the tiles and is not failed on svg2's
    clusters: no method making them runs on it (the preflight refuses it first)."""
    register_backend("fake-no-variable", refused_kinds={"variable": "whole tiles only"})(masked_dense_attention)
    try:
        check = check_backends(["fake-no-variable"], torch.device("cpu"))
    finally:
        REGISTRY.pop("fake-no-variable")
    assert check["passed"] and check["failure"] is None and "ms" in check["patterns"]["tiles"]["fake-no-variable"]
    assert check["patterns"]["clusters"]["fake-no-variable"] == {"not_applicable": "variable-size blocks: whole tiles "
                                                                                   "only"}  # fmt: skip


def test_a_backend_that_takes_only_square_tiles_is_checked_on_the_square_pattern() -> None:
    """A backend refusing unequal query and key blocks by their data (as flashinfer-bsr) is checked on the square
    tiles, not failed on the unequal ones: the check of flashinfer-bsr could never pass before."""
    register_backend("fake-square", refused_kinds={"variable": "whole tiles only"},
                     refuses=lambda p: None if p.blocks[0] == p.blocks[1] else "square tiles only")(
        masked_dense_attention)  # fmt: skip
    try:
        check = check_backends(["fake-square"], torch.device("cpu"))
    finally:
        REGISTRY.pop("fake-square")
    assert check["passed"] and "ms" in check["patterns"]["square"]["fake-square"]
    assert check["patterns"]["tiles"]["fake-square"] == {"not_applicable": "square tiles only"}


def test_a_backend_that_runs_none_of_the_check_patterns_fails_the_check() -> None:
    register_backend("fake-none", refuses=lambda p: "nothing")(masked_dense_attention)
    try:
        check = check_backends(["fake-none"], torch.device("cpu"))
    finally:
        REGISTRY.pop("fake-none")
    assert not check["passed"] and "runs none of the check patterns" in check["failure"]


def test_an_unknown_required_backend_is_one_line_naming_the_known_ones(tmp_path: Path) -> None:
    """A typo in --backends stops the script with the registered names, not a traceback."""
    with pytest.raises(SystemExit, match=r"^--backends: block-sparse backend must be one of .*'flashinfer'.*'triton'"):
        main(["--out", str(tmp_path), "--device", "cpu", "--backends", "triton"])


def test_the_backend_check_patterns_keep_a_key_for_every_query_and_an_empty_cluster() -> None:
    """Masked dense is finite on every check pattern (no query without keys), the tiles are ragged with unequal
    query and key blocks and square ones of the key block, and the clusters hold an empty one as FlashInfer's
    variable blocks."""
    patterns = backend_check_patterns(1, 2, 200, (16, 32), torch.device("cpu"))
    q, k, v = (torch.randn(1, 2, 200, 8) for _ in range(3))
    assert all(masked_dense_attention(q, k, v, p).isfinite().all() for p in patterns.values())
    assert patterns["tiles"].blocks == (16, 32) and 200 % 32 and patterns["square"].blocks == (32, 32)
    variable = patterns["clusters"].variable
    assert variable is not None and bool((variable.row_sizes == 0).any()) and bool((variable.col_sizes == 0).any())
    assert bool((variable.row_sizes.sum(-1) == 200).all())


def test_check_only_runs_the_checks_and_times_nothing(tmp_path: Path) -> None:
    """--check-only with a backend that runs here: both checks in sparse_check.json, no timing files."""
    main(["--out", str(tmp_path), "--device", "cpu", "--models", "wan-tiny", "--methods", "radial",
          "--backends", "masked", "--check-only"])  # fmt: skip
    result = json.loads((tmp_path / "sparse_check.json").read_text())
    assert result["backend_check"]["passed"] and result["flex_check"]["radial"]["passed"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sparse_check.json"]
