"""Typed method parameters: one schema per method parses, checks and lists them (issue 19, kind C)."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from conftest import normalise

import harness.generate
from harness.errors import HarnessError
from methods import METHODS, build_method
from methods.params import Param

ALL_METHODS = METHODS.names()
BLOCK_SIZED = ("xattn", "svg", "svg2", "radial", "sla")


def _as_text(value: Any) -> str:
    """A value as a user types it after ``--param KEY=``."""
    if isinstance(value, bool):
        return str(value).lower()
    return json.dumps(value) if isinstance(value, list) else str(value)


def _error(result) -> str:  # type: ignore[no-untyped-def]
    return normalise(result.stderr)


# -- every method's schema ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_METHODS)
def test_defaults_round_trip_as_values_and_as_typed_text(name: str) -> None:
    """Each default parses to itself, from Python and from its ``--param`` text (None: the parameter is off)."""
    cls = METHODS.get(name)
    defaults = {param.name: param.default for param in cls.parameters}
    assert cls.parse_params(defaults) == defaults
    given = {key: value for key, value in defaults.items() if value is not None}
    assert cls.parse_params({key: _as_text(value) for key, value in given.items()}) == given


@pytest.mark.parametrize("name", ALL_METHODS)
def test_unknown_parameter_lists_the_valid_ones(name: str) -> None:
    cls = METHODS.get(name)
    with pytest.raises(HarnessError, match=f"method '{name}' has no parameter 'bogus_name'") as caught:
        cls.parse_params({"bogus_name": "1"})
    listing = str(caught.value).split("bogus_name'", 1)[1]
    assert all(param.name in listing for param in cls.parameters)
    assert cls.parameters or "takes no parameters" in listing


@pytest.mark.parametrize("name", ALL_METHODS)
def test_every_parameter_has_help_and_a_json_listing(name: str) -> None:
    for param in METHODS.get(name).parameters:
        listed = json.loads(json.dumps(param.describe()))
        assert listed["name"] == param.name and listed["help"] and listed["type"] == param.type


# -- the reported cases -------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["false", "False", "0", "no", "NO", False, 0])
def test_bool_spellings_of_false(text: Any) -> None:
    assert METHODS.get("xattn").parse_params({"keep_first_block": text}) == {"keep_first_block": False}


@pytest.mark.parametrize("text", ["true", "True", "1", "yes", True, 1])
def test_bool_spellings_of_true(text: Any) -> None:
    assert METHODS.get("xattn").parse_params({"keep_first_block": text}) == {"keep_first_block": True}


@pytest.mark.parametrize("text", ["maybe", "2", "off", 2, 0.0])
def test_other_bool_spellings_are_refused_saying_what_came(text: Any) -> None:
    with pytest.raises(HarnessError, match=r"xattn: keep_first_block must be true or false \(also 1/0, yes/no\), got"):
        METHODS.get("xattn").parse_params({"keep_first_block": text})


@pytest.mark.parametrize("value", ["NaN", "nan", "inf", "-Infinity", math.nan, math.inf, "1e400"])
def test_non_finite_numbers_are_refused(value: Any) -> None:
    with pytest.raises(HarnessError, match="radial: decay_factor must be a finite number"):
        METHODS.get("radial").parse_params({"decay_factor": value})


@pytest.mark.parametrize(
    ("method", "key", "value", "message"),
    [
        ("svg", "seed", "abc", "svg: seed must be an integer, got 'abc'"),
        ("svg2", "seed", "1.5", "svg2: seed must be an integer, got '1.5'"),
        ("xattn", "stride", 8.0, "xattn: stride must be an integer, got 8.0"),
        ("dfa", "window", "abc", "dfa: window must be a finite number, got 'abc'"),
        ("xattn", "threshold", "0", r"xattn: threshold must be in \(0, 1\], got '0'"),
        ("svg", "sampled_rows", "0", "svg: sampled_rows must be >= 1, got '0'"),
        ("radial", "decay_factor", "-1", "radial: decay_factor must be > 0, got '-1'"),
        ("dfa", "window", "3", r"dfa: window must be in \(0, 2\], got '3'"),
        ("dfa", "uniform", "reuse", "dfa: uniform must be one of full, window_residual, .*Did you mean 'reuse_step'"),
        ("linear", "layers", "1,x", "linear: layers must be 'all' or comma-separated integers"),
        ("linvideo", "linear_layers", "all", "linvideo: linear_layers must name layer indices"),
        ("fa2", "impl", "triton", "fa2: impl must be one of auto, torch, package, got 'triton'"),
    ],
)
def test_wrong_type_or_range_is_one_line_naming_method_parameter_and_type(
    method: str, key: str, value: Any, message: str
) -> None:
    with pytest.raises(HarnessError, match=message) as caught:
        METHODS.get(method).parse_params({key: value})
    assert "\n" not in str(caught.value)


def test_a_paper_symbol_is_suggested_never_accepted() -> None:
    """``tau`` is XAttention's name for ``threshold``: the error names threshold and every valid parameter."""
    with pytest.raises(HarnessError) as caught:
        METHODS.get("xattn").parse_params({"tau": "0.5"})
    message = str(caught.value)
    assert "has no parameter 'tau'. Did you mean 'threshold'?" in message
    assert (
        "Its parameters: threshold, stride, keep_first_block, fixed_density, warmup_fraction, block_size, backend."
        in message
    )


@pytest.mark.parametrize("name", BLOCK_SIZED)
@pytest.mark.parametrize("size", ["20", 20, 96, 0, -16, "big", 16.0])
def test_block_sizes_that_do_not_fill_flex_tiles_are_refused(name: str, size: Any) -> None:
    with pytest.raises(HarnessError, match=f"{name}: block_size must be 'auto' or a divisor or multiple of 128"):
        METHODS.get(name).parse_params({"block_size": size})


@pytest.mark.parametrize("name", BLOCK_SIZED)
@pytest.mark.parametrize(("size", "typed"), [("auto", "auto"), ("16", 16), (32, 32), ("64", 64), (128, 128),
                                             ("256", 256)])  # fmt: skip
def test_block_sizes_that_fill_flex_tiles_are_accepted(name: str, size: Any, typed: Any) -> None:
    assert METHODS.get(name).parse_params({"block_size": size}) == {"block_size": typed}


def test_xattn_stride_must_divide_an_explicit_block_at_construction() -> None:
    with pytest.raises(HarnessError, match="stride 8 must divide the block size 4"):
        build_method("xattn", block_size=4)


def test_the_constructor_goes_through_the_schema() -> None:
    """A method built from Python types its values and fails like the CLI."""
    method = build_method("xattn", keep_first_block="no", threshold="0.5", block_size="64")
    assert (method.keep_first_block, method.threshold, method._block_size) == (False, 0.5, 64)
    with pytest.raises(HarnessError, match="radial: decay_factor must be a finite number, got nan"):
        build_method("radial", decay_factor=math.nan)


def test_model_layer_parameters_are_checked_against_the_model() -> None:
    """Parameters declared ``model_layers`` are refused by validate_for when the model lacks the layers."""
    with pytest.raises(HarnessError, match=r"linvideo: linear_layers \[9\] do not exist"):
        build_method("linvideo", linear_layers="1,9").validate_for(num_layers=8, num_steps=4)
    with pytest.raises(HarnessError, match="radial: dense_first_layers 9 exceeds the model's 8 layers"):
        build_method("radial", dense_first_layers=9).validate_for(num_layers=8, num_steps=4)
    build_method("radial", dense_first_layers=8).validate_for(num_layers=8, num_steps=4)


def test_range_text() -> None:
    assert Param("x", "float", 0.5, "h", min=0.0, max=1.0, min_open=True).range_text() == "in (0, 1]"
    assert Param("x", "int", 1, "h", min=1).range_text() == ">= 1"
    assert Param("x", "bool", True, "h").range_text() is None


# -- the CLI ------------------------------------------------------------------------------------


@pytest.fixture
def captured_specs(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Specs `bench run` would run; the run itself stops with exit 2 (nothing is built)."""
    specs: list[Any] = []

    def capture(spec, *args, **kwargs):  # type: ignore[no-untyped-def]
        specs.append(spec)
        raise HarnessError("captured")

    monkeypatch.setattr(harness.generate, "run", capture)
    return specs


def test_spellings_of_one_value_give_one_spec(bench, captured_specs: list[Any], tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`--param keep_first_block=false`, `=False`, `=0` and `=no` record the same typed value: one spec hash."""
    for text in ("false", "False", "0", "no"):
        bench("run", "--model", "toy", "--method", "xattn", "--param", f"keep_first_block={text}",
              "--param", "threshold=1", "--runs-dir", tmp_path, expect=2)  # fmt: skip
    assert {spec.hash() for spec in captured_specs} == {captured_specs[0].hash()}
    assert captured_specs[0].method_params == {"keep_first_block": False, "threshold": 1.0}


@pytest.mark.parametrize(
    ("method", "param", "fragments"),
    [
        ("xattn", "keep_first_block=maybe", ["keep_first_block must be true or false", "got 'maybe'"]),
        ("radial", "decay_factor=NaN", ["radial: decay_factor must be a finite number, got 'NaN'"]),
        ("svg", "seed=abc", ["svg: seed must be an integer, got 'abc'"]),
        ("dfa", "window=abc", ["dfa: window must be a finite number, got 'abc'"]),
        ("xattn", "tau=0.5", ["no parameter 'tau'", "Did you mean 'threshold'", "Its parameters: threshold, stride"]),
        ("xattn", "block_size=20", ["xattn: block_size must be 'auto' or a divisor or multiple of 128", "got '20'"]),
        ("linear", "layers=[2,9]", ["linear: layers [9] do not exist"]),
    ],
)
def test_bench_run_refuses_bad_params_in_one_line(method: str, param: str, fragments: list[str], bench,
                                                  tmp_path) -> None:  # type: ignore[no-untyped-def]  # fmt: skip
    runs = tmp_path / "runs"
    result = bench("run", "--model", "toy", "--method", method, "--param", param, "--runs-dir", runs, expect=2)
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in _error(result)
    assert not runs.exists()


@pytest.mark.parametrize(
    ("param", "fragment"),
    [
        ("xattn.block_size=20", "xattn: block_size must be"),
        ("sdpa.window=3", "method 'sdpa' has no parameter 'window'"),
        ("dfa.uniform=full", "--param names method(s) ['dfa'] that are not timed"),
    ],
)
def test_bench_latency_types_its_params(param: str, fragment: str, bench) -> None:  # type: ignore[no-untyped-def]
    result = bench("latency", "--model", "wan-tiny", "--device", "cpu", "--methods", "sdpa,xattn", "--param", param,
                   expect=2)  # fmt: skip
    assert fragment in _error(result) and "Traceback" not in result.output


def test_bench_methods_json_lists_each_parameter(bench) -> None:  # type: ignore[no-untyped-def]
    rows = {row["name"]: row for row in json.loads(bench("methods", "--json").stdout)}
    threshold = rows["xattn"]["parameters"][0]
    assert threshold == {"name": "threshold", "type": "float", "default": 0.9, "range": "in (0, 1]", "choices": None,
                         "optional": False, "help": threshold["help"]}  # fmt: skip
    assert "tau" in threshold["help"]
    assert rows["sdpa"]["parameters"] == []
    assert [p["name"] for p in rows["linear"]["parameters"]] == ["kernel", "layers"]
