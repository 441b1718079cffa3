"""Strict JSON (RFC 8259) for every file the harness writes: no NaN or Infinity, which strict parsers reject.

A non-finite number is written as ``null`` and noted in the top-level object's :data:`NON_FINITE_KEY`
map, by JSON Pointer (RFC 6901): ``{"non_finite_as_null": {"/metrics/fidelity/psnr_db": "Infinity"}}``
(a video compared with itself has an infinite PSNR). The map is recomputed at every write: a note stays
while its value is still ``null`` (a record read back and written again) and goes when a finite value
replaced it. Only a top-level object can carry notes; elsewhere the ``null`` stands alone.
"""

from __future__ import annotations

import json
import math
from typing import Any

NON_FINITE_KEY = "non_finite_as_null"


def encode(payload: Any, indent: int | None = 2) -> str:
    """``payload`` as strict JSON text (non-finite numbers as null, noted); unknown types as ``str``."""
    return json.dumps(strict(payload), indent=indent, allow_nan=False, default=str)


def decode(text: str) -> Any:
    """Parse ``text`` as strict JSON; raises ``ValueError`` on NaN, Infinity or -Infinity."""
    return json.loads(text, parse_constant=_refuse_constant)


def strict(payload: Any) -> Any:
    """A copy of ``payload`` that strict JSON can hold: non-finite floats become None, noted (module doc)."""
    found: dict[str, str] = {}
    clean = _clean(payload, "", found)
    if not isinstance(clean, dict):
        return clean
    kept = {pointer: value for pointer, value in (clean.pop(NON_FINITE_KEY, None) or {}).items()
            if _points_to_null(clean, pointer)}  # fmt: skip
    notes = {**kept, **found}
    return {**clean, NON_FINITE_KEY: notes} if notes else clean


def _clean(value: Any, pointer: str, found: dict[str, str]) -> Any:
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy / torch scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        found[pointer] = json.dumps(value)  # "NaN", "Infinity" or "-Infinity"
        return None
    if isinstance(value, dict):
        return {key: _clean(item, f"{pointer}/{_escape(str(key))}", found) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(item, f"{pointer}/{index}", found) for index, item in enumerate(value)]
    return value


def _escape(token: str) -> str:
    return token.replace("~", "~0").replace("/", "~1")


def _points_to_null(document: dict[str, Any], pointer: str) -> bool:
    node: Any = document
    for token in pointer.split("/")[1:]:
        token = token.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and token in node:
            node = node[token]
        elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
            node = node[int(token)]
        else:
            return False
    return node is None


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not strict JSON")
