"""Bad input through the CLI: exit code 2, one clear message, and no expensive work before it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import normalise


def _assert_nothing_written(runs: Path) -> None:
    """No record, no artifacts folder, no stray file in the runs folder (it may not even exist)."""
    if runs.exists():
        assert runs.is_dir()
        assert list(runs.iterdir()) == [], f"written before the error: {list(runs.iterdir())}"


def _error(result) -> str:  # type: ignore[no-untyped-def]
    """The user-facing error message (stderr), whitespace-normalised."""
    return normalise(result.stderr)


RUN = ("run", "--no-progress", "--device", "cpu", "--model", "wan-tiny")  # a later --model in args wins
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")

BAD_RUNS = [
    pytest.param(["--method", "sdpaa"], ["unknown method 'sdpaa'", "Did you mean", "'sdpa'"], id="unknown-method"),
    pytest.param(["--model", "wan1.3"], ["unknown model 'wan1.3'", "Did you mean", "'wan1.3b'"], id="unknown-model"),
    pytest.param(["--method", "fa2"], ["'fa2' cannot run on cpu", "needs cuda"], id="fa2-on-cpu"),
    pytest.param(
        ["--model", "wan1.3b", "--weights", "/nonexistent/wan"],
        ["/nonexistent/wan", "does not exist"],
        id="missing-weights",
    ),
    pytest.param(["--steps", "0"], ["steps must be >= 1, got 0"], id="zero-steps"),
    pytest.param(["--frames", "10"], ["frames must be 4k+1", "got 10", "nearest valid 9 or 13"], id="frames-not-4k+1"),
    pytest.param(
        ["--dense-layers", "5"], ["dense layers [5] do not exist", "2 layers"], id="dense-layers-out-of-range"
    ),
    pytest.param(["--dense-layers", "-1"], ["dense layers must be >= 0"], id="negative-dense-layer"),
    pytest.param(["--dense-warmup-steps", "9"], ["exceed the number of steps (4)"], id="warmup-beyond-steps"),
    pytest.param(["--seeds", "a,b"], ["--seeds must be a comma-separated list of integers"], id="bad-seeds"),
    pytest.param(["--param", "window=3"], ["has no parameter 'window'", "takes no parameters"], id="unknown-param"),
    pytest.param(["--param", "window"], ["--param takes KEY=VALUE"], id="malformed-param"),
    pytest.param(["--height", "72"], ["height must be a multiple of 16, got 72"], id="bad-height"),
    pytest.param(["--cfg", "0.5"], ["cfg (guidance scale) must be a finite number >= 1"], id="cfg-below-one"),
    pytest.param(["--model", "wan1.3b", "--weights", "/x", "--random-weights"], ["not both"], id="weights-and-random"),
    pytest.param(["--dtype", "float8"], ["unknown dtype 'float8'"], id="unknown-dtype"),
    pytest.param(["--checkpoint", "/nonexistent/state.safetensors"], ["does not exist"], id="missing-checkpoint"),
    pytest.param(["--device", "cuda"], ["CUDA is not available"], id="cuda-unavailable", marks=NO_CUDA),
    # The newcomer catalogue's cases (issue 19): NaN passed `cfg < 1`, a NaN shift failed after the model was built,
    # an unknown device was torch's traceback.
    pytest.param(["--cfg", "nan"], ["--cfg must be a finite number, got nan"], id="cfg-nan"),
    pytest.param(["--cfg", "inf"], ["--cfg must be a finite number, got inf"], id="cfg-inf"),
    pytest.param(["--shift", "nan"], ["--shift must be a finite number, got nan"], id="shift-nan"),
    pytest.param(["--device", "tpu"], ["unknown device 'tpu'; use auto, cpu, cuda or cuda:N"], id="device-tpu"),
    # A block-sparse backend that cannot run on the device failed inside the first sparse step; a backend in other
    # case, or a part of its name, got no suggestion.
    pytest.param(["--method", "radial", "--param", "backend=flashinfer-bsr"],
                 ["radial: block-sparse backend 'flashinfer-bsr' cannot run on cpu in float32", "runs on cuda, not cpu",
                  "Here use auto, measure, masked"], id="cuda-only-backend-on-cpu"),
    pytest.param(["--method", "xattn", "--param", "backend=FLEX"], ["got 'FLEX'. Did you mean 'flex'"],
                 id="backend-in-capitals"),
    pytest.param(["--method", "svg", "--param", "backend=bsr"], ["got 'bsr'. Did you mean 'flashinfer-bsr'"],
                 id="backend-name-part"),
    # A backend refusing the kind of pattern the method makes passed the preflight and was refused at the first
    # sparse call: on CPU the message names the kind beside the device.
    pytest.param(["--method", "svg", "--param", "backend=flashinfer-bsr"],
                 ["svg: block-sparse backend 'flashinfer-bsr' cannot run svg's token-level patterns on cpu in float32: "
                  "token-level pattern (partial tiles): the BSR wrapper runs whole tiles only;",
                  "runs on cuda, not cpu", "Here use auto, measure, masked, flex, flex-tuned"],
                 id="backend-refusing-the-pattern-kind"),
]  # fmt: skip


@pytest.mark.usefixtures("no_model_build")
@pytest.mark.parametrize(("args", "fragments"), BAD_RUNS)
def test_bad_run_exits_2_with_message_before_any_work(args: list[str], fragments: list[str], tmp_path: Path,
                                                      bench) -> None:  # fmt: skip
    """Each bad `bench run` exits 2 with its message on stderr, no traceback, and writes nothing."""
    runs = tmp_path / "runs"
    result = bench(*RUN, "--runs-dir", runs, *args, expect=2)
    message = _error(result)
    assert message.startswith("error:")
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert "Traceback" not in result.output
    _assert_nothing_written(runs)


@pytest.mark.usefixtures("no_model_build")
def test_frames_error_writes_no_record_and_no_artifacts(tmp_path: Path, bench) -> None:
    """A frame count the VAE cannot take is refused before the runs folder is even created."""
    runs = tmp_path / "runs"
    result = bench(*RUN, "--runs-dir", runs, "--frames", "10", expect=2)
    assert "4k+1" in _error(result)
    assert not runs.exists()
    assert not list(tmp_path.rglob("*.json")) and not list(tmp_path.rglob("*.mp4"))


@pytest.mark.usefixtures("no_model_build")
def test_unwritable_output_folder(tmp_path: Path, bench) -> None:
    """A runs folder that cannot be created (its parent is a file) is refused before the model is built."""
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    result = bench(*RUN, "--runs-dir", afile / "runs", expect=2)
    assert "cannot write to output folder" in _error(result)
    assert str(afile / "runs") in _error(result)
    assert afile.read_text() == "not a folder"


@pytest.mark.usefixtures("no_model_build")
def test_latency_unwritable_out_is_refused_before_timing(tmp_path: Path, bench) -> None:
    """`bench latency --out` under a file is refused before the model is built."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    result = bench("latency", "--model", "wan-tiny", "--out", afile / "sub" / "lat.json", expect=2)
    assert "cannot write to output folder" in _error(result)


def test_report_skips_corrupt_record_and_reports_the_rest(copy_runs, tmp_path: Path, bench) -> None:
    """A corrupt record next to valid runs is reported as skipped by name; the others are reported, exit 0."""
    runs = copy_runs()
    (runs / "broken.json").write_text('{"kind": "run", "spec": {tru')
    out = tmp_path / "report"
    result = bench("report", "--runs-dir", runs, "--out", out, expect=0)
    warning = _error(result)
    assert "skipped record" in warning and "broken.json" in warning
    assert "sdpa" in result.stdout and "math" in result.stdout
    assert (out / "runs.csv").read_text().count("\n") == 3  # header + sdpa + math


def test_report_json_lists_corrupt_record(copy_runs, tmp_path: Path, bench) -> None:
    """`bench report --json` lists the corrupt file under errors and still builds the table."""
    runs = copy_runs()
    (runs / "broken.json").write_bytes(b"\x00\xff garbage")
    payload = json.loads(bench("report", "--runs-dir", runs, "--out", tmp_path / "o", "--json").stdout)
    assert [Path(e["path"]).name for e in payload["errors"]] == ["broken.json"]
    assert len(payload["tables"]["runs"]) == 2


def test_report_skips_record_with_missing_fields(copy_runs, tmp_path: Path, bench) -> None:
    """A syntactically valid record lacking fields (e.g. 'latency') is skipped like a corrupt one, exit 0."""
    runs = copy_runs()
    (runs / "partial.json").write_text(json.dumps({"kind": "run", "spec": {"model": "wan-tiny"}}))
    result = bench("report", "--runs-dir", runs, "--out", tmp_path / "o", expect=0)
    assert "partial.json" in _error(result)


def test_report_missing_runs_folder(tmp_path: Path, bench) -> None:
    """`bench report` on a folder that does not exist exits 2 and says so."""
    result = bench("report", "--runs-dir", tmp_path / "nope", "--out", tmp_path / "o", expect=2)
    assert "does not exist" in _error(result)


def test_report_only_corrupt_records(tmp_path: Path, bench) -> None:
    """A runs folder with only corrupt records exits 2 with 'no readable records' after listing them."""
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "bad.json").write_text("nope")
    result = bench("report", "--runs-dir", runs, "--out", tmp_path / "o", expect=2)
    assert "bad.json" in _error(result) and "no readable records" in _error(result)


def test_report_json_of_only_corrupt_records_is_the_same_error(tmp_path: Path, bench) -> None:
    """--json changes the output, not the verdict: an empty report exits 2, with no JSON on stdout."""
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "bad.json").write_text("nope")
    result = bench("report", "--runs-dir", runs, "--json", expect=2)
    assert "no readable records" in _error(result) and result.stdout.strip() == ""


def test_unknown_param_of_fa2_is_a_user_error(tmp_path: Path, bench) -> None:
    """An unknown --param for fa2 exits 2 with a clear message like every other method."""
    result = bench(*RUN, "--runs-dir", tmp_path / "runs", "--method", "fa2", "--param", "foo=1", expect=None)
    assert result.exit_code == 2
    assert "foo" in _error(result)


def test_check_with_missing_baseline(tmp_path: Path, bench) -> None:
    """`bench check` with a baseline file that does not exist exits 2 naming it."""
    result = bench("check", "--baseline", tmp_path / "none.json", expect=2)
    assert "cannot read latency baseline" in _error(result)


def test_check_with_a_run_record_as_baseline(finished_runs: Path, bench) -> None:
    """`bench check` refuses a file that is not a `bench latency` result."""
    record = next(finished_runs.glob("*.json"))
    result = bench("check", "--baseline", record, expect=2)
    assert "is not a `bench latency` result" in _error(result)


@pytest.mark.usefixtures("no_model_build")
def test_weights_for_builtin_random_model_is_refused(tmp_path: Path, bench) -> None:
    """--weights on wan-tiny (always built from its seeded random config) is refused, not silently ignored."""
    runs = tmp_path / "runs"
    result = bench(*RUN, "--runs-dir", runs, "--weights", "/nonexistent/wan", expect=None)
    assert result.exit_code == 2
    assert "--weights" in _error(result)
    _assert_nothing_written(runs)
