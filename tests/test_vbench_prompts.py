"""VBench prompt sets, benchmark file names, protocols and the dry-run plan (no evaluator install needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import normalise

from harness.errors import HarnessError
from harness.eval.prompt_sets import PAPER8, load_prompt_set, prompt_dir
from harness.video import benchmark_video_name, place_in

PROMPTS = Path(__file__).resolve().parents[2] / "shared" / "data" / "vbench"


def _lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def test_paper8_is_the_three_lists_deduplicated() -> None:
    """vbench:paper8 = subject_consistency + scene + overall_consistency lists, once each: 251 prompts."""
    lists = [_lines(PROMPTS / "vbench1" / "prompts_per_dimension" / f"{n}.txt")
             for n in ("subject_consistency", "scene", "overall_consistency")]  # fmt: skip
    paper8 = load_prompt_set("vbench:paper8", PROMPTS)
    assert [len(x) for x in lists] == [72, 86, 93]
    assert set(paper8.prompts) == {p for x in lists for p in x}
    assert len(paper8.prompts) == len(set(paper8.prompts)) == 251
    assert paper8.dimensions == PAPER8 and paper8.labels == paper8.prompts


def test_dimension_set_uses_vbench_metadata() -> None:
    """vbench:<dimension> holds every prompt VBench_full_info.json lists for that dimension."""
    info = json.loads((PROMPTS / "vbench1" / "VBench_full_info.json").read_text())
    flicker = load_prompt_set("vbench:temporal_flickering", PROMPTS)
    assert list(flicker.prompts) == [e["prompt_en"] for e in info if "temporal_flickering" in e["dimension"]]


def test_augmented_wan_is_line_aligned_and_keeps_labels() -> None:
    """--augmented wan: the model sees line i of the extended list, the video keeps the short prompt."""
    originals = _lines(PROMPTS / "vbench1" / "all_dimension.txt")
    extended = _lines(PROMPTS / "vbench1" / "augmented" / "all_dimension_aug_wanx_seed42.txt")
    scene = load_prompt_set("vbench:scene", PROMPTS, augmented="wan")
    for prompt, label in zip(scene.prompts, scene.labels, strict=True):
        assert prompt == extended[originals.index(label)] and prompt != label
    diversity = load_prompt_set("vbench2:Diversity", PROMPTS, augmented="wan")
    assert diversity.labels == tuple(_lines(PROMPTS / "vbench2" / "prompt" / "Diversity.txt"))
    assert diversity.prompts == tuple(_lines(PROMPTS / "vbench2" / "prompt_aug_wanx" / "Diversity.txt"))


@pytest.mark.parametrize(
    ("name", "hint"), [("vbench:temporal_flicker", "temporal_flickering"), ("vbench2:Diversty", "Diversity")]
)
def test_unknown_dimension_suggests_the_closest(name: str, hint: str) -> None:
    with pytest.raises(HarnessError, match=f"Did you mean '{hint}'"):
        load_prompt_set(name, PROMPTS)


def test_prompt_folder_must_be_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BENCH_VBENCH_PROMPTS", raising=False)
    with pytest.raises(HarnessError, match="--prompt-dir"):
        prompt_dir(None)
    monkeypatch.setenv("BENCH_VBENCH_PROMPTS", str(PROMPTS))
    assert prompt_dir(None) == PROMPTS


def test_every_real_prompt_names_a_file_that_stays_in_its_folder(tmp_path: Path) -> None:
    """All VBench and VBench-2.0 prompts (quotes, commas, parentheses, non-ASCII) make valid names in place."""
    labels = _lines(PROMPTS / "vbench1" / "all_dimension.txt")
    labels += [p for f in (PROMPTS / "vbench2" / "prompt").glob("*.txt") for p in _lines(f)]
    for label in labels:
        name = benchmark_video_name(label, 4, max_prompt_chars=180)
        assert place_in(tmp_path, name).parent == tmp_path.resolve()
    assert benchmark_video_name("A cat's toy (red), 5°", 0) == "A cat's toy (red), 5°-0.mp4"


@pytest.mark.parametrize("label", ["../../etc/passwd", "a/b", "..", ".hidden", "tab\there", "x" * 300, "  "])
def test_names_that_could_escape_or_break_are_refused(label: str) -> None:
    with pytest.raises(ValueError, match="cannot name a benchmark video"):
        benchmark_video_name(label, 0)


def test_place_in_refuses_a_name_leaving_the_folder(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="would leave"):
        place_in(tmp_path, "../outside.mp4")


def test_protocol_dry_run_prints_the_paper_plan(bench, monkeypatch: pytest.MonkeyPatch) -> None:
    """The paper's protocol: 251 prompts x 5 = 1,255 videos at 50 steps, CFG 5, 480p x 81, with a sourced estimate."""
    monkeypatch.setenv("BENCH_VBENCH_PROMPTS", str(PROMPTS))
    args = ("run", "--model", "wan1.3b", "--method", "linvideo", "--protocol", "linvideo-vbench", "--dry-run")
    plan = json.loads(bench(*args, "--json").stdout)
    (run,) = plan["runs"]
    assert (run["prompts"], run["videos_per_prompt"], run["videos"]) == (251, 5, 1255)
    assert plan["sampling"] == "50 steps, CFG 5, 480x832 x 81 frames at 16 fps"
    step = plan["step_time"]
    # The committed H100 record of linvideo itself (reports/gpu/h100/linvideo) is preferred to a dense stand-in.
    assert step["source"].endswith("latency_wan1.3b.json") and step["method"] == "linvideo"
    forward_ms = json.loads(Path(step["source"]).read_text())["methods"]["linvideo"]["forward"]["median_ms"]
    assert plan["gpu_hours"] == pytest.approx(1255 * 50 * 2 * forward_ms / 3.6e6)
    text = normalise(bench(*args).stdout)
    assert "1255 videos" in text and "GPU hours" in text and "latency_wan1.3b.json" in text


def test_vbench2_protocol_plans_one_run_per_dimension(bench, monkeypatch: pytest.MonkeyPatch) -> None:
    """3 videos per augmented prompt, 20 for Diversity."""
    monkeypatch.setenv("BENCH_VBENCH_PROMPTS", str(PROMPTS))
    plan = json.loads(
        bench("run", "--model", "wan1.3b", "--protocol", "linvideo-vbench2", "--dry-run", "--json").stdout
    )
    per_set = {r["prompt_set"]: r for r in plan["runs"]}
    assert len(per_set) == 18
    assert per_set["vbench2:Diversity+wan"]["videos_per_prompt"] == 20
    assert {r["videos_per_prompt"] for k, r in per_set.items() if "Diversity" not in k} == {3}


def test_protocol_refuses_a_contradicting_option(bench, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BENCH_VBENCH_PROMPTS", str(PROMPTS))
    result = bench("run", "--model", "wan1.3b", "--protocol", "linvideo-vbench", "--steps", "20", "--dry-run", expect=2)
    assert "fixes steps = 50" in normalise(result.output)


def test_the_dry_run_plan_takes_no_step_time_from_a_run_sampled_beside_others() -> None:
    """A run record's denoising step estimates GPU hours, unless it was sampled beside others (bench ablate --jobs):
    then it timed their contention."""
    from harness.plan import _forwards_in

    record = {"kind": "run", "spec": {"model": "toy", "method": "sdpa", "sampling": {"cfg": 4.0}},
              "token_grid": {"frames": 2, "height": 4, "width": 4},
              "latency": {"stages": {"denoise_step": {"median_ms": 8.0}}}}  # fmt: skip
    assert [step.forward_ms for step in _forwards_in(record, "toy", 32, "r.json")] == [4.0]
    record["latency"]["concurrent_runs"] = 3
    assert _forwards_in(record, "toy", 32, "r.json") == []
