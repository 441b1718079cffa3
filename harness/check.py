"""The latency regression gate: re-measure a baseline's methods here, compare time ratios to dense.

Absolute times differ between machines; the ratio of each method's forward time to the dense
baseline's, measured in one process, is what must not regress beyond the tolerance.

A shared machine's load slows some kernels more than others (memory-bound ones most), so one
measurement's ratio can exceed the tolerance with no change in the code: on CI's 2 shared cores the
math/sdpa ratio was once 4.89 against a baseline of 3.85 measured on the same CPU model. A regression
is a property of the code, present in every measurement; load is not. So a failed verdict is
re-measured (``confirm`` times) and a method regresses only if it regressed in every measurement.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.errors import HarnessError
from harness.latency_run import LatencyRequest, run_latency


@dataclass(frozen=True)
class Verdict:
    method: str
    old_ratio: float
    new_ratio: float
    limit: float

    @property
    def regressed(self) -> bool:
        return self.new_ratio > self.limit

    @property
    def change(self) -> float:
        return self.new_ratio / self.old_ratio - 1.0


def load_baseline(path: Path) -> dict[str, Any]:
    """A ``bench latency --out`` result, its shape checked: a clear error for anything :func:`check` cannot use."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HarnessError(f"cannot read latency baseline {path}: {exc}") from exc
    if not isinstance(data, dict) or data.get("kind") != "latency" or not isinstance(data.get("methods"), dict):
        raise HarnessError(f"{path} is not a `bench latency` result (kind 'latency' with 'methods')")
    problem = _baseline_problem(data)
    if problem:
        raise HarnessError(f"latency baseline {path} {problem}; write a new one with `bench latency --out`")
    return data


def _baseline_problem(data: dict[str, Any]) -> str | None:
    """What makes a latency result unusable as a baseline (None if nothing): the request to re-measure
    and a positive time ratio per method."""
    if data.get("status") == "partial":
        return "is the partial result of an interrupted `bench latency` (rerun its command to finish it)"
    spec = data.get("spec")
    request = spec.get("request") if isinstance(spec, dict) else None
    if not isinstance(request, dict):
        return "lacks its spec (spec.request: what to re-measure)"
    unknown = sorted(set(request) - {f.name for f in dataclasses.fields(LatencyRequest)})
    if unknown:
        return f"has spec.request fields this version does not know: {', '.join(unknown)}"
    missing = [name for name in ("model", "methods") if name not in request]
    if missing:
        return f"lacks spec.request.{missing[0]}"
    if not data["methods"]:
        return "names no method"
    for name, entry in data["methods"].items():
        ratio = entry.get("ratio_to_baseline") if isinstance(entry, dict) else None
        if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not math.isfinite(ratio) or ratio <= 0:
            return f"has no positive ratio_to_baseline for {name!r}"
    return None


def request_from_baseline(baseline: dict[str, Any], overrides: dict[str, Any] | None = None) -> LatencyRequest:
    fields = dict(baseline["spec"]["request"])
    fields["dense_layers"] = tuple(fields.get("dense_layers", ()))
    fields.update(overrides or {})
    return LatencyRequest(**fields)


def check_tolerance(tolerance: float) -> None:
    """A relative growth allowance: a finite number >= 0 (refused before anything is measured)."""
    if not math.isfinite(tolerance) or tolerance < 0:
        raise HarnessError(f"--tolerance must be >= 0 and finite (the allowed relative growth of a time ratio: "
                           f"0.1 = 10 %), got {tolerance}")  # fmt: skip


def compare(baseline: dict[str, Any], current: dict[str, Any], tolerance: float) -> list[Verdict]:
    """One verdict per method of the baseline: regressed iff new ratio > old ratio x (1 + tolerance)."""
    check_tolerance(tolerance)
    verdicts = []
    for name, entry in baseline["methods"].items():
        if name not in current["methods"]:
            raise HarnessError(f"method {name!r} of the baseline was not measured")
        old, new = entry["ratio_to_baseline"], current["methods"][name]["ratio_to_baseline"]
        verdicts.append(Verdict(name, old, new, old * (1.0 + tolerance)))
    return verdicts


def confirmed(attempts: list[list[Verdict]]) -> list[Verdict]:
    """One verdict per method from several measurements' verdicts: each method's lowest new ratio, so a
    method is regressed iff it regressed in every measurement (load only ever adds time)."""
    return [min(per_method, key=lambda v: v.new_ratio) for per_method in zip(*attempts, strict=True)]


def check(
    baseline_path: Path, tolerance: float, overrides: dict[str, Any] | None = None, confirm: int = 1
) -> tuple[list[Verdict], dict[str, Any], list[list[Verdict]]]:
    """Re-measure and compare; while a method is regressed, re-measure up to ``confirm`` more times.

    Returns the confirmed verdicts (see :func:`confirmed`), the last measurement and every measurement's
    verdicts in order. Raises HarnessError for an unusable baseline, tolerance or ``confirm < 0``.
    """
    check_tolerance(tolerance)
    if confirm < 0:
        raise HarnessError(f"--confirm must be >= 0 (re-measurements of a failed check), got {confirm}")
    baseline = load_baseline(baseline_path)
    request = request_from_baseline(baseline, overrides)
    attempts: list[list[Verdict]] = []
    while True:
        current = run_latency(request)
        attempts.append(compare(baseline, current, tolerance))
        verdicts = confirmed(attempts)
        if not any(v.regressed for v in verdicts) or len(attempts) > confirm:
            return verdicts, current, attempts
