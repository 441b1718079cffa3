"""Drivers' child processes end when their driver is killed outright (harness.benchmarks.children)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

DRIVER = """
import sys, time
from harness.benchmarks.children import spawn
child = spawn([sys.executable, "-c", "import time; time.sleep(60)"])
print(child.pid, flush=True)
time.sleep(60)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_child_ends_when_its_driver_is_killed() -> None:
    """kill -9 of the driver: its spawned child receives SIGTERM and is gone within seconds."""
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], stdout=subprocess.PIPE, cwd=Path(__file__).parents[1])
    assert driver.stdout is not None
    child = int(driver.stdout.readline())
    os.kill(child, 0)  # alive while the driver is
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(child, signal.SIGKILL)
    pytest.fail("the child outlived its killed driver")
