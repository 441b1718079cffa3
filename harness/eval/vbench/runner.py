"""Score a run's videos with VBench / VBench-2.0: stage the files, run the driver, read the result JSON.

Videos are hard-linked (or copied) into one flat folder under the names the evaluator expects
(``<unaugmented prompt>-<i>.mp4``; VBench-2.0 cuts the prompt at 180 characters). Runs generated
from a VBench prompt set are scored in ``vbench_standard`` mode against the evaluator's own metadata
(restricted to the run's prompts); other runs in ``custom_input`` mode, where the prompt is read
from the file name. The figure a paper reports is the aggregate x 100.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.atomic import write_json_atomic
from harness.errors import HarnessError
from harness.eval.vbench.catalogue import check_custom_input
from harness.eval.vbench.environment import Cache, backend, environment_status, preflight
from harness.video import benchmark_video_name, place_in

DRIVER = Path(__file__).with_name("driver.py")
#: Videos per prompt the evaluator looks for (VBench: indices 0-4; VBench-2.0: 3, or 20 for Diversity).
MAX_VIDEOS = {"vbench": 5, "vbench2": 20}
NAME_CUT = {"vbench": None, "vbench2": 180}


@dataclass(frozen=True)
class BenchmarkRequest:
    """What to evaluate and where the evaluator lives."""

    benchmark: str  # "vbench" or "vbench2"
    dimensions: tuple[str, ...]
    cache: Cache
    device: str = "cuda"


@dataclass
class BenchmarkResult:
    raw: dict[str, float]  # the evaluator's aggregate per dimension
    per_video: dict[str, dict[str, Any]] = field(default_factory=dict)  # staged name -> {dimension: value}
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def percent(self) -> dict[str, float]:
        """What the paper reports: aggregate x 100."""
        return {dim: 100.0 * value for dim, value in self.raw.items()}


def video_names(videos: list[dict[str, Any]], benchmark: str) -> list[str]:
    """The evaluator's file name of each run video (label + index of its seed); checks the count rule."""
    names, per_label = [], {}
    for video in videos:
        label = video.get("label", video["prompt"])
        index = video.get("index", per_label.get(label, 0))
        per_label[label] = max(per_label.get(label, 0), index + 1)
        if index >= MAX_VIDEOS[benchmark]:
            raise HarnessError(
                f"{backend(benchmark).title} reads at most {MAX_VIDEOS[benchmark]} videos per prompt; "
                f"this run has more for {label[:60]!r}"
            )
        try:
            names.append(benchmark_video_name(label, index, NAME_CUT[benchmark]))
        except ValueError as exc:
            raise HarnessError(str(exc)) from None
    if len(set(names)) != len(names):
        raise HarnessError("two videos of this run map to the same benchmark file name")
    return names


def stage_videos(sources: list[Path], names: list[str], folder: Path) -> list[Path]:
    """Link each source video into ``folder`` under its name (a copy across file systems); only these files."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.iterdir():
        if stale.name not in set(names) and not stale.name.startswith("."):  # dot files: other ranks' links
            stale.unlink()
    staged = []
    for source, name in zip(sources, names, strict=True):
        target = place_in(folder, name)
        tmp = target.with_name(f".{hashlib.sha256(name.encode()).hexdigest()[:16]}.tmp")
        tmp.unlink(missing_ok=True)
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
        os.replace(tmp, target)
        staged.append(target)
    return staged


def evaluate_videos(
    request: BenchmarkRequest, sources: list[Path], names: list[str], out: Path, standard: bool, labels: list[str]
) -> BenchmarkResult:
    """Run the evaluator's driver on the staged videos; the result JSON, not the exit code, decides."""
    spec = backend(request.benchmark)
    if not standard:
        check_custom_input(request.benchmark, request.dimensions)
    preflight(request.benchmark, request.cache, request.dimensions)
    videos_dir, results_dir = out / "videos", out / "results"
    stage_videos(sources, names, videos_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    name = "eval-" + hashlib.sha256(",".join(request.dimensions).encode()).hexdigest()[:10]
    result_path = results_dir / f"{name}_eval_results.json"
    lead = int(os.environ.get("RANK", "0")) == 0
    if lead:
        result_path.unlink(missing_ok=True)  # a stale file must never pass for this run's success
    request_path = results_dir / f"{name}_request.json"
    write_json_atomic(  # every rank writes the same request; a reader never sees half of it
        request_path,
        {
            "benchmark": request.benchmark,
            "videos": str(videos_dir),
            "dimensions": list(request.dimensions),
            "out": str(results_dir),
            "name": name,
            "mode": "vbench_standard" if standard else "custom_input",
            "labels": sorted(set(labels)),
            "device": request.device,
        },
    )
    log_path = results_dir / f"{name}.rank{os.environ.get('RANK', '0')}.log"
    with log_path.open("w") as log:
        done = subprocess.run(
            [str(request.cache.python(request.benchmark)), str(DRIVER), str(request_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=_driver_env(request.cache),
            check=False,
        )
    if not lead:
        return BenchmarkResult(raw={}, details={"rank": int(os.environ["RANK"]), "log": str(log_path)})
    result = _read_result(result_path, request.dimensions, log_path, done.returncode)
    result.details.update(
        mode="vbench_standard" if standard else "custom_input",
        name=name,
        result_json=str(result_path),
        log=str(log_path),
        driver_exit_code=done.returncode,
        versions=environment_status(request.benchmark, request.cache).get("versions", {}),
        title=spec.title,
    )
    return result


def _driver_env(cache: Cache) -> dict[str, str]:
    env = cache.child_env()
    # Under torchrun the drivers form the evaluator's own process group: never on the harness's port.
    if "MASTER_PORT" in env and _harness_group_active():
        env["MASTER_PORT"] = str(int(env["MASTER_PORT"]) + 1)
    return env


def _harness_group_active() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _read_result(path: Path, dimensions: tuple[str, ...], log: Path, exit_code: int) -> BenchmarkResult:
    tail = _tail(log)
    if not path.is_file():
        raise HarnessError(f"the evaluator wrote no result (exit code {exit_code}); last lines of {log}:\n{tail}")
    data = json.loads(path.read_text())
    missing = [dim for dim in dimensions if dim not in data]
    if missing:
        raise HarnessError(f"the evaluator's result {path} lacks {', '.join(missing)}; see {log}")
    raw, per_video = {}, {}
    for dim in dimensions:
        aggregate, videos = data[dim][0], data[dim][1]
        if not isinstance(aggregate, int | float) or not math.isfinite(aggregate):
            raise HarnessError(f"{dim}: the evaluator's aggregate is {aggregate!r} (were any videos found?); see {log}")
        raw[dim] = float(aggregate)
        for entry in videos if isinstance(videos, list) else []:
            if isinstance(entry, dict) and "video_path" in entry:
                per_video.setdefault(Path(entry["video_path"]).name, {})[dim] = entry.get("video_results")
    return BenchmarkResult(raw=raw, per_video=per_video)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
