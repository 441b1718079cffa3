"""Run specs and their hashes, atomic writes, tolerant record loading, safe file names, output checks."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest

from harness.atomic import atomic_path, write_json_atomic
from harness.errors import HarnessError
from harness.io_checks import ensure_writable_dir
from harness.records import finished_record, load_records, read_record, record_path, write_record
from harness.spec import RunSpec, Sampling
from harness.video import safe_stem

SAMPLING = Sampling(steps=4, cfg=5.0, shift=5.0, height=64, width=64, frames=9, fps=8)


def make_spec(**changes) -> RunSpec:  # type: ignore[no-untyped-def]
    spec = RunSpec(
        model="wan-tiny", method="sdpa", sampling=SAMPLING, prompts=("a fox",), seeds=(0, 1), device="cpu",
        dtype="float32", weights="random",
    )  # fmt: skip
    return replace(spec, **changes)


def test_spec_hash_stable_across_dict_round_trip() -> None:
    """to_dict -> JSON -> from_dict gives an equal spec with the same hash."""
    spec = make_spec(method_params={"window": 3, "mode": "x"}, dense_layers=(0,), dense_warmup_steps=1)
    again = RunSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec
    assert again.hash() == spec.hash()
    assert re.fullmatch(r"[0-9a-f]{12}", spec.hash())


def test_spec_hash_ignores_param_order() -> None:
    """Method parameters given in another order hash the same."""
    assert make_spec(method_params={"a": 1, "b": 2}).hash() == make_spec(method_params={"b": 2, "a": 1}).hash()


@pytest.mark.parametrize(
    "change",
    [
        {"method": "math"},
        {"model": "wan1.3b"},
        {"prompts": ("a fox", "a cat")},
        {"seeds": (0,)},
        {"dtype": "bfloat16"},
        {"weights": "/models/wan"},
        {"method_params": {"window": 3}},
        {"dense_warmup_steps": 1},
        {"dense_layers": (1,)},
        {"checkpoint": "state.safetensors"},
        {"sampling": replace(SAMPLING, steps=5)},
        {"sampling": replace(SAMPLING, negative_prompt="blurry")},
    ],
    ids=[
        "method",
        "model",
        "prompts",
        "seeds",
        "dtype",
        "weights",
        "method_params",
        "dense_warmup_steps",
        "dense_layers",
        "checkpoint",
        "sampling.steps",
        "sampling.negative_prompt",
    ],
)
def test_spec_hash_changes_with_any_field(change: dict) -> None:
    """Changing any field of the spec changes its hash and run id."""
    assert make_spec(**change).hash() != make_spec().hash()
    assert make_spec(**change).run_id != make_spec().run_id


def test_cohort_equal_across_methods_and_schedules() -> None:
    """Two methods (with their params and schedules) of one spec share a cohort."""
    sdpa = make_spec()
    other = make_spec(method="math", method_params={"x": 1}, dense_layers=(1,), dense_warmup_steps=2,
                      checkpoint="c.safetensors")  # fmt: skip
    assert sdpa.cohort() == other.cohort()
    assert sdpa.hash() != other.hash()


def test_what_is_scored_does_not_change_the_cohort() -> None:
    """A run scored with fidelity compares with a dense run scored with ToyBench alone."""
    scored = make_spec(eval_suites=("toybench", "fidelity"), eval_params={"dimensions": ["x"]})
    assert scored.cohort() == make_spec().cohort()


@pytest.mark.parametrize("change", [{"seeds": (7,)}, {"sampling": replace(SAMPLING, steps=2)}, {"device": "cuda"}])
def test_cohort_differs_when_comparability_breaks(change: dict) -> None:
    """Seeds, sampling or device changes make another cohort."""
    assert make_spec(**change).cohort() != make_spec().cohort()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"prompts": ()}, "at least one prompt"), ({"seeds": ()}, "at least one seed"),
     ({"sampling": replace(SAMPLING, steps=0)}, "steps must be >= 1"),
     ({"sampling": replace(SAMPLING, shift=0.0)}, "shift must be a finite number > 0")],
)  # fmt: skip
def test_invalid_spec_is_refused(kwargs: dict, message: str) -> None:
    """A spec without prompts or seeds, or with invalid sampling, is a HarnessError at construction."""
    with pytest.raises(HarnessError, match=message):
        make_spec(**kwargs)


def _record(spec: RunSpec, **extra) -> dict:  # type: ignore[no-untyped-def]
    complete = {key: {} for key in ("latency", "density", "memory", "artifacts", "environment")}
    return {"kind": "run", "status": "complete", "spec": spec.to_dict(), "spec_hash": spec.hash(),
            "cohort": spec.cohort(), **complete, **extra}  # fmt: skip


def test_write_record_replaces_existing_file_atomically(tmp_path: Path) -> None:
    """write_record replaces a pre-existing record and leaves no temporary file."""
    spec = make_spec()
    path = record_path(tmp_path, spec.run_id)
    path.write_text("old content")
    write_record(path, _record(spec, note="new"))
    data = read_record(path)
    assert data["note"] == "new" and data["schema"] == 1
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_atomic_write_interrupted_keeps_old_file(tmp_path: Path) -> None:
    """An exception during an atomic write leaves the old file intact and no temporary file."""
    path = tmp_path / "r.json"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half written")
        raise RuntimeError("interrupted")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_atomic_write_respects_umask(tmp_path: Path) -> None:
    """Atomically written files get the usual permissions (0666 & ~umask), like a plain open() would."""
    import os

    umask = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "x.json", {})
        (tmp_path / "plain.json").write_text("{}")
    finally:
        os.umask(umask)
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == (tmp_path / "plain.json").stat().st_mode & 0o777


def test_write_json_atomic_creates_parent_folders(tmp_path: Path) -> None:
    """write_json_atomic creates missing parent folders."""
    path = tmp_path / "a" / "b" / "x.json"
    write_json_atomic(path, {"k": [1, 2]})
    assert json.loads(path.read_text()) == {"k": [1, 2]}


def test_load_records_skips_dotfiles_and_reports_corrupt(tmp_path: Path) -> None:
    """load_records reads good records recursively, ignores dotfiles, lists corrupt files with a reason and
    JSON that is no record (a list, a checkpoint spec) apart."""
    spec_a, spec_b = make_spec(), make_spec(method="math")
    write_record(record_path(tmp_path, spec_a.run_id), _record(spec_a))
    write_record(record_path(tmp_path / "nested", spec_b.run_id), _record(spec_b))
    (tmp_path / ".interrupted.json").write_text("{ half")
    (tmp_path / ".hidden.json").write_text(json.dumps(_record(spec_a)))
    (tmp_path / "garbage.json").write_bytes(b"\x89PNG\x00\xff")
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "spec.json").write_text(json.dumps({"method": "linvideo", "config": {}}))
    (tmp_path / "notes.txt").write_text("not json at all")
    loaded = load_records(tmp_path)
    assert sorted(r["spec"]["method"] for r in loaded.records) == ["math", "sdpa"]
    assert all(Path(r["_path"]).is_file() for r in loaded.records)
    errors = {path.name: reason for path, reason in loaded.errors}
    assert set(errors) == {"garbage.json"}
    assert "unreadable JSON" in errors["garbage.json"]
    assert sorted(path.name for path in loaded.others) == ["list.json", "spec.json"]


@pytest.mark.parametrize(
    ("content", "finished"),
    [(None, False), ("{broken", False), (json.dumps({"kind": "run", "spec": {}, "status": "running"}), False),
     (json.dumps({"kind": "run", "spec": {}, "status": "complete"}), False),
     (json.dumps({"kind": "run", "spec": {}, "status": "complete", "cohort": "c",
                  **{k: {} for k in ("latency", "density", "memory", "artifacts", "environment")}}), True)],
)  # fmt: skip
def test_finished_record_only_for_complete_records(tmp_path: Path, content: str | None, finished: bool) -> None:
    """Only a readable record with status complete counts as finished (so only it is skipped)."""
    path = tmp_path / "r.json"
    if content is not None:
        path.write_text(content)
    assert (finished_record(path) is not None) is finished


NASTY_PROMPTS = [
    "../../etc/passwd",
    "a/b\\c",
    "café — 東京",
    "",
    "x" * 500,
    ".hidden",
    "..",
    "   ",
    "a\x00b\nc\td",
    "CON",
    "東京",
    "-rf --no-preserve-root",
    "a red fox runs through fresh snow at dawn",
]


@pytest.mark.parametrize("prompt", NASTY_PROMPTS, ids=range(len(NASTY_PROMPTS)))
def test_safe_stem_is_a_safe_file_name(prompt: str) -> None:
    """safe_stem gives [A-Za-z0-9._-] only, no '..', no leading '.' or '-', bounded length."""
    stem = safe_stem(prompt)
    assert re.fullmatch(r"[A-Za-z0-9._-]+", stem), stem
    assert ".." not in stem
    assert not stem.startswith((".", "-"))
    assert 9 < len(stem) <= 80 + 9
    assert Path(stem).name == stem


def test_safe_stem_keeps_readable_ascii() -> None:
    """An ordinary prompt stays readable; accents are folded to ASCII."""
    assert safe_stem("a red fox").startswith("a-red-fox-")
    assert safe_stem("café — 東京").startswith("cafe-")


def test_safe_stem_distinct_prompts_distinct_stems() -> None:
    """Distinct prompts, including ones equal after sanitising or truncation, give distinct stems."""
    prompts = [*NASTY_PROMPTS, "a/b/c", "a b c", "a-b-c", "x" * 501, "x" * 500 + "y", "cafe — 東京", "café"]
    stems = [safe_stem(p) for p in prompts]
    assert len(set(stems)) == len(set(prompts))


def test_safe_stem_is_deterministic() -> None:
    """The same prompt always gives the same stem (records point at files by it)."""
    assert safe_stem("a fox, at dawn!") == safe_stem("a fox, at dawn!")


def test_ensure_writable_dir_creates_folder(tmp_path: Path) -> None:
    """ensure_writable_dir creates missing folders and leaves no probe file."""
    folder = ensure_writable_dir(tmp_path / "a" / "b")
    assert folder.is_dir() and list(folder.iterdir()) == []


def test_ensure_writable_dir_under_a_file(tmp_path: Path) -> None:
    """A folder whose parent is a regular file is a HarnessError naming the folder."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(HarnessError, match="cannot write to output folder") as info:
        ensure_writable_dir(afile / "runs")
    assert str(afile / "runs") in str(info.value)


def test_ensure_writable_dir_that_is_a_file(tmp_path: Path) -> None:
    """A path that is itself a regular file is refused."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(HarnessError, match="cannot write to output folder"):
        ensure_writable_dir(afile)


def test_ensure_writable_dir_needs_free_space(tmp_path: Path) -> None:
    """A folder with less free space than required is refused with the numbers."""
    with pytest.raises(HarnessError, match="MiB free"):
        ensure_writable_dir(tmp_path, min_free_bytes=2**62)
