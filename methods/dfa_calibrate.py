"""DiTFastAttn's plan search: per step, per layer, the most aggressive substitute under an error bound.

The teacher samples the calibration prompts with the plan found so far. Before each step's forward
passes (step 0 is always full), the search first records the transformer's outputs (both CFG
branches) with full attention in every layer at this step, then walks the layers in depth order:
for layer i it tries :data:`~methods.dfa.CANDIDATES` most aggressive first and keeps the first whose
mean relative absolute error against that reference stays within ``threshold * (i + 1) / L``
(earlier layers keep their choices, so the budget accumulates with depth, as in the paper's code),
else ``full``. Trials write no persistent cache; the step's real passes then run the chosen plan
and fill the caches that the next step's trials reuse.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from harness.models.base import ModelAdapter
from harness.spec import Sampling
from methods.base import Schedule
from methods.dfa import CANDIDATES, FULL, REUSE_STEP, WINDOW, DfaPlan, DiTFastAttn

# DiTFastAttn clips each element's relative error at 10 so that near-zero outputs cannot dominate.
ERROR_CLIP = 10.0


def relative_error(output: torch.Tensor, reference: torch.Tensor, eps: float = 1e-6) -> float:
    """Mean of ``|a - b| / max(|a|, |b|)`` over all elements, each clipped at :data:`ERROR_CLIP`."""
    a, b = output.double(), reference.double()
    ratio = (a - b).abs() / (torch.maximum(a.abs(), b.abs()) + eps)
    return float(ratio.clamp(max=ERROR_CLIP).mean())


def calibrate(model: ModelAdapter, noise: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None,
              sampling: Sampling, threshold: float, window_fraction: float, schedule: Schedule | None = None,
              on_layer: Callable[[], None] | None = None) -> DfaPlan:  # fmt: skip
    """Search a plan on one batch: ``noise (B, C, F, H, W)``, ``cond (B, L, D)``, ``uncond (1 or B, L, D)``.

    ``schedule``'s dense warm-up steps and dense layers stay ``full`` and are not searched;
    ``on_layer`` is called after each (step, layer) is decided (progress bars).
    """
    started = time.time()
    num_layers, num_steps = len(model.self_attention_layers()), sampling.steps
    use_cfg = uncond is not None and sampling.cfg > 1.0
    candidates = CANDIDATES if use_cfg else (REUSE_STEP, WINDOW)
    method = DiTFastAttn(schedule, uniform=FULL, window=window_fraction)
    method.validate_for(num_layers, num_steps)
    choices = [[FULL] * num_layers for _ in range(num_steps)]
    errors: list[list[float | None]] = [[None] * num_layers for _ in range(num_steps)]
    searched = [layer for layer in range(num_layers) if layer not in method.schedule.dense_layers]
    first_step = max(1, method.schedule.dense_warmup_steps)

    def plan_now() -> DfaPlan:
        return DfaPlan(choices=choices, window_fraction=window_fraction, threshold=threshold, cfg=use_cfg)

    with model.use_method(method) as runtime:
        uncond_batch = uncond.expand(cond.shape[0], -1, -1) if use_cfg and uncond is not None else None

        def both_branches(kwargs: dict[str, Any]) -> torch.Tensor:
            """The transformer's outputs of this step's passes, concatenated over the CFG branches."""
            outputs = []
            for branch, embeddings in (("cond", cond), ("uncond", uncond_batch)):
                if embeddings is None:
                    continue
                runtime.cfg_branch = branch
                outputs.append(model.transformer(**{**kwargs, "encoder_hidden_states": embeddings})[0].float())
            runtime.cfg_branch = "cond"
            return torch.cat(outputs)

        def search_step(_module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            step = runtime.step
            if method.probing or runtime.cfg_branch != "cond" or step < first_step:
                return
            method.probing = True
            try:
                reference = both_branches(kwargs)
                for layer in searched:
                    for candidate in candidates:
                        choices[step][layer] = candidate
                        method.use_plan(plan_now())
                        error = relative_error(both_branches(kwargs), reference)
                        if error <= threshold * (layer + 1) / num_layers:
                            errors[step][layer] = error
                            break
                    else:
                        choices[step][layer] = FULL
                    if on_layer is not None:
                        on_layer()
            finally:
                method.probing = False
                method.use_plan(plan_now())

        method.calibrating = True
        handle = model.transformer.register_forward_pre_hook(search_step, with_kwargs=True)
        try:
            with torch.inference_mode():
                model.sample(noise, cond, uncond, sampling, runtime)
        finally:
            handle.remove()
    calibration = {
        "schedule": {"dense_warmup_steps": method.schedule.dense_warmup_steps,
                     "dense_layers": list(method.schedule.dense_layers)},
        "density": method.density.summary(),
        "seconds": time.time() - started,
    }  # fmt: skip
    return DfaPlan(choices=choices, window_fraction=window_fraction, threshold=threshold, cfg=use_cfg,
                   errors=errors, calibration=calibration)  # fmt: skip
