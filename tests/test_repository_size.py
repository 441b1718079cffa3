"""A clone stays light: no tracked file over 1 MB outside the package's shipped assets (reports/README.md)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIMIT_BYTES = 1_000_000
ASSETS = "harness/toyworld/assets/"  # the toy teacher and the default LinVideo conversion ship with the package


def test_no_tracked_file_over_1_mb_outside_the_assets() -> None:
    """Frames, checkpoints and large logs are regenerated, not committed; records and tables are small."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=ROOT, capture_output=True, text=True, check=False)
    if top.returncode != 0 or Path(top.stdout.strip()).resolve() != ROOT:
        pytest.skip("not a git checkout of this project")
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
    sizes = {name: (ROOT / name).stat().st_size for name in listed.stdout.decode().split("\0")
             if name and not name.startswith(ASSETS) and (ROOT / name).is_file()}  # fmt: skip
    assert sizes, "git ls-files listed nothing"
    large = {name: size for name, size in sizes.items() if size > LIMIT_BYTES}
    assert not large, f"tracked files over 1 MB outside {ASSETS}: {large}"
