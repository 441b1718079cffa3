"""The LinVideo trainer: selective transfer + the ADM (or MSE) objective on a teacher's trajectories.

The student is a copy of the teacher whose self-attention layers mix softmax and linear attention by
a learnable score r per layer (Eq. 8). Each step draws stored teacher states x_s (data-free
collection; every sampler step, the last one included), and with ``adm`` lets the student step to the
landing time t = s - kappa (s - t_next) (kappa = ``adm_step_fraction``, 1 = the next sampler time; at least
``t_min``): ``x_hat = x_s - (s - t) u_student(x_s)``, then ``g = (1 - t)/t (u_teacher(x_hat) - u_student(x_hat))``
without gradient and the surrogate ``0.5 ||x_hat - sg(x_hat - g)||^2``; velocities are CFG-guided as
at inference, for teacher and student alike. ``adm-extra-score`` replaces the student's own velocity at
x_hat by a separately trained score model's (the paper's s_hat dagger); ``mse`` regresses the stored teacher
velocities. The total loss is ``L_obj + lambda (L_con + L_reg)``; the objective's reduction
(``adm_reduction``) sets its scale against lambda.

AdamW for the weights, SGD (or AdamW) with its own learning rate for r, r projected into [0, 1] after every
step, cosine schedule with warm-up, gradient clipping, gradient accumulation over micro-batches, bf16
autocast (optional) on GPU, optional activation checkpointing, resumable checkpoints, and a stop with a
message on a non-finite loss (the last good checkpoint is kept). Parameters are grouped by role and the loop
only touches ``student.transformer`` and the transfer state, so FSDP2 can wrap both later. Named recipes
(``paper``, ``toy``: :mod:`harness.recipes`) set the config's values; the toy one is its defaults.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from harness.atomic import write_json_atomic
from harness.checkpoints import load_training_state, save_module_weights, save_training_state
from harness.errors import HarnessError, check_choice
from harness.models.base import ModelAdapter
from harness.optim import warmup_constant, warmup_cosine
from harness.recipes import TOY
from methods import build_method
from methods.kernels.linear_attention import check_kernel
from methods.linvideo.attention import SPEC_FILE, STATE_FILE, TRANSFORMER_FILE, LinVideo, TransferState
from methods.linvideo.collect import JUMPS, TrajectoryStore
from methods.linvideo.losses import (
    REDUCTIONS,
    adm_gradient,
    adm_loss,
    annealed_alpha,
    binarization_loss,
    constraint_loss,
    landing_time,
    mse_loss,
    normalized_adm_gradient,
    step_normalized_adm_gradient,
)
from methods.linvideo.selection import SELECTIONS, check_manual_layers, greedy_selection

OBJECTIVES = ("adm", "mse", "adm-extra-score")
R_OPTIMIZERS = ("sgd", "adamw")
R_SCHEDULES = ("cosine", "constant")
ADM_WEIGHTINGS = ("analytic", "normalized", "uniform")
LOG_EVERY = 25  # steps between log lines when the progress bar is off
# Fields added after the shipped default conversion was trained: a record (and so a conversion's name or an
# ablation's folder) leaves each out while it holds its default, so a run recorded before they existed keeps
# its name and resumes.
LATER_FIELDS = ("adm_step_fraction", "score_updates", "micro_batch")


@dataclass(frozen=True)
class LinVideoTrainConfig:
    """One LinVideo training run (the config is the experiment).

    The defaults are the ``toy`` recipe (:data:`harness.recipes.TOY`; :mod:`harness.recipes` says where each
    value comes from and which toy trial chose it where it differs from the paper's).
    """

    target_layers: int
    objective: str = TOY["objective"]
    kernel: str = TOY["kernel"]
    steps: int = TOY["steps"]
    batch_size: int = TOY["batch_size"]  # states per optimiser step (the global batch)
    # Transformer (and the extra score model of adm-extra-score); the feature maps take ``map_lr``.
    lr: float = TOY["lr"]
    map_lr: float = TOY["map_lr"]
    r_optimizer: str = TOY["r_optimizer"]
    r_lr: float = TOY["r_lr"]
    # cosine: r's lr follows the weights' warm-up + cosine; constant: r keeps its lr to the end, where the
    # binarising pull of L_reg (small alpha) has to act.
    r_lr_schedule: str = TOY["r_lr_schedule"]
    r_init: float = TOY["r_init"]
    alpha_start: float = TOY["alpha_start"]
    alpha_end: float = TOY["alpha_end"]
    alpha_anneal_fraction: float = TOY["alpha_anneal_fraction"]  # alpha reaches alpha_end there, then holds
    lam: float = TOY["lam"]
    weight_decay: float = TOY["weight_decay"]
    warmup_fraction: float = TOY["warmup_fraction"]
    grad_clip: float = TOY["grad_clip"]
    t_min: float = TOY["t_min"]  # ADM's earliest landing time: bounds (1 - t)/t; the last sampler step lands here
    # The objective's reduction (ADM and MSE): mean over every element, or summed per sample and averaged over the
    # batch; it sets the objective's scale against lambda (L_con + L_reg) (losses.reduce_objective).
    adm_reduction: str = TOY["adm_reduction"]
    # analytic (1 - t)/t (Eq. 13), normalized (DMD's per-sample scale) or uniform (normalized / step: every
    # sampler step weighs alike in velocity space).
    adm_weighting: str = TOY["adm_weighting"]
    # next: the student steps from a stored state to the next sampler time; any: to a sampler time drawn from all
    # later ones (0 included), nearby included.
    adm_jump: str = TOY["adm_jump"]
    # adm-extra-score: the score model's velocity is CFG-guided (trained and read so), as the student's is; then
    # it equals the student's score at the start. Unguided, it starts as the teacher's conditional velocity.
    score_guided: bool = False
    selection: str = TOY["selection"]  # learned (selective transfer), manual (``layers``) or heuristic (greedy)
    layers: tuple[int, ...] = ()  # the manual selection
    activation_checkpointing: bool = False
    bf16: bool = TOY["bf16"]  # bf16 autocast on CUDA (fp32 master weights either way; CPU always runs fp32)
    checkpoint_every: int = 100
    seed: int = 0
    # kappa: ADM's student step lands at s - kappa (s - t_next); 1 is the paper's step to the next sampler time.
    adm_step_fraction: float = TOY["adm_step_fraction"]
    # adm-extra-score: flow-matching updates of the score model per student step (DMD2's 5).
    score_updates: int = TOY["score_updates"]
    # States per forward and backward pass (gradients accumulated over batch_size / micro_batch passes); 0: the
    # whole batch in one pass.
    micro_batch: int = TOY["micro_batch"]

    def record(self) -> dict[str, Any]:
        """The config as recorded and compared (JSON types): :data:`LATER_FIELDS` left out at their defaults."""
        data = json.loads(json.dumps(asdict(self)))
        defaults = {field.name: field.default for field in fields(self)}
        return {key: value for key, value in data.items() if key not in LATER_FIELDS or value != defaults[key]}

    def validate(self, num_layers: int) -> None:
        if not 1 <= self.target_layers <= num_layers:
            raise HarnessError(
                f"target layers must be in 1..{num_layers} (the model's layers), got {self.target_layers}"
            )
        check_choice("objective", self.objective, OBJECTIVES)
        check_kernel(self.kernel)
        check_choice("r optimizer", self.r_optimizer, R_OPTIMIZERS)
        check_choice("r schedule", self.r_lr_schedule, R_SCHEDULES)
        check_choice("ADM weighting", self.adm_weighting, ADM_WEIGHTINGS)
        check_choice("objective reduction", self.adm_reduction, REDUCTIONS)
        check_choice("ADM jump", self.adm_jump, JUMPS)
        if self.objective == "mse" and (self.adm_jump != "next" or self.adm_step_fraction != 1.0):
            raise HarnessError("the ADM jump and step fraction apply to the adm objectives, not to mse")
        if not 0.0 < self.adm_step_fraction <= 1.0:
            raise HarnessError(f"ADM step fraction must be in (0, 1], got {self.adm_step_fraction}")
        if self.score_guided and self.objective != "adm-extra-score":
            raise HarnessError("a guided score model needs the adm-extra-score objective")
        if not 0.0 < self.alpha_anneal_fraction <= 1.0:
            raise HarnessError(f"alpha anneal fraction must be in (0, 1], got {self.alpha_anneal_fraction}")
        check_choice("selection", self.selection, SELECTIONS)
        if self.selection == "manual":
            check_manual_layers(self.layers, self.target_layers, num_layers)
        elif self.layers:
            raise HarnessError("layers are given only with the manual selection")
        if min(self.steps, self.batch_size, self.checkpoint_every, self.score_updates) < 1 or self.micro_batch < 0:
            raise HarnessError("steps, batch size, checkpoint interval and score updates must be >= 1, "
                               "micro batch >= 0")  # fmt: skip
        if min(self.lr, self.r_lr, self.map_lr) <= 0:
            raise HarnessError(
                f"learning rates must be > 0, got lr {self.lr}, r_lr {self.r_lr} and map_lr {self.map_lr}"
            )
        if not 0.0 < self.r_init <= 1.0 or not 0.0 <= self.warmup_fraction < 1.0 or not 0.0 < self.t_min < 1.0:
            raise HarnessError("need 0 < r_init <= 1, 0 <= warmup_fraction < 1 and 0 < t_min < 1")


def lr_factor(step: int, config: LinVideoTrainConfig, group: str = "weights") -> float:
    """Linear warm-up over ``warmup_fraction`` of the steps, then cosine decay to 0 (r: constant if so set)."""
    warmup = max(1, round(config.warmup_fraction * config.steps))
    if group == "r" and config.r_lr_schedule == "constant":
        return warmup_constant(step, warmup)
    return warmup_cosine(step, warmup, config.steps)


def guided_velocity(model: ModelAdapter, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                    uncond: torch.Tensor, cfg: float) -> torch.Tensor:  # fmt: skip
    """CFG-guided velocity at flow times ``t (B,)``, as the sampler computes it; ``x (B, C, F, H, W)``."""
    timestep = t * 1000.0
    velocity = model.forward(x, timestep, cond).float()
    if cfg <= 1.0:
        return velocity
    unconditional = model.forward(x, timestep, uncond.expand(x.shape[0], -1, -1)).float()
    return unconditional + cfg * (velocity - unconditional)


@dataclass(frozen=True)
class ObjectiveSettings:
    """How a student is fitted to the teacher's trajectories (shared by LinVideo's trainer and SLA's)."""

    objective: str  # adm, mse (adm-extra-score: adm with ``score_model`` given)
    adm_weighting: str
    t_min: float
    adm_reduction: str
    score_cfg: float = 1.0  # adm-extra-score: the CFG scale the score model is read with
    step_fraction: float = 1.0  # kappa: where the student's step lands (losses.landing_time)


def student_step(student: ModelAdapter, batch: dict[str, torch.Tensor], uncond: torch.Tensor, cfg: float,
                 settings: ObjectiveSettings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """The student's velocity at the stored states and its step to the landing time (ADM's sample x_hat).

    Returns ``u_student(x_s) (B, C, F, H, W)`` (with gradient where the student has one), ``x_hat`` (same shape)
    and the landing times ``t (B,)``, all on the student's device.
    """
    device = student.device
    x_s, s = batch["x"].to(device), batch["t"].to(device)
    u_student = guided_velocity(student, x_s, s, batch["cond"].to(device, student.dtype), uncond, cfg)
    t = landing_time(s, batch["t_next"].to(device), settings.step_fraction, settings.t_min)
    return u_student, x_s - (s - t).view(-1, 1, 1, 1, 1) * u_student, t


def trajectory_objective(student: ModelAdapter, teacher: ModelAdapter, batch: dict[str, torch.Tensor],
                         uncond: torch.Tensor, cfg: float, settings: ObjectiveSettings,
                         score_model: ModelAdapter | None = None) -> torch.Tensor:  # fmt: skip
    """The objective on one batch of stored states (a scalar, reduced by ``settings.adm_reduction``).

    ``mse`` regresses the stored velocity; ``adm`` takes one student step to the landing time t
    (:func:`student_step`), scores x_hat with the teacher and the student itself (or ``score_model``) and
    returns the surrogate whose gradient with respect to x_hat is g under ``settings.adm_weighting``.
    """
    if settings.objective == "mse":
        x_s, s = batch["x"].to(teacher.device), batch["t"].to(teacher.device)
        u_student = guided_velocity(student, x_s, s, batch["cond"].to(teacher.device, teacher.dtype), uncond, cfg)
        return mse_loss(u_student, batch["u"].to(teacher.device), settings.adm_reduction)
    cond = batch["cond"].to(teacher.device, teacher.dtype)
    u_student, x_hat, t = student_step(student, batch, uncond, cfg, settings)
    with torch.no_grad():
        u_teacher_at = guided_velocity(teacher, x_hat, t, cond, uncond, cfg)
        u_fake_at = (
            guided_velocity(student, x_hat, t, cond, uncond, cfg)
            if score_model is None
            else guided_velocity(score_model, x_hat, t, cond, uncond, settings.score_cfg)
        )
    if settings.adm_weighting == "analytic":
        g = adm_gradient(u_teacher_at, u_fake_at, t, settings.t_min)
    elif settings.adm_weighting == "normalized":
        g = normalized_adm_gradient(u_teacher_at, u_fake_at)
    else:
        g = step_normalized_adm_gradient(u_teacher_at, u_fake_at, batch["t"].to(t.device) - t)
    return adm_loss(x_hat.float(), g, settings.adm_reduction)


def micro_batches(batch: dict[str, torch.Tensor], size: int) -> Iterator[tuple[dict[str, torch.Tensor], float]]:
    """``batch`` split into parts of ``size`` states (0: one part), each with its share of the batch.

    Weighting each part's loss by its share makes the summed gradients those of the whole batch for a loss
    that averages over samples (both reductions do), so gradient accumulation changes memory, not the step.
    """
    total = len(batch["t"])
    size = total if size <= 0 else size
    for start in range(0, total, size):
        part = {key: value[start : start + size] for key, value in batch.items()}
        yield part, len(part["t"]) / total


@dataclass
class StepLosses:
    objective: torch.Tensor
    constraint: torch.Tensor
    regulariser: torch.Tensor
    total: torch.Tensor


class LinVideoTrainer:
    """Owns teacher, student and transfer state; :meth:`run` trains (or resumes) into ``out``."""

    def __init__(self, config: LinVideoTrainConfig, teacher: ModelAdapter, store: TrajectoryStore, out: Path) -> None:
        num_layers = len(teacher.self_attention_layers())
        config.validate(num_layers)
        if config.objective != "mse" and float(store.grid[0]) <= config.t_min:
            raise HarnessError(f"t_min {config.t_min} must lie below the sampler's smallest time above 0 "
                               f"({float(store.grid[0]):.4g}): ADM's last step lands at t_min")  # fmt: skip
        self.config, self.teacher, self.store, self.out = config, teacher, store, out
        self.cfg = float(store.spec["sampling"]["cfg"])
        self.device = teacher.device
        self.student = copy.copy(teacher)
        self.student.transformer = copy.deepcopy(teacher.transformer).requires_grad_(True).train()
        tc = teacher.transformer.config
        self.state = TransferState(num_layers, tc.num_attention_heads, tc.attention_head_dim, config.kernel,
                                   config.r_init).to(self.device)  # fmt: skip
        self.method = LinVideo(kernel=config.kernel)
        self.method.attach(self.state, converted=False)
        if config.activation_checkpointing:
            self.student.transformer.enable_gradient_checkpointing()
        maps = [*self.state.q_maps.parameters(), *self.state.k_maps.parameters()]
        weights = [{"params": list(self.student.transformer.parameters()), "base_lr": config.lr},
                   *([{"params": maps, "base_lr": config.map_lr}] if maps else [])]  # fmt: skip
        self.optimizers: dict[str, torch.optim.Optimizer] = {
            "weights": torch.optim.AdamW(weights, lr=config.lr, weight_decay=config.weight_decay),
            "r": torch.optim.SGD([{"params": [self.state.rho], "base_lr": config.r_lr}], lr=config.r_lr)
            if config.r_optimizer == "sgd"
            else torch.optim.AdamW([{"params": [self.state.rho], "base_lr": config.r_lr}], lr=config.r_lr,
                                   weight_decay=0.0),
        }  # fmt: skip
        # Projected gradient descent on r: whatever a step does, rho is back in [0, 1] (TransferState.project_).
        self.optimizers["r"].register_step_post_hook(lambda *_: self.state.project_())
        self.score_model: ModelAdapter | None = None
        self.score_cfg = self.cfg if config.score_guided else 1.0
        if config.objective == "adm-extra-score":
            # The paper's s_hat dagger: a separately trained copy of the teacher scores the student's samples.
            self.score_model = copy.copy(teacher)
            self.score_model.transformer = copy.deepcopy(teacher.transformer).requires_grad_(True).train()
            self.optimizers["score"] = torch.optim.AdamW(
                [{"params": list(self.score_model.transformer.parameters()), "base_lr": config.lr}],
                lr=config.lr, weight_decay=config.weight_decay)  # fmt: skip
        self.generator = torch.Generator().manual_seed(config.seed)
        self.uncond = store.uncond.to(self.device, teacher.dtype)
        self.selection_log: list[dict[str, float]] = []
        self.settings = ObjectiveSettings("adm" if config.objective == "adm-extra-score" else config.objective,
                                          config.adm_weighting, config.t_min, config.adm_reduction, self.score_cfg,
                                          config.adm_step_fraction)  # fmt: skip
        if config.selection != "learned":
            layers = config.layers if config.selection == "manual" else self.heuristic_layers()
            self._fix_layers(layers)

    def _fix_layers(self, layers: tuple[int, ...]) -> None:
        """A fixed selection: r = 0 on ``layers``, 1 elsewhere, not trained (L_con and L_reg are then 0)."""
        self.state.set_linear(layers)
        self.state.rho.requires_grad_(False)

    @torch.no_grad()
    def heuristic_layers(self, states: int = 8) -> tuple[int, ...]:
        """Greedy selection on a fixed batch of stored states (the same batch for every candidate)."""
        batch = self.store.sample(states, torch.Generator().manual_seed(self.config.seed + 1))
        x, t = batch["x"].to(self.device), batch["t"].to(self.device)
        cond = batch["cond"].to(self.device, self.teacher.dtype)
        with self.teacher.use_method(build_method("sdpa")):
            reference = guided_velocity(self.teacher, x, t, cond, self.uncond, self.cfg)

        def output_with(layers: tuple[int, ...]) -> torch.Tensor:
            self.state.set_linear(layers)
            with self.student.use_method(self.method):
                return guided_velocity(self.student, x, t, cond, self.uncond, self.cfg)

        layers, self.selection_log = greedy_selection(output_with, reference, self.state.num_layers,
                                                      self.config.target_layers)  # fmt: skip
        return layers

    def _autocast(self) -> torch.autocast:
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda" and self.config.bf16)

    def _modules(self) -> dict[str, torch.nn.Module]:
        modules = {"student": self.student.transformer, "transfer": self.state}
        if self.score_model is not None:
            modules["score"] = self.score_model.transformer
        return modules

    def losses(self, batch: dict[str, torch.Tensor], step: int) -> StepLosses:
        """The loss terms on ``batch``; gradients reach the student through x_hat (ADM) or its velocity (MSE)."""
        config = self.config
        with self._autocast():
            objective = trajectory_objective(self.student, self.teacher, batch, self.uncond, self.cfg, self.settings,
                                             self.score_model)  # fmt: skip
        r = self.state.r()
        constraint = constraint_loss(r, config.target_layers)
        alpha = annealed_alpha(step, config.steps, config.alpha_start, config.alpha_end, config.alpha_anneal_fraction)
        regulariser = binarization_loss(r, alpha)
        total = objective + config.lam * (constraint + regulariser)
        return StepLosses(objective, constraint, regulariser, total)

    def train_step(self, batch: dict[str, torch.Tensor], step: int) -> dict[str, float]:
        """One optimisation step of the student (then of the extra score model); returns the loss values.

        The batch runs in micro-batches of ``config.micro_batch`` states, each backward weighted by its share
        (L_con and L_reg too, so they count once). Raises on a non-finite loss before any parameter changes, so
        the last checkpoint stays good.
        """
        names = ("objective", "constraint", "regulariser", "total")
        values = dict.fromkeys(names, 0.0)
        student = (self.optimizers["weights"], self.optimizers["r"])
        for optimizer in student:
            optimizer.zero_grad(set_to_none=True)
        for part, share in micro_batches(batch, self.config.micro_batch):
            terms = self.losses(part, step)
            part_values = {name: float(getattr(terms, name).detach()) for name in names}
            if not all(math.isfinite(v) for v in part_values.values()):
                raise HarnessError(f"non-finite loss at step {step} ({part_values}); last good checkpoint kept in "
                                   f"{self.out}")  # fmt: skip
            (terms.total * share).backward()
            for name in names:
                values[name] += share * part_values[name]
        # Weights and r are clipped apart: clipped together, the weights' gradient norm would shrink r's push
        # from L_con and L_reg whenever the task's gradient is large.
        for optimizer in student:
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]],
                                           self.config.grad_clip)  # fmt: skip
        for optimizer in student:
            optimizer.step()
        return values

    def update_score_model(self) -> None:
        """``score_updates`` flow-matching steps of the extra score model on the student's samples.

        The paper's s_hat dagger is a score model of the student's samples at the landing time t, the
        distribution ADM scores. Each update draws fresh stored states, lets the student step to its
        sample x_hat at t (as ADM does, no gradient), takes the student's clean estimate of that sample,
        ``x0 = x_hat - t u_student(x_hat)``, noises it back to t with fresh noise and regresses the flow-matching
        target ``eps - x0`` there (conditionally, as DMD's fake score models a guided generator; CFG-guided with
        ``score_guided``). A flow-matching target needs x_hat split into data and noise, which a student step
        does not give; the clean estimate is the student's own split, so at the start (student = teacher) the
        score model learns the teacher's flow, as it should. Five updates per student step (DMD2) put its cost
        at about 4-5x ADM's step (the paper: ~4.4x); ``bench train`` prints both.
        """
        assert self.score_model is not None, "only adm-extra-score has a score model"
        config, optimizer = self.config, self.optimizers["score"]
        for _ in range(config.score_updates):
            batch = self.store.sample(config.batch_size, self.generator, jump=config.adm_jump)
            optimizer.zero_grad(set_to_none=True)
            for part, share in micro_batches(batch, config.micro_batch):
                cond = part["cond"].to(self.device, self.teacher.dtype)
                with self._autocast():
                    with torch.no_grad():
                        _, x_hat, t = student_step(self.student, part, self.uncond, self.cfg, self.settings)
                        t_view = t.view(-1, 1, 1, 1, 1)
                        x0 = (x_hat - t_view * guided_velocity(self.student, x_hat, t, cond, self.uncond, self.cfg)
                              ).float()  # fmt: skip
                    noise = torch.randn(x0.shape, generator=self.generator).to(self.device, x0.dtype)
                    u_fake = guided_velocity(self.score_model, (1 - t_view) * x0 + t_view * noise, t, cond,
                                             self.uncond, self.score_cfg)  # fmt: skip
                (mse_loss(u_fake, noise - x0) * share).backward()
            torch.nn.utils.clip_grad_norm_(self.score_model.transformer.parameters(), config.grad_clip)
            optimizer.step()

    def run(self, show_progress: bool = True, on_step: Callable[[int], None] | None = None) -> Path:
        """Train to ``config.steps`` (resuming a half-done run) and write the converted checkpoint.

        ``on_step(step)`` runs after every finished step (1-based), with the student attached (diagnostics).
        """
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        config, out = self.config, self.out
        out.mkdir(parents=True, exist_ok=True)
        meta = load_training_state(out, self._modules(), self.optimizers, self.generator)
        if meta is not None and meta["config"] != config.record():
            raise HarnessError(
                f"{out} holds a LinVideo run with another config; use another --out or the same settings"
            )
        if meta is not None and meta["step"] >= config.steps and (out / SPEC_FILE).exists():
            return out  # finished and converted earlier
        log: dict[str, Any] = meta or {"config": config.record(), "step": 0, "seconds": 0.0, "losses": [], "r": []}
        log.setdefault("score_seconds", 0.0)
        columns = (TextColumn("[bold]linvideo"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"))
        started = time.time() - log["seconds"]
        with (
            self.teacher.use_method(build_method("sdpa")),
            self.student.use_method(self.method),
            Progress(*columns, TimeRemainingColumn(), disable=not show_progress) as progress,
        ):
            task = progress.add_task("train", total=config.steps, completed=log["step"], info="")
            while log["step"] < config.steps:
                step = log["step"]
                for name, optimizer in self.optimizers.items():
                    for group in optimizer.param_groups:
                        group["lr"] = group["base_lr"] * lr_factor(step, config, name)
                batch = self.store.sample(config.batch_size, self.generator, jump=config.adm_jump)
                values = self.train_step(batch, step)
                if self.score_model is not None:
                    log["score_seconds"] += self._timed(self.update_score_model)
                r = self.state.r().detach().cpu().tolist()
                log["step"] += 1
                log["losses"].append(values)
                log["r"].append(r)
                below = sum(value < 0.5 for value in r)
                progress.update(task, advance=1, info=(
                    f"obj {values['objective']:.4g} con {values['constraint']:.3g} reg {values['regulariser']:.3g} "
                    f"linear {below}/{len(r)}"))  # fmt: skip
                if not show_progress and (log["step"] % LOG_EVERY == 0 or log["step"] == config.steps):
                    progress.console.print(f"step {log['step']}/{config.steps}: " + progress.tasks[0].fields["info"]
                                           + " r " + " ".join(f"{value:.2f}" for value in r))  # fmt: skip
                if on_step is not None:
                    on_step(log["step"])
                if log["step"] % config.checkpoint_every == 0 or log["step"] == config.steps:
                    log["seconds"] = time.time() - started
                    save_training_state(out, self._modules(), self.optimizers, self.generator, log)
        return self.write_converted(log)

    def _timed(self, work: Callable[[], None]) -> float:
        """Seconds ``work`` takes, the GPU's queue included."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        began = time.perf_counter()
        work()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - began

    def write_converted(self, log: dict[str, Any]) -> Path:
        """The converted checkpoint: which layers are linear, their feature maps, the fine-tuned transformer."""
        self.method.attach(self.state, converted=True)
        self.method.save_state(self.out / STATE_FILE)
        save_module_weights(self.student.transformer, self.out / TRANSFORMER_FILE)
        linear = list(self.state.linear_layers())
        write_json_atomic(self.out / SPEC_FILE, {
            "method": "linvideo", "config": log["config"], "trajectory_store": self.store.spec,
            "linear_layers": linear, "selection": log["config"].get("selection"), "greedy_rounds": self.selection_log,
            "final_r": log["r"][-1], "steps": log["step"], "train_seconds": log["seconds"],
            "seconds_per_step": log["seconds"] / max(log["step"], 1),
            # adm-extra-score: the score model's share of each step (its updates), beside the whole step's
            **({"score_seconds_per_step": log["score_seconds"] / max(log["step"], 1)} if self.score_model else {}),
        })  # fmt: skip
        return self.out
