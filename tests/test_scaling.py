"""The scaling sweep (attention time against tokens) at tiny sizes on CPU, and its log-log plot in `bench report`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from harness.benchmarks.scaling_gpu import CHECK_GRID, LINEAR_SETTING, check_method, default_methods, sweep
from harness.benchmarks.sparse_gpu import PAPER_DENSITY, sparse_method_names


@pytest.fixture(scope="module")
def scaling_record() -> dict:
    """The sweep itself, dense vs linear, over 2, 4 and 8 frames of 4 x 8 tokens (64-256 tokens)."""
    methods = {"sdpa": {}, "linear": dict(LINEAR_SETTING)}
    return sweep(methods, frames=(2, 4, 8), frame_shape=(4, 8), heads=2, head_dim=16, device=torch.device("cpu"),
                 dtype=torch.float32, warmup=0, repeats=1, log=lambda _: None)  # fmt: skip


def test_sweep_checks_then_times_every_length(scaling_record: dict) -> None:
    """Both methods pass their check against the float64 reference, then get one timed point per length with the
    density (1 dense, 0 linear) and TFLOP/s on the kept entries (none for linear attention)."""
    assert all(check["passed"] for check in scaling_record["checks"].values())
    assert scaling_record["kind"] == "scaling" and scaling_record["spec"]["frames"] == [2, 4, 8]
    for name, density in (("sdpa", 1.0), ("linear", 0.0)):
        points = scaling_record["methods"][name]["points"]
        assert [p["tokens"] for p in points] == [64, 128, 256]
        assert all(p["ms_per_call"] > 0 and p["density"] == density for p in points)
        assert all((p["tflops"] is None) == (density == 0.0) for p in points)


@pytest.mark.parametrize("name", sparse_method_names())
def test_sparse_methods_are_checked_flex_against_masked(name: str) -> None:
    """Every sparse method's check runs Flex against masked dense on the module's check grid (it once called
    :func:`~harness.benchmarks.sparse_gpu.check_flex` without the grid and crashed before timing anything)."""
    check = check_method(name, {}, torch.device("cpu"), torch.float32)
    assert check["passed"] and check["tokens"] == CHECK_GRID.tokens and check["heads"] == 2 and check["head_dim"] == 16


@pytest.mark.parametrize("name", ["xattn", "svg2"])
def test_a_method_timed_at_a_stated_density_is_checked_at_it(name: str) -> None:
    """The paper density the sweep times xattn and svg2 at (default_methods) is the one their check runs at."""
    params = default_methods(torch.device("cpu"))[name]
    check = check_method(name, params, torch.device("cpu"), torch.float32)
    assert params == {"fixed_density": PAPER_DENSITY[name]}
    assert check["passed"] and check["density_fixed_by_user"] == PAPER_DENSITY[name]


def test_report_draws_the_scaling_plot(scaling_record: dict, tmp_path: Path, bench) -> None:
    """`bench report` on a folder holding the sweep's JSON (and a latency record) writes its log-log PNG; the
    latency table carries the kernel efficiency."""
    runs = tmp_path / "runs"
    bench("latency", "--model", "wan-tiny", "--device", "cpu", "--methods", "sdpa", "--repeats", "1", "--warmup", "0",
          "--out", runs / "latency.json")  # fmt: skip
    (runs / "scaling.json").write_text(json.dumps(scaling_record))
    result = bench("report", "--runs-dir", runs, "--out", tmp_path / "reports", "--json")
    figure = tmp_path / "reports" / "figures" / "scaling.png"
    payload = json.loads(result.stdout)
    assert str(figure) in payload["files"]
    assert payload["tables"]["latency"][0]["kernel_efficiency"] == 1.0
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_of_a_folder_holding_only_a_sweep_draws_it(scaling_record: dict, tmp_path: Path, bench) -> None:
    """A folder with the sweep's JSON and no run record is reported (the figure, exit 0), not refused as empty."""
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "scaling.json").write_text(json.dumps(scaling_record))
    result = bench("report", "--runs-dir", runs, "--out", tmp_path / "reports")
    assert (tmp_path / "reports" / "figures" / "scaling.png").is_file()
    assert "scaling.png" in result.stdout.replace("\n", "")  # the console wraps long paths to its width
