"""One generic registry for methods, models and metrics.

Entries may be registered eagerly (a decorator on the class) or lazily as a ``"module:attr"``
string, so that listing names never imports heavy backends. Names have aliases; an unknown name
fails with the closest valid names. Packages outside this repository add entries through the
Python entry-point group given to the registry (for methods: ``attention_bench.methods``).

    >>> METHODS = Registry("method", entry_point_group="attention_bench.methods")
    >>> @METHODS.register("sdpa", aliases=("default",))
    ... class Sdpa: ...
    >>> METHODS.get("default") is Sdpa
    True
"""

from __future__ import annotations

import difflib
import importlib
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from importlib.metadata import entry_points
from typing import Generic, TypeVar

from harness.errors import UnknownNameError

T = TypeVar("T")


def did_you_mean(name: str, candidates: Iterable[str], spellings: Mapping[str, str] | None = None) -> str:
    """``" Did you mean 'a', 'b'?"`` for the candidates closest to ``name``, or ``""`` when none is close.

    ``spellings`` maps other names that should lead to a candidate (a paper's symbol, e.g. ``tau``) to
    the candidate to suggest in their place.
    """
    spellings = spellings or {}
    names = [*candidates, *spellings]
    # Case and one part of a hyphenated name count as near too: FLEX -> flex, bsr -> flashinfer-bsr.
    folded = name.casefold()
    parts = [c for c in names if folded == c.casefold() or folded in re.split(r"[-_.]", c.casefold())]
    close = difflib.get_close_matches(folded, names, n=3, cutoff=0.5)
    suggested = list(dict.fromkeys(spellings.get(match, match) for match in [*parts, *close]))[:3]
    return f" Did you mean {', '.join(repr(s) for s in suggested)}?" if suggested else ""


def _import_target(target: str) -> object:
    module_name, _, attr = target.partition(":")
    if not attr:
        raise ValueError(f"lazy registry target {target!r} must look like 'package.module:attr'")
    return getattr(importlib.import_module(module_name), attr)


class Registry(Generic[T]):
    """Name -> object mapping with aliases, lazy ``module:attr`` entries and did-you-mean errors."""

    def __init__(self, kind: str, entry_point_group: str | None = None) -> None:
        self.kind = kind
        self._entry_point_group = entry_point_group
        self._entries: dict[str, T | str] = {}
        self._aliases: dict[str, str] = {}
        self._lock = threading.Lock()
        self._entry_points_loaded = entry_point_group is None

    def register(self, name: str, aliases: tuple[str, ...] = ()) -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name`` (and ``aliases``)."""

        def decorator(obj: T) -> T:
            self.add(name, obj, aliases)
            return obj

        return decorator

    def add(self, name: str, obj: T | str, aliases: tuple[str, ...] = ()) -> None:
        """Register ``obj`` (or a lazy ``"module:attr"`` string). Re-registering a lazy name resolves it."""
        with self._lock:
            current = self._entries.get(name)
            if current is not None and not isinstance(current, str) and current is not obj:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = obj
            for alias in aliases:
                owner = self._aliases.get(alias)
                if owner not in (None, name) or (alias in self._entries and alias != name):
                    raise ValueError(f"{self.kind} alias {alias!r} already points at {owner or alias!r}")
                self._aliases[alias] = name

    def remove(self, name: str) -> None:
        """Forget ``name`` and its aliases (used by tests and plugin reloads)."""
        with self._lock:
            self._entries.pop(name, None)
            for alias in [a for a, owner in self._aliases.items() if owner == name]:
                del self._aliases[alias]

    def canonical(self, name: str) -> str:
        """The registered name that ``name`` (a name or an alias) refers to."""
        self._load_entry_points()
        if name in self._entries:
            return name
        if name in self._aliases:
            return self._aliases[name]
        raise UnknownNameError(self._unknown_message(name))

    def get(self, name: str) -> T:
        """The object registered under ``name``, importing it first when it is lazy."""
        canonical = self.canonical(name)
        entry = self._entries[canonical]
        if isinstance(entry, str):
            resolved = _import_target(entry)
            with self._lock:
                # Importing the module usually re-registers the entry through its decorator.
                if isinstance(self._entries[canonical], str):
                    self._entries[canonical] = resolved  # type: ignore[assignment]
            return self._entries[canonical]  # type: ignore[return-value]
        return entry

    def names(self) -> list[str]:
        self._load_entry_points()
        return sorted(self._entries)

    def aliases_of(self, name: str) -> list[str]:
        return sorted(a for a, owner in self._aliases.items() if owner == name)

    def __contains__(self, name: object) -> bool:
        self._load_entry_points()
        return name in self._entries or name in self._aliases

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def _unknown_message(self, name: str) -> str:
        hint = did_you_mean(name, [*self._entries, *self._aliases])
        return f"unknown {self.kind} {name!r}.{hint} Known: {', '.join(self.names())}."

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        for ep in entry_points(group=self._entry_point_group or ""):
            if ep.name not in self._entries:
                self.add(ep.name, ep.value)
