"""Metric suites a run can compute on its videos (``bench run --eval NAME``, ``bench eval``), behind one registry.

A clip suite scores the decoded videos of a run against their prompts and returns the mean of each
metric (percentages) plus per-video scores. A run suite needs more than each clip (a reference run,
an external evaluator) and scores the whole run from its record. Each declares the models it can
score and may check its requirements up front, so a run that asks for an impossible suite fails
before any video is generated.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from harness.errors import HarnessError
from harness.registry import Registry

# (uint8 clips (F, H, W, 3), the prompts they are scored against, frames per second) -> metrics per clip
Scorer = Callable[[Sequence[torch.Tensor], Sequence[str], int], list[dict[str, float]]]


@dataclass(frozen=True)
class EvalOptions:
    """How to evaluate, beyond the spec: evaluator cache and device, dimensions, a fidelity reference."""

    dimensions: tuple[str, ...] = ()
    cache: Path | None = None
    device: str = "cuda"
    reference: Path | None = None


@dataclass
class RunScores:
    """What a run suite returns: means (the figures tables show), per-video scores, provenance."""

    means: dict[str, float]
    per_video: list[dict[str, Any]] | None = None  # aligned with the record's videos
    details: dict[str, Any] = field(default_factory=dict)


RunScorer = Callable[[dict[str, Any], Path, EvalOptions], RunScores]  # (record, runs folder, options)
Preflight = Callable[[Any, EvalOptions], None]  # (RunSpec, options): raise before any video is generated


@dataclass(frozen=True)
class Suite:
    """A metric suite: per clip (``score``) or per run (``score_run``)."""

    name: str
    models: tuple[str, ...]  # the models whose videos it can score; () means any
    score: Scorer | None
    description: str
    score_run: RunScorer | None = None
    preflight: Preflight | None = None
    all_ranks: bool = False  # under torchrun every rank takes part (external evaluators shard the videos)

    def check_model(self, model: str) -> None:
        if self.models and model not in self.models:
            raise HarnessError(
                f"eval suite {self.name!r} scores videos of {', '.join(self.models)} only, not {model!r}"
            )


def requires(*modules: str) -> Preflight:
    """A preflight that fails, before any video is generated, when a module the suite imports is missing."""

    def check(spec: Any, options: EvalOptions) -> None:
        import importlib.util

        missing = [name for name in modules if importlib.util.find_spec(name) is None]
        if missing:
            raise HarnessError(f"this eval suite needs {', '.join(missing)}, which this environment lacks; "
                               "reinstall the package (`make setup`) or pip install the missing module")  # fmt: skip

    return check


def _toybench_preflight(spec: Any, options: EvalOptions) -> None:
    """ToyBench scores each clip against the scene its prompt states: every prompt must state one."""
    from harness.toyworld.encoder import check_toy_prompt

    for index in range(len(spec.prompts)):
        check_toy_prompt(spec.label(index))


def _proxies_preflight(spec: Any, options: EvalOptions) -> None:
    from harness.eval.proxies import MIN_FRAMES

    requires("cv2")(spec, options)
    if spec.sampling.frames < MIN_FRAMES:
        raise HarnessError(
            f"the proxies suite needs clips of at least {MIN_FRAMES} frames (motion smoothness predicts each odd "
            f"frame from its two neighbours); this run has {spec.sampling.frames}"
        )


def _toybench(videos: Sequence[torch.Tensor], prompts: Sequence[str], fps: int) -> list[dict[str, float]]:
    from harness.eval.toybench import score_clip

    return [score_clip(video, prompt) for video, prompt in zip(videos, prompts, strict=True)]


def _proxies(videos: Sequence[torch.Tensor], prompts: Sequence[str], fps: int) -> list[dict[str, float]]:
    from harness.eval.proxies import score_clip

    return [score_clip(video, fps) for video in videos]


SUITES: Registry[Suite] = Registry("eval suite")
SUITES.add(
    "toybench",
    Suite(
        "toybench",
        ("toy",),
        _toybench,
        "exact toy-world scores of each clip against its prompt",
        preflight=_toybench_preflight,
    ),
    aliases=("toy",),
)
SUITES.add(
    "proxies",
    Suite(
        "proxies",
        (),
        _proxies,
        "weight-free proxies (flicker, Farneback dynamic degree and smoothness)",
        preflight=_proxies_preflight,
    ),
    aliases=("proxy",),
)
# Run suites live in harness.eval.run_suites (imported when first named).
SUITES.add("fidelity", "harness.eval.run_suites:FIDELITY")
SUITES.add("vbench", "harness.eval.run_suites:VBENCH", aliases=("vbench1",))
SUITES.add("vbench2", "harness.eval.run_suites:VBENCH2", aliases=("vbench-2.0",))


def mean_scores(per_video: list[dict[str, float]]) -> dict[str, float]:
    """Mean of every metric over videos (the figure a table reports)."""
    if not per_video:
        raise HarnessError("no videos to score")
    return {key: sum(scores[key] for scores in per_video) / len(per_video) for key in per_video[0]}
