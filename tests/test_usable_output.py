"""Output a user can use: one-line errors pointing the right way, a report that skips what it cannot read,
a console table that fits 80 columns, stdout that is JSON only under --json, and benchmark figures that
say where they depart from the benchmark's protocol."""

from __future__ import annotations

import copy
import errno
import json
from pathlib import Path

import pandas as pd
import pytest
from click.testing import Result
from conftest import Invoke, normalise
from typer.testing import CliRunner

import harness.check
import harness.generate
import harness.io_checks
from harness.cli import app

COMMITTED_BASELINE = Path(__file__).parents[1] / "reports" / "baselines" / "cpu-wan-tiny.json"
TOY_PROMPT = "a large yellow triangle moves up on a gray background"


def _one_line_error(result: Result) -> str:
    """The user-facing error: exit code 2, one line on stderr starting with ``error:``, no traceback."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.output
    return normalise(result.stderr)


@pytest.fixture
def no_remeasurement(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if `bench check` starts timing (its errors must come before)."""

    def refuse(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("the baseline was re-measured before the error was detected")

    monkeypatch.setattr(harness.check, "run_latency", refuse)


def _baseline(change) -> dict:  # type: ignore[no-untyped-def]
    data = json.loads(COMMITTED_BASELINE.read_text())
    change(data)
    return data


BAD_BASELINES = [
    pytest.param([1, 2], "is not a `bench latency` result", id="a-list"),
    pytest.param(_baseline(lambda d: d.pop("spec")), "lacks its spec", id="no-spec"),
    pytest.param(_baseline(lambda d: d["spec"].pop("request")), "lacks its spec", id="no-request"),
    pytest.param(_baseline(lambda d: d["spec"]["request"].update(blocks=3)), "does not know: blocks", id="unknown"),
    pytest.param(_baseline(lambda d: d["spec"]["request"].pop("model")), "lacks spec.request.model", id="no-model"),
    pytest.param(_baseline(lambda d: d["methods"]["math"].pop("ratio_to_baseline")), "no positive ratio_to_baseline "
                 "for 'math'", id="no-ratio"),
    pytest.param(_baseline(lambda d: d.update(methods={})), "names no method", id="no-methods"),
    pytest.param(_baseline(lambda d: d.update(status="partial")), "is the partial result of an interrupted",
                 id="partial"),
]  # fmt: skip


@pytest.mark.usefixtures("no_remeasurement")
@pytest.mark.parametrize(("content", "fragment"), BAD_BASELINES)
def test_check_refuses_a_baseline_it_cannot_use(content: object, fragment: str, tmp_path: Path, bench: Invoke) -> None:
    """A baseline of the wrong shape is one line naming what is wrong, before any re-measurement."""
    path = tmp_path / "baseline.json"
    path.write_text(json.dumps(content))
    message = _one_line_error(bench("check", "--baseline", path, expect=None))
    assert fragment in message and str(path) in message


@pytest.mark.usefixtures("no_remeasurement")
# -- bench report: what it cannot read ----------------------------------------------------------


def _edit_record(runs: Path, method: str, change) -> Path:  # type: ignore[no-untyped-def]
    (path,) = [p for p in runs.glob("*.json") if f"__{method}__" in p.name]
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record))
    return path


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda r: r["latency"].pop("stages"), "incomplete run record: lacks latency.stages"),
        (lambda r: r["latency"].update(stages=[]), "latency.stages is list, not a mapping"),
        (lambda r: r["spec"]["sampling"].pop("height"), "lacks spec.sampling.height"),
        (lambda r: r["artifacts"].update(videos=None), "artifacts.videos is NoneType, not a list"),
        (lambda r: r["spec"].update(colour="red"), "its spec is not one this version reads"),
        (lambda r: r.update(status="partial"), "status partial (an interrupted run"),
    ],
    ids=["no-stages", "stages-a-list", "no-height", "videos-null", "foreign-spec-field", "partial"],
)
def test_report_skips_a_record_it_cannot_read_and_reports_the_rest(change, reason: str, copy_runs, tmp_path: Path,
                                                                   bench: Invoke) -> None:  # fmt: skip
    """One record of the wrong shape is skipped with its path and the field; the other run is tabulated, exit 0."""
    runs = copy_runs()
    path = _edit_record(runs, "math", change)
    out = tmp_path / "report"
    result = bench("report", "--runs-dir", runs, "--out", out)
    warning = normalise(result.stderr)
    assert f"skipped record {path}" in warning and reason in warning, warning
    assert pd.read_csv(out / "runs.csv")["method"].tolist() == ["sdpa"]


def test_report_sets_aside_json_that_is_no_record(copy_runs, tmp_path: Path, bench: Invoke) -> None:
    """A checkpoint's spec.json, a DFA plan and a benchmark summary next to the runs are not 'corrupt records':
    nothing is printed about them, and --json lists them apart."""
    runs = copy_runs()
    (runs / "ckpt").mkdir()
    (runs / "ckpt" / "spec.json").write_text(json.dumps({"method": "linvideo", "config": {}, "final_r": [1.0]}))
    (runs / "plan.json").write_text(json.dumps({"format": 1, "method": "dfa", "choices": [[0]]}))
    (runs / "summary.json").write_text(json.dumps([{"model": "toy"}]))
    result = bench("report", "--runs-dir", runs, "--out", tmp_path / "report")
    assert result.stderr == ""
    payload = json.loads(bench("report", "--runs-dir", runs, "--out", tmp_path / "report", "--json").stdout)
    assert sorted(Path(p).name for p in payload["not_records"]) == ["plan.json", "spec.json", "summary.json"]
    assert payload["errors"] == [] and len(payload["tables"]["runs"]) == 2


def test_report_of_a_folder_without_records_says_what_it_found(tmp_path: Path, bench: Invoke) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "spec.json").write_text(json.dumps({"method": "sla", "config": {}}))
    message = _one_line_error(bench("report", "--runs-dir", runs, "--out", tmp_path / "o", expect=None))
    assert "no readable records" in message and "1 other JSON files there are not run records" in message


# -- where output goes -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["report", "--runs-dir", "{runs}", "--out", "{afile}"],
        ["report", "--runs-dir", "{runs}", "--out", "{afile}/sub"],
        ["latency", "--model", "wan-tiny", "--out", "{afile}/x.json"],
        ["ablate", "kernel", "--runs-dir", "{afile}/runs", "--train-dir", "{tmp}/train"],
    ],
    ids=["report-out-is-a-file", "report-out-under-a-file", "latency-out-under-a-file", "ablate-runs-under-a-file"],
)
def test_an_output_path_under_a_file_names_the_file(args: list[str], finished_runs: Path, tmp_path: Path,
                                                    bench: Invoke) -> None:  # fmt: skip
    """Not 'File exists' or 'Not a directory': the message says which path is a file."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    filled = [arg.format(runs=finished_runs, afile=afile, tmp=tmp_path) for arg in args]
    message = _one_line_error(bench(*filled, expect=None))
    assert f"{afile} is a file, not a folder" in message
    assert "File exists" not in message and afile.read_text() == "x"


@pytest.mark.parametrize("command", [["latency", "--model", "wan-tiny"], ["calibrate", "--model", "toy"]])
def test_an_output_file_that_is_a_folder_is_refused_before_the_work(command: list[str], tmp_path: Path,
                                                                    bench: Invoke) -> None:  # fmt: skip
    """`--out DIR` where a file is due: one line, not an IsADirectoryError after the timing or the search."""
    message = _one_line_error(bench(*command, "--device", "cpu", "--out", tmp_path, expect=None))
    assert f"cannot write {tmp_path}: it is a folder; name a file in it" in message


def test_report_on_a_read_only_disk_is_one_line(finished_runs: Path, tmp_path: Path, bench: Invoke,
                                                monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    def read_only(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(harness.io_checks.tempfile, "NamedTemporaryFile", read_only)
    message = _one_line_error(bench("report", "--runs-dir", finished_runs, "--out", tmp_path / "r", expect=None))
    assert f"cannot write to output folder {tmp_path / 'r'}: Read-only file system" in message


# -- messages that point the right way ---------------------------------------------------------------


def test_ablate_on_a_model_without_prompts_does_not_point_to_a_missing_option(tmp_path: Path, bench: Invoke) -> None:
    """bench ablate has no --prompt-file: it says the model has no prompt world and how to train on one's own."""
    message = _one_line_error(bench("ablate", "kernel", "--model", "wan-tiny", "--runs-dir", tmp_path, expect=None))
    assert "bench ablate trains and scores every variant on the model's own prompts; wan-tiny has none" in message
    assert "(models with them: toy)" in message and "pass --prompt-file" not in message
    assert "`bench train --method linvideo --model wan-tiny --target-layers K --prompt-file FILE --out DIR`" in message
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("method", "model", "command"),
    [
        ("sla", "toy", "`bench train --method sla --model toy --out DIR`"),
        ("sla", "wan-tiny", "`bench train --method sla --model wan-tiny --prompt-file FILE --out DIR`"),
        ("linvideo", "wan-tiny",
         "`bench train --method linvideo --model wan-tiny --target-layers K --prompt-file FILE --out DIR`"),
    ],
)  # fmt: skip
def test_a_method_without_its_checkpoint_quotes_a_train_command(method: str, model: str, command: str, tmp_path: Path,
                                                                bench: Invoke) -> None:  # fmt: skip
    """The suggested `bench train` has the options the method and model need (SLA takes no --target-layers)."""
    args = ("run", "--method", method, "--model", model, "--device", "cpu", "--runs-dir", tmp_path / "runs")
    message = _one_line_error(bench(*args, expect=None))
    assert f"method {method!r} needs a trained checkpoint: make one with {command}" in message


# -- the console table ------------------------------------------------------------------------------------


def _headers(output: str) -> list[list[str]]:
    """Each rich table's column headers, reassembled from the lines they are broken onto."""
    tables, current = [], None
    for line in output.splitlines():
        if line.startswith("┏"):
            current = []
        elif line.startswith("┡"):
            tables.append(["".join(parts) for parts in zip(*current, strict=True)])
            current = None
        elif current is not None and line.startswith("┃"):
            current.append([cell.strip() for cell in line.strip("┃").split("┃")])
    return tables


def test_report_console_table_fits_80_columns_with_whole_headers(copy_runs, tmp_path: Path) -> None:
    """At 80 columns every line fits and every header is a column name (broken only at '_' onto lines); the
    params column is the short label, the files keep every column."""
    runs = copy_runs()
    _edit_record(runs, "math", lambda r: r["spec"]["method_params"].update(
        note="a very long parameter value that would not fit in any console column at all"))  # fmt: skip
    out = tmp_path / "report"
    runner = CliRunner(env={"COLUMNS": "80", "NO_COLOR": "1", "TERM": "dumb"})
    result = runner.invoke(app, ["report", "--runs-dir", str(runs), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert max(len(line) for line in result.stdout.splitlines()) <= 80
    written = pd.read_csv(out / "runs.csv")
    (headers,) = _headers(result.stdout)
    assert headers[:3] == ["method", "params", "step_ms"] and set(headers) <= set(written.columns)
    assert "columns in runs.md" in result.stdout and "params_resolved" in written.columns
    assert "note=a ver\u2026" in result.stdout and "at all" in written.loc[written["method"] == "math", "params"].item()


def test_console_view_puts_shared_columns_in_the_title_and_counts_what_it_left_out() -> None:
    from harness.report import console_view

    columns = {"model": ["toy", "toy"], "method": ["sdpa", "linvideo"], "params": ["", "ckpt=x"],
               "step_ms": [67.96, 70.6], "device": ["cpu", "cpu"], "prompt_correctness": [98.4, 82.8]}  # fmt: skip
    table = pd.DataFrame(columns)
    view = console_view("runs", table, 40)
    assert view.title == "runs toy"
    assert view.columns == ["method", "params", "step_ms"] and view.rows[1] == ["linvideo", "ckpt=x", "70.6"]
    assert view.left_out == ["device", "prompt_correctness"]
    assert console_view("runs", table, 120).columns[-1] == "prompt_\ncorrectness"


# -- --json: stdout is the JSON -----------------------------------------------------------------------------


def test_json_run_prints_only_json_on_stdout(tmp_path: Path, bench: Invoke, monkeypatch: pytest.MonkeyPatch) -> None:
    """linvideo on the toy without --checkpoint notes the default conversion: on stderr under --json."""
    seen = {}

    def generated(spec, runs_dir, **kwargs):  # type: ignore[no-untyped-def]
        seen["checkpoint"] = spec.checkpoint
        return harness.generate.RunOutcome({"run_id": "r"}, Path(runs_dir) / "r.json", skipped=False)

    monkeypatch.setattr(harness.generate, "run", generated)
    result = bench("run", "--method", "linvideo", "--model", "toy", "--device", "cpu", "--prompt", TOY_PROMPT,
                   "--runs-dir", tmp_path, "--json")  # fmt: skip
    assert json.loads(result.stdout) == {"skipped": False, "path": str(tmp_path / "r.json"), "record": {"run_id": "r"}}
    assert "no --checkpoint: using the default LinVideo conversion" in normalise(result.stderr)
    assert seen["checkpoint"]


def test_the_console_returns_to_stdout_after_a_json_command(bench: Invoke) -> None:
    bench("models", "--json")
    table = bench("models")
    # The title, not a model's name: a narrow terminal folds names across lines.
    assert "models" in table.stdout and "┏" in table.stdout and "models" not in table.stderr


# -- VBench's temporal_flickering protocol -----------------------------------------------------------------


def _score_vbench(record: dict, runs_dir: Path, monkeypatch: pytest.MonkeyPatch, dimensions: tuple[str, ...]):  # type: ignore[no-untyped-def]
    """The vbench suite's scores of ``record`` with the evaluator itself replaced by fixed aggregates."""
    import harness.eval.vbench.runner as runner
    from harness.eval.run_suites import VBENCH
    from harness.eval.suites import EvalOptions

    monkeypatch.setattr(runner, "evaluate_videos", lambda request, *a, **k: runner.BenchmarkResult(
        raw={dim: 0.95 for dim in request.dimensions}))  # fmt: skip
    return VBENCH.score_run(record, runs_dir, EvalOptions(dimensions=dimensions, device="cpu"))


def test_temporal_flickering_scores_carry_the_protocol_note(finished_runs: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """VBench scores temporal_flickering on 25 videos per prompt after a static filter; the harness does not,
    and the evaluation says so for that dimension only."""
    (path,) = [p for p in finished_runs.glob("*.json") if "__sdpa__" in p.name]
    record = json.loads(path.read_text())
    scores = _score_vbench(record, finished_runs, monkeypatch, ("temporal_flickering", "subject_consistency"))
    notes = scores.details["protocol_notes"]
    assert list(notes) == ["temporal_flickering"]
    assert "25 videos per prompt" in notes["temporal_flickering"] and "static filter" in notes["temporal_flickering"]


def test_report_prints_and_writes_the_protocol_note(copy_runs, tmp_path: Path, bench: Invoke,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """A run scored on temporal_flickering: its runs.md and table1.md end with the note, the console prints it;
    a later evaluation of another dimension keeps it."""
    from harness.evaluate import merge_scores

    runs = copy_runs()
    (path,) = [p for p in runs.glob("*.json") if "__sdpa__" in p.name]
    record = {**json.loads(path.read_text()), "quality_reportable": True}  # wan-tiny's weights are random
    for dimensions in (("temporal_flickering",), ("subject_consistency",)):
        merge_scores(record, "vbench", _score_vbench(copy.deepcopy(record), runs, monkeypatch, dimensions))
    path.write_text(json.dumps(record))
    out = tmp_path / "report"
    result = bench("report", "--runs-dir", runs, "--out", out)
    for table in ("runs", "table1"):
        notes = (out / f"{table}.md").read_text().split("Notes:")[1]
        assert notes.strip().startswith("- temporal_flickering: not VBench's protocol for this dimension")
    assert "note: temporal_flickering: not VBench's protocol" in normalise(result.stdout)
    payload = json.loads(bench("report", "--runs-dir", runs, "--out", out, "--json").stdout)
    assert list(payload["notes"]) == ["temporal_flickering"]
