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

A task of the training engine (:mod:`harness.train`), which runs the loop: AdamW for the weights and feature
maps, SGD (or AdamW) with its own learning rate and schedule for r, r projected into [0, 1] after every step,
warm-up + cosine schedules, gradient clipping (weights and r apart), micro-batches within a batch
(``micro_batch``) and accumulation over batches, bf16 autocast (optional) on GPU, optional activation
checkpointing, resumable sharded checkpoints, and a stop with a message on a non-finite loss (the last good
checkpoint is kept); under ``torchrun`` FSDP2 per transformer block, each rank drawing its own stored states from
a seed derived from the run's seed and its data shard. ``adm-extra-score``'s score model is trained by the
engine's inner updates before each student step. Named recipes (``paper``, ``toy``: :mod:`harness.recipes`) set
the config's values; the toy one is its defaults.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from harness.atomic import write_json_atomic
from harness.checkpoints import TRAINING_META, save_tensors
from harness.errors import HarnessError, check_choice, check_number
from harness.models.base import ModelAdapter
from harness.recipes import TOY
from harness.train import engine
from harness.train.config import EngineConfig
from harness.train.engine import Run
from harness.train.task import Group, Modules, Shard, Task
from methods import build_method
from methods.kernels.linear_attention import check_kernel
from methods.linvideo.attention import SPEC_FILE, STATE_FILE, TRANSFORMER_FILE, LinVideo, TransferState
from methods.linvideo.collect import JUMPS, TrajectoryStore
from methods.linvideo.losses import (
    REDUCTIONS,
    adm_gradient,
    adm_limit_weights,
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

# mse-limit: the MSE that ADM tends to as its landing step shrinks (weighted per state by adm_limit_weights under
# the ADM weighting): not the paper's, an arm of issue 20's E1c that separates ADM's weighting from the rest of it.
OBJECTIVES = ("adm", "mse", "adm-extra-score", "mse-limit")
R_OPTIMIZERS = ("sgd", "adamw")
R_SCHEDULES = ("cosine", "constant")
ADM_WEIGHTINGS = ("analytic", "normalized", "uniform")
# Fields added after the shipped default conversion was trained (the engine's layout among them): a record (and so
# a conversion's name or an ablation's folder) leaves each out while it holds its default, so a run recorded before
# they existed keeps its name.
LATER_FIELDS = ("adm_step_fraction", "score_updates", "micro_batch", "accumulation", "global_batch", "log_every",
                "sync_every", "fsdp", "teacher_placement")  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class LinVideoTrainConfig(EngineConfig):
    """One LinVideo training run (the config is the experiment), with the engine's loop and layout settings.

    The defaults are the ``toy`` recipe (:data:`harness.recipes.TOY`; :mod:`harness.recipes` says where each
    value comes from and which toy trial chose it where it differs from the paper's). ``batch_size`` is per rank
    and micro-batch: the global batch is ``batch_size x ranks x accumulation`` (one process: ``batch_size``).
    ``precision`` follows ``bf16``.
    """

    target_layers: int
    objective: str = TOY["objective"]
    kernel: str = TOY["kernel"]
    steps: int = TOY["steps"]
    batch_size: int = TOY["batch_size"]
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
    bf16: bool = TOY["bf16"]  # bf16 autocast on CUDA (fp32 master weights either way; CPU always runs fp32)
    precision: str = field(init=False, default="bf16")  # the engine's name for ``bf16``
    # kappa: ADM's student step lands at s - kappa (s - t_next); 1 is the paper's step to the next sampler time.
    adm_step_fraction: float = TOY["adm_step_fraction"]
    # adm-extra-score: flow-matching updates of the score model per student step (DMD2's 5).
    score_updates: int = TOY["score_updates"]
    # States per forward and backward pass (gradients accumulated over batch_size / micro_batch passes); 0: the
    # whole batch in one pass.
    micro_batch: int = TOY["micro_batch"]

    def __post_init__(self) -> None:
        object.__setattr__(self, "precision", "bf16" if self.bf16 else "fp32")

    def record(self) -> dict[str, Any]:
        """The config as recorded and compared (JSON types): :data:`LATER_FIELDS` left out at their defaults,
        ``precision`` (``bf16``'s other name) left out."""
        data = json.loads(json.dumps(asdict(self)))
        defaults = {field.name: field.default for field in fields(self)}
        return {key: value for key, value in data.items()
                if key != "precision" and (key not in LATER_FIELDS or value != defaults[key])}  # fmt: skip

    def validate(self, num_layers: int | None = None) -> None:
        """Raise :class:`HarnessError` on an impossible setting; ``num_layers``: the model's, where known."""
        super().validate()
        if num_layers is not None and not 1 <= self.target_layers <= num_layers:
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
        if self.objective == "mse-limit" and self.adm_jump != "next":
            raise HarnessError("mse-limit weights each stored state by its own sampler step: --adm-jump next")
        check_number("ADM step fraction", self.adm_step_fraction, gt=0, le=1)
        if self.score_guided and self.objective != "adm-extra-score":
            raise HarnessError("a guided score model needs the adm-extra-score objective")
        check_number("alpha anneal fraction", self.alpha_anneal_fraction, gt=0, le=1)
        check_choice("selection", self.selection, SELECTIONS)
        if self.selection == "manual" and num_layers is not None:
            check_manual_layers(self.layers, self.target_layers, num_layers)
        elif self.selection != "manual" and self.layers:
            raise HarnessError("layers are given only with the manual selection")
        check_number("score updates", self.score_updates, ge=1)
        check_number("micro batch", self.micro_batch, ge=0)
        for name in ("lr", "map_lr", "r_lr"):
            check_number(name, getattr(self, name), gt=0)
        for name in ("alpha_start", "alpha_end"):  # |2r - 1|^alpha: 0 would make L_reg 0 everywhere
            check_number(name, getattr(self, name), gt=0)
        for name in ("lam", "weight_decay"):
            check_number(name, getattr(self, name), ge=0)
        check_number("r_init", self.r_init, gt=0, le=1)
        check_number("warmup_fraction", self.warmup_fraction, ge=0, lt=1)
        check_number("t_min", self.t_min, gt=0, lt=1)


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

    ``mse`` regresses the stored velocity (``mse-limit``: weighted per state as ADM's small-step limit); ``adm``
    takes one student step to the landing time t (:func:`student_step`), scores x_hat with the teacher and the
    student itself (or ``score_model``) and returns the surrogate whose gradient with respect to x_hat is g under
    ``settings.adm_weighting``.
    """
    if settings.objective in ("mse", "mse-limit"):
        x_s, s = batch["x"].to(teacher.device), batch["t"].to(teacher.device)
        u_student = guided_velocity(student, x_s, s, batch["cond"].to(teacher.device, teacher.dtype), uncond, cfg)
        u_stored = batch["u"].to(teacher.device)
        weights = None
        if settings.objective == "mse-limit":
            t = landing_time(s, batch["t_next"].to(s.device), settings.step_fraction, settings.t_min)
            weights = adm_limit_weights(s, t, u_stored, settings.adm_weighting)
        return mse_loss(u_student, u_stored, settings.adm_reduction, weights)
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


class LinVideoTrainer(Task):
    """LinVideo's training as a task of the engine; :meth:`run` trains (or resumes) into ``out``.

    Teacher, student, transfer state (and the score model of ``adm-extra-score``) are made at construction
    (nothing in them is random), so that diagnostics can read the student before and during the run. Roles:
    the student's transformer and the score model are sharded (FSDP2 per block under torchrun), the transfer
    state (r and the feature maps, read inside the attention processors) is replicated, the teacher frozen.
    """

    name = "linvideo"
    generator_device = torch.device("cpu")  # the store lives in host memory

    def __init__(self, config: LinVideoTrainConfig, teacher: ModelAdapter, store: TrajectoryStore, out: Path) -> None:
        num_layers = len(teacher.self_attention_layers())
        config.validate(num_layers)
        if config.objective != "mse" and float(store.grid[0]) <= config.t_min:
            raise HarnessError(f"t_min {config.t_min} must lie below the sampler's smallest time above 0 "
                               f"({float(store.grid[0]):.4g}): ADM's last step lands at t_min")  # fmt: skip
        self.config, self.teacher, self.store, self.out = config, teacher, store, out
        self.cfg = float(store.spec["sampling"]["cfg"])
        self.device = teacher.device
        self.log: dict[str, Any] = {"r": [], "score_seconds": 0.0}
        self.on_step: Callable[[int], None] | None = None
        self._inner_began: float | None = None
        self.student = copy.copy(teacher)
        self.student.transformer = copy.deepcopy(teacher.transformer).requires_grad_(True).train()
        tc = teacher.transformer.config
        self.state = TransferState(num_layers, tc.num_attention_heads, tc.attention_head_dim, config.kernel,
                                   config.r_init).to(self.device)  # fmt: skip
        self.method = LinVideo(kernel=config.kernel)
        self.method.attach(self.state, converted=False)
        self.score_model: ModelAdapter | None = None
        self.score_cfg = self.cfg if config.score_guided else 1.0
        if config.objective == "adm-extra-score":
            # The paper's s_hat dagger: a separately trained copy of the teacher scores the student's samples,
            # updated score_updates times before each student step (the engine's inner updates).
            self.score_model = copy.copy(teacher)
            self.score_model.transformer = copy.deepcopy(teacher.transformer).requires_grad_(True).train()
            self.inner_groups, self.inner_updates = ("score",), config.score_updates
        self.uncond = store.uncond.to(self.device, teacher.dtype)
        self.selection_log: list[dict[str, float]] = []
        self.settings = ObjectiveSettings("adm" if config.objective == "adm-extra-score" else config.objective,
                                          config.adm_weighting, config.t_min, config.adm_reduction, self.score_cfg,
                                          config.adm_step_fraction)  # fmt: skip
        if config.selection != "learned":
            layers = config.layers if config.selection == "manual" else self.heuristic_layers()
            # A fixed selection: r = 0 on ``layers``, 1 elsewhere, not trained (L_con and L_reg are then 0).
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

    def autocast(self) -> torch.autocast:
        """bf16 autocast on CUDA when ``config.bf16`` (the engine's own around each loss; diagnostics use this)."""
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda" and self.config.bf16)

    def trained_weights(self) -> list[torch.nn.Parameter]:
        """The student's trained weights: its transformer's, then the feature maps' (r excluded)."""
        return [*self.student.transformer.parameters(), *self.state.q_maps.parameters(),
                *self.state.k_maps.parameters()]  # fmt: skip

    # -- the task ------------------------------------------------------------------------------------

    def build(self, device: torch.device) -> Modules:
        sharded = {"student": self.student.transformer}
        if self.score_model is not None:
            sharded["score"] = self.score_model.transformer
        return Modules(sharded=sharded, replicated={"transfer": self.state},
                       frozen={"teacher": self.teacher.transformer})  # fmt: skip

    def param_groups(self) -> list[Group]:
        """Transformer at ``lr`` and feature maps at ``map_lr`` (AdamW, warm-up + cosine, clipped together); r by
        ``r_optimizer`` at ``r_lr`` on its own schedule, clipped apart (clipped with the weights, their gradient
        norm would shrink r's push from L_con and L_reg whenever the task's gradient is large); the score model
        (AdamW at ``lr``, clipped alone). A fixed selection trains no r."""
        config = self.config
        warmup = max(1, round(config.warmup_fraction * config.steps))
        maps = [*self.state.q_maps.parameters(), *self.state.k_maps.parameters()]
        groups = [Group("weights", list(self.student.transformer.parameters()), config.lr, warmup,
                        weight_decay=config.weight_decay)]  # fmt: skip
        if maps:
            groups.append(Group("maps", maps, config.map_lr, warmup, weight_decay=config.weight_decay,
                                clip_with="weights"))  # fmt: skip
        if self.state.rho.requires_grad:
            groups.append(Group("r", [self.state.rho], config.r_lr, warmup, optimizer=config.r_optimizer,
                                decay=config.r_lr_schedule))  # fmt: skip
        if self.score_model is not None:
            groups.append(Group("score", list(self.score_model.transformer.parameters()), config.lr, warmup,
                                weight_decay=config.weight_decay))  # fmt: skip
        return groups

    def data(self, shard: Shard, step: int) -> Any:
        from harness.finetune import StoreBatches

        return StoreBatches(self.store, self.config.batch_size, shard.generator, jump=self.config.adm_jump)

    def parts(self, batch: dict[str, torch.Tensor]) -> Iterator[tuple[dict[str, torch.Tensor], float]]:
        return micro_batches(batch, self.config.micro_batch)

    def session(self) -> AbstractContextManager[Any]:
        stack = ExitStack()
        stack.enter_context(self.teacher.use_method(build_method("sdpa")))
        stack.enter_context(self.student.use_method(self.method))
        return stack

    def objective(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The objective on ``batch`` (:func:`trajectory_objective` with this run's settings and score model)."""
        return trajectory_objective(self.student, self.teacher, batch, self.uncond, self.cfg, self.settings,
                                    self.score_model)  # fmt: skip

    def losses(self, batch: dict[str, torch.Tensor], shard: Shard | None, step: int) -> dict[str, torch.Tensor]:
        """The objective, ``lambda L_con`` and ``lambda L_reg`` (alpha annealed) on ``batch``; gradients reach the
        student through x_hat (ADM) or its velocity (MSE). ``shard`` is unused (the draws are the data's)."""
        self._score_timed()
        config = self.config
        r = self.state.r()
        alpha = annealed_alpha(step, config.steps, config.alpha_start, config.alpha_end, config.alpha_anneal_fraction)
        return {"objective": self.objective(batch), "constraint": config.lam * constraint_loss(r, config.target_layers),
                "regulariser": config.lam * binarization_loss(r, alpha)}  # fmt: skip

    def inner_losses(self, batch: dict[str, torch.Tensor], shard: Shard, step: int,
                     index: int) -> dict[str, torch.Tensor]:  # fmt: skip
        """One flow-matching update of the extra score model on the student's samples.

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
        if self._inner_began is None:
            self._inner_began = self._now()
        cond = batch["cond"].to(self.device, self.teacher.dtype)
        with torch.no_grad():
            _, x_hat, t = student_step(self.student, batch, self.uncond, self.cfg, self.settings)
            t_view = t.view(-1, 1, 1, 1, 1)
            x0 = (x_hat - t_view * guided_velocity(self.student, x_hat, t, cond, self.uncond, self.cfg)).float()
        noise = torch.randn(x0.shape, generator=shard.generator).to(self.device, x0.dtype)
        u_fake = guided_velocity(self.score_model, (1 - t_view) * x0 + t_view * noise, t, cond, self.uncond,
                                 self.score_cfg)  # fmt: skip
        return {"score": mse_loss(u_fake, noise - x0)}

    def _now(self) -> float:
        """The wall clock, the GPU's queue drained first."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _score_timed(self) -> None:
        """The student's first loss of a step ends the score model's updates: add their time to the log."""
        if self._inner_began is not None:
            self.log["score_seconds"] += self._now() - self._inner_began
            self._inner_began = None

    def after_step(self, step: int, run: Run) -> None:
        """Project r into [0, 1] (projected gradient descent: whatever a step did, rho is back in range,
        :meth:`TransferState.project_`), log it, and call ``on_step`` (diagnostics) with the student attached."""
        self.state.project_()
        r = self.state.r().detach().cpu().tolist()
        self.log["r"].append(r)
        if step % self.config.log_every == 0 or step == self.config.steps:
            below = sum(value < 0.5 for value in r)
            run.print(f"step {step}: linear {below}/{len(r)}, r " + " ".join(f"{value:.2f}" for value in r))
        if self.on_step is not None:
            self.on_step(step)

    def finish(self, run: Run) -> Path:
        """Gather the student (collective) and write the converted checkpoint on the lead."""
        transformer = run.gather(self.student.transformer)
        if run.ranks.lead:
            self.write_converted(transformer, run.step, run.seconds, run.layout.record())
        return self.out

    def write_converted(self, transformer: dict[str, torch.Tensor], steps: int, seconds: float,
                        layout: dict[str, Any]) -> Path:  # fmt: skip
        """The converted checkpoint ``bench run --method linvideo --checkpoint DIR`` reads: which layers are linear,
        their feature maps (``linvideo.safetensors``), the fine-tuned transformer's state ``transformer``
        (``transformer.safetensors``) and ``spec.json`` (config, store, selection, final r, cost, layout)."""
        self.method.attach(self.state, converted=True)
        self.method.save_state(self.out / STATE_FILE)
        save_tensors(transformer, self.out / TRANSFORMER_FILE)
        config = self.config.record()
        write_json_atomic(self.out / SPEC_FILE, {
            "method": "linvideo", "config": config, "trajectory_store": self.store.spec,
            "linear_layers": list(self.state.linear_layers()), "selection": config.get("selection"),
            "greedy_rounds": self.selection_log, "final_r": self.state.r().detach().cpu().tolist(), "steps": steps,
            "train_seconds": seconds, "seconds_per_step": seconds / max(steps, 1), "layout": layout,
            # adm-extra-score: the score model's share of each step (its updates), beside the whole step's
            **({"score_seconds_per_step": self.log["score_seconds"] / max(steps, 1)} if self.score_model else {}),
        })  # fmt: skip
        return self.out

    def run(self, show_progress: bool = True, on_step: Callable[[int], None] | None = None) -> Path:
        """Train to ``config.steps`` through the engine (resuming a half-done run) and write the converted
        checkpoint; ``on_step(step)`` runs after every finished step (1-based), with the student attached."""
        self.on_step = on_step
        if self._converted_before_the_engine():
            return self.out
        return engine.run(self, show_progress)

    def _converted_before_the_engine(self) -> bool:
        """Whether ``out`` holds this run finished and converted by the trainer before the engine (its record names
        no sharded checkpoint): its conversion is the result, as that trainer returned it on a rerun (a sweep's
        finished variants). A half-done one the engine refuses, naming what to remove."""
        path = self.out / TRAINING_META
        if not (self.out / SPEC_FILE).is_file() or not path.is_file():
            return False
        try:
            meta = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return False  # the engine names the corrupt record
        old, same = "checkpoint" not in meta, meta.get("config") == self.config.record()
        return old and same and meta.get("step") == self.config.steps


def r_history(meta: dict[str, Any]) -> list[list[float]]:
    """Every layer's r after each step, from a run's ``training_state.json`` (the task's log; a record written
    before the training engine kept it at the top level)."""
    return meta.get("task", meta).get("r", [])
