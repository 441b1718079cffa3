"""The host profile of the fused linear attention runs Triton's launch path without a GPU and counts the launches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from methods.kernels import linear_attention_triton as fused

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(fused.triton is None, reason="needs triton (no GPU)")
def test_profile_counts_the_gpu_launches_of_each_mode(tmp_path: Path) -> None:
    """At 132 SMs a short sequence is cut into several chunks: state partials, their sum and the output, in every
    mode, with Triton's launch path run (not the interpreter's) and the call's host time recorded."""
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "harness.benchmarks.linear_host_profile", "--kinds", "relu", "--shape",
               "1,2,300,32", "--calls", "5", "--rounds", "1", "--top", "3", "--out", str(tmp_path)]  # fmt: skip
    subprocess.run(command, cwd=ROOT, env=env, check=True, capture_output=True, timeout=120)
    (row,) = json.loads((tmp_path / "linear_host_profile.json").read_text())["rows"]
    for mode in ("dispatch", "grad", "op"):
        assert row[f"{mode}_launches"] == ["_gram_partials", "_output", "_sum_groups"] and row[f"{mode}_us"] > 0
        assert row[f"{mode}_launches_per_call"] == 3
    assert len(row["profile"]) == 3
