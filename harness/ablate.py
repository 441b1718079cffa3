"""``bench ablate AXIS``: train, sample, score and record every variant of one LinVideo ablation axis.

A variant is a ``LinVideoTrainConfig`` that differs from the default recipe along one axis (the
paper's ablations: alpha range, kernel, objective, layer selection, number of converted layers; and
ours: the optimizer of the scores r).
Each is trained into ``train_dir/AXIS/VARIANT`` from one shared trajectory store, then sampled on the
model's held-out prompts with ``bench run --method linvideo --checkpoint`` and scored; its record
carries the ablation axis, the variant and the training summary. A half-done sweep resumes: training
resumes from its checkpoints and finished runs are skipped.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.errors import HarnessError
from harness.records import write_record

AXES = ("alpha", "kernel", "objective", "selection", "target", "r-optimizer")
ALPHA_RANGES = ((20.0, 2.0), (16.0, 4.0), (24.0, 1.0), (4.0, 4.0))


def _alpha_label(start: float, end: float) -> str:
    return f"fixed {start:g}" if start == end else f"{start:g}->{end:g}"


def variants(axis: str, num_layers: int, target: int) -> dict[str, dict[str, Any]]:
    """The configuration changes of every variant of ``axis`` (label -> changes to the default recipe)."""
    if axis == "alpha":
        return {_alpha_label(a, b): {"alpha_start": a, "alpha_end": b} for a, b in ALPHA_RANGES}
    if axis == "kernel":
        return {kernel: {"kernel": kernel} for kernel in ("hedgehog", "relu", "taylor", "elu")}
    if axis == "objective":
        return {objective: {"objective": objective} for objective in ("adm", "mse", "adm-extra-score")}
    if axis == "selection":
        # manual: the shallow layers after the first (the paper keeps layer 1 softmax), as a fixed rule.
        manual = {"selection": "manual", "layers": tuple(range(1, target + 1))}
        return {"learned": {}, "heuristic": {"selection": "heuristic"}, "manual": manual}
    if axis == "target":
        counts = sorted({max(1, num_layers // 4), num_layers // 2, 3 * num_layers // 4})
        return {str(count): {"target_layers": count} for count in counts}
    if axis == "r-optimizer":
        # Not a paper ablation: the paper does not name r's optimizer; this shows why the default is SGD.
        return {"sgd": {}, "adamw (lr 1e-2)": {"r_optimizer": "adamw", "r_lr": 1e-2}}
    close = difflib.get_close_matches(axis, list(AXES), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise HarnessError(f"unknown ablation axis {axis!r}.{hint} Choose one of: {', '.join(AXES)}")


def _config_hash(config: Any) -> str:
    import hashlib

    canonical = json.dumps(dataclasses.asdict(config), sort_keys=True, default=list)
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def _r_trajectory(log_path: Path, points: int = 200) -> list[dict[str, Any]]:
    """Every layer's r along training, at most ``points`` steps (evenly spaced, the last one kept)."""
    history = json.loads(log_path.read_text())["r"]
    stride = max(1, -(-len(history) // points))
    steps = sorted({*range(0, len(history), stride), len(history) - 1})
    return [{"step": step + 1, "r": history[step]} for step in steps]


@dataclass(frozen=True)
class AblationRequest:
    axis: str
    model: str
    base: Any  # the LinVideoTrainConfig every variant starts from
    runs_dir: Path
    train_dir: Path
    device: str
    prompt_count: int
    show_progress: bool = True


def ablate(request: AblationRequest) -> list[dict[str, Any]]:
    """Run every variant of the axis; returns their records (with ``ablation`` and ``training``)."""
    from harness.generate import prepare, run
    from harness.models.base import MODELS
    from harness.spec import RunSpec
    from harness.training import TrainRequest, train

    adapter_cls = MODELS.get(request.model)
    plan = variants(request.axis, adapter_cls.num_layers, request.base.target_layers)
    configs = {label: dataclasses.replace(request.base, **changes) for label, changes in plan.items()}
    for config in configs.values():
        config.validate(adapter_cls.num_layers)
    weights = "builtin" if adapter_cls.weights_kind == "builtin" else ""
    records = []
    for order, (label, config) in enumerate(configs.items()):
        # Named by the config: a variant shared by two axes (the default recipe) is trained once.
        folder = request.train_dir / f"linvideo-{_config_hash(config)}"
        checkpoint = train(TrainRequest(
            model=request.model, weights=weights, config=config, out=folder, prompts=None,
            prompt_count=request.prompt_count, device=request.device, store=request.train_dir / "trajectories",
            show_progress=request.show_progress,
        ))  # fmt: skip
        spec = RunSpec(model=request.model, method="linvideo", sampling=adapter_cls.defaults,
                       prompts=adapter_cls.default_prompts(), seeds=(0,), device=request.device, dtype="float32",
                       weights=weights,
                       method_params={"kernel": config.kernel}, checkpoint=str(checkpoint),
                       eval_suites=adapter_cls.default_eval)  # fmt: skip
        prepare(spec)
        outcome = run(spec, request.runs_dir, show_progress=request.show_progress)
        if outcome.skipped and "ablation" in outcome.record:
            records.append(outcome.record)
            continue
        summary = json.loads((checkpoint / "spec.json").read_text())
        record = {**outcome.record, "ablation": {"axis": request.axis, "variant": label, "order": order},
                  "training": {key: summary[key] for key in ("linear_layers", "final_r", "steps", "train_seconds",
                                                              "seconds_per_step", "selection")}}  # fmt: skip
        record["training"]["r_per_step"] = _r_trajectory(checkpoint / "training_state.json")
        write_record(outcome.path, record)
        records.append(record)
    return records
