"""``bench run --dry-run``: what a run (or a protocol's runs) would generate, and how long it would take.

The time estimate is denoising only: videos x steps x transformer forwards per step (2 with CFG)
x one forward's time, read from a measured latency record (``bench latency --out``) or a run record,
named by the user or found among the records under ``reports/``. The plan says which file and which
method the figure came from; without a matching measurement it says so instead of guessing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.environment import REPO_ROOT
from harness.errors import HarnessError
from harness.records import contended
from harness.spec import RunSpec

DEFAULT_SEARCH = REPO_ROOT / "reports"
DENSE_FALLBACK = ("fa2", "cudnn", "sdpa")  # the paper's baseline first


@dataclass(frozen=True)
class StepTime:
    """One transformer forward's measured time and where it came from."""

    forward_ms: float
    method: str
    device: str
    source: str
    note: str = ""


def measured_forward(model: str, method: str, tokens: int, source: Path | None) -> StepTime | None:
    """The forward time of ``method`` (else the dense baseline) for ``model`` at ``tokens`` tokens."""
    paths = (
        [source] if source is not None else sorted(DEFAULT_SEARCH.rglob("*.json")) if DEFAULT_SEARCH.is_dir() else []
    )
    if source is not None and not source.is_file():
        raise HarnessError(f"--step-time-from {source} does not exist")
    candidates: list[StepTime] = []
    for path in paths:
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        candidates += _forwards_in(data, model, tokens, str(path))
    for wanted in (method, *DENSE_FALLBACK):
        for found in candidates:
            if found.method == wanted:
                if wanted != method:
                    note = f"no {method} measurement at this shape: the dense {wanted} time is used"
                    return StepTime(found.forward_ms, found.method, found.device, found.source, note)
                return found
    if source is not None:
        raise HarnessError(f"{source} has no {method} or dense forward time for {model} at {tokens} tokens")
    return None


def _forwards_in(data: Any, model: str, tokens: int, source: str) -> list[StepTime]:
    if not isinstance(data, dict) or data.get("model", data.get("spec", {}).get("model")) != model:
        return []
    device = data.get("environment", {}).get("device_name", "?")
    if data.get("kind") == "latency" and data.get("tokens") == tokens:
        return [
            StepTime(entry["forward"]["median_ms"], name, device, source) for name, entry in data["methods"].items()
        ]
    if data.get("kind") == "run" and _run_tokens(data) == tokens and not contended(data):
        stage = data["latency"]["stages"].get("denoise_step")
        passes = 2 if data["spec"]["sampling"]["cfg"] > 1 else 1
        return [StepTime(stage["median_ms"] / passes, data["spec"]["method"], device, source)] if stage else []
    return []


def _run_tokens(record: dict[str, Any]) -> int:
    grid = record.get("token_grid", {})
    return grid.get("frames", 0) * grid.get("height", 0) * grid.get("width", 0)


def plan(specs: list[RunSpec], tokens: int, step_time: StepTime | None) -> dict[str, Any]:
    """Prompts, videos and the estimated GPU hours of ``specs`` (all of one model and method)."""
    runs = []
    for spec in specs:
        videos = len(spec.prompts) * len(spec.seeds)
        passes = 2 if spec.sampling.cfg > 1 else 1
        forwards = videos * spec.sampling.steps * passes
        runs.append(
            {
                "prompt_set": spec.prompt_set or "(prompts given)",
                "prompts": len(spec.prompts),
                "videos_per_prompt": len(spec.seeds),
                "videos": videos,
                "forwards": forwards,
                "gpu_hours": forwards * step_time.forward_ms / 3.6e6 if step_time else None,
                "eval": list(spec.eval_suites),
            }
        )
    first = specs[0]
    s = first.sampling
    return {
        "model": first.model,
        "method": first.method,
        "protocol": first.protocol or None,
        "sampling": f"{s.steps} steps, CFG {s.cfg:g}, {s.height}x{s.width} x {s.frames} frames at {s.fps} fps",
        "tokens": tokens,
        "runs": runs,
        "total_prompts": sum(r["prompts"] for r in runs),
        "total_videos": sum(r["videos"] for r in runs),
        "gpu_hours": sum(r["gpu_hours"] for r in runs) if step_time else None,
        "step_time": vars(step_time) if step_time else None,
        "estimate_covers": "denoising only (prompt encoding, VAE decode and evaluation are extra)",
    }
