"""The timing protocol every latency figure obeys.

- GPU: CUDA events around the region, read after one synchronisation; CPU: ``time.perf_counter``.
- Warm-up runs (compile, autotune, first call) are excluded from the statistics and reported apart.
- Several repeats; the median and the spread (min, max, quartiles) are recorded, never one run. A figure
  whose repeats span more than its own median (``max - min > median``; the interquartile range never exceeds
  that span, so this also covers an IQR above the median) is flagged ``spread_exceeds_median`` and printed
  with a warning: one repeat took at least twice as long as another, so the machine, not the method, moved it.
- Peak device memory is recorded per measured region; the machine's load (:func:`machine_load`) beside it.
"""

from __future__ import annotations

import os
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class TimingStats:
    """Summary of repeated timings, in milliseconds."""

    median_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float
    p25_ms: float
    p75_ms: float
    repeats: int
    samples_ms: tuple[float, ...]
    warmup_ms: tuple[float, ...] = ()

    @classmethod
    def from_seconds(cls, samples: list[float], warmup: list[float] | None = None) -> TimingStats:
        if not samples:
            raise ValueError("no timed samples")
        ms = sorted(s * 1e3 for s in samples)
        quartiles = statistics.quantiles(ms, n=4, method="inclusive") if len(ms) > 1 else [ms[0]] * 3
        return cls(
            median_ms=statistics.median(ms),
            mean_ms=statistics.fmean(ms),
            min_ms=ms[0],
            max_ms=ms[-1],
            p25_ms=quartiles[0],
            p75_ms=quartiles[2],
            repeats=len(ms),
            samples_ms=tuple(s * 1e3 for s in samples),
            warmup_ms=tuple(s * 1e3 for s in warmup or ()),
        )

    @property
    def spread_exceeds_median(self) -> bool:
        """The protocol's instability flag: the repeats span more than the median (see the module docstring)."""
        return self.max_ms - self.min_ms > self.median_ms

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["samples_ms"], data["warmup_ms"] = list(self.samples_ms), list(self.warmup_ms)
        data["spread_exceeds_median"] = self.spread_exceeds_median
        return data


def spread_warning(name: str, stats: dict[str, Any]) -> str | None:
    """A one-line warning for a recorded figure (a :meth:`TimingStats.to_dict`) whose spread exceeds its median."""
    if stats["max_ms"] - stats["min_ms"] <= stats["median_ms"]:
        return None
    return (
        f"{name}: repeats span {stats['min_ms']:.4g}-{stats['max_ms']:.4g} ms around a median of "
        f"{stats['median_ms']:.4g} ms (IQR {stats['p25_ms']:.4g}-{stats['p75_ms']:.4g}); the machine was busy "
        "or the clock unsteady: rerun on an idle machine or with more --repeats before trusting it"
    )


def machine_load(device: torch.device) -> dict[str, Any]:
    """What else was running: the 1/5/15-minute load averages against the CPUs this process may use, and on
    CUDA the device's utilisation in the last sample period (None where the driver library is missing)."""
    try:
        load = list(os.getloadavg())
    except OSError:  # not every platform keeps load averages
        load = None
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu_utilisation = None
    if device.type == "cuda":
        try:
            gpu_utilisation = torch.cuda.utilization(device)
        except Exception:  # pynvml absent or the query unsupported: the load is optional
            gpu_utilisation = None
    return {
        "loadavg_1_5_15": load,
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "loaded": load is not None and usable is not None and load[0] > usable,
        "gpu_utilisation_percent": gpu_utilisation,
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Region:
    """One timed region: CUDA events on GPU, perf_counter on CPU; read with :meth:`seconds`."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._start_event = self._end_event = None
        self._begin = self._end = 0.0

    def start(self) -> None:
        if self.device.type == "cuda":
            self._start_event = torch.cuda.Event(enable_timing=True)
            self._end_event = torch.cuda.Event(enable_timing=True)
            self._start_event.record()
        else:
            self._begin = time.perf_counter()

    def stop(self) -> None:
        if self._end_event is not None:
            self._end_event.record()
        else:
            self._end = time.perf_counter()

    def ready(self) -> bool:
        """Whether :meth:`seconds` can be read without waiting (CPU: always; CUDA: the end event was reached)."""
        return self._end_event is None or bool(self._end_event.query())

    def seconds(self) -> float:
        if self._start_event is not None and self._end_event is not None:
            self._end_event.synchronize()
            return self._start_event.elapsed_time(self._end_event) / 1e3
        return self._end - self._begin


def measure(
    fn: Callable[[], Any],
    device: torch.device,
    warmup: int = 2,
    repeats: int = 5,
    after_each: Callable[[], Any] | None = None,
) -> tuple[TimingStats, list[Any]]:
    """Time ``fn`` ``repeats`` times after ``warmup`` calls that are reported but not in the statistics.

    ``after_each`` runs after every call, outside the timed region (e.g. to read the attention-only
    time collected during the call); its values for the timed repeats are returned with the stats.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    warm_seconds, samples, results = [], [], []
    for index in range(warmup + repeats):
        region = Region(device)
        synchronize(device)
        region.start()
        fn()
        region.stop()
        seconds = region.seconds()
        result = after_each() if after_each is not None else None
        if index < warmup:
            warm_seconds.append(seconds)
        else:
            samples.append(seconds)
            results.append(result)
    return TimingStats.from_seconds(samples, warm_seconds), results


def back_to_back_ms(fn: Callable[[], Any], device: torch.device, calls: int = 10, samples: int = 3) -> float:
    """Milliseconds per call of ``calls`` calls of ``fn`` issued back to back (after two warm ones) and timed as one
    region, the median of ``samples`` such regions: what a call costs inside a forward, where the host enqueues it
    while the GPU still runs earlier work. :func:`measure` synchronises before each timed call, so
    its time also holds the host's work before the first launch, during which the GPU idles."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(samples):
        region = Region(device)
        synchronize(device)
        region.start()
        for _ in range(calls):
            fn()
        region.stop()
        times.append(region.seconds() * 1e3 / calls)
    return sorted(times)[len(times) // 2]


@dataclass
class StageTimer:
    """Named stage durations (prompt encoding, each denoising step, decoding) of a sampling run."""

    device: torch.device
    _regions: dict[str, list[Region]] = field(default_factory=lambda: defaultdict(list))

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        region = Region(self.device)
        region.start()
        try:
            yield
        finally:
            region.stop()
            self._regions[name].append(region)

    def seconds(self, name: str) -> list[float]:
        return [region.seconds() for region in self._regions.get(name, [])]

    def stats(self, warmup: int = 1) -> dict[str, TimingStats]:
        """Per-stage statistics; the first ``warmup`` samples of a stage (if it has more) are warm-up."""
        result = {}
        for name in self._regions:
            samples = self.seconds(name)
            skip = warmup if len(samples) > warmup else 0
            result[name] = TimingStats.from_seconds(samples[skip:], samples[:skip])
        return result


@contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, float | None]]:
    """Record the peak allocated device memory (GiB) of the block into the yielded dict."""
    result: dict[str, float | None] = {"peak_gib": None}
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    try:
        yield result
    finally:
        if device.type == "cuda":
            synchronize(device)
            result["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
