"""Child processes of the drivers that run several trainings at once: they die with their driver.

A driver killed outright (the kernel's OOM killer, ``kill -9``, a device call's time limit) cannot stop its
children, and orphaned trainings keep the memory and the GPU that a rerun of the driver needs (a CPU dry run of
``linvideo_trials_gpu`` left 12 trainings holding 22 GiB after its driver was killed). On Linux each child asks
the kernel for SIGTERM when its parent exits (``PR_SET_PDEATHSIG``); elsewhere it is an ordinary child.
"""

from __future__ import annotations

import ctypes
import signal
import subprocess
import sys
from pathlib import Path
from typing import IO, Any

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def spawn(command: list[str], stdout: IO[Any] | int | None = None, stderr: IO[Any] | int | None = None,
          env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:  # fmt: skip
    """``subprocess.Popen(command, ...)`` (an argument list, no shell) whose process ends when the caller's does."""
    preexec = _die_with_parent if sys.platform.startswith("linux") else None
    return subprocess.Popen(command, stdout=stdout, stderr=stderr, env=env, preexec_fn=preexec)


def process_fields(pid: int) -> list[str]:
    """Fields of ``/proc/PID/stat`` after the command name (state, parent PID, ...); OSError once it is gone."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def child_pids(parent: int) -> list[int]:
    """PIDs of ``parent``'s children (torchrun's workers), from /proc (Linux)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int(process_fields(int(entry.name))[1]) == parent:
                    found.append(int(entry.name))
            except OSError:
                continue
    return found
