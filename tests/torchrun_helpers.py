"""Running ``bench`` under torchrun with 2 gloo ranks in tests: a run to its end, and one killed mid-way."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from harness.benchmarks.children import child_pids, process_fields


def torchrun(args: list[object]) -> list[str]:
    """The command line of ``torchrun --nproc-per-node 2 -m harness.cli ARGS`` (this Python, standalone)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "harness.cli",
            *map(str, args)]  # fmt: skip


def environment() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


def run_two_ranks(args: list[object]) -> None:
    """``bench ARGS`` on 2 ranks to its end; fails the test with the output's tail on a non-zero exit."""
    done = subprocess.run(torchrun(args), env=environment(), capture_output=True, text=True, timeout=600,
                          check=False)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def _state(pid: int) -> str:
    try:
        return process_fields(pid)[0]
    except OSError:
        return "gone"


def kill_after_first_checkpoint(args: list[object], out: Path, steps: int) -> None:
    """Start ``bench ARGS`` (writing into ``out``) on 2 ranks and SIGKILL torchrun and both ranks once its first
    checkpoint is committed; asserts it was killed mid-way (a checkpoint, not finished)."""
    process = subprocess.Popen(torchrun(args), env=environment(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)  # fmt: skip
    meta, deadline = out / "training_state.json", time.monotonic() + 240
    try:
        while not meta.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        ranks = child_pids(process.pid)  # torchrun starts its workers in sessions of their own
        for pid in [process.pid, *ranks]:
            os.kill(pid, signal.SIGKILL)
        process.wait()
        while any(Path(f"/proc/{pid}").exists() and _state(pid) != "Z" for pid in ranks):
            time.sleep(0.05)
    assert len(ranks) == 2, ranks
    state = json.loads(meta.read_text())
    assert 1 <= state["step"] < steps and not state.get("finished"), "killed mid-way"
