"""Capture the environment a number was measured in: device, library versions, git commit."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from methods.kernels import kernel_settings

REPO_ROOT = Path(__file__).resolve().parent.parent


def _package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def capture_environment(device: torch.device) -> dict[str, Any]:
    """Everything needed to reproduce or compare a number: hardware, software, code version."""
    # Dirty means the code differs from its commit: committed results under reports/ are not code (a GPU call
    # moves them out of the tree to fit the transfer limit).
    status = _git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)reports")
    return {
        "device": device.type,
        "device_name": device_name(device),
        "device_count": torch.cuda.device_count() if device.type == "cuda" else 1,
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "diffusers": _package_version("diffusers"),
        "transformers": _package_version("transformers"),
        "flash_attn": _package_version("flash-attn"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        # A copy of the tree run elsewhere may have no .git, or a stale one: the caller's commit, when given, wins.
        "git_commit": os.environ.get("BENCH_GIT_COMMIT") or _git("rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
        # Which kernel ran (BENCH_LINEAR_BACKEND=torch, BENCH_KMEANS_UPDATE=sorted, ...) changes what a number measured.
        "kernel_choices": kernel_settings(),
    }


def kernel_choice_changes(recorded: dict[str, Any], variables: tuple[str, ...]) -> list[str]:
    """Each of ``variables`` (the kernel choices a method reads) that a record's environment names with another
    value than the one in force now, as ``VARIABLE=recorded (now current)``; empty for a record made before
    records carried them."""
    before, now = recorded.get("kernel_choices") or {}, kernel_settings()
    return [f"{variable}={before[variable]} (now {now[variable]})" for variable in variables
            if variable in before and variable in now and now[variable] != before[variable]]  # fmt: skip
