"""Where the time of one call goes on a CUDA device: per kernel launch, on the device alone, and on the host.

A call timed with events from an idle device (``harness.latency.measure``) costs the larger of its host work
(Python, allocations, launches) and its device work. To tell them apart:

- :func:`kernel_split`: each kernel's device time per call and the launches per call, read from
  ``torch.profiler`` (CUPTI) over a few calls;
- :func:`graph_ms`: the call captured once in a CUDA graph and replayed, timed with events: the device time
  with the gaps between its kernels but no host work;
- :func:`enqueue_ms`: the host time until the call returns, without waiting for the device.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from harness.latency import measure


def kernel_split(fn: Callable[[], Any], calls: int = 3) -> dict[str, Any]:
    """``{"launches": per call, "device_ms": kernels' total per call, "kernels": {name: ms per call}}`` (slowest
    first) of ``fn`` on the current CUDA device, from the profiler over ``calls`` calls after one warm call."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    per_kernel: dict[str, float] = defaultdict(float)
    launches = 0
    for event in prof.events():
        if event.device_type == DeviceType.CUDA:
            per_kernel[event.name] += event.device_time_total / 1e3 / calls
            launches += 1
    kernels = dict(sorted(per_kernel.items(), key=lambda item: -item[1]))
    return {"launches": launches / calls, "device_ms": sum(kernels.values()), "kernels": kernels}


def graph_ms(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Median ms of one replay of ``fn`` captured in a CUDA graph (warmed up on a side stream, as capture needs)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    stats, _ = measure(graph.replay, device, 2, repeats)
    return stats.median_ms


def enqueue_ms(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Median host ms from calling ``fn`` on an idle device to its return (its device work not awaited)."""
    samples = []
    for _ in range(repeats):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    torch.cuda.synchronize(device)
    return statistics.median(samples)


def diagnose(fn: Callable[[], Any], device: torch.device, repeats: int) -> dict[str, Any]:
    """:func:`kernel_split`, :func:`graph_ms` and :func:`enqueue_ms` of ``fn``; a part that fails (a capture
    the call does not allow) is recorded as its error, never raised: the diagnosis must not lose a run."""
    result: dict[str, Any] = {}
    for name, part in (("split", lambda: kernel_split(fn)), ("graph_ms", lambda: graph_ms(fn, device, repeats)),
                       ("enqueue_ms", lambda: enqueue_ms(fn, device, repeats))):  # fmt: skip
        try:
            result[name] = part()
        except Exception as exc:  # a diagnostic: recorded
            result[name] = {"error": f"{type(exc).__name__}: {exc}"}
    return result


def summary_line(diagnosis: dict[str, Any], top: int = 4) -> str:
    """One line: device time and launches per call, graph replay and host enqueue ms, the ``top`` kernels."""
    split = diagnosis.get("split", {})
    parts = ["kernel split failed"]
    if "kernels" in split:
        kernels = ", ".join(f"{name[:28]} {ms:.3f}" for name, ms in list(split["kernels"].items())[:top])
        parts = [f"kernels {split['device_ms']:.3f} ms in {split['launches']:.0f} launches ({kernels})"]
    for key, label in (("graph_ms", "graph replay"), ("enqueue_ms", "host enqueue")):
        value = diagnosis.get(key)
        parts.append(f"{label} {value:.3f} ms" if isinstance(value, float) else f"{label} failed")
    return "; ".join(parts)
