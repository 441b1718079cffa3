"""The toy trials driver (harness.benchmarks.linvideo_trials_gpu) deals its child processes over the GPUs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from harness.benchmarks.linvideo_trials_gpu import Job

SHOW_GPU = [sys.executable, "-c", "import os; print(os.environ.get('CUDA_VISIBLE_DEVICES', 'unset'))"]
WAIT = [sys.executable, "-c", "import time; time.sleep(120)"]


def test_each_job_sees_the_gpu_that_runs_the_fewest_jobs(tmp_path: Path) -> None:
    """With GPU 0 busy, the next job sees GPU 1 alone; without GPUs it sees what the driver sees."""
    busy = Job("busy", WAIT, tmp_path / "busy.log")
    jobs = {"busy": busy}
    busy.start(jobs, [0, 1])
    try:
        assert busy.gpu == 0
        for key, gpus, seen in (("next", [0, 1], "1"), ("cpu", [], os.environ.get("CUDA_VISIBLE_DEVICES", "unset"))):
            job = jobs[key] = Job(key, SHOW_GPU, tmp_path / f"{key}.log")
            job.start(jobs, gpus)
            assert job.process is not None and job.process.wait(timeout=60) == 0
            assert job.gpu == (1 if gpus else None)
            assert job.log.with_suffix(".out").read_text().strip() == seen
    finally:
        busy.stop()
