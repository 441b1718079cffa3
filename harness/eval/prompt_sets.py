"""Named prompt sets of VBench and VBench-2.0, read from a prompt folder the user names.

Names: ``vbench:paper8`` (the prompts of the 8 dimensions LinVideo reports), ``vbench:<dimension>``,
``vbench2:<dimension>``. ``augmented="wan"`` swaps in the line-aligned prompts rewritten by Wan 2.1's
prompt extender; each video keeps its *label*, the unaugmented prompt, which names the file and is
what VBench scores against.

The folder (``--prompt-dir`` or ``$BENCH_VBENCH_PROMPTS``) has the layout of the project's shared
data folder::

    vbench1/VBench_full_info.json                       prompt -> dimensions (what VBench evaluates)
    vbench1/all_dimension.txt                           all prompts, one a line
    vbench1/augmented/all_dimension_aug_wanx_seed42.txt line-aligned with all_dimension.txt
    vbench2/prompt/<Dimension>.txt                      VBench-2.0 prompts per dimension
    vbench2/prompt_aug_wanx/<Dimension>.txt             line-aligned with prompt/<Dimension>.txt
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from harness.errors import HarnessError

PROMPT_DIR_ENV = "BENCH_VBENCH_PROMPTS"
AUGMENTATIONS = ("wan",)

#: The 8 dimensions of LinVideo's Table 1, in the paper's column order ("Scene Consistency" is ``scene``).
PAPER8 = (
    "imaging_quality",
    "aesthetic_quality",
    "motion_smoothness",
    "dynamic_degree",
    "background_consistency",
    "subject_consistency",
    "scene",
    "overall_consistency",
)
PAPER_TITLES = {
    "imaging_quality": "Imaging Quality",
    "aesthetic_quality": "Aesthetic Quality",
    "motion_smoothness": "Motion Smoothness",
    "dynamic_degree": "Dynamic Degree",
    "background_consistency": "Background Consistency",
    "subject_consistency": "Subject Consistency",
    "scene": "Scene Consistency",
    "overall_consistency": "Overall Consistency",
}


@dataclass(frozen=True)
class PromptSet:
    """Prompts to generate from, line-aligned with the labels that name and score the videos."""

    name: str  # e.g. "vbench:paper8" or "vbench2:Diversity+wan"
    benchmark: str  # "vbench" or "vbench2"
    dimensions: tuple[str, ...]
    prompts: tuple[str, ...]  # what the model sees (augmented when asked)
    labels: tuple[str, ...]  # the unaugmented prompts: file names and what VBench scores against


def prompt_dir(option: Path | None) -> Path:
    """The prompt folder from ``--prompt-dir`` or ``$BENCH_VBENCH_PROMPTS``; a clear error if neither is usable."""
    chosen = option or (Path(os.environ[PROMPT_DIR_ENV]) if os.environ.get(PROMPT_DIR_ENV) else None)
    if chosen is None:
        raise HarnessError(
            f"VBench prompt sets need the prompt lists: pass --prompt-dir DIR or set ${PROMPT_DIR_ENV} "
            "(a checkout's ../shared/data/vbench has them)"
        )
    chosen = chosen.expanduser()
    if not (chosen / "vbench1" / "VBench_full_info.json").is_file():
        raise HarnessError(f"{chosen} is not a VBench prompt folder: vbench1/VBench_full_info.json is missing")
    return chosen


def is_prompt_set(name: str) -> bool:
    return name.partition(":")[0] in ("vbench", "vbench2") and ":" in name


def load_prompt_set(name: str, folder: Path, augmented: str | None = None) -> PromptSet:
    """Resolve ``vbench:paper8``, ``vbench:<dimension>`` or ``vbench2:<dimension>`` from ``folder``."""
    benchmark, _, which = name.partition(":")
    if augmented is not None and augmented not in AUGMENTATIONS:
        raise HarnessError(f"unknown prompt augmentation {augmented!r}; known: {', '.join(AUGMENTATIONS)}")
    if benchmark == "vbench":
        dimensions = PAPER8 if which == "paper8" else (_known(which, vbench_dimensions(folder), "VBench dimension"),)
        labels = vbench_prompts(folder, dimensions)
        prompts = _vbench_augmented(folder, labels) if augmented else labels
    elif benchmark == "vbench2":
        dimension = _known(which, vbench2_dimensions(folder), "VBench-2.0 dimension")
        dimensions = (dimension,)
        labels = _lines(folder / "vbench2" / "prompt" / f"{dimension}.txt")
        prompts = _aligned(labels, folder / "vbench2" / "prompt_aug_wanx" / f"{dimension}.txt") if augmented else labels
    else:
        raise HarnessError(f"unknown prompt set {name!r}: use vbench:paper8, vbench:<dimension> or vbench2:<dimension>")
    suffix = f"+{augmented}" if augmented else ""
    return PromptSet(f"{benchmark}:{which}{suffix}", benchmark, dimensions, tuple(prompts), tuple(labels))


def vbench_full_info(folder: Path) -> list[dict]:
    """VBench's own prompt -> dimensions list (``VBench_full_info.json``), as its evaluator reads it."""
    return _read_json(folder / "vbench1" / "VBench_full_info.json")


def vbench_dimensions(folder: Path) -> list[str]:
    return sorted({dim for entry in vbench_full_info(folder) for dim in entry["dimension"]})


def vbench2_dimensions(folder: Path) -> list[str]:
    return sorted(p.stem for p in (folder / "vbench2" / "prompt").glob("*.txt"))


def vbench_prompts(folder: Path, dimensions: tuple[str, ...]) -> list[str]:
    """Every prompt VBench evaluates for any of ``dimensions``, once each, in VBench's order."""
    seen: dict[str, None] = {}
    for entry in vbench_full_info(folder):
        if set(entry["dimension"]) & set(dimensions):
            seen.setdefault(entry["prompt_en"])
    return list(seen)


def _vbench_augmented(folder: Path, labels: list[str]) -> list[str]:
    """The Wan-extended prompt of each label: the line of the same number in the augmented list."""
    originals = _lines(folder / "vbench1" / "all_dimension.txt")
    extended = _aligned(originals, folder / "vbench1" / "augmented" / "all_dimension_aug_wanx_seed42.txt")
    first_line = {}
    for original, long in zip(originals, extended, strict=True):
        first_line.setdefault(original, long)
    missing = [label for label in labels if label not in first_line]
    if missing:
        raise HarnessError(f"{len(missing)} prompt(s) have no line in all_dimension.txt, e.g. {missing[0]!r}")
    return [first_line[label] for label in labels]


def _aligned(originals: list[str], path: Path) -> list[str]:
    extended = _lines(path)
    if len(extended) != len(originals):
        raise HarnessError(f"{path} has {len(extended)} prompts but its unaugmented list has {len(originals)}")
    return extended


def _known(name: str, known: list[str], what: str) -> str:
    if name in known:
        return name
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise HarnessError(f"unknown {what} {name!r}.{hint} Known: {', '.join(known)}.")


@cache
def _read_json(path: Path) -> list[dict]:
    if not path.is_file():
        raise HarnessError(f"prompt file {path} is missing")
    return json.loads(path.read_text(encoding="utf-8"))


def _lines(path: Path) -> list[str]:
    """Non-empty lines, stripped (some lists carry trailing spaces VBench's own metadata does not)."""
    if not path.is_file():
        raise HarnessError(f"prompt file {path} is missing")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
