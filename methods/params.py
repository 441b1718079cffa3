"""Typed method parameters: one schema per method parses, checks, lists and records its parameters.

Every :class:`~methods.base.AttentionMethod` declares ``parameters``, a tuple of :class:`Param` (name,
type, default, range or choices, help). :func:`parse_params` turns what a user gave -- ``--param
KEY=VALUE`` strings, or Python / JSON values -- into typed values and refuses, in one line naming the
method and the parameter, an unknown name (listing the valid ones, with a did-you-mean), a value of the
wrong type, NaN or infinity, and a value out of range. The method's constructor goes through the same
schema, so a method built from Python fails the same way; ``bench methods --json`` lists it.

Accepted spellings, whatever the source:

- ``bool``: ``true/false``, ``1/0``, ``yes/no`` (any case), or a Python bool.
- ``int``: an integer or its decimal text (``8.0`` is refused: not an integer).
- ``float``: a finite number or its text (``nan``, ``inf`` are refused).
- ``choice``: one of ``choices``; ``path``: a file path (kept as given; existence is the method's check).
- ``layers``: layer indices as ``0,2,5``, ``[0, 2, 5]``, an int or a sequence; recorded sorted and unique.
  ``layers_or_all`` also takes ``all``. Indices the model lacks are refused by ``validate_for``.
- ``block_size``: ``auto`` or a token count that divides :data:`FLEX_TILE` (1, 2, ..., 64) or is a
  multiple of it: FlexAttention computes 128-token tiles, so smaller blocks are grouped into whole tiles
  (a token-level mask inside each) and other sizes (e.g. 20, 96) would leave a tile split between blocks.
- ``method``: a registered attention method's name or alias, recorded as its canonical name.
- ``object``: a JSON object (``{"decay_factor": 0.5}``) or a mapping with text keys, e.g. another method's
  parameters, which the owner types by that method's schema.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from harness.errors import HarnessError
from harness.registry import did_you_mean
from methods.kernels.block_sparse import FLEX_TILE

ParamType = Literal[
    "bool", "int", "float", "choice", "path", "layers", "layers_or_all", "block_size", "method", "object"
]
TRUE_WORDS, FALSE_WORDS = ("true", "1", "yes"), ("false", "0", "no")
_INTEGER = re.compile(r"[+-]?\d+")


@dataclass(frozen=True)
class Param:
    """One method parameter.

    Attributes:
        name: the ``--param`` key.
        type: how values are parsed (see the module docstring).
        default: the value when not given (``None`` with ``optional``: the parameter is off).
        help: one line for ``bench methods`` (what it is, the paper's value).
        min, max: inclusive bounds of an ``int`` / ``float``; ``min_open`` excludes ``min`` (``(0, 1]``).
        choices: the values a ``choice`` takes.
        optional: ``None`` is a valid value (the default of a parameter that is off unless given).
        model_layers: the value names layers of the model (indices, or for an ``int`` a count of first
            layers); :meth:`AttentionMethod.validate_for` refuses layers the model lacks.
        spellings: other names a user may type for it (the paper's symbol, e.g. ``tau``); suggested, never
            accepted, so that one setting has one name in every spec.
    """

    name: str
    type: ParamType
    default: Any
    help: str
    min: float | None = None
    max: float | None = None
    min_open: bool = False
    choices: tuple[str, ...] = ()
    optional: bool = False
    model_layers: bool = False
    spellings: tuple[str, ...] = ()

    def parse(self, value: Any, owner: str) -> Any:
        """``value`` as this parameter's type; :class:`HarnessError` ``"<owner>: <name> must be ..."`` if not."""
        if value is None and self.optional:
            return None
        typed = _PARSERS[self.type](self, value, f"{owner}: {self.name}")
        if isinstance(typed, (int, float)) and not isinstance(typed, bool) and not self._in_range(typed):
            raise HarnessError(f"{owner}: {self.name} must be {self.range_text()}, got {_show(value)}")
        return typed

    def _in_range(self, value: float) -> bool:
        low_ok = self.min is None or (value > self.min if self.min_open else value >= self.min)
        return low_ok and (self.max is None or value <= self.max)

    def range_text(self) -> str | None:
        """``"(0, 1]"``, ``">= 1"``, ``"> 0"``, the block-size rule, or ``None`` when any value of the type goes."""
        if self.type == "block_size":
            return f"'auto' or a divisor or multiple of {FLEX_TILE} (e.g. 16, 32, 64, {FLEX_TILE}, {2 * FLEX_TILE})"
        low, high = _number(self.min), _number(self.max)
        if low is not None and high is not None:
            return f"in {'(' if self.min_open else '['}{low}, {high}]"
        if low is not None:
            return f"{'>' if self.min_open else '>='} {low}"
        return None if high is None else f"<= {high}"

    def describe(self) -> dict[str, Any]:
        """The JSON listing of ``bench methods --json``."""
        return {
            "name": self.name,
            "type": self.type,
            "default": self.default,
            "range": self.range_text(),
            "choices": list(self.choices) or None,
            "optional": self.optional,
            "help": self.help,
        }


def parse_params(owner: str, schema: tuple[Param, ...], raw: Mapping[str, Any]) -> dict[str, Any]:
    """The given parameters of method ``owner`` typed by ``schema`` (defaults are not filled in).

    Raises :class:`HarnessError` on the first unknown name (listing the valid ones) or bad value.
    """
    by_name = {param.name: param for param in schema}
    typed = {}
    for key, value in raw.items():
        if key not in by_name:
            spellings = {alias: param.name for param in schema for alias in param.spellings}
            hint = did_you_mean(key, by_name, spellings)
            valid = f"its parameters: {', '.join(by_name)}" if by_name else "it takes no parameters"
            raise HarnessError(f"method {owner!r} has no parameter {key!r}.{hint} {valid[0].upper()}{valid[1:]}.")
        typed[key] = by_name[key].parse(value, owner)
    return typed


def parse_layers(value: Any, what: str = "layers") -> tuple[int, ...] | None:
    """``None`` (every layer) for ``"all"`` or ``None``, else sorted unique layer indices ``>= 0``.

    Takes ``"0,2,5"``, ``"[0, 2, 5]"``, an int or a sequence of ints; ``what`` names the value in errors.
    """
    if value is None or (isinstance(value, str) and value.strip().lower() == "all"):
        return None
    bad = HarnessError(f"{what} must be 'all' or comma-separated integers, got {_show(value)}")
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise bad from None
    if isinstance(value, str):
        parts: list[Any] = [part.strip() for part in value.split(",") if part.strip()]
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        parts = [value]
    indices = []
    for part in parts:
        # bool is an int subclass and 2.0 a float: neither is a layer index.
        if isinstance(part, bool) or not isinstance(part, (int, str)) or not _INTEGER.fullmatch(str(part).strip()):
            raise bad
        if int(part) < 0:
            raise HarnessError(f"{what}: layer indices must be >= 0, got {int(part)} in {_show(value)}")
        indices.append(int(part))
    if not indices:
        raise HarnessError(f"{what} is empty; give 'all' or at least one layer index")
    return tuple(sorted(set(indices)))


# -- one parser per type: (param, value, "<owner>: <name>") -> the typed value ---------------------


def _bool(param: Param, value: Any, what: str) -> bool:
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower() if isinstance(value, (str, int)) else None
    if word in TRUE_WORDS or word in FALSE_WORDS:
        return word in TRUE_WORDS
    raise HarnessError(f"{what} must be true or false (also 1/0, yes/no), got {_show(value)}")


def _int(param: Param, value: Any, what: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and _INTEGER.fullmatch(value.strip()):
        return int(value)
    raise HarnessError(f"{what} must be an integer, got {_show(value)}")


def _float(param: Param, value: Any, what: str) -> float:
    number = math.nan
    if isinstance(value, (int, float, str)) and not isinstance(value, bool):
        with contextlib.suppress(ValueError):
            number = float(value)
    if not math.isfinite(number):
        raise HarnessError(f"{what} must be a finite number, got {_show(value)}")
    return number


def _choice(param: Param, value: Any, what: str) -> str:
    if isinstance(value, str) and value in param.choices:
        return value
    hint = did_you_mean(value, param.choices) if isinstance(value, str) else ""
    raise HarnessError(f"{what} must be one of {', '.join(param.choices)}, got {_show(value)}.{hint}")


def _path(param: Param, value: Any, what: str) -> str:
    if isinstance(value, (str, os.PathLike)) and str(value).strip():
        return str(value)
    raise HarnessError(f"{what} must be a file path, got {_show(value)}")


def _layers(param: Param, value: Any, what: str) -> list[int]:
    layers = parse_layers(value, what)
    if layers is None:
        raise HarnessError(f"{what} must name layer indices (e.g. 0,2,5), got {_show(value)}")
    return list(layers)


def _layers_or_all(param: Param, value: Any, what: str) -> str | list[int]:
    layers = parse_layers(value, what)
    return "all" if layers is None else list(layers)


def _block_size(param: Param, value: Any, what: str) -> str | int:
    if isinstance(value, str) and value.strip() == "auto":
        return "auto"
    try:
        block = _int(param, value, what)
    except HarnessError:
        block = 0
    if block < 1 or (FLEX_TILE % block and block % FLEX_TILE):
        raise HarnessError(f"{what} must be {param.range_text()} (FlexAttention computes {FLEX_TILE}-token "
                           f"tiles, which smaller blocks must fill exactly), got {_show(value)}")  # fmt: skip
    return block


def _method(param: Param, value: Any, what: str) -> str:
    from methods.base import METHODS  # the registry's module imports this one

    if isinstance(value, str) and value.strip() in METHODS:
        return METHODS.canonical(value.strip())
    hint = did_you_mean(value, METHODS.names()) if isinstance(value, str) else ""
    raise HarnessError(f"{what} must be a registered attention method (`bench methods` lists them), "
                       f"got {_show(value)}.{hint}")  # fmt: skip


def _object(param: Param, value: Any, what: str) -> dict[str, Any]:
    parsed = value
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = None
    if isinstance(parsed, Mapping) and all(isinstance(key, str) for key in parsed):
        return dict(parsed)
    raise HarnessError(f'{what} must be a JSON object such as {{"decay_factor": 0.5}}, got {_show(value)}')


_PARSERS = {
    "bool": _bool,
    "int": _int,
    "float": _float,
    "choice": _choice,
    "path": _path,
    "layers": _layers,
    "layers_or_all": _layers_or_all,
    "block_size": _block_size,
    "method": _method,
    "object": _object,
}


def _number(value: float | None) -> str | None:
    return None if value is None else f"{value:g}"


def _show(value: Any) -> str:
    """A value as the user typed it: text quoted, numbers bare."""
    return repr(value) if isinstance(value, str) else str(value)
