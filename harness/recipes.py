"""LinVideo's training recipes by name: ``paper`` (the paper's appendix) and ``toy`` (our tuned defaults).

Torch-free data, so that ``bench train --help`` can show both side by side without importing a model. Each
recipe names the value of every setting a recipe decides, with where it comes from:

- ``paper``: the values the paper's appendix states (reference/linvideo.md, section 9.1: lr 1e-4 cosine with a
  tenth of warm-up, global batch 48 for Wan 1.3B, alpha linear 20 -> 2 over training, lambda 0.01, 3K steps) and
  its equations (Eq. 12 and 13); where the paper is silent (r's optimizer, lr and parametrisation, t_min,
  clipping) the project's choice, marked ``ours``.
- ``toy``: the defaults of :class:`methods.linvideo.train.LinVideoTrainConfig` (they are read from here), the
  recipe the shipped default conversion was trained with; each value that differs from ``paper`` names the
  toy trial (reports/toy/linvideo_trials/README.md) that motivated it.

An explicit ``bench train`` option overrides its recipe's value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from harness.errors import check_choice

RECIPE_NAMES = ("toy", "paper")


@dataclass(frozen=True)
class Setting:
    """One recipe value and where it comes from (a paper section, an equation, ``ours: ...`` or a toy trial)."""

    value: Any
    source: str


PAPER: dict[str, Setting] = {
    "objective": Setting("adm", "paper: ADM, the student as its own score model (Eq. 11-13)"),
    "kernel": Setting("hedgehog", "paper: Hedgehog feature map (Eq. 6)"),
    "selection": Setting("learned", "paper: selective transfer (Eq. 8-10)"),
    "steps": Setting(3000, "paper: 3K steps"),
    "batch_size": Setting(48, "appendix A: global batch 48 (Wan 1.3B; 64 for 14B)"),
    "micro_batch": Setting(
        0,
        "ours: the whole batch in one pass where the device holds it (--micro-batch N "
        "accumulates gradients where it does not: Wan needs 1)",
    ),
    "lr": Setting(1e-4, "appendix A: cosine annealing from 1e-4"),
    "map_lr": Setting(1e-4, "appendix A: the one stated lr, for every trained parameter but r"),
    "warmup_fraction": Setting(0.1, "appendix A: warm-up over 1/10 of training"),
    "weight_decay": Setting(0.0, "ours (not stated)"),
    "grad_clip": Setting(1.0, "ours (not stated); weights and r clipped apart"),
    "r_optimizer": Setting("sgd", "ours (not stated): keeps each layer's gradient size, the ranking signal"),
    "r_lr": Setting(1.0, "ours (not stated): at lr 1e-4 r moves at most ~0.15 in 3K steps"),
    "r_lr_schedule": Setting("constant", "ours (not stated): r keeps its lr after warm-up"),
    "r_init": Setting(0.95, "ours (not stated): at exactly 1, L_reg's gradient (2 alpha) pins r"),
    "alpha_start": Setting(20.0, "appendix A: alpha decays linearly from 20"),
    "alpha_end": Setting(2.0, "appendix A: to 2"),
    "alpha_anneal_fraction": Setting(1.0, "appendix A: over training (no hold phase is mentioned)"),
    "lam": Setting(0.01, "appendix A: lambda = 0.01"),
    "adm_weighting": Setting("analytic", "Eq. 13: (1 - t)/t times the velocity difference"),
    "adm_reduction": Setting(
        "mean",
        "ours (not stated): with Eq. 12's per-sample sum (--reduction sample-sum) "
        "ADM's gradient on r at the start is 37-250x lambda's push on the toy (analytic "
        "weighting, lambda 0.01), so no layer converts; the mean divides it by C F H W",
    ),
    "t_min": Setting(0.02, "ours (not stated): bounds (1 - t)/t; the last step lands there"),
    "adm_step_fraction": Setting(1.0, "paper: one sampler step, to the next sampler time"),
    "adm_jump": Setting("next", "paper: one sampler step, to the next sampler time"),
    "score_updates": Setting(5, "DMD2 (the paper's few-step stage): 5 score-model updates per student step"),
    "bf16": Setting(True, "ours (not stated): bf16 autocast on GPU, fp32 master weights"),
}

# Where the toy recipe differs from the paper's, and the trial that decided it; every other value is the paper's.
TOY_CHANGES: dict[str, Setting] = {
    "steps": Setting(
        400,
        "round 5 (400 steps: 7 of 8 seeds end with exactly 4 layers); at 3K steps the weights "
        "diverge at lr 1e-5 (rounds 4, 6, 7)",
    ),
    "batch_size": Setting(8, "rounds 1-8 (batch 32 blew up sooner, round 7)"),
    "lr": Setting(1e-5, "round 2 (1e-4 diverged: objective to 86, clips noise)"),
    "map_lr": Setting(1e-2, "round 3 (maps at 1e-5 did not train: MSE 29.7 -> 65.6 at 1e-2; ADM works only with it)"),
    "alpha_anneal_fraction": Setting(0.7, "round 2 (annealed over the whole run the scores ended at ~0.5)"),
    "adm_weighting": Setting("uniform", "round 3 (analytic: prompt correctness 0.0, static clips; uniform 72-75)"),
}


def recipe(name: str) -> dict[str, Any]:
    """The values of recipe ``name`` (toy or paper) by config field."""
    check_choice("recipe", name, RECIPE_NAMES)
    changes = TOY_CHANGES if name == "toy" else {}
    return {field: changes.get(field, setting).value for field, setting in PAPER.items()}


TOY = recipe("toy")


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:g}" if isinstance(value, float) else str(value)


def side_by_side(field: str) -> str:
    """``paper X, toy Y`` for one setting (an option's help)."""
    return f"paper {_shown(PAPER[field].value)}, toy {_shown(TOY[field])}"


def recipe_table() -> str:
    """The two recipes as a markdown table: setting, paper value and source, toy value and its trial."""
    rows = ["| setting | `--recipe paper` | where from | `--recipe toy` (default) | why the toy differs |",
            "|---|---|---|---|---|"]  # fmt: skip
    for field, setting in PAPER.items():
        change = TOY_CHANGES.get(field)
        toy = f"**{_shown(change.value)}**" if change else "same"
        rows.append(f"| {field} | {_shown(setting.value)} | {setting.source} | {toy} | "
                    f"{change.source if change else ''} |")  # fmt: skip
    return "\n".join(rows)
