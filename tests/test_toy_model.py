"""The shipped toy teacher: it loads, samples deterministically, and `bench run` scores it with ToyBench."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import Invoke, normalise, records_in

from harness.models.toy import ToyModel
from harness.toyworld.checkpoint import SHIPPED_CHECKPOINT, load_checkpoint
from harness.toyworld.encoder import PromptEncoder, phrase_index, tokenize
from harness.toyworld.sampling import sample_videos

PROMPT = "a large green square moves right on a dusk gradient background"


@pytest.fixture(scope="module")
def toy_model() -> ToyModel:
    return ToyModel.load("builtin", torch.device("cpu"), torch.float32)


def test_shipped_checkpoint_is_small_and_records_its_training() -> None:
    """The shipped teacher is <= 10 MB of safetensors and says how, where and how long it was trained."""
    assert SHIPPED_CHECKPOINT.stat().st_size <= 10 * 1024 * 1024
    _, _, info = load_checkpoint(SHIPPED_CHECKPOINT)
    assert 0 < info["steps"] <= info["config"]["steps"] and info["device_name"].startswith("NVIDIA")
    assert info["train_seconds"] > 0 and info["evals"], "training time and periodic ToyBench scores are recorded"


def test_phrase_index_splits_objects_and_background() -> None:
    """Each word knows its phrase: first object 0, second object 1, background 2 ("and"/"on" start a phrase)."""
    prompt = "a small red disk moves left and a large blue square moves up on a black background"
    phrases = phrase_index(tokenize([prompt]))[0, : len(prompt.split())].tolist()
    assert phrases == [0] * 6 + [1] * 7 + [2] * 4


def test_phrase_summary_starts_as_a_no_op() -> None:
    """A fresh encoder's output is its transformer's alone, so a teacher trained without the summary loads unchanged."""
    encoder = PromptEncoder()
    ids = tokenize([PROMPT])
    transformer_output: list[torch.Tensor] = []
    encoder.norm.register_forward_hook(lambda module, args, output: transformer_output.append(output))
    with torch.no_grad():
        fresh = encoder(ids)
        assert torch.equal(fresh, transformer_output[0] * (ids != 0).unsqueeze(-1))
        torch.nn.init.normal_(encoder.phrase_summary.weight)
        assert not torch.allclose(encoder(ids), fresh), "a trained summary does change the output"


def test_same_seed_same_spec_same_clip_bit_for_bit(toy_model: ToyModel) -> None:
    """Sampling twice with the same prompt, seed and settings gives identical uint8 clips on CPU."""
    sampling = ToyModel.defaults
    first = sample_videos(toy_model, [PROMPT], [3], sampling)
    second = sample_videos(toy_model, [PROMPT], [3], sampling)
    assert first.dtype == torch.uint8 and torch.equal(first, second)


def test_different_seeds_give_different_clips(toy_model: ToyModel) -> None:
    """The seed is the only source of randomness: two seeds differ (the check above is not vacuous)."""
    videos = sample_videos(toy_model, [PROMPT, PROMPT], [0, 1], ToyModel.defaults)
    assert not torch.equal(videos[0], videos[1])


def test_bench_run_on_toy_records_toybench(bench: Invoke, tmp_path: Path) -> None:
    """`bench run --model toy` scores its clips with ToyBench by default: means and per-video scores."""
    runs = tmp_path / "runs"
    bench("run", "--model", "toy", "--method", "sdpa", "--device", "cpu", "--steps", "4", "--prompt", PROMPT,
          "--seeds", "0,1", "--runs-dir", runs, "--no-progress")  # fmt: skip
    (record,) = records_in(runs)
    assert record["spec"]["eval_suites"] == ["toybench"]
    means = record["metrics"]["toybench"]
    per_video = [video["metrics"]["toybench"] for video in record["artifacts"]["videos"]]
    assert len(per_video) == 2
    for name, value in means.items():
        assert value == pytest.approx(sum(scores[name] for scores in per_video) / 2)
        assert 0.0 <= value <= 100.0


def test_toybench_on_another_model_fails_before_generation(bench: Invoke, tmp_path: Path) -> None:
    """ToyBench scores toy-world clips only: asking for it on wan-tiny is a user error, nothing written."""
    result = bench("run", "--model", "wan-tiny", "--eval", "toybench", "--device", "cpu", "--runs-dir",
                   tmp_path / "runs", "--no-progress", expect=2)  # fmt: skip
    assert "scores videos of toy only" in normalise(result.output)
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())


def test_unknown_eval_suite_suggests_the_closest(bench: Invoke, tmp_path: Path) -> None:
    result = bench("run", "--model", "toy", "--eval", "toybnech", "--runs-dir", tmp_path, expect=2)
    assert "toybench" in normalise(result.output)


def test_toy_prompt_outside_the_grammar_is_refused(bench: Invoke, tmp_path: Path) -> None:
    """The toy model only understands its grammar; other text fails before the model is built."""
    result = bench("run", "--model", "toy", "--prompt", "a corgi surfing", "--runs-dir", tmp_path, expect=2)
    assert "unknown word(s): corgi, surfing" in normalise(result.output)


def test_report_shows_toybench_columns(bench: Invoke, tmp_path: Path) -> None:
    """`bench report --json` carries the ToyBench metrics of a toy run as table columns."""
    runs = tmp_path / "runs"
    bench("run", "--model", "toy", "--device", "cpu", "--steps", "2", "--prompt", PROMPT, "--runs-dir", runs,
          "--no-progress")  # fmt: skip
    payload = json.loads(bench("report", "--runs-dir", runs, "--out", tmp_path / "report", "--json").stdout)
    (row,) = payload["tables"]["runs"]
    assert {"prompt_correctness", "motion_smoothness", "imaging_quality"} <= set(row)
