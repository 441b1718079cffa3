"""Launching an autotuned Triton kernel with its autotuner's per-call host work done once per key.

``kernel[grid](*args, **meta)`` through ``triton.autotune`` rebuilds, on every call, dicts over all the arguments
to form the tuning key and look it up: as much host time as the launch itself (about 20-40 us on an H200's host,
``python -m harness.benchmarks.linear_host_profile``). Where a call is host-bound (the eager linear attention
forward; svg2's plan, about 40 launches a call) that time is the call's. :func:`launch_tuned` runs the autotuner on
a key's first call and afterwards launches the configuration it chose directly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

# (kernel, its tuning key's values, constexprs, tensor dtypes) -> (configuration, its launch keywords).
_CHOSEN: dict[tuple[Any, ...], tuple[Any, dict[str, Any]]] = {}
# kernel -> the positions in its arguments of its tuning key's names (those not passed as keywords).
_KEY_POSITIONS: dict[Any, tuple[tuple[str, int | None], ...]] = {}


def _tuning_key(kernel: Any, args: tuple[Any, ...], meta: dict[str, Any]) -> tuple[Any, ...]:
    """What the autotuner's own key holds (its ``key`` arguments' values and the tensors' dtypes), plus the
    constexprs ``meta``: equal keys choose the same configuration."""
    positions = _KEY_POSITIONS.get(kernel)
    if positions is None:
        names = list(kernel.arg_names)
        # A key name the kernel does not take is skipped, as the autotuner skips it.
        positions = tuple((name, None if name in meta else names.index(name)) for name in kernel.keys
                          if name in meta or name in names)  # fmt: skip
        _KEY_POSITIONS[kernel] = positions
    values = tuple(meta[name] if index is None else args[index] for name, index in positions)
    return (kernel, values, *meta.items(), *[arg.dtype for arg in args if isinstance(arg, torch.Tensor)])


def launch_tuned(kernel: Any, grid: tuple[int, ...] | Callable[[dict[str, Any]], tuple[int, ...]], *args: Any,
                 **meta: Any) -> None:  # fmt: skip
    """``kernel[grid](*args, **meta)`` for a ``triton.autotune`` kernel, the autotuner's work done once per key.

    The first call of a key (the autotuner's key arguments' values, the constexprs ``meta`` and the tensors' dtypes:
    the autotuner's own key, or finer) runs the autotuner, which picks (and on CUDA times) a configuration; later
    calls launch that configuration's kernel directly while the autotuner still holds it (an equal configuration in
    its list and, where it has a choice, in its cache: a caller that pins other configurations or clears the cache,
    as the GPU benchmarks' checks do, sends the next call back through the autotuner). A callable ``grid`` is given
    ``meta`` and the configuration's keywords (its tile sizes), as Triton gives it. Kernels with configuration
    hooks (``pre_hook``, ``reset_to_zero``) must not come here: the direct launch skips them.
    """
    key = _tuning_key(kernel, args, meta)
    chosen = _CHOSEN.get(key)
    if (
        chosen is not None
        and chosen[0] in kernel.configs
        and (len(kernel.configs) == 1 or chosen[0] in kernel.cache.values())
    ):
        launch_grid = grid({**meta, **chosen[1]}) if callable(grid) else grid
        kernel.fn[launch_grid](*args, **meta, **chosen[1])
        return
    kernel[grid](*args, **meta)
    _CHOSEN[key] = kernel.best_config, kernel.best_config.all_kwargs()


def forget_choices() -> None:
    """Drop every remembered choice: the next call of each key goes through its autotuner again (a benchmark that
    times the autotuner's own path)."""
    _CHOSEN.clear()
