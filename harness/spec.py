"""The run specification: everything that determines a run's numbers, and its hash.

A spec is the experiment: the CLI only builds one. Two runs with equal specs are the same run, so
a finished spec is skipped unless forced, and records from the same *cohort* (same model, sampling,
prompts, seeds, device, dtype and weights, any method) are comparable for speedups and fidelity.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from harness.errors import HarnessError, check_number


@dataclass(frozen=True)
class Sampling:
    """Sampler settings. ``height``/``width`` in pixels, ``frames`` in decoded video frames."""

    steps: int
    cfg: float
    shift: float
    height: int
    width: int
    frames: int
    fps: int
    negative_prompt: str = ""

    def validate(self) -> None:
        check_number("steps", self.steps, ge=1)
        check_number("cfg (guidance scale)", self.cfg, ge=1.0, hint="1.0 disables CFG")
        check_number("shift", self.shift, gt=0)
        for name in ("height", "width", "frames", "fps"):
            check_number(name, getattr(self, name), ge=1)


@dataclass(frozen=True)
class RunSpec:
    """One run: a model, a method with its parameters and schedule, sampling, prompts x seeds."""

    model: str
    method: str
    sampling: Sampling
    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    device: str
    dtype: str
    weights: str  # "random", "builtin", a local folder or a hub id
    method_params: dict[str, Any] = field(default_factory=dict)
    dense_warmup_steps: int = 0
    dense_layers: tuple[int, ...] = ()
    checkpoint: str | None = None
    # What the checkpoint holds (a digest of its files' sha256, set by the preflight): it names the run in
    # place of the checkpoint's path, so the same checkpoint anywhere gives the same run id.
    checkpoint_id: str = ""
    eval_suites: tuple[str, ...] = ()
    # Named prompt sets (VBench): the unaugmented prompt of each entry of ``prompts`` (file names and
    # what evaluators score against), the set's name, the protocol, and per-suite options (dimensions).
    prompt_labels: tuple[str, ...] = ()
    prompt_set: str = ""
    protocol: str = ""
    eval_params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.sampling.validate()
        if not self.prompts:
            raise HarnessError("at least one prompt is needed")
        if not self.seeds:
            raise HarnessError("at least one seed is needed")
        if self.prompt_labels and len(self.prompt_labels) != len(self.prompts):
            raise HarnessError(f"{len(self.prompt_labels)} prompt labels for {len(self.prompts)} prompts")

    def label(self, index: int) -> str:
        """The unaugmented prompt that names prompt ``index``'s videos (the prompt itself by default)."""
        return self.prompt_labels[index] if self.prompt_labels else self.prompts[index]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("prompts", "seeds", "dense_layers", "eval_suites", "prompt_labels"):
            data[key] = list(data[key])
        # Fields added later are left out while empty, so earlier specs keep their hashes.
        for key in LATER_FIELDS:
            if not data[key]:
                del data[key]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunSpec:
        data = dict(data)
        data["sampling"] = Sampling(**data["sampling"])
        for key in ("prompts", "seeds", "dense_layers", "eval_suites", "prompt_labels"):
            data[key] = tuple(data.get(key, ()))
        return cls(**data)

    def hash(self) -> str:
        """Stable 12-hex-digit hash of the whole spec; a checkpoint counts by its content once it is known."""
        data = self.to_dict()
        if self.checkpoint_id:
            del data["checkpoint"]
        return _digest(data)

    def cohort(self) -> str:
        """Hash of everything but the method and the scoring: runs of one cohort are directly comparable.

        What is scored afterwards (``eval_suites``, ``eval_params``) does not change the videos, so a run
        scored with fidelity still compares with a dense run scored without it.
        """
        return _digest(self._cohort_fields())

    def cohort_differences(self, other: RunSpec) -> list[str]:
        """The fields (``sampling.steps``, ``seeds``, ...) in which ``other`` falls outside this spec's cohort,
        each with both values where they are short; empty when the two share a cohort."""
        return differing_fields(self._cohort_fields(), other._cohort_fields())

    def _cohort_fields(self) -> dict[str, Any]:
        neutral = replace(self, method="", method_params={}, dense_warmup_steps=0, dense_layers=(), checkpoint=None,
                          checkpoint_id="", eval_suites=(), eval_params={})  # fmt: skip
        return neutral.to_dict()

    @property
    def run_id(self) -> str:
        return f"{self.model}__{self.method}__{self.hash()}"


LATER_FIELDS = ("prompt_labels", "prompt_set", "protocol", "eval_params", "checkpoint_id")


def record_cohort(record: dict[str, Any]) -> str:
    """The cohort of a run record, recomputed from its spec (records written before a change of
    :meth:`RunSpec.cohort` still group correctly)."""
    return RunSpec.from_dict(record["spec"]).cohort()


def differing_fields(ours: dict[str, Any], theirs: dict[str, Any]) -> list[str]:
    """The dotted keys (``sampling.steps``) whose values differ between two nested dicts, each with both values
    (``ours vs theirs``) where they are short; empty when the two are equal."""
    ours, theirs = _flat(ours), _flat(theirs)
    differences = []
    for key in sorted(set(ours) | set(theirs)):
        a, b = ours.get(key), theirs.get(key)
        if a != b:
            shown = f"{a!r} vs {b!r}"
            differences.append(f"{key} ({shown})" if len(shown) <= 60 else key)
    return differences


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one level of dotted keys (``sampling.steps``)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _digest(data: dict[str, Any]) -> str:
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]
