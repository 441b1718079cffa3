"""Run records: one strict JSON file per run (:mod:`harness.strict_json`), written atomically, read back tolerantly.

A record holds the full spec and its hash, the environment, latency statistics, memory, density,
metrics and artifact paths. A corrupt file in a runs folder is reported and skipped; other JSON
(checkpoint specs, plans, benchmark summaries) is recognised as not a record by its missing or
foreign ``kind``; the other records are still read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.atomic import write_json_atomic

RECORD_SCHEMA = 1
RECORD_SUFFIX = ".json"
REQUIRED_KEYS = {
    "run": ("spec", "latency", "density", "memory", "artifacts", "environment", "cohort"),
    "latency": ("model", "methods", "environment", "baseline", "tokens"),
}


class NotARecordError(ValueError):
    """Readable JSON that is no record at all (no record ``kind``): skipped, never called corrupt."""


@dataclass
class LoadedRecords:
    records: list[dict[str, Any]] = field(default_factory=list)
    errors: list[tuple[Path, str]] = field(default_factory=list)
    others: list[Path] = field(default_factory=list)  # JSON files that are not records


def record_path(runs_dir: Path, run_id: str) -> Path:
    return Path(runs_dir) / f"{run_id}{RECORD_SUFFIX}"


def write_record(path: Path, record: dict[str, Any]) -> None:
    write_json_atomic(path, {"schema": RECORD_SCHEMA, **record})


def read_record(path: Path) -> dict[str, Any]:
    """One record; raises ``ValueError`` with the reason if the file is not a valid record
    (:class:`NotARecordError` if it is JSON of another kind)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"unreadable JSON: {exc}") from exc
    if not isinstance(data, dict) or data.get("kind") not in REQUIRED_KEYS:
        raise NotARecordError("not a run record (no record 'kind')")
    missing = [key for key in ("spec", *REQUIRED_KEYS[data["kind"]]) if key not in data]
    if missing:
        raise ValueError(f"incomplete {data['kind']} record: missing {', '.join(missing)}")
    return data


def contended(record: dict[str, Any]) -> bool:
    """Whether a run was sampled beside others (``latency.concurrent_runs`` > 1, ``bench ablate --jobs``): its
    times measured their contention, so no table, speedup or estimate uses them."""
    return record.get("latency", {}).get("concurrent_runs", 1) > 1


def finished_record(path: Path) -> dict[str, Any] | None:
    """The record at ``path`` if it exists and is complete, else None (a rerun is needed)."""
    if not Path(path).exists():
        return None
    try:
        data = read_record(path)
    except ValueError:
        return None
    return data if data.get("status") == "complete" else None


def load_records(runs_dir: Path) -> LoadedRecords:
    """Every record under ``runs_dir`` (recursively), the files that could not be read, and other JSON."""
    loaded = LoadedRecords()
    for path in sorted(Path(runs_dir).rglob(f"*{RECORD_SUFFIX}")):
        if path.name.startswith("."):
            continue  # temporary files of an interrupted atomic write
        try:
            record = read_record(path)
        except NotARecordError:
            loaded.others.append(path)
            continue
        except ValueError as exc:
            loaded.errors.append((path, str(exc)))
            continue
        record["_path"] = str(path)
        loaded.records.append(record)
    return loaded
