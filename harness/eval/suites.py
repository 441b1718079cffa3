"""Metric suites a run can compute on its videos (``bench run --eval NAME``), behind one registry.

A suite scores the decoded videos of a run against their prompts and returns the mean of each
metric (percentages) plus per-video scores. Each declares the models it can score, so a run that
asks for an impossible suite fails before any video is generated.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from harness.errors import HarnessError
from harness.registry import Registry

Scorer = Callable[[Sequence[torch.Tensor], Sequence[str]], list[dict[str, float]]]


@dataclass(frozen=True)
class Suite:
    """A metric suite: ``score(videos, prompts)`` -> one dict of metrics per video."""

    name: str
    models: tuple[str, ...]  # the models whose videos it can score; () means any
    score: Scorer
    description: str

    def check_model(self, model: str) -> None:
        if self.models and model not in self.models:
            raise HarnessError(
                f"eval suite {self.name!r} scores videos of {', '.join(self.models)} only, not {model!r}"
            )


def _toybench(videos: Sequence[torch.Tensor], prompts: Sequence[str]) -> list[dict[str, float]]:
    from harness.eval.toybench import score_clip

    return [score_clip(video, prompt) for video, prompt in zip(videos, prompts, strict=True)]


SUITES: Registry[Suite] = Registry("eval suite")
SUITES.add(
    "toybench",
    Suite("toybench", ("toy",), _toybench, "exact toy-world scores of each clip against its prompt"),
    aliases=("toy",),
)


def mean_scores(per_video: list[dict[str, float]]) -> dict[str, float]:
    """Mean of every metric over videos (the figure a table reports)."""
    if not per_video:
        raise HarnessError("no videos to score")
    return {key: sum(scores[key] for scores in per_video) / len(per_video) for key in per_video[0]}
