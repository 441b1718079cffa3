"""Marks, for the newcomer catalogue, that a CLI subprocess built a model (the expensive work errors must precede).

The catalogue puts this folder on ``PYTHONPATH`` and names a file in ``NEWCOMER_PROBE_FILE``; Python imports
``sitecustomize`` at start-up, and this one wraps the two functions every model build goes through (the Wan
transformer of every Wan adapter, the toy teacher's modules) so that each call appends one line to that file. The
wrapper changes nothing else: it calls the original with the same arguments and returns its result.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import os
import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

#: module -> the functions in it that build a model
WATCHED = {"harness.models.wan": ("build_transformer",), "harness.toyworld.checkpoint": ("build_modules",)}


def _marking(fn: Callable[..., Any], where: str, marker: str) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with open(marker, "a", encoding="utf-8") as handle:
            handle.write(f"{where} called\n")
        return fn(*args, **kwargs)

    return wrapper


class _WrappingLoader(importlib.abc.Loader):
    def __init__(self, inner: importlib.abc.Loader, marker: str) -> None:
        self.inner, self.marker = inner, marker

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.inner.exec_module(module)  # type: ignore[attr-defined]
        for name in WATCHED[module.__name__]:
            setattr(module, name, _marking(getattr(module, name), f"{module.__name__}.{name}", self.marker))


class _Finder(importlib.abc.MetaPathFinder):
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in WATCHED:
            return None
        for finder in sys.meta_path:
            if finder is self:
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _WrappingLoader(spec.loader, self.marker)
                return spec
        return None


if os.environ.get("NEWCOMER_PROBE_FILE"):
    sys.meta_path.insert(0, _Finder(os.environ["NEWCOMER_PROBE_FILE"]))
