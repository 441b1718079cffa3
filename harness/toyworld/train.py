"""``bench toy train``: train the toy teacher with Wan's rectified-flow objective.

x_t = (1 - t) x_0 + t eps, the model predicts u = eps - x_0 (t = 1 is noise). t is uniform, shifted
as the sampler shifts it (t = s u / (1 + (s - 1) u)), so high-noise steps, where layout and motion
are decided, are trained as often as they are sampled.
The prompt is dropped (empty) 10% of the time so that classifier-free guidance works. An EMA of the
weights is what ships. Seeded; resumable from the checkpoint folder; stops on a non-finite loss
keeping the last good checkpoint.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness.checkpoints import load_training_state, save_training_state
from harness.errors import HarnessError
from harness.optim import warmup_cosine
from harness.toyworld import world
from harness.toyworld.checkpoint import (
    TOY_ENCODER_CONFIG,
    TOY_TRANSFORMER_CONFIG,
    build_modules,
    count_parameters,
    save_checkpoint,
)
from harness.toyworld.encoder import tokenize

NUM_TRAIN_TIMESTEPS = 1000
HEAD_DIM = TOY_TRANSFORMER_CONFIG["attention_head_dim"]


@dataclass(frozen=True)
class ToyTrainConfig:
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
    pool_size: int = 40000  # pre-rendered training scenes, redrawn in part every `refresh_every` steps
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
        if self.width < HEAD_DIM or self.width % HEAD_DIM:
            raise HarnessError(f"width must be a positive multiple of {HEAD_DIM} (the head size), got {self.width}")
        if self.layers < 1 or self.ffn_dim < 1:
            raise HarnessError("need layers >= 1 and ffn_dim >= 1")
        if self.checkpoint_dtype not in ("float32", "float16", "bfloat16"):
            raise HarnessError(f"checkpoint_dtype must be float32, float16 or bfloat16, got {self.checkpoint_dtype!r}")
        if self.steps < 1:
            raise HarnessError(f"steps must be >= 1, got {self.steps}")
        if self.batch_size < 1 or self.pool_size < self.batch_size:
            raise HarnessError("need batch_size >= 1 and pool_size >= batch_size")
        if self.init_from and not Path(self.init_from).is_file():
            raise HarnessError(
                f"--init-from {self.init_from} does not exist (a toy_teacher.safetensors of an earlier stage)"
            )
        for name in ("log_every", "checkpoint_every", "eval_every", "refresh_every"):
            if getattr(self, name) % self.sync_every:
                raise HarnessError(f"{name} must be a multiple of sync_every ({self.sync_every})")


class ScenePool:
    """Pre-rendered training clips (on the training device) with their prompt token ids."""

    def __init__(self, size: int, rng: random.Random, device: torch.device) -> None:
        self.rng, self.device = rng, device
        self.clips = torch.empty(size, 3, world.FRAMES, world.HEIGHT, world.WIDTH, device=device)
        self.ids = torch.empty(size, tokenize([""]).shape[1], dtype=torch.long, device=device)
        self.refresh(range(size))

    def refresh(self, rows: range | list[int], chunk: int = 4096) -> None:
        rows = list(rows)
        for begin in range(0, len(rows), chunk):
            part = rows[begin : begin + chunk]
            placed = [world.sample_placed_scene(self.rng, "train") for _ in part]
            clips = world.render_batch([s for s, _ in placed], [p for _, p in placed], device=self.device)
            index = torch.tensor(part, device=self.device)
            self.clips[index] = clips.permute(0, 2, 1, 3, 4)  # (B, F, 3, H, W) -> (B, 3, F, H, W)
            self.ids[index] = tokenize([s.prompt for s, _ in placed]).to(self.device)

    def batch(self, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.randint(0, len(self.clips), (size,), generator=generator, device=self.device)
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


@dataclass
class TrainState:
    step: int
    losses: list[float]
    evals: list[dict[str, Any]]
    seconds: float


def _save_training_state(out: Path, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer,
                         state: TrainState, config: ToyTrainConfig, generator: torch.Generator,
                         rng: random.Random) -> None:  # fmt: skip
    """Resumable checkpoint: modules, optimizer moments and RNG states (the scene pool's too)."""
    meta = {"config": asdict(config), **asdict(state), "python_rng": repr(rng.getstate())}
    save_training_state(out, modules, {"adamw": optimizer}, generator, meta)


def _load_training_state(out: Path, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer,
                         generator: torch.Generator, rng: random.Random,
                         config: ToyTrainConfig) -> TrainState | None:  # fmt: skip
    import ast

    meta = load_training_state(out, modules, {"adamw": optimizer}, generator)
    if meta is None:
        return None
    if meta["config"] != asdict(config):
        raise HarnessError(f"{out} holds a run with another config; use another --out or the same settings")
    rng.setstate(ast.literal_eval(meta["python_rng"]))
    return TrainState(meta["step"], meta["losses"], meta["evals"], meta["seconds"])


def train(config: ToyTrainConfig, out: Path, device: torch.device,
          evaluate: Callable[[nn.Module, nn.Module, int], dict[str, float]] | None = None,
          show_progress: bool = True, compile_model: bool = False) -> Path:  # fmt: skip
    """Train (or resume) into ``out``; returns the path of the EMA teacher checkpoint.

    ``compile_model`` runs the training forward through ``torch.compile`` (same computation; at this
    model size the GPU step is bound by kernel launches, which fusion removes).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    config.validate()
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    # Randomness of the data order, noise and timesteps lives on the training device (no host round trips).
    generator = torch.Generator(device=device).manual_seed(config.seed)
    transformer, encoder = build_modules(config.transformer_config(), TOY_ENCODER_CONFIG)
    if config.init_from:
        _init_from_teacher(Path(config.init_from), transformer, encoder)
    ema_transformer, ema_encoder = build_modules(config.transformer_config(), TOY_ENCODER_CONFIG)
    ema_transformer.load_state_dict(transformer.state_dict())
    ema_encoder.load_state_dict(encoder.state_dict())
    modules = {"transformer": transformer, "encoder": encoder, "ema_transformer": ema_transformer,
               "ema_encoder": ema_encoder}  # fmt: skip
    for module in modules.values():
        module.to(device)
    params = [*transformer.parameters(), *encoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.99))
    state = _load_training_state(out, modules, optimizer, generator, rng, config) or TrainState(0, [], [], 0.0)
    pool = ScenePool(config.pool_size, rng, device)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    )
    ema_params = [*ema_transformer.parameters(), *ema_encoder.parameters()]
    forward = torch.compile(transformer) if compile_model else transformer

    columns = (TextColumn("[bold]toy train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"))
    progress = Progress(*columns, TimeRemainingColumn(), disable=not show_progress)
    with progress:
        task = progress.add_task("train", total=config.steps, completed=state.step, info="")
        started = time.time() - state.seconds
        first_step, resumed_at = state.step, time.time()
        pending: list[torch.Tensor] = []
        while state.step < config.steps:
            step = state.step
            for group in optimizer.param_groups:
                group["lr"] = config.lr * warmup_cosine(step, config.warmup_steps, config.steps)
            clips, ids = pool.batch(config.batch_size, generator)
            transformer.train(), encoder.train()
            with autocast:
                loss = flow_matching_loss(
                    forward, encoder, clips, ids, generator, config.prompt_dropout, config.timestep_shift
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            with torch.no_grad():
                torch._foreach_lerp_(ema_params, params, 1 - config.ema_decay)
            state.step += 1
            pending.append(loss.detach())
            progress.update(task, advance=1)
            if state.step % config.sync_every == 0 or state.step == config.steps:
                # One host sync per `sync_every` steps; a non-finite loss stops before anything is saved.
                values = torch.stack(pending).float().cpu().tolist()
                pending.clear()
                if not all(math.isfinite(v) for v in values):
                    raise HarnessError(
                        f"non-finite loss at or before step {state.step}; last good checkpoint kept in {out}"
                    )
                state.losses.extend(values)
                progress.update(task, info=f"loss {sum(values) / len(values):.4f}")
            if state.step % config.log_every == 0:
                rate = (state.step - first_step) / max(time.time() - resumed_at, 1e-9)
                recent = state.losses[-config.log_every :]
                progress.console.print(f"step {state.step}: loss {sum(recent) / len(recent):.4f}, {rate:.1f} steps/s")
            if state.step % config.refresh_every == 0 and state.step < config.steps:
                pool.refresh(rng.sample(range(config.pool_size), config.pool_size // 4))
            if evaluate is not None and (state.step % config.eval_every == 0 or state.step == config.steps):
                scores = evaluate(ema_transformer, ema_encoder, state.step)
                state.evals.append({"step": state.step, **scores})
                progress.console.print(f"step {state.step}: " + ", ".join(f"{k} {v:.1f}" for k, v in scores.items()))
            if state.step % config.checkpoint_every == 0 or state.step == config.steps:
                state.seconds = time.time() - started
                _save_training_state(out, modules, optimizer, state, config, generator, rng)
                save_checkpoint(
                    out / "toy_teacher.safetensors",
                    ema_transformer,
                    ema_encoder,
                    _info(state, config, device, ema_transformer, ema_encoder),
                    dtype=getattr(torch, config.checkpoint_dtype),
                )
    return out / "toy_teacher.safetensors"  # written with the last checkpoint


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


def _info(state: TrainState, config: ToyTrainConfig, device: torch.device, *modules: nn.Module) -> dict[str, Any]:
    """What the teacher checkpoint records about its training."""
    recent = state.losses[-100:]
    return {
        "steps": state.step,
        "train_seconds": state.seconds,
        "config": asdict(config),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "parameters": count_parameters(*modules),
        "final_loss_avg100": sum(recent) / max(len(recent), 1),
        "evals": state.evals,
    }
