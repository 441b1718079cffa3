"""Launching an autotuned Triton kernel with its autotuner's per-call host work done once per key.

``kernel[grid](*args, **meta)`` through ``triton.autotune`` rebuilds, on every call, dicts over all the arguments
to form the tuning key and look it up: as much host time as the launch itself (about 20-40 us on an H200's host,
``python -m harness.benchmarks.linear_host_profile``). Where a call is host-bound (the eager linear attention
forward; svg2's plan, about 40 launches a call) that time is the call's. :func:`launch_tuned` runs the autotuner on
a key's first call and afterwards launches the configuration it chose directly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch


class _Choice(NamedTuple):
    """What the autotuner chose for one key, and what must still hold for the choice to stand."""

    config: Any  # the triton.Config
    kwargs: dict[str, Any]  # its launch keywords
    configs: list[Any]  # the autotuner's list when it chose (a caller that pins others assigns a new list)
    tuner_key: tuple[Any, ...]  # the autotuner's own cache key for the call


# (kernel, its tuning key's values, constexprs, tensor dtypes) -> the choice.
_CHOSEN: dict[tuple[Any, ...], _Choice] = {}
# (kernel, positional count, keyword names) -> per name of the autotuner's key: its position among the positional
# arguments, or the name itself where it is passed as a keyword (names the call does not pass are left out, as the
# autotuner leaves them out).
_KEY_PLACES: dict[tuple[Any, ...], tuple[int | str, ...]] = {}


def _key_values(kernel: Any, args: tuple[Any, ...], meta: dict[str, Any]) -> tuple[Any, ...]:
    """The values of the autotuner's key arguments in this call."""
    shape = (kernel, len(args), tuple(meta))
    places = _KEY_PLACES.get(shape)
    if places is None:
        names = list(kernel.arg_names)
        places = tuple(name if name in meta else names.index(name) for name in kernel.keys
                       if name in meta or (name in names and names.index(name) < len(args)))  # fmt: skip
        _KEY_PLACES[shape] = places
    return tuple(meta[place] if isinstance(place, str) else args[place] for place in places)


def _tuner_key(kernel: Any, args: tuple[Any, ...], meta: dict[str, Any]) -> tuple[Any, ...]:
    """The autotuner's own cache key for this call (Triton 3.6's ``Autotuner.run``: its key arguments' values, then
    the ``str`` dtype of every argument that has one, in argument order). Built once per choice; were Triton's formula
    to differ, no cached entry would match and every call would go through the autotuner (correct, only slower)."""
    bound = {**dict(zip(kernel.arg_names, args, strict=False)), **meta}  # arguments past args are defaults
    bound = {name: value for name, value in bound.items() if name in kernel.arg_names}
    key = [bound[name] for name in kernel.keys if name in bound]
    key.extend(str(value.dtype) for value in bound.values() if hasattr(value, "dtype"))
    return tuple(key)


def launch_tuned(kernel: Any, grid: tuple[int, ...] | Callable[[dict[str, Any]], tuple[int, ...]], *args: Any,
                 **meta: Any) -> None:  # fmt: skip
    """``kernel[grid](*args, **meta)`` for a ``triton.autotune`` kernel, the autotuner's work done once per key.

    The first call of a key (the autotuner's key arguments' values, the constexprs ``meta`` and the tensors' dtypes:
    the autotuner's own key, or finer) runs the autotuner, which picks (and on CUDA times) a configuration; later
    calls launch that configuration's kernel directly while the choice stands: the autotuner's configuration list is
    the one it chose from (a caller that pins other configurations assigns a new list) and, where it has a choice,
    its cache still holds that configuration under this call's key (a caller that clears the cache sends the next
    call back through the autotuner). A callable ``grid`` is given ``meta`` and the configuration's keywords only
    (Triton also gives it the positional arguments): the grids here read tile sizes. Kernels with configuration
    hooks (``pre_hook``, ``reset_to_zero``) must not come here: the direct launch skips them.
    """
    key = (kernel, _key_values(kernel, args, meta), *meta.items(),
           *[arg.dtype for arg in args if isinstance(arg, torch.Tensor)])  # fmt: skip
    chosen = _CHOSEN.get(key)
    if (
        chosen is not None
        and kernel.configs is chosen.configs
        and (len(chosen.configs) == 1 or kernel.cache.get(chosen.tuner_key) is chosen.config)
    ):
        launch_grid = grid({**meta, **chosen.kwargs}) if callable(grid) else grid
        kernel.fn[launch_grid](*args, **meta, **chosen.kwargs)
        return
    kernel[grid](*args, **meta)
    config = kernel.best_config
    _CHOSEN[key] = _Choice(config, config.all_kwargs(), kernel.configs, _tuner_key(kernel, args, meta))


def forget_choices() -> None:
    """Drop every remembered choice: the next call of each key goes through its autotuner again (a benchmark that
    times the autotuner's own path)."""
    _CHOSEN.clear()
