"""A softmax attention method run inside another method: LinVideo's softmax layers, a DMD2 generator's layers.

The outer method names it with a ``method`` parameter and types its parameters (an ``object`` parameter) by the
inner method's own schema, so that a bad inner setting fails as the inner method itself would, naming the outer
parameter. Only softmax methods without state of their own to train qualify: the outer method's checkpoint
holds no state for them.

The outer method's :meth:`~methods.base.AttentionMethod.runs_dense` answers for the calls it hands to the inner
one as the inner one would (its own rules, such as radial's warm-up and dense first layers, included), and the
outer ``run`` passes that decision on to the inner ``run``: the harness's processor decides once per sampler step,
outside the transformer's forward, so that a compiled forward holds no guard on the step (issue 21, item 5).
"""

from __future__ import annotations

from typing import Any

from harness.errors import HarnessError
from methods.base import METHODS, AttentionMethod, Schedule, build_method


def softmax_refusal(name: str) -> str | None:
    """Why method ``name`` cannot run inside another as its softmax attention, or ``None`` when it can."""
    caps = METHODS.get(name).capabilities
    if caps.sparsity == "linear":
        return "runs linear attention, not softmax"
    if caps.needs_training:
        return "needs its own fine-tuned state, which the outer method's checkpoint does not hold"
    return None


def softmax_methods() -> list[str]:
    """Methods another method may run as its softmax attention: dense or sparse, without trained state."""
    return [name for name in METHODS.names() if softmax_refusal(name) is None]


def parse_inner(owner: str, typed: dict[str, Any], method_key: str, params_key: str, role: str) -> dict[str, Any]:
    """``typed`` (the outer method's typed parameters) with ``typed[params_key]`` typed by the schema of the
    method ``typed[method_key]`` names; :class:`HarnessError` naming ``owner`` if that is no softmax method (for
    ``role``: the layers that run it) or the parameters are given without it or do not fit it."""
    name = typed.get(method_key)
    if name is not None and (why := softmax_refusal(name)) is not None:
        raise HarnessError(f"{owner}: {method_key} {name!r} {why}; {role} take one of {', '.join(softmax_methods())}")
    if typed.get(params_key) is not None:
        if name is None:
            raise HarnessError(f"{owner}: {params_key} needs {method_key}, the method they belong to")
        try:
            typed[params_key] = METHODS.get(name).parse_params(typed[params_key])
        except HarnessError as exc:
            raise HarnessError(f"{owner} {params_key}: {exc}") from exc
    return typed


def build_inner(owner: str, name: str, params: dict[str, Any] | None, schedule: Schedule,
                params_key: str) -> AttentionMethod:  # fmt: skip
    """The inner method ``name`` with ``params`` (its defaults where None) under the outer method's schedule;
    ``owner`` names the outer parameter in errors (``linvideo softmax_method``)."""
    try:
        return build_method(name, schedule, **(params or {}))
    except HarnessError as exc:
        raise type(exc)(f"{owner} {name!r} (its parameters go in {params_key}): {exc}") from exc
