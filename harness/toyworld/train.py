"""``bench toy train``: train the toy teacher with Wan's rectified-flow objective, as a task of the engine.

x_t = (1 - t) x_0 + t eps, the model predicts u = eps - x_0 (t = 1 is noise). t is uniform, shifted
as the sampler shifts it (t = s u / (1 + (s - 1) u)), so high-noise steps, where layout and motion
are decided, are trained as often as they are sampled.
The prompt is dropped (empty) 10% of the time so that classifier-free guidance works. An EMA of the
weights is what ships. The loop, schedule, clipping, checkpoints (resume, also on another number of ranks),
the stop on a non-finite loss and FSDP2 under torchrun are :mod:`harness.train`'s.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness.errors import HarnessError, check_number
from harness.toyworld import world
from harness.toyworld.checkpoint import (
    TOY_ENCODER_CONFIG,
    TOY_TRANSFORMER_CONFIG,
    build_modules,
    count_parameters,
    save_checkpoint,
)
from harness.toyworld.encoder import tokenize
from harness.train import engine
from harness.train.config import EngineConfig
from harness.train.engine import Run
from harness.train.parallel import local
from harness.train.task import Group, Modules, Shard, Task

NUM_TRAIN_TIMESTEPS = 1000
HEAD_DIM = TOY_TRANSFORMER_CONFIG["attention_head_dim"]
TEACHER_FILE = "toy_teacher.safetensors"
Evaluate = Callable[[nn.Module, nn.Module, int], dict[str, float]]


@dataclass(frozen=True)
class ToyTrainConfig(EngineConfig):
    """The training recipe of the shipped teacher (the config is the experiment)."""

    width: int = TOY_TRANSFORMER_CONFIG["num_attention_heads"] * HEAD_DIM  # heads of 32 channels
    layers: int = TOY_TRANSFORMER_CONFIG["num_layers"]
    ffn_dim: int = TOY_TRANSFORMER_CONFIG["ffn_dim"]
    checkpoint_dtype: str = "float32"  # of the shipped teacher; float16 halves its size
    steps: int = 18000
    batch_size: int = 256
    lr: float = 8e-4
    weight_decay: float = 0.01
    warmup_steps: int = 500
    ema_decay: float = 0.999
    prompt_dropout: float = 0.1
    timestep_shift: float = 3.0  # the toy model's sampling shift
    grad_clip: float = 1.0
    # Pre-rendered training scenes (split evenly over the data shards), redrawn in part every `refresh_every` steps.
    pool_size: int = 40000
    refresh_every: int = 2000
    eval_every: int = 4000
    eval_clips: int = 32
    checkpoint_every: int = 1000
    log_every: int = 500
    sync_every: int = 50
    seed: int = 0
    # A later stage of the recipe starts from an earlier stage's teacher (its weights; fresh optimizer).
    init_from: str = ""
    init_sha256: str = ""

    def transformer_config(self) -> dict[str, Any]:
        return TOY_TRANSFORMER_CONFIG | {
            "num_attention_heads": self.width // HEAD_DIM,
            "num_layers": self.layers,
            "ffn_dim": self.ffn_dim,
        }

    def validate(self) -> None:
        super().validate()
        if self.width < HEAD_DIM or self.width % HEAD_DIM:
            raise HarnessError(f"width must be a positive multiple of {HEAD_DIM} (the head size), got {self.width}")
        if self.layers < 1 or self.ffn_dim < 1:
            raise HarnessError("need layers >= 1 and ffn_dim >= 1")
        if self.checkpoint_dtype not in ("float32", "float16", "bfloat16"):
            raise HarnessError(f"checkpoint_dtype must be float32, float16 or bfloat16, got {self.checkpoint_dtype!r}")
        check_number("lr", self.lr, gt=0)
        check_number("timestep shift", self.timestep_shift, gt=0)
        for name in ("weight_decay", "ema_decay", "prompt_dropout"):
            check_number(name.replace("_", " "), getattr(self, name), ge=0, le=1)
        if self.pool_size < self.batch_size or self.refresh_every < 1:
            raise HarnessError("need pool_size >= batch_size and refresh_every >= 1")
        if self.init_from and not Path(self.init_from).is_file():
            raise HarnessError(
                f"--init-from {self.init_from} does not exist (a toy_teacher.safetensors of an earlier stage)"
            )
        for name in ("eval_every", "refresh_every"):
            if getattr(self, name) % self.sync_every:
                raise HarnessError(f"{name} must be a multiple of sync_every ({self.sync_every})")


class ScenePool:
    """One data shard's pre-rendered training clips (on the training device) and their prompt token ids.

    A quarter of the rows is redrawn before every ``refresh_every``-th step. The pool at any step is a function
    of its seed: built at step ``step`` it replays the earlier refreshes' draws (rendering only each row's last
    scene), so a resumed run continues with the clips an uninterrupted one had.
    """

    def __init__(self, size: int, seed: int, refresh_every: int, batch_size: int, generator: torch.Generator,
                 device: torch.device, step: int = 0) -> None:  # fmt: skip
        self.rng, self.device, self.size = random.Random(seed), device, size
        self.refresh_every, self.batch_size, self.generator = refresh_every, batch_size, generator
        scenes = [world.sample_placed_scene(self.rng, "train") for _ in range(size)]
        self.refreshed = 0
        for _ in range(refresh_every, step + 1, refresh_every):
            for row, scene in zip(*self._redraw(), strict=True):
                scenes[row] = scene
        self.clips = torch.empty(size, 3, world.FRAMES, world.HEIGHT, world.WIDTH, device=device)
        self.ids = torch.empty(size, tokenize([""]).shape[1], dtype=torch.long, device=device)
        self._render(list(range(size)), scenes)
        self.refreshed = step // refresh_every

    def _redraw(self) -> tuple[list[int], list[tuple[world.Scene, world.Placement]]]:
        rows = self.rng.sample(range(self.size), self.size // 4)
        return rows, [world.sample_placed_scene(self.rng, "train") for _ in rows]

    def _render(self, rows: list[int], placed: list[tuple[world.Scene, world.Placement]], chunk: int = 4096) -> None:
        for begin in range(0, len(rows), chunk):
            part = placed[begin : begin + chunk]
            clips = world.render_batch([s for s, _ in part], [p for _, p in part], device=self.device)
            index = torch.tensor(rows[begin : begin + chunk], device=self.device)
            self.clips[index] = clips.permute(0, 2, 1, 3, 4)  # (B, F, 3, H, W) -> (B, 3, F, H, W)
            self.ids[index] = tokenize([s.prompt for s, _ in part]).to(self.device)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Clips ``(B, 3, F, H, W)`` in [-1, 1] and token ids ``(B, L)`` for optimizer step ``step``."""
        if step // self.refresh_every > self.refreshed:
            self._render(*self._redraw())
            self.refreshed = step // self.refresh_every
        index = torch.randint(0, self.size, (self.batch_size,), generator=self.generator, device=self.device)
        return self.clips[index], self.ids[index]


def flow_matching_loss(transformer: nn.Module, encoder: nn.Module, clips: torch.Tensor, ids: torch.Tensor,
                       generator: torch.Generator, prompt_dropout: float, shift: float) -> torch.Tensor:  # fmt: skip
    """Rectified-flow loss: MSE between predicted and true velocity eps - x0 at shifted-uniform t."""
    batch = clips.shape[0]
    device = clips.device
    u = torch.rand(batch, generator=generator, device=device)
    t = shift * u / (1 + (shift - 1) * u)
    noise = torch.randn(clips.shape, generator=generator, device=device)
    drop = torch.rand(batch, generator=generator, device=device) < prompt_dropout
    ids = torch.where(drop.unsqueeze(1), torch.zeros_like(ids), ids)
    t_ = t.view(-1, 1, 1, 1, 1)
    noisy = (1 - t_) * clips + t_ * noise
    embeddings = encoder(ids)
    velocity = transformer(noisy, timestep=t * NUM_TRAIN_TIMESTEPS, encoder_hidden_states=embeddings,
                           return_dict=False)[0]  # fmt: skip
    return torch.nn.functional.mse_loss(velocity.float(), (noise - clips).float())


class ToyTeacherTask(Task):
    """Transformer + prompt encoder trained by flow matching; their EMA is evaluated and written as the teacher."""

    name = "toy train"

    def __init__(self, config: ToyTrainConfig, out: Path, device: torch.device, evaluate: Evaluate | None = None,
                 compile_model: bool = False) -> None:  # fmt: skip
        self.config, self.out, self.device = config, out, device
        self.evaluate, self.compile_model = evaluate, compile_model
        self.log: dict[str, Any] = {"evals": []}

    def build(self, device: torch.device) -> Modules:
        config = self.config
        self.transformer, self.encoder = build_modules(config.transformer_config(), TOY_ENCODER_CONFIG)
        if config.init_from:
            _init_from_teacher(Path(config.init_from), self.transformer, self.encoder)
        self.ema_transformer, self.ema_encoder = build_modules(config.transformer_config(), TOY_ENCODER_CONFIG)
        self.ema_transformer.load_state_dict(self.transformer.state_dict())
        self.ema_encoder.load_state_dict(self.encoder.state_dict())
        modules = {"transformer": self.transformer, "encoder": self.encoder, "ema_transformer": self.ema_transformer,
                   "ema_encoder": self.ema_encoder}  # fmt: skip
        for module in modules.values():
            module.to(device)
        self.ema_transformer.requires_grad_(False)
        self.ema_encoder.requires_grad_(False)
        self.forward = torch.compile(self.transformer) if self.compile_model else self.transformer
        return Modules(sharded=modules)

    def param_groups(self) -> list[Group]:
        self.params = [*self.transformer.parameters(), *self.encoder.parameters()]
        self.ema_params = [*self.ema_transformer.parameters(), *self.ema_encoder.parameters()]
        config = self.config
        return [Group("adamw", self.params, config.lr, config.warmup_steps, weight_decay=config.weight_decay,
                      betas=(0.9, 0.99))]  # fmt: skip

    def data(self, shard: Shard, step: int) -> ScenePool:
        size = self.config.pool_size // shard.count
        if size < self.config.batch_size:
            raise HarnessError(f"the scene pool of {self.config.pool_size} clips split over {shard.count} data shards "
                               f"holds {size} each, fewer than the batch ({self.config.batch_size})")  # fmt: skip
        return ScenePool(size, shard.seed, self.config.refresh_every, self.config.batch_size, shard.generator,
                         self.device, step)  # fmt: skip

    def losses(self, batch: tuple[torch.Tensor, torch.Tensor], shard: Shard, step: int) -> dict[str, torch.Tensor]:
        self.transformer.train(), self.encoder.train()
        config = self.config
        return {"objective": flow_matching_loss(self.forward, self.encoder, *batch, shard.generator,
                                                config.prompt_dropout, config.timestep_shift)}  # fmt: skip

    def after_step(self, step: int, run: Run) -> None:
        with torch.no_grad():
            torch._foreach_lerp_(local(self.ema_params), local(self.params), 1 - self.config.ema_decay)
        if self.evaluate is not None and (step % self.config.eval_every == 0 or step == self.config.steps):
            scores = self._evaluate_ema(step, run)
            if run.ranks.lead:
                self.log["evals"].append({"step": step, **scores})
                run.print(f"step {step}: " + ", ".join(f"{k} {v:.1f}" for k, v in scores.items()))

    def _evaluate_ema(self, step: int, run: Run) -> dict[str, float]:
        """ToyBench of the EMA: on the modules themselves, or under FSDP on a copy gathered on the lead."""
        assert self.evaluate is not None
        if not run.layout.fsdp:
            return self.evaluate(self.ema_transformer, self.ema_encoder, step)
        transformer_state, encoder_state = run.gather(self.ema_transformer), run.gather(self.ema_encoder)
        if not run.ranks.lead:
            return {}
        transformer, encoder = build_modules(self.config.transformer_config(), TOY_ENCODER_CONFIG)
        transformer.load_state_dict(transformer_state)
        encoder.load_state_dict(encoder_state)
        return self.evaluate(transformer.to(run.device), encoder.to(run.device), step)

    def on_checkpoint(self, step: int, run: Run) -> None:
        """Write the EMA teacher with every checkpoint (gathered from the shards; the lead writes)."""
        transformer_state, encoder_state = run.gather(self.ema_transformer), run.gather(self.ema_encoder)
        if run.ranks.lead:
            config = dict(self.ema_transformer.config)
            save_checkpoint(self.out / TEACHER_FILE, transformer_state, encoder_state, config, self._info(run),
                            dtype=getattr(torch, self.config.checkpoint_dtype))  # fmt: skip

    def finish(self, run: Run) -> Path:
        return self.out / TEACHER_FILE  # written with the last checkpoint

    def _info(self, run: Run) -> dict[str, Any]:
        """What the teacher checkpoint records about its training."""
        recent = [entry["objective"] for entry in run.losses[-100:]]
        device = run.device
        return {
            "steps": run.step,
            "train_seconds": run.seconds,
            "config": asdict(self.config),
            "layout": run.layout.record(),
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "parameters": count_parameters(self.ema_transformer, self.ema_encoder),
            "final_loss_avg100": sum(recent) / max(len(recent), 1),
            "evals": self.log["evals"],
        }


def train(config: ToyTrainConfig, out: Path, device: torch.device, evaluate: Evaluate | None = None,
          show_progress: bool = True, compile_model: bool = False) -> Path:  # fmt: skip
    """Train (or resume) into ``out``; returns the path of the EMA teacher checkpoint.

    ``compile_model`` runs the training forward through ``torch.compile`` (same computation; at this
    model size the GPU step is bound by kernel launches, which fusion removes).
    """
    return engine.run(ToyTeacherTask(config, out, device, evaluate, compile_model), show_progress)


def _init_from_teacher(path: Path, transformer: nn.Module, encoder: nn.Module) -> None:
    """Start from an earlier stage's teacher; its architecture must be the one configured."""
    from harness.toyworld.checkpoint import load_checkpoint

    previous_transformer, previous_encoder, _ = load_checkpoint(path)

    def architecture(module: nn.Module) -> str:
        return json.dumps({k: v for k, v in module.config.items() if not k.startswith("_")}, sort_keys=True)

    if architecture(previous_transformer) != architecture(transformer):
        raise HarnessError(f"{path} has another transformer config than this run; match --width/--layers/--ffn-dim")
    transformer.load_state_dict(previous_transformer.state_dict())
    encoder.load_state_dict(previous_encoder.state_dict())
