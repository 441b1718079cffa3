"""`bench report`'s table3 (LinVideo Tab. III's layout; issue 23): multi-step rows beside few-step rows, rows of an
earlier report's table3 included as computed there, and the speedup basis said when devices are mixed.

The records are the committed toy runs on a CPU (reports/toy/runs): dense sdpa and LinVideo, 20 steps with CFG.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from conftest import Invoke, normalise

from harness.report import SPEEDUP_NOTE, build_report, console_view, load_included, table3

TOY_RUNS = Path(__file__).resolve().parents[1] / "reports" / "toy" / "runs"
DENSE, LINVIDEO = "toy__sdpa__7255f221a221.json", "toy__linvideo__57e41b7940df.json"


def _record(name: str) -> dict[str, Any]:
    return json.loads((TOY_RUNS / name).read_text())


def _few_step(dense: dict[str, Any]) -> dict[str, Any]:
    """The dense record as a 4-step generator without CFG would record it (the sampler's other fields kept)."""
    few = copy.deepcopy(dense)
    few["spec"].update(method="dmd2", checkpoint="/tmp/generator")
    few["spec"]["sampling"].update(steps=4, cfg=1.0)
    few["method_params_resolved"] = {"attention": "sdpa", "generator": "4-step DMD2 generator, no CFG"}
    return few


def _gpu_table3(folder: Path) -> Path:
    """An earlier report's table3.csv with a GPU's dense 20-step row and a 4-step row against it."""
    rows = [
        {"model": "toy", "method": "sdpa", "attention": "sdpa", "generator": "dense, 20 steps, CFG 4", "steps": 20,
         "cfg": 4.0, "device": "NVIDIA H200", "latency_s": 0.66, "speedup": 1.0, "baseline": "sdpa 20 steps",
         "prompt_correctness": 98.4},
        {"model": "toy", "method": "dmd2", "attention": "sdpa", "generator": "4-step DMD2 generator, no CFG",
         "steps": 4, "cfg": 1.0, "device": "NVIDIA H200", "latency_s": 0.066, "speedup": 10.0,
         "baseline": "sdpa 20 steps", "prompt_correctness": 98.4},
    ]  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(folder / "table3.csv", index=False)
    return folder / "table3.csv"


def test_a_multistep_linvideo_run_joins_the_few_step_table_against_the_dense_multistep_run() -> None:
    dense, linvideo = _record(DENSE), _record(LINVIDEO)
    radial = copy.deepcopy(linvideo)
    radial["method_params_resolved"]["softmax_method"] = "radial"
    table = table3([_few_step(dense), radial, linvideo, dense])
    assert list(table["attention"]) == ["sdpa", "linvideo + radial", "linvideo", "sdpa"]
    assert list(zip(table["steps"], table["cfg"], strict=True)) == [(20, 4.0), (20, 4.0), (20, 4.0), (4, 1.0)]
    assert table["generator"].iloc[2] == "linvideo checkpoint toy-5af578e1e7ed, 20 steps, CFG 4"
    assert set(table["baseline"]) == {"sdpa 20 steps"}
    assert table["speedup"].tolist() == pytest.approx((table["latency_s"].iloc[0] / table["latency_s"]).tolist())


def test_included_rows_keep_their_device_and_speedup_beside_this_report_s_rows(tmp_path: Path) -> None:
    """A CPU report of multi-step runs with a GPU report's few-step rows: each row's speedup is against the dense
    run of its own device, and the table says so."""
    runs = tmp_path / "runs"
    runs.mkdir()
    for name in (DENSE, LINVIDEO):
        shutil.copy2(TOY_RUNS / name, runs / name)
    included = _gpu_table3(tmp_path / "gpu")
    report = build_report(runs, tmp_path / "report", [included])
    table = report.tables["table3"].set_index(["device", "method"])
    cpu = table.loc["AMD EPYC"]
    assert cpu.loc["linvideo", "speedup"] == pytest.approx(cpu.loc["sdpa", "latency_s"] / cpu["latency_s"]["linvideo"])
    assert table.loc[("NVIDIA H200", "dmd2"), ["speedup", "source"]].tolist() == [10.0, str(included)]
    assert table.loc[("AMD EPYC", "sdpa"), "source"] == str(runs)
    assert f"- speedup: {SPEEDUP_NOTE}" in (tmp_path / "report" / "table3.md").read_text()
    assert "device" in console_view("table3", report.tables["table3"], 80).columns


def _runs(tmp_path: Path) -> Path:
    runs = tmp_path / "runs"
    runs.mkdir()
    for name in (DENSE, LINVIDEO):
        shutil.copy2(TOY_RUNS / name, runs / name)
    return runs


def test_a_table_included_twice_joins_once(tmp_path: Path) -> None:
    """The same table3.csv given twice (under two spellings of its path) adds its rows once, and says so."""
    runs, included = _runs(tmp_path), _gpu_table3(tmp_path / "gpu")
    report = build_report(runs, tmp_path / "report", [included, tmp_path / "gpu" / ".." / "gpu" / "table3.csv"])
    assert report.tables["table3"]["device"].value_counts()["NVIDIA H200"] == 2
    assert report.notes["source"].startswith("2 included row(s) left out: already in the table")


def test_an_earlier_report_of_these_runs_adds_none_of_their_rows_again(tmp_path: Path) -> None:
    """Including a report of the same runs (e.g. to add one more table) leaves its rows of these runs out: they read
    back from its CSV exactly as this report computes them."""
    runs, included = _runs(tmp_path), _gpu_table3(tmp_path / "gpu")
    first = build_report(runs, tmp_path / "first", [included]).tables["table3"]
    again = build_report(runs, tmp_path / "again", [tmp_path / "first" / "table3.csv"])
    assert len(again.tables["table3"]) == len(first) == 4
    assert again.tables["table3"]["latency_s"].tolist() == first["latency_s"].tolist()
    assert again.notes["source"].startswith("2 included row(s) left out")


def test_an_empty_text_cell_of_an_included_table_stays_empty(tmp_path: Path) -> None:
    """A dense row has no params: its empty cell reads back from the CSV as NaN and must not print as "nan"."""
    included = _gpu_table3(tmp_path / "gpu")
    frame = pd.read_csv(included).assign(params=["", "ckpt=dense-lr1e-4"])
    frame.to_csv(included, index=False)
    assert load_included([included])["params"].tolist() == ["", "ckpt=dense-lr1e-4"]


@pytest.mark.parametrize(("make", "fragment"), [
    (lambda folder: _gpu_table3(folder).rename(folder / "runs.csv"), "is not a table3.csv"),
    (lambda folder: pd.DataFrame({"model": ["toy"]}).to_csv(folder / "table3.csv") or folder / "table3.csv",
     "lacks the column(s) method, attention, steps"),
    (lambda folder: folder / "table3.csv", "does not exist"),
    (lambda folder: folder, "is a folder, not a file"),
])  # fmt: skip
def test_a_bad_included_table_is_refused_before_any_table_is_written(tmp_path: Path, bench: Invoke, make: Any,
                                                                      fragment: str) -> None:  # fmt: skip
    folder = tmp_path / "in"
    folder.mkdir()
    runs = tmp_path / "runs"
    runs.mkdir()
    shutil.copy2(TOY_RUNS / DENSE, runs / DENSE)
    result = bench("report", "--runs-dir", runs, "--out", tmp_path / "out", "--include", make(folder), expect=2)
    assert fragment in normalise(result.stderr) and len(result.stderr.strip().splitlines()) == 1
    assert not list((tmp_path / "out").glob("*"))
