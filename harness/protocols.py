"""Named evaluation protocols: the prompts, videos per prompt, sampling and suite a paper used.

``linvideo-vbench``: LinVideo's Table 1. The 8 dimensions' prompts (``vbench:paper8``, 251 unique
prompts), unaugmented, 5 videos per prompt, 50 steps, CFG 5.0, 480x832 x 81 frames written at 16 fps,
scored by VBench (aggregate x 100).
``linvideo-vbench2``: every VBench-2.0 dimension from Wan's augmented prompts, 3 videos per prompt
and 20 for Diversity, one run per dimension (VBench-2.0 reads one folder per dimension).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from harness.errors import HarnessError
from harness.eval.prompt_sets import PromptSet, load_prompt_set, prompt_dir, vbench2_dimensions
from harness.registry import Registry
from harness.spec import RunSpec


@dataclass(frozen=True)
class Protocol:
    name: str
    description: str
    prompt_sets: tuple[str, ...]  # "vbench2:*" stands for every VBench-2.0 dimension
    augmented: str | None
    videos_per_prompt: int
    suite: str
    sampling: dict[str, float | int]  # the Sampling fields the protocol fixes
    videos_per_prompt_by_dimension: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class ProtocolRun:
    """One run of a protocol: a prompt set and its seeds (video i of a prompt is seed i)."""

    prompt_set: PromptSet
    seeds: tuple[int, ...]


WAN_480P = {"steps": 50, "cfg": 5.0, "height": 480, "width": 832, "frames": 81, "fps": 16}

PROTOCOLS: Registry[Protocol] = Registry("protocol")
PROTOCOLS.add(
    "linvideo-vbench",
    Protocol(
        "linvideo-vbench",
        "LinVideo Table 1: 8 VBench dimensions, 5 videos per unaugmented prompt",
        ("vbench:paper8",),
        None,
        5,
        "vbench",
        WAN_480P,
    ),
)
PROTOCOLS.add(
    "linvideo-vbench2",
    Protocol(
        "linvideo-vbench2",
        "LinVideo VBench-2.0: Wan-augmented prompts, 3 videos each (20 for Diversity)",
        ("vbench2:*",),
        "wan",
        3,
        "vbench2",
        WAN_480P,
        {"Diversity": 20},
    ),
)


def protocol_runs(protocol: Protocol, folder: Path) -> list[ProtocolRun]:
    """The runs a protocol asks for, with their prompts read from ``folder``."""
    runs = []
    for name in protocol.prompt_sets:
        benchmark, _, which = name.partition(":")
        names = [f"{benchmark}:{dim}" for dim in vbench2_dimensions(folder)] if which == "*" else [name]
        for set_name in names:
            prompt_set = load_prompt_set(set_name, folder, protocol.augmented)
            count = protocol.videos_per_prompt_by_dimension.get(prompt_set.dimensions[0], protocol.videos_per_prompt)
            runs.append(ProtocolRun(prompt_set, tuple(range(count))))
    return runs


def named_prompt_specs(
    base: RunSpec,
    protocol: Protocol | None,
    prompt_set: str | None,
    augmented: str | None,
    prompt_folder: Path | None,
    seeds_given: bool,
) -> list[RunSpec]:
    """``base`` as the protocol's runs, or with a named prompt set, or unchanged when neither is asked for."""
    if protocol is not None:
        if prompt_set or seeds_given or augmented:
            raise HarnessError(
                f"--protocol {protocol.name} fixes the prompts and seeds: drop --prompt-set, --seeds and --augmented"
            )
        runs = protocol_runs(protocol, prompt_dir(prompt_folder))
        return [_with_prompts(replace(base, protocol=protocol.name, seeds=r.seeds), r.prompt_set) for r in runs]
    if prompt_set:
        return [_with_prompts(base, load_prompt_set(prompt_set, prompt_dir(prompt_folder), augmented))]
    if augmented:
        raise HarnessError("--augmented takes the extended prompts of a named set: add --prompt-set or --protocol")
    return [base]


def _with_prompts(spec: RunSpec, prompts: PromptSet) -> RunSpec:
    labels = prompts.labels if prompts.labels != prompts.prompts else ()
    return replace(spec, prompts=prompts.prompts, prompt_labels=labels, prompt_set=prompts.name)
