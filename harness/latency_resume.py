"""``bench latency --out``: the record saved after every measured stage, and resumed by a rerun.

Each method's stages (``forward``: eager, ``compiled``: with ``--compile``, ``sample``: with ``--sample-steps``)
are kept in its entry under ``methods`` as they finish, and the record is written to ``--out`` after each one,
verified and atomically, with ``status`` "partial"; the complete record (``status`` "complete",
:func:`harness.latency_run.save_latency`) replaces it at the end. The partial record holds the measured stages
only: the fields derived from several methods (speedups against the baseline, kernel efficiency, warnings) are
computed once all are measured, so a baseline measured by an interrupted attempt still counts.

A rerun with the same ``--out`` measures only the stages its record lacks, if the record is of the same request:
the same ``spec`` (the resolved request and sampling: model, methods, weights, device, dtype, step, warm-up and
repeats, compile options, method parameters), model, weights and ``environment`` (device, library versions, git
commit, threads): timings from two setups never share a record. A partial record of another request is refused,
naming what differs, for its measurements would be lost; a complete one of another request is replaced.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness import strict_json
from harness.atomic import write_json_atomic
from harness.errors import HarnessError
from harness.spec import differing_fields

#: A method's stages, each its own key of the method's entry, in the order they are measured.
STAGES = ("forward", "compiled", "sample")
#: What must match for an earlier record's measurements to be kept.
IDENTITY = ("spec", "model", "weights", "environment")


def resumed_record(path: Path, fresh: dict[str, Any]) -> dict[str, Any]:
    """The record to fill: the one an earlier attempt of ``fresh``'s request left at ``path`` (partial or complete,
    its ``resumed`` naming each method's stages it holds, its ``machine_load`` gaining ``before_resuming``), else
    ``fresh``: no file, not a latency record, or a complete record of another request (replaced by this run).

    Raises:
        HarnessError: ``path`` holds a partial record of another request; the message names the fields that differ.
    """
    earlier = _earlier_record(path, fresh)
    if earlier is None:
        return fresh
    earlier["machine_load"] = {**earlier.get("machine_load", {}), "before_resuming": fresh["machine_load"]["before"]}
    earlier["resumed"] = {
        name: stages for name, entry in earlier["methods"].items() if (stages := measured_stages(entry))
    }
    return earlier


def _earlier_record(path: Path, fresh: dict[str, Any]) -> dict[str, Any] | None:
    try:
        earlier = strict_json.decode(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(earlier, dict) or earlier.get("kind") != "latency":
        return None
    changed = _differences(earlier, fresh)
    if changed and earlier.get("status") == "partial":
        raise HarnessError(
            f"{path} holds the partial result of another `bench latency` request, which differs in "
            f"{', '.join(changed)} (then vs now): rerun that command to finish it, or pass another --out (or delete "
            "the file) to start anew"
        )
    if changed or not isinstance(earlier.get("methods"), dict):
        return None
    earlier.pop("status", None)
    return earlier


def _differences(earlier: dict[str, Any], fresh: dict[str, Any]) -> list[str]:
    """The identity fields (``spec.request.step``, ``environment.git_commit``, ...) in which two records differ,
    earlier value first; empty when the same request made both."""
    # Through JSON, so that a tuple of the fresh request equals the list it was written as.
    theirs = strict_json.decode(strict_json.encode({key: fresh.get(key) for key in IDENTITY}))
    return differing_fields({key: earlier.get(key) for key in IDENTITY}, theirs)


def measured_stages(entry: dict[str, Any]) -> list[str]:
    """The stages a method's entry holds a measurement of (a compile that failed is tried again)."""
    return [stage for stage in STAGES if stage in entry and "error" not in entry[stage]]


def save_partial(path: Path, record: dict[str, Any]) -> None:
    """Write ``record`` (measured stages only) to ``path`` as strict JSON, verified and atomically, marked partial."""
    write_json_atomic(path, {**record, "status": "partial"})
