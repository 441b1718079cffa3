"""The sparse GPU script's CPU smoke mode: Flex check, attention timings and forward latency on wan-tiny."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from harness.benchmarks.sparse_gpu import backend_check_patterns, main, sparse_method_names
from methods.kernels import sparse_backends
from methods.kernels.block_sparse import masked_dense_attention


def test_default_methods_are_the_registered_sparse_ones() -> None:
    """Without --methods the script takes every static or dynamic method, and no dense one."""
    names = sparse_method_names()
    assert {"xattn", "svg", "svg2", "radial"} <= set(names)
    assert not {"sdpa", "fa2", "cudnn", "linear", "linvideo"} & set(names)


def test_smoke_run_writes_checks_timings_and_densities(tmp_path: Path) -> None:
    """--device cpu --models wan-tiny: the check passes, the JSON holds the kernel and forward timings,
    densities, and the data-dependent row is marked."""
    main(["--out", str(tmp_path), "--device", "cpu", "--models", "wan-tiny", "--methods", "radial,xattn"])
    result = json.loads((tmp_path / "sparse_latency_wan-tiny.json").read_text())
    assert all(check["passed"] for check in result["flex_check"].values())
    assert set(result["methods"]) == {"sdpa", "radial", "xattn"}
    assert result["attention"]["methods"]["radial"]["kernel"]["median_ms"] > 0
    assert 0 < result["methods"]["radial"]["density"] < 1
    assert "note" in result["methods"]["xattn"] and "note" not in result["methods"]["radial"]
    backends = result["attention"]["methods"]["radial"]["backends"]
    assert backends["chosen"] in ("masked", "flex", "flex-tuned")
    assert "ms" in backends["report"][backends["chosen"]] and "skipped" in backends["report"]["flashinfer"]
    rows = json.loads((tmp_path / "sparse_summary.json").read_text())["rows"]
    assert {row["method"] for row in rows} == {"sdpa", "radial", "xattn"}
    assert {row["backend"] for row in rows if row["method"] == "xattn"} <= {"masked", "flex", "flex-tuned"}


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


def test_an_unknown_required_backend_is_one_line_naming_the_known_ones(tmp_path: Path) -> None:
    """A typo in --backends stops the script with the registered names, not a traceback."""
    with pytest.raises(SystemExit, match=r"^--backends: block-sparse backend must be one of .*'flashinfer'.*'triton'"):
        main(["--out", str(tmp_path), "--device", "cpu", "--backends", "triton"])


def test_the_backend_check_patterns_keep_a_key_for_every_query_and_an_empty_cluster() -> None:
    """Masked dense is finite on both check patterns (no query without keys), the tiles are ragged with unequal
    query and key blocks, and the clusters hold an empty one as FlashInfer's variable blocks."""
    patterns = backend_check_patterns(1, 2, 200, (16, 32), torch.device("cpu"))
    q, k, v = (torch.randn(1, 2, 200, 8) for _ in range(3))
    assert all(masked_dense_attention(q, k, v, p).isfinite().all() for p in patterns.values())
    assert patterns["tiles"].blocks == (16, 32) and 200 % 32
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
