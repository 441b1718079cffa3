"""The sparse GPU script's CPU smoke mode: Flex check, attention timings and forward latency on wan-tiny."""

from __future__ import annotations

import json
from pathlib import Path

from harness.benchmarks.sparse_gpu import main, sparse_method_names


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
