"""``bench train --method dmd2``: distil a few-step generator with DMD2, as a task of :mod:`harness.train`.

Three models: the **generator** (trained) starts from the init, the dense teacher's weights or a method
checkpoint's (a LinVideo conversion: its fine-tuned transformer, and its linear layers with their feature maps,
which train with the generator; its selection stays fixed); the **fake score** (trained) starts from the
teacher; the **real score** is the frozen teacher with CFG. The equations are :mod:`methods.dmd2.losses`'.

One optimizer step of the engine is one generator step. Before it, the engine runs the fake score's
``fake_updates`` inner updates (the two time-scale rule: N = 5 by default, each on its own batch of fresh
generator samples, with its own AdamW and learning rate, clipped alone); then the generator's update, whose
fake-score forward runs without gradient. Every state the generator sees comes from its own rollouts (backward
simulation): each micro-batch of an update takes one of the sampler's times t_k (uniformly, the same on every
rank), rolls the generator from pure noise through
t_0..t_{k-1} without gradient (each step: x0 from the velocity, re-noised with fresh noise to the next time, as it
samples; :mod:`methods.dmd2.sampler`) and differentiates its step at t_k. No teacher data is needed; the optional
regression loss uses a small set of teacher ODE pairs (noise, the teacher's 20-step output), made once by sampling
the teacher and kept in ``OUT/regression/``. DMD2's GAN term is left out.

**ST + DMD2** (``target_layers > 0``): the generator starts from the dense teacher with LinVideo's learnable
selection (:class:`methods.linvideo.attention.TransferState`: every layer mixes softmax and linear attention by
its score r) and trains DMD2's loss plus LinVideo's ``lambda (L_con + L_reg)``, r by projected gradient descent
with LinVideo's toy-recipe settings; at the end the selection is rounded (a layer is linear iff r < 0.5), as a
LinVideo conversion is: the paper's single-stage recipe, which it reports to collapse (Tab. II). Only LinVideo's
public pieces are used (``TransferState``, the ``LinVideo`` method, its losses' functions).

The result is a checkpoint folder ``bench run --method dmd2 --checkpoint DIR`` samples in the generator's steps
without CFG (:mod:`methods.dmd2.generator`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from harness.atomic import write_json_atomic
from harness.checkpoints import (
    checkpoint_identity,
    identity_digest,
    inspect_checkpoint,
    save_tensors,
    state_file_name,
)
from harness.errors import HarnessError, check_choice
from harness.models.base import MODELS, ModelAdapter
from harness.recipes import TOY
from harness.spec import Sampling
from harness.train import engine
from harness.train.config import EngineConfig
from harness.train.engine import Run
from harness.train.task import OPTIMIZERS, Group, Modules, Shard, Task
from methods import METHODS, build_method
from methods.base import AttentionMethod
from methods.dmd2.generator import DENSE, SPEC_FILE, STATE_FILE, TRANSFORMER_FILE, Dmd2Generator
from methods.dmd2.losses import (
    distribution_matching_gradient,
    distribution_matching_loss,
    fake_score_loss,
    guided_velocity,
    shifted_times,
)
from methods.dmd2.sampler import generator_times, renoise, timesteps, x0_from_velocity
from methods.linvideo.attention import LinVideo, TransferState, conversion_notes

GAN_NOTE = "DMD2's GAN term (a classifier on the fake score's features) is left out"
REGRESSION_FOLDER = "regression"
Evaluate = Callable[[ModelAdapter, AttentionMethod, int], dict[str, float]]


@dataclass(frozen=True)
class Dmd2Config(EngineConfig):
    """One DMD2 distillation (the config is the experiment); ``steps`` counts generator steps."""

    model: str = "toy"
    weights: str = "builtin"  # the teacher's (--weights)
    init: str = "dense"  # "dense" (the teacher) or a method checkpoint folder
    init_id: str = ""  # what the init holds: the teacher weights' digest, or the checkpoint folder's content id
    prompts_id: str = ""  # sha256 (12 hex) of the training prompts
    sampler_steps: int = 4
    lr: float = 2e-5  # the generator's (and a LinVideo init's feature maps')
    fake_lr: float = 2e-5
    betas: tuple[float, float] = (0.0, 0.999)  # both AdamW (DMD2 and public Wan DMD recipes: beta1 0)
    warmup_fraction: float = 0.0  # then constant learning rates, as DMD2
    fake_updates: int = 5  # fake-score updates per generator step (two time-scale update rule)
    real_cfg: float = 0.0  # the real score's CFG scale; 0: the model's
    t_min: float = 0.02  # re-noising times: shift(s), s uniform in [t_min, t_max]
    t_max: float = 0.98
    regression_pairs: int = 0  # teacher ODE pairs of the regression loss (0: off, as DMD2)
    regression_weight: float = 0.25
    # ST + DMD2: selective transfer in the same stage (target_layers 0: off), LinVideo's toy recipe by default
    target_layers: int = 0
    kernel: str = TOY["kernel"]
    r_init: float = TOY["r_init"]
    r_optimizer: str = TOY["r_optimizer"]
    r_lr: float = TOY["r_lr"]
    map_lr: float = TOY["map_lr"]
    lam: float = TOY["lam"]
    alpha_start: float = TOY["alpha_start"]
    alpha_end: float = TOY["alpha_end"]
    alpha_anneal_fraction: float = TOY["alpha_anneal_fraction"]
    # ToyBench of the generator as it samples, every eval_every steps (toy; 0: off), on training-split prompts
    eval_every: int = 0
    eval_clips: int = 32

    def validate(self) -> None:
        """Raise :class:`HarnessError` on an impossible setting (before any model is built)."""
        super().validate()
        if min(self.lr, self.fake_lr, self.r_lr, self.map_lr) <= 0 or self.real_cfg < 0:
            raise HarnessError("learning rates must be > 0 and the real score's CFG >= 0 (0: the model's)")
        if self.fake_updates < 1 or self.sampler_steps < 1:
            raise HarnessError(f"need fake updates >= 1 and sampler steps >= 1, got {self.fake_updates}, "
                               f"{self.sampler_steps}")  # fmt: skip
        if not 0.0 <= self.t_min < self.t_max <= 1.0 or not 0.0 <= self.warmup_fraction < 1.0:
            raise HarnessError("need 0 <= t_min < t_max <= 1 and 0 <= warmup_fraction < 1")
        check_choice("r optimizer", self.r_optimizer, OPTIMIZERS)
        if self.regression_pairs < 0 or self.regression_weight < 0 or self.eval_every < 0 or self.eval_clips < 1:
            raise HarnessError("regression pairs and weight and the evaluation interval must be >= 0, eval clips >= 1")
        if self.target_layers and self.init != "dense":
            raise HarnessError("ST + DMD2 (--target-layers) starts from the dense teacher: drop --init, or drop "
                               "--target-layers to distil the conversion (LinVideo + DMD2, two stages)")  # fmt: skip
        if self.eval_every and self.model != "toy":
            raise HarnessError("the evaluation during training scores ToyBench: the toy model only")

    def warmup_steps(self) -> int:
        return max(1, round(self.warmup_fraction * self.steps))


@dataclass(frozen=True)
class InitSource:
    """Where the generator starts: the dense teacher, or a method checkpoint folder of the same model."""

    kind: str  # "dense" or "checkpoint"
    method: str  # the init's attention method: "sdpa" (dense) or the checkpoint's method
    path: Path | None
    checkpoint_id: str  # the folder's content id ("" for dense)

    def record(self, config: Dmd2Config) -> dict[str, Any]:
        if self.kind == "dense":
            return {"kind": "dense", "model": config.model, "weights": config.weights, "weights_id": config.init_id}
        return {"kind": "checkpoint", "method": self.method, "path": str(self.path),
                "checkpoint_id": self.checkpoint_id}  # fmt: skip

    def describe(self, config: Dmd2Config) -> str:
        steps = f"{config.sampler_steps}-step DMD2 generator, no CFG, from"
        if config.target_layers:
            return (f"{steps} dense {config.model} ({config.weights}) with selective transfer of "
                    f"{config.target_layers} layers in the same stage (ST + DMD2)")  # fmt: skip
        if self.kind == "dense":
            return f"{steps} dense {config.model} ({config.weights})"
        return f"{steps} {self.method} checkpoint {self.checkpoint_id} ({config.model})"


def resolve_init(init: str, model: str) -> InitSource:
    """Check an ``--init`` before any model is built: ``dense``, or a finished method checkpoint folder of
    ``model`` (its spec, state and transformer files whole); :class:`HarnessError` naming the fault."""
    if init == "dense":
        return InitSource("dense", DENSE, None, "")
    path = Path(init).expanduser()
    spec_path = path / SPEC_FILE
    if not spec_path.is_file():
        raise HarnessError(f"--init {init}: not 'dense' nor a checkpoint folder of `bench train` (no {SPEC_FILE})")
    try:
        method = json.loads(spec_path.read_text()).get("method")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
        raise HarnessError(f"--init {init}: unreadable {SPEC_FILE} ({exc})") from None
    if method == "dmd2":
        raise HarnessError(f"--init {init} is a DMD2 generator already; distil from the model it was made from")
    if not isinstance(method, str) or method not in METHODS or not METHODS.get(method).capabilities.needs_training:
        raise HarnessError(f"--init {init}: its spec names method {method!r}, not a trained method's checkpoint")
    summary = inspect_checkpoint(path, METHODS.canonical(method), folder=True)
    if summary.model and summary.model != model:
        raise HarnessError(f"--init {init} is a checkpoint of model {summary.model!r}; this distillation's teacher is "
                           f"{model!r}")  # fmt: skip
    return InitSource("checkpoint", METHODS.canonical(method), path, identity_digest(checkpoint_identity(path)))


class PromptBatches:
    """One data shard's batches: indices ``(B,)`` of training prompts, drawn with the shard's generator."""

    def __init__(self, count: int, batch_size: int, generator: torch.Generator) -> None:
        self.count, self.batch_size, self.generator = count, batch_size, generator

    def batch(self, step: int) -> torch.Tensor:
        return torch.randint(0, self.count, (self.batch_size,), generator=self.generator, device=self.generator.device)


class Dmd2Task(Task):
    """DMD2 on the engine (see the module docstring)."""

    name = "dmd2"
    inner_groups = ("fake_score",)

    def __init__(self, config: Dmd2Config, teacher: ModelAdapter, prompts: tuple[str, ...], init: InitSource,
                 out: Path, evaluate: Evaluate | None = None) -> None:  # fmt: skip
        config.validate()
        self.config, self.teacher, self.prompts, self.init, self.out = config, teacher, prompts, init, out
        self.device, self.evaluate = teacher.device, evaluate
        self.inner_updates = config.fake_updates
        sampling = type(teacher).defaults
        self.sampling = sampling  # the teacher's: its shift, CFG, and the regression pairs' sampler
        self.real_cfg = config.real_cfg or sampling.cfg
        self.times = generator_times(config.sampler_steps, sampling.shift)
        self.latent_shape = type(teacher).latent_shape(sampling)
        self.log: dict[str, Any] = {"evals": []}

    # -- building --------------------------------------------------------------------------------

    def build(self, device: torch.device) -> Modules:
        config, teacher = self.config, self.teacher
        self.generator = copy.copy(teacher)
        self.generator.transformer = copy.deepcopy(teacher.transformer)
        self.fake = copy.copy(teacher)
        self.fake.transformer = copy.deepcopy(teacher.transformer).requires_grad_(True).train()
        self.method, self.transfer = self._generator_attention()
        self.generator.transformer.requires_grad_(True).train()
        with torch.no_grad():
            self.cond = teacher.encode_prompts(list(self.prompts))
            self.uncond = teacher.encode_prompts([self.sampling.negative_prompt])
        self.timesteps = timesteps(self.times, device)
        self.pairs = self._regression_pairs() if config.regression_pairs else None
        replicated = {"transfer": self.transfer} if self.transfer is not None else {}
        return Modules(sharded={"generator": self.generator.transformer, "fake_score": self.fake.transformer},
                       replicated=replicated, frozen={"teacher": teacher.transformer})  # fmt: skip

    def _generator_attention(self) -> tuple[AttentionMethod, TransferState | None]:
        """The generator's attention and its trained state: sdpa (dense), LinVideo's learnable selection (ST),
        or the init checkpoint's method with its state and transformer weights loaded."""
        config, transformer = self.config, self.generator.transformer
        if config.target_layers:
            tc = transformer.config
            state = TransferState(tc.num_layers, tc.num_attention_heads, tc.attention_head_dim, config.kernel,
                                  config.r_init).to(self.device)  # fmt: skip
            method = LinVideo(kernel=config.kernel)
            method.attach(state, converted=False)
            return method, state
        if self.init.path is None:
            return build_method(DENSE), None
        method = build_method(self.init.method)
        method.load_checkpoint(self.init.path, transformer)
        if not isinstance(method, LinVideo) or method.state is None:
            return method, None  # its own state (SLA's projections) stays as converted
        state = method.state.to(self.device)
        for maps in (state.q_maps, state.k_maps):
            maps.requires_grad_(True)  # the selection (rho) stays fixed
        return method, state

    def param_groups(self) -> list[Group]:
        config, warmup = self.config, self.config.warmup_steps()
        generator = list(self.generator.transformer.parameters())
        maps = [] if self.transfer is None else [*self.transfer.q_maps.parameters(), *self.transfer.k_maps.parameters()]
        groups = [Group("fake_score", list(self.fake.transformer.parameters()), config.fake_lr, warmup,
                        betas=config.betas, decay="constant")]  # fmt: skip
        if not config.target_layers:
            return [Group("generator", generator + maps, config.lr, warmup, betas=config.betas, decay="constant"),
                    *groups]  # fmt: skip
        assert self.transfer is not None
        return [Group("generator", generator, config.lr, warmup, betas=config.betas, decay="constant"),
                Group("maps", maps, config.map_lr, warmup, decay="constant", clip_with="generator"),
                Group("r", [self.transfer.rho], config.r_lr, warmup, optimizer=config.r_optimizer, decay="constant"),
                *groups]  # fmt: skip

    def data(self, shard: Shard, step: int) -> PromptBatches:
        return PromptBatches(len(self.prompts), self.config.batch_size, shard.generator)

    def session(self) -> AbstractContextManager[Any]:
        stack = ExitStack()
        stack.enter_context(self.teacher.use_method(build_method(DENSE)))
        stack.enter_context(self.fake.use_method(build_method(DENSE)))
        stack.enter_context(self.generator.use_method(self.method))
        return stack

    # -- the losses ------------------------------------------------------------------------------

    def _noise(self, count: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randn((count, *self.latent_shape), generator=generator, device=generator.device).to(self.device)

    def rollout_length(self, shard: Shard, step: int, update: str) -> int:
        """The sampler time t_k of one micro-batch's backward simulation, uniform over the generator's times.

        A function of the seed, the step, the update (``generator`` or ``fake3``) and the micro-batch only, not of
        the rank: under FSDP every rank must run as many forwards as the others (each one gathers parameters).
        """
        micro = shard.index % self.config.accumulation
        return random.Random(f"{self.config.seed}/{step}/{update}/{micro}").randrange(len(self.times))

    def generated(self, cond: torch.Tensor, k: int, generator: torch.Generator, grad: bool) -> torch.Tensor:
        """Backward simulation: the generator's clean estimate at its time t_k from a rollout of its own sampler from
        pure noise through t_0..t_{k-1} (noise from ``generator``); differentiable in its last step only when
        ``grad``. ``cond``: prompt embeddings ``(B, L, D)``; out ``(B, C, F, H, W)`` fp32."""
        count = cond.shape[0]
        x = self._noise(count, generator)
        with torch.no_grad():
            for index in range(k):
                x0 = self._generator_x0(x, index, cond)
                x = renoise(x0, self.times[index + 1], self._noise(count, generator))
        with torch.set_grad_enabled(grad):
            return self._generator_x0(x, k, cond)

    def _generator_x0(self, x: torch.Tensor, index: int, cond: torch.Tensor) -> torch.Tensor:
        velocity = self.generator.forward(x, self.timesteps[index].expand(x.shape[0]), cond)
        return x0_from_velocity(x, velocity.float(), self.times[index])

    def losses(self, batch: torch.Tensor, shard: Shard, step: int) -> dict[str, torch.Tensor]:
        """The generator's step: L_DM at a re-noised sample of its own (plus the regression and ST terms)."""
        config, generator = self.config, shard.generator
        cond = self.cond[batch]
        x0 = self.generated(cond, self.rollout_length(shard, step, "generator"), generator, grad=True)
        t = shifted_times(x0.shape[0], config.t_min, config.t_max, self.sampling.shift, generator).to(self.device)
        x_t = renoise(x0.detach(), t, self._noise(x0.shape[0], generator))
        with torch.no_grad():
            x0_real = x0_from_velocity(x_t, guided_velocity(self.teacher, x_t, t, cond, self.uncond, self.real_cfg), t)
            x0_fake = x0_from_velocity(x_t, guided_velocity(self.fake, x_t, t, cond, self.uncond, 1.0), t)
        gradient = distribution_matching_gradient(x0, x0_real, x0_fake)
        terms = {"objective": distribution_matching_loss(x0, gradient)}
        if self.pairs is not None:
            terms["regression"] = config.regression_weight * self._regression_loss(generator)
        if config.target_layers:
            terms |= self._selection_losses(step)
        return terms

    def inner_losses(self, batch: torch.Tensor, shard: Shard, step: int, index: int) -> dict[str, torch.Tensor]:
        """One fake-score update: flow matching on fresh generator samples re-noised at random times."""
        config, generator = self.config, shard.generator
        cond = self.cond[batch]
        x0 = self.generated(cond, self.rollout_length(shard, step, f"fake{index}"), generator, grad=False)
        t = shifted_times(x0.shape[0], config.t_min, config.t_max, self.sampling.shift, generator).to(self.device)
        noise = self._noise(x0.shape[0], generator)
        velocity = guided_velocity(self.fake, renoise(x0, t, noise), t, cond, self.uncond, 1.0)
        return {"fake_score": fake_score_loss(velocity, x0, noise)}

    def _selection_losses(self, step: int) -> dict[str, torch.Tensor]:
        """LinVideo's ``lambda L_con`` and ``lambda L_reg`` on the learnable scores (ST + DMD2)."""
        from methods.linvideo.losses import annealed_alpha, binarization_loss, constraint_loss

        config = self.config
        assert self.transfer is not None
        r = self.transfer.r()
        alpha = annealed_alpha(step, config.steps, config.alpha_start, config.alpha_end, config.alpha_anneal_fraction)
        return {"constraint": config.lam * constraint_loss(r, config.target_layers),
                "regulariser": config.lam * binarization_loss(r, alpha)}  # fmt: skip

    # -- the regression loss's teacher ODE pairs -------------------------------------------------

    def _regression_pairs(self) -> dict[str, torch.Tensor]:
        """``regression_pairs`` (noise, teacher output, prompt index) triples: the teacher sampled with its own
        sampler and CFG from seeded noise, the first prompts in turn; made once and kept in ``OUT/regression/``."""
        from safetensors.torch import load_file

        config = self.config
        path = self.out / REGRESSION_FOLDER / f"pairs-{config.regression_pairs}-seed{config.seed}.safetensors"
        if not path.is_file():
            noise = torch.randn((config.regression_pairs, *self.latent_shape),
                                generator=torch.Generator().manual_seed(config.seed + 1))  # fmt: skip
            prompts = torch.arange(config.regression_pairs) % len(self.prompts)
            outputs = []
            with self.teacher.use_method(build_method(DENSE)) as runtime, torch.no_grad():
                for begin in range(0, config.regression_pairs, 16):
                    part = slice(begin, begin + 16)
                    outputs.append(self.teacher.sample(noise[part].to(self.device), self.cond[prompts[part]],
                                                       self.uncond, self.sampling, runtime).float().cpu())  # fmt: skip
            path.parent.mkdir(parents=True, exist_ok=True)
            save_tensors({"noise": noise, "output": torch.cat(outputs), "prompt": prompts}, path)
        return {key: value.to(self.device) for key, value in load_file(str(path)).items()}

    def _regression_loss(self, generator: torch.Generator) -> torch.Tensor:
        assert self.pairs is not None
        index = torch.randint(0, len(self.pairs["prompt"]), (self.config.batch_size,), generator=generator,
                              device=generator.device).to(self.device)  # fmt: skip
        z, cond = self.pairs["noise"][index], self.cond[self.pairs["prompt"][index]]
        return torch.nn.functional.mse_loss(self._generator_x0(z, 0, cond), self.pairs["output"][index])

    # -- evaluation and the result ---------------------------------------------------------------

    def evaluation_method(self) -> Dmd2Generator:
        """The ``dmd2`` method sampling the generator as ``bench run`` does: its times, its current attention."""
        method = Dmd2Generator()
        inner = None if self.method.name == DENSE else self.method
        method.configure(self.times, inner, self.init.describe(self.config))
        return method

    def after_step(self, step: int, run: Run) -> None:
        config = self.config
        if config.target_layers:
            assert self.transfer is not None
            self.transfer.project_()  # r is trained by projected gradient descent, as LinVideo trains it
        if self.evaluate is None or not config.eval_every or (step % config.eval_every and step != config.steps):
            return
        if run.layout.fsdp:
            run.notes.append("the evaluation during training runs without FSDP only; evaluate with `bench run`")
            self.evaluate = None
            return
        self.generator.transformer.eval()
        scores = self.evaluate(self.generator, self.evaluation_method(), step)
        self.generator.transformer.train()
        if run.ranks.lead:
            self.log["evals"].append({"step": step, **scores})
            run.print(f"step {step}: " + ", ".join(f"{k} {v:.1f}" for k, v in scores.items()))

    def finish(self, run: Run) -> Path:
        """The checkpoint folder: the generator's weights, its times, its init method's state, ``spec.json``."""
        transformer = run.gather(self.generator.transformer)
        if not run.ranks.lead:
            return self.out
        config, notes = self.config, []
        init_attention = self.method.name
        if isinstance(self.method, LinVideo) and self.transfer is not None:
            self.method.attach(self.transfer, converted=True)
            self.method.save_state(self.out / state_file_name("linvideo"))
            if config.target_layers:
                notes = conversion_notes(self.transfer.r().detach().cpu().tolist(), config.target_layers)
        elif self.init.path is not None and self.init.method != DENSE:
            self.method.save_state(self.out / state_file_name(init_attention))
        save_tensors(transformer, self.out / TRANSFORMER_FILE)
        self.evaluation_method().save_state(self.out / STATE_FILE)
        shift = self.sampling.shift
        write_json_atomic(self.out / SPEC_FILE, {
            "method": "dmd2", "model": config.model, "weights": config.weights,
            "generator": self.init.describe(config), "gan": GAN_NOTE, "init": self.init.record(config),
            "init_attention": init_attention, "times": list(self.times),
            "fixed_sampling": {"steps": config.sampler_steps, "cfg": 1.0, "shift": shift},
            "real_cfg": self.real_cfg, "config": asdict(config), "layout": run.layout.record(),
            "linear_layers": list(self.transfer.linear_layers()) if self.transfer is not None else None,
            "final_r": self.transfer.r().detach().cpu().tolist() if config.target_layers and self.transfer else None,
            "steps": run.step, "train_seconds": run.seconds, "seconds_per_step": run.seconds / max(run.step, 1),
            "final_losses": run.losses[-1] if run.losses else None, "evals": self.log["evals"],
            "notes": notes, "prompts": {"count": len(self.prompts), "sha256": config.prompts_id},
        })  # fmt: skip
        return self.out


def prompts_digest(prompts: tuple[str, ...]) -> str:
    return hashlib.sha256(json.dumps(list(prompts)).encode()).hexdigest()[:12]


def toybench_evaluation(count: int, seed: int, sampling: Sampling) -> Evaluate:
    """ToyBench of the generator on ``count`` training-split prompts (not the held-out ones ``bench run`` scores,
    so that a curve used to choose a run does not see its test prompts), sampled as ``bench run`` samples with
    ``sampling`` (the generator's steps, no CFG)."""
    from harness.eval.toybench import score_clips
    from harness.models.toy import ToyModel
    from harness.toyworld.sampling import sample_videos

    prompts = list(ToyModel.training_prompts(count, seed + 7919))

    def evaluate(model: ModelAdapter, method: AttentionMethod, step: int) -> dict[str, float]:
        assert isinstance(model, ToyModel)
        scores = score_clips(list(sample_videos(model, prompts, list(range(count)), sampling, method)), prompts)
        return {key: value for key, value in scores.items() if key != "clips"}

    return evaluate


@dataclass(frozen=True)
class Dmd2Request:
    """What ``bench train --method dmd2`` was asked for (prompts: None for the model's training prompts)."""

    config: Dmd2Config
    out: Path
    prompts: tuple[str, ...] | None
    prompt_count: int
    device: str
    show_progress: bool = True


def train(request: Dmd2Request) -> Path:
    """Check the request (the init before any model is built), load the teacher, distil (or resume); returns the
    checkpoint folder."""
    from harness.io_checks import ensure_writable_dir
    from harness.preflight import resolve_device

    config = request.config
    adapter_cls = MODELS.get(config.model)
    config = replace(config, model=MODELS.canonical(config.model))
    config.validate()
    init = resolve_init(config.init, config.model)
    if request.prompt_count < 1:
        raise HarnessError(f"--prompts must be >= 1, got {request.prompt_count}")
    prompts = request.prompts or adapter_cls.training_prompts(request.prompt_count, config.seed)
    adapter_cls.validate_prompts([*prompts, adapter_cls.defaults.negative_prompt])
    device = resolve_device(request.device)
    ensure_writable_dir(request.out)
    teacher = adapter_cls.load(config.weights, device, torch.float32)  # fp32 masters; bf16 autocast on CUDA
    init_id = init.checkpoint_id or identity_digest(teacher.weights_identity() or {"weights": config.weights})
    config = replace(config, init_id=init_id, prompts_id=prompts_digest(tuple(prompts)))
    sampling = replace(adapter_cls.defaults, steps=config.sampler_steps, cfg=1.0)
    evaluate = toybench_evaluation(config.eval_clips, config.seed, sampling) if config.eval_every else None
    return engine.run(Dmd2Task(config, teacher, tuple(prompts), init, request.out, evaluate), request.show_progress)
