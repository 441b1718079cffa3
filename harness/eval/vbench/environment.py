"""The evaluators' own virtual environments and weight caches: setup, check and pre-flight.

VBench pins ``transformers==4.33.2`` and ``numpy<2``, which the harness's Wan stack cannot share, so
each benchmark gets a dedicated venv under a cache folder the user names (``--cache`` or
``$BENCH_VBENCH_CACHE``)::

    <cache>/venvs/vbench/            the VBench venv (CPython 3.11 or 3.10)
    <cache>/venvs/vbench2/           the VBench-2.0 venv (CPython 3.10)
    <cache>/weights/vbench/          $VBENCH_CACHE_DIR
    <cache>/weights/vbench2/         $VBENCH2_CACHE_DIR
    <cache>/weights/torch/           $TORCH_HOME
    <cache>/weights/huggingface/     $HF_HOME (read offline)

The harness never imports an evaluator; it runs the driver script with the venv's interpreter.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from harness.atomic import write_json_atomic
from harness.errors import HarnessError, MissingWeightsError
from harness.eval.vbench.catalogue import DIMENSIONS, Dimension, WeightFile

CACHE_ENV = "BENCH_VBENCH_CACHE"
DEFAULT_CACHE = Path("~/.cache/attention-bench/vbench")
MARKER = "bench-setup.json"


@dataclass(frozen=True)
class Backend:
    """One evaluator: its package, how its venv is installed, and what pip alone cannot install."""

    name: str
    title: str
    module: str  # what the driver imports
    pythons: tuple[str, ...]  # interpreters tried in order
    requirements: str  # file in harness/eval/vbench/locks/
    pip_args: tuple[str, ...]  # "--no-deps" for a complete lock: no resolver, exactly these versions
    manual_steps: tuple[str, ...] = ()


BACKENDS = {
    "vbench": Backend("vbench", "VBench", "vbench", ("python3.11", "python3.10"), "vbench.txt", ("--no-deps",)),
    "vbench2": Backend(
        "vbench2",
        "VBench-2.0",
        "vbench2",
        ("python3.10", "python3.11"),
        "vbench2.txt",
        (),
        manual_steps=(
            "a CUDA host: VBench-2.0 evaluates on cuda only, one dimension per GPU (7B VLM + 7B LLM in bf16: ~80 GB)",
            "flash-attn 2.7.2.post1 built from source (nvcc and ninja): pip install flash-attn==2.7.2.post1 "
            "--no-build-isolation",
            "mmcv 2.2.0 from the OpenMMLab wheel index (PyPI has only its source), then relax mmcv_maximum_version "
            "in the installed mmdet and mmyolo (Human_Anatomy, Instance_Preservation)",
            "git-pinned LLaVA-NeXT, YOLO-World and CLIP from the VBench repository's VBench-2.0/requirement.txt "
            "(the wheel's metadata drops them)",
            "retinaface_pytorch==0.0.8 --no-deps (Human_Identity)",
            "about 30 GB of checkpoints in the weight folders `bench vbench2 check` lists",
        ),
    ),
}


def backend(name: str) -> Backend:
    try:
        return BACKENDS[name]
    except KeyError:
        raise HarnessError(f"unknown evaluator {name!r}; known: {', '.join(BACKENDS)}") from None


@dataclass(frozen=True)
class Cache:
    """The cache folder: venvs and the weight roots the evaluators read."""

    root: Path

    @classmethod
    def resolve(cls, option: Path | None) -> Cache:
        chosen = option or Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)
        return cls(chosen.expanduser().resolve())

    def venv(self, name: str) -> Path:
        return self.root / "venvs" / name

    def python(self, name: str) -> Path:
        return self.venv(name) / "bin" / "python"

    def weight_root(self, root: str) -> Path:
        folder = {"vbench": "vbench", "vbench2": "vbench2", "torch": "torch", "hf": "huggingface"}[root]
        return self.root / "weights" / folder

    def locate(self, weight: WeightFile) -> Path:
        return self.weight_root(weight.root) / weight.path

    def child_env(self) -> dict[str, str]:
        """Environment of an evaluator process: the weight roots, offline hubs, nothing of this venv."""
        env = isolated_env()
        env.update(
            VBENCH_CACHE_DIR=str(self.weight_root("vbench")),
            VBENCH2_CACHE_DIR=str(self.weight_root("vbench2")),
            TORCH_HOME=str(self.weight_root("torch")),
            HF_HOME=str(self.weight_root("hf")),
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            # The AMT and ViCLIP loaders call torch.load without weights_only (a torch >= 2.6 default change).
            TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1",
        )
        return env


def isolated_env() -> dict[str, str]:
    """This process's environment without what would let the venv see this interpreter's packages."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}


def requirements_path(spec: Backend) -> Path:
    return Path(str(resources.files("harness.eval.vbench") / "locks" / spec.requirements))


def requirements_hash(spec: Backend) -> str:
    return hashlib.sha256(requirements_path(spec).read_bytes()).hexdigest()[:16]


# -- setup ---------------------------------------------------------------------------------------------


Log = Callable[[str], None]


def setup(name: str, cache: Cache, python: str | None = None, log: Log = print) -> dict[str, Any]:
    """Create ``<cache>/venvs/<name>`` and install the pinned evaluator there; returns the setup marker."""
    spec = backend(name)
    interpreter = _interpreter(spec, python)
    venv = cache.venv(name)
    marker = venv / MARKER
    if marker.is_file() and json.loads(marker.read_text()).get("requirements_sha256") == requirements_hash(spec):
        log(f"{spec.title} environment is already set up at {venv}")
        return json.loads(marker.read_text())
    cache.root.mkdir(parents=True, exist_ok=True)
    log_path = cache.root / "venvs" / f"{name}-setup.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    steps = [
        ("create the venv", [interpreter, "-m", "venv", "--clear", str(venv)]),
        ("upgrade pip", [str(cache.python(name)), "-m", "pip", "install", "-q", "--upgrade", "pip"]),
        (
            "install the pinned packages (minutes: torch alone is ~3 GB)",
            [str(cache.python(name)), "-m", "pip", "install", "-q", *spec.pip_args, "-r", str(requirements_path(spec))],
        ),
    ]
    with log_path.open("w") as handle:
        for what, command in steps:
            log(f"{spec.title}: {what}")
            handle.write(f"$ {' '.join(command)}\n")
            handle.flush()
            done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=isolated_env(), check=False)
            if done.returncode != 0:
                raise HarnessError(f"{spec.title} setup failed to {what} (exit {done.returncode}); see {log_path}")
    versions = installed_versions(cache, spec)
    record = {
        "backend": name,
        "venv": str(venv),
        "python": versions.pop("python"),
        "requirements": spec.requirements,
        "requirements_sha256": requirements_hash(spec),
        "versions": versions,
        "manual_steps": list(spec.manual_steps),
    }
    write_json_atomic(marker, record)
    return record


def _interpreter(spec: Backend, python: str | None) -> str:
    """The first candidate on PATH that actually starts (a pyenv shim of a version not selected does not)."""
    candidates = (python,) if python else spec.pythons
    for candidate in candidates:
        found = shutil.which(candidate) if candidate else None
        if found and _starts(found):
            return found
    raise HarnessError(
        f"{spec.title} needs one of {', '.join(candidates)} (its pins have no wheels for newer CPython); "
        "install one or pass --python PATH"
    )


def _starts(interpreter: str) -> bool:
    try:
        probe = subprocess.run([interpreter, "-c", "import venv"], capture_output=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


def installed_versions(cache: Cache, spec: Backend) -> dict[str, str | None]:
    """Python and key package versions inside the evaluator venv (read by its own interpreter)."""
    probe = (
        "import json, platform, importlib.metadata as m\n"
        "def v(n):\n"
        "    try: return m.version(n)\n"
        "    except m.PackageNotFoundError: return None\n"
        f"print(json.dumps({{'python': platform.python_version(), **{{n: v(n) for n in {_KEY_PACKAGES!r}}}}}))"
    )
    done = subprocess.run(
        [str(cache.python(spec.name)), "-c", probe], capture_output=True, text=True, env=isolated_env(), check=False
    )
    if done.returncode != 0:
        raise HarnessError(f"the {spec.title} venv at {cache.venv(spec.name)} is broken: {done.stderr.strip()[-300:]}")
    return json.loads(done.stdout)


_KEY_PACKAGES = ("vbench", "vbench2", "torch", "torchvision", "transformers", "numpy", "opencv-python-headless")


# -- check and pre-flight ------------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightStatus:
    dimension: str
    file: WeightFile
    location: Path
    present: bool


def environment_status(name: str, cache: Cache) -> dict[str, Any]:
    """Whether the venv is set up with the current pins (no evaluator import: fast)."""
    spec = backend(name)
    marker = cache.venv(name) / MARKER
    if not cache.python(name).exists() or not marker.is_file():
        return {"ready": False, "venv": str(cache.venv(name)), "reason": "not set up"}
    record = json.loads(marker.read_text())
    if record.get("requirements_sha256") != requirements_hash(spec):
        return {"ready": False, "venv": str(cache.venv(name)), "reason": "set up with older pins", **record}
    return {"ready": True, **record}


def weight_status(name: str, cache: Cache, dimensions: tuple[str, ...] | None = None) -> list[WeightStatus]:
    """Every weight file of ``dimensions`` (default: all) with its location and whether it is there."""
    registry = DIMENSIONS[name]
    chosen = [registry.get(d) for d in dimensions] if dimensions is not None else [registry.get(d) for d in registry]
    rows = []
    for dim in chosen:
        for weight in dim.weights:
            location = cache.locate(weight)
            present = location.is_dir() if weight.folder else location.is_file()
            rows.append(WeightStatus(dim.name, weight, location, present))
    return rows


def missing_packages(name: str, cache: Cache, dimensions: tuple[str, ...]) -> dict[str, list[str]]:
    """Modules a dimension imports that pip could not install from the pins (detectron2, mmcv, ...)."""
    needed = {d: list(DIMENSIONS[name].get(d).packages) for d in dimensions}
    modules = sorted({m for names in needed.values() for m in names})
    if not modules or not cache.python(name).exists():
        return {d: names for d, names in needed.items() if names} if modules else {}
    probe = (
        "import importlib.util, json\n"
        f"print(json.dumps([m for m in {modules!r} if importlib.util.find_spec(m) is None]))"
    )
    done = subprocess.run(
        [str(cache.python(name)), "-c", probe], capture_output=True, text=True, env=isolated_env(), check=False
    )
    absent = set(json.loads(done.stdout)) if done.returncode == 0 else set(modules)
    return {d: [m for m in names if m in absent] for d, names in needed.items() if absent.intersection(names)}


def preflight(name: str, cache: Cache, dimensions: tuple[str, ...]) -> list[Dimension]:
    """Fail before any work if the venv is not set up or any weight of ``dimensions`` is missing."""
    spec = backend(name)
    chosen = [DIMENSIONS[name].get(d) for d in dimensions]
    status = environment_status(name, cache)
    if not status["ready"]:
        raise HarnessError(
            f"the {spec.title} environment is {status['reason']} at {status['venv']}: "
            f"run `bench {name} setup --cache {cache.root}`"
        )
    missing = [row for row in weight_status(name, cache, dimensions) if not row.present]
    if missing:
        lines = "; ".join(
            f"{row.dimension} needs {row.location}{'/' if row.file.folder else ''} (from {row.file.source})"
            for row in missing
        )
        raise MissingWeightsError(
            f"{len(missing)} {spec.title} weight file(s) missing (nothing is downloaded; put each where named): {lines}"
        )
    absent = missing_packages(name, cache, dimensions)
    if absent:
        lines = "; ".join(f"{dim} imports {', '.join(modules)}" for dim, modules in absent.items())
        raise HarnessError(f"modules missing from the {spec.title} venv {cache.venv(name)}: {lines}")
    return chosen
