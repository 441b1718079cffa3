"""Host time of one fused linear attention call, measured without a GPU: where its Python path goes.

An eager forward of the fused kernel on an H200 is host-bound (reports/gpu/h200/linear_triton_v2: hedgehog 0.44 ms
per call against 0.35 ms of kernels). This script runs the whole host path of
``feature_linear_attention(q, k, v, q_map, k_map)`` on CPU tensors, with Triton's launches reduced to no-ops as
low as its Python goes: a stand-in driver (a CUDA sm_90 target, device 0, stream 0) and a stand-in for compiling
whose "kernel" records the launch and returns. So the dispatcher, the op, the autotuners and Triton's own launch
path (argument binding and specialisation, the kernel cache key) run as on the GPU; left out are the C launcher
(argument packing, ``cuLaunchKernelEx``), CUDA's allocator (here glibc's, kept off ``mmap`` so that a large
``torch.empty`` costs what a cached CUDA block does) and all device work. The device checks route CPU tensors to the
kernel and the chunking models ``--sms`` multiprocessors (the H200's 132), so the launches are the GPU's.

Per feature map it reports the microseconds of one call (median over rounds) in three modes: ``dispatch`` (the
GPU benchmark's forward: ``feature_linear_attention`` under ``torch.no_grad``), ``grad`` (the same recording the
backward, as training does) and ``op`` (the ``attention_bench::linear_attention_forward`` op called under no_grad:
what a compiled graph runs), the launches per call, and a cProfile table of the ``dispatch`` mode.

    PYTHONPATH=.:<triton site> python -m harness.benchmarks.linear_host_profile [--kinds hedgehog] [--out DIR]

Needs Triton (no GPU); refuses ``TRITON_INTERPRET=1``, whose configuration lists are not the GPU's.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import ctypes
import ctypes.util
import io
import pstats
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import torch

from harness.atomic import write_json_atomic
from harness.errors import HarnessError
from methods.kernels import linear_attention_triton as fused
from methods.kernels.linear_attention import build_feature_map, check_kernel, feature_linear_attention
from methods.kernels.tuned_launch import forget_choices

H200_SMS = 132
WAN_1_3B_SHAPE = (1, 12, 32760, 128)  # one self-attention call at 480p, batch 1 (B, H, N, D)
MODES = ("dispatch", "grad", "op")
# glibc's mallopt parameters: no mmap for large blocks, and never trim the heap: freed blocks are reused as CUDA's
# caching allocator reuses its blocks (an mmap'd 100 MB torch.empty costs ~14 us on CPU, a cached one ~2 us).
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4


class _StandInDriver:
    """What Triton's launch path asks its driver for: a CUDA sm_90 target, device 0, stream 0."""

    def get_current_target(self) -> Any:
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int) -> int:
        return 0


class _RecordingKernel:
    """A compiled kernel's launch interface (``launch_metadata``, ``run``) that records each launch's name."""

    function = packed_metadata = None

    def __init__(self, name: str, launches: list[str]) -> None:
        self.name, self.launches = name, launches

    def launch_metadata(self, grid: Any, stream: int, *args: Any) -> None:
        return None

    def run(self, *args: Any) -> None:
        self.launches.append(self.name)


def _heap_allocations() -> bool:
    """Keep large CPU allocations on glibc's heap (see M_MMAP_MAX); False where the C library is not glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**30))
    except (OSError, AttributeError):
        return False


@contextlib.contextmanager
def stubbed_launches(sms: int) -> Iterator[list[str]]:
    """Triton's launches recorded instead of compiled and run (names appended to the yielded list), CPU tensors
    routed to the fused kernel, the chunking of a GPU with ``sms`` multiprocessors, and an autotuner that takes each
    list's first configuration without timing; everything restored (and the stand-in kernels dropped) on exit."""
    from triton.runtime import driver
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    launches: list[str] = []
    compiled: list[Any] = []

    def compile_stand_in(self: Any, key: Any, signature: Any, device: int, *args: Any) -> _RecordingKernel:
        kernel = _RecordingKernel(self.fn.__name__, launches)
        self.device_caches[device][0][key] = kernel
        compiled.append(self)
        return kernel

    def first_config(self: Any, *args: Any, config: Any, **kwargs: Any) -> float:
        return float(self.configs.index(config))

    previous_driver = driver._active  # Triton's driver config has no getter that leaves an unset driver unset
    driver.set_active(_StandInDriver())
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(mock.patch.object(JITFunction, "_do_compile", compile_stand_in))
            stack.enter_context(mock.patch.object(Autotuner, "_bench", first_config))
            stack.enter_context(mock.patch.object(fused, "_slots", lambda device: fused.SLOTS_PER_SM * sms))
            stack.enter_context(mock.patch.object(fused.unsupported_reason, "__kwdefaults__", {"device_type": "cpu"}))
            yield launches
    finally:
        driver.set_active(previous_driver)
        for function in compiled:
            function.device_caches.clear()
        for name in ("_gram_partials", "_output", "_query_grads", "_key_grads", "_project_grads"):
            getattr(fused, name).cache.clear()
        forget_choices()


def _inputs(kind: str, shape: tuple[int, int, int, int]) -> tuple[Callable[[str], Any], list[torch.Tensor]]:
    """A call for each mode on random bf16 CPU q, k, v (views of (B, N, H, D) projections, requiring grad, as the
    GPU benchmark's) and trainable maps; and the leaves."""
    batch, heads, tokens, dim = shape
    q, k, v = (torch.randn(batch, tokens, heads, dim, dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
               for _ in range(3))  # fmt: skip
    q_map, k_map = (build_feature_map(kind, heads, dim, trainable=True) for _ in range(2))
    weights = getattr(q_map, "weight", None), getattr(k_map, "weight", None)

    def call(mode: str) -> Any:
        if mode == "op":
            with torch.no_grad():
                return fused.linear_attention_forward(q, k, v, *weights, kind, 1e-6)
        with torch.set_grad_enabled(mode == "grad"):
            return feature_linear_attention(q, k, v, q_map, k_map)

    return call, [q, k, v]


def per_call_us(fn: Callable[[], Any], calls: int, rounds: int) -> float:
    """Median over ``rounds`` of the mean microseconds of one of ``calls`` back-to-back calls (after a warm-up)."""
    for _ in range(max(10, calls // 10)):
        fn()
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(samples)


def profile_table(fn: Callable[[], Any], calls: int, top: int) -> tuple[str, list[dict[str, Any]]]:
    """cProfile of ``calls`` calls: the ``top`` functions by own time as pstats text, and as rows of per-call
    counts and microseconds (own and cumulative; cProfile's overhead included)."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    stats = pstats.Stats(profiler, stream=(text := io.StringIO())).sort_stats("tottime")
    stats.print_stats(top)
    rows = []
    for (path, line, name), (_, ncalls, tottime, cumtime, _) in sorted(
        stats.stats.items(), key=lambda item: -item[1][2]
    )[:top]:  # type: ignore[attr-defined]
        rows.append({"function": f"{Path(path).name}:{line}({name})", "calls_per_call": ncalls / calls,
                     "own_us": tottime / calls * 1e6, "cumulative_us": cumtime / calls * 1e6})  # fmt: skip
    return text.getvalue(), rows


def profile_kind(kind: str, shape: tuple[int, int, int, int], sms: int, calls: int, rounds: int,
                 top: int) -> dict[str, Any]:  # fmt: skip
    """Per-call microseconds and launches of each mode, and the cProfile rows of ``dispatch``, for one map."""
    call, _ = _inputs(kind, shape)
    row: dict[str, Any] = {"kind": kind}
    with stubbed_launches(sms) as launches:
        for mode in MODES:
            call(mode)  # first call: the autotuners choose, Triton binds ("compiles")
            launches.clear()
            row[f"{mode}_us"] = per_call_us(lambda m=mode: call(m), calls, rounds)
            row[f"{mode}_launches"] = sorted(set(launches))
            row[f"{mode}_launches_per_call"] = len(launches) / (max(10, calls // 10) + calls * rounds)
        row["profile_text"], row["profile"] = profile_table(lambda: call("dispatch"), calls, top)
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", default=",".join(fused.FUSED_KERNELS), help="comma-separated feature maps")
    parser.add_argument("--shape", default=",".join(map(str, WAN_1_3B_SHAPE)),
                        help="B,H,N,D of q, k and v (default: Wan 1.3B 480p)")  # fmt: skip
    parser.add_argument("--sms", type=int, default=H200_SMS, help="multiprocessors the chunking models (H200: 132)")
    parser.add_argument("--calls", type=int, default=1000, help="calls per timed round")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (the median is reported)")
    parser.add_argument("--top", type=int, default=20, help="functions in the cProfile table")
    parser.add_argument("--out", type=Path, help="folder for linear_host_profile.json")
    args = parser.parse_args(argv)
    if fused.triton is None:
        raise HarnessError("the host profile runs Triton's launch path: install triton (no GPU needed)")
    if fused.INTERPRETED:
        raise HarnessError("unset TRITON_INTERPRET: the interpreter's configuration lists are not the GPU's")
    shape = tuple(int(part) for part in args.shape.split(","))
    if len(shape) != 4:
        raise HarnessError(f"--shape needs B,H,N,D, got {args.shape!r}")
    kinds = [check_kernel(kind, fused.FUSED_KERNELS) for kind in args.kinds.split(",")]
    heap = _heap_allocations()
    torch.set_num_threads(1)
    rows = []
    for kind in kinds:
        row = profile_kind(kind, shape, args.sms, args.calls, args.rounds, args.top)  # type: ignore[arg-type]
        print(f"== {kind}: cProfile of the dispatch mode, per {args.calls} calls\n{row.pop('profile_text')}")
        rows.append(row)
    print(f"host us per call, shape {shape}, {args.sms} SMs, Triton's launches as no-ops"
          f"{'' if heap else ' (large CPU allocations mmap-ed: glibc not found)'}")  # fmt: skip
    print(f"{'kind':10s}" + "".join(f"{mode:>10s}" for mode in MODES) + "  launches (dispatch)")
    for row in rows:
        print(f"{row['kind']:10s}" + "".join(f"{row[f'{mode}_us']:10.1f}" for mode in MODES)
              + f"  {row['dispatch_launches_per_call']:.0f}: {', '.join(row['dispatch_launches'])}")  # fmt: skip
    if args.out is not None:
        record = {"shape": list(shape), "sms": args.sms, "heap_allocations": heap, "torch": torch.__version__,
                  "triton": fused.triton.__version__, "rows": rows}  # fmt: skip
        write_json_atomic(args.out / "linear_host_profile.json", record)


if __name__ == "__main__":
    main()
