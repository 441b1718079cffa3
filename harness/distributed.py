"""Ranks under torchrun: which share of the videos this process makes, and the barrier that joins the shares.

Outside torchrun (no ``WORLD_SIZE``, or 1) everything here is a no-op, so single-process code paths stay as
they are. Under ``torchrun --nproc-per-node N -m harness.cli run ...`` every rank validates the same spec,
takes every N-th (prompt, seed) pair, writes its own videos and a JSON summary of its share, and rank 0
(the lead) joins the shares into the one run record. The shares meet through files in the run's folder,
not through pickled objects: the only collective is a barrier.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch

from harness.errors import HarnessError

T = TypeVar("T")

# Generation of a rank's share can take hours on Wan; the barrier must outwait the slowest rank.
BARRIER_TIMEOUT = timedelta(hours=24)


@dataclass(frozen=True)
class Ranks:
    """This process's place among the torchrun ranks (rank 0 of 1 outside torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def lead(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.world_size > 1

    def share(self, items: Sequence[T]) -> list[T]:
        """This rank's items: every ``world_size``-th, starting at ``rank`` (balanced to within one item)."""
        return list(items[self.rank :: self.world_size])


def current_ranks() -> Ranks:
    """Read torchrun's ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; raises on inconsistent values."""
    try:
        ranks = Ranks(
            rank=int(os.environ.get("RANK", "0")),
            world_size=int(os.environ.get("WORLD_SIZE", "1")),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        )
    except ValueError as exc:
        raise HarnessError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers ({exc})") from None
    if ranks.world_size < 1 or not 0 <= ranks.rank < ranks.world_size or ranks.local_rank < 0:
        raise HarnessError(f"inconsistent torchrun environment: RANK {ranks.rank}, WORLD_SIZE {ranks.world_size}")
    return ranks


def rank_device(device: torch.device, ranks: Ranks) -> torch.device:
    """The indexed device this process computes on: under torchrun a bare ``cuda`` means this rank's own GPU
    (``cuda:LOCAL_RANK``), in one process the current GPU (``cuda:0`` unless set otherwise). Every CUDA device
    leaves here with an index, since NCCL's ``init_process_group(device_id=...)`` refuses one without."""
    if device.type != "cuda" or device.index is not None:
        return device
    if not ranks.sharded:
        return torch.device("cuda", torch.cuda.current_device())
    if ranks.local_rank >= torch.cuda.device_count():
        raise HarnessError(
            f"LOCAL_RANK {ranks.local_rank} but only {torch.cuda.device_count()} GPU(s): "
            "start at most one process per GPU (torchrun --nproc-per-node)"
        )
    return torch.device("cuda", ranks.local_rank)


def visible_gpus(device: str) -> list[int]:
    """The GPUs that independent jobs on ``device`` are spread over: every visible one for a bare ``cuda`` (or
    ``auto`` where CUDA is available), none for ``cpu`` or a named ``cuda:N``, which keep every job on it."""
    if device not in ("cuda", "auto") or not torch.cuda.is_available():
        return []
    return list(range(torch.cuda.device_count()))


def child_visible_devices(ordinal: int) -> str:
    """``CUDA_VISIBLE_DEVICES`` for a child process that must see this process's GPU ``ordinal`` alone.

    Ordinals count the GPUs this process sees, so under ``CUDA_VISIBLE_DEVICES=1`` ordinal 0 is physical GPU 1: the
    child gets the parent's own entry (an index or a UUID), not the ordinal, which it would read as physical GPU 0.

    Raises:
        HarnessError: ``ordinal`` is beyond the parent's ``CUDA_VISIBLE_DEVICES`` list.
    """
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return str(ordinal)
    entries = [entry.strip() for entry in listed.split(",") if entry.strip()]
    if not 0 <= ordinal < len(entries):
        raise HarnessError(f"GPU ordinal {ordinal} is not among CUDA_VISIBLE_DEVICES={listed!r}")
    return entries[ordinal]


def use_device(device: torch.device) -> None:
    """Make an indexed CUDA device (``cuda:1``) this process's current one; others change nothing.

    Much follows the current device rather than a tensor's: Triton's launches, a CUDA event recorded without a
    stream (the timers'), the allocations of libraries given no device. A run on ``cuda:1`` with ``cuda:0`` current
    timed the wrong GPU's stream, and its Triton kernels failed."""
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)


@contextmanager
def rank_group(ranks: Ranks, device: torch.device) -> Iterator[None]:
    """The process group of a sharded run (NCCL on GPUs, Gloo on CPU); nothing outside torchrun. Either way
    ``device`` becomes the current one (:func:`use_device`).

    A group that already exists (a caller's) is used as it is and left open.
    """
    import torch.distributed as dist

    use_device(device)
    if not ranks.sharded or dist.is_initialized():
        yield
        return
    dist.init_process_group(
        backend="nccl" if device.type == "cuda" else "gloo",
        timeout=BARRIER_TIMEOUT,
        **({"device_id": device} if device.type == "cuda" else {}),
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def barrier(ranks: Ranks) -> None:
    """Wait for every rank (a no-op outside torchrun)."""
    if ranks.sharded:
        import torch.distributed as dist

        dist.barrier()
