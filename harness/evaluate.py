"""Score videos with metric suites and merge the scores into the run record (``bench eval``, ``bench run --eval``).

A suite's means land in ``record["metrics"][suite]`` (percentages, except where a name says its unit),
per-video scores in each video's ``metrics``, and how it was computed in ``record["evaluations"][suite]``.
Scoring again with other dimensions adds to what is there. Under torchrun every rank runs the external
evaluators (they shard the videos themselves); only rank 0 writes the record.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

from harness.errors import HarnessError
from harness.eval.suites import SUITES, EvalOptions, RunScores, Suite, mean_scores
from harness.records import read_record, record_path, write_record
from harness.spec import RunSpec


def score_clips(suite: Suite, videos: list[dict[str, Any]], frames: dict[str, torch.Tensor], fps: int) -> RunScores:
    """A clip suite over the run's kept frames, each clip scored against its unaugmented prompt."""
    assert suite.score is not None
    per_video = suite.score(
        [frames[v["frames_key"]] for v in videos], [v.get("label", v["prompt"]) for v in videos], fps
    )
    return RunScores(mean_scores(per_video), per_video)


def merge_scores(record: dict[str, Any], suite: str, scores: RunScores, options: EvalOptions | None = None) -> None:
    """Add one suite's scores to ``record`` (in place), keeping figures of other dimensions already there."""
    record.setdefault("metrics", {}).setdefault(suite, {}).update(scores.means)
    if scores.per_video is not None:
        for video, values in zip(record["artifacts"]["videos"], scores.per_video, strict=True):
            video.setdefault("metrics", {}).setdefault(suite, {}).update(values)
    entry = {"evaluated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **scores.details}
    if options is not None:
        entry["options"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(options).items()}
    record.setdefault("evaluations", {}).setdefault(suite, []).append(entry)


def find_record(run: str, runs_dir: Path) -> Path:
    """A run named by its record path or its run id (in ``runs_dir``)."""
    candidates = [Path(run), record_path(runs_dir, run)]
    for path in candidates:
        if path.suffix == ".json" and path.is_file():
            return path
    raise HarnessError(f"no run record {run!r} (looked for {', '.join(map(str, candidates))})")


def evaluate_record(path: Path, suites: tuple[str, ...], options: EvalOptions, preflight: bool = True
                    ) -> dict[str, Any]:  # fmt: skip
    """Score the run at ``path`` with ``suites`` and rewrite its record with the scores merged in.

    Every suite's preflight runs on the record's spec before any is scored (``preflight=False``: the run
    that wrote the record ran them already).
    """
    try:
        record = read_record(path)
    except ValueError as exc:
        raise HarnessError(f"{path}: {exc}") from None
    if record.get("kind") != "run" or record.get("status") != "complete":
        raise HarnessError(f"{path} is not a finished run record")
    runs_dir = path.parent
    chosen = [SUITES.get(name) for name in suites]
    for suite in chosen:
        suite.check_model(record["spec"]["model"])
    if preflight:
        spec = RunSpec.from_dict(record["spec"])
        for suite in chosen:
            if suite.preflight is not None:
                suite.preflight(spec, options)
    lead = int(os.environ.get("RANK", "0")) == 0
    frames: dict[str, torch.Tensor] | None = None
    for suite in chosen:
        if not lead and not suite.all_ranks:
            continue
        if suite.score is not None:
            if frames is None:
                from harness.eval.run_suites import load_frames

                frames = load_frames(record, runs_dir)
            scores = score_clips(suite, record["artifacts"]["videos"], frames, record["spec"]["sampling"]["fps"])
        else:
            assert suite.score_run is not None
            scores = suite.score_run(record, runs_dir, options)
        if lead:
            merge_scores(record, suite.name, scores, options)
    if lead:
        write_record(path, {k: v for k, v in record.items() if k not in ("schema", "_path")})
    return record
