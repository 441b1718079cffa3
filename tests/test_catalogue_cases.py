"""The newcomer catalogue's remaining failures (issue 19), each through the mechanism that handles its kind:
numbers (``check_number`` in every config, non-finite CLI floats refused by name), devices (``resolve_device``),
refused writes (``atomic_path``), input paths of the wrong kind (``existing_input``), weights missing from the hub
cache (the preflight's ``check_weights``) and malformed DFA plans (``DfaPlan.load``)."""

from __future__ import annotations

import errno
import json
import math
from pathlib import Path

import pytest
from conftest import Invoke, normalise

import harness.models.wan as wan
from harness.atomic import DiskFullError, WriteError, atomic_path
from harness.calibration import CalibrationRequest
from harness.errors import HarnessError, check_number
from harness.latency_run import LatencyRequest
from harness.spec import Sampling
from harness.train.config import EngineConfig
from methods.dfa import DfaPlan

SAMPLING = Sampling(steps=2, cfg=5.0, shift=3.0, height=64, width=64, frames=9, fps=8)


def _one_line(result) -> str:  # type: ignore[no-untyped-def]
    """Exit 2, one line on stderr starting with ``error:``, no traceback (and nothing before it)."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.output
    return normalise(result.stderr)


# -- numbers -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "bounds", "message"),
    [
        (math.nan, {"gt": 0}, "x must be a finite number > 0, got nan"),
        (math.inf, {}, "x must be a finite number, got inf"),
        (-1, {"ge": 0}, "x must be >= 0, got -1"),
        (3, {"gt": 0, "le": 2}, "x must be > 0 and <= 2, got 3"),
        ("0.5", {}, "x must be a number, got '0.5'"),
        (True, {}, "x must be a number, got True"),
    ],
)
def test_check_number_refuses_non_finite_out_of_range_and_non_numbers(value: object, bounds: dict,
                                                                      message: str) -> None:  # fmt: skip
    with pytest.raises(HarnessError, match=f"^{message}$"):
        check_number("x", value, **bounds)  # type: ignore[arg-type]


def test_check_number_accepts_the_bounds_themselves() -> None:
    check_number("x", 0, ge=0)
    check_number("x", 1.0, gt=0, le=1)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Sampling(**{**SAMPLING.__dict__, "cfg": math.nan}).validate(), "cfg (guidance scale) must be a fin"),
        (lambda: Sampling(**{**SAMPLING.__dict__, "cfg": math.inf}).validate(), "cfg (guidance scale) must be a fin"),
        (lambda: Sampling(**{**SAMPLING.__dict__, "shift": math.nan}).validate(), "shift must be a finite number > 0"),
        (lambda: LatencyRequest(model="wan-tiny", methods=["sdpa"], sample_steps=-1), "--sample-steps must be >= 0"),
        (lambda: LatencyRequest(model="wan-tiny", methods=["sdpa"], repeats=0), "--repeats must be >= 1"),
        (
            lambda: CalibrationRequest("dfa", "toy", "", Path("p.json"), threshold=math.nan, window=0.125),
            "--threshold must be a finite number > 0",
        ),
        (
            lambda: CalibrationRequest("dfa", "toy", "", Path("p.json"), threshold=0.05, window=math.nan),
            "--window must be a finite number > 0 and <= 2",
        ),
        (lambda: EngineConfig(grad_clip=math.nan).validate(), "grad clip must be a finite number > 0"),
    ],
)
def test_configs_refuse_non_finite_and_out_of_range_numbers(make, message: str) -> None:  # type: ignore[no-untyped-def]
    """The config is the experiment: a Python caller gets the same refusal as the CLI."""
    with pytest.raises(HarnessError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make()


@pytest.mark.usefixtures("no_model_build")
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["latency", "--model", "wan-tiny", "--device", "cpu", "--methods", "sdpa", "--sample-steps", "-1"],
            "--sample-steps must be >= 0 (0: no whole sample timed), got -1",
        ),
        (
            [
                "calibrate",
                "--out",
                "{tmp}/plan.json",
                "--model",
                "toy",
                "--prompts",
                "1",
                "--steps",
                "2",
                "--device",
                "cpu",
                "--threshold",
                "nan",
            ],
            "--threshold must be a finite number, got nan",
        ),
        (
            [
                "train",
                "--out",
                "{tmp}/lv",
                "--model",
                "toy",
                "--target-layers",
                "1",
                "--steps",
                "1",
                "--device",
                "cpu",
                "--lr",
                "nan",
            ],
            "--lr must be a finite number, got nan",
        ),
        (["check", "--baseline", "{tmp}/none.json", "--tolerance", "inf"], "--tolerance must be a finite number"),
    ],
    ids=["latency-sample-steps-negative", "calibrate-threshold-nan", "train-lr-nan", "check-tolerance-inf"],
)
def test_cli_refuses_bad_numbers_before_any_work(args: list[str], message: str, tmp_path: Path,
                                                 bench: Invoke) -> None:  # fmt: skip
    result = bench(*(arg.format(tmp=tmp_path) for arg in args), expect=2)
    assert message in _one_line(result)
    assert list(tmp_path.iterdir()) == []


# -- refused writes ----------------------------------------------------------------------------------------------


def _raise(error: BaseException):  # type: ignore[no-untyped-def]
    def write(tmp: Path) -> None:
        tmp.write_bytes(b"x" * 10)
        raise error

    return write


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        # safetensors' Rust writer under `prlimit --fsize` (the catalogue's file-size-limit-frames)
        (Exception("Error while serializing: I/O error: File too large (os error 27)"), "File too large"),
        (OSError(errno.EFBIG, "File too large"), "File too large"),
        (OSError(errno.EROFS, "Read-only file system"), "Read-only file system"),
        (PermissionError(errno.EACCES, "Permission denied"), "Permission denied"),
        (OSError(errno.EIO, "Input/output error"), "Input/output error"),
    ],
    ids=["efbig-rust", "efbig", "erofs", "eacces", "eio"],
)
def test_refused_write_is_one_error_naming_the_path(error: BaseException, reason: str, tmp_path: Path) -> None:
    target = tmp_path / "frames.safetensors"
    with pytest.raises(WriteError) as caught, atomic_path(target) as tmp:
        _raise(error)(tmp)
    assert not isinstance(caught.value, DiskFullError)
    assert str(caught.value).startswith(f"cannot write {target}: {reason}")
    assert list(tmp_path.iterdir()) == []


def test_full_disk_keeps_its_own_message(tmp_path: Path) -> None:
    with pytest.raises(DiskFullError, match="no space left to write"), atomic_path(tmp_path / "r.json") as tmp:
        _raise(Exception("I/O error: No space left on device (os error 28)"))(tmp)


def test_other_errors_in_a_write_are_not_called_write_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="a bug"), atomic_path(tmp_path / "r.json") as tmp:
        _raise(ValueError("a bug"))(tmp)


# -- paths, weights, plans ---------------------------------------------------------------------------------------


def test_report_runs_dir_that_is_a_file(tmp_path: Path, bench: Invoke) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    message = _one_line(bench("report", "--runs-dir", afile, "--out", tmp_path / "o", expect=2))
    assert f"runs folder {afile} is a file, not a folder" in message and "does not exist" not in message


def test_prompt_file_that_is_a_folder(tmp_path: Path, bench: Invoke) -> None:
    message = _one_line(bench("calibrate", "--out", tmp_path / "p.json", "--prompt-file", tmp_path, expect=2))
    assert f"--prompt-file {tmp_path} is a folder, not a file" in message


@pytest.mark.usefixtures("no_model_build")
def test_wan_weights_missing_offline_is_the_first_line(tmp_path: Path, bench: Invoke,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Not in the hub cache: refused by the preflight, before diffusers' loaders (and their warnings) run."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(wan.WanFamilyAdapter, "_from_pretrained", lambda *a: pytest.fail("loaders ran"))
    runs = tmp_path / "runs"
    result = bench("run", "--model", "wan1.3b", "--device", "cpu", "--runs-dir", runs, "--eval", "none", expect=2)
    message = _one_line(result)
    assert "'Wan-AI/Wan2.1-T2V-1.3B-Diffusers' are not available: not in the local hub cache" in message
    assert "--weights DIR" in message and not runs.exists()


@pytest.mark.parametrize(
    ("plan", "message"),
    [
        ({"choices": {"a": 1}}, "lacks the field(s) window_fraction, threshold, cfg"),
        ({"choices": {"a": 1}, "window_fraction": 0.1, "threshold": None, "cfg": True}, "must be a list of steps"),
        (
            {"choices": [["full"]], "window_fraction": 0.1, "threshold": None, "cfg": True, "tau": 1},
            "unknown field(s) tau",
        ),
        (
            {"choices": [["full"]], "window_fraction": "wide", "threshold": None, "cfg": True},
            "dfa window fraction must be a number, got 'wide'",
        ),
    ],
    ids=["missing-fields", "choices-not-rows", "unknown-field", "window-not-a-number"],
)
def test_malformed_dfa_plan_names_its_file_and_fault(plan: dict, message: str, tmp_path: Path) -> None:
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"format": 1, "method": "dfa", **plan}))
    with pytest.raises(HarnessError) as caught:
        DfaPlan.load(path)
    text = str(caught.value)
    assert text.startswith(f"dfa plan {path} is malformed: ") and message in text and "__init__" not in text
