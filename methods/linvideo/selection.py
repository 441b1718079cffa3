"""Which layers to convert: learned (selective transfer), manual (a given list) or heuristic (greedy).

The baselines fix the layer set before fine-tuning, so that an ablation differs only in how the layers
were chosen: the same objective then trains the same feature maps and weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from harness.errors import HarnessError

SELECTIONS = ("learned", "manual", "heuristic")


def check_manual_layers(layers: tuple[int, ...], target: int, num_layers: int) -> None:
    """A manual selection names exactly ``target`` distinct layers of the model."""
    if len(set(layers)) != len(layers) or any(not 0 <= layer < num_layers for layer in layers):
        raise HarnessError(f"manual layers must be distinct indices in 0..{num_layers - 1}, got {list(layers)}")
    if len(layers) != target:
        raise HarnessError(f"manual selection names {len(layers)} layers but the target is {target}")


def greedy_selection(output_with: Callable[[tuple[int, ...]], torch.Tensor], reference: torch.Tensor,
                     num_layers: int, target: int) -> tuple[tuple[int, ...], list[dict[str, float]]]:  # fmt: skip
    """Greedy heuristic: repeatedly linearise the layer whose replacement changes the output least.

    ``output_with(layers)`` is the model output with ``layers`` linear (the rest softmax) on a fixed
    prompt set; the change is ``||out - reference|| / ||reference||``. Returns the chosen layers in
    the order chosen and, per round, each candidate's change.
    """
    chosen: list[int] = []
    rounds: list[dict[str, float]] = []
    norm = reference.double().norm()
    for _ in range(target):
        changes = {
            layer: float((output_with((*chosen, layer)).double() - reference.double()).norm() / norm)
            for layer in range(num_layers)
            if layer not in chosen
        }
        rounds.append({str(layer): change for layer, change in changes.items()})
        chosen.append(min(changes, key=changes.__getitem__))
    return tuple(chosen), rounds
