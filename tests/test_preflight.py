"""The one preflight per run (issue 19, kinds B and E): every check that needs only the spec comes before a model
is built or a file is written; no silent default, no record of a video counted twice or scored against another
cohort, run ids that do not depend on where a checkpoint lies."""

from __future__ import annotations

import glob
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import normalise, records_in
from safetensors.torch import save_file
from test_bad_input import _assert_nothing_written

from harness.errors import HarnessError
from harness.preflight import preflight
from harness.spec import RunSpec, Sampling

TOY = ("run", "--no-progress", "--device", "cpu", "--model", "toy")
TINY = ("run", "--no-progress", "--device", "cpu", "--model", "wan-tiny")
PROMPT = "a small red disk moves left on a gray background"


def _refused(bench, runs: Path, *args: object) -> str:  # type: ignore[no-untyped-def]
    """Run ``bench *args`` expecting exit 2 with no traceback and nothing written; the message, one line."""
    result = bench(*args, "--runs-dir", runs, expect=2)
    assert "Traceback" not in result.output
    _assert_nothing_written(runs)
    return normalise(result.stderr)


# -- B: checks that need only the spec ---------------------------------------------------------------------

REFUSED_RUNS = [
    pytest.param(
        [*TOY, "--prompt", "red disk"], ["'red disk' is not a prompt of the toy grammar"], id="toy-no-grammar"
    ),
    pytest.param([*TOY, "--prompt", ""], ["'' is not a prompt of the toy grammar"], id="toy-empty-prompt-toybench"),
    pytest.param(
        [*TOY, "--prompt", PROMPT, "--frames", "70"],
        ["frames 70 needs 70 RoPE positions", "at most 64"],
        id="toy-frames-beyond-rope",
    ),
    pytest.param(
        [*TINY, "--frames", "257"],
        ["frames 257 needs 65 RoPE positions", "at most 253"],
        id="wan-tiny-frames-beyond-rope",
    ),
    pytest.param(
        [*TINY, "--height", "1040"],
        ["height 1040 needs 65 RoPE positions", "at most 1024"],
        id="wan-tiny-height-beyond-rope",
    ),
    pytest.param(
        [*TINY, "--frames", "1", "--eval", "proxies"],
        ["proxies suite needs clips of at least 3 frames"],
        id="proxies-on-1-frame",
    ),
    pytest.param(
        [*TOY, "--prompt", PROMPT, "--frames", "2", "--eval", "proxies"],
        ["proxies suite needs clips of at least 3 frames", "this run has 2"],
        id="proxies-on-2-frames",
    ),
    pytest.param(
        [*TINY, "--method", "xattn", "--param", "block_size=20"],
        ["block_size must be", "got '20'"],
        id="xattn-block-size-20",
    ),
    pytest.param(
        [*TINY, "--method", "xattn", "--param", "block_size=16", "--param", "stride=12"],
        ["stride 12 must divide the block size 16"],
        id="xattn-block-not-divisible-by-stride",
    ),
]


@pytest.mark.usefixtures("no_model_build")
@pytest.mark.parametrize(("args", "fragments"), REFUSED_RUNS)
def test_spec_only_fault_is_refused_before_the_model(args: list[str], fragments: list[str], tmp_path: Path,
                                                     bench) -> None:  # fmt: skip
    """Each fault that the spec alone shows exits 2 with its message before a model is built or a folder made."""
    message = _refused(bench, tmp_path / "runs", *args)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


VBENCH_NAMES = [
    pytest.param("vbench", ["--prompt", "a cat/dog"], "contains a path separator", id="slash"),
    pytest.param("vbench", ["--prompt", "a" * 260], "longer than 255 bytes", id="over-255-bytes"),
    pytest.param("vbench", ["--seeds", "0,1,2,3,4,5"], "reads at most 5 videos per prompt", id="vbench-6-videos"),
    pytest.param(
        "vbench2",
        ["--seeds", ",".join(map(str, range(21)))],
        "reads at most 20 videos per prompt",
        id="vbench2-21-videos",
    ),
]


@pytest.mark.usefixtures("no_model_build")
@pytest.mark.parametrize(("benchmark", "args", "fragment"), VBENCH_NAMES)
def test_vbench_file_names_are_checked_at_preflight(benchmark: str, args: list[str], fragment: str, tmp_path: Path,
                                                    bench) -> None:  # fmt: skip
    """The evaluator's file names come from the spec: a bad one is refused before the evaluator's environment (here
    absent) is even looked at, and before any video."""
    message = _refused(bench, tmp_path / "runs", *TINY, "--eval", benchmark, "--dimensions", "temporal_flickering",
                       "--cache", tmp_path / "no-cache", *args)  # fmt: skip
    assert fragment in message


def test_bench_eval_runs_the_suites_preflight_on_the_record(copy_runs, bench) -> None:  # type: ignore[no-untyped-def]
    """`bench eval --suite proxies` on a record of 1-frame clips is refused by the suite's preflight, not a
    traceback from inside the scorer."""
    runs = copy_runs()
    path = next(p for p in runs.glob("*.json") if "__sdpa__" in p.name)
    record = json.loads(path.read_text())
    record["spec"]["sampling"]["frames"] = 1
    path.write_text(json.dumps(record))
    result = bench("eval", path, "--suite", "proxies", expect=2)
    assert "at least 3 frames" in normalise(result.stderr)
    assert "proxies" not in json.loads(path.read_text()).get("metrics", {})


def _linvideo_checkpoint(folder: Path, method: str = "linvideo", model: str = "toy", kernel: str = "hedgehog") -> Path:
    """A checkpoint folder with the layout `bench train` writes; its tensors are placeholders (a preflight reads
    the spec and the safetensors headers only)."""
    folder.mkdir(parents=True)
    (folder / "spec.json").write_text(json.dumps({"method": method, "trajectory_store": {"model": model}}))
    params = json.dumps({"kernel": kernel, "linear_layers": [0], "trained": True})
    save_file({"rho": torch.zeros(8)}, str(folder / f"{method}.safetensors"), metadata={"method": method,
                                                                                       "params": params})  # fmt: skip
    save_file({"weight": torch.zeros(4)}, str(folder / "transformer.safetensors"))
    return folder


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-8])


def _make_fault(kind: str, tmp_path: Path) -> Path:
    folder = tmp_path / "ckpt"
    if kind == "empty-folder":
        folder.mkdir()
    elif kind == "single-file":
        _linvideo_checkpoint(tmp_path / "whole")
        folder = tmp_path / "whole" / "linvideo.safetensors"
    elif kind == "truncated-transformer":
        _truncate(_linvideo_checkpoint(folder) / "transformer.safetensors")
    elif kind == "truncated-state":
        _truncate(_linvideo_checkpoint(folder) / "linvideo.safetensors")
    elif kind == "missing-state":
        (_linvideo_checkpoint(folder) / "linvideo.safetensors").unlink()
    elif kind == "another-method":
        _linvideo_checkpoint(folder, method="sla")
    elif kind == "another-model":
        _linvideo_checkpoint(folder, model="wan-tiny")
    elif kind == "another-kernel":
        _linvideo_checkpoint(folder, kernel="relu")
    return folder


CHECKPOINT_FAULTS = [
    ("empty-folder", "has no spec.json: not a finished checkpoint of `bench train --method linvideo`"),
    ("single-file", "is a file; linvideo takes the folder `bench train --method linvideo` writes"),
    ("truncated-transformer", "transformer.safetensors is damaged"),
    ("truncated-state", "linvideo.safetensors is damaged"),
    ("missing-state", "linvideo.safetensors is missing"),
    ("another-method", "was trained for method 'sla', not 'linvideo'"),
    ("another-model", "was trained on model 'wan-tiny'; this run uses 'toy'"),
    ("another-kernel", "was trained with kernel='relu', this run asks for kernel='hedgehog'"),
]


@pytest.mark.usefixtures("no_model_build")
@pytest.mark.parametrize(("kind", "fragment"), CHECKPOINT_FAULTS, ids=[kind for kind, _ in CHECKPOINT_FAULTS])
def test_checkpoint_fault_is_refused_before_the_model(kind: str, fragment: str, tmp_path: Path, bench) -> None:
    """Every checkpoint fault is found from its spec file and safetensors headers, before the model is built."""
    checkpoint = _make_fault(kind, tmp_path)
    message = _refused(bench, tmp_path / "runs", *TOY, "--prompt", PROMPT, "--method", "linvideo",
                       "--checkpoint", checkpoint)  # fmt: skip
    assert fragment in message


@pytest.mark.parametrize("tolerance", ["-1", "nan"])
def test_check_refuses_a_bad_tolerance_before_measuring(tolerance: str, tmp_path: Path, bench,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """`bench check --tolerance -1` (or NaN) exits 2 before anything is timed (or the baseline is even read)."""
    import harness.check as check

    monkeypatch.setattr(check, "run_latency", lambda request: pytest.fail("measured before the tolerance check"))
    result = bench("check", "--baseline", tmp_path / "none.json", "--tolerance", tolerance, expect=2)
    message = normalise(result.stderr)
    assert "--tolerance must be" in message and "finite" in message


@pytest.mark.usefixtures("no_model_build")
def test_latency_validates_each_method_against_the_grid(bench) -> None:  # type: ignore[no-untyped-def]
    """`bench latency` shares the preflight's method check: xattn's block size 20 is refused before the model."""
    result = bench("latency", "--model", "wan-tiny", "--device", "cpu", "--methods", "sdpa,xattn",
                   "--param", "xattn.block_size=20", expect=2)  # fmt: skip
    assert "block_size must be" in normalise(result.stderr)


# -- E: silent defaults and wrong records --------------------------------------------------------------------


@pytest.mark.usefixtures("no_model_build")
@pytest.mark.parametrize("option", ["--height", "--width", "--frames", "--fps"])
def test_zero_size_is_refused_not_replaced_by_the_default(option: str, tmp_path: Path, bench) -> None:
    """0 is a value, not "unset": it reaches the sampling check instead of silently becoming the model's default."""
    message = _refused(bench, tmp_path / "runs", *TINY, option, "0")
    assert f"{option.removeprefix('--')} must be >= 1, got 0" in message


@pytest.mark.usefixtures("no_model_build")
@pytest.mark.parametrize("option", ["--height", "--width", "--frames"])
def test_latency_zero_size_is_refused(option: str, bench) -> None:  # type: ignore[no-untyped-def]
    result = bench("latency", "--model", "wan-tiny", "--device", "cpu", option, "0", expect=2)
    assert f"{option.removeprefix('--')} must be >= 1, got 0" in normalise(result.stderr)


@pytest.mark.usefixtures("no_model_build")
@pytest.mark.parametrize("given", [True, False], ids=["with-checkpoint", "with-the-shipped-default"])
def test_linvideo_linear_layers_beside_a_checkpoint_is_refused(given: bool, tmp_path: Path, bench,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """linear_layers describes an untrained state; a checkpoint fixes its own layers, so the pair is refused
    (before the default conversion is looked up or trained) instead of recording `trained: false`."""
    import harness.training as training

    monkeypatch.setattr(training, "default_checkpoint", lambda *a, **k: pytest.fail("default conversion fetched"))
    checkpoint = ["--checkpoint", _linvideo_checkpoint(tmp_path / "ckpt")] if given else []
    message = _refused(bench, tmp_path / "runs", *TOY, "--prompt", PROMPT, "--method", "linvideo",
                       "--param", "linear_layers=[5]", *checkpoint)  # fmt: skip
    assert "--param linear_layers stands in for a trained state" in message and "Drop --param linear_layers" in message


@pytest.mark.usefixtures("no_model_build")
@pytest.mark.parametrize(
    ("args", "fragment"),
    [(["--seeds", "0,0"], "seed 0 is given 2 times"),
     (["--prompt", "a fox", "--prompt", "a fox"], "prompt 'a fox' is given 2 times")],
    ids=["seeds", "prompts"],
)  # fmt: skip
def test_a_repeated_seed_or_prompt_is_refused(args: list[str], fragment: str, tmp_path: Path, bench) -> None:
    """A repeat would make one video twice and count it twice in the metrics."""
    message = _refused(bench, tmp_path / "runs", *TINY, *args)
    assert fragment in message and "count the same video twice" in message


@pytest.mark.parametrize(
    ("change", "fragment"),
    [({"height": 32}, "sampling.height (64 vs 32)"), ({"steps": 8}, "sampling.steps (4 vs 8)")],
    ids=["another-resolution", "another-step-count"],
)
def test_fidelity_reference_of_another_cohort_is_refused_before_scoring(
    change: dict, fragment: str, copy_runs, bench, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """A reference of another resolution (a traceback in the scorer before) or step count (a silently overwritten
    score before) is refused from the specs alone; the valid score stays."""
    import harness.eval.fidelity as fidelity

    runs = copy_runs()
    math_path, sdpa_path = (next(runs.glob(f"*__{m}__*.json")) for m in ("math", "sdpa"))
    bench("eval", math_path, "--suite", "fidelity")
    valid = json.loads(math_path.read_text())["metrics"]["fidelity"]
    other = json.loads(sdpa_path.read_text())
    other["spec"]["sampling"].update(change)
    (runs / "other.json").write_text(json.dumps(other))
    monkeypatch.setattr(fidelity, "compare_clips", lambda *a: pytest.fail("scored against the wrong reference"))
    result = bench("eval", math_path, "--suite", "fidelity", "--reference", runs / "other.json", expect=2)
    message = normalise(result.stderr)
    assert "is not of this run's cohort" in message and fragment in message
    assert json.loads(math_path.read_text())["metrics"]["fidelity"] == valid


def _spec(**changes) -> RunSpec:  # type: ignore[no-untyped-def]
    sampling = Sampling(steps=20, cfg=4.0, shift=3.0, height=32, width=32, frames=8, fps=8)
    base = RunSpec(model="toy", method="linvideo", sampling=sampling, prompts=(PROMPT,), seeds=(0,), device="cpu",
                   dtype="float32", weights="builtin")  # fmt: skip
    return replace(base, **changes)


@pytest.mark.usefixtures("no_model_build")
def test_a_checkpoint_run_is_named_by_the_checkpoints_content_not_its_path(tmp_path: Path) -> None:
    """The same checkpoint in two places gives one run id; a changed file gives another."""
    here = _linvideo_checkpoint(tmp_path / "here")
    there = tmp_path / "elsewhere" / "clone"
    shutil.copytree(here, there)
    first, second = (preflight(_spec(checkpoint=str(path))).spec for path in (here, there))
    assert first.checkpoint_id and first.run_id == second.run_id
    assert first.checkpoint != second.checkpoint
    (there / "spec.json").write_text(json.dumps({"method": "linvideo", "trajectory_store": {"model": "toy"},
                                                 "steps": 1}))  # fmt: skip
    assert preflight(_spec(checkpoint=str(there))).spec.run_id != first.run_id


def test_a_run_without_checkpoint_keeps_its_id() -> None:
    """No checkpoint, no checkpoint_id: the spec, its dict and its hash are those of earlier records."""
    spec = _spec(method="sdpa", eval_suites=("toybench",))
    assert preflight(spec).spec == spec
    assert "checkpoint_id" not in spec.to_dict()
    assert spec.hash() == "1536aec73bd2"  # the hash before checkpoint_id existed


def test_committed_records_keep_their_spec_hashes() -> None:
    """Records written before checkpoint_id (most with a checkpoint path) still hash to their recorded ids."""
    records = []
    for path in glob.glob(str(Path(__file__).parents[1] / "reports" / "**" / "*.json"), recursive=True):
        data = json.loads(Path(path).read_text())
        if isinstance(data, dict) and data.get("kind") == "run" and "spec_hash" in data:
            records.append(data)
    if not records:
        pytest.skip("no committed run records in this checkout")
    for record in records:
        spec = RunSpec.from_dict(record["spec"])
        assert (spec.hash(), spec.run_id) == (record["spec_hash"], record["run_id"])


def test_the_shipped_linvideo_conversion_passes_the_preflight() -> None:
    """A real checkpoint (the toy's default conversion) passes every checkpoint check and is recorded by content."""
    from harness.toyworld.checkpoint import SHIPPED_CONVERSIONS

    [shipped] = [p for p in SHIPPED_CONVERSIONS.iterdir() if (p / "spec.json").is_file()]
    prepared = preflight(_spec(checkpoint=str(shipped), eval_suites=("toybench",)))
    assert set(prepared.checkpoint_identity or {}) == {"linvideo.safetensors", "spec.json", "transformer.safetensors"}


def test_cohort_differences_name_the_fields() -> None:
    ours = _spec()
    theirs = replace(ours, seeds=(1,), sampling=replace(ours.sampling, cfg=5.0), method="sdpa")
    assert ours.cohort_differences(theirs) == ["sampling.cfg (4.0 vs 5.0)", "seeds ([0] vs [1])"]
    assert ours.cohort_differences(replace(ours, method="sdpa", checkpoint="x")) == []


def test_records_of_a_checkpoint_run_carry_its_content_id(tmp_path: Path, bench) -> None:  # type: ignore[no-untyped-def]
    """End to end on the shipped conversion: the record's spec names the checkpoint by content, and its run id
    is the spec's hash with that id (not the path)."""
    from harness.toyworld.checkpoint import SHIPPED_CONVERSIONS

    [shipped] = [p for p in SHIPPED_CONVERSIONS.iterdir() if (p / "spec.json").is_file()]
    bench(*TOY, "--prompt", PROMPT, "--method", "linvideo", "--checkpoint", shipped, "--steps", "1", "--eval", "none",
          "--runs-dir", tmp_path / "runs")  # fmt: skip
    [record] = records_in(tmp_path / "runs")
    spec = RunSpec.from_dict(record["spec"])
    assert record["spec"]["checkpoint_id"] and spec.run_id == record["run_id"]
    assert spec.run_id == replace(spec, checkpoint="/any/other/place").run_id
    with pytest.raises(HarnessError, match="does not exist"):
        preflight(replace(spec, checkpoint="/any/other/place"))
